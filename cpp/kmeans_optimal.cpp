// Exact weighted 1-D k-means by dynamic programming over the sorted distinct values.
//
//   E_1(i) = cost(0, i)
//   E_j(i) = min_{j-1 <= m < i} E_{j-1}(m) + cost(m, i)         (j clusters over values [0, i))
//
// The cost is a Monge array, so the leftmost optimal split opt_j(i) is non-decreasing in i (and
// opt_{j-1}(i) <= opt_j(i)). Each layer is solved by divide & conquer over i (the split of a
// middle row bounds the splits of the rows on either side): O(n log n) per layer, O(k n log n)
// in all, with the inner scans vectorised (kmeans_optimal_impl.h, built per instruction set).
// Two exact prunings: the first k/2 clusters are solved over the row and the last k - k/2 over
// the reversed row, joined at the best boundary; and since E_j(i) grows with i, rows whose
// prefix cost already exceeds a reachable inertia (a Lloyd run) are dropped.
#include <cstdlib>
#include <string>

#include "kmeans.h"
#include "kmeans_detail.h"

#define ANY4_KMEANS_ISA portable
#define ANY4_KMEANS_LANES 2
#include "kmeans_optimal_impl.h"
#undef ANY4_KMEANS_ISA
#undef ANY4_KMEANS_LANES

namespace any4 {
namespace kmeans_detail {

namespace avx2 {
double optimal_partition_impl(const SortedRow& r, int k, double upper_bound, Scratch& s, int32_t* bounds);
}
namespace avx512 {
double optimal_partition_impl(const SortedRow& r, int k, double upper_bound, Scratch& s, int32_t* bounds);
}

namespace {

using Impl = double (*)(const SortedRow&, int, double, Scratch&, int32_t*);

// Best build for this processor; ANY4_KMEANS_ISA=portable|avx2|avx512 caps the choice (used by
// the tests to check that every build gives bit-identical results).
Impl pick_impl() {
  const char* env = std::getenv("ANY4_KMEANS_ISA");
  const std::string cap = env ? env : "avx512";
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (cap == "avx512" && __builtin_cpu_supports("avx512f")) return &avx512::optimal_partition_impl;
  if ((cap == "avx512" || cap == "avx2") && __builtin_cpu_supports("avx2"))
    return &avx2::optimal_partition_impl;
#endif
  return &portable::optimal_partition_impl_inline;
}

}  // namespace

double optimal_partition(const SortedRow& r, int k, double upper_bound, Scratch& s, int32_t* bounds) {
  static const Impl impl = pick_impl();
  return impl(r, k, upper_bound, s, bounds);
}

}  // namespace kmeans_detail
}  // namespace any4
