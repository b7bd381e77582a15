#include "gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "pack.h"
#include "parallel.h"

namespace any4 {

static void validate(const GemmArgs& a) {
  ANY4_CHECK(a.M >= 0 && a.N >= 1 && a.K >= 1, "gemm: bad sizes");
  ANY4_CHECK(a.lut_rows == 1 || a.lut_rows == a.N, "gemm: lut must have 1 or N rows");
  ANY4_CHECK(a.lut_len >= 1 && a.lut_len <= 16, "gemm: lut must have 1..16 entries per row");
  ANY4_CHECK(a.group_size >= 1 && a.n_groups == ceil_div(a.K, a.group_size),
             "gemm: scales do not match K / group_size");
}

// Portable reference path: decode one weight row to fp32 once, reuse it for all M rows of x.
static void gemm_portable(const GemmArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, P = packed_cols(K);
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_f32(a.x, a.x_dtype, i);
  parallel_for(N, 8, [&](int64_t b, int64_t e) {
    std::vector<float> wrow(K);
    float t[16];
    for (int64_t n = b; n < e; ++n) {
      int64_t lr = a.lut_rows == 1 ? 0 : n;
      for (int j = 0; j < 16; ++j)
        t[j] = j < a.lut_len ? load_as_f32(a.lut, a.table_dtype, lr * a.lut_len + j) : 0.f;
      const uint8_t* pr = a.packed + n * P;
      for (int64_t g = 0; g < a.n_groups; ++g) {
        float s = load_as_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2);
        float z = load_as_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2 + 1);
        int64_t k1 = std::min(K, (g + 1) * a.group_size);
        for (int64_t k = g * a.group_size; k < k1; ++k)
          wrow[k] = std::fma(t[(pr[k >> 1] >> ((k & 1) * 4)) & 0xf], s, z);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xf.data() + m * K;
        float acc = 0.f;
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * wrow[k];
        store_from_f32(a.y, a.x_dtype, m * N + n, acc);
      }
    }
  });
}

CpuImpl best_cpu_impl() {
  return CpuImpl::Portable;
}

bool cpu_impl_supported(CpuImpl impl) {
  return impl == CpuImpl::Portable || impl == CpuImpl::Auto;
}

void gemm_cpu(const GemmArgs& a, CpuImpl impl) {
  validate(a);
  if (a.M == 0) return;
  if (impl == CpuImpl::Auto) impl = best_cpu_impl();
  ANY4_CHECK(cpu_impl_supported(impl), "gemm: requested CPU implementation is not supported here");
  gemm_portable(a);
}

}  // namespace any4
