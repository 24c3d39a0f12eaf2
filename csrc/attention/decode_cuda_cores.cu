// decode_cuda_cores.cu: the CUDA-core decode kernel (decode_cuda_cores.cuh) for fp32 caches,
// the only ones the product runs on it: head_dim 64 or 128, 1, 2, 4 or 8 query heads per block.
#include "attention/decode_cuda_cores.cuh"

namespace tinyvllm {
namespace decode {

void launch_decode_cuda_cores(const DecodeParams& prm, int gmax, int head_dim, int num_seqs, cudaStream_t stream) {
  if (head_dim == 128) return launch_cuda_cores<float, 128>(prm, gmax, num_seqs, stream);
  launch_cuda_cores<float, 64>(prm, gmax, num_seqs, stream);
}

template <int D>
const void* cuda_cores_kernel_of(int gmax) {
  switch (gmax) {
    case 1: return reinterpret_cast<const void*>(decode_cuda_cores_kernel<float, D, 1>);
    case 2: return reinterpret_cast<const void*>(decode_cuda_cores_kernel<float, D, 2>);
    case 4: return reinterpret_cast<const void*>(decode_cuda_cores_kernel<float, D, 4>);
    default: return reinterpret_cast<const void*>(decode_cuda_cores_kernel<float, D, 8>);
  }
}

const void* cuda_cores_kernel_for(int head_dim, int gmax) {
  return head_dim == 128 ? cuda_cores_kernel_of<128>(gmax) : cuda_cores_kernel_of<64>(gmax);
}

}  // namespace decode
}  // namespace tinyvllm
