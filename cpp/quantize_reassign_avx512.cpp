// reassign_codes (quantize_reassign_impl.h) built for AVX512; chosen at run time by
// quantize_reassign.cpp when the processor supports it.
#define ANY4_REASSIGN_ISA avx512
#include "quantize_reassign_impl.h"

namespace any4 {
namespace avx512 {

void reassign_codes(const float* deq, int L, const float* w, uint8_t* codes, int64_t n) {
  reassign_codes_inline(deq, L, w, codes, n);
}

}  // namespace avx512
}  // namespace any4
