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

#include "common.cuh"

namespace tinyvllm {
namespace {

struct ErrorFlags {
  int* host;    // the host's view
  int* device;  // the GPU's view of the same memory
};

// Allocated on the first call (a function-local static: initialised once, thread-safe;
// if the allocation throws, the next call tries again). Every launch asks for the
// pointer, so after that it costs a load.
const ErrorFlags& error_flags() {
  static const ErrorFlags flags = [] {
    void* host = nullptr;
    // Portable: usable from every GPU of the process; mapped: the kernels can address it.
    CUDA_CHECK(cudaHostAlloc(&host, sizeof(int) * kNumKernelErrors, cudaHostAllocMapped | cudaHostAllocPortable));
    std::memset(host, 0, sizeof(int) * kNumKernelErrors);
    void* dev = nullptr;
    CUDA_CHECK(cudaHostGetDevicePointer(&dev, host, 0));
    return ErrorFlags{static_cast<int*>(host), static_cast<int*>(dev)};
  }();
  return flags;
}

}  // namespace

int* kernel_error_flags() { return error_flags().device; }

void read_kernel_errors(int* out, bool clear) {
  volatile int* flags = error_flags().host;  // written by the GPU: read memory, not a cached copy
  for (int i = 0; i < kNumKernelErrors; ++i) {
    out[i] = flags[i];
    if (clear) flags[i] = 0;
  }
}

}  // namespace tinyvllm
