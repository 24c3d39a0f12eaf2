// decode_tensor_cores.cuh: paged decode attention on the tensor cores (bf16/fp16 caches),
// the kernel the product runs.
//
// It computes what decode_cuda_cores.cuh computes (same grid, partitions, online softmax
// and end of block) with mma.sync. For the block's query heads (at most 16, the M of the
// mma) and each tile of 16 tokens:
//     S = Q K^T      [16 heads x 16 tokens]   head_dim/16 k-steps x 2 n-tiles of mma.m16n8k16
//     online softmax on S, in registers        (a head's row lives in 4 threads, a "quad")
//     O += P V       [16 heads x head_dim]    one k-step (the 16 tokens) x head_dim/8 n-tiles
// With group 4 (Llama 3.2 1B) 4 of the 16 rows are real heads: the extra math is free, the
// tensor cores would idle anyway. Decode waits on memory; the point of the tensor cores is
// ~5x fewer instructions per byte than the CUDA-core kernel (bench/results/README.md, rows
// 4-5).
//
// Fragments of mma.m16n8k16 (g = lane / 4, t = lane % 4), two 16-bit values per register:
//   A 16x16: a0 = (row g, cols 2t,2t+1)  a1 = (row g+8, cols 2t,2t+1)  a2, a3: the same, cols +8
//   B 16x8:  b0 = (rows 2t,2t+1, col g)  b1 = (rows 2t+8,2t+9, col g)
//   C 16x8:  c0,c1 = (row g, cols 2t,2t+1)  c2,c3 = (row g+8, cols 2t,2t+1)   (float32)
// Q (A of Q K^T) stays in registers. K^T is B: b0 = K[token g][dims 2t,2t+1], two neighbours
// of a key row, so ldmatrix reads it as it lies; P V needs V[tokens 2t,2t+1][dim g], so V is
// read with ldmatrix.trans. P (A of P V) is already where Q K^T left S: c0,c1 of the first
// n-tile are a0, those of the second a2.
//
// Loading: each warp streams its own tiles (w, w+W, w+2W, ... of the partition; W = WARPS,
// 4, or 8 or 16 in the wide blocks that replace a few splits) through a private ring of
// kStages shared-memory stages with cp.async (global -> shared, no registers, no blocking):
// tile i+1 is on its way while the warp multiplies tile i; warps never wait for each other
// until the end. Block-table entries are read 32 tiles at a time, one per lane. A tile
// starts at a multiple of 16 tokens and blocks hold >= 8, so rows 0-7 lie in one cache block
// and rows 8-15 in one: two entries per tile. Tiles are dense 128-byte rows (head_dim 128:
// two halves), swizzled (swizzled_offset): padding rows by 16 bytes instead made cp.async
// fetch 1.5x the bytes from L2 (a padded row's 32-byte sectors straddle shared memory's).
//
// Template parameters: HI, rows 8-15 in use (more than 8 query heads per kv head); WARPS,
// warps per block; HPW, one kv head per warp: grid.x = ceil(num_kv_heads / 4), each warp
// streams every tile of its own kv head and stores its own result, no merge of warps
// (decode_plan.cpp says where that pays).
//
// Registers: the 4-warp kernel at head_dim 64 must stay at 96 per thread for 5 blocks per SM,
// which the plan counts on; the second __launch_bounds__ argument asks ptxas for that (it
// chose 98 on its own once DecodeParams grew, and only 4 blocks fit).
#pragma once

#include "attention/decode_common.cuh"

namespace tinyvllm {
namespace decode {

template <typename T, int D, bool HI, int WARPS, bool HPW = false>
__global__ void __launch_bounds__(WARPS * 32, D == 64 && WARPS == kDecodeWarps ? 5 : 0)
    decode_tensor_cores_kernel(const DecodeParams p) {
  constexpr int TILE = kTile * D;       // elements of one staged K (or V) tile: dense rows
  constexpr int HALF = kTile * 64;      // elements of one 64-column half of a tile (128-byte rows)
  constexpr int KSTEPS = D / 16;        // k-steps of Q K^T (over head_dim)
  constexpr int NT_O = D / 8;           // 8-column tiles of O
  constexpr int CHUNKS = D / 8;         // 16-byte chunks per row
  constexpr int RSTEP = 32 / CHUNKS;    // rows one warp-wide pass of 16-byte copies covers
  constexpr int PASSES = kTile / RSTEP; // passes per tile (the first half: rows 0-7)
  static_assert(KSTEPS % 2 == 0 && NT_O % 2 == 0 && PASSES % 2 == 0, "head_dim must be 64 or 128");
  static_assert(!HPW || WARPS == kDecodeWarps, "one kv head per warp: the 4-warp kernel");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int g = lane >> 2;
  const int t = lane & 3;
  // The swizzle repeats every 1024 bytes: the tiles start on a 1024-byte boundary.
  unsigned char* const tiles =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  T* const ring = reinterpret_cast<T*>(tiles) + warp * (kStages * 2 * TILE);  // this warp's stages
  // Element offset of (row, col) in a staged tile; col is a multiple of 8 (one 16-byte
  // chunk): 64-column halves of 16 rows x 128 bytes, each swizzled (swizzled_offset).
  auto at = [](int row, int col) -> int {
    return (col >> 6) * HALF + swizzled_offset(row, (col & 63) >> 3) / int(sizeof(T));
  };

  const int seq = blockIdx.y;
  const int split = blockIdx.z;
  // The usual block: kv head blockIdx.x / head_chunks (and, past 16 query heads, a chunk of
  // its group), its warps sharing the tiles. HPW: kv head 4 * blockIdx.x + warp, a warp's own.
  const int kvh = HPW ? blockIdx.x * WARPS + warp : blockIdx.x / p.head_chunks;
  const int chunk = HPW ? 0 : blockIdx.x - kvh * p.head_chunks;
  const int head0 = kvh * p.group + chunk * kMmaRows;
  const int nh = min(kMmaRows, p.group - chunk * kMmaRows);
  attn::allow_dependent_launch();  // the merge kernel may start its launch now (it waits for our results)
  // HPW: a warp past the last kv head has nothing to do (the HPW path has no block-wide barrier).
  if (HPW && kvh >= p.num_kv_heads) return;
  // This warp's tiles of the partition: tw, tw + TS, tw + 2 TS, ... (HPW: all of them).
  const int tw = HPW ? 0 : warp;
  constexpr int TS = HPW ? 1 : WARPS;

  // ---- prologue: three independent reads, issued together ----
  // The sequence's length, the query and the block-table entries do not depend on
  // each other, so they are requested at once and their latencies (~1 us each from
  // DRAM) overlap; only the k/v copies must wait for the table.
  const int raw_seq_len = p.seq_lens[seq];

  // Q as the A operand (rows past the block's heads are zero), loaded once.
  uint32_t qa[KSTEPS][4];
  {
    const T* qp = static_cast<const T*>(p.query) + int64_t(seq) * p.q_row_stride + int64_t(head0) * D + 2 * t;
    const bool lo_ok = g < nh;
    const bool hi_ok = HI && g + 8 < nh;
#pragma unroll
    for (int ks = 0; ks < KSTEPS; ++ks) {
      qa[ks][0] = lo_ok ? attn::ld_global_4(qp + g * D + ks * 16) : 0u;
      qa[ks][1] = hi_ok ? attn::ld_global_4(qp + (g + 8) * D + ks * 16) : 0u;
      qa[ks][2] = lo_ok ? attn::ld_global_4(qp + g * D + ks * 16 + 8) : 0u;
      qa[ks][3] = hi_ok ? attn::ld_global_4(qp + (g + 8) * D + ks * 16 + 8) : 0u;
    }
  }

  // Block-table entries, 32 tiles at a time: lane j holds the entries of this warp's
  // tile i0 + j (rows 0-7 and rows 8-15), and issue() takes them with a shuffle.
  // Bounded by the table's width and the partition, not by the sequence's length
  // (not known yet): entries past the end are read but never followed.
  const int32_t* btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int l2 = p.block_size_log2;
  const int bs_mask = (1 << l2) - 1;
  const int p0 = split * p.partition_size;
  const int pcap = min(p0 + p.partition_size, p.max_blocks_per_seq << l2);
  int ent_lo, ent_hi;
  auto fetch_entries = [&](int i0) {
    const int tok0 = p0 + (tw + TS * (i0 + lane)) * kTile;
    ent_lo = tok0 < pcap ? __ldg(btab + (tok0 >> l2)) : 0;
    ent_hi = tok0 + 8 < pcap ? __ldg(btab + ((tok0 + 8) >> l2)) : 0;
  };
  fetch_entries(0);
  // The entries whose rows hold tokens (below p1) are the ones issue() follows: each must
  // name a block of the cache (attn::checked_block). Entries of rows past the end are
  // never followed, so the padding after a sequence is never judged. Checked once per
  // 32 tiles, as the entries arrive, so the tile loop pays nothing.
  auto check_entries = [&](int i0, int p1) {
    const int tok0 = p0 + (tw + TS * (i0 + lane)) * kTile;
    if (tok0 < p1) ent_lo = attn::checked_block(ent_lo, p.num_blocks, p.errors);
    if (tok0 + 8 < p1) ent_hi = attn::checked_block(ent_hi, p.num_blocks, p.errors);
  };
  const int seq_len = checked_seq_len(p, raw_seq_len);
  // A partition past the end of a shorter sequence has nothing to do. Split 0
  // always runs so that a zero-length sequence still gets its (zero) output.
  if (split > 0 && p0 >= seq_len) return;
  const int p1 = min(p0 + p.partition_size, seq_len);
  const bool single = seq_len <= p.partition_size;  // one partition: write the final output here
  check_entries(0, p1);

  const int n_tiles = (max(p1 - p0, 0) + kTile - 1) / kTile;
  const int my_tiles = n_tiles > tw ? (n_tiles - tw + TS - 1) / TS : 0;
  const T* kc = static_cast<const T*>(p.key_cache);
  const T* vc = static_cast<const T*>(p.value_cache);
  const int c = lane % CHUNKS;  // the 16-byte chunk of a row this lane copies
  const int r0 = lane / CHUNKS; // its first row; then every RSTEP rows

  // Start copying this warp's tile i into its stage. Rows past the partition's end read
  // nothing and are filled with zeros (so no NaN from unused cache memory enters the mma).
  // Only one tile ahead (kStages = 2): with 4 blocks of 4 warps per SM that is 64 KB in
  // flight per SM, which covers the DRAM latency; two tiles ahead was 0-2% slower where the
  // cache streams (bench/results/README.md, rows 16 and 26).
  auto issue = [&](int i) {
    if (i < my_tiles) {  // (warp-uniform)
      if (i > 0 && (i & 31) == 0) {
        fetch_entries(i);
        check_entries(i, p1);
      }
      const int e_lo = __shfl_sync(0xffffffffu, ent_lo, i & 31);
      const int e_hi = __shfl_sync(0xffffffffu, ent_hi, i & 31);
      const int tok0 = p0 + (tw + TS * i) * kTile;
      T* sk = ring + (i % kStages) * 2 * TILE;
      T* sv = sk + TILE;
#pragma unroll
      for (int k = 0; k < PASSES; ++k) {
        const int row = r0 + k * RSTEP;
        const int tok = tok0 + row;
        const bool ok = tok < p1;
        const int64_t blk = ok ? (k < PASSES / 2 ? e_lo : e_hi) : 0;  // never follow an entry past the end
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << l2) + (tok & bs_mask)) * D) + c * 8;
        // No .L2::256B prefetch hint: the extra L2 lookups it caused, not DRAM, held the kernel
        // back (518 -> 493 us at batch 256 x 4096 on an H200 without it; bench/results/README.md,
        // row 15).
        attn::cp_async_16(sk + at(row, c * 8), kc + off, ok ? 16 : 0);
        attn::cp_async_16(sv + at(row, c * 8), vc + off, ok ? 16 : 0);
      }
    }
    attn::cp_async_commit();  // an empty group past the end keeps the group count uniform
  };

  float o[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_lo = kEmptyMax, m_hi = kEmptyMax;  // running max of rows g and g+8 (log2 units)
  float l_lo = 0.f, l_hi = 0.f;              // this thread's share of the running sums

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(s);

  for (int i = 0; i < my_tiles; ++i) {
    __syncwarp();  // every lane is done reading the stage that the next copy overwrites
    issue(i + kStages - 1);
    const int tok0 = p0 + (tw + TS * i) * kTile;
    const T* sk = ring + (i % kStages) * 2 * TILE;
    const T* sv = ring + (i % kStages) * 2 * TILE + TILE;
    attn::cp_async_wait<kStages - 1>();  // tile i has landed (for this lane's copies)
    __syncwarp();  // ... and for every lane's copies

    // ---- S = Q K^T: 2 n-tiles of 8 tokens; one ldmatrix.x4 feeds two k-steps ----
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int kk = 0; kk < KSTEPS / 2; ++kk) {
        uint32_t b[4];  // matrices: cols +0, +8 (k-step 2kk), +16, +24 (k-step 2kk+1)
        attn::ldmatrix_x4(b, sk + at(nt * 8 + (lane & 7), kk * 32 + (lane >> 3) * 8));
        attn::mma_16816<T>(s[nt], qa[2 * kk], b[0], b[1]);
        attn::mma_16816<T>(s[nt], qa[2 * kk + 1], b[2], b[3]);
      }
    }
    // Scale into log2 units; tokens past the partition's end get -inf (weight 0).
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= p.scale_log2;
        if (tok0 + nt * 8 + 2 * t + (e & 1) >= p1) s[nt][e] = -INFINITY;
      }

    // ---- online softmax, rows g (c0, c1) and g+8 (c2, c3) ----
    // The tile's row max: 4 values here, then over the quad (lanes 4g..4g+3).
    float mx = fmaxf(fmaxf(s[0][0], s[0][1]), fmaxf(s[1][0], s[1][1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float mn_lo = fmaxf(m_lo, mx);
    const float a_lo = fast_exp2(m_lo - mn_lo);
    m_lo = mn_lo;
    float a_hi = 1.f;
    if (HI) {
      float mh = fmaxf(fmaxf(s[0][2], s[0][3]), fmaxf(s[1][2], s[1][3]));
      mh = fmaxf(mh, __shfl_xor_sync(0xffffffffu, mh, 1));
      mh = fmaxf(mh, __shfl_xor_sync(0xffffffffu, mh, 2));
      const float mn_hi = fmaxf(m_hi, mh);
      a_hi = fast_exp2(m_hi - mn_hi);
      m_hi = mn_hi;
    }
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
      s[nt][0] = fast_exp2(s[nt][0] - m_lo);  // s now holds the weight p
      s[nt][1] = fast_exp2(s[nt][1] - m_lo);
      if (HI) {
        s[nt][2] = fast_exp2(s[nt][2] - m_hi);
        s[nt][3] = fast_exp2(s[nt][3] - m_hi);
      }
    }
    // l: each thread sums only its own columns; the quad adds them up once at the end.
    l_lo = l_lo * a_lo + (s[0][0] + s[0][1]) + (s[1][0] + s[1][1]);
    if (HI) l_hi = l_hi * a_hi + (s[0][2] + s[0][3]) + (s[1][2] + s[1][3]);
#pragma unroll
    for (int j = 0; j < NT_O; ++j) {
      o[j][0] *= a_lo;
      o[j][1] *= a_lo;
      if (HI) {
        o[j][2] *= a_hi;
        o[j][3] *= a_hi;
      }
    }

    // ---- O += P V: P (16-bit) straight from S's registers; V^T via ldmatrix.trans ----
    const uint32_t pa[4] = {attn::pack2<T>(s[0][0], s[0][1]), HI ? attn::pack2<T>(s[0][2], s[0][3]) : 0u,
                            attn::pack2<T>(s[1][0], s[1][1]), HI ? attn::pack2<T>(s[1][2], s[1][3]) : 0u};
#pragma unroll
    for (int j = 0; j < NT_O / 2; ++j) {
      uint32_t b[4];  // matrices: tokens 0-7 / 8-15 of dims 16j..16j+7, then of dims 16j+8..16j+15
      const int mtx = lane >> 3;
      attn::ldmatrix_x4_trans(b, sv + at((mtx & 1) * 8 + (lane & 7), j * 16 + (mtx >> 1) * 8));
      attn::mma_16816<T>(o[2 * j], pa, b[0], b[1]);
      attn::mma_16816<T>(o[2 * j + 1], pa, b[2], b[3]);
    }
  }
  attn::cp_async_wait<0>();  // (only empty groups are left; nothing may be in flight at exit)

  // ---- hand the warp's state to the shared end (combine_warps_and_store) ----
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  if (HI) {
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  }
  if constexpr (HPW) {
    // The warp holds its kv head's whole state for this partition: store it directly.
    // Thread (g, t) holds rows g and g + 8, columns 8j + 2t and 8j + 2t + 1.
#pragma unroll
    for (int half = 0; half < (HI ? 2 : 1); ++half) {
      const int row = g + 8 * half;
      if (row >= nh) continue;
      const int h = head0 + row;
      const float m_row = half ? m_hi : m_lo;
      const float l_row = half ? l_hi : l_lo;
      if (single) {
        const float inv = l_row > 0.f ? 1.f / l_row : 0.f;  // l == 0: a zero-length sequence, output 0
        T* out = static_cast<T*>(p.out) + (int64_t(seq) * p.num_heads + h) * D;
#pragma unroll
        for (int j = 0; j < NT_O; ++j)
          *reinterpret_cast<uint32_t*>(out + j * 8 + 2 * t) =
              attn::pack2<T>(o[j][2 * half] * inv, o[j][2 * half + 1] * inv);
      } else {
        const int64_t wi = (int64_t(seq) * p.num_heads + h) * p.num_splits + split;
#pragma unroll
        for (int j = 0; j < NT_O; ++j)
          *reinterpret_cast<float2*>(p.ws_acc + wi * D + j * 8 + 2 * t) = make_float2(o[j][2 * half], o[j][2 * half + 1]);
        if (t == 0) {
          p.ws_m[wi] = m_row;
          p.ws_l[wi] = l_row;
        }
      }
    }
    return;
  }
  __syncthreads();  // every warp is done with its stages: the shared memory is reused below
  static_assert(WARPS * kMmaRows * (D + 2) * 4 <= decode_mma_smem_bytes(D, WARPS), "the merge must fit the stages");
  float* const sm_acc = reinterpret_cast<float*>(smem_raw);  // [warps][16][D]
  float* const sm_m = sm_acc + WARPS * kMmaRows * D;  // [warps][16]
  float* const sm_l = sm_m + WARPS * kMmaRows;        // [warps][16]
  float* const mine = sm_acc + warp * kMmaRows * D;
#pragma unroll
  for (int j = 0; j < NT_O; ++j) {
    *reinterpret_cast<float2*>(mine + g * D + j * 8 + 2 * t) = make_float2(o[j][0], o[j][1]);
    if (HI) *reinterpret_cast<float2*>(mine + (g + 8) * D + j * 8 + 2 * t) = make_float2(o[j][2], o[j][3]);
  }
  if (t == 0) {
    sm_m[warp * kMmaRows + g] = m_lo;
    sm_l[warp * kMmaRows + g] = l_lo;
    if (HI) {
      sm_m[warp * kMmaRows + g + 8] = m_hi;
      sm_l[warp * kMmaRows + g + 8] = l_hi;
    }
  }
  __syncthreads();
  combine_warps_and_store<T, D, WARPS>(p, sm_acc, sm_m, sm_l, kMmaRows, nh, head0, seq, split, single);
}

}  // namespace decode
}  // namespace tinyvllm
