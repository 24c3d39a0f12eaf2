// read_floor.cu (dev/cuda): a kernel that only reads, the floor under decode attention.
//
// Decode attention reads every cached k/v byte once and does little math per byte, so its
// time is set by how fast the memory system delivers those bytes. A device-to-device copy
// is one ceiling, but it turns the bus around between reads and writes and reads one long
// run; decode reads only, many short runs (one 16-token block of one kv head: 2 KiB at
// head_dim 64) scattered over the paged cache. How fast can ANY kernel read exactly those
// bytes in that layout? This kernel does nothing else: it streams the same pages through
// the same kind of table and folds them into a checksum. bench/bench_attention.py times it
// on the paged cache (the floor under our kernel) and on the contiguous copy torch SDPA
// reads (the floor under SDPA), in the same run.
//
// What it reads: two pools of equal pages (the key and the value cache) and a table
// [num_rows, pages_per_row]; stream s of row r reads pages table[r][j] * page_mult +
// s * stream_stride of both. A paged cache [num_blocks, kv_heads, block_size, head_dim]:
// pages of one (block, kv head), the block table as it is, page_mult = kv_heads, stream s =
// kv head s, stream_stride = 1. The contiguous [B, kv_heads, L, head_dim] copy cut into the
// same pages: table[b][j] = b * kv_heads * pages_per_row + j, page_mult = 1, stream_stride =
// pages_per_row. The checksum of a stream is the XOR of every 32-bit word it read: the same
// k/v give the same checksum in either layout, and the compiler cannot drop a load.
//
// How: one block per stream, as decode runs one per (sequence, kv head). The block copies its
// page numbers into shared memory, then each thread keeps kUnroll 16-byte loads of each pool
// in flight. A floor is only as low as the best reader that found it, so a few shapes
// (threads, kUnroll, blocks per SM) are tried and the fastest kept. A page outside the pools
// is never followed: page 0 is read instead and kErrBlockTable raised (ops.h).
//
// Built two ways:
//   the program: checks the checksums against the CPU's XOR (every shape; paged and
//   contiguous layouts; 16-byte pages; a page outside the pools), then times the floor of a
//   Llama-1B paged cache beside a device-to-device cudaMemcpy:
//     nvcc -O3 -arch=sm_90a -std=c++20 -I csrc dev/cuda/read_floor.cu csrc/errors.cu -o build/dev/read_floor
//   a shared library the attention benchmark loads with ctypes (bench/read_floor.py builds it):
//     nvcc -O3 -arch=sm_90a -std=c++20 -I csrc -DREAD_FLOOR_LIBRARY -shared -Xcompiler -fPIC \
//       dev/cuda/read_floor.cu csrc/errors.cu -o build/dev/libread_floor.so
#include <algorithm>
#include <random>
#include <stdexcept>
#include <string>

#include "attention/attention_utils.cuh"
#include "common.h"
#include "ops.h"

namespace read_floor {
namespace {

using namespace tinyvllm;

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

// Launches the kernel: stream s of row r of `table` [num_rows, pages_per_row] reads pages
// table[r][j] * page_mult + s * stream_stride of both pools (num_pages pages of page_bytes
// bytes, a power of two >= 16; 16-byte aligned) and writes checksum[r * streams_per_row + s].
// threads 128 or 256; unroll (16-byte loads of each pool in flight per thread) 2, 4 or 8;
// blocks_per_sm > 0 holds the blocks on an SM down to about that many (padding shared
// memory), 0 lets as many run as fit. Returns how many blocks fit on an SM (0: nothing to do).
int read_pages(uint32_t* checksum, const void* pool_a, const void* pool_b, int64_t page_bytes, int64_t num_pages,
               const int32_t* table, int num_rows, int pages_per_row, int streams_per_row, int64_t page_mult,
               int64_t stream_stride, int threads, int unroll, int blocks_per_sm, cudaStream_t stream) {
  const auto fail = [](const std::string& what) { throw std::invalid_argument("read_pages: " + what); };
  if (page_bytes < 16 || page_bytes > (int64_t(1) << 30) || (page_bytes & (page_bytes - 1)) != 0)
    fail("a page must be a power of two of at least 16 bytes, got " + std::to_string(page_bytes) + " bytes");
  if (page_mult < 0 || page_mult > num_pages || stream_stride < 0 || stream_stride > num_pages)
    fail("page_mult and stream_stride must lie in [0, num_pages = " + std::to_string(num_pages) + "]");
  if (num_rows > 65535) fail("at most 65535 rows, got " + std::to_string(num_rows));
  if (blocks_per_sm < 0 || blocks_per_sm > 32) fail("blocks_per_sm must lie in [0, 32] (0: as many as fit)");
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
      fail("threads must be 128 or 256, got " + std::to_string(threads));
      return 0;
  }
}

}  // namespace read_floor

#ifdef READ_FLOOR_LIBRARY
// ---- the library's C entry points (bench/read_floor.py) ------------------------------------
namespace {
std::string last_error;
}

extern "C" {
// read_floor::read_pages; `stream` is a cudaStream_t. Returns the blocks per SM, or -1 with the
// reason in tinyvllm_read_floor_error().
int tinyvllm_read_pages(uint32_t* checksum, const void* pool_a, const void* pool_b, int64_t page_bytes,
                        int64_t num_pages, const int32_t* table, int num_rows, int pages_per_row, int streams_per_row,
                        int64_t page_mult, int64_t stream_stride, int threads, int unroll, int blocks_per_sm,
                        void* stream) {
  try {
    return read_floor::read_pages(checksum, pool_a, pool_b, page_bytes, num_pages, table, num_rows, pages_per_row,
                                  streams_per_row, page_mult, stream_stride, threads, unroll, blocks_per_sm,
                                  static_cast<cudaStream_t>(stream));
  } catch (const std::exception& e) {
    last_error = e.what();
    return -1;
  }
}

const char* tinyvllm_read_floor_error() { return last_error.c_str(); }

// 1 if a kernel of this library met a page outside the pools since the last clear (call it
// once the kernels have finished); clears the flag if `clear`.
int tinyvllm_read_floor_bad_page(int clear) {
  int flags[tinyvllm::kNumKernelErrors];
  tinyvllm::read_kernel_errors(flags, clear != 0);
  return flags[tinyvllm::kErrBlockTable];
}
}  // extern "C"

#else
// ---- the program: check, then time ---------------------------------------------------------

// Pools of random 32-bit words (num_pages pages of page_words words), on the host and the GPU.
struct Pools {
  std::vector<uint32_t> a, b;
  uint32_t *da = nullptr, *db = nullptr;
  int64_t num_pages, page_words;
  Pools(int64_t pages, int64_t words, uint32_t seed) : num_pages(pages), page_words(words) {
    a.resize(pages * words);
    b.resize(pages * words);
    for (size_t i = 0; i < a.size(); ++i) {
      a[i] = uint32_t(int32_t(dev::hash_uniform(i, seed) * 2147483647.f));  // (|x| < 2^31: exact in int32)
      b[i] = uint32_t(int32_t(dev::hash_uniform(i, seed + 1) * 2147483647.f));
    }
    da = dev::to_device(a);
    db = dev::to_device(b);
  }
  ~Pools() {
    cudaFree(da);
    cudaFree(db);
  }
};

// The CPU's checksums: the XOR of every word of every page each stream names (a page outside
// the pools reads page 0, as the kernel does).
std::vector<uint32_t> expected(const Pools& p, const std::vector<int32_t>& table, int rows, int streams,
                               int64_t page_mult, int64_t stream_stride) {
  const int ppr = int(table.size()) / rows;
  std::vector<uint32_t> out(size_t(rows) * streams, 0);
  for (int r = 0; r < rows; ++r)
    for (int s = 0; s < streams; ++s)
      for (int j = 0; j < ppr; ++j) {
        int64_t page = int64_t(table[size_t(r) * ppr + j]) * page_mult + s * stream_stride;
        if (page < 0 || page >= p.num_pages) page = 0;
        for (int64_t w = 0; w < p.page_words; ++w) out[size_t(r) * streams + s] ^= p.a[page * p.page_words + w] ^ p.b[page * p.page_words + w];
      }
  return out;
}

// Runs one shape; true if the checksums are the CPU's. fit: the blocks per SM it reported.
bool run_and_check(const char* what, const Pools& p, const std::vector<int32_t>& table, int rows, int streams,
                   int64_t page_mult, int64_t stream_stride, int threads = 128, int unroll = 4, int per_sm = 0,
                   int* fit = nullptr) {
  int32_t* dt = dev::to_device(table);
  uint32_t* dsum = dev::to_device(std::vector<uint32_t>(size_t(rows) * streams, 12345u));  // poisoned
  const int f = read_floor::read_pages(dsum, p.da, p.db, p.page_words * 4, p.num_pages, dt, rows,
                                      int(table.size()) / rows, streams, page_mult, stream_stride, threads, unroll,
                                      per_sm, 0);
  std::vector<uint32_t> got(size_t(rows) * streams);
  CUDA_CHECK(cudaMemcpy(got.data(), dsum, got.size() * 4, cudaMemcpyDeviceToHost));
  CUDA_CHECK(cudaFree(dt));
  CUDA_CHECK(cudaFree(dsum));
  if (fit) *fit = f;
  const bool ok = got == expected(p, table, rows, streams, page_mult, stream_stride);
  std::printf("  %-64s %s\n", what, ok ? "ok" : "MISMATCH");
  return ok;
}

bool check() {
  bool ok = true;
  std::mt19937 rng(3);
  // A paged cache of 37 blocks x 4 kv heads, pages of 16 tokens x 64 dims of bf16 (2 KiB), read
  // as decode reads it (stream s of row r = kv head s of sequence r), in every shape the
  // benchmark tries; 3 pages per row is fewer 16-byte vectors than one step of the loop.
  {
    const int blocks = 37, heads = 4;
    Pools p(blocks * heads, 512, 1);
    for (int ppr : {1, 3, 17}) {
      std::vector<int32_t> table(5 * ppr);
      for (auto& t : table) t = int32_t(rng() % blocks);
      for (int threads : {128, 256})
        for (int unroll : {2, 4, 8})
          for (int per_sm : {0, 4}) {
            char what[96];
            std::snprintf(what, sizeof(what), "paged, %d pages per row, %d threads, %d in flight, %d per SM", ppr,
                          threads, unroll, per_sm);
            int fit = 0;
            ok &= run_and_check(what, p, table, 5, heads, heads, 1, threads, unroll, per_sm, &fit);
            if (fit < 1 || (per_sm > 0 && fit > per_sm)) {
              std::printf("    blocks per SM: %d (asked for %d)\n", fit, per_sm);
              ok = false;
            }
          }
    }
  }
  // The same k/v as a paged cache (shuffled blocks) and as the contiguous [B, kv_heads, L, D]
  // copy: the same checksums (the benchmark relies on it). fp16, head_dim 128: 4 KiB pages.
  {
    const int b = 3, hk = 2, nb = 5;  // 80 tokens in blocks of 16
    Pools contiguous(b * hk * nb, 1024, 4);
    Pools paged(b * nb * hk, 1024, 4);  // the same words, moved into shuffled blocks below
    std::vector<int32_t> perm(b * nb), tables(b * nb), rows(b * nb);
    for (int i = 0; i < b * nb; ++i) perm[i] = i;
    std::shuffle(perm.begin(), perm.end(), rng);
    for (int s = 0; s < b; ++s)
      for (int j = 0; j < nb; ++j) {
        tables[s * nb + j] = perm[s * nb + j];
        rows[s * nb + j] = s * hk * nb + j;
        for (int h = 0; h < hk; ++h)
          for (int w = 0; w < 1024; ++w) {  // contiguous page (s, h, j) -> paged page (block, h)
            const size_t from = (size_t(s * hk + h) * nb + j) * 1024 + w, to = (size_t(perm[s * nb + j]) * hk + h) * 1024 + w;
            paged.a[to] = contiguous.a[from];
            paged.b[to] = contiguous.b[from];
          }
      }
    CUDA_CHECK(cudaMemcpy(paged.da, paged.a.data(), paged.a.size() * 4, cudaMemcpyHostToDevice));
    CUDA_CHECK(cudaMemcpy(paged.db, paged.b.data(), paged.b.size() * 4, cudaMemcpyHostToDevice));
    ok &= run_and_check("paged layout (through the block table)", paged, tables, b, hk, hk, 1);
    ok &= run_and_check("contiguous layout (SDPA's copy)", contiguous, rows, b, hk, 1, nb);
    ok &= expected(paged, tables, b, hk, hk, 1) == expected(contiguous, rows, b, hk, 1, nb);
  }
  // 16-byte pages: one vector each.
  {
    Pools p(50, 4, 7);
    std::vector<int32_t> table(7 * 9);
    for (auto& t : table) t = int32_t(rng() % 25);
    ok &= run_and_check("16-byte pages", p, table, 7, 2, 2, 1, 256, 8, 0);
  }
  // A page outside the pools: page 0 is read instead, and the flag is raised.
  {
    Pools p(8, 512, 10);
    int flags[tinyvllm::kNumKernelErrors];
    tinyvllm::read_kernel_errors(flags, true);
    for (int bad : {8, -1, 2147483647}) {
      ok &= run_and_check(("a page outside the pools: " + std::to_string(bad)).c_str(), p, {1, bad, 2}, 1, 1, 1, 0);
      CUDA_CHECK(cudaDeviceSynchronize());
      tinyvllm::read_kernel_errors(flags, true);
      if (!flags[tinyvllm::kErrBlockTable]) {
        std::printf("    not reported\n");
        ok = false;
      }
    }
  }
  return ok;
}

int main() {
  dev::print_device();
  if (!check()) {
    std::printf("FAILED: a checksum differs from the CPU's\n");
    return 1;
  }
  // Timing: the floor of a Llama-1B paged cache (8 kv heads, blocks of 16 tokens x 64 dims of
  // bf16 = 2 KiB pages), batch 64 x 4096 tokens, blocks shuffled; every shape, and the best.
  const double copy = dev::copy_gbps();
  std::printf("\ncopy bandwidth (cudaMemcpy device to device): %.0f GB/s\n", copy);
  const int batch = 64, heads = 8, nb = 4096 / 16, blocks = batch * nb;
  const size_t pages = size_t(blocks) * heads, page_bytes = 2048;
  uint8_t *pa = nullptr, *pb = nullptr;
  CUDA_CHECK(cudaMalloc(&pa, pages * page_bytes));
  CUDA_CHECK(cudaMalloc(&pb, pages * page_bytes));
  CUDA_CHECK(cudaMemset(pa, 1, pages * page_bytes));
  CUDA_CHECK(cudaMemset(pb, 2, pages * page_bytes));
  std::vector<int32_t> table(blocks);
  for (int i = 0; i < blocks; ++i) table[i] = i;
  std::shuffle(table.begin(), table.end(), std::mt19937(5));
  int32_t* dt = dev::to_device(table);
  uint32_t* dsum = nullptr;
  CUDA_CHECK(cudaMalloc(&dsum, size_t(batch) * heads * 4));
  const double bytes = 2.0 * pages * page_bytes;
  std::printf("paged read floor, batch %d x 4096 tokens, 8 kv heads, 2 KiB pages (%.0f MB read):\n", batch, bytes / 1e6);
  double best = 1e30;
  for (int threads : {128, 256})
    for (int unroll : {2, 4, 8})
      for (int per_sm : {0, 4}) {
        int fit = 0;
        const double us = dev::median_us([&] {
          fit = read_floor::read_pages(dsum, pa, pb, page_bytes, pages, dt, batch, nb, heads, heads, 1, threads, unroll,
                                       per_sm, 0);
        });
        best = std::min(best, us);
        const double gbps = bytes / (us * 1e-6) / 1e9;
        std::printf("  %3d threads, %d in flight, %d blocks/SM: %8.1f us %7.0f GB/s %6.1f%% of copy\n", threads, unroll,
                    fit, us, gbps, 100 * gbps / copy);
      }
  std::printf("floor: %.1f us, %.0f GB/s\nPASSED\n", best, bytes / (best * 1e-6) / 1e9);
  for (void* p : {(void*)pa, (void*)pb, (void*)dt, (void*)dsum}) CUDA_CHECK(cudaFree(p));
  return 0;
}
#endif
