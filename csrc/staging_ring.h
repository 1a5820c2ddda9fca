// staging_ring.h: the pipeline that feeds a device buffer from non-pinned host memory through a small
// ring of staging chunks.
//
// A DMA engine can only read page-locked (pinned) memory asynchronously. Pinning a whole model is what
// a host with less RAM than the model cannot afford, so an expert is streamed instead:
//
//   chunk k:   wait until ring slot k % n is free (its previous transfer finished)
//              stage: host threads copy the next chunk_bytes of the expert's pieces into the slot
//              move:  issue the slot -> device copies (async), then mark the slot busy
//
// Because "move" only issues work, the host stages chunk k+1 while chunk k is on the link.
// The Mover supplies the four device-specific steps, so the same loop runs
//   - with CUDA (staged_copy_cuda.cu: pinned chunks, cudaMemcpyAsync, one cudaEvent per slot), and
//   - on the host (HostMover below: plain memcpy), which lets the CPU-only tests check the chunking,
//     the piece boundaries and the offsets of this loop byte for byte against the PyTorch twin.
// Plain C++ (no torch, no CUDA headers).
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel_copy.h"

namespace moe_prefetch {

// `nbytes` bytes at `src` go to byte `dst_offset` of the destination buffer.
struct Segment {
  const char* src;
  int64_t dst_offset;
  int64_t nbytes;
};

// Mover interface (duck-typed):
//   int slots() const;  int64_t chunk_bytes() const;  char* chunk(int slot);
//   void wait(int slot);                                  block until the slot may be overwritten
//   void move(int slot, int64_t chunk_offset, int64_t dst_offset, int64_t nbytes);
//   void mark(int slot);                                  the moves just issued read this slot
template <class Mover>
void run_staged(Mover& m, const std::vector<Segment>& segments, int threads) {
  const int64_t cap = m.chunk_bytes();
  struct Run {  // one device copy: chunk bytes [chunk_offset, +nbytes) -> dst bytes [dst_offset, +nbytes)
    int64_t chunk_offset, dst_offset, nbytes;
  };
  std::vector<CopySpan> stage;
  std::vector<Run> runs;
  size_t seg = 0;
  int64_t seg_pos = 0;  // bytes of segments[seg] already staged
  for (int64_t k = 0; seg < segments.size(); ++k) {
    const int slot = int(k % m.slots());
    m.wait(slot);  // its previous transfer must be done before we overwrite it
    char* base = m.chunk(slot);
    stage.clear();
    runs.clear();
    int64_t used = 0;
    while (used < cap && seg < segments.size()) {
      const Segment& s = segments[seg];
      const int64_t take = std::min(cap - used, s.nbytes - seg_pos);
      if (take > 0) {
        const int64_t dst = s.dst_offset + seg_pos;
        // pieces laid out back to back in the destination become one device copy
        if (!runs.empty() && runs.back().dst_offset + runs.back().nbytes == dst)
          runs.back().nbytes += take;
        else
          runs.push_back({used, dst, take});
        stage.push_back({s.src + seg_pos, base + used, take});
        used += take;
        seg_pos += take;
      }
      if (seg_pos == s.nbytes) {
        ++seg;
        seg_pos = 0;
      }
    }
    if (used == 0) break;  // only empty segments were left
    parallel_memcpy(stage, threads);
    for (const Run& r : runs) m.move(slot, r.chunk_offset, r.dst_offset, r.nbytes);
    m.mark(slot);
  }
}

inline void check_ring_shape(int64_t chunk_bytes, int n_chunks) {
  if (chunk_bytes < 1 || n_chunks < 2)
    throw std::invalid_argument("staging ring needs chunk_bytes >= 1 and at least 2 chunks (got " +
                                std::to_string(chunk_bytes) + " bytes x " + std::to_string(n_chunks) + ")");
}

// The host-only Mover: "device" = a host buffer, moves are synchronous memcpy, nothing to wait for.
class HostStagingRing {
 public:
  HostStagingRing(int64_t chunk_bytes, int n_chunks) : chunk_bytes_(chunk_bytes) {
    check_ring_shape(chunk_bytes, n_chunks);
    for (int i = 0; i < n_chunks; ++i) chunks_.emplace_back(new char[size_t(chunk_bytes)]);
  }
  // Copy `segments` into the buffer at `dst` through the ring.
  void copy(char* dst, const std::vector<Segment>& segments, int threads) {
    dst_ = dst;
    run_staged(*this, segments, threads);
  }
  int slots() const { return int(chunks_.size()); }
  int64_t chunk_bytes() const { return chunk_bytes_; }
  char* chunk(int slot) { return chunks_[slot].get(); }
  void wait(int) {}
  void move(int slot, int64_t chunk_offset, int64_t dst_offset, int64_t nbytes) {
    std::memcpy(dst_ + dst_offset, chunks_[slot].get() + chunk_offset, size_t(nbytes));
  }
  void mark(int) {}

 private:
  int64_t chunk_bytes_;
  std::vector<std::unique_ptr<char[]>> chunks_;
  char* dst_ = nullptr;
};

}  // namespace moe_prefetch
