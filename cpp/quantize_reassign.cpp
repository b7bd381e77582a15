// Portable build of reassign_codes and the run-time choice of the best build for this processor.
#include "quantize_reassign.h"

#include <cstdlib>
#include <string>

#define ANY4_REASSIGN_ISA portable
#include "quantize_reassign_impl.h"

namespace any4 {

namespace avx2 {
void reassign_codes(const float* deq, int L, const float* w, uint8_t* codes, int64_t n);
}
namespace avx512 {
void reassign_codes(const float* deq, int L, const float* w, uint8_t* codes, int64_t n);
}

namespace {

using Impl = void (*)(const float*, int, const float*, uint8_t*, int64_t);

// ANY4_KMEANS_ISA=portable|avx2|avx512 caps the choice, as for the k-means DP (the tests check
// that every build gives identical codes).
Impl pick_impl() {
  const char* env = std::getenv("ANY4_KMEANS_ISA");
  const std::string cap = env ? env : "avx512";
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (cap == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return &avx512::reassign_codes;
  if ((cap == "avx512" || cap == "avx2") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
    return &avx2::reassign_codes;
#endif
  return &portable::reassign_codes_inline;
}

}  // namespace

void reassign_codes(const float* deq, int L, const float* w, uint8_t* codes, int64_t n) {
  static const Impl impl = pick_impl();
  impl(deq, L, w, codes, n);
}

}  // namespace any4
