// Decodes rows of a quantized weight (the gemm operands, SPEC §1 / §4) to floats:
//   w[n - n0, k] = round_to(w_dtype, fma(lut[n', code[n, k]], scale[n, g], zero[n, g])),  n in [n0, n1)
// the value every CPU gemm kernel multiplies by (fp32, one fused multiply-add), rounded once to
// w_dtype. For prefill (large batches), any4.gemm decodes the weight in bounded row panels with
// this and multiplies each panel with the framework's dense matmul (python/any4/prefill.py), so
// that no full float copy of a large weight is ever made. Runs on the CPU thread pool.
#pragma once

#include <cstdint>

#include "common.h"
#include "gemm_cpu.h"

namespace any4 {

// Rows [n0, n1) of the weight described by a (x, M and y are ignored) into w [n1 - n0, K],
// row-major, dtype w_dtype. impl: Auto (AVX2 lookups where the processor has them and the group
// size is even, else portable), Portable, or Avx2 (std::invalid_argument where unsupported).
// Both give identical values. Throws std::invalid_argument for bad operands or row ranges.
void dequantize_rows(const GemmArgs& a, int64_t n0, int64_t n1, void* w, DType w_dtype,
                     CpuImpl impl = CpuImpl::Auto);

}  // namespace any4
