// Host-side entry points of the CUDA kernels (built only when nvcc is found; see CMakeLists.txt).
// Nothing here includes pybind11, torch or the CUDA headers: raw device pointers and a stream
// handle (cudaStream_t as an integer) in, errors as C++ exceptions.
#pragma once

#include <cstdint>
#include <string>

#include "layout.cuh"

namespace any4 {
namespace cuda {

// Number of visible CUDA devices; 0 when there is no driver or no device (never throws).
int device_count();

// Throws std::runtime_error with a clear message unless `device` exists and is sm_80 or newer.
void check_device(int device);

// "major.minor" compute capability of a device.
std::string device_capability(int device);

// Multiprocessor count of a device (cached).
int num_sms(int device);

// ---- tensor-core gemm on the GPU layout (cuda/layout.cuh, cpp/pack_gpu.h) ----
struct TcGemmArgs {
  const void* x = nullptr;  // [M, K_pad] bf16 / fp16, zero-padded to K_pad, 16-byte aligned
  int dtype = 2;            // DType code of x, y and the packed tables: 1 fp16, 2 bf16
  int64_t M = 0, N = 0, K = 0, group_size = 0;
  const void* codes = nullptr;   // GPU layout, 16-byte aligned
  const void* scales = nullptr;  // GPU layout, 8-byte aligned
  const void* lut = nullptr;     // GPU layout, 16-byte aligned (unused by Arith)
  int dequant = 1;               // gpu::Dequant
  uint32_t arith_neg2 = 0;       // Arith constant (cpp/pack_gpu.h gpu_arith_constant)
  void* y = nullptr;             // [M, N], x's dtype
  float* workspace = nullptr;    // >= plan.workspace_floats() floats when splits > 1
  int64_t workspace_floats = 0;
  int* counters = nullptr;  // >= plan.counters() ints, zero before the first use (kept zero after)
  int64_t n_counters = 0;
  int64_t force_splits = 0;                   // > 0: this many K splits (tests)
  int stage_chunks = gpu::kStageChunks;       // chunks per pipeline stage: 2 (default) or 4
  int split_waves = gpu::kDefaultSplitWaves;  // waves the automatic split-K plan may fill: 1 or 2
  int bits = 4;                               // code width of the GPU layout: 4, 3 or 2
  int device = 0;
  uintptr_t stream = 0;  // cudaStream_t
};

// The grid plan (split-K, scratch sizes) gemm_tc will use on this device for this kernel
// (code width, dtype, dequantizer, rows per mma and stage depth decide the kernel, whose
// occupancy sizes the grid; 3/2-bit splits start on even chunks).
gpu::TcPlan gemm_tc_plan(int64_t M, int64_t N, int64_t K, int dtype, int dequant, int device,
                         int64_t force_splits, int stage_chunks = gpu::kStageChunks,
                         int split_waves = gpu::kDefaultSplitWaves, int bits = 4);

// Split-K scratch that covers every automatic plan on this device (any shape, any kernel
// instance; see gpu::tc_workspace_floats_bound): allocate it once per stream and reuse it.
struct TcScratchBound {
  int64_t workspace_floats = 0;
  int64_t counters = 0;
};
TcScratchBound gemm_tc_scratch_bound(int device);

// y = x @ dequant(W)^T with mma.sync m16n8k16, fp32 accumulation; asynchronous on `stream`.
void gemm_tc(const TcGemmArgs& args);

// W [N, K_pad] (compute dtype, K_pad = 64 * ceil(K / 64); columns >= K are padding, not necessarily
// 0: multiply with x zero-padded or use the first K columns) dequantized from the
// GPU layout, for the large-batch path (dense matmul on W); asynchronous on `stream`. Table
// formats use the register table (every dequantizer gives the same values).
struct TcDequantArgs {
  int dtype = 2;  // 1 fp16, 2 bf16
  int64_t N = 0, K = 0, group_size = 0;
  const void* codes = nullptr;   // GPU layout, 16-byte aligned
  const void* scales = nullptr;  // 8-byte aligned
  const void* lut = nullptr;     // 16-byte aligned (unused by Arith)
  int dequant = 1;               // gpu::Dequant (LutSmem runs as LutReg)
  uint32_t arith_neg2 = 0;
  int bits = 4;       // code width of the GPU layout: 4, 3 or 2
  void* w = nullptr;  // [N, K_pad], 16-byte aligned
  int device = 0;
  uintptr_t stream = 0;
};
void gemm_tc_dequant(const TcDequantArgs& args);

// ---- fallback gemm on the storage layout (any dtype, any group size, no tensor cores) ----
struct SimtGemmArgs {
  const void* x = nullptr;  // [M, K] contiguous
  int x_dtype = 0;          // DType code: 0 fp32, 1 fp16, 2 bf16 (y has it too)
  int64_t M = 0, K = 0, N = 0;
  const uint8_t* packed = nullptr;  // [N, ceil(K/2)]
  const void* lut = nullptr;        // [lut_rows, lut_len]
  int64_t lut_rows = 1, lut_len = 16;
  const void* scales = nullptr;  // [N, n_groups, 2]
  int64_t n_groups = 0, group_size = 0;
  int table_dtype = 0;
  void* y = nullptr;  // [M, N]
  int device = 0;
  uintptr_t stream = 0;
};

void gemm_simt(const SimtGemmArgs& args);

}  // namespace cuda
}  // namespace any4
