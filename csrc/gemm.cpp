// gemm.cpp: y = x @ W^T through cuBLAS, for row-major tensors.
//
// Every projection in Llama (q/k/v, o, gate/up, down, lm_head) is a linear layer
// y = x W^T with x: [M, K] (M tokens), W: [N, K] (PyTorch's nn.Linear layout: one
// ROW of W per output feature), y: [M, N]. These GEMMs are 90%+ of the FLOPs. We
// do not write them ourselves: cuBLAS has hand-tuned tensor-core kernels for every
// shape and GPU, and beating it is a research project. What this file teaches is
// how to CALL it correctly from row-major code, because cuBLAS is column-major.
//
// ---- The transpose trick --------------------------------------------------------
// Memory is one line of numbers. A row-major [R, C] array stores A[r][c] at
// r * C + c. A column-major [R, C] array stores A(r, c) at c * R + r ("ld", the
// leading dimension, is the distance between columns; here R).
// Read the same bytes the other way round: element r * C + c of a row-major
// [R, C] array A is, viewed column-major as a [C, R] matrix B, B(c, r) = A[r][c].
//
//     The bytes of a row-major matrix ARE the column-major matrix of its transpose.
//
// So, in column-major eyes, our three buffers hold:
//     y  (row-major [M, N])  ->  y^T   (col-major N x M, ld = N)
//     x  (row-major [M, K])  ->  x^T   (col-major K x M, ld = K)
//     W  (row-major [N, K])  ->  W^T   (col-major K x N, ld = K)
// and we want y = x W^T, i.e. (transposing both sides) y^T = W x^T. cuBLAS computes
//     C (m x n) = op(A) (m x k) * op(B) (k x n)
// so take C = y^T with m = N, n = M; A = our W buffer, which cuBLAS sees as W^T
// (K x N), so op(A) = transpose -> W (N x K), lda = K; B = our x buffer, which it
// sees as x^T (K x M), exactly what we need: op(B) = no transpose, ldb = K; ldc = N.
//
//     cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, /*m=*/N, /*n=*/M, /*k=*/K,
//                  &alpha, W, lda=K, x, ldb=K, &beta, y, ldc=N, ...)
//
// No data is moved: the "transposes" are only how cuBLAS indexes. This "TN" call is
// what torch itself issues for nn.Linear.
// Index check, element y[i][j] (row-major, at i*N + j) = C(j, i) in col-major with
// ld N = sum_k op(A)(j, k) * op(B)(k, i) = sum_k A(k, j) * B(k, i)
//     = sum_k W_buf[j*K + k] * x_buf[i*K + k] = sum_k W[j][k] * x[i][k].   Correct.
//
// ---- Types -------------------------------------------------------------------------
// bf16/fp16 in and out with CUBLAS_COMPUTE_32F: products summed in float32 on the
// tensor cores, rounded once when written; alpha and beta are floats. float32 in and
// out uses the same compute type: full fp32, or TF32 tensor cores when the handle's
// math mode allows it, which torch sets from torch.backends.cuda.matmul.allow_tf32
// (so we match torch.matmul either way).
//
// ---- Handle, stream and workspace ---------------------------------------------------
// A cuBLAS handle holds per-GPU state and is expensive to create, so it is made once
// and reused. We reuse torch's: at::cuda::getCurrentCUDABlasHandle() (called in
// torch_bindings.cpp) returns a handle for the current device and thread, already
// bound to the current stream, with a workspace that torch allocated for that stream
// via cublasSetWorkspace. That workspace matters under CUDA graph capture: without one
// cuBLAS allocates scratch memory itself during the call, which capture forbids. We
// still bind the stream here (cheap) so the launcher honours its `stream` argument
// like every other launcher in ops.h.
#include <climits>
#include <stdexcept>
#include <string>

#include <cublas_v2.h>

#include "ops.h"

namespace tinyvllm {

namespace {

void check_cublas(cublasStatus_t status, const char* what, int64_t m, int64_t n, int64_t k) {
  if (status != CUBLAS_STATUS_SUCCESS) {
    throw std::runtime_error(std::string("tinyvllm gemm: ") + what + " failed: " + cublasGetStatusName(status) +
                             " (" + cublasGetStatusString(status) + ") for M=" + std::to_string(m) +
                             " N=" + std::to_string(n) + " K=" + std::to_string(k));
  }
}

cudaDataType_t cuda_type(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return CUDA_R_32F;
    case DType::kFloat16:
      return CUDA_R_16F;
    case DType::kBFloat16:
      return CUDA_R_16BF;
  }
  throw std::invalid_argument("tinyvllm gemm: unsupported dtype");
}

}  // namespace

void gemm_xwt(void* y, const void* x, const void* w, int64_t m, int64_t n, int64_t k, DType dtype,
              void* cublas_handle, cudaStream_t stream) {
  if (m == 0 || n == 0) return;
  if (m > INT_MAX || n > INT_MAX || k > INT_MAX) {
    throw std::invalid_argument("tinyvllm gemm: M, N and K must each fit in a 32-bit int");
  }
  if (cublas_handle == nullptr) throw std::invalid_argument("tinyvllm gemm: null cuBLAS handle");
  auto handle = static_cast<cublasHandle_t>(cublas_handle);
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream", m, n, k);

  const cudaDataType_t t = cuda_type(dtype);
  const float alpha = 1.0f;
  const float beta = 0.0f;  // y is overwritten, never read (so it needs no initialisation)
  check_cublas(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N,
                            /*m=*/static_cast<int>(n), /*n=*/static_cast<int>(m), /*k=*/static_cast<int>(k),
                            &alpha,
                            /*A=*/w, t, /*lda=*/static_cast<int>(k),
                            /*B=*/x, t, /*ldb=*/static_cast<int>(k),
                            &beta,
                            /*C=*/y, t, /*ldc=*/static_cast<int>(n),
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx", m, n, k);
}

}  // namespace tinyvllm
