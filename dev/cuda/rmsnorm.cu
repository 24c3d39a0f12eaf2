// rmsnorm.cu (dev/cuda): two ways to reduce a row, checked and timed side by side.
//
//   out[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * weight        (rms_norm)
//   residual += x;  x = rms_norm(residual) * weight                   (fused_add_rms_norm)
//
// v1  the shared-memory tree (csrc/rmsnorm_tree.cuh): one block per row, scalar loads, a
//     partial sum per thread halved in shared memory with a barrier per round, the row
//     read twice. The textbook parallel reduction; the product keeps it for rows too long
//     for v2's registers.
// v2  the product's kernel (csrc/rmsnorm.cu, through ops.h): 16-byte loads all issued at
//     once, the row held in registers (read once), warp shuffles and one barrier.
// Both are checked against a CPU reference in double on random bf16 inputs, then timed
// (median of CUDA-event times, cold L2) in GB/s of the bytes each must move, beside a
// device-to-device cudaMemcpy.
//
//   nvcc -O3 -arch=sm_90a -I csrc dev/cuda/rmsnorm.cu csrc/rmsnorm.cu -o build/dev/rmsnorm
//   ./build/dev/rmsnorm
#include "common.h"
#include "ops.h"
#include "rmsnorm_tree.cuh"

using bf16 = __nv_bfloat16;
constexpr float kEps = 1e-5f;

// The reference: rms_norm of x (or of x + residual, rounded to bf16 like the stored value).
void reference(const std::vector<bf16>& x, const std::vector<bf16>& res, const std::vector<bf16>& w, int tokens,
               int hidden, bool fused, std::vector<float>& out, std::vector<float>& res_out) {
  out.assign(size_t(tokens) * hidden, 0.f);
  res_out.assign(fused ? out.size() : 0, 0.f);
  std::vector<float> row(hidden);
  for (int t = 0; t < tokens; ++t) {
    double ss = 0;
    for (int i = 0; i < hidden; ++i) {
      const size_t k = size_t(t) * hidden + i;
      row[i] = fused ? dev::to_f(dev::from_f<bf16>(dev::to_f(x[k]) + dev::to_f(res[k]))) : dev::to_f(x[k]);
      if (fused) res_out[k] = row[i];
      ss += double(row[i]) * row[i];
    }
    const double inv = 1.0 / std::sqrt(ss / hidden + kEps);
    for (int i = 0; i < hidden; ++i) out[size_t(t) * hidden + i] = float(row[i] * inv * dev::to_f(w[i]));
  }
}

struct Buffers {
  bf16 *x, *res, *w, *out;
};

// Version v (1 tree, 2 product) of rms_norm or fused_add_rms_norm on the device buffers.
void run(int v, bool fused, const Buffers& b, int tokens, int hidden) {
  using tinyvllm::DType;
  if (v == 1 && fused) tinyvllm::launch_rms_norm_tree<bf16, true>(nullptr, b.x, b.res, b.w, tokens, hidden, hidden, kEps, 0);
  if (v == 1 && !fused) tinyvllm::launch_rms_norm_tree<bf16, false>(b.out, b.x, nullptr, b.w, tokens, hidden, hidden, kEps, 0);
  if (v == 2 && fused) tinyvllm::fused_add_rms_norm(b.x, b.res, b.w, tokens, hidden, kEps, DType::kBFloat16, 0);
  if (v == 2 && !fused) tinyvllm::rms_norm(b.out, b.x, b.w, tokens, hidden, hidden, kEps, DType::kBFloat16, 0);
  CUDA_CHECK(cudaGetLastError());
}

// Checks both versions of both ops at one shape; returns false on a mismatch.
bool check_shape(int tokens, int hidden, uint32_t seed) {
  const size_t n = size_t(tokens) * hidden;
  const auto x = dev::random_vector<bf16>(n, seed, 2.f), res = dev::random_vector<bf16>(n, seed + 1, 3.f);
  auto w = dev::random_vector<bf16>(hidden, seed + 2, 0.2f);
  for (auto& wi : w) wi = dev::from_f<bf16>(1.f + dev::to_f(wi));
  bool ok = true;
  for (bool fused : {false, true}) {
    std::vector<float> want, want_res;
    reference(x, res, w, tokens, hidden, fused, want, want_res);
    for (int v : {1, 2}) {
      Buffers b{dev::to_device(x), dev::to_device(res), dev::to_device(w), dev::to_device(std::vector<bf16>(n))};
      run(v, fused, b, tokens, hidden);
      char what[128];
      std::snprintf(what, sizeof(what), "v%d %s %d x %d", v, fused ? "fused_add_rms_norm" : "rms_norm", tokens, hidden);
      ok &= dev::check(what, dev::to_host_float(fused ? b.x : b.out, n), want, 1e-3f, 1.6e-2f);
      if (fused) ok &= dev::check("  (its residual)", dev::to_host_float(b.res, n), want_res, 1e-3f, 1.6e-2f);
      for (bf16* p : {b.x, b.res, b.w, b.out}) CUDA_CHECK(cudaFree(p));
    }
  }
  return ok;
}

int main() {
  dev::print_device();
  bool ok = true;
  // Llama-1B's hidden size, a wider one, one that is no multiple of 8 (scalar loads), and rows
  // too long for v2's registers (v2 then runs v1's kernel too).
  for (const auto& th : {std::pair{7, 2048}, {128, 4096}, {5, 999}, {3, 2049}, {2, 16392}})
    ok &= check_shape(th.first, th.second, th.first * th.second);
  if (!ok) {
    std::printf("FAILED: a version does not match the reference\n");
    return 1;
  }

  const double copy = dev::copy_gbps();
  std::printf("\ncopy bandwidth (cudaMemcpy device to device): %.0f GB/s\n", copy);
  std::printf("%-36s %10s %10s %8s\n", "version, op, tokens x hidden", "us", "GB/s", "% copy");
  for (const auto& th : {std::pair{16384, 2048}, {16384, 4096}, {256, 2048}}) {
    const int t = th.first, h = th.second;
    const size_t n = size_t(t) * h;
    Buffers b{dev::to_device(dev::random_vector<bf16>(n, 1)), dev::to_device(dev::random_vector<bf16>(n, 2)),
              dev::to_device(dev::random_vector<bf16>(h, 3)), dev::to_device(std::vector<bf16>(n))};
    for (bool fused : {false, true}) {
      // Bytes each op must move: rms_norm reads x and writes out; fused reads x and the
      // residual and writes both (plus the weight, once).
      const double bytes = (fused ? 4.0 : 2.0) * n * sizeof(bf16) + h * sizeof(bf16);
      for (int v : {1, 2}) {
        // (fused runs in place: each repetition normalises the previous one's output, which
        // changes no byte count.)
        const double us = dev::median_us([&] { run(v, fused, b, t, h); });
        const double gbps = bytes / (us * 1e-6) / 1e9;
        char what[64];
        std::snprintf(what, sizeof(what), "v%d %s %d x %d", v, fused ? "fused" : "rms_norm", t, h);
        std::printf("%-36s %10.1f %10.0f %7.1f%%\n", what, us, gbps, 100 * gbps / copy);
      }
    }
    for (bf16* p : {b.x, b.res, b.w, b.out}) CUDA_CHECK(cudaFree(p));
  }
  std::printf("PASSED\n");
  return 0;
}
