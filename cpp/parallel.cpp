#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#if defined(__linux__) || defined(__FreeBSD__)
#include <dlfcn.h>
#include <link.h>
#define ANY4_HAVE_DL_ITERATE_PHDR 1
#endif

namespace any4 {
namespace {

int hardware_threads() {
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(std::min<unsigned>(hw, kMaxThreads));
}

// ANY4_NUM_THREADS when it is a number in [1, kMaxThreads] (the Python package refuses other
// values with a clear error before the core is used), else 0.
int env_threads() {
  if (const char* env = std::getenv("ANY4_NUM_THREADS")) {
    char* end = nullptr;
    long v = std::strtol(env, &end, 10);
    if (end != env && *end == '\0' && v >= 1 && v <= kMaxThreads) return static_cast<int>(v);
  }
  return 0;
}

// ANY4_NUM_THREADS if valid, else the hardware concurrency (capped).
int default_threads() {
  if (int v = env_threads()) return v;
  return hardware_threads();
}

// Pause hint for spin loops.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Polls `ready` for up to `micros` microseconds; true if it became true.
template <class Ready>
bool spin_until(Ready ready, int micros) {
  const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(micros);
  for (int i = 1;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if (i % 64 == 0 && std::chrono::steady_clock::now() > end) return false;
  }
}

// Between parallel regions a worker spins this long for the next job before sleeping, and the
// caller spins this long for the workers before sleeping: back-to-back regions (one matmul per
// layer in inference, each tens of microseconds at batch 1) then start and end without a
// futex wake-up, which costs tens of microseconds on a virtual machine.
constexpr int kWorkerSpinMicros = 200;
constexpr int kCallerSpinMicros = 50;

// Workers sleep on a condition variable (after spinning briefly); a job is a function over
// chunk indices that every participant (caller included) pulls from an atomic counter.
class Pool {
 public:
  Pool() = default;
  ~Pool() { stop_all(); }

  // Starts exactly n_workers workers. If the system cannot start them all, the ones started are
  // stopped again (the pool is left empty, so parallel_for still works, on the caller's thread)
  // and std::runtime_error says so.
  void resize(int n_workers) {
    stop_all();
    stop_ = false;
    try {
      for (int i = 0; i < n_workers; ++i) workers_.emplace_back([this] { loop(); });
    } catch (const std::system_error& e) {
      const size_t started = workers_.size();
      stop_all();
      throw std::runtime_error("could not start " + std::to_string(n_workers) + " worker threads (started " +
                               std::to_string(started) + "): " + e.what() +
                               "; use fewer threads (any4.set_num_threads / ANY4_NUM_THREADS)");
    }
  }

  int workers() const { return static_cast<int>(workers_.size()); }

  void run(int64_t n_chunks, const std::function<void(int64_t)>& chunk_fn) {
    std::unique_lock<std::mutex> call_lock(call_mu_);  // one parallel region at a time
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &chunk_fn;
      n_chunks_ = n_chunks;
      next_.store(0);
      done_.store(0);
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    spin_until([&] { return done_.load() == n_chunks && active_.load() == 0; }, kCallerSpinMicros);
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return done_.load() == n_chunks_ && active_.load() == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    const std::function<void(int64_t)>* job;
    int64_t n;
    {
      std::lock_guard<std::mutex> lk(mu_);
      job = job_;
      n = n_chunks_;
    }
    if (!job) return;
    for (;;) {
      int64_t c = next_.fetch_add(1);
      if (c >= n) break;
      try {
        (*job)(c);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1);
    }
  }

  void loop() {
    uint64_t seen = 0;
    for (;;) {
      spin_until([&] { return stop_.load() || generation_.load() != seen; }, kWorkerSpinMicros);
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_.load() || generation_.load() != seen; });
        if (stop_) return;
        seen = generation_.load();
        if (job_ == nullptr) continue;  // that region finished without this worker
        ++active_;
      }
      work();
      {
        std::lock_guard<std::mutex> lk(mu_);
        --active_;
      }
      done_cv_.notify_all();
    }
  }

  void stop_all() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
  }

  std::vector<std::thread> workers_;
  std::mutex mu_, call_mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_chunks_ = 0;
  std::atomic<int64_t> next_{0}, done_{0};
  std::atomic<int> active_{0};           // written under mu_, polled while spinning
  std::atomic<uint64_t> generation_{0};  // written under mu_, polled while spinning
  std::atomic<bool> stop_{false};
  std::exception_ptr error_;
};

int g_threads = default_threads();
// True once the thread count was chosen (a valid ANY4_NUM_THREADS or set_num_threads); otherwise
// a shared OpenMP runtime's own setting (e.g. torch.set_num_threads) decides.
bool g_threads_chosen = env_threads() > 0;

// Started lazily (first parallel region or set_num_threads), so importing starts no thread.
Pool& pool() {
  static Pool p;
  return p;
}

// Makes the pool hold n - 1 workers; on failure falls back to one thread and rethrows.
void ensure_workers(int n) {
  if (pool().workers() == n - 1) return;
  try {
    pool().resize(n - 1);
  } catch (...) {
    g_threads = 1;
    throw;
  }
}

// ---------------------------------------------------------------- shared OpenMP runtime
// GNU OpenMP ABI (libgomp; libiomp5 and LLVM libomp export it too): runs fn(data) on a team of
// num_threads threads (0: the runtime's default), the caller being thread 0.
using GompParallelFn = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);

struct OpenMPRuntime {
  std::string path, label;  // label: "openmp:<path>"
  GompParallelFn parallel = nullptr;
  int (*max_threads)() = nullptr;
};

std::atomic<const OpenMPRuntime*> g_openmp{nullptr};

#ifdef ANY4_HAVE_DL_ITERATE_PHDR
bool is_openmp_library(const std::string& path) {
  const std::string base = path.substr(path.find_last_of('/') + 1);
  return base.rfind("libgomp", 0) == 0 || base.rfind("libiomp", 0) == 0 || base.rfind("libomp", 0) == 0;
}

// Paths of the OpenMP runtimes loaded in this process.
std::vector<std::string> loaded_openmp_libraries() {
  std::vector<std::string> found;
  dl_iterate_phdr(
      [](struct dl_phdr_info* info, size_t, void* out) {
        if (info->dlpi_name && info->dlpi_name[0] && is_openmp_library(info->dlpi_name)) {
          auto& v = *static_cast<std::vector<std::string>*>(out);
          if (std::find(v.begin(), v.end(), info->dlpi_name) == v.end()) v.emplace_back(info->dlpi_name);
        }
        return 0;
      },
      &found);
  return found;
}

// The runtime at `path` if it is loaded and has the entry points; kept for the process lifetime
// (a parallel region may still hold it when the backend changes).
const OpenMPRuntime* open_runtime(const std::string& path) {
  static std::mutex mu;
  static std::vector<const OpenMPRuntime*> opened;
  std::lock_guard<std::mutex> lk(mu);
  for (const OpenMPRuntime* r : opened)
    if (r->path == path) return r;
  void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);  // never loads anything new
  if (!h) return nullptr;
  auto* r = new OpenMPRuntime;
  r->path = path;
  r->label = "openmp:" + path;
  r->parallel = reinterpret_cast<GompParallelFn>(dlsym(h, "GOMP_parallel"));
  r->max_threads = reinterpret_cast<int (*)()>(dlsym(h, "omp_get_max_threads"));
  if (!r->parallel || !r->max_threads) {
    delete r;
    dlclose(h);
    return nullptr;
  }
  opened.push_back(r);
  return r;
}
#endif

int current_threads(const OpenMPRuntime* omp) {
  if (omp && !g_threads_chosen) return std::max(1, std::min(kMaxThreads, omp->max_threads()));
  return g_threads;
}

// One parallel_for on the OpenMP team: every team thread pulls chunk indices from `next`.
struct OpenMPJob {
  const std::function<void(int64_t)>* chunk_fn;
  int64_t n_chunks;
  std::atomic<int64_t> next{0};
  std::mutex mu;
  std::exception_ptr error;
};

void openmp_job_body(void* p) {
  auto* job = static_cast<OpenMPJob*>(p);
  for (;;) {
    const int64_t c = job->next.fetch_add(1);
    if (c >= job->n_chunks) break;
    try {
      (*job->chunk_fn)(c);
    } catch (...) {  // an exception must not leave an OpenMP region
      std::lock_guard<std::mutex> lk(job->mu);
      if (!job->error) job->error = std::current_exception();
    }
  }
}

void run_on_openmp(const OpenMPRuntime& omp, int threads, int64_t n_chunks,
                   const std::function<void(int64_t)>& chunk_fn) {
  OpenMPJob job;
  job.chunk_fn = &chunk_fn;
  job.n_chunks = n_chunks;
  omp.parallel(openmp_job_body, &job, static_cast<unsigned>(std::min<int64_t>(threads, n_chunks)), 0);
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace

int get_num_threads() {
  return current_threads(g_openmp.load());
}

void set_num_threads(int n) {
  if (n < 1 || n > kMaxThreads)
    throw std::invalid_argument("number of threads must be in [1, " + std::to_string(kMaxThreads) +
                                "], got " + std::to_string(n));
  g_threads = n;
  g_threads_chosen = true;
  if (!g_openmp.load()) ensure_workers(n);
}

bool use_openmp_runtime(const char* prefer_prefix) {
#ifdef ANY4_HAVE_DL_ITERATE_PHDR
  const std::string prefix = prefer_prefix ? prefer_prefix : "";
  const std::vector<std::string> libs = loaded_openmp_libraries();
  const OpenMPRuntime* chosen = nullptr;
  if (!prefix.empty())
    for (const std::string& path : libs)
      if (path.rfind(prefix, 0) == 0 && (chosen = open_runtime(path))) break;
  if (!chosen && libs.size() == 1) chosen = open_runtime(libs[0]);
  if (!chosen) return false;
  g_openmp.store(chosen);
  return true;
#else
  return false;
#endif
}

void use_thread_pool() {
  g_openmp.store(nullptr);
}

const char* parallel_backend() {
  const OpenMPRuntime* omp = g_openmp.load();
  return omp ? omp->label.c_str() : "pool";
}

namespace {

// Runs fn over [0, n) in chunks of `chunk` indices (the last may be shorter), pulled by the
// threads in order.
void run_chunks(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  const OpenMPRuntime* omp = g_openmp.load();
  const int threads = current_threads(omp);
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  if (threads <= 1 || n_chunks <= 1) {
    fn(0, n);
    return;
  }
  if (!omp) {
    ensure_workers(threads);  // the first region starts the workers (errors: runtime_error)
    if (g_threads <= 1) {
      fn(0, n);
      return;
    }
  }
  const std::function<void(int64_t)> chunk_fn = [&](int64_t c) {
    int64_t b = c * chunk;
    int64_t e = std::min(n, b + chunk);
    fn(b, e);
  };
  if (omp) {
    run_on_openmp(*omp, threads, n_chunks, chunk_fn);
  } else {
    pool().run(n_chunks, chunk_fn);
  }
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int threads = current_threads(g_openmp.load());
  // A few chunks per thread for load balance, never smaller than grain.
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int64_t n_chunks =
      std::max<int64_t>(1, std::min<int64_t>(max_chunks, static_cast<int64_t>(threads) * 4));
  run_chunks(n, (n + n_chunks - 1) / n_chunks, fn);
}

void parallel_for_chunks(int64_t n, int64_t chunk, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  run_chunks(n, std::max<int64_t>(chunk, 1), fn);
}

}  // namespace any4
