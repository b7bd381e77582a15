// Weighted 1-D k-means (the hot loop of any-K quantization, SPEC §2).
//
// Every row is sorted once (LSD radix sort on the float bit patterns, negatives included) and
// reduced to its distinct values with prefix sums (double) of w, w*u and w*u^2, so the weight,
// mean and cost of any contiguous cluster are O(1).
//
// Lloyd (default): weighted greedy k-means++ initialisation from a seeded generator (each step
// O(k log n) thanks to the prefix sums), then Lloyd steps of O(k log n): cluster boundaries are
// the midpoints between sorted centroids, found by galloping search from the previous
// boundaries. Iterates until no boundary moves or max_iter; a cluster left without weight is
// re-seeded at the point with the largest weighted squared distance to its centroid (never a
// duplicate centroid). n_init restarts keep the lowest inertia.
//
// Optimal: the exact, globally optimal weighted k-means by dynamic programming over the sorted
// distinct values, O(k n log n) (divide & conquer over the monotone split points, inner scans
// vectorised per instruction set with bit-identical results). Exact prunings: the first k/2
// clusters are solved forwards and the rest backwards, joined at the best boundary, and rows
// whose prefix cost already exceeds one Lloyd run's inertia are skipped.
//
// Both are deterministic for a given (input, seed), whatever the thread count: each row has its
// own generator seeded from (seed, row), and per-thread workspaces carry no state across rows.
#pragma once

#include <cstdint>

namespace any4 {

enum class KMeansMethod : int { Lloyd = 0, Optimal = 1 };

struct KMeansParams {
  KMeansMethod method = KMeansMethod::Lloyd;
  int max_iter = 100;  // Lloyd iterations per start
  int n_init = 1;      // Lloyd restarts (best inertia kept)
  uint64_t seed = 0;   // base seed; row r uses a seed derived from (seed, r)
};

// Max clusters (codes are uint8).
constexpr int kMaxClusters = 256;

// One row. values[n] finite (any sign); weights[n] finite and >= 0, or nullptr (all ones). If
// all weights are zero the row is treated as unweighted. Writes k centroids sorted ascending to
// `centroids`, and when codes != nullptr the index of the nearest centroid of each value (ties
// go to the larger centroid). Returns the weighted inertia sum_i w_i (u_i - c(u_i))^2 of the
// returned float centroids and codes, computed in double.
//
// Special cases (documented behaviour):
// - D distinct values with D <= k: the D distinct values come first and the remaining k - D
//   centroids repeat the largest value; inertia 0 (exact). Only here can centroids repeat.
// - Fewer than k distinct values carry positive weight (but D > k): both methods return the
//   exact optimum (inertia 0) from the dynamic programme; clusters holding only zero-weight
//   values get the midpoint of their value range.
// - Otherwise all k centroids are distinct, and each lies inside the value range of its
//   cluster (it is the cluster's weighted mean, rounded to float).
// "Optimal" is the exact optimum over real-valued centroids; the returned centroids are those
// means rounded to float32, which adds at most sum_j W_j (ulp(c_j)/2)^2 to the inertia
// (negligible for quantization, where u is in [0, 15]; visible only for data whose spread is a
// few float32 steps, e.g. 1e6 +- 8, where a Lloyd run's rounding can happen to be luckier).
// Throws std::invalid_argument on k outside [1, 256], n < 1, n >= 2^31, non-finite values or
// weights, or negative weights.
double kmeans_1d(const float* values, const float* weights, int64_t n, int k, const KMeansParams& params,
                 uint64_t row_seed, float* centroids, uint8_t* codes);

// Many independent rows of length n, in parallel over rows (parallel_for). values/weights are
// [rows, n] row-major (weights may be nullptr); centroids [rows, k]; codes [rows, n] or nullptr;
// inertia [rows] or nullptr. Row r uses row seed derive_row_seed(params.seed, r).
void kmeans_rows(const float* values, const float* weights, int64_t rows, int64_t n, int k,
                 const KMeansParams& params, float* centroids, uint8_t* codes, double* inertia);

// splitmix64-style mixing of (seed, row) into a per-row seed.
uint64_t derive_row_seed(uint64_t seed, uint64_t row);

}  // namespace any4
