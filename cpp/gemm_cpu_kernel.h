// Interface between the CPU gemm dispatcher (gemm_cpu.cpp) and the instruction-set specific
// kernels (gemm_cpu_avx2.cpp, gemm_cpu_avx512.cpp, gemm_cpu_avx512bf16.cpp).
//
// A kernel computes y = x @ dequant(W)^T in passes over blocks of x rows. For each pass the
// dispatcher asks the kernel to convert the pass's x rows into its own layout (prepare_x, into
// a per-call buffer), then splits the output rows into tiles of `tile_rows` weight rows and
// runs `run_tiles` over ranges of tiles on the thread pool, each worker with its own scratch.
//
// Why this split: the kernel files are compiled with ISA flags (-mavx512f, ...). Anything they
// define that is not unique to them (an inline function from a shared header, a std::function
// or std::vector instantiation) could be emitted there with those instructions and picked by
// the linker for the portable code too, which would then crash on older processors. So the
// kernel files hold only their own functions (internal linkage) and plain loops over raw
// pointers; the thread pool, the allocation and every std:: template live in the dispatcher.
#pragma once

#include <cstddef>
#include <cstdint>

#include "gemm_cpu.h"

namespace any4 {
namespace gemm_detail {

struct Kernel {
  int64_t tile_rows = 4;   // weight rows per tile (the unit of run_tiles)
  int64_t pass_rows = 64;  // largest number of x rows per pass
  // Bytes of the per-call buffer that holds the prepared x rows of one pass of `mb` rows.
  size_t (*x_bytes)(const GemmArgs& a, int64_t mb) = nullptr;
  // Prepare x rows [r0, r1) of the pass that starts at x row m0 (rows of x: m0 + r).
  void (*prepare_x)(const GemmArgs& a, int64_t m0, int64_t mb, int64_t r0, int64_t r1, void* xbuf) = nullptr;
  // Bytes of one worker's scratch for a pass of `mb` rows.
  size_t (*scratch_bytes)(const GemmArgs& a, int64_t mb) = nullptr;
  // y rows [m0, m0 + mb), columns of tiles [t0, t1).
  void (*run_tiles)(const GemmArgs& a, int64_t m0, int64_t mb, const void* xbuf, int64_t t0, int64_t t1,
                    void* scratch) = nullptr;
};

// Each is defined in its ISA file and may only be called when the processor supports that ISA.
Kernel avx2_kernel();
Kernel avx512_kernel();
// AVX512-BF16 dot products; only for bf16 x with bf16 tables and group_size % 32 == 0.
Kernel avx512bf16_kernel();

// Rows [n0 + r0, n0 + r1) of the weight decoded to w (row r - n0 of w [., K], natural element
// order) in w_dtype, as dequantize_rows.h defines; even group sizes only (the prefill panels).
void avx2_dequantize_rows(const GemmArgs& a, int64_t n0, int64_t r0, int64_t r1, void* w, DType w_dtype);

}  // namespace gemm_detail
}  // namespace any4
