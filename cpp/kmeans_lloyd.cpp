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

// Cost of the distinct values strictly between two neighbouring centres (lp, lv) and (rp, rv),
// each value counted against its nearer centre. lp = -1: no centre on the left; rp = D: none on
// the right.
double gap_cost(const SortedRow& r, int32_t lp, double lv, int32_t rp, double rv) {
  const int32_t a = lp + 1, b = rp;
  if (a >= b) return 0.0;
  if (lp < 0) return cost_about(r, a, b, rv);
  if (rp >= r.D) return cost_about(r, a, b, lv);
  const double* v = r.v.data();
  int32_t s = static_cast<int32_t>(std::lower_bound(v + a, v + b, 0.5 * (lv + rv)) - v);
  return cost_about(r, a, s, lv) + cost_about(r, s, b, rv);
}

// Centres chosen so far, ascending; gap t lies between centre t-1 and centre t (0 <= t <= m).
struct Centres {
  int m = 0;
  double val[kMaxClusters];
  int32_t pos[kMaxClusters];  // distinct index of each centre
  double phi[kMaxClusters + 1];  // gap costs

  int32_t left_pos(int t) const { return t > 0 ? pos[t - 1] : -1; }
  double left_val(int t) const { return t > 0 ? val[t - 1] : 0.0; }
  int32_t right_pos(int t, int32_t D) const { return t < m ? pos[t] : D; }
  double right_val(int t) const { return t < m ? val[t] : 0.0; }

  // Insert a centre at distinct index p into gap t, whose two new gaps cost gl and gr.
  void insert(int t, int32_t p, double value, double gl, double gr) {
    for (int i = m; i > t; --i) {
      val[i] = val[i - 1];
      pos[i] = pos[i - 1];
    }
    for (int i = m + 1; i > t + 1; --i) phi[i] = phi[i - 1];
    val[t] = value;
    pos[t] = p;
    phi[t] = gl;
    phi[t + 1] = gr;
    ++m;
  }
};

// D^2 sampling inside gap t: the distinct index whose cumulative weighted squared distance to
// its nearer centre first exceeds x (0 <= x < gap cost). Returns -1 if rounding left nothing
// with positive weight to pick.
int32_t sample_in_gap(const SortedRow& r, const Centres& C, int t, double x) {
  const int32_t lp = C.left_pos(t), rp = C.right_pos(t, r.D);
  const double lv = C.left_val(t), rv = C.right_val(t);
  const int32_t a = lp + 1, b = rp;
  if (a >= b) return -1;
  int32_t s;
  if (lp < 0)
    s = a;  // all of the gap belongs to the right centre
  else if (rp >= r.D)
    s = b;  // all to the left centre
  else
    s = static_cast<int32_t>(std::lower_bound(r.v.data() + a, r.v.data() + b, 0.5 * (lv + rv)) - r.v.data());
  const double mass_left = s > a ? cost_about(r, a, s, lv) : 0.0;
  int32_t lo, hi;
  double c;
  if (x < mass_left) {
    lo = a, hi = s, c = lv;
  } else {
    x -= mass_left;
    lo = s, hi = b, c = rv;
  }
  if (lo >= hi) return -1;
  // smallest i in [lo, hi) with cost_about(lo, i + 1, c) > x
  int32_t L = lo, H = hi - 1;
  while (L < H) {
    int32_t M = L + (H - L) / 2;
    if (cost_about(r, lo, M + 1, c) > x)
      H = M;
    else
      L = M + 1;
  }
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
    const int32_t lp = C.left_pos(t), rp = C.right_pos(t, r.D);
    for (int32_t d = lp + 1; d < rp; ++d) {
      if (!(r.wd[d] > 0)) continue;
      double e = std::numeric_limits<double>::infinity();
      if (lp >= 0) e = std::min(e, std::fabs(v[d] - C.val[t - 1]));
      if (t < C.m) e = std::min(e, std::fabs(v[d] - C.val[t]));
      double dd = r.wd[d] * e * e;
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
    double x = rng.uniform() * r.PW[D];
    int32_t p = static_cast<int32_t>(std::upper_bound(r.PW.data() + 1, r.PW.data() + D + 1, x) - (r.PW.data() + 1));
    p = std::min(p, D - 1);
    while (p > 0 && !(r.wd[p] > 0)) --p;
    while (p < D - 1 && !(r.wd[p] > 0)) ++p;
    const double pv = r.v[p];
    C.insert(0, p, pv, gap_cost(r, -1, 0.0, p, pv), gap_cost(r, p, pv, D, 0.0));
  }
  while (C.m < k) {
    double total = 0;
    for (int t = 0; t <= C.m; ++t) total += C.phi[t];
    int32_t best_p = -1;
    int best_t = 0;
    double best_delta = std::numeric_limits<double>::infinity(), best_gl = 0, best_gr = 0;
    auto consider = [&](int t, int32_t p) {
      const double pv = r.v[p];
      double gl = gap_cost(r, C.left_pos(t), C.left_val(t), p, pv);
      double gr = gap_cost(r, p, pv, C.right_pos(t, D), C.right_val(t));
      double delta = gl + gr - C.phi[t];
      if (delta < best_delta) {
        best_delta = delta;
        best_p = p;
        best_t = t;
        best_gl = gl;
        best_gr = gr;
      }
    };
    if (total > 0) {
      for (int trial = 0; trial < n_trials; ++trial) {
        double x = rng.uniform() * total;
        int t = 0;
        int last_positive = -1;
        for (; t <= C.m; ++t) {
          if (C.phi[t] > 0) last_positive = t;
          if (x < C.phi[t]) break;
          x -= C.phi[t];
        }
        if (t > C.m) {  // rounding: take the end of the last gap with mass
          if (last_positive < 0) break;
          t = last_positive;
          x = C.phi[t] * (1.0 - 1e-12);
        }
        int32_t p = sample_in_gap(r, C, t, x);
        if (p >= 0) consider(t, p);
      }
    }
    if (best_p < 0) {
      int t = 0;
      int32_t p = farthest_point(r, C, &t);
      if (p < 0) break;  // cannot happen while D_pos > m
      consider(t, p);
    }
    C.insert(best_t, best_p, r.v[best_p], best_gl, best_gr);
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
