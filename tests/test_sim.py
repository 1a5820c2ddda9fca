"""Simulator: hand-checkable timings, bounds, and the trace file format."""
import numpy as np
import pytest

from moe_prefetch.sim import (CostModel, Policy, Trace, load_profiles, physical_bound, simulate,
                              standard_policies)


def make_trace(N=200, L=4, E=8, k=2, seed=0, sticky=0.7):
    rng = np.random.default_rng(seed)
    routing = np.zeros((N, L, k), dtype=np.int64)
    for t in range(N):
        for i in range(L):
            if t and rng.random() < sticky:
                routing[t, i] = routing[t - 1, i]
            else:
                routing[t, i] = rng.choice(E, k, replace=False)
    scores = {"next-gate": rng.random((N, L, 2, E)).astype(np.float32)}
    return Trace(routing, [N], scores, {"experts": E, "top_k": k, "layers": L, "lookahead": 2})


def test_single_slot_alternating_experts_is_serial():
    routing = np.array([[[0]], [[1]]] * 5)  # N=10, L=1, k=1
    tr = Trace(routing, [10], {}, {"experts": 2})
    cost = CostModel(attn_s=1.0, expert_s=0.5, transfer_s=2.0, expert_bytes=100)
    r = simulate(tr, cost, 1, Policy("lru"))
    assert r.seconds == pytest.approx(10 * (1.0 + 2.0 + 0.5))
    assert r.hits == 0 and r.bytes_moved == 1000 and r.stall_seconds == pytest.approx(20.0)


def test_full_cache_only_compulsory_misses():
    tr = make_trace()
    N, L, k = tr.shape
    cost = CostModel(1e-3, 1e-3, 5e-3, 1000)
    r = simulate(tr, cost, L * 8, Policy("lru"))
    distinct = len({(i, e) for t in range(N) for i in range(L) for e in tr.routing[t, i]})
    assert r.requests - r.hits == distinct
    none = simulate(tr, cost, L * 8, Policy("no reuse", eviction="none"))
    assert none.hits == 0 and none.bytes_moved == N * L * k * 1000


def test_oracle_prefetch_hides_transfers_and_bound_holds():
    tr = make_trace(sticky=0.2)
    cost = CostModel(attn_s=2e-3, expert_s=1e-3, transfer_s=1e-3, expert_bytes=1000)
    slots = 12
    results = [simulate(tr, cost, slots, p) for p in standard_policies(["next-gate"], 2)]
    bound = physical_bound(tr, cost, slots)
    for r in results:
        assert r.tokens_per_s <= bound.tokens_per_s * (1 + 1e-9), r.policy
    by = {r.policy: r for r in results}
    oracle = by["oracle prediction + Belady, K=2"]
    lru = by["LRU, no prefetch (mixtral-offloading code)"]
    assert oracle.stall_fraction < 0.05 < lru.stall_fraction
    N, L, k = tr.shape
    compute = N * L * (cost.attn_s + k * cost.expert_s)  # k distinct experts per layer and token
    assert oracle.seconds <= compute * 1.01, "perfect prediction should leave only compute"
    assert lru.seconds > compute * 1.1


def test_trace_roundtrip(tmp_path):
    tr = make_trace(N=20)
    tr.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    assert np.array_equal(back.routing, tr.routing) and back.seq_lengths == [20]
    assert np.allclose(back.scores["next-gate"], tr.scores["next-gate"], atol=1e-3)
    assert back.header["experts"] == 8


def test_profiles_have_sources():
    for kind in ("hardware", "models"):
        for name, prof in load_profiles(kind).items():
            assert prof.get("source"), f"{kind}/{name} has no source"


def test_trace_cli_and_simulate_bench_end_to_end(tmp_path, capsys):
    """Record a trace from a tiny Mixtral with the CLI, then run the GPU-profile bench on it."""
    import random
    import sys
    from pathlib import Path

    from conftest import make_mixtral
    from moe_prefetch.trace import main as trace_main

    ckpt = make_mixtral(tmp_path / "m", layers=4, experts=8, top_k=2, seed=4)
    rng = random.Random(1)
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{rng.randrange(3, 96)}" for _ in range(600)))
    out = tmp_path / "trace.npz"
    assert trace_main(["--model", str(ckpt), "--data", str(text), "--out", str(out), "--lookahead", "2",
                       "--seq-len", "64", "--max-tokens", "256", "--device", "cpu", "--no-progress"]) == 0
    tr = Trace.load(out)
    assert tr.shape == (256, 4, 2) and set(tr.scores) == {"next-gate", "history"}
    assert np.isnan(tr.scores["next-gate"][:, 3]).all(), "next-gate cannot see past the last layer"
    assert not np.isnan(tr.scores["history"][:-1, 3]).any(), "history wraps to the next token"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import simulate as bench_sim
    finally:
        sys.path.pop(0)
    capsys.readouterr()
    assert bench_sim.main(["--trace", str(out), "--hardware", "rtx4090-pcie4", "--cache", "0.5"]) == 0
    text_out = capsys.readouterr().out
    assert "standing in for Mixtral-8x7B" in text_out and "physical bound" in text_out
    assert "ours: history K=2, LFU" in text_out


def test_link_demand_overtakes_queued_prefetch_and_cancel():
    from moe_prefetch.sim import Link

    link = Link(transfer_s=1.0)
    link.send("p0", 0.0, demand=False)   # runs 0..1
    link.send("p1", 0.0, demand=False)   # queued 1..2
    link.send("d", 0.5, demand=True)     # overtakes p1: 1..2, p1 moves to 2..3
    assert link.ready == {"p0": 1.0, "d": 2.0, "p1": 3.0}
    assert link.cancel("p1", 0.6) and "p1" not in link.ready
    assert not link.cancel("p0", 0.6)    # already on the wire
    fifo = Link(transfer_s=1.0, priority=False)
    fifo.send("p0", 0.0, demand=False)
    fifo.send("p1", 0.0, demand=False)
    fifo.send("d", 0.5, demand=True)
    assert fifo.ready["d"] == 3.0
