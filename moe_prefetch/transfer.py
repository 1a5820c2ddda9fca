"""TransferEngine: moves expert bytes into device slots asynchronously.

Two pure-PyTorch backends behind one interface:
  CPUThreadEngine   one worker thread copies (from memory-mapped checkpoint pages) into RAM slots;
                    wait() blocks the caller until that copy is done.
  CUDAStreamEngine  copies are issued on a dedicated copy stream, one event per moved expert;
                    wait() makes the *compute stream* wait on that event (no host synchronisation).
Both are FIFO, so a copy into a slot always lands after any earlier copy into the same slot.
Any failure is stored in the ticket and raised by wait() in the caller's thread; nothing hangs.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch


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


@dataclass
class Ticket:
    job: CopyJob
    submitted: float = field(default_factory=time.perf_counter)
    event: Any = None  # threading.Event (CPU) or torch.cuda.Event (CUDA)
    error: BaseException | None = None

    def done(self) -> bool:
        if self.error is not None:
            return True
        if isinstance(self.event, threading.Event):
            return self.event.is_set()
        return self.event is None or self.event.query()


def run_copy(job: CopyJob, non_blocking: bool = False) -> None:
    """Perform the copies of one job (dtype conversion included), checking shapes first."""
    for offset, src in job.pieces:
        n = src.numel()
        if offset < 0 or offset + n > job.dst.numel():
            raise TransferError(
                f"copy of {job.label or 'expert'} does not fit: {n} elements at offset {offset} "
                f"into a buffer of {job.dst.numel()}")
        job.dst[offset:offset + n].view(src.shape).copy_(src, non_blocking=non_blocking)


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

    def close(self) -> None: ...

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class CPUThreadEngine(TransferEngine):
    """One daemon worker thread, FIFO."""

    backend = "cpu-thread"

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._worker, name="moe-prefetch-copy", daemon=True)
        self._thread.start()

    def _worker(self) -> None:
        while True:
            ticket = self._queue.get()
            if ticket is None:
                return
            try:
                self._copy(ticket.job)
            except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                ticket.error = e
            finally:
                ticket.event.set()

    def _copy(self, job: CopyJob) -> None:  # overridable (throttled link, native copies)
        run_copy(job)

    def submit(self, job: CopyJob) -> Ticket:
        ticket = Ticket(job, event=threading.Event())
        if self._closed:
            ticket.error = TransferError("transfer engine is closed")
            ticket.event.set()
            return ticket
        self._queue.put(ticket)
        return ticket

    def wait(self, ticket: Ticket) -> float:
        t0 = time.perf_counter()
        while not ticket.event.wait(0.5):
            if not self._thread.is_alive():
                ticket.error = ticket.error or TransferError("transfer worker thread died")
                break
        if ticket.error is not None:
            raise _wrap(ticket)
        return time.perf_counter() - t0

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join()
            # fail anything still queued rather than leaving waiters hanging
            while True:
                try:
                    t = self._queue.get_nowait()
                except queue.Empty:
                    break
                if t is not None:
                    t.error = TransferError("transfer engine was closed before this copy ran")
                    t.event.set()


class CUDAStreamEngine(TransferEngine):
    """Copies on a dedicated CUDA stream; the compute stream waits on a per-expert event."""

    backend = "cuda-stream"

    def __init__(self, device: torch.device, measure_stalls: bool = True):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.measure_stalls = measure_stalls
        self._stall_pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stall_total = 0.0
        self._closed = False

    def submit(self, job: CopyJob) -> Ticket:
        ticket = Ticket(job)
        if self._closed:
            ticket.error = TransferError("transfer engine is closed")
            return ticket
        try:
            with torch.cuda.stream(self.stream):
                if job.after is not None:
                    self.stream.wait_event(job.after)  # do not overwrite a slot the compute stream still reads
                run_copy(job, non_blocking=True)
                ticket.event = torch.cuda.Event()
                ticket.event.record(self.stream)
        except BaseException as e:  # noqa: BLE001
            ticket.error = e
        return ticket

    def wait(self, ticket: Ticket) -> float:
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

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.stream.synchronize()


def _wrap(ticket: Ticket) -> TransferError:
    err = ticket.error
    if isinstance(err, TransferError):
        return err
    what = ticket.job.label or "expert"
    e = TransferError(f"copy of {what} failed: {type(err).__name__}: {err}")
    e.__cause__ = err
    return e


def make_engine(device: torch.device) -> TransferEngine:
    if device.type == "cuda":
        return CUDAStreamEngine(device)
    return CPUThreadEngine()
