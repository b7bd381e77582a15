// CPU gemm dispatcher: validates the arguments, picks an implementation by what the processor
// supports (checked at run time, so the library runs everywhere), and drives the ISA kernels
// (gemm_cpu_kernel.h) over the thread pool. This file is compiled without ISA flags.
#include "gemm_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "gemm_cpu_kernel.h"
#include "pack.h"
#include "parallel.h"

namespace any4 {

static void validate(const GemmArgs& a) {
  ANY4_CHECK(a.M >= 0 && a.N >= 1 && a.K >= 1, "gemm: bad sizes");
  ANY4_CHECK(a.x != nullptr || a.M == 0, "gemm: x is null");
  ANY4_CHECK(a.packed && a.lut && a.scales && (a.y || a.M == 0), "gemm: null operand");
  ANY4_CHECK(a.lut_rows == 1 || a.lut_rows == a.N, "gemm: lut must have 1 or N rows");
  ANY4_CHECK(a.bits >= 2 && a.bits <= 4, "gemm: code bits must be 2, 3 or 4");
  ANY4_CHECK(a.lut_len >= 1 && a.lut_len <= (1 << a.bits), "gemm: lut must have 1..2^bits entries per row (" +
                                                               std::to_string(1 << a.bits) + " for " +
                                                               std::to_string(a.bits) + "-bit codes)");
  ANY4_CHECK(a.group_size >= 1 && a.n_groups == ceil_div(a.K, a.group_size),
             "gemm: scales do not match K / group_size");
}

// ---------------------------------------------------------------- portable reference path
// Decode one weight row to fp32 once, reuse it for all M rows of x.
static void gemm_portable(const GemmArgs& a) {
  const int64_t M = a.M, K = a.K, N = a.N, P = packed_cols(K, a.bits);
  std::vector<float> xf(static_cast<size_t>(M * K));
  for (int64_t i = 0; i < M * K; ++i) xf[i] = load_as_f32(a.x, a.x_dtype, i);
  parallel_for(N, 8, [&](int64_t b, int64_t e) {
    std::vector<float> wrow(K);
    float t[16];
    for (int64_t n = b; n < e; ++n) {
      int64_t lr = a.lut_rows == 1 ? 0 : n;
      for (int j = 0; j < 16; ++j)
        t[j] = j < a.lut_len ? load_as_f32(a.lut, a.table_dtype, lr * a.lut_len + j) : 0.f;
      const uint8_t* pr = a.packed + n * P;
      for (int64_t g = 0; g < a.n_groups; ++g) {
        float s = load_as_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2);
        float z = load_as_f32(a.scales, a.table_dtype, (n * a.n_groups + g) * 2 + 1);
        int64_t k1 = std::min(K, (g + 1) * a.group_size);
        for (int64_t k = g * a.group_size; k < k1; ++k)
          wrow[k] = std::fma(t[unpack_code(pr, P, k, a.bits)], s, z);
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xf.data() + m * K;
        // Four partial sums: independent chains the compiler can schedule (and vectorize).
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        int64_t k = 0;
        for (; k + 4 <= K; k += 4)
          for (int j = 0; j < 4; ++j) acc[j] += xr[k + j] * wrow[k + j];
        for (; k < K; ++k) acc[0] += xr[k] * wrow[k];
        store_from_f32(a.y, a.x_dtype, m * N + n, (acc[0] + acc[1]) + (acc[2] + acc[3]));
      }
    }
  });
}

// ---------------------------------------------------------------- ISA kernels
namespace {

#ifdef ANY4_X86_KERNELS

// 64-byte aligned growable buffer; one per (thread, slot), kept for the thread's lifetime.
// (malloc + manual alignment: std::aligned_alloc is missing from some C runtimes.)
class AlignedBuffer {
 public:
  ~AlignedBuffer() { std::free(raw_); }
  void* get(size_t bytes) {
    if (bytes > cap_) {
      std::free(raw_);
      cap_ = 0;
      bytes = (bytes + 4095) / 4096 * 4096;  // grow in pages, not per request
      raw_ = std::malloc(bytes + 64);
      if (!raw_) throw std::bad_alloc();
      cap_ = bytes;
      aligned_ = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(raw_) + 63) & ~uintptr_t{63});
    }
    return aligned_;
  }

 private:
  void* raw_ = nullptr;
  void* aligned_ = nullptr;
  size_t cap_ = 0;
};

// Slot 0: the prepared x rows of the calling thread; slot 1: a worker's tile scratch.
void* thread_scratch(int slot, size_t bytes) {
  thread_local AlignedBuffer buffers[2];
  return buffers[slot].get(bytes);
}

void run_kernel(const gemm_detail::Kernel& k, const GemmArgs& a) {
  const int64_t n_tiles = ceil_div(a.N, k.tile_rows);
  for (int64_t m0 = 0; m0 < a.M; m0 += k.pass_rows) {
    const int64_t mb = std::min(k.pass_rows, a.M - m0);
    void* xbuf = thread_scratch(0, k.x_bytes(a, mb));
    if (mb * a.K >= (1 << 16)) {
      parallel_for(mb, 1, [&](int64_t r0, int64_t r1) { k.prepare_x(a, m0, mb, r0, r1, xbuf); });
    } else {
      k.prepare_x(a, m0, mb, 0, mb, xbuf);
    }
    const size_t scratch = k.scratch_bytes(a, mb);
    // Tiles per chunk: enough work per chunk (about 64K weights x rows) to amortise the call.
    const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, k.tile_rows * a.K * mb));
    parallel_for(n_tiles, grain, [&](int64_t t0, int64_t t1) {
      k.run_tiles(a, m0, mb, xbuf, t0, t1, thread_scratch(1, scratch));
    });
  }
}
#endif

}  // namespace

bool cpu_impl_supported(CpuImpl impl) {
#ifdef ANY4_X86_KERNELS
  const CpuFeatures& f = cpu_features();
  const bool avx2 = f.avx2, avx512 = f.avx512, avx512bf16 = f.avx512bf16;
#else
  const bool avx2 = false, avx512 = false, avx512bf16 = false;
#endif
  switch (impl) {
    case CpuImpl::Auto:
    case CpuImpl::Portable:
      return true;
    case CpuImpl::Avx2:
      return avx2;
    case CpuImpl::Avx512:
      return avx512;
    case CpuImpl::Avx512Bf16:
      return avx512bf16;
  }
  return false;
}

CpuImpl best_cpu_impl() {
  if (cpu_impl_supported(CpuImpl::Avx512Bf16)) return CpuImpl::Avx512Bf16;
  if (cpu_impl_supported(CpuImpl::Avx512)) return CpuImpl::Avx512;
  if (cpu_impl_supported(CpuImpl::Avx2)) return CpuImpl::Avx2;
  return CpuImpl::Portable;
}

void gemm_cpu(const GemmArgs& a, CpuImpl impl) {
  validate(a);
  if (impl == CpuImpl::Auto) impl = best_cpu_impl();
  ANY4_CHECK(cpu_impl_supported(impl), "gemm: requested CPU implementation is not supported here");
  if (a.M == 0) return;
  // The vector kernels assume groups of whole 8-element runs (SPEC: group sizes are multiples
  // of 8); anything else is still computed, by the portable path.
  if (a.group_size % 8 != 0 && a.n_groups > 1) impl = CpuImpl::Portable;
  // 3- and 2-bit codes decode in blocks of 32: smaller groups that do not divide into them
  // (8, 16, 24) take the portable path; the AVX-512 levels run the AVX2 kernel (gemm_cpu.h).
  if (a.bits != 4 && a.n_groups > 1 && a.group_size % 32 != 0 && a.group_size < 32) impl = CpuImpl::Portable;
  if (a.bits != 4 && impl != CpuImpl::Portable) impl = CpuImpl::Avx2;
#ifdef ANY4_X86_KERNELS
  switch (impl) {
    case CpuImpl::Avx512Bf16:
      // The bf16 dot-product kernel needs bf16 x, bf16 tables and groups of 32 or whole 64-element
      // blocks; everything else takes the float32 AVX-512 kernel.
      if (a.x_dtype == DType::BF16 && a.table_dtype == DType::BF16 &&
          (a.group_size % 64 == 0 || a.group_size == 32)) {
        run_kernel(gemm_detail::avx512bf16_kernel(), a);
        return;
      }
      run_kernel(gemm_detail::avx512_kernel(), a);
      return;
    case CpuImpl::Avx512:
      run_kernel(gemm_detail::avx512_kernel(), a);
      return;
    case CpuImpl::Avx2:
      run_kernel(gemm_detail::avx2_kernel(), a);
      return;
    default:
      break;
  }
#endif
  gemm_portable(a);
}

}  // namespace any4
