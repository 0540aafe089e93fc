#include "common.h"

#include <cstdlib>

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

}  // namespace sigma_fast
