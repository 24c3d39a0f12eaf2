// skinny_gemm.cu: y = x @ W^T for decode, when x has only 1 to 16 rows.
//
//     y[m, n] = sum_k x[m, k] * W[n, k]      x [M, K], W [N, K] (nn.Linear's layout), y [M, N]
//     bf16 or fp16 in and out, float32 accumulation, one rounding per output.
//
// ---- Why not cuBLAS here ---------------------------------------------------------------
// In a decode step every linear layer multiplies the whole weight matrix by one token per
// sequence: M = the batch, often 1 to 16. Each weight is then used M times, 2M flops per
// 2-byte weight, so the time is the time to READ THE WEIGHT ONCE: 8.4 MB for Llama-3.2-1B's
// o projection, 525 MB for its lm_head. cuBLAS is built for the other regime: its GEMM
// kernels tile M and N by 64 to 256 so each loaded byte serves many multiply-adds, and at
// M = 1 most of every tile is padding; to get enough blocks for a thin matrix it splits K
// and adds the pieces in a second kernel or through a workspace; the launch, the extra pass
// and a shape picked by a general heuristic all cost time that a 3-20 us kernel feels. A
// kernel written for exactly this shape only has to keep the memory system busy.
//
// ---- The shape of this kernel -----------------------------------------------------------
// * One warp owns 16 output columns (16 rows of W) and ALL M rows of x, so each weight byte
//   is read from memory once, by one lane, as part of a 16-byte load (8 bf16: the widest
//   load a thread can issue, hence the most bytes in flight per instruction).
// * The math runs on the tensor cores (mma.sync m16n8k16): W's 16 rows are the A operand,
//   up to 8 rows of x the B operand (two B operands for M = 9..16). On the CUDA cores each
//   weight would cost M fp32 multiply-adds plus its conversion: an H200 streams about 18
//   bytes (9 bf16 weights) per cycle into each SM (4.8 TB/s over 132 SMs at 1.98 GHz), so at
//   M = 16 that is 144 multiply-adds per cycle, and an SM issues at most 128 thread-
//   instructions per cycle of any kind: the CUDA cores fall behind the memory from M of
//   about 8. One mma does 16 x 8 x 16 multiply-adds. The 16-byte loads feed the mma with no
//   shuffle: k may be renamed inside a dot product (skinny_gemm.cuh shows the renaming).
// * Split K inside the block: the block's warps (4 to 16) share the 16 columns and take
//   turns along K, each issuing all of its loads for 4 k steps (128 k x 16 rows = 4 KB per
//   warp) before its first mma. Their partial sums meet in shared memory and the block
//   writes y once: no workspace, no atomics, no second kernel, and the same result every
//   run. The grid is N / 16 blocks. For every Llama-3.2-1B linear that fills the GPU (N =
//   2048 gives 128 blocks of 16 warps on an H100/H200's 132 SMs, 64 KB in flight per SM),
//   so blocks never need to split K between them; the plan (skinny_gemm.cuh) picks the most
//   warps per block that still lets every block run in the first wave. A smaller N
//   (SmolLM2-135M's 576: 36 blocks) leaves SMs idle, but its whole weight (0.66 MB) is in
//   flight at once: that kernel's time is latency, not bandwidth, and a split across blocks
//   (a second launch, or atomics into a zeroed fp32 workspace) would cost more than it saves.
//
// What it requires (ops.linear sends anything else to cuBLAS; the op raises): M <= 16,
// bf16/fp16, K % 8 == 0 (rows are whole 16-byte vectors), x and W 16-byte aligned, x's row
// stride a multiple of 8 elements (rows may be strided), W contiguous. Tails are exact: rows
// of W past N, rows of x past M and k past K are read as zeros (predicated loads).
//
// Where it is used: tinyvllm.ops.linear's dispatch rule (tinyvllm/ops/__init__.py,
// linear_impl) picks this kernel or the cuBLAS wrapper (gemm.cpp). The course has the
// reasoning with pictures: docs/course/07b-the-skinny-gemm.md.
// Run: tests/test_skinny_gemm.py; dev/cuda/skinny_gemm.cu (its simpler versions, checked
// and timed beside cuBLAS and a copy); bench/bench_gemm.py (against torch.matmul and cuBLAS).
#include <climits>
#include <stdexcept>
#include <string>

#include "gemm/skinny_gemm.cuh"
#include "ops.h"

namespace tinyvllm {
namespace {

constexpr int kUnroll = 4;  // k steps per warp per round: 2 x 4 weight loads + 4 x loads of 16 B per lane

template <typename T>
void run(void* y, const void* x, const void* w, int m, int n, int k, int64_t x_row_stride, cudaStream_t stream) {
  const int sms = attn::num_sms_of_current_device();
  auto* yt = static_cast<T*>(y);
  const auto* xt = static_cast<const T*>(x);
  const auto* wt = static_cast<const T*>(w);
  if (m <= 8) {
    const int warps = gemm::plan_warps<T, 1, kUnroll>(n, k, sms);
    gemm::launch_skinny_gemm<T, 1, kUnroll>(yt, xt, wt, m, n, k, x_row_stride, warps, stream);
  } else {
    const int warps = gemm::plan_warps<T, 2, kUnroll>(n, k, sms);
    gemm::launch_skinny_gemm<T, 2, kUnroll>(yt, xt, wt, m, n, k, x_row_stride, warps, stream);
  }
}

}  // namespace

void skinny_gemm(void* y, const void* x, const void* w, int64_t m, int64_t n, int64_t k, int64_t x_row_stride,
                 DType dtype, cudaStream_t stream) {
  const std::string shape = " (M=" + std::to_string(m) + " N=" + std::to_string(n) + " K=" + std::to_string(k) + ")";
  if (m < 0 || m > gemm::kMaxRows) {
    throw std::invalid_argument("skinny_gemm: M must be at most " + std::to_string(gemm::kMaxRows) + shape);
  }
  if (n < 0 || k < 0 || n > INT_MAX || k > INT_MAX) {
    throw std::invalid_argument("skinny_gemm: N and K must fit in a 32-bit int" + shape);
  }
  if (k % 8 != 0) {
    throw std::invalid_argument("skinny_gemm: K must be a multiple of 8 (16-byte rows)" + shape);
  }
  if (!is_aligned16(x) || !is_aligned16(w) || (m > 1 && x_row_stride % 8 != 0)) {
    throw std::invalid_argument(
        "skinny_gemm: x and w must start on a 16-byte boundary and x's row stride must be a multiple of 8" + shape);
  }
  if (m == 0 || n == 0) return;
  switch (dtype) {
    case DType::kBFloat16:
      run<__nv_bfloat16>(y, x, w, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), x_row_stride,
                         stream);
      break;
    case DType::kFloat16:
      run<__half>(y, x, w, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), x_row_stride, stream);
      break;
    default:
      throw std::invalid_argument("skinny_gemm: bf16 or fp16 only (float32 goes to cuBLAS)");
  }
}

}  // namespace tinyvllm
