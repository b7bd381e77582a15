#include "emulate_gpu.h"

#include <cstring>
#include <vector>

#include "layout.cuh"
#include "pack_gpu.h"

namespace any4 {

using namespace gpu;

namespace {

// Registers of one pipeline stage for all 32 lanes of a warp (the kernel's Stage, per lane).
struct EmuStage {
  uint32_t q[kMaxStageChunks][kWarpSize][kKTiles];
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

// Per-lane tables of rows g and g + 8 of a tile, and the warp's lane-replicated smem table.
void load_tables(const uint8_t* lut, int64_t tile, RowTable row_g[kWarpSize], RowTable row_g8[kWarpSize],
                 uint32_t smem[16 * kWarpSize]) {
  for (int lane = 0; lane < kWarpSize; ++lane) {
    const int64_t rg = tile * kTileN + lane_g(lane);
    for (int w = 0; w < 4; ++w) {
      row_g[lane].lo[w] = load_u32(lut, rg * kLutBytes + 4 * w);
      row_g[lane].hi[w] = load_u32(lut, rg * kLutBytes + 16 + 4 * w);
      row_g8[lane].lo[w] = load_u32(lut, (rg + 8) * kLutBytes + 4 * w);
      row_g8[lane].hi[w] = load_u32(lut, (rg + 8) * kLutBytes + 16 + 4 * w);
    }
    for (int c = 0; c < 16; ++c) smem[smem_lut_word(c, lane)] = smem_lut_value(row_g[lane], row_g8[lane], c);
  }
}

// One lane's 4 A registers of one k-tile: codes q dequantized, then scale and zero applied.
void dequant_lane(Dequant dq, bool bf16, uint32_t q, uint32_t neg2, const RowTable& row_g,
                  const RowTable& row_g8, const uint32_t* smem_lane, uint32_t sz_g, uint32_t sz_g8,
                  uint32_t A[4]) {
  if (dq == Dequant::Arith) {
    if (bf16)
      dequant_arith<true>(q, neg2, A);
    else
      dequant_arith<false>(q, neg2, A);
  } else if (dq == Dequant::LutReg) {
    dequant_lut_reg(q, row_g, row_g8, A);
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
  gpu_pack_sizes(a.N, a.K, a.group_size);  // validates
  const bool bf16 = a.dtype == DType::BF16;
  const TcShape s = tc_shape(a.N, a.K, a.group_size);
  const TcPlan plan =
      make_tc_plan(a.M, s.n_tiles, s.k_chunks, a.num_sms, a.blocks_per_sm, a.force_splits, a.split_waves);
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
          load_tables(a.lut, tile, row_g, row_g8, smem);

          float acc[2][kWarpSize][4] = {};
          std::vector<EmuStage> stages(2);
          auto load = [&](EmuStage& st, int64_t c) {
            for (int u = 0; u < SC; ++u) {
              const int64_t chunk = c + u;
              if (chunk >= c1) continue;
              for (int lane = 0; lane < kWarpSize; ++lane) {
                const int64_t qv = codes_vec_index(tile, chunk, lane, s.k_chunks);
                for (int j = 0; j < kKTiles; ++j) st.q[u][lane][j] = load_u32(a.codes, qv * 16 + 4 * j);
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
              for (int j = 0; j < kKTiles; ++j) {
                uint32_t A[kWarpSize][4], B[2][kWarpSize][2];
                for (int lane = 0; lane < kWarpSize; ++lane) {
                  dequant_lane(dq, bf16, st.q[u][lane][j], a.arith_neg2, row_g[lane], row_g8[lane],
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
  gpu_pack_sizes(a.N, a.K, a.group_size);  // validates
  const bool bf16 = a.dtype == DType::BF16;
  const TcShape s = tc_shape(a.N, a.K, a.group_size);
  const Dequant dq = static_cast<Dequant>(a.dequant);
  for (int64_t tile = 0; tile < s.n_tiles; ++tile) {
    RowTable row_g[kWarpSize], row_g8[kWarpSize];
    uint32_t smem[16 * kWarpSize];
    load_tables(a.lut, tile, row_g, row_g8, smem);
    for (int64_t chunk = 0; chunk < s.k_chunks; ++chunk)
      for (int lane = 0; lane < kWarpSize; ++lane) {
        const int64_t qv = codes_vec_index(tile, chunk, lane, s.k_chunks);
        const int64_t sv =
            scales_vec_index(tile, lane_group(chunk, lane, s.log2_group), lane, s.n_groups_pad);
        uint32_t words[2][8];
        for (int j = 0; j < kKTiles; ++j) {
          uint32_t A[4];
          dequant_lane(dq, bf16, load_u32(a.codes, qv * 16 + 4 * j), a.arith_neg2, row_g[lane], row_g8[lane],
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
