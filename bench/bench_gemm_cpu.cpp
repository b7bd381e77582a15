// Google Benchmark for the CPU gemm kernels (any4::gemm_cpu).
//
//   cmake -S . -B build/bench -DANY4_BUILD_BENCH=ON -DANY4_BUILD_PYTHON=OFF -DANY4_CUDA=OFF
//   cmake --build build/bench -j2 && build/bench/bench_gemm_cpu [--benchmark_filter=...]
//
// Shapes N x K from SPEC §7 (Llama-3-8B), batch M in {1, 4, 16}, group size 128, for every
// implementation this processor supports, bf16 and fp32 activations, per-row tables (any4) and
// a shared table (int4/nf4/fp4 style). Weights rotate over copies totalling > 128 MiB so every
// iteration reads them from memory, as a layer of a real model would. Counter GB/s: bytes of
// weights (packed codes + tables + scales) plus x and y per second. BM_copy gives the memory
// copy bandwidth (read + write bytes per second) of this machine for comparison.
// Threads: ANY4_NUM_THREADS (default: all cores).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common.h"
#include "gemm_cpu.h"
#include "pack.h"

namespace {

using any4::CpuImpl;
using any4::DType;

constexpr int64_t kGroup = 128;
constexpr size_t kRotateBytes = size_t(128) << 20;

struct Weights {
  std::vector<uint8_t> packed;
  std::vector<uint16_t> lut, scales;  // bf16 tables
  std::vector<float> lut32, scales32;
};

// Copies of one quantized weight set, rotated per iteration.
struct Problem {
  int64_t N, K, n_groups, lut_rows;
  std::vector<Weights> copies;
  size_t weight_bytes(DType table) const {
    const size_t es = table == DType::F32 ? 4 : 2;
    return copies[0].packed.size() + (copies[0].lut.size() + copies[0].scales.size()) * es;
  }
};

Problem make_problem(int64_t N, int64_t K, bool per_row_lut) {
  Problem p{N, K, any4::ceil_div(K, kGroup), per_row_lut ? N : 1, {}};
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int> byte(0, 255);
  std::normal_distribution<float> normal(0.f, 1.f);
  const size_t one = static_cast<size_t>(N * any4::packed_cols(K));
  const size_t n_copies = std::max<size_t>(1, (kRotateBytes + one - 1) / one);
  p.copies.resize(n_copies);
  for (auto& w : p.copies) {
    w.packed.resize(one);
    for (auto& b : w.packed) b = static_cast<uint8_t>(byte(rng));
    w.lut32.resize(static_cast<size_t>(p.lut_rows * 16));
    for (int64_t r = 0; r < p.lut_rows; ++r)
      for (int j = 0; j < 16; ++j) w.lut32[r * 16 + j] = static_cast<float>(j) - 7.5f + 0.1f * normal(rng);
    w.scales32.resize(static_cast<size_t>(N * p.n_groups * 2));
    for (size_t i = 0; i < w.scales32.size(); ++i)
      w.scales32[i] = i % 2 == 0 ? 0.01f * (1.f + 0.1f * normal(rng)) : 0.01f * normal(rng);
    for (float v : w.lut32) w.lut.push_back(any4::f32_to_bf16(v));
    for (float v : w.scales32) w.scales.push_back(any4::f32_to_bf16(v));
  }
  return p;
}

const Problem& problem(int64_t N, int64_t K, bool per_row_lut) {
  static std::vector<std::unique_ptr<Problem>> cache;  // the largest few hundred MiB: keep one
  for (auto& p : cache)
    if (p->N == N && p->K == K && (p->lut_rows == N) == per_row_lut) return *p;
  cache.clear();
  cache.push_back(std::make_unique<Problem>(make_problem(N, K, per_row_lut)));
  return *cache.back();
}

void BM_gemm(benchmark::State& state, CpuImpl impl, DType x_dtype, bool per_row_lut) {
  const int64_t N = state.range(0), K = state.range(1), M = state.range(2);
  if (!any4::cpu_impl_supported(impl)) {
    state.SkipWithError("implementation not supported on this processor");
    return;
  }
  const Problem& p = problem(N, K, per_row_lut);
  // bf16 activations use bf16 tables, fp32 activations fp32 tables (what any4.quantize gives).
  const DType table = x_dtype == DType::F32 ? DType::F32 : DType::BF16;
  const size_t xs = x_dtype == DType::F32 ? 4 : 2;
  std::vector<uint8_t> x(static_cast<size_t>(M * K) * xs), y(static_cast<size_t>(M * N) * xs);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (int64_t i = 0; i < M * K; ++i) any4::store_from_f32(x.data(), x_dtype, i, normal(rng));
  size_t it = 0;
  for (auto _ : state) {
    const Weights& w = p.copies[it++ % p.copies.size()];
    any4::GemmArgs a;
    a.x = x.data();
    a.x_dtype = x_dtype;
    a.M = M;
    a.K = K;
    a.packed = w.packed.data();
    a.N = N;
    a.lut = table == DType::F32 ? static_cast<const void*>(w.lut32.data()) : w.lut.data();
    a.lut_rows = p.lut_rows;
    a.lut_len = 16;
    a.scales = table == DType::F32 ? static_cast<const void*>(w.scales32.data()) : w.scales.data();
    a.n_groups = p.n_groups;
    a.group_size = kGroup;
    a.table_dtype = table;
    a.y = y.data();
    any4::gemm_cpu(a, impl);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  const double bytes = static_cast<double>(p.weight_bytes(table) + x.size() + y.size());
  state.counters["GB/s"] = benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GMAC/s"] = benchmark::Counter(static_cast<double>(M * N * K) * 1e-9,
                                                benchmark::Counter::kIsIterationInvariantRate);
}

// Memory copy bandwidth: 256 MiB buffer, counted as bytes read + written per second.
void BM_copy(benchmark::State& state) {
  const size_t n = size_t(256) << 20;
  std::vector<uint8_t> src(n, 1), dst(n, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), n);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * n * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void shapes(benchmark::internal::Benchmark* b) {
  const int64_t nk[][2] = {{4096, 4096}, {1024, 4096}, {14336, 4096}, {4096, 14336}};
  for (auto& s : nk)
    for (int64_t M : {1, 4, 16}) b->Args({s[0], s[1], M});
  b->ArgNames({"N", "K", "M"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

struct Registrar {
  Registrar() {
    benchmark::RegisterBenchmark("BM_copy", BM_copy)->Unit(benchmark::kMillisecond)->UseRealTime();
    const std::pair<const char*, CpuImpl> impls[] = {
        {"avx512bf16", CpuImpl::Avx512Bf16}, {"avx512", CpuImpl::Avx512}, {"avx2", CpuImpl::Avx2}};
    for (auto& [iname, impl] : impls)
      for (auto [xname, xd] : {std::pair{"bf16", DType::BF16}, std::pair{"fp32", DType::F32}})
        for (auto [lname, per_row] : {std::pair{"any4", true}, std::pair{"int4", false}}) {
          if (impl == CpuImpl::Avx512Bf16 && xd == DType::F32) continue;  // same kernel as avx512
          const std::string name = std::string("BM_gemm/") + iname + "/" + lname + "/x_" + xname;
          benchmark::RegisterBenchmark(name.c_str(), BM_gemm, impl, xd, per_row)->Apply(shapes);
        }
  }
} registrar;

}  // namespace
