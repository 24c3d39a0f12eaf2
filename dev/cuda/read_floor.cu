// read_floor.cu: a kernel that only reads, to measure the floor under decode attention.
//
// ---- Why a benchmark needs it ------------------------------------------------------
// Decode attention reads every cached k/v byte of every sequence once and does little
// math per byte, so its time is set by how fast the memory system delivers those bytes.
// The copy bandwidth (bench/common.py) is one ceiling: bytes read + bytes written over
// the time of a big device-to-device copy. But a copy turns the bus around between
// reads and writes, and it reads one long run; decode reads only, and over a paged
// cache it reads many short runs (one 16-token block of one kv head: 2 KiB at head_dim
// 64) scattered wherever the allocator put them. How fast can ANY kernel read exactly
// those bytes, in exactly that layout? This kernel answers by doing nothing else: it
// streams the same pages through the same kind of table and folds them into a
// checksum. Its time is the floor for a kernel that reads that layout; the benchmark
// times it on the paged cache (the floor under our kernel) and on the contiguous copy
// that torch SDPA reads (the floor under SDPA), in the same run.
//
// ---- What it reads ---------------------------------------------------------------
// Two pools of equal pages (the key cache and the value cache, seen as pages of
// page_bytes bytes) and a table [num_rows, pages_per_row] of int32. A row has
// streams_per_row streams; stream s of row r reads, for j = 0 .. pages_per_row-1,
//
//     page = table[r][j] * page_mult + s * stream_stride
//
// of both pools. A paged cache [num_blocks, num_kv_heads, block_size, head_dim] is
// pages of one (block, kv head): the block table as it is, page_mult = num_kv_heads,
// stream s = kv head s, stream_stride = 1. A contiguous [B, kv_heads, L, head_dim]
// copy cut into the same pages: table[b][j] = b * kv_heads * pages_per_row + j,
// page_mult = 1, stream_stride = pages_per_row. The checksum of stream (r, s) is the
// XOR of every 32-bit word it read, so the same k/v give the same checksum in either
// layout (the tests and the benchmark compare them), and the compiler cannot drop a load.
//
// ---- How it reads ------------------------------------------------------------------
// One thread block per stream, as decode attention runs one per (sequence, kv head).
// The block first copies its pages' numbers into shared memory (one round trip for
// the table, then none), then each thread keeps kUnroll 16-byte loads of each pool in
// flight: memory latency is about a microsecond, and only many outstanding loads fill
// the bandwidth. The benchmark tries a few shapes (threads, kUnroll, blocks per SM) and
// keeps the fastest, since a floor is only as low as the best reader that found it.
// A page number outside the pools is never followed: page 0 is read instead
// and kErrBlockTable is raised (ops.h), as the attention kernels do.
#include <algorithm>

#include "attention/attention_utils.cuh"
#include "ops.h"

namespace tinyvllm {
namespace {

template <int kThreads, int kUnroll>
__global__ void __launch_bounds__(kThreads)
    read_pages_kernel(uint32_t* __restrict__ checksum, const uint4* __restrict__ pool_a,
                      const uint4* __restrict__ pool_b, const int32_t* __restrict__ table, int pages_per_row,
                      int log2_page_vecs, int64_t num_pages, int64_t page_mult, int64_t stream_stride,
                      int* errors) {
  extern __shared__ int64_t first_vec[];  // [pages_per_row]: where each page starts, in 16-byte units
  const int s = blockIdx.x, row = blockIdx.y, streams_per_row = gridDim.x;
  for (int j = threadIdx.x; j < pages_per_row; j += kThreads) {
    int64_t page = int64_t(table[int64_t(row) * pages_per_row + j]) * page_mult + s * stream_stride;
    if (page < 0 || page >= num_pages) {
      raise_kernel_error(errors, kErrBlockTable);
      page = 0;
    }
    first_vec[j] = page << log2_page_vecs;
  }
  __syncthreads();

  // Vector i of the stream (16 bytes) is vector i % page_vecs of page i / page_vecs.
  // Consecutive threads take consecutive vectors, so a warp reads 512 contiguous bytes.
  const int64_t page_vecs_mask = (int64_t(1) << log2_page_vecs) - 1;
  const int64_t n = int64_t(pages_per_row) << log2_page_vecs;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t base = 0; base < n; base += int64_t(kThreads) * kUnroll) {
    uint4 a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // issue every load first ...
      const int64_t i = base + u * kThreads + threadIdx.x;
      if (i < n) {
        const int64_t at = first_vec[i >> log2_page_vecs] + (i & page_vecs_mask);
        a[u] = attn::ld_global_16(pool_a + at);
        b[u] = attn::ld_global_16(pool_b + at);
      } else {
        a[u] = b[u] = make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // ... then use them (0 ^ x = x: the fold is order-free)
      acc.x ^= a[u].x ^ b[u].x;
      acc.y ^= a[u].y ^ b[u].y;
      acc.z ^= a[u].z ^ b[u].z;
      acc.w ^= a[u].w ^ b[u].w;
    }
  }

  // Fold the block's threads into one word: shuffles within each warp, then the warps'
  // words through shared memory (as block_reduce_sum in common.cuh, with ^ for +).
  uint32_t x = acc.x ^ acc.y ^ acc.z ^ acc.w;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x ^= __shfl_xor_sync(0xffffffffu, x, offset);
  __shared__ uint32_t warp_words[kThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_words[threadIdx.x >> 5] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t all = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) all ^= warp_words[w];
    checksum[int64_t(row) * streams_per_row + s] = all;
  }
}

template <int kThreads, int kUnroll>
int launch(uint32_t* checksum, const void* pool_a, const void* pool_b, const int32_t* table, int num_rows,
            int pages_per_row, int streams_per_row, int log2_page_vecs, int64_t num_pages, int64_t page_mult,
            int64_t stream_stride, int blocks_per_sm, cudaStream_t stream) {
  const auto kernel = read_pages_kernel<kThreads, kUnroll>;
  // The page numbers, padded (blocks_per_sm > 0) to hold the blocks per SM down; the
  // kernel's static shared memory is its warp_words.
  const int need = static_cast<int>(std::max<int64_t>(int64_t(pages_per_row) * 8, 16));
  const int smem = attn::smem_to_hold_blocks_per_sm(blocks_per_sm, need, int(sizeof(uint32_t)) * kThreads / 32);
  const int optin = attn::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerBlockOptin>(48 * 1024);
  if (smem > optin)
    throw std::invalid_argument("read_pages: " + std::to_string(pages_per_row) + " pages per row need " +
                                std::to_string(smem) + " bytes of shared memory, more than the " +
                                std::to_string(optin) + " a block may have");
  const int resident = attn::prepare_kernel(reinterpret_cast<const void*>(kernel), kThreads, smem);
  const dim3 grid(streams_per_row, num_rows);
  kernel<<<grid, kThreads, smem, stream>>>(checksum, static_cast<const uint4*>(pool_a),
                                           static_cast<const uint4*>(pool_b), table, pages_per_row, log2_page_vecs,
                                           num_pages, page_mult, stream_stride, kernel_error_flags());
  CUDA_CHECK(cudaGetLastError());
  return resident;
}

template <int kThreads>
int launch_unroll(int unroll, uint32_t* checksum, const void* a, const void* b, const int32_t* table, int rows,
                   int ppr, int spr, int log2_vecs, int64_t pages, int64_t mult, int64_t stride, int bps,
                   cudaStream_t stream) {
  switch (unroll) {
    case 2:
      return launch<kThreads, 2>(checksum, a, b, table, rows, ppr, spr, log2_vecs, pages, mult, stride, bps, stream);
    case 4:
      return launch<kThreads, 4>(checksum, a, b, table, rows, ppr, spr, log2_vecs, pages, mult, stride, bps, stream);
    case 8:
      return launch<kThreads, 8>(checksum, a, b, table, rows, ppr, spr, log2_vecs, pages, mult, stride, bps, stream);
    default:
      throw std::invalid_argument("read_pages: unroll must be 2, 4 or 8, got " + std::to_string(unroll));
  }
}

}  // namespace

int read_pages(uint32_t* checksum, const void* pool_a, const void* pool_b, int64_t page_bytes, int64_t num_pages,
                const int32_t* table, int num_rows, int pages_per_row, int streams_per_row, int64_t page_mult,
                int64_t stream_stride, int threads, int unroll, int blocks_per_sm, cudaStream_t stream) {
  if (num_rows == 0 || streams_per_row == 0) return 0;
  const int log2_page_vecs = attn::log2_exact(static_cast<int>(page_bytes / 16));
  switch (threads) {
    case 128:
      return launch_unroll<128>(unroll, checksum, pool_a, pool_b, table, num_rows, pages_per_row, streams_per_row,
                                log2_page_vecs, num_pages, page_mult, stream_stride, blocks_per_sm, stream);
    case 256:
      return launch_unroll<256>(unroll, checksum, pool_a, pool_b, table, num_rows, pages_per_row, streams_per_row,
                                log2_page_vecs, num_pages, page_mult, stream_stride, blocks_per_sm, stream);
    default:
      throw std::invalid_argument("read_pages: threads must be 128 or 256, got " + std::to_string(threads));
  }
}

}  // namespace tinyvllm
