#include "dequantize_rows.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu_features.h"
#include "gemm_cpu_kernel.h"
#include "pack.h"
#include "parallel.h"

namespace any4 {
namespace {

// Table values of one group in the output's representation (float, or bf16 / fp16 bits): the
// rounding to w_dtype happens once per table entry, which equals rounding every element.
template <class Out>
void group_table(const float* t, float s, float z, DType w_dtype, Out* out) {
  for (int j = 0; j < 16; ++j) {
    const float v = std::fma(t[j], s, z);
    if constexpr (sizeof(Out) == 4) {
      out[j] = v;
    } else {
      out[j] = w_dtype == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
  }
}

template <class Out>
void decode_rows(const GemmArgs& a, int64_t n0, int64_t n1, Out* w, DType w_dtype) {
  const int64_t K = a.K, P = packed_cols(K), G = a.group_size;
  parallel_for(n1 - n0, std::max<int64_t>(1, (1 << 15) / K), [&](int64_t b, int64_t e) {
    float t[16];
    Out deq[16];
    for (int64_t r = b; r < e; ++r) {
      const int64_t n = n0 + r;
      const int64_t lr = a.lut_rows == 1 ? 0 : n;
      for (int j = 0; j < 16; ++j)
        t[j] = j < a.lut_len ? load_as_f32(a.lut, a.table_dtype, lr * a.lut_len + j) : 0.f;
      const uint8_t* pr = a.packed + n * P;
      Out* wr = w + r * K;
      for (int64_t g = 0; g < a.n_groups; ++g) {
        const float s = load_as_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2);
        const float z = load_as_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2 + 1);
        group_table(t, s, z, w_dtype, deq);
        int64_t k = g * G;
        const int64_t k1 = std::min(K, k + G);
        if (k & 1) {  // (odd group sizes) a group that starts on a high nibble
          wr[k] = deq[pr[k >> 1] >> 4];
          ++k;
        }
        for (; k + 2 <= k1; k += 2) {  // one code byte: two elements
          const uint8_t c = pr[k >> 1];
          wr[k] = deq[c & 0xf];
          wr[k + 1] = deq[c >> 4];
        }
        if (k < k1) wr[k] = deq[pr[k >> 1] & 0xf];
      }
    }
  });
}

}  // namespace

void dequantize_rows(const GemmArgs& a, int64_t n0, int64_t n1, void* w, DType w_dtype, CpuImpl impl) {
  ANY4_CHECK(a.N >= 1 && a.K >= 1, "dequantize_rows: bad sizes");
  ANY4_CHECK(a.packed && a.lut && a.scales, "dequantize_rows: null operand");
  ANY4_CHECK(a.lut_rows == 1 || a.lut_rows == a.N, "dequantize_rows: lut must have 1 or N rows");
  ANY4_CHECK(a.lut_len >= 1 && a.lut_len <= 16, "dequantize_rows: lut must have 1..16 entries per row");
  ANY4_CHECK(a.group_size >= 1 && a.n_groups == ceil_div(a.K, a.group_size),
             "dequantize_rows: scales do not match K / group_size");
  ANY4_CHECK(0 <= n0 && n0 <= n1 && n1 <= a.N, "dequantize_rows: row range outside [0, N]");
  ANY4_CHECK(impl == CpuImpl::Auto || impl == CpuImpl::Portable || impl == CpuImpl::Avx2,
             "dequantize_rows: impl must be auto, portable or avx2");
  ANY4_CHECK(impl != CpuImpl::Avx2 || cpu_impl_supported(CpuImpl::Avx2),
             "dequantize_rows: avx2 is not supported on this processor/build");
  if (n0 == n1) return;
  ANY4_CHECK(w != nullptr, "dequantize_rows: null output");
  const bool even_groups = a.group_size % 2 == 0 || a.n_groups == 1;  // blocks start on a byte
  if (impl == CpuImpl::Auto) impl = cpu_impl_supported(CpuImpl::Avx2) ? CpuImpl::Avx2 : CpuImpl::Portable;
#ifdef ANY4_X86_KERNELS
  if (impl == CpuImpl::Avx2 && even_groups) {
    parallel_for(n1 - n0, std::max<int64_t>(1, (1 << 15) / a.K),
                 [&](int64_t b, int64_t e) { gemm_detail::avx2_dequantize_rows(a, n0, b, e, w, w_dtype); });
    return;
  }
#endif
  if (w_dtype == DType::F32) {
    decode_rows(a, n0, n1, static_cast<float*>(w), w_dtype);
  } else {
    decode_rows(a, n0, n1, static_cast<uint16_t*>(w), w_dtype);
  }
}

}  // namespace any4
