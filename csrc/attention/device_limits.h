// device_limits.h: what a launcher asks the CUDA runtime about the GPU and about a kernel,
// asked once and cached (nothing on the hot path, nothing a CUDA-graph capture objects to):
//   * device attributes: SM count, compute capability, shared-memory limits;
//   * prepare_kernel: a kernel's shared-memory opt-in, and how many of its blocks fit on
//     an SM (the decode plan splits the context by that);
//   * smem_to_hold_blocks_per_sm: the shared memory that holds a kernel down to r blocks per SM.
// Plain C++ (no device code): the attention launchers include it through attention_utils.cuh,
// the decode plan (decode_plan.cpp, host code only) directly.
#pragma once

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <cuda_runtime.h>

#include "cuda_check.h"

namespace tinyvllm {
namespace attn {

// A property of the current device, asked once per device and then remembered (no
// sync, so legal while a CUDA graph is being captured). `fallback` if the answer is 0.
// One cache per attribute: each template instance has its own static array.
template <cudaDeviceAttr kAttr>
inline int cached_device_attribute(int fallback) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  if (dev < 0 || dev >= kMaxDevices) dev = 0;
  if (cached[dev] == 0) {
    int v = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&v, kAttr, dev));
    cached[dev] = v > 0 ? v : fallback;
  }
  return cached[dev];
}

// Once per kernel, GPU and shared-memory size: allow the kernel its dynamic shared
// memory (more than 48 KB must be asked for, and the occupancy query below counts only
// what is allowed), then ask the CUDA runtime how many blocks of `threads` threads one
// SM holds at once. Registers and shared memory both decide that, and only the runtime
// knows both exactly (the decode tensor-core kernel at head_dim 64: 5 blocks, set by
// its 96 registers per thread, not by its 34 KB). A kernel may be launched with more
// shared memory than it uses, to hold fewer of its blocks on an SM (the decode plan
// does that), so each size is its own entry, and the allowance only ever grows (a
// smaller size asked later must not shrink what another launch relies on). Later calls
// read the cache: no CUDA call on the hot path, nothing a CUDA graph capture objects to.
inline int prepare_kernel(const void* kernel, int threads, int smem) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes allowed
  static std::map<std::tuple<const void*, int, int>, int> blocks_per_sm;  // (kernel, device, smem)
  int dev = 0;
  CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  const auto it = blocks_per_sm.find({kernel, dev, smem});
  if (it != blocks_per_sm.end()) return it->second;
  int& allow = allowed[{kernel, dev}];
  if (smem > 48 * 1024 && smem > allow) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
    allow = smem;
  }
  int n = 0;
  CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  n = n > 0 ? n : 1;
  blocks_per_sm[{kernel, dev, smem}] = n;
  return n;
}

// There is no launch option for "at most r blocks per SM"; shared memory is the lever. A
// block that asks for 1/r of the SM's shared memory (less the runtime's per-block reserve
// and the kernel's own static shared memory) leaves room for only r - 1 others. Returns the
// dynamic shared memory to ask for, never less than `need`. Registers may still allow fewer
// than r: ask the occupancy API (prepare_kernel) what you got.
inline int smem_to_hold_blocks_per_sm(int r, int need, int static_smem = 0) {
  const int per_sm = cached_device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(0);
  const int reserved = cached_device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>(1024);
  return r > 0 ? std::max(need, per_sm / r - reserved - static_smem) : need;
}

inline int num_sms_of_current_device() { return cached_device_attribute<cudaDevAttrMultiProcessorCount>(132); }
inline int device_cc_major() { return cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(1); }

}  // namespace attn
}  // namespace tinyvllm
