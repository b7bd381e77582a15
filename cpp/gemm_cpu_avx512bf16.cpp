// AVX512-BF16 CPU gemm kernel for bf16 x with bf16 tables (group_size 32 or a multiple of 64).
//
// Each group's sum is split as
//     sum_k x_k * (lut[c_k] * s + z) = s * sum_k x_k * lut[c_k] + z * sum_k x_k,
// so the hot loop multiplies bf16 x by bf16 table values directly: the products are exact in
// float32, and vdpbf16ps (_mm512_dpbf16_ps) does 32 of them per instruction with float32
// accumulation (twice the work of a float32 fma). Per scaling unit (a group, or two groups of
// 32) the products are scaled into a running total with one fma; z * sum(x over the group)
// is added at the end from group sums of x computed once per call for all weight rows.
//
// Decoding: 32 packed bytes (64 codes) widen to 32 words with vpmovzxbw; vpermw looks the low
// nibbles up in the row's bf16 table (16 entries, held twice in one register: vpermw reads 5
// index bits, so the high nibble left in bit 4 does not matter) and, after a 4-bit shift, the
// high nibbles. So a block is [32 even elements, 32 odd elements]; x is reordered to match.
//
// Small batches (M <= 4) decode straight into registers and multiply at once. Larger batches
// decode a chunk of the tile's rows into an L1 buffer and reuse it for every x row.
#include <immintrin.h>

#include "gemm_cpu_avx512_util.h"
#include "gemm_cpu_kernel.h"
#include "gemm_cpu_prefetch.h"

namespace any4 {
namespace gemm_detail {
namespace {

constexpr int64_t kRows = 4;    // weight rows per tile
constexpr int64_t kCodes = 64;  // codes per block (32 packed bytes)
constexpr int kDirectRows = 4;  // x rows up to which blocks are decoded into registers
// x rows per buffered micro-kernel call: 4 x rows x 4 weight rows = 16 independent dot-product
// chains, enough to cover vdpbf16ps latency at two per cycle (2 rows: 8 chains, M=16 took 24%
// longer on the CI machine; 5 or 6 rows spill).
constexpr int kMR = 4;
constexpr int64_t kChunkCodes = 512;  // codes per chunk of the buffered path (whole units)

// Codes per scaling unit: a group, or for group_size 32 a block of two groups (lanes 0-7 of a
// product accumulator hold the first 32 elements of a block, lanes 8-15 the second 32).
inline int64_t unit_codes(const GemmArgs& a) {
  return a.group_size < kCodes ? kCodes : a.group_size;
}

// x and the decoded rows are padded to whole units (zeros past K).
int64_t padded_k(const GemmArgs& a) {
  return round_up(a.K, unit_codes(a));
}

// Scale of unit u as 16 lanes (group_size 32: two groups, 8 lanes each).
inline __m512 unit_scale(const float* scale, int64_t group_size, int64_t u) {
  if (group_size < kCodes)
    return _mm512_insertf32x8(_mm512_set1_ps(scale[2 * u]), _mm256_set1_ps(scale[2 * u + 1]), 1);
  return _mm512_set1_ps(scale[u]);
}

// The 32 packed bytes of block b of a row of P bytes; bytes past the row end read as zero.
inline __m256i load_block_codes32(const uint8_t* row, int64_t P, int64_t b) {
  const int64_t off = b * 32, rem = P - off;
  if (rem >= 32) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + off));
  if (rem <= 0) return _mm256_setzero_si256();
  return _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1u << rem) - 1u), row + off);
}

// Table row n as 32 bf16 words: the 16 entries (zero past lut_len), twice.
inline __m512i load_table_bf16x2(const GemmArgs& a, int64_t n) {
  const int64_t row = a.lut_rows == 1 ? 0 : n;
  const __m256i t =
      _mm256_maskz_loadu_epi16(low_mask16(a.lut_len), static_cast<const uint16_t*>(a.lut) + row * a.lut_len);
  return _mm512_broadcast_i64x4(t);
}

// Decodes a block: lo = table values of the 32 even elements, hi = of the 32 odd elements.
inline void decode_block(__m256i codes, __m512i table, __m512i& lo, __m512i& hi) {
  const __m512i v = _mm512_cvtepu8_epi16(codes);
  lo = _mm512_permutexvar_epi16(v, table);
  hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), table);
}

inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}

// ---------------------------------------------------------------- x preparation
// Per pass of mb rows: bf16 rows of Kx elements, each 64-block ordered [even 32, odd 32], zero
// past K; then float32 group sums [mb][group_slots].
size_t x_sums_offset(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(round_up(mb * padded_k(a) * 2, 64));
}

size_t x_bytes(const GemmArgs& a, int64_t mb) {
  return x_sums_offset(a, mb) + static_cast<size_t>(mb * group_slots(a.n_groups)) * sizeof(float);
}

inline __mmask32 low_mask32(int64_t count) {
  if (count <= 0) return 0;
  return count >= 32 ? 0xffffffffu : static_cast<__mmask32>((1u << count) - 1u);
}

void prepare_x(const GemmArgs& a, int64_t m0, int64_t mb, int64_t r0, int64_t r1, void* xbuf) {
  const int64_t K = a.K, Kx = padded_k(a), G = a.group_size, slots = group_slots(a.n_groups);
  alignas(64) uint16_t even_idx[32], odd_idx[32];
  for (int j = 0; j < 32; ++j) {
    even_idx[j] = static_cast<uint16_t>(2 * j);
    odd_idx[j] = static_cast<uint16_t>(2 * j + 1);
  }
  const __m512i even = _mm512_load_si512(even_idx), odd = _mm512_load_si512(odd_idx);
  uint16_t* xb = static_cast<uint16_t*>(xbuf);
  float* sums = reinterpret_cast<float*>(static_cast<char*>(xbuf) + x_sums_offset(a, mb));
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  for (int64_t r = r0; r < r1; ++r) {
    const uint16_t* src = x + (m0 + r) * K;
    uint16_t* dst = xb + r * Kx;
    for (int64_t k0 = 0; k0 < Kx; k0 += kCodes) {
      const __m512i lo = _mm512_maskz_loadu_epi16(low_mask32(K - k0), src + k0);
      const __m512i hi = _mm512_maskz_loadu_epi16(low_mask32(K - k0 - 32), src + k0 + 32);
      _mm512_store_si512(dst + k0, _mm512_permutex2var_epi16(lo, even, hi));
      _mm512_store_si512(dst + k0 + 32, _mm512_permutex2var_epi16(lo, odd, hi));
    }
    float* sum_row = sums + r * slots;
    for (int64_t g = 0; g < slots; ++g) sum_row[g] = 0.f;
    for (int64_t g = 0; g < a.n_groups; ++g) {
      __m512 s = _mm512_setzero_ps();
      for (int64_t k0 = g * G; k0 < imin(K, (g + 1) * G); k0 += 32) {
        const __m512i v = _mm512_maskz_loadu_epi16(low_mask32(imin(K, (g + 1) * G) - k0), src + k0);
        const __m512 lo =
            _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
        const __m512 hi = _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
        s = _mm512_add_ps(s, _mm512_add_ps(lo, hi));
      }
      sum_row[g] = _mm512_reduce_add_ps(s);
    }
  }
}

// ---------------------------------------------------------------- tiles
struct Tile {
  int64_t t = 0, n0 = 0, nr = 0;  // tile index, first weight row, valid rows (<= kRows)
  const uint8_t* rows[kRows];
  __m512i table[kRows];
  const float* scale[kRows];  // per row: scale[slots], then zero[slots]
};

inline void load_tile(const GemmArgs& a, int64_t t, float* scale_zero, Tile& tile) {
  const int64_t P = (a.K + 1) / 2, slots = group_slots(a.n_groups);
  tile.t = t;
  tile.n0 = t * kRows;
  tile.nr = imin(kRows, a.N - tile.n0);
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t n = tile.n0 + imin(r, tile.nr - 1);  // a short last tile repeats its last row
    tile.rows[r] = a.packed + n * P;
    tile.table[r] = load_table_bf16x2(a, n);
    float* s = scale_zero + 2 * r * slots;
    load_row_scales(a, n, s, s + slots);
    tile.scale[r] = s;
  }
  if (tile.n0 + kRows < a.N)
    for (int64_t r = 0; r < kRows; ++r) prefetch_row_params(a, tile.n0 + kRows + r);
}

using Prefetcher = TilePrefetcher<kRows>;

// y[m0 + m, tile rows] = acc[m][r] + sum_g zero[r][g] * xsum[m][g]  (lanes summed).
inline void store_tile(const GemmArgs& a, const Tile& tile, int64_t m0, int64_t mb, const __m512* acc,
                       const float* sums) {
  const int64_t slots = group_slots(a.n_groups);
  for (int64_t m = 0; m < mb; ++m) {
    __m512 c[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      c[r] = acc[m * kRows + r];
      const float* zero = tile.scale[r] + slots;
      for (int64_t g = 0; g < slots; g += 16)
        c[r] = _mm512_fmadd_ps(_mm512_load_ps(zero + g), _mm512_load_ps(sums + m * slots + g), c[r]);
    }
    static_assert(kRows == 4, "store_tile reduces four rows at a time");
    const __m128 y4 = reduce4(c[0], c[1], c[2], c[3]);
    store_f32x16(a.y, a.x_dtype, (m0 + m) * a.N + tile.n0, tile.nr, _mm512_castps128_ps512(y4));
  }
}

// Whether the code loads of this tile must stop at the row ends. Whole blocks of a row may run
// up to 31 bytes past its end into the following rows: harmless, as the elements past K meet
// x's zero padding (table values are finite). Only where that would run past the end of
// `packed` (the last tiles), or rows repeat (a short last tile), are the loads masked.
inline bool needs_checked_loads(const GemmArgs& a, const Tile& tile) {
  const int64_t P = (a.K + 1) / 2, last_byte = (tile.n0 + kRows - 1) * P + padded_k(a) / 2;
  return tile.nr < kRows || last_byte > a.N * P;
}

// Direct path: MR x rows against weight rows [r0, r0 + RS) of the tile, blocks decoded into
// registers. Totals in registers when MR * RS <= 8, else in acc (memory), leaving the registers
// to the product sums (the compiler would otherwise keep both and spill).
template <int MR, int RS, bool kChecked>
void direct_tile(const GemmArgs& a, const Tile& tile, Prefetcher& pf, int r0, const uint16_t* x,
                 int64_t x_stride, __m512* acc) {
  const int64_t P = (a.K + 1) / 2, G = a.group_size, unit = unit_codes(a), Kx = padded_k(a);
  const int64_t blocks_per_unit = unit / kCodes;
  constexpr bool kRegTotals = MR * RS <= 8;
  __m512i table[RS];  // local copies: the compiler reloads tile members in the loop
  const uint8_t* rows[RS];
  for (int r = 0; r < RS; ++r) {
    table[r] = tile.table[r0 + r];
    rows[r] = tile.rows[r0 + r];
  }
  __m512 tot[MR][RS];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RS; ++r) tot[m][r] = _mm512_setzero_ps();
  for (int64_t u = 0; u * unit < Kx; ++u) {
    if (r0 == 0) pf.advance((u + 1) * unit / 2);
    // Few accumulators: separate ones for the even and odd halves, so that enough independent
    // fma chains are in flight (two dependent fmas per block would be latency-bound).
    constexpr int kHalves = MR * RS <= 4 ? 2 : 1;
    __m512 c[MR][RS][kHalves];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < RS; ++r)
        for (int h = 0; h < kHalves; ++h) c[m][r][h] = _mm512_setzero_ps();
    for (int64_t j = 0; j < blocks_per_unit; ++j) {
      const int64_t b = u * blocks_per_unit + j, k = b * kCodes;
      for (int r = 0; r < RS; ++r) {
        __m512i lo, hi;
        const __m256i codes = kChecked
                                  ? load_block_codes32(rows[r], P, b)
                                  : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + b * 32));
        decode_block(codes, table[r], lo, hi);
        for (int m = 0; m < MR; ++m) {
          c[m][r][0] = dot_bf16(c[m][r][0], _mm512_load_si512(x + m * x_stride + k), lo);
          c[m][r][kHalves - 1] =
              dot_bf16(c[m][r][kHalves - 1], _mm512_load_si512(x + m * x_stride + k + 32), hi);
        }
      }
    }
    for (int r = 0; r < RS; ++r) {
      const __m512 s = unit_scale(tile.scale[r0 + r], G, u);
      for (int m = 0; m < MR; ++m) {
        const __m512 sum = kHalves == 2 ? _mm512_add_ps(c[m][r][0], c[m][r][kHalves - 1]) : c[m][r][0];
        if (kRegTotals)
          tot[m][r] = _mm512_fmadd_ps(sum, s, tot[m][r]);
        else
          acc[m * kRows + r0 + r] =
              _mm512_fmadd_ps(sum, s, u > 0 ? acc[m * kRows + r0 + r] : _mm512_setzero_ps());
      }
    }
    if (!kRegTotals) asm volatile("" ::: "memory");  // keep the totals in memory (see above)
  }
  if (kRegTotals)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < RS; ++r) acc[m * kRows + r0 + r] = tot[m][r];
}

// All kRows weight rows of the tile for `rows` (1..kDirectRows) x rows, in one sweep over the
// codes.
template <int MR, bool kChecked>
void direct_rows(int64_t rows, const GemmArgs& a, const Tile& tile, Prefetcher& pf, const uint16_t* x,
                 int64_t x_stride, __m512* acc) {
  static_assert(MR <= 4, "more x rows than this need a sweep per pair of weight rows");
  if constexpr (MR > 1) {
    if (rows < MR) return direct_rows<MR - 1, kChecked>(rows, a, tile, pf, x, x_stride, acc);
  }
  direct_tile<MR, kRows, kChecked>(a, tile, pf, 0, x, x_stride, acc);
}

// Buffered path: decode a chunk of the tile's rows into w (row r at w + r * w_stride, each
// block [lo 32 words, hi 32 words]).
inline void decode_chunk(const GemmArgs& a, const Tile& tile, int64_t k0, int64_t len, uint16_t* w,
                         int64_t w_stride) {
  const int64_t P = (a.K + 1) / 2;
  for (int64_t r = 0; r < kRows; ++r)
    for (int64_t k = 0; k < len; k += kCodes) {
      __m512i lo, hi;
      decode_block(load_block_codes32(tile.rows[r], P, (k0 + k) / kCodes), tile.table[r], lo, hi);
      _mm512_store_si512(w + r * w_stride + k, lo);
      _mm512_store_si512(w + r * w_stride + k + 32, hi);
    }
}

// acc[m][r] += sum over the chunk's units of scale * (x[m] . decoded row r), MR x rows.
template <int MR>
inline void buffered_tile(const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t w_stride,
                          int64_t units, int64_t unit, int64_t u0, int64_t G, const Tile& tile, __m512* acc) {
  __m512 tot[MR][kRows];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRows; ++r) tot[m][r] = acc[m * kRows + r];
  for (int64_t u = 0; u < units; ++u) {
    __m512 c[MR][kRows];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < kRows; ++r) c[m][r] = _mm512_setzero_ps();
#pragma GCC unroll 1
    for (int64_t k = u * unit; k < (u + 1) * unit; k += 32) {
      __m512i wv[kRows];
      for (int r = 0; r < kRows; ++r) wv[r] = _mm512_load_si512(w + r * w_stride + k);
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_load_si512(x + m * x_stride + k);
        for (int r = 0; r < kRows; ++r) c[m][r] = dot_bf16(c[m][r], xv, wv[r]);
      }
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512 s = unit_scale(tile.scale[r], G, u0 + u);
      for (int m = 0; m < MR; ++m) tot[m][r] = _mm512_fmadd_ps(c[m][r], s, tot[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRows; ++r) acc[m * kRows + r] = tot[m][r];
}

template <int MR>
void buffered_rows(int64_t rows, const uint16_t* x, int64_t x_stride, const uint16_t* w, int64_t w_stride,
                   int64_t units, int64_t unit, int64_t u0, int64_t G, const Tile& tile, __m512* acc) {
  if constexpr (MR > 1) {
    if (rows < MR)
      return buffered_rows<MR - 1>(rows, x, x_stride, w, w_stride, units, unit, u0, G, tile, acc);
  }
  buffered_tile<MR>(x, x_stride, w, w_stride, units, unit, u0, G, tile, acc);
}

inline int64_t chunk_codes(const GemmArgs& a) {
  const int64_t unit = unit_codes(a);
  return imax(1, kChunkCodes / unit) * unit;
}

size_t scratch_bytes(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(kRows * chunk_codes(a)) * 2 +
         static_cast<size_t>(2 * kRows * group_slots(a.n_groups) + mb * kRows * 16) * sizeof(float);
}

void run_tiles(const GemmArgs& a, int64_t m0, int64_t mb, const void* xbuf, int64_t t0, int64_t t1,
               void* scratch) {
  const int64_t Kx = padded_k(a), unit = unit_codes(a), chunk = chunk_codes(a);
  const uint16_t* xb = static_cast<const uint16_t*>(xbuf);
  const float* sums = reinterpret_cast<const float*>(static_cast<const char*>(xbuf) + x_sums_offset(a, mb));
  uint16_t* wbuf = static_cast<uint16_t*>(scratch);
  float* scale_zero = reinterpret_cast<float*>(wbuf + kRows * chunk);
  __m512* acc = reinterpret_cast<__m512*>(scale_zero + 2 * kRows * group_slots(a.n_groups));
  Tile tile;
  for (int64_t t = t0; t < t1; ++t) {
    load_tile(a, t, scale_zero, tile);
    Prefetcher pf;
    pf.start(a, t);
    if (mb <= kDirectRows) {
      if (needs_checked_loads(a, tile))
        direct_rows<kDirectRows, true>(mb, a, tile, pf, xb, Kx, acc);
      else
        direct_rows<kDirectRows, false>(mb, a, tile, pf, xb, Kx, acc);
    } else {
      for (int64_t i = 0; i < mb * kRows; ++i) acc[i] = _mm512_setzero_ps();
      for (int64_t k0 = 0; k0 < Kx; k0 += chunk) {
        const int64_t len = imin(chunk, Kx - k0);
        pf.advance((k0 + len) / 2);
        decode_chunk(a, tile, k0, len, wbuf, chunk);
        for (int64_t m = 0; m < mb; m += kMR)
          buffered_rows<kMR>(imin(kMR, mb - m), xb + m * Kx + k0, Kx, wbuf, chunk, len / unit, unit,
                             k0 / unit, a.group_size, tile, acc + m * kRows);
      }
    }
    store_tile(a, tile, m0, mb, acc, sums);
  }
}

}  // namespace

Kernel avx512bf16_kernel() {
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
