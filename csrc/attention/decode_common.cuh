// decode_common.cuh: what both paged decode kernels (decode_cuda_cores.cuh and
// decode_tensor_cores.cuh) and their merge (decode_merge.cu) share: the launch parameters,
// the clamp of a sequence's length, the end of a block (merge its warps' online-softmax
// states, then store the output or the partition's partial result) and the 128-byte
// swizzle of a staged tile. The kernel shapes and the shared-memory formula, which the
// host plan needs too, are in decode_plan.h (plain C++).
//
// The online-softmax state of a query head over a set of tokens is (m, l, acc): the
// largest score, sum_j 2^(s_j - m) and sum_j 2^(s_j - m) v_j (scores in log2 units:
// log2(e) is folded into the scale). Two states over disjoint tokens merge as
//     m = max(m1, m2),  l = l1 2^(m1 - m) + l2 2^(m2 - m),  acc likewise,
// and acc / l of the whole context is the attention output (course, chapters 8 and 11).
#pragma once

#include <cstdint>

#include "attention/attention_utils.cuh"
#include "attention/decode_plan.h"
#include "ops.h"

namespace tinyvllm {
namespace decode {

using attn::fast_exp2;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kEmptyMax = -1e30f;  // "no token yet": finite, so (kEmptyMax - kEmptyMax) = 0, not NaN

// Everything a decode kernel reads, passed by value (it lands in the kernel's constant bank).
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
  int num_blocks;  // blocks in the cache (< 2^31, checked by the bindings): an entry outside [0, num_blocks) is never followed
  int* errors;     // kernel_error_flags() (ops.h)
};

// The parameters of the plan's launch (paged_attention.cu). workspace: the split-K partial
// results, paged_attention_decode_workspace_size() bytes (may be null without splits).
DecodeParams make_decode_params(const DecodePlan& plan, void* out, const void* query, const void* key_cache,
                                const void* value_cache, const int32_t* block_tables, const int32_t* seq_lens,
                                int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                int max_blocks_per_seq, int64_t num_cache_blocks, int64_t query_row_stride,
                                float scale, void* workspace);

// ---- launchers (each defined with its kernel's instantiations) ----
// The CUDA-core kernel on fp32 caches, gmax query heads per block (decode_cuda_cores.cu).
void launch_decode_cuda_cores(const DecodeParams& prm, int gmax, int head_dim, int num_seqs, cudaStream_t stream);
// The tensor-core kernel the plan names, bf16 or fp16 (decode_tensor_cores.cu).
void launch_decode_tensor_cores(const DecodeParams& prm, const DecodePlan& plan, DType dtype, int head_dim,
                                int num_seqs, cudaStream_t stream);
// The split-K merge of the partitions' partial results, any dtype (decode_merge.cu).
void launch_decode_merge(const DecodeParams& prm, DType dtype, int head_dim, int num_seqs, cudaStream_t stream);

// The sequence's length, clamped to what the grid covers: the block table's capacity,
// which the bindings pass as max_seq_len. A length outside [0, capacity] is a caller's
// bug; clamped, it never sends a read past the block-table row or the workspace.
//   checked_seq_len  the main kernels: clamp, and raise kErrSeqLens if it was outside;
//   clamped_seq_len  the merge kernel: clamp only (the main kernel has already told).
__device__ __forceinline__ int seq_len_cap(const DecodeParams& p) {
  return min(p.max_blocks_per_seq << p.block_size_log2, p.num_splits * p.partition_size);
}
__device__ __forceinline__ int checked_seq_len(const DecodeParams& p, int raw) {
  return attn::checked_seq_len(raw, seq_len_cap(p), p.errors);
}
__device__ __forceinline__ int clamped_seq_len(const DecodeParams& p, int seq) {
  return max(0, min(p.seq_lens[seq], seq_len_cap(p)));
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of 128-byte rows (64 bf16/fp16
// values) stored with the "128-byte swizzle": the chunk index is XORed with row % 8, so the
// eight rows that one ldmatrix reads hit eight different bank groups. The pattern repeats
// every 1024 bytes (the tiles are aligned to that).
__device__ __forceinline__ int swizzled_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// The end of both kernels: each of the block's warps left its own online-softmax state
// for every query head in shared memory (sm_acc [warps][rows][D], sm_m and sm_l
// [warps][rows]); merge them (the two-state merge above, four at once) and write
// either the final output (the sequence fits into one partition) or this partition's
// unnormalised (m, l, acc) for the merge kernel.
template <typename T, int D, int WARPS = kDecodeWarps>
__device__ __forceinline__ void combine_warps_and_store(const DecodeParams& p, const float* sm_acc,
                                                        const float* sm_m, const float* sm_l, int rows, int nh,
                                                        int head0, int seq, int split, bool single) {
  for (int idx = threadIdx.x; idx < nh * D; idx += WARPS * 32) {
    const int g = idx / D;
    const int d = idx - g * D;
    float mx = kEmptyMax;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, sm_m[w * rows + g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) {
      const float f = fast_exp2(sm_m[w * rows + g] - mx);
      L += sm_l[w * rows + g] * f;
      A += sm_acc[(w * rows + g) * D + d] * f;
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

}  // namespace decode
}  // namespace tinyvllm
