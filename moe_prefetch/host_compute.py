"""HostExecutor: computes missed experts on the host CPU, straight from the expert store.

When copying an expert over the link would take longer than the host takes to read it and apply it
to a few token rows (decode: one row), the planner sends the expert here instead (hybrid execution,
as llama.cpp's --n-cpu-moe, Fiddler and HybriMoE do). One worker thread runs the jobs in order, so
the device keeps computing the layer's resident experts meanwhile:
  CUDA: the token rows are copied to the host (asynchronously, after an event), the expert runs with
        torch on the CPU, and the result goes back to the device when the layer collects it. The host's
        arithmetic differs from the GPU's, so this is opt-in there (--host-compute on).
  CPU backend: the same code path; the "device" is the CPU too, so the output is token-identical.
        host_bandwidth (bytes/s) throttles each job to expert_bytes / host_bandwidth, so benchmarks
        reproduce a GPU machine's third speed, as link_bandwidth does for the link.
Weights come from the pinned store's buffer when there is one, else the expert's pieces are gathered
from the memory-mapped checkpoint into a reused host buffer (the same bytes the slot would hold, so
the same arithmetic). With `packs` (host_kernels.HostPacks, quantized experts with host_kernel="fused")
the quantized matrices are repacked once per expert for PyTorch's weight-only CPU kernels and multiplied
without a dequantized copy. Errors are raised by result() in the caller.
"""
from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from .errors import MoePrefetchError
from .store import ExpertStore
from .transfer import sleep_until


@dataclass
class HostJob:
    layer: int
    expert: int
    fn: object                     # fn(views, rows [n, H]) -> [n, H]: the expert's MLP
    rows: torch.Tensor             # [n, H] on the host
    ready: object = None           # CUDA event: the rows have reached the host
    out: torch.Tensor | None = None
    error: BaseException | None = None
    seconds: float = 0.0           # how long the host took (throttle included; an emulated host: bytes / its bandwidth)
    ready_at: float = 0.0          # when its result is ready (perf_counter): inline (an emulated host), known at
                                   # submit; on the worker thread, set when the job finishes
    done: threading.Event = field(default_factory=threading.Event)


class HostExecutor:
    INLINE_MAX_BYTES = 1 << 20  # an emulated host computes experts up to this size on the caller's thread
    def __init__(self, store: ExpertStore, device: torch.device, host_bandwidth: float | None = None,
                 packs=None):
        if host_bandwidth is not None and not host_bandwidth > 0:
            raise MoePrefetchError(f"host bandwidth must be a positive number of bytes/s, got {host_bandwidth!r}")
        self.store = store
        self.device = device
        self.host_bandwidth = host_bandwidth
        self.packs = packs  # host_kernels.HostPacks, or None: the exact path (dequantize, then the device's mm)
        self._scratch = None  # [numel] host buffer for experts gathered from the checkpoint
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self.jobs = 0
        self.busy_seconds = 0.0
        self._warm_jobs, self._warm_seconds = 0, 0.0  # the jobs after the first, and their time
        # An emulated host (host_bandwidth on the CPU backend) is a timeline, not a thread: a job computes
        # at once on the caller's thread and its result is ready when the emulated host would have finished
        # it, one job at a time. A second Python thread per job costs the compute thread far more on a small
        # CPU machine than the expert's own arithmetic (its wake-ups take the interpreter lock between the
        # compute thread's torch calls), and it is the emulated speed the benchmarks mean to reproduce.
        # (experts over INLINE_MAX_BYTES keep the thread: their arithmetic, milliseconds, costs more than it)
        self.inline = (host_bandwidth is not None and torch.device(device).type == "cpu"
                       and store.expert_nbytes <= self.INLINE_MAX_BYTES)
        self._host_free = 0.0  # inline: when the emulated host finishes the jobs queued on it
        self._thread = None
        if not self.inline:
            self._thread = threading.Thread(target=self._loop, name="moe-prefetch-host", daemon=True)
            self._thread.start()

    def submit(self, layer: int, expert: int, fn, rows: torch.Tensor) -> HostJob:
        """Queue expert `expert` of `layer` on `rows` [n, H] (any device); returns at once."""
        if self._stop.is_set():
            raise MoePrefetchError("the host executor is closed")
        ready = None
        if rows.device.type == "cuda":
            rows = rows.to("cpu", non_blocking=True)  # pinned staging, in stream order
            ready = torch.cuda.Event(blocking=True)
            ready.record(torch.cuda.current_stream(self.device))
        job = HostJob(layer, expert, fn, rows, ready)
        if self.inline:
            self._run_inline(job)
        else:
            self._queue.put(job)
        return job

    def _run_inline(self, job: HostJob) -> None:
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                job.out = job.fn(self._views(job.layer, job.expert), job.rows)
        except Exception as e:  # handed to the caller by result(); a KeyboardInterrupt propagates from here
            job.error = e
        # the emulated host takes the job when it is free and spends expert bytes / its bandwidth on it; the
        # arithmetic done here stands in for it, on the caller's time (so a cold first call, which can take
        # milliseconds, is not taken for the host's speed)
        job.seconds = self.store.expert_nbytes / self.host_bandwidth
        self._host_free = max(t0, self._host_free) + job.seconds
        job.ready_at = self._host_free
        self._count(job)
        job.done.set()

    def _count(self, job: HostJob) -> None:
        self.jobs += 1
        self.busy_seconds += job.seconds
        if self.jobs > 1:  # the first job warms up (kernels, buffers): not a measure of the host's speed
            self._warm_jobs += 1
            self._warm_seconds += job.seconds

    def seconds_per_job(self) -> float | None:
        """The host's mean time per job, the first (warm-up) job left out; None before a second job.
        The planner prices host compute with it: one slow cold job counted in would make the host look
        slow enough never to be chosen again, and so never measured again."""
        return self._warm_seconds / self._warm_jobs if self._warm_jobs else None

    def ready_at(self, jobs) -> float:
        """When the last of `jobs` has its result ready (perf_counter); inf while one is still running."""
        if self.inline:
            return max((job.ready_at for job in jobs), default=-math.inf)
        return max((job.ready_at if job.done.is_set() else math.inf for job in jobs), default=-math.inf)

    def result(self, job: HostJob) -> torch.Tensor:
        """The job's output on the compute device; waits for it (interruptibly)."""
        if self.inline:
            sleep_until(job.ready_at)
        while not job.done.wait(0.5):
            if not self._thread.is_alive():
                raise MoePrefetchError("the host compute thread died")
        if job.error is not None:
            raise MoePrefetchError(f"host compute of expert {job.expert} of layer {job.layer} failed: "
                                   f"{type(job.error).__name__}: {job.error}") from job.error
        return job.out.to(self.device, non_blocking=True) if self.device.type == "cuda" else job.out

    def _views(self, layer: int, expert: int) -> dict:
        if self.packs is None:
            return self._raw_views(layer, expert)
        return self.packs.get(layer, expert, lambda: self._raw_views(layer, expert))

    def _raw_views(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        pieces = self.store.pieces(layer, expert)
        if self.store.pinned:
            flat = pieces[0][1]  # the expert's own packed buffer, at the compute dtype
        else:
            if self._scratch is None:
                self._scratch = torch.empty(self.store.numel, dtype=self.store.dtype)  # [numel]
            from . import _native

            _native.gather_copy(self._scratch, pieces, ext=_native.extension())
            flat = self._scratch
        return self.store.layout.views(flat)

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            t0 = time.perf_counter()
            try:
                if job.ready is not None:
                    job.ready.synchronize()
                with torch.inference_mode():
                    job.out = job.fn(self._views(job.layer, job.expert), job.rows)
                if self.host_bandwidth:
                    rest = self.store.expert_nbytes / self.host_bandwidth - (time.perf_counter() - t0)
                    if rest > 0:
                        self._stop.wait(rest)
            except BaseException as e:  # noqa: BLE001 - handed to the caller by result()
                job.error = e
            finally:
                job.ready_at = time.perf_counter()
                job.seconds = job.ready_at - t0
                self._count(job)
                job.done.set()

    def close(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join()
