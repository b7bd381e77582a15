// Storage / interchange layout (SPEC §4): packed uint8 [N, ceil(K/2)], two codes per byte,
// element k = 2j in the low nibble and k = 2j+1 in the high nibble. An odd K leaves the high
// nibble of the last byte zero. 2- and 3-bit codes use nibbles too.
#pragma once

#include <cstdint>

namespace any4 {

inline int64_t packed_cols(int64_t K) {
  return (K + 1) / 2;
}

// codes [N, K] (each < 16) -> packed [N, ceil(K/2)]. Throws if a code is >= 16.
void pack_nibbles(const uint8_t* codes, int64_t N, int64_t K, uint8_t* packed);
// packed [N, ceil(K/2)] -> codes [N, K]. Exact inverse of pack_nibbles.
void unpack_nibbles(const uint8_t* packed, int64_t N, int64_t K, uint8_t* codes);

}  // namespace any4
