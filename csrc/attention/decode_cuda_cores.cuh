// decode_cuda_cores.cuh: paged decode attention on the CUDA cores, the kernel to learn from.
//
// For one new token per sequence and each query head h: out = softmax(scale q_h K^T) V over
// the sequence's cached keys and values, read through its block table (paged cache
// [num_blocks][num_kv_heads][block_size][head_dim]). One pass with the online softmax; every
// multiply a float32 fma. GQA: one block computes all the query heads of a kv head's group
// (at most GMAX), so each k/v byte is loaded once and used `group` times. Split-K: block
// (kv head, sequence, split z) takes tokens [z * partition_size, (z + 1) * partition_size);
// with one partition it writes the output, else its partial (m, l, acc) for decode_merge.cu.
//
//   grid  = (num_kv_heads * head_chunks, num_seqs, num_splits)     block = 4 warps
// A key row is read by TPR = head_dim / VEC threads with 16-byte loads (VEC = 8 bf16 or
// 4 fp32), so a warp reads RPW = 32 / TPR rows at once, U row-sets per step (more loads in
// flight). Each thread keeps an online-softmax state for its slice of head_dim; the states
// merge across the rows of a warp (shuffles), then across warps (combine_warps_and_store).
//
// The product runs it on fp32 caches (decode_cuda_cores.cu); bf16/fp16 caches run
// decode_tensor_cores.cuh, which does the same math with ~5x fewer instructions (on the CUDA
// cores the conversions and fmas per byte keep the loads from being issued on time:
// bench/results/README.md, rows 4-5). dev/cuda/paged_attention_decode.cu
// runs this kernel on bf16 next to the tensor-core one.
#pragma once

#include "attention/decode_common.cuh"

namespace tinyvllm {
namespace decode {

using attn::ld_global_16;
using attn::Vec16;

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kDecodeThreads) decode_cuda_cores_kernel(const DecodeParams p) {
  constexpr int VEC = Vec16<T>::N;  // elements per 16-byte load
  constexpr int TPR = D / VEC;      // threads per key row
  constexpr int RPW = 32 / TPR;     // key rows a warp reads at once
  constexpr int U = GMAX >= 8 ? 2 : 4;  // row-sets per step (more loads in flight; fewer for big groups: registers)
  constexpr int STEP = RPW * U;     // tokens per warp per step
  static_assert(D % VEC == 0 && 32 % TPR == 0, "head_dim must split evenly over a warp");

  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  const int kvh = blockIdx.x / p.head_chunks;
  const int chunk = blockIdx.x - kvh * p.head_chunks;
  const int head0 = kvh * p.group + chunk * GMAX;  // first query head of this block
  const int nh = min(GMAX, p.group - chunk * GMAX);  // query heads of this block (<= GMAX)

  attn::allow_dependent_launch();  // the merge kernel may start its launch now (it waits for our results)
  const int seq_len = checked_seq_len(p, p.seq_lens[seq]);
  const int p0 = split * p.partition_size;
  // A partition past the end of a shorter sequence has nothing to do. Split 0
  // always runs so that a zero-length sequence still gets its (zero) output.
  if (split > 0 && p0 >= seq_len) return;
  const int p1 = min(p0 + p.partition_size, seq_len);
  const bool single = seq_len <= p.partition_size;  // one partition: write the final output here

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int r = lane / TPR;  // which row of the warp's row-set this thread reads
  const int c = lane % TPR;  // which 16-byte slice of the row

  // This thread's slice of each query head, pre-multiplied by scale * log2(e).
  float q[GMAX][VEC];
  {
    const T* qp = static_cast<const T*>(p.query) + int64_t(seq) * p.q_row_stride + int64_t(head0) * D + c * VEC;
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      if (g < nh) {
        Vec16<T>::to_float(ld_global_16(qp + g * D), q[g]);
#pragma unroll
        for (int v = 0; v < VEC; ++v) q[g][v] *= p.scale_log2;
      } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) q[g][v] = 0.f;
      }
    }
  }

  float m[GMAX], l[GMAX], acc[GMAX][VEC];
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = kEmptyMax;
    l[g] = 0.f;
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[g][v] = 0.f;
  }

  const int32_t* btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int bs_mask = (1 << p.block_size_log2) - 1;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);

  // Warps take turns over steps of STEP consecutive tokens. The loop bound depends
  // only on the warp, so all 32 lanes stay together for the shuffles inside.
  for (int base = p0 + warp * STEP; base < p1; base += kDecodeWarps * STEP) {
    uint4 kr[U], vr[U];
    bool valid[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = base + u * RPW + r;
      valid[u] = t < p1;
      if (valid[u]) {
        const int64_t blk = attn::checked_block(btab[t >> p.block_size_log2], p.num_blocks, p.errors);
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << p.block_size_log2) + (t & bs_mask)) * D) + c * VEC;
        kr[u] = ld_global_16(kc + off);
        vr[u] = ld_global_16(vc + off);  // issued now so its latency hides behind the q.k math
      } else {
        kr[u] = make_uint4(0, 0, 0, 0);
        vr[u] = make_uint4(0, 0, 0, 0);
      }
    }

    // Scores: partial dot products over this thread's slice, then summed over the
    // TPR threads of the row (xor-shuffles stay inside aligned groups of TPR lanes).
    float s[GMAX][U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kf[VEC];
      Vec16<T>::to_float(kr[u], kf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int v = 0; v < VEC; ++v) dot = fmaf(q[g][v], kf[v], dot);
        s[g][u] = dot;
      }
    }
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int o = TPR / 2; o > 0; o >>= 1) s[g][u] += __shfl_xor_sync(0xffffffffu, s[g][u], o);

    // Online softmax, one rescale per step (not per token): new max over the U
    // tokens, rescale the old state once, then add the U new terms.
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (valid[u]) mx = fmaxf(mx, s[g][u]);
      const float alpha = fast_exp2(m[g] - mx);
      m[g] = mx;
      l[g] *= alpha;
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[g][v] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[g][u] = valid[u] ? fast_exp2(s[g][u] - mx) : 0.f;  // s now holds the weight p
        l[g] += s[g][u];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vf[VEC];
      Vec16<T>::to_float(vr[u], vf);
#pragma unroll
      for (int g = 0; g < GMAX; ++g)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[g][v] = fmaf(s[g][u], vf[v], acc[g][v]);
    }
  }

  // Merge the RPW row states of the warp: lanes c, c+TPR, c+2*TPR, ... hold the
  // same slice of head_dim for different tokens.
#pragma unroll
  for (int o = TPR; o < 32; o <<= 1) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      const float mo = __shfl_xor_sync(0xffffffffu, m[g], o);
      const float lo = __shfl_xor_sync(0xffffffffu, l[g], o);
      const float mn = fmaxf(m[g], mo);
      const float a = fast_exp2(m[g] - mn);
      const float b = fast_exp2(mo - mn);
      l[g] = l[g] * a + lo * b;
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float ao = __shfl_xor_sync(0xffffffffu, acc[g][v], o);
        acc[g][v] = acc[g][v] * a + ao * b;
      }
      m[g] = mn;
    }
  }

  // Merge across warps through shared memory.
  __shared__ float sm_acc[kDecodeWarps][GMAX][D];
  __shared__ float sm_m[kDecodeWarps][GMAX];
  __shared__ float sm_l[kDecodeWarps][GMAX];
  if (r == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int v = 0; v < VEC; ++v) sm_acc[warp][g][c * VEC + v] = acc[g][v];
  }
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < GMAX; ++g) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
  }
  __syncthreads();
  combine_warps_and_store<T, D>(p, &sm_acc[0][0][0], &sm_m[0][0], &sm_l[0][0], GMAX, nh, head0, seq, split, single);
}

template <typename T, int D, int GMAX>
void launch_cuda_cores_gmax(const DecodeParams& prm, int num_seqs, cudaStream_t stream) {
  const dim3 grid(prm.num_kv_heads * prm.head_chunks, num_seqs, prm.num_splits);
  decode_cuda_cores_kernel<T, D, GMAX><<<grid, kDecodeThreads, 0, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

// The kernel for gmax (1, 2, 4 or 8) query heads per block; its merge, if the plan split the
// contexts, is the caller's (launch_decode_merge).
template <typename T, int D>
void launch_cuda_cores(const DecodeParams& prm, int gmax, int num_seqs, cudaStream_t stream) {
  switch (gmax) {
    case 1: return launch_cuda_cores_gmax<T, D, 1>(prm, num_seqs, stream);
    case 2: return launch_cuda_cores_gmax<T, D, 2>(prm, num_seqs, stream);
    case 4: return launch_cuda_cores_gmax<T, D, 4>(prm, num_seqs, stream);
    default: return launch_cuda_cores_gmax<T, D, 8>(prm, num_seqs, stream);
  }
}

}  // namespace decode
}  // namespace tinyvllm
