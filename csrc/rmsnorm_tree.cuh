// rmsnorm_tree.cuh: RMS normalisation with the textbook parallel reduction, for rows of any length.
//
// One block per row: each thread sums the squares of every blockDim-th element of the row,
// writes its partial sum to shared memory, and rounds of "thread i adds element i + stride"
// halve the array (stride = 512, 256, ..., 1) with a __syncthreads() between rounds; then the
// row is read again to normalise it. log2(blockDim) barriers, scalar loads, two passes: slow
// next to the register kernel of rmsnorm.cu, which the product runs. The product launches
// this one only for rows too long for that kernel's registers; dev/cuda/rmsnorm.cu times
// both (v1 this one, v2 the product's).
#pragma once

#include "common.cuh"

namespace tinyvllm {

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

// One block of up to 1024 threads per row; out, x (row stride x_row_stride), residual as in rmsnorm.cu.
template <typename T, bool kFusedAdd>
void launch_rms_norm_tree(T* o, T* xp, T* r, const T* w, int64_t num_tokens, int64_t hidden, int64_t x_row_stride,
                          float eps, cudaStream_t stream) {
  int threads = 32;  // a power of two, at most 1024, at most ~hidden
  while (threads < 1024 && threads < hidden) threads *= 2;
  rms_norm_tree_kernel<T, kFusedAdd><<<static_cast<unsigned>(num_tokens), threads, threads * sizeof(float), stream>>>(
      o, xp, r, w, hidden, x_row_stride, eps);
}

}  // namespace tinyvllm
