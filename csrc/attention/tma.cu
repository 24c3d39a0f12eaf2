// tma.cu: the host half of tma.cuh, building tensor maps for the copy engine.
#include "attention/tma.cuh"

#include <stdexcept>
#include <string>

namespace tinyvllm {
namespace tma {
namespace {

// cuTensorMapEncodeTiled's signature (cuda.h). We fetch it from the driver at run time
// instead of linking libcuda: the extension then loads on machines without a driver.
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

EncodeTiledFn encode_fn() {
  static const EncodeTiledFn fn = []() -> EncodeTiledFn {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();  // not sticky, but leave no error behind for the next check
      return nullptr;
    }
    return reinterpret_cast<EncodeTiledFn>(p);
  }();
  return fn;
}

}  // namespace

bool available() { return attn::device_cc_major() >= 9 && encode_fn() != nullptr; }

CUtensorMap make_row_tensor_map(const void* base, DType dtype, uint64_t rows, uint64_t cols, uint32_t box_rows) {
  const EncodeTiledFn encode = encode_fn();
  if (encode == nullptr) throw std::runtime_error("TMA: the CUDA driver does not provide cuTensorMapEncodeTiled");
  if (dtype == DType::kFloat32) throw std::runtime_error("TMA tensor maps here are for bf16/fp16 only");
  CUtensorMap map{};
  // Dimension 0 is the fastest (columns), dimension 1 the rows; the row stride is in bytes.
  const cuuint64_t dims[2] = {cols, rows};
  const cuuint64_t strides[1] = {cols * 2};
  const cuuint32_t box[2] = {64, box_rows};  // 64 x 2 bytes = 128: the most SWIZZLE_128B allows
  const cuuint32_t elem_strides[2] = {1, 1};
  // No L2 promotion: promoting each request to 256 bytes made L2 look lines up twice
  // (see the cp.async loader in paged_attention.cu), and the decode kernel is bound by L2.
  const CUresult r = encode(&map, dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            2, const_cast<void*>(base), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error("TMA: cuTensorMapEncodeTiled failed (error " + std::to_string(int(r)) + ") for a [" +
                             std::to_string(rows) + ", " + std::to_string(cols) + "] array with boxes of " +
                             std::to_string(box_rows) + " rows");
  }
  return map;
}

}  // namespace tma
}  // namespace tinyvllm
