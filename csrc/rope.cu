// rope.cu: rotary position embedding (RoPE), applied in place to q and k.
//
// Attention compares a query with keys by dot products, which by themselves
// know nothing about where tokens are. RoPE encodes position p by ROTATING pairs
// of coordinates of q and k by angles proportional to p:
//
//     angle_i(p) = p * inv_freq[i],   inv_freq[i] = theta^(-2i / rot_dim),  i = 0 .. rot_dim/2 - 1
//
//     x1' = x1 * cos(angle) - x2 * sin(angle)        (a 2-D rotation of the
//     x2' = x2 * cos(angle) + x1 * sin(angle)         pair (x1, x2))
//
// Because rotations compose, q(p) . k(s) then depends only on p - s: relative
// position for free. Pair i is taken "rotate-half" style (the GPT-NeoX / Hugging
// Face Llama layout): x1 = x[i], x2 = x[i + rot_dim/2], NOT neighbours x[2i], x[2i+1].
// Using the wrong pairing gives a model that still runs and speaks garbage.
//
// The cos and sin values are precomputed once per model (tinyvllm/model/rope.py,
// llama3 frequency scaling included) into cos_sin_cache[max_position][rot_dim],
// float32: row p = [cos(angle_0(p)) .. cos(angle_{h-1}(p)), sin(angle_0(p)) .. sin(...)].
// The kernel only looks them up, so prefill (many positions per sequence) and
// decode (one position) run the same code, for tokens at arbitrary positions.
//
// Shape: ONE BLOCK PER TOKEN. Its threads walk over (head, group of VEC pairs)
// for the query heads and then the key heads. A thread loads VEC elements of the
// first half and the VEC matching elements of the second half (16-byte loads when
// the sizes and addresses allow), then the token's position and cos/sin, rotates
// in float32, and writes them back.
// Each element is read once and written once, so like rmsnorm this is a pure
// memory-bandwidth problem. q and k are usually VIEWS into the fused qkv GEMM
// output ([T, (Hq + 2 Hk) * D]), so a token's row of q is followed by its k and v:
// the row stride is larger than the row, and the kernel takes it as an argument
// instead of forcing a copy.
//
// Run: tests/test_kernels.py -k rotary, python bench/bench_kernels.py --only rope.
#include "rope.cuh"

namespace tinyvllm {
namespace {

template <typename T, int VEC>
__global__ void rotary_embedding_kernel(const int64_t* __restrict__ positions, T* __restrict__ query,
                                        T* __restrict__ key, const float* __restrict__ cos_sin_cache,
                                        int num_heads, int num_kv_heads, int head_dim, int rot_dim,
                                        int64_t max_position, int64_t query_row_stride, int64_t key_row_stride,
                                        int* errors) {
  const int64_t token = blockIdx.x;
  const int half = rot_dim / 2;
  const int groups_per_head = half / VEC;  // a thread's unit of work: VEC pairs of one head
  const int total = (num_heads + num_kv_heads) * groups_per_head;
  for (int g = threadIdx.x; g < total; g += blockDim.x) {
    const int head = g / groups_per_head;
    const int i = (g - head * groups_per_head) * VEC;  // first pair index of this group
    T* x = head < num_heads ? query + token * query_row_stride + static_cast<int64_t>(head) * head_dim
                            : key + token * key_row_stride + static_cast<int64_t>(head - num_heads) * head_dim;
    // Order matters for speed: the q/k loads do not depend on the position, so they
    // are issued FIRST and are in flight while the two dependent reads that do
    // (positions[token], then its cos/sin row) make their round trips to memory.
    // Checking the position before loading would put those latencies in series.
    RopePair<T, VEC> pair;
    pair.load(x, i, half);
    const int64_t pos = positions[token];
    if (pos < 0 || pos >= max_position) {  // out of the cache: leave the token alone, tell the host
      raise_kernel_error(errors, kErrPosition);
      return;
    }
    pair.rotate(cos_sin_cache + pos * rot_dim, i, half);
    pair.store(x, i, half);
  }
}

template <typename T, int VEC>
void launch(const int64_t* positions, T* q, T* k, const float* cache, int64_t num_tokens, int num_heads,
            int num_kv_heads, int head_dim, int rot_dim, int64_t max_position, int64_t q_stride, int64_t k_stride,
            cudaStream_t stream) {
  const int64_t work = static_cast<int64_t>(num_heads + num_kv_heads) * (rot_dim / 2 / VEC);
  const int threads = round_up_to_warp(work < 512 ? work : 512);
  rotary_embedding_kernel<T, VEC><<<static_cast<unsigned>(num_tokens), threads, 0, stream>>>(
      positions, q, k, cache, num_heads, num_kv_heads, head_dim, rot_dim, max_position, q_stride, k_stride,
      kernel_error_flags());
}

}  // namespace

void rotary_embedding(const int64_t* positions, void* query, void* key, const float* cos_sin_cache,
                      int64_t num_tokens, int num_heads, int num_kv_heads, int head_dim, int rot_dim,
                      int64_t max_position, int64_t query_row_stride, int64_t key_row_stride, DType dtype,
                      cudaStream_t stream) {
  if (num_tokens == 0 || rot_dim == 0 || num_heads + num_kv_heads == 0) return;
  TINYVLLM_DISPATCH(dtype, T, {
    constexpr int V = kVec16<T>;
    const int half = rot_dim / 2;
    // 16-byte path: both halves of every head start on a 16-byte boundary, and the
    // cos/sin rows can be read as float4s (half % V == 0 makes half % 4 == 0).
    const bool vec_ok = half % V == 0 && head_dim % V == 0 && query_row_stride % V == 0 &&
                        key_row_stride % V == 0 && is_aligned16(query) && is_aligned16(key) &&
                        is_aligned16(cos_sin_cache);
    T* q = static_cast<T*>(query);
    T* k = static_cast<T*>(key);
    if (vec_ok) {
      launch<T, V>(positions, q, k, cos_sin_cache, num_tokens, num_heads, num_kv_heads, head_dim, rot_dim,
                   max_position, query_row_stride, key_row_stride, stream);
    } else {
      launch<T, 1>(positions, q, k, cos_sin_cache, num_tokens, num_heads, num_kv_heads, head_dim, rot_dim,
                   max_position, query_row_stride, key_row_stride, stream);
    }
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tinyvllm
