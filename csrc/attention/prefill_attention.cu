// prefill_attention.cu: causal attention for many new tokens per sequence, FlashAttention-2 style.
//
// ---- The math ---------------------------------------------------------------
// Query row i of a sequence sits at position pos_i; cached key j at position j.
//     S[i][j] = scale * (q_i . k_j)                       a q_len x seq_len score matrix
//     S[i][j] = -infinity where j > pos_i                 the causal mask: no peeking ahead
//     P[i][:] = softmax(S[i][:])                          exp(-inf) = 0: masked keys get weight 0
//     O[i]    = sum_j P[i][j] * v_j
// The queries of one step are the LAST q_len positions of the sequence:
// pos_i = (seq_len - q_len) + i. With no cached prefix seq_len == q_len and this is
// the familiar triangle; with a prefix (prefix caching, chunked prefill) every row
// also sees all seq_len - q_len earlier keys. All keys, old and new, are read from
// the paged cache (reshape_and_cache already wrote the new ones).
//
// Online softmax (derived in paged_attention.cu and in the course, chapter 8): keep
// per row a running max m, a running sum l and an unnormalised output acc; for each
// new batch of scores with max m', multiply l and acc by alpha = exp(m - m') and add
// the new terms exp(s - m'). We never hold a whole row of S, let alone the n x n matrix:
// memory stays O(n) and each key/value tile is read once per query tile.
//
// GQA: query head h reads kv head h / (num_heads / num_kv_heads). Blocks of the
// query heads that share a kv head are launched next to each other (head is the
// fastest grid index), so their k/v tiles come from L2, not HBM.
//
// ---- The shape of the kernel (bf16 / fp16) ------------------------------------
// Prefill is bound by arithmetic, so the two matrix products go to the tensor cores:
// mma.sync.m16n8k16 multiplies a 16x16 tile of A by a 16x8 tile of B and adds into a
// 16x8 float32 tile, with the operands spread over the 32 threads of a warp in a
// fixed pattern (see the fragment notes below).
//
//   grid  = (num_heads, ceil(max_seqlen_q / 64), num_seqs), block = 4 warps
//   one block: 64 query rows (BM) of one head of one sequence; warp w owns rows 16w..16w+15
//   loop over key tiles of 64 keys (BN), only up to the diagonal:
//     S  = Q K^T   (16 x 64 per warp)          mma, Q fragments kept in registers
//     mask, online softmax on S in registers   rows live in groups of 4 threads (a "quad")
//     O += P V     (16 x head_dim per warp)    mma, P reused straight from S's registers
//   K and V tiles are staged in shared memory with cp.async (asynchronous copies)
//   into two buffers, so that tile n+1 is loading while tile n is multiplied.
// Key tiles entirely above the diagonal are never loaded ("skip fully-masked tiles"),
// which halves the work of a causal prefill; only the one or two tiles that cross the
// diagonal pay for the mask. Blocks of later query tiles have more work, so the grid
// launches them first (blockIdx.y counts from the end) to balance the tail.
//
// Shared-memory rows are padded by 8 elements (16 bytes): ldmatrix reads eight
// 16-byte rows at once, and the padding puts those rows in different banks
// (no bank conflicts).
//
// ---- fp32 --------------------------------------------------------------------
// Tensor cores take 16-bit inputs; the fp32 path is a plain CUDA-core kernel (one warp
// per query row, keys staged in shared memory, the same online softmax). It exists for
// correctness and for CPU-size experiments, not for speed.
#include <algorithm>
#include <cstdint>

#include "attention/attention_utils.cuh"
#include "ops.h"

namespace tinyvllm {
namespace {

using attn::fast_exp2;

constexpr float kLog2e = 1.4426950408889634f;

struct PrefillParams {
  void* out;
  const void* query;
  const void* key_cache;
  const void* value_cache;
  const int32_t* block_tables;
  const int32_t* cu_seqlens_q;
  const int32_t* seq_lens;
  int num_heads;
  int num_kv_heads;
  int group;
  int block_size_log2;
  int max_blocks_per_seq;
  int64_t q_row_stride;
  float scale_log2;
};

// ============================ tensor-core kernel ===============================
constexpr int kBM = 64;  // query rows per block
constexpr int kBN = 64;  // keys per tile
constexpr int kMmaWarps = kBM / 16;
constexpr int kMmaThreads = kMmaWarps * 32;

template <int D>
constexpr int prefill_smem_bytes() {
  // K and V, two stages each; Q shares the second K stage (it moves to registers first).
  return 4 * kBN * (D + 8) * 2;
}

// Fragment layouts of mma.m16n8k16 (g = lane / 4, t = lane % 4), each register two 16-bit values:
//   A 16x16: a0 = (row g,   cols 2t,2t+1)   a1 = (row g+8, cols 2t,2t+1)
//            a2 = (row g,   cols 2t+8,+9)   a3 = (row g+8, cols 2t+8,+9)
//   B 16x8:  b0 = (rows 2t,2t+1,   col g)   b1 = (rows 2t+8,2t+9, col g)
//   C 16x8:  c0,c1 = (row g, cols 2t,2t+1)  c2,c3 = (row g+8, cols 2t,2t+1)   (float32)
template <typename T, int D>
__global__ void __launch_bounds__(kMmaThreads, D == 128 ? 2 : 4) prefill_attention_mma_kernel(const PrefillParams p) {
  constexpr int LD = D + 8;         // padded shared-memory row, elements
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
  T* const sQ = sK1;  // Q is staged here, moved to registers, then the buffer is reused

  const int head = blockIdx.x;
  const int m_tile = gridDim.y - 1 - blockIdx.y;
  const int seq = blockIdx.z;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int m0 = m_tile * kBM;
  if (m0 >= q_len) return;  // this sequence has fewer query rows than max_seqlen_q

  const int seq_len = max(0, min(p.seq_lens[seq], p.max_blocks_per_seq << p.block_size_log2));
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
        const int64_t blk = btab[kp >> p.block_size_log2];
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << p.block_size_log2) + (kp & bs_mask)) * D) + ch * 8;
        attn::cp_async_16(sK + row * LD + ch * 8, kc + off, 16);
        attn::cp_async_16(sV + row * LD + ch * 8, vc + off, 16);
      } else {
        attn::cp_async_16(sK + row * LD + ch * 8, kc, 0);
        attn::cp_async_16(sV + row * LD + ch * 8, vc, 0);
      }
    }
  };
  if (n_tiles > 0) load_kv(0, sK0, sV0);
  attn::cp_async_commit();
  attn::cp_async_wait<0>();
  __syncthreads();

  // ---- Q fragments into registers: matrix i of ldmatrix.x4 is (rows +8*(i%2), cols +8*(i/2)) ----
  uint32_t qf[KSTEPS][4];
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int col = kk * 16 + (lane >> 4) * 8;
    attn::ldmatrix_x4(qf[kk], sQ + row * LD + col);
  }
  __syncthreads();  // every warp holds its Q before sK1 (== sQ) is overwritten

  float o[NT_O][4];
#pragma unroll
  for (int j = 0; j < NT_O; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};  // rows g and g+8 of this warp
  float l_run[2] = {0.f, 0.f};              // this thread's part of the row sums (quad-reduced at the end)
  const int pos_lo = ctx + m0 + warp * 16 + g;  // position of this thread's row g (row g+8: +8)
  const int block_first_pos = ctx + m0;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const T* sK = (tile & 1) ? sK1 : sK0;
    const T* sV = (tile & 1) ? sV1 : sV0;
    if (tile + 1 < n_tiles) load_kv(tile + 1, (tile & 1) ? sK0 : sK1, (tile & 1) ? sV0 : sV1);
    attn::cp_async_commit();
    attn::cp_async_wait<1>();  // everything but the tile just requested has landed
    __syncthreads();

    // ---- S = Q K^T: x4 matrix i = (keys +8*(i/2), head_dim +8*(i%2)) gives b0,b1 of two 8-key tiles ----
    float s[NT_S][4];
#pragma unroll
    for (int j = 0; j < NT_S; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
      for (int jp = 0; jp < NT_S / 2; ++jp) {
        uint32_t b[4];
        const int key = jp * 16 + (lane >> 4) * 8 + (lane & 7);
        const int col = kk * 16 + ((lane >> 3) & 1) * 8;
        attn::ldmatrix_x4(b, sK + key * LD + col);
        attn::mma_16816<T>(s[2 * jp], qf[kk], b[0], b[1]);
        attn::mma_16816<T>(s[2 * jp + 1], qf[kk], b[2], b[3]);
      }
    }

    // ---- scale, causal mask (only on tiles that cross the diagonal), online softmax ----
    const int n0 = tile * kBN;
    const bool need_mask = n0 + kBN - 1 > block_first_pos;
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * p.scale_log2;
        if (need_mask) {
          const int key = n0 + j * 8 + 2 * t4 + (e & 1);
          const int pos = pos_lo + (e >> 1) * 8;
          if (key > pos) x = -INFINITY;
        }
        s[j][e] = x;
      }
    }
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
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
      alpha[h] = fast_exp2(m_run[h] - msub[h]);  // exp2(-inf) = 0 on the first tile
      m_run[h] = mx[h];
      l_run[h] *= alpha[h];
    }
#pragma unroll
    for (int j = 0; j < NT_S; ++j) {
      s[j][0] = fast_exp2(s[j][0] - msub[0]);
      s[j][1] = fast_exp2(s[j][1] - msub[0]);
      s[j][2] = fast_exp2(s[j][2] - msub[1]);
      s[j][3] = fast_exp2(s[j][3] - msub[1]);
      l_run[0] += s[j][0] + s[j][1];
      l_run[1] += s[j][2] + s[j][3];
    }
#pragma unroll
    for (int j = 0; j < NT_O; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // ---- O += P V. The C fragments of two adjacent 8-key tiles of S are exactly the A
    // fragment of a 16-key step (a0,a1 from tile 2kk, a2,a3 from tile 2kk+1): no shuffles.
    // V is stored [key][dim], B wants (key pairs, one dim): ldmatrix.trans, matrix i =
    // (keys +8*(i%2), dims +8*(i/2)) gives b0,b1 of two 8-dim tiles ----
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t a[4];
      a[0] = attn::pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = attn::pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = attn::pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = attn::pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < NT_O / 2; ++dp) {
        uint32_t b[4];
        const int key = kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7);
        const int col = dp * 16 + (lane >> 4) * 8;
        attn::ldmatrix_x4_trans(b, sV + key * LD + col);
        attn::mma_16816<T>(o[2 * dp], a, b[0], b[1]);
        attn::mma_16816<T>(o[2 * dp + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // all warps are done with this buffer before it is refilled
  }

  // ---- normalise and store (4-byte stores of two adjacent outputs) ----
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 1);
    l_run[h] += __shfl_xor_sync(0xffffffffu, l_run[h], 2);
  }
  const float inv0 = l_run[0] > 0.f ? 1.f / l_run[0] : 0.f;
  const float inv1 = l_run[1] > 0.f ? 1.f / l_run[1] : 0.f;
  const int row0 = m0 + warp * 16 + g;
  T* const out = static_cast<T*>(p.out);
  const int64_t out_row = int64_t(p.num_heads) * D;
  if (row0 < q_len) {
    T* dst = out + int64_t(q_begin + row0) * out_row + int64_t(head) * D + 2 * t4;
#pragma unroll
    for (int j = 0; j < NT_O; ++j)
      *reinterpret_cast<uint32_t*>(dst + j * 8) = attn::pack2<T>(o[j][0] * inv0, o[j][1] * inv0);
  }
  if (row0 + 8 < q_len) {
    T* dst = out + int64_t(q_begin + row0 + 8) * out_row + int64_t(head) * D + 2 * t4;
#pragma unroll
    for (int j = 0; j < NT_O; ++j)
      *reinterpret_cast<uint32_t*>(dst + j * 8) = attn::pack2<T>(o[j][2] * inv1, o[j][3] * inv1);
  }
}

// ============================ fp32 fallback ====================================
constexpr int kF32Rows = 8;  // query rows (one warp each) per block
constexpr int kF32Keys = 32;  // keys per shared-memory tile (one per lane)

template <int D>
__global__ void __launch_bounds__(kF32Rows * 32) prefill_attention_fp32_kernel(const PrefillParams p) {
  constexpr int PER_LANE = D / 32;
  __shared__ float sQ[kF32Rows][D];
  __shared__ float sK[kF32Keys][D + 1];  // +1: lane j reads row j; the pad spreads rows over banks
  __shared__ float sV[kF32Keys][D];

  const int head = blockIdx.x;
  const int seq = blockIdx.z;
  const int q_begin = p.cu_seqlens_q[seq];
  const int q_len = p.cu_seqlens_q[seq + 1] - q_begin;
  const int m0 = blockIdx.y * kF32Rows;
  if (m0 >= q_len) return;
  const int seq_len = max(0, min(p.seq_lens[seq], p.max_blocks_per_seq << p.block_size_log2));
  const int ctx = seq_len - q_len;
  const int kvh = head / p.group;
  const int rows_here = min(kF32Rows, q_len - m0);
  const int kv_end = min(seq_len, ctx + m0 + rows_here);

  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int row = m0 + warp;
  const bool row_ok = row < q_len;  // the same for the whole warp
  const int pos = ctx + row;
  const float* const q = static_cast<const float*>(p.query);
  const float* const kc = static_cast<const float*>(p.key_cache);
  const float* const vc = static_cast<const float*>(p.value_cache);
  const int32_t* const btab = p.block_tables + int64_t(seq) * p.max_blocks_per_seq;
  const int bs_mask = (1 << p.block_size_log2) - 1;

  for (int d = lane; d < D; d += 32)
    sQ[warp][d] = row_ok ? q[int64_t(q_begin + row) * p.q_row_stride + int64_t(head) * D + d] * p.scale_log2 : 0.f;

  float m = -1e30f, l = 0.f, acc[PER_LANE];
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) acc[i] = 0.f;

  for (int n0 = 0; n0 < kv_end; n0 += kF32Keys) {
    __syncthreads();  // previous tile fully used (and sQ written, on the first pass)
    for (int idx = threadIdx.x; idx < kF32Keys * D; idx += kF32Rows * 32) {
      const int r = idx / D;
      const int d = idx - r * D;
      const int kp = n0 + r;
      float kv = 0.f, vv = 0.f;
      if (kp < seq_len) {
        const int64_t blk = btab[kp >> p.block_size_log2];
        const int64_t off = ((((blk * p.num_kv_heads + kvh) << p.block_size_log2) + (kp & bs_mask)) * D) + d;
        kv = kc[off];
        vv = vc[off];
      }
      sK[r][d] = kv;
      sV[r][d] = vv;
    }
    __syncthreads();
    if (row_ok) {
      const int key = n0 + lane;
      float s = 0.f;
#pragma unroll 8
      for (int d = 0; d < D; ++d) s = fmaf(sQ[warp][d], sK[lane][d], s);
      const bool ok = key <= pos && key < seq_len;
      float mx = ok ? s : -1e30f;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float mn = fmaxf(m, mx);
      const float alpha = fast_exp2(m - mn);
      const float pj = ok ? fast_exp2(s - mn) : 0.f;
      float sum = pj;
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      l = l * alpha + sum;
      m = mn;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) acc[i] *= alpha;
      for (int j = 0; j < kF32Keys; ++j) {
        const float w = __shfl_sync(0xffffffffu, pj, j);
#pragma unroll
        for (int i = 0; i < PER_LANE; ++i) acc[i] = fmaf(w, sV[j][lane + 32 * i], acc[i]);
      }
    }
  }
  if (row_ok) {
    float* const out = static_cast<float*>(p.out) + (int64_t(q_begin + row) * p.num_heads + head) * D;
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) out[lane + 32 * i] = acc[i] * inv;
  }
}

template <typename T, int D>
void launch_mma(const PrefillParams& prm, int num_seqs, int max_seqlen_q, cudaStream_t stream) {
  constexpr int smem = prefill_smem_bytes<D>();
  auto kernel = prefill_attention_mma_kernel<T, D>;
  if (smem > 48 * 1024) {
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  }
  const dim3 grid(prm.num_heads, (max_seqlen_q + kBM - 1) / kBM, num_seqs);
  kernel<<<grid, kMmaThreads, smem, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

template <int D>
void launch_fp32(const PrefillParams& prm, int num_seqs, int max_seqlen_q, cudaStream_t stream) {
  const dim3 grid(prm.num_heads, (max_seqlen_q + kF32Rows - 1) / kF32Rows, num_seqs);
  prefill_attention_fp32_kernel<D><<<grid, kF32Rows * 32, 0, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

template <int D>
void dispatch_dtype(const PrefillParams& prm, DType dtype, int num_seqs, int max_seqlen_q, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_fp32<D>(prm, num_seqs, max_seqlen_q, stream);
    case DType::kFloat16: return launch_mma<__half, D>(prm, num_seqs, max_seqlen_q, stream);
    case DType::kBFloat16: return launch_mma<__nv_bfloat16, D>(prm, num_seqs, max_seqlen_q, stream);
  }
}

}  // namespace

void prefill_attention(void* out, const void* query, const void* key_cache, const void* value_cache,
                       const int32_t* block_tables, const int32_t* cu_seqlens_q, const int32_t* seq_lens,
                       int num_seqs, int num_heads, int num_kv_heads, int head_dim, int block_size,
                       int max_blocks_per_seq, int max_seqlen_q, int64_t query_row_stride, float scale,
                       DType dtype, cudaStream_t stream) {
  if (num_seqs == 0 || max_seqlen_q <= 0) return;
  PrefillParams prm{};
  prm.out = out;
  prm.query = query;
  prm.key_cache = key_cache;
  prm.value_cache = value_cache;
  prm.block_tables = block_tables;
  prm.cu_seqlens_q = cu_seqlens_q;
  prm.seq_lens = seq_lens;
  prm.num_heads = num_heads;
  prm.num_kv_heads = num_kv_heads;
  prm.group = num_heads / num_kv_heads;
  prm.block_size_log2 = attn::log2_exact(block_size);
  prm.max_blocks_per_seq = max_blocks_per_seq;
  prm.q_row_stride = query_row_stride;
  prm.scale_log2 = scale * kLog2e;
  switch (head_dim) {
    case 64: return dispatch_dtype<64>(prm, dtype, num_seqs, max_seqlen_q, stream);
    case 128: return dispatch_dtype<128>(prm, dtype, num_seqs, max_seqlen_q, stream);
    default: throw std::runtime_error("prefill_attention: head_dim must be 64 or 128");
  }
}

}  // namespace tinyvllm
