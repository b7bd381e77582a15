// A small persistent thread pool for the CPU core: parallel_for over [0, n) in contiguous chunks.
// Work is split the same way whatever the thread count decides only *who* runs a chunk, so any
// computation that is deterministic per index is deterministic for every thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace any4 {

// Most threads the pool starts (set_num_threads refuses more; ANY4_NUM_THREADS above is ignored).
constexpr int kMaxThreads = 1024;

// Number of threads used by parallel_for (default: hardware concurrency, or ANY4_NUM_THREADS).
int get_num_threads();
// Set the number of threads, in [1, kMaxThreads] (else std::invalid_argument). Starts the workers
// now; if the system cannot start them, the count falls back to 1 and std::runtime_error is
// thrown (never a partly started pool). Not to be called concurrently with parallel_for.
void set_num_threads(int n);

// Calls fn(begin, end) over disjoint chunks covering [0, n); chunks hold at least `grain`
// indices. Runs inline when one thread suffices. Exceptions from fn are rethrown in the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace any4
