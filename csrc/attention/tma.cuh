// tma.cuh: the Tensor Memory Accelerator (TMA, sm_90+) and the mbarriers it signals.
//
// Before Hopper, every byte a kernel moved from global to shared memory was requested by
// a thread: cp.async copies 16 bytes per instruction, so a 2 KB tile costs 128 of them,
// each going through the SM's load/store unit. Hopper adds a copy engine next to each
// SM. One thread hands it a *tensor map* (a 128-byte description of a 2-D array in
// global memory: base, sizes, row stride, box shape, swizzle), a box coordinate and a
// shared-memory destination; the engine fetches the whole box on its own.
//
// How does the kernel learn that the box has landed? Through an mbarrier, a 64-bit
// object in shared memory that counts two things: arrivals (threads saying "I am
// here") and transaction bytes (bytes still to be written into shared memory). A phase
// of the barrier completes when both reach zero; waiters poll the phase's parity bit.
//   producer (one lane):  arrive.expect_tx(bar, bytes)   "one arrival; expect this many bytes"
//                         tma_load_2d(dst, map, x, y, bar)  the engine counts the bytes down
//   consumers (all lanes): wait_parity(bar, phase & 1)     returns once every byte is there
// A barrier is reused for the next tile of its stage: tile i of a ring of S stages waits
// on parity (i / S) & 1.
//
// Swizzle. ldmatrix reads eight 16-byte rows at once; if those rows are 128 bytes apart
// (a head_dim-64 bf16 row) they all fall into the same four banks and the read is
// split into 8 (an 8-way bank conflict). Padding rows would avoid it, but TMA writes
// boxes densely; it can *swizzle* them instead: with SWIZZLE_128B the 16-byte chunk c of
// row r lands at chunk c ^ (r % 8) of that row. The eight rows of an ldmatrix then hit
// eight different chunks, conflict-free. The reader applies the same XOR
// (swizzled_offset below; the decode kernel's cp.async loader writes the same layout by
// hand). The pattern repeats every 1024 bytes, so the destination must be 1024-byte
// aligned.
//
// The host part (make_row_tensor_map) asks the driver for cuTensorMapEncodeTiled at
// run time (cudaGetDriverEntryPointByVersion), so the extension does not link libcuda.
#pragma once

#include <cuda.h>  // CUtensorMap and its enums (types only; no driver symbols are linked)
#include <cuda_runtime.h>

#include <cstdint>

#include "attention/attention_utils.cuh"

namespace tinyvllm {
namespace tma {

// ---- device side --------------------------------------------------------------------

// Byte offset of 16-byte chunk `chunk` of row `row` in a box written with SWIZZLE_128B
// whose rows are 128 bytes (64 bf16/fp16): the chunk index is XORed with row % 8.
__device__ __forceinline__ int swizzled_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(attn::smem_addr(bar)), "r"(arrivals));
#endif
}

// Make freshly initialised barriers visible to the copy engine (the "async proxy").
__device__ __forceinline__ void fence_barrier_init() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(attn::smem_addr(bar)), "r"(bytes)
               : "memory");
#endif
}

// Spin until the barrier's phase with this parity has completed.
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(attn::smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}

// Copy the box at element coordinates (x = column, y = row) of the tensor map into
// shared memory; the copy engine counts its bytes down on `bar` when they have landed.
__device__ __forceinline__ void load_2d(void* smem_dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          attn::smem_addr(smem_dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(attn::smem_addr(bar))
      : "memory");
#endif
}

// ---- host side ----------------------------------------------------------------------

// Can this process build tensor maps and does the current GPU have TMA (sm_90+)?
bool available();

// A tensor map over a row-major [rows, cols] array of 16-bit elements (bf16/fp16) at
// `base`, read in boxes of box_rows x 64 columns (128 bytes per box row) with
// SWIZZLE_128B. Boxes that reach past the array are filled with zeros. Throws with a
// message naming the problem if the driver refuses.
CUtensorMap make_row_tensor_map(const void* base, DType dtype, uint64_t rows, uint64_t cols, uint32_t box_rows);

}  // namespace tma
}  // namespace tinyvllm
