// Fallback gemm on the storage layout (packed nibbles [N, ceil(K/2)], lut, scales): any x dtype
// (fp32 included), any group size, any table dtype, no repacking. No tensor cores: one warp per
// output row n, lanes stride over the packed bytes, kRows rows of x per warp reuse each decoded
// weight, a warp reduction at the end. It serves any4.gemm(x_cuda, packed, lut, scales); the
// fast path is the tensor-core kernel on the GPU layout (gemm_tc.cu).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "api.h"
#include "launch.cuh"

namespace any4 {
namespace cuda {

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kRows = 4;  // rows of x per warp

__device__ __forceinline__ float load_f32(const void* p, int dtype, int64_t i) {
  if (dtype == 0) return static_cast<const float*>(p)[i];
  if (dtype == 1) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

__device__ __forceinline__ void store_f32(void* p, int dtype, int64_t i, float v) {
  if (dtype == 0) {
    static_cast<float*>(p)[i] = v;
  } else if (dtype == 1) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  }
}

__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemm_simt_kernel(const SimtGemmArgs a, int64_t m_begin) {
  __shared__ float tables[kWarpsPerBlock][16];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp;
  const int64_t m0 = m_begin + static_cast<int64_t>(blockIdx.y) * kRows;
  if (n >= a.N) return;  // warp-uniform
  float* tab = tables[warp];
  if (lane < 16)
    tab[lane] =
        lane < a.lut_len ? load_f32(a.lut, a.table_dtype, (a.lut_rows == 1 ? 0 : n) * a.lut_len + lane) : 0.f;
  __syncwarp();
  const int64_t P = (a.K + 1) / 2;
  const uint8_t* row = a.packed + n * P;
  float acc[kRows] = {};
  for (int64_t j = lane; j < P; j += 32) {
    const int64_t k = 2 * j;
    const int64_t grp0 = k / a.group_size, grp1 = (k + 1) / a.group_size;
    const float s0 = load_f32(a.scales, a.table_dtype, (n * a.n_groups + grp0) * 2);
    const float z0 = load_f32(a.scales, a.table_dtype, (n * a.n_groups + grp0) * 2 + 1);
    const uint32_t byte = row[j];
    const float w0 = fmaf(tab[byte & 0xf], s0, z0);
    const bool has1 = k + 1 < a.K;
    float w1 = 0.f;
    if (has1) {
      const float s1 = grp1 == grp0 ? s0 : load_f32(a.scales, a.table_dtype, (n * a.n_groups + grp1) * 2);
      const float z1 = grp1 == grp0 ? z0 : load_f32(a.scales, a.table_dtype, (n * a.n_groups + grp1) * 2 + 1);
      w1 = fmaf(tab[byte >> 4], s1, z1);
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t m = m0 + r;
      if (m < a.M) {
        float v = load_f32(a.x, a.x_dtype, m * a.K + k) * w0;
        if (has1) v = fmaf(load_f32(a.x, a.x_dtype, m * a.K + k + 1), w1, v);
        acc[r] += v;
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
  if (lane < kRows && m0 + lane < a.M) {
    float v = acc[0];
#pragma unroll
    for (int r = 1; r < kRows; ++r)
      if (lane == r) v = acc[r];
    store_f32(a.y, a.x_dtype, (m0 + lane) * a.N + n, v);
  }
}

}  // namespace

void gemm_simt(const SimtGemmArgs& a) {
  if (a.x_dtype < 0 || a.x_dtype > 2 || a.table_dtype < 0 || a.table_dtype > 2)
    throw std::invalid_argument("any4 gemm_simt: unknown dtype code");
  if (a.N < 1 || a.K < 1 || a.lut_len < 1 || a.lut_len > 16 || !(a.lut_rows == 1 || a.lut_rows == a.N) ||
      a.group_size < 1 || a.n_groups != (a.K + a.group_size - 1) / a.group_size)
    throw std::invalid_argument("any4 gemm_simt: inconsistent operand sizes");
  if (a.M == 0) return;
  DeviceScope scope(a.device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int64_t blocks_n = (a.N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (blocks_n > 0x7fffffff) throw std::invalid_argument("any4 gemm_simt: N is too large");
  const int64_t max_rows_per_launch = int64_t(65535) * kRows;
  for (int64_t m_begin = 0; m_begin < a.M; m_begin += max_rows_per_launch) {
    const int64_t rows = a.M - m_begin < max_rows_per_launch ? a.M - m_begin : max_rows_per_launch;
    dim3 grid(static_cast<unsigned>(blocks_n), static_cast<unsigned>((rows + kRows - 1) / kRows));
    gemm_simt_kernel<<<grid, kWarpsPerBlock * 32, 0, stream>>>(a, m_begin);
    check_launch("gemm_simt");
  }
}

}  // namespace cuda
}  // namespace any4
