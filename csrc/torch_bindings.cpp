// torch_bindings.cpp: the ONE file that knows about torch.
//
// For every op it (1) checks each input tensor, so that a wrong device, dtype,
// shape or layout becomes a Python RuntimeError naming the argument instead of a
// kernel reading garbage or faulting; (2) turns tensors into raw pointers, sizes
// and strides; (3) calls the plain-C++ launcher from ops.h on torch's current CUDA
// stream, under a guard that makes the tensors' GPU the current device.
//
// The ops are registered with the PyTorch dispatcher (TORCH_LIBRARY) under the
// namespace `tinyvllm`, so Python calls them as torch.ops.tinyvllm.<name>. A schema
// marks each tensor the op writes in place with `Tensor!`: that is what lets
// torch.compile, CUDA graphs and torch.library.opcheck reason about the op.
//
// Importing the Python module `tinyvllm._C` loads this library, which runs the
// registrations; the module itself holds one plain function, decode_plan (see the end
// of the file). Loading
// works without a GPU: nothing here touches CUDA until an op is called.
#include <Python.h>

#include <climits>

#include <string>
#include <type_traits>
#include <vector>

#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops.h"

namespace tinyvllm {
namespace {

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
std::string message(const Args&... args) {
  std::string s;
  (append(s, args), ...);
  return s;
}
#define TV_CHECK(cond, ...) TORCH_CHECK(cond, ::tinyvllm::message(__VA_ARGS__))

// "[4, 2, 64]": a tensor's sizes or strides, for error messages.
std::string dims_str(c10::IntArrayRef dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
  return s + "]";
}

// ---- input checks -----------------------------------------------------------------
DType dtype_of(const at::Tensor& t, const char* name) {
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

void check_cuda(const at::Tensor& t, const char* name) {
  TV_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  check_cuda(t, name);
  TV_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TV_CHECK(t.dim() == dim, name, " must have ", dim, " dimensions, got shape ", dims_str(t.sizes()));
}

void check_contiguous(const at::Tensor& t, const char* name) {
  TV_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", dims_str(t.strides()), " for shape ",
           dims_str(t.sizes()));
}

void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TV_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
           " has dtype ", ref.scalar_type());
}

void check_dtype(const at::Tensor& t, at::ScalarType want, const char* name) {
  TV_CHECK(t.scalar_type() == want, name, " must be ", want, ", got ", t.scalar_type());
}

// Rows may be strided (stride(0) >= the row), elements inside a row must be dense.
void check_rows_dense(const at::Tensor& t, const char* name) {
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

int64_t row_stride(const at::Tensor& t) {
  int64_t row = 1;
  for (int64_t d = 1; d < t.dim(); ++d) row *= t.size(d);
  return t.size(0) <= 1 ? row : t.stride(0);
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// ---- rmsnorm.cu -----------------------------------------------------------------
void rms_norm_op(at::Tensor& out, const at::Tensor& input, const at::Tensor& weight, double epsilon) {
  check_cuda(input, "input");
  const DType dtype = dtype_of(input, "input");
  check_same_device(out, input, "out", "input");
  check_same_device(weight, input, "weight", "input");
  check_same_dtype(out, input, "out", "input");
  check_same_dtype(weight, input, "weight", "input");
  check_dim(input, 2, "input");
  check_dim(out, 2, "out");
  check_dim(weight, 1, "weight");
  TV_CHECK(out.sizes() == input.sizes(), "out must have the shape of input ", dims_str(input.sizes()), ", got ",
           dims_str(out.sizes()));
  TV_CHECK(weight.size(0) == input.size(1), "weight must have shape [hidden] = [", input.size(1), "], got ",
           dims_str(weight.sizes()));
  check_rows_dense(input, "input");
  check_contiguous(out, "out");
  check_contiguous(weight, "weight");
  const c10::cuda::CUDAGuard guard(input.device());
  rms_norm(out.data_ptr(), input.data_ptr(), weight.data_ptr(), input.size(0), input.size(1), row_stride(input),
           static_cast<float>(epsilon), dtype, current_stream());
}

void fused_add_rms_norm_op(at::Tensor& input, at::Tensor& residual, const at::Tensor& weight, double epsilon) {
  check_cuda(input, "input");
  const DType dtype = dtype_of(input, "input");
  check_same_device(residual, input, "residual", "input");
  check_same_device(weight, input, "weight", "input");
  check_same_dtype(residual, input, "residual", "input");
  check_same_dtype(weight, input, "weight", "input");
  check_dim(input, 2, "input");
  check_dim(residual, 2, "residual");
  check_dim(weight, 1, "weight");
  TV_CHECK(residual.sizes() == input.sizes(), "residual must have the shape of input ", dims_str(input.sizes()),
           ", got ", dims_str(residual.sizes()));
  TV_CHECK(weight.size(0) == input.size(1), "weight must have shape [hidden] = [", input.size(1), "], got ",
           dims_str(weight.sizes()));
  check_contiguous(input, "input");
  check_contiguous(residual, "residual");
  check_contiguous(weight, "weight");
  const c10::cuda::CUDAGuard guard(input.device());
  fused_add_rms_norm(input.data_ptr(), residual.data_ptr(), weight.data_ptr(), input.size(0), input.size(1),
                     static_cast<float>(epsilon), dtype, current_stream());
}

// ---- rope.cu ------------------------------------------------------------------------
// The checks of rotary_embedding's arguments (shared with rotary_embedding_and_cache).
// Returns rot_dim.
int64_t check_rope_args(const at::Tensor& positions, const at::Tensor& query, const at::Tensor& key,
                        int64_t head_size, const at::Tensor& cos_sin_cache) {
  check_cuda(query, "query");
  dtype_of(query, "query");
  check_same_device(key, query, "key", "query");
  check_same_device(positions, query, "positions", "query");
  check_same_device(cos_sin_cache, query, "cos_sin_cache", "query");
  check_same_dtype(key, query, "key", "query");
  check_dtype(positions, at::kLong, "positions");
  check_dtype(cos_sin_cache, at::kFloat, "cos_sin_cache");
  check_dim(query, 3, "query");
  check_dim(key, 3, "key");
  check_dim(positions, 1, "positions");
  check_dim(cos_sin_cache, 2, "cos_sin_cache");
  const int64_t num_tokens = query.size(0);
  TV_CHECK(positions.size(0) == num_tokens, "positions must have shape [num_tokens] = [", num_tokens,
           "], got ", dims_str(positions.sizes()));
  TV_CHECK(key.size(0) == num_tokens, "key must have ", num_tokens, " tokens like query, got shape ",
           dims_str(key.sizes()));
  TV_CHECK(query.size(2) == head_size, "query must have head_size ", head_size, " as its last dimension, got ",
           dims_str(query.sizes()));
  TV_CHECK(key.size(2) == head_size, "key must have head_size ", head_size, " as its last dimension, got ",
           dims_str(key.sizes()));
  const int64_t rot_dim = cos_sin_cache.size(1);
  TV_CHECK(rot_dim > 0 && rot_dim % 2 == 0 && rot_dim <= head_size,
           "cos_sin_cache must have shape [max_position, rot_dim] with rot_dim even and <= head_size (",
           head_size, "), got ", dims_str(cos_sin_cache.sizes()));
  check_rows_dense(query, "query");
  check_rows_dense(key, "key");
  check_contiguous(positions, "positions");
  check_contiguous(cos_sin_cache, "cos_sin_cache");
  TV_CHECK(query.size(1) + key.size(1) <= INT_MAX && head_size <= INT_MAX, "query/key have too many heads");
  return rot_dim;
}

void rotary_embedding_op(const at::Tensor& positions, at::Tensor& query, at::Tensor& key, int64_t head_size,
                         const at::Tensor& cos_sin_cache) {
  const int64_t rot_dim = check_rope_args(positions, query, key, head_size, cos_sin_cache);
  const int64_t num_tokens = query.size(0);
  const DType dtype = dtype_of(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  rotary_embedding(positions.data_ptr<int64_t>(), query.data_ptr(), key.data_ptr(),
                   cos_sin_cache.data_ptr<float>(), num_tokens, static_cast<int>(query.size(1)),
                   static_cast<int>(key.size(1)), static_cast<int>(head_size), static_cast<int>(rot_dim),
                   cos_sin_cache.size(0), row_stride(query), row_stride(key), dtype, current_stream());
}

// ---- activation.cu ---------------------------------------------------------------------
void silu_and_mul_op(at::Tensor& out, const at::Tensor& input) {
  check_cuda(input, "input");
  const DType dtype = dtype_of(input, "input");
  check_same_device(out, input, "out", "input");
  check_same_dtype(out, input, "out", "input");
  check_dim(input, 2, "input");
  check_dim(out, 2, "out");
  TV_CHECK(input.size(1) % 2 == 0, "input must have an even last dimension [num_tokens, 2 * d], got ",
           dims_str(input.sizes()));
  TV_CHECK(out.size(0) == input.size(0) && out.size(1) == input.size(1) / 2,
           "out must have shape [num_tokens, d] = [", input.size(0), ", ", input.size(1) / 2, "], got ",
           dims_str(out.sizes()));
  check_contiguous(input, "input");
  check_contiguous(out, "out");
  const c10::cuda::CUDAGuard guard(input.device());
  silu_and_mul(out.data_ptr(), input.data_ptr(), input.size(0), input.size(1) / 2, dtype, current_stream());
}

// The paged KV cache pair [num_blocks, num_kv_heads, block_size, head_dim], shared by
// reshape_and_cache (which writes it) and both attention ops (which read it).
void check_paged_caches(const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& ref,
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

// ---- cache.cu -------------------------------------------------------------------------------
// The checks of reshape_and_cache's arguments (shared with rotary_embedding_and_cache).
void check_cache_args(const at::Tensor& key, const at::Tensor& value, const at::Tensor& key_cache,
                      const at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_cuda(key, "key");
  dtype_of(key, "key");
  check_same_device(value, key, "value", "key");
  check_same_device(slot_mapping, key, "slot_mapping", "key");
  check_same_dtype(value, key, "value", "key");
  check_paged_caches(key_cache, value_cache, key, "key");
  check_dtype(slot_mapping, at::kLong, "slot_mapping");
  check_dim(key, 3, "key");
  check_dim(value, 3, "value");
  check_dim(slot_mapping, 1, "slot_mapping");
  TV_CHECK(value.sizes() == key.sizes(), "value must have the shape of key ", dims_str(key.sizes()), ", got ",
           dims_str(value.sizes()));
  TV_CHECK(slot_mapping.size(0) == key.size(0), "slot_mapping must have shape [num_tokens] = [", key.size(0),
           "], got ", dims_str(slot_mapping.sizes()));
  TV_CHECK(key_cache.size(1) == key.size(1) && key_cache.size(3) == key.size(2),
           "key_cache must have shape [num_blocks, num_kv_heads=", key.size(1), ", block_size, head_dim=",
           key.size(2), "], got ", dims_str(key_cache.sizes()));
  check_rows_dense(key, "key");
  check_rows_dense(value, "value");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_contiguous(slot_mapping, "slot_mapping");
  TV_CHECK(key.size(1) <= INT_MAX && key.size(2) <= INT_MAX && key_cache.size(2) <= INT_MAX,
           "key has too many heads or too large a head_dim / block_size");
}

void reshape_and_cache_op(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache,
                          at::Tensor& value_cache, const at::Tensor& slot_mapping) {
  check_cache_args(key, value, key_cache, value_cache, slot_mapping);
  const DType dtype = dtype_of(key, "key");
  const c10::cuda::CUDAGuard guard(key.device());
  reshape_and_cache(key.data_ptr(), value.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                    slot_mapping.data_ptr<int64_t>(), key.size(0), static_cast<int>(key.size(1)),
                    static_cast<int>(key.size(2)), static_cast<int>(key_cache.size(2)), key_cache.size(0),
                    row_stride(key), row_stride(value), dtype, current_stream());
}

// ---- rope_and_cache.cu ------------------------------------------------------------------------
void rotary_embedding_and_cache_op(const at::Tensor& positions, at::Tensor& query, at::Tensor& key,
                                   const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                                   const at::Tensor& slot_mapping, int64_t head_size,
                                   const at::Tensor& cos_sin_cache) {
  const int64_t rot_dim = check_rope_args(positions, query, key, head_size, cos_sin_cache);
  check_cache_args(key, value, key_cache, value_cache, slot_mapping);
  const DType dtype = dtype_of(query, "query");
  const c10::cuda::CUDAGuard guard(query.device());
  rotary_embedding_and_cache(positions.data_ptr<int64_t>(), query.data_ptr(), key.data_ptr(), value.data_ptr(),
                             key_cache.data_ptr(), value_cache.data_ptr(), slot_mapping.data_ptr<int64_t>(),
                             cos_sin_cache.data_ptr<float>(), query.size(0), static_cast<int>(query.size(1)),
                             static_cast<int>(key.size(1)), static_cast<int>(head_size), static_cast<int>(rot_dim),
                             static_cast<int>(key_cache.size(2)), key_cache.size(0), cos_sin_cache.size(0),
                             row_stride(query), row_stride(key), row_stride(value), dtype, current_stream());
}

// ==== attention (csrc/attention/) ====
// Checks shared by both attention ops: query/out [tokens, num_heads, head_dim], the two
// paged caches [num_blocks, num_kv_heads, block_size, head_dim], block_tables and
// seq_lens int32. Returns the block size. The kernels read 16 bytes at a time, so the
// caches, the query and each query row must start on a 16-byte boundary.
bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

struct AttentionDims {
  int num_heads, num_kv_heads, head_dim, block_size, max_blocks_per_seq;
};

void check_attention_inputs(const char* op, const at::Tensor& out, const at::Tensor& query,
                            const at::Tensor& key_cache, const at::Tensor& value_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, AttentionDims& dims) {
  check_cuda(query, "query");
  dtype_of(query, "query");
  check_same_device(out, query, "out", "query");
  check_same_device(block_tables, query, "block_tables", "query");
  check_same_device(seq_lens, query, "seq_lens", "query");
  check_same_dtype(out, query, "out", "query");
  check_paged_caches(key_cache, value_cache, query, "query");
  check_dtype(block_tables, at::kInt, "block_tables");
  check_dtype(seq_lens, at::kInt, "seq_lens");
  check_dim(query, 3, "query");
  check_dim(out, 3, "out");
  check_dim(block_tables, 2, "block_tables");
  check_dim(seq_lens, 1, "seq_lens");
  const int64_t head_dim = query.size(2);
  TV_CHECK(head_dim == 64 || head_dim == 128, op, ": query head_dim must be 64 or 128, got ", head_dim,
           " (query shape ", dims_str(query.sizes()), ")");
  const int64_t num_heads = query.size(1);
  const int64_t num_kv_heads = key_cache.size(1);
  TV_CHECK(num_kv_heads >= 1 && num_heads >= 1 && num_heads % num_kv_heads == 0, op,
           ": query num_heads (", num_heads, ") must be a multiple of key_cache num_kv_heads (", num_kv_heads,
           ")");
  TV_CHECK(key_cache.size(3) == head_dim, "key_cache must have shape [num_blocks, num_kv_heads, block_size, ",
           "head_dim=", head_dim, "] (head_dim of query), got ", dims_str(key_cache.sizes()));
  const int64_t block_size = key_cache.size(2);
  TV_CHECK(block_size >= 8 && block_size <= 128 && (block_size & (block_size - 1)) == 0,
           "key_cache block_size (dimension 2) must be a power of two from 8 to 128, got ", block_size);
  TV_CHECK(out.sizes() == query.sizes(), "out must have the shape of query ", dims_str(query.sizes()), ", got ",
           dims_str(out.sizes()));
  check_contiguous(out, "out");
  check_contiguous(key_cache, "key_cache");
  check_contiguous(value_cache, "value_cache");
  check_contiguous(block_tables, "block_tables");
  check_contiguous(seq_lens, "seq_lens");
  check_rows_dense(query, "query");
  const int64_t vec = 16 / query.element_size();
  TV_CHECK(aligned16(query) && row_stride(query) % vec == 0,
           "query must start on a 16-byte boundary and its row stride (", row_stride(query),
           ") must be a multiple of ", vec, " elements");
  TV_CHECK(aligned16(out), "out must start on a 16-byte boundary");
  TV_CHECK(aligned16(key_cache), "key_cache must start on a 16-byte boundary");
  TV_CHECK(aligned16(value_cache), "value_cache must start on a 16-byte boundary");
  TV_CHECK(block_tables.size(0) == seq_lens.size(0), "block_tables must have one row per sequence (",
           seq_lens.size(0), " = len(seq_lens)), got shape ", dims_str(block_tables.sizes()));
  TV_CHECK(seq_lens.size(0) <= 65535, "seq_lens: at most 65535 sequences per launch, got ", seq_lens.size(0));
  TV_CHECK(block_tables.size(1) * block_size <= INT_MAX / 2, "block_tables has too many columns (",
           block_tables.size(1), ") for block_size ", block_size);
  // The kernels hold the block count in an int; bounding the cache's rows (one per block,
  // kv head and slot) keeps every row index within int32 as well.
  TV_CHECK(key_cache.size(0) * num_kv_heads * block_size <= INT_MAX, "key_cache has too many blocks (",
           key_cache.size(0), " x ", num_kv_heads, " kv heads x ", block_size, " slots is more than 2^31 rows)");
  dims = AttentionDims{static_cast<int>(num_heads), static_cast<int>(num_kv_heads), static_cast<int>(head_dim),
                       static_cast<int>(block_size), static_cast<int>(block_tables.size(1))};
}

// sum_seq_lens, the host's sum of the batch's lengths (-1: not known), is a hint to the
// plan; a value no batch of this shape can have is a caller's bug, named here.
void check_sum_seq_lens(int64_t sum_seq_lens, int64_t num_seqs, int64_t max_seq_len) {
  TV_CHECK(sum_seq_lens >= -1 && sum_seq_lens <= num_seqs * max_seq_len, "sum_seq_lens must be -1 (not known) or ",
           "between 0 and num_seqs x max_seq_len = ", num_seqs, " x ", max_seq_len, " = ", num_seqs * max_seq_len,
           " (the block table's capacity), got ", sum_seq_lens);
}

// The decode op's `impl` (a hook for tests and benchmarks; the product passes -1).
void check_decode_impl(int64_t impl) {
  TV_CHECK(impl != 2, "impl=2 (tensor cores with TMA loads) is no longer in the extension: it measured 1-6% slower ",
           "than cp.async; dev/cuda/README.md says where to read it");
  TV_CHECK(impl == -1 || impl == 0 || impl == 1 || impl == 3,
           "impl must be -1 (automatic), 0 (CUDA cores, float32 caches), 1 (tensor cores, the block's warps share a "
           "kv head) or 3 (tensor cores, one kv head per warp), got ", impl);
}

void paged_attention_decode_op(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                               const at::Tensor& value_cache, const at::Tensor& block_tables,
                               const at::Tensor& seq_lens, double scale, int64_t impl, int64_t sum_seq_lens) {
  check_decode_impl(impl);
  AttentionDims dims{};
  check_attention_inputs("paged_attention_decode", out, query, key_cache, value_cache, block_tables, seq_lens, dims);
  const int64_t num_seqs = query.size(0);
  TV_CHECK(seq_lens.size(0) == num_seqs, "seq_lens must have shape [num_seqs] = [", num_seqs,
           "] (one query row per sequence), got ", dims_str(seq_lens.sizes()));
  const c10::cuda::CUDAGuard guard(query.device());
  if (num_seqs == 0) return;
  // An upper bound of every seq_lens[i] known without reading the GPU: the block
  // table's capacity. The grid and the workspace are sized from it (CUDA-graph safe).
  const int max_seq_len = dims.max_blocks_per_seq * dims.block_size;
  check_sum_seq_lens(sum_seq_lens, num_seqs, max_seq_len);
  const size_t ws_bytes = paged_attention_decode_workspace_size(static_cast<int>(num_seqs), dims.num_heads,
                                                                dims.num_kv_heads, dims.head_dim, max_seq_len,
                                                                sum_seq_lens, dtype_of(query, "query"),
                                                                static_cast<int>(impl));
  at::Tensor workspace;
  if (ws_bytes > 0) workspace = at::empty({static_cast<int64_t>(ws_bytes)}, query.options().dtype(at::kByte));
  paged_attention_decode(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                         block_tables.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(), static_cast<int>(num_seqs),
                         dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.block_size, dims.max_blocks_per_seq,
                         max_seq_len, sum_seq_lens, key_cache.size(0), row_stride(query), static_cast<float>(scale),
                         ws_bytes > 0 ? workspace.data_ptr() : nullptr, dtype_of(query, "query"),
                         static_cast<int>(impl), current_stream());
}

void prefill_attention_op(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
                          const at::Tensor& value_cache, const at::Tensor& block_tables,
                          const at::Tensor& cu_seqlens_q, const at::Tensor& seq_lens, int64_t max_seqlen_q,
                          double scale, int64_t impl) {
  TV_CHECK(impl == -1 || impl == 1 || impl == 2,
           "impl must be -1 (automatic), 1 (16 query rows per warp) or 2 (32 query rows per warp), got ", impl);
  AttentionDims dims{};
  check_attention_inputs("prefill_attention", out, query, key_cache, value_cache, block_tables, seq_lens, dims);
  check_same_device(cu_seqlens_q, query, "cu_seqlens_q", "query");
  check_dtype(cu_seqlens_q, at::kInt, "cu_seqlens_q");
  check_dim(cu_seqlens_q, 1, "cu_seqlens_q");
  check_contiguous(cu_seqlens_q, "cu_seqlens_q");
  const int64_t num_seqs = seq_lens.size(0);
  TV_CHECK(cu_seqlens_q.size(0) == num_seqs + 1, "cu_seqlens_q must have shape [num_seqs + 1] = [",
           num_seqs + 1, "], got ", dims_str(cu_seqlens_q.sizes()));
  TV_CHECK(max_seqlen_q >= 0 && max_seqlen_q <= INT_MAX / 2, "max_seqlen_q must be >= 0, got ", max_seqlen_q);
  TV_CHECK(query.size(0) == 0 || max_seqlen_q >= 1, "max_seqlen_q must be >= 1 when query has tokens, got ",
           max_seqlen_q);
  TV_CHECK(query.size(0) <= INT_MAX, "query has too many tokens");
  const c10::cuda::CUDAGuard guard(query.device());
  if (num_seqs == 0 || query.size(0) == 0) return;
  prefill_attention(out.data_ptr(), query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
                    block_tables.data_ptr<int32_t>(), cu_seqlens_q.data_ptr<int32_t>(), seq_lens.data_ptr<int32_t>(),
                    static_cast<int>(num_seqs), dims.num_heads, dims.num_kv_heads, dims.head_dim, dims.block_size,
                    dims.max_blocks_per_seq, static_cast<int>(max_seqlen_q), query.size(0), key_cache.size(0),
                    row_stride(query), static_cast<float>(scale), dtype_of(query, "query"), static_cast<int>(impl),
                    current_stream());
}

// ==== end attention ====

// ---- gemm.cpp -------------------------------------------------------------------------------
void check_linear_inputs(const at::Tensor& x, const at::Tensor& weight) {
  check_dim(x, 2, "x");
  check_dim(weight, 2, "weight");
  TV_CHECK(x.scalar_type() == weight.scalar_type(), "weight has dtype ", weight.scalar_type(),
           " but x has dtype ", x.scalar_type());
  TV_CHECK(x.size(1) == weight.size(1), "x [M, K] and weight [N, K] must share K: x has shape ", dims_str(x.sizes()),
           ", weight has shape ", dims_str(weight.sizes()));
}

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  const DType dtype = dtype_of(x, "x");
  check_same_device(weight, x, "weight", "x");
  check_linear_inputs(x, weight);
  check_contiguous(x, "x");  // call .contiguous() first if you mean it (an explicit copy)
  check_contiguous(weight, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  if (k == 0) return at::zeros({m, n}, x.options());  // an empty sum; cuBLAS rejects lda = 0
  at::Tensor y = at::empty({m, n}, x.options());
  gemm_xwt(y.data_ptr(), x.data_ptr(), weight.data_ptr(), m, n, k, dtype, at::cuda::getCurrentCUDABlasHandle(),
           current_stream());
  return y;
}

// ---- gemm/skinny_gemm.cu ----------------------------------------------------------------------
// The decode GEMM (M <= 16) on the tensor cores. ops.linear's dispatch rule decides when it
// runs (tinyvllm/ops/__init__.py); called directly, it runs or raises, naming the limit.
at::Tensor skinny_gemm_op(const at::Tensor& x, const at::Tensor& weight) {
  check_cuda(x, "x");
  dtype_of(x, "x");
  TV_CHECK(x.scalar_type() != at::kFloat, "skinny_gemm: x must be float16 or bfloat16, got Float ",
           "(float32 runs through cuBLAS: tinyvllm.ops.linear)");
  check_same_device(weight, x, "weight", "x");
  check_linear_inputs(x, weight);
  const int64_t m = x.size(0), k = x.size(1), n = weight.size(0);
  TV_CHECK(m <= 16, "skinny_gemm: x must have at most 16 rows (M), got shape ", dims_str(x.sizes()),
           " (tinyvllm.ops.linear takes any M)");
  TV_CHECK(k % 8 == 0, "skinny_gemm: K must be a multiple of 8 (rows of 16-byte vectors), got x shape ",
           dims_str(x.sizes()));
  TV_CHECK(n <= INT_MAX && k <= INT_MAX, "skinny_gemm: N and K must fit in a 32-bit int, got weight shape ",
           dims_str(weight.sizes()));
  check_rows_dense(x, "x");
  check_contiguous(weight, "weight");
  const c10::cuda::CUDAGuard guard(x.device());
  if (k == 0) return at::zeros({m, n}, x.options());  // an empty sum (x then has no rows to align)
  TV_CHECK(aligned16(x) && row_stride(x) % 8 == 0, "skinny_gemm: x must start on a 16-byte boundary and its row ",
           "stride (", row_stride(x), ") must be a multiple of 8 elements");
  TV_CHECK(aligned16(weight), "skinny_gemm: weight must start on a 16-byte boundary");
  at::Tensor y = at::empty({m, n}, x.options());
  skinny_gemm(y.data_ptr(), x.data_ptr(), weight.data_ptr(), m, n, k, row_stride(x), dtype_of(x, "x"),
              current_stream());
  return y;
}

// The flags kernels raise on an index they refused to follow (ops.h, errors.cu), as a
// list of kNumKernelErrors ints; `clear` resets them. Reads host memory only: the caller
// makes sure the kernels in question have finished (tinyvllm.ops.check_kernel_errors).
std::vector<int64_t> kernel_errors_op(bool clear) {
  int flags[kNumKernelErrors];
  read_kernel_errors(flags, clear);
  return std::vector<int64_t>(flags, flags + kNumKernelErrors);
}

}  // namespace
}  // namespace tinyvllm

TORCH_LIBRARY(tinyvllm, m) {
  m.def("rms_norm(Tensor! out, Tensor input, Tensor weight, float epsilon) -> ()");
  m.def("fused_add_rms_norm(Tensor! input, Tensor! residual, Tensor weight, float epsilon) -> ()");
  m.def(
      "rotary_embedding(Tensor positions, Tensor! query, Tensor! key, int head_size, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor! out, Tensor input) -> ()");
  m.def(
      "reshape_and_cache(Tensor key, Tensor value, Tensor! key_cache, Tensor! value_cache, Tensor slot_mapping) "
      "-> ()");
  m.def(
      "rotary_embedding_and_cache(Tensor positions, Tensor! query, Tensor! key, Tensor value, Tensor! key_cache, "
      "Tensor! value_cache, Tensor slot_mapping, int head_size, Tensor cos_sin_cache) -> ()");
  m.def("linear(Tensor x, Tensor weight) -> Tensor");
  m.def("skinny_gemm(Tensor x, Tensor weight) -> Tensor");
  // ==== attention (csrc/attention/): schemas ====
  // `impl` picks a kernel for tests and benchmarks; -1 (automatic) is what the product uses.
  m.def(
      "paged_attention_decode(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale, int impl=-1, int sum_seq_lens=-1) -> ()");
  m.def(
      "prefill_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor seq_lens, int max_seqlen_q, float scale, int impl=-1) -> ()");
  // ==== end attention schemas ====
  // No tensor arguments, so no dispatch key: one implementation for every backend.
  m.def("kernel_errors(bool clear=True) -> int[]", &tinyvllm::kernel_errors_op);
}

namespace {
// One list of implementations, registered for two dispatch keys (below).
void register_impls(torch::Library& m) {
  m.impl("rms_norm", &tinyvllm::rms_norm_op);
  m.impl("fused_add_rms_norm", &tinyvllm::fused_add_rms_norm_op);
  m.impl("rotary_embedding", &tinyvllm::rotary_embedding_op);
  m.impl("silu_and_mul", &tinyvllm::silu_and_mul_op);
  m.impl("reshape_and_cache", &tinyvllm::reshape_and_cache_op);
  m.impl("rotary_embedding_and_cache", &tinyvllm::rotary_embedding_and_cache_op);
  m.impl("linear", &tinyvllm::linear_op);
  m.impl("skinny_gemm", &tinyvllm::skinny_gemm_op);
  // ==== attention (csrc/attention/) ====
  m.impl("paged_attention_decode", &tinyvllm::paged_attention_decode_op);
  m.impl("prefill_attention", &tinyvllm::prefill_attention_op);
  // ==== end attention ====
}
}  // namespace

TORCH_LIBRARY_IMPL(tinyvllm, CUDA, m) { register_impls(m); }

// The "fake" (shape-only) versions that torch.compile, CUDA-graph tracing and
// torch.library.opcheck need are registered in Python: tinyvllm/ops/_kernels.py.

// CPU tensors reach the same wrappers, whose first check fails with a message that
// names the argument ("input must be a CUDA tensor, got device cpu") instead of the
// dispatcher's generic "could not run ... with arguments from the 'CPU' backend".
TORCH_LIBRARY_IMPL(tinyvllm, CPU, m) { register_impls(m); }

// ---- not an op: the decode plan, for tests and benchmarks ----------------------------------
// tinyvllm._C.decode_plan(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens,
// dtype_name, impl) -> dict: what paged_attention_decode would launch for these sizes on the
// current GPU (attention/decode_plan.cpp). dtype_name: "float32", "float16" or "bfloat16";
// sum_seq_lens -1 if not known. A plain CPython function: the plan is no tensor op.
namespace {
PyObject* decode_plan_py(PyObject* /*module*/, PyObject* args) {
  int num_seqs = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, max_seq_len = 0, impl = -1;
  long long sum_seq_lens = -1;
  const char* dtype_name = nullptr;
  if (!PyArg_ParseTuple(args, "iiiiiLsi:decode_plan", &num_seqs, &num_heads, &num_kv_heads, &head_dim, &max_seq_len,
                        &sum_seq_lens, &dtype_name, &impl))
    return nullptr;
  try {
    using namespace tinyvllm;
    const std::string name = dtype_name;
    TV_CHECK(name == "float32" || name == "float16" || name == "bfloat16",
             "dtype_name must be float32, float16 or bfloat16, got ", name);
    const DType dtype = name == "float32" ? DType::kFloat32 : name == "float16" ? DType::kFloat16 : DType::kBFloat16;
    check_decode_impl(impl);
    TV_CHECK(num_seqs >= 1 && num_seqs <= 65535, "num_seqs must lie in [1, 65535], got ", num_seqs);
    TV_CHECK(head_dim == 64 || head_dim == 128, "head_dim must be 64 or 128, got ", head_dim);
    TV_CHECK(num_kv_heads > 0 && num_heads > 0 && num_heads % num_kv_heads == 0, "num_heads (", num_heads,
             ") must be a multiple of num_kv_heads (", num_kv_heads, ")");
    TV_CHECK(max_seq_len >= 0 && max_seq_len <= INT_MAX / 2, "max_seq_len out of range: ", max_seq_len);
    check_sum_seq_lens(sum_seq_lens, num_seqs, max_seq_len);
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) (void)cudaGetLastError();  // (leave no error for a later check)
    TV_CHECK(devices > 0, "decode_plan needs a CUDA GPU: the plan depends on its SMs and on how many blocks fit on one");
    const DecodePlanInfo p = paged_attention_decode_plan(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len,
                                                         sum_seq_lens, dtype, impl);
    return Py_BuildValue("{s:O,s:i,s:i,s:i,s:i,s:i,s:O}", "tensor_cores", p.tensor_cores ? Py_True : Py_False,
                         "num_splits", p.num_splits, "partition_size", p.partition_size, "warps", p.warps,
                         "blocks_per_sm", p.blocks_per_sm, "smem_bytes", p.smem_bytes, "head_per_warp",
                         p.head_per_warp ? Py_True : Py_False);
  } catch (const c10::Error& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyMethodDef methods[] = {
    {"decode_plan", decode_plan_py, METH_VARARGS,
     "decode_plan(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens, dtype_name, impl) -> dict\n"
     "What paged_attention_decode launches for these sizes on the current GPU (for tests and benchmarks; not an op)."},
    {nullptr, nullptr, 0, nullptr}};
}  // namespace

// `import tinyvllm._C` needs a function PyInit__C. Loading the shared library is what
// matters most, because that runs the registrations above; the module itself holds only
// decode_plan. (This avoids pybind11, whose headers would double this file's compile time.)
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "tinyvllm CUDA kernels (torch.ops.tinyvllm)",
                                      -1, methods};
  return PyModule_Create(&module);
}
