// CPU emulation of the tensor-core gemm kernel (cuda/gemm_tc.cu): runs every lane of every warp
// of the kernel's grid over the GPU-packed weight with the kernel's own index math and
// dequantization (cuda/layout.cuh), and executes each mma.m16n8k16 from the PTX ISA fragment
// layouts. It exists to test the layout without a GPU; it is slow.
#pragma once

#include <cstdint>

#include "common.h"

namespace any4 {

struct EmulateGpuArgs {
  const uint16_t* x = nullptr;  // [M, K] bf16 / fp16 bit patterns (row-major)
  DType dtype = DType::BF16;    // of x, y and the packed tables
  int64_t M = 0, K = 0, N = 0, group_size = 0;
  const uint8_t* codes = nullptr;    // GPU layout (pack_gpu.h)
  const uint16_t* scales = nullptr;  // GPU layout
  const uint8_t* lut = nullptr;      // GPU layout
  int dequant = 1;                   // gpu::Dequant: 0 Arith, 1 LutReg, 2 LutSmem
  uint32_t arith_neg2 = 0;           // Arith constant (gpu_arith_constant)
  int num_sms = 108;                 // multiprocessors assumed by the grid plan (split-K choice)
  int blocks_per_sm = 4;             // resident blocks per multiprocessor assumed by the plan
  int64_t force_splits = 0;          // > 0: use this many K splits
  int split_waves = 2;               // waves the split-K plan may fill (gpu::make_tc_plan)
  int stage_chunks = 2;              // chunks per pipeline stage: 2 or 4 (the kernel variants)
  int bits = 4;                      // code width of the GPU layout: 4, 3 or 2
  uint16_t* y = nullptr;             // [M, N] bf16 / fp16
};

void emulate_gpu_gemm(const EmulateGpuArgs& args);

// CPU emulation of the dequantize kernel of the M > 64 path (cuda/gemm_tc.cu, dequant_tc_kernel):
// every lane of every (16-row tile, 64-k chunk) warp dequantizes its codes with the gemm's own
// dequantizer and stores them at the positions given by layout.cuh (dequant_row_half /
// dequant_word). w_out: [N, K_pad] compute-dtype bit patterns (K_pad = 64 * ceil(K / 64); columns
// >= K are padding: code 0 with the last group's scale, not necessarily 0 -- use [:, :K]). Same operands as
// emulate_gpu_gemm (x, M and y unused).
void emulate_gpu_dequant(const EmulateGpuArgs& args, uint16_t* w_out);

}  // namespace any4
