// skinny_gemm.cuh: the kernel body of the skinny GEMM (skinny_gemm.cu says what it is for
// and why it is shaped this way; read that first). Included by skinny_gemm.cu (the
// product's launcher) and by dev/cuda/skinny_gemm.cu (which times it beside its simpler
// versions and with other unroll factors and block sizes).
//
//     y[m, n] = sum_k x[m, k] * w[n, k]        x [M, K] (rows may be strided), w [N, K], y [M, N]
//
// One warp computes a 16 x 8 (or 16 x 16) tile of y^T = w x^T on the tensor cores: 16 output
// columns n (16 rows of w, the mma's A operand) by up to 8 rows m of x per mma (its B operand),
// over its share of K; the warps of a block share the same 16 columns and split K between
// them; their partial sums meet in shared memory and one write of y ends the block.
#pragma once

#include <cstdint>

#include "attention/attention_utils.cuh"  // mma_16816 (mma.sync m16n8k16), attn::prepare_kernel
#include "common.cuh"

namespace tinyvllm {
namespace gemm {

constexpr int kTileN = 16;     // output columns per warp: the 16 rows of the mma's A operand
constexpr int kTileK = 32;     // K per warp step: 4 lanes x 8 elements (16 bytes) = two k16 mmas
constexpr int kMaxRows = 16;   // M: at most two 8-wide B operands
constexpr int kMaxWarps = 16;  // warps per block (the most the plan asks for)

// 16 bytes at p into four registers if `pred`, else four zeros; when !pred nothing is read
// (the load itself is predicated off, so p may point anywhere). kStream: the weight, read
// exactly once, is not kept in L1 (L1::no_allocate) so that L1 holds x, which every block
// of the SM reads again.
// These are plain (coherent) loads, not the read-only path (ld.global.nc, __ldg): ptxas
// moves .nc loads freely, and it sank each k step's loads down to that step's mma, which
// waits for them, so a warp had one k step in flight instead of four (seen in the SASS:
// LDG LDG LDG HMMA HMMA LDG ...). A coherent load may not move past the __syncwarp() that
// ends the load phase (another lane could have written memory before it), so all of a
// warp's loads are issued before its first mma (LDG x 12, WARPSYNC, HMMA x 8).
template <bool kStream>
__device__ __forceinline__ uint4 load16_if(const void* p, bool pred) {
  uint4 v;
  if constexpr (kStream) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @p ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"(static_cast<int>(pred)));
  } else {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @p ld.global.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"(static_cast<int>(pred)));
  }
  return v;
}

// ---- the fragments, and why 16-byte loads feed the mma directly ----------------------
// mma.sync.m16n8k16 (row.col, 16-bit inputs, fp32 accumulators): lane l, with g = l / 4 and
// q = l % 4, holds
//     A (16 x 16): a0 = A[g][2q, 2q+1]    a1 = A[g+8][2q, 2q+1]
//                  a2 = A[g][2q+8, 2q+9]  a3 = A[g+8][2q+8, 2q+9]
//     B (16 x 8):  b0 = B[2q, 2q+1][g]    b1 = B[2q+8, 2q+9][g]
//     D (16 x 8):  d0, d1 = D[g][2q, 2q+1]   d2, d3 = D[g+8][2q, 2q+1]
// (two 16-bit values per register, the lower k in the low half). The k index of a dot
// product may be renamed at will, as long as A and B are renamed alike. Lane (g, q) loads
// 8 consecutive k of a row, elements 8q .. 8q+7 of a 32-wide k step, as one 16-byte load
// (registers .x .y .z .w = elements {0,1} {2,3} {4,5} {6,7}), and we name them:
//     mma 0 (logical k 0..15):  2q, 2q+1 -> 8q+0, 8q+1   2q+8, 2q+9 -> 8q+2, 8q+3   (.x, .y)
//     mma 1 (logical k 0..15):  2q, 2q+1 -> 8q+4, 8q+5   2q+8, 2q+9 -> 8q+6, 8q+7   (.z, .w)
// Over q = 0..3 each mma gets 16 distinct k, the two together all 32: a renaming. So with
//     wa = w[n0 + g][k0 + 8q ..], wb = w[n0 + g + 8][k0 + 8q ..], xv = x[m0 + g][k0 + 8q ..]
// the operands are, with no shuffle and no shared memory:
//     mma 0: A = {wa.x, wb.x, wa.y, wb.y}, B = {xv.x, xv.y}
//     mma 1: A = {wa.z, wb.z, wa.w, wb.w}, B = {xv.z, xv.w}
// and D[r][c] = sum_k w[n0 + r][k] x[m0 + c][k] = y[m0 + c][n0 + r].
//
// Rows of x past M, rows of w past N and k past K are loaded as zeros (predicated off), so
// any M <= 16, N and K (a multiple of 8) are exact; D's columns past M are never stored.

// kMTiles: 8-row groups of x (1 for M <= 8, 2 for M <= 16). kUnroll: 32-wide k steps whose
// loads a warp issues together before its first mma (2 x kUnroll weight loads and
// kMTiles x kUnroll x loads of 16 bytes per lane in flight).
template <typename T, int kMTiles, int kUnroll>
__global__ void __launch_bounds__(kMaxWarps * 32)
    skinny_gemm_kernel(T* __restrict__ y, const T* __restrict__ x, const T* __restrict__ w, int m, int n, int k,
                       int64_t x_row_stride) {
  constexpr int kRows = kMTiles * 8;                // rows of y one block computes (past M: discarded)
  extern __shared__ float partial[];                // [warps][kRows][kTileN]: each warp's sums
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const int g = lane >> 2;  // the mma's "group": row g and g + 8 of A, column g of B
  const int q = lane & 3;   // which 8 k of each 32-wide step this lane reads
  const int n0 = blockIdx.x * kTileN;

  // This lane's two rows of w and kMTiles rows of x. A row past the end is never read
  // (its loads are predicated off); its pointer is clamped only to stay a valid address.
  const bool w_ok0 = n0 + g < n, w_ok1 = n0 + g + 8 < n;
  const T* w0 = w + static_cast<int64_t>(min(n0 + g, n - 1)) * k + 8 * q;
  const T* w1 = w + static_cast<int64_t>(min(n0 + g + 8, n - 1)) * k + 8 * q;
  const T* xr[kMTiles];
  bool x_ok[kMTiles];
#pragma unroll
  for (int t = 0; t < kMTiles; ++t) {
    x_ok[t] = 8 * t + g < m;
    xr[t] = x + static_cast<int64_t>(min(8 * t + g, m - 1)) * x_row_stride + 8 * q;
  }

  // Two accumulators per tile, one per mma of a k step: two independent chains of mmas
  // instead of one twice as long (an mma waits for the previous one into the same D).
  float acc[2][kMTiles][4] = {};
  const int num_steps = (k + kTileK - 1) / kTileK;
  // The block's warps take consecutive runs of kUnroll steps in turn (warp 0 steps
  // 0..kUnroll-1, warp 1 the next kUnroll, ...), so at any moment the block reads one
  // contiguous stretch of its 16 rows of w.
  // Launched with programmatic dependent launch (see launch_skinny_gemm), this kernel may
  // start while the kernel before it (the norm, the SiLU gate, attention) still runs. The
  // weights are constant, so the first round's weight loads go out at once; x is that
  // kernel's output, so every x load, and every write of y, waits for it to finish.
  bool waited = false;
  for (int s0 = warp * kUnroll; s0 < num_steps; s0 += num_warps * kUnroll) {
    uint4 wa[kUnroll], wb[kUnroll], xv[kUnroll][kMTiles];
    // 1. Every load of this run first: they are all in flight together.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k0 = (s0 + u) * kTileK;
      const bool k_ok = k0 + 8 * q < k;  // K % 8 == 0: a vector is wholly in or wholly out
      wa[u] = load16_if<true>(w0 + k0, k_ok && w_ok0);
      wb[u] = load16_if<true>(w1 + k0, k_ok && w_ok1);
    }
    if (!waited) {
      wait_for_prerequisite_grids();
      waited = true;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int k0 = (s0 + u) * kTileK;
      const bool k_ok = k0 + 8 * q < k;
#pragma unroll
      for (int t = 0; t < kMTiles; ++t) xv[u][t] = load16_if<false>(xr[t] + k0, k_ok && x_ok[t]);
    }
    __syncwarp();  // keeps the loads above the mmas (see load16_if)
    // 2. Then the tensor cores: two mmas per k step and 8-row group.
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const uint32_t a_lo[4] = {wa[u].x, wb[u].x, wa[u].y, wb[u].y};
      const uint32_t a_hi[4] = {wa[u].z, wb[u].z, wa[u].w, wb[u].w};
#pragma unroll
      for (int t = 0; t < kMTiles; ++t) {
        attn::mma_16816<T>(acc[0][t], a_lo, xv[u][t].x, xv[u][t].y);
        attn::mma_16816<T>(acc[1][t], a_hi, xv[u][t].z, xv[u][t].w);
      }
    }
  }

  if (!waited) wait_for_prerequisite_grids();  // (a warp with no k step: before y is written)

  // 3. Each warp's partial sums into shared memory, as [row m][column n]:
  //    D[g][2q + j] -> y[8t + 2q + j][n0 + g],  D[g + 8][2q + j] -> y[8t + 2q + j][n0 + g + 8].
  float* mine = partial + warp * kRows * kTileN;
#pragma unroll
  for (int t = 0; t < kMTiles; ++t) {
    const int r = 8 * t + 2 * q;
    mine[r * kTileN + g] = acc[0][t][0] + acc[1][t][0];
    mine[(r + 1) * kTileN + g] = acc[0][t][1] + acc[1][t][1];
    mine[r * kTileN + g + 8] = acc[0][t][2] + acc[1][t][2];
    mine[(r + 1) * kTileN + g + 8] = acc[0][t][3] + acc[1][t][3];
  }
  __syncthreads();
  // 4. Sum over the warps (a fixed order: the result does not depend on timing) and
  //    write y, rounded once. Consecutive threads write consecutive columns.
  for (int i = threadIdx.x; i < kRows * kTileN; i += blockDim.x) {
    const int row = i / kTileN, col = n0 + i % kTileN;
    if (row < m && col < n) {
      float s = 0.f;
      for (int wi = 0; wi < num_warps; ++wi) s += partial[wi * kRows * kTileN + i];
      y[static_cast<int64_t>(row) * n + col] = from_float<T>(s);
    }
  }
}

// Shared memory of a block of `warps` warps.
template <int kMTiles>
constexpr int smem_bytes(int warps) {
  return warps * kMTiles * 8 * kTileN * static_cast<int>(sizeof(float));
}

// The launch: one block per 16 output columns, `warps` warps splitting K. m in [1, 16],
// k % 8 == 0, x and w 16-byte aligned, x_row_stride % 8 == 0 (the launcher in skinny_gemm.cu
// checks; this only launches).
template <typename T, int kMTiles, int kUnroll>
void launch_skinny_gemm(T* y, const T* x, const T* w, int m, int n, int k, int64_t x_row_stride, int warps,
                        cudaStream_t stream) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(ceil_div(n, kTileN)));
  cfg.blockDim = dim3(warps * 32);
  cfg.dynamicSmemBytes = smem_bytes<kMTiles>(warps);
  cfg.stream = stream;
  // Programmatic dependent launch (sm_90+): the GPU may start this grid before the previous
  // kernel ends (as soon as that kernel allows it); the kernel waits where it must.
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() && attn::device_cc_major() >= 9 ? 1 : 0;
  CUDA_CHECK(cudaLaunchKernelEx(&cfg, skinny_gemm_kernel<T, kMTiles, kUnroll>, y, x, w, m, n, k, x_row_stride));
}

// ---- the plan: warps per block ----------------------------------------------------------
// A block owns 16 columns; its warps split K. More warps per block = more bytes in flight
// per column tile, which is what a small N (few blocks) needs; but a block is only useful
// if it runs in the first (and only) wave: when N / 16 blocks do not all fit on the GPU at
// once, the last ones start only when the first ones end, and a second half-empty wave
// costs as much as a full one. So: the most warps (16, 8 or 4, and no more than K has steps
// for) such that every block is resident at once; if none is, 4 (small blocks that the GPU
// hands out as SMs free up, so many waves end evenly).
//   Llama-3.2-1B on 132 SMs: o and down (N = 2048, 128 blocks): 16 warps; qkv (3072, 192
//   blocks): 8; gate_up (16384) and lm_head (128256): 4. SmolLM2-135M (K = 576, 18 steps):
//   at most 5 warps.
template <typename T, int kMTiles, int kUnroll>
int plan_warps(int n, int k, int num_sms) {
  const int blocks = ceil_div(n, kTileN);
  const int steps = ceil_div(k, kTileK);
  const int useful = std::max(1, ceil_div(steps, kUnroll));  // warps beyond this would have no k step
  const int cap = std::min(kMaxWarps, useful);
  const void* kernel = reinterpret_cast<const void*>(&skinny_gemm_kernel<T, kMTiles, kUnroll>);
  for (int want : {16, 8}) {
    const int warps = std::min(want, cap);
    if (warps <= 4) break;
    const int per_sm = attn::prepare_kernel(kernel, warps * 32, smem_bytes<kMTiles>(warps));
    if (static_cast<int64_t>(per_sm) * num_sms >= blocks) return warps;
  }
  return std::min(4, cap);
}

}  // namespace gemm
}  // namespace tinyvllm
