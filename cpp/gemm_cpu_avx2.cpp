// AVX2 + FMA (+ F16C) CPU gemm kernel, float32 arithmetic for every dtype.
//
// Same structure as the AVX-512 kernel with 8 lanes: a block is 16 codes (8 packed bytes),
// decoded as [8 even elements, 8 odd elements]; the 16-entry float32 table is two 8-entry
// registers, vpermps looks up both halves and a blend on bit 3 of the code (moved to the sign
// bit) picks one. Small batches (M <= 4) decode into registers and split each group's sum as
// sum(x * (s * lut)[code]) + z * sum(x) (group sums of x computed once per call): when every
// block lies in one group the scale is folded into the table once per group and row, so the
// loop over a row is just decode + fma into accumulators held for the whole row (cheapest per
// weight, which is what makes 3/2-bit codes pay off at batch 1); groups that are not whole
// blocks scale each block's sum lane by lane instead. Larger batches decode
// w = lut[code] * scale + zero with one fma into a small per-tile buffer, then a
// register-blocked micro-kernel reuses it for all x rows.
//
// bf16 tables (group size a multiple of 32) take a cheaper lookup: vpshufb looks 32 codes up at
// once in the two byte planes of the 16 bf16 entries (low bytes, high bytes), two byte unpacks
// give 32 bf16 values and a shift / mask widens them to float32 (exact). That decodes a block
// of 32 codes in about half the instructions of the two-halves lookup, in another element order
// (see shuf_k), which x follows.
//
// 3- and 2-bit codes (pack.h: one dense bit stream per row) share every loop with 4-bit codes:
// only the decode step is a template on the code width (Codes<kBits>). A block is 8 lanes of
// kPerLane consecutive codes (4-bit: 2 per byte, 16-blocks; 3-bit: 12 bits per lane, gathered by
// one vpshufb, 32-blocks; 2-bit: 4 per byte, 32-blocks); decoded vector c holds code c of every
// lane, i.e. elements kPerLane * i + c, and x is reordered to match. Their tables have at most 8
// entries, so one vpermps looks 8 codes up (no blend): bits above the code are ignored by vpermps
// (3-bit) or land on a copy of the 4-entry table (2-bit, the table is held twice).
// Only this file's own functions and plain loops: see gemm_cpu_kernel.h for why.
#include <immintrin.h>

#include <cstring>

#include "gemm_cpu_kernel.h"
#include "gemm_cpu_prefetch.h"

namespace any4 {
namespace gemm_detail {
namespace {

constexpr int64_t kBlock = 16;   // codes per block of 4-bit codes (8 packed bytes)
constexpr int64_t kRows = 4;     // weight rows per tile
constexpr int kMR = 2;           // x rows per buffered micro-kernel call
constexpr int kDirectRows = 4;   // x rows up to which blocks are decoded into registers
constexpr int64_t kChunk = 512;  // codes per k-chunk (multiple of kBlock)

inline int64_t imin(int64_t a, int64_t b) {
  return a < b ? a : b;
}
inline int64_t imax(int64_t a, int64_t b) {
  return a > b ? a : b;
}
inline int64_t round_up(int64_t a, int64_t b) {
  return (a + b - 1) / b * b;
}

inline int64_t elem_size(DType d) {
  return d == DType::F32 ? 4 : 2;
}

// 8 elements of dtype d from p[offset, offset + count) as float32 (count in [0, 8], rest zero).
inline __m256 load8_f32(const void* p, DType d, int64_t offset, int64_t count) {
  alignas(32) unsigned char tmp[32];
  const int64_t es = elem_size(d);
  const unsigned char* src = static_cast<const unsigned char*>(p) + offset * es;
  if (count < 8) {
    std::memset(tmp, 0, sizeof(tmp));
    if (count > 0) std::memcpy(tmp, src, static_cast<size_t>(count * es));
    src = tmp;
  }
  switch (d) {
    case DType::F32:
      return _mm256_loadu_ps(reinterpret_cast<const float*>(src));
    case DType::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
    case DType::BF16:
    default:
      return _mm256_castsi256_ps(_mm256_slli_epi32(
          _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src))), 16));
  }
}

// Bytes p[0, 8) widened to 8 dwords.
inline __m256i load8_widened(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

// The 8 packed bytes of block b of a row of P bytes, widened to 8 dwords (past the row end: 0).
inline __m256i load_block_codes(const uint8_t* row, int64_t P, int64_t b) {
  const int64_t off = b * 8, rem = P - off;
  if (rem >= 8) return load8_widened(row + off);
  alignas(16) unsigned char tmp[16] = {0};
  if (rem > 0) std::memcpy(tmp, row + off, static_cast<size_t>(rem));
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tmp)));
}

// table[idx & 15] for 8 indices (bits above 3 ignored).
inline __m256 lookup16(__m256i idx, __m256 table_lo, __m256 table_hi) {
  const __m256 lo = _mm256_permutevar8x32_ps(table_lo, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(table_hi, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// The decode step for kBits-bit codes: a block is kBlockCodes codes of a packed row, 8 lanes of
// kPerLane consecutive codes each; load() gives every lane its codes at bit 0 (zero past the row
// end), lookup() the table values of the codes in the low bits of each lane.
template <int kBits>
struct Codes;

template <>
struct Codes<4> {
  static constexpr int kPerLane = 2;
  static constexpr int64_t kBlockCodes = 16, kBlockBytes = 8, kLoadBytes = 8;
  static __m256i load(const uint8_t* row, int64_t P, int64_t b) { return load_block_codes(row, P, b); }
  static __m256i load_full(const uint8_t* row, int64_t b) { return load8_widened(row + b * kBlockBytes); }
  static __m256 lookup(__m256i idx, __m256 t_lo, __m256 t_hi) { return lookup16(idx, t_lo, t_hi); }
};

template <>
struct Codes<2> {
  static constexpr int kPerLane = 4;
  static constexpr int64_t kBlockCodes = 32, kBlockBytes = 8, kLoadBytes = 8;
  static __m256i load(const uint8_t* row, int64_t P, int64_t b) { return load_block_codes(row, P, b); }
  static __m256i load_full(const uint8_t* row, int64_t b) { return load8_widened(row + b * kBlockBytes); }
  // t_lo holds the 4 entries in both 128-bit halves: vpermilps (in-lane, cheaper than vpermps)
  // reads index bits 0-1 only.
  static __m256 lookup(__m256i idx, __m256 t_lo, __m256) { return _mm256_permutevar_ps(t_lo, idx); }
};

template <>
struct Codes<3> {
  static constexpr int kPerLane = 4;
  static constexpr int64_t kBlockCodes = 32, kBlockBytes = 12, kLoadBytes = 16;
  // Lane i: the 16 bits at byte 3i/2 of the block's 12 bytes, shifted right by 4 for odd i.
  static __m256i spread(const unsigned char* p) {  // p[0, 16) readable; bytes 12-15 unused
    const __m256i gather = _mm256_setr_epi8(0, 1, -1, -1, 1, 2, -1, -1, 3, 4, -1, -1, 4, 5, -1, -1,  //
                                            6, 7, -1, -1, 7, 8, -1, -1, 9, 10, -1, -1, 10, 11, -1, -1);
    const __m256i odd_shift = _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4);
    return _mm256_srlv_epi32(
        _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                            gather),
        odd_shift);
  }
  static __m256i load_full(const uint8_t* row, int64_t b) { return spread(row + b * kBlockBytes); }
  static __m256i load(const uint8_t* row, int64_t P, int64_t b) {
    const int64_t off = b * kBlockBytes, rem = P - off;
    if (rem >= kLoadBytes) return load_full(row, b);
    alignas(16) unsigned char tmp[16] = {0};
    if (rem > 0) std::memcpy(tmp, row + off, static_cast<size_t>(rem < 12 ? rem : 12));
    return spread(tmp);
  }
  static __m256 lookup(__m256i idx, __m256 t_lo, __m256) { return _mm256_permutevar8x32_ps(t_lo, idx); }
};

// Decodes block b of a row into kPerLane vectors of table values (vector c lane i: code
// kPerLane * i + c of the block). kFull: the block's kLoadBytes bytes lie inside the row (no
// check of the row end).
template <int kBits, bool kFull = false>
inline void decode_block(const uint8_t* row, int64_t P, int64_t b, __m256 t_lo, __m256 t_hi,
                         __m256 out[Codes<kBits>::kPerLane]) {
  const __m256i v = kFull ? Codes<kBits>::load_full(row, b) : Codes<kBits>::load(row, P, b);
  for (int c = 0; c < Codes<kBits>::kPerLane; ++c)
    out[c] = Codes<kBits>::lookup(c == 0 ? v : _mm256_srli_epi32(v, c * kBits), t_lo, t_hi);
}

inline int64_t block_codes(int bits) {
  return bits == 4 ? Codes<4>::kBlockCodes : bits == 3 ? Codes<3>::kBlockCodes : Codes<2>::kBlockCodes;
}
inline int64_t row_bytes(const GemmArgs& a) {
  return (a.K * a.bits + 7) / 8;
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// float32 -> bfloat16 bits (round to nearest even, NaN stays NaN) for 8 values.
inline __m128i f32_to_bf16_bits(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  r = _mm256_blendv_epi8(r, quiet, nan);
  // Pack the low 16 bits of the 8 dwords (values < 2^16, so unsigned saturation is exact).
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

// Stores the first count (<= 8) lanes of v to p[offset...] as dtype d.
inline void store8(void* p, DType d, int64_t offset, int64_t count, __m256 v) {
  alignas(32) unsigned char tmp[32];
  const int64_t es = elem_size(d);
  switch (d) {
    case DType::F32:
      _mm256_store_ps(reinterpret_cast<float*>(tmp), v);
      break;
    case DType::F16:
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp),
                      _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::BF16:
    default:
      _mm_store_si128(reinterpret_cast<__m128i*>(tmp), f32_to_bf16_bits(v));
      break;
  }
  std::memcpy(static_cast<unsigned char*>(p) + offset * es, tmp, static_cast<size_t>(count * es));
}

inline int64_t group_slots(int64_t n_groups) {
  return round_up(n_groups + 8, 8);
}

// The 16 values [lo, hi] split into their even elements (to ev[0, 8)) and odd ones (od[0, 8)).
inline void store_even_odd(__m256 lo, __m256 hi, float* ev, float* od) {
  // shuffle_ps works per 128-bit lane: [l0 l2 h0 h2 | l4 l6 h4 h6]; permute4x64 fixes the order.
  const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  const __m256 o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  _mm256_store_ps(ev, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), 0xd8)));
  _mm256_store_ps(od, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), 0xd8)));
}

// The vpshufb lookup: bf16 tables, every 32-code block in one group.
constexpr int64_t kShufBlock = 32;
inline bool shuf_mode(const GemmArgs& a) {
  return a.bits == 4 && a.table_dtype == DType::BF16 && (a.n_groups == 1 || a.group_size % kShufBlock == 0);
}

// Element of a 32-block held by lane i (0-7) of decoded vector q (0-3) in the vpshufb order.
inline int64_t shuf_k(int64_t q, int64_t i) {
  return 16 * (q / 2) + 2 * (q % 2) + 4 * (i % 4) + i / 4;
}

// x rows and code rows are processed in whole units (see direct_tile_scaled), zero past K.
int64_t padded_k(const GemmArgs& a) {
  const int64_t block = shuf_mode(a) ? kShufBlock : block_codes(a.bits);
  if (a.n_groups > 1 && a.group_size % block == 0) return round_up(a.K, a.group_size);
  return round_up(a.K, block);
}

// Per pass of mb rows: float32 rows of Kx elements, each block in decode order (4-bit 16-blocks
// [even 8, odd 8]; see Codes), zero past K; then float32 group sums [mb][group_slots] (used by
// the direct path).
size_t x_sums_offset(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(mb * padded_k(a)) * sizeof(float);
}

size_t x_bytes(const GemmArgs& a, int64_t mb) {
  return x_sums_offset(a, mb) + static_cast<size_t>(mb * group_slots(a.n_groups)) * sizeof(float);
}

void prepare_x(const GemmArgs& a, int64_t m0, int64_t mb, int64_t r0, int64_t r1, void* xbuf) {
  const int64_t K = a.K, Kx = padded_k(a), G = a.group_size, slots = group_slots(a.n_groups);
  float* xb = static_cast<float*>(xbuf);
  float* sums = reinterpret_cast<float*>(static_cast<char*>(xbuf) + x_sums_offset(a, mb));
  // Reordered through a table: the vpshufb order (shuf_k) or the 3/2-bit decode order (vector c
  // lane i = element 4i + c of a 32-block).
  const bool shuf = shuf_mode(a), reorder = shuf || a.bits != 4;
  int order[kShufBlock];
  for (int q = 0; q < 4; ++q)
    for (int i = 0; i < 8; ++i) order[q * 8 + i] = static_cast<int>(shuf ? shuf_k(q, i) : 4 * i + q);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t src = (m0 + r) * K;
    float* dst = xb + r * Kx;
    for (int64_t k0 = 0; reorder && k0 < Kx; k0 += kShufBlock) {
      alignas(32) float tmp[kShufBlock];
      for (int64_t q = 0; q < 4; ++q)
        _mm256_store_ps(tmp + 8 * q,
                        load8_f32(a.x, a.x_dtype, src + k0 + 8 * q, imax(0, imin(8, K - k0 - 8 * q))));
      for (int j = 0; j < kShufBlock; ++j) dst[k0 + j] = tmp[order[j]];
    }
    for (int64_t k0 = 0; !reorder && k0 < Kx; k0 += kBlock) {
      store_even_odd(load8_f32(a.x, a.x_dtype, src + k0, imax(0, imin(8, K - k0))),
                     load8_f32(a.x, a.x_dtype, src + k0 + 8, imax(0, imin(8, K - k0 - 8))), dst + k0,
                     dst + k0 + 8);
    }
    float* sum_row = sums + r * slots;
    for (int64_t g = 0; g < slots; ++g) sum_row[g] = 0.f;
    for (int64_t g = 0; g < a.n_groups; ++g) {
      const int64_t end = imin(K, (g + 1) * G);
      __m256 s = _mm256_setzero_ps();
      for (int64_t k = g * G; k < end; k += 8)
        s = _mm256_add_ps(s, load8_f32(a.x, a.x_dtype, src + k, imin(8, end - k)));
      sum_row[g] = hsum(s);
    }
  }
}

size_t scratch_bytes(const GemmArgs& a, int64_t mb) {
  return static_cast<size_t>(kRows * kChunk + 2 * kRows * group_slots(a.n_groups) + mb * kRows * 8) *
         sizeof(float);
}

// Decodes blocks [b0, b0 + nb) of one weight row to float32 w = lut[code] * scale + zero, in
// decode order. kAligned: every block lies in one group (blocks_per_group of them); otherwise a
// block spans at most two groups (group_size a multiple of 8 and larger than a block; the
// kPerLane codes of a lane never straddle a boundary).
template <int kBits, bool kAligned>
inline void decode_row(const uint8_t* row, int64_t P, __m256 t_lo, __m256 t_hi, const float* scale,
                       const float* zero, int64_t G, int64_t blocks_per_group, int64_t b0, int64_t nb,
                       float* out) {
  using Cd = Codes<kBits>;
  constexpr int64_t kB = Cd::kBlockCodes;
  int64_t g = kAligned ? b0 / blocks_per_group : 0, j = kAligned ? b0 - g * blocks_per_group : 0;
  __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zero[g]);
  for (int64_t i = 0; i < nb; ++i) {
    if (!kAligned) {
      const int64_t k0 = (b0 + i) * kB, g0 = k0 / G;
      // Lanes at or past the next group's start take group g0 + 1.
      const __m256i k_lane = _mm256_add_epi32(
          _mm256_set1_epi32(static_cast<int>(k0)),
          _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(Cd::kPerLane)));
      const __m256 next = _mm256_castsi256_ps(
          _mm256_cmpgt_epi32(k_lane, _mm256_set1_epi32(static_cast<int>((g0 + 1) * G - 1))));
      s = _mm256_blendv_ps(_mm256_set1_ps(scale[g0]), _mm256_set1_ps(scale[g0 + 1]), next);
      z = _mm256_blendv_ps(_mm256_set1_ps(zero[g0]), _mm256_set1_ps(zero[g0 + 1]), next);
    }
    __m256 v[Cd::kPerLane];
    decode_block<kBits>(row, P, b0 + i, t_lo, t_hi, v);
    for (int c = 0; c < Cd::kPerLane; ++c) _mm256_store_ps(out + i * kB + 8 * c, _mm256_fmadd_ps(v[c], s, z));
    if (kAligned && ++j == blocks_per_group) {
      j = 0;
      ++g;
      s = _mm256_set1_ps(scale[g]);
      z = _mm256_set1_ps(zero[g]);
    }
  }
}

template <int MR>
inline void dot_tile(const float* x, int64_t x_stride, const float* w, int64_t len, __m256* acc) {
  __m256 c[MR][kRows];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRows; ++r) c[m][r] = acc[m * kRows + r];
  for (int64_t k = 0; k < len; k += 8) {
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm256_load_ps(w + r * kChunk + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_load_ps(x + m * x_stride + k);
      for (int r = 0; r < kRows; ++r) c[m][r] = _mm256_fmadd_ps(xv, wv[r], c[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kRows; ++r) acc[m * kRows + r] = c[m][r];
}

struct Tile {
  int64_t t = 0, n0 = 0, nr = 0;  // tile index, first weight row, valid rows (<= kRows)
  const uint8_t* rows[kRows];
  __m256 t_lo[kRows], t_hi[kRows];   // table entries 0-7 and 8-15
  __m256i t_b0[kRows], t_b1[kRows];  // vpshufb mode: low / high bytes of the 16 bf16 entries
  const float* scale[kRows];         // per row: scale[slots], then zero[slots]
};

// Byte planes of a bf16 table row (entries past lut_len zero), each twice (one per 128-bit lane).
inline void load_table_planes(const GemmArgs& a, int64_t n, __m256i& b0, __m256i& b1) {
  alignas(16) uint16_t t[16] = {0};
  const int64_t row = a.lut_rows == 1 ? 0 : n;
  std::memcpy(t, static_cast<const uint16_t*>(a.lut) + row * a.lut_len, static_cast<size_t>(a.lut_len) * 2);
  const __m128i w0 = _mm_load_si128(reinterpret_cast<const __m128i*>(t));
  const __m128i w1 = _mm_load_si128(reinterpret_cast<const __m128i*>(t + 8));
  const __m128i low = _mm_set1_epi16(0xff);
  b0 = _mm256_broadcastsi128_si256(_mm_packus_epi16(_mm_and_si128(w0, low), _mm_and_si128(w1, low)));
  b1 = _mm256_broadcastsi128_si256(_mm_packus_epi16(_mm_srli_epi16(w0, 8), _mm_srli_epi16(w1, 8)));
}

// The 16 packed bytes of 32-block b of a row of P bytes (past the row end: 0), in both lanes.
inline __m256i load_block_codes32(const uint8_t* row, int64_t P, int64_t b) {
  const int64_t off = b * 16, rem = P - off;
  if (rem >= 16)
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + off)));
  alignas(16) unsigned char tmp[16] = {0};
  if (rem > 0) std::memcpy(tmp, row + off, static_cast<size_t>(rem));
  return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}

// vpshufb decode of a 32-block: v[q] lane i = table value of element shuf_k(q, i), as float32.
inline void decode_shuf(__m256i codes, __m256i b0, __m256i b1, __m256 v[4]) {
  // Lane 0: low nibbles (elements 2j), lane 1: high nibbles (elements 2j + 1).
  const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(codes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)),
                                       _mm256_set1_epi8(0x0f));
  const __m256i lo = _mm256_shuffle_epi8(b0, idx), hi = _mm256_shuffle_epi8(b1, idx);
  const __m256i wa = _mm256_unpacklo_epi8(lo, hi), wb = _mm256_unpackhi_epi8(lo, hi);  // bf16 words
  const __m256i high_word = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  v[0] = _mm256_castsi256_ps(_mm256_slli_epi32(wa, 16));
  v[1] = _mm256_castsi256_ps(_mm256_and_si256(wa, high_word));
  v[2] = _mm256_castsi256_ps(_mm256_slli_epi32(wb, 16));
  v[3] = _mm256_castsi256_ps(_mm256_and_si256(wb, high_word));
}

// scale_zero: 2 * kRows * group_slots floats, 32-byte aligned.
inline void load_tile(const GemmArgs& a, int64_t t, float* scale_zero, Tile& tile) {
  const int64_t P = row_bytes(a), ng = a.n_groups, slots = group_slots(ng);
  tile.t = t;
  tile.n0 = t * kRows;
  tile.nr = imin(kRows, a.N - tile.n0);
  for (int64_t r = 0; r < kRows; ++r) {
    const int64_t n = tile.n0 + imin(r, tile.nr - 1);  // a short last tile repeats its last row
    const int64_t lut_off = (a.lut_rows == 1 ? 0 : n) * a.lut_len;
    tile.t_lo[r] = load8_f32(a.lut, a.table_dtype, lut_off, imin(8, a.lut_len));
    tile.t_hi[r] = load8_f32(a.lut, a.table_dtype, lut_off + 8, imax(0, a.lut_len - 8));
    if (a.bits == 2)  // the 4 entries twice (see Codes<2>)
      tile.t_lo[r] = _mm256_permutevar8x32_ps(tile.t_lo[r], _mm256_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3));
    if (shuf_mode(a)) load_table_planes(a, n, tile.t_b0[r], tile.t_b1[r]);
    tile.rows[r] = a.packed + n * P;
    float* s = scale_zero + 2 * r * slots;
    float* z = s + slots;
    for (int64_t g = 0; g < slots; g += 8) {  // (scale, zero) pairs -> scales, zeros; 0 past ng
      const int64_t left = 2 * (ng - g), off = (n * ng + g) * 2;
      if (a.table_dtype == DType::BF16 && left >= 16) {  // 8 pairs = 8 dwords (zero << 16 | scale)
        const __m256i u = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(a.scales) + off));
        _mm256_store_ps(s + g, _mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
        _mm256_store_ps(z + g, _mm256_castsi256_ps(
                                   _mm256_and_si256(u, _mm256_set1_epi32(static_cast<int>(0xffff0000u)))));
        continue;
      }
      store_even_odd(load8_f32(a.scales, a.table_dtype, off, imax(0, imin(8, left))),
                     load8_f32(a.scales, a.table_dtype, off + 8, imax(0, imin(8, left - 8))), s + g, z + g);
    }
    tile.scale[r] = s;
  }
}

using Prefetcher = TilePrefetcher<kRows>;

// y[m0 + m, tile rows] = lane sums of acc[m][r] (+ sum_g zero[r][g] * xsum[m][g] if sums).
inline void store_tile(const GemmArgs& a, const Tile& tile, int64_t m0, int64_t mb, const __m256* acc,
                       const float* sums) {
  const int64_t slots = group_slots(a.n_groups);
  for (int64_t m = 0; m < mb; ++m) {
    alignas(32) float y[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t r = 0; r < kRows; ++r) {
      __m256 c = acc[m * kRows + r];
      if (sums) {
        const float* zero = tile.scale[r] + slots;
        for (int64_t g = 0; g < slots; g += 8)
          c = _mm256_fmadd_ps(_mm256_loadu_ps(zero + g), _mm256_loadu_ps(sums + m * slots + g), c);
      }
      y[r] = hsum(c);
    }
    store8(a.y, a.x_dtype, (m0 + m) * a.N + tile.n0, tile.nr, _mm256_load_ps(y));
  }
}

// Scale of the lanes of block b (unaligned groups: a block spans at most two groups, group_size
// being a multiple of 8 and larger than a block, so the kPerLane codes of a lane share their group).
template <int kBits>
inline __m256 block_scale(const float* scale, int64_t G, int64_t b) {
  const int64_t k0 = b * Codes<kBits>::kBlockCodes, g0 = k0 / G;
  const __m256i k = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(k0)),
                                     _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                                                        _mm256_set1_epi32(Codes<kBits>::kPerLane)));
  const __m256 next =
      _mm256_castsi256_ps(_mm256_cmpgt_epi32(k, _mm256_set1_epi32(static_cast<int>((g0 + 1) * G - 1))));
  return _mm256_blendv_ps(_mm256_set1_ps(scale[g0]), _mm256_set1_ps(scale[g0 + 1]), next);
}

// Direct path for groups that are not whole blocks: MR x rows against weight row r of the tile,
// blocks decoded into registers, each block's sum scaled lane by lane (block_scale).
template <int kBits, int MR>
void direct_row_unaligned(const GemmArgs& a, const Tile& tile, Prefetcher& pf, int r, const float* x,
                          int64_t x_stride, __m256* acc) {
  using Cd = Codes<kBits>;
  constexpr int64_t kB = Cd::kBlockCodes;
  // Separate accumulators for the decoded vectors of a block, so that enough independent fma
  // chains are in flight (dependent fmas per block would be latency-bound).
  constexpr int kAcc = MR <= 2 ? Cd::kPerLane : 2;
  const int64_t P = row_bytes(a), G = a.group_size, Kx = padded_k(a);
  const __m256 t_lo = tile.t_lo[r], t_hi = tile.t_hi[r];  // local copies: the compiler reloads
  const uint8_t* row = tile.rows[r];                      // tile members in the loop
  __m256 tot[MR];
  for (int m = 0; m < MR; ++m) tot[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b * kB < Kx; ++b) {
    if (r == 0) pf.advance((b + 1) * kB * kBits / 8);
    __m256 c[MR][kAcc];
    for (int m = 0; m < MR; ++m)
      for (int h = 0; h < kAcc; ++h) c[m][h] = _mm256_setzero_ps();
    __m256 w[Cd::kPerLane];
    decode_block<kBits>(row, P, b, t_lo, t_hi, w);
    for (int m = 0; m < MR; ++m)
      for (int q = 0; q < Cd::kPerLane; ++q)
        c[m][q % kAcc] =
            _mm256_fmadd_ps(_mm256_load_ps(x + m * x_stride + b * kB + 8 * q), w[q], c[m][q % kAcc]);
    const __m256 s = block_scale<kBits>(tile.scale[r], G, b);
    for (int m = 0; m < MR; ++m) {
      __m256 sum = c[m][0];
      for (int h = 1; h < kAcc; ++h) sum = _mm256_add_ps(sum, c[m][h]);
      tot[m] = _mm256_fmadd_ps(sum, s, tot[m]);
    }
  }
  for (int m = 0; m < MR; ++m) acc[m * kRows + r] = tot[m];
}

// The blocks [b0, b1) of every row against MR x rows: c[m][r][q % kAcc] += x * table[code].
template <int kBits, bool kFull, int MR, int RS, int kAcc>
inline void direct_blocks(const uint8_t* const* rows, int64_t P, const __m256* t_lo, const __m256* t_hi,
                          int64_t b0, int64_t b1, const float* x, int64_t x_stride,
                          __m256 (&c)[MR][RS][kAcc]) {
  using Cd = Codes<kBits>;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t k = b * Cd::kBlockCodes;
    for (int r = 0; r < RS; ++r) {
      __m256 w[Cd::kPerLane];
      decode_block<kBits, kFull>(rows[r], P, b, t_lo[r], t_hi[r], w);
      for (int m = 0; m < MR; ++m)
        for (int q = 0; q < Cd::kPerLane; ++q)
          c[m][r][q % kAcc] =
              _mm256_fmadd_ps(_mm256_load_ps(x + m * x_stride + k + 8 * q), w[q], c[m][r][q % kAcc]);
    }
  }
}

// Direct path when every block lies in one group (group_size a multiple of the block, or a
// single group): MR x rows against weight rows [r0, r0 + RS) of the tile. Each group's scale is
// folded into the table (RS multiplies per group, not one per block), so the products of all
// groups go into the same accumulators, which stay in registers for the whole row; the group
// zeros are added by store_tile from the group sums of x. Units whose blocks lie inside the row
// load their codes without the row-end check.
template <int kBits, int MR, int RS>
void direct_tile_scaled(const GemmArgs& a, const Tile& tile, Prefetcher& pf, int r0, const float* x,
                        int64_t x_stride, __m256* acc) {
  using Cd = Codes<kBits>;
  constexpr int64_t kB = Cd::kBlockCodes;
  // Enough independent fma chains (4-cycle latency, 2 per cycle) without spilling. One x row
  // against two weight rows keeps 2 chains per row: with 4 (8 accumulators, next to the two
  // tables, their scaled copies and the decode temporaries) GCC spilled one accumulator, whose
  // store-to-load round trip then bounded every block (2-bit codes: 1.35x faster with 2 chains
  // on an AVX2 Zen 3 EPYC; 3-bit codes, bound by their shifts and vpermps there, unchanged).
  constexpr int kChains = MR == 1 && RS == 2 ? 2 : MR * RS <= 2 ? 4 : 2;
  constexpr int kAcc = Cd::kPerLane < kChains ? Cd::kPerLane : kChains;
  const int64_t P = row_bytes(a), Kx = padded_k(a);
  const int64_t unit = a.n_groups == 1 ? Kx : a.group_size, bpu = unit / kB, n_units = Kx / unit;
  // Blocks whose kLoadBytes bytes lie inside the row: [0, full_blocks).
  const int64_t full_blocks = P >= Cd::kLoadBytes ? (P - Cd::kLoadBytes) / Cd::kBlockBytes + 1 : 0;
  __m256 t_lo[RS], t_hi[RS], ts_lo[RS], ts_hi[RS];
  const uint8_t* rows[RS];
  const float* scale[RS];
  for (int r = 0; r < RS; ++r) {
    t_lo[r] = tile.t_lo[r0 + r];
    t_hi[r] = tile.t_hi[r0 + r];
    rows[r] = tile.rows[r0 + r];
    scale[r] = tile.scale[r0 + r];
  }
  __m256 c[MR][RS][kAcc];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RS; ++r)
      for (int h = 0; h < kAcc; ++h) c[m][r][h] = _mm256_setzero_ps();
  for (int64_t u = 0; u < n_units; ++u) {
    if (r0 == 0) pf.advance((u + 1) * unit * kBits / 8);
    for (int r = 0; r < RS; ++r) {
      const __m256 s = _mm256_set1_ps(scale[r][u]);
      ts_lo[r] = _mm256_mul_ps(t_lo[r], s);
      ts_hi[r] = kBits == 4 ? _mm256_mul_ps(t_hi[r], s) : ts_lo[r];
    }
    const int64_t b0 = u * bpu, b1 = b0 + bpu;
    if (b1 <= full_blocks)
      direct_blocks<kBits, true>(rows, P, ts_lo, ts_hi, b0, b1, x, x_stride, c);
    else
      direct_blocks<kBits, false>(rows, P, ts_lo, ts_hi, b0, b1, x, x_stride, c);
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RS; ++r) {
      __m256 sum = c[m][r][0];
      for (int h = 1; h < kAcc; ++h) sum = _mm256_add_ps(sum, c[m][r][h]);
      acc[m * kRows + r0 + r] = sum;
    }
}

// All weight rows of the tile for `rows` (1..kDirectRows) x rows: two weight rows per sweep for
// one x row, else one (16 registers: more at once spill the accumulators).
template <int kBits, int MR, bool kAligned>
void direct_rows(int64_t rows, const GemmArgs& a, const Tile& tile, Prefetcher& pf, const float* x,
                 int64_t x_stride, __m256* acc) {
  if constexpr (MR > 1) {
    if (rows < MR) return direct_rows<kBits, MR - 1, kAligned>(rows, a, tile, pf, x, x_stride, acc);
  }
  if constexpr (kAligned) {
    constexpr int kRS = MR == 1 ? 2 : 1;
    for (int r0 = 0; r0 < kRows; r0 += kRS)
      direct_tile_scaled<kBits, MR, kRS>(a, tile, pf, r0, x, x_stride, acc);
  } else {
    for (int r = 0; r < kRows; ++r) direct_row_unaligned<kBits, MR>(a, tile, pf, r, x, x_stride, acc);
  }
}

// vpshufb mode, direct path: MR x rows against weight rows [r0, r0 + RS); units are groups.
template <int MR, int RS>
void direct_tile_shuf(const GemmArgs& a, const Tile& tile, Prefetcher& pf, int r0, const float* x,
                      int64_t x_stride, __m256* acc) {
  const int64_t P = (a.K + 1) / 2, Kx = padded_k(a);
  const int64_t unit = a.n_groups == 1 ? Kx : a.group_size, blocks_per_unit = unit / kShufBlock;
  constexpr bool kRegTotals = MR * RS <= 4;
  __m256i b0[RS], b1[RS];  // local copies: the compiler reloads tile members in the loop
  const uint8_t* rows[RS];
  for (int r = 0; r < RS; ++r) {
    b0[r] = tile.t_b0[r0 + r];
    b1[r] = tile.t_b1[r0 + r];
    rows[r] = tile.rows[r0 + r];
  }
  __m256 tot[MR][RS];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < RS; ++r) tot[m][r] = _mm256_setzero_ps();
  for (int64_t u = 0; u * unit < Kx; ++u) {
    if (r0 == 0) pf.advance((u + 1) * unit / 2);
    constexpr int kHalves = MR * RS <= 2 ? 2 : 1;  // enough independent fma chains
    __m256 c[MR][RS][kHalves];
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < RS; ++r)
        for (int h = 0; h < kHalves; ++h) c[m][r][h] = _mm256_setzero_ps();
    for (int64_t j = 0; j < blocks_per_unit; ++j) {
      const int64_t b = u * blocks_per_unit + j, k = b * kShufBlock;
      for (int r = 0; r < RS; ++r) {
        __m256 v[4];
        decode_shuf(load_block_codes32(rows[r], P, b), b0[r], b1[r], v);
        for (int m = 0; m < MR; ++m)
          for (int q = 0; q < 4; ++q)
            c[m][r][q % kHalves] =
                _mm256_fmadd_ps(_mm256_load_ps(x + m * x_stride + k + 8 * q), v[q], c[m][r][q % kHalves]);
      }
    }
    for (int r = 0; r < RS; ++r) {
      const __m256 s = _mm256_set1_ps(tile.scale[r0 + r][u]);
      for (int m = 0; m < MR; ++m) {
        const __m256 sum = kHalves == 2 ? _mm256_add_ps(c[m][r][0], c[m][r][kHalves - 1]) : c[m][r][0];
        if (kRegTotals)
          tot[m][r] = _mm256_fmadd_ps(sum, s, tot[m][r]);
        else
          acc[m * kRows + r0 + r] =
              _mm256_fmadd_ps(sum, s, u > 0 ? acc[m * kRows + r0 + r] : _mm256_setzero_ps());
      }
    }
    if (!kRegTotals) asm volatile("" ::: "memory");  // keep the totals in memory
  }
  if (kRegTotals)
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < RS; ++r) acc[m * kRows + r0 + r] = tot[m][r];
}

template <int MR>
void direct_rows_shuf(int64_t rows, const GemmArgs& a, const Tile& tile, Prefetcher& pf, const float* x,
                      int64_t x_stride, __m256* acc) {
  if constexpr (MR > 1) {
    if (rows < MR) return direct_rows_shuf<MR - 1>(rows, a, tile, pf, x, x_stride, acc);
  }
  constexpr int kRS = MR == 1 ? 2 : 1;
  for (int r0 = 0; r0 < kRows; r0 += kRS) direct_tile_shuf<MR, kRS>(a, tile, pf, r0, x, x_stride, acc);
}

// vpshufb mode, buffered path: 32-blocks [b0, b0 + nb) of row r as w = lut[code] * scale + zero.
inline void decode_row_shuf(const GemmArgs& a, const Tile& tile, int64_t r, int64_t b0, int64_t nb,
                            float* out) {
  const int64_t P = (a.K + 1) / 2, slots = group_slots(a.n_groups);
  const int64_t blocks_per_group = a.n_groups == 1 ? padded_k(a) / kShufBlock + 2 : a.group_size / kShufBlock;
  const float* scale = tile.scale[r];
  const float* zero = scale + slots;
  for (int64_t i = 0; i < nb; ++i) {
    const int64_t g = (b0 + i) / blocks_per_group;
    const __m256 s = _mm256_set1_ps(scale[g]), z = _mm256_set1_ps(zero[g]);
    __m256 v[4];
    decode_shuf(load_block_codes32(tile.rows[r], P, b0 + i), tile.t_b0[r], tile.t_b1[r], v);
    for (int q = 0; q < 4; ++q) _mm256_store_ps(out + i * kShufBlock + 8 * q, _mm256_fmadd_ps(v[q], s, z));
  }
}

template <int kBits, bool kAligned>
void run_tiles_impl(const GemmArgs& a, int64_t m0, int64_t mb, const float* xb, int64_t t0, int64_t t1,
                    float* scratch) {
  constexpr int64_t kB = Codes<kBits>::kBlockCodes;
  const int64_t P = row_bytes(a), Kx = padded_k(a), ng = a.n_groups, slots = group_slots(ng);
  const int64_t G = a.group_size;
  const int64_t blocks_per_group = !kAligned ? 0 : ng == 1 ? Kx / kB + 2 : G / kB;
  const float* sums =
      reinterpret_cast<const float*>(reinterpret_cast<const char*>(xb) + x_sums_offset(a, mb));
  const bool shuf = kBits == 4 && shuf_mode(a);
  float* wbuf = scratch;
  float* scale_zero = wbuf + kRows * kChunk;
  __m256* acc = reinterpret_cast<__m256*>(scale_zero + 2 * kRows * slots);
  Tile tile;
  for (int64_t t = t0; t < t1; ++t) {
    load_tile(a, t, scale_zero, tile);
    Prefetcher pf;
    pf.start(a, t);
    if (mb <= kDirectRows) {
      if (shuf)
        direct_rows_shuf<kDirectRows>(mb, a, tile, pf, xb, Kx, acc);
      else
        direct_rows<kBits, kDirectRows, kAligned>(mb, a, tile, pf, xb, Kx, acc);
      store_tile(a, tile, m0, mb, acc, sums);
      continue;
    }
    for (int64_t i = 0; i < mb * kRows; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t kc = 0; kc < Kx; kc += kChunk) {
      const int64_t len = imin(kChunk, Kx - kc);
      pf.advance((kc + len) * kBits / 8);
      for (int64_t r = 0; r < kRows; ++r) {
        const float* s = tile.scale[r];
        if (shuf)
          decode_row_shuf(a, tile, r, kc / kShufBlock, len / kShufBlock, wbuf + r * kChunk);
        else
          decode_row<kBits, kAligned>(tile.rows[r], P, tile.t_lo[r], tile.t_hi[r], s, s + slots, G,
                                      blocks_per_group, kc / kB, len / kB, wbuf + r * kChunk);
      }
      const float* x = xb + kc;
      int64_t m = 0;
      for (; m + kMR <= mb; m += kMR) dot_tile<kMR>(x + m * Kx, Kx, wbuf, len, acc + m * kRows);
      if (m < mb) dot_tile<1>(x + m * Kx, Kx, wbuf, len, acc + m * kRows);
    }
    store_tile(a, tile, m0, mb, acc, nullptr);
  }
}

template <int kBits>
void run_tiles_bits(const GemmArgs& a, int64_t m0, int64_t mb, const float* x, int64_t t0, int64_t t1,
                    float* s) {
  if (a.n_groups == 1 || a.group_size % Codes<kBits>::kBlockCodes == 0)
    run_tiles_impl<kBits, true>(a, m0, mb, x, t0, t1, s);
  else
    run_tiles_impl<kBits, false>(a, m0, mb, x, t0, t1, s);
}

void run_tiles(const GemmArgs& a, int64_t m0, int64_t mb, const void* xbuf, int64_t t0, int64_t t1,
               void* scratch) {
  const float* x = static_cast<const float*>(xbuf);
  float* s = static_cast<float*>(scratch);
  if (a.bits == 3)
    run_tiles_bits<3>(a, m0, mb, x, t0, t1, s);
  else if (a.bits == 2)
    run_tiles_bits<2>(a, m0, mb, x, t0, t1, s);
  else
    run_tiles_bits<4>(a, m0, mb, x, t0, t1, s);
}

// Code bytes [off, off + 8) of a row of P bytes widened to 8 dwords (past the row end: 0).
inline __m256i load_codes_at(const uint8_t* row, int64_t P, int64_t off) {
  if (P - off >= 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + off)));
  alignas(16) unsigned char tmp[16] = {0};
  if (P > off) std::memcpy(tmp, row + off, static_cast<size_t>(P - off));
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(tmp)));
}

}  // namespace

void avx2_dequantize_rows(const GemmArgs& a, int64_t n0, int64_t r0, int64_t r1, void* w, DType w_dtype) {
  const int64_t K = a.K, P = (K + 1) / 2, G = a.group_size, es = elem_size(w_dtype);
  for (int64_t n = n0 + r0; n < n0 + r1; ++n) {
    const int64_t lr = a.lut_rows == 1 ? 0 : n;
    const __m256 t_lo = load8_f32(a.lut, a.table_dtype, lr * a.lut_len, imin(8, a.lut_len));
    const __m256 t_hi = load8_f32(a.lut, a.table_dtype, lr * a.lut_len + 8, imax(0, a.lut_len - 8));
    const uint8_t* row = a.packed + n * P;
    unsigned char* out = static_cast<unsigned char*>(w) + (n - n0) * K * es;
    for (int64_t g = 0; g < a.n_groups; ++g) {
      // The group's 16 values fma(lut, scale, zero), then pure lookups.
      const __m256 sz = load8_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2, 2);
      const __m256 s = _mm256_permutevar8x32_ps(sz, _mm256_setzero_si256());
      const __m256 z = _mm256_permutevar8x32_ps(sz, _mm256_set1_epi32(1));
      const __m256 d_lo = _mm256_fmadd_ps(t_lo, s, z), d_hi = _mm256_fmadd_ps(t_hi, s, z);
      const int64_t k_end = imin(K, (g + 1) * G);
      for (int64_t k0 = g * G; k0 < k_end; k0 += kBlock) {  // k0 even: G is even
        const __m256i v = load_codes_at(row, P, k0 / 2);
        const __m256 ev = lookup16(v, d_lo, d_hi), od = lookup16(_mm256_srli_epi32(v, 4), d_lo, d_hi);
        // Natural order: [e0 o0 e1 o1 | e4 o4 e5 o5] and [e2 o2 e3 o3 | e6 o6 e7 o7], then lanes.
        const __m256 lo = _mm256_unpacklo_ps(ev, od), hi = _mm256_unpackhi_ps(ev, od);
        const __m256 first = _mm256_permute2f128_ps(lo, hi, 0x20),
                     second = _mm256_permute2f128_ps(lo, hi, 0x31);
        const int64_t count = imin(kBlock, k_end - k0);
        if (count == kBlock && w_dtype == DType::F32) {
          float* o = reinterpret_cast<float*>(out) + k0;
          _mm256_storeu_ps(o, first);
          _mm256_storeu_ps(o + 8, second);
        } else if (count == kBlock && w_dtype == DType::BF16) {
          __m128i* o = reinterpret_cast<__m128i*>(reinterpret_cast<uint16_t*>(out) + k0);
          _mm_storeu_si128(o, f32_to_bf16_bits(first));
          _mm_storeu_si128(o + 1, f32_to_bf16_bits(second));
        } else {
          store8(out, w_dtype, k0, imin(8, count), first);
          if (count > 8) store8(out, w_dtype, k0 + 8, count - 8, second);
        }
      }
    }
  }
}

Kernel avx2_kernel() {
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
