// staged_copy_cuda.cu: the CUDA Mover of the staging ring (see staging_ring.h).
//
// Each ring slot is a pinned host chunk with one blocking-sync event. Per chunk: cudaEventSynchronize(slot event)
// so the host never overwrites a chunk that a transfer still reads, stage the bytes with host threads,
// cudaMemcpyAsync chunk -> device on the caller's stream, cudaEventRecord(slot event). The copies are
// truly asynchronous because the source is pinned, so staging chunk k+1 overlaps the transfer of k.
// Only the CUDA runtime API is used here (no torch headers), so this file compiles with a bare nvcc.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "staged_copy_cuda.h"

namespace moe_prefetch {
namespace {

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("moe_prefetch staged copy: ") + what + " failed: " + cudaGetErrorString(err));
}

// Makes `device` current for the scope (events and pinned memory belong to a device), then restores.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check(cudaSetDevice(device), "cudaSetDevice");
    changed_ = previous_ != device;
  }
  ~DeviceScope() {
    if (changed_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = 0;
  bool changed_ = false;
};

}  // namespace

struct CudaStagingRing::Impl {
  int device;
  int64_t bytes;
  std::vector<char*> chunks;        // pinned host memory
  std::vector<cudaEvent_t> done;    // recorded after the transfers that read chunks[i]
  std::vector<bool> armed;          // done[i] has been recorded at least once
  char* dst = nullptr;              // the copy in progress
  cudaStream_t stream = nullptr;

  Impl(int64_t chunk_bytes, int n_chunks, int dev) : device(dev), bytes(chunk_bytes) {
    check_ring_shape(chunk_bytes, n_chunks);
    DeviceScope scope(device);
    try {
      for (int i = 0; i < n_chunks; ++i) {
        void* p = nullptr;
        check(cudaHostAlloc(&p, size_t(chunk_bytes), cudaHostAllocPortable), "cudaHostAlloc (pinned staging chunk)");
        chunks.push_back(static_cast<char*>(p));
        cudaEvent_t e;
        // blocking sync: a host thread waiting for a chunk sleeps instead of spinning on a core
        check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync), "cudaEventCreate");
        done.push_back(e);
        armed.push_back(false);
      }
    } catch (...) {
      release();
      throw;
    }
  }
  ~Impl() { release(); }

  void release() noexcept {
    for (size_t i = 0; i < done.size(); ++i) {
      if (armed[i]) cudaEventSynchronize(done[i]);  // a transfer may still read the chunk
      cudaEventDestroy(done[i]);
    }
    for (char* p : chunks) cudaFreeHost(p);
    done.clear();
    chunks.clear();
    armed.clear();
  }

  // ---- Mover interface used by run_staged ----
  int slots() const { return int(chunks.size()); }
  int64_t chunk_bytes() const { return bytes; }
  char* chunk(int slot) { return chunks[slot]; }
  void wait(int slot) {
    if (armed[slot]) check(cudaEventSynchronize(done[slot]), "cudaEventSynchronize (staging chunk)");
  }
  void move(int slot, int64_t chunk_offset, int64_t dst_offset, int64_t nbytes) {
    check(cudaMemcpyAsync(dst + dst_offset, chunks[slot] + chunk_offset, size_t(nbytes), cudaMemcpyHostToDevice, stream),
          "cudaMemcpyAsync (host to device)");
  }
  void mark(int slot) {
    check(cudaEventRecord(done[slot], stream), "cudaEventRecord");
    armed[slot] = true;
  }
};

CudaStagingRing::CudaStagingRing(int64_t chunk_bytes, int n_chunks, int device)
    : impl_(new Impl(chunk_bytes, n_chunks, device)) {}

CudaStagingRing::~CudaStagingRing() = default;

void CudaStagingRing::copy(void* dst, const std::vector<Segment>& segments, std::uintptr_t stream, int threads) {
  std::lock_guard<std::mutex> lock(mutex_);
  DeviceScope scope(impl_->device);
  impl_->dst = static_cast<char*>(dst);
  impl_->stream = reinterpret_cast<cudaStream_t>(stream);
  run_staged(*impl_, segments, threads);
  impl_->dst = nullptr;
}

void CudaStagingRing::synchronize() {
  std::lock_guard<std::mutex> lock(mutex_);
  DeviceScope scope(impl_->device);
  for (int i = 0; i < impl_->slots(); ++i) impl_->wait(i);
}

int64_t CudaStagingRing::chunk_bytes() const { return impl_->bytes; }
int CudaStagingRing::slots() const { return impl_->slots(); }

}  // namespace moe_prefetch
