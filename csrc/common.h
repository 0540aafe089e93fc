// Shared helpers of the torch-free C++ core: threading and argument checks.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <exception>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace sigma_fast {

// Number of worker threads used by the parallel kernels. 0 means "all hardware threads"
// (or SIGMA_FAST_NUM_THREADS when set).
int get_num_threads();
void set_num_threads(int n);

namespace detail {

// A borrowed callable, cheaper than std::function (no allocation).
struct ChunkTask {
  void (*call)(const void* ctx, int64_t chunk);
  const void* ctx;
};

// Runs task(c) for every c in [0, chunks) on the calling thread and the persistent pool's
// workers; returns when every chunk has finished. The caller claims chunks too, so a busy or
// slow-to-wake pool never leaves it idle, and nested or concurrent calls (several Python
// threads, GIL released) cannot deadlock. Rethrows the exception of the smallest failing chunk.
void run_chunks(int64_t chunks, ChunkTask task);

}  // namespace detail

// Runs f(begin, end) over [0, n) split into contiguous chunks of at least `grain` items, on a
// persistent thread pool (workers are started once, not per call). At most
// chunks_per_thread * threads chunks, claimed dynamically: more chunks than threads keep the
// work balanced when a thread is slowed down (a shared machine), at the cost of more calls.
// The split depends only on n, grain and the thread count, and every kernel computes each
// item independently of which chunk it lands in, so results never depend on the thread count.
// One chunk (small n) runs inline on the calling thread. Exceptions thrown by f are rethrown
// in the caller (the one of the first failing chunk).
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f, int64_t chunks_per_thread = 1) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t blocks = (n + grain - 1) / grain;
  if (blocks <= 1) {  // no thread-count lookup for small work
    f(int64_t{0}, n);
    return;
  }
  const int64_t threads = get_num_threads();
  if (threads <= 1) {
    f(int64_t{0}, n);
    return;
  }
  const int64_t chunks =
      std::min<int64_t>(threads * std::max<int64_t>(chunks_per_thread, 1), blocks);
  using Fn = std::remove_reference_t<F>;
  struct Ctx {
    Fn* f;
    int64_t n, chunks;
  } ctx{&f, n, chunks};
  detail::run_chunks(chunks, detail::ChunkTask{
                                 [](const void* p, int64_t c) {
                                   const Ctx& x = *static_cast<const Ctx*>(p);
                                   (*x.f)(x.n * c / x.chunks, x.n * (c + 1) / x.chunks);
                                 },
                                 &ctx});
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace sigma_fast
