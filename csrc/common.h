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
#include <vector>

namespace sigma_fast {

// Number of worker threads used by the parallel kernels. 0 means "all hardware threads".
int get_num_threads();
void set_num_threads(int n);

// Runs f(begin, end) over [0, n) split into contiguous chunks of at least `grain` items.
// The split depends only on n, grain and the thread count, and every kernel computes each
// item independently of which chunk it lands in, so results never depend on the thread count.
// Exceptions thrown by a worker are rethrown in the caller.
template <class F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= 0) return;
  int64_t threads = get_num_threads();
  grain = std::max<int64_t>(grain, 1);
  int64_t chunks = std::min<int64_t>(threads, (n + grain - 1) / grain);
  if (chunks <= 1) {
    f(int64_t{0}, n);
    return;
  }
  std::vector<std::thread> pool;
  std::exception_ptr error;
  std::mutex error_mutex;
  pool.reserve(static_cast<size_t>(chunks - 1));
  auto run = [&](int64_t c) {
    int64_t begin = n * c / chunks, end = n * (c + 1) / chunks;
    try {
      f(begin, end);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  for (int64_t c = 1; c < chunks; ++c) pool.emplace_back(run, c);
  run(0);
  for (auto& t : pool) t.join();
  if (error) std::rethrow_exception(error);
}

inline void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

}  // namespace sigma_fast
