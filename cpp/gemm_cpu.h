// CPU matrix product with quantized weights (SPEC §5):
//   y[m, n] = sum_k x[m, k] * (lut[n', code[n, k]] * scale[n, g] + zero[n, g]),  g = k / group_size
// with fp32 accumulation; y has x's dtype. n' = n for per-row tables, 0 for a shared table.
//
// Implementations (gemm_cpu.cpp dispatches, checking the processor at run time):
//   Portable    plain C++ (decode a row to fp32, dot with every x row); the reference path.
//   Avx2        gemm_cpu_avx2.cpp: 8-lane table lookups (vpermps halves + blend; vpshufb on the
//               table's byte planes for bf16 tables), fp32 FMAs.
//   Avx512      gemm_cpu_avx512.cpp: vpermps looks up 16 codes in a 16-entry fp32 table held in one
//               register, fp32 FMAs.
//   Avx512Bf16  gemm_cpu_avx512bf16.cpp: for bf16 x with bf16 tables, vpermw lookups and
//               vdpbf16ps dot products (32 products per instruction, fp32 accumulation).
// All fuse unpacking, lookup and the group affine into the dot products; batches up to 6-8 rows
// decode straight into registers, larger ones through a small L1 buffer reused for all rows of
// x; threads split the output columns (parallel_for). y is fully overwritten. x and y must not
// overlap.
#pragma once

#include <cstdint>

#include "common.h"

namespace any4 {

struct GemmArgs {
  const void* x = nullptr;  // [M, K] row-major, x_dtype
  DType x_dtype = DType::F32;
  int64_t M = 0, K = 0;
  const uint8_t* packed = nullptr;  // [N, ceil(bits*K/8)] packed codes (pack.h)
  int bits = 4;                     // code width: 4, 3 or 2
  int64_t N = 0;
  const void* lut = nullptr;  // [lut_rows, lut_len], table_dtype; lut_rows is 1 or N; lut_len <= 2^bits
  int64_t lut_rows = 1, lut_len = 16;
  const void* scales = nullptr;  // [N, n_groups, 2] (scale, zero), table_dtype
  int64_t n_groups = 0, group_size = 128;
  DType table_dtype = DType::F32;
  void* y = nullptr;  // [M, N] row-major, x_dtype
};

// Which CPU implementation runs: Auto picks the best the processor supports.
// Avx512Bf16 is Avx512 plus AVX512-BF16 dot products for bf16 x with bf16 tables (group size a
// multiple of 32); other operands run the Avx512 kernel. 3- and 2-bit codes have one vector
// kernel, the AVX2 one (its decode is templated on the code width): Avx512 and Avx512Bf16 run it
// for them (every AVX-512 processor has AVX2), and so does Avx2; group sizes 8, 16 and 24 (below
// the 32-code decode block and not a multiple of it) take the portable path.
enum class CpuImpl : int { Auto = -1, Portable = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3 };

// Validates the arguments (std::invalid_argument) and runs the product on the CPU thread pool.
void gemm_cpu(const GemmArgs& args, CpuImpl impl = CpuImpl::Auto);

// Best implementation this processor supports, and whether a given one is supported.
CpuImpl best_cpu_impl();
bool cpu_impl_supported(CpuImpl impl);

}  // namespace any4
