"""Host memory: how much of the expert store may be page-locked, and pinning it safely.

Page-locked (pinned) memory is what lets the GPU's copy engine read an expert asynchronously, but the
kernel cannot swap it out: pinning more than the host can spare takes the whole machine down (the OOM
killer, mid-load). So the plan is decided up front, from numbers, before a byte is allocated:
  pin_memory="on"    pin every expert; refused with the numbers when they do not fit with a margin;
  pin_memory="off"   experts stay in the memory-mapped checkpoint and stream through a small pinned
                     staging ring (page cache, not pinned RAM: the kernel may reclaim it);
  pin_memory="auto"  "on" when it fits, else "off".
The CPU backend never pins (the "device" is RAM); there the check is that the expert cache and the
dense weights fit in available RAM.

PinnedBlocks registers plain allocations with cudaHostRegister at their exact size (torch's pinned
allocator rounds each request up to a power of two: 4 GiB for a 2.6 GiB Mixtral layer). Each block's
unregistration is set up the moment it is registered, so an exception halfway through a load releases
everything pinned so far; a failed registration clears CUDA's last-error state, which would otherwise
surface later as an unrelated error from the next checked kernel launch.
"""
from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass

import psutil
import torch

from .config import PIN_MODES, format_size
from .errors import MoePrefetchError


def host_margin(total_ram: int) -> int:
    """RAM left unpinned for the OS, Python, torch and the page cache: 10% of RAM, at least 4 GiB."""
    return max(4 * 2**30, total_ram // 10)


@dataclass(frozen=True)
class HostPlan:
    pinned: bool            # the expert store is page-locked
    store_bytes: int        # bytes of all experts at the store dtype
    resident_bytes: int     # host RAM the plan takes: pinned store, or the CPU backend's cache + dense
    available_bytes: int    # available host RAM when planned
    margin_bytes: int
    reason: str             # one line: why this plan

    @property
    def fits(self) -> bool:
        return self.resident_bytes + self.margin_bytes <= self.available_bytes


def plan_host(mode: str, device_type: str, store_bytes: int, device_side_bytes: int = 0,
              available: int | None = None, total: int | None = None) -> HostPlan:
    """Decide whether to pin the expert store, or refuse the load, from host RAM numbers.

    device_side_bytes: on the CPU backend, what the device plan puts in RAM (dense weights, reserve,
    cache slots). available/total default to psutil's view of this machine (tests pass their own)."""
    if mode not in PIN_MODES:
        raise MoePrefetchError(f"unknown pin_memory mode {mode!r}: use one of {', '.join(PIN_MODES)}")
    vm = psutil.virtual_memory() if available is None or total is None else None
    available = vm.available if available is None else available
    total = vm.total if total is None else total
    margin = host_margin(total)
    if device_type != "cuda":
        if mode == "on":
            raise MoePrefetchError("--pin-memory on needs a CUDA device: pinned memory only speeds up "
                                   "host-to-GPU copies (the CPU backend reads the memory-mapped checkpoint)")
        plan = HostPlan(False, store_bytes, device_side_bytes, available, margin, "CPU backend: nothing to pin")
        if device_side_bytes > available:
            raise MoePrefetchError(
                f"the CPU plan needs {format_size(device_side_bytes)} of RAM (dense weights, reserve and expert "
                f"cache) but only {format_size(available)} is available: pass a smaller --device-memory or --expert-cache")
        return plan
    pinned = HostPlan(True, store_bytes, store_bytes, available, margin, "")
    if mode == "off":
        return HostPlan(False, store_bytes, 0, available, margin, "--pin-memory off: experts stream from the "
                        "memory-mapped checkpoint through a pinned staging ring")
    if pinned.fits:
        return HostPlan(True, store_bytes, store_bytes, available, margin,
                        f"pinning {format_size(store_bytes)} of experts ({format_size(available)} available, "
                        f"{format_size(margin)} kept free)")
    why = (f"pinning every expert needs {format_size(store_bytes)} + a {format_size(margin)} margin of host RAM "
           f"but {format_size(available)} is available")
    if mode == "on":
        raise MoePrefetchError(f"{why}: use --pin-memory off (or auto) to stream experts from the memory-mapped "
                               "checkpoint instead")
    return HostPlan(False, store_bytes, 0, available, margin,
                    f"{why}: streaming experts from the memory-mapped checkpoint instead")


class PinningError(MoePrefetchError):
    """cudaHostRegister refused a block; everything pinned before it has been released."""


def _cudart_last_error_reset() -> bool:
    """Clear the calling thread's CUDA last-error state (cudaGetLastError). torch does not expose it, so
    this finds the CUDA runtime library the process has already loaded. False if it cannot."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libcudart" in line and "/" in line}
    except OSError:
        return False
    for path in sorted(paths):
        try:
            ctypes.CDLL(path).cudaGetLastError()
            return True
        except (OSError, AttributeError):
            continue
    return False


def _cuda_register(ptr: int, nbytes: int) -> str | None:
    """cudaHostRegister; None on success, else the CUDA error string (and the error state cleared)."""
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, nbytes, 0)
    code = int(getattr(err, "value", err))
    if code == 0:
        return None
    message = cudart.cudaGetErrorString(err) if hasattr(cudart, "cudaGetErrorString") else f"error {code}"
    if not _cudart_last_error_reset():
        raise PinningError(f"cudaHostRegister failed ({message}) and the CUDA error state could not be cleared; "
                           "restart with --pin-memory off")
    return str(message)


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


class PinnedBlocks:
    """Host buffers page-locked at their exact size; release() (or garbage collection) unpins them all.
    `register`/`unregister` are injectable so the CPU-only tests can exercise the failure paths."""

    def __init__(self, register=_cuda_register, unregister=_cuda_unregister):
        self._register = register
        self._unregister = unregister
        # (address, block) pairs: holding the block keeps its memory alive until it is unregistered.
        # One finalizer for the lifetime of this object, over a list that grows block by block: a block
        # is covered the moment it is registered, not after the loading loop ends.
        self._blocks: list[tuple[int, torch.Tensor]] = []
        self._finalizer = weakref.finalize(self, _unregister_all, self._blocks, unregister)

    def allocate(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A [numel] host tensor, page-locked. Raises PinningError (after releasing every earlier block)
        when the driver refuses."""
        block = torch.empty(numel, dtype=dtype)  # plain allocation: exact size, no power-of-two rounding
        nbytes = numel * block.element_size()
        error = self._register(block.data_ptr(), nbytes)
        if error is not None:
            pinned = len(self._blocks)
            self.release()
            raise PinningError(f"cannot pin {format_size(nbytes)} of host memory (cudaHostRegister: {error}) after "
                               f"{pinned} blocks; use --pin-memory off to stream experts from the checkpoint")
        self._blocks.append((block.data_ptr(), block))
        return block

    @property
    def count(self) -> int:
        return len(self._blocks)

    def release(self) -> None:
        _unregister_all(self._blocks, self._unregister)


def _unregister_all(blocks: list, unregister) -> None:
    while blocks:
        ptr, _block = blocks.pop()  # the block is freed only after it is unregistered
        try:
            unregister(ptr)
        except Exception:  # noqa: BLE001 - best effort at shutdown; the memory is freed either way
            pass
