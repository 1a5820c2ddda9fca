"""Transfer engines: copies land, errors reach the waiting caller, shutdown never hangs, the emulated
link holds its bandwidth; with the native copies and with their PyTorch twins."""
import threading
import time

import pytest
import torch

from moe_prefetch import _native
from moe_prefetch.errors import MoePrefetchError
from moe_prefetch.transfer import CopyJob, CPUThreadEngine, TransferError, make_engine
from test_native import native_ext  # noqa: F401 - the session's JIT build (shared, built once)


@pytest.fixture(params=["ref", "native"])
def kind(request):
    """Run a test with the PyTorch twins and with the native copies active."""
    if request.param == "ref":
        previous = _native.use(None)
    else:
        previous = _native.use(request.getfixturevalue("native_ext"))
    yield request.param
    _native.use(previous)


def test_cpu_engine_copies_pieces_with_dtype_conversion(kind):
    dst = torch.zeros(10, dtype=torch.float32)
    a = torch.arange(4, dtype=torch.bfloat16).view(2, 2)
    b = torch.full((6,), 7.0, dtype=torch.float64)
    with CPUThreadEngine() as eng:
        assert eng.backend == f"cpu-thread/{kind}"
        t = eng.submit(CopyJob(dst, [(0, a), (4, b)], nbytes=40))
        assert eng.wait(t) >= 0
    assert dst.tolist() == [0, 1, 2, 3] + [7.0] * 6


def test_copy_error_is_raised_at_wait_with_a_clear_message(kind):
    dst = torch.zeros(4)
    with CPUThreadEngine() as eng:
        t = eng.submit(CopyJob(dst, [(2, torch.ones(5))], nbytes=20, label="expert 1 of layer 0"))
        with pytest.raises(TransferError, match="expert 1 of layer 0 does not fit"):
            eng.wait(t)
        # the engine keeps working after a failed copy
        ok = eng.submit(CopyJob(dst, [(0, torch.ones(4))], nbytes=16))
        eng.wait(ok)
    assert dst.sum() == 4


def test_worker_exception_of_any_type_reaches_caller():
    class Boom(torch.Tensor):
        pass

    dst = torch.zeros(2)
    src = torch.ones(2)
    eng = CPUThreadEngine()
    eng._copy = lambda job: (_ for _ in ()).throw(MemoryError("simulated"))
    t = eng.submit(CopyJob(dst, [(0, src)], nbytes=8, label="x"))
    with pytest.raises(TransferError, match="MemoryError: simulated"):
        eng.wait(t)
    eng.close()


def test_fifo_order_last_copy_wins(kind):
    dst = torch.zeros(1000)
    with CPUThreadEngine() as eng:
        tickets = [eng.submit(CopyJob(dst, [(0, torch.full((1000,), float(i)))], nbytes=4000)) for i in range(50)]
        eng.wait(tickets[-1])
        assert all(t.done() for t in tickets)
    assert torch.all(dst == 49)


def test_close_joins_worker_and_fails_later_submits():
    eng = CPUThreadEngine()
    eng.close()
    eng.close()  # idempotent
    assert not eng._thread.is_alive()
    t = eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4))
    assert t.done()
    with pytest.raises(TransferError, match="closed"):
        eng.wait(t)
    assert threading.active_count() >= 1


def test_queued_copies_fail_instead_of_hanging_when_closed():
    gate, started = threading.Event(), threading.Event()
    eng = CPUThreadEngine()
    orig = eng._copy

    def slow(job):
        started.set()
        gate.wait(5)
        orig(job)

    eng._copy = slow
    first = eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4))
    queued = [eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4, label=f"q{i}")) for i in range(3)]
    assert started.wait(5)
    closer = threading.Thread(target=eng.close)
    closer.start()
    time.sleep(0.05)  # close() drains the queue while the first copy is still running
    gate.set()
    closer.join(10)
    assert not closer.is_alive() and not eng._thread.is_alive()
    eng.wait(first)  # the copy in progress finishes
    for i, t in enumerate(queued):
        assert t.done()
        with pytest.raises(TransferError, match=f"closed before the copy of q{i} ran"):
            eng.wait(t)


def test_native_and_ref_engines_move_the_same_bytes(native_ext):
    pieces = [(5, torch.randn(300_000)), (300_010, torch.randn(2, 200_000).to(torch.bfloat16)),
              (800_000, torch.randn(100_000))]
    out = {}
    for kind, ext in (("ref", None), ("native", native_ext)):
        previous = _native.use(ext)
        try:
            dst = torch.full((900_000,), -1.0)
            with CPUThreadEngine(threads=3) as eng:
                eng.wait(eng.submit(CopyJob(dst, pieces, nbytes=dst.numel() * 4)))
            out[kind] = dst
        finally:
            _native.use(previous)
    assert torch.equal(out["ref"].view(torch.uint8), out["native"].view(torch.uint8))


def test_native_false_forces_the_twin(native_ext):
    previous = _native.use(native_ext)
    try:
        with CPUThreadEngine(native=False) as eng:
            assert eng.backend == "cpu-thread/ref"
        with make_engine(torch.device("cpu")) as eng:
            assert eng.backend == "cpu-thread/native"
    finally:
        _native.use(previous)


# ---- the emulated link --------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["timeline", "thread"])
def test_emulated_link_takes_at_least_bytes_over_bandwidth(kind, engine):
    """make_engine's timeline (EmulatedLinkEngine), and the worker thread throttled as it was before it."""
    bandwidth = 50e6  # 50 MB/s: 10 jobs of 0.5 MB take >= 100 ms, serially
    src = torch.randn(125_000)  # 0.5 MB
    dst = torch.zeros(125_000)
    eng = (make_engine(torch.device("cpu"), link_bandwidth=bandwidth, threads=2) if engine == "timeline"
           else CPUThreadEngine(threads=2, link_bandwidth=bandwidth))
    t0 = time.perf_counter()
    tickets = [eng.submit(CopyJob(dst, [(0, src)], nbytes=src.numel() * 4)) for _ in range(10)]
    for t in tickets:
        eng.wait(t)
    elapsed = time.perf_counter() - t0
    eng.close()
    assert elapsed >= 10 * 0.5e6 / bandwidth
    assert eng.bytes_copied == 5_000_000
    assert eng.throttle_seconds > 0 and eng.copy_seconds + eng.throttle_seconds >= 0.1 - 1e-3
    assert torch.equal(dst, src)


def test_link_emulation_is_off_by_default_and_validated():
    with make_engine(torch.device("cpu")) as eng:
        assert eng.link_bandwidth is None
        eng.wait(eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16)))
        assert eng.throttle_seconds == 0
    for bad in (0, -1.0):
        with pytest.raises(MoePrefetchError, match="positive"):
            make_engine(torch.device("cpu"), link_bandwidth=bad)
    with pytest.raises(MoePrefetchError, match="only applies to the CPU backend"):
        make_engine(torch.device("cuda"), link_bandwidth=1e9)


def test_close_cuts_a_throttled_transfer_short():
    eng = CPUThreadEngine(link_bandwidth=1e3)  # 4 KB: a 4-second link, slept out by the worker thread
    first = eng.submit(CopyJob(torch.zeros(1024), [(0, torch.ones(1024))], nbytes=4096))
    later = eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4, label="later"))
    time.sleep(0.1)
    t0 = time.perf_counter()
    eng.close()
    assert time.perf_counter() - t0 < 2.0  # not the 4 s the link would take
    eng.wait(first)  # the copy itself had finished: only the emulated wait was cut
    with pytest.raises(TransferError, match="closed before the copy of later ran"):
        eng.wait(later)


# the emulated link copies small experts on the caller's thread and large ones (over INLINE_MAX_BYTES) on a
# worker thread, the timeline deciding when either lands: every emulated-link test runs both ways
LARGE = {"inline": None, "worker": 2 << 20}


@pytest.fixture(params=list(LARGE))
def copier(request):
    return request.param


def test_emulated_link_lands_demand_copies_ahead_of_queued_prefetches(kind, copier):
    threads = threading.active_count()
    eng = make_engine(torch.device("cpu"), link_bandwidth=4096 / 0.2, expert_bytes=LARGE[copier])  # 4 KB: 0.2 s
    assert type(eng).__name__ == "EmulatedLinkEngine" and eng.backend.startswith("cpu-link/")
    assert eng.backend.endswith("+thread") == (copier == "worker")
    src = [torch.full((1024,), float(i)) for i in range(3)]
    dst = [torch.zeros(1024) for _ in range(3)]
    first = eng.submit(CopyJob(dst[0], [(0, src[0])], nbytes=4096, demand=False))   # on the link now
    queued = eng.submit(CopyJob(dst[1], [(0, src[1])], nbytes=4096, demand=False))  # waits behind it
    demand = eng.submit(CopyJob(dst[2], [(0, src[2])], nbytes=4096))                # overtakes `queued`
    assert threading.active_count() == threads + (copier == "worker")  # small experts: no thread at all
    assert not any(t.done() for t in (first, queued, demand))
    assert first.event.end <= demand.event.end < queued.event.end
    t0 = time.perf_counter()
    eng.wait(demand)
    assert time.perf_counter() - t0 >= 0.3  # the running copy, then its own
    assert first.done() and demand.done() and not queued.done()
    eng.wait(queued)
    assert all(torch.equal(d, s) for d, s in zip(dst, src))
    assert eng.copies == 3 and eng.bytes_copied == 3 * 4096
    assert eng.seconds_per_copy() == pytest.approx(0.2)
    eng.close()
    assert threading.active_count() == threads


def test_emulated_link_withdraws_a_queued_copy_and_moves_the_rest_up(kind, copier):
    eng = make_engine(torch.device("cpu"), link_bandwidth=4096 / 0.5, expert_bytes=LARGE[copier])
    job = lambda demand=False: CopyJob(torch.zeros(1024), [(0, torch.ones(1024))], nbytes=4096, demand=demand)
    running, queued, last = eng.submit(job()), eng.submit(job()), eng.submit(job())
    before = last.event.end
    assert not eng.cancel(running)  # started: it finishes
    assert eng.cancel(queued)
    eng.wait(queued)  # returns at once (a worker's memcpy under way finishes first)
    assert queued.done()
    assert last.event.end == pytest.approx(before - 0.5)  # the link time it would have taken is free
    assert eng.copies == 2 and eng.bytes_copied == 2 * 4096  # the link never carried it
    assert not eng.cancel(queued)
    eng.close()
    with pytest.raises(TransferError, match="closed before the copy"):
        eng.wait(last)
    eng.wait(running)  # on the link at close: its bytes are in


def test_emulated_link_worker_memcpy_slower_than_the_link(monkeypatch):
    """Large experts: the worker's memcpy may finish after the timeline says the copy landed. wait() still
    returns only once the bytes are in; a cancelled copy's memcpy is skipped if not started; copies into
    one slot keep their order through cancel and resubmit; close() with a backlog returns, and every
    waiter gets its bytes or a TransferError; close() run on the worker thread itself returns too."""
    from moe_prefetch.transfer import EmulatedLinkEngine

    original = EmulatedLinkEngine._copy

    def slow(self, job):
        time.sleep(0.1)
        original(self, job)

    monkeypatch.setattr(EmulatedLinkEngine, "_copy", slow)
    eng = make_engine(torch.device("cpu"), link_bandwidth=1e9, expert_bytes=LARGE["worker"])  # lands in 4 us
    slot = torch.zeros(4)
    old = eng.submit(CopyJob(slot, [(0, torch.full((4,), 1.0))], nbytes=16, demand=False))
    queued = eng.submit(CopyJob(torch.zeros(4), [(0, torch.full((4,), 2.0))], nbytes=16, demand=False))
    time.sleep(0.01)  # both have landed on the timeline; `old` is being copied, `queued` waits for the worker
    assert not old.done() and not queued.done()
    eng.wait(old)
    assert torch.equal(slot, torch.full((4,), 1.0))
    # the slot's next occupant, after a copy into it was cancelled and resubmitted (the offloader's promotion)
    first = eng.submit(CopyJob(slot, [(0, torch.full((4,), 3.0))], nbytes=16, demand=False))
    eng.cancel(first)
    again = eng.submit(CopyJob(slot, [(0, torch.full((4,), 4.0))], nbytes=16))
    eng.wait(again)
    assert torch.equal(slot, torch.full((4,), 4.0))
    # a prefetch already on the link (not withdrawable) whose memcpy still waits for the worker, then a
    # demand copy into the same slot: the later copy's bytes win, as on a real link
    blocker = eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16))  # keeps the worker busy
    early = eng.submit(CopyJob(slot, [(0, torch.full((4,), 5.0))], nbytes=16, demand=False))
    time.sleep(0.005)
    assert not eng.cancel(early)  # on the link already
    late = eng.submit(CopyJob(slot, [(0, torch.full((4,), 6.0))], nbytes=16))
    for t in (blocker, early, late):
        eng.wait(t)
    assert torch.equal(slot, torch.full((4,), 6.0))
    # close() with a backlog returns; each waiter has its bytes or an error
    backlog = [eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16)) for _ in range(5)]
    t0 = time.perf_counter()
    eng.close()
    assert time.perf_counter() - t0 < 5.0  # the copies already on the link finish their memcpys (0.1 s each)
    for t in backlog:
        try:
            eng.wait(t)
            assert torch.equal(t.job.dst, torch.ones(4))
        except TransferError:
            pass
    # close() from the worker thread itself (a finalizer run by a collection there) neither waits nor hangs
    eng2 = make_engine(torch.device("cpu"), link_bandwidth=1e9, expert_bytes=LARGE["worker"])
    closing = []

    def closes(self, job):
        closing.append(1)
        self.close()
        original(self, job)

    monkeypatch.setattr(EmulatedLinkEngine, "_copy", closes)
    ticket = eng2.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16))
    eng2.wait(ticket)  # returns: the worker closed the engine mid-copy and finished the copy
    assert closing and torch.equal(ticket.job.dst, torch.ones(4))


def test_emulated_link_lets_an_interrupt_in_its_copy_through(monkeypatch):
    """The timeline copies on the caller's thread, so a Ctrl-C can land in its memcpy: it propagates
    (never stored as a copy error and lost), and the engine is left as it was."""
    from moe_prefetch.transfer import EmulatedLinkEngine

    eng = make_engine(torch.device("cpu"), link_bandwidth=1e9)

    def interrupted(self, job):
        raise KeyboardInterrupt

    monkeypatch.setattr(EmulatedLinkEngine, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16))
    assert eng.copies == 0 and eng.bytes_copied == 0 and not eng._link
    monkeypatch.undo()
    eng.wait(eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16)))
    eng.close()


def test_emulated_link_failures_reach_the_waiter(copier):
    eng = make_engine(torch.device("cpu"), link_bandwidth=1e9, expert_bytes=LARGE[copier])
    bad = eng.submit(CopyJob(torch.zeros(4), [(2, torch.ones(4))], nbytes=16, label="expert 3 of layer 1"))
    with pytest.raises(TransferError, match="expert 3 of layer 1 does not fit"):
        eng.wait(bad)
    good = eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16))
    eng.wait(good)  # the engine goes on
    eng.close()
    closed = eng.submit(CopyJob(torch.zeros(4), [(0, torch.ones(4))], nbytes=16, label="late"))
    with pytest.raises(TransferError, match="engine is closed"):
        eng.wait(closed)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_copies_and_orders_on_compute_stream():
    from moe_prefetch.transfer import CUDAStreamEngine

    dev = torch.device("cuda")
    eng = CUDAStreamEngine(dev)
    src = torch.randn(1 << 20).pin_memory()
    dst = torch.empty(1 << 20, device=dev)
    t = eng.submit(CopyJob(dst, [(0, src)], nbytes=src.numel() * 4))
    eng.wait(t)
    assert torch.equal(dst.cpu(), src)
    bad = eng.submit(CopyJob(dst, [(10, src)], nbytes=4))
    with pytest.raises(TransferError):
        eng.wait(bad)
    eng.close()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("kind_", ["ref", "native"])
def test_cuda_engine_stages_pageable_sources_in_fifo_order(native_ext, kind_):
    from moe_prefetch.transfer import CUDAStreamEngine

    if kind_ == "native" and not native_ext.has_cuda():
        pytest.skip("the extension was built without the CUDA ring")
    previous = _native.use(native_ext if kind_ == "native" else None)
    try:
        eng = CUDAStreamEngine(torch.device("cuda"), threads=2)
    finally:
        _native.use(previous)
    assert eng.backend == f"cuda-stream/{kind_}"
    dev = torch.device("cuda")
    dst = torch.empty(3 << 20, device=dev)
    pageable = [torch.full((3 << 20,), float(i)) for i in range(4)]
    pinned = torch.full((3 << 20,), 99.0).pin_memory()
    tickets = [eng.submit(CopyJob(dst, [(0, p)], nbytes=dst.numel() * 4)) for p in pageable]
    tickets.append(eng.submit(CopyJob(dst, [(0, pinned)], nbytes=dst.numel() * 4)))  # queued behind: still last
    eng.wait(tickets[-1])
    assert torch.all(dst == 99.0)  # read on the compute stream after wait(): ordered by the event
    pieces = [(0, torch.randn(1000).to(torch.bfloat16)), (1000, torch.randn(10, 10).t())]
    t = eng.submit(CopyJob(dst, pieces, nbytes=1100 * 4))
    eng.wait(t)
    expected = torch.empty(1100)
    _native.gather_copy_ref(expected, pieces)
    assert torch.equal(dst[:1100].cpu(), expected)
    bad = eng.submit(CopyJob(dst, [(10, pageable[0])], nbytes=4, label="bad expert"))
    with pytest.raises(TransferError, match="bad expert does not fit"):
        eng.wait(bad)
    assert eng.stall_seconds() >= 0
    eng.close()
    assert eng._worker is None or not eng._worker.thread.is_alive()
    with pytest.raises(TransferError, match="closed"):
        eng.wait(eng.submit(CopyJob(dst, [(0, pinned)], nbytes=4)))


def test_demand_copies_overtake_queued_prefetches_and_cancel_withdraws():
    import threading as _t

    from moe_prefetch.transfer import CopyJob as Job, CPUThreadEngine as Engine

    gate = _t.Event()
    order = []
    eng = Engine()
    orig = eng._copy

    def tracked(job):
        gate.wait(5)
        order.append(job.label)
        orig(job)

    eng._copy = tracked
    dst = torch.zeros(4)
    first = eng.submit(Job(dst, [(0, torch.ones(1))], nbytes=4, label="p0", demand=False))  # occupies the worker
    time.sleep(0.05)
    p1 = eng.submit(Job(dst, [(1, torch.ones(1))], nbytes=4, label="p1", demand=False))
    p2 = eng.submit(Job(dst, [(2, torch.ones(1))], nbytes=4, label="p2", demand=False))
    d = eng.submit(Job(dst, [(3, torch.ones(1))], nbytes=4, label="d", demand=True))
    assert eng.cancel(p2) and not eng.cancel(first)
    gate.set()
    for t in (first, p1, d):
        eng.wait(t)
    eng.wait(p2)  # a cancelled ticket is done, without error
    eng.close()
    assert order == ["p0", "d", "p1"]
    assert dst.tolist() == [1, 1, 0, 1]  # p2 never wrote


def test_worker_gate_lets_demand_overtake_a_waiting_prefetch_and_withdraws_it():
    """The CUDA engine's scheduling core: a prefetch waits at the gate (the previous prefetch still on
    the link); a demand copy queued meanwhile runs first, and a prefetch withdrawn while waiting never runs."""
    import threading

    from moe_prefetch.transfer import CopyJob, Ticket, _Worker

    ran, link_free = [], threading.Event()
    gate_entered = threading.Event()

    def gate():
        gate_entered.set()
        link_free.wait(5)

    worker = _Worker(lambda t: ran.append(t.job.label), "test-gate", priority=True, gate=gate)

    def job(label, demand):
        return Ticket(CopyJob(dst=torch.empty(1), pieces=[], nbytes=1, label=label, demand=demand),
                      host=threading.Event())

    p1, p2, d = job("p1", False), job("p2", False), job("d", True)
    worker.put(p1)
    assert gate_entered.wait(5)
    worker.put(d)       # arrives while p1 waits for the link
    worker.put(p2)
    assert p2.cancel()  # evicted before it ever ran
    link_free.set()
    for t in (p1, d):
        worker.wait(t)
    worker.stop()
    assert ran == ["d", "p1"], ran
    assert p2.state == "cancelled"
