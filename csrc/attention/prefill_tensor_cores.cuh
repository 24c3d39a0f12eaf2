// prefill_tensor_cores.cuh: prefill attention on the tensor cores (bf16 / fp16 caches), the
// kernel the product runs. The math it computes, and its launcher: prefill_attention.cu.
//
// ---- The shape of the kernel (bf16 / fp16) ------------------------------------
// Prefill is bound by arithmetic, so the two matrix products go to the tensor cores:
// mma.sync.m16n8k16 multiplies a 16x16 tile of A by a 16x8 tile of B and adds into a
// 16x8 float32 tile, with the operands spread over the 32 threads of a warp in a
// fixed pattern (see the fragment notes below).
//
//   grid  = (num_heads, ceil(max_seqlen_q / BM), num_seqs), block = 4 warps
//   one block: BM = 64 * MT query rows of one head of one sequence; each warp owns MT
//   "m16 tiles" of 16 rows, i.e. 16 * MT consecutive rows (MT = 1 or 2, see below)
//   loop over key tiles of 64 keys (BN), only up to the diagonal:
//     S  = Q K^T   (16MT x 64 per warp)          mma
//     mask, online softmax on S in registers     rows live in groups of 4 threads (a "quad")
//     O += P V     (16MT x head_dim per warp)    mma, P reused straight from S's registers
//   K and V tiles are staged in shared memory with cp.async (asynchronous copies)
//   into two buffers, so that tile n+1 is loading while tile n is multiplied.
// Key tiles entirely above the diagonal are never loaded ("skip fully-masked tiles"),
// which halves the work of a causal prefill; only the tiles that cross the diagonal pay
// for the mask (a warp masks only where the diagonal crosses its own rows). Blocks of
// later query tiles have more work, so the grid launches them first (blockIdx.y counts
// from the end) to balance the tail.
//
// ---- Why 32 rows per warp: the shared-memory arithmetic -------------------------
// Every mma takes its B operand (K for S, V for O) from shared memory, through ldmatrix:
// one ldmatrix.x4 moves 512 bytes per warp and yields the B fragments of two 8-column
// tiles, i.e. of two mmas for each m16 tile of A that the warp multiplies by them.
//   MT = 1 (16 rows per warp, Q in registers): each fragment feeds ONE m16 tile, so
//     0.5 ldmatrix.x4 = 256 bytes of shared memory per mma. An SM's shared memory gives
//     128 bytes per clock: 2 clocks per mma, while at full rate the tensor cores of an
//     H100/H200 SM finish about one m16n8k16 per clock (989 TFLOP/s / 132 SMs / 1.83 GHz
//     = 4096 flops per clock = one 16x8x16 multiply-add; that is wgmma's peak, mma.sync
//     gets only part of it, but more than half). The tensor cores wait on shared memory.
//   MT = 2 (32 rows per warp, 128 per block; FlashAttention-2's shape): each K or V
//     fragment feeds the mmas of both m16 tiles: 0.25 ldmatrix.x4 = 128 bytes per mma.
// The price is registers. Per thread, O is MT * head_dim / 2 floats (128 at MT = 2,
// head_dim 128), S is MT * 32 (64), and Q's A fragments are MT * head_dim / 4 (64):
// 256 before a single address or softmax statistic, over the 255-register limit.
// So where Q lives depends on the variant:
//   MT = 1, and MT = 2 at head_dim 64: in registers, read from shared memory once
//     (staged in the second K/V buffer, which the loop then takes over).
//   MT = 2 at head_dim 128: in a shared-memory buffer of its own; every k-step of
//     S = Q K^T ldmatrix-es the MT A fragments it needs. Each one feeds the 8 mmas of a
//     64-key row of S, adding 1/8 ldmatrix.x4 per mma of S, 1/16 on average over S and
//     P V: 0.3125 ldmatrix.x4 = 160 bytes per mma, still far below MT = 1's 256.
// Fewer rows per warp is not always worse: MT = 2 halves the number of blocks, so a short
// prefill with few heads can leave SMs idle. The launcher chooses (m_tiles_per_warp; the
// op's impl argument can force either: 1 = MT 1, 2 = MT 2).
//
// Shared-memory rows are padded by 8 elements (16 bytes): ldmatrix reads eight
// 16-byte rows at once, and the padding puts those rows in different banks
// (no bank conflicts). The decode kernel swizzles dense rows instead (padding made
// cp.async fetch half the 32-byte sectors twice); here that was tried and measured
// slower on an H200 (3-6% at 2048-8192 tokens, even at 512-1024): each ldmatrix
// address then needs an XOR that cannot fold into the instruction's offset, the MT = 2
// kernels are at 245-255 registers already, and MT = 1 at head_dim 64 (capped at 128)
// spilled. Prefill is bound by the math, not by these copies.
//
#pragma once

#include "attention/prefill_common.cuh"

namespace tinyvllm {
namespace prefill {

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = kMmaWarps * 32;

// The variants of the kernel: MT = 1 or 2 m16 tiles (16 query rows each) per warp.
//
//                      registers (ptxas)  shared memory             blocks per SM
//   MT=1, head_dim 64        128          36 KB (Q in registers)    4
//   MT=1, head_dim 128      ~210          68 KB (Q in registers)    2
//   MT=2, head_dim 64       ~245          36 KB (Q in registers)    2
//   MT=2, head_dim 128       255         102 KB (Q in its buffer)   2 (2 x 103 KB <= 228 KB)
// Blocks per SM are set by the registers (65536 per SM): at 3 blocks per SM (168 registers
// a thread) the MT=2 kernels would spill, with Q in registers or in shared memory.
template <int D, int MT>
struct MmaTiling {
  static constexpr int kBM = kMmaWarps * 16 * MT;  // query rows per block: 64 or 128
  static constexpr int kBN = 64;                   // keys per K/V tile
  static constexpr int LD = D + 8;                 // padded shared-memory row, elements
  // Q's A fragments cost MT * D / 4 registers per thread: 32, except 64 at MT=2, D=128,
  // where they would not fit beside O (128) and S (64). See the header.
  static constexpr bool kQInRegs = MT * D <= 128;
  // Blocks per SM promised to the compiler (__launch_bounds__): it caps the registers per
  // thread at 65536 / (128 * blocks): 2 blocks = 255 registers (the most), 4 = 128.
  static constexpr int kMinBlocks = (D == 128 || MT == 2) ? 2 : 4;
  // K and V, two stages each, then Q. When Q moves into registers it borrows the second
  // K/V stage instead (sK1 and sV1 are adjacent: 2 * kBN rows >= kBM rows).
  static constexpr int kKVElems = 4 * kBN * LD;
  static constexpr int kQElems = kQInRegs ? 0 : kBM * LD;
  static constexpr int kSmemBytes = (kKVElems + kQElems) * 2;  // 2 bytes per bf16 / fp16
  static_assert(!kQInRegs || kBM <= 2 * kBN, "Q must fit in the second K/V stage");
};

// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), each register two 16-bit values:
//   A 16x16: a0 = (row g,   cols 2t,2t+1)   a1 = (row g+8, cols 2t,2t+1)
//            a2 = (row g,   cols 2t+8,+9)   a3 = (row g+8, cols 2t+8,+9)
//   B 16x8:  b0 = (rows 2t,2t+1,   col g)   b1 = (rows 2t+8,2t+9, col g)
//   C 16x8:  c0,c1 = (row g, cols 2t,2t+1)  c2,c3 = (row g+8, cols 2t,2t+1)   (float32)
// A thread therefore holds 2 * MT query rows: rows g and g+8 of each of its warp's m16 tiles.
template <typename T, int D, int MT>
__global__ void __launch_bounds__(kMmaThreads, MmaTiling<D, MT>::kMinBlocks)
    prefill_attention_mma_kernel(const PrefillParams p) {
  using Tiling = MmaTiling<D, MT>;
  constexpr int kBM = Tiling::kBM;
  constexpr int kBN = Tiling::kBN;
  constexpr int LD = Tiling::LD;
  constexpr bool kQInRegs = Tiling::kQInRegs;
  constexpr int KSTEPS = D / 16;    // k-steps of Q K^T (over head_dim)
  constexpr int NT_S = kBN / 8;     // 8-column tiles of S
  constexpr int NT_O = D / 8;       // 8-column tiles of O
  constexpr int CHUNKS = D / 8;     // 16-byte chunks per row
  static_assert(D % 16 == 0, "head_dim must be a multiple of 16");

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* const smem = reinterpret_cast<T*>(smem_raw);
  T* const sK0 = smem;
  T* const sV0 = smem + kBN * LD;
  T* const sK1 = smem + 2 * kBN * LD;
  T* const sV1 = smem + 3 * kBN * LD;
  T* const sQ = kQInRegs ? sK1 : smem + Tiling::kKVElems;

  const int head = blockIdx.x;
  const int m_tile = gridDim.y - 1 - blockIdx.y;
  const int seq = blockIdx.z;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int seq_len = attn::checked_seq_len(p.seq_lens[seq], p.max_blocks_per_seq << p.block_size_log2, p.errors);
  if (!query_run_ok(p, q_begin, q_len, seq_len)) return;
  const int m0 = m_tile * kBM;
  if (m0 >= q_len) return;  // this sequence has fewer query rows than max_seqlen_q

  const int ctx = seq_len - q_len;  // position of query row 0 (> 0 with a cached prefix)
  const int kvh = head / p.group;
  const int rows_here = min(kBM, q_len - m0);
  // Keys this block needs: up to and including the position of its last valid row.
  const int kv_end = min(seq_len, ctx + m0 + rows_here);
  const int n_tiles = (max(kv_end, 0) + kBN - 1) / kBN;

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int t4 = lane & 3;
  const int warp_row0 = warp * 16 * MT;  // this warp's first row within the block

  const T* const qbase = static_cast<const T*>(p.query);
  const T* const kc = static_cast<const T*>(p.key_cache);
  const T* const vc = static_cast<const T*>(p.value_cache);
  const int32_t* const btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int bs_mask = (1 << p.block_size_log2) - 1;

  // ---- stage Q (rows past q_len are zero-filled) ----
  for (int idx = tid; idx < kBM * CHUNKS; idx += kMmaThreads) {
    const int row = idx / CHUNKS;
    const int ch = idx - row * CHUNKS;
    const bool ok = m0 + row < q_len;
    const T* src = ok ? qbase + int64_t(q_begin + m0 + row) * p.q_row_stride + int64_t(head) * D + ch * 8 : qbase;
    attn::cp_async_16(sQ + row * LD + ch * 8, src, ok ? 16 : 0);
  }
  // ---- stage one K/V tile through the block table (keys past seq_len are zero-filled,
  //      so that 0 * garbage can never make a NaN) ----
  auto load_kv = [&](int tile, T* sK, T* sV) {
    const int n0 = tile * kBN;
    for (int idx = tid; idx < kBN * CHUNKS; idx += kMmaThreads) {
      const int row = idx / CHUNKS;
      const int ch = idx - row * CHUNKS;
      const int kp = n0 + row;
      if (kp < seq_len) {
        const int64_t blk = attn::checked_block(btab[kp >> p.block_size_log2], p.num_blocks, p.errors);
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << p.block_size_log2) + (kp & bs_mask)) * D) + ch * 8;
        attn::cp_async_16(sK + row * LD + ch * 8, kc + off, 16);
        attn::cp_async_16(sV + row * LD + ch * 8, vc + off, 16);
      } else {
        attn::cp_async_16(sK + row * LD + ch * 8, kc, 0);
        attn::cp_async_16(sV + row * LD + ch * 8, vc, 0);
      }
    }
  };
  // The A fragment of m16 tile mt, k-step kk, from sQ: ldmatrix.x4 matrix i is
  // (rows +8*(i%2), cols +8*(i/2)), which lands as a0..a3.
  auto load_q_frag = [&](uint32_t* a, int mt, int kk) {
    const int row = warp_row0 + mt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = kk * 16 + (lane >> 4) * 8;
    attn::ldmatrix_x4(a, sQ + row * LD + col);
  };
  if (n_tiles > 0) load_kv(0, sK0, sV0);
  attn::cp_async_commit();
  attn::cp_async_wait<0>();
  __syncthreads();

  // Q in registers (when it fits), read once; the compiler drops qf when it is unused.
  uint32_t qf[MT][KSTEPS][4];
  if constexpr (kQInRegs) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int kk = 0; kk < KSTEPS; ++kk) load_q_frag(qf[mt][kk], mt, kk);
    __syncthreads();  // every warp holds its Q before sK1 (== sQ) is overwritten
  }

  float o[MT][NT_O][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < NT_O; ++j) o[mt][j][0] = o[mt][j][1] = o[mt][j][2] = o[mt][j][3] = 0.f;
  // Per row of this thread: [mt][h] is row g + 8h of m16 tile mt.
  float m_run[MT][2];  // running max
  float l_run[MT][2];  // this thread's part of the row sum (quad-reduced at the end)
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m_run[mt][0] = m_run[mt][1] = -INFINITY;
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }
  // Position of row g of m16 tile 0 of this warp; row (mt, h) is at pos_g + 16 mt + 8 h.
  const int pos_g = ctx + m0 + warp_row0 + g;
  // Position of the warp's first row: a key tile needs the mask only if it holds a key
  // after it. The same for the whole warp, so the branch below never diverges.
  const int warp_first_pos = ctx + m0 + warp_row0;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const T* sK = (tile & 1) ? sK1 : sK0;
    const T* sV = (tile & 1) ? sV1 : sV0;
    if (tile + 1 < n_tiles) load_kv(tile + 1, (tile & 1) ? sK0 : sK1, (tile & 1) ? sV0 : sV1);
    attn::cp_async_commit();
    attn::cp_async_wait<1>();  // everything but the tile just requested has landed
    __syncthreads();

    // ---- S = Q K^T. For each k-step: MT A fragments of Q, then for each pair of 8-key
    // tiles one ldmatrix.x4 of K (matrix i = (keys +8*(i/2), head_dim +8*(i%2)) gives b0,b1
    // of two 8-key tiles) that feeds 2 * MT mmas ----
    float s[MT][NT_S][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT_S; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (kQInRegs) {
#pragma unroll
          for (int i = 0; i < 4; ++i) qa[mt][i] = qf[mt][kk][i];
        } else {
          load_q_frag(qa[mt], mt, kk);
        }
      }
#pragma unroll
      for (int jp = 0; jp < NT_S / 2; ++jp) {
        uint32_t b[4];
        const int key = jp * 16 + (lane >> 4) * 8 + (lane & 7);
        const int col = kk * 16 + ((lane >> 3) & 1) * 8;
        attn::ldmatrix_x4(b, sK + key * LD + col);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          attn::mma_16816<T>(s[mt][2 * jp], qa[mt], b[0], b[1]);
          attn::mma_16816<T>(s[mt][2 * jp + 1], qa[mt], b[2], b[3]);
        }
      }
    }

    // ---- scale, causal mask (only on tiles that cross this warp's diagonal), online softmax.
    // Each row is masked at its own position: with 32 rows per warp the diagonal runs
    // through the warp, so rows g, g+8, g+16, g+24 see different numbers of keys ----
    const int n0 = tile * kBN;
    const bool need_mask = n0 + kBN - 1 > warp_first_pos;
    // Element e of 8-key tile j of m16 tile mt is key n0 + 2 t4 + 8 j + (e & 1) against the
    // row at pos_g + 16 mt + 8 (e >> 1): masked when 8 j + (e & 1) - 16 mt - 8 (e >> 1) > lim.
    const int lim = pos_g - n0 - 2 * t4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < NT_S; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][j][e] * p.scale_log2;
          if (need_mask && 8 * j + (e & 1) - 16 * mt - 8 * (e >> 1) > lim) x = -INFINITY;
          s[mt][j][e] = x;
        }
      }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {m_run[mt][0], m_run[mt][1]};
#pragma unroll
      for (int j = 0; j < NT_S; ++j) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][j][0], s[mt][j][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][j][2], s[mt][j][3]));
      }
      float alpha[2], msub[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        // The 4 threads of a quad hold the 64 columns of the same row.
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        // A row that has seen only masked keys keeps max -inf; subtract 0 then so that
        // exp2(-inf - (-inf)) never produces NaN (every weight is 0 anyway).
        msub[h] = mx[h] == -INFINITY ? 0.f : mx[h];
        alpha[h] = fast_exp2(m_run[mt][h] - msub[h]);  // exp2(-inf) = 0 on the first tile
        m_run[mt][h] = mx[h];
        l_run[mt][h] *= alpha[h];
      }
#pragma unroll
      for (int j = 0; j < NT_S; ++j) {
        s[mt][j][0] = fast_exp2(s[mt][j][0] - msub[0]);
        s[mt][j][1] = fast_exp2(s[mt][j][1] - msub[0]);
        s[mt][j][2] = fast_exp2(s[mt][j][2] - msub[1]);
        s[mt][j][3] = fast_exp2(s[mt][j][3] - msub[1]);
        l_run[mt][0] += s[mt][j][0] + s[mt][j][1];
        l_run[mt][1] += s[mt][j][2] + s[mt][j][3];
      }
#pragma unroll
      for (int j = 0; j < NT_O; ++j) {
        o[mt][j][0] *= alpha[0];
        o[mt][j][1] *= alpha[0];
        o[mt][j][2] *= alpha[1];
        o[mt][j][3] *= alpha[1];
      }
    }

    // ---- O += P V. The C fragments of two adjacent 8-key tiles of S are exactly the A
    // fragment of a 16-key step (a0,a1 from tile 2kk, a2,a3 from tile 2kk+1): no shuffles.
    // V is stored [key][dim], B wants (key pairs, one dim): ldmatrix.trans, matrix i =
    // (keys +8*(i%2), dims +8*(i/2)) gives b0,b1 of two 8-dim tiles, for 2 * MT mmas ----
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = attn::pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        a[mt][1] = attn::pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        a[mt][2] = attn::pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        a[mt][3] = attn::pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < NT_O / 2; ++dp) {
        uint32_t b[4];
        const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int col = dp * 16 + (lane >> 4) * 8;
        attn::ldmatrix_x4_trans(b, sV + key * LD + col);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          attn::mma_16816<T>(o[mt][2 * dp], a[mt], b[0], b[1]);
          attn::mma_16816<T>(o[mt][2 * dp + 1], a[mt], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // all warps are done with this buffer before it is refilled
  }

  // ---- normalise and store (4-byte stores of two adjacent outputs); rows past q_len
  // were computed on zero queries and are simply not stored ----
  T* const out = static_cast<T*>(p.out);
  const int64_t out_row = int64_t(p.num_heads) * D;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float l = l_run[mt][h];
      l += __shfl_xor_sync(0xffffffffu, l, 1);
      l += __shfl_xor_sync(0xffffffffu, l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = m0 + warp_row0 + mt * 16 + h * 8 + g;
      if (row < q_len) {
        T* dst = out + int64_t(q_begin + row) * out_row + int64_t(head) * D + 2 * t4;
#pragma unroll
        for (int j = 0; j < NT_O; ++j)
          *reinterpret_cast<uint32_t*>(dst + j * 8) = attn::pack2<T>(o[mt][j][2 * h] * inv, o[mt][j][2 * h + 1] * inv);
      }
    }
  }
}

}  // namespace prefill
}  // namespace tinyvllm
