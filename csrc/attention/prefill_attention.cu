// prefill_attention.cu: causal attention for many new tokens per sequence, FlashAttention-2 style.
//
// ---- The math ---------------------------------------------------------------
// Query row i of a sequence sits at position pos_i; cached key j at position j.
//     S[i][j] = scale * (q_i . k_j)                       a q_len x seq_len score matrix
//     S[i][j] = -infinity where j > pos_i                 the causal mask: no peeking ahead
//     P[i][:] = softmax(S[i][:])                          exp(-inf) = 0: masked keys get weight 0
//     O[i]    = sum_j P[i][j] * v_j
// The queries of one step are the LAST q_len positions of the sequence:
// pos_i = (seq_len - q_len) + i. With no cached prefix seq_len == q_len and this is
// the familiar triangle; with a prefix (prefix caching, chunked prefill) every row
// also sees all seq_len - q_len earlier keys. All keys, old and new, are read from
// the paged cache (reshape_and_cache already wrote the new ones).
//
// Online softmax (decode_common.cuh states it; the course, chapter 8, derives it): keep
// per row a running max m, a running sum l and an unnormalised output acc; for each
// new batch of scores with max m', multiply l and acc by alpha = exp(m - m') and add
// the new terms exp(s - m'). We never hold a whole row of S, let alone the n x n matrix:
// memory stays O(n) and each key/value tile is read once per query tile.
//
// GQA: query head h reads kv head h / (num_heads / num_kv_heads). Blocks of the
// query heads that share a kv head are launched next to each other (head is the
// fastest grid index), so their k/v tiles come from L2, not HBM.
//
//
// ---- The files ---------------------------------------------------------------
//   prefill_common.cuh        the parameters both kernels take, the query-run check
//   prefill_tensor_cores.cuh  the bf16 / fp16 kernel on the tensor cores (its shape, and why
//                             32 query rows per warp, are explained at its top)
//   prefill_cuda_cores.cuh    the float32 kernel (correctness and CPU-size experiments)
//   this file                 the launchers (which variant, what grid) and the entry point
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "attention/prefill_cuda_cores.cuh"
#include "attention/prefill_tensor_cores.cuh"

namespace tinyvllm {
namespace {

using namespace prefill;

template <typename T, int D, int MT>
void launch_mma_variant(const PrefillParams& prm, int num_seqs, int max_seqlen_q, cudaStream_t stream) {
  using Tiling = MmaTiling<D, MT>;
  constexpr int smem = Tiling::kSmemBytes;
  auto kernel = prefill_attention_mma_kernel<T, D, MT>;
  attn::prepare_kernel(reinterpret_cast<const void*>(kernel), kMmaThreads, smem);  // shared-memory opt-in, once
  const dim3 grid(prm.num_heads, (max_seqlen_q + Tiling::kBM - 1) / Tiling::kBM, num_seqs);
  kernel<<<grid, kMmaThreads, smem, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

// 32 rows per warp (MT = 2) makes each block faster per row but halves the number of
// blocks. Automatic choice (impl -1): use it when its grid still fills every SM at least
// once (kMinBlocks resident blocks per SM); below that, MT = 1's twice as many blocks
// keep more SMs busy. Counted from max_seqlen_q, so a batch of unequal sequences
// over-counts (blocks past a short sequence's end exit at once). MT = 2 at head_dim 128
// needs 102 KB of shared memory per block, more than some GPUs give one block (sm_86 /
// sm_89: 99 KB); there the automatic choice stays at MT = 1 and impl=2 is an error.
// Measured on an H200 (Llama-shaped, 32 heads): n=8192, head_dim 128 went from 0.68x to
// 0.94x of SDPA's flash kernel; n=512 stays on MT = 1, which is faster there.
template <int D>
int m_tiles_per_warp(int num_heads, int num_seqs, int max_seqlen_q, int impl) {
  using Tiling = MmaTiling<D, 2>;
  const int optin = attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
  const bool fits = optin >= Tiling::kSmemBytes;
  if (impl == 1) return 1;
  if (impl == 2) {
    if (!fits)
      throw std::runtime_error("prefill_attention: impl=2 (32 query rows per warp) needs " +
                               std::to_string(Tiling::kSmemBytes) + " bytes of shared memory per block at head_dim " +
                               std::to_string(D) + "; this GPU allows " + std::to_string(optin));
    return 2;
  }
  if (!fits) return 1;
  const int64_t blocks = int64_t(num_heads) * num_seqs * ceil_div(max_seqlen_q, Tiling::kBM);
  return blocks >= int64_t(Tiling::kMinBlocks) * attn::num_sms_of_current_device() ? 2 : 1;
}

template <typename T, int D>
void launch_mma(const PrefillParams& prm, int num_seqs, int max_seqlen_q, int impl, cudaStream_t stream) {
  if (m_tiles_per_warp<D>(prm.num_heads, num_seqs, max_seqlen_q, impl) == 2) {
    launch_mma_variant<T, D, 2>(prm, num_seqs, max_seqlen_q, stream);
  } else {
    launch_mma_variant<T, D, 1>(prm, num_seqs, max_seqlen_q, stream);
  }
}

template <int D>
void launch_fp32(const PrefillParams& prm, int num_seqs, int max_seqlen_q, cudaStream_t stream) {
  const dim3 grid(prm.num_heads, (max_seqlen_q + kF32Rows - 1) / kF32Rows, num_seqs);
  prefill_attention_fp32_kernel<D><<<grid, kF32Rows * 32, 0, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

template <int D>
void dispatch_dtype(const PrefillParams& prm, DType dtype, int num_seqs, int max_seqlen_q, int impl,
                    cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      if (impl != -1)
        throw std::runtime_error("prefill_attention: impl=" + std::to_string(impl) +
                                 " (tensor cores) needs a bfloat16 or float16 cache; fp32 takes impl=-1");
      return launch_fp32<D>(prm, num_seqs, max_seqlen_q, stream);
    case DType::kFloat16: return launch_mma<__half, D>(prm, num_seqs, max_seqlen_q, impl, stream);
    case DType::kBFloat16: return launch_mma<__nv_bfloat16, D>(prm, num_seqs, max_seqlen_q, impl, stream);
  }
}

}  // namespace

void prefill_attention(void* out, const void* query, const void* key_cache, const void* value_cache,
                       const int32_t* block_tables, const int32_t* cu_seqlens_q, const int32_t* seq_lens,
                       int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                       int max_blocks_per_seq, int max_seqlen_q, int64_t num_tokens, int64_t num_cache_blocks,
                       int64_t query_row_stride, float scale, DType dtype, int impl, cudaStream_t stream) {
  if (num_seqs == 0 || max_seqlen_q <= 0) return;
  PrefillParams prm{};
  prm.out = out;
  prm.query = query;
  prm.key_cache = key_cache;
  prm.value_cache = value_cache;
  prm.block_tables = block_tables;
  prm.cu_seqlens_q = cu_seqlens_q;
  prm.seq_lens = seq_lens;
  prm.num_heads = num_heads;
  prm.num_kv_heads = num_kv_heads;
  prm.group = num_heads / num_kv_heads;
  prm.block_size_log2 = attn::log2_exact(block_size);
  prm.max_blocks_per_seq = max_blocks_per_seq;
  prm.q_row_stride = query_row_stride;
  prm.scale_log2 = scale * kLog2e;
  prm.num_tokens = num_tokens;
  prm.max_seqlen_q = max_seqlen_q;
  prm.num_blocks = static_cast<int>(num_cache_blocks);
  prm.errors = kernel_error_flags();
  switch (head_dim) {
    case 64: return dispatch_dtype<64>(prm, dtype, num_seqs, max_seqlen_q, impl, stream);
    case 128: return dispatch_dtype<128>(prm, dtype, num_seqs, max_seqlen_q, impl, stream);
    default: throw std::runtime_error("prefill_attention: head_dim must be 64 or 128");
  }
}

}  // namespace tinyvllm
