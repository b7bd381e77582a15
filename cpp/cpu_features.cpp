#include "cpu_features.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define ANY4_X86_64_CPUID 1
#endif
#if defined(ANY4_X86_64_CPUID) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ANY4_LINUX_ARCH_PRCTL 1
#endif

namespace any4 {
namespace {

#ifdef ANY4_X86_64_CPUID
// XCR0: the register state the OS saves and restores (needs OSXSAVE; no -mxsave flag needed).
unsigned long long xcr0() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;  // OSXSAVE
  unsigned lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux (5.16+) hands out the AMX tile data state only on request; without it the first tile
// instruction kills the process with SIGILL.
bool request_amx_tile_data() {
#ifdef ANY4_LINUX_ARCH_PRCTL
  constexpr long kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  f.avx512 = f.avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  f.avx512bf16 = f.avx512 && __builtin_cpu_supports("avx512bf16");
  unsigned a = 0, b = 0, c = 0, d = 0;
  const unsigned edx7 = __get_cpuid_count(7, 0, &a, &b, &c, &d) ? d : 0;
  const bool amx_tile = edx7 & (1u << 24), amx_bf16 = edx7 & (1u << 22);  // CPUID.(7,0):EDX
  const bool os_tiles = (xcr0() & (3ull << 17)) == (3ull << 17);          // XTILECFG, XTILEDATA
  f.amx_bf16 = amx_tile && amx_bf16 && os_tiles && request_amx_tile_data();
  return f;
}
#else
CpuFeatures detect() {
  return {};
}
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace any4
