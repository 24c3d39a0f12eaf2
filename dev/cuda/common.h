// common.h: what every dev/cuda program shares (llm.c's dev/cuda/common.h): random inputs
// from a hash (the same numbers on the host and the GPU), a check against a CPU reference,
// and timing: the median of many CUDA-event times with a cold L2, beside the bandwidth of a
// device-to-device cudaMemcpy measured in the same program.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_check.h"  // CUDA_CHECK (csrc/)

namespace dev {

// A uniform number in [-1, 1) for index i: splitmix64 of (seed, i). Never all zeros, and the
// same on the host (the reference) and on the GPU (filling big inputs in place).
__host__ __device__ inline float hash_uniform(uint64_t i, uint32_t seed) {
  uint64_t z = i + 0x9e3779b97f4a7c15ull * (uint64_t(seed) + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return float(z >> 40) * (2.0f / 16777216.0f) - 1.0f;  // 24 random bits
}

// Storage types and float, both ways, on the host and the GPU (round to nearest even).
template <typename T>
__host__ __device__ inline T from_f(float x);
template <>
__host__ __device__ inline float from_f<float>(float x) { return x; }
template <>
__host__ __device__ inline __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__host__ __device__ inline __half from_f<__half>(float x) { return __float2half_rn(x); }
__host__ __device__ inline float to_f(float x) { return x; }
__host__ __device__ inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline float to_f(__half x) { return __half2float(x); }

template <typename T>
const char* type_name() {
  return sizeof(T) == 4 ? "fp32" : std::is_same<T, __half>::value ? "fp16" : "bf16";
}

// n random values of T, scaled by `scale`, rounded to T (the reference reads these same values).
template <typename T>
std::vector<T> random_vector(size_t n, uint32_t seed, float scale = 1.f) {
  std::vector<T> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = from_f<T>(scale * hash_uniform(i, seed));
  return v;
}

template <typename T>
T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  CUDA_CHECK(cudaMalloc(&d, std::max<size_t>(1, h.size()) * sizeof(T)));
  CUDA_CHECK(cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

template <typename T>
std::vector<float> to_host_float(const T* d, size_t n) {
  std::vector<T> h(n);
  CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  std::vector<float> f(n);
  for (size_t i = 0; i < n; ++i) f[i] = to_f(h[i]);
  return f;
}

// got against want: prints the max absolute error and the relative error of the whole
// output, ||got - want|| / ||want|| (an element-wise relative error means nothing where
// want is near 0); false (naming the first bad element) if an element is not finite or
// |got - want| > atol + rtol |want|.
inline bool check(const char* what, const std::vector<float>& got, const std::vector<float>& want, float atol,
                  float rtol) {
  double max_abs = 0, err_sq = 0, want_sq = 0;
  size_t bad = 0, first_bad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double err = std::fabs(double(got[i]) - want[i]);
    max_abs = std::max(max_abs, err);
    err_sq += err * err;
    want_sq += double(want[i]) * want[i];
    if (!std::isfinite(got[i]) || err > atol + rtol * std::fabs(want[i])) {
      if (bad++ == 0) first_bad = i;
    }
  }
  const double rel = std::sqrt(err_sq / std::max(want_sq, 1e-30));
  std::printf("  %-58s max abs err %.3g, rel err %.3g  %s\n", what, max_abs, rel, bad ? "MISMATCH" : "ok");
  if (bad)
    std::printf("    %zu of %zu elements off; first at %zu: got %.6f, want %.6f\n", bad, want.size(), first_bad,
                got[first_bad], want[first_bad]);
  return bad == 0;
}

__global__ void read_all_kernel(const uint4* buf, size_t n, uint32_t* sink) {
  uint32_t x = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    x ^= buf[i].x ^ buf[i].w;
  if (x == 0x12345678u) *sink = x;  // (almost never: keeps the reads)
}

// Reads a buffer 4x the L2's size, so that the next kernel finds its inputs in HBM, not L2
// (a read, not a write: dirty lines would be written back during the timed kernel).
class L2Flush {
 public:
  L2Flush() {
    int dev = 0, l2 = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
    n_ = std::max<size_t>(4 * size_t(l2), 256u << 20) / sizeof(uint4);
    CUDA_CHECK(cudaMalloc(&buf_, n_ * sizeof(uint4)));
    CUDA_CHECK(cudaMemset(buf_, 1, n_ * sizeof(uint4)));
    CUDA_CHECK(cudaMalloc(&sink_, sizeof(uint32_t)));
  }
  ~L2Flush() {
    cudaFree(buf_);
    cudaFree(sink_);
  }
  void operator()() const { read_all_kernel<<<1024, 256>>>(buf_, n_, sink_); }

 private:
  uint4* buf_ = nullptr;
  uint32_t* sink_ = nullptr;
  size_t n_ = 0;
};

// Median time in microseconds of launch() (CUDA events around each call on the default
// stream; before each, the L2 is flushed), after a few warm-up calls.
inline double median_us(const std::function<void()>& launch, int reps = 50, bool flush_l2 = true) {
  static L2Flush* flush = nullptr;
  if (flush_l2 && flush == nullptr) flush = new L2Flush();
  for (int i = 0; i < 3; ++i) launch();
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<cudaEvent_t> start(reps), stop(reps);
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventCreate(&start[i]));
    CUDA_CHECK(cudaEventCreate(&stop[i]));
  }
  for (int i = 0; i < reps; ++i) {
    if (flush_l2) (*flush)();
    CUDA_CHECK(cudaEventRecord(start[i]));
    launch();
    CUDA_CHECK(cudaEventRecord(stop[i]));
  }
  CUDA_CHECK(cudaGetLastError());
  CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> ms(reps);
  for (int i = 0; i < reps; ++i) {
    CUDA_CHECK(cudaEventElapsedTime(&ms[i], start[i], stop[i]));
    CUDA_CHECK(cudaEventDestroy(start[i]));
    CUDA_CHECK(cudaEventDestroy(stop[i]));
  }
  std::nth_element(ms.begin(), ms.begin() + reps / 2, ms.end());
  return 1e3 * ms[reps / 2];
}

// The ceiling a memory-bound kernel is measured against: a 1 GiB device-to-device
// cudaMemcpy, (bytes read + bytes written) / time, in GB/s (1e9 bytes per second).
inline double copy_gbps() {
  const size_t n = size_t(1) << 30;
  void *src = nullptr, *dst = nullptr;
  CUDA_CHECK(cudaMalloc(&src, n));
  CUDA_CHECK(cudaMalloc(&dst, n));
  CUDA_CHECK(cudaMemset(src, 7, n));
  const double us = median_us([&] { CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice)); }, 20, false);
  CUDA_CHECK(cudaFree(src));
  CUDA_CHECK(cudaFree(dst));
  return 2.0 * n / (us * 1e-6) / 1e9;
}

inline void print_device() {
  cudaDeviceProp p{};
  CUDA_CHECK(cudaGetDeviceProperties(&p, 0));
  std::printf("%s, %d SMs\n", p.name, p.multiProcessorCount);
}

}  // namespace dev
