// cuda_check.h: CUDA_CHECK, which turns a CUDA error code into a C++ exception (which the
// torch bindings turn into a Python RuntimeError).
//
// Kernel launches are asynchronous: a bad launch configuration is reported by
// cudaGetLastError() right after the launch, a fault inside the kernel only at
// the next synchronising call. CUDA_CHECK(cudaGetLastError()) after every launch
// catches the first kind where it happens.
//
// Plain C++ (common.cuh includes it for the kernels; host code such as the decode plan
// includes it alone).
#pragma once

#include <stdexcept>
#include <string>

#include <cuda_runtime.h>

#define CUDA_CHECK(expr)                                                                              \
  do {                                                                                                \
    cudaError_t tinyvllm_err_ = (expr);                                                               \
    if (tinyvllm_err_ != cudaSuccess) {                                                               \
      throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(tinyvllm_err_) +     \
                               " (" #expr ") at " __FILE__ ":" + std::to_string(__LINE__));          \
    }                                                                                                 \
  } while (0)
