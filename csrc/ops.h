// ops.h: the launcher of every tinyvllm kernel, in plain C++ types.
//
// This header is the seam between the framework and the kernels. The bindings
// file (torch_bindings.cpp, the ONLY file that includes torch) checks each
// tensor, turns it into a raw pointer plus sizes and strides, and calls one of
// these functions. The .cu files implement them without knowing torch exists,
// so a learner reads a kernel with no framework noise, and a .cu file compiles
// in seconds instead of minutes.
//
// Conventions:
//   * Pointers are device pointers. Sizes are element counts. Strides are in
//     elements (not bytes), like torch's tensor.stride().
//   * `DType` says what the void* activations hold; all math is float32.
//   * Every launcher enqueues on `stream` and returns at once; it reports a bad
//     launch with CUDA_CHECK (common.cuh), which throws std::runtime_error.
//   * Paged KV cache, per layer: [num_blocks, num_kv_heads, block_size, head_dim].
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace tinyvllm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- bad indices found on the GPU (errors.cu) -------------------------------
// Some bad inputs hide in device data that the bindings cannot read without waiting
// for the GPU: a block-table entry outside the cache, a slot or a position past the
// end, query runs (cu_seqlens_q) that leave the query. A kernel never follows such
// an index (each op below says what it does instead) and raises one of these flags
// in pinned host memory; the host reads them once the kernels are done, e.g. after
// the engine's per-step copy of the sampled tokens (tinyvllm.ops.check_kernel_errors).
enum KernelError : int {
  kErrBlockTable = 0,  // attention: a block_tables entry that seq_lens covers is outside [0, num_blocks)
  kErrSlotMapping = 1,  // reshape_and_cache: a slot at or past num_blocks * block_size
  kErrPosition = 2,     // rotary_embedding: a position outside [0, max_position)
  kErrQueryRuns = 3,    // prefill_attention: a query run outside the query, longer than its seq_len or max_seqlen_q
  kErrSeqLens = 4,      // attention: a seq_lens entry below 0 or past the block table's capacity
  kNumKernelErrors = 5
};
// Device-visible pointer to kNumKernelErrors ints (allocated on first use; never null).
int* kernel_error_flags();
// Copy the flags into out[kNumKernelErrors] (call after the kernels have finished),
// and reset them to 0 if `clear`.
void read_kernel_errors(int* out, bool clear);

// ---- normalisation (rmsnorm.cu) -------------------------------------------
// out[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight.
void rms_norm(void* out, const void* x, const void* weight, int64_t num_tokens, int64_t hidden,
              int64_t x_row_stride, float eps, DType dtype, cudaStream_t stream);

// In place: residual += x; x = rms_norm(residual) * weight.
void fused_add_rms_norm(void* x, void* residual, const void* weight, int64_t num_tokens, int64_t hidden,
                        float eps, DType dtype, cudaStream_t stream);

// ---- rotary position embedding (rope.cu) ------------------------------------
// Rotates q [T, num_heads, head_dim] and k [T, num_kv_heads, head_dim] in place
// (rotate-half pairing) using cos_sin_cache [max_position, rot_dim] float32.
// Heads are contiguous inside a row; rows may be strided. A position outside
// [0, max_position) leaves its token untouched and raises kErrPosition.
void rotary_embedding(const int64_t* positions, void* query, void* key, const float* cos_sin_cache,
                      int64_t num_tokens, int num_heads, int num_kv_heads, int head_dim, int rot_dim,
                      int64_t max_position, int64_t query_row_stride, int64_t key_row_stride, DType dtype,
                      cudaStream_t stream);

// ---- activation (activation.cu) -------------------------------------------
// out[t, i] = silu(x[t, i]) * x[t, d + i], x: [T, 2d], out: [T, d].
void silu_and_mul(void* out, const void* x, int64_t num_tokens, int64_t d, DType dtype, cudaStream_t stream);

// ---- KV-cache write (cache.cu) ---------------------------------------------
// key/value [T, num_kv_heads, head_dim] (row stride given) -> caches at slot_mapping[t].
// Slots < 0 (padding) are skipped; slots >= num_blocks * block_size are skipped and
// raise kErrSlotMapping.
void reshape_and_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                       const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, int head_dim,
                       int block_size, int64_t num_blocks, int64_t key_row_stride, int64_t value_row_stride,
                       DType dtype, cudaStream_t stream);

// ---- RoPE and the KV-cache write in one launch (rope_and_cache.cu) ---------------
// rotary_embedding(q, k) then reshape_and_cache(k, v) with the same arguments and the
// same errors, in one kernel (the decode step's path: one launch per layer fewer).
void rotary_embedding_and_cache(const int64_t* positions, void* query, void* key, const void* value,
                                void* key_cache, void* value_cache, const int64_t* slot_mapping,
                                const float* cos_sin_cache, int64_t num_tokens, int num_heads, int num_kv_heads,
                                int head_dim, int rot_dim, int block_size, int64_t num_blocks,
                                int64_t max_position, int64_t query_row_stride, int64_t key_row_stride,
                                int64_t value_row_stride, DType dtype, cudaStream_t stream);

// ---- attention (attention/) -------------------------------------------------
// Decode: out [num_seqs, num_heads, head_dim] contiguous; query the same shape with row
// stride query_row_stride (heads and head_dim contiguous); block_tables [num_seqs,
// max_blocks_per_seq] contiguous. max_seq_len is an UPPER BOUND on every seq_lens[i],
// known on the host (the bindings pass max_blocks_per_seq * block_size), so the grid
// never depends on device data (CUDA-graph friendly). sum_seq_lens: the sum of every
// seq_lens[i] if the caller knows it on the host (the engine does), else -1; the plan only
// uses it to tell a batch of about equal lengths (not split where it has enough blocks)
// from a skewed one (the longest over 3x the mean: the long ones are cut), and a wrong
// value costs speed, never correctness. head_dim 64 or 128; block_size a power of two
// (the bindings allow 8..128); num_heads % num_kv_heads == 0.
// `workspace` holds the flash-decoding partial results (float32); its size in bytes
// comes from paged_attention_decode_workspace_size() with the same arguments and may
// be 0 (then workspace may be null). The split count depends on the device's SM count
// and on the dtype (bf16/fp16 run the tensor-core kernel, fp32 the CUDA-core one).
// impl (for tests and benchmarks; the product passes -1): -1 automatic, 0 the CUDA-core
// kernel (fp32 caches), 1 the tensor-core kernel with a block's warps sharing a kv head,
// 3 the tensor-core kernel with one kv head per warp; an impl that cannot run throws.
// num_cache_blocks: dimension 0 of the caches. A block-table
// entry that seq_lens covers and that is outside [0, num_cache_blocks) is never followed:
// the kernel reads block 0 instead and raises kErrBlockTable. A seq_lens entry below 0 or
// beyond the table's capacity (max_blocks_per_seq * block_size) is clamped into that range
// and raises kErrSeqLens.
size_t paged_attention_decode_workspace_size(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                             int max_seq_len, int64_t sum_seq_lens, DType dtype, int impl);
// What the decode op would launch for these sizes on the current GPU (decode::plan_decode in
// attention/decode_plan.cpp): for tests and benchmarks (tinyvllm._C.decode_plan), not an op.
struct DecodePlanInfo {
  bool tensor_cores;   // the mma kernel (else the CUDA-core kernel)
  int num_splits;      // partitions of each context (1: no merge kernel)
  int partition_size;  // tokens per partition
  int warps;           // warps per block
  int blocks_per_sm;   // blocks that share an SM, after the plan's choice
  int smem_bytes;      // dynamic shared memory per block (mma kernel; padded where blocks_per_sm is held down)
  bool head_per_warp;  // mma kernel: one kv head per warp, 4 kv heads of a sequence per block
};
DecodePlanInfo paged_attention_decode_plan(int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                                           int max_seq_len, int64_t sum_seq_lens, DType dtype, int impl);
void paged_attention_decode(void* out, const void* query, const void* key_cache, const void* value_cache,
                            const int32_t* block_tables, const int32_t* seq_lens, int num_seqs, int num_heads,
                            int num_kv_heads, int head_dim, int block_size, int max_blocks_per_seq,
                            int max_seq_len, int64_t sum_seq_lens, int64_t num_cache_blocks,
                            int64_t query_row_stride, float scale, void* workspace, DType dtype, int impl,
                            cudaStream_t stream);

// Prefill: queries of sequence s are rows cu_seqlens_q[s]..cu_seqlens_q[s+1]-1 at
// positions seq_lens[s]-q_len..seq_lens[s]-1, attending causally through the paged cache.
// out [T, num_heads, head_dim] contiguous; query row-strided like decode. max_seqlen_q
// must be >= every q_len. num_tokens: the query's rows; num_cache_blocks: dimension 0 of the
// caches. A query run outside the query, longer than max_seqlen_q or than its seq_len is
// skipped and raises kErrQueryRuns; a block-table entry that seq_lens covers and that is
// outside the cache reads block 0 and raises kErrBlockTable; a seq_lens entry below 0 or
// past the table's capacity is clamped into that range and raises kErrSeqLens. bf16/fp16
// use tensor cores (mma.sync m16n8k16); fp32 uses a plain CUDA-core fallback. impl (bf16/fp16): -1
// automatic, 1 = 16 query rows per warp (64-row blocks), 2 = 32 rows per warp (128-row
// blocks); an explicit impl that cannot run throws (fp32: -1 only).
void prefill_attention(void* out, const void* query, const void* key_cache, const void* value_cache,
                       const int32_t* block_tables, const int32_t* cu_seqlens_q, const int32_t* seq_lens,
                       int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                       int max_blocks_per_seq, int max_seqlen_q, int64_t num_tokens, int64_t num_cache_blocks,
                       int64_t query_row_stride, float scale, DType dtype, int impl, cudaStream_t stream);

// ---- GEMM (gemm.cpp) -------------------------------------------------------
// y[M, N] = x[M, K] @ w[N, K]^T, row-major, float32 accumulate, via cublasGemmEx.
// `handle` is a cublasHandle_t passed as void* so this header needs no cuBLAS; the
// bindings pass torch's (at::cuda::getCurrentCUDABlasHandle(): per device and
// thread, with a per-stream workspace already set). gemm.cpp binds it to `stream`.
void gemm_xwt(void* y, const void* x, const void* w, int64_t m, int64_t n, int64_t k, DType dtype,
              void* cublas_handle, cudaStream_t stream);

// ---- skinny GEMM for decode (gemm/skinny_gemm.cu) ---------------------------
// y[M, N] = x[M, K] @ w[N, K]^T for M <= 16 rows, on the tensor cores, each weight byte read
// once. bf16/fp16 only, float32 accumulate; y contiguous [M, N]; x rows may be strided
// (x_row_stride elements apart, a multiple of 8); K % 8 == 0; x and w 16-byte aligned, w
// contiguous. Anything else throws std::invalid_argument (ops.linear sends it to gemm_xwt).
// M = 0 or N = 0 launches nothing; K = 0 writes zeros.
void skinny_gemm(void* y, const void* x, const void* w, int64_t m, int64_t n, int64_t k, int64_t x_row_stride,
                 DType dtype, cudaStream_t stream);

}  // namespace tinyvllm
