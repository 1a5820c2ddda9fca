// bindings.cpp: the torch-facing side of moe_prefetch._C.
//
//   gather_copy(dst, pieces, threads)        pieces -> flat CPU buffer, std::threads, GIL released
//   HostStagingRing(chunk_bytes, n_chunks)    the staging pipeline with a host "device" (CPU twin, tests)
//   CudaStagingRing(chunk_bytes, n_chunks, device)   (CUDA builds only) pinned ring, cudaMemcpyAsync
//   has_cuda()                                whether this build contains the CUDA ring
//
// `pieces` is a list of (element offset into dst, source tensor), the same shape as CopyJob.pieces.
// Every op checks its inputs with TORCH_CHECK (a RuntimeError in Python) before touching memory; the
// Python side (moe_prefetch/_native.py) only sends same-dtype contiguous CPU sources and converts the
// rest itself, so these checks guard against misuse, not the normal path.
// Only the light ATen + pybind headers are included: torch/extension.h triples the compile time.
// Classes are py::module_local() so a JIT build and an installed build can both load in one process.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

#include "parallel_copy.h"
#include "staging_ring.h"
#ifdef MOE_PREFETCH_WITH_CUDA
#include "staged_copy_cuda.h"
#endif

namespace py = pybind11;
using moe_prefetch::CopySpan;
using moe_prefetch::Segment;
using Pieces = std::vector<std::pair<int64_t, at::Tensor>>;

namespace {

// Validate `pieces` against `dst` and turn them into byte segments (dst offsets in bytes).
std::vector<Segment> plan(const char* op, const at::Tensor& dst, const Pieces& pieces) {
  TORCH_CHECK(dst.is_contiguous(), op, ": the destination must be contiguous");
  const int64_t numel = dst.numel();
  const int64_t esize = int64_t(dst.element_size());
  std::vector<Segment> segments;
  segments.reserve(pieces.size());
  std::vector<std::pair<int64_t, size_t>> order;  // (offset, piece index), for the overlap check
  for (size_t i = 0; i < pieces.size(); ++i) {
    const int64_t offset = pieces[i].first;
    const at::Tensor& src = pieces[i].second;
    TORCH_CHECK(src.device().is_cpu(), op, ": piece ", i, " is on ", src.device(), ", expected host memory");
    TORCH_CHECK(src.scalar_type() == dst.scalar_type(), op, ": piece ", i, " has dtype ", src.scalar_type(),
                " but the destination has ", dst.scalar_type(), " (the _ref twin converts dtypes)");
    TORCH_CHECK(src.is_contiguous(), op, ": piece ", i, " is not contiguous (the _ref twin handles strides)");
    const int64_t n = src.numel();
    TORCH_CHECK(offset >= 0 && offset <= numel && n <= numel - offset, op, ": piece ", i, " (", n,
                " elements at offset ", offset, ") does not fit a destination of ", numel, " elements");
    if (n == 0) continue;
    segments.push_back({static_cast<const char*>(src.data_ptr()), offset * esize, n * esize});
    order.emplace_back(offset, i);
  }
  // Threads copy pieces concurrently, so overlapping pieces would race: refuse them.
  std::sort(order.begin(), order.end());
  for (size_t k = 1; k < order.size(); ++k) {
    const auto& prev = pieces[order[k - 1].second];
    TORCH_CHECK(prev.first + prev.second.numel() <= order[k].first, op, ": pieces ", order[k - 1].second, " and ",
                order[k].second, " overlap at element ", order[k].first);
  }
  return segments;
}

void gather_copy(at::Tensor dst, const Pieces& pieces, int64_t threads) {
  TORCH_CHECK(dst.device().is_cpu(), "gather_copy: the destination is on ", dst.device(), ", expected host memory");
  std::vector<Segment> segments = plan("gather_copy", dst, pieces);
  char* base = static_cast<char*>(dst.data_ptr());
  std::vector<CopySpan> spans;
  spans.reserve(segments.size());
  for (const Segment& s : segments) spans.push_back({s.src, base + s.dst_offset, s.nbytes});
  py::gil_scoped_release no_gil;  // the tensors stay alive: `pieces` holds references until we return
  moe_prefetch::parallel_memcpy(spans, int(threads));
}

void host_ring_copy(moe_prefetch::HostStagingRing& ring, at::Tensor dst, const Pieces& pieces, int64_t threads) {
  TORCH_CHECK(dst.device().is_cpu(), "staged_copy: the host ring writes host memory, got ", dst.device());
  std::vector<Segment> segments = plan("staged_copy", dst, pieces);
  py::gil_scoped_release no_gil;
  ring.copy(static_cast<char*>(dst.data_ptr()), segments, int(threads));
}

#ifdef MOE_PREFETCH_WITH_CUDA
void cuda_ring_copy(moe_prefetch::CudaStagingRing& ring, at::Tensor dst, const Pieces& pieces, std::uintptr_t stream,
                    int64_t threads) {
  TORCH_CHECK(dst.device().is_cuda(), "staged_copy: the destination must be a CUDA tensor, got ", dst.device());
  std::vector<Segment> segments = plan("staged_copy", dst, pieces);
  py::gil_scoped_release no_gil;
  ring.copy(dst.data_ptr(), segments, stream, int(threads));
}
#endif

bool has_cuda() {
#ifdef MOE_PREFETCH_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_prefetch native copies; see moe_prefetch/_native.py for the PyTorch twins";
  m.def("gather_copy", &gather_copy, py::arg("dst"), py::arg("pieces"), py::arg("threads") = 1,
        "Copy (element offset, CPU tensor) pieces into the contiguous CPU tensor dst with `threads` threads.");
  m.def("has_cuda", &has_cuda, "True when this build contains the CUDA staging ring.");

  py::class_<moe_prefetch::HostStagingRing>(m, "HostStagingRing", py::module_local(),
                                            "The staging ring with a host destination (CPU twin of CudaStagingRing).")
      .def(py::init<int64_t, int>(), py::arg("chunk_bytes"), py::arg("n_chunks"))
      .def("copy", &host_ring_copy, py::arg("dst"), py::arg("pieces"), py::arg("threads") = 1)
      .def_property_readonly("chunk_bytes", &moe_prefetch::HostStagingRing::chunk_bytes)
      .def_property_readonly("slots", &moe_prefetch::HostStagingRing::slots);

#ifdef MOE_PREFETCH_WITH_CUDA
  py::class_<moe_prefetch::CudaStagingRing>(m, "CudaStagingRing", py::module_local(),
                                            "Host -> GPU copies of pageable memory through a pinned ring.")
      .def(py::init<int64_t, int, int>(), py::arg("chunk_bytes"), py::arg("n_chunks"), py::arg("device"))
      .def("copy", &cuda_ring_copy, py::arg("dst"), py::arg("pieces"), py::arg("stream"), py::arg("threads") = 1,
           "Issue the copies on `stream` (torch.cuda.Stream.cuda_stream); returns once all are issued.")
      .def("synchronize", &moe_prefetch::CudaStagingRing::synchronize, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("chunk_bytes", &moe_prefetch::CudaStagingRing::chunk_bytes)
      .def_property_readonly("slots", &moe_prefetch::CudaStagingRing::slots);
#endif
}
