// Weighted 1-D k-means (the hot loop of any-K quantization).
//
// Lloyd: values are sorted once per row; with prefix sums of w, w*u and w*u^2 over the sorted
// values every Lloyd step costs O(k log n) (cluster boundaries are midpoints between sorted
// centroids). Initialisation is weighted k-means++ from a seeded generator; n_init restarts keep
// the lowest inertia. Optimal: exact weighted 1-D k-means by dynamic programming over the sorted
// values. Both are deterministic for a given (input, seed), whatever the thread count.
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

// One row. values[n] finite; weights[n] >= 0 finite or nullptr (all ones). If all weights are
// zero the row is treated as unweighted. Writes k centroids sorted ascending to `centroids`, and
// when codes != nullptr the index of the nearest centroid for each value. If the row holds
// fewer than k distinct values, the distinct values come first and the remaining centroids repeat
// the largest value. Returns the weighted inertia sum_i w_i (u_i - c(u_i))^2.
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
