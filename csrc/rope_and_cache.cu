// rope_and_cache.cu: RoPE and the KV-cache write in ONE launch.
//
// Every layer of a decode step runs, between the QKV GEMM and attention,
//
//     rotary_embedding(q, k)              rotate q and k in place      (rope.cu)
//     reshape_and_cache(k, v, caches)     copy k and v into the pages  (cache.cu)
//
// Both move a few kilobytes per token: at batch 1 each kernel is pure fixed cost
// (launch, one round trip to memory), about 2-3 us on an H100, and a 16-layer step
// pays it 32 times. This kernel does both with one launch, and reads k once: a thread
// that rotates a pair of key coordinates already holds the rotated values in
// registers, so it stores them to the token's row (as rope.cu does; prefill reads
// them there) AND to the cache. The value rows, and any key coordinates past rot_dim
// (partial rotary), are plain copies done by the remaining threads.
//
// Shape: one block per token. Thread g < (Hq + Hk) * half/VEC rotates VEC pairs of one
// head (q heads first, then k heads, as in rope.cu); the next Hk * (D - rot_dim)/VEC
// threads copy the un-rotated tail of the keys; the last Hk * D/VEC copy the values.
// For Llama 3.2 1B (32 + 8 heads, D = rot_dim = 64, 8 bf16 per vector) that is
// 160 + 0 + 64 = 224 threads, one pass.
//
// Same contract as the two kernels in sequence: a position outside the cos/sin cache
// leaves the token un-rotated (and its key is cached un-rotated) and raises
// kErrPosition; slot -1 is padding (nothing cached); a slot past the cache is skipped
// and raises kErrSlotMapping.
//
// Run: tests/test_kernels.py -k rope_and_cache, python bench/bench_kernels.py --only rope_and_cache.
#include <type_traits>

#include "rope.cuh"

namespace tinyvllm {
namespace {

template <typename T, int VEC>
__global__ void rope_and_cache_kernel(const int64_t* __restrict__ positions, T* __restrict__ query,
                                      T* __restrict__ key, const T* __restrict__ value, T* __restrict__ key_cache,
                                      T* __restrict__ value_cache, const int64_t* __restrict__ slot_mapping,
                                      const float* __restrict__ cos_sin_cache, int num_heads, int num_kv_heads,
                                      int head_dim, int rot_dim, int block_size, int64_t max_position,
                                      int64_t num_slots, int64_t query_row_stride, int64_t key_row_stride,
                                      int64_t value_row_stride, int* errors) {
  const int64_t token = blockIdx.x;
  const int half = rot_dim / 2;
  const int g = threadIdx.x;
  const int groups_per_head = half / VEC;
  const int rotations = (num_heads + num_kv_heads) * groups_per_head;
  const int tail_per_head = (head_dim - rot_dim) / VEC;  // key vectors past rot_dim: copied as they are
  const int tails = num_kv_heads * tail_per_head;
  const int value_per_head = head_dim / VEC;

  // Where this token's keys go in the cache [num_blocks, Hk, block_size, D]: head h's
  // row starts at cache_row + h * block_size * D. -1: nowhere (padding or a bad slot).
  const int64_t slot = slot_mapping[token];
  auto cache_row = [&]() -> int64_t {
    const int64_t block = slot / block_size;
    return (block * num_kv_heads * block_size + (slot - block * block_size)) * head_dim;
  };
  const int64_t head_stride = static_cast<int64_t>(block_size) * head_dim;

  for (int w = g; w < rotations + tails + num_kv_heads * value_per_head; w += blockDim.x) {
    if (w < rotations) {  // rotate VEC pairs of one q or k head
      const int head = w / groups_per_head;
      const int i = (w - head * groups_per_head) * VEC;
      const bool is_key = head >= num_heads;
      T* x = is_key ? key + token * key_row_stride + static_cast<int64_t>(head - num_heads) * head_dim
                    : query + token * query_row_stride + static_cast<int64_t>(head) * head_dim;
      RopePair<T, VEC> pair;
      pair.load(x, i, half);
      const int64_t pos = positions[token];
      if (pos >= 0 && pos < max_position) {
        pair.rotate(cos_sin_cache + pos * rot_dim, i, half);
        pair.store(x, i, half);
      } else if (w == 0) {
        raise_kernel_error(errors, kErrPosition);  // the token stays as it was
      }
      if (is_key && slot >= 0 && slot < num_slots) {
        pair.store(key_cache + cache_row() + (head - num_heads) * head_stride, i, half);
      }
    } else if (slot >= 0 && slot < num_slots) {  // a plain copy: a key's tail past rot_dim, or a value
      const bool is_tail = w < rotations + tails;
      const int v = is_tail ? w - rotations : w - rotations - tails;
      const int per_head = is_tail ? tail_per_head : value_per_head;
      const int head = v / per_head;
      const int d = (is_tail ? rot_dim : 0) + (v - head * per_head) * VEC;
      const T* src = is_tail ? key + token * key_row_stride : value + token * value_row_stride;
      T* dst = (is_tail ? key_cache : value_cache) + cache_row() + head * head_stride + d;
      store_vec<VEC>(dst, load_vec<VEC>(src + static_cast<int64_t>(head) * head_dim + d));
    }
  }
  if (g == 0 && slot >= num_slots) raise_kernel_error(errors, kErrSlotMapping);
}

}  // namespace

void rotary_embedding_and_cache(const int64_t* positions, void* query, void* key, const void* value,
                                void* key_cache, void* value_cache, const int64_t* slot_mapping,
                                const float* cos_sin_cache, int64_t num_tokens, int num_heads, int num_kv_heads,
                                int head_dim, int rot_dim, int block_size, int64_t num_blocks,
                                int64_t max_position, int64_t query_row_stride, int64_t key_row_stride,
                                int64_t value_row_stride, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || num_heads + num_kv_heads == 0) return;
  const int64_t num_slots = num_blocks * block_size;
  TINYVLLM_DISPATCH(dtype, T, {
    constexpr int V = kVec16<T>;
    // 16-byte path: every vector a thread moves starts on a 16-byte boundary (both
    // halves of each head, the tail past rot_dim, the cache rows), and the cos/sin rows
    // can be read as float4s (half % V == 0 makes half % 4 == 0).
    const bool vec_ok = (rot_dim / 2) % V == 0 && head_dim % V == 0 && query_row_stride % V == 0 &&
                        key_row_stride % V == 0 && value_row_stride % V == 0 && is_aligned16(query) &&
                        is_aligned16(key) && is_aligned16(value) && is_aligned16(key_cache) &&
                        is_aligned16(value_cache) && is_aligned16(cos_sin_cache);
    auto run = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const int64_t work = static_cast<int64_t>(num_heads + num_kv_heads) * (rot_dim / 2 / VEC) +
                           static_cast<int64_t>(num_kv_heads) * ((head_dim - rot_dim) / VEC + head_dim / VEC);
      const int threads = round_up_to_warp(work < 512 ? work : 512);
      rope_and_cache_kernel<T, VEC><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
          positions, static_cast<T*>(query), static_cast<T*>(key), static_cast<const T*>(value),
          static_cast<T*>(key_cache), static_cast<T*>(value_cache), slot_mapping, cos_sin_cache, num_heads,
          num_kv_heads, head_dim, rot_dim, block_size, max_position, num_slots, query_row_stride, key_row_stride,
          value_row_stride, kernel_error_flags());
    };
    if (vec_ok) {
      run(std::integral_constant<int, V>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tinyvllm
