"""The only places the hot path reads tensor data on the host.

A decode step on a GPU is a stream of small kernels; every time the host reads a device tensor
(`.tolist()`, `.item()`, `.cpu()`, `nonzero`, `unique`, `bincount`, boolean indexing) it waits for
the whole stream to drain, and the GPU idles while the host catches up. A MoE layer has to read one
thing, its routing (the host must know which experts to fetch), so each layer makes exactly one read:
read_back() of the routing and, in the same transfer, the device-side predictions. Everything else the
host plans with comes from Python lists or from host_list() on tensors that live on the CPU.
tests/test_hot_path.py counts sync-inducing operations per decode layer against this rule.
"""
from __future__ import annotations

import threading

import torch

_state = threading.local()


def inside() -> bool:
    """True while read_back() or host_list() is reading (the sync-counting test skips those reads)."""
    return getattr(_state, "depth", 0) > 0


class _Reading:
    def __enter__(self):
        _state.depth = getattr(_state, "depth", 0) + 1

    def __exit__(self, *exc):
        _state.depth -= 1


def read_back(tensors: list[torch.Tensor]) -> list[list]:
    """Nested Python lists of `tensors`, read with one device synchronisation in all (CUDA: asynchronous
    copies into page-locked host memory, one event, one wait); no synchronisation on the CPU backend."""
    with _Reading():
        if not tensors or all(t.device.type == "cpu" for t in tensors):
            return [t.tolist() for t in tensors]
        host = [t.to("cpu", non_blocking=True) for t in tensors]  # D2H into pinned buffers, in stream order
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(tensors[0].device))
        done.synchronize()  # the layer's one wait: router (and predictor) output has landed
        return [t.tolist() for t in host]


def host_list(t: torch.Tensor) -> list:
    """Python list of a tensor that lives on the host (a host-side predictor's scores). Refuses a device
    tensor: reading one would be a second synchronisation in the layer."""
    if t.device.type != "cpu":
        raise AssertionError(f"host_list() of a {t.device} tensor would synchronise the device; use read_back()")
    with _Reading():
        return t.tolist()
