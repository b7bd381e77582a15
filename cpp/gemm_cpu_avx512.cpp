// AVX-512 (F/BW/VL/DQ) CPU gemm kernel, float32 arithmetic for every dtype.
//
// Per tile of kRows weight rows and per k-chunk, the codes are decoded once into a small float32
// buffer (L1-resident): 16 packed bytes widen to 16 dwords; vpermps (_mm512_permutexvar_ps)
// looks up the 16 low nibbles in the row's 16-entry table held in one register, and, after a
// shift, the 16 high nibbles (vpermps reads only the low 4 index bits); one fma applies the
// group's (scale, zero): w = lut[code] * scale + zero exactly as the reference. x rows were
// converted once per call to float32 in the same [even, odd] order per 32-element block.
// Then a register-blocked micro-kernel (kMR x rows by kRows weight rows, 16-lane accumulators)
// reuses each decoded chunk for every x row; the accumulators live in a per-worker buffer
// between chunks and are reduced horizontally once per output.
#include <immintrin.h>

#include "gemm_cpu_avx512_util.h"
#include "gemm_cpu_kernel.h"

namespace any4 {
namespace gemm_detail {
namespace {

constexpr int64_t kRows = 4;     // weight rows per tile
constexpr int kMR = 4;           // x rows per micro-kernel call
constexpr int64_t kChunk = 512;  // codes per k-chunk (multiple of kBlock)

// Blocks per group when every block lies in one group (group_size % 32 == 0, or a single
// group), else 0.
inline int64_t aligned_blocks_per_group(const GemmArgs& a) {
  if (a.n_groups == 1) return a.K / kBlock + 2;
  return a.group_size % kBlock == 0 ? a.group_size / kBlock : 0;
}

// Decodes blocks [b0, b0 + nb) of one weight row to float32 w = lut[code] * scale + zero.
// kAligned: every block lies in one group, blocks_per_group of them per group.
template <bool kAligned>
inline void decode_row(const uint8_t* row, int64_t P, __m512 table, const float* scale, const float* zero,
                       int64_t G, int64_t blocks_per_group, int64_t b0, int64_t nb, float* out) {
  if (kAligned) {
    int64_t g = b0 / blocks_per_group, j = b0 - g * blocks_per_group;
    __m512 s = _mm512_set1_ps(scale[g]), z = _mm512_set1_ps(zero[g]);
    for (int64_t i = 0; i < nb; ++i) {
      const __m512i v = _mm512_cvtepu8_epi32(load_block_codes(row, P, b0 + i));
      const __m512 lo = _mm512_permutexvar_ps(v, table);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      _mm512_store_ps(out + i * kBlock, _mm512_fmadd_ps(lo, s, z));
      _mm512_store_ps(out + i * kBlock + 16, _mm512_fmadd_ps(hi, s, z));
      if (++j == blocks_per_group) {
        j = 0;
        ++g;
        s = _mm512_set1_ps(scale[g]);
        z = _mm512_set1_ps(zero[g]);
      }
    }
  } else {
    // A block of 32 elements starting at a multiple of 8 spans at most 4 groups (G >= 8 and a
    // multiple of 8, more than one group, so G < K < 2^31): lane
    // group = g0 + #{j in 1..3 : k >= (g0 + j) * G}, looked up in the 16 scales from g0 on.
    const __m512i lane_even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i one = _mm512_set1_epi32(1);
    for (int64_t i = 0; i < nb; ++i) {
      const int64_t k0 = (b0 + i) * kBlock, g0 = k0 / G;
      const __m512i k_even = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k0)), lane_even);
      const __m512i k_odd = _mm512_add_epi32(k_even, one);
      __m512i off_even = _mm512_setzero_si512(), off_odd = _mm512_setzero_si512();
      for (int64_t j = 1; j <= 3; ++j) {
        const __m512i bound = _mm512_set1_epi32(static_cast<int>((g0 + j) * G));
        off_even = _mm512_mask_add_epi32(off_even, _mm512_cmpge_epi32_mask(k_even, bound), off_even, one);
        off_odd = _mm512_mask_add_epi32(off_odd, _mm512_cmpge_epi32_mask(k_odd, bound), off_odd, one);
      }
      const __m512 s16 = _mm512_loadu_ps(scale + g0), z16 = _mm512_loadu_ps(zero + g0);
      const __m512i v = _mm512_cvtepu8_epi32(load_block_codes(row, P, b0 + i));
      const __m512 lo = _mm512_permutexvar_ps(v, table);
      const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      _mm512_store_ps(out + i * kBlock, _mm512_fmadd_ps(lo, _mm512_permutexvar_ps(off_even, s16),
                                                        _mm512_permutexvar_ps(off_even, z16)));
      _mm512_store_ps(out + i * kBlock + 16, _mm512_fmadd_ps(hi, _mm512_permutexvar_ps(off_odd, s16),
                                                             _mm512_permutexvar_ps(off_odd, z16)));
    }
  }
}

// acc[m][r] += x[m, :len] . w[r, :len] (16 lanes each) for MR x rows and kRows decoded rows.
template <int MR>
inline void dot_tile(const float* x, int64_t x_stride, const float* w, int64_t len, __m512* acc) {
  __m512 c[MR][kRows];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRows; ++r) c[m][r] = acc[m * kRows + r];
  for (int64_t k = 0; k < len; k += 16) {
    __m512 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm512_load_ps(w + r * kChunk + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_load_ps(x + m * x_stride + k);
      for (int r = 0; r < kRows; ++r) c[m][r] = _mm512_fmadd_ps(xv, wv[r], c[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRows; ++r) acc[m * kRows + r] = c[m][r];
}

int64_t padded_k(const GemmArgs& a) {
  return round_up(a.K, kBlock);
}

size_t x_bytes(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(mb * padded_k(a)) * sizeof(float);
}

void prepare_x(const GemmArgs& a, int64_t m0, int64_t mb, int64_t r0, int64_t r1, void* xbuf) {
  prepare_x_f32(a, m0, r0, r1, static_cast<float*>(xbuf));
}

size_t scratch_bytes(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(kRows * kChunk + 2 * kRows * group_slots(a.n_groups) + mb * kRows * 16) *
         sizeof(float);
}

template <bool kAligned>
void run_tiles_impl(const GemmArgs& a, int64_t m0, int64_t mb, const float* xbuf, int64_t t0, int64_t t1,
                    float* scratch) {
  const int64_t K = a.K, N = a.N, P = (K + 1) / 2, Kx = padded_k(a), slots = group_slots(a.n_groups);
  const int64_t blocks_per_group = aligned_blocks_per_group(a);
  float* wbuf = scratch;
  float* scale_zero = wbuf + kRows * kChunk;  // per row: scale[slots], zero[slots]
  __m512* acc = reinterpret_cast<__m512*>(scale_zero + 2 * kRows * slots);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * kRows, nr = imin(kRows, N - n0);
    __m512 table[kRows];
    const uint8_t* rows[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      const int64_t n = n0 + imin(r, nr - 1);  // a short last tile repeats its last row
      table[r] = load_table_f32(a, n);
      rows[r] = a.packed + n * P;
      load_row_scales(a, n, scale_zero + 2 * r * slots, scale_zero + (2 * r + 1) * slots);
    }
    for (int64_t i = 0; i < mb * kRows; ++i) acc[i] = _mm512_setzero_ps();
    const bool prefetch_next = n0 + kRows < N;
    if (prefetch_next)
      for (int64_t r = 0; r < kRows; ++r) prefetch_row_params(a, n0 + kRows + r);
    for (int64_t kc = 0; kc < Kx; kc += kChunk) {
      const int64_t len = imin(kChunk, Kx - kc);
      for (int64_t r = 0; r < kRows; ++r) {
        if (prefetch_next) {  // this chunk's codes of the next tile's row r (rows are contiguous)
          const uint8_t* next = rows[r] + kRows * P;
          for (int64_t off = kc / 2; off < imin(P, (kc + len) / 2); off += 64) prefetch_line(next + off);
        }
        decode_row<kAligned>(rows[r], P, table[r], scale_zero + 2 * r * slots, scale_zero + (2 * r + 1) * slots,
                             a.group_size, blocks_per_group, kc / kBlock, len / kBlock, wbuf + r * kChunk);
      }
      const float* x = xbuf + kc;
      int64_t m = 0;
      for (; m + kMR <= mb; m += kMR) dot_tile<kMR>(x + m * Kx, Kx, wbuf, len, acc + m * kRows);
      switch (mb - m) {
        case 3:
          dot_tile<3>(x + m * Kx, Kx, wbuf, len, acc + m * kRows);
          break;
        case 2:
          dot_tile<2>(x + m * Kx, Kx, wbuf, len, acc + m * kRows);
          break;
        case 1:
          dot_tile<1>(x + m * Kx, Kx, wbuf, len, acc + m * kRows);
          break;
        default:
          break;
      }
    }
    for (int64_t m = 0; m < mb; ++m) {
      const __m512* c = acc + m * kRows;
      const __m128 y4 = reduce4(c[0], c[1], c[2], c[3]);
      store_f32x16(a.y, a.x_dtype, (m0 + m) * N + n0, nr, _mm512_castps128_ps512(y4));
    }
  }
}

void run_tiles(const GemmArgs& a, int64_t m0, int64_t mb, const void* xbuf, int64_t t0, int64_t t1,
               void* scratch) {
  const float* x = static_cast<const float*>(xbuf);
  float* s = static_cast<float*>(scratch);
  if (aligned_blocks_per_group(a) > 0)
    run_tiles_impl<true>(a, m0, mb, x, t0, t1, s);
  else
    run_tiles_impl<false>(a, m0, mb, x, t0, t1, s);
}

}  // namespace

Kernel avx512_kernel() {
  Kernel k;
  k.tile_rows = kRows;
  k.pass_rows = 64;
  k.x_bytes = x_bytes;
  k.prepare_x = prepare_x;
  k.scratch_bytes = scratch_bytes;
  k.run_tiles = run_tiles;
  return k;
}

}  // namespace gemm_detail
}  // namespace any4
