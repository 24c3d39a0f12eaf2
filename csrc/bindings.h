// bindings.h: what the two bindings files share (torch_bindings.cpp, and the attention ops'
// attention/attention_bindings.cpp): error messages that name the argument, and the input
// checks every op runs before it turns tensors into pointers. Torch is allowed here and in
// those two files only.
#pragma once

#include <climits>

#include <string>
#include <type_traits>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "ops.h"

namespace tinyvllm {

// ---- error messages -------------------------------------------------------------
// Every message is assembled with std::to_string, never with an ostream's number
// formatting. On the GPU machine's toolchain (a newer g++ than the libstdc++ torch
// was built against), `stream << int64_t` inside this library crashed the process
// (cuda-gdb: ostream::_M_insert<long> -> codecvt::do_unshift) instead of raising.
// Strings pass through streams safely, so TV_CHECK hands TORCH_CHECK one string.
inline void append(std::string& s, const char* v) { s += v; }
inline void append(std::string& s, const std::string& v) { s += v; }
inline void append(std::string& s, c10::ScalarType v) { s += c10::toString(v); }
inline void append(std::string& s, const c10::Device& v) { s += v.str(); }
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
inline void append(std::string& s, T v) {
  s += std::to_string(v);
}
template <typename... Args>
inline std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
#define TV_CHECK(cond, ...) TORCH_CHECK(cond, ::tinyvllm::message(__VA_ARGS__))

// "[4, 2, 64]": a tensor's sizes or strides, for error messages.
inline std::string dims_str(c10::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// ---- input checks -----------------------------------------------------------------
inline DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TV_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  TV_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_cuda(t, name);
  TV_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TV_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", dims_str(t.sizes()));
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TV_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", dims_str(t.strides()), " for shape ",
           dims_str(t.sizes()));
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TV_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
           " has dtype ", ref.scalar_type());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TV_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

// Rows may be strided (stride(0) >= the row), elements inside a row must be dense.
inline void check_rows_dense(const at::Tensor& t, const char* name) {
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 1; --d) {
    TV_CHECK(t.size(d) == 1 || t.stride(d) == expected, name,
             " must be dense inside each row (only the first dimension may be strided), got strides ",
             dims_str(t.strides()), " for shape ", dims_str(t.sizes()));
    expected *= t.size(d);
  }
  TV_CHECK(t.size(0) <= 1 || t.stride(0) >= expected, name, " has overlapping rows: strides ", dims_str(t.strides()),
           " for shape ", dims_str(t.sizes()));
}

inline int64_t row_stride(const at::Tensor& t) {
  int64_t row = 1;
  for (int64_t d = 1; d < t.dim(); ++d) row *= t.size(d);
  return t.size(0) <= 1 ? row : t.stride(0);
}

// The kernels read 16 bytes at a time: a tensor they read that way must start on a 16-byte boundary.
inline bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

inline cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// The paged KV cache pair [num_blocks, num_kv_heads, block_size, head_dim], shared by
// reshape_and_cache (which writes it) and both attention ops (which read it).
inline void check_paged_caches(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& ref,
                        const char* ref_name) {
  check_same_device(key_cache, ref, "key_cache", ref_name);
  check_same_device(value_cache, ref, "value_cache", ref_name);
  check_same_dtype(key_cache, ref, "key_cache", ref_name);
  check_same_dtype(value_cache, ref, "value_cache", ref_name);
  check_dim(key_cache, 4, "key_cache");
  check_dim(value_cache, 4, "value_cache");
  TV_CHECK(value_cache.sizes() == key_cache.sizes(), "value_cache must have the shape of key_cache ",
           dims_str(key_cache.sizes()), ", got ", dims_str(value_cache.sizes()));
  // (Contiguity is checked by the callers after their shape checks, so that a cache of
  // the wrong shape is reported as such rather than as "not contiguous".)
}

}  // namespace tinyvllm
