// paged_attention_decode.cu (dev/cuda): decode attention over a paged KV cache, on the CUDA
// cores and on the tensor cores, checked and timed side by side.
//
// For each sequence (one new query token) and query head h:  out = softmax(q_h K^T / sqrt(d)) V
// over the sequence's cached keys and values, found through its block table in a cache of
// [num_blocks][kv_heads][block_size][head_dim] whose blocks are shuffled (a long-running
// server's cache), with GQA (query head h reads kv head h / group).
//
// v1  the CUDA-core kernel (csrc/attention/decode_cuda_cores.cuh) on bf16/fp16 caches: every
//     multiply an fma in float32. The product runs it on fp32 caches only; here it shows why
//     16-bit caches go to the tensor cores: the conversions and fmas per byte keep its loads
//     from being issued on time (its GB/s below v2's).
// v2  the product's op (csrc/attention/paged_attention.cu through ops.h, automatic plan):
//     the tensor-core kernel, split-K and the merge where the plan says so.
// The TMA loader (impl 2 until commit 5b713f1) is not here: dev/cuda/README.md says why and
// where to read it.
//
// Checks: every version against a CPU reference in double, on random inputs (a hash; never
// zeros), with the cache's unused blocks and the tails of the last blocks full of NaN (a read
// past a sequence's end shows). Shapes: the product tests' CUDA-core cases (groups 1, 4, 16;
// head_dim 64 and 128; bf16 and fp16; lengths 1 to 4097, split and merged), then Llama 3.2 1B
// heads (32 query, 8 kv, head_dim 64, blocks of 16 tokens) at a few batch x context sizes,
// which are also timed (median of CUDA-event times, cold L2; GB/s of the k/v bytes read, beside
// a device-to-device cudaMemcpy). Exits 1 on a mismatch.
//
//   nvcc -O3 -arch=sm_90a -std=c++20 --expt-relaxed-constexpr -I csrc dev/cuda/paged_attention_decode.cu csrc/attention/paged_attention.cu \
//     csrc/attention/decode_cuda_cores.cu csrc/attention/decode_tensor_cores.cu csrc/attention/decode_merge.cu \
//     csrc/attention/decode_plan.cpp csrc/errors.cu -o build/dev/paged_attention_decode
//   ./build/dev/paged_attention_decode
#include <numeric>
#include <random>
#include <string>

#include "attention/decode_cuda_cores.cuh"
#include "common.h"
#include "ops.h"

using namespace tinyvllm;

constexpr uint32_t kKeySeed = 11, kValueSeed = 12, kQuerySeed = 13;

template <typename T>
DType dtype_of() {
  return std::is_same<T, __half>::value ? DType::kFloat16 : DType::kBFloat16;
}

// Fills a cache [num_blocks][kv_heads][block_size][head_dim] with hash values; rows that hold
// no token (valid_rows[block] of them do) with NaN.
template <typename T>
__global__ void fill_cache(T* cache, size_t n, int row_elems, int block_elems, int block_size, const int* valid_rows,
                           uint32_t seed) {
  for (size_t e = blockIdx.x * size_t(blockDim.x) + threadIdx.x; e < n; e += size_t(gridDim.x) * blockDim.x) {
    const int row = int(e / row_elems) % block_size;
    cache[e] = row < valid_rows[e / block_elems] ? dev::from_f<T>(dev::hash_uniform(e, seed)) : dev::from_f<T>(NAN);
  }
}

struct Shape {
  std::vector<int> lens;  // one per sequence
  int num_heads, num_kv_heads, head_dim, block_size;
  bool timed;  // a Llama shape: time it, and check 3 of its sequences
};

// A batch on the GPU: the paged caches, block tables, lengths, query, output and workspaces.
template <typename T>
struct Batch {
  Shape s;
  int num_seqs = 0, width = 0, num_blocks = 0;
  std::vector<int32_t> tables, lens;
  T *k = nullptr, *v = nullptr, *q = nullptr, *out = nullptr;
  int32_t *d_tables = nullptr, *d_lens = nullptr;
  void *ws1 = nullptr, *ws2 = nullptr;
  int64_t sum = 0;

  explicit Batch(const Shape& shape) : s(shape) {
    num_seqs = int(s.lens.size());
    lens.assign(s.lens.begin(), s.lens.end());
    sum = std::accumulate(lens.begin(), lens.end(), int64_t(0));
    std::vector<int> need(num_seqs);
    for (int i = 0; i < num_seqs; ++i) need[i] = (lens[i] + s.block_size - 1) / s.block_size;
    width = std::max(1, *std::max_element(need.begin(), need.end()));
    const int used = std::accumulate(need.begin(), need.end(), 0);
    num_blocks = used + 4;  // 3 never handed out, and one the padding entries point at: all NaN
    std::vector<int> ids(num_blocks - 1);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(num_seqs + s.head_dim));
    std::vector<int> valid(num_blocks, 0);
    tables.assign(size_t(num_seqs) * width, num_blocks - 1);
    for (int i = 0, next = 0; i < num_seqs; ++i)
      for (int j = 0; j < need[i]; ++j, ++next) {
        tables[size_t(i) * width + j] = ids[next];
        valid[ids[next]] = std::min(s.block_size, lens[i] - j * s.block_size);
      }
    const int row = s.head_dim, blk = s.num_kv_heads * s.block_size * s.head_dim;
    const size_t n = size_t(num_blocks) * blk;
    int* d_valid = dev::to_device(valid);
    CUDA_CHECK(cudaMalloc(&k, n * sizeof(T)));
    CUDA_CHECK(cudaMalloc(&v, n * sizeof(T)));
    fill_cache<<<1024, 256>>>(k, n, row, blk, s.block_size, d_valid, kKeySeed);
    fill_cache<<<1024, 256>>>(v, n, row, blk, s.block_size, d_valid, kValueSeed);
    CUDA_CHECK(cudaGetLastError());
    CUDA_CHECK(cudaDeviceSynchronize());
    CUDA_CHECK(cudaFree(d_valid));
    // (scaled by 2 so that the softmax is peaked: the running max changes)
    q = dev::to_device(dev::random_vector<T>(size_t(num_seqs) * s.num_heads * s.head_dim, kQuerySeed, 2.f));
    CUDA_CHECK(cudaMalloc(&out, size_t(num_seqs) * s.num_heads * s.head_dim * sizeof(T)));
    d_tables = dev::to_device(tables);
    d_lens = dev::to_device(lens);
    const size_t ws1_bytes = size_t(num_seqs) * s.num_heads * plan_v1().num_splits * (s.head_dim + 2) * sizeof(float);
    const size_t ws2_bytes = paged_attention_decode_workspace_size(num_seqs, s.num_heads, s.num_kv_heads, s.head_dim,
                                                                   max_seq_len(), hint(), dtype_of<T>(), -1);
    CUDA_CHECK(cudaMalloc(&ws1, std::max<size_t>(ws1_bytes, 16)));
    CUDA_CHECK(cudaMalloc(&ws2, std::max<size_t>(ws2_bytes, 16)));
  }
  ~Batch() {
    for (void* p : {(void*)k, (void*)v, (void*)q, (void*)out, (void*)d_tables, (void*)d_lens, ws1, ws2}) cudaFree(p);
  }

  int max_seq_len() const { return width * s.block_size; }  // the table's capacity, as the bindings pass it
  int64_t hint() const { return s.timed ? sum : -1; }       // sum_seq_lens: given for the Llama shapes, as the engine does
  float scale() const { return 1.f / std::sqrt(float(s.head_dim)); }

  // v1's plan: the product's plan of the CUDA-core kernel (for an fp32 cache of this shape,
  // the kernel the product runs it on: the same heads per block, splits and partitions).
  decode::DecodePlan plan_v1() const {
    return decode::plan_decode(num_seqs, s.num_heads, s.num_kv_heads, s.head_dim, max_seq_len(), hint(),
                               attn::num_sms_of_current_device(), DType::kFloat32, 0);
  }

  template <int D>
  void run_v1() const {
    const decode::DecodePlan plan = plan_v1();
    const decode::DecodeParams prm = decode::make_decode_params(
        plan, out, q, k, v, d_tables, d_lens, num_seqs, s.num_heads, s.num_kv_heads, D, s.block_size, width,
        num_blocks, int64_t(s.num_heads) * D, scale(), ws1);
    decode::launch_cuda_cores<T, D>(prm, plan.gmax, num_seqs, 0);
    if (plan.num_splits > 1) decode::launch_decode_merge(prm, dtype_of<T>(), D, num_seqs, 0);
  }

  void run_v2() const {
    paged_attention_decode(out, q, k, v, d_tables, d_lens, num_seqs, s.num_heads, s.num_kv_heads, s.head_dim,
                           s.block_size, width, max_seq_len(), hint(), num_blocks, int64_t(s.num_heads) * s.head_dim,
                           scale(), ws2, dtype_of<T>(), -1, 0);
  }

  void run(int version) const {
    if (version == 1) s.head_dim == 128 ? run_v1<128>() : run_v1<64>();
    if (version == 2) run_v2();
    CUDA_CHECK(cudaGetLastError());
  }

  // The reference for sequence i, all heads [num_heads][head_dim], in double from the same
  // rounded values the GPU reads (recomputed from the hash).
  std::vector<float> reference(int i) const {
    const int H = s.num_heads, D = s.head_dim, group = H / s.num_kv_heads, len = lens[i];
    const auto qv = dev::random_vector<T>(size_t(num_seqs) * H * D, kQuerySeed, 2.f);  // (cheap next to the loop)
    std::vector<float> res(size_t(H) * D, 0.f);
    std::vector<double> p(len), acc(D);
    for (int h = 0; h < H; ++h) {
      auto at = [&](int t, int d) {  // element index of token t, dimension d, of this head's kv head
        const int blk = tables[size_t(i) * width + t / s.block_size];
        return ((size_t(blk) * s.num_kv_heads + h / group) * s.block_size + t % s.block_size) * D + d;
      };
      double mx = -1e300;
      for (int t = 0; t < len; ++t) {
        double dot = 0;
        for (int d = 0; d < D; ++d)
          dot += double(dev::to_f(qv[(size_t(i) * H + h) * D + d])) *
                 dev::to_f(dev::from_f<T>(dev::hash_uniform(at(t, d), kKeySeed)));
        p[t] = dot * scale();
        mx = std::max(mx, p[t]);
      }
      double l = 0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int t = 0; t < len; ++t) {
        p[t] = std::exp(p[t] - mx);
        l += p[t];
        for (int d = 0; d < D; ++d) acc[d] += p[t] * dev::to_f(dev::from_f<T>(dev::hash_uniform(at(t, d), kValueSeed)));
      }
      for (int d = 0; d < D; ++d) res[size_t(h) * D + d] = len > 0 ? float(acc[d] / l) : 0.f;
    }
    return res;
  }

  // The rows of these sequences in `got` against the reference.
  bool check(const char* what, const std::vector<float>& got, const std::vector<int>& seqs) const {
    const size_t row = size_t(s.num_heads) * s.head_dim;
    std::vector<float> g, want;
    for (int i : seqs) {
      const auto r = reference(i);
      want.insert(want.end(), r.begin(), r.end());
      g.insert(g.end(), got.begin() + i * row, got.begin() + (i + 1) * row);
    }
    const float tol = std::is_same<T, __half>::value ? 4e-3f : 2e-2f;
    return dev::check(what, g, want, tol, tol);
  }

  std::vector<float> output() const { return dev::to_host_float(out, size_t(num_seqs) * s.num_heads * s.head_dim); }
  void poison_output() const { CUDA_CHECK(cudaMemset(out, 0xff, size_t(num_seqs) * s.num_heads * s.head_dim * sizeof(T))); }
};

template <typename T>
std::string describe(const Shape& s) {
  const int b = int(s.lens.size());
  std::string lens = std::to_string(s.lens[0]);
  if (b > 1) lens += std::all_of(s.lens.begin(), s.lens.end(), [&](int n) { return n == s.lens[0]; }) ? "" : ",...";
  return std::string(dev::type_name<T>()) + " B=" + std::to_string(b) + " L=" + lens + " " +
         std::to_string(s.num_heads) + "/" + std::to_string(s.num_kv_heads) + "x" + std::to_string(s.head_dim);
}

// Checks v1 and v2 on one shape (every sequence, or 3 of a timed one), and v1 against v2.
// Times v1 and v2 on a timed shape. Returns false on a mismatch.
template <typename T>
bool check_and_time(const Shape& shape, double copy_gbps) {
  Batch<T> b(shape);
  std::vector<int> seqs(b.num_seqs);
  std::iota(seqs.begin(), seqs.end(), 0);
  if (shape.timed) seqs = b.num_seqs < 3 ? std::vector<int>{0} : std::vector<int>{0, b.num_seqs / 2, b.num_seqs - 1};
  bool ok = true;
  std::vector<float> got[3];
  for (int v : {1, 2}) {
    b.poison_output();  // an element a version forgets to write stays NaN
    b.run(v);
    got[v] = b.output();
    ok &= b.check(("v" + std::to_string(v) + " " + describe<T>(shape)).c_str(), got[v], seqs);
  }
  const float tol = 2 * (std::is_same<T, __half>::value ? 4e-3f : 2e-2f);  // (each is within half of it of the reference)
  ok &= dev::check("  v1 against v2 (every sequence)", got[1], got[2], tol, tol);
  if (shape.timed && ok) {
    const double bytes = 2.0 * b.sum * shape.num_kv_heads * shape.head_dim * sizeof(T) +
                         2.0 * b.num_seqs * shape.num_heads * shape.head_dim * sizeof(T);
    for (int v : {1, 2}) {
      const double us = dev::median_us([&] { b.run(v); });
      const double gbps = bytes / (us * 1e-6) / 1e9;
      std::printf("    v%d %10.1f us %8.0f GB/s %6.1f%% of copy\n", v, us, gbps, 100 * gbps / copy_gbps);
    }
  }
  return ok;
}

int main() {
  dev::print_device();
  const double copy = dev::copy_gbps();
  std::printf("copy bandwidth (cudaMemcpy device to device): %.0f GB/s\n\n", copy);
  bool ok = true;
  // The product tests' cases for the CUDA-core kernel on 16-bit caches (2 kv heads).
  const std::vector<int> ragged = {1, 15, 17, 100, 1000, 4097};
  for (int group : {1, 4, 16})
    for (int d : {64, 128}) {
      const Shape s{ragged, 2 * group, 2, d, 16, false};
      ok &= check_and_time<__nv_bfloat16>(s, copy);
      ok &= check_and_time<__half>(s, copy);
    }
  ok &= check_and_time<__nv_bfloat16>(Shape{{3, 333, 2000}, 32, 8, 64, 16, false}, copy);
  // Llama 3.2 1B heads, equal lengths: checked on 3 sequences each, and timed.
  std::printf("\nLlama 3.2 1B heads, bf16, blocks of 16 tokens, shuffled (v1 CUDA cores, v2 the product):\n");
  for (const auto& bl : {std::pair{1, 4096}, {8, 4096}, {64, 1024}, {64, 4096}, {256, 1024}, {256, 4096}})
    ok &= check_and_time<__nv_bfloat16>(Shape{std::vector<int>(bl.first, bl.second), 32, 8, 64, 16, true}, copy);
  std::printf(ok ? "PASSED\n" : "FAILED: a version does not match the reference\n");
  return ok ? 0 : 1;
}
