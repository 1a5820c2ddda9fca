// staged_copy_cuda.h: host -> GPU copies of non-pinned memory through a pinned staging ring.
//
// Declared with plain C++ types only (no CUDA or torch headers), so the torch-facing binding
// (bindings.cpp) compiles with any C++ compiler, and staged_copy_cuda.cu needs only the CUDA
// runtime API: `nvcc -c` checks it even where torch is a CPU build without the CUDA headers.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "staging_ring.h"

namespace moe_prefetch {

class CudaStagingRing {
 public:
  // n_chunks pinned chunks of chunk_bytes each, plus one event per chunk, on GPU `device`.
  CudaStagingRing(int64_t chunk_bytes, int n_chunks, int device);
  ~CudaStagingRing();
  CudaStagingRing(const CudaStagingRing&) = delete;
  CudaStagingRing& operator=(const CudaStagingRing&) = delete;

  // Copy `segments` (host memory, pageable) into the device buffer at `dst`, issuing every transfer on
  // `stream` (a cudaStream_t passed as an integer). Returns once the last transfer is issued; the
  // caller records its own event on `stream` to know when the bytes have landed.
  void copy(void* dst, const std::vector<Segment>& segments, std::uintptr_t stream, int threads);

  // Block until every transfer issued through this ring has finished.
  void synchronize();

  int64_t chunk_bytes() const;
  int slots() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::mutex mutex_;  // one copy at a time: the ring's slots are shared state
};

}  // namespace moe_prefetch
