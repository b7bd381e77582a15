// Re-assignment of codes to the nearest dequantized value (SPEC §2 step 3), the per-element hot
// loop of any4.quantize after k-means.
//
// For one group: deq[j] = fma(lut[j], scale, zero) (non-decreasing in j) and weights w. Every
// code c becomes the index with the lowest error |deq[j] - w| (float32); when several indices
// share that lowest error (they form a contiguous run [p, q]), the one nearest to c, i.e.
// clamp(c, p, q), so a code that is already optimal is kept. Branch-free: a compare/select
// pass per table entry over blocks of elements, built per instruction set (quantize_reassign
// *_avx2.cpp / *_avx512.cpp) with bit-identical results (exact operations only).
#pragma once

#include <cstdint>

namespace any4 {

// deq [L] (L <= 256), w [n], codes [n] updated in place.
void reassign_codes(const float* deq, int L, const float* w, uint8_t* codes, int64_t n);

}  // namespace any4
