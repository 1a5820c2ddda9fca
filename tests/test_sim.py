"""Simulator: it drives the runtime's planner; hand-checkable timings, bounds, host compute, the gate,
and the trace file format."""
import numpy as np
import pytest

from moe_prefetch import planner as planner_mod
from moe_prefetch.sim import (CostModel, Policy, Trace, load_profiles, min_transfers, physical_bound, simulate,
                              standard_policies, synthetic_trace)


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


def test_landed_experts_compute_while_a_copy_is_in_flight():
    routing = np.array([[[0, 1]], [[0, 2]]])  # N=2, L=1, k=2: the second token hits 0 and misses 2
    tr = Trace(routing, [2], {}, {"experts": 3})
    cost = CostModel(attn_s=1.0, expert_s=0.5, transfer_s=2.0, expert_bytes=100)
    r = simulate(tr, cost, 2, Policy("lru"))
    # token 0: copies land at 3 and 5, computed 3..3.5 and 5..5.5; token 1 from 6.5: the hit computes
    # 6.5..7 while expert 2's copy runs 6.5..8.5, then it computes 8.5..9
    assert r.seconds == pytest.approx(9.0) and r.hits == 1 and r.bytes_moved == 300
    assert r.stall_seconds == pytest.approx(3.5 + 1.5)  # elapsed minus the 2 x 1.0 of compute per token


def test_simulator_drives_the_planner(monkeypatch):
    """Every layer of every token is planned by planner.Planner, and predictions reach plan_prefetch
    and, once their layer has run, observe_prediction."""
    calls = {"layer": 0, "prefetch": 0, "observe": 0}
    for name, short in (("plan_layer", "layer"), ("plan_prefetch", "prefetch"), ("observe_prediction", "observe")):
        original = getattr(planner_mod.Planner, name)

        def counted(self, *a, _orig=original, _short=short, **kw):
            calls[_short] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(planner_mod.Planner, name, counted)
    tr = make_trace(N=50)
    N, L, _ = tr.shape
    r = simulate(tr, CostModel(1e-3, 1e-3, 5e-3, 1000), 6, Policy("ng", "next-gate", 2, eviction="predictive"))
    assert calls["layer"] == N * L, "one planning round per layer when the cache holds top-k"
    assert calls["prefetch"] == N * L
    # next-gate scores cover both distances everywhere in this trace; predictions past the end never run
    assert calls["observe"] == N * L * 2 - (1 + 2)
    assert r.requests == sum(len(set(tr.routing[t, i])) for t in range(N) for i in range(L))


def test_full_cache_only_compulsory_misses():
    tr = make_trace()
    N, L, k = tr.shape
    cost = CostModel(1e-3, 1e-3, 5e-3, 1000)
    r = simulate(tr, cost, L * 8, Policy("lru"))
    distinct = len({(i, e) for t in range(N) for i in range(L) for e in tr.routing[t, i]})
    assert r.requests - r.hits == distinct
    assert min_transfers(tr.routing, L * 8) == distinct
    none = simulate(tr, cost, L * 8, Policy("no reuse", eviction="none"))
    assert none.hits == 0 and none.bytes_moved == N * L * k * 1000


def test_oracle_prefetch_hides_transfers_and_bounds_hold():
    tr = make_trace(sticky=0.2)
    cost = CostModel(attn_s=2e-3, expert_s=1e-3, transfer_s=1e-3, expert_bytes=1000, host_s=1.5e-3)
    slots = 12
    bound = physical_bound(tr, cost, slots)
    host_bound = physical_bound(tr, cost, slots, host_compute=True)
    assert host_bound.tokens_per_s >= bound.tokens_per_s
    results = [simulate(tr, cost, slots, p) for p in standard_policies(["next-gate"], 2, host_compute=True)]
    for r, p in zip(results, standard_policies(["next-gate"], 2, host_compute=True)):
        limit = host_bound if p.host_compute else bound
        assert r.tokens_per_s <= limit.tokens_per_s * (1 + 1e-9), r.policy
        assert r.bytes_moved >= bound.bytes_moved or p.host_compute, "no policy moves fewer bytes than MIN"
    by = {r.policy: r for r in results}
    oracle = by["oracle prediction + Belady, K=2"]
    lru = by["LRU, no prefetch (mixtral-offloading code)"]
    assert oracle.stall_fraction < 0.05 < lru.stall_fraction
    N, L, k = tr.shape
    compute = N * L * (cost.attn_s + k * cost.expert_s)  # k distinct experts per layer and token
    assert oracle.seconds <= compute * 1.01, "perfect prediction should leave only compute"
    assert lru.seconds > compute * 1.05


def test_belady_bounds_lru_and_lfu_hits():
    for seed, slots in ((0, 6), (1, 10), (2, 16)):
        tr = make_trace(seed=seed, sticky=0.5)
        cost = CostModel(1e-3, 1e-3, 5e-3, 1000)
        belady = simulate(tr, cost, slots, Policy("b", eviction="belady"))
        for ev in ("lru", "lfu", "predictive"):
            assert belady.hits >= simulate(tr, cost, slots, Policy(ev, eviction=ev)).hits, (seed, slots, ev)
        assert belady.requests - belady.hits >= min_transfers(tr.routing, slots)
        assert min_transfers(tr.routing, slots, bypass=True) <= min_transfers(tr.routing, slots)


def test_host_compute_pays_only_when_the_host_is_faster():
    """Fiddler's rule, queue-aware: a miss runs on the host when the host finishes it before its copy
    would land and the device computed it. Without prefetch a layer's k=2 misses queue on the link,
    so the second one's copy lands after 2 transfers."""
    tr = make_trace(sticky=0.3)
    slots = 6
    pol, host_pol = Policy("lfu", eviction="lfu"), Policy("lfu+host", eviction="lfu", host_compute=True)

    def run(host_s):
        cost = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=10e-3, expert_bytes=1000, host_s=host_s)
        return simulate(tr, cost, slots, pol), simulate(tr, cost, slots, host_pol)
    base, host = run(1e-3)  # host 10x faster than the link
    assert host.host_computed > 0 and host.seconds < 0.5 * base.seconds
    assert host.bytes_moved < base.bytes_moved
    base, host = run(15e-3)  # slower than one copy, faster than a second one queued behind it
    assert 0 < host.host_computed <= (base.requests - base.hits) / 2
    assert host.seconds < base.seconds
    base, host = run(20.2e-3)  # slower than transfer + compute even behind a queued copy: never chosen
    assert host.host_computed == 0 and host.seconds == pytest.approx(base.seconds)
    assert host.bytes_moved == base.bytes_moved
    with pytest.raises(ValueError, match="host_s"):
        simulate(tr, CostModel(1e-3, 1e-4, 1e-2, 1000), slots, host_pol)


def test_gate_refuses_hopeless_prefetches_on_a_saturated_link():
    """A link 50 layers slow with demand copies queued: a prefetch 1-2 layers ahead cannot land in
    time, so the gate refuses what the ungated planner issues; an idle, fast link and sure
    predictions get every prefetch through."""
    tr = make_trace(sticky=0.0, seed=3)
    slow = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=60e-3, expert_bytes=1000)
    gated = simulate(tr, slow, 8, Policy("g", "oracle", 2, eviction="lfu", budget_experts=8))
    ungated = simulate(tr, slow, 8, Policy("u", "oracle", 2, eviction="lfu", budget_experts=8, gate=False))
    assert gated.prefetch_gated > 0 and gated.prefetch_issued < ungated.prefetch_issued / 2
    fast = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=0.5e-3, expert_bytes=1000)
    idle = simulate(tr, fast, 12, Policy("g", "oracle", 2, eviction="lfu"))
    # an idle link: almost everything passes (the gate still declines to evict an expert as sure to be used)
    assert idle.prefetch_issued > 0 and idle.prefetch_gated <= idle.prefetch_issued // 100
    assert idle.hit_rate > 0.9


@pytest.mark.parametrize("transfer_s", [0.5e-3, 3e-3, 20e-3])
def test_oracle_with_gate_never_loses_hits(transfer_s):
    tr = make_trace(sticky=0.4, seed=5)
    cost = CostModel(attn_s=1e-3, expert_s=2e-4, transfer_s=transfer_s, expert_bytes=1000)
    for ev in ("lfu", "predictive"):
        plain = simulate(tr, cost, 8, Policy("plain", eviction=ev))
        oracle = simulate(tr, cost, 8, Policy("oracle", "oracle", 2, eviction=ev))
        assert oracle.hits >= plain.hits, (ev, oracle.hits, plain.hits)


def test_trace_roundtrip(tmp_path):
    tr = make_trace(N=20)
    tr.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    assert np.array_equal(back.routing, tr.routing) and back.seq_lengths == [20]
    assert np.allclose(back.scores["next-gate"], tr.scores["next-gate"], atol=1e-3)
    assert back.header["experts"] == 8


def test_trace_files_that_are_not_simulator_traces_are_refused_in_one_line(tmp_path):
    import torch

    from moe_prefetch.errors import MoePrefetchError
    from moe_prefetch.trace import save_routing

    with pytest.raises(MoePrefetchError, match="does not exist"):
        Trace.load(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(MoePrefetchError, match="cannot read trace"):
        Trace.load(tmp_path / "junk.npz")
    save_routing([[torch.tensor([[0, 1]])]], tmp_path / "run.npz")  # one run's routing: the oracle's kind
    with pytest.raises(MoePrefetchError, match=r"the routing of one run \(trace --prompt"):
        Trace.load(tmp_path / "run.npz")
    np.savez(tmp_path / "other.npz", routing=np.zeros((2, 2, 2)))
    with pytest.raises(MoePrefetchError, match="no 'header' array"):
        Trace.load(tmp_path / "other.npz")


def test_head_keeps_the_sequences_and_history_resets_at_each(tmp_path):
    tr = make_trace(N=30)
    tr.seq_lengths = [10, 10, 10]
    head = tr.head(15)
    assert head.routing.shape[0] == 15 and head.seq_lengths == [10, 5]
    assert head.scores["next-gate"].shape[0] == 15
    cost = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=5e-3, expert_bytes=1)
    # history replays from the routing at any K up to a whole token, and refuses more
    r = simulate(head, cost, 8, Policy("h", "history", 4, eviction="predictive", adaptive=False))
    assert r.prefetch_issued + r.prefetch_gated > 0  # its predictions reached the planner's gate
    from moe_prefetch.errors import MoePrefetchError

    with pytest.raises(MoePrefetchError, match="at most one token ahead"):
        simulate(head, cost, 8, Policy("h", "history", 5))
    with pytest.raises(MoePrefetchError, match="no m2r2 scores"):
        simulate(head, cost, 8, Policy("m", "m2r2", 2))


def test_profiles_have_sources_and_host_costs():
    for kind in ("hardware", "models", "hosts"):
        for name, prof in load_profiles(kind).items():
            assert prof.get("source"), f"{kind}/{name} has no source"
    hosts = load_profiles("hosts")
    assert hosts["ddr5-2ch"]["read_gbps"] < hosts["ddr5-2ch"]["theoretical_gbps"]
    shape = load_profiles("models")["mixtral-8x7b"]
    cost = CostModel.for_gpu(load_profiles("hardware")["rtx4090-pcie4"], shape, "int4", 6, hosts["ddr5-2ch"])
    assert cost.host_s == pytest.approx(cost.expert_bytes / 60e9)
    assert cost.host_s < cost.transfer_s, "DDR5 reads an int4 expert faster than PCIe 4 moves it"
    assert cost.costs().host_s == cost.host_s and cost.costs().layer_s == cost.attn_s
    assert CostModel.for_gpu(load_profiles("hardware")["rtx4090-pcie4"], shape, "int4", 6).host_s is None


def test_link_is_the_planners():
    from moe_prefetch.sim import Link
    assert Link is planner_mod.Link


def test_trace_cli_and_simulate_bench_end_to_end(tmp_path, capsys):
    """Record a trace from a tiny Mixtral with the CLI, then run the GPU-profile bench on it."""
    import json
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
    md, js = tmp_path / "s.md", tmp_path / "s.json"
    assert bench_sim.main(["--trace", str(out), "--hardware", "rtx4090-pcie4", "--cache", "0.5", "--max-lookahead", "1",
                           "--host-compute", "--host", "ddr5-2ch", "--md", str(md), "--json", str(js)]) == 0
    text_out = capsys.readouterr().out
    assert "standing in for Mixtral-8x7B" in text_out and "physical bound, copy only" in text_out
    assert "ours: history K=1, predictive eviction, gated, host compute" in text_out
    assert "physical bound, host compute" in text_out
    assert "Simulated, not measured" in md.read_text()
    rows = json.loads(js.read_text())
    assert {r["host"] for r in rows} == {None, "ddr5-2ch"} and all(r["simulated"] for r in rows)


def test_fixed_costs_per_copy_host_job_and_predicted_layer():
    """The CPU backend's fixed costs are charged where they occur: each copy started, each host job, each
    layer on which the predictor runs (and not on layers where the planner skipped predicting)."""
    routing = np.array([[[0]], [[1]]] * 5)  # N=10, L=1, k=1: one slot, every token a copy
    tr = Trace(routing, [10], {}, {"experts": 2})
    base = CostModel(attn_s=1.0, expert_s=0.5, transfer_s=2.0, expert_bytes=100)
    plain = simulate(tr, base, 1, Policy("lru"))
    with_copy = simulate(tr, CostModel(1.0, 0.5, 2.0, 100, copy_s=0.25), 1, Policy("lru"))
    assert with_copy.seconds == pytest.approx(plain.seconds + 10 * 0.25)
    host = CostModel(1.0, 0.5, 20.0, 100, host_s=1.0)
    on_host = simulate(tr, host, 1, Policy("h", host_compute=True, eviction="lru"))
    assert on_host.host_computed > 0
    charged = simulate(tr, CostModel(1.0, 0.5, 20.0, 100, host_s=1.0, host_job_s=0.125), 1,
                       Policy("h", host_compute=True, eviction="lru"))
    assert charged.host_computed == on_host.host_computed
    assert charged.seconds >= on_host.seconds + 0.125 * on_host.host_computed - 1e-9
    # prediction: the oracle predicts every layer when always on; each costs predict_s
    tr2 = make_trace(N=40, L=4, sticky=0.0, seed=2)
    cheap = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=0.5e-3, expert_bytes=1000)  # an idle link: prefetches pass
    pricey = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=0.5e-3, expert_bytes=1000, predict_s=1e-3)
    pol = Policy("o", "oracle", 2, eviction="lfu", adaptive=False)
    a, b = simulate(tr2, cheap, 12, pol), simulate(tr2, pricey, 12, pol)
    assert a.prefetch_issued > 0
    assert b.seconds > a.seconds + 0.5 * 40 * 4 * 1e-3  # most layers predicted, each paying 1 ms
    # adaptive: when predicting costs more than it saves, the switch turns it off most of the time
    costly = CostModel(1e-3, 1e-4, 0.5e-3, 1000, predict_s=20e-3)
    adaptive = simulate(tr2, costly, 12, Policy("o", "oracle", 2, eviction="lfu"))
    always = simulate(tr2, costly, 12, pol)
    assert adaptive.seconds < 0.6 * always.seconds


@pytest.mark.parametrize("host", [False, True])
def test_predictive_eviction_follows_popularity_and_stickiness(host):
    """Where routing does not stick across tokens predictive eviction is as good as LFU; where it does it
    learns so and beats LFU by far (and, with a cache of half the experts, LRU too). With host compute
    the misses that stickiness brings back run on the host, and the background copies that keep the
    cache warm are judged on frequency: there it is LFU's equal, and above LRU."""
    cost = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=13.4e-3, expert_bytes=1, host_s=5.6e-3 if host else None)
    tps = {}
    for sticky in (0.0, 0.6):
        tr = synthetic_trace(8, 8, 2, 400, repeat=sticky)
        for ev in ("lru", "lfu", "predictive"):
            tps[sticky, ev] = simulate(tr, cost, 32, Policy(ev, eviction=ev, host_compute=host)).tokens_per_s
    assert tps[0.0, "predictive"] >= 0.97 * tps[0.0, "lfu"] and tps[0.0, "lfu"] > tps[0.0, "lru"], tps
    if host:
        assert tps[0.6, "predictive"] >= 0.97 * tps[0.6, "lfu"] and tps[0.6, "predictive"] > 1.1 * tps[0.6, "lru"], tps
    else:
        assert tps[0.6, "predictive"] > 1.3 * tps[0.6, "lfu"], tps
        assert tps[0.6, "predictive"] > 1.1 * tps[0.6, "lru"], tps


def test_predictions_steer_eviction_on_a_saturated_link():
    """On a link ten layer-computes per expert, prefetches cannot hide copies; what a prediction is
    worth there is which experts stay. A token-ahead oracle steering eviction (a predicted layer's cached
    experts outside its top-k ranked as unlikely) makes decode faster than the oracle acting through
    prefetches alone (steers_eviction off), with fewer copies, and a predictor of pure noise, whose
    steering the planner counts as worthless, costs next to nothing."""
    import moe_prefetch.planner as planner_mod

    tr = make_trace(N=300, L=4, E=8, k=2, sticky=0.0, seed=1)
    tr.scores["noise"] = np.random.default_rng(3).random((300, 4, 4, 8)).astype(np.float32)
    cost = CostModel(attn_s=1e-3, expert_s=1e-4, transfer_s=10e-3, expert_bytes=1, predict_s=0.3e-3)
    base = simulate(tr, cost, 8, Policy("none", eviction="predictive"))
    oracle = simulate(tr, cost, 8, Policy("oracle", "oracle", 4, eviction="predictive"))
    noise = simulate(tr, cost, 8, Policy("noise", "noise", 4, eviction="predictive"))
    steers = planner_mod.Planner.steers_eviction
    try:
        planner_mod.Planner.steers_eviction = lambda self: False
        unsteered = simulate(tr, cost, 8, Policy("oracle", "oracle", 4, eviction="predictive"))
    finally:
        planner_mod.Planner.steers_eviction = steers
    assert oracle.tokens_per_s > 1.08 * base.tokens_per_s
    assert oracle.tokens_per_s > 1.06 * unsteered.tokens_per_s
    assert oracle.bytes_moved < 0.96 * unsteered.bytes_moved, "fewer copies, not earlier ones"
    assert noise.tokens_per_s > 0.97 * base.tokens_per_s
