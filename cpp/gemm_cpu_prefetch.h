// Software prefetch of a weight tile's packed codes for the ISA kernels (gemm_cpu_avx2.cpp,
// gemm_cpu_avx512.cpp, gemm_cpu_avx512bf16.cpp).
//
// At batch 1-4 the kernels are bound by how fast the codes arrive from memory. A tile is
// kRows consecutive weight rows, so its codes are one contiguous run of kRows *
// ceil(bits * K / 8) bytes. While a kernel works through the current tile, advance(b) is called as it reaches
// byte b of the tile's rows; the prefetcher then requests the same fraction of the next tile
// (kPrefetchTilesAhead), one cache line after another from its start. Each thread so presents the memory
// system with a single sequential stream (rather than kRows interleaved ones, one per row),
// which on the 2-core CI machine reads a few per cent faster with two threads and never
// slower; the hardware prefetcher alone keeps too few misses in flight.
//
// The struct sits in an unnamed namespace on purpose: every kernel file, compiled with its own
// ISA flags, gets a private copy (see gemm_cpu_kernel.h on why nothing may be shared between
// them). The prefetch is inline asm because GCC deletes loops made only of _mm_prefetch.
#pragma once

#include <cstdint>

#include "gemm_cpu.h"

namespace any4 {
namespace gemm_detail {
namespace {

// How far ahead, in tiles, the codes are prefetched. One tile (8 KiB at K = 4096) measured 2-3%
// faster than two or four with two threads on the CI machine (bench/gemm_cpu_vs_torch.py).
constexpr int64_t kPrefetchTilesAhead = 1;

template <int64_t kRows>
struct TilePrefetcher {
  const uint8_t* base = nullptr;
  int64_t total = 0;  // code bytes of the tile being prefetched (0: nothing to do)
  int64_t next = 0;   // next byte offset to prefetch

  // The kernel starts tile `current`: target the tile kPrefetchTilesAhead after it (its weight
  // rows clipped to N; nothing past the last tile).
  void start(const GemmArgs& a, int64_t current) {
    next = total = 0;
    const int64_t n0 = (current + kPrefetchTilesAhead) * kRows;
    if (n0 >= a.N) return;
    const int64_t row_bytes = (a.K * a.bits + 7) / 8;
    const int64_t rows = a.N - n0 < kRows ? a.N - n0 : kRows;
    base = a.packed + n0 * row_bytes;
    total = rows * row_bytes;
  }

  // The current tile has reached byte b of its rows: prefetch up to the same fraction of the
  // target tile (kRows * b of its bytes).
  void advance(int64_t b) {
    const int64_t limit = b * kRows < total ? b * kRows : total;
    for (; next < limit; next += 64) asm volatile("prefetcht0 %0" : : "m"(base[next]));
  }
};

}  // namespace
}  // namespace gemm_detail
}  // namespace any4
