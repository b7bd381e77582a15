// The one representation of every format (SPEC §1) and its quantizer (SPEC §2).
//
//   codes  [N, K]        uint8 in [0, 2^bits)
//   lut    [N, 2^bits]   per-row table (learned formats) or [1, 2^bits] (fixed formats)
//   scales [N, G, 2]     per-group (scale, zero), G = ceil(K / group_size)
//
//   w[n,k] ~= lut[n, codes[n,k]] * scale[n, k / group_size] + zero[n, k / group_size]
//
// Affine (min-max) formats store the table *centred*: lut = table_u - (2^bits - 1)/2 and zero is
// the group's midpoint, so both terms stay small (bf16 cancellation, SPEC §2.3). Absmax formats
// (nf4, fp4) store their [-1, 1] table as is, with scale = absmax and zero = 0.
#pragma once

#include <cstdint>

#include "common.h"
#include "kmeans.h"

namespace any4 {

struct QuantizeParams {
  int bits = 4;                           // 2, 3 or 4
  const float* table = nullptr;           // fixed table [2^bits], sorted ascending; nullptr: learned
  bool absmax = false;                    // true: scale = absmax, zero = 0; false: min-max affine
  int64_t group_size = 128;               // positive multiple of 8
  DType out_dtype = DType::BF16;          // lut / scale / zero are rounded to this type
  const float* channel_weight = nullptr;  // [K] per-input-channel statistic, or nullptr
  int scale_power = 1;                    // element weight = channel_weight[k] * scale^scale_power
  const float* element_weight = nullptr;  // [N, K] explicit element weights (overrides the above)
  KMeansParams kmeans;
};

// w: [N, K] float32 row-major. Outputs (float32, each value exactly representable in out_dtype):
// codes [N, K]; lut [N, 2^bits] if learned else [1, 2^bits]; scales [N, ceil(K/G), 2].
// Throws std::invalid_argument on NaN/Inf weights or bad parameters.
void quantize(const float* w, int64_t N, int64_t K, const QuantizeParams& params, uint8_t* codes, float* lut,
              float* scales);

// Dequantize packed `bits`-bit codes (pack.h) to float32 w [N, K].
// lut: [lut_rows, lut_len] (lut_rows is 1 or N); scales: [N, n_groups, 2]; lut/scales in `table_dtype`.
void dequantize(const uint8_t* packed, int64_t N, int64_t K, int bits, const void* lut, int64_t lut_rows,
                int64_t lut_len, const void* scales, int64_t n_groups, int64_t group_size, DType table_dtype,
                float* w);

}  // namespace any4
