// Self-check of the CUDA kernels without Python, torch or CMake: the fallback of
// bench/gpu_check.sh when the Python build fails. Compiled by nvcc alone:
//
//   nvcc -std=c++17 -O2 -arch=sm_90 -Icpp -Icuda -o gpu_selfcheck bench/gpu_selfcheck.cpp
//        cuda/*.cu cpp/pack_gpu.cpp cpp/emulate_gpu.cpp cpp/pack.cpp cpp/parallel.cpp
//
// For every case (4-, 3- and 2-bit codes): random codes, tables and scales are packed into the
// GPU layout of their width on the CPU (cpp/pack_gpu.h); the tensor-core kernel
// (cuda/gemm_tc.cu) runs on the GPU into a NaN-poisoned output and is compared with the CPU
// emulation of the same kernel (cpp/emulate_gpu.h) and with a float64 reference; the
// dequantize kernel of the large-batch path is compared with its emulation. One line per case;
// exit status 0 when every case passes, 1 when one fails, 2 when there is no usable GPU.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "emulate_gpu.h"
#include "layout.cuh"
#include "pack.h"
#include "pack_gpu.h"

namespace {

using any4::DType;

#define CHECK_CUDA(call)                                                                                 \
  do {                                                                                                   \
    cudaError_t e_ = (call);                                                                             \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(e_)); \
  } while (0)

struct Case {
  int64_t M, N, K, G;
  bool bf16;
  int dequant;  // 0 arith (int table), 1 lut_reg, 2 lut_smem (per-row tables)
  int64_t splits;
  int stage_chunks;
  int bits;  // code width: 4, 3 or 2 (stored densely in both layouts)
};

template <class T>
struct DeviceBuffer {
  T* p = nullptr;
  explicit DeviceBuffer(size_t n) { CHECK_CUDA(cudaMalloc(&p, n * sizeof(T) + 16)); }
  ~DeviceBuffer() { cudaFree(p); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

float h16(uint16_t v, bool bf16) {
  return any4::gpu::h16_to_f32(v, bf16);
}

double rel_err(const std::vector<double>& y, const std::vector<double>& ref, bool* finite) {
  double num = 0, den = 0;
  *finite = true;
  for (size_t i = 0; i < y.size(); ++i) {
    if (!std::isfinite(y[i])) *finite = false;
    num += (y[i] - ref[i]) * (y[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  return std::sqrt(num / (den > 0 ? den : 1.0));
}

bool run_case(const Case& c, std::mt19937& rng) {
  const DType dt = c.bf16 ? DType::BF16 : DType::F16;
  const int64_t L = int64_t(1) << c.bits, lut_rows = c.dequant == 0 ? 1 : c.N;
  std::uniform_int_distribution<int> code_dist(0, L - 1);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(0.5f, 1.5f);

  std::vector<uint8_t> codes(c.N * c.K), packed(c.N * any4::packed_cols(c.K, c.bits));
  for (auto& v : codes) v = static_cast<uint8_t>(code_dist(rng));
  any4::pack_codes(codes.data(), c.N, c.K, c.bits, packed.data());
  const int64_t n_groups = (c.K + c.G - 1) / c.G;
  std::vector<uint16_t> lut(lut_rows * L), scales(c.N * n_groups * 2);
  for (int64_t r = 0; r < lut_rows; ++r)
    for (int64_t i = 0; i < L; ++i)
      lut[r * L + i] =
          any4::gpu::f32_to_h16(c.dequant == 0 ? float(i) - float(L - 1) / 2 : normal(rng), c.bf16);
  for (int64_t i = 0; i < c.N * n_groups; ++i) {
    scales[2 * i] = any4::gpu::f32_to_h16(uni(rng) * 0.1f, c.bf16);
    scales[2 * i + 1] = any4::gpu::f32_to_h16(uni(rng) - 1.f, c.bf16);
  }
  const any4::GpuPackSizes sz = any4::gpu_pack_sizes(c.N, c.K, c.G, c.bits);
  std::vector<uint8_t> g_codes(sz.code_bytes), g_lut(sz.lut_bytes);
  std::vector<uint16_t> g_scales(sz.scale_elems);
  any4::pack_for_gpu(packed.data(), c.bits, c.N, c.K, lut.data(), lut_rows, L, scales.data(), n_groups, c.G,
                     dt, dt, c.bits, g_codes.data(), g_scales.data(), g_lut.data());
  const int64_t neg2 = any4::gpu_arith_constant(lut.data(), lut_rows, L, dt, dt);
  if (c.dequant == 0 && neg2 < 0) throw std::runtime_error("int table not recognised as arithmetic");

  std::vector<uint16_t> x(c.M * c.K), x_pad(c.M * sz.K_pad, 0);
  for (auto& v : x) v = any4::gpu::f32_to_h16(normal(rng), c.bf16);
  for (int64_t m = 0; m < c.M; ++m) std::memcpy(&x_pad[m * sz.K_pad], &x[m * c.K], c.K * 2);

  // float64 reference from the storage-layout operands
  std::vector<double> ref(c.M * c.N, 0.0);
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t g = k / c.G, r = lut_rows == 1 ? 0 : n;
      const double w =
          double(h16(lut[r * L + codes[n * c.K + k]], c.bf16)) * h16(scales[(n * n_groups + g) * 2], c.bf16) +
          h16(scales[(n * n_groups + g) * 2 + 1], c.bf16);
      for (int64_t m = 0; m < c.M; ++m) ref[m * c.N + n] += double(h16(x[m * c.K + k], c.bf16)) * w;
    }

  // CPU emulation of the kernel
  std::vector<uint16_t> y_emu(c.M * c.N, 0xffff);
  any4::EmulateGpuArgs e;
  e.x = x.data();
  e.dtype = dt;
  e.M = c.M;
  e.K = c.K;
  e.N = c.N;
  e.group_size = c.G;
  e.codes = g_codes.data();
  e.scales = g_scales.data();
  e.lut = g_lut.data();
  e.dequant = c.dequant;
  e.arith_neg2 = static_cast<uint32_t>(neg2 < 0 ? 0 : neg2);
  e.force_splits = c.splits;
  e.stage_chunks = c.stage_chunks;
  e.bits = c.bits;
  e.y = y_emu.data();
  any4::emulate_gpu_gemm(e);

  // GPU
  DeviceBuffer<uint16_t> d_x(x_pad.size()), d_y(y_emu.size()), d_scales(g_scales.size());
  DeviceBuffer<uint8_t> d_codes(g_codes.size()), d_lut(g_lut.size());
  CHECK_CUDA(cudaMemcpy(d_x.p, x_pad.data(), x_pad.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_codes.p, g_codes.data(), g_codes.size(), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_scales.p, g_scales.data(), g_scales.size() * 2, cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemcpy(d_lut.p, g_lut.data(), g_lut.size(), cudaMemcpyHostToDevice));
  CHECK_CUDA(cudaMemset(d_y.p, 0xff, y_emu.size() * 2));  // NaN poison
  const int dtype_code = c.bf16 ? 2 : 1;
  const any4::gpu::TcPlan plan =
      any4::cuda::gemm_tc_plan(c.M, c.N, c.K, dtype_code, c.dequant, 0, c.splits, c.stage_chunks,
                               any4::gpu::kDefaultSplitWaves, c.bits);
  DeviceBuffer<float> d_ws(plan.workspace_floats() + 1);
  DeviceBuffer<int> d_ctr(plan.counters() + 1);
  CHECK_CUDA(cudaMemset(d_ctr.p, 0, (plan.counters() + 1) * sizeof(int)));
  any4::cuda::TcGemmArgs a;
  a.x = d_x.p;
  a.dtype = dtype_code;
  a.M = c.M;
  a.N = c.N;
  a.K = c.K;
  a.group_size = c.G;
  a.codes = d_codes.p;
  a.scales = d_scales.p;
  a.lut = d_lut.p;
  a.dequant = c.dequant;
  a.arith_neg2 = e.arith_neg2;
  a.y = d_y.p;
  a.workspace = d_ws.p;
  a.workspace_floats = plan.workspace_floats() + 1;
  a.counters = d_ctr.p;
  a.n_counters = plan.counters() + 1;
  a.force_splits = c.splits;
  a.stage_chunks = c.stage_chunks;
  a.bits = c.bits;
  any4::cuda::gemm_tc(a);
  CHECK_CUDA(cudaDeviceSynchronize());
  std::vector<uint16_t> y_gpu(y_emu.size());
  CHECK_CUDA(cudaMemcpy(y_gpu.data(), d_y.p, y_gpu.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<int> ctr_after(plan.counters() + 1);
  CHECK_CUDA(cudaMemcpy(ctr_after.data(), d_ctr.p, ctr_after.size() * sizeof(int), cudaMemcpyDeviceToHost));
  bool counters_zero = true;
  for (int v : ctr_after) counters_zero &= v == 0;

  std::vector<double> yg(y_gpu.size()), ye(y_emu.size());
  for (size_t i = 0; i < yg.size(); ++i) {
    yg[i] = h16(y_gpu[i], c.bf16);
    ye[i] = h16(y_emu[i], c.bf16);
  }
  const double tol = c.bf16 ? 1e-2 : 2e-3;
  bool fin_g, fin_e;
  const double err_ref = rel_err(yg, ref, &fin_g), err_emu = rel_err(yg, ye, &fin_e);

  // dequantize kernel (M > 64 path) against its emulation
  std::vector<uint16_t> w_emu(c.N * sz.K_pad), w_gpu(c.N * sz.K_pad);
  any4::emulate_gpu_dequant(e, w_emu.data());
  DeviceBuffer<uint16_t> d_w(w_gpu.size());
  CHECK_CUDA(cudaMemset(d_w.p, 0xff, w_gpu.size() * 2));
  any4::cuda::TcDequantArgs d;
  d.dtype = dtype_code;
  d.N = c.N;
  d.K = c.K;
  d.group_size = c.G;
  d.codes = d_codes.p;
  d.scales = d_scales.p;
  d.lut = d_lut.p;
  d.dequant = c.dequant;
  d.arith_neg2 = e.arith_neg2;
  d.bits = c.bits;
  d.w = d_w.p;
  any4::cuda::gemm_tc_dequant(d);
  CHECK_CUDA(cudaDeviceSynchronize());
  CHECK_CUDA(cudaMemcpy(w_gpu.data(), d_w.p, w_gpu.size() * 2, cudaMemcpyDeviceToHost));
  std::vector<double> wg(w_gpu.size()), we(w_emu.size());
  for (size_t i = 0; i < wg.size(); ++i) {
    wg[i] = h16(w_gpu[i], c.bf16);
    we[i] = h16(w_emu[i], c.bf16);
  }
  bool fin_w;
  const double err_w = rel_err(wg, we, &fin_w);

  const bool ok = fin_g && err_ref < tol && err_emu < tol && counters_zero && fin_w && err_w < tol;
  std::printf(
      "%s %d-bit M=%lld N=%lld K=%lld G=%lld %s dequant=%d splits=%lld(plan %lld) stages=%d: "
      "rel err vs float64 %.2e, vs emulation %.2e, dequant kernel vs emulation %.2e%s\n",
      ok ? "ok " : "BAD", c.bits, (long long)c.M, (long long)c.N, (long long)c.K, (long long)c.G,
      c.bf16 ? "bf16" : "fp16", c.dequant, (long long)c.splits, (long long)plan.splits, c.stage_chunks,
      err_ref, err_emu, err_w, counters_zero ? "" : " (split-K counters not reset)");
  return ok;
}

}  // namespace

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    std::printf("gpu_selfcheck: no CUDA device\n");
    return 2;
  }
  try {
    any4::cuda::check_device(0);
  } catch (const std::exception& ex) {
    std::printf("gpu_selfcheck: %s\n", ex.what());
    return 2;
  }
  std::printf("gpu_selfcheck on %s (sm_%s, %d SMs)\n", "device 0", any4::cuda::device_capability(0).c_str(),
              any4::cuda::num_sms(0));
  const Case cases[] = {
      {1, 64, 4096, 128, true, 1, 0, 2, 4},     // automatic split-K (small N, long K)
      {5, 72, 640, 32, true, 0, 0, 2, 4},       // int4 arith, partly idle last block, G = 32
      {13, 45, 333, 64, false, 2, 3, 2, 4},     // fp16, smem tables, forced splits, odd N and K
      {33, 200, 1000, 128, true, 1, 0, 4, 4},   // several m-tiles, deep pipeline variant
      {16, 4096, 4096, 128, true, 1, 0, 2, 4},  // a production shape
      {8, 64, 8192, 64, false, 0, 0, 4, 4},     // fp16 arith, split-K, deep pipeline
      // 3- and 2-bit dense layouts: odd chunk counts (half-filled last unit), odd forced splits
      // (rounded to whole units), every dequantizer, both depths, a production shape
      {1, 64, 4096, 128, true, 1, 0, 2, 3},
      {13, 45, 333, 64, false, 2, 3, 2, 3},
      {5, 72, 640, 32, true, 0, 5, 4, 3},
      {16, 4096, 4096, 128, true, 1, 0, 2, 2},
      {33, 200, 1000, 128, false, 0, 3, 4, 2},
      {8, 37, 2880, 64, true, 2, 0, 4, 2},
  };
  int bad = 0;
  std::mt19937 rng(20261201);
  for (const Case& c : cases) {
    try {
      if (!run_case(c, rng)) ++bad;
    } catch (const std::exception& ex) {
      std::printf("BAD M=%lld N=%lld K=%lld: %s\n", (long long)c.M, (long long)c.N, (long long)c.K,
                  ex.what());
      ++bad;
    }
  }
  std::printf("gpu_selfcheck: %d of %zu cases failed\n", bad, sizeof(cases) / sizeof(cases[0]));
  return bad ? 1 : 0;
}
