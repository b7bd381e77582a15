// A small persistent thread pool for the CPU core: parallel_for over [0, n) in contiguous chunks.
// Work is split the same way whatever the thread count decides only *who* runs a chunk, so any
// computation that is deterministic per index is deterministic for every thread count.
#pragma once

#include <cstdint>
#include <functional>

namespace any4 {

// Most threads the pool starts (set_num_threads refuses more; ANY4_NUM_THREADS above is ignored).
constexpr int kMaxThreads = 1024;

// Number of threads used by parallel_for (default: hardware concurrency, or ANY4_NUM_THREADS;
// on a shared OpenMP runtime without either, that runtime's omp_get_max_threads()).
int get_num_threads();
// Set the number of threads, in [1, kMaxThreads] (else std::invalid_argument). Starts the workers
// now; if the system cannot start them, the count falls back to 1 and std::runtime_error is
// thrown (never a partly started pool). Not to be called concurrently with parallel_for.
void set_num_threads(int n);

// Where parallel_for runs. By default on any4's own pool of threads. use_openmp_runtime switches it
// onto an OpenMP runtime that is *already loaded* in the process (libgomp, libiomp5 or libomp, e.g.
// the one PyTorch loaded): any4's chunks then run on that runtime's thread team, so its workers,
// which spin for a while after each of their own parallel regions, pick up any4's work instead of
// competing with any4's threads for the cores. Nothing is loaded or linked: the runtime is found
// among the loaded objects (preferring one whose path starts with `prefer_prefix`, if not empty;
// without a match there, only a single loaded runtime is taken) and entered through its GNU ABI
// entry point GOMP_parallel, which all three runtimes export. Returns false (and changes nothing)
// when no runtime is found or the platform has no dl_iterate_phdr.
bool use_openmp_runtime(const char* prefer_prefix);
// Back to any4's own pool.
void use_thread_pool();
// "pool", or "openmp:<path of the runtime's library>".
const char* parallel_backend();

// Calls fn(begin, end) over disjoint chunks covering [0, n); chunks hold at least `grain`
// indices. Runs inline when one thread suffices. Exceptions from fn are rethrown in the caller.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Like parallel_for, but in chunks of exactly `chunk` indices (the last one may be shorter),
// handed out in order to whichever thread is free: for long, uneven per-index work (k-means
// rows), where parallel_for's few large chunks leave threads idle at the end of a region.
void parallel_for_chunks(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace any4
