// GPU weight layout, per-lane index math and dequantization of the tensor-core gemm (SPEC §4, §5).
//
// This header is compiled twice: by nvcc into the kernels (cuda/gemm_tc.cu) and by the host C++
// compiler into the packer (cpp/pack_gpu.cpp) and the CPU emulation of the kernel
// (cpp/emulate_gpu.cpp). Everything a lane computes (which codes it holds, where it loads from,
// how codes become mma fragment registers) lives here, so a layout bug shows up on the CPU.
//
// ---- The product as tensor-core tiles -------------------------------------------------------
// y[m, n] = sum_k x[m, k] * w[n, k]. The weight is the A operand of mma.m16n8k16 (16 rows of W
// per instruction), the activations are the B operand (8 rows of x = 8 columns of B), and the
// fp32 accumulator C holds y^T for 16 rows of W x 8 rows of x. Batch M <= 8 uses one B tile per
// A fragment (MT = 1); M <= 16 uses two (MT = 2), reusing the dequantized A fragment; larger M
// loops over 16-row tiles of x (grid z). Weight-as-A wastes less of the instruction than
// weight-as-B at M <= 8 and does the same tensor work at 9..16, with a single weight layout.
//
// PTX ISA fragment layouts of mma.m16n8k16 .bf16/.f16 (lane = 4 * g + t, g = lane / 4, t = lane % 4):
//   A (16 x 16, row): element e in 0..7, register e / 2, low half = even e
//       row = g + 8 * ((e >> 1) & 1), col = 2t + (e & 1) + 8 * (e >> 2)
//       -> reg0 = (row g,   cols 2t, 2t+1), reg1 = (row g+8, cols 2t, 2t+1)
//          reg2 = (row g,   cols 2t+8, +9), reg3 = (row g+8, cols 2t+8, +9)
//   B (16 x 8, col): element e in 0..3: row = 2t + (e & 1) + 8 * (e >> 1), col = g
//   C (16 x 8, f32): element e in 0..3: row = g + 8 * (e >> 1), col = 2t + (e & 1)
//
// ---- Permuting k ----------------------------------------------------------------------------
// The mma sums over its 16 k's, so any permutation of k applied to both operands is free. K is
// cut into chunks of 64 (4 k-tiles j = 0..3); mma k index kk of k-tile j is mapped to the chunk
// offset   16 * t(kk) + 4 * j + 2 * (kk >> 3) + (kk & 1),   t(kk) = (kk & 7) >> 1.
// So lane (g, t) needs, for all four k-tiles of a chunk, exactly x[m][64 c + 16 t + 0 .. 15]:
// 32 contiguous bytes (two 16-byte loads per row of x), B registers without any shuffling.
//
// ---- Packed weight (codes) ------------------------------------------------------------------
// codes: uint32 words [n_tiles][k_chunks][32 lanes][4 k-tiles], i.e. one 16-byte vector per
// lane per chunk, 512 contiguous bytes per (16-row tile, 64-k chunk): a warp streams the weight
// with fully coalesced 16-byte loads and no shared-memory transposition. Nibble i (bits 4i..4i+3)
// of word (tile, chunk, lane, j) is the code of
//     row  n = 16 * tile + g + 8 * (i >> 2)
//     k      = 64 * chunk + 16 * t + 4 * j + (i & 3)
// i.e. nibbles 0..3 = row g (reg0 low, reg0 high, reg2 low, reg2 high), nibbles 4..7 = row g+8
// (reg1, reg3). Rows >= N and k >= K are padding with code 0 (their scale and zero are 0, and
// x is zero-padded, so they add nothing).
//
// ---- Packed weight, 3- and 2-bit codes (dense) ----------------------------------------------
// A lane's 32 codes of a chunk take 64 bits (2-bit) or 96 bits (3-bit), so one 16-byte vector
// per lane covers a *pair* of chunks (128 k, a "unit"), still one coalesced 512-byte warp load:
//   codes: uint8 [n_tiles][n_units = ceil(k_chunks / 2)][unit bytes], per (tile, unit):
//     2-bit: 512 bytes = lo plane [32 lanes][16 bytes]
//     3-bit: 768 bytes = lo plane [32 lanes][16 bytes], then hi plane [32 lanes][8 bytes]
//   (an odd k_chunks leaves the second chunk of the last unit as code-0 padding).
// lo plane: word w (0..3) of a lane's 16-byte vector belongs to chunk 2 * unit + (w >> 1) and
//   holds its k-tiles j = 2 (w & 1) and j + 1: bits 4i, 4i+1 are the low two bits of code i of
//   k-tile 2 (w & 1), bits 4i+2, 4i+3 those of k-tile 2 (w & 1) + 1 (code i = row code_row(lane,
//   i), k code_k(lane, j, i), exactly as nibble i of the 4-bit word).
// hi plane (3-bit only): word v (0, 1) of a lane's 8-byte vector belongs to chunk 2 * unit + v;
//   bit 4i + j is bit 2 of code i of k-tile j.
// Why this layout: the 8 codes of k-tile j land in the nibble positions of the 4-bit word with
//     q_j = (lo >> 2 (j & 1)) & 0x33333333                    2-bit: one shift, one and
//     q_j |= (hi << (2 - j)) & 0x44444444    (j = 3: hi >> 1)  3-bit: + one shift, one lop3
// (lowbit_nibbles), after which the 4-bit kernel's dequantizers run unchanged, and the table
// lookup of 8- and 4-entry tables needs half the byte permutes (codes < 8 never reach the upper
// half of the register table: dequant_lut_reg_small). The alternatives cost more per code: the
// storage layout's bit stream (8 codes in 3 bytes) splits codes across bytes and words in the
// lane's k order (a funnel shift and mask per code pair), and nibble-aligned planes without the
// interleave need a shift and mask per code. The price is that a vector covers two chunks:
// pipeline stages (2 or 4 chunks) and K splits start on even chunks (make_tc_plan rounds
// chunks_per_split up to kLowBitChunkAlign), and a stage holds half (2-bit) or three quarters
// (3-bit) of the 4-bit code bytes, so fewer bytes are in flight per warp.
//
// ---- Scales / zeros -------------------------------------------------------------------------
// scales: compute dtype (bf16 or fp16) [n_tiles][n_groups_pad][8][4] =
// (scale[g], zero[g], scale[g+8], zero[g+8]): one 8-byte load per lane per chunk. A lane's 16
// k's of a chunk lie in one group whenever the group size is a multiple of 16, so the group index
// is constant per lane and chunk: (64 chunk + 16 t) >> log2(G). Groups past K are (0, 0).
//
// ---- Tables ---------------------------------------------------------------------------------
// lut: bytes [N_pad][32]: the 16 entries (compute dtype, 16 bit) of each row split in their low
// bytes (bytes 0..15) and high bytes (16..31). Fixed-table formats are broadcast to every row;
// 3- and 2-bit tables are padded with zeros (the 3/2-bit kernels read only bytes 0..7 and
// 16..23 of a row: entries 0..7). Three dequantizers read it (a format is a table,
// the dequantizer is a template parameter of the one kernel):
//   Arith   : shared table c + offset (int4/int3/int2, centred or not): no table, the code is
//             OR-ed into the mantissa of 16.0 (bf16) / 64.0 (fp16) and one exact fma with
//             offset - 16 (- 64) gives the table value.
//   LutReg  : the two rows' tables live in 16 registers per lane; byte-permute (prmt) looks up
//             four codes at a time (no shared memory at all).
//   LutSmem : a per-warp shared-memory table, replicated per lane: word [c][lane] holds entry c
//             of rows g and g+8 (low / high half), so the 32 lanes always hit 32 distinct banks.
// Each then computes w = value * scale + zero with one packed fused multiply-add (fma.rn.bf16x2
// or .f16x2), a single rounding to the compute dtype, and feeds the mma.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define ANY4_HD __host__ __device__ __forceinline__
#else
#define ANY4_HD inline
#endif

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

namespace any4 {
namespace gpu {

// ------------------------------------------------------------------------------- constants
constexpr int kWarpSize = 32;
constexpr int kTileN = 16;          // rows of W per mma (A operand)
constexpr int kChunkK = 64;         // k per 16-byte code vector of one lane
constexpr int kKTiles = 4;          // mma k-tiles (16) per chunk
constexpr int kWarps = 4;           // warps per block, each on its own 16-row tile
constexpr int kStageChunks = 2;     // default chunks per pipeline stage (two stages in flight)
constexpr int kMaxStageChunks = 4;  // deeper variant: 4 chunks per stage (selectable, see plan)
constexpr int kLutBytes = 32;       // bytes per row of the GPU table
constexpr int kMinChunksPerSplit = 4;
constexpr int kMaxTileFloats = 2 * 4 * kWarpSize;  // fp32 accumulators of one warp (MT = 2)
constexpr int kDefaultSplitWaves = 2;              // split-K may fill up to this many waves of blocks
constexpr int kMaxSplitWaves = 2;
constexpr int kLowBitChunkAlign = 2;           // 3/2-bit: a 16-byte code vector covers two chunks
constexpr int kLoPlaneBytes = kWarpSize * 16;  // 3/2-bit: lo plane bytes per (tile, unit)
constexpr int kHiPlaneBytes = kWarpSize * 8;   // 3-bit: hi plane bytes per (tile, unit)

// Code widths of the GPU layout (4: nibbles, 3 and 2: the dense layouts above).
ANY4_HD bool valid_code_bits(int bits) {
  return bits == 2 || bits == 3 || bits == 4;
}
// Chunks per code unit (one 16-byte vector per lane): 1 for 4-bit codes, 2 for 3/2-bit codes.
ANY4_HD int chunks_per_unit(int bits) {
  return bits == 4 ? 1 : kLowBitChunkAlign;
}
// Bytes per (16-row tile, code unit).
ANY4_HD int unit_bytes(int bits) {
  return bits == 3 ? kLoPlaneBytes + kHiPlaneBytes : kLoPlaneBytes;
}

// Stage depths (chunks per pipeline stage) the kernel is instantiated for.
ANY4_HD bool valid_stage_chunks(int sc) {
  return sc == kStageChunks || sc == kMaxStageChunks;
}

enum class Dequant : int { Arith = 0, LutReg = 1, LutSmem = 2 };

// ------------------------------------------------------------------------------- shapes
struct TcShape {
  int64_t N = 0, K = 0, group_size = 0;
  int64_t n_tiles = 0, k_chunks = 0, N_pad = 0, K_pad = 0, n_groups = 0, n_groups_pad = 0;
  int log2_group = 0;
  int bits = 4;         // code width of the layout
  int64_t n_units = 0;  // code units per tile (k_chunks for 4-bit, ceil(k_chunks / 2) for 3/2-bit)
  int64_t code_bytes() const { return n_tiles * n_units * unit_bytes(bits); }
  int64_t scale_elems() const { return n_tiles * n_groups_pad * 8 * 4; }
  int64_t lut_bytes() const { return N_pad * kLutBytes; }
};

// Group sizes of the tensor-core path: powers of two >= 16 (16-aligned lane slices never
// straddle a group). Returns -1 for other sizes.
ANY4_HD int tc_log2_group(int64_t group_size) {
  if (group_size < 16 || (group_size & (group_size - 1)) != 0) return -1;
  int l = 0;
  while ((int64_t(1) << l) < group_size) ++l;
  return l;
}

inline TcShape tc_shape(int64_t N, int64_t K, int64_t group_size, int bits = 4) {
  TcShape s;
  s.bits = bits;
  s.N = N;
  s.K = K;
  s.group_size = group_size;
  s.log2_group = tc_log2_group(group_size);
  s.n_tiles = (N + kTileN - 1) / kTileN;
  s.k_chunks = (K + kChunkK - 1) / kChunkK;
  s.N_pad = s.n_tiles * kTileN;
  s.K_pad = s.k_chunks * kChunkK;
  s.n_units = (s.k_chunks + chunks_per_unit(bits) - 1) / chunks_per_unit(bits);
  s.n_groups = group_size > 0 ? (K + group_size - 1) / group_size : 0;
  s.n_groups_pad = group_size > 0 ? (s.K_pad + group_size - 1) / group_size : 0;
  return s;
}

// ------------------------------------------------------------------------------- lanes
ANY4_HD int lane_g(int lane) {
  return lane >> 2;
}
ANY4_HD int lane_t(int lane) {
  return lane & 3;
}

// Row (within the 16-row tile) and k (within the 64-k chunk) of nibble i of word j of a lane.
ANY4_HD int code_row(int lane, int i) {
  return lane_g(lane) + 8 * (i >> 2);
}
ANY4_HD int code_k(int lane, int j, int i) {
  return 16 * lane_t(lane) + 4 * j + (i & 3);
}

// Chunk offset of mma k index kk (0..15) of k-tile j (the k permutation above).
ANY4_HD int mma_k_to_chunk_k(int j, int kk) {
  return 16 * ((kk & 7) >> 1) + 4 * j + 2 * (kk >> 3) + (kk & 1);
}

// PTX fragment layouts of mma.m16n8k16 (used by the emulation; the kernel gets them from hardware).
ANY4_HD int mma_a_row(int lane, int e) {
  return lane_g(lane) + 8 * ((e >> 1) & 1);
}
ANY4_HD int mma_a_col(int lane, int e) {
  return 2 * lane_t(lane) + (e & 1) + 8 * (e >> 2);
}
ANY4_HD int mma_b_row(int lane, int e) {
  return 2 * lane_t(lane) + (e & 1) + 8 * (e >> 1);
}
ANY4_HD int mma_b_col(int lane, int e) {
  return lane_g(lane);
}
ANY4_HD int mma_c_row(int lane, int e) {
  return lane_g(lane) + 8 * (e >> 1);
}
ANY4_HD int mma_c_col(int lane, int e) {
  return 2 * lane_t(lane) + (e & 1);
}

// ------------------------------------------------------------------------------- offsets
// Index of the lane's 16-byte code vector of (tile, chunk) (4-bit layout).
ANY4_HD int64_t codes_vec_index(int64_t tile, int64_t chunk, int lane, int64_t k_chunks) {
  return (tile * k_chunks + chunk) * kWarpSize + lane;
}
// 3/2-bit layout: byte offsets of the lane's lo-plane 16-byte vector and hi-plane 8-byte vector
// of (tile, unit); chunk c is in unit c / 2, half c % 2 (lo words 2 (c % 2), +1; hi word c % 2).
ANY4_HD int64_t lowbit_lo_offset(int64_t tile, int64_t unit, int lane, int64_t n_units, int bits) {
  return (tile * n_units + unit) * unit_bytes(bits) + lane * 16;
}
ANY4_HD int64_t lowbit_hi_offset(int64_t tile, int64_t unit, int lane, int64_t n_units) {
  return (tile * n_units + unit) * unit_bytes(3) + kLoPlaneBytes + lane * 8;
}
// Group of the lane's 16 k's in a chunk.
ANY4_HD int64_t lane_group(int64_t chunk, int lane, int log2_group) {
  return (chunk * kChunkK + 16 * lane_t(lane)) >> log2_group;
}
// Index (in 8-byte units = 4 elements) of (scale[g], zero[g], scale[g+8], zero[g+8]).
ANY4_HD int64_t scales_vec_index(int64_t tile, int64_t group, int lane, int64_t n_groups_pad) {
  return (tile * n_groups_pad + group) * 8 + lane_g(lane);
}
// Element index of x[m][64 chunk + 16 t] in the zero-padded x [M, K_pad].
ANY4_HD int64_t x_elem_index(int64_t m, int64_t K_pad, int64_t chunk, int lane) {
  return m * K_pad + chunk * kChunkK + 16 * lane_t(lane);
}
// Row of x fed to B tile mt (0..MT-1) by this lane, in m-tile mz of 8 * MT rows.
ANY4_HD int64_t x_row(int64_t mz, int mt_count, int mt, int lane) {
  return mz * 8 * mt_count + mt * 8 + lane_g(lane);
}
// Output (row m of y, column n of y) of accumulator element e of B tile mt.
ANY4_HD int64_t y_row(int64_t mz, int mt_count, int mt, int lane, int e) {
  return mz * 8 * mt_count + mt * 8 + mma_c_col(lane, e);
}
ANY4_HD int64_t y_col(int64_t tile, int lane, int e) {
  return tile * kTileN + mma_c_row(lane, e);
}
// Split-K workspace: float [m_tiles][n_tiles][splits][MT * 4][32], coalesced per element.
ANY4_HD int64_t workspace_index(int64_t mz, int64_t tile, int64_t split, int mt_count, int64_t n_tiles,
                                int64_t splits, int elem, int lane) {
  return (((mz * n_tiles + tile) * splits + split) * (mt_count * 4) + elem) * kWarpSize + lane;
}

// ------------------------------------------------------------------------------- plan
// Grid shape and split-K. Blocks of kWarps warps each own kWarps consecutive 16-row tiles of one
// K range (split) for one m-tile. When the tiles alone give fewer blocks than the GPU holds at
// once (target = num_sms * blocks_per_sm, the kernel's occupancy), K is split. The number of
// splits s minimises the modelled time  waves(s) * chunks_per_split(s)  (waves = ceil(blocks * s
// / target): every block of a wave takes about as long as its K range) over the s that keep the
// grid within max_waves waves and give each split >= kMinChunksPerSplit chunks (256 k); ties go
// to fewer splits. max_waves = 1 is the classic "fill one wave" rule; 2 lets a grid that fills
// one wave badly (M=16, N=14336: 224 blocks for 396 slots) use 3 splits over 1.7 waves instead.
struct TcPlan {
  int mt = 1;           // B tiles (of 8 rows of x) per mma A fragment: 1 for M <= 8, else 2
  int64_t m_tiles = 0;  // grid z: tiles of 8 * mt rows of x
  int64_t grid_x = 0;   // blocks along N
  int64_t splits = 1;   // grid y: K ranges
  int64_t chunks_per_split = 0;
  int64_t workspace_floats() const {
    return splits > 1 ? m_tiles * grid_x * kWarps * splits * mt * 4 * kWarpSize : 0;
  }
  int64_t counters() const { return splits > 1 ? m_tiles * grid_x * kWarps : 0; }
};

ANY4_HD int64_t ceil_div64(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// chunk_align: splits start on multiples of it (kLowBitChunkAlign for the 3/2-bit layouts, whose
// code vectors cover two chunks; 1 for 4-bit): chunks_per_split is rounded up to it.
ANY4_HD int64_t align_up64(int64_t a, int64_t b) {
  return (a + b - 1) / b * b;
}

ANY4_HD TcPlan make_tc_plan(int64_t M, int64_t n_tiles, int64_t k_chunks, int num_sms, int blocks_per_sm,
                            int64_t force_splits = 0, int max_waves = kDefaultSplitWaves,
                            int chunk_align = 1) {
  TcPlan p;
  if (chunk_align < 1) chunk_align = 1;
  p.mt = M <= 8 ? 1 : 2;
  p.m_tiles = ceil_div64(M, 8 * p.mt);
  p.grid_x = ceil_div64(n_tiles, kWarps);
  const int64_t blocks = p.grid_x * p.m_tiles;
  const int64_t target = (int64_t)(num_sms > 0 ? num_sms : 1) * (blocks_per_sm > 0 ? blocks_per_sm : 1);
  const int64_t waves = max_waves < 1 ? 1 : (max_waves > kMaxSplitWaves ? kMaxSplitWaves : max_waves);
  int64_t splits = 1;
  if (blocks < target) {
    int64_t limit = waves * target / blocks;  // blocks * s <= waves * target
    const int64_t max_splits = k_chunks / kMinChunksPerSplit;
    if (limit > max_splits) limit = max_splits;
    int64_t best_cost = k_chunks;  // s = 1: one wave, every block runs all of K
    for (int64_t s = 2; s <= limit; ++s) {
      const int64_t cps = align_up64(ceil_div64(k_chunks, s), chunk_align);
      const int64_t used = ceil_div64(k_chunks, cps);  // splits left after dropping empty ones
      const int64_t cost = ceil_div64(blocks * used, target) * cps;
      if (cost < best_cost) {
        best_cost = cost;
        splits = s;
      }
    }
  }
  if (force_splits > 0) splits = force_splits;
  if (splits > k_chunks) splits = k_chunks;
  if (splits > 65535) splits = 65535;
  if (splits < 1) splits = 1;
  p.chunks_per_split = align_up64(ceil_div64(k_chunks, splits), chunk_align);
  p.splits = ceil_div64(k_chunks, p.chunks_per_split);  // no empty split
  if (p.splits < 1) p.splits = 1;
  return p;
}

// Bounds of the split-K scratch over every automatic plan (force_splits = 0) on a GPU with
// num_sms multiprocessors holding at most blocks_per_sm blocks of any kernel instance: splitting
// happens only when blocks < target and keeps blocks * splits <= kMaxSplitWaves * target, so
// workspace_floats() <= kMaxSplitWaves * target * kWarps * kMaxTileFloats and counters() <
// target * kWarps. Allocated once per (device, stream) by the Python wrapper, never regrown
// (a CUDA graph keeps the raw pointers it captured).
ANY4_HD int64_t tc_workspace_floats_bound(int num_sms, int blocks_per_sm) {
  return (int64_t)kMaxSplitWaves * num_sms * blocks_per_sm * kWarps * kMaxTileFloats;
}
ANY4_HD int64_t tc_counters_bound(int num_sms, int blocks_per_sm) {
  return (int64_t)num_sms * blocks_per_sm * kWarps;
}

// Chunk range [begin, end) of a split.
ANY4_HD void split_range(int64_t split, int64_t chunks_per_split, int64_t k_chunks, int64_t* begin,
                         int64_t* end) {
  int64_t b = split * chunks_per_split;
  int64_t e = b + chunks_per_split;
  *begin = b < k_chunks ? b : k_chunks;
  *end = e < k_chunks ? e : k_chunks;
}

// The software pipeline of one warp over its chunks [c0, c1): two register stages of SC chunks
// each (SC = kStageChunks by default, kMaxStageChunks for the deeper variant); the loads of
// stage s+1 are issued before stage s is computed, so 2 * SC * 512 bytes of codes (plus x and
// scales) are in flight per warp. load(stage, c) and compute(stage, c) handle chunks
// c .. c + SC - 1 that are < c1.
template <int SC, class Stage, class Load, class Compute>
ANY4_HD void run_pipeline(int64_t c0, int64_t c1, Stage& a, Stage& b, Load&& load, Compute&& compute) {
  if (c0 >= c1) return;
  int64_t c = c0;
  load(a, c);
  while (true) {
    if (c + SC < c1) load(b, c + SC);
    compute(a, c);
    c += SC;
    if (c >= c1) break;
    if (c + SC < c1) load(a, c + SC);
    compute(b, c);
    c += SC;
    if (c >= c1) break;
  }
}

// ------------------------------------------------------------------------------- bit ops
// PTX prmt.b32 (default mode): byte n of the result is byte (s >> 4n) & 7 of {b, a} (a = bytes
// 0..3, b = 4..7); when bit 3 of the selector nibble is set the byte's sign bit is replicated.
ANY4_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(s));
  return d;
#else
  uint64_t src = (uint64_t(b) << 32) | a;
  uint32_t d = 0;
  for (int n = 0; n < 4; ++n) {
    uint32_t sel = (s >> (4 * n)) & 0xf;
    uint32_t byte = uint32_t(src >> (8 * (sel & 7))) & 0xff;
    if (sel & 8) byte = (byte & 0x80) ? 0xff : 0x00;
    d |= byte << (8 * n);
  }
  return d;
#endif
}

// ------------------------------------------------------------------------------- 16-bit floats
// Host emulation of the packed 16-bit float operations the kernel uses (the device executes them).
#if !defined(__CUDA_ARCH__)
inline float h16_to_f32(uint16_t h, bool bf16) {
  if (bf16) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {
      int e = -1;
      do {
        ++e;
        man <<= 1;
      } while ((man & 0x400u) == 0);
      u = sign | (uint32_t(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_h16(float f, bool bf16) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (bf16) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  uint32_t sign = (u >> 16) & 0x8000u, absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return uint16_t(sign | 0x7e00u);
  if (absu >= 0x477ff000u) return uint16_t(sign | 0x7c00u);
  if (absu < 0x38800000u) {
    if (absu < 0x33000000u) return uint16_t(sign);
    uint32_t e = absu >> 23, man = (absu & 0x7fffffu) | 0x800000u, shift = 126 - e;
    uint32_t r = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return uint16_t(sign | r);
  }
  uint32_t r = absu - ((127 - 15) << 23);
  r += 0xfffu + ((r >> 13) & 1u);
  return uint16_t(sign | (r >> 13));
}
#endif

// d = a * b + c on two packed 16-bit floats (bf16x2 when BF16, else f16x2), rounded once.
template <bool BF16>
ANY4_HD uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (BF16) {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
#else
  uint32_t d = 0;
  for (int h = 0; h < 2; ++h) {
    float fa = h16_to_f32(uint16_t(a >> (16 * h)), BF16), fb = h16_to_f32(uint16_t(b >> (16 * h)), BF16);
    float fc = h16_to_f32(uint16_t(c >> (16 * h)), BF16);
    d |= uint32_t(f32_to_h16(std::fma(fa, fb, fc), BF16)) << (16 * h);
  }
  return d;
#endif
}

// Packed (v, v) constants.
template <bool BF16>
struct Consts {
  static constexpr uint32_t kOne2 = BF16 ? 0x3f803f80u : 0x3c003c00u;  // 1.0
  // Arith: B + c is built by OR-ing c into the mantissa of B = 16 (bf16, c at bits 3..6) or
  // B = 64 (fp16, c at bits 4..7): one unit of c is one unit in the last place there.
  static constexpr uint32_t kBase2 = BF16 ? 0x41804180u : 0x54005400u;
  static constexpr uint32_t kCodeMask2 = BF16 ? 0x00780078u : 0x00f000f0u;
  static constexpr int kCodeShift = BF16 ? 3 : 4;
  static constexpr float kBase = BF16 ? 16.f : 64.f;
};

// Broadcast the low / high 16-bit half of v to both halves.
ANY4_HD uint32_t dup_lo(uint32_t v) {
  return prmt(v, 0, 0x1010);
}
ANY4_HD uint32_t dup_hi(uint32_t v) {
  return prmt(v, 0, 0x3232);
}

// ------------------------------------------------------------------------------- dequantizers
// Each turns the 8 codes of one word q (one k-tile of one lane) into the 4 A registers holding
// the raw 16-bit table values (before scale and zero), in PTX register order.

// Arith: tables c + offset (int formats: offset = -(L-1)/2 for centred tables, 0 otherwise).
// Builds B + c exactly with OR-ed exponent bits, then one exact fma with neg2 = offset - B
// (packed twice; pack time checks it is representable) gives the table value c + offset.
template <bool BF16>
ANY4_HD void dequant_arith(uint32_t q, uint32_t neg2, uint32_t r[4]) {
  // byte b of q holds nibbles 2b (low) and 2b+1 (high). lo_src puts nibble 2b at bits
  // kCodeShift.. of byte b, hi_src puts nibble 2b+1 there; prmt moves them to halves 0 and 1.
  const uint32_t lo_src = q << Consts<BF16>::kCodeShift, hi_src = q >> (4 - Consts<BF16>::kCodeShift);
  const uint32_t p[4] = {prmt(lo_src, hi_src, 0x0400), prmt(lo_src, hi_src, 0x0602),   // bytes 0, 2
                         prmt(lo_src, hi_src, 0x0501), prmt(lo_src, hi_src, 0x0703)};  // bytes 1, 3
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 4; ++i) {
    const uint32_t biased = (p[i] & Consts<BF16>::kCodeMask2) | Consts<BF16>::kBase2;
    r[i] = fma2<BF16>(biased, Consts<BF16>::kOne2, neg2);
  }
}

// Table of one row as registers: lo[w] = low bytes of entries 4w..4w+3, hi[w] = high bytes.
struct RowTable {
  uint32_t lo[4];
  uint32_t hi[4];
};

// Looks up four codes in table T: sel holds their low 3 bits (prmt selector nibbles 0..3) and
// half the byte each output byte takes (n, or n + 4 for codes >= 8). Returns the registers
// (values of codes 0, 1) and (values of codes 2, 3).
ANY4_HD void lut_lookup4(uint32_t sel, uint32_t half, const RowTable& T, uint32_t* r01, uint32_t* r23) {
  const uint32_t lo = prmt(prmt(T.lo[0], T.lo[1], sel), prmt(T.lo[2], T.lo[3], sel), half);
  const uint32_t hi = prmt(prmt(T.hi[0], T.hi[1], sel), prmt(T.hi[2], T.hi[3], sel), half);
  *r01 = prmt(lo, hi, 0x5140);  // (lo0, hi0, lo1, hi1)
  *r23 = prmt(lo, hi, 0x7362);  // (lo2, hi2, lo3, hi3)
}

// LutReg: rows g (nibbles 0..3) and g + 8 (nibbles 4..7) from register tables. prmt reads only
// the low 16 bits of its selector, so the high row uses the selectors shifted down.
ANY4_HD void dequant_lut_reg(uint32_t q, const RowTable& row_g, const RowTable& row_g8, uint32_t r[4]) {
  const uint32_t sel = q & 0x77777777u;                          // entry within a half table
  const uint32_t half = ((q >> 1) & 0x44444444u) | 0x32103210u;  // code >= 8: upper half
  lut_lookup4(sel, half, row_g, &r[0], &r[2]);
  lut_lookup4(sel >> 16, half >> 16, row_g8, &r[1], &r[3]);
}

// LutReg for tables of at most 8 entries (3/2-bit codes, so every nibble of q is < 8): entries
// 0..7 are bytes 0..7 of {lo[0], lo[1]} and {hi[0], hi[1]}, one prmt per four codes and byte
// half, no upper-half selection (8 prmt per k-tile instead of 16, and 8 table registers).
ANY4_HD void lut_lookup4_small(uint32_t sel, const RowTable& T, uint32_t* r01, uint32_t* r23) {
  const uint32_t lo = prmt(T.lo[0], T.lo[1], sel), hi = prmt(T.hi[0], T.hi[1], sel);
  *r01 = prmt(lo, hi, 0x5140);
  *r23 = prmt(lo, hi, 0x7362);
}
ANY4_HD void dequant_lut_reg_small(uint32_t q, const RowTable& row_g, const RowTable& row_g8, uint32_t r[4]) {
  lut_lookup4_small(q, row_g, &r[0], &r[2]);
  lut_lookup4_small(q >> 16, row_g8, &r[1], &r[3]);
}

// ---- 3/2-bit layout: decode into the 4-bit word, and its inverse (see the layout above)
// The 4-bit word (8 codes in nibbles, as the 4-bit layout's word j) of k-tile j of a chunk from
// the chunk's lo-plane word lo (= word j / 2 of the chunk: k-tiles 2 (j / 2), +1) and, 3-bit,
// its hi-plane word hi.
template <int BITS>
ANY4_HD uint32_t lowbit_nibbles(uint32_t lo, uint32_t hi, int j) {
  const uint32_t l = (lo >> (2 * (j & 1))) & 0x33333333u;
  if constexpr (BITS == 2) {
    return l;
  } else {
    const uint32_t h = j == 3 ? hi >> 1 : hi << (2 - j);
    return l | (h & 0x44444444u);
  }
}
// The chunk's lo-plane words lo[2] and hi-plane word *hi from its four 4-bit words q[4]
// (codes < 2^bits). Exact inverse of lowbit_nibbles.
ANY4_HD void lowbit_encode(const uint32_t q[4], int bits, uint32_t lo[2], uint32_t* hi) {
  for (int w = 0; w < 2; ++w) lo[w] = (q[2 * w] & 0x33333333u) | ((q[2 * w + 1] & 0x33333333u) << 2);
  uint32_t h = 0;
  if (bits == 3)
    for (int j = 0; j < kKTiles; ++j) h |= ((q[j] >> 2) & 0x11111111u) << j;
  *hi = h;
}

// 16-bit entry c of a row table.
ANY4_HD uint32_t row_table_entry(const RowTable& T, int c) {
  uint32_t lo = (T.lo[c >> 2] >> (8 * (c & 3))) & 0xffu;
  uint32_t hi = (T.hi[c >> 2] >> (8 * (c & 3))) & 0xffu;
  return lo | (hi << 8);
}

// LutSmem: word index (in 32-bit words) of entry c for a lane in its warp's 16 x 32 table; the
// word holds entry c of row g (low half) and of row g + 8 (high half).
ANY4_HD int smem_lut_word(int c, int lane) {
  return c * kWarpSize + lane;
}
ANY4_HD uint32_t smem_lut_value(const RowTable& row_g, const RowTable& row_g8, int c) {
  return row_table_entry(row_g, c) | (row_table_entry(row_g8, c) << 16);
}

// tab_lane points at the lane's column (word smem_lut_word(0, lane)); stride kWarpSize words.
ANY4_HD void dequant_lut_smem(uint32_t q, const uint32_t* tab_lane, uint32_t r[4]) {
  uint32_t v[8];
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int i = 0; i < 8; ++i) v[i] = tab_lane[((q >> (4 * i)) & 0xfu) * kWarpSize];
  r[0] = prmt(v[0], v[1], 0x5410);  // row g: low halves
  r[2] = prmt(v[2], v[3], 0x5410);
  r[1] = prmt(v[4], v[5], 0x7632);  // row g + 8: high halves
  r[3] = prmt(v[6], v[7], 0x7632);
}

// B registers (b0, b1) of k-tile j from the lane's 8 words of x for a chunk (word w holds
// x[64 c + 16 t + 2w], x[... + 2w + 1]): mma rows (2t, 2t+1) -> chunk k 16t + 4j + {0, 1},
// rows (2t+8, 2t+9) -> 16t + 4j + {2, 3} (mma_k_to_chunk_k).
ANY4_HD void b_regs(const uint32_t xw[8], int j, uint32_t b[2]) {
  b[0] = xw[2 * j];
  b[1] = xw[2 * j + 1];
}

// Dequantize-to-matrix (the M > 64 path: W once in the compute dtype, then a dense matmul):
// A register r (0..3) of k-tile j holds two consecutive k of one row, so a lane's registers of a
// chunk are the 16 k's 16t .. 16t + 15 of rows g (r = 0, 2) and g + 8 (r = 1, 3), as 8 32-bit
// words each. dequant_row_half(r): 0 for row g, 1 for row g + 8; dequant_word(j, r): which word.
// (From the fragment layout: r = 0 holds mma k 2t, 2t+1 -> chunk k 16t + 4j + {0, 1}; r = 2 holds
// 2t+8, 2t+9 -> 16t + 4j + {2, 3}; rows as mma_a_row.)
ANY4_HD int dequant_row_half(int r) {
  return r & 1;
}
ANY4_HD int dequant_word(int j, int r) {
  return 2 * j + (r >> 1);
}

// Scale and zero: w = value * scale + zero, rows g (regs 0, 2) and g + 8 (regs 1, 3).
// sz = (scale[g], zero[g]) packed in the low word, (scale[g+8], zero[g+8]) in the high word.
template <bool BF16>
ANY4_HD void apply_scale_zero(uint32_t r[4], uint32_t sz_g, uint32_t sz_g8) {
  const uint32_t s_g = dup_lo(sz_g), z_g = dup_hi(sz_g), s_g8 = dup_lo(sz_g8), z_g8 = dup_hi(sz_g8);
  r[0] = fma2<BF16>(r[0], s_g, z_g);
  r[2] = fma2<BF16>(r[2], s_g, z_g);
  r[1] = fma2<BF16>(r[1], s_g8, z_g8);
  r[3] = fma2<BF16>(r[3], s_g8, z_g8);
}

}  // namespace gpu
}  // namespace any4
