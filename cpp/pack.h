// Storage / interchange layout (SPEC §4): each row of b-bit codes (b = 4, 3 or 2) is one dense
// little-endian bit stream, code k in bits [b*k, b*k + b) of the row, rows padded to whole bytes:
// packed uint8 [N, ceil(b*K/8)], the padding bits zero.
//   b = 4: two codes per byte, k = 2j in the low nibble of byte j, k = 2j+1 in the high nibble.
//   b = 2: four codes per byte, k = 4j + i in bits 2i..2i+1 of byte j.
//   b = 3: eight codes in three bytes (a 24-bit little-endian word), k = 8j + i in bits 3i..3i+2.
// Why this 3-bit layout and not bit planes: the CPU kernels decode 4 codes per 32-bit lane (12
// consecutive bits: one byte shuffle gathers them for 8 lanes, then a shift per code), and the
// table lookup then reads the low 3 bits directly (vpermps ignores the rest), so a plane layout
// would only add the or/shift that merges the planes. It is also the one definition for every
// width (b = 4 is the nibble layout files have always used).
#pragma once

#include <cstdint>

namespace any4 {

// Bytes per packed row of K codes of `bits` bits.
inline int64_t packed_cols(int64_t K, int bits = 4) {
  return (K * bits + 7) / 8;
}

// Code k of a packed row of P bytes (bits in 2..4).
inline int unpack_code(const uint8_t* row, int64_t P, int64_t k, int bits) {
  const int64_t o = k * bits, j = o >> 3;
  unsigned v = row[j];
  if (j + 1 < P) v |= static_cast<unsigned>(row[j + 1]) << 8;
  return static_cast<int>((v >> (o & 7)) & ((1u << bits) - 1));
}

// codes [N, K] (each < 2^bits) -> packed [N, ceil(bits*K/8)]; bits in {2, 3, 4}. Throws
// std::invalid_argument for another width or a code that does not fit.
void pack_codes(const uint8_t* codes, int64_t N, int64_t K, int bits, uint8_t* packed);
// packed [N, ceil(bits*K/8)] -> codes [N, K]. Exact inverse of pack_codes.
void unpack_codes(const uint8_t* packed, int64_t N, int64_t K, int bits, uint8_t* codes);

}  // namespace any4
