// AVX-512 building blocks shared by gemm_cpu_avx512.cpp and gemm_cpu_avx512bf16.cpp.
// Include only from files compiled with AVX-512 flags. Everything here has internal linkage
// (anonymous namespace), so no copy compiled with these flags can leak into other files.
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "gemm_cpu.h"

namespace any4 {
namespace gemm_detail {
namespace {

inline int64_t imin(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t imax(int64_t a, int64_t b) {
  return a > b ? a : b;
}
inline int64_t round_up(int64_t a, int64_t b) {
  return (a + b - 1) / b * b;
}

// Lowest `count` bits set (count in [0, 16]).
inline __mmask16 low_mask16(int64_t count) {
  return static_cast<__mmask16>(count >= 16 ? 0xffffu : (1u << (count < 0 ? 0 : count)) - 1u);
}

// Up to 16 elements of dtype d from p[offset, offset + count) as float32 (the rest zero).
inline __m512 load_f32x16(const void* p, DType d, int64_t offset, int64_t count) {
  const __mmask16 m = low_mask16(count);
  if (count <= 0) return _mm512_setzero_ps();
  switch (d) {
    case DType::F32:
      return _mm512_maskz_loadu_ps(m, static_cast<const float*>(p) + offset);
    case DType::F16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + offset));
    case DType::BF16:
    default: {
      __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + offset);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// float32 -> bfloat16 bits, round to nearest even, NaN stays a (quiet) NaN.
inline __m256i f32_to_bf16_bits(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// Store the first `count` lanes of v to p[offset, offset + count) as dtype d.
inline void store_f32x16(void* p, DType d, int64_t offset, int64_t count, __m512 v) {
  const __mmask16 m = low_mask16(count);
  switch (d) {
    case DType::F32:
      _mm512_mask_storeu_ps(static_cast<float*>(p) + offset, m, v);
      break;
    case DType::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + offset, m,
                               _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::BF16:
    default:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + offset, m, f32_to_bf16_bits(v));
      break;
  }
}

// Table row of weight row n as 16 float32 lanes (entries past lut_len are zero).
inline __m512 load_table_f32(const GemmArgs& a, int64_t n) {
  const int64_t row = a.lut_rows == 1 ? 0 : n;
  return load_f32x16(a.lut, a.table_dtype, row * a.lut_len, a.lut_len);
}

// Number of float32 slots per row for the converted scales / zeros: room for n_groups, the
// padding that vector loads past the last group may touch, and a multiple of 16.
inline int64_t group_slots(int64_t n_groups) {
  return round_up(n_groups + 16, 16);
}

// scales[n, :, 0] -> scale[0, n_groups), scales[n, :, 1] -> zero[0, n_groups), both float32,
// zero-filled up to group_slots(n_groups).
inline void load_row_scales(const GemmArgs& a, int64_t n, float* scale, float* zero) {
  const int64_t ng = a.n_groups, slots = group_slots(ng);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const int64_t base = n * ng * 2;
  for (int64_t g = 0; g < slots; g += 16) {
    const int64_t pairs = imax(0, imin(16, ng - g));
    const __m512 lo = load_f32x16(a.scales, a.table_dtype, base + 2 * g, imin(16, 2 * pairs));
    const __m512 hi = load_f32x16(a.scales, a.table_dtype, base + 2 * g + 16, imax(0, 2 * pairs - 16));
    _mm512_store_ps(scale + g, _mm512_permutex2var_ps(lo, even, hi));
    _mm512_store_ps(zero + g, _mm512_permutex2var_ps(lo, odd, hi));
  }
}

// Software prefetch of the next tile's weight rows (codes, scales, table): the hardware
// prefetcher does not keep up with several interleaved row streams, and at small batch the
// kernel is bound by how fast codes arrive from memory. One cache line per call.
// (Inline asm: GCC deletes loops made only of __builtin_prefetch / _mm_prefetch at -O1 and up.)
inline void prefetch_line(const void* p) {
  asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p)));
}

// Prefetches all scale/zero pairs and the table of weight row n (if n < N).
inline void prefetch_row_params(const GemmArgs& a, int64_t n) {
  if (n >= a.N) return;
  const size_t es = a.table_dtype == DType::F32 ? 4 : 2;
  const char* s = static_cast<const char*>(a.scales) + static_cast<size_t>(n * a.n_groups * 2) * es;
  const size_t bytes = static_cast<size_t>(a.n_groups * 2) * es;
  for (size_t off = 0; off < bytes; off += 64) prefetch_line(s + off);
  if (a.lut_rows != 1)
    prefetch_line(static_cast<const char*>(a.lut) + static_cast<size_t>(n * a.lut_len) * es);
}

// Horizontal sums of four vectors as the four lanes of the result.
inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto half = [](__m512 v) {
    __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v),
                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  };
  __m128 ab = _mm_hadd_ps(half(a), half(b));
  __m128 cd = _mm_hadd_ps(half(c), half(d));
  return _mm_hadd_ps(ab, cd);
}

}  // namespace
}  // namespace gemm_detail
}  // namespace any4
