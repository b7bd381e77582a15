// Google Benchmark for the weighted 1-D k-means (SPEC §2): one realistic 4096-long row with
// k = 16 (Lloyd with n_init restarts, and the exact DP), then kmeans_rows and a full any4
// quantization of a 4096 x 4096 matrix on all threads (ANY4_NUM_THREADS).
//
//   cmake -S . -B build/bench -DANY4_BUILD_BENCH=ON -DANY4_BUILD_PYTHON=OFF -DANY4_CUDA=OFF
//   cmake --build build/bench -j2 && build/bench/bench_kmeans
//
// Rows: group-normalised values u in [0, 15] (G = 128) of a heavy-tailed (Student t, 5 dof)
// weight row; sample weights = E[x^2] per channel (log-normal) times the group scale squared
// (the "mse" weighting). Speed ratios against scikit-learn / ckwrap are measured in the same run
// by bench/kmeans_vs_sklearn.py.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kmeans.h"
#include "parallel.h"
#include "quantize.h"

namespace {

constexpr int64_t kCols = 4096;
constexpr int64_t kGroup = 128;
constexpr int kLevels = 16;

// Weight matrix [rows, cols] (Student t) and per-channel statistic E[x^2] [cols].
struct Matrix {
  std::vector<float> w, chan;
  int64_t rows, cols;
};

Matrix make_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::student_t_distribution<float> t(5.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  Matrix m{std::vector<float>(rows * cols), std::vector<float>(cols), rows, cols};
  for (auto& x : m.w) x = 0.02f * t(gen);
  for (auto& c : m.chan) {
    float s = std::exp(normal(gen));
    c = s * s;
  }
  return m;
}

// Group-normalised values and element weights of every row (what quantize feeds k-means).
void normalise(const Matrix& m, std::vector<float>& u, std::vector<float>& wt) {
  u.resize(m.w.size());
  wt.resize(m.w.size());
  const float top = kLevels - 1;
  for (int64_t r = 0; r < m.rows; ++r)
    for (int64_t g0 = 0; g0 < m.cols; g0 += kGroup) {
      const float* x = &m.w[r * m.cols + g0];
      const int64_t len = std::min(kGroup, m.cols - g0);
      float lo = *std::min_element(x, x + len), hi = *std::max_element(x, x + len);
      float s = (hi - lo) / top;
      for (int64_t i = 0; i < len; ++i) {
        u[r * m.cols + g0 + i] = s > 0 ? (x[i] - lo) / s : 0.5f * top;
        wt[r * m.cols + g0 + i] = m.chan[g0 + i] * s * s;
      }
    }
}

struct Rows {
  std::vector<float> u, wt;
  int64_t rows = 0;
};

const Rows& sample_rows() {
  static Rows r = [] {
    Rows out;
    out.rows = 64;  // rotated through, so no single row is special
    normalise(make_matrix(out.rows, kCols, 1), out.u, out.wt);
    return out;
  }();
  return r;
}

void one_row(benchmark::State& state, any4::KMeansMethod method, int n_init) {
  const Rows& rows = sample_rows();
  any4::KMeansParams p;
  p.method = method;
  p.n_init = n_init;
  std::vector<float> cent(kLevels);
  std::vector<uint8_t> codes(kCols);
  // Mean inertia over the rotated rows (outside the timed loop), to compare methods.
  double inertia = 0;
  for (int64_t r = 0; r < rows.rows; ++r)
    inertia += any4::kmeans_1d(&rows.u[r * kCols], &rows.wt[r * kCols], kCols, kLevels, p,
                               any4::derive_row_seed(0, r), cent.data(), codes.data());
  state.counters["mean_inertia"] = inertia / static_cast<double>(rows.rows);
  int64_t r = 0;
  for (auto _ : state) {
    any4::kmeans_1d(&rows.u[r * kCols], &rows.wt[r * kCols], kCols, kLevels, p, any4::derive_row_seed(0, r),
                    cent.data(), codes.data());
    benchmark::DoNotOptimize(codes.data());
    r = (r + 1) % rows.rows;
  }
}

void BM_Lloyd_Row4096_k16(benchmark::State& state) {
  one_row(state, any4::KMeansMethod::Lloyd, static_cast<int>(state.range(0)));
}
BENCHMARK(BM_Lloyd_Row4096_k16)
    ->ArgName("n_init")
    ->Arg(1)
    ->Arg(2)
    ->Arg(4)
    ->Arg(8)
    ->Unit(benchmark::kMicrosecond);

void BM_Optimal_Row4096_k16(benchmark::State& state) {
  one_row(state, any4::KMeansMethod::Optimal, 1);
}
BENCHMARK(BM_Optimal_Row4096_k16)->Unit(benchmark::kMicrosecond);

const Rows& big_rows() {
  static Rows r = [] {
    Rows out;
    out.rows = kCols;
    normalise(make_matrix(out.rows, kCols, 2), out.u, out.wt);
    return out;
  }();
  return r;
}

// kmeans_rows over 4096 rows of 4096 (all threads).
void BM_KMeansRows_4096x4096(benchmark::State& state) {
  const Rows& rows = big_rows();
  any4::KMeansParams p;
  p.method = static_cast<any4::KMeansMethod>(state.range(0));
  p.n_init = static_cast<int>(state.range(1));
  std::vector<float> cent(rows.rows * kLevels);
  std::vector<uint8_t> codes(rows.rows * kCols);
  for (auto _ : state) {
    any4::kmeans_rows(rows.u.data(), rows.wt.data(), rows.rows, kCols, kLevels, p, cent.data(), codes.data(),
                      nullptr);
    benchmark::DoNotOptimize(codes.data());
  }
  state.counters["threads"] = any4::get_num_threads();
}
BENCHMARK(BM_KMeansRows_4096x4096)
    ->ArgNames({"optimal", "n_init"})
    ->Args({0, 1})
    ->Args({0, 4})
    ->Args({1, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Full any4 quantization (G = 128, bf16 tables, channel weights * scale^2) of 4096 x 4096.
void BM_QuantizeAny4_4096x4096(benchmark::State& state) {
  static Matrix m = make_matrix(kCols, kCols, 3);
  any4::QuantizeParams p;
  p.bits = 4;
  p.group_size = kGroup;
  p.out_dtype = any4::DType::BF16;
  p.channel_weight = m.chan.data();
  p.scale_power = 2;
  p.kmeans.method = static_cast<any4::KMeansMethod>(state.range(0));
  p.kmeans.n_init = static_cast<int>(state.range(1));
  std::vector<uint8_t> codes(m.w.size());
  std::vector<float> lut(kCols * kLevels), scales(kCols * (kCols / kGroup) * 2);
  for (auto _ : state) {
    any4::quantize(m.w.data(), kCols, kCols, p, codes.data(), lut.data(), scales.data());
    benchmark::DoNotOptimize(codes.data());
  }
  state.counters["threads"] = any4::get_num_threads();
}
BENCHMARK(BM_QuantizeAny4_4096x4096)
    ->ArgNames({"optimal", "n_init"})
    ->Args({0, 1})
    ->Args({0, 4})
    ->Args({1, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace
