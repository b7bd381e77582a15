// Lloyd's algorithm on a sorted row (see kmeans_detail.h): weighted greedy k-means++ starts and
// O(k log n) Lloyd steps over prefix sums.
#include <algorithm>
#include <cmath>
#include <limits>

#include "kmeans.h"
#include "kmeans_detail.h"

namespace any4 {
namespace kmeans_detail {
namespace {

// Branchless lower bound: first index in [lo, hi) with v[index] >= x, or hi.
inline int32_t lower_bound_branchless(const double* v, int32_t lo, int32_t hi, double x) {
  int32_t n = hi - lo;
  if (n <= 0) return lo;
  const double* base = v + lo;
  while (n > 1) {
    const int32_t half = n / 2;
    base = base[half - 1] < x ? base + half : base;
    n -= half;
  }
  return static_cast<int32_t>(base - v) + (*base < x);
}

// The distinct values strictly between two neighbouring centres, each counted against its
// nearer centre: [a, s) belong to the left centre, [s, b) to the right one. A gap at either end
// of the row has only one centre (lp = -1: none on the left; rp = D: none on the right).
struct Gap {
  int32_t lp, rp, s;
  double lv, rv;
  double mass_left, mass_right;  // sum of w (v - centre)^2 over each half
  double mass() const { return mass_left + mass_right; }
};

inline Gap make_gap(const SortedRow& r, int32_t lp, double lv, int32_t rp, double rv) {
  Gap g{lp, rp, 0, lv, rv, 0.0, 0.0};
  const int32_t a = lp + 1, b = rp;
  if (a >= b) {
    g.s = b;
    return g;
  }
  if (lp < 0)
    g.s = a;
  else if (rp >= r.D)
    g.s = b;
  else
    g.s = lower_bound_branchless(r.v.data(), a, b, 0.5 * (lv + rv));
  if (g.s > a) g.mass_left = cost_about(r, a, g.s, lv);
  if (b > g.s) g.mass_right = cost_about(r, g.s, b, rv);
  return g;
}

// Centres chosen so far, ascending; gap t lies between centre t-1 and centre t (0 <= t <= m).
struct Centres {
  int m = 0;
  double val[kMaxClusters];
  Gap gap[kMaxClusters + 1];

  // Insert a centre (distinct index p) into gap t, which it splits into gl and gr.
  void insert(int t, double value, const Gap& gl, const Gap& gr) {
    for (int i = m; i > t; --i) val[i] = val[i - 1];
    for (int i = m + 1; i > t + 1; --i) gap[i] = gap[i - 1];
    val[t] = value;
    gap[t] = gl;
    gap[t + 1] = gr;
    ++m;
  }
};

// D^2 sampling inside gap g: the distinct index whose cumulative weighted squared distance to
// its nearer centre first exceeds x (0 <= x < mass). Returns -1 if rounding left nothing with
// positive weight to pick.
int32_t sample_in_gap(const SortedRow& r, const Gap& g, double x) {
  int32_t lo, hi;
  double c;
  if (x < g.mass_left) {
    lo = g.lp + 1, hi = g.s, c = g.lv;
  } else {
    x -= g.mass_left;
    lo = g.s, hi = g.rp, c = g.rv;
  }
  if (lo >= hi) return -1;
  // smallest i in [lo, hi) with cost_about(lo, i + 1, c) > x (branchless bisection)
  const double PWlo = r.PW[lo], PSlo = r.PS[lo], PQlo = r.PQ[lo];
  int32_t base = lo, n = hi - lo;
  while (n > 1) {
    const int32_t half = n / 2;
    const int32_t e = base + half;  // test prefix [lo, e)
    const double mass = (r.PQ[e] - PQlo) - 2.0 * c * (r.PS[e] - PSlo) + c * c * (r.PW[e] - PWlo);
    base = mass <= x ? e : base;
    n -= half;
  }
  const int32_t L = base;
  if (r.wd[L] > 0) return L;
  for (int32_t i = L + 1; i < hi; ++i)
    if (r.wd[i] > 0) return i;
  for (int32_t i = L - 1; i >= lo; --i)
    if (r.wd[i] > 0) return i;
  return -1;
}

// Fallback when sampling fails (rounding): the positive-weight non-centre value with the
// largest weighted squared distance to its nearer centre. Writes its gap to *gap.
int32_t farthest_point(const SortedRow& r, const Centres& C, int* gap) {
  int32_t best = -1;
  double best_d = -1;
  const double* v = r.v.data();
  for (int t = 0; t <= C.m; ++t) {
    const Gap& g = C.gap[t];
    for (int32_t d = g.lp + 1; d < g.rp; ++d) {
      if (!(r.wd[d] > 0)) continue;
      double e = std::numeric_limits<double>::infinity();
      if (g.lp >= 0) e = std::min(e, std::fabs(v[d] - g.lv));
      if (g.rp < r.D) e = std::min(e, std::fabs(v[d] - g.rv));
      const double dd = r.wd[d] * e * e;
      if (dd > best_d) {
        best_d = dd;
        best = d;
        *gap = t;
      }
    }
  }
  return best;
}

// Weighted greedy k-means++ (as scikit-learn: 2 + floor(ln k) D^2-sampled candidates per step,
// keep the one that lowers the potential most). Each candidate costs O(log n) via prefix sums.
void kmeanspp(const SortedRow& r, int k, Rng& rng, Centres& C) {
  const int32_t D = r.D;
  const int n_trials = 2 + static_cast<int>(std::log(static_cast<double>(k)));
  C.m = 0;
  // First centre: sampled by weight.
  {
    const double x = rng.uniform() * r.PW[D];
    int32_t p =
        static_cast<int32_t>(std::upper_bound(r.PW.data() + 1, r.PW.data() + D + 1, x) - (r.PW.data() + 1));
    p = std::min(p, D - 1);
    while (p > 0 && !(r.wd[p] > 0)) --p;
    while (p < D - 1 && !(r.wd[p] > 0)) ++p;
    const double pv = r.v[p];
    C.insert(0, pv, make_gap(r, -1, 0.0, p, pv), make_gap(r, p, pv, D, 0.0));
  }
  while (C.m < k) {
    double total = 0;
    for (int t = 0; t <= C.m; ++t) total += C.gap[t].mass();
    int32_t best_p = -1;
    int best_t = 0;
    double best_delta = std::numeric_limits<double>::infinity();
    Gap best_l{}, best_r{};
    auto consider = [&](int t, int32_t p) {
      const Gap& g = C.gap[t];
      const double pv = r.v[p];
      const Gap gl = make_gap(r, g.lp, g.lv, p, pv);
      const Gap gr = make_gap(r, p, pv, g.rp, g.rv);
      const double delta = gl.mass() + gr.mass() - g.mass();
      if (delta < best_delta) {
        best_delta = delta;
        best_p = p;
        best_t = t;
        best_l = gl;
        best_r = gr;
      }
    };
    if (total > 0) {
      for (int trial = 0; trial < n_trials; ++trial) {
        double x = rng.uniform() * total;
        int t = 0;
        int last_positive = -1;
        for (; t <= C.m; ++t) {
          const double mt = C.gap[t].mass();
          if (mt > 0) last_positive = t;
          if (x < mt) break;
          x -= mt;
        }
        if (t > C.m) {  // rounding: take the end of the last gap with mass
          if (last_positive < 0) break;
          t = last_positive;
          x = C.gap[t].mass() * (1.0 - 1e-12);
        }
        const int32_t p = sample_in_gap(r, C.gap[t], x);
        if (p >= 0) consider(t, p);
      }
    }
    if (best_p < 0) {
      int t = 0;
      const int32_t p = farthest_point(r, C, &t);
      if (p < 0) break;  // cannot happen while D_pos > m
      consider(t, p);
    }
    C.insert(best_t, r.v[best_p], best_l, best_r);
  }
}

inline void sort_small(double* c, int k) {
  for (int j = 1; j < k; ++j)
    for (int t = j; t > 0 && c[t] < c[t - 1]; --t) std::swap(c[t], c[t - 1]);
}

// Re-seed the clusters flagged in `empty` (no weight) at the points with the largest weighted
// squared distance to their current centroid, one after the other (each new seed shrinks the
// distances), so no two centroids coincide.
void reseed(const SortedRow& r, int k, double* c, const int32_t* bnd, const bool* empty, Scratch& s) {
  const int32_t D = r.D;
  if (s.d2.size() < static_cast<size_t>(D)) s.d2.resize(D);
  double* d2 = s.d2.data();
  const double* v = r.v.data();
  for (int j = 0; j < k; ++j)
    for (int32_t d = bnd[j]; d < bnd[j + 1]; ++d) {
      double e = v[d] - c[j];
      d2[d] = r.wd[d] * e * e;
    }
  for (int j = 0; j < k; ++j) {
    if (!empty[j]) continue;
    int32_t best = 0;
    for (int32_t d = 1; d < D; ++d)
      if (d2[d] > d2[best]) best = d;
    if (!(d2[best] > 0)) {
      // Every weighted value already sits on a centroid (rounding only, since D_pos >= k):
      // take any value that is not a centroid.
      for (int32_t d = 0; d < D; ++d) {
        bool taken = false;
        for (int t = 0; t < k && !taken; ++t) taken = !empty[t] && c[t] == v[d];
        if (!taken) {
          best = d;
          break;
        }
      }
    }
    c[j] = v[best];
    for (int32_t d = 0; d < D; ++d) {
      double e = v[d] - c[j];
      d2[d] = std::min(d2[d], r.wd[d] * e * e);
    }
    d2[best] = 0;
  }
  sort_small(c, k);
}

// One Lloyd run from sorted distinct centroids c; returns the inertia of the final (c, bnd).
double lloyd_run(const SortedRow& r, int k, double* c, int max_iter, Scratch& s) {
  const int32_t D = r.D;
  const double* v = r.v.data();
  int32_t bnd[kMaxClusters + 1];
  bool empty[kMaxClusters];
  bnd[0] = 0;
  bnd[k] = D;
  for (int j = 1; j < k; ++j)
    bnd[j] = static_cast<int32_t>(std::lower_bound(v, v + D, 0.5 * (c[j - 1] + c[j])) - v);
  for (int it = 0; it < max_iter; ++it) {
    bool any_empty = false;
    for (int j = 0; j < k; ++j) {
      const double W = cw(r, bnd[j], bnd[j + 1]);
      empty[j] = !(W > 0);
      if (empty[j])
        any_empty = true;
      else
        c[j] = cs(r, bnd[j], bnd[j + 1]) / W;
    }
    if (any_empty) reseed(r, k, c, bnd, empty, s);
    bool moved = false;
    for (int j = 1; j < k; ++j) {
      int32_t b = lower_bound_from(v, D, bnd[j], 0.5 * (c[j - 1] + c[j]));
      moved |= b != bnd[j];
      bnd[j] = b;
    }
    if (!moved) break;
  }
  double inertia = 0;
  for (int j = 0; j < k; ++j) inertia += cost_about(r, bnd[j], bnd[j + 1], c[j]);
  return inertia;
}

}  // namespace

double lloyd_best_of(const SortedRow& r, int k, int max_iter, int n_init, uint64_t seed, Scratch& s,
                     double* centroids) {
  Rng rng(seed);
  Centres C;
  double c[kMaxClusters];
  double best = std::numeric_limits<double>::infinity();
  for (int start = 0; start < n_init; ++start) {
    kmeanspp(r, k, rng, C);
    for (int j = 0; j < k; ++j) c[j] = C.val[j];
    double inertia = lloyd_run(r, k, c, max_iter, s);
    if (inertia < best || start == 0) {
      best = inertia;
      std::copy(c, c + k, centroids);
    }
  }
  return best;
}

}  // namespace kmeans_detail
}  // namespace any4
