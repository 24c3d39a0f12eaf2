// paged_attention.cu: decode attention over the paged KV cache (one new token per sequence).
//
// ---- The math ---------------------------------------------------------------
// For one query head with query vector q (head_dim numbers) and the sequence's
// cached keys k_0..k_{n-1} and values v_0..v_{n-1}:
//
//     s_j = scale * (q . k_j)                  one score per cached token
//     p_j = exp(s_j - max_i s_i) / sum_i exp(s_i - max_i s_i)      softmax
//     out = sum_j p_j * v_j                    a weighted average of the values
//
// Subtracting the max changes nothing mathematically (it cancels between the
// numerator and the denominator) but keeps exp() from overflowing.
//
// Causal mask: token t may only look at positions <= t. The new decode token is
// the LAST position of its sequence, so every cached key is allowed: decode
// needs no mask (prefill_attention.cu does).
//
// Online softmax (one pass): we do not want to store all n scores, find their
// max, then go back. Keep three running quantities while reading tokens:
//     m   the largest score seen so far
//     l   sum of exp(s_j - m) over tokens seen so far
//     acc sum of exp(s_j - m) * v_j over tokens seen so far (a head_dim vector)
// When a new token with score s arrives:
//     m' = max(m, s);   alpha = exp(m - m')          (how much the old max was too small)
//     l' = l * alpha + exp(s - m');   acc' = acc * alpha + exp(s - m') * v
// Every old term was exp(s_j - m); multiplying by alpha = exp(m - m') turns it into
// exp(s_j - m'), so after the last token acc / l is exactly the softmax average.
// Two partial states (m1,l1,acc1), (m2,l2,acc2) over disjoint token sets merge the
// same way: m = max(m1,m2), l = l1 e^(m1-m) + l2 e^(m2-m), acc likewise. That
// merge is what lets many threads, warps and even thread blocks each take a slice
// of the tokens and combine their results at the end.
//
// We use 2^x instead of e^x (one hardware instruction): fold log2(e) into the
// scale, s' = s * log2(e), and e^(s - m) = 2^(s' - m').
//
// GQA (grouped-query attention): num_heads query heads share num_kv_heads k/v
// heads; query head h reads kv head h / group, group = num_heads / num_kv_heads
// (Llama 3.2 1B: 32 and 8, group 4). Decode is limited by reading the cache from
// memory, so one thread block computes ALL the query heads of a group together:
// each k/v byte is loaded once and used `group` times.
//
// ---- The shape of the kernel --------------------------------------------------
// Paged cache: key_cache[num_blocks][num_kv_heads][block_size][head_dim]. Token t
// of a sequence lives in physical block block_table[t / block_size], row
// t % block_size. One token's key row for one kv head is head_dim contiguous
// numbers: 128 bytes for bf16 and head_dim 64.
//
// CUDA in two sentences: a kernel runs as a grid of thread blocks (CTAs); a block
// is a few warps of 32 threads that execute in lockstep and can exchange
// registers with __shfl_xor_sync, and a block's warps share fast on-chip memory.
//
//   grid  = (num_kv_heads * head_chunks, num_seqs, num_splits)
//   block = 4 warps
// Each block handles one (sequence, kv head, slice of the context). A key row is
// read by TPR = head_dim / VEC threads, each loading 16 bytes (VEC = 8 bf16/fp16
// or 4 fp32); a warp therefore reads RPW = 32 / TPR rows at once (4 rows for
// bf16, head_dim 64: 512 contiguous bytes), and U such row-sets per step so that
// several loads are in flight per thread (memory latency is ~1 us; only many
// outstanding loads fill the bandwidth). Each thread multiplies its 16-byte slice
// of k with its slice of every query head of the group, and the TPR threads of a
// row add their partial dot products with shuffles. Each thread then keeps its own
// online-softmax state (m, l for each head, acc for its slice of head_dim); at the
// end the states are merged across the rows of a warp (shuffles), then across
// warps (shared memory).
//
// Flash-decoding (split-K over the context): with batch 1 and 8 kv heads there
// would be only 8 blocks for 132 SMs. So the context is cut into num_splits
// partitions of partition_size tokens, one block each; each block writes its
// unnormalised (m, l, acc) into a workspace, and a small second kernel merges the
// partitions of each (sequence, head). The split count is chosen on the host from
// num_seqs * num_kv_heads against the SM count and the longest possible context
// (plan_decode below). A sequence that fits into one partition is finished by the
// first kernel directly, and the second kernel skips it.
//
// CUDA graphs: the launcher allocates nothing (the workspace is passed in), never
// reads device memory on the host, and sizes the grid from max_seq_len, an upper
// bound known on the host (the block table's capacity), not from seq_lens.
#include <algorithm>
#include <cstdint>

#include "attention/attention_utils.cuh"
#include "ops.h"

namespace tinyvllm {
namespace {

using attn::fast_exp2;
using attn::ld_global_16;
using attn::Vec16;

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kMaxSplits = 256;      // the reduce kernel keeps one weight per split in shared memory
constexpr int kPartitionAlign = 64;  // partition sizes are multiples of this many tokens
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEmptyMax = -1e30f;  // "no token yet": finite, so (kEmptyMax - kEmptyMax) = 0, not NaN

struct DecodeParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* seq_lens;
  int num_heads;
  int num_kv_heads;
  int group;        // num_heads / num_kv_heads
  int head_chunks;  // ceil(group / GMAX): blocks per kv head when the group exceeds GMAX
  int block_size_log2;
  int max_blocks_per_seq;
  int64_t q_row_stride;
  float scale_log2;    // scale * log2(e)
  int partition_size;  // tokens per split
  int num_splits;
  float* ws_acc;  // [num_seqs, num_heads, num_splits, head_dim]
  float* ws_m;    // [num_seqs, num_heads, num_splits]
  float* ws_l;    // [num_seqs, num_heads, num_splits]
};

struct DecodePlan {
  int gmax;         // query heads per block (a power of two >= the group, at most 8)
  int head_chunks;  // blocks per kv head
  int num_splits;
  int partition_size;
};

DecodePlan plan_decode(int num_seqs, int num_heads, int num_kv_heads, int max_seq_len, int num_sms) {
  DecodePlan plan{};
  const int group = std::max(1, num_heads / std::max(1, num_kv_heads));
  plan.gmax = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
  plan.head_chunks = (group + plan.gmax - 1) / plan.gmax;
  max_seq_len = std::max(max_seq_len, 1);
  // Blocks without splitting; aim for about 4 resident blocks per SM in total.
  const int64_t base = std::max<int64_t>(1, int64_t(num_seqs) * num_kv_heads * plan.head_chunks);
  const int64_t target = 4 * int64_t(num_sms);
  int64_t splits = base >= target ? 1 : (target + base - 1) / base;
  // Never cut into partitions shorter than kPartitionAlign tokens (16 per warp):
  // below that the merge costs more than the parallelism gains.
  const int64_t by_len = (max_seq_len + kPartitionAlign - 1) / kPartitionAlign;
  splits = std::max<int64_t>(1, std::min<int64_t>({splits, by_len, kMaxSplits}));
  int part = static_cast<int>((max_seq_len + splits - 1) / splits);
  part = (part + kPartitionAlign - 1) / kPartitionAlign * kPartitionAlign;
  plan.partition_size = part;
  plan.num_splits = (max_seq_len + part - 1) / part;  // rounding up the size may drop a split
  return plan;
}

// Number of the sequence's partitions that hold tokens, after clamping its length
// to what the grid covers (a length beyond max_seq_len would be a caller bug; we
// never read past the block-table row or the workspace because of it).
__device__ __forceinline__ int clamped_seq_len(const DecodeParams& p, int seq) {
  const int cap = min(p.max_blocks_per_seq << p.block_size_log2, p.num_splits * p.partition_size);
  return max(0, min(p.seq_lens[seq], cap));
}

template <typename T, int D, int GMAX>
__global__ void __launch_bounds__(kDecodeThreads) paged_attention_decode_kernel(const DecodeParams p) {
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

  const int seq_len = clamped_seq_len(p, seq);
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
        const int64_t blk = btab[t >> p.block_size_log2];
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

  for (int idx = threadIdx.x; idx < nh * D; idx += kDecodeThreads) {
    const int g = idx / D;
    const int d = idx - g * D;
    float mx = kEmptyMax;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) mx = fmaxf(mx, sm_m[w][g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const float f = fast_exp2(sm_m[w][g] - mx);
      L += sm_l[w][g] * f;
      A += sm_acc[w][g][d] * f;
    }
    const int h = head0 + g;
    if (single) {
      // L == 0 only for a zero-length sequence, whose output is defined as 0.
      T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
      out[d] = from_float<T>(L > 0.f ? A / L : 0.f);
    } else {
      const int64_t wi = (int64_t(seq) * p.num_heads + h) * p.num_splits + split;
      p.ws_acc[wi * D + d] = A;
      if (d == 0) {
        p.ws_m[wi] = mx;
        p.ws_l[wi] = L;
      }
    }
  }
}

// Flash-decoding merge: one block per (head, sequence) combines the partitions'
// (m, l, acc) with weights 2^(m_i - M), M = max_i m_i, and divides by the total l.
template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads) paged_attention_decode_reduce_kernel(const DecodeParams p) {
  const int h = blockIdx.x;
  const int seq = blockIdx.y;
  const int seq_len = clamped_seq_len(p, seq);
  const int n_parts = (seq_len + p.partition_size - 1) / p.partition_size;
  if (n_parts <= 1) return;  // the main kernel already wrote this output

  __shared__ float weight[kMaxSplits];
  __shared__ float red[kDecodeWarps];
  const int64_t wi0 = (int64_t(seq) * p.num_heads + h) * p.num_splits;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  float mx = kEmptyMax;
  for (int i = threadIdx.x; i < n_parts; i += kDecodeThreads) mx = fmaxf(mx, p.ws_m[wi0 + i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  if (lane == 0) red[warp] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int w = 1; w < kDecodeWarps; ++w) mx = fmaxf(mx, red[w]);
  __syncthreads();  // everyone has read red[] before it is reused

  float L = 0.f;
  for (int i = threadIdx.x; i < n_parts; i += kDecodeThreads) {
    const float f = fast_exp2(p.ws_m[wi0 + i] - mx);
    weight[i] = f;
    L += f * p.ws_l[wi0 + i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
  if (lane == 0) red[warp] = L;
  __syncthreads();  // also publishes weight[]
  L = 0.f;
#pragma unroll
  for (int w = 0; w < kDecodeWarps; ++w) L += red[w];
  const float inv = 1.f / L;  // >= 1: the partition holding the max contributes l >= 1

  T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
  for (int d = threadIdx.x; d < D; d += kDecodeThreads) {
    float o = 0.f;
    for (int i = 0; i < n_parts; ++i) o = fmaf(weight[i], p.ws_acc[(wi0 + i) * D + d], o);
    out[d] = from_float<T>(o * inv);
  }
}

template <typename T, int D, int GMAX>
void launch_decode(const DecodeParams& prm, int num_seqs, cudaStream_t stream) {
  const dim3 grid(prm.num_kv_heads * prm.head_chunks, num_seqs, prm.num_splits);
  paged_attention_decode_kernel<T, D, GMAX><<<grid, kDecodeThreads, 0, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
  if (prm.num_splits > 1) {
    paged_attention_decode_reduce_kernel<T, D><<<dim3(prm.num_heads, num_seqs), kDecodeThreads, 0, stream>>>(prm);
    CUDA_CHECK(cudaGetLastError());
  }
}

template <typename T, int D>
void dispatch_gmax(const DecodeParams& prm, int gmax, int num_seqs, cudaStream_t stream) {
  switch (gmax) {
    case 1: return launch_decode<T, D, 1>(prm, num_seqs, stream);
    case 2: return launch_decode<T, D, 2>(prm, num_seqs, stream);
    case 4: return launch_decode<T, D, 4>(prm, num_seqs, stream);
    default: return launch_decode<T, D, 8>(prm, num_seqs, stream);
  }
}

template <typename T>
void dispatch_head_dim(const DecodeParams& prm, int head_dim, int gmax, int num_seqs, cudaStream_t stream) {
  switch (head_dim) {
    case 64: return dispatch_gmax<T, 64>(prm, gmax, num_seqs, stream);
    case 128: return dispatch_gmax<T, 128>(prm, gmax, num_seqs, stream);
    default: throw std::runtime_error("paged_attention_decode: head_dim must be 64 or 128");
  }
}

}  // namespace

size_t paged_attention_decode_workspace_size(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                             int max_seq_len) {
  const DecodePlan plan =
      plan_decode(num_seqs, num_heads, num_kv_heads, max_seq_len, attn::num_sms_of_current_device());
  if (plan.num_splits <= 1) return 0;
  return size_t(num_seqs) * num_heads * plan.num_splits * (head_dim + 2) * sizeof(float);
}

void paged_attention_decode(void* out, const void* query, const void* key_cache, const void* value_cache,
                            const int32_t* block_tables, const int32_t* seq_lens, int num_seqs, int num_heads,
                            int num_kv_heads, int head_dim, int block_size, int max_blocks_per_seq,
                            int max_seq_len, int64_t query_row_stride, float scale, void* workspace,
                            DType dtype, cudaStream_t stream) {
  if (num_seqs == 0) return;
  const DecodePlan plan =
      plan_decode(num_seqs, num_heads, num_kv_heads, max_seq_len, attn::num_sms_of_current_device());
  DecodeParams prm{};
  prm.out = out;
  prm.query = query;
  prm.key_cache = key_cache;
  prm.value_cache = value_cache;
  prm.block_tables = block_tables;
  prm.seq_lens = seq_lens;
  prm.num_heads = num_heads;
  prm.num_kv_heads = num_kv_heads;
  prm.group = num_heads / num_kv_heads;
  prm.head_chunks = plan.head_chunks;
  prm.block_size_log2 = attn::log2_exact(block_size);
  prm.max_blocks_per_seq = max_blocks_per_seq;
  prm.q_row_stride = query_row_stride;
  prm.scale_log2 = scale * kLog2e;
  prm.partition_size = plan.partition_size;
  prm.num_splits = plan.num_splits;
  if (plan.num_splits > 1) {
    if (workspace == nullptr) {
      throw std::runtime_error("paged_attention_decode: workspace is null but " + std::to_string(plan.num_splits) +
                               " context splits need one (use paged_attention_decode_workspace_size)");
    }
    const size_t n = size_t(num_seqs) * num_heads * plan.num_splits;
    prm.ws_acc = static_cast<float*>(workspace);
    prm.ws_m = prm.ws_acc + n * head_dim;
    prm.ws_l = prm.ws_m + n;
  }
  switch (dtype) {
    case DType::kFloat32: return dispatch_head_dim<float>(prm, head_dim, plan.gmax, num_seqs, stream);
    case DType::kFloat16: return dispatch_head_dim<__half>(prm, head_dim, plan.gmax, num_seqs, stream);
    case DType::kBFloat16: return dispatch_head_dim<__nv_bfloat16>(prm, head_dim, plan.gmax, num_seqs, stream);
  }
}

}  // namespace tinyvllm
