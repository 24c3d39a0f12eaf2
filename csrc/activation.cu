// activation.cu: silu_and_mul, the gate of Llama's SwiGLU feed-forward network.
//
// Llama's MLP is   down( silu(gate(x)) * up(x) ).   tinyvllm fuses the gate and up
// projections into ONE GEMM whose output row is [gate | up], 2d values wide
// (d = intermediate_size, 8192 for Llama 3.2 1B). This kernel turns that row into
// the d values fed to the down projection:
//
//     out[t, i] = silu(x[t, i]) * x[t, d + i],      silu(g) = g * sigmoid(g) = g / (1 + e^-g)
//
// Unfused, torch would run silu (read 2 bytes, write 2), then mul (read 4, write 2):
// 10 bytes of traffic per output for 6 in the fused kernel. The math (one exp,
// a divide, two multiplies) is nothing next to the memory traffic, so again the
// speed limit is bandwidth.
//
// Shape: a 2-D grid. blockIdx.x is the token, blockIdx.y a chunk of the d outputs,
// so a single decode token still spreads over several blocks (and SMs) and a big
// prefill batch simply gets more blocks. Each thread handles VEC consecutive
// outputs with 16-byte loads of gate and up and a 16-byte store.
//
// Measured (H200, bf16, d = 8192): the copy rate minus a fixed ~6 us of the
// benchmark's cold-cache setup at every size (88 % of copy bandwidth at T = 4096,
// 94 % at T = 8192). Giving each thread 2, 4 or 8 vectors instead of one changed
// nothing: with 16-byte accesses and a full GPU of 256-thread blocks there are
// already enough bytes in flight, so the simplest shape stays.
//
// Run: tests/test_kernels.py -k silu, python bench/bench_kernels.py --only silu.
#include "common.cuh"

namespace tinyvllm {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float silu(float g) { return g / (1.0f + expf(-g)); }

template <typename T, int VEC>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ x, int64_t d) {
  allow_dependent_launch();  // the down GEMM may start loading its weights (it waits for our output)
  const int64_t token = blockIdx.x;
  const T* gate = x + token * 2 * d;
  const T* up = gate + d;
  T* o = out + token * d;
  for (int64_t i = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC; i < d;
       i += static_cast<int64_t>(gridDim.y) * blockDim.x * VEC) {
    const Vec<T, VEC> g = load_vec<VEC>(gate + i);
    const Vec<T, VEC> u = load_vec<VEC>(up + i);
    Vec<T, VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[j] = from_float<T>(silu(to_float(g.v[j])) * to_float(u.v[j]));
    store_vec<VEC>(o + i, r);
  }
}

template <typename T, int VEC>
void launch(T* out, const T* x, int64_t num_tokens, int64_t d, cudaStream_t stream) {
  const int64_t chunks = ceil_div<int64_t>(d, static_cast<int64_t>(kThreads) * VEC);
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(chunks < 65535 ? chunks : 65535));
  silu_and_mul_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(out, x, d);
}

}  // namespace

void silu_and_mul(void* out, const void* x, int64_t num_tokens, int64_t d, DType dtype, cudaStream_t stream) {
  if (num_tokens == 0 || d == 0) return;
  TINYVLLM_DISPATCH(dtype, T, {
    constexpr int V = kVec16<T>;
    // d % V == 0 keeps the `up` half and every row 16-byte aligned too.
    const bool vec_ok = d % V == 0 && is_aligned16(out) && is_aligned16(x);
    if (vec_ok) {
      launch<T, V>(static_cast<T*>(out), static_cast<const T*>(x), num_tokens, d, stream);
    } else {
      launch<T, 1>(static_cast<T*>(out), static_cast<const T*>(x), num_tokens, d, stream);
    }
  });
  CUDA_CHECK(cudaGetLastError());
}

}  // namespace tinyvllm
