#include "quantize.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "pack.h"
#include "parallel.h"
#include "quantize_reassign.h"

namespace any4 {
namespace {

// Index of the table entry nearest to v (table sorted ascending).
inline int nearest(const float* table, int L, float v) {
  int lo = static_cast<int>(std::lower_bound(table, table + L, v) - table);
  if (lo == L) return L - 1;
  if (lo > 0 && (v - table[lo - 1]) <= (table[lo] - v)) return lo - 1;
  return lo;
}

// Rows per parallel chunk of quantize.
constexpr int64_t kQuantizeChunkRows = 8;

}  // namespace

void quantize(const float* w, int64_t N, int64_t K, const QuantizeParams& p, uint8_t* codes, float* lut,
              float* scales) {
  ANY4_CHECK(p.bits >= 1 && p.bits <= 4, "bits must be 1..4");
  ANY4_CHECK(N >= 1 && K >= 1, "weight must be non-empty");
  ANY4_CHECK(p.group_size >= 8 && p.group_size % 8 == 0,
             "group_size must be a positive multiple of 8, got " + std::to_string(p.group_size));
  ANY4_CHECK(!(p.absmax && p.table == nullptr), "absmax formats need a fixed table");
  ANY4_CHECK(p.scale_power >= 0 && p.scale_power <= 2, "scale_power must be 0, 1 or 2");
  const int L = 1 << p.bits;
  const int64_t G = p.group_size;
  const int64_t n_groups = ceil_div(K, G);
  const float mid = 0.5f * static_cast<float>(L - 1);
  const bool learned = p.table == nullptr;
  if (!learned)
    for (int j = 1; j < L; ++j)
      ANY4_CHECK(p.table[j - 1] <= p.table[j], "fixed table must be sorted ascending");
  if (p.channel_weight)
    for (int64_t k = 0; k < K; ++k)
      ANY4_CHECK(std::isfinite(p.channel_weight[k]) && p.channel_weight[k] >= 0,
                 "sample weights must be finite and >= 0 (channel " + std::to_string(k) + ")");

  // Shared (fixed) table, in the stored (centred for affine) domain, rounded once.
  std::vector<float> shared_lut(L);
  if (!learned) {
    for (int j = 0; j < L; ++j)
      shared_lut[j] = round_to_dtype(p.absmax ? p.table[j] : p.table[j] - mid, p.out_dtype);
    std::copy(shared_lut.begin(), shared_lut.end(), lut);
  }

  // Small chunks of rows handed out as threads free up: a learned row costs about a millisecond
  // (k-means), and parallel_for's 4 chunks per thread left one thread idle for up to a chunk at
  // the end of every layer.
  parallel_for_chunks(N, kQuantizeChunkRows, [&](int64_t b, int64_t e) {
    std::vector<float> u(K), ew(K), s_raw(n_groups), z_raw(n_groups), cent(L);
    float deq[16];
    for (int64_t n = b; n < e; ++n) {
      const float* wr = w + n * K;
      uint8_t* cr = codes + n * K;
      float* sc = scales + n * n_groups * 2;
      uint32_t bad = 0;  // bit test, so the loop vectorises
      for (int64_t k = 0; k < K; ++k) {
        uint32_t bits;
        std::memcpy(&bits, wr + k, 4);
        bad |= static_cast<uint32_t>((bits & 0x7f800000u) == 0x7f800000u);
      }
      for (int64_t k = 0; bad && k < K; ++k)
        if (!std::isfinite(wr[k]))
          throw std::invalid_argument("weight contains NaN or Inf at row " + std::to_string(n) + ", column " +
                                      std::to_string(k));
      // 1. group statistics and normalised values
      for (int64_t g = 0; g < n_groups; ++g) {
        int64_t k0 = g * G, k1 = std::min(K, k0 + G);
        float lo = wr[k0], hi = wr[k0];
        for (int64_t k = k0; k < k1; ++k) {
          lo = wr[k] < lo ? wr[k] : lo;
          hi = wr[k] > hi ? wr[k] : hi;
        }
        if (p.absmax) {
          float a = std::max(std::fabs(lo), std::fabs(hi));
          s_raw[g] = a;
          z_raw[g] = 0.f;
          if (a > 0)
            for (int64_t k = k0; k < k1; ++k) u[k] = wr[k] / a;
          else
            std::fill(u.begin() + k0, u.begin() + k1, 0.f);
        } else {
          float s = (hi - lo) / static_cast<float>(L - 1);
          s_raw[g] = s;
          z_raw[g] = s > 0 ? lo + s * mid : lo;
          if (s > 0)
            for (int64_t k = k0; k < k1; ++k) u[k] = (wr[k] - lo) / s;
          else
            std::fill(u.begin() + k0, u.begin() + k1, mid);
        }
      }
      // 2. table and codes
      const float* row_lut;
      if (learned) {
        const float* wts = nullptr;
        if (p.element_weight) {
          const float* er = p.element_weight + n * K;
          for (int64_t k = 0; k < K; ++k)
            ANY4_CHECK(std::isfinite(er[k]) && er[k] >= 0, "sample weights must be finite and >= 0");
          wts = er;
        } else if (p.channel_weight) {
          for (int64_t g = 0; g < n_groups; ++g) {
            const float s = s_raw[g];
            const float f = p.scale_power == 0 ? 1.f : (p.scale_power == 1 ? s : s * s);
            for (int64_t k = g * G, k1 = std::min(K, k + G); k < k1; ++k) ew[k] = p.channel_weight[k] * f;
          }
          wts = ew.data();
        }
        kmeans_1d(u.data(), wts, K, L, p.kmeans, derive_row_seed(p.kmeans.seed, n), cent.data(), cr);
        float* lr = lut + n * L;
        for (int j = 0; j < L; ++j) lr[j] = round_to_dtype(cent[j] - mid, p.out_dtype);
        row_lut = lr;
      } else {
        for (int64_t k = 0; k < K; ++k) cr[k] = static_cast<uint8_t>(nearest(p.table, L, u[k]));
        row_lut = shared_lut.data();
      }
      // 3. round scale/zero, re-assign every code to the nearest rounded dequantized value
      for (int64_t g = 0; g < n_groups; ++g) {
        float s = round_to_dtype(s_raw[g], p.out_dtype);
        float z = round_to_dtype(z_raw[g], p.out_dtype);
        sc[2 * g] = s;
        sc[2 * g + 1] = z;
        int64_t k0 = g * G, k1 = std::min(K, k0 + G);
        for (int j = 0; j < L; ++j) deq[j] = std::fma(row_lut[j], s, z);
        reassign_codes(deq, L, wr + k0, cr + k0, k1 - k0);
      }
    }
  });
}

void dequantize(const uint8_t* packed, int64_t N, int64_t K, int bits, const void* lut, int64_t lut_rows,
                int64_t lut_len, const void* scales, int64_t n_groups, int64_t group_size, DType td,
                float* w) {
  ANY4_CHECK(bits >= 2 && bits <= 4, "dequantize: bits must be 2, 3 or 4");
  ANY4_CHECK(lut_rows == 1 || lut_rows == N, "lut must have 1 or N rows");
  ANY4_CHECK(lut_len >= 1 && lut_len <= 16, "lut must have 1..16 entries per row");
  ANY4_CHECK(n_groups == ceil_div(K, group_size), "scales do not match K / group_size");
  const int64_t P = packed_cols(K, bits);
  parallel_for(N, 16, [&](int64_t b, int64_t e) {
    float t[16];
    for (int64_t n = b; n < e; ++n) {
      int64_t lr = lut_rows == 1 ? 0 : n;
      for (int j = 0; j < 16; ++j) t[j] = j < lut_len ? load_as_f32(lut, td, lr * lut_len + j) : 0.f;
      const uint8_t* pr = packed + n * P;
      for (int64_t k = 0; k < K; ++k) {
        int c = unpack_code(pr, P, k, bits);
        ANY4_CHECK(c < lut_len, "code out of range of the lut");
        int64_t g = k / group_size;
        float s = load_as_f32(scales, td, (n * n_groups + g) * 2);
        float z = load_as_f32(scales, td, (n * n_groups + g) * 2 + 1);
        w[n * K + k] = std::fma(t[c], s, z);
      }
    }
  });
}

}  // namespace any4
