#include "refine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>
#include <vector>

#include "parallel.h"
#include "quantize_reassign.h"

namespace any4 {

namespace {

// Codes of one row re-assigned to the nearest of lut[j] * s[g] + z[g] (float32 fma, as the
// kernels dequantize); returns the weighted error sum d (deq - w)^2.
double assign_row(const float* w, const double* d, int64_t K, int L, int64_t G, const float* lut,
                  const float* s, const float* z, uint8_t* c, float* deq) {
  double e = 0;
  for (int64_t g = 0, k0 = 0; k0 < K; ++g, k0 += G) {
    for (int j = 0; j < L; ++j) deq[j] = std::fma(lut[j], s[g], z[g]);
    const int64_t len = std::min(G, K - k0);
    reassign_codes(deq, L, w + k0, c + k0, len);
    for (int64_t k = k0; k < k0 + len; ++k) {
      const double r = static_cast<double>(deq[c[k]]) - w[k];
      e += d[k] * r * r;
    }
  }
  return e;
}

}  // namespace

int64_t refine_rows(const float* w, int64_t N, int64_t K, int L, int64_t group_size, const float* chan,
                    int power, const float* elem, DType dtype, int rounds, uint8_t* codes, float* lut,
                    float* scales) {
  ANY4_CHECK(N >= 0 && K > 0, "refine_rows: need N >= 0 and K > 0");
  ANY4_CHECK(L >= 2 && L <= 256, "refine_rows: L must be in [2, 256], got " + std::to_string(L));
  ANY4_CHECK(group_size > 0, "refine_rows: group_size must be positive");
  ANY4_CHECK(rounds >= 0, "refine_rows: rounds must be >= 0");
  const int64_t G = group_size, ng = ceil_div(K, G);
  std::atomic<int64_t> changed{0};
  if (rounds == 0 || N == 0) return 0;
  parallel_for(N, 4, [&](int64_t b, int64_t e) {
    std::vector<double> d(K), lt(L), s(ng), z(ng), num(L), den(L);
    std::vector<float> lf(L), sf(ng), zf(ng), deq(L);
    std::vector<uint8_t> cur(K);
    for (int64_t row = b; row < e; ++row) {
      const float* wr = w + row * K;
      float* lr = lut + row * L;
      float* sr = scales + row * ng * 2;
      uint8_t* cr = codes + row * K;
      for (int64_t k = 0; k < K; ++k) {
        const double sc = std::fabs(static_cast<double>(sr[(k / G) * 2]));
        const double safe = sc > 0 ? sc : 1.0;
        double du = 1.0;
        int p = 0;
        if (elem) {
          du = elem[row * K + k];
        } else if (chan) {
          du = chan[k];
          p = power;
        }
        d[k] = du * std::pow(safe, p - 2);
      }
      for (int j = 0; j < L; ++j) lt[j] = lr[j];
      for (int64_t g = 0; g < ng; ++g) s[g] = sr[2 * g], z[g] = sr[2 * g + 1];
      std::copy(cr, cr + K, cur.begin());
      for (int64_t g = 0; g < ng; ++g) sf[g] = sr[2 * g], zf[g] = sr[2 * g + 1];
      const double e0 = assign_row(wr, d.data(), K, L, G, lr, sf.data(), zf.data(), cur.data(), deq.data());
      for (int it = 0; it < rounds; ++it) {
        // (scale, zero) of each group for the current table and codes
        for (int64_t g = 0, k0 = 0; g < ng; ++g, k0 += G) {
          double a11 = 0, a12 = 0, a22 = 0, b1 = 0, b2 = 0;
          for (int64_t k = k0; k < std::min(K, k0 + G); ++k) {
            const double v = lt[cur[k]], dk = d[k], wk = wr[k];
            a11 += dk * v * v, a12 += dk * v, a22 += dk, b1 += dk * v * wk, b2 += dk * wk;
          }
          const double det = a11 * a22 - a12 * a12;
          if (!(det > 1e-9 * a11 * a22)) continue;  // one distinct code, or no weight: keep
          const double ns = (b1 * a22 - b2 * a12) / det, nz = (a11 * b2 - a12 * b1) / det;
          if (ns > 0 && std::isfinite(ns) && std::isfinite(nz)) s[g] = ns, z[g] = nz;
        }
        // each table entry: the weighted mean of its elements in the table's domain
        std::fill(num.begin(), num.end(), 0.0);
        std::fill(den.begin(), den.end(), 0.0);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t g = k / G;
          const double dk = d[k] * s[g];
          num[cur[k]] += dk * (wr[k] - z[g]);
          den[cur[k]] += dk * s[g];
        }
        for (int j = 0; j < L; ++j)
          if (den[j] > 0) lt[j] = num[j] / den[j];
        std::sort(lt.begin(), lt.end());
        for (int j = 0; j < L; ++j) lf[j] = static_cast<float>(lt[j]);
        for (int64_t g = 0; g < ng; ++g) sf[g] = static_cast<float>(s[g]), zf[g] = static_cast<float>(z[g]);
        assign_row(wr, d.data(), K, L, G, lf.data(), sf.data(), zf.data(), cur.data(), deq.data());
      }
      bool finite = true;
      for (int j = 0; j < L; ++j)
        finite &= std::isfinite(lf[j] = round_to_dtype(static_cast<float>(lt[j]), dtype));
      std::sort(lf.begin(), lf.end());
      for (int64_t g = 0; g < ng; ++g) {
        sf[g] = round_to_dtype(static_cast<float>(s[g]), dtype);
        zf[g] = round_to_dtype(static_cast<float>(z[g]), dtype);
        finite &= std::isfinite(sf[g]) && std::isfinite(zf[g]) && sf[g] > 0;
      }
      if (!finite) continue;
      const double e1 =
          assign_row(wr, d.data(), K, L, G, lf.data(), sf.data(), zf.data(), cur.data(), deq.data());
      if (!(e1 < e0)) continue;
      std::copy(lf.begin(), lf.end(), lr);
      for (int64_t g = 0; g < ng; ++g) sr[2 * g] = sf[g], sr[2 * g + 1] = zf[g];
      std::copy(cur.begin(), cur.end(), cr);
      changed.fetch_add(1, std::memory_order_relaxed);
    }
  });
  return changed.load();
}

}  // namespace any4
