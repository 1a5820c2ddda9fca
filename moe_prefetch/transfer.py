"""TransferEngine: moves expert bytes into device slots asynchronously.

Three backends behind one interface, each using the native copies (moe_prefetch._native) when the
extension is loaded and their PyTorch twins otherwise; `engine.backend` names the choice:
  CPUThreadEngine   "cpu-thread/native|ref": one worker thread gathers an expert's pieces (memory-mapped
                    checkpoint pages) into its RAM slot with gather_copy; wait() blocks until that is done.
                    (It can also be throttled to a link_bandwidth, as it was before EmulatedLinkEngine.)
  EmulatedLinkEngine "cpu-link/native|ref": the CPU backend with an emulated host-to-device link
                    (link_bandwidth, bytes/s; what the benchmarks use): the bytes are gathered at submit()
                    (on a worker thread for experts over 1 MiB: "...+thread") and the copy occupies a
                    timeline of the link; wait() sleeps until it lands.
  CUDAStreamEngine  "cuda-stream/native|ref": a high-priority demand stream and a low-priority prefetch
                    stream, one event per expert; wait() makes the *compute stream* wait on that event (no
                    host synchronisation). Pinned demand copies are issued from submit(); prefetches and
                    pageable sources (a store that is not pinned: mmap pieces streamed through a small
                    pinned staging ring) go through one worker thread, so the compute thread never blocks
                    on host-side staging.
Ordering, both engines: demand copies (an executing layer waits for them) go ahead of queued
prefetches, at most one prefetch is on the link at a time, and a queued prefetch whose expert gets
evicted is withdrawn before it runs. The CPU engine copies one job at a time, so a copy into a slot
lands after any earlier copy into that slot; the CUDA engine orders them with the slot's events.
Any failure is stored in the ticket and raised by wait() in the caller's thread as a TransferError;
close() joins every thread and fails the copies still queued; nothing hangs.
"""
from __future__ import annotations

import math
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
    follows: Any = None  # Ticket of the previous copy into the same slot (CUDA: two streams must not race)


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

    def __init__(self, handle, name: str, priority: bool = False, gate=None):
        self._handle = handle
        self._priority = priority
        self._gate = gate  # called before a prefetch starts; may block until the link has room for it
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
            rank, seq, ticket = self._queue.get()
            if ticket is None:
                return
            if self._gate is not None and not ticket.job.demand and ticket.state == "queued":
                self._gate()  # a queued prefetch stays withdrawable while it waits here
                if self._demand_waiting():  # a demand copy arrived meanwhile: it goes first
                    self._queue.put((rank, seq, ticket))
                    continue
            if not ticket.start():
                continue  # cancelled while queued
            try:
                self._handle(ticket)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                ticket.error = e
            finally:
                ticket.job.follows = None  # ordered by now; do not keep a chain of old tickets alive
                ticket.state = "finished"
                ticket.host.set()

    def _demand_waiting(self) -> bool:
        with self._queue.mutex:
            return bool(self._queue.queue) and self._queue.queue[0][0] == 0

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


SPIN_S = 2e-4  # the end of an emulated wait spent yielding rather than asleep


def sleep_until(end: float) -> None:
    """Return at perf_counter() >= end: asleep, then yielding the interpreter lock for the last SPIN_S,
    since a sleep overshoots by its timer slack (~70 us here) where a GPU's event wait returns on time."""
    now = time.perf_counter()
    if end - now > SPIN_S:
        time.sleep(end - now - SPIN_S)
    while time.perf_counter() < end:
        time.sleep(0)


class _HostCopies:
    """The CPU engines' copy of one job into its RAM slot: gather_copy with `threads` when the extension
    is loaded, numpy byte copies otherwise (byte_copy)."""

    def _setup_copies(self, threads: int | None, native: bool | None, backend: str) -> None:
        from . import _native

        self._ops = _native
        self.threads = threads or _native.default_threads()
        self._ext = _native.extension() if native is not False else None  # fixed for the engine's life
        self.backend = backend + ("native" if self._ext is not None else "ref")

    def _copy(self, job: CopyJob) -> None:  # overridable (tests inject failures here)
        check_fit(job)
        if self._ext is not None:
            self._ops.gather_copy(job.dst, job.pieces, self.threads, ext=self._ext)
        else:
            byte_copy(job.dst, job.pieces)


class CPUThreadEngine(_HostCopies, TransferEngine):
    """One daemon worker thread, FIFO, copying with gather_copy (`threads` copy threads when native).

    link_bandwidth (bytes/s): emulate one host-to-device link. A job of n bytes occupies the worker for
    at least n / link_bandwidth seconds (the real copy, then a sleep for the rest), and jobs go one at a
    time, so the CPU backend reproduces a GPU's transfer-to-compute ratio in benchmarks."""

    def __init__(self, threads: int | None = None, link_bandwidth: float | None = None, native: bool | None = None):
        if link_bandwidth is not None and not link_bandwidth > 0:
            raise MoePrefetchError(f"link bandwidth must be a positive number of bytes/s, got {link_bandwidth!r}")
        self._setup_copies(threads, native, "cpu-thread/")
        self.link_bandwidth = link_bandwidth
        # link accounting: what moved, how long the copies really took, how long the link emulation slept
        self.bytes_copied = 0
        self.copy_seconds = 0.0
        self.throttle_seconds = 0.0
        self.copies = 0
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
            self.copies += 1

    def seconds_per_copy(self) -> float | None:
        """Mean time one job occupied the link (copy plus emulation), or None before the first."""
        return (self.copy_seconds + self.throttle_seconds) / self.copies if self.copies else None

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


class _Landing:
    """A ticket's completion on the emulated link: its bytes land at `end` (perf_counter seconds), which a
    demand copy queued ahead of it may still push back while it has not started."""

    __slots__ = ("start", "end", "nbytes")

    def __init__(self, nbytes: int):
        self.start = self.end = math.inf
        self.nbytes = nbytes

    def query(self) -> bool:
        return time.perf_counter() >= self.end


class EmulatedLinkEngine(_HostCopies, TransferEngine):
    """The CPU backend with an emulated host-to-device link (link_bandwidth, bytes/s), without a thread.

    On a GPU a copy is DMA: the host thread that starts it pays a few microseconds. A worker thread
    that copies and then sleeps out the link's time costs the compute thread far more on a small CPU
    machine: every job wakes a second Python thread, which takes the interpreter lock between the
    compute thread's torch calls (measured on a 2-core VM: 0.1-0.2 ms of decode per copy, empty jobs
    included, half a layer of the demo model). Here the link is a timeline instead: submit() gathers the
    bytes into the slot at once, on the caller's thread (an expert's memcpy), and queues the copy on the
    timeline, where it occupies the link for nbytes / link_bandwidth: one copy at a time, demand copies
    ahead of prefetches that have not started, a queued copy withdrawable (cancel). A ticket is done
    when its landing time has passed; wait() sleeps until then. Nothing runs behind the caller's back,
    so the only host cost of a copy is its memcpy, which the benchmarks' link emulation wants.
    Experts above INLINE_MAX_BYTES are the exception: their memcpy lasts longer than a worker thread's
    hand-off costs (about 0.1-0.2 ms measured here, against a memcpy of about 0.1 ms per MiB), so it runs
    on one worker thread (in submission order, so copies into one slot stay ordered) while the timeline
    still says when the copy lands; such a ticket is done once both have happened. expert_bytes (the
    size of the experts the engine will move) makes that choice once, for every copy.
    (Without an emulated link, CPUThreadEngine keeps every copy off the compute thread.)"""

    INLINE_MAX_BYTES = 1 << 20

    def __init__(self, link_bandwidth: float, threads: int | None = None, native: bool | None = None,
                 expert_bytes: int | None = None):
        if link_bandwidth is None or not link_bandwidth > 0:
            raise MoePrefetchError(f"link bandwidth must be a positive number of bytes/s, got {link_bandwidth!r}")
        self._setup_copies(threads, native, "cpu-link/")
        self.link_bandwidth = link_bandwidth
        self.bytes_copied = 0      # bytes the link carried (withdrawn copies not counted)
        self.copies = 0            # copies the link carried
        self.link_seconds = 0.0    # the link time of those copies
        self.copy_seconds = 0.0    # the caller's time in memcpys
        self._link: list[Ticket] = []  # copies not yet landed, in link order
        self._closed = False
        # large experts: their memcpys on a worker thread (FIFO), the timeline unchanged
        self._worker = None
        if expert_bytes is not None and expert_bytes > self.INLINE_MAX_BYTES:
            self._worker = _Worker(self._threaded_copy, "moe-prefetch-copy")
            self.backend += "+thread"

    def _threaded_copy(self, ticket: Ticket) -> None:  # worker thread
        t0 = time.perf_counter()
        try:
            self._copy(ticket.job)
        finally:
            self.copy_seconds += time.perf_counter() - t0

    def _settle(self, now: float) -> None:
        link = self._link
        n = 0
        while n < len(link) and link[n].event.end <= now:
            if link[n].host is None:  # inline: done with the link (a worker's ticket is its worker's to finish)
                link[n].state = "finished"
            n += 1
        if n:
            del link[:n]

    def _reflow(self, now: float, start_at: int) -> None:
        link = self._link
        prev_end = link[start_at - 1].event.end if start_at > 0 else now
        for t in link[start_at:]:
            landing = t.event
            landing.start = max(prev_end, now)
            landing.end = prev_end = landing.start + landing.nbytes / self.link_bandwidth

    def submit(self, job: CopyJob) -> Ticket:
        if self._closed:
            return _closed_ticket(job)
        job.follows = None  # copies land in submission order here: nothing to chain to
        if self._worker is not None:  # a large expert: the worker copies it, the timeline says when it lands
            ticket = Ticket(job, host=threading.Event(), event=_Landing(job.nbytes))
            self._worker.put(ticket)
            now = time.perf_counter()
            spent = 0.0  # the worker counts its own memcpy time
        else:
            ticket = Ticket(job, event=_Landing(job.nbytes))
            t0 = time.perf_counter()
            try:
                self._copy(job)
            except Exception as e:  # raised by wait() in the caller, as the threaded engine does
                ticket.fail(e)
                ticket.state = "finished"
                return ticket
            # (a KeyboardInterrupt in the memcpy, on the caller's thread here, propagates: the offloader then
            # forgets the expert, whose slot may be half-written)
            now = time.perf_counter()
            spent = now - t0
        self._settle(now)
        link = self._link
        pos = len(link)
        if job.demand:  # ahead of the prefetches that have not started
            pos = next((j for j, t in enumerate(link) if t.event.start > now and not t.job.demand), pos)
        link.insert(pos, ticket)
        self._reflow(now, pos)
        self.copy_seconds += spent
        self.link_seconds += job.nbytes / self.link_bandwidth
        self.bytes_copied += job.nbytes
        self.copies += 1
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        now = time.perf_counter()
        self._settle(now)
        landing = ticket.event
        if not isinstance(landing, _Landing) or landing.start <= now or ticket.error is not None:
            return False
        if ticket.host is None and ticket.state != "queued":
            return False
        j = next((j for j, t in enumerate(self._link) if t is ticket), None)
        if j is None:
            return False
        del self._link[j]
        self._reflow(now, j)
        self.link_seconds -= ticket.job.nbytes / self.link_bandwidth  # the link never carried it
        self.bytes_copied -= ticket.job.nbytes
        self.copies -= 1
        landing.end = -math.inf
        if ticket.host is None:
            ticket.state = "cancelled"
        else:  # a worker's memcpy is skipped if it has not started; one under way finishes (slot order holds)
            ticket.cancel()
        return True

    def wait(self, ticket: Ticket) -> float:
        if ticket.error is not None:
            raise _wrap(ticket)
        t0 = time.perf_counter()
        if isinstance(ticket.event, _Landing):
            sleep_until(ticket.event.end)
        if ticket.host is not None and self._worker is not None:  # and its memcpy, when a worker makes it
            self._worker.wait(ticket)
            if ticket.error is not None:
                raise _wrap(ticket)
        return time.perf_counter() - t0

    @property
    def throttle_seconds(self) -> float:
        """Link time beyond the memcpys (what the threaded engine sleeps)."""
        return max(0.0, self.link_seconds - self.copy_seconds)

    def seconds_per_copy(self) -> float | None:
        """Mean time one copy occupies the emulated link, or None before the first."""
        return self.link_seconds / self.copies if self.copies else None

    def close(self) -> None:
        """Fail the copies the link has not started; the one on the link lands now (its bytes are in)."""
        if self._closed:
            return
        self._closed = True
        now = time.perf_counter()
        # a finalizer can run close() on the worker thread itself (a garbage collection it triggers): then
        # it must not wait for its own copy, nor join itself; it fails what has not started and returns
        on_worker = self._worker is not None and threading.current_thread() is self._worker.thread
        for t in self._link:
            if t.event.start > now:  # never on the link (a worker's memcpy, if any, is skipped or finishes)
                if t.host is not None:
                    t.cancel()
                t.fail(TransferError(f"transfer engine was closed before the copy of {t.job.label or 'expert'} ran"))
            elif t.host is not None and not on_worker:
                self._worker.wait(t)  # on the link: its memcpy completes (the worker takes them in order)
            if t.host is None:
                t.state = "finished"
            t.event.end = min(t.event.end, now)
        self._link.clear()
        if self._worker is not None and not on_worker:
            self._worker.stop()  # the memcpy in progress finishes; queued ones fail


def byte_copy(dst: torch.Tensor, pieces) -> None:
    """gather_copy_ref without torch's thread pool for same-dtype contiguous pieces: numpy byte copies.
    A copy thread that calls torch ops starts a second OpenMP team, whose spinning threads fight the
    compute thread's for the cores (a 2-core machine decoded up to 7x slower); numpy copies do not."""
    import numpy as np

    out = dst.reshape(-1).view(torch.uint8).numpy()  # [dst bytes]
    es = dst.element_size()
    rest = []
    for offset, src in pieces:
        if src.device.type == "cpu" and src.dtype == dst.dtype and src.is_contiguous():
            data = src.reshape(-1).view(torch.uint8).numpy()
            np.copyto(out[offset * es:offset * es + data.size], data)
        else:
            rest.append((offset, src))
    if rest:  # dtype conversions: torch's copy
        from . import _native

        _native.gather_copy_ref(dst, rest)


class CUDAStreamEngine(TransferEngine):
    """Two copy streams and one worker thread; the compute stream waits on a per-expert event.

    Demand copies (a layer is about to read the expert) from pinned memory are issued at once, from
    the calling thread, on a high-priority demand stream. Everything else goes through the worker's
    queue, demand first: staged demand copies (pageable sources, through the pinned staging ring) and
    every prefetch. A prefetch is issued onto the low-priority prefetch stream only once the previous
    prefetch has landed, so the link never holds more than one expert's worth of prefetch in front of a
    demand copy, and a prefetch still queued can be withdrawn when its expert is evicted, as on the
    CPU engine. Copies into one slot stay ordered across the two streams: a job waits for the slot's
    previous copy (`CopyJob.follows`) and for the compute stream to be done reading it (`after`).
    Events are blocking-sync, so host threads that wait on them sleep instead of spinning."""

    def __init__(self, device: torch.device, measure_stalls: bool = True, threads: int | None = None,
                 native: bool | None = None):
        self.device = device
        low, high = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
        self.demand_stream = torch.cuda.Stream(device=device, priority=high)
        self.prefetch_stream = torch.cuda.Stream(device=device, priority=low)
        self.measure_stalls = measure_stalls
        from . import _native

        self._ops = _native
        self.threads = threads or _native.default_threads()
        ext = _native.extension() if native is not False else None
        self._native = ext is not None and ext.has_cuda()
        self.backend = "cuda-stream/" + ("native" if self._native else "ref")
        self._ring = None  # pinned staging ring, allocated with the first pageable job
        self._in_flight: Ticket | None = None  # the last prefetch issued
        self._worker = _Worker(self._run, "moe-prefetch-copy", priority=True, gate=self._prefetch_gate)
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
        ticket = Ticket(job, host=threading.Event())
        if job.demand and self._direct(job):
            ticket.start()
            try:
                self._issue(ticket, self.demand_stream, staged=False)
            except Exception as e:  # raised by wait(); a KeyboardInterrupt propagates (the offloader forgets the expert)
                ticket.error = e
            finally:
                job.follows = None
                ticket.state = "finished"
                ticket.host.set()
            return ticket
        self._worker.put(ticket)
        return ticket

    def cancel(self, ticket: Ticket) -> bool:
        return ticket.cancel()

    def _prefetch_gate(self) -> None:  # worker thread: wait until the previous prefetch has landed
        last = self._in_flight
        if last is not None and last.event is not None:
            last.event.synchronize()

    def _run(self, ticket: Ticket) -> None:  # worker thread
        job = ticket.job
        self._issue(ticket, self.demand_stream if job.demand else self.prefetch_stream, staged=not self._direct(job))
        if not job.demand:
            self._in_flight = ticket

    def _issue(self, ticket: Ticket, stream, staged: bool) -> None:
        """Order the job's copies on `stream` after the slot's previous copy and its slot-free event,
        then record the job's event."""
        job = ticket.job
        prev = job.follows
        if prev is not None and prev.state == "running" and prev.host is not None:
            prev.host.wait()  # the worker is issuing the slot's previous copy right now
        with torch.cuda.stream(stream):
            if prev is not None and prev.event is not None:
                stream.wait_event(prev.event)
            if job.after is not None:
                stream.wait_event(job.after)  # do not overwrite a slot the compute stream still reads
            if staged:
                check_fit(job)
                if self._ring is None:
                    self._ring = self._ops.make_staging_ring(self.device, threads=self.threads, native=self._native)
                self._ring.copy(job.dst, job.pieces, stream)
            else:
                run_copy(job, non_blocking=True)
            event = torch.cuda.Event(blocking=True)
            event.record(stream)
            ticket.event = event

    def wait(self, ticket: Ticket) -> float:
        if not ticket.host.is_set():
            t0 = time.perf_counter()
            self._worker.wait(ticket)  # queued or staging: a real stall, counted with the stream stalls
            self._stall_total += time.perf_counter() - t0
        if ticket.error is not None:
            raise _wrap(ticket)
        if ticket.event is None:
            raise TransferError(f"copy of {ticket.job.label or 'expert'} was withdrawn before it ran")
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
            self._worker.stop()
            self.demand_stream.synchronize()
            self.prefetch_stream.synchronize()
            self._ring = None  # frees the pinned chunks (their transfers are done: the streams are synchronised)


def _wrap(ticket: Ticket) -> TransferError:
    err = ticket.error
    if isinstance(err, TransferError):
        return err
    what = ticket.job.label or "expert"
    e = TransferError(f"copy of {what} failed: {type(err).__name__}: {err}")
    e.__cause__ = err
    return e


def make_engine(device: torch.device, link_bandwidth: float | None = None, threads: int | None = None,
                expert_bytes: int | None = None) -> TransferEngine:
    """The transfer engine for `device`. link_bandwidth (bytes/s) gives the CPU backend an emulated link; a
    CUDA device has a real one. threads: host copy threads (default: half the cores, at most 4).
    expert_bytes: the size of one expert's copy (the emulated link makes large ones on a worker thread)."""
    device = torch.device(device)
    if device.type == "cuda":
        if link_bandwidth is not None:
            raise MoePrefetchError("an emulated link bandwidth (--link-gbps) only applies to the CPU backend; "
                                   "drop it for a CUDA device")
        return CUDAStreamEngine(device, threads=threads)
    if link_bandwidth is not None:
        return EmulatedLinkEngine(link_bandwidth, threads=threads, expert_bytes=expert_bytes)
    return CPUThreadEngine(threads=threads)
