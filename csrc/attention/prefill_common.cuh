// prefill_common.cuh: what the two prefill kernels share: their parameters and the check
// of a sequence's query run. The math and the map of the files: prefill_attention.cu.
#pragma once

#include <cstdint>

#include "attention/attention_utils.cuh"
#include "ops.h"

namespace tinyvllm {
namespace prefill {

using attn::fast_exp2;

constexpr float kLog2e = 1.4426950408889634f;

struct PrefillParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* cu_seqlens_q;
  const int32_t* seq_lens;
  int num_heads;
  int num_kv_heads;
  int group;
  int block_size_log2;
  int max_blocks_per_seq;
  int64_t q_row_stride;
  float scale_log2;
  int64_t num_tokens;  // query rows: every query run must lie inside them
  int max_seqlen_q;    // the grid's rows per sequence: a longer run would be cut short
  int num_blocks;  // blocks in the cache (< 2^31, checked by the bindings): an entry outside [0, num_blocks) is never followed
  int* errors;     // kernel_error_flags() (ops.h)
};

// The query run of a sequence (rows q_begin..q_begin+q_len-1 at positions seq_len-q_len..
// seq_len-1) is followed only if it lies inside the query and is no longer than the grid's
// rows (max_seqlen_q) or than the context; otherwise the sequence is skipped (its output
// rows are not written) and kErrQueryRuns raised (ops.h). cu_seqlens_q and seq_lens are
// device data: the bindings cannot check them without waiting for the GPU.
__device__ __forceinline__ bool query_run_ok(const PrefillParams& p, int q_begin, int q_len, int seq_len) {
  const bool ok = q_begin >= 0 && q_len >= 0 && int64_t(q_begin) + q_len <= p.num_tokens &&
                  q_len <= p.max_seqlen_q && q_len <= seq_len;
  if (!ok) raise_kernel_error(p.errors, kErrQueryRuns);
  return ok;
}

}  // namespace prefill
}  // namespace tinyvllm
