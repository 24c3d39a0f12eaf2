// decode_plan.h: how paged decode attention will run a batch (the plan), and the kernel
// shapes the plan reasons about.
//
// The plan (decode_plan.cpp) picks the kernel, the warps per block, how many partitions
// each context is cut into (split-K, merged by decode_merge.cu) and how many blocks share
// an SM; paged_attention.cu turns it into DecodeParams and launches it. Plain C++ (no
// device code), so the host code can be read and compiled apart from the kernels.
#pragma once

#include <cstdint>

#include "ops.h"

namespace tinyvllm {
namespace decode {

// ---- kernel shapes (the kernels and the plan agree on these) ----
constexpr int kDecodeWarps = 4;  // warps per block: the CUDA-core kernel, the usual tensor-core block
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kTile = 16;     // tensor cores: tokens per warp step (the k=16 of P V, two n=8 tiles of Q K^T)
constexpr int kStages = 2;    // tensor cores: a warp's ring of tiles, 1 in flight while 1 is used
constexpr int kMmaRows = 16;  // tensor cores: query heads per block, the M of mma.m16n8k16

// Dynamic shared memory the tensor-core kernel asks for per block, by head_dim and warps:
// per warp, kStages stages of a K and a V tile of 16-bit values, plus 1 KB to align the
// tiles to 1024 bytes (the swizzle's period). The 8 bytes per stage are unused: they held
// the mbarriers of the TMA loader (gone, dev/cuda/README.md); kept so that every plan,
// padding and blocks-per-SM stays the one measured.
constexpr int decode_mma_smem_bytes(int head_dim, int warps = kDecodeWarps) {
  return warps * kStages * (2 * kTile * head_dim * 2 + 8) + 1024;
}

struct DecodePlan {
  bool tensor_cores;   // the tensor-core kernel (bf16/fp16) or the CUDA-core one (fp32 caches)
  int gmax;            // query heads per block (CUDA cores: a power of two >= the group, at most 8; mma: 16)
  int head_chunks;     // blocks per kv head (more than one only when the group exceeds gmax)
  int num_splits;      // partitions of each context (1: no merge kernel)
  int partition_size;  // tokens per partition
  int warps;           // tensor cores: warps per block (4, 8 or 16); the CUDA-core kernel always has 4
  bool head_per_warp;  // tensor cores: each warp takes one kv head whole (a block: 4 kv heads of one sequence)
  int smem_bytes;      // tensor cores: dynamic shared memory per block, padded where the plan holds
                       // the blocks per SM down
};

// The plan for this batch on the current GPU (num_sms of its SMs). sum_seq_lens: the sum of
// the lengths if the caller knows it on the host, else -1 (see decode_plan.cpp). impl: -1
// automatic, 0 CUDA cores (fp32 caches), 1 tensor cores with the kv head shared by the block's
// warps, 3 tensor cores with one kv head per warp; an impl that cannot run throws.
DecodePlan plan_decode(int num_seqs, int num_heads, int num_kv_heads, int head_dim, int max_seq_len,
                       int64_t sum_seq_lens, int num_sms, DType dtype, int impl);

// How many blocks of the plan's kernel fit on one SM, as the CUDA runtime counts them.
int resident_blocks_per_sm(const DecodePlan& plan, DType dtype, int head_dim, int group);

// The kernels a plan can launch, as pointers for the occupancy query (each defined where its
// kernel is instantiated). gmax: the CUDA-core kernel's query heads per block (fp32 caches);
// hi: the tensor-core kernel uses mma rows 8-15 (more than 8 query heads per kv head).
const void* cuda_cores_kernel_for(int head_dim, int gmax);                                     // decode_cuda_cores.cu
const void* tensor_cores_kernel_for(DType dtype, int head_dim, bool hi, int warps, bool head_per_warp);  // decode_tensor_cores.cu

}  // namespace decode
}  // namespace tinyvllm
