// rope.cuh: the rotation at the heart of RoPE, shared by rope.cu (rotate q and k in
// place) and rope_and_cache.cu (rotate, then write k and v into the paged cache, one
// launch). The math and the cos/sin layout are explained at the top of rope.cu.
#pragma once

#include "common.cuh"

namespace tinyvllm {

template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float* dst) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int j = 0; j < VEC; j += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + j);
      dst[j] = f.x, dst[j + 1] = f.y, dst[j + 2] = f.z, dst[j + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) dst[j] = p[j];
  }
}

// VEC pairs (x[i + j], x[i + half + j]) of one head: load them, rotate them by the
// angles of one position (its cos/sin row: cos_row[0 .. half), then sin), store them.
// Callers load() before they read the token's position, so the two round trips to
// memory overlap instead of running in series.
template <typename T, int VEC>
struct RopePair {
  Vec<T, VEC> x1, x2;

  __device__ __forceinline__ void load(const T* x, int i, int half) {
    x1 = load_vec<VEC>(x + i);
    x2 = load_vec<VEC>(x + half + i);
  }
  __device__ __forceinline__ void rotate(const float* cos_row, int i, int half) {
    float c[VEC], s[VEC];
    load_floats<VEC>(cos_row + i, c);
    load_floats<VEC>(cos_row + half + i, s);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const float a = to_float(x1.v[j]);
      const float b = to_float(x2.v[j]);
      x1.v[j] = from_float<T>(a * c[j] - b * s[j]);
      x2.v[j] = from_float<T>(b * c[j] + a * s[j]);
    }
  }
  __device__ __forceinline__ void store(T* x, int i, int half) const {
    store_vec<VEC>(x + i, x1);
    store_vec<VEC>(x + half + i, x2);
  }
};

}  // namespace tinyvllm
