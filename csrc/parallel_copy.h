// parallel_copy.h: copy a list of byte spans with a few std::threads.
//
// Used by gather_copy (pieces of an expert -> its flat buffer) and by the staging ring (pieces ->
// a pinned chunk). The spans are treated as one long byte stream that is cut into `threads` nearly
// equal, cache-line aligned ranges, so one huge piece and many small ones spread the same way.
// Reading memory-mapped checkpoint pages page-faults; several threads overlap those faults, which
// is where most of the gain over one copy loop comes from.
// Plain C++ (no torch, no CUDA) so that every build flavour can include it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

namespace moe_prefetch {

struct CopySpan {
  const char* src;
  char* dst;
  int64_t nbytes;
};

// Below this many bytes per thread, starting a thread costs more than it saves.
constexpr int64_t kMinBytesPerThread = int64_t(1) << 20;

// Copy bytes [begin, end) of the concatenated spans; `starts[i]` is where span i begins in it.
inline void copy_range(const std::vector<CopySpan>& spans, const std::vector<int64_t>& starts,
                       int64_t begin, int64_t end) {
  if (begin >= end) return;
  // first span that ends after `begin`
  size_t i = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
  for (; i < spans.size() && starts[i] < end; ++i) {
    const int64_t lo = std::max(begin, starts[i]);
    const int64_t hi = std::min(end, starts[i] + spans[i].nbytes);
    if (hi > lo) std::memcpy(spans[i].dst + (lo - starts[i]), spans[i].src + (lo - starts[i]), size_t(hi - lo));
  }
}

// Copy every span. The caller must have released the GIL: this blocks for the whole copy.
inline void parallel_memcpy(const std::vector<CopySpan>& spans, int threads) {
  std::vector<int64_t> starts(spans.size());
  int64_t total = 0;
  for (size_t i = 0; i < spans.size(); ++i) {
    starts[i] = total;
    total += spans[i].nbytes;
  }
  const int64_t useful = std::max<int64_t>(1, total / kMinBytesPerThread);
  const int n = int(std::min<int64_t>(std::max(threads, 1), useful));
  if (n <= 1) {
    copy_range(spans, starts, 0, total);
    return;
  }
  // n ranges, boundaries rounded to 64 bytes so two threads never write one cache line
  auto bound = [&](int k) { return k == n ? total : (total * k / n) & ~int64_t(63); };
  std::vector<std::thread> pool;
  pool.reserve(n - 1);
  int started = 1;
  try {
    for (; started < n; ++started)
      pool.emplace_back(copy_range, std::cref(spans), std::cref(starts), bound(started), bound(started + 1));
  } catch (const std::system_error&) {
    // out of threads: the calling thread does the ranges that got none
  }
  copy_range(spans, starts, bound(0), bound(1));
  for (int k = started; k < n; ++k) copy_range(spans, starts, bound(k), bound(k + 1));
  for (auto& t : pool) t.join();
}

}  // namespace moe_prefetch
