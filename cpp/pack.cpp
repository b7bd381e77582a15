#include "pack.h"

#include "common.h"
#include "parallel.h"

namespace any4 {

static void check_bits(int bits) {
  ANY4_CHECK(bits >= 2 && bits <= 4, "pack: bits must be 2, 3 or 4, got " + std::to_string(bits));
}

void pack_codes(const uint8_t* codes, int64_t N, int64_t K, int bits, uint8_t* packed) {
  check_bits(bits);
  const int64_t P = packed_cols(K, bits);
  const unsigned limit = 1u << bits;
  parallel_for(N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* c = codes + n * K;
      uint8_t* p = packed + n * P;
      // Accumulate the bit stream in a 32-bit window, emitting whole bytes.
      uint32_t acc = 0;
      int have = 0;
      int64_t j = 0;
      for (int64_t k = 0; k < K; ++k) {
        if (c[k] >= limit)
          throw std::invalid_argument("pack: codes must be < " + std::to_string(limit) + " for " +
                                      std::to_string(bits) + "-bit codes (row " + std::to_string(n) + ")");
        acc |= static_cast<uint32_t>(c[k]) << have;
        have += bits;
        for (; have >= 8; have -= 8, acc >>= 8) p[j++] = static_cast<uint8_t>(acc);
      }
      if (have > 0) p[j++] = static_cast<uint8_t>(acc);
    }
  });
}

void unpack_codes(const uint8_t* packed, int64_t N, int64_t K, int bits, uint8_t* codes) {
  check_bits(bits);
  const int64_t P = packed_cols(K, bits);
  parallel_for(N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* p = packed + n * P;
      uint8_t* c = codes + n * K;
      for (int64_t k = 0; k < K; ++k) c[k] = static_cast<uint8_t>(unpack_code(p, P, k, bits));
    }
  });
}

}  // namespace any4
