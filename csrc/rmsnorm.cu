// rmsnorm.cu: RMS normalisation, and the residual add fused in front of it.
//
// What it computes, for every token row x of length H (the hidden size):
//
//     rms    = sqrt( (x[0]^2 + x[1]^2 + ... + x[H-1]^2) / H  +  eps )
//     out[i] = x[i] / rms * weight[i]
//
// Llama normalises before every attention and every MLP, so this runs
// 2 * num_layers + 1 times per forward pass. fused_add_rms_norm does the
// "residual stream" step of a pre-norm transformer in the same pass:
//
//     residual = residual + x          (stored back, rounded to the storage type)
//     x        = rms_norm(residual) * weight
//
// Saving one trip through memory matters because this op does almost no math:
// per element it reads a few bytes and does ~3 flops. Its speed is the speed at
// which the GPU can move those bytes, so the goal is to read every input byte
// once, write every output byte once, and keep the memory system busy.
//
// The shape of the kernel: ONE THREAD BLOCK PER TOKEN ROW. A row is a few
// thousand elements (2048 for Llama 3.2 1B); a block of up to 1024 threads
// splits it, every thread summing the squares of its share. Those partial sums
// must then be added together: a *parallel reduction*, which is the lesson of
// this file. The two versions below differ only in how they do it:
//
//   impl 0, "tree":  each thread writes its partial sum to shared memory, then
//                    rounds of "thread i adds element i + stride" halve the array
//                    (stride = 512, 256, ..., 1) with a __syncthreads() between
//                    rounds. log2(blockDim) barriers, and scalar (2-byte) loads.
//   impl 1, "fast":  (a) warp shuffles: the 32 threads of a warp add their values
//                    through registers (__shfl_xor_sync, see common.cuh), so the
//                    only shared memory and the only barrier are for combining
//                    at most 32 warp partials; (b) 16-byte vector loads: every
//                    memory instruction moves 8 bf16 values instead of one, so
//                    far fewer instructions are needed to keep HBM busy.
//                    This is the one the model uses.
//
// Both do the second pass (normalise and write) by reading the row again: the
// first pass has just pulled it into the L1/L2 caches, so the re-read costs no
// extra HBM traffic.
//
// Run: tests/test_kernels.py -k rms (correctness, both impls) and
//      python bench/bench_kernels.py --only rms (speed vs torch, in GB/s).
#include "common.cuh"

namespace tinyvllm {
namespace {

// ============================ impl 0: shared-memory tree ============================
// blockDim.x must be a power of two (the launcher picks one).
template <typename T, bool kFusedAdd>
__global__ void rms_norm_tree_kernel(T* out, T* x, T* residual, const T* __restrict__ weight,
                                     int64_t hidden, int64_t x_row_stride, float eps) {
  extern __shared__ float partial[];  // blockDim.x floats, sized at launch
  const int64_t row = blockIdx.x;
  T* x_row = x + row * x_row_stride;
  // The row whose RMS we take: x itself, or residual (= x + residual) when fused.
  T* src = kFusedAdd ? residual + row * hidden : x_row;

  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v;
    if (kFusedAdd) {
      const T s = from_float<T>(to_float(x_row[i]) + to_float(src[i]));  // round like the stored value
      src[i] = s;
      v = to_float(s);
    } else {
      v = to_float(src[i]);
    }
    sum_sq += v * v;
  }

  // Tree reduction in shared memory: 1024 -> 512 -> ... -> 1 partial sums.
  partial[threadIdx.x] = sum_sq;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();  // every round must finish before the next one reads its results
  }
  const float inv_rms = rsqrtf(partial[0] / static_cast<float>(hidden) + eps);

  T* dst = kFusedAdd ? x_row : out + row * hidden;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    dst[i] = from_float<T>(to_float(src[i]) * inv_rms * to_float(weight[i]));
  }
}

// ============================ impl 1: warp shuffles + vector loads ============================
// Each thread handles VEC consecutive elements at a time (VEC = 16 bytes' worth
// when the row is 16-byte aligned and H is a multiple of it, else 1).
// blockDim.x must be a multiple of 32.
template <typename T, int VEC, bool kFusedAdd>
__global__ void rms_norm_fast_kernel(T* out, T* x, T* residual, const T* __restrict__ weight,
                                     int64_t hidden, int64_t x_row_stride, float eps) {
  const int64_t row = blockIdx.x;
  const int64_t num_vecs = hidden / VEC;
  T* x_row = x + row * x_row_stride;
  T* src = kFusedAdd ? residual + row * hidden : x_row;

  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    Vec<T, VEC> v = load_vec<VEC>(src + i * VEC);
    if (kFusedAdd) {
      const Vec<T, VEC> a = load_vec<VEC>(x_row + i * VEC);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v.v[j] = from_float<T>(to_float(a.v[j]) + to_float(v.v[j]));
      store_vec<VEC>(src + i * VEC, v);
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float f = to_float(v.v[j]);
      sum_sq += f * f;
    }
  }
  const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / static_cast<float>(hidden) + eps);

  T* dst = kFusedAdd ? x_row : out + row * hidden;
  for (int64_t i = threadIdx.x; i < num_vecs; i += blockDim.x) {
    // Same thread, same elements as in the first loop: reading back what this
    // thread itself wrote, so no barrier is needed between the two loops.
    const Vec<T, VEC> v = load_vec<VEC>(src + i * VEC);
    const Vec<T, VEC> w = load_vec<VEC>(weight + i * VEC);
    Vec<T, VEC> o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(to_float(v.v[j]) * inv_rms * to_float(w.v[j]));
    store_vec<VEC>(dst + i * VEC, o);
  }
}

// Shared launcher for both ops. For rms_norm: out, x (row stride x_row_stride).
// For fused: x is updated in place (contiguous), residual in place.
template <bool kFusedAdd>
void launch(void* out, void* x, void* residual, const void* weight, int64_t num_tokens, int64_t hidden,
            int64_t x_row_stride, float eps, DType dtype, int impl, cudaStream_t stream) {
  if (num_tokens == 0 || hidden == 0) return;
  if (impl != 0 && impl != 1) throw std::invalid_argument("rms_norm: impl must be 0 (tree) or 1 (fast)");
  TINYVLLM_DISPATCH(dtype, T, {
    T* o = static_cast<T*>(out);
    T* xp = static_cast<T*>(x);
    T* r = static_cast<T*>(residual);
    const T* w = static_cast<const T*>(weight);
    const dim3 grid(static_cast<unsigned>(num_tokens));
    if (impl == 0) {
      int threads = 32;  // a power of two, at most 1024, at most ~hidden
      while (threads < 1024 && threads < hidden) threads *= 2;
      rms_norm_tree_kernel<T, kFusedAdd>
          <<<grid, threads, threads * sizeof(float), stream>>>(o, xp, r, w, hidden, x_row_stride, eps);
    } else {
      constexpr int V = kVec16<T>;
      const bool vec_ok = hidden % V == 0 && x_row_stride % V == 0 && is_aligned16(x) && is_aligned16(weight) &&
                          (kFusedAdd ? is_aligned16(residual) : is_aligned16(out));
      const int64_t per_row = vec_ok ? hidden / V : hidden;  // loads per row
      const int threads = round_up_to_warp(per_row < 1024 ? per_row : 1024);
      if (vec_ok) {
        rms_norm_fast_kernel<T, V, kFusedAdd><<<grid, threads, 0, stream>>>(o, xp, r, w, hidden, x_row_stride, eps);
      } else {
        rms_norm_fast_kernel<T, 1, kFusedAdd><<<grid, threads, 0, stream>>>(o, xp, r, w, hidden, x_row_stride, eps);
      }
    }
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rms_norm(void* out, const void* x, const void* weight, int64_t num_tokens, int64_t hidden, int64_t x_row_stride,
              float eps, DType dtype, int impl, cudaStream_t stream) {
  launch<false>(out, const_cast<void*>(x), nullptr, weight, num_tokens, hidden, x_row_stride, eps, dtype, impl,
                stream);
}

void fused_add_rms_norm(void* x, void* residual, const void* weight, int64_t num_tokens, int64_t hidden, float eps,
                        DType dtype, int impl, cudaStream_t stream) {
  launch<true>(nullptr, x, residual, weight, num_tokens, hidden, hidden, eps, dtype, impl, stream);
}

}  // namespace tinyvllm
