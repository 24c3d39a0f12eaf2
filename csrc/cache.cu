// cache.cu: reshape_and_cache, writing this step's keys and values into the paged KV cache.
//
// Every generated token needs the keys and values of all tokens before it. They
// are kept in a "paged" cache, like virtual memory: the cache of one layer is a
// pool of fixed-size blocks,
//
//     key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_dim]
//
// and each sequence owns a list of block ids (its block table). Token number n of
// a sequence lives in block block_table[n / block_size], row n % block_size. The
// scheduler flattens that to one integer per new token, its SLOT:
//
//     slot = block_id * block_size + offset      ->   block = slot / block_size
//                                                     offset = slot % block_size
//
// and this kernel copies, for every token t of the batch and every kv head h,
//
//     key[t, h, :]  ->  key_cache[block, h, offset, :]      (same for value)
//
// A slot of -1 marks a padding token whose k/v must not be stored.
//
// Why this cache layout: attention reads, for one head, the keys of many tokens
// one after another; with [block, head, token, dim] those are contiguous in
// memory (block_size * head_dim values), so the attention kernel's reads are long
// and coalesced. The price is paid here: the head_dim values of one (token, head)
// are contiguous (64 bf16 = 128 bytes) but consecutive heads of a token land
// block_size * head_dim elements apart. 128-byte pieces are still full memory
// transactions, so the scatter is cheap.
//
// Shape: a block of 256 threads covers a few tokens (4 x 2 for 8 kv heads x 64
// bf16); a thread copies one 16-byte vector of key and one of value (when aligned)
// for each of its 2 tokens. key and value are usually views into the fused qkv
// GEMM output, so their rows are strided (row stride given).
//
// Speed: with random slots (the benchmark's worst case) every 128-byte piece goes
// to an unrelated DRAM page, and the copy reaches ~83 % of the copy bandwidth on an
// H200 at 256+ MB: the writes, not the kernel, are the limit (more tokens per
// thread and overlapping the slot read changed nothing measurable). A real batch
// writes the consecutive slots of each sequence, i.e. contiguous block_size rows.
//
// Run: tests/test_kernels.py -k reshape_and_cache, python bench/bench_kernels.py --only cache.
#include "common.cuh"

namespace tinyvllm {
namespace {

// Block shape (blockDim.x, blockDim.y): threadIdx.x walks over the vectors of one
// token's row (num_kv_heads * head_dim / VEC of them, 64 for 8 x 64 bf16),
// threadIdx.y picks the token, and every thread does U tokens (spaced blockDim.y
// apart). For each of them it issues the key load, the value load and the slot
// load all at once: the copy does not need the slot until the store, so the
// DRAM latency of slot_mapping overlaps the data loads instead of preceding them.
constexpr int kTokensPerThread = 2;  // U below

template <typename T, int VEC, int U>
__global__ void __launch_bounds__(256)
    reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value, T* __restrict__ key_cache,
                             T* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                             int64_t num_tokens, int num_kv_heads, int head_dim, int block_size, int64_t num_slots,
                             int64_t key_row_stride, int64_t value_row_stride, int* errors) {
  const int vecs_per_head = head_dim / VEC;
  const int vecs_per_token = num_kv_heads * vecs_per_head;
  const int64_t first_token = static_cast<int64_t>(blockIdx.x) * blockDim.y * U + threadIdx.y;

  for (int i = threadIdx.x; i < vecs_per_token; i += blockDim.x) {  // one pass unless the row is long
    const int head = i / vecs_per_head;
    const int d = (i - head * vecs_per_head) * VEC;  // offset inside the head
    const int64_t src = static_cast<int64_t>(head) * head_dim + d;

    // 1. Loads: U tokens' key and value vectors and their slots, all in flight together.
    Vec<T, VEC> k[U], v[U];
    int64_t slot[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t token = first_token + static_cast<int64_t>(u) * blockDim.y;
      slot[u] = -1;
      if (token < num_tokens) {
        k[u] = load_vec<VEC>(key + token * key_row_stride + src);
        v[u] = load_vec<VEC>(value + token * value_row_stride + src);
        slot[u] = slot_mapping[token];
      }
    }
    // 2. Stores into the paged cache, skipping padding (slot -1) and slots past its end.
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (slot[u] < 0) continue;  // padding
      if (slot[u] >= num_slots) {  // past the cache: never written, and the host is told
        raise_kernel_error(errors, kErrSlotMapping);
        continue;
      }
      const int64_t block = slot[u] / block_size;
      const int64_t offset = slot[u] - block * block_size;
      const int64_t dst = ((block * num_kv_heads + head) * block_size + offset) * head_dim + d;
      store_vec<VEC>(key_cache + dst, k[u]);
      store_vec<VEC>(value_cache + dst, v[u]);
    }
  }
}

// blockDim.x: a token's vectors (rounded up to a warp, at most 256); blockDim.y: as
// many tokens as fit in 256 threads (4 for 8 kv heads x 64 bf16). Each block copies
// blockDim.y * kTokensPerThread tokens.
template <typename T, int VEC>
void launch(const T* key, const T* value, T* key_cache, T* value_cache, const int64_t* slot_mapping,
            int64_t num_tokens, int num_kv_heads, int head_dim, int block_size, int64_t num_slots,
            int64_t key_row_stride, int64_t value_row_stride, cudaStream_t stream) {
  const int per_token = num_kv_heads * (head_dim / VEC);
  const int bx = round_up_to_warp(per_token < 256 ? per_token : 256);
  const int by = 256 / bx;
  const int64_t tokens_per_block = static_cast<int64_t>(by) * kTokensPerThread;
  const dim3 grid(static_cast<unsigned>(ceil_div<int64_t>(num_tokens, tokens_per_block)));
  reshape_and_cache_kernel<T, VEC, kTokensPerThread><<<grid, dim3(bx, by), 0, stream>>>(
      key, value, key_cache, value_cache, slot_mapping, num_tokens, num_kv_heads, head_dim, block_size, num_slots,
      key_row_stride, value_row_stride, kernel_error_flags());
}

}  // namespace

void reshape_and_cache(const void* key, const void* value, void* key_cache, void* value_cache,
                       const int64_t* slot_mapping, int64_t num_tokens, int num_kv_heads, int head_dim,
                       int block_size, int64_t num_blocks, int64_t key_row_stride, int64_t value_row_stride,
                       DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || num_kv_heads == 0 || head_dim == 0) return;
  const int64_t num_slots = num_blocks * block_size;
  TINYVLLM_DISPATCH(dtype, T, {
    constexpr int V = kVec16<T>;
    const bool vec_ok = head_dim % V == 0 && key_row_stride % V == 0 && value_row_stride % V == 0 &&
                        is_aligned16(key) && is_aligned16(value) && is_aligned16(key_cache) &&
                        is_aligned16(value_cache);
    const T* k = static_cast<const T*>(key);
    const T* v = static_cast<const T*>(value);
    T* kc = static_cast<T*>(key_cache);
    T* vc = static_cast<T*>(value_cache);
    if (vec_ok) {
      launch<T, V>(k, v, kc, vc, slot_mapping, num_tokens, num_kv_heads, head_dim, block_size, num_slots,
                   key_row_stride, value_row_stride, stream);
    } else {
      launch<T, 1>(k, v, kc, vc, slot_mapping, num_tokens, num_kv_heads, head_dim, block_size, num_slots,
                   key_row_stride, value_row_stride, stream);
    }
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tinyvllm
