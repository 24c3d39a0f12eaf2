// decode_merge.cu: the split-K ("flash-decoding") merge of paged decode attention.
//
// When the plan cuts each context into num_splits partitions, every partition's block
// leaves its unnormalised online-softmax state (m, l, acc) in the workspace. One block per
// (query head, sequence) then combines the partitions' states with weights 2^(m_i - M),
// M = max_i m_i, and divides by the total l:  out = sum_i 2^(m_i - M) acc_i / sum_i 2^(m_i - M) l_i.
// A sequence that fits into one partition was finished by the first kernel; its block here
// returns at once.
//
// The merge is launched "programmatically dependent" (PDL, sm_90+): its launch overlaps the
// first kernel, and it waits for that kernel's results only where it reads them.
#include "attention/decode_common.cuh"

namespace tinyvllm {
namespace decode {
namespace {

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_merge_kernel(const DecodeParams p) {
  attn::allow_dependent_launch();  // the o_proj GEMM may start loading its weights (it waits for us)
  // Launched early (programmatic dependent launch, see launch below): from here on we
  // read what the main kernel wrote, so wait until it has finished. Every block waits, even
  // one with nothing to merge: this grid must not end before the main kernel has, since the
  // next kernel's wait covers only this grid.
  attn::wait_for_prerequisite_grids();
  const int h = blockIdx.x;
  const int seq = blockIdx.y;
  const int seq_len = clamped_seq_len(p, seq);
  const int n_parts = (seq_len + p.partition_size - 1) / p.partition_size;
  if (n_parts <= 1) return;  // the main kernel already wrote this output

  // Thread (j, d) merges partitions j, j+PAR, j+2*PAR, ... for element d, four at a
  // time: their (m, l, acc[d]) are requested together so the four reads overlap, then
  // merged into a running (M, L, O) exactly like the online softmax. The PAR threads of
  // each d then merge their states through shared memory. (m and l are re-read by
  // every d: they are a few bytes in L2; reading them separately first would cost a
  // second round trip.)
  constexpr int PAR = kDecodeThreads / D;
  const int64_t wi0 = (int64_t(seq) * p.num_heads + h) * p.num_splits;
  const int d = threadIdx.x % D;
  float M = kEmptyMax, L = 0.f, O = 0.f;
  for (int i0 = threadIdx.x / D; i0 < n_parts; i0 += 4 * PAR) {
    float mi[4], li[4], ai[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = i0 + u * PAR;
      const bool ok = i < n_parts;
      mi[u] = ok ? p.ws_m[wi0 + i] : kEmptyMax;
      li[u] = ok ? p.ws_l[wi0 + i] : 0.f;
      ai[u] = ok ? p.ws_acc[(wi0 + i) * D + d] : 0.f;
    }
    float mn = M;
#pragma unroll
    for (int u = 0; u < 4; ++u) mn = fmaxf(mn, mi[u]);
    const float a = fast_exp2(M - mn);
    L *= a;
    O *= a;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const float f = fast_exp2(mi[u] - mn);
      L = fmaf(f, li[u], L);
      O = fmaf(f, ai[u], O);
    }
    M = mn;
  }
  __shared__ float sm[3][kDecodeThreads];
  sm[0][threadIdx.x] = M;
  sm[1][threadIdx.x] = L;
  sm[2][threadIdx.x] = O;
  __syncthreads();
  if (threadIdx.x < D) {
    float mx = kEmptyMax;
#pragma unroll
    for (int j = 0; j < PAR; ++j) mx = fmaxf(mx, sm[0][j * D + threadIdx.x]);
    float LL = 0.f, OO = 0.f;
#pragma unroll
    for (int j = 0; j < PAR; ++j) {
      const float f = fast_exp2(sm[0][j * D + threadIdx.x] - mx);
      LL = fmaf(f, sm[1][j * D + threadIdx.x], LL);
      OO = fmaf(f, sm[2][j * D + threadIdx.x], OO);
    }
    // LL >= 1: the partition holding the overall max contributes l >= 1.
    T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
    out[threadIdx.x] = from_float<T>(OO / LL);
  }
}

template <typename T, int D>
void launch(const DecodeParams& prm, int num_seqs, cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(prm.num_heads, num_seqs);
  cfg.blockDim = dim3(kDecodeThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = attn::device_cc_major() >= 9 ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, decode_merge_kernel<T, D>, prm));
}

template <typename T>
void launch_dim(const DecodeParams& prm, int head_dim, int num_seqs, cudaStream_t stream) {
  head_dim == 128 ? launch<T, 128>(prm, num_seqs, stream) : launch<T, 64>(prm, num_seqs, stream);
}

}  // namespace

void launch_decode_merge(const DecodeParams& prm, DType dtype, int head_dim, int num_seqs, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_dim<float>(prm, head_dim, num_seqs, stream);
    case DType::kFloat16: return launch_dim<__half>(prm, head_dim, num_seqs, stream);
    case DType::kBFloat16: return launch_dim<__nv_bfloat16>(prm, head_dim, num_seqs, stream);
  }
}

}  // namespace decode
}  // namespace tinyvllm
