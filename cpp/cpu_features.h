// What the processor (and the operating system) let this process run, checked at run time.
// The dispatchers (gemm_cpu.cpp) use it to pick kernels; the Python layer reports it
// (any4.build_info()["cpu_features"]) and benchmarks print it next to every result.
#pragma once

namespace any4 {

struct CpuFeatures {
  bool avx2 = false;        // AVX2 + FMA
  bool avx512 = false;      // AVX-512 F, BW, VL, DQ (+ AVX2, FMA)
  bool avx512bf16 = false;  // avx512 + AVX512-BF16 (vdpbf16ps)
  // AMX-TILE + AMX-BF16 reported by cpuid, tile state enabled by the OS (XCR0 bits 17-18), and
  // Linux's permission to use the tile data granted to this process (arch_prctl
  // ARCH_REQ_XCOMP_PERM, requested once, on the first call). False everywhere else.
  bool amx_bf16 = false;
};

// Computed once (thread-safe) and cached.
const CpuFeatures& cpu_features();

}  // namespace any4
