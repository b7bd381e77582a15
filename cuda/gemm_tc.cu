// Tensor-core gemm for 4-, 3- and 2-bit weights (tinygemm-style, batch 1-16): y = x @ dequant(W)^T.
//
// Layout (details and the per-lane index math in layout.cuh, shared with the CPU emulation):
// the weight was repacked once into mma.m16n8k16 A-fragment order, 16 rows x 64 k per 512
// contiguous bytes, one 16-byte vector per lane; k is permuted inside each 64-chunk so that each
// lane's B fragments (activations) for the chunk's four k-tiles are 32 contiguous bytes of one
// row of x. Nothing goes through shared memory except, for the LutSmem dequantizer, the table.
//
// Work decomposition:
//   block  = kWarps (4) warps; warp w owns the 16-row tile 4 * blockIdx.x + w of W for one K
//            range (blockIdx.y, split-K) and one tile of 8 * MT rows of x (blockIdx.z).
//   warp   : for every 64-k chunk of its range, per lane: one 16-byte load of codes, two 16-byte
//            loads of x per B tile, one 8-byte load of (scale, zero) for rows g and g + 8; then
//            for each of the 4 k-tiles: dequantize 8 codes into the 4 A registers (table lookup
//            or arithmetic conversion, then one packed fma with scale and zero per register) and
//            issue MT mma.sync (MT = 1 for M <= 8, 2 for M <= 16: the A fragment is reused).
//   split-K: when the 16-row tiles alone give fewer blocks than the GPU holds at once (small N),
//            K is split across blockIdx.y (make_tc_plan: up to two waves); each warp writes its
//            fp32 partial tile to a workspace, and the last warp to arrive on a tile (atomic
//            counter, acq_rel at device scope) sums the partials in split order (deterministic)
//            and writes y. Counters reset themselves to zero.
//
// Pipeline (Marlin-style, in registers rather than cp.async + shared memory, since no operand
// needs a transposition): a warp holds two stages of SC chunks (SC = 2, or 4 for the deeper
// variant); the global loads of stage s + 1 are issued before stage s is dequantized and
// multiplied (run_pipeline in layout.cuh), so each warp keeps 2 * SC * 512 bytes of codes (plus
// x and scales) in flight, and 4 warps per block x several blocks per multiprocessor hide the
// memory latency.
//
// Large batches (M > 64, chosen in python/any4/cuda.py): dequant_tc_kernel writes W once in the
// compute dtype and a dense matmul (cuBLAS through torch) does the product, instead of this
// kernel re-decoding the weight for every 16 rows of x.
// Codes are read once per call (evict-first loads, __ldcs); x, scales and tables are small and
// shared by all warps (read-only cache, __ldg).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cuda/atomic>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "api.h"
#include "launch.cuh"
#include "layout.cuh"

namespace any4 {
namespace cuda {

using namespace gpu;

namespace {

struct TcParams {
  const uint16_t* x;
  const uint4* codes;
  const uint2* scales;
  const uint4* lut;
  uint16_t* y;
  float* workspace;
  int* counters;
  int64_t M, N, K_pad, n_tiles, k_chunks, n_groups_pad, splits, chunks_per_split;
  int log2_group;
  uint32_t arith_neg2;
};

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

// Registers of one pipeline stage of one lane.
template <int MT, int SC>
struct Stage {
  uint4 q[SC];         // codes: 4 k-tiles x 8 nibbles
  uint4 x[SC][MT][2];  // x[m][64 c + 16 t .. + 15] for each B tile
  uint2 sz[SC];        // (scale, zero) of rows g and g + 8
};

// The tables of rows g and g + 8 of a lane (LutReg, LutSmem), from the GPU layout.
__device__ __forceinline__ void load_row_tables(const uint4* lut, int64_t tile, int lane, RowTable* row_g,
                                                RowTable* row_g8) {
  const int64_t rg = tile * kTileN + lane_g(lane);
  const uint4 lo_g = __ldg(lut + rg * 2), hi_g = __ldg(lut + rg * 2 + 1);
  const uint4 lo_g8 = __ldg(lut + (rg + 8) * 2), hi_g8 = __ldg(lut + (rg + 8) * 2 + 1);
  *row_g = RowTable{{lo_g.x, lo_g.y, lo_g.z, lo_g.w}, {hi_g.x, hi_g.y, hi_g.z, hi_g.w}};
  *row_g8 = RowTable{{lo_g8.x, lo_g8.y, lo_g8.z, lo_g8.w}, {hi_g8.x, hi_g8.y, hi_g8.z, hi_g8.w}};
}

template <bool BF16, int DQ, int MT, int SC>
__global__ void __launch_bounds__(kWarps* kWarpSize) gemm_tc_kernel(const TcParams p) {
  constexpr Dequant kDq = static_cast<Dequant>(DQ);

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
  if constexpr (kDq != Dequant::Arith) load_row_tables(p.lut, tile, lane, &row_g, &row_g8);
  if constexpr (kDq == Dequant::LutSmem) {
    __shared__ uint32_t smem_lut[kWarps * 16 * kWarpSize];  // 2 KB per warp
    uint32_t* tab = smem_lut + warp * 16 * kWarpSize;
#pragma unroll
    for (int c = 0; c < 16; ++c) tab[smem_lut_word(c, lane)] = smem_lut_value(row_g, row_g8, c);
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

  auto load = [&](Stage<MT, SC>& st, int64_t c) {
#pragma unroll
    for (int u = 0; u < SC; ++u) {
      const int64_t chunk = c + u;
      if (chunk < c1) {
        st.q[u] = __ldcs(p.codes + codes_vec_index(tile, chunk, lane, p.k_chunks));
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

  auto compute = [&](Stage<MT, SC>& st, int64_t c) {
#pragma unroll
    for (int u = 0; u < SC; ++u) {
      if (c + u < c1) {
        const uint32_t q[kKTiles] = {st.q[u].x, st.q[u].y, st.q[u].z, st.q[u].w};
#pragma unroll
        for (int j = 0; j < kKTiles; ++j) {
          uint32_t a[4];
          if constexpr (kDq == Dequant::Arith) {
            dequant_arith<BF16>(q[j], p.arith_neg2, a);
          } else if constexpr (kDq == Dequant::LutReg) {
            dequant_lut_reg(q[j], row_g, row_g8, a);
          } else {
            dequant_lut_smem(q[j], tab_lane, a);
          }
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

  Stage<MT, SC> stage_a, stage_b;
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
struct DequantParams {
  const uint4* codes;
  const uint2* scales;
  const uint4* lut;
  uint16_t* w;
  int64_t N, K_pad, n_tiles, k_chunks, n_groups_pad;
  int log2_group;
  uint32_t arith_neg2;
};

template <bool BF16, int DQ>
__global__ void __launch_bounds__(kWarps* kWarpSize) dequant_tc_kernel(const DequantParams p) {
  constexpr Dequant kDq = static_cast<Dequant>(DQ);
  static_assert(kDq != Dequant::LutSmem, "the dequantize kernel uses the register table");
  const int lane = threadIdx.x & (kWarpSize - 1);
  const int64_t item = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (item >= p.n_tiles * p.k_chunks) return;
  const int64_t tile = item / p.k_chunks, chunk = item - tile * p.k_chunks;
  RowTable row_g, row_g8;
  if constexpr (kDq == Dequant::LutReg) load_row_tables(p.lut, tile, lane, &row_g, &row_g8);
  const uint4 qv = __ldcs(p.codes + codes_vec_index(tile, chunk, lane, p.k_chunks));
  const uint2 sz =
      __ldg(p.scales + scales_vec_index(tile, lane_group(chunk, lane, p.log2_group), lane, p.n_groups_pad));
  const uint32_t q[kKTiles] = {qv.x, qv.y, qv.z, qv.w};
  uint32_t words[2][8];
#pragma unroll
  for (int j = 0; j < kKTiles; ++j) {
    uint32_t a[4];
    if constexpr (kDq == Dequant::Arith) {
      dequant_arith<BF16>(q[j], p.arith_neg2, a);
    } else {
      dequant_lut_reg(q[j], row_g, row_g8, a);
    }
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

using TcKernel = void (*)(const TcParams);

// The kernel instance for (dtype, dequantizer, MT, stage depth).
template <bool BF16, int DQ>
TcKernel kernel_for_dq(int mt, int sc) {
  const bool deep = sc == kMaxStageChunks;
  if (mt == 1)
    return deep ? &gemm_tc_kernel<BF16, DQ, 1, kMaxStageChunks> : &gemm_tc_kernel<BF16, DQ, 1, kStageChunks>;
  return deep ? &gemm_tc_kernel<BF16, DQ, 2, kMaxStageChunks> : &gemm_tc_kernel<BF16, DQ, 2, kStageChunks>;
}

template <bool BF16>
TcKernel kernel_for(int dq, int mt, int sc) {
  switch (static_cast<Dequant>(dq)) {
    case Dequant::Arith:
      return kernel_for_dq<BF16, 0>(mt, sc);
    case Dequant::LutReg:
      return kernel_for_dq<BF16, 1>(mt, sc);
    default:
      return kernel_for_dq<BF16, 2>(mt, sc);
  }
}

TcKernel kernel_instance(bool bf16, int dq, int mt, int sc) {
  return bf16 ? kernel_for<true>(dq, mt, sc) : kernel_for<false>(dq, mt, sc);
}

// Resident blocks per multiprocessor of a kernel instance (cached per device).
int blocks_per_sm(int device, bool bf16, int dq, int mt, int sc) {
  static std::mutex mu;
  static std::map<std::tuple<int, bool, int, int, int>, int> cache;
  const auto key = std::make_tuple(device, bf16, dq, mt, sc);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  const void* fn = reinterpret_cast<const void*>(kernel_instance(bf16, dq, mt, sc));
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, kWarps * kWarpSize, 0) != cudaSuccess || n < 1) {
    cudaGetLastError();
    n = 1;
  }
  cache[key] = n;
  return n;
}

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("any4 gemm_tc: " + msg);
}

bool aligned(const void* p, uintptr_t a) {
  return (reinterpret_cast<uintptr_t>(p) % a) == 0;
}

}  // namespace

TcPlan gemm_tc_plan(int64_t M, int64_t N, int64_t K, int dtype, int dequant, int device, int64_t force_splits,
                    int stage_chunks, int split_waves) {
  require(M >= 1 && N >= 1 && K >= 1, "M, N and K must be >= 1");
  require(dtype == 1 || dtype == 2, "dtype must be float16 or bfloat16");
  require(dequant >= 0 && dequant <= 2, "unknown dequantizer");
  require(valid_stage_chunks(stage_chunks), "stage_chunks must be 2 or 4");
  require(split_waves >= 1 && split_waves <= kMaxSplitWaves, "split_waves must be 1 or 2");
  const TcShape s = tc_shape(N, K, 16);
  const int mt = M <= 8 ? 1 : 2;
  DeviceScope scope(device);
  return make_tc_plan(M, s.n_tiles, s.k_chunks, num_sms(device),
                      blocks_per_sm(device, dtype == 2, dequant, mt, stage_chunks), force_splits,
                      split_waves);
}

TcScratchBound gemm_tc_scratch_bound(int device) {
  DeviceScope scope(device);
  int most = 1;
  for (int bf16 = 0; bf16 < 2; ++bf16)
    for (int dq = 0; dq < 3; ++dq)
      for (int mt = 1; mt <= 2; ++mt)
        for (int sc : {kStageChunks, kMaxStageChunks}) {
          const int n = blocks_per_sm(device, bf16 == 1, dq, mt, sc);
          if (n > most) most = n;
        }
  TcScratchBound b;
  b.workspace_floats = tc_workspace_floats_bound(num_sms(device), most);
  b.counters = tc_counters_bound(num_sms(device), most);
  return b;
}

void gemm_tc(const TcGemmArgs& a) {
  require(a.dtype == 1 || a.dtype == 2, "dtype must be float16 or bfloat16");
  require(a.dequant >= 0 && a.dequant <= 2, "unknown dequantizer");
  require(tc_log2_group(a.group_size) >= 0, "group size must be a power of two >= 16");
  require(a.x && a.codes && a.scales && a.y && (a.lut || a.dequant == 0), "null pointer");
  require(aligned(a.x, 16) && aligned(a.codes, 16) && aligned(a.scales, 8) && (!a.lut || aligned(a.lut, 16)),
          "misaligned operand (x, codes and lut need 16 bytes, scales 8)");
  if (a.M == 0) return;
  DeviceScope scope(a.device);
  const TcShape s = tc_shape(a.N, a.K, a.group_size);
  const TcPlan plan = gemm_tc_plan(a.M, a.N, a.K, a.dtype, a.dequant, a.device, a.force_splits,
                                   a.stage_chunks, a.split_waves);
  require(plan.m_tiles <= 65535, "M is too large for one launch (split the batch)");
  require(plan.splits == 1 || (a.workspace && a.workspace_floats >= plan.workspace_floats() && a.counters &&
                               a.n_counters >= plan.counters()),
          "split-K scratch is missing or too small");
  TcParams p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.codes = static_cast<const uint4*>(a.codes);
  p.scales = static_cast<const uint2*>(a.scales);
  p.lut = static_cast<const uint4*>(a.lut);
  p.y = static_cast<uint16_t*>(a.y);
  p.workspace = a.workspace;
  p.counters = a.counters;
  p.M = a.M;
  p.N = a.N;
  p.K_pad = s.K_pad;
  p.n_tiles = s.n_tiles;
  p.k_chunks = s.k_chunks;
  p.n_groups_pad = s.n_groups_pad;
  p.splits = plan.splits;
  p.chunks_per_split = plan.chunks_per_split;
  p.log2_group = s.log2_group;
  p.arith_neg2 = a.arith_neg2;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.m_tiles));
  const TcKernel kernel = kernel_instance(a.dtype == 2, a.dequant, plan.mt, a.stage_chunks);
  kernel<<<grid, kWarps * kWarpSize, 0, stream>>>(p);
  check_launch("gemm_tc");
}

void gemm_tc_dequant(const TcDequantArgs& a) {
  require(a.dtype == 1 || a.dtype == 2, "dtype must be float16 or bfloat16");
  require(a.dequant >= 0 && a.dequant <= 2, "unknown dequantizer");
  require(a.N >= 1 && a.K >= 1, "N and K must be >= 1");
  require(tc_log2_group(a.group_size) >= 0, "group size must be a power of two >= 16");
  require(a.codes && a.scales && a.w && (a.lut || a.dequant == 0), "null pointer");
  require(aligned(a.codes, 16) && aligned(a.scales, 8) && aligned(a.w, 16) && (!a.lut || aligned(a.lut, 16)),
          "misaligned operand (codes, lut and w need 16 bytes, scales 8)");
  DeviceScope scope(a.device);
  const TcShape s = tc_shape(a.N, a.K, a.group_size);
  DequantParams p;
  p.codes = static_cast<const uint4*>(a.codes);
  p.scales = static_cast<const uint2*>(a.scales);
  p.lut = static_cast<const uint4*>(a.lut);
  p.w = static_cast<uint16_t*>(a.w);
  p.N = a.N;
  p.K_pad = s.K_pad;
  p.n_tiles = s.n_tiles;
  p.k_chunks = s.k_chunks;
  p.n_groups_pad = s.n_groups_pad;
  p.log2_group = s.log2_group;
  p.arith_neg2 = a.arith_neg2;
  const int64_t blocks = (s.n_tiles * s.k_chunks + kWarps - 1) / kWarps;
  require(blocks <= 0x7fffffff, "weight is too large for one launch");
  using DequantKernel = void (*)(const DequantParams);
  DequantKernel kernel;
  if (a.dtype == 2) {
    kernel = a.dequant == 0 ? &dequant_tc_kernel<true, 0> : &dequant_tc_kernel<true, 1>;
  } else {
    kernel = a.dequant == 0 ? &dequant_tc_kernel<false, 0> : &dequant_tc_kernel<false, 1>;
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  kernel<<<static_cast<unsigned>(blocks), kWarps * kWarpSize, 0, stream>>>(p);
  check_launch("gemm_tc_dequant");
}

}  // namespace cuda
}  // namespace any4
