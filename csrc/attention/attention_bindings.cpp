// attention_bindings.cpp: the torch side of the two attention ops (paged_attention_decode,
// prefill_attention): their schemas, their input checks, and the calls into the launchers of
// ops.h. The rest of the ops are bound in ../torch_bindings.cpp, which holds the library's one
// TORCH_LIBRARY block; this file adds to it with TORCH_LIBRARY_FRAGMENT.
#include <Python.h>

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../bindings.h"

namespace tinyvllm {
namespace {

// Checks shared by both attention ops: query/out [tokens, num_heads, head_dim], the two
// paged caches [num_blocks, num_kv_heads, block_size, head_dim], block_tables and
// seq_lens int32. Returns the block size. The kernels read 16 bytes at a time, so the
// caches, the query and each query row must start on a 16-byte boundary.

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


}  // namespace

// ---- not an op: the decode plan, for tests and benchmarks ----------------------------------
// tinyvllm._C.decode_plan(num_seqs, num_heads, num_kv_heads, head_dim, max_seq_len, sum_seq_lens,
// dtype_name, impl) -> dict: what paged_attention_decode would launch for these sizes on the
// current GPU (attention/decode_plan.cpp). dtype_name: "float32", "float16" or "bfloat16";
// sum_seq_lens -1 if not known. A plain CPython function: the plan is no tensor op.
PyObject* decode_plan_py(PyObject* /*module*/, PyObject* args) {
  int num_seqs = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, max_seq_len = 0, impl = -1;
  long long sum_seq_lens = -1;
  const char* dtype_name = nullptr;
  if (!PyArg_ParseTuple(args, "iiiiiLsi:decode_plan", &num_seqs, &num_heads, &num_kv_heads, &head_dim, &max_seq_len,
                        &sum_seq_lens, &dtype_name, &impl))
    return nullptr;
  try {
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
}  // namespace tinyvllm

TORCH_LIBRARY_FRAGMENT(tinyvllm, m) {
  // `impl` picks a kernel for tests and benchmarks; -1 (automatic) is what the product uses.
  m.def(
      "paged_attention_decode(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor seq_lens, float scale, int impl=-1, int sum_seq_lens=-1) -> ()");
  m.def(
      "prefill_attention(Tensor! out, Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor cu_seqlens_q, Tensor seq_lens, int max_seqlen_q, float scale, int impl=-1) -> ()");
}

// CUDA: the kernels. CPU: the same functions, whose first check says the tensor must be on
// a GPU (as in torch_bindings.cpp).
TORCH_LIBRARY_IMPL(tinyvllm, CUDA, m) {
  m.impl("paged_attention_decode", &tinyvllm::paged_attention_decode_op);
  m.impl("prefill_attention", &tinyvllm::prefill_attention_op);
}
TORCH_LIBRARY_IMPL(tinyvllm, CPU, m) {
  m.impl("paged_attention_decode", &tinyvllm::paged_attention_decode_op);
  m.impl("prefill_attention", &tinyvllm::prefill_attention_op);
}
