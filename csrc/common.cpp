#include "common.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <deque>
#include <exception>
#include <limits>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#define SIGMA_FAST_HAVE_ATFORK 1
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace sigma_fast {
namespace {

int default_threads() {
  if (const char* env = std::getenv("SIGMA_FAST_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

std::atomic<int> g_threads{0};

// One parallel_for call: chunks are claimed through `next` by the caller and the workers.
struct Job {
  detail::ChunkTask task;
  int64_t chunks = 0;
  std::atomic<int64_t> next{0};
  // Guarded by mutex: finished chunks and the first (smallest-index) failure.
  std::mutex mutex;
  std::condition_variable finished;
  std::atomic<int64_t> done{0};  // finished chunks: counted under the mutex, polled without
  int64_t error_chunk = std::numeric_limits<int64_t>::max();
  std::exception_ptr error;

  void run(int64_t c) {
    std::exception_ptr e;
    try {
      task.call(task.ctx, c);
    } catch (...) {
      e = std::current_exception();
    }
    // The caller destroys the job once done == chunks, and only after taking the mutex (it may
    // see the count first by polling): nothing touches the job after this block.
    std::lock_guard<std::mutex> lock(mutex);
    if (e && c < error_chunk) error_chunk = c, error = e;
    if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == chunks) finished.notify_all();
  }
};

// Persistent workers sleeping on a condition variable until a job is queued. Jobs are served
// in order; a worker claims one chunk at a time. Workers are added when the thread count
// grows and never removed (idle ones only sleep). A worker that runs out of jobs polls for a
// new one for kWorkerSpinUs before it sleeps, so back-to-back calls (a decode loop, a
// benchmark) find it awake instead of paying a wake-up each.
class Pool {
  // How long the caller polls for the last chunks, and a worker for the next job, before they
  // sleep. A worker's poll is short: it only has to bridge the Python between back-to-back
  // calls, and on a small machine it competes with the caller's other threads while it polls.
  static constexpr int kSpinUs = 200;
  static constexpr int kWorkerSpinUs = 50;

  // Polls `ready` for up to `us` microseconds; true once it holds.
  template <class Ready>
  static bool poll(int us, Ready ready) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::microseconds(us);
    while (!ready()) {
      if (std::chrono::steady_clock::now() >= deadline) return false;
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#else
      std::this_thread::yield();
#endif
    }
    return true;
  }

 public:
  void run(Job& job, int workers_wanted) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < workers_wanted)
        workers_.emplace_back([this] { work(); });
      queue_.push_back(&job);
      queued_.fetch_add(1, std::memory_order_release);
    }
    for (int i = 0; i < workers_wanted; ++i) wake_.notify_one();
    // The caller works through the chunks too: with sleepy or busy workers it does them all.
    for (int64_t c = job.next.fetch_add(1); c < job.chunks; c = job.next.fetch_add(1)) job.run(c);
    {
      std::lock_guard<std::mutex> lock(mutex_);  // no worker can reach the job after this
      for (auto it = queue_.begin(); it != queue_.end(); ++it)
        if (*it == &job) {
          queue_.erase(it);
          queued_.fetch_sub(1, std::memory_order_relaxed);
          break;
        }
    }
    // The chunks still running elsewhere usually end within microseconds, and sleeping on the
    // condition variable costs a wake-up of tens of them (more on a busy or virtual machine),
    // so poll for a short while first. The mutex is taken either way: a worker that has just
    // counted its chunk may still hold it.
    poll(kSpinUs, [&] { return job.done.load(std::memory_order_acquire) == job.chunks; });
    std::unique_lock<std::mutex> lock(job.mutex);
    job.finished.wait(lock, [&] { return job.done == job.chunks; });
  }

 private:
  void work() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      if (queue_.empty()) {  // poll without the lock for a while, then sleep
        lock.unlock();
        poll(kWorkerSpinUs, [&] { return queued_.load(std::memory_order_acquire) != 0; });
        lock.lock();
      }
      wake_.wait(lock, [&] { return !queue_.empty(); });
      Job* job = queue_.front();
      const int64_t c = job->next.fetch_add(1);
      if (c >= job->chunks - 1) {  // exhausted: nothing left to claim
        queue_.pop_front();
        queued_.fetch_sub(1, std::memory_order_relaxed);
      }
      if (c >= job->chunks) continue;
      lock.unlock();
      job->run(c);
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<Job*> queue_;
  std::atomic<int> queued_{0};  // queue_.size(), for polling without the mutex
  std::vector<std::thread> workers_;
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_pool_mutex;

#ifdef SIGMA_FAST_HAVE_ATFORK
// A forked child has none of the parent's workers (and possibly a locked pool mutex): it starts
// a fresh pool on first use. The parent's pool is leaked in the child, never touched.
void forget_pool_in_child() { g_pool.store(nullptr, std::memory_order_relaxed); }
#endif

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  p = g_pool.load(std::memory_order_relaxed);
  if (!p) {
#ifdef SIGMA_FAST_HAVE_ATFORK
    static const bool registered = (pthread_atfork(nullptr, nullptr, forget_pool_in_child), true);
    (void)registered;
#endif
    // Never destroyed: workers may still sleep in it at interpreter exit.
    p = new Pool();
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace

int get_num_threads() {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n > 0) return n;
  static const int fallback = default_threads();  // hardware_concurrency() is a syscall
  return fallback;
}

void set_num_threads(int n) {
  require(n >= 0, "num_threads must be >= 0 (0 = all hardware threads); got " + std::to_string(n));
  g_threads.store(n, std::memory_order_relaxed);
}

namespace detail {

void run_chunks(int64_t chunks, ChunkTask task) {
  if (chunks <= 0) return;
  Job job;
  job.task = task;
  job.chunks = chunks;
  if (chunks == 1) {
    job.run(0);
  } else {
    const int64_t helpers = std::min<int64_t>(chunks - 1, get_num_threads() - 1);
    pool().run(job, static_cast<int>(std::max<int64_t>(helpers, 1)));
  }
  if (job.error) std::rethrow_exception(job.error);
}

}  // namespace detail
}  // namespace sigma_fast
