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
// thousand elements (2048 for Llama 3.2 1B); the block's threads split it, each
// summing the squares of its share, and those partial sums are added with warp
// shuffles (a *parallel reduction*). The row is read once, with 16-byte loads,
// and kept in registers until it is normalised and written.
//
// A row too long for the registers (more than 256 threads x 8 vectors: bf16/fp16
// beyond 16384 elements, fp32 beyond 8192, or rows not 16-byte aligned beyond
// 2048) runs the shared-memory tree kernel of rmsnorm_tree.cuh instead, which
// takes any length, slowly. dev/cuda/rmsnorm.cu times the two side by side (the
// tree is the textbook reduction this kernel improves on).
//
// Run: tests/test_kernels.py -k rms (correctness) and
//      python bench/bench_kernels.py --only rms (speed vs torch, in GB/s).
#include "common.cuh"
#include "rmsnorm_tree.cuh"

namespace tinyvllm {
namespace {

// ============================ the row in registers ============================
// A memory-bound kernel is fast only when the memory system always has plenty of
// requests to serve (Little's law: bytes in flight = bandwidth x latency, about
// 4 MB on an H100/H200, i.e. ~30 KB per SM). So the kernel:
//
//   (a) uses 16-byte vector loads: VEC = 8 bf16 values per instruction;
//   (b) gives every thread NV such vectors (compile-time NV = 1, 2, 4 or 8) and
//       issues ALL of its loads (x, the residual, the weight) before using any of
//       them, so NV * 16 bytes per input are in flight per thread at once;
//   (c) keeps those values in registers: the row is read from global memory once,
//       and after the reduction each thread normalises the values it already holds;
//   (d) sums with warp shuffles (block_reduce_sum in common.cuh): one barrier.
//
// Layout: the row is num_vecs = hidden / VEC vectors; thread t owns vectors
// t, t + blockDim.x, t + 2 * blockDim.x, ... (NV of them). At every step k the
// block reads one contiguous stretch of the row (coalesced). The launcher picks
// NV and blockDim.x so that NV * blockDim.x >= num_vecs; threads whose vector
// index falls past the end of the row simply skip it (e.g. hidden = 576).
constexpr int kMaxThreads = 256;  // the largest block the kernel launches (see __launch_bounds__)
constexpr int kMaxNV = 8;         // the most vectors a thread holds: 8 x 16 B = 128 B per input

template <typename T, int VEC, int NV, bool kFusedAdd>
__global__ void __launch_bounds__(kMaxThreads)
    rms_norm_fast_kernel(T* out, T* x, T* residual, const T* __restrict__ weight, int64_t hidden,
                         int64_t x_row_stride, float eps) {
  allow_dependent_launch();  // the next GEMM may start loading its weights (it waits for our output)
  const int64_t row = blockIdx.x;
  const int num_vecs = static_cast<int>(hidden / VEC);
  T* x_row = x + row * x_row_stride;
  T* res_row = kFusedAdd ? residual + row * hidden : nullptr;

  // 1. Issue every load first. None depends on another, so they are all in flight
  //    together; the first use below is where the thread waits for them.
  Vec<T, VEC> v[NV], w[NV], r[NV];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < num_vecs) {
      v[k] = load_vec<VEC>(x_row + i * VEC);
      if (kFusedAdd) r[k] = load_vec<VEC>(res_row + i * VEC);
      w[k] = load_vec<VEC>(weight + i * VEC);  // tiny and shared by all rows: an L2 hit
    }
  }

  // 2. (fused) residual = x + residual, rounded and stored; then the sum of squares
  //    of the row we normalise, from registers.
  float sum_sq = 0.0f;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < num_vecs) {
      if (kFusedAdd) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[k].v[j] = from_float<T>(to_float(v[k].v[j]) + to_float(r[k].v[j]));
        store_vec<VEC>(res_row + i * VEC, v[k]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float f = to_float(v[k].v[j]);
        sum_sq += f * f;
      }
    }
  }

  // 3. One block-wide sum (shuffles + one barrier), then normalise what we hold.
  const float inv_rms = rsqrtf(block_reduce_sum(sum_sq) / static_cast<float>(hidden) + eps);
  T* dst = kFusedAdd ? x_row : out + row * hidden;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < num_vecs) {
      Vec<T, VEC> o;
#pragma unroll
      for (int j = 0; j < VEC; ++j) o.v[j] = from_float<T>(to_float(v[k].v[j]) * inv_rms * to_float(w[k].v[j]));
      store_vec<VEC>(dst + i * VEC, o);
    }
  }
}

// Launch: choose NV (vectors per thread) and the block size for this row:
// the smallest NV that brings the block down to kTargetThreads threads. For bf16,
// H = 2048 -> NV = 2, H = 4096 -> NV = 4, both 128 threads. Measured on an H200
// (T = 16384, H = 4096): blocks of 32, 64, 128, 256 threads reached 84.6, 84.7,
// 90.2, 86.7 % of the copy bandwidth; the old kernel (1 vector per thread, 512
// threads, row read twice) 77.4 %. Returns false when the row does not fit in
// registers (more than kMaxNV * kMaxThreads vectors, e.g. bf16 H > 16384): the
// caller then uses the tree kernel, which handles any length, slowly.
template <typename T, int VEC, bool kFusedAdd>
bool launch_fast(T* o, T* xp, T* r, const T* w, int64_t num_tokens, int64_t hidden, int64_t x_row_stride,
                 float eps, cudaStream_t stream) {
  constexpr int kTargetThreads = 128;
  const int64_t num_vecs = hidden / VEC;
  int nv = 1;
  while (nv < kMaxNV && ceil_div<int64_t>(num_vecs, nv) > kTargetThreads) nv *= 2;
  const int64_t threads = round_up_to_warp(ceil_div<int64_t>(num_vecs, nv));
  if (threads > kMaxThreads) return false;
  const dim3 grid(static_cast<unsigned>(num_tokens));
  const int t = static_cast<int>(threads);
  switch (nv) {
    case 1: rms_norm_fast_kernel<T, VEC, 1, kFusedAdd><<<grid, t, 0, stream>>>(o, xp, r, w, hidden, x_row_stride, eps); break;
    case 2: rms_norm_fast_kernel<T, VEC, 2, kFusedAdd><<<grid, t, 0, stream>>>(o, xp, r, w, hidden, x_row_stride, eps); break;
    case 4: rms_norm_fast_kernel<T, VEC, 4, kFusedAdd><<<grid, t, 0, stream>>>(o, xp, r, w, hidden, x_row_stride, eps); break;
    default: rms_norm_fast_kernel<T, VEC, 8, kFusedAdd><<<grid, t, 0, stream>>>(o, xp, r, w, hidden, x_row_stride, eps); break;
  }
  return true;
}

// Shared launcher for both ops. For rms_norm: out, x (row stride x_row_stride).
// For fused: x is updated in place (contiguous), residual in place.
template <bool kFusedAdd>
void launch(void* out, void* x, void* residual, const void* weight, int64_t num_tokens, int64_t hidden,
            int64_t x_row_stride, float eps, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || hidden == 0) return;
  TINYVLLM_DISPATCH(dtype, T, {
    T* o = static_cast<T*>(out);
    T* xp = static_cast<T*>(x);
    T* r = static_cast<T*>(residual);
    const T* w = static_cast<const T*>(weight);
    constexpr int V = kVec16<T>;
    const bool vec_ok = hidden % V == 0 && x_row_stride % V == 0 && is_aligned16(x) && is_aligned16(weight) &&
                        (kFusedAdd ? is_aligned16(residual) : is_aligned16(out));
    const bool done = vec_ok ? launch_fast<T, V, kFusedAdd>(o, xp, r, w, num_tokens, hidden, x_row_stride, eps, stream)
                             : launch_fast<T, 1, kFusedAdd>(o, xp, r, w, num_tokens, hidden, x_row_stride, eps, stream);
    if (!done) launch_rms_norm_tree<T, kFusedAdd>(o, xp, r, w, num_tokens, hidden, x_row_stride, eps, stream);
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rms_norm(void* out, const void* x, const void* weight, int64_t num_tokens, int64_t hidden, int64_t x_row_stride,
              float eps, DType dtype, cudaStream_t stream) {
  launch<false>(out, const_cast<void*>(x), nullptr, weight, num_tokens, hidden, x_row_stride, eps, dtype, stream);
}

void fused_add_rms_norm(void* x, void* residual, const void* weight, int64_t num_tokens, int64_t hidden, float eps,
                        DType dtype, cudaStream_t stream) {
  launch<true>(nullptr, x, residual, weight, num_tokens, hidden, hidden, eps, dtype, stream);
}

}  // namespace tinyvllm
