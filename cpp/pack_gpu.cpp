#include "pack_gpu.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "layout.cuh"
#include "pack.h"
#include "parallel.h"

namespace any4 {

using gpu::kChunkK;
using gpu::kKTiles;
using gpu::kLutBytes;
using gpu::kTileN;
using gpu::kWarpSize;

GpuPackSizes gpu_pack_sizes(int64_t N, int64_t K, int64_t group_size, int bits) {
  ANY4_CHECK(N >= 1 && K >= 1, "pack_for_gpu: N and K must be >= 1");
  ANY4_CHECK(gpu::tc_log2_group(group_size) >= 0,
             "pack_for_gpu: the GPU layout needs a power-of-two group size >= 16, got " +
                 std::to_string(group_size));
  ANY4_CHECK(gpu::valid_code_bits(bits),
             "pack_for_gpu: the GPU layout holds 2-, 3- or 4-bit codes, got " + std::to_string(bits));
  gpu::TcShape s = gpu::tc_shape(N, K, group_size, bits);
  GpuPackSizes z;
  z.n_tiles = s.n_tiles;
  z.k_chunks = s.k_chunks;
  z.N_pad = s.N_pad;
  z.K_pad = s.K_pad;
  z.n_groups = s.n_groups;
  z.n_groups_pad = s.n_groups_pad;
  z.bits = bits;
  z.n_units = s.n_units;
  z.unit_bytes = gpu::unit_bytes(bits);
  z.code_bytes = s.code_bytes();
  z.scale_elems = s.scale_elems();
  z.lut_bytes = s.lut_bytes();
  return z;
}

namespace {

void store_u32(uint8_t* p, uint32_t v) {
  std::memcpy(p, &v, 4);
}
uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The four 4-bit words (layout.cuh) of a lane's chunk <-> their place in the GPU layout of
// `bits`-bit codes: the 4-bit vector, or the lo-plane half and hi-plane word of the chunk's unit.
void store_chunk_words(uint8_t* codes, const GpuPackSizes& z, int64_t tile, int64_t chunk, int lane,
                       const uint32_t q[kKTiles]) {
  if (z.bits == 4) {
    uint8_t* dst = codes + gpu::codes_vec_index(tile, chunk, lane, z.k_chunks) * 16;
    for (int j = 0; j < kKTiles; ++j) store_u32(dst + 4 * j, q[j]);
    return;
  }
  uint32_t lo[2], hi;
  gpu::lowbit_encode(q, z.bits, lo, &hi);
  const int64_t unit = chunk / 2, half = chunk % 2;
  uint8_t* dst = codes + gpu::lowbit_lo_offset(tile, unit, lane, z.n_units, z.bits) + 8 * half;
  store_u32(dst, lo[0]);
  store_u32(dst + 4, lo[1]);
  if (z.bits == 3) store_u32(codes + gpu::lowbit_hi_offset(tile, unit, lane, z.n_units) + 4 * half, hi);
}

void load_chunk_words(const uint8_t* codes, const GpuPackSizes& z, int64_t tile, int64_t chunk, int lane,
                      uint32_t q[kKTiles]) {
  if (z.bits == 4) {
    const uint8_t* src = codes + gpu::codes_vec_index(tile, chunk, lane, z.k_chunks) * 16;
    for (int j = 0; j < kKTiles; ++j) q[j] = load_u32(src + 4 * j);
    return;
  }
  const int64_t unit = chunk / 2, half = chunk % 2;
  const uint8_t* src = codes + gpu::lowbit_lo_offset(tile, unit, lane, z.n_units, z.bits) + 8 * half;
  const uint32_t lo[2] = {load_u32(src), load_u32(src + 4)};
  const uint32_t hi =
      z.bits == 3 ? load_u32(codes + gpu::lowbit_hi_offset(tile, unit, lane, z.n_units) + 4 * half) : 0u;
  for (int j = 0; j < kKTiles; ++j)
    q[j] =
        z.bits == 3 ? gpu::lowbit_nibbles<3>(lo[j >> 1], hi, j) : gpu::lowbit_nibbles<2>(lo[j >> 1], hi, j);
}

}  // namespace

static uint16_t to_compute(const void* p, DType from, int64_t i, DType to) {
  if (from == to) return static_cast<const uint16_t*>(p)[i];
  float v = load_as_f32(p, from, i);
  return to == DType::BF16 ? f32_to_bf16(v) : f32_to_f16(v);
}

void pack_for_gpu(const uint8_t* packed, int storage_bits, int64_t N, int64_t K, const void* lut,
                  int64_t lut_rows, int64_t lut_len, const void* scales, int64_t n_groups, int64_t group_size,
                  DType table_dtype, DType compute_dtype, int gpu_bits, uint8_t* codes_out,
                  uint16_t* scales_out, uint8_t* lut_out) {
  const GpuPackSizes z = gpu_pack_sizes(N, K, group_size, gpu_bits);
  ANY4_CHECK(storage_bits >= 2 && storage_bits <= 4, "pack_for_gpu: storage codes must be 2, 3 or 4 bits");
  ANY4_CHECK(compute_dtype == DType::BF16 || compute_dtype == DType::F16,
             "pack_for_gpu: compute dtype must be bfloat16 or float16");
  ANY4_CHECK(lut_rows == 1 || lut_rows == N, "pack_for_gpu: lut must have 1 or N rows");
  ANY4_CHECK(lut_len >= 1 && lut_len <= 16, "pack_for_gpu: lut must have 1..16 entries per row");
  ANY4_CHECK(lut_len <= (int64_t(1) << gpu_bits), "pack_for_gpu: a " + std::to_string(lut_len) +
                                                      "-entry table needs codes wider than " +
                                                      std::to_string(gpu_bits) + " bits");
  ANY4_CHECK(n_groups == z.n_groups, "pack_for_gpu: scales do not match K / group_size");
  const int64_t P = packed_cols(K, storage_bits);

  // Codes: the four 4-bit words of every (tile, chunk, lane), stored in the gpu_bits layout.
  if (gpu_bits != 4) std::memset(codes_out, 0, static_cast<size_t>(z.code_bytes));  // odd k_chunks pad
  parallel_for(z.n_tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t tile = b; tile < e; ++tile)
      for (int64_t chunk = 0; chunk < z.k_chunks; ++chunk)
        for (int lane = 0; lane < kWarpSize; ++lane) {
          uint32_t q[kKTiles];
          for (int j = 0; j < kKTiles; ++j) {
            uint32_t word = 0;
            for (int i = 0; i < 8; ++i) {
              int64_t n = tile * kTileN + gpu::code_row(lane, i);
              int64_t k = chunk * kChunkK + gpu::code_k(lane, j, i);
              uint32_t code = (n < N && k < K)
                                  ? static_cast<uint32_t>(unpack_code(packed + n * P, P, k, storage_bits))
                                  : 0u;
              if (code >= static_cast<uint32_t>(lut_len))
                throw std::invalid_argument("pack_for_gpu: code " + std::to_string(code) + " in row " +
                                            std::to_string(n) + " is past the table (" +
                                            std::to_string(lut_len) + " entries)");
              word |= code << (4 * i);
            }
            q[j] = word;
          }
          store_chunk_words(codes_out, z, tile, chunk, lane, q);
        }
  });

  // Scales: (scale[g], zero[g], scale[g+8], zero[g+8]) per tile, group and g.
  for (int64_t tile = 0; tile < z.n_tiles; ++tile)
    for (int64_t grp = 0; grp < z.n_groups_pad; ++grp)
      for (int g = 0; g < 8; ++g) {
        uint16_t* dst = scales_out + ((tile * z.n_groups_pad + grp) * 8 + g) * 4;
        for (int h = 0; h < 2; ++h) {
          int64_t n = tile * kTileN + g + 8 * h;
          bool real = n < N && grp < n_groups;
          dst[2 * h] = real ? to_compute(scales, table_dtype, (n * n_groups + grp) * 2, compute_dtype) : 0;
          dst[2 * h + 1] =
              real ? to_compute(scales, table_dtype, (n * n_groups + grp) * 2 + 1, compute_dtype) : 0;
        }
      }

  // Tables: low bytes then high bytes of the 16 entries of every (padded) row.
  for (int64_t n = 0; n < z.N_pad; ++n) {
    uint8_t* dst = lut_out + n * kLutBytes;
    for (int c = 0; c < 16; ++c) {
      uint16_t v = 0;
      if (n < N && c < lut_len)
        v = to_compute(lut, table_dtype, (lut_rows == 1 ? 0 : n) * lut_len + c, compute_dtype);
      dst[c] = static_cast<uint8_t>(v & 0xff);
      dst[16 + c] = static_cast<uint8_t>(v >> 8);
    }
  }
}

int64_t gpu_arith_constant(const void* lut, int64_t lut_rows, int64_t lut_len, DType table_dtype,
                           DType compute_dtype) {
  ANY4_CHECK(compute_dtype == DType::BF16 || compute_dtype == DType::F16,
             "gpu_arith_constant: compute dtype must be bfloat16 or float16");
  if (lut_rows != 1 || lut_len < 1 || lut_len > 16) return -1;
  const bool bf16 = compute_dtype == DType::BF16;
  const double v0 = gpu::h16_to_f32(to_compute(lut, table_dtype, 0, compute_dtype), bf16);
  for (int64_t c = 1; c < lut_len; ++c)
    if (gpu::h16_to_f32(to_compute(lut, table_dtype, c, compute_dtype), bf16) != v0 + static_cast<double>(c))
      return -1;
  const float neg = static_cast<float>(v0 - (bf16 ? 16.0 : 64.0));  // exact in fp32
  const uint16_t h = gpu::f32_to_h16(neg, bf16);
  if (gpu::h16_to_f32(h, bf16) != neg) return -1;  // offset - B not representable
  return static_cast<int64_t>(h) | (static_cast<int64_t>(h) << 16);
}

void unpack_from_gpu(const uint8_t* codes, const uint16_t* scales_gpu, const uint8_t* lut_gpu, int64_t N,
                     int64_t K, int64_t group_size, int gpu_bits, int64_t lut_rows, int64_t lut_len,
                     int storage_bits, uint8_t* packed_out, uint16_t* scales_out, uint16_t* lut_out) {
  const GpuPackSizes z = gpu_pack_sizes(N, K, group_size, gpu_bits);
  ANY4_CHECK(storage_bits >= 2 && storage_bits <= 4, "unpack_from_gpu: storage codes must be 2, 3 or 4 bits");
  ANY4_CHECK(lut_rows == 1 || lut_rows == N, "unpack_from_gpu: lut must have 1 or N rows");
  ANY4_CHECK(lut_len >= 1 && lut_len <= 16, "unpack_from_gpu: lut must have 1..16 entries per row");
  std::vector<uint8_t> plain(static_cast<size_t>(N * K), 0);  // codes [N, K], then packed
  parallel_for(z.n_tiles, 1, [&](int64_t b, int64_t e) {
    for (int64_t tile = b; tile < e; ++tile)
      for (int64_t chunk = 0; chunk < z.k_chunks; ++chunk)
        for (int lane = 0; lane < kWarpSize; ++lane) {
          uint32_t q[kKTiles];
          load_chunk_words(codes, z, tile, chunk, lane, q);
          for (int j = 0; j < kKTiles; ++j)
            for (int i = 0; i < 8; ++i) {
              int64_t n = tile * kTileN + gpu::code_row(lane, i);
              int64_t k = chunk * kChunkK + gpu::code_k(lane, j, i);
              if (n < N && k < K) plain[n * K + k] = static_cast<uint8_t>((q[j] >> (4 * i)) & 0xfu);
            }
        }
  });
  pack_codes(plain.data(), N, K, storage_bits, packed_out);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t grp = 0; grp < z.n_groups; ++grp) {
      const uint16_t* src = scales_gpu + (((n / kTileN) * z.n_groups_pad + grp) * 8 + (n % 8)) * 4;
      int h = (n % kTileN) >= 8 ? 1 : 0;
      scales_out[(n * z.n_groups + grp) * 2] = src[2 * h];
      scales_out[(n * z.n_groups + grp) * 2 + 1] = src[2 * h + 1];
    }
  for (int64_t r = 0; r < lut_rows; ++r)
    for (int64_t c = 0; c < lut_len; ++c)
      lut_out[r * lut_len + c] =
          static_cast<uint16_t>(lut_gpu[r * kLutBytes + c] | (lut_gpu[r * kLutBytes + 16 + c] << 8));
}

}  // namespace any4
