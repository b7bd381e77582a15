// The tensor-core gemm kernel and the dequantize kernel of the large-batch path, as templates
// over the code width (BITS = 4, 3, 2), dtype, dequantizer, B tiles per mma (MT) and pipeline
// depth (SC). Design, work decomposition and pipeline: cuda/gemm_tc.cu; layout, per-lane index
// math and dequantization: cuda/layout.cuh (shared with the CPU emulation, cpp/emulate_gpu.cpp).
//
// Each code width is instantiated in its own translation unit (gemm_tc_bits{4,3,2}.cu: three
// nvcc jobs that build in parallel), which hands its instances to the host code in gemm_tc.cu
// through the tc_kernels_bits* / dequant_kernels_bits* tables below.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cuda/atomic>

#include "layout.cuh"

namespace any4 {
namespace cuda {

struct TcParams {
  const uint16_t* x;
  const uint8_t* codes;
  const uint2* scales;
  const uint4* lut;
  uint16_t* y;
  float* workspace;
  int* counters;
  int64_t M, N, K_pad, n_tiles, k_chunks, n_units, n_groups_pad, splits, chunks_per_split;
  int log2_group;
  uint32_t arith_neg2;
};

struct DequantParams {
  const uint8_t* codes;
  const uint2* scales;
  const uint4* lut;
  uint16_t* w;
  int64_t N, K_pad, n_tiles, k_chunks, n_units, n_groups_pad;
  int log2_group;
  uint32_t arith_neg2;
};

using TcKernel = void (*)(const TcParams);
using DequantKernel = void (*)(const DequantParams);

// Instance tables of one code width: [bf16][dequant][mt - 1][sc == kMaxStageChunks] and
// [bf16][dequant] (LutSmem runs as LutReg in the dequantize kernel). Defined in gemm_tc_bits*.cu.
struct TcKernelTable {
  TcKernel gemm[2][3][2][2];
  DequantKernel dequant[2][3];
};
const TcKernelTable& tc_kernels_bits4();
const TcKernelTable& tc_kernels_bits3();
const TcKernelTable& tc_kernels_bits2();

#if defined(__CUDACC__)
namespace tc_detail {

using namespace gpu;

template <bool BF16>
__device__ __forceinline__ void mma_16816(float acc[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <bool BF16>
__device__ __forceinline__ uint16_t to_h16(float v) {
  if constexpr (BF16) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  } else {
    return __half_as_ushort(__float2half_rn(v));
  }
}

// Code registers of one pipeline stage of SC chunks: 4-bit: one 16-byte vector per chunk;
// 3/2-bit: one lo-plane vector per unit (two chunks) and, 3-bit, one 8-byte hi-plane vector.
template <int BITS, int SC>
struct StageCodes {
  static constexpr int kVecs = BITS == 4 ? SC : SC / kLowBitChunkAlign;
  uint4 q[kVecs];
  uint2 h[BITS == 3 ? kVecs : 1];
};

// Registers of one pipeline stage of one lane.
template <int BITS, int MT, int SC>
struct Stage {
  StageCodes<BITS, SC> codes;
  uint4 x[SC][MT][2];  // x[m][64 c + 16 t .. + 15] for each B tile
  uint2 sz[SC];        // (scale, zero) of rows g and g + 8
};

// Loads the codes of chunks c .. c + SC - 1 (those < c1; c is a multiple of kLowBitChunkAlign
// for 3/2-bit codes, see make_tc_plan).
template <int BITS, int SC>
__device__ __forceinline__ void load_stage_codes(StageCodes<BITS, SC>& st, const uint8_t* codes, int64_t tile,
                                                 int64_t c, int64_t c1, int lane, int64_t k_chunks,
                                                 int64_t n_units) {
  if constexpr (BITS == 4) {
#pragma unroll
    for (int u = 0; u < SC; ++u)
      if (c + u < c1)
        st.q[u] =
            __ldcs(reinterpret_cast<const uint4*>(codes) + codes_vec_index(tile, c + u, lane, k_chunks));
  } else {
#pragma unroll
    for (int v = 0; v < StageCodes<BITS, SC>::kVecs; ++v) {
      const int64_t chunk = c + kLowBitChunkAlign * v;
      if (chunk < c1) {
        const int64_t unit = chunk / kLowBitChunkAlign;
        st.q[v] =
            __ldcs(reinterpret_cast<const uint4*>(codes + lowbit_lo_offset(tile, unit, lane, n_units, BITS)));
        if constexpr (BITS == 3)
          st.h[v] =
              __ldcs(reinterpret_cast<const uint2*>(codes + lowbit_hi_offset(tile, unit, lane, n_units)));
      }
    }
  }
}

// The four 4-bit words (one per k-tile) of chunk u (0 .. SC - 1) of a stage.
template <int BITS, int SC>
__device__ __forceinline__ void stage_chunk_words(const StageCodes<BITS, SC>& st, int u,
                                                  uint32_t q[kKTiles]) {
  if constexpr (BITS == 4) {
    q[0] = st.q[u].x;
    q[1] = st.q[u].y;
    q[2] = st.q[u].z;
    q[3] = st.q[u].w;
  } else {
    const uint4& v = st.q[u / kLowBitChunkAlign];
    const uint32_t lo0 = (u & 1) ? v.z : v.x, lo1 = (u & 1) ? v.w : v.y;
    uint32_t hi = 0;
    if constexpr (BITS == 3) hi = (u & 1) ? st.h[u / kLowBitChunkAlign].y : st.h[u / kLowBitChunkAlign].x;
#pragma unroll
    for (int j = 0; j < kKTiles; ++j) q[j] = lowbit_nibbles<BITS>(j < 2 ? lo0 : lo1, hi, j);
  }
}

// The tables of rows g and g + 8 of a lane (LutReg, LutSmem), from the GPU layout; tables of
// 3/2-bit codes need entries 0..7 only (bytes 0..7 and 16..23 of a row).
template <int BITS>
__device__ __forceinline__ void load_row_tables(const uint4* lut, int64_t tile, int lane, RowTable* row_g,
                                                RowTable* row_g8) {
  const int64_t rg = tile * kTileN + lane_g(lane);
  if constexpr (BITS == 4) {
    const uint4 lo_g = __ldg(lut + rg * 2), hi_g = __ldg(lut + rg * 2 + 1);
    const uint4 lo_g8 = __ldg(lut + (rg + 8) * 2), hi_g8 = __ldg(lut + (rg + 8) * 2 + 1);
    *row_g = RowTable{{lo_g.x, lo_g.y, lo_g.z, lo_g.w}, {hi_g.x, hi_g.y, hi_g.z, hi_g.w}};
    *row_g8 = RowTable{{lo_g8.x, lo_g8.y, lo_g8.z, lo_g8.w}, {hi_g8.x, hi_g8.y, hi_g8.z, hi_g8.w}};
  } else {
    const uint2* l2 = reinterpret_cast<const uint2*>(lut);  // 4 per row: lo 0..7, lo 8..15, hi 0..7, hi 8..15
    const uint2 lo_g = __ldg(l2 + rg * 4), hi_g = __ldg(l2 + rg * 4 + 2);
    const uint2 lo_g8 = __ldg(l2 + (rg + 8) * 4), hi_g8 = __ldg(l2 + (rg + 8) * 4 + 2);
    *row_g = RowTable{{lo_g.x, lo_g.y, 0u, 0u}, {hi_g.x, hi_g.y, 0u, 0u}};
    *row_g8 = RowTable{{lo_g8.x, lo_g8.y, 0u, 0u}, {hi_g8.x, hi_g8.y, 0u, 0u}};
  }
}

// The 4 A registers (before scale and zero) of one k-tile from its 4-bit word q.
template <int BITS, bool BF16, Dequant kDq>
__device__ __forceinline__ void decode_k_tile(uint32_t q, uint32_t neg2, const RowTable& row_g,
                                              const RowTable& row_g8, const uint32_t* tab_lane,
                                              uint32_t a[4]) {
  if constexpr (kDq == Dequant::Arith) {
    dequant_arith<BF16>(q, neg2, a);
  } else if constexpr (kDq == Dequant::LutReg) {
    if constexpr (BITS == 4) {
      dequant_lut_reg(q, row_g, row_g8, a);
    } else {
      dequant_lut_reg_small(q, row_g, row_g8, a);
    }
  } else {
    dequant_lut_smem(q, tab_lane, a);
  }
}

// Minimum resident blocks per multiprocessor promised to ptxas (__launch_bounds__). 0 (no
// promise, as without the argument: 1 would emit .minnctapersm 1, which ptxas takes as leave to
// spend 20-30 more registers on the table kernels) except for the arith MT=1 2-stage instances,
// the lightest, promised 6 (at most 85 registers): without it ptxas (CUDA 13.0) gives the 4-bit
// one 86 registers on sm_90 (5 blocks/SM instead of 6 at 80), and aims the 2-bit one at 7 blocks
// on sm_80, spilling 28 bytes.
template <int BITS, int DQ, int MT, int SC>
constexpr int tc_min_blocks() {
  return DQ == 0 && MT == 1 && SC == kStageChunks ? 6 : 0;
}

template <int BITS, bool BF16, int DQ, int MT, int SC>
__global__ void __launch_bounds__(kWarps* kWarpSize, (tc_min_blocks<BITS, DQ, MT, SC>()))
    gemm_tc_kernel(const TcParams p) {
  constexpr Dequant kDq = static_cast<Dequant>(DQ);
  static_assert(BITS == 4 || SC % kLowBitChunkAlign == 0, "3/2-bit stages cover whole code units");

  const int lane = threadIdx.x & (kWarpSize - 1);
  const int warp = threadIdx.x / kWarpSize;
  const int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarps + warp;
  const int64_t split = blockIdx.y, mz = blockIdx.z;
  if (tile >= p.n_tiles) return;  // warp-uniform; no block-level synchronisation follows
  int64_t c0, c1;
  split_range(split, p.chunks_per_split, p.k_chunks, &c0, &c1);

  // Tables of rows g and g + 8: registers (LutReg) or this warp's lane-replicated smem table.
  RowTable row_g, row_g8;
  const uint32_t* tab_lane = nullptr;
  if constexpr (kDq != Dequant::Arith) load_row_tables<BITS>(p.lut, tile, lane, &row_g, &row_g8);
  if constexpr (kDq == Dequant::LutSmem) {
    __shared__ uint32_t smem_lut[kWarps * 16 * kWarpSize];  // 2 KB per warp
    uint32_t* tab = smem_lut + warp * 16 * kWarpSize;
#pragma unroll
    for (int c = 0; c < (1 << BITS); ++c) tab[smem_lut_word(c, lane)] = smem_lut_value(row_g, row_g8, c);
    __syncwarp();  // each lane only reads its own column; kept for clarity
    tab_lane = tab + smem_lut_word(0, lane);
  }

  // Rows of x this lane feeds to the B tiles (lanes past M feed zeros).
  const uint16_t* x_lane[MT];
  bool x_valid[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    const int64_t m = x_row(mz, MT, mt, lane);
    x_valid[mt] = m < p.M;
    x_lane[mt] = p.x + (x_valid[mt] ? x_elem_index(m, p.K_pad, 0, lane) : 0);
  }

  float acc[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[mt][e] = 0.f;

  auto load = [&](Stage<BITS, MT, SC>& st, int64_t c) {
    load_stage_codes<BITS, SC>(st.codes, p.codes, tile, c, c1, lane, p.k_chunks, p.n_units);
#pragma unroll
    for (int u = 0; u < SC; ++u) {
      const int64_t chunk = c + u;
      if (chunk < c1) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          if (x_valid[mt]) {
            const uint4* xv = reinterpret_cast<const uint4*>(x_lane[mt] + chunk * kChunkK);
            st.x[u][mt][0] = __ldg(xv);
            st.x[u][mt][1] = __ldg(xv + 1);
          } else {
            st.x[u][mt][0] = make_uint4(0, 0, 0, 0);
            st.x[u][mt][1] = make_uint4(0, 0, 0, 0);
          }
        }
        st.sz[u] = __ldg(p.scales +
                         scales_vec_index(tile, lane_group(chunk, lane, p.log2_group), lane, p.n_groups_pad));
      }
    }
  };

  auto compute = [&](Stage<BITS, MT, SC>& st, int64_t c) {
#pragma unroll
    for (int u = 0; u < SC; ++u) {
      if (c + u < c1) {
        uint32_t q[kKTiles];
        stage_chunk_words<BITS, SC>(st.codes, u, q);
#pragma unroll
        for (int j = 0; j < kKTiles; ++j) {
          uint32_t a[4];
          decode_k_tile<BITS, BF16, kDq>(q[j], p.arith_neg2, row_g, row_g8, tab_lane, a);
          apply_scale_zero<BF16>(a, st.sz[u].x, st.sz[u].y);
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            const uint4 &x0 = st.x[u][mt][0], &x1 = st.x[u][mt][1];
            const uint32_t xw[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
            uint32_t b[2];
            b_regs(xw, j, b);
            mma_16816<BF16>(acc[mt], a, b[0], b[1]);
          }
        }
      }
    }
  };

  Stage<BITS, MT, SC> stage_a, stage_b;
  run_pipeline<SC>(c0, c1, stage_a, stage_b, load, compute);

  // ---- epilogue
  uint16_t* y = p.y;
  if (p.splits == 1) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = y_row(mz, MT, mt, lane, e), n = y_col(tile, lane, e);
        if (m < p.M && n < p.N) y[m * p.N + n] = to_h16<BF16>(acc[mt][e]);
      }
    return;
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e)
      p.workspace[workspace_index(mz, tile, split, MT, p.n_tiles, p.splits, mt * 4 + e, lane)] = acc[mt][e];
  // Publish: every lane's partials, then one device-scope acq_rel increment by lane 0. The
  // fence and the warp barrier order all lanes' stores before lane 0's release; the last warp's
  // acquire makes every split's partials visible to lane 0, and the warp barrier after the
  // shuffle extends that to lanes 1-31 (a shuffle alone is no memory ordering in the PTX model).
  __threadfence();
  __syncwarp();
  ::cuda::atomic_ref<int, ::cuda::thread_scope_device> counter(p.counters[mz * p.n_tiles + tile]);
  int last = 0;
  if (lane == 0) last = counter.fetch_add(1, ::cuda::memory_order_acq_rel) == static_cast<int>(p.splits - 1);
  last = __shfl_sync(0xffffffffu, last, 0);
  if (!last) return;
  __syncwarp();
  __threadfence();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float v = 0.f;
      for (int64_t sp = 0; sp < p.splits; ++sp)
        v += __ldcg(p.workspace + workspace_index(mz, tile, sp, MT, p.n_tiles, p.splits, mt * 4 + e, lane));
      const int64_t m = y_row(mz, MT, mt, lane, e), n = y_col(tile, lane, e);
      if (m < p.M && n < p.N) y[m * p.N + n] = to_h16<BF16>(v);
    }
  if (lane == 0) counter.store(0, ::cuda::memory_order_relaxed);  // ready for the next launch
}

// ---- dequantize-to-matrix (M > 64): one warp per (16-row tile, 64-k chunk), W [N, K_pad]
template <int BITS, bool BF16, int DQ>
__global__ void __launch_bounds__(kWarps* kWarpSize) dequant_tc_kernel(const DequantParams p) {
  constexpr Dequant kDq = static_cast<Dequant>(DQ);
  static_assert(kDq != Dequant::LutSmem, "the dequantize kernel uses the register table");
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (item >= p.n_tiles * p.k_chunks) return;
  const int64_t tile = item / p.k_chunks, chunk = item - tile * p.k_chunks;
  RowTable row_g, row_g8;
  if constexpr (kDq == Dequant::LutReg) load_row_tables<BITS>(p.lut, tile, lane, &row_g, &row_g8);
  uint32_t q[kKTiles];
  if constexpr (BITS == 4) {
    const uint4 qv =
        __ldcs(reinterpret_cast<const uint4*>(p.codes) + codes_vec_index(tile, chunk, lane, p.k_chunks));
    q[0] = qv.x;
    q[1] = qv.y;
    q[2] = qv.z;
    q[3] = qv.w;
  } else {
    // this chunk's half of the unit: 8 bytes of the lo plane (+ 4 bytes of the hi plane)
    const int64_t unit = chunk / kLowBitChunkAlign, half = chunk % kLowBitChunkAlign;
    const uint2 lo = __ldcs(
        reinterpret_cast<const uint2*>(p.codes + lowbit_lo_offset(tile, unit, lane, p.n_units, BITS)) + half);
    uint32_t hi = 0;
    if constexpr (BITS == 3)
      hi = __ldcs(
          reinterpret_cast<const unsigned int*>(p.codes + lowbit_hi_offset(tile, unit, lane, p.n_units)) +
          half);
#pragma unroll
    for (int j = 0; j < kKTiles; ++j) q[j] = lowbit_nibbles<BITS>(j < 2 ? lo.x : lo.y, hi, j);
  }
  const uint2 sz =
      __ldg(p.scales + scales_vec_index(tile, lane_group(chunk, lane, p.log2_group), lane, p.n_groups_pad));
  uint32_t words[2][8];
#pragma unroll
  for (int j = 0; j < kKTiles; ++j) {
    uint32_t a[4];
    decode_k_tile<BITS, BF16, kDq>(q[j], p.arith_neg2, row_g, row_g8, nullptr, a);
    apply_scale_zero<BF16>(a, sz.x, sz.y);
#pragma unroll
    for (int r = 0; r < 4; ++r) words[dequant_row_half(r)][dequant_word(j, r)] = a[r];
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = tile * kTileN + lane_g(lane) + 8 * h;
    if (n < p.N) {
      uint4* dst = reinterpret_cast<uint4*>(p.w + n * p.K_pad + chunk * kChunkK + 16 * lane_t(lane));
      dst[0] = make_uint4(words[h][0], words[h][1], words[h][2], words[h][3]);
      dst[1] = make_uint4(words[h][4], words[h][5], words[h][6], words[h][7]);
    }
  }
}

// The instance table of one code width (used by gemm_tc_bits*.cu).
template <int BITS, bool BF16, int DQ>
void fill_dq(TcKernelTable& t) {
  t.gemm[BF16][DQ][0][0] = &gemm_tc_kernel<BITS, BF16, DQ, 1, kStageChunks>;
  t.gemm[BF16][DQ][0][1] = &gemm_tc_kernel<BITS, BF16, DQ, 1, kMaxStageChunks>;
  t.gemm[BF16][DQ][1][0] = &gemm_tc_kernel<BITS, BF16, DQ, 2, kStageChunks>;
  t.gemm[BF16][DQ][1][1] = &gemm_tc_kernel<BITS, BF16, DQ, 2, kMaxStageChunks>;
  t.dequant[BF16][DQ] = DQ == 0 ? &dequant_tc_kernel<BITS, BF16, 0> : &dequant_tc_kernel<BITS, BF16, 1>;
}

template <int BITS>
TcKernelTable make_table() {
  TcKernelTable t{};
  fill_dq<BITS, false, 0>(t);
  fill_dq<BITS, false, 1>(t);
  fill_dq<BITS, false, 2>(t);
  fill_dq<BITS, true, 0>(t);
  fill_dq<BITS, true, 1>(t);
  fill_dq<BITS, true, 2>(t);
  return t;
}

}  // namespace tc_detail
#endif  // __CUDACC__

}  // namespace cuda
}  // namespace any4
