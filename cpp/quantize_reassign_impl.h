// Body of reassign_codes (quantize_reassign.h), compiled once per instruction set: the including
// file defines ANY4_REASSIGN_ISA (namespace name). Only exact float operations (subtract, abs,
// compare, select), so every build gives the same codes.
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace any4 {
namespace ANY4_REASSIGN_ISA {

inline void reassign_codes_inline(const float* deq, int L, const float* w, uint8_t* codes, int64_t n) {
  constexpr int kBlock = 64;
  float best[kBlock];
  int32_t first[kBlock], last[kBlock];
  for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
    const int m = static_cast<int>(std::min<int64_t>(kBlock, n - k0));
    const float* __restrict x = w + k0;
    const float d0 = deq[0];
    for (int i = 0; i < m; ++i) {
      best[i] = std::fabs(d0 - x[i]);
      first[i] = 0;
      last[i] = 0;
    }
    // Every lane is updated unconditionally with bitwise selects: written as `lt ? e : best[i]`
    // compilers turn the updates into masked stores, which are slow on AMD processors
    // (vmaskmovps / vpmaskmovd: ~16% of a quantize call on Zen 3 before this).
    for (int32_t j = 1; j < L; ++j) {
      const float d = deq[j];
      for (int i = 0; i < m; ++i) {
        const float e = std::fabs(d - x[i]);
        const int32_t lt = -static_cast<int32_t>(e < best[i]);  // all ones or zero
        const int32_t le = -static_cast<int32_t>(e <= best[i]);
        best[i] = std::min(best[i], e);  // (e < best) ? e : best, exactly
        first[i] = (first[i] & ~lt) | (j & lt);
        last[i] = (last[i] & ~le) | (j & le);
      }
    }
    uint8_t* __restrict c = codes + k0;
    for (int i = 0; i < m; ++i) {
      int32_t v = c[i];
      v = v < first[i] ? first[i] : v;
      v = v > last[i] ? last[i] : v;
      c[i] = static_cast<uint8_t>(v);
    }
  }
}

}  // namespace ANY4_REASSIGN_ISA
}  // namespace any4
