// GPU weight layout (SPEC §4): repacks the storage layout (packed nibbles, lut, scales) into the
// tensor-core fragment order read by the CUDA kernels, and back. The layout itself (which lane
// holds which code, tables, scales) is defined in cuda/layout.cuh, shared with the kernels.
#pragma once

#include <cstdint>

#include "common.h"

namespace any4 {

struct GpuPackSizes {
  int64_t n_tiles = 0, k_chunks = 0, N_pad = 0, K_pad = 0, n_groups = 0, n_groups_pad = 0;
  int bits = 4;             // code width of the GPU layout (4, 3 or 2)
  int64_t n_units = 0;      // code units per tile: k_chunks (4-bit) or ceil(k_chunks / 2) (3/2-bit)
  int64_t unit_bytes = 0;   // bytes per (tile, unit): 512, or 768 for 3-bit
  int64_t code_bytes = 0;   // uint8 [n_tiles, n_units, unit_bytes]
  int64_t scale_elems = 0;  // compute dtype [n_tiles, n_groups_pad, 8, 4]
  int64_t lut_bytes = 0;    // uint8 [N_pad, 32]
};

// Sizes of the GPU layout of `bits`-bit codes; throws std::invalid_argument unless group_size is a
// power of two >= 16 and bits is 2, 3 or 4.
GpuPackSizes gpu_pack_sizes(int64_t N, int64_t K, int64_t group_size, int bits = 4);

// packed uint8 [N, ceil(storage_bits*K/8)] (the storage layout, cpp/pack.h, of storage_bits-bit
// codes), lut [lut_rows (1 or N), lut_len <= 2^gpu_bits] and scales [N, n_groups, 2] (table_dtype)
// -> codes (gpu_bits-bit GPU layout), scales and lut of the GPU layout, tables converted to
// compute_dtype (bf16 or fp16; bit-exact when table_dtype == compute_dtype). Outputs are fully
// written. Throws std::invalid_argument if a code is >= lut_len.
void pack_for_gpu(const uint8_t* packed, int storage_bits, int64_t N, int64_t K, const void* lut,
                  int64_t lut_rows, int64_t lut_len, const void* scales, int64_t n_groups, int64_t group_size,
                  DType table_dtype, DType compute_dtype, int gpu_bits, uint8_t* codes_out,
                  uint16_t* scales_out, uint8_t* lut_out);

// The Arith dequantizer's constant for a table, or -1 when the table (converted to the compute
// dtype) is not shared or not c + offset for c = 0..lut_len-1 (then a table lookup is needed):
// the packed pair (offset - B, offset - B) with B = 16 (bf16) or 64 (fp16), see layout.cuh.
int64_t gpu_arith_constant(const void* lut, int64_t lut_rows, int64_t lut_len, DType table_dtype,
                           DType compute_dtype);

// Exact inverse of pack_for_gpu: packed uint8 [N, ceil(storage_bits*K/8)] (storage layout of
// storage_bits-bit codes), scales [N, n_groups, 2] and lut [lut_rows, lut_len] in the compute
// dtype (16-bit patterns), from the gpu_bits-bit GPU layout. Throws std::invalid_argument if a
// code does not fit storage_bits.
void unpack_from_gpu(const uint8_t* codes, const uint16_t* scales_gpu, const uint8_t* lut_gpu, int64_t N,
                     int64_t K, int64_t group_size, int gpu_bits, int64_t lut_rows, int64_t lut_len,
                     int storage_bits, uint8_t* packed_out, uint16_t* scales_out, uint16_t* lut_out);

}  // namespace any4
