// First working version: sorted Lloyd with prefix sums + weighted k-means++.
// (Optimal DP and speed work: see the k-means issue work.)
#include "kmeans.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <vector>

#include "common.h"
#include "parallel.h"

namespace any4 {

uint64_t derive_row_seed(uint64_t seed, uint64_t row) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (row + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

namespace {

struct Sorted {
  std::vector<double> u, W, S, Q;  // sorted values; prefix sums (size n+1)
};

void prepare(const float* values, const float* weights, int64_t n, Sorted& s, std::vector<int64_t>& order) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return values[a] < values[b]; });
  bool all_zero = true;
  if (weights)
    for (int64_t i = 0; i < n; ++i)
      if (weights[i] > 0) {
        all_zero = false;
        break;
      }
  s.u.resize(n);
  s.W.assign(n + 1, 0.0);
  s.S.assign(n + 1, 0.0);
  s.Q.assign(n + 1, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    double u = values[order[i]];
    double w = (weights && !all_zero) ? weights[order[i]] : 1.0;
    s.u[i] = u;
    s.W[i + 1] = s.W[i] + w;
    s.S[i + 1] = s.S[i] + w * u;
    s.Q[i + 1] = s.Q[i] + w * u * u;
  }
}

// Cost of cluster holding sorted indices [a, b).
inline double cost(const Sorted& s, int64_t a, int64_t b) {
  double w = s.W[b] - s.W[a];
  if (w <= 0) return 0.0;
  double sm = s.S[b] - s.S[a];
  return std::max(0.0, (s.Q[b] - s.Q[a]) - sm * sm / w);
}

// Boundaries: cluster j holds sorted indices [bnd[j], bnd[j+1]).
void boundaries(const Sorted& s, const std::vector<double>& c, std::vector<int64_t>& bnd) {
  int k = static_cast<int>(c.size());
  int64_t n = static_cast<int64_t>(s.u.size());
  bnd[0] = 0;
  bnd[k] = n;
  for (int j = 1; j < k; ++j) {
    double mid = 0.5 * (c[j - 1] + c[j]);
    bnd[j] = std::lower_bound(s.u.begin(), s.u.end(), mid) - s.u.begin();
    bnd[j] = std::max(bnd[j], bnd[j - 1]);
  }
}

double lloyd(const Sorted& s, std::vector<double>& c, int max_iter) {
  int k = static_cast<int>(c.size());
  std::vector<int64_t> bnd(k + 1), prev(k + 1, -1);
  for (int it = 0; it < max_iter; ++it) {
    std::sort(c.begin(), c.end());
    boundaries(s, c, bnd);
    if (bnd == prev) break;
    prev = bnd;
    for (int j = 0; j < k; ++j) {
      double w = s.W[bnd[j + 1]] - s.W[bnd[j]];
      if (bnd[j + 1] > bnd[j] && w > 0) {
        c[j] = (s.S[bnd[j + 1]] - s.S[bnd[j]]) / w;
      } else {
        // Empty cluster: re-seed at the far end of the costliest cluster.
        int best = -1;
        double best_cost = -1;
        for (int t = 0; t < k; ++t) {
          if (bnd[t + 1] - bnd[t] < 2) continue;
          double ct = cost(s, bnd[t], bnd[t + 1]);
          if (ct > best_cost) {
            best_cost = ct;
            best = t;
          }
        }
        if (best >= 0) {
          double lo = s.u[bnd[best]], hi = s.u[bnd[best + 1] - 1];
          double cb = c[best];
          c[j] = (hi - cb > cb - lo) ? hi : lo;
        }
      }
    }
  }
  std::sort(c.begin(), c.end());
  boundaries(s, c, bnd);
  double total = 0;
  for (int j = 0; j < k; ++j) total += cost(s, bnd[j], bnd[j + 1]);
  return total;
}

void kmeanspp(const Sorted& s, int k, std::mt19937_64& rng, std::vector<double>& c) {
  int64_t n = static_cast<int64_t>(s.u.size());
  std::vector<double> d2(n, std::numeric_limits<double>::infinity());
  std::vector<double> w(n);
  for (int64_t i = 0; i < n; ++i) w[i] = s.W[i + 1] - s.W[i];
  std::uniform_real_distribution<double> uni(0.0, 1.0);
  c.clear();
  // first centre: sampled by weight
  double tot = s.W[n];
  double r = uni(rng) * tot;
  int64_t idx = std::upper_bound(s.W.begin() + 1, s.W.end(), r) - (s.W.begin() + 1);
  idx = std::min(idx, n - 1);
  c.push_back(s.u[idx]);
  for (int j = 1; j < k; ++j) {
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) {
      double d = s.u[i] - c.back();
      d2[i] = std::min(d2[i], d * d);
      sum += w[i] * d2[i];
    }
    if (sum <= 0) break;
    double t = uni(rng) * sum, acc = 0;
    int64_t pick = n - 1;
    for (int64_t i = 0; i < n; ++i) {
      acc += w[i] * d2[i];
      if (acc >= t && w[i] * d2[i] > 0) {
        pick = i;
        break;
      }
    }
    c.push_back(s.u[pick]);
  }
}

}  // namespace

double kmeans_1d(const float* values, const float* weights, int64_t n, int k, const KMeansParams& params,
                 uint64_t row_seed, float* centroids, uint8_t* codes) {
  ANY4_CHECK(k >= 1 && k <= kMaxClusters, "k must be in [1, 256]");
  ANY4_CHECK(n >= 1, "k-means needs at least one value");
  if (params.method == KMeansMethod::Optimal)
    throw std::invalid_argument("method='optimal' is not implemented yet");
  Sorted s;
  std::vector<int64_t> order;
  prepare(values, weights, n, s, order);
  // distinct values
  std::vector<double> distinct;
  for (int64_t i = 0; i < n && static_cast<int>(distinct.size()) <= k; ++i)
    if (distinct.empty() || s.u[i] != distinct.back()) distinct.push_back(s.u[i]);
  std::vector<double> best;
  double best_inertia = std::numeric_limits<double>::infinity();
  if (static_cast<int>(distinct.size()) <= k) {
    best = distinct;
    while (static_cast<int>(best.size()) < k) best.push_back(distinct.back());
    best_inertia = 0;
  } else {
    std::mt19937_64 rng(row_seed);
    std::vector<double> c;
    for (int start = 0; start < std::max(1, params.n_init); ++start) {
      kmeanspp(s, k, rng, c);
      while (static_cast<int>(c.size()) < k) c.push_back(c.back());
      double inertia = lloyd(s, c, params.max_iter);
      if (inertia < best_inertia) {
        best_inertia = inertia;
        best = c;
      }
    }
  }
  for (int j = 0; j < k; ++j) centroids[j] = static_cast<float>(best[j]);
  if (codes) {
    for (int64_t i = 0; i < n; ++i) {
      float v = values[i];
      int lo = static_cast<int>(std::lower_bound(centroids, centroids + k, v) - centroids);
      int c = lo;
      if (lo == k || (lo > 0 && std::fabs(v - centroids[lo - 1]) <= std::fabs(centroids[lo] - v))) c = lo - 1;
      codes[i] = static_cast<uint8_t>(c);
    }
  }
  return best_inertia;
}

void kmeans_rows(const float* values, const float* weights, int64_t rows, int64_t n, int k,
                 const KMeansParams& params, float* centroids, uint8_t* codes, double* inertia) {
  parallel_for(rows, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      double in =
          kmeans_1d(values + r * n, weights ? weights + r * n : nullptr, n, k, params,
                    derive_row_seed(params.seed, r), centroids + r * k, codes ? codes + r * n : nullptr);
      if (inertia) inertia[r] = in;
    }
  });
}

}  // namespace any4
