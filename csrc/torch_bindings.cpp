// torch_bindings.cpp: where the kernels meet torch (with attention/attention_bindings.cpp for the
// two attention ops, and bindings.h, the checks both use: the only files that know about torch).
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

#include "bindings.h"
#include "ops.h"

namespace tinyvllm {
namespace {

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
  // (The attention ops' schemas and kernels are registered in attention/attention_bindings.cpp.)
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
}
}  // namespace

TORCH_LIBRARY_IMPL(tinyvllm, CUDA, m) { register_impls(m); }

// The "fake" (shape-only) versions that torch.compile, CUDA-graph tracing and
// torch.library.opcheck need are registered in Python: tinyvllm/ops/_kernels.py.

// CPU tensors reach the same wrappers, whose first check fails with a message that
// names the argument ("input must be a CUDA tensor, got device cpu") instead of the
// dispatcher's generic "could not run ... with arguments from the 'CPU' backend".
TORCH_LIBRARY_IMPL(tinyvllm, CPU, m) { register_impls(m); }

// ---- not an op: the decode plan (attention/attention_bindings.cpp), for tests and benchmarks ----
namespace tinyvllm {
PyObject* decode_plan_py(PyObject* module, PyObject* args);
}  // namespace tinyvllm

namespace {
PyMethodDef methods[] = {
    {"decode_plan", tinyvllm::decode_plan_py, METH_VARARGS,
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
