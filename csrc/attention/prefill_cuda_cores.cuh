// prefill_cuda_cores.cuh: prefill attention in float32 on the CUDA cores.
//
// Tensor cores take 16-bit inputs; the fp32 path is a plain CUDA-core kernel (one warp
// per query row, keys staged in shared memory, the same online softmax). It exists for
// correctness and for CPU-size experiments, not for speed.
#pragma once

#include "attention/prefill_common.cuh"

namespace tinyvllm {
namespace prefill {

constexpr int kF32Rows = 8;  // query rows (one warp each) per block
constexpr int kF32Keys = 32;  // keys per shared-memory tile (one per lane)

template <int D>
__global__ void __launch_bounds__(kF32Rows * 32) prefill_attention_fp32_kernel(const PrefillParams p) {
  constexpr int PER_LANE = D / 32;
  __shared__ float sQ[kF32Rows][D];
  __shared__ float sK[kF32Keys][D + 1];  // +1: lane j reads row j; the pad spreads rows over banks
  __shared__ float sV[kF32Keys][D];

  const int head = blockIdx.x;
  const int seq = blockIdx.z;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int seq_len = attn::checked_seq_len(p.seq_lens[seq], p.max_blocks_per_seq << p.block_size_log2, p.errors);
  if (!query_run_ok(p, q_begin, q_len, seq_len)) return;
  const int m0 = blockIdx.y * kF32Rows;
  if (m0 >= q_len) return;
  const int ctx = seq_len - q_len;
  const int kvh = head / p.group;
  const int rows_here = min(kF32Rows, q_len - m0);
  const int kv_end = min(seq_len, ctx + m0 + rows_here);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int row = m0 + warp;
  const bool row_ok = row < q_len;  // the same for the whole warp
  const int pos = ctx + row;
  const float* const q = static_cast<const float*>(p.query);
  const float* const kc = static_cast<const float*>(p.key_cache);
  const float* const vc = static_cast<const float*>(p.value_cache);
  const int32_t* const btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int bs_mask = (1 << p.block_size_log2) - 1;

  for (int d = lane; d < D; d += 32)
    sQ[warp][d] = row_ok ? q[int64_t(q_begin + row) * p.q_row_stride + int64_t(head) * D + d] * p.scale_log2 : 0.f;

  float m = -1e30f, l = 0.f, acc[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) acc[i] = 0.f;

  for (int n0 = 0; n0 < kv_end; n0 += kF32Keys) {
    __syncthreads();  // previous tile fully used (and sQ written, on the first pass)
    for (int idx = threadIdx.x; idx < kF32Keys * D; idx += kF32Rows * 32) {
      const int r = idx / D;
      const int d = idx - r * D;
      const int kp = n0 + r;
      float kv = 0.f, vv = 0.f;
      if (kp < seq_len) {
        const int64_t blk = attn::checked_block(btab[kp >> p.block_size_log2], p.num_blocks, p.errors);
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << p.block_size_log2) + (kp & bs_mask)) * D) + d;
        kv = kc[off];
        vv = vc[off];
      }
      sK[r][d] = kv;
      sV[r][d] = vv;
    }
    __syncthreads();
    if (row_ok) {
      const int key = n0 + lane;
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) s = fmaf(sQ[warp][d], sK[lane][d], s);
      const bool ok = key <= pos && key < seq_len;
      float mx = ok ? s : -1e30f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m, mx);
      const float alpha = fast_exp2(m - mn);
      const float pj = ok ? fast_exp2(s - mn) : 0.f;
      float sum = pj;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l = l * alpha + sum;
      m = mn;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) acc[i] *= alpha;
      for (int j = 0; j < kF32Keys; ++j) {
        const float w = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc[i] = fmaf(w, sV[j][lane + 32 * i], acc[i]);
      }
    }
  }
  if (row_ok) {
    float* const out = static_cast<float*>(p.out) + (int64_t(q_begin + row) * p.num_heads + head) * D;
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) out[lane + 32 * i] = acc[i] * inv;
  }
}

}  // namespace prefill
}  // namespace tinyvllm
