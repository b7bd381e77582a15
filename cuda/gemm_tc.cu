// Tensor-core gemm for 4-, 3- and 2-bit weights (tinygemm-style, batch 1-16): y = x @ dequant(W)^T.
//
// Layout (details and the per-lane index math in layout.cuh, shared with the CPU emulation):
// the weight was repacked once into mma.m16n8k16 A-fragment order, 16 rows x 64 k per 512
// contiguous bytes, one 16-byte vector per lane; k is permuted inside each 64-chunk so that each
// lane's B fragments (activations) for the chunk's four k-tiles are 32 contiguous bytes of one
// row of x. Nothing goes through shared memory except, for the LutSmem dequantizer, the table.
// 3- and 2-bit codes are stored densely (layout.cuh: a 16-byte vector per lane covers two
// chunks; 3-bit adds an 8-byte high-bit plane) and decoded with 2-4 logic ops per k-tile into the
// 4-bit word, so the three dequantizers are shared by every width; the register table of 8- and
// 4-entry tables takes half the byte permutes.
//
// Work decomposition:
//   block  = kWarps (4) warps; warp w owns the 16-row tile 4 * blockIdx.x + w of W for one K
//            range (blockIdx.y, split-K) and one tile of 8 * MT rows of x (blockIdx.z).
//   warp   : for every 64-k chunk of its range, per lane: one 16-byte load of codes (3/2-bit:
//            one per two chunks, 3-bit also one 8-byte hi-plane load), two 16-byte loads of x
//            per B tile, one 8-byte load of (scale, zero) for rows g and g + 8; then
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
//
// The kernels (templates over code width, dtype, dequantizer, MT and stage depth) are in
// gemm_tc_kernel.cuh, instantiated per code width in gemm_tc_bits{4,3,2}.cu; this file is the
// host side: plan, occupancy, checks and launch.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>

#include "api.h"
#include "gemm_tc_kernel.cuh"
#include "launch.cuh"
#include "layout.cuh"

namespace any4 {
namespace cuda {

using namespace gpu;

namespace {

const TcKernelTable& kernel_table(int bits) {
  return bits == 4 ? tc_kernels_bits4() : bits == 3 ? tc_kernels_bits3() : tc_kernels_bits2();
}

// The kernel instance for (code width, dtype, dequantizer, MT, stage depth).
TcKernel kernel_instance(int bits, bool bf16, int dq, int mt, int sc) {
  return kernel_table(bits).gemm[bf16 ? 1 : 0][dq][mt - 1][sc == kMaxStageChunks ? 1 : 0];
}

// Resident blocks per multiprocessor of a kernel instance (cached per device).
int blocks_per_sm(int device, int bits, bool bf16, int dq, int mt, int sc) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, bool, int, int, int>, int> cache;
  const auto key = std::make_tuple(device, bits, bf16, dq, mt, sc);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  const void* fn = reinterpret_cast<const void*>(kernel_instance(bits, bf16, dq, mt, sc));
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
                    int stage_chunks, int split_waves, int bits) {
  require(M >= 1 && N >= 1 && K >= 1, "M, N and K must be >= 1");
  require(valid_code_bits(bits), "code width must be 2, 3 or 4 bits");
  require(dtype == 1 || dtype == 2, "dtype must be float16 or bfloat16");
  require(dequant >= 0 && dequant <= 2, "unknown dequantizer");
  require(valid_stage_chunks(stage_chunks), "stage_chunks must be 2 or 4");
  require(split_waves >= 1 && split_waves <= kMaxSplitWaves, "split_waves must be 1 or 2");
  const TcShape s = tc_shape(N, K, 16);
  const int mt = M <= 8 ? 1 : 2;
  DeviceScope scope(device);
  return make_tc_plan(M, s.n_tiles, s.k_chunks, num_sms(device),
                      blocks_per_sm(device, bits, dtype == 2, dequant, mt, stage_chunks), force_splits,
                      split_waves, chunks_per_unit(bits));
}

TcScratchBound gemm_tc_scratch_bound(int device) {
  DeviceScope scope(device);
  int most = 1;
  for (int bits = 2; bits <= 4; ++bits)
    for (int bf16 = 0; bf16 < 2; ++bf16)
      for (int dq = 0; dq < 3; ++dq)
        for (int mt = 1; mt <= 2; ++mt)
          for (int sc : {kStageChunks, kMaxStageChunks}) {
            const int n = blocks_per_sm(device, bits, bf16 == 1, dq, mt, sc);
            if (n > most) most = n;
          }
  TcScratchBound b;
  b.workspace_floats = tc_workspace_floats_bound(num_sms(device), most);
  b.counters = tc_counters_bound(num_sms(device), most);
  return b;
}

void gemm_tc(const TcGemmArgs& a) {
  require(a.dtype == 1 || a.dtype == 2, "dtype must be float16 or bfloat16");
  require(valid_code_bits(a.bits), "code width must be 2, 3 or 4 bits");
  require(a.dequant >= 0 && a.dequant <= 2, "unknown dequantizer");
  require(tc_log2_group(a.group_size) >= 0, "group size must be a power of two >= 16");
  require(a.x && a.codes && a.scales && a.y && (a.lut || a.dequant == 0), "null pointer");
  require(aligned(a.x, 16) && aligned(a.codes, 16) && aligned(a.scales, 8) && (!a.lut || aligned(a.lut, 16)),
          "misaligned operand (x, codes and lut need 16 bytes, scales 8)");
  if (a.M == 0) return;
  DeviceScope scope(a.device);
  const TcShape s = tc_shape(a.N, a.K, a.group_size, a.bits);
  const TcPlan plan = gemm_tc_plan(a.M, a.N, a.K, a.dtype, a.dequant, a.device, a.force_splits,
                                   a.stage_chunks, a.split_waves, a.bits);
  require(plan.m_tiles <= 65535, "M is too large for one launch (split the batch)");
  require(plan.splits == 1 || (a.workspace && a.workspace_floats >= plan.workspace_floats() && a.counters &&
                               a.n_counters >= plan.counters()),
          "split-K scratch is missing or too small");
  TcParams p;
  p.x = static_cast<const uint16_t*>(a.x);
  p.codes = static_cast<const uint8_t*>(a.codes);
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
  p.n_units = s.n_units;
  p.n_groups_pad = s.n_groups_pad;
  p.splits = plan.splits;
  p.chunks_per_split = plan.chunks_per_split;
  p.log2_group = s.log2_group;
  p.arith_neg2 = a.arith_neg2;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const dim3 grid(static_cast<unsigned>(plan.grid_x), static_cast<unsigned>(plan.splits),
                  static_cast<unsigned>(plan.m_tiles));
  const TcKernel kernel = kernel_instance(a.bits, a.dtype == 2, a.dequant, plan.mt, a.stage_chunks);
  kernel<<<grid, kWarps * kWarpSize, 0, stream>>>(p);
  check_launch("gemm_tc");
}

void gemm_tc_dequant(const TcDequantArgs& a) {
  require(a.dtype == 1 || a.dtype == 2, "dtype must be float16 or bfloat16");
  require(valid_code_bits(a.bits), "code width must be 2, 3 or 4 bits");
  require(a.dequant >= 0 && a.dequant <= 2, "unknown dequantizer");
  require(a.N >= 1 && a.K >= 1, "N and K must be >= 1");
  require(tc_log2_group(a.group_size) >= 0, "group size must be a power of two >= 16");
  require(a.codes && a.scales && a.w && (a.lut || a.dequant == 0), "null pointer");
  require(aligned(a.codes, 16) && aligned(a.scales, 8) && aligned(a.w, 16) && (!a.lut || aligned(a.lut, 16)),
          "misaligned operand (codes, lut and w need 16 bytes, scales 8)");
  DeviceScope scope(a.device);
  const TcShape s = tc_shape(a.N, a.K, a.group_size, a.bits);
  DequantParams p;
  p.codes = static_cast<const uint8_t*>(a.codes);
  p.scales = static_cast<const uint2*>(a.scales);
  p.lut = static_cast<const uint4*>(a.lut);
  p.w = static_cast<uint16_t*>(a.w);
  p.N = a.N;
  p.K_pad = s.K_pad;
  p.n_tiles = s.n_tiles;
  p.k_chunks = s.k_chunks;
  p.n_units = s.n_units;
  p.n_groups_pad = s.n_groups_pad;
  p.log2_group = s.log2_group;
  p.arith_neg2 = a.arith_neg2;
  const int64_t blocks = (s.n_tiles * s.k_chunks + kWarps - 1) / kWarps;
  require(blocks <= 0x7fffffff, "weight is too large for one launch");
  const DequantKernel kernel = kernel_table(a.bits).dequant[a.dtype == 2 ? 1 : 0][a.dequant];
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  kernel<<<static_cast<unsigned>(blocks), kWarps * kWarpSize, 0, stream>>>(p);
  check_launch("gemm_tc_dequant");
}

}  // namespace cuda
}  // namespace any4
