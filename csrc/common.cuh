// common.cuh: the small toolbox every tinyvllm kernel uses.
//
//   * CUDA_CHECK            turn a CUDA error code into a C++ exception (which the
//                           torch bindings turn into a Python RuntimeError); it lives
//                           in cuda_check.h, plain C++ that host-only code includes too.
//   * ceil_div              how many blocks of size b cover a items.
//   * to_float / from_float the ONE place where half and bfloat16 are converted.
//                           All tinyvllm math happens in float32; values are
//                           rounded to the storage type once, when stored.
//   * Vec<T, N>             N elements of T moved as one 4-, 8- or 16-byte memory
//                           instruction (a "vector load"): fewer, wider memory
//                           transactions are how a kernel reaches full bandwidth.
//   * warp_reduce_sum /     sum a float over the 32 threads of a warp, or over a
//     block_reduce_sum      whole thread block.
//   * TINYVLLM_DISPATCH     call a template with the C++ type matching a DType.
//   * raise_kernel_error    flag an index a kernel refused to follow (errors.cu).
//
// No torch here: this header is plain CUDA C++ (see ops.h for why).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_check.h"
#include "ops.h"

namespace tinyvllm {

// ---- errors ------------------------------------------------------------------
// A kernel met an index it must not follow (ops.h, KernelError): raise the host-visible
// flag. A plain store of 1 suffices (every writer writes the same value); it happens
// only on bad input, so the hot paths pay a comparison, never a store.
__device__ __forceinline__ void raise_kernel_error(int* flags, KernelError which) {
  *reinterpret_cast<volatile int*>(flags + which) = 1;
}

template <typename T>
__host__ __device__ constexpr T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

inline int round_up_to_warp(int64_t n) { return static_cast<int>(ceil_div<int64_t>(n, 32) * 32); }

// True when `p` may be read with 16-byte instructions (they must be 16-byte aligned).
inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// ---- float32 <-> storage type -------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- vector loads ----------------------------------------------------------------
// Vec<T, N> is N consecutive elements aligned to their total size. Reading one
// through a pointer cast compiles to a single wide load (ld.global.v4.u32 for 16
// bytes) instead of N narrow ones. The pointer must be aligned to sizeof(Vec):
// launchers check that on the host and fall back to N = 1 (plain scalar code,
// the same template) when it is not, e.g. for hidden = 1000 rows.
//   16 bytes = 8 x bf16 / fp16 = 4 x fp32.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));  // elements in 16 bytes

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}
template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ---- reductions ---------------------------------------------------------------------
// A warp is 32 threads that execute together. __shfl_xor_sync lets each thread read
// a register of the thread whose lane id differs in one bit; after 5 rounds
// (offsets 16, 8, 4, 2, 1) every lane holds the sum of all 32 values: a butterfly,
// with no shared memory and no __syncthreads.
__device__ __forceinline__ float warp_reduce_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the whole block; every thread gets the result. blockDim.x must be a
// multiple of 32 (at most 1024 = 32 warps). Each warp reduces its own values with
// shuffles, writes one partial to shared memory, and then every warp reduces the
// (at most 32) partials with shuffles again. Call it once per kernel, or put a
// __syncthreads() between two calls (they share `warp_sums`).
__device__ __forceinline__ float block_reduce_sum(float v) {
  __shared__ float warp_sums[32];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce_sum(v);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  const int num_warps = blockDim.x >> 5;
  v = lane < num_warps ? warp_sums[lane] : 0.0f;
  return warp_reduce_sum(v);
}

// ---- dtype dispatch ----------------------------------------------------------------------
// TINYVLLM_DISPATCH(dtype, T, body): runs `body` with `T` bound to float, __half or
// __nv_bfloat16 according to the runtime DType: the bridge from the untyped void*
// of ops.h to typed kernels.
#define TINYVLLM_DISPATCH(dtype, T, ...)                                          \
  switch (dtype) {                                                                \
    case ::tinyvllm::DType::kFloat32: {                                           \
      using T = float;                                                            \
      __VA_ARGS__;                                                                \
      break;                                                                      \
    }                                                                             \
    case ::tinyvllm::DType::kFloat16: {                                           \
      using T = __half;                                                           \
      __VA_ARGS__;                                                                \
      break;                                                                      \
    }                                                                             \
    case ::tinyvllm::DType::kBFloat16: {                                          \
      using T = __nv_bfloat16;                                                    \
      __VA_ARGS__;                                                                \
      break;                                                                      \
    }                                                                             \
    default:                                                                      \
      throw std::invalid_argument("tinyvllm: unsupported dtype");                \
  }

// Programmatic dependent launch (sm_90+). A kernel calls allow_dependent_launch() to let
// the next kernel on the stream (launched with the programmatic-serialization attribute)
// start early; that kernel calls wait_for_prerequisite_grids() before it touches the
// first kernel's results: it returns once the first kernel has finished and its writes
// are visible. On older GPUs both are no-ops and the launches simply serialise.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prerequisite_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether launchers use programmatic dependent launch (sm_90+; TINYVLLM_PDL=0 turns it off,
// to measure what it buys). Read once.
inline bool pdl_enabled() {
  static const bool on = [] {
    const char* env = std::getenv("TINYVLLM_PDL");
    return env == nullptr || std::string(env) != "0";
  }();
  return on;
}

}  // namespace tinyvllm
