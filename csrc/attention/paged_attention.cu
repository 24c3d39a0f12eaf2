// paged_attention.cu: the paged decode attention op (one new token per sequence, attending
// to its whole cached context through the block table): plan -> parameters -> launch.
//
// Read in this order: decode_cuda_cores.cuh (the kernel to learn from: online softmax, GQA,
// split-K), decode_merge.cu (the split-K merge), decode_tensor_cores.cuh (the same on the
// tensor cores, what bf16/fp16 caches run), decode_plan.cpp (how the host picks the kernel,
// the splits and the blocks per SM).
//
// CUDA graphs: nothing here allocates (the workspace is passed in) or reads device memory;
// the grid is sized from max_seq_len, an upper bound known on the host (the block table's
// capacity), never from seq_lens.
#include <stdexcept>
#include <string>

#include "attention/decode_common.cuh"
#include "ops.h"

namespace tinyvllm {

using decode::DecodeParams;
using decode::DecodePlan;

size_t paged_attention_decode_workspace_size(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                             int max_seq_len, int64_t sum_seq_lens, DType dtype, int impl) {
  const DecodePlan plan = decode::plan_decode(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len,
                                              sum_seq_lens, attn::num_sms_of_current_device(), dtype, impl);
  if (plan.num_splits <= 1) return 0;
  return size_t(num_seqs) * num_heads * plan.num_splits * (head_dim + 2) * sizeof(float);
}

namespace decode {

DecodeParams make_decode_params(const DecodePlan& plan, void* out, const void* query, const void* key_cache,
                                const void* value_cache, const int32_t* block_tables, const int32_t* seq_lens,
                                int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                                int max_blocks_per_seq, int64_t num_cache_blocks, int64_t query_row_stride,
                                float scale, void* workspace) {
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
  prm.num_blocks = static_cast<int>(num_cache_blocks);
  prm.errors = kernel_error_flags();
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
  return prm;
}

}  // namespace decode

void paged_attention_decode(void* out, const void* query, const void* key_cache, const void* value_cache,
                            const int32_t* block_tables, const int32_t* seq_lens, int num_seqs, int num_heads,
                            int num_kv_heads, int head_dim, int block_size, int max_blocks_per_seq,
                            int max_seq_len, int64_t sum_seq_lens, int64_t num_cache_blocks,
                            int64_t query_row_stride, float scale, void* workspace, DType dtype, int impl,
                            cudaStream_t stream) {
  if (num_seqs == 0) return;
  if (head_dim != 64 && head_dim != 128) throw std::runtime_error("paged_attention_decode: head_dim must be 64 or 128");
  const DecodePlan plan = decode::plan_decode(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len,
                                              sum_seq_lens, attn::num_sms_of_current_device(), dtype, impl);
  const DecodeParams prm = decode::make_decode_params(plan, out, query, key_cache, value_cache, block_tables, seq_lens,
                                                      num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                                                      max_blocks_per_seq, num_cache_blocks, query_row_stride, scale,
                                                      workspace);
  if (plan.tensor_cores) {
    decode::launch_decode_tensor_cores(prm, plan, dtype, head_dim, num_seqs, stream);
  } else {
    decode::launch_decode_cuda_cores(prm, plan.gmax, head_dim, num_seqs, stream);
  }
  if (plan.num_splits > 1) decode::launch_decode_merge(prm, dtype, head_dim, num_seqs, stream);
}

}  // namespace tinyvllm
