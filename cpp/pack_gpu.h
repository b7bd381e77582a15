// GPU weight layout (SPEC §4): repacks the storage layout (packed nibbles, lut, scales) into the
// tensor-core fragment order read by the CUDA kernels, and back. The layout itself (which lane
// holds which code, tables, scales) is defined in cuda/layout.cuh, shared with the kernels.
#pragma once

#include <cstdint>

#include "common.h"

namespace any4 {

struct GpuPackSizes {
  int64_t n_tiles = 0, k_chunks = 0, N_pad = 0, K_pad = 0, n_groups = 0, n_groups_pad = 0;
  int64_t code_bytes = 0;   // uint8 [n_tiles, k_chunks, 32, 16]
  int64_t scale_elems = 0;  // compute dtype [n_tiles, n_groups_pad, 8, 4]
  int64_t lut_bytes = 0;    // uint8 [N_pad, 32]
};

// Sizes of the GPU layout; throws std::invalid_argument unless group_size is a power of two >= 16.
GpuPackSizes gpu_pack_sizes(int64_t N, int64_t K, int64_t group_size);

// packed uint8 [N, ceil(K/2)], lut [lut_rows (1 or N), lut_len <= 16] and scales [N, n_groups, 2]
// (table_dtype) -> codes, scales and lut of the GPU layout, tables converted to compute_dtype
// (bf16 or fp16; bit-exact when table_dtype == compute_dtype). Outputs are fully written.
// Throws std::invalid_argument if a code is >= lut_len.
void pack_for_gpu(const uint8_t* packed, int64_t N, int64_t K, const void* lut, int64_t lut_rows,
                  int64_t lut_len, const void* scales, int64_t n_groups, int64_t group_size,
                  DType table_dtype, DType compute_dtype, uint8_t* codes_out, uint16_t* scales_out,
                  uint8_t* lut_out);

// The Arith dequantizer's constant for a table, or -1 when the table (converted to the compute
// dtype) is not shared or not c + offset for c = 0..lut_len-1 (then a table lookup is needed):
// the packed pair (offset - B, offset - B) with B = 16 (bf16) or 64 (fp16), see layout.cuh.
int64_t gpu_arith_constant(const void* lut, int64_t lut_rows, int64_t lut_len, DType table_dtype,
                           DType compute_dtype);

// Exact inverse of pack_for_gpu: packed uint8 [N, ceil(K/2)], scales [N, n_groups, 2] and
// lut [lut_rows, lut_len] in the compute dtype (16-bit patterns).
void unpack_from_gpu(const uint8_t* codes, const uint16_t* scales_gpu, const uint8_t* lut_gpu, int64_t N,
                     int64_t K, int64_t group_size, int64_t lut_rows, int64_t lut_len, uint8_t* packed_out,
                     uint16_t* scales_out, uint16_t* lut_out);

}  // namespace any4
