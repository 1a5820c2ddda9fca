"""Transfer engines: copies land, errors reach the waiting caller, shutdown never hangs."""
import threading

import pytest
import torch

from moe_prefetch.transfer import CopyJob, CPUThreadEngine, TransferError


def test_cpu_engine_copies_pieces_with_dtype_conversion():
    dst = torch.zeros(10, dtype=torch.float32)
    a = torch.arange(4, dtype=torch.bfloat16).view(2, 2)
    b = torch.full((6,), 7.0, dtype=torch.float64)
    with CPUThreadEngine() as eng:
        t = eng.submit(CopyJob(dst, [(0, a), (4, b)], nbytes=40))
        assert eng.wait(t) >= 0
    assert dst.tolist() == [0, 1, 2, 3] + [7.0] * 6


def test_copy_error_is_raised_at_wait_with_a_clear_message():
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


def test_fifo_order_last_copy_wins():
    dst = torch.zeros(1000)
    with CPUThreadEngine() as eng:
        tickets = [eng.submit(CopyJob(dst, [(0, torch.full((1000,), float(i)))], nbytes=4000)) for i in range(50)]
        eng.wait(tickets[-1])
        assert all(t.done() for t in tickets)
    assert torch.all(dst == 49)


def test_close_joins_worker_and_fails_later_submits():
    eng = CPUThreadEngine()
    eng.close()
    assert not eng._thread.is_alive()
    t = eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4))
    with pytest.raises(TransferError, match="closed"):
        eng.wait(t)
    assert threading.active_count() >= 1


def test_queued_copies_fail_instead_of_hanging_when_closed():
    gate = threading.Event()
    eng = CPUThreadEngine()
    orig = eng._copy

    def slow(job):
        gate.wait(5)
        orig(job)

    eng._copy = slow
    first = eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4))
    queued = [eng.submit(CopyJob(torch.zeros(1), [(0, torch.ones(1))], nbytes=4)) for _ in range(3)]
    closer = threading.Thread(target=eng.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert not closer.is_alive()
    eng.wait(first)
    for t in queued:  # either ran before the stop marker or was failed by close(): never pending
        assert t.done()


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
