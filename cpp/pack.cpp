#include "pack.h"

#include "common.h"
#include "parallel.h"

namespace any4 {

void pack_nibbles(const uint8_t* codes, int64_t N, int64_t K, uint8_t* packed) {
  const int64_t P = packed_cols(K);
  parallel_for(N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* c = codes + n * K;
      uint8_t* p = packed + n * P;
      for (int64_t j = 0; j < P; ++j) {
        uint8_t lo = c[2 * j];
        uint8_t hi = (2 * j + 1 < K) ? c[2 * j + 1] : 0;
        if ((lo | hi) >= 16)
          throw std::invalid_argument("pack: codes must be < 16 (row " + std::to_string(n) + ")");
        p[j] = static_cast<uint8_t>(lo | (hi << 4));
      }
    }
  });
}

void unpack_nibbles(const uint8_t* packed, int64_t N, int64_t K, uint8_t* codes) {
  const int64_t P = packed_cols(K);
  parallel_for(N, 64, [&](int64_t b, int64_t e) {
    for (int64_t n = b; n < e; ++n) {
      const uint8_t* p = packed + n * P;
      uint8_t* c = codes + n * K;
      for (int64_t k = 0; k < K; ++k) c[k] = (p[k >> 1] >> ((k & 1) * 4)) & 0xf;
    }
  });
}

}  // namespace any4
