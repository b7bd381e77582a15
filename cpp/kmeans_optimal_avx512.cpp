// The exact k-means dynamic programme (kmeans_optimal_impl.h) built for AVX512; chosen at run
// time by kmeans_optimal.cpp when the processor supports it.
#define ANY4_KMEANS_ISA avx512
#define ANY4_KMEANS_LANES 8
#include "kmeans_optimal_impl.h"

namespace any4 {
namespace kmeans_detail {
namespace avx512 {

double optimal_partition_impl(const SortedRow& r, int k, double upper_bound, Scratch& s, int32_t* bounds) {
  return optimal_partition_impl_inline(r, k, upper_bound, s, bounds);
}

}  // namespace avx512
}  // namespace kmeans_detail
}  // namespace any4
