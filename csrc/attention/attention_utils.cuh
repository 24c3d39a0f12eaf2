// attention_utils.cuh: small helpers shared by the attention kernels and their launchers.
//
// Kept here (not in common.cuh) because only attention needs them:
// (CUDA_CHECK, from_float, ceil_div come from common.cuh.)
//   * host side: what the launchers ask the CUDA runtime (device attributes, how many
//     blocks of a kernel fit on an SM) is in device_limits.h, plain C++ that the decode
//     plan includes too; log2_exact is here.
//   * Vec16<T>: one 16-byte load of T elements (8 bf16/fp16 or 4 fp32) and its
//     conversion to float. 16 bytes is the widest load one thread can issue, so
//     it moves the most bytes per instruction; the KV cache is read this way.
//   * fast_exp2: the hardware's 2^x (one SFU instruction). The kernels fold
//     log2(e) into the softmax scale so that exp(x) becomes exp2(x * log2 e).
//   * mma/ldmatrix/cp.async wrappers for the tensor-core kernels (prefill and decode).
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "attention/device_limits.h"
#include "common.cuh"
#include "ops.h"

namespace tinyvllm {
namespace attn {

inline int log2_exact(int x) {  // x is a power of two (checked by the bindings)
  int l = 0;
  while ((1 << l) < x) ++l;
  return l;
}

// 2^x with one MUFU.EX2 instruction; 2^-inf = +0, which the masking relies on.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Programmatic dependent launch: allow_dependent_launch() and wait_for_prerequisite_grids()
// live in common.cuh (the skinny GEMM and the elementwise kernels use them too).
using ::tinyvllm::allow_dependent_launch;
using ::tinyvllm::wait_for_prerequisite_grids;

// A block-table entry is followed only if it names a block of the cache. Anything
// else is a caller's bug that would send the kernel outside the cache: read block 0
// instead (the result is then meaningless, but nothing outside the cache is touched)
// and raise kErrBlockTable, which the host turns into an error (ops.h, errors.cu).
// Only entries of tokens below seq_len come here: the padding after them is never read.
__device__ __forceinline__ int checked_block(int entry, int num_blocks, int* errors) {
  if (static_cast<unsigned>(entry) < static_cast<unsigned>(num_blocks)) return entry;  // (negative: huge)
  raise_kernel_error(errors, kErrBlockTable);
  return 0;
}

// A sequence's length must lie in [0, capacity], capacity = the tokens its block-table row
// can name (max_blocks_per_seq * block_size). A length outside is a caller's bug: clamp it
// into that range (so no row past the table is read) and raise kErrSeqLens.
__device__ __forceinline__ int checked_seq_len(int raw, int capacity, int* errors) {
  if (raw < 0 || raw > capacity) raise_kernel_error(errors, kErrSeqLens);
  return max(0, min(raw, capacity));
}

__device__ __forceinline__ uint4 ld_global_16(const void* p) {
  // Read-only path: the KV cache is not written while attention runs.
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ uint32_t ld_global_4(const void* p) {  // two 16-bit values
  return __ldg(reinterpret_cast<const uint32_t*>(p));
}

template <typename T>
struct Vec16;

template <>
struct Vec16<float> {
  static constexpr int N = 4;
  __device__ __forceinline__ static void to_float(const uint4& u, float* f) {
    f[0] = __uint_as_float(u.x);
    f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z);
    f[3] = __uint_as_float(u.w);
  }
};

template <>
struct Vec16<__nv_bfloat16> {
  static constexpr int N = 8;
  // A bf16 is the top half of a float32, so widening is a shift (no conversion
  // instruction). Little endian: the element at the lower address is the low half.
  __device__ __forceinline__ static void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

template <>
struct Vec16<__half> {
  static constexpr int N = 8;
  __device__ __forceinline__ static void to_float(const uint4& u, float* f) {
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      __half2 h;
      memcpy(&h, &w[i], 4);
      const float2 x = __half22float2(h);
      f[2 * i] = x.x;
      f[2 * i + 1] = x.y;
    }
  }
};

// Two floats -> one 32-bit register holding two 16-bit values (the first in the low half),
// the operand format of mma.sync and of a 4-byte store.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, 4);
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &v, 4);
  return r;
}

// ---- tensor-core and async-copy wrappers (sm_80+) ---------------------------

// d += a * b for one 16x8x16 tile: A 16x16 (row-major fragment, 4 regs), B 16x8
// (column fragment, 2 regs), C/D 16x8 float32 (4 regs per thread).
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float* d, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices from shared memory; lane l gives the address of row
// (l % 8) of matrix (l / 8); register i receives, in every lane, row lane/4,
// columns 2*(lane%4) and +1 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
// The same, transposed: register i receives rows 2*(lane%4) and +1, column lane/4.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t* r, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16-byte global -> shared copy that does not block the thread. src_bytes = 0
// reads nothing and writes 16 zero bytes (used for rows past the end).
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

}  // namespace attn
}  // namespace tinyvllm
