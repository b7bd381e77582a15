// Google Benchmark for the CUDA tensor-core gemm (any4::cuda::gemm_tc) and the dequantize
// kernel of the large-batch path, as bench_gemm_cpu is for the CPU kernels.
//
//   cmake -S . -B build/bench -DANY4_BUILD_BENCH=ON -DANY4_BUILD_PYTHON=OFF
//         -DCMAKE_CUDA_ARCHITECTURES=90-real
//   cmake --build build/bench -j && build/bench/bench_gemm_cuda [--benchmark_filter=...]
//
// Shapes N x K from SPEC §7 (Llama-3-8B), batch M in {1, 4, 16}, group size 128, bf16; every
// dequantizer (arith on an int table, lut_reg / lut_smem on per-row tables), both pipeline
// depths (stage_chunks 2 and 4) and both split-K plans (1 or 2 waves) for 4-bit codes; arith
// and lut_reg at both depths for the dense 3- and 2-bit layouts (label "3-bit" / "2-bit"). Weights are random
// bytes in the GPU layout (timing does not depend on the values; correctness: tests/test_gemm_cuda.py,
// bench/gpu_selfcheck.cpp), rotated over copies totalling > 2x the L2 cache so every call reads
// its weight from DRAM. Time per call from CUDA events over a batch of calls (manual time).
// Counter GB/s: weight bytes (codes + scales + tables) plus x and y per second. BM_copy gives
// the device-to-device copy bandwidth (read + write) of this GPU for comparison.
#include <benchmark/benchmark.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "api.h"
#include "layout.cuh"

namespace {

using any4::gpu::TcShape;

constexpr int64_t kGroup = 128;
constexpr int kCallsPerIteration = 20;

#define CHECK_CUDA(call)                                                                                 \
  do {                                                                                                   \
    cudaError_t e_ = (call);                                                                             \
    if (e_ != cudaSuccess) throw std::runtime_error(std::string(#call) + ": " + cudaGetErrorString(e_)); \
  } while (0)

struct DeviceMem {
  void* p = nullptr;
  explicit DeviceMem(size_t bytes) { CHECK_CUDA(cudaMalloc(&p, bytes < 16 ? 16 : bytes)); }
  ~DeviceMem() { cudaFree(p); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
};

void fill_random(void* dev, size_t bytes, uint32_t seed, uint8_t high_byte_mask = 0xff, uint8_t high_or = 0) {
  std::vector<uint8_t> h(bytes);
  std::mt19937 rng(seed);
  for (size_t i = 0; i < bytes; ++i) h[i] = static_cast<uint8_t>(rng());
  if (high_byte_mask != 0xff)  // 16-bit values: keep them finite and O(1)
    for (size_t i = 1; i < bytes; i += 2) h[i] = static_cast<uint8_t>((h[i] & high_byte_mask) | high_or);
  CHECK_CUDA(cudaMemcpy(dev, h.data(), bytes, cudaMemcpyHostToDevice));
}

struct Weight {
  std::unique_ptr<DeviceMem> codes, scales, lut;
};

// Copies of one random GPU-layout weight, x and y, and the split-K scratch of the largest plan.
struct Problem {
  int64_t N, K, M;
  int bits;
  TcShape s;
  std::vector<Weight> copies;
  std::unique_ptr<DeviceMem> x, y, ws, ctr, wd;
  int64_t weight_bytes() const { return s.code_bytes() + s.scale_elems() * 2 + s.lut_bytes(); }
};

Problem& problem(int64_t N, int64_t K, int64_t M, int bits) {
  static std::vector<std::unique_ptr<Problem>> cache;
  for (auto& p : cache)
    if (p->N == N && p->K == K && p->M == M && p->bits == bits) return *p;
  cache.clear();  // one shape's weights at a time
  auto p = std::make_unique<Problem>();
  p->N = N;
  p->K = K;
  p->M = M;
  p->bits = bits;
  p->s = any4::gpu::tc_shape(N, K, kGroup, bits);
  int dev = 0;
  CHECK_CUDA(cudaGetDevice(&dev));
  int l2 = 0;
  CHECK_CUDA(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev));
  const int64_t n_copies =
      std::max<int64_t>(2, (2 * int64_t(l2) + p->weight_bytes() - 1) / p->weight_bytes());
  for (int64_t c = 0; c < n_copies; ++c) {
    Weight w;
    w.codes = std::make_unique<DeviceMem>(p->s.code_bytes());
    w.scales = std::make_unique<DeviceMem>(p->s.scale_elems() * 2);
    w.lut = std::make_unique<DeviceMem>(p->s.lut_bytes());
    fill_random(w.codes->p, p->s.code_bytes(), 1 + c);
    fill_random(w.scales->p, p->s.scale_elems() * 2, 100 + c, 0x3f, 0x20);  // bf16 in ~[2^-63, 2)
    fill_random(w.lut->p, p->s.lut_bytes(), 200 + c);
    p->copies.push_back(std::move(w));
  }
  // lut bytes 16..31 of each row are the high bytes of the 16 entries: keep them O(1)
  for (auto& w : p->copies) {
    std::vector<uint8_t> h(p->s.lut_bytes());
    CHECK_CUDA(cudaMemcpy(h.data(), w.lut->p, h.size(), cudaMemcpyDeviceToHost));
    for (int64_t r = 0; r < p->s.N_pad; ++r)
      for (int i = 16; i < 32; ++i) h[r * 32 + i] = 0x3f;
    CHECK_CUDA(cudaMemcpy(w.lut->p, h.data(), h.size(), cudaMemcpyHostToDevice));
  }
  p->x = std::make_unique<DeviceMem>(M * p->s.K_pad * 2);
  fill_random(p->x->p, M * p->s.K_pad * 2, 7, 0x3f, 0x00);
  p->y = std::make_unique<DeviceMem>(M * N * 2);
  const any4::cuda::TcScratchBound b = any4::cuda::gemm_tc_scratch_bound(dev);
  p->ws = std::make_unique<DeviceMem>(b.workspace_floats * 4);
  p->ctr = std::make_unique<DeviceMem>(b.counters * 4);
  CHECK_CUDA(cudaMemset(p->ctr->p, 0, b.counters * 4));
  p->wd = std::make_unique<DeviceMem>(N * p->s.K_pad * 2);
  cache.push_back(std::move(p));
  return *cache.back();
}

const int64_t kShapes[][2] = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}};
const char* kDequantNames[] = {"arith", "lut_reg", "lut_smem"};

// Times `calls` launches of fn(i) with CUDA events; returns seconds per call.
template <class Fn>
double time_calls(Fn&& fn, int calls) {
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  CHECK_CUDA(cudaEventRecord(start));
  for (int i = 0; i < calls; ++i) fn(i);
  CHECK_CUDA(cudaEventRecord(stop));
  CHECK_CUDA(cudaEventSynchronize(stop));
  float ms = 0;
  CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms * 1e-3 / calls;
}

// Args: shape index, M, dequantizer, stage chunks, split waves, code bits.
void BM_gemm_tc(benchmark::State& state) {
  const int64_t N = kShapes[state.range(0)][0], K = kShapes[state.range(0)][1], M = state.range(1);
  const int dq = static_cast<int>(state.range(2)), sc = static_cast<int>(state.range(3));
  const int waves = static_cast<int>(state.range(4)), bits = static_cast<int>(state.range(5));
  try {
    Problem& p = problem(N, K, M, bits);
    auto call = [&](int i) {
      const Weight& w = p.copies[i % p.copies.size()];
      any4::cuda::TcGemmArgs a;
      a.x = p.x->p;
      a.dtype = 2;
      a.M = M;
      a.N = N;
      a.K = K;
      a.group_size = kGroup;
      a.codes = w.codes->p;
      a.scales = w.scales->p;
      a.lut = w.lut->p;
      a.dequant = dq;
      a.arith_neg2 = 0xc100c100u;  // bf16 (-8, -8): a valid constant; timing does not depend on it
      a.y = p.y->p;
      a.workspace = static_cast<float*>(p.ws->p);
      a.workspace_floats = any4::cuda::gemm_tc_scratch_bound(0).workspace_floats;
      a.counters = static_cast<int*>(p.ctr->p);
      a.n_counters = any4::cuda::gemm_tc_scratch_bound(0).counters;
      a.stage_chunks = sc;
      a.split_waves = waves;
      a.bits = bits;
      any4::cuda::gemm_tc(a);
    };
    time_calls(call, static_cast<int>(p.copies.size()));  // warm-up
    for (auto _ : state) state.SetIterationTime(time_calls(call, kCallsPerIteration));
    CHECK_CUDA(cudaGetLastError());
    const any4::gpu::TcPlan plan = any4::cuda::gemm_tc_plan(M, N, K, 2, dq, 0, 0, sc, waves, bits);
    state.counters["splits"] = static_cast<double>(plan.splits);
    state.counters["GB/s"] = benchmark::Counter(static_cast<double>(p.weight_bytes() + M * K * 2 + M * N * 2),
                                                benchmark::Counter::kIsIterationInvariantRate);
    state.SetLabel(std::to_string(bits) + "-bit " + kDequantNames[dq] + " stages=" + std::to_string(sc) +
                   " waves=" + std::to_string(waves));
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

// The dequantize kernel of the M > 64 path (bytes: weight read + bf16 W written).
void BM_dequant_tc(benchmark::State& state) {
  const int64_t N = kShapes[state.range(0)][0], K = kShapes[state.range(0)][1];
  const int dq = static_cast<int>(state.range(1)), bits = static_cast<int>(state.range(2));
  try {
    Problem& p = problem(N, K, 1, bits);
    auto call = [&](int i) {
      const Weight& w = p.copies[i % p.copies.size()];
      any4::cuda::TcDequantArgs a;
      a.dtype = 2;
      a.N = N;
      a.K = K;
      a.group_size = kGroup;
      a.codes = w.codes->p;
      a.scales = w.scales->p;
      a.lut = w.lut->p;
      a.dequant = dq;
      a.arith_neg2 = 0xc100c100u;
      a.bits = bits;
      a.w = p.wd->p;
      any4::cuda::gemm_tc_dequant(a);
    };
    time_calls(call, static_cast<int>(p.copies.size()));
    for (auto _ : state) state.SetIterationTime(time_calls(call, kCallsPerIteration));
    state.counters["GB/s"] = benchmark::Counter(static_cast<double>(p.weight_bytes() + N * p.s.K_pad * 2),
                                                benchmark::Counter::kIsIterationInvariantRate);
    state.SetLabel(std::to_string(bits) + "-bit " + kDequantNames[dq]);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void BM_copy(benchmark::State& state) {
  const size_t bytes = size_t(1) << 30;
  try {
    DeviceMem a(bytes), b(bytes);
    CHECK_CUDA(cudaMemset(a.p, 1, bytes));
    auto call = [&](int) { CHECK_CUDA(cudaMemcpyAsync(b.p, a.p, bytes, cudaMemcpyDeviceToDevice)); };
    time_calls(call, 2);
    for (auto _ : state) state.SetIterationTime(time_calls(call, 5));
    state.counters["GB/s"] = benchmark::Counter(2.0 * bytes, benchmark::Counter::kIsIterationInvariantRate);
  } catch (const std::exception& e) {
    state.SkipWithError(e.what());
  }
}

void gemm_args(benchmark::internal::Benchmark* b) {
  for (int shape = 0; shape < 4; ++shape)
    for (int M : {1, 4, 16}) {
      for (int dq = 0; dq < 3; ++dq)
        for (int sc : {2, 4})
          for (int waves : {1, 2}) b->Args({shape, M, dq, sc, waves, 4});
      for (int bits : {3, 2})
        for (int dq = 0; dq < 2; ++dq)
          for (int sc : {2, 4}) b->Args({shape, M, dq, sc, 2, bits});
    }
}

BENCHMARK(BM_copy)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_gemm_tc)->Apply(gemm_args)->UseManualTime()->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_dequant_tc)
    ->ArgsProduct({{0, 1, 2, 3}, {0, 1}, {4, 3, 2}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond);

}  // namespace
