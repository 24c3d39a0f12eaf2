// skinny_gemm.cu (dev/cuda): y[M, N] = x[M, K] @ W[N, K]^T for decode (M = 1..16), four ways,
// checked against a CPU reference and timed beside cuBLAS and a device-to-device copy.
//
// v1  CUDA cores, one warp per output column, scalar loads: lane l reads W[n][l], W[n][l+32],
//     ... (2 bytes per instruction) and the same k of every x row; a warp shuffle sums the
//     lanes. Every weight byte is read once, but each load moves 2 bytes: far too few bytes
//     in flight to fill the memory system.
// v2  v1 with 16-byte loads (8 bf16 per lane per instruction): 8x the bytes per load. Fast at
//     M = 1; from M of about 8 the CUDA cores cannot keep up (M fp32 multiply-adds per weight).
// v3  the tensor cores (csrc/gemm/skinny_gemm.cuh): one warp owns 16 columns and all M rows and
//     feeds mma.sync straight from its 16-byte loads, but walks the whole of K alone. N / 16
//     warps: for N = 2048 that is 128 warps on 132 SMs, one warp's loads in flight per SM.
// v4  the product (csrc/gemm/skinny_gemm.cu, through ops.h): v3 with K split among the 4-16
//     warps of a block (partial sums meet in shared memory), the warps per block chosen so
//     that every block runs in the first wave.
// Then v4's kernel with other unroll factors (k steps whose loads a warp issues together) and
// other fixed warps per block, to show whether the product's choices (unroll 4, the plan's
// warps) are the fast ones. (Unroll 8 at M > 8 spills registers: 512-thread blocks get 128.)
// Every version is checked at every Llama-3.2-1B and SmolLM2-135M linear shape, several M,
// and odd tails (N not a multiple of 16, K not a multiple of 32, strided x) against a CPU
// reference in double on random bf16 inputs (sampled columns where N is large), then timed
// (median of CUDA-event times, cold L2) in GB/s of the bytes it must move (W, x and y once).
//
//   python dev/cuda/build.py skinny_gemm && ./build/dev/skinny_gemm
#include <cublas_v2.h>

#include <string>

#include "common.h"
#include "gemm/skinny_gemm.cuh"
#include "ops.h"

using bf16 = __nv_bfloat16;
namespace gemm = tinyvllm::gemm;

// ---- inputs: filled on the GPU from the hash, so the host reads the same values --------
__global__ void fill_kernel(bf16* p, size_t n, uint32_t seed, float scale) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x)
    p[i] = dev::from_f<bf16>(scale * dev::hash_uniform(i, seed));
}
float value(size_t i, uint32_t seed, float scale) { return dev::to_f(dev::from_f<bf16>(scale * dev::hash_uniform(i, seed))); }

bf16* device_random(size_t n, uint32_t seed, float scale) {
  bf16* p = nullptr;
  CUDA_CHECK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(bf16)));
  fill_kernel<<<1024, 256>>>(p, n, seed, scale);
  CUDA_CHECK(cudaGetLastError());
  return p;
}

// ---- v1 and v2: CUDA cores, one warp per output column ------------------------------------
constexpr int kWarpsPerBlock = 8;

__global__ void v1_scalar(bf16* y, const bf16* x, const bf16* w, int m, int n, int k, int64_t ldx) {
  const int col = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (col >= n) return;
  float acc[gemm::kMaxRows] = {};
  const bf16* wr = w + int64_t(col) * k;
  for (int i = lane; i < k; i += 32) {
    const float wv = dev::to_f(wr[i]);
#pragma unroll
    for (int r = 0; r < gemm::kMaxRows; ++r)
      if (r < m) acc[r] += wv * dev::to_f(x[r * ldx + i]);
  }
#pragma unroll
  for (int r = 0; r < gemm::kMaxRows; ++r) {
    if (r >= m) break;
    const float s = tinyvllm::warp_reduce_sum(acc[r]);
    if (lane == 0) y[int64_t(r) * n + col] = dev::from_f<bf16>(s);
  }
}

__global__ void v2_vector(bf16* y, const bf16* x, const bf16* w, int m, int n, int k, int64_t ldx) {
  const int col = blockIdx.x * kWarpsPerBlock + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (col >= n) return;
  float acc[gemm::kMaxRows] = {};
  const bf16* wr = w + int64_t(col) * k;
  for (int i = lane * 8; i < k; i += 32 * 8) {  // K % 8 == 0
    float wf[8], xf[8];
    tinyvllm::attn::Vec16<bf16>::to_float(*reinterpret_cast<const uint4*>(wr + i), wf);
#pragma unroll
    for (int r = 0; r < gemm::kMaxRows; ++r) {
      if (r < m) {
        tinyvllm::attn::Vec16<bf16>::to_float(*reinterpret_cast<const uint4*>(x + r * ldx + i), xf);
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[r] += wf[j] * xf[j];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < gemm::kMaxRows; ++r) {
    if (r >= m) break;
    const float s = tinyvllm::warp_reduce_sum(acc[r]);
    if (lane == 0) y[int64_t(r) * n + col] = dev::from_f<bf16>(s);
  }
}

// ---- running a version ---------------------------------------------------------------------
struct Problem {
  int m, n, k;
  int64_t ldx;  // x's row stride (>= k)
  bf16 *x, *w, *y;
};

cublasHandle_t cublas() {
  static cublasHandle_t h = [] {
    cublasHandle_t handle;
    if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) throw std::runtime_error("cublasCreate failed");
    return handle;
  }();
  return h;
}

// The kernel of v3/v4 with explicit unroll (k steps per load batch) and warps per block
// (0: the product's plan).
template <int kUnroll>
void run_tensor_cores(const Problem& p, int warps) {
  if (p.m <= 8) {
    const int wp = warps ? warps : gemm::plan_warps<bf16, 1, kUnroll>(p.n, p.k, tinyvllm::attn::num_sms_of_current_device());
    gemm::launch_skinny_gemm<bf16, 1, kUnroll>(p.y, p.x, p.w, p.m, p.n, p.k, p.ldx, wp, 0);
  } else {
    const int wp = warps ? warps : gemm::plan_warps<bf16, 2, kUnroll>(p.n, p.k, tinyvllm::attn::num_sms_of_current_device());
    gemm::launch_skinny_gemm<bf16, 2, kUnroll>(p.y, p.x, p.w, p.m, p.n, p.k, p.ldx, wp, 0);
  }
}

// v: 1..4 the versions; 0 cuBLAS (the product's wrapper, gemm.cpp); 10 + u: v4's kernel with
// unroll u; 100 + w: v4's kernel with w warps per block.
void run(int v, const Problem& p) {
  const unsigned col_blocks = unsigned((p.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  switch (v) {
    case 0:  // cuBLAS needs a contiguous x
      tinyvllm::gemm_xwt(p.y, p.x, p.w, p.m, p.n, p.k, tinyvllm::DType::kBFloat16, cublas(), 0);
      break;
    case 1: v1_scalar<<<col_blocks, 32 * kWarpsPerBlock>>>(p.y, p.x, p.w, p.m, p.n, p.k, p.ldx); break;
    case 2: v2_vector<<<col_blocks, 32 * kWarpsPerBlock>>>(p.y, p.x, p.w, p.m, p.n, p.k, p.ldx); break;
    case 3: run_tensor_cores<4>(p, 1); break;
    case 4: tinyvllm::skinny_gemm(p.y, p.x, p.w, p.m, p.n, p.k, p.ldx, tinyvllm::DType::kBFloat16, 0); break;
    case 11: run_tensor_cores<1>(p, 0); break;
    case 12: run_tensor_cores<2>(p, 0); break;
    case 14: run_tensor_cores<4>(p, 0); break;
    case 18: run_tensor_cores<8>(p, 0); break;
    default: run_tensor_cores<4>(p, v - 100); break;
  }
  CUDA_CHECK(cudaGetLastError());
}

std::string name(int v) {
  if (v == 0) return "cuBLAS";
  if (v < 10) return "v" + std::to_string(v);
  if (v < 100) return "v4 unroll " + std::to_string(v - 10);
  return "v4 " + std::to_string(v - 100) + " warps";
}

// ---- the check -------------------------------------------------------------------------------
// Reference for the sampled columns (every column where N <= 4096, else 512 spread over N and the
// last 16), all M rows, in double from the same bf16 values. Returns false on a mismatch.
bool check_shape(const char* label, int m, int n, int k, int64_t ldx, const std::vector<int>& versions) {
  const uint32_t sx = 11 + m, sw = 29 + n;
  const float wscale = 1.f / std::sqrt(float(std::max(k, 1)));
  Problem p{m, n, k, ldx, device_random(size_t(m) * ldx, sx, 1.f), device_random(size_t(n) * k, sw, wscale), nullptr};
  CUDA_CHECK(cudaMalloc(&p.y, size_t(m) * n * sizeof(bf16)));
  std::vector<int> cols;
  if (n <= 4096) {
    for (int c = 0; c < n; ++c) cols.push_back(c);
  } else {
    for (int i = 0; i < 512; ++i) cols.push_back(int(int64_t(i) * (n - 16) / 512));
    for (int c = n - 16; c < n; ++c) cols.push_back(c);
  }
  std::vector<float> want(size_t(m) * cols.size());
  std::vector<float> xv(size_t(m) * k), wrow(k);
  for (int r = 0; r < m; ++r)
    for (int i = 0; i < k; ++i) xv[size_t(r) * k + i] = value(size_t(r) * ldx + i, sx, 1.f);
  for (size_t j = 0; j < cols.size(); ++j) {
    for (int i = 0; i < k; ++i) wrow[i] = value(size_t(cols[j]) * k + i, sw, wscale);
    for (int r = 0; r < m; ++r) {
      double s = 0;
      for (int i = 0; i < k; ++i) s += double(xv[size_t(r) * k + i]) * wrow[i];
      want[size_t(r) * cols.size() + j] = float(s);
    }
  }
  bool ok = true;
  for (int v : versions) {
    if (v == 0 && (ldx != k || k == 0)) continue;  // (the cuBLAS wrapper takes a contiguous x, and K > 0)
    CUDA_CHECK(cudaMemset(p.y, 0xff, size_t(m) * n * sizeof(bf16)));  // NaN: a forgotten output fails
    run(v, p);
    const std::vector<float> all = dev::to_host_float(p.y, size_t(m) * n);
    std::vector<float> got(want.size());
    for (int r = 0; r < m; ++r)
      for (size_t j = 0; j < cols.size(); ++j) got[r * cols.size() + j] = all[size_t(r) * n + cols[j]];
    char what[160];
    std::snprintf(what, sizeof(what), "%-12s %-9s M=%-2d N=%-6d K=%-5d%s", name(v).c_str(), label, m, n, k,
                  ldx != k ? " (strided x)" : "");
    ok &= dev::check(what, got, want, 2e-3f, 1.6e-2f);
  }
  for (bf16* q : {p.x, p.w, p.y}) CUDA_CHECK(cudaFree(q));
  return ok;
}

struct Shape {
  const char* name;
  int n, k;
};
// Llama-3.2-1B: hidden 2048, 32 q / 8 kv heads of 64, FFN 8192 (gate and up fused), vocab 128256.
const Shape kLlama1B[] = {{"qkv", 3072, 2048}, {"o", 2048, 2048}, {"gate_up", 16384, 2048},
                          {"down", 2048, 8192}, {"lm_head", 128256, 2048}};
// SmolLM2-135M: hidden 576, 9 q / 3 kv heads of 64, FFN 1536, vocab 49152.
const Shape kSmolLM2[] = {{"s.qkv", 960, 576}, {"s.o", 576, 576}, {"s.gate_up", 3072, 576},
                          {"s.down", 576, 1536}, {"s.lm_head", 49152, 576}};

int main() {
  dev::print_device();
  std::printf("checks (CPU reference in double; sampled columns where N > 4096):\n");
  bool ok = true;
  const std::vector<int> all = {1, 2, 3, 4, 0, 12, 18, 104};
  for (const auto* shapes : {kLlama1B, kSmolLM2})
    for (int i = 0; i < 5; ++i)
      for (int m : {1, 5, 8, 9, 16}) ok &= check_shape(shapes[i].name, m, shapes[i].n, shapes[i].k, shapes[i].k, all);
  // Tails: N not a multiple of 16 (and below 16), K not a multiple of 32 (and 8), K = 0, strided x.
  for (const auto& t : {Shape{"tail", 17, 40}, Shape{"tail", 1, 8}, Shape{"tail", 1000, 584}, Shape{"tail", 33, 0},
                        Shape{"tail", 7, 2056}})
    for (int m : {1, 3, 12}) ok &= check_shape(t.name, m, t.n, t.k, t.k, all);
  for (int m : {2, 16}) ok &= check_shape("strided", m, 3000, 2048, 2048 + 64, all);
  if (!ok) {
    std::printf("FAILED: a version does not match the reference\n");
    return 1;
  }

  const double copy = dev::copy_gbps();
  std::printf("\ncopy bandwidth (cudaMemcpy device to device): %.0f GB/s\n", copy);
  std::printf("time in us; GB/s and %% of copy for v4 (the product) and cuBLAS; bytes = W + x + y once\n");
  std::printf("%-10s %3s %7s %7s %7s %7s %7s %8s %8s %8s %8s %8s\n", "linear", "M", "v1", "v2", "v3", "v4",
              "cuBLAS", "v4 GB/s", "v4 %copy", "cuBLAS", "cuBLAS", "speedup");
  std::printf("%-10s %3s %7s %7s %7s %7s %7s %8s %8s %8s %8s %8s\n", "", "", "us", "us", "us", "us", "us", "", "",
              "GB/s", "%copy", "vs cuBLAS");
  for (const auto* shapes : {kLlama1B, kSmolLM2}) {
    for (int i = 0; i < 5; ++i) {
      const Shape s = shapes[i];
      Problem p{0, s.n, s.k, s.k, device_random(size_t(gemm::kMaxRows) * s.k, 3, 1.f),
                device_random(size_t(s.n) * s.k, 4, 0.02f), nullptr};
      CUDA_CHECK(cudaMalloc(&p.y, size_t(gemm::kMaxRows) * s.n * sizeof(bf16)));
      for (int m : shapes == kLlama1B ? std::vector<int>{1, 2, 4, 8, 16} : std::vector<int>{1, 8}) {
        p.m = m;
        const double bytes = (double(s.n) * s.k + double(m) * s.k + double(m) * s.n) * sizeof(bf16);
        double us[5];
        for (int v : {1, 2, 3, 4, 0}) us[v] = dev::median_us([&] { run(v, p); });
        const double g4 = bytes / (us[4] * 1e-6) / 1e9, g0 = bytes / (us[0] * 1e-6) / 1e9;
        std::printf("%-10s %3d %7.1f %7.1f %7.1f %7.1f %7.1f %8.0f %7.1f%% %8.0f %7.1f%% %8.2fx\n", s.name, m,
                    us[1], us[2], us[3], us[4], us[0], g4, 100 * g4 / copy, g0, 100 * g0 / copy, us[0] / us[4]);
      }
      for (bf16* q : {p.x, p.w, p.y}) CUDA_CHECK(cudaFree(q));
    }
  }

  std::printf("\nthe product's choices: v4's kernel with other unroll factors (plan's warps) and other warps "
              "per block (unroll 4); time in us\n");
  std::printf("%-10s %3s %8s %8s %8s %8s %8s %8s %8s %8s\n", "linear", "M", "unroll 1", "unroll 2", "unroll 4",
              "unroll 8", "4 warps", "8 warps", "16 warps", "plan");
  for (const Shape& s : kLlama1B) {
    Problem p{0, s.n, s.k, s.k, device_random(size_t(gemm::kMaxRows) * s.k, 3, 1.f),
              device_random(size_t(s.n) * s.k, 4, 0.02f), nullptr};
    CUDA_CHECK(cudaMalloc(&p.y, size_t(gemm::kMaxRows) * s.n * sizeof(bf16)));
    for (int m : {1, 8, 16}) {
      p.m = m;
      std::printf("%-10s %3d", s.name, m);
      for (int v : {11, 12, 14, 18, 104, 108, 116}) std::printf(" %8.1f", dev::median_us([&] { run(v, p); }));
      const int sms = tinyvllm::attn::num_sms_of_current_device();
      std::printf(" %5d w\n", m <= 8 ? gemm::plan_warps<bf16, 1, 4>(s.n, s.k, sms) : gemm::plan_warps<bf16, 2, 4>(s.n, s.k, sms));
    }
    for (bf16* q : {p.x, p.w, p.y}) CUDA_CHECK(cudaFree(q));
  }
  std::printf("PASSED\n");
  return 0;
}
