// AVX-512 (F/BW/VL/DQ) CPU gemm kernel, float32 arithmetic for every dtype.
//
// Decoding: 16 packed bytes (a block of 32 codes) widen to 16 dwords; vpermps
// (_mm512_permutexvar_ps) looks the 16 low nibbles up in the row's 16-entry float32 table held in
// one register (vpermps reads only the low 4 index bits), and, after a shift, the 16 high
// nibbles. So a decoded block is [16 even elements, 16 odd elements]; x rows are converted once
// per call to float32 in the same order.
//
// Small batches (M <= 8) decode straight into registers and split each group's sum as
//     sum_k x_k * (lut[c_k] * s + z) = s * sum_k x_k * lut[c_k] + z * sum_k x_k,
// so the hot loop is one fma per code and x row; the per-group scale is one fma per group, and
// z * sum(x over the group) comes from group sums of x computed once per call.
// Larger batches decode a chunk of the tile's rows into an L1 buffer as w = lut[code] * scale +
// zero (one fma, as the reference), then a register-blocked micro-kernel reuses it for every x
// row.
#include <immintrin.h>

#include "gemm_cpu_avx512_util.h"
#include "gemm_cpu_kernel.h"
#include "gemm_cpu_prefetch.h"

namespace any4 {
namespace gemm_detail {
namespace {

constexpr int64_t kRows = 4;     // weight rows per tile
constexpr int64_t kBlock = 32;   // codes per block (16 packed bytes)
constexpr int kDirectRows = 8;   // x rows up to which blocks are decoded into registers
constexpr int kMR = 4;           // x rows per buffered micro-kernel call
constexpr int64_t kChunk = 512;  // codes per chunk of the buffered path (multiple of kBlock)

// x rows and code rows are processed in whole units (see unit_scale), zero past K.
int64_t padded_k(const GemmArgs& a) {
  if (a.n_groups > 1 && a.group_size % kBlock == 0) return round_up(a.K, a.group_size);
  return round_up(a.K, kBlock);
}

// The 16 packed bytes of block b of a row of P bytes; bytes past the row end read as zero.
inline __m128i load_block_codes(const uint8_t* row, int64_t P, int64_t b) {
  const int64_t off = b * 16, rem = P - off;
  if (rem >= 16) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off));
  if (rem <= 0) return _mm_setzero_si128();
  return _mm_maskz_loadu_epi8(low_mask16(rem), row + off);
}

inline void decode_block(__m128i codes, __m512 table, __m512& lo, __m512& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(codes);
  lo = _mm512_permutexvar_ps(v, table);
  hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
}

// Group of each lane of block b (the same for its even and odd halves: group boundaries are
// multiples of 8), as an offset from g0 = first group of the block. A block of 32 elements
// starting at a multiple of 8 spans at most 4 groups (group_size a multiple of 8, several
// groups, so group_size < K < 2^31).
inline __m512i block_group_offsets(int64_t b, int64_t G, int64_t& g0) {
  const int64_t k0 = b * kBlock;
  g0 = k0 / G;
  const __m512i k =
      _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(k0)),
                       _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0));
  const __m512i one = _mm512_set1_epi32(1);
  __m512i off = _mm512_setzero_si512();
  for (int64_t j = 1; j <= 3; ++j) {
    const __m512i bound = _mm512_set1_epi32(static_cast<int>((g0 + j) * G));
    off = _mm512_mask_add_epi32(off, _mm512_cmpge_epi32_mask(k, bound), off, one);
  }
  return off;
}

// ---------------------------------------------------------------- x preparation
// Per pass of mb rows: float32 rows of Kx elements ([even 16, odd 16] per block, zero past K),
// then float32 group sums [mb][group_slots] (used by the direct path).
size_t x_sums_offset(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(mb * padded_k(a)) * sizeof(float);
}

size_t x_bytes(const GemmArgs& a, int64_t mb) {
  return x_sums_offset(a, mb) + static_cast<size_t>(mb * group_slots(a.n_groups)) * sizeof(float);
}

void prepare_x(const GemmArgs& a, int64_t m0, int64_t mb, int64_t r0, int64_t r1, void* xbuf) {
  const int64_t K = a.K, Kx = padded_k(a), G = a.group_size, slots = group_slots(a.n_groups);
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  float* xb = static_cast<float*>(xbuf);
  float* sums = reinterpret_cast<float*>(static_cast<char*>(xbuf) + x_sums_offset(a, mb));
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t src = (m0 + r) * K;
    float* dst = xb + r * Kx;
    for (int64_t k0 = 0; k0 < Kx; k0 += kBlock) {
      const int64_t valid = K - k0;
      const __m512 lo = load_f32x16(a.x, a.x_dtype, src + k0, imin(16, valid));
      const __m512 hi = load_f32x16(a.x, a.x_dtype, src + k0 + 16, imin(16, valid - 16));
      _mm512_store_ps(dst + k0, _mm512_permutex2var_ps(lo, even, hi));
      _mm512_store_ps(dst + k0 + 16, _mm512_permutex2var_ps(lo, odd, hi));
    }
    float* sum_row = sums + r * slots;
    for (int64_t g = 0; g < slots; ++g) sum_row[g] = 0.f;
    for (int64_t g = 0; g < a.n_groups; ++g) {
      const int64_t end = imin(K, (g + 1) * G);
      __m512 s = _mm512_setzero_ps();
      for (int64_t k = g * G; k < end; k += 16)
        s = _mm512_add_ps(s, load_f32x16(a.x, a.x_dtype, src + k, end - k));
      sum_row[g] = _mm512_reduce_add_ps(s);
    }
  }
}

// ---------------------------------------------------------------- tiles
struct Tile {
  int64_t t = 0, n0 = 0, nr = 0;  // tile index, first weight row, valid rows (<= kRows)
  const uint8_t* rows[kRows];
  __m512 table[kRows];
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
    tile.table[r] = load_table_f32(a, n);
    float* s = scale_zero + 2 * r * slots;
    load_row_scales(a, n, s, s + slots);
    tile.scale[r] = s;
  }
  if (tile.n0 + kRows < a.N)
    for (int64_t r = 0; r < kRows; ++r) prefetch_row_params(a, tile.n0 + kRows + r);
}

using Prefetcher = TilePrefetcher<kRows>;

// y[m0 + m, tile rows] = lane sums of acc[m][r] (+ sum_g zero[r][g] * xsum[m][g] if sums).
inline void store_tile(const GemmArgs& a, const Tile& tile, int64_t m0, int64_t mb, const __m512* acc,
                       const float* sums) {
  const int64_t slots = group_slots(a.n_groups);
  for (int64_t m = 0; m < mb; ++m) {
    __m512 c[kRows];
    for (int64_t r = 0; r < kRows; ++r) {
      c[r] = acc[m * kRows + r];
      if (sums) {
        const float* zero = tile.scale[r] + slots;
        for (int64_t g = 0; g < slots; g += 16)
          c[r] = _mm512_fmadd_ps(_mm512_load_ps(zero + g), _mm512_load_ps(sums + m * slots + g), c[r]);
      }
    }
    static_assert(kRows == 4, "store_tile reduces four rows at a time");
    const __m128 y4 = reduce4(c[0], c[1], c[2], c[3]);
    store_f32x16(a.y, a.x_dtype, (m0 + m) * a.N + tile.n0, tile.nr, _mm512_castps128_ps512(y4));
  }
}

// ---------------------------------------------------------------- direct path (M <= kDirectRows)
// Units: the stretches of codes sharing one scale vector. kAligned (group_size % 32 == 0 or a
// single group): a unit is a group; otherwise a block, with a per-lane scale.
template <bool kAligned>
inline __m512 unit_scale(const float* scale, int64_t G, int64_t u) {
  if (kAligned) return _mm512_set1_ps(scale[u]);
  int64_t g0;
  const __m512i off = block_group_offsets(u, G, g0);
  return _mm512_permutexvar_ps(off, _mm512_loadu_ps(scale + g0));
}

// MR x rows against weight rows [r0, r0 + RS) of the tile.
// Totals in registers when MR * RS <= 8, else in acc (memory), leaving the registers to the
// product sums (the compiler would otherwise keep both and spill).
template <int MR, int RS, bool kAligned>
void direct_tile(const GemmArgs& a, const Tile& tile, Prefetcher& pf, int r0, const float* x,
                 int64_t x_stride, __m512* acc) {
  const int64_t P = (a.K + 1) / 2, G = a.group_size, Kx = padded_k(a);
  const int64_t unit = kAligned ? (a.n_groups == 1 ? Kx : G) : kBlock, blocks_per_unit = unit / kBlock;
  constexpr bool kRegTotals = MR * RS <= 8;
  __m512 table[RS];  // local copies: the compiler reloads tile members in the loop
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
      const int64_t b = u * blocks_per_unit + j, k = b * kBlock;
      for (int r = 0; r < RS; ++r) {
        __m512 lo, hi;
        decode_block(load_block_codes(rows[r], P, b), table[r], lo, hi);
        for (int m = 0; m < MR; ++m) {
          c[m][r][0] = _mm512_fmadd_ps(_mm512_load_ps(x + m * x_stride + k), lo, c[m][r][0]);
          c[m][r][kHalves - 1] =
              _mm512_fmadd_ps(_mm512_load_ps(x + m * x_stride + k + 16), hi, c[m][r][kHalves - 1]);
        }
      }
    }
    for (int r = 0; r < RS; ++r) {
      const __m512 s = unit_scale<kAligned>(tile.scale[r0 + r], G, u);
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

// All kRows weight rows of the tile for `rows` (1..kDirectRows) x rows: in one sweep over the
// codes up to 4 x rows, in two sweeps of two weight rows each above.
template <int MR, bool kAligned>
void direct_rows(int64_t rows, const GemmArgs& a, const Tile& tile, Prefetcher& pf, const float* x,
                 int64_t x_stride, __m512* acc) {
  if constexpr (MR > 1) {
    if (rows < MR) return direct_rows<MR - 1, kAligned>(rows, a, tile, pf, x, x_stride, acc);
  }
  if constexpr (MR <= 4) {
    direct_tile<MR, kRows, kAligned>(a, tile, pf, 0, x, x_stride, acc);
  } else {
    for (int r0 = 0; r0 < kRows; r0 += 2) direct_tile<MR, 2, kAligned>(a, tile, pf, r0, x, x_stride, acc);
  }
}

// ---------------------------------------------------------------- buffered path (M > 4)
// Decodes blocks [b0, b0 + nb) of row r to float32 w = lut[code] * scale + zero.
template <bool kAligned>
inline void decode_affine(const GemmArgs& a, const Tile& tile, int64_t r, int64_t b0, int64_t nb,
                          float* out) {
  const int64_t P = (a.K + 1) / 2, G = a.group_size, slots = group_slots(a.n_groups);
  const float* scale = tile.scale[r];
  const float* zero = scale + slots;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t b = b0 + i;
    __m512 s, z;
    if (kAligned) {
      const int64_t g = a.n_groups == 1 ? 0 : b * kBlock / G;
      s = _mm512_set1_ps(scale[g]);
      z = _mm512_set1_ps(zero[g]);
    } else {
      int64_t g0;
      const __m512i off = block_group_offsets(b, G, g0);
      s = _mm512_permutexvar_ps(off, _mm512_loadu_ps(scale + g0));
      z = _mm512_permutexvar_ps(off, _mm512_loadu_ps(zero + g0));
    }
    __m512 lo, hi;
    decode_block(load_block_codes(tile.rows[r], P, b), tile.table[r], lo, hi);
    _mm512_store_ps(out + i * kBlock, _mm512_fmadd_ps(lo, s, z));
    _mm512_store_ps(out + i * kBlock + 16, _mm512_fmadd_ps(hi, s, z));
  }
}

// acc[m][r] += x[m, :len] . w[r, :len] (16 lanes each) for MR x rows and kRows decoded rows.
template <int MR>
inline void buffered_tile(const float* x, int64_t x_stride, const float* w, int64_t len, __m512* acc) {
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

template <int MR>
void buffered_rows(int64_t rows, const float* x, int64_t x_stride, const float* w, int64_t len, __m512* acc) {
  if constexpr (MR > 1) {
    if (rows < MR) return buffered_rows<MR - 1>(rows, x, x_stride, w, len, acc);
  }
  buffered_tile<MR>(x, x_stride, w, len, acc);
}

size_t scratch_bytes(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(kRows * kChunk + 2 * kRows * group_slots(a.n_groups) + mb * kRows * 16) *
         sizeof(float);
}

template <bool kAligned>
void run_tiles_impl(const GemmArgs& a, int64_t m0, int64_t mb, const float* xb, int64_t t0, int64_t t1,
                    float* scratch) {
  const int64_t Kx = padded_k(a);
  const float* sums =
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(xb) + x_sums_offset(a, mb));
  float* wbuf = scratch;
  float* scale_zero = wbuf + kRows * kChunk;
  __m512* acc = reinterpret_cast<__m512*>(scale_zero + 2 * kRows * group_slots(a.n_groups));
  Tile tile;
  for (int64_t t = t0; t < t1; ++t) {
    load_tile(a, t, scale_zero, tile);
    Prefetcher pf;
    pf.start(a, t);
    if (mb <= kDirectRows) {
      direct_rows<kDirectRows, kAligned>(mb, a, tile, pf, xb, Kx, acc);
      store_tile(a, tile, m0, mb, acc, sums);
      continue;
    }
    for (int64_t i = 0; i < mb * kRows; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < Kx; k0 += kChunk) {
      const int64_t len = imin(kChunk, Kx - k0);
      pf.advance((k0 + len) / 2);
      for (int64_t r = 0; r < kRows; ++r)
        decode_affine<kAligned>(a, tile, r, k0 / kBlock, len / kBlock, wbuf + r * kChunk);
      for (int64_t m = 0; m < mb; m += kMR)
        buffered_rows<kMR>(imin(kMR, mb - m), xb + m * Kx + k0, Kx, wbuf, len, acc + m * kRows);
    }
    store_tile(a, tile, m0, mb, acc, nullptr);
  }
}

void run_tiles(const GemmArgs& a, int64_t m0, int64_t mb, const void* xbuf, int64_t t0, int64_t t1,
               void* scratch) {
  const float* x = static_cast<const float*>(xbuf);
  float* s = static_cast<float*>(scratch);
  if (a.n_groups == 1 || a.group_size % kBlock == 0)
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
