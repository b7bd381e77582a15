#include "refit_rows.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "parallel.h"
#include "quantize_reassign.h"

namespace any4 {

namespace {

// x = -(m + diag(ridge))^{-1} grad by Cholesky (m [P, P] is overwritten); ridge = damp * curv +
// 1e-9 * mean(curv[:L]) + 1e-300. Returns false (x untouched) if the matrix is not positive
// definite in floating point.
bool newton_step(double* m, const double* grad, const double* curv, int64_t P, int L, double damp,
                 double* x) {
  double mean = 0.0;
  for (int a = 0; a < L; ++a) mean += curv[a];
  const double floor = 1e-9 * mean / L + 1e-300;
  for (int64_t i = 0; i < P; ++i) m[i * P + i] += damp * curv[i] + floor;
  for (int64_t j = 0; j < P; ++j) {  // lower Cholesky factor, in place
    double djj = m[j * P + j];
    for (int64_t t = 0; t < j; ++t) djj -= m[j * P + t] * m[j * P + t];
    if (!(djj > 0.0)) return false;
    const double ljj = std::sqrt(djj);
    m[j * P + j] = ljj;
    for (int64_t i = j + 1; i < P; ++i) {
      double v = m[i * P + j];
      for (int64_t t = 0; t < j; ++t) v -= m[i * P + t] * m[j * P + t];
      m[i * P + j] = v / ljj;
    }
  }
  std::vector<double> y(P);
  for (int64_t i = 0; i < P; ++i) {  // L y = -grad
    double v = -grad[i];
    for (int64_t t = 0; t < i; ++t) v -= m[i * P + t] * y[t];
    y[i] = v / m[i * P + i];
  }
  for (int64_t i = P - 1; i >= 0; --i) {  // L^T x = y
    double v = y[i];
    for (int64_t t = i + 1; t < P; ++t) v -= m[t * P + i] * x[t];
    x[i] = v / m[i * P + i];
  }
  return true;
}

// Both entry points: assemble every row's (M, grad, curv) into the given arrays, or (when they
// are null) into per-thread scratch and write the Newton step x instead.
void assemble_rows(const uint8_t* codes, const float* scales, const float* hr, int64_t n, int64_t K, int L,
                   int64_t group_size, bool zero, const float* U, int r, const float* d, const float* diag_h,
                   double* M, double* grad, double* curv, double damp, double* x) {
  ANY4_CHECK(n >= 0 && K > 0, "refit_normal_rows: need n >= 0 and K > 0");
  ANY4_CHECK(L >= 1 && L <= 256, "refit_normal_rows: L must be in [1, 256], got " + std::to_string(L));
  ANY4_CHECK(group_size > 0, "refit_normal_rows: group_size must be positive");
  ANY4_CHECK(r >= 0, "refit_normal_rows: r must be >= 0");
  const int64_t n_groups = (K + group_size - 1) / group_size;
  const int64_t G = zero ? n_groups : 0;
  const int64_t P = L + G;
  // The zero unknowns' part of A^T U, A^T diag(d) A and the curvature is the same for every row.
  std::vector<double> zu(G * r, 0.0), zd(G, 0.0), zc(G, 0.0);
  for (int64_t k = 0; zero && k < K; ++k) {
    const int64_t g = k / group_size;
    for (int j = 0; j < r; ++j) zu[g * r + j] += U[k * r + j];
    zd[g] += d[k];
    zc[g] += diag_h[k];
  }
  parallel_for(n, 8, [&](int64_t b, int64_t e) {
    std::vector<float> Bf(L * r);  // A^T U's table rows: the hot loop, float (a preconditioner)
    std::vector<double> B(P * r), dl(L), cross(L * G);
    std::vector<double> scratch(x ? P * P + 2 * P : 0);
    for (int64_t row = b; row < e; ++row) {
      const uint8_t* c = codes + row * K;
      const float* sc = scales + row * n_groups * 2;
      const float* hrr = hr + row * K;
      double* m = x ? scratch.data() : M + row * P * P;
      double* gr = x ? scratch.data() + P * P : grad + row * P;
      double* cu = x ? scratch.data() + P * P + P : curv + row * P;
      std::fill(Bf.begin(), Bf.end(), 0.0f);
      std::fill(dl.begin(), dl.end(), 0.0);
      std::fill(cross.begin(), cross.end(), 0.0);
      for (int64_t j = 0; j < P; ++j) gr[j] = cu[j] = 0.0;
      for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t k1 = std::min(K, (g + 1) * group_size);
        const float sf = sc[g * 2];
        const double sk = sf;
        double gz = 0.0;
        for (int64_t k = g * group_size; k < k1; ++k) {
          const int code = c[k];
          if (code >= L)
            throw std::invalid_argument("refit_normal_rows: code " + std::to_string(code) +
                                        " >= L=" + std::to_string(L) + " (row " + std::to_string(row) + ")");
          float* __restrict bc = Bf.data() + code * r;
          const float* __restrict uk = U + k * r;
          for (int j = 0; j < r; ++j) bc[j] += sf * uk[j];
          dl[code] += sk * sk * d[k];
          gr[code] += sk * hrr[k];
          cu[code] += sk * sk * diag_h[k];
          if (zero) cross[code * G + g] += sk * d[k];
          gz += hrr[k];
        }
        if (zero) gr[L + g] = gz;
      }
      std::copy(Bf.begin(), Bf.end(), B.begin());
      std::copy(zu.begin(), zu.end(), B.begin() + L * r);
      for (int64_t g = 0; g < G; ++g) cu[L + g] = zc[g];
      for (int64_t i = 0; i < P; ++i) {
        const double* bi = B.data() + i * r;
        for (int64_t j = 0; j <= i; ++j) {
          const double* bj = B.data() + j * r;
          double acc = 0.0;
          for (int t = 0; t < r; ++t) acc += bi[t] * bj[t];
          m[i * P + j] = m[j * P + i] = acc;
        }
      }
      for (int a = 0; a < L; ++a) m[a * P + a] += dl[a];
      for (int a = 0; a < L; ++a)
        for (int64_t g = 0; g < G; ++g) {
          m[a * P + L + g] += cross[a * G + g];
          m[(L + g) * P + a] += cross[a * G + g];
        }
      for (int64_t g = 0; g < G; ++g) m[(L + g) * P + L + g] += zd[g];
      if (x && !newton_step(m, gr, cu, P, L, damp, x + row * P))
        for (int64_t j = 0; j < P; ++j) x[row * P + j] = 0.0;  // no step for this row
    }
  });
}

}  // namespace

void refit_normal_rows(const uint8_t* codes, const float* scales, const float* hr, int64_t n, int64_t K,
                       int L, int64_t group_size, bool zero, const float* U, int r, const float* d,
                       const float* diag_h, double* M, double* grad, double* curv) {
  ANY4_CHECK(M && grad && curv, "refit_normal_rows: null output");
  assemble_rows(codes, scales, hr, n, K, L, group_size, zero, U, r, d, diag_h, M, grad, curv, 0.0, nullptr);
}

void refit_newton_rows(const uint8_t* codes, const float* scales, const float* hr, int64_t n, int64_t K,
                       int L, int64_t group_size, bool zero, const float* U, int r, const float* d,
                       const float* diag_h, double damp, double* x) {
  ANY4_CHECK(x, "refit_newton_rows: null output");
  ANY4_CHECK(damp >= 0.0, "refit_newton_rows: damp must be >= 0");
  assemble_rows(codes, scales, hr, n, K, L, group_size, zero, U, r, d, diag_h, nullptr, nullptr, nullptr,
                damp, x);
}

void refit_assign_rows(const float* w, const float* lut, const float* scales, int64_t n, int64_t K, int L,
                       int64_t group_size, uint8_t* codes, float* res) {
  ANY4_CHECK(n >= 0 && K > 0, "refit_assign_rows: need n >= 0 and K > 0");
  ANY4_CHECK(L >= 1 && L <= 256, "refit_assign_rows: L must be in [1, 256], got " + std::to_string(L));
  ANY4_CHECK(group_size > 0, "refit_assign_rows: group_size must be positive");
  const int64_t G = (K + group_size - 1) / group_size;
  parallel_for(n, 8, [&](int64_t b, int64_t e) {
    std::vector<float> deq(L);
    for (int64_t row = b; row < e; ++row) {
      for (int64_t g = 0; g < G; ++g) {
        const float scale = scales[(row * G + g) * 2], zero = scales[(row * G + g) * 2 + 1];
        for (int j = 0; j < L; ++j) deq[j] = std::fma(lut[row * L + j], scale, zero);
        const int64_t k0 = g * group_size, len = std::min(group_size, K - k0);
        const float* x = w + row * K + k0;
        uint8_t* c = codes + row * K + k0;
        reassign_codes(deq.data(), L, x, c, len);
        float* r = res + row * K + k0;
        for (int64_t k = 0; k < len; ++k) r[k] = deq[c[k]] - x[k];
      }
    }
  });
}

}  // namespace any4
