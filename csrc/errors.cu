// errors.cu: the flags a kernel raises when device data holds an index it must not follow.
//
// A kernel cannot throw, and checking a block table or a slot mapping on the host would
// mean copying it there and waiting for the GPU before every launch. So each kernel
// checks the indices it is about to follow, never follows a bad one (reading block 0
// or skipping the token instead), and writes 1 into a flag. The flags live in pinned
// host memory mapped into the GPU's address space: the kernel's store goes straight
// to host RAM (only when something is wrong), and the host reads it with a plain load
// once the kernels are done; no copy, no extra synchronisation. The engine reads them
// right after its per-step copy of the sampled tokens, which waits for the step anyway.
#include <cstring>
#include <mutex>

#include "common.cuh"

namespace tinyvllm {
namespace {
int* g_host_flags = nullptr;    // the host's view
int* g_device_flags = nullptr;  // the GPU's view of the same memory
std::mutex g_mu;
}  // namespace

int* kernel_error_flags() {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_device_flags == nullptr) {
    void* host = nullptr;
    // Portable: usable from every GPU of the process; mapped: the kernels can address it.
    CUDA_CHECK(cudaHostAlloc(&host, sizeof(int) * kNumKernelErrors, cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host, 0, sizeof(int) * kNumKernelErrors);
    void* dev = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    g_host_flags = static_cast<int*>(host);
    g_device_flags = static_cast<int*>(dev);
  }
  return g_device_flags;
}

void read_kernel_errors(int* out, bool clear) {
  kernel_error_flags();
  volatile int* flags = g_host_flags;  // written by the GPU: read memory, not a cached copy
  for (int i = 0; i < kNumKernelErrors; ++i) {
    out[i] = flags[i];
    if (clear) flags[i] = 0;
  }
}

}  // namespace tinyvllm
