// Exact weighted 1-D k-means by dynamic programming (see kmeans_optimal.cpp for the recurrence).
// This header is compiled once per instruction set (kmeans_optimal.cpp: portable, 2 lanes;
// kmeans_optimal_avx2.cpp, 4 lanes; kmeans_optimal_avx512.cpp, 8 lanes) inside the namespace
// named by ANY4_KMEANS_ISA with ANY4_KMEANS_LANES doubles per vector; kmeans_optimal.cpp picks
// one at run time. Only IEEE add, sub, mul and div are used (contraction into FMA is disabled),
// element by element, and ties go to the smallest split, so every build returns bit-identical
// results. Indices travel as doubles (exact below 2^53) so that every comparison is a
// floating-point one, which all instruction sets have.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#include "kmeans_detail.h"

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace any4 {
namespace kmeans_detail {
namespace ANY4_KMEANS_ISA {

constexpr int kLanes = ANY4_KMEANS_LANES;
typedef double vd __attribute__((vector_size(8 * ANY4_KMEANS_LANES)));
typedef int64_t vm __attribute__((vector_size(8 * ANY4_KMEANS_LANES)));  // comparison masks

// Cluster weights below this are treated as empty (W == 0 implies S == 0, so the cost term
// S^2 / max(W, kTiny) is exactly 0).
constexpr double kTiny = 1e-300;

struct Layer {
  const double* A;  // A[m] = E_{j-1}(m) - PQ[m]
  const double *PW, *PS, *PQ;
  double* cur;              // E_j(i)
  int32_t* opt;             // argmin split of E_j(i)
  const int32_t* opt_prev;  // splits of layer j-1, valid up to prev_hi (non-decreasing)
  int32_t prev_hi;          // last row of layer j-1 kept: the largest admissible split
};

inline vd splat(double x) {
  return vd{} + x;
}

inline vd lane_ramp() {
  vd r;
  for (int t = 0; t < kLanes; ++t) r[t] = t;
  return r;
}

inline vd load(const double* p) {
  vd x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}

// Lane-wise leftmost minimum of two (value, index) vectors.
inline void merge_min(vd& val, vd& idx, vd v2, vd i2) {
  const vm take = (v2 < val) | ((v2 == val) & (i2 < idx));
  val = take ? v2 : val;
  idx = take ? i2 : idx;
}

typedef int32_t vi32 __attribute__((vector_size(4 * ANY4_KMEANS_LANES)));

#if ANY4_KMEANS_LANES == 8
#if defined(__clang__)
#define ANY4_SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shufflevector(v, v, a, b, c, d, e, f, g, h)
#else
#define ANY4_SHUFFLE8(v, a, b, c, d, e, f, g, h) __builtin_shuffle(v, vm{a, b, c, d, e, f, g, h})
#endif
#endif

#if ANY4_KMEANS_LANES == 4
#if defined(__clang__)
#define ANY4_SHUFFLE4(v, a, b, c, d) __builtin_shufflevector(v, v, a, b, c, d)
#else
#define ANY4_SHUFFLE4(v, a, b, c, d) __builtin_shuffle(v, vm{a, b, c, d})
#endif
#endif

// Leftmost argmin over the lanes (smallest value, then smallest index). Branch-free for 4 and 8
// lanes (a data-dependent branch per lane mispredicts about half the time).
inline int32_t lane_argmin(vd val, vd idx, double* best) {
#if ANY4_KMEANS_LANES == 4
  vd v = val, i = idx;
  merge_min(v, i, ANY4_SHUFFLE4(v, 2, 3, 0, 1), ANY4_SHUFFLE4(i, 2, 3, 0, 1));
  merge_min(v, i, ANY4_SHUFFLE4(v, 1, 0, 3, 2), ANY4_SHUFFLE4(i, 1, 0, 3, 2));
  *best = v[0];
  return static_cast<int32_t>(i[0]);
#elif ANY4_KMEANS_LANES == 8  // log-step reduction with lane swaps
  vd v = val, i = idx;
  merge_min(v, i, ANY4_SHUFFLE8(v, 4, 5, 6, 7, 0, 1, 2, 3), ANY4_SHUFFLE8(i, 4, 5, 6, 7, 0, 1, 2, 3));
  merge_min(v, i, ANY4_SHUFFLE8(v, 2, 3, 0, 1, 6, 7, 4, 5), ANY4_SHUFFLE8(i, 2, 3, 0, 1, 6, 7, 4, 5));
  merge_min(v, i, ANY4_SHUFFLE8(v, 1, 0, 3, 2, 5, 4, 7, 6), ANY4_SHUFFLE8(i, 1, 0, 3, 2, 5, 4, 7, 6));
  *best = v[0];
  return static_cast<int32_t>(i[0]);
#else
  double b = val[0], a = idx[0];
  for (int t = 1; t < kLanes; ++t)
    if (val[t] < b || (val[t] == b && idx[t] < a)) {
      b = val[t];
      a = idx[t];
    }
  *best = b;
  return static_cast<int32_t>(a);
#endif
}

// argmin over m in [lo, hi] of A[m] - (Si - PS[m])^2 / max(Wi - PW[m], tiny); leftmost on ties.
// Reads up to 2 * kLanes - 1 entries past hi (the arrays are padded). Two independent chains of
// vectors when there are at most 4 lanes, to keep the divider busy. Steps whose lanes all lie
// in [lo, hi] skip the range test; only the last, partial step masks the lanes past hi. (Each
// lane keeps its leftmost minimum and the lanes merge by (value, index), so the result is the
// leftmost argmin however the candidates are spread over the lanes.)
inline int32_t best_split(const Layer& L, int32_t i, int32_t lo, int32_t hi, double* best_val) {
  constexpr int kChains = kLanes >= 8 ? 1 : 2;
  constexpr int kStep = kChains * kLanes;
  const vd wi = splat(L.PW[i]), si = splat(L.PS[i]), tiny = splat(kTiny);
  vd vbest[kChains], varg[kChains], vidx[kChains];
  for (int c = 0; c < kChains; ++c) {
    vbest[c] = splat(std::numeric_limits<double>::infinity());
    vidx[c] = lane_ramp() + (lo + c * kLanes);
    varg[c] = vidx[c];
  }
  auto step = [&](int32_t m, bool partial) {
    const vd vhi = splat(hi);
    for (int c = 0; c < kChains; ++c) {
      const int32_t mc = m + c * kLanes;
      vd w = wi - load(L.PW + mc);
      w = w > tiny ? w : tiny;
      const vd sv = si - load(L.PS + mc);
      const vd val = load(L.A + mc) - sv * sv / w;
      const vm upd = partial ? (val < vbest[c]) & (vidx[c] <= vhi) : val < vbest[c];
      vbest[c] = upd ? val : vbest[c];
      varg[c] = upd ? vidx[c] : varg[c];
      vidx[c] += kStep;
    }
  };
  int32_t m = lo;
  for (; m + kStep - 1 <= hi; m += kStep) step(m, false);
  if (m <= hi) step(m, true);
  for (int c = 1; c < kChains; ++c) merge_min(vbest[0], varg[0], vbest[c], varg[c]);
  return lane_argmin(vbest[0], varg[0], best_val);
}

inline void solve_row(const Layer& L, int32_t i, int32_t lo, int32_t hi) {
  lo = std::max(lo, L.opt_prev[std::min(i, L.prev_hi)]);
  hi = std::min(std::min(hi, i - 1), L.prev_hi);
  lo = std::min(lo, hi);
  double val;
  L.opt[i] = best_split(L, i, lo, hi, &val);
  L.cur[i] = val + L.PQ[i];
}

// Rows a+1 .. b-1 (at most kBlockRows) whose splits lie in [opt(a), opt(b)], one row per vector
// lane: every candidate split m is broadcast to all rows. Leftmost argmin per row.
constexpr int kBlockRows = kLanes >= 4 ? 16 : 8;
constexpr int kGroups = kBlockRows / kLanes;

inline void solve_block_lanes(const Layer& L, int32_t a, int32_t b) {
  const int32_t nr = b - a - 1;
  vd wi[kGroups], si[kGroups], lo[kGroups], hi[kGroups], best[kGroups], arg[kGroups];
  const vd oa = splat(L.opt[a]), ob = splat(L.opt[b]);
  for (int g = 0; g < kGroups; ++g) {
    wi[g] = load(L.PW + a + 1 + g * kLanes);  // lanes past nr are unused (padded arrays)
    si[g] = load(L.PS + a + 1 + g * kLanes);
    const vd row = lane_ramp() + (a + 1 + g * kLanes);
    vd p;
    if (a + (g + 1) * kLanes <= L.prev_hi) {
      vi32 p32;
      std::memcpy(&p32, L.opt_prev + a + 1 + g * kLanes, sizeof(p32));
      p = __builtin_convertvector(p32, vd);
    } else {
      for (int t = 0; t < kLanes; ++t) p[t] = L.opt_prev[std::min(a + 1 + g * kLanes + t, L.prev_hi)];
    }
    vd h = row - 1;
    h = ob < h ? ob : h;
    vd l = oa > p ? oa : p;
    l = h < l ? h : l;
    const vm used = row < splat(b);
    lo[g] = used ? l : splat(1);  // empty range in unused lanes
    hi[g] = used ? h : splat(0);
    best[g] = splat(std::numeric_limits<double>::infinity());
    arg[g] = lo[g];
  }
  const int32_t mlo = std::min(L.opt[a], L.opt[b]);
  const int32_t mhi = std::max(std::min(L.opt[b], b - 2), mlo);
  const vd tiny = splat(kTiny);
  for (int32_t m = mlo; m <= mhi; ++m) {
    const double pw = L.PW[m], ps = L.PS[m], am = L.A[m];
    const vd vmm = splat(m);
    for (int g = 0; g < kGroups; ++g) {
      vd w = wi[g] - pw;
      w = w > tiny ? w : tiny;
      const vd sv = si[g] - ps;
      const vd val = am - sv * sv / w;
      const vm upd = (val < best[g]) & (lo[g] <= vmm) & (vmm <= hi[g]);
      best[g] = upd ? val : best[g];
      arg[g] = upd ? vmm : arg[g];
    }
  }
  for (int32_t t = 0; t < nr; ++t) {
    const int32_t i = a + 1 + t;
    L.opt[i] = static_cast<int32_t>(arg[t / kLanes][t % kLanes]);
    L.cur[i] = best[t / kLanes][t % kLanes] + L.PQ[i];
  }
}

// Rows strictly between the solved rows a and b: all at once when their candidate window is
// narrow, else solve the middle row and recurse.
inline void solve_block(const Layer& L, int32_t a, int32_t b) {
  if (b - a < 2) return;
  if (b - a <= kBlockRows + 1 && L.opt[b] - L.opt[a] < 48) {
    solve_block_lanes(L, a, b);
    return;
  }
  const int32_t mid = a + (b - a) / 2;
  solve_row(L, mid, L.opt[a], L.opt[b]);
  solve_block(L, a, mid);
  solve_block(L, mid, b);
}

// Rows i in [ilo, ihi], splits in [mlo, min(i-1, prev_hi)]. Divide & conquer over i (a row's
// split lies between the splits of its two solved neighbours), swept level by level on
// power-of-two strides down to every 8th row; the rows in between are solved in blocks, one row
// per lane. E_j(i) grows with i, so once a solved row exceeds the bound U every row after it
// does too: those rows are skipped (they cannot lie on an optimal path, whose prefixes all cost
// at most OPT <= U). Returns the last row kept (every row in [ilo, result] is solved and <= U).
inline int32_t solve_layer(const Layer& L, int32_t ilo, int32_t ihi, int32_t mlo, double U) {
  constexpr int32_t kStride = kBlockRows;
  const int32_t R = ihi - ilo + 1;
  int32_t cut = ihi + 1;  // first row known to exceed U (rows >= cut are skipped)
  auto row = [&](int32_t i, int32_t lo, int32_t hi) {
    solve_row(L, i, lo, hi);
    if (L.cur[i] > U && i < cut) cut = i;
  };
  row(ihi, mlo, ihi - 1);
  if (R > 1) {
    row(ilo, mlo, L.opt[ihi]);
    int32_t s = 1;
    while (s * 2 < R - 1) s *= 2;
    for (; s >= kStride; s /= 2)
      for (int32_t r = s; r < R - 1 && ilo + r < cut; r += 2 * s) {
        const int32_t left = ilo + r - s, right = std::min(ilo + std::min(r + s, R - 1), cut);
        row(ilo + r, L.opt[left], L.opt[right]);
      }
    for (int32_t r = 0; r < R - 1 && ilo + r < cut; r += kStride) {
      const int32_t a = ilo + r, b = std::min(ilo + std::min(r + kStride, R - 1), cut);
      solve_block(L, a, b);
      for (int32_t i = a + 1; i < b; ++i)
        if (L.cur[i] > U) {
          cut = std::min(cut, i);
          break;
        }
    }
  }
  return cut - 1;
}

// Layers 1..layers of the forward recurrence over one direction of the row (prefix sums PW, PS,
// PQ over D values), for a k-cluster problem: layer j keeps rows [j, D - (k - j)] that cost at
// most U; the last layer starts at row last_lo instead, when that is larger (the rows the join
// can use). Layer j's splits go to opt + j * stride. Returns the last layer's values (valid on
// [max(layers, last_lo), *last_row]) in one of the two buffers.
inline const double* run_layers(const double* PW, const double* PS, const double* PQ, int32_t D, int k,
                                int layers, double U, double* buf0, double* buf1, int32_t* opt, size_t stride,
                                int32_t* last_row, int32_t last_lo) {
  double* prev = buf0;
  double* cur = buf1;
  // Layer 1: one cluster over [0, i).
  int32_t* opt1 = opt + stride;
  const int32_t hi1 = D - (k - 1);
  prev[0] = 0;
  int32_t keep = hi1;
  for (int32_t i = 1; i <= hi1; ++i) {
    const double W = std::max(PW[i], kTiny);
    prev[i] = PQ[i] - PS[i] * PS[i] / W;
    opt1[i] = 0;
  }
  for (int32_t i = 1; i <= hi1; ++i)
    if (prev[i] > U) {
      keep = i - 1;
      break;
    }
  for (int j = 2; j <= layers; ++j) {
    if (keep < j - 1) break;                                   // nothing left within the bound
    for (int32_t m = j - 1; m <= keep; ++m) prev[m] -= PQ[m];  // E -> A
    Layer L{prev, PW, PS, PQ, cur, opt + stride * j, opt + stride * (j - 1), keep};
    const int32_t ihi = D - (k - j);
    keep = solve_layer(L, j == layers ? std::max<int32_t>(j, std::min(last_lo, ihi)) : j, ihi, j - 1, U);
    std::swap(prev, cur);
  }
  *last_row = keep;
  return prev;
}

// Exact optimum, meeting in the middle: the first kf = k/2 clusters by the recurrence over the
// row, the last kb = k - kf by the same recurrence over the reversed row, joined at the best
// boundary. With an upper bound U on the optimum (a Lloyd run), both halves keep only rows whose
// prefix (suffix) cost is at most U. The reversed half runs first: the join only uses boundaries
// i >= D - last_b (suffixes it kept), so the last forward layer starts there. Returns false when
// the bound pruned everything (rounding; the caller retries without it).
inline bool optimal_partition_bounded(const SortedRow& r, int k, double U, Scratch& s, int32_t* bounds,
                                      double* optimum) {
  const int32_t D = r.D;
  const size_t stride = static_cast<size_t>(D) + 1;
  const size_t padded = stride + 16;  // vector loads may run up to 15 entries past D
  const int kf = k / 2, kb = k - kf;
  if (s.a.size() < 4 * padded) s.a.resize(4 * padded);
  if (s.b.size() < 3 * padded) s.b.resize(3 * padded);
  if (s.opt.size() < stride * (kf + 1 + kb + 1)) s.opt.resize(stride * (kf + 1 + kb + 1));
  // reversed row: prefix sums of the suffixes
  double* RW = s.b.data();
  double* RS = RW + padded;
  double* RQ = RS + padded;
  const double *PW = r.PW.data(), *PS = r.PS.data(), *PQ = r.PQ.data();
  for (int32_t i = 0; i <= D; ++i) {
    RW[i] = PW[D] - PW[D - i];
    RS[i] = PS[D] - PS[D - i];
    RQ[i] = PQ[D] - PQ[D - i];
  }
  int32_t* opt_f = s.opt.data();
  int32_t* opt_b = s.opt.data() + stride * (kf + 1);
  int32_t last_f = D, last_b = D;
  const double* Eb = run_layers(RW, RS, RQ, D, k, kb, U, s.a.data() + 2 * padded, s.a.data() + 3 * padded,
                                opt_b, stride, &last_b, 0);
  const double* Ef = nullptr;
  if (kf >= 1)
    Ef = run_layers(PW, PS, PQ, D, k, kf, U, s.a.data(), s.a.data() + padded, opt_f, stride, &last_f,
                    D - last_b);
  // join: clusters 0..kf-1 over [0, i), kf..k-1 over [i, D) (reversed prefix of length D - i)
  int32_t best_i = -1;
  double best = std::numeric_limits<double>::infinity();
  const int32_t ilo = std::max(kf, D - last_b), ihi = std::min(D - kb, kf >= 1 ? last_f : 0);
  for (int32_t i = ilo; i <= ihi; ++i) {
    const double v = (kf >= 1 ? Ef[i] : 0.0) + Eb[D - i];
    if (v < best) {
      best = v;
      best_i = i;
    }
  }
  if (best_i < 0) return false;
  bounds[0] = 0;
  bounds[kf] = best_i;
  for (int j = kf; j >= 2; --j) bounds[j - 1] = opt_f[stride * j + bounds[j]];
  int32_t rr = D - best_i;  // reversed index of the join
  for (int c = kb; c >= 2; --c) {
    rr = opt_b[stride * c + rr];
    bounds[kf + kb - c + 1] = D - rr;
  }
  bounds[k] = D;
  *optimum = best;
  return true;
}

inline double optimal_partition_impl_inline(const SortedRow& r, int k, double upper_bound, Scratch& s,
                                            int32_t* bounds) {
  double optimum = 0;
  if (k == 1) {
    bounds[0] = 0;
    bounds[1] = r.D;
    const double W = std::max(r.PW[r.D], kTiny);
    return r.PQ[r.D] - r.PS[r.D] * r.PS[r.D] / W;
  }
  if (!optimal_partition_bounded(r, k, upper_bound, s, bounds, &optimum))
    optimal_partition_bounded(r, k, std::numeric_limits<double>::infinity(), s, bounds, &optimum);
  return optimum;
}

}  // namespace ANY4_KMEANS_ISA
}  // namespace kmeans_detail
}  // namespace any4
