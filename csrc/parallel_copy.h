// parallel_copy.h: copy a list of byte spans with a few std::threads.
//
// Used by gather_copy (pieces of an expert -> its flat buffer) and by the staging ring (pieces ->
// a pinned chunk). The spans are treated as one long byte stream that is cut into `threads` nearly
// equal, cache-line aligned ranges, so one huge piece and many small ones spread the same way.
// Reading memory-mapped checkpoint pages page-faults; several threads overlap those faults, which
// is where most of the gain over one copy loop comes from.
// The threads are persistent (CopyPool): a staged expert copy is dozens of 8 MiB chunks, and starting
// threads for each chunk cost more than the copy itself.
// Plain C++ (no torch, no CUDA) so that every build flavour can include it.
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
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

// A fixed set of worker threads that run the tasks of one job at a time together with the caller.
class CopyPool {
 public:
  explicit CopyPool(int workers) {
    for (int i = 0; i < workers; ++i) {
      try {
        threads_.emplace_back([this] { loop(); });
      } catch (const std::system_error&) {
        break;  // out of threads: the ones started (and the caller) do the work
      }
    }
  }
  ~CopyPool() {
    {
      std::lock_guard<std::mutex> lock(m_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }
  CopyPool(const CopyPool&) = delete;
  CopyPool& operator=(const CopyPool&) = delete;

  int workers() const { return int(threads_.size()); }

  // Run task(0..n-1), spread over the workers and the calling thread; returns when all are done.
  // One job at a time (callers serialise on their own mutex).
  void run(int n, const std::function<void(int)>& task) {
    {
      std::lock_guard<std::mutex> lock(m_);
      task_ = &task;
      n_ = n;
      next_ = 0;
      left_ = n;
      ++generation_;
    }
    wake_.notify_all();
    work();
    std::unique_lock<std::mutex> lock(m_);
    done_.wait(lock, [this] { return left_ == 0; });
    task_ = nullptr;
  }

 private:
  void work() {  // take tasks until none are left
    for (;;) {
      int k;
      const std::function<void(int)>* task;
      {
        std::lock_guard<std::mutex> lock(m_);
        if (task_ == nullptr || next_ >= n_) return;
        k = next_++;
        task = task_;
      }
      (*task)(k);
      std::lock_guard<std::mutex> lock(m_);
      if (--left_ == 0) done_.notify_all();
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(m_);
        wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      work();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex m_;
  std::condition_variable wake_, done_;
  const std::function<void(int)>* task_ = nullptr;
  int n_ = 0, next_ = 0, left_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

// The process's copy pool (created on first use, sized for the most threads any caller asks for up to
// the core count) and the mutex that gives it to one copy at a time.
inline CopyPool& shared_copy_pool(int threads, std::unique_lock<std::mutex>& hold) {
  static std::mutex mutex;
  static std::unique_ptr<CopyPool> pool;
  hold = std::unique_lock<std::mutex>(mutex);
  const int cores = std::max(1, int(std::thread::hardware_concurrency()));
  const int want = std::min(threads, cores) - 1;
  if (!pool || pool->workers() < want) {
    pool.reset();  // joins the old workers (none is busy: we hold the mutex)
    pool.reset(new CopyPool(std::max(want, 0)));
  }
  return *pool;
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
  std::unique_lock<std::mutex> hold;
  CopyPool& pool = shared_copy_pool(n, hold);
  pool.run(n, [&](int k) { copy_range(spans, starts, bound(k), bound(k + 1)); });
}

}  // namespace moe_prefetch
