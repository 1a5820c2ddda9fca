"""TransferEngine: moves expert bytes into device slots asynchronously.

Two backends behind one interface, each using the native copies (moe_prefetch._native) when the
extension is loaded and their PyTorch twins otherwise; `engine.backend` names the choice:
  CPUThreadEngine   "cpu-thread/native|ref": one worker thread gathers an expert's pieces (memory-mapped
                    checkpoint pages) into its RAM slot with gather_copy; wait() blocks until that is done.
                    Optionally throttled to an emulated host-to-device link (link_bandwidth, bytes/s).
  CUDAStreamEngine  "cuda-stream/native|ref": copies are ordered on a dedicated copy stream, one event per
                    expert; wait() makes the *compute stream* wait on that event (no host synchronisation).
                    Pinned sources: plain async copies issued from submit(). Pageable sources (a store
                    that is not pinned, e.g. mmap pieces on a host with less RAM than the model): a worker
                    thread streams them through a small pinned staging ring, so the compute thread never
                    blocks on the host-side staging.
Ordering: the CPU engine runs demand copies (an executing layer waits for them) ahead of queued
prefetches, and a queued prefetch whose expert gets evicted is cancelled before it runs; since one
worker copies at a time, a copy into a slot still lands after any earlier copy into that slot. The
CUDA engine is strictly FIFO on its copy stream (work on a stream cannot be withdrawn).
Any failure is stored in the ticket and raised by wait() in the caller's thread as a TransferError;
close() joins every thread and fails the copies still queued; nothing hangs.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import MoePrefetchError

# moe_prefetch._native is imported when an engine is built, not with the package: `import moe_prefetch`
# stays free of extension loading, and `python -m moe_prefetch._native` runs without a double import.


class TransferError(RuntimeError):
    """An expert copy failed; raised in the thread that waits for it."""


@dataclass
class CopyJob:
    """Copy `pieces` (element offset into dst, source tensor) into the flat buffer `dst`."""

    dst: torch.Tensor
    pieces: list[tuple[int, torch.Tensor]]
    nbytes: int
    label: str = ""
    after: Any = None  # CUDA event: the slot is free once the compute stream passes it
    demand: bool = True  # False for prefetches: they yield to demand copies and may be cancelled


@dataclass
class Ticket:
    """One submitted job. `host` is set when the host side is finished (CPU: the copy is done; CUDA
    staged: every transfer is issued); `event` (CUDA) completes when the bytes have landed."""

    job: CopyJob
    submitted: float = field(default_factory=time.perf_counter)
    host: threading.Event | None = None
    event: Any = None  # torch.cuda.Event
    error: BaseException | None = None
    state: str = "queued"  # queued -> running -> finished, or queued -> cancelled
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def cancel(self) -> bool:
        """Withdraw a copy that has not started (its slot was given to another expert)."""
        with self._lock:
            if self.state != "queued":
                return False
            self.state = "cancelled"
        if self.host is not None:
            self.host.set()
        return True

    def start(self) -> bool:
        with self._lock:
            if self.state != "queued":
                return False
            self.state = "running"
            return True

    def done(self) -> bool:
        if self.error is not None:
            return True
        if self.host is not None and not self.host.is_set():
            return False
        return self.event is None or self.event.query()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error
        if self.host is not None:
            self.host.set()


def check_fit(job: CopyJob) -> None:
    """Every piece inside the destination (the copy itself checks again, without the label)."""
    for offset, src in job.pieces:
        n = src.numel()
        if offset < 0 or offset + n > job.dst.numel():
            raise TransferError(
                f"copy of {job.label or 'expert'} does not fit: {n} elements at offset {offset} "
                f"into a buffer of {job.dst.numel()}")


def run_copy(job: CopyJob, non_blocking: bool = False) -> None:
    """Perform the copies of one job with torch copy_ (dtype conversion included), checking shapes first."""
    check_fit(job)
    for offset, src in job.pieces:
        job.dst[offset:offset + src.numel()].view(src.shape).copy_(src, non_blocking=non_blocking)


class TransferEngine:
    """Interface: submit() a CopyJob, wait() for its ticket, close() when done."""

    backend = "none"

    def submit(self, job: CopyJob) -> Ticket:
        raise NotImplementedError

    def wait(self, ticket: Ticket) -> float:
        """Make the compute side wait for `ticket`'s copy; returns host seconds blocked.
        Raises TransferError if the copy failed."""
        raise NotImplementedError

    def stall_seconds(self) -> float:
        """Compute-side seconds spent waiting for copies that the engine measured itself."""
        return 0.0

    def cancel(self, ticket: Ticket) -> bool:
        """Withdraw a copy that has not started; False if it started or the engine cannot withdraw."""
        return False

    def reset_stats(self) -> None:
        """Zero the stall time the engine measured itself."""

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Worker:
    """One daemon thread running `handle(ticket)` for queued tickets: FIFO, or with `priority`,
    demand copies first (FIFO within each class). Cancelled tickets are skipped."""

    _STOP = 9  # sorts after every job

    def __init__(self, handle, name: str, priority: bool = False):
        self._handle = handle
        self._priority = priority
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = 0
        self._seq_lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.thread.start()

    def _next(self) -> int:
        with self._seq_lock:
            self._seq += 1
            return self._seq

    def _loop(self) -> None:
        while True:
            _, _, ticket = self._queue.get()
            if ticket is None:
                return
            if not ticket.start():
                continue  # cancelled while queued
            try:
                self._handle(ticket)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                ticket.error = e
            finally:
                ticket.state = "finished"
                ticket.host.set()

    def put(self, ticket: Ticket) -> None:
        rank = 0 if (ticket.job.demand or not self._priority) else 1
        self._queue.put((rank, self._next(), ticket))

    def stop(self) -> None:
        """Fail what is still queued (the copy in progress finishes), then join the thread."""
        while True:
            try:
                _, _, t = self._queue.get_nowait()
            except queue.Empty:
                break
            if t is not None and t.start():
                t.fail(TransferError(f"transfer engine was closed before the copy of {t.job.label or 'expert'} ran"))
        self._queue.put((self._STOP, self._next(), None))
        self.thread.join()

    def wait(self, ticket: Ticket) -> None:
        """Block until the worker is done with `ticket` (interruptible: polls, so Ctrl-C gets through)."""
        while not ticket.host.wait(0.5):
            if not self.thread.is_alive():
                ticket.fail(TransferError("transfer worker thread died"))
                break


def _closed_ticket(job: CopyJob) -> Ticket:
    ticket = Ticket(job, host=threading.Event())
    ticket.fail(TransferError(f"transfer engine is closed: cannot copy {job.label or 'expert'}"))
    return ticket


class CPUThreadEngine(TransferEngine):
    """One daemon worker thread, FIFO, copying with gather_copy (`threads` copy threads when native).

    link_bandwidth (bytes/s): emulate one host-to-device link. A job of n bytes occupies the worker for
    at least n / link_bandwidth seconds (the real copy, then a sleep for the rest), and jobs go one at a
    time, so the CPU backend reproduces a GPU's transfer-to-compute ratio in benchmarks."""

    def __init__(self, threads: int | None = None, link_bandwidth: float | None = None, native: bool | None = None):
        if link_bandwidth is not None and not link_bandwidth > 0:
            raise MoePrefetchError(f"link bandwidth must be a positive number of bytes/s, got {link_bandwidth!r}")
        from . import _native

        self._ops = _native
        self.threads = threads or _native.default_threads()
        self.link_bandwidth = link_bandwidth
        self._ext = _native.extension() if native is not False else None  # fixed for the engine's life
        self.backend = "cpu-thread/" + ("native" if self._ext is not None else "ref")
        # link accounting: what moved, how long the copies really took, how long the link emulation slept
        self.bytes_copied = 0
        self.copy_seconds = 0.0
        self.throttle_seconds = 0.0
        self._closed = False
        self._stop = threading.Event()  # cuts a throttling sleep short on close()
        self._worker = _Worker(self._run, "moe-prefetch-copy", priority=True)
        self._thread = self._worker.thread

    def _run(self, ticket: Ticket) -> None:
        t0 = time.perf_counter()
        try:
            self._copy(ticket.job)
        finally:
            spent = time.perf_counter() - t0
            self.copy_seconds += spent
            self.bytes_copied += ticket.job.nbytes
            if self.link_bandwidth:
                rest = ticket.job.nbytes / self.link_bandwidth - spent
                if rest > 0:
                    self._stop.wait(rest)
                    self.throttle_seconds += rest

    def _copy(self, job: CopyJob) -> None:  # overridable (tests inject failures here)
        check_fit(job)
        if self._ext is not None:
            self._ops.gather_copy(job.dst, job.pieces, self.threads, ext=self._ext)
        else:
            self._ops.gather_copy_ref(job.dst, job.pieces)

    def submit(self, job: CopyJob) -> Ticket:
        if self._closed:
            return _closed_ticket(job)
        ticket = Ticket(job, host=threading.Event())
        self._worker.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        return ticket.cancel()

    def wait(self, ticket: Ticket) -> float:
        t0 = time.perf_counter()
        self._worker.wait(ticket)
        if ticket.error is not None:
            raise _wrap(ticket)
        return time.perf_counter() - t0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._stop.set()
            self._worker.stop()


class CUDAStreamEngine(TransferEngine):
    """Copies on a dedicated CUDA stream; the compute stream waits on a per-expert event."""

    def __init__(self, device: torch.device, measure_stalls: bool = True, threads: int | None = None,
                 native: bool | None = None):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.measure_stalls = measure_stalls
        from . import _native

        self._ops = _native
        self.threads = threads or _native.default_threads()
        ext = _native.extension() if native is not False else None
        self._native = ext is not None and ext.has_cuda()
        self.backend = "cuda-stream/" + ("native" if self._native else "ref")
        self._ring = None  # pinned staging ring, allocated with the first pageable job
        self._worker: _Worker | None = None
        self._queued = 0  # jobs handed to the worker and not yet issued
        self._lock = threading.Lock()
        self._stall_pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_total = 0.0
        self._closed = False

    @staticmethod
    def _direct(job: CopyJob) -> bool:
        """Pinned or device sources: cudaMemcpyAsync reads them without staging."""
        return all(s.device.type == "cuda" or s.is_pinned() for _, s in job.pieces)

    def submit(self, job: CopyJob) -> Ticket:
        if self._closed:
            return _closed_ticket(job)
        with self._lock:
            direct = self._queued == 0 and self._direct(job)  # behind staged jobs: queue too, to stay FIFO
            if not direct:
                self._queued += 1
        if direct:
            ticket = Ticket(job)
            try:
                self._issue(ticket, staged=False)
            except BaseException as e:  # noqa: BLE001 - raised by wait()
                ticket.error = e
            return ticket
        ticket = Ticket(job, host=threading.Event())
        if self._worker is None:
            self._worker = _Worker(self._run, "moe-prefetch-stage")
        self._worker.put(ticket)
        return ticket

    def _run(self, ticket: Ticket) -> None:  # worker thread
        try:
            self._issue(ticket, staged=not self._direct(ticket.job))
        finally:
            with self._lock:
                self._queued -= 1

    def _issue(self, ticket: Ticket, staged: bool) -> None:
        """Order the job's copies on the copy stream after its slot-free event, then record its event."""
        job = ticket.job
        with torch.cuda.stream(self.stream):
            if job.after is not None:
                self.stream.wait_event(job.after)  # do not overwrite a slot the compute stream still reads
            if staged:
                check_fit(job)
                if self._ring is None:
                    self._ring = self._ops.make_staging_ring(self.device, threads=self.threads, native=self._native)
                self._ring.copy(job.dst, job.pieces, self.stream)
            else:
                run_copy(job, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
            ticket.event = event

    def wait(self, ticket: Ticket) -> float:
        if ticket.host is not None and not ticket.host.is_set():
            t0 = time.perf_counter()
            self._worker.wait(ticket)  # the staging itself: a real stall, counted with the stream stalls
            self._stall_total += time.perf_counter() - t0
        if ticket.error is not None:
            raise _wrap(ticket)
        compute = torch.cuda.current_stream(self.device)
        if self.measure_stalls and not ticket.event.query():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(compute)
            compute.wait_event(ticket.event)
            end.record(compute)
            self._stall_pairs.append((start, end))
        else:
            compute.wait_event(ticket.event)
        return 0.0

    def stall_seconds(self) -> float:
        if self._stall_pairs:
            self._stall_pairs[-1][1].synchronize()
            self._stall_total += sum(s.elapsed_time(e) for s, e in self._stall_pairs) / 1000.0
            self._stall_pairs.clear()
        return self._stall_total

    def reset_stats(self) -> None:
        self._stall_pairs.clear()
        self._stall_total = 0.0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._worker is not None:
                self._worker.stop()
            self.stream.synchronize()
            self._ring = None  # frees the pinned chunks (their transfers are done: the stream is synchronised)


def _wrap(ticket: Ticket) -> TransferError:
    err = ticket.error
    if isinstance(err, TransferError):
        return err
    what = ticket.job.label or "expert"
    e = TransferError(f"copy of {what} failed: {type(err).__name__}: {err}")
    e.__cause__ = err
    return e


def make_engine(device: torch.device, link_bandwidth: float | None = None, threads: int | None = None) -> TransferEngine:
    """The transfer engine for `device`. link_bandwidth (bytes/s) throttles the CPU engine to an emulated
    link; a CUDA device has a real one. threads: host copy threads (default: half the cores, at most 4)."""
    device = torch.device(device)
    if device.type == "cuda":
        if link_bandwidth is not None:
            raise MoePrefetchError("an emulated link bandwidth (--link-gbps) only applies to the CPU backend; "
                                   "drop it for a CUDA device")
        return CUDAStreamEngine(device, threads=threads)
    return CPUThreadEngine(threads=threads, link_bandwidth=link_bandwidth)
