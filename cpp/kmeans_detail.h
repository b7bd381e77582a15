// Internals shared by the weighted 1-D k-means sources (kmeans.cpp, kmeans_lloyd.cpp,
// kmeans_optimal.cpp). Not part of the public API.
//
// A row is sorted once and reduced to its D distinct values v[0] < ... < v[D-1] (shifted by
// `ref` for numerical range), each with the summed weight of its copies. Prefix sums over the
// distinct values (double, size D+1)
//   PW[i] = sum_{d<i} W_d,   PS[i] = sum_{d<i} W_d v_d,   PQ[i] = sum_{d<i} W_d v_d^2
// give the weight, mean and cost of any contiguous cluster [a, b) in O(1):
//   cost(a, b) = (PQ[b]-PQ[a]) - (PS[b]-PS[a])^2 / (PW[b]-PW[a]).
#pragma once

#include <cstdint>
#include <vector>

namespace any4 {
namespace kmeans_detail {

// One row, sorted and reduced to distinct values. Buffers live in a per-thread workspace and
// are only grown, so steady-state rows allocate nothing.
struct SortedRow {
  int32_t n = 0;                // number of input values
  int32_t D = 0;                // number of distinct values
  int32_t D_pos = 0;            // number of distinct values with positive weight
  double ref = 0;               // v[d] = double(vf[d]) - ref
  std::vector<uint64_t> items;  // sorted (key << 32 | original index), size n
  std::vector<uint64_t> items_tmp;
  std::vector<float> vf;           // distinct values, ascending (as given), size D
  std::vector<double> v;           // vf - ref, size D
  std::vector<double> wd;          // summed weight of each distinct value, size D
  std::vector<int32_t> run;        // distinct d covers items [run[d], run[d+1]), size D+1
  std::vector<double> PW, PS, PQ;  // prefix sums, size D+1
};

// Per-thread scratch for Lloyd and the exact DP.
struct Scratch {
  std::vector<double> a, b;  // DP layers, size D+1
  std::vector<int32_t> opt;  // DP split table, size (k+1) * (D+1)
  std::vector<double> d2;    // reseeding: weighted squared distances, size D
};

// Minimal deterministic generator (splitmix64): identical streams on every platform.
struct Rng {
  uint64_t state;
  explicit Rng(uint64_t seed) : state(seed) {}
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  }
  // Uniform in [0, 1).
  double uniform() { return static_cast<double>(next() >> 11) * (1.0 / 9007199254740992.0); }
};

// Weight, weighted sum and weighted sum of squares of cluster [a, b).
inline double cw(const SortedRow& r, int32_t a, int32_t b) {
  return r.PW[b] - r.PW[a];
}
inline double cs(const SortedRow& r, int32_t a, int32_t b) {
  return r.PS[b] - r.PS[a];
}
inline double cq(const SortedRow& r, int32_t a, int32_t b) {
  return r.PQ[b] - r.PQ[a];
}

// sum_{d in [a,b)} W_d (v_d - c)^2, clamped at 0 (rounding).
inline double cost_about(const SortedRow& r, int32_t a, int32_t b, double c) {
  double x = cq(r, a, b) - 2.0 * c * cs(r, a, b) + c * c * cw(r, a, b);
  return x > 0 ? x : 0.0;
}

// First distinct index i in [0, D] with v[i] >= x, searching outward from a guess p in [0, D]
// (galloping): O(log |answer - p|).
int32_t lower_bound_from(const double* v, int32_t D, int32_t p, double x);

// Lloyd with weighted greedy k-means++ starts; requires D_pos >= k >= 2. Writes the best run's
// centroids (shifted domain, ascending, distinct) to `centroids`; returns its inertia.
double lloyd_best_of(const SortedRow& r, int k, int max_iter, int n_init, uint64_t seed, Scratch& s,
                     double* centroids);

// Exact weighted k-means by dynamic programming; requires D > k >= 1. `upper_bound` is an
// inertia known to be reachable (e.g. a Lloyd run; +inf if none): it only prunes work, the
// result is the optimum either way. Writes the optimal partition: cluster j holds distinct
// values [bounds[j], bounds[j+1]), bounds[0] = 0, bounds[k] = D, every cluster non-empty.
// Returns the optimal inertia.
double optimal_partition(const SortedRow& r, int k, double upper_bound, Scratch& s, int32_t* bounds);

}  // namespace kmeans_detail
}  // namespace any4
