#include "emulate_gpu.h"

#include <cstring>
#include <vector>

#include "layout.cuh"
#include "pack_gpu.h"

namespace any4 {

using namespace gpu;

namespace {

// Registers of one pipeline stage for all 32 lanes of a warp (the kernel's Stage, per lane):
// q holds the stage's 16-byte code vectors (one per chunk for 4-bit codes, one lo-plane vector
// per two chunks for 3/2-bit codes) as 32-bit words, h the 3-bit hi-plane vectors.
struct EmuStage {
  uint32_t q[kMaxStageChunks][kWarpSize][4];
  uint32_t h[kMaxStageChunks][kWarpSize][2];
  uint32_t x[kMaxStageChunks][2][kWarpSize][8];
  uint32_t sz[kMaxStageChunks][kWarpSize][2];
};

uint32_t load_u32(const void* base, int64_t byte_offset) {
  uint32_t v;
  std::memcpy(&v, static_cast<const uint8_t*>(base) + byte_offset, 4);
  return v;
}

// D = A * B + C of mma.m16n8k16 (fp32 accumulate), operands given per lane in PTX fragment order.
void emulate_mma(const uint32_t a[kWarpSize][4], const uint32_t b[kWarpSize][2], float acc[kWarpSize][4],
                 bool bf16) {
  double A[16][16], B[16][8], C[16][8];
  for (int lane = 0; lane < kWarpSize; ++lane) {
    for (int e = 0; e < 8; ++e)
      A[mma_a_row(lane, e)][mma_a_col(lane, e)] =
          h16_to_f32(uint16_t(a[lane][e >> 1] >> (16 * (e & 1))), bf16);
    for (int e = 0; e < 4; ++e)
      B[mma_b_row(lane, e)][mma_b_col(lane, e)] =
          h16_to_f32(uint16_t(b[lane][e >> 1] >> (16 * (e & 1))), bf16);
    for (int e = 0; e < 4; ++e) C[mma_c_row(lane, e)][mma_c_col(lane, e)] = acc[lane][e];
  }
  for (int lane = 0; lane < kWarpSize; ++lane)
    for (int e = 0; e < 4; ++e) {
      int r = mma_c_row(lane, e), c = mma_c_col(lane, e);
      double s = C[r][c];
      for (int kk = 0; kk < 16; ++kk) s += A[r][kk] * B[kk][c];
      acc[lane][e] = static_cast<float>(s);
    }
}

// Per-lane tables of rows g and g + 8 of a tile, and the warp's lane-replicated smem table
// (3/2-bit kernels load entries 0..7 only, and fill 2^bits entries of the smem table; the
// entries they leave unset are never read, here they are zero).
void load_tables(const uint8_t* lut, int64_t tile, int bits, RowTable row_g[kWarpSize],
                 RowTable row_g8[kWarpSize], uint32_t smem[16 * kWarpSize]) {
  std::memset(smem, 0, 16 * kWarpSize * sizeof(uint32_t));
  const int words = bits == 4 ? 4 : 2;
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int64_t rg = tile * kTileN + lane_g(lane);
    for (int w = 0; w < 4; ++w) {
      row_g[lane].lo[w] = w < words ? load_u32(lut, rg * kLutBytes + 4 * w) : 0u;
      row_g[lane].hi[w] = w < words ? load_u32(lut, rg * kLutBytes + 16 + 4 * w) : 0u;
      row_g8[lane].lo[w] = w < words ? load_u32(lut, (rg + 8) * kLutBytes + 4 * w) : 0u;
      row_g8[lane].hi[w] = w < words ? load_u32(lut, (rg + 8) * kLutBytes + 16 + 4 * w) : 0u;
    }
    for (int c = 0; c < (1 << bits); ++c)
      smem[smem_lut_word(c, lane)] = smem_lut_value(row_g[lane], row_g8[lane], c);
  }
}

// The kernel's stage loads of one lane's codes for chunks c .. c + SC - 1 (< c1).
void load_stage_codes(const uint8_t* codes, const TcShape& s, int64_t tile, int64_t c, int64_t c1, int SC,
                      int lane, EmuStage& st) {
  if (s.bits == 4) {
    for (int u = 0; u < SC; ++u)
      if (c + u < c1)
        for (int w = 0; w < 4; ++w)
          st.q[u][lane][w] = load_u32(codes, codes_vec_index(tile, c + u, lane, s.k_chunks) * 16 + 4 * w);
    return;
  }
  for (int v = 0; v < SC / kLowBitChunkAlign; ++v) {
    const int64_t chunk = c + kLowBitChunkAlign * v;
    if (chunk >= c1) continue;
    const int64_t unit = chunk / kLowBitChunkAlign;
    for (int w = 0; w < 4; ++w)
      st.q[v][lane][w] = load_u32(codes, lowbit_lo_offset(tile, unit, lane, s.n_units, s.bits) + 4 * w);
    if (s.bits == 3)
      for (int w = 0; w < 2; ++w)
        st.h[v][lane][w] = load_u32(codes, lowbit_hi_offset(tile, unit, lane, s.n_units) + 4 * w);
  }
}

// The four 4-bit words of chunk u of a stage (the kernel's stage_chunk_words).
void stage_chunk_words(const EmuStage& st, int bits, int u, int lane, uint32_t q[kKTiles]) {
  if (bits == 4) {
    for (int j = 0; j < kKTiles; ++j) q[j] = st.q[u][lane][j];
    return;
  }
  const uint32_t* v = st.q[u / kLowBitChunkAlign][lane];
  const uint32_t lo0 = v[2 * (u & 1)], lo1 = v[2 * (u & 1) + 1];
  const uint32_t hi = bits == 3 ? st.h[u / kLowBitChunkAlign][lane][u & 1] : 0u;
  for (int j = 0; j < kKTiles; ++j)
    q[j] =
        bits == 3 ? lowbit_nibbles<3>(j < 2 ? lo0 : lo1, hi, j) : lowbit_nibbles<2>(j < 2 ? lo0 : lo1, hi, j);
}

// One lane's 4 A registers of one k-tile: codes q dequantized, then scale and zero applied.
void dequant_lane(Dequant dq, bool bf16, int bits, uint32_t q, uint32_t neg2, const RowTable& row_g,
                  const RowTable& row_g8, const uint32_t* smem_lane, uint32_t sz_g, uint32_t sz_g8,
                  uint32_t A[4]) {
  if (dq == Dequant::Arith) {
    if (bf16)
      dequant_arith<true>(q, neg2, A);
    else
      dequant_arith<false>(q, neg2, A);
  } else if (dq == Dequant::LutReg) {
    if (bits == 4)
      dequant_lut_reg(q, row_g, row_g8, A);
    else
      dequant_lut_reg_small(q, row_g, row_g8, A);
  } else {
    dequant_lut_smem(q, smem_lane, A);
  }
  if (bf16)
    apply_scale_zero<true>(A, sz_g, sz_g8);
  else
    apply_scale_zero<false>(A, sz_g, sz_g8);
}

}  // namespace

void emulate_gpu_gemm(const EmulateGpuArgs& a) {
  ANY4_CHECK(a.dtype == DType::BF16 || a.dtype == DType::F16, "emulate_gpu_gemm: dtype must be bf16 or fp16");
  ANY4_CHECK(a.M >= 1, "emulate_gpu_gemm: M must be >= 1");
  ANY4_CHECK(a.dequant >= 0 && a.dequant <= 2, "emulate_gpu_gemm: unknown dequantizer");
  ANY4_CHECK(valid_stage_chunks(a.stage_chunks), "emulate_gpu_gemm: stage_chunks must be 2 or 4");
  ANY4_CHECK(a.split_waves >= 1 && a.split_waves <= kMaxSplitWaves,
             "emulate_gpu_gemm: split_waves must be 1 or 2");
  gpu_pack_sizes(a.N, a.K, a.group_size, a.bits);  // validates
  const bool bf16 = a.dtype == DType::BF16;
  const TcShape s = tc_shape(a.N, a.K, a.group_size, a.bits);
  const TcPlan plan = make_tc_plan(a.M, s.n_tiles, s.k_chunks, a.num_sms, a.blocks_per_sm, a.force_splits,
                                   a.split_waves, chunks_per_unit(a.bits));
  ANY4_CHECK(a.bits == 4 || plan.chunks_per_split % kLowBitChunkAlign == 0,
             "emulate_gpu_gemm: a 3/2-bit split must start on an even chunk");  // (a plan bug)
  const int SC = a.stage_chunks;
  const int MT = plan.mt;
  const Dequant dq = static_cast<Dequant>(a.dequant);

  // x zero-padded to K_pad columns (what the Python wrapper hands the kernel).
  std::vector<uint16_t> xp(static_cast<size_t>(a.M * s.K_pad), 0);
  for (int64_t m = 0; m < a.M; ++m) std::memcpy(&xp[m * s.K_pad], a.x + m * a.K, a.K * 2);
  std::vector<float> workspace(static_cast<size_t>(plan.workspace_floats()), 0.f);
  std::vector<int> counters(static_cast<size_t>(plan.counters()), 0);

  for (int64_t mz = 0; mz < plan.m_tiles; ++mz)
    for (int64_t bx = 0; bx < plan.grid_x; ++bx)
      for (int64_t split = 0; split < plan.splits; ++split)
        for (int warp = 0; warp < kWarps; ++warp) {
          const int64_t tile = bx * kWarps + warp;
          if (tile >= s.n_tiles) continue;
          int64_t c0, c1;
          split_range(split, plan.chunks_per_split, s.k_chunks, &c0, &c1);

          // Tables of rows g and g + 8 per lane, and the warp's shared-memory table.
          RowTable row_g[kWarpSize], row_g8[kWarpSize];
          uint32_t smem[16 * kWarpSize];
          load_tables(a.lut, tile, a.bits, row_g, row_g8, smem);

          float acc[2][kWarpSize][4] = {};
          std::vector<EmuStage> stages(2);
          auto load = [&](EmuStage& st, int64_t c) {
            for (int lane = 0; lane < kWarpSize; ++lane)
              load_stage_codes(a.codes, s, tile, c, c1, SC, lane, st);
            for (int u = 0; u < SC; ++u) {
              const int64_t chunk = c + u;
              if (chunk >= c1) continue;
              for (int lane = 0; lane < kWarpSize; ++lane) {
                for (int mt = 0; mt < MT; ++mt) {
                  const int64_t m = x_row(mz, MT, mt, lane);
                  for (int w = 0; w < 8; ++w)
                    st.x[u][mt][lane][w] =
                        m < a.M ? load_u32(xp.data(), (x_elem_index(m, s.K_pad, chunk, lane) + 2 * w) * 2)
                                : 0u;
                }
                const int64_t sv =
                    scales_vec_index(tile, lane_group(chunk, lane, s.log2_group), lane, s.n_groups_pad);
                st.sz[u][lane][0] = load_u32(a.scales, sv * 8);
                st.sz[u][lane][1] = load_u32(a.scales, sv * 8 + 4);
              }
            }
          };
          auto compute = [&](EmuStage& st, int64_t c) {
            for (int u = 0; u < SC; ++u) {
              if (c + u >= c1) continue;
              uint32_t q[kWarpSize][kKTiles];
              for (int lane = 0; lane < kWarpSize; ++lane) stage_chunk_words(st, a.bits, u, lane, q[lane]);
              for (int j = 0; j < kKTiles; ++j) {
                uint32_t A[kWarpSize][4], B[2][kWarpSize][2];
                for (int lane = 0; lane < kWarpSize; ++lane) {
                  dequant_lane(dq, bf16, a.bits, q[lane][j], a.arith_neg2, row_g[lane], row_g8[lane],
                               smem + smem_lut_word(0, lane), st.sz[u][lane][0], st.sz[u][lane][1], A[lane]);
                  for (int mt = 0; mt < MT; ++mt) b_regs(st.x[u][mt][lane], j, B[mt][lane]);
                }
                for (int mt = 0; mt < MT; ++mt) emulate_mma(A, B[mt], acc[mt], bf16);
              }
            }
          };
          if (SC == kMaxStageChunks) {
            run_pipeline<kMaxStageChunks>(c0, c1, stages[0], stages[1], load, compute);
          } else {
            run_pipeline<kStageChunks>(c0, c1, stages[0], stages[1], load, compute);
          }

          // Epilogue: direct store, or split-K through the workspace (the last split reduces in
          // split order, so the result does not depend on which block finishes last).
          auto store = [&](int mt, int lane, int e, float v) {
            const int64_t m = y_row(mz, MT, mt, lane, e), n = y_col(tile, lane, e);
            if (m < a.M && n < a.N) a.y[m * a.N + n] = f32_to_h16(v, bf16);
          };
          if (plan.splits == 1) {
            for (int mt = 0; mt < MT; ++mt)
              for (int lane = 0; lane < kWarpSize; ++lane)
                for (int e = 0; e < 4; ++e) store(mt, lane, e, acc[mt][lane][e]);
            continue;
          }
          for (int mt = 0; mt < MT; ++mt)
            for (int lane = 0; lane < kWarpSize; ++lane)
              for (int e = 0; e < 4; ++e)
                workspace[workspace_index(mz, tile, split, MT, s.n_tiles, plan.splits, mt * 4 + e, lane)] =
                    acc[mt][lane][e];
          int& counter = counters[mz * s.n_tiles + tile];
          if (counter++ != plan.splits - 1) continue;
          counter = 0;
          for (int mt = 0; mt < MT; ++mt)
            for (int lane = 0; lane < kWarpSize; ++lane)
              for (int e = 0; e < 4; ++e) {
                float v = 0.f;
                for (int64_t sp = 0; sp < plan.splits; ++sp)
                  v += workspace[workspace_index(mz, tile, sp, MT, s.n_tiles, plan.splits, mt * 4 + e, lane)];
                store(mt, lane, e, v);
              }
        }
}

void emulate_gpu_dequant(const EmulateGpuArgs& a, uint16_t* w_out) {
  ANY4_CHECK(a.dtype == DType::BF16 || a.dtype == DType::F16,
             "emulate_gpu_dequant: dtype must be bf16 or fp16");
  ANY4_CHECK(a.dequant >= 0 && a.dequant <= 2, "emulate_gpu_dequant: unknown dequantizer");
  gpu_pack_sizes(a.N, a.K, a.group_size, a.bits);  // validates
  const bool bf16 = a.dtype == DType::BF16;
  const TcShape s = tc_shape(a.N, a.K, a.group_size, a.bits);
  // The kernel runs LutSmem as LutReg (same values).
  const Dequant dq = a.dequant == 0 ? Dequant::Arith : Dequant::LutReg;
  for (int64_t tile = 0; tile < s.n_tiles; ++tile) {
    RowTable row_g[kWarpSize], row_g8[kWarpSize];
    uint32_t smem[16 * kWarpSize];
    load_tables(a.lut, tile, a.bits, row_g, row_g8, smem);
    for (int64_t chunk = 0; chunk < s.k_chunks; ++chunk)
      for (int lane = 0; lane < kWarpSize; ++lane) {
        // the kernel's loads: the chunk's 4-bit vector, or its half of the unit's planes
        uint32_t q[kKTiles];
        if (s.bits == 4) {
          const int64_t qv = codes_vec_index(tile, chunk, lane, s.k_chunks);
          for (int j = 0; j < kKTiles; ++j) q[j] = load_u32(a.codes, qv * 16 + 4 * j);
        } else {
          const int64_t unit = chunk / kLowBitChunkAlign, half = chunk % kLowBitChunkAlign;
          const int64_t lo = lowbit_lo_offset(tile, unit, lane, s.n_units, s.bits) + 8 * half;
          const uint32_t lo0 = load_u32(a.codes, lo), lo1 = load_u32(a.codes, lo + 4);
          const uint32_t hi =
              s.bits == 3 ? load_u32(a.codes, lowbit_hi_offset(tile, unit, lane, s.n_units) + 4 * half) : 0u;
          for (int j = 0; j < kKTiles; ++j)
            q[j] = s.bits == 3 ? lowbit_nibbles<3>(j < 2 ? lo0 : lo1, hi, j)
                               : lowbit_nibbles<2>(j < 2 ? lo0 : lo1, hi, j);
        }
        const int64_t sv =
            scales_vec_index(tile, lane_group(chunk, lane, s.log2_group), lane, s.n_groups_pad);
        uint32_t words[2][8];
        for (int j = 0; j < kKTiles; ++j) {
          uint32_t A[4];
          dequant_lane(dq, bf16, s.bits, q[j], a.arith_neg2, row_g[lane], row_g8[lane],
                       smem + smem_lut_word(0, lane), load_u32(a.scales, sv * 8),
                       load_u32(a.scales, sv * 8 + 4), A);
          for (int r = 0; r < 4; ++r) words[dequant_row_half(r)][dequant_word(j, r)] = A[r];
        }
        for (int h = 0; h < 2; ++h) {
          const int64_t n = tile * kTileN + lane_g(lane) + 8 * h;
          if (n < a.N) std::memcpy(w_out + n * s.K_pad + chunk * kChunkK + 16 * lane_t(lane), words[h], 32);
        }
      }
  }
}

}  // namespace any4
