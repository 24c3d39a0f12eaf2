// decode_tensor_cores.cu: the launchers of the tensor-core decode kernel
// (decode_tensor_cores.cuh) and its instantiations: bf16 and fp16, head_dim 64 and 128,
// rows 8-15 in use or not (HI), blocks of 4, 8 or 16 warps (16 fit shared memory at
// head_dim 64 only) and one kv head per warp.
#include "attention/decode_tensor_cores.cuh"

namespace tinyvllm {
namespace decode {
namespace {

template <typename T, int D, bool HI, int WARPS, bool HPW = false>
void launch(const DecodeParams& prm, int smem, int num_seqs, cudaStream_t stream) {
  attn::prepare_kernel(reinterpret_cast<const void*>(decode_tensor_cores_kernel<T, D, HI, WARPS, HPW>), WARPS * 32,
                       smem);
  const int blocks_x = HPW ? (prm.num_kv_heads + WARPS - 1) / WARPS : prm.num_kv_heads * prm.head_chunks;
  const dim3 grid(blocks_x, num_seqs, prm.num_splits);
  decode_tensor_cores_kernel<T, D, HI, WARPS, HPW><<<grid, WARPS * 32, smem, stream>>>(prm);
  CUDA_CHECK(cudaGetLastError());
}

// The plan's kernel: warps per block, or one kv head per warp.
template <typename T, int D, bool HI>
void launch_planned(const DecodeParams& prm, const DecodePlan& plan, int num_seqs, cudaStream_t stream) {
  if (plan.head_per_warp) return launch<T, D, HI, kDecodeWarps, true>(prm, plan.smem_bytes, num_seqs, stream);
  if constexpr (D == 64) {
    if (plan.warps == 16) return launch<T, D, HI, 16>(prm, plan.smem_bytes, num_seqs, stream);
  }
  if (plan.warps == 8) return launch<T, D, HI, 8>(prm, plan.smem_bytes, num_seqs, stream);
  launch<T, D, HI, kDecodeWarps>(prm, plan.smem_bytes, num_seqs, stream);
}

template <typename T, int D>
void launch_dtype_dim(const DecodeParams& prm, const DecodePlan& plan, int num_seqs, cudaStream_t stream) {
  prm.group > 8 ? launch_planned<T, D, true>(prm, plan, num_seqs, stream)
                : launch_planned<T, D, false>(prm, plan, num_seqs, stream);
}

template <typename T, int D, bool HI>
const void* kernel_of(int warps, bool head_per_warp) {
  if (head_per_warp) return reinterpret_cast<const void*>(decode_tensor_cores_kernel<T, D, HI, kDecodeWarps, true>);
  if constexpr (D == 64) {
    if (warps == 16) return reinterpret_cast<const void*>(decode_tensor_cores_kernel<T, D, HI, 16>);
  }
  if (warps == 8) return reinterpret_cast<const void*>(decode_tensor_cores_kernel<T, D, HI, 8>);
  return reinterpret_cast<const void*>(decode_tensor_cores_kernel<T, D, HI, kDecodeWarps>);
}

template <typename T, int D>
const void* kernel_of(bool hi, int warps, bool head_per_warp) {
  return hi ? kernel_of<T, D, true>(warps, head_per_warp) : kernel_of<T, D, false>(warps, head_per_warp);
}

}  // namespace

void launch_decode_tensor_cores(const DecodeParams& prm, const DecodePlan& plan, DType dtype, int head_dim,
                                int num_seqs, cudaStream_t stream) {
  const bool half = dtype == DType::kFloat16;
  if (head_dim == 128) {
    return half ? launch_dtype_dim<__half, 128>(prm, plan, num_seqs, stream)
                : launch_dtype_dim<__nv_bfloat16, 128>(prm, plan, num_seqs, stream);
  }
  half ? launch_dtype_dim<__half, 64>(prm, plan, num_seqs, stream)
       : launch_dtype_dim<__nv_bfloat16, 64>(prm, plan, num_seqs, stream);
}

const void* tensor_cores_kernel_for(DType dtype, int head_dim, bool hi, int warps, bool head_per_warp) {
  const bool half = dtype == DType::kFloat16;
  if (head_dim == 128) {
    return half ? kernel_of<__half, 128>(hi, warps, head_per_warp)
                : kernel_of<__nv_bfloat16, 128>(hi, warps, head_per_warp);
  }
  return half ? kernel_of<__half, 64>(hi, warps, head_per_warp) : kernel_of<__nv_bfloat16, 64>(hi, warps, head_per_warp);
}

}  // namespace decode
}  // namespace tinyvllm
