// Instances of the tensor-core gemm and dequantize kernels for 2-bit codes (cuda/gemm_tc_kernel.cuh).
#include "gemm_tc_kernel.cuh"

namespace any4 {
namespace cuda {

const TcKernelTable& tc_kernels_bits2() {
  static const TcKernelTable table = tc_detail::make_table<2>();
  return table;
}

}  // namespace cuda
}  // namespace any4
