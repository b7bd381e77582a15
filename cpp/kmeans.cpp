// Weighted 1-D k-means: entry points, per-row preparation (radix sort, distinct values, prefix
// sums) and the common output step (float centroids, codes, exact inertia).
// Lloyd lives in kmeans_lloyd.cpp, the exact dynamic programme in kmeans_optimal.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common.h"
#include "kmeans.h"
#include "kmeans_detail.h"
#include "parallel.h"

namespace any4 {

uint64_t derive_row_seed(uint64_t seed, uint64_t row) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ULL * (row + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

namespace kmeans_detail {

int32_t lower_bound_from(const double* v, int32_t D, int32_t p, double x) {
  if (p < D && v[p] < x) {  // answer in (p, D]
    int32_t lo = p + 1, step = 1;
    while (lo + step <= D && v[lo + step - 1] < x) {
      lo += step;
      step <<= 1;
    }
    int32_t hi = std::min(lo + step - 1, D);
    return static_cast<int32_t>(std::lower_bound(v + lo, v + hi, x) - v);
  }
  // answer in [0, p]
  int32_t hi = p, step = 1;
  while (hi - step >= 0 && v[hi - step] >= x) {
    hi -= step;
    step <<= 1;
  }
  int32_t lo = std::max(hi - step + 1, 0);
  return static_cast<int32_t>(std::lower_bound(v + lo, v + hi, x) - v);
}

}  // namespace kmeans_detail

namespace {

using namespace kmeans_detail;

struct Workspace {
  SortedRow row;
  Scratch scratch;
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

template <class T>
inline void ensure(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
}

// Order-preserving map of a float's bits to an unsigned key (negatives reversed), and back.
// -0.0 is mapped like +0.0, so equal values have equal keys.
inline uint32_t float_key(float f) {
  f += 0.0f;  // -0.0 -> +0.0
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

inline float key_float(uint32_t key) {
  uint32_t b = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// LSD radix sort of (key << 32 | index) on the 32 key bits: three 11-bit passes, a pass is
// skipped when every key has the same digit. Returns the buffer holding the sorted items.
uint64_t* radix_sort(const float* values, int32_t n, uint64_t* a, uint64_t* tmp) {
  constexpr int kBits = 11, kBuckets = 1 << kBits;
  uint32_t hist[3][kBuckets];
  std::memset(hist, 0, sizeof(hist));
  for (int32_t i = 0; i < n; ++i) {
    uint32_t key = float_key(values[i]);
    a[i] = (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(i);
    ++hist[0][key & (kBuckets - 1)];
    ++hist[1][(key >> kBits) & (kBuckets - 1)];
    ++hist[2][key >> (2 * kBits)];
  }
  uint64_t* src = a;
  uint64_t* dst = tmp;
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = 32 + pass * kBits;
    uint32_t* h = hist[pass];
    if (h[(src[0] >> shift) & (kBuckets - 1)] == static_cast<uint32_t>(n)) continue;
    uint32_t sum = 0;
    for (int b = 0; b < kBuckets; ++b) {
      uint32_t c = h[b];
      h[b] = sum;
      sum += c;
    }
    for (int32_t i = 0; i < n; ++i) {
      uint64_t x = src[i];
      dst[h[(x >> shift) & (kBuckets - 1)]++] = x;
    }
    std::swap(src, dst);
  }
  return src;
}

// Finite values; finite, non-negative weights (-0.0 allowed). Bit tests, so the loops vectorise.
inline void check_row(const float* values, const float* weights, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, values + i, 4);
    bad |= static_cast<uint32_t>((b & 0x7f800000u) == 0x7f800000u);
  }
  if (bad)
    for (int64_t i = 0; i < n; ++i)
      if (!std::isfinite(values[i]))
        throw std::invalid_argument("k-means values must be finite (index " + std::to_string(i) + ")");
  if (!weights) return;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, weights + i, 4);
    bad |= static_cast<uint32_t>(b >= 0x7f800000u && b != 0x80000000u);  // inf, nan or negative
  }
  if (bad)
    for (int64_t i = 0; i < n; ++i)
      if (!(std::isfinite(weights[i]) && weights[i] >= 0))
        throw std::invalid_argument("k-means weights must be finite and >= 0 (index " + std::to_string(i) +
                                    ")");
}

// Sort the row, merge equal values, build prefix sums. Zero total weight -> unweighted.
void prepare(const float* values, const float* weights, int32_t n, SortedRow& r) {
  r.n = n;
  ensure(r.items, n);
  ensure(r.items_tmp, n);
  ensure(r.vf, n);
  ensure(r.v, n);
  ensure(r.wd, n);
  ensure(r.run, n + 1);
  ensure(r.PW, n + 1 + 16);  // + 16: vector loads in the DP may run past D
  ensure(r.PS, n + 1 + 16);
  ensure(r.PQ, n + 1 + 16);
  uint64_t* sorted = radix_sort(values, n, r.items.data(), r.items_tmp.data());
  if (sorted != r.items.data()) std::swap(r.items, r.items_tmp);
  const uint64_t* __restrict it = r.items.data();

  bool weighted = false;
  if (weights)
    for (int32_t i = 0; i < n && !weighted; ++i) weighted = weights[i] > 0;

  const double ref = 0.5 * (static_cast<double>(key_float(static_cast<uint32_t>(it[0] >> 32))) +
                            static_cast<double>(key_float(static_cast<uint32_t>(it[n - 1] >> 32))));
  r.ref = ref;
  float* __restrict vf = r.vf.data();
  double* __restrict v = r.v.data();
  double* __restrict wd = r.wd.data();
  int32_t* __restrict run = r.run.data();
  double* __restrict PW = r.PW.data();
  double* __restrict PS = r.PS.data();
  double* __restrict PQ = r.PQ.data();
  // Merge runs of equal keys into distinct values with summed weights.
  int32_t D = 0;
  uint32_t last_key = 0;
  for (int32_t i = 0; i < n; ++i) {
    const uint32_t key = static_cast<uint32_t>(it[i] >> 32);
    const double w = weighted ? static_cast<double>(weights[static_cast<uint32_t>(it[i])]) : 1.0;
    if (D > 0 && key == last_key) {
      wd[D - 1] += w;
      continue;
    }
    vf[D] = key_float(key);
    wd[D] = w;
    run[D] = i;
    last_key = key;
    ++D;
  }
  run[D] = n;
  // Prefix sums. Four interleaved segments (then their offsets) instead of one long chain of
  // dependent additions; the order is fixed, so results do not depend on anything but the row.
  int32_t D_pos = 0;
  for (int32_t d = 0; d < D; ++d) {
    v[d] = static_cast<double>(vf[d]) - ref;
    D_pos += wd[d] > 0;
  }
  constexpr int kSeg = 4;
  const int32_t seg = (D + kSeg - 1) / kSeg;
  double W[kSeg] = {}, S[kSeg] = {}, Q[kSeg] = {};
  for (int32_t t = 0; t < seg; ++t)
    for (int g = 0; g < kSeg; ++g) {
      const int32_t d = g * seg + t;
      if (d >= D) break;
      const double w = wd[d], x = v[d];
      W[g] += w;
      S[g] += w * x;
      Q[g] += w * x * x;
      PW[d + 1] = W[g];
      PS[d + 1] = S[g];
      PQ[d + 1] = Q[g];
    }
  PW[0] = PS[0] = PQ[0] = 0;
  for (int g = 1; g < kSeg; ++g) {
    const int32_t d0 = g * seg, d1 = std::min(D, d0 + seg);
    if (d0 >= D) break;
    const double ow = PW[d0], os = PS[d0], oq = PQ[d0];  // totals of the segments before
    for (int32_t d = d0; d < d1; ++d) {
      PW[d + 1] += ow;
      PS[d + 1] += os;
      PQ[d + 1] += oq;
    }
  }
  r.D = D;
  r.D_pos = D_pos;
}

// Output step shared by both methods. `bounds` is a partition of the distinct values into k
// contiguous clusters; `fallback` (shifted domain, may be null) gives the centroid of a cluster
// that holds no values. Centroids become the clusters' weighted means (midpoint of the value
// range for zero-weight clusters), rounded to float and clamped into their cluster's range;
// codes/inertia then use the nearest float centroid.
double finish(const SortedRow& r, int k, const int32_t* bounds, const double* fallback, float* centroids,
              uint8_t* codes) {
  const int32_t D = r.D;
  for (int j = 0; j < k; ++j) {
    int32_t a = bounds[j], b = bounds[j + 1];
    if (b > a) {
      double W = cw(r, a, b);
      double c = W > 0 ? cs(r, a, b) / W + r.ref
                       : 0.5 * (static_cast<double>(r.vf[a]) + static_cast<double>(r.vf[b - 1]));
      float f = static_cast<float>(c);
      centroids[j] = std::min(std::max(f, r.vf[a]), r.vf[b - 1]);
    } else {
      centroids[j] = static_cast<float>(fallback ? fallback[j] + r.ref : 0.0);
    }
  }
  // Already ascending in all practical cases; keep the contract unconditionally.
  for (int j = 1; j < k; ++j)
    for (int t = j; t > 0 && centroids[t] < centroids[t - 1]; --t) std::swap(centroids[t], centroids[t - 1]);

  // Nearest float centroid: value x goes to cluster j iff mid_{j} <= x < mid_{j+1} with
  // mid_j = (c[j-1] + c[j]) / 2 computed exactly in double (ties to the larger centroid).
  int32_t lo = 0;
  double inertia = 0;
  for (int j = 0; j < k; ++j) {
    int32_t hi = D;
    if (j + 1 < k) {
      double mid = 0.5 * (static_cast<double>(centroids[j]) + static_cast<double>(centroids[j + 1]));
      // first d >= lo with vf[d] >= mid (vf ascending)
      int32_t g = std::max(lo, std::min(bounds[j + 1], D));
      auto ge = [&](int32_t d) { return static_cast<double>(r.vf[d]) >= mid; };
      // gallop from the partition boundary
      if (g < D && !ge(g)) {
        while (g < D && !ge(g)) ++g;
      } else {
        while (g > lo && ge(g - 1)) --g;
      }
      hi = g;
    }
    const double c = centroids[j];
    double part[4] = {0, 0, 0, 0};  // independent partial sums, fixed order
    int32_t d = lo;
    for (; d + 4 <= hi; d += 4)
      for (int t = 0; t < 4; ++t) {
        const double e = static_cast<double>(r.vf[d + t]) - c;
        part[t] += r.wd[d + t] * e * e;
      }
    for (; d < hi; ++d) {
      const double e = static_cast<double>(r.vf[d]) - c;
      part[0] += r.wd[d] * e * e;
    }
    inertia += (part[0] + part[1]) + (part[2] + part[3]);
    if (codes) {
      const uint64_t* it = r.items.data();
      for (int32_t i = r.run[lo], e = r.run[hi]; i < e; ++i)
        codes[static_cast<uint32_t>(it[i])] = static_cast<uint8_t>(j);
    }
    lo = hi;
  }
  return inertia;
}

}  // namespace

double kmeans_1d(const float* values, const float* weights, int64_t n, int k, const KMeansParams& params,
                 uint64_t row_seed, float* centroids, uint8_t* codes) {
  ANY4_CHECK(k >= 1 && k <= kMaxClusters, "k must be in [1, 256], got " + std::to_string(k));
  ANY4_CHECK(n >= 1, "k-means needs at least one value");
  ANY4_CHECK(n < (int64_t{1} << 31), "k-means rows must hold fewer than 2^31 values");
  ANY4_CHECK(params.max_iter >= 1 && params.n_init >= 1, "max_iter and n_init must be >= 1");
  ANY4_CHECK(params.method == KMeansMethod::Lloyd || params.method == KMeansMethod::Optimal,
             "unknown k-means method");
  check_row(values, weights, n);
  Workspace& ws = workspace();
  SortedRow& r = ws.row;
  prepare(values, weights, static_cast<int32_t>(n), r);
  const int32_t D = r.D;

  if (D <= k) {  // exact: every distinct value is a centroid
    for (int j = 0; j < k; ++j) centroids[j] = r.vf[std::min<int32_t>(j, D - 1)];
    if (codes) {
      const uint64_t* it = r.items.data();
      for (int32_t d = 0; d < D; ++d)
        for (int32_t i = r.run[d]; i < r.run[d + 1]; ++i)
          codes[static_cast<uint32_t>(it[i])] = static_cast<uint8_t>(d);
    }
    return 0.0;
  }

  int32_t bounds[kMaxClusters + 1];
  double c[kMaxClusters];
  const bool lloyd_ok = r.D_pos >= k && k >= 2;  // Lloyd needs k distinct weighted values
  if (params.method == KMeansMethod::Optimal || !lloyd_ok) {
    // One Lloyd start gives a reachable inertia, which lets the DP skip hopeless rows. The
    // margin covers rounding (DP values carry errors relative to the prefix sums' magnitude).
    double upper = std::numeric_limits<double>::infinity();
    if (lloyd_ok) {
      upper = lloyd_best_of(r, k, params.max_iter, 1, row_seed, ws.scratch, c);
      upper += 1e-9 * upper + 1e-10 * r.PQ[D];
    }
    optimal_partition(r, k, upper, ws.scratch, bounds);
    return finish(r, k, bounds, nullptr, centroids, codes);
  }
  lloyd_best_of(r, k, params.max_iter, params.n_init, row_seed, ws.scratch, c);
  // Partition induced by the centroids (nearest centroid, ties to the larger one).
  bounds[0] = 0;
  bounds[k] = D;
  for (int j = 1; j < k; ++j)
    bounds[j] = static_cast<int32_t>(std::lower_bound(r.v.data(), r.v.data() + D, 0.5 * (c[j - 1] + c[j])) -
                                     r.v.data());
  return finish(r, k, bounds, c, centroids, codes);
}

void kmeans_rows(const float* values, const float* weights, int64_t rows, int64_t n, int k,
                 const KMeansParams& params, float* centroids, uint8_t* codes, double* inertia) {
  parallel_for_chunks(rows, 4, [&](int64_t b, int64_t e) {  // long, uneven rows: small chunks
    for (int64_t r = b; r < e; ++r) {
      double in =
          kmeans_1d(values + r * n, weights ? weights + r * n : nullptr, n, k, params,
                    derive_row_seed(params.seed, r), centroids + r * k, codes ? codes + r * n : nullptr);
      if (inertia) inertia[r] = in;
    }
  });
}

}  // namespace any4
