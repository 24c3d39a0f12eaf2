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
// Shape: ONE BLOCK PER TOKEN; its threads cover num_kv_heads * head_dim elements,
// VEC at a time (16-byte copies when aligned). key and value are usually views
// into the fused qkv GEMM output, so their rows are strided (row stride given).
//
// Run: tests/test_kernels.py -k reshape_and_cache, python bench/bench_kernels.py --only cache.
#include "common.cuh"

namespace tinyvllm {
namespace {

template <typename T, int VEC>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         T* __restrict__ key_cache, T* __restrict__ value_cache,
                                         const int64_t* __restrict__ slot_mapping, int num_kv_heads, int head_dim,
                                         int block_size, int64_t num_slots, int64_t key_row_stride,
                                         int64_t value_row_stride) {
  const int64_t token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0 || slot >= num_slots) return;  // padding (or a slot outside the cache)
  const int64_t block = slot / block_size;
  const int64_t offset = slot % block_size;

  const int vecs_per_head = head_dim / VEC;
  const int total = num_kv_heads * vecs_per_head;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int head = i / vecs_per_head;
    const int d = (i - head * vecs_per_head) * VEC;
    const int64_t src_k = token * key_row_stride + static_cast<int64_t>(head) * head_dim + d;
    const int64_t src_v = token * value_row_stride + static_cast<int64_t>(head) * head_dim + d;
    const int64_t dst = ((block * num_kv_heads + head) * block_size + offset) * head_dim + d;
    store_vec<VEC>(key_cache + dst, load_vec<VEC>(key + src_k));
    store_vec<VEC>(value_cache + dst, load_vec<VEC>(value + src_v));
  }
}

template <typename T, int VEC>
void launch(const T* key, const T* value, T* key_cache, T* value_cache, const int64_t* slot_mapping,
            int64_t num_tokens, int num_kv_heads, int head_dim, int block_size, int64_t num_slots,
            int64_t key_row_stride, int64_t value_row_stride, cudaStream_t stream) {
  const int64_t work = static_cast<int64_t>(num_kv_heads) * (head_dim / VEC);
  const int threads = round_up_to_warp(work < 512 ? work : 512);
  reshape_and_cache_kernel<T, VEC><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      key, value, key_cache, value_cache, slot_mapping, num_kv_heads, head_dim, block_size, num_slots,
      key_row_stride, value_row_stride);
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
