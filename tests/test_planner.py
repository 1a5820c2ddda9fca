"""Planner (pure Python): link timing, calibration, predictive eviction, the executing layer's actions,
host-or-copy choice and the prefetch gate, checked by hand."""
import pytest

from moe_prefetch.cache import ExpertCache
from moe_prefetch.planner import Calibration, Costs, Link, Planner, PredictivePolicy


def make_planner(slots=4, layers=4, experts=8, top_k=2, **kw):
    costs = kw.pop("costs", Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0))
    return Planner(slots, list(range(layers)), experts, top_k, costs, **kw)


# ---- Link -------------------------------------------------------------------------------------

def test_link_etas_and_demand_first():
    link = Link(transfer_s=1.0)
    assert link.demand_eta(0.0) == 1.0 and link.prefetch_eta(0.0) == 1.0  # idle
    assert link.send("p0", 0.0, demand=False) == 1.0   # on the wire 0..1
    assert link.send("p1", 0.0, demand=False) == 2.0   # queued 1..2
    assert link.prefetch_eta(0.5) == 3.0               # behind everything
    assert link.demand_eta(0.5) == 2.0                 # ahead of p1, not of p0 (already on the wire)
    assert link.send("d", 0.5, demand=True) == 2.0     # overtakes p1, which moves to 2..3
    assert link.ready == {"p0": 1.0, "d": 2.0, "p1": 3.0}
    assert link.in_flight(0.5) == 3 and not link.landed("d", 1.5) and link.landed("p0", 1.0)
    assert link.cancel("p1", 0.6) and "p1" not in link.ready
    assert not link.cancel("p0", 0.6)                  # already on the wire
    assert link.in_flight(1.5) == 1                     # p0 landed at 1.0
    assert link.landed("never sent", 0.0), "an expert with no copy pending is ready"


def test_fifo_link_has_no_overtaking():
    fifo = Link(transfer_s=1.0, priority=False)
    fifo.send("p0", 0.0, demand=False)
    fifo.send("p1", 0.0, demand=False)
    assert fifo.demand_eta(0.5) == 3.0
    fifo.send("d", 0.5, demand=True)
    assert fifo.ready["d"] == 3.0 and not fifo.cancel("p1", 0.6)


def test_demand_copy_after_idle_gap_starts_now():
    link = Link(transfer_s=1.0)
    link.send("a", 0.0, demand=True)
    assert link.send("b", 5.0, demand=True) == 6.0
    assert link.demand_eta(5.5) == 7.0


# ---- Calibration ------------------------------------------------------------------------------

def test_calibration_starts_at_the_prior_and_converges_to_observed_rates():
    cal = Calibration(top_k=2)
    assert cal.p(1, 0.3) == pytest.approx(0.6)  # prior: top_k x score
    assert cal.p(1, 0.9) == pytest.approx(1.0)
    for n in range(2000):
        cal.update(1, 0.3, used=n % 5 == 0)  # a 0.3 score is used 20% of the time at distance 1
        cal.update(1, 0.9, used=n % 10 != 0)  # a 0.9 score, 90%
        cal.update(2, 0.3, used=n % 2 == 0)   # distances calibrate apart
    assert cal.p(1, 0.3) == pytest.approx(0.2, abs=0.01)
    assert cal.p(1, 0.35) == pytest.approx(0.2, abs=0.01), "same bin"
    assert cal.p(1, 0.9) == pytest.approx(0.9, abs=0.01)
    assert cal.p(2, 0.3) == pytest.approx(0.5, abs=0.01)
    rep = cal.report()
    assert rep["1"]["n"] == 4000 and rep["1"]["used"] == pytest.approx(0.55)
    assert rep["1"]["ece"] < 0.02, "after convergence the calibrated P matches the use rate"


# ---- PredictivePolicy -------------------------------------------------------------------------

def test_predictive_policy_evicts_the_expert_expected_to_be_needed_last():
    """Fewer layers until its layer runs and a higher P of use both keep an expert."""
    pol = PredictivePolicy({i: i for i in range(4)}, top_k=2)
    cache = ExpertCache(3, pol)
    for key in ((1, 0), (2, 0), (3, 0)):
        cache.insert(key)
    pol.position = 0
    pol.predicted.update({(1, 0): 0.9, (2, 0): 0.9, (3, 0): 0.2})
    assert pol.victim(set(cache.keys())) == (3, 0), "farthest and least likely"
    pol.predicted.update({(1, 0): 0.02, (3, 0): 0.9})
    assert pol.victim(set(cache.keys())) == (1, 0), "nearest, but very unlikely"
    pol.position = 2  # layer 1 is now 3 layers away, layer 2 a whole token (4) away
    pol.predicted.update({(1, 0): 0.6, (2, 0): 0.6, (3, 0): 0.6})
    assert pol.victim(set(cache.keys())) == (2, 0), "equal P: the farthest layer goes"
    assert pol.victim({(1, 0), (3, 0)}) == (1, 0), "only among the candidates"


def test_predictive_policy_uses_frequency_and_breaks_ties_by_recency():
    pol = PredictivePolicy({0: 0}, top_k=1)
    cache = ExpertCache(3, pol)
    for e in range(3):
        cache.insert((0, e))
    everything = {(0, 0), (0, 1), (0, 2)}
    assert pol.victim(everything) == (0, 0), "no information: least recently used"
    for _ in range(3):
        pol.record_use((0, 0))
    pol.record_use((0, 2))
    assert pol.victim(everything) == (0, 1), "never used"
    pol.predicted[(0, 1)] = 1.0
    assert pol.victim(everything) == (0, 2), "a sure prediction outweighs one past use in four"
    assert pol.victim({(0, 0), (0, 1)}) == (0, 1), "three uses in four beat a prediction blended with none"



def test_predictive_policy_learns_returns_beyond_the_last_token():
    """Trained routing remembers more than one token: an expert's chance of use depends on how many runs
    ago it was last used, not only on whether that was the last run. Here four equally frequent experts
    take turns (each returns exactly four runs after its last use): the rule must learn that the expert
    used four runs ago is the one about to return, and keep it, where two recency buckets (the last run,
    the rest) cannot tell it from those used two and three runs ago and evict it as the least recent."""
    pol = PredictivePolicy({0: 0}, top_k=1, num_experts=8)
    cache = ExpertCache(4, pol)
    for run in range(40):
        e = run % 4
        pol.start_run(0, [e], record=True)
        if (0, e) not in cache:
            cache.insert((0, e))
        else:
            cache.touch((0, e))
    # run 40 will use expert 0, last used 4 runs ago; 1, 2 and 3 were used 3, 2 and 1 runs ago
    p = {e: pol.use_probability((0, e)) for e in range(4)}
    assert p[0] > 0.8 and max(p[1], p[2], p[3]) < 0.2, p
    assert pol.victim({(0, e) for e in range(4)}) != (0, 0), "evicted the expert about to return"


# ---- the executing layer ----------------------------------------------------------------------

def test_plan_layer_hits_copies_and_never_evicts_what_the_layer_needs():
    for eviction in ("lru", "lfu", "predictive"):
        pl = make_planner(slots=2, layers=1, eviction=eviction)
        for e in (1, 0):  # (0, 1) becomes the least recently used
            acts = pl.plan_layer(0.0, 0, [e])
            assert [a.kind for a in acts] == ["copy"]
            pl.release(acts)
        acts = pl.plan_layer(100.0, 0, [2, 1], in_order=True)
        assert [(a.kind, a.key) for a in acts] == [("copy", (0, 2)), ("hit", (0, 1))], eviction
        assert acts[0].evicted == (0, 0), f"{eviction}: evicted an expert the layer needs"
        assert pl.cache.is_pinned((0, 2)) and pl.cache.is_pinned((0, 1))
        pl.release(acts)
        assert not pl.cache.is_pinned((0, 2)) and not pl.cache.is_pinned((0, 1))


def test_plan_layer_runs_in_rounds_when_the_layer_needs_more_than_the_cache():
    pl = make_planner(slots=2, layers=1, top_k=3, eviction="lru")
    first = pl.plan_layer(0.0, 0, [0, 1, 2])
    assert len(first) == 2 and all(a.kind == "copy" for a in first)
    pl.release(first)
    rest = [e for e in (0, 1, 2) if (0, e) not in {a.key for a in first}]
    second = pl.plan_layer(30.0, 0, rest)
    assert [a.key[1] for a in second] == rest and second[0].evicted in {a.key for a in first}


def test_a_run_starts_at_each_token_of_a_one_layer_model_and_not_at_another_round():
    """A model with one MoE layer plans the same layer at every token: each is a run of its own (its uses
    counted once, its recency groups moved, the link's traffic averaged, the token clock ticked), while
    a second round of one run (the cache smaller than the layer's experts) is not."""
    pl = make_planner(slots=2, layers=1, top_k=3, eviction="predictive")
    pol = pl.policy
    first = pl.plan_layer(0.0, 0, [0, 1, 2])
    assert len(first) == 2
    pl.release(first)
    second = pl.plan_layer(1.0, 0, [e for e in (0, 1, 2) if (0, e) not in {a.key for a in first}])
    pl.release(second)
    assert pol._runs[0] == 1 and pol.layer_uses[0] == 3, "a second round is the same run"
    traffic = [pl.link_traffic]
    for t in range(2, 5):
        acts = pl.plan_layer(float(t), 0, [1, 2])
        assert len(acts) == 2
        pl.release(acts)
        traffic.append(pl.link_traffic)
    assert traffic[0] > 0 and len(set(traffic)) == 4, f"the link's traffic is a moving average per run: {traffic}"
    assert pol._runs[0] == 4 and pol.uses[(0, 1)] == 4 and pol.uses[(0, 0)] == 1 and pol.layer_uses[0] == 9
    assert pl.switch._t0 == 4.0, "every token's first MoE layer ticks the prediction switch"


def test_wait_for_a_prefetch_in_flight_and_promotion_to_demand():
    pl = make_planner(slots=4, layers=4, eviction="lru", budget_experts=4, gate=False)
    acts = pl.plan_prefetch(0.0, 0, [(1, 1, {5: 0.5}), (2, 2, {6: 0.5})], protected=set())
    assert [a.key for a in acts] == [(1, 5), (2, 6)]
    assert pl.link.ready == {(1, 5): 10.0, (2, 6): 20.0}
    got = pl.plan_layer(1.0, 2, [6])  # (2, 6) has not started: it becomes a demand copy, ahead of nothing
    assert [a.kind for a in got] == ["wait"] and pl.link.ready[(2, 6)] == 20.0
    pl.release(got)
    late = pl.plan_layer(12.0, 1, [5])
    assert [a.kind for a in late] == ["hit"], "landed at 10"
    assert pl.counters.prefetch_used == 2 and pl.counters.waits == 1 and pl.counters.hits == 1


def test_remove_frees_the_slot():
    pl = make_planner(slots=1, layers=1, eviction="lru")
    acts = pl.plan_layer(0.0, 0, [3])
    pl.release(acts)
    pl.remove((0, 3))
    assert (0, 3) not in pl.cache and pl.cache.has_free()


# ---- host or copy -----------------------------------------------------------------------------

@pytest.mark.parametrize("host_s,expected", [(9.95, "host"), (10.2, "copy")])
def test_host_or_copy_by_which_finishes_first(host_s, expected):
    """transfer 10 + device compute 0.1: the host wins below 10.1 (Fiddler's rule for one miss)."""
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=host_s)
    pl = make_planner(costs=costs, host_compute=True, eviction="lru")
    acts = pl.plan_layer(0.0, 0, [3])
    assert [a.kind for a in acts] == [expected]
    if expected == "host":
        assert pl.host_free == pytest.approx(host_s)
        # the link is idle and a slot is free: the expert is also copied in, in the background, decided
        # when the caller takes the keeps (while it waits for the host)
        assert (0, 3) not in pl.cache and pl.counters.keeps == 0
        assert [a.key for a in pl.take_keeps()] == [(0, 3)]
        assert (0, 3) in pl.cache and pl.counters.keeps == 1
        assert pl.take_keeps() == []
        assert pl.link.in_flight(0.0) == 1, "only the background copy moves"


def test_host_choice_sees_the_queues():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=15.0)
    pl = make_planner(costs=costs, host_compute=True, eviction="lru")
    acts = pl.plan_layer(0.0, 0, [0, 1])
    # first miss: copy lands at 10 < host 15; second: copy at 20 > host 15
    assert [(a.kind, a.key) for a in acts] == [("copy", (0, 0)), ("host", (0, 1))]
    pl.release(acts)
    acts = pl.plan_layer(1.0, 1, [2])  # the host is busy until 15: host at 30 vs copy at 20
    assert [a.kind for a in acts] == ["copy"]
    assert make_planner(costs=costs, host_compute=False).plan_layer(0.0, 0, [0, 1])[1].kind == "copy"
    no_host = make_planner(costs=Costs(1.0, 0.1, 10.0), host_compute=True)
    assert not no_host.host_compute, "host compute needs a host cost"


def test_host_beats_waiting_for_a_late_prefetch():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=2.0)
    pl = make_planner(costs=costs, host_compute=True, eviction="lru", gate=False, budget_experts=4)
    pl.plan_prefetch(0.0, 0, [(1, 1, {4: 0.9})], protected=set())
    acts = pl.plan_layer(1.0, 1, [4])  # the copy lands at 10; the host is done at 3
    assert [a.kind for a in acts] == ["host"] and (1, 4) in pl.cache, "the copy still lands, for later use"
    assert not pl.cache.is_pinned((1, 4))


# ---- the prefetch gate ------------------------------------------------------------------------

def test_gate_accepts_on_an_idle_link_and_refuses_on_a_saturated_one():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=100.0)
    idle = make_planner(slots=8, costs=costs, eviction="lru", budget_experts=8)
    acts = idle.plan_prefetch(0.0, 0, [(1, 1, {3: 1.0})], protected=set())
    assert [a.key for a in acts] == [(1, 3)], "sure prediction, idle link, free slot: it pays"
    busy = make_planner(slots=8, costs=costs, eviction="lru", budget_experts=8)
    demand = busy.plan_layer(0.0, 0, [0, 1])  # two demand copies: the link is busy until 200
    acts = busy.plan_prefetch(0.0, 0, [(1, 1, {3: 1.0})], protected={a.key for a in demand})
    assert acts == [] and busy.counters.prefetch_gated == 1, "lands 300 after it is needed at 1.2"
    ungated = make_planner(slots=8, costs=costs, eviction="lru", budget_experts=8, gate=False)
    demand = ungated.plan_layer(0.0, 0, [0, 1])
    assert len(ungated.plan_prefetch(0.0, 0, [(1, 1, {3: 1.0})], protected={a.key for a in demand})) == 1


def test_gate_refuses_unlikely_experts_and_the_budget_caps_copies_in_flight():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=0.5)
    pl = make_planner(slots=8, costs=costs, eviction="lru", budget_experts=2)
    acts = pl.plan_prefetch(0.0, 0, [(1, 1, {3: 0.01, 4: 0.6, 5: 0.6, 6: 0.6})], protected=set())
    assert [a.key for a in acts] == [(1, 4), (1, 5)], "P(0.01) below the floor; two in flight at most"
    assert pl.counters.prefetch_budget == 1


def test_prefetch_never_evicts_protected_or_pinned_experts():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=0.5)
    pl = make_planner(slots=2, costs=costs, eviction="lru", budget_experts=4, gate=False)
    acts = pl.plan_layer(0.0, 0, [0, 1])  # both slots pinned by the executing layer
    assert pl.plan_prefetch(0.0, 0, [(1, 1, {3: 1.0})], protected=set()) == []
    pl.release(acts)
    got = pl.plan_prefetch(5.0, 0, [(1, 1, {3: 1.0, 4: 0.9})], protected={(0, 0)})
    assert [(a.key, a.evicted) for a in got] == [((1, 3), (0, 1))], "(1, 3) is protected from (1, 4)"


def test_predictive_eviction_counts_every_use_host_computed_ones_included():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=1.0)
    pl = make_planner(costs=costs, host_compute=True, eviction="predictive")
    acts = pl.plan_layer(0.0, 0, [3, 4])
    assert {a.kind for a in acts} == {"host"}
    pl.settle()  # the run's uses are counted by the bookkeeping the caller does once its jobs started
    assert pl.policy.uses[(0, 3)] == 1 and pl.policy.layer_uses[0] == 2


def test_host_computed_miss_is_kept_only_when_the_link_is_idle_and_it_beats_the_victim():
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=1.0)
    pl = make_planner(costs=costs, host_compute=True, eviction="predictive")
    pl.budget = 1
    first = pl.plan_layer(0.0, 0, [3])
    assert first[0].kind == "host" and len(pl.take_keeps()) == 1 and pl.counters.keeps == 1  # idle link, free slot
    pl.release(first)
    second = pl.plan_layer(0.5, 1, [4])
    assert second[0].kind == "host" and pl.take_keeps() == [] and pl.counters.keeps == 1, \
        "the link is busy with the first keep"


@pytest.mark.parametrize("recency", [False, True])
def test_host_computed_miss_is_kept_on_frequency_or_with_recency_as_the_keep_ledger_says(recency):
    """Where the keep ledger says frequency, eviction's recency line does not decide a keep: a rarely used
    expert that was just used does not displace a popular one, however strongly its layer's routing
    sticks. Where it says recency, it does, when the line says it is the likelier to return."""
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=1.0)
    pl = make_planner(slots=1, layers=1, top_k=1, costs=costs, host_compute=True, eviction="predictive")
    assert pl.keep_ledger is not None
    pl.keeps_use_recency = lambda: recency
    now = 0.0
    for _ in range(6):  # expert 5: host-computed and kept at first, then a hit at every run
        acts = pl.plan_layer(now, 0, [5])
        pl.release(acts)
        now += 20.0
    assert (0, 5) in pl.cache and pl.counters.keeps == 1
    pl.policy.recency_line = lambda key: (1.0, 1.0) if key == (0, 3) else (0.0, 1.0)  # as if expert 3 will surely return
    assert pl.policy.use_probability((0, 3)) > pl.policy.use_probability((0, 5))
    acts = pl.plan_layer(now, 0, [3])
    assert [a.kind for a in acts] == ["host"]
    pl.take_keeps()
    if recency:
        assert pl.counters.keeps == 2 and (0, 3) in pl.cache and (0, 5) not in pl.cache
    else:
        assert pl.counters.keeps == 1 and (0, 5) in pl.cache and (0, 3) not in pl.cache


def test_lru_with_host_compute_keeps_the_expert_just_used():
    """Under LRU's own policy a host-computed miss is copied in on an idle link in place of the least recently
    used expert: recency is LRU's whole rule. (Judged by a probability of use, which LRU has none of, no keep
    ever passed and the cache froze once full: simulated on a sticky 8-layer trace at 50% cache with host
    compute, 58% hits against LRU's 84% without host compute.)"""
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=1.0)
    pl = make_planner(slots=2, layers=1, top_k=1, costs=costs, host_compute=True, eviction="lru")
    now = 0.0
    kinds = []
    for e in (0, 1, 2, 2):  # each miss runs on the host and is kept: 0 and 1 into free slots, 2 over 0; then a hit
        acts = pl.plan_layer(now, 0, [e])
        kinds.append(acts[0].kind)
        pl.release(acts)
        now += 20.0  # the link idle again
    assert kinds == ["host", "host", "host", "hit"] and pl.counters.keeps == 3
    assert (0, 2) in pl.cache and (0, 1) in pl.cache and (0, 0) not in pl.cache


def test_keep_ledger_exists_only_where_keeps_have_two_rules():
    host = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=1.0)
    assert make_planner(costs=host, host_compute=True, eviction="predictive").keep_ledger is not None
    assert make_planner(costs=host, host_compute=False, eviction="predictive").keep_ledger is None  # no keeps
    assert make_planner(costs=host, host_compute=True, eviction="lfu").keep_ledger is None  # no recency line
    assert make_planner(costs=host, host_compute=True, eviction="predictive", adaptive=False).keep_ledger is not None
    for rule in (False, True):  # fixed: no ledger
        pl = make_planner(costs=host, host_compute=True, eviction="predictive", keep_recency=rule)
        assert pl.keep_ledger is None and pl.keeps_use_recency() is rule


def test_keep_ledger_counts_uses_while_the_two_caches_differ():
    """Frequency runs and declines a keep recency would make: each later use of the expert not kept (once
    recency's copy would have landed) is a host job recency saved, each use of the victim one it cost, while
    the real cache leaves them as frequency did; a side whose expert the real cache changes meanwhile stops
    counting, and so does one past HORIZON runs of its layer."""
    from moe_prefetch.switch import KeepLedger

    led = KeepLedger()
    resident = {(1, 0)}  # the victim is cached, the expert frequency declined is not
    led.pair((0, 5), (1, 0), recency_keeps=True, kept=False, eta=10.0)
    assert led.extra == 1 and led.standing((0, 5)) and not led.standing((1, 0))
    landed = lambda key: True  # noqa: E731
    led.run(0, {(0, 5)}, 5.0, resident.__contains__, landed)
    assert (led.won, led.lost) == (0, 0), "recency's copy would not have landed yet: the host runs that use anyway"
    led.run(0, {(0, 5)}, 12.0, resident.__contains__, landed)
    led.run(1, {(1, 0)}, 12.0, resident.__contains__, landed)
    assert (led.won, led.lost) == (1, 1)
    resident.add((0, 5))  # the real cache takes it in (a later keep): the caches agree on it from here
    led.run(0, {(0, 5)}, 20.0, resident.__contains__, landed)
    assert led.won == 1 and not led.standing((0, 5))
    for _ in range(KeepLedger.HORIZON):  # the victim's side ages out unused... then a use counts nothing
        led.run(1, set(), 30.0, resident.__contains__, landed)
    led.run(1, {(1, 0)}, 40.0, resident.__contains__, landed)
    assert led.lost == 1 and not led._sides.get(1)
    # recency runs and keeps (the reverse roles): the kept expert's use counts only once its bytes landed
    led2 = KeepLedger()
    led2.arm = True
    led2.pair((0, 7), (1, 3), recency_keeps=True, kept=True, eta=0.0)
    resident = {(0, 7)}
    led2.run(0, {(0, 7)}, 1.0, resident.__contains__, lambda key: False)
    led2.run(0, {(0, 7)}, 2.0, resident.__contains__, lambda key: True)
    led2.run(1, {(1, 3)}, 2.0, resident.__contains__, lambda key: True)
    assert (led2.won, led2.lost) == (1, 1)


def test_keep_ledger_chooses_recency_only_beyond_the_noise_and_its_keeps_cost():
    """Recency runs while its net uses saved times the host's time per job beat its extra keeps times what
    a keep costs the caller, by Z standard errors; frequency until keeps have been timed."""
    from moe_prefetch.switch import KeepLedger

    led = KeepLedger()
    led.won, led.lost, led.extra = 30.0, 10.0, 20.0
    led.token(host_s=1.0)
    assert led.arm is False, "no keep timed yet"
    led.observe_keep(0.0, KeepLedger.MIN_KEEPS)  # free keeps (a GPU's DMA engine)
    led.won, led.lost = 30.0, 10.0
    led.token(host_s=1.0)
    assert led.arm is True  # 20 net against 1.645 x sqrt(41)
    led.won, led.lost, led.extra = 30.0, 10.0, 20.0
    led.keep_s = 0.9  # a keep costs nearly a host job: 20 - 18 is within the noise
    led.token(host_s=1.0)
    assert led.arm is False
    led.won, led.lost, led.keep_s = 14.0, 10.0, 0.0
    led.token(host_s=1.0)
    assert led.arm is False, "4 net uses of 24 are within the noise"


def test_planner_pairs_keeps_where_the_rules_disagree_on_a_virtual_link():
    """Frequency runs: a just-used rare expert is not kept over a popular one, but recency would keep it; the
    planner records the pair and queues recency's copy on a virtual link, and records no more pairs than
    that link could carry (the budget in flight)."""
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=10.0, host_s=1.0)
    pl = make_planner(slots=1, layers=1, top_k=1, costs=costs, host_compute=True, eviction="predictive",
                      budget_experts=1)
    led = pl.keep_ledger
    now = 0.0
    for _ in range(6):  # expert 5: host-computed, kept into the free slot, then a hit at every run
        pl.release(pl.plan_layer(now, 0, [5]))
        now += 20.0
    pl.policy.recency_line = lambda key: (1.0, 1.0) if key == (0, 3) else (0.0, 1.0)  # recency: 3 surely returns
    assert not led.arm and led.pairs == 0
    pl.release(pl.plan_layer(now, 0, [3]))
    assert led.pairs == 1 and (0, 3) not in pl.cache and led.standing((0, 3))
    assert pl._virtual_end == pytest.approx(now + costs.transfer_s)
    pl.policy.recency_line = lambda key: (1.0, 1.0) if key == (0, 4) else (0.0, 1.0)
    pl.release(pl.plan_layer(now + 1.0, 0, [4]))  # recency's link is still busy with its keep of 3: no pair
    assert led.pairs == 1


def test_prediction_switch_runs_the_faster_mean():
    """PredictionSwitch compares plain means: the faster after the opening, by MARGIN."""
    from moe_prefetch.switch import PredictionSwitch

    sw = PredictionSwitch()
    sw.mean = {True: 1.0, False: 2.0}
    sw._schedule, sw.arm = [], False
    sw._tokens, sw._seconds = 1, 1.9
    sw._end_epoch()
    assert sw.arm is True and len(sw._schedule) >= sw.EXPLOIT


def _epochs(sw, per_token: list[float], now: float | None = None) -> float:
    """Drive a MeasuredSwitch through one epoch per entry of `per_token` (seconds a token), whatever its arm,
    from `now` (None: a fresh switch, whose first token starts at 0); returns the clock after them."""
    if now is None:
        now = 0.0
        sw.token(now, decode=True)
    for seconds in per_token:
        for _ in range(sw.EPOCH_TOKENS):
            now += seconds
            sw.token(now, decode=True)
    return now


@pytest.mark.parametrize("second_epoch, held", [(1.4e-3, False), (1.02e-3, True)])
def test_prediction_switch_holds_a_wide_gap_long_only_beyond_the_noise(second_epoch, held):
    """The opening's two predicting epochs and one without: predicting 20-25% faster on the means. Where its
    two epochs spread (1.0 and 1.4 ms a token) that is within the noise, and the faster arm runs EXPLOIT
    epochs before the other is tested again; where they agree (1.0 and 1.02), 4 x EXPLOIT."""
    from moe_prefetch.switch import PredictionSwitch

    sw = PredictionSwitch()
    assert sw.DECAY is None and sw.WIDE_T95 is not None
    _epochs(sw, [1.0e-3, second_epoch, 1.5e-3])  # opening: True, True, False
    assert sw.mean[True] == pytest.approx((1.0e-3 + second_epoch) / 2) and sw.mean[False] == pytest.approx(1.5e-3)
    plan = [sw.arm] + sw._schedule
    hold = sw.EXPLOIT * (4 if held else 1)
    assert plan == [True] * hold + [False]


def test_prediction_switch_means_are_over_each_arms_last_epochs():
    """Each arm's mean is over its last WINDOW epochs, not a mean that halves its past each epoch."""
    from moe_prefetch.switch import PredictionSwitch

    sw = PredictionSwitch()
    times, now = [], None
    for _ in range(40):
        t = 1e-3 * (1 + 0.05 * len(times))
        arm = sw.arm
        now = _epochs(sw, [t], now)
        if arm:
            times.append(t)
    assert len(times) > sw.WINDOW
    assert sw.mean[True] == pytest.approx(sum(times[-sw.WINDOW:]) / sw.WINDOW)


@pytest.mark.parametrize("sticky", [0.0, 0.6])
def test_keep_ledger_finds_recency_keeps_where_routing_sticks(sticky):
    """Simulated with a GPU's costs (link 11.2 layers per expert, host 2.4x faster, no fixed costs): where
    60% of a token's experts are the last token's, judging keeps with recency is much faster and the
    ledger finds it; where routing does not stick, it costs little against frequency keeps. With the CPU
    backend's fixed cost per copy (half or two layers) the ledger keeps the better rule's speed; those
    hand-offs run while the host computes, so even there recency keeps cost little."""
    from moe_prefetch.sim import CostModel, Policy, simulate, synthetic_trace

    trace = synthetic_trace(8, 8, 2, 300, seed=8, repeat=sticky)

    def run(rule, copy_s=0.0):
        cost = CostModel(0.8e-3, 1e-4, 11.2e-3, 1000, host_s=11.2e-3 / 2.4, copy_s=copy_s)
        policy = Policy("x", eviction="predictive", host_compute=True, keep_recency=rule)
        return simulate(trace, cost, 32, policy).tokens_per_s

    frequency, recency, switched = run(False), run(True), run(None)
    if sticky:
        assert recency > 1.25 * frequency and switched > 0.97 * recency, (frequency, recency, switched)
    else:
        assert abs(recency / frequency - 1) < 0.03 and switched > 0.98 * max(frequency, recency)
    for copy_s in (0.5e-3, 2e-3):
        frequency, recency, switched = run(False, copy_s), run(True, copy_s), run(None, copy_s)
        assert switched > 0.98 * max(frequency, recency), (copy_s, frequency, recency, switched)
    if not sticky:  # keeps are started while the host computes: even at two layers a copy, their
        # hand-offs cost little (when the keep went with the plan, before the layer's compute, recency
        # keeps lost 5% or more here)
        assert 0.97 * frequency < recency < frequency, "two layers a copy: mostly hidden by the host's work"


def test_prefetches_that_do_not_deliver_close_the_gate_and_it_reopens():
    pl = make_planner(costs=Costs(layer_s=1.0, expert_s=0.1, transfer_s=0.5), slots=8)
    assert pl.realised() == 1.0
    for i in range(40):  # issued with high P, every one evicted unused
        key = (1, i % 8)
        pl._issued_p[key] = (0.9, 1)
        pl._outcome(key, 0.0)
    assert pl.realised() < 0.1 and pl.realised(1) < 0.1
    for _ in range(8000):  # no evidence for a long while: the correction fades
        pl.plan_prefetch(0.0, 0, [], set())
    assert pl.realised() > 0.9 and pl.realised(1) > 0.9


def test_what_prefetches_deliver_is_learnt_per_distance():
    """With host compute a prefetch that lands after its layer starts saves nothing (the host runs that
    use). Near layers' copies land late, far ones in time: the near ones' record must not close the gate
    for the far ones, which pay."""
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=3.0, host_s=2.0)
    pl = make_planner(slots=16, layers=8, costs=costs, host_compute=True, eviction="predictive", budget_experts=8)
    pl.link_traffic = 1.0  # a copy per layer: every wasted byte is taken from demand copies
    for i in range(60):
        near, far = (1, i % 8), (5, i % 8)
        pl._issued_p[near], pl._issued_p[far] = (0.9, 1), (0.9, 5)
        pl._outcome(near, 0.0)  # landed late: the host ran the use
        pl._outcome(far, 1.0)   # landed in time
    assert pl.realised(1) < 0.1 and pl.realised(5) > 0.95
    assert pl.realised() == pl.realised(5), "the gate stays open for the distance that delivers"
    delivered = pl.prediction_value()["delivered"]
    assert set(delivered) == {"all", "1", "5"} and delivered["1"] < 0.1 < 0.4 < delivered["all"] < 0.7
    acts = pl.plan_prefetch(0.0, 0, [(1, 1, {5: 0.9}), (5, 5, {6: 0.9})], protected=set())
    # (1, 5) would land at 3, after its layer starts at 1: refused; (5, 6) lands in time, and what
    # prefetches 5 layers ahead delivered says it pays (over all distances, half of them did)
    assert [a.key for a in acts] == [(5, 6)] and pl.counters.prefetch_gated == 1


def test_a_predictor_that_yields_nothing_is_only_probed():
    pl = make_planner(costs=Costs(layer_s=1.0, expert_s=0.1, transfer_s=0.5), slots=8)
    pl.prediction_yield = 0.0
    asked = [pl.worth_predicting(0.0) for _ in range(64)]
    assert sum(asked) == 64 // pl.PROBE_EVERY, "one probe per PROBE_EVERY layers"
    # a probe that issues prefetches brings the yield back up, and prediction resumes
    for _ in range(30):
        pl.plan_prefetch(0.0, 0, [(1, 1, {0: 0.9, 1: 0.9})], set(), asked=True)
        for key in list(pl.prefetched):
            pl.remove(key)
        pl.link = type(pl.link)(pl.link.transfer_s)
    assert pl.prediction_yield > pl.MIN_YIELD and pl.worth_predicting(0.0)


@pytest.mark.parametrize("cost,pays", [(5.0, False), (0.05, True)])
def test_prediction_that_costs_more_than_it_saves_is_only_probed(cost, pays):
    """Each predicted layer's one prefetch is used on time and saves a transfer (0.5 s): a predictor that
    costs 5 s a layer does not pay for itself and is then run one layer in PROBE_EVERY; one that costs
    0.05 s keeps running. Without adaptation it always runs, and with no measured cost nothing changes."""
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=0.5)
    adaptive, always = make_planner(costs=costs, slots=8), make_planner(costs=costs, slots=8, adaptive=False)
    for pl in (adaptive, always):
        assert pl.prediction_pays()  # no evidence yet
        now = 0.0
        for i in range(40):
            e = i % 8
            sent = pl.plan_prefetch(now, 0, [(1, 1, {e: 0.9})], set(), asked=True)
            assert [a.key for a in sent] == [(1, e)]
            pl.observe_predict_cost(cost)
            now += 1.0  # the copy lands before layer 1 runs
            pl.release(pl.plan_layer(now, 1, [e]))
            pl.remove((1, e))
            now += 1.0
        assert pl.counters.prefetch_used == 40 and pl.predict_cost == pytest.approx(cost)
    assert adaptive.prediction_pays() == pays
    asked = [adaptive.worth_predicting(now) for _ in range(64)]
    assert sum(asked) == (64 if pays else 64 // adaptive.PROBE_EVERY)
    assert all(always.worth_predicting(now) for _ in range(64))
    unmeasured = make_planner(costs=costs)
    assert unmeasured.prediction_pays() and unmeasured.predict_cost is None


def _drive_switch(switch, seconds_on: float, seconds_off: float, tokens: int) -> list[bool]:
    """Feed `tokens` decode tokens whose duration depends on the arm the switch chose; returns the arms."""
    now, arms = 0.0, []
    for _ in range(tokens):
        switch.token(now, decode=True)
        arms.append(switch.arm)
        now += seconds_on if switch.arm else seconds_off
    return arms


@pytest.mark.parametrize("on,off,expect", [(1.3e-3, 1.0e-3, False), (1.0e-3, 1.3e-3, True), (1.0e-3, 1.05e-3, True),
                                           (1.0e-3, 1.0e-3, False)])
def test_prediction_switch_keeps_the_faster_arm(on, off, expect):
    """Prediction runs where it measurably shortens tokens (by more than MARGIN), and not otherwise; the
    slower arm is only re-tested now and then."""
    from moe_prefetch.planner import PredictionSwitch

    sw = PredictionSwitch()
    arms = _drive_switch(sw, on, off, 400)
    late = arms[100:]
    share = sum(a == expect for a in late) / len(late)
    assert sw.best() == expect and share >= 0.85, (share, sw.mean)
    assert sw.epochs[not expect] >= 2  # it kept re-testing the other arm


@pytest.mark.parametrize("opening", [(True,), (False, False)])
def test_a_switch_opened_on_one_arm_measures_the_other_before_deciding(opening):
    """A measured switch whose opening runs only one arm tests the other before its first decision,
    rather than comparing with a mean it does not have; then it keeps the faster arm."""
    from moe_prefetch.switch import MeasuredSwitch

    sw = MeasuredSwitch(opening=opening)
    arms = _drive_switch(sw, 1.0e-3, 1.3e-3, 200)
    assert sw.epochs[True] >= 1 and sw.epochs[False] >= 1 and sw.best() is True
    assert sum(arms[100:]) / len(arms[100:]) >= 0.85


def test_prediction_switch_follows_a_regime_change_and_ignores_prefill_and_pauses():
    from moe_prefetch.planner import PredictionSwitch

    sw = PredictionSwitch()
    _drive_switch(sw, 1.0e-3, 2.0e-3, 200)  # prediction pays ...
    assert sw.best()
    arms = _drive_switch(sw, 2.0e-3, 1.0e-3, 400)  # ... then stops paying
    assert not sw.best() and sum(not a for a in arms[-100:]) >= 85
    before, counted = dict(sw.mean), sw._tokens
    sw.token(100.0, decode=False)  # a prefill, then a long pause: neither counts as a token
    sw.token(105.0, decode=True)
    sw.token(105.001, decode=False)
    assert sw.mean == before and sw._tokens == counted


def test_prediction_switch_does_not_measure_the_cache_warm_up():
    """Decode tokens while the cache still fills are slow whatever the arm: they are not measured (up to
    WARMUP_TOKENS), so they cannot condemn the first arm; a cache that never fills is measured anyway."""
    from moe_prefetch.planner import PredictionSwitch

    sw = PredictionSwitch()
    now = 0.0
    for _ in range(10):
        sw.token(now, decode=True, warm=False)
        now += 50e-3  # cold: far slower than any warm token
    assert sw.mean == {True: None, False: None} and sw._tokens == 0
    arms = _drive_switch(sw, 1.0e-3, 1.3e-3, 120)  # warm: prediction pays
    assert sw.best() and sum(arms[-60:]) >= 50, sw.mean
    never_full = PredictionSwitch()
    for _ in range(PredictionSwitch.WARMUP_TOKENS + 2 * PredictionSwitch.EPOCH_TOKENS + 1):
        never_full.token(now, decode=True, warm=False)
        now += 1e-3
    assert never_full.epochs[True] + never_full.epochs[False] >= 1


def test_switch_keeps_prediction_where_it_pays_after_a_cold_start():
    """Simulated cold start on sticky routing, where cross-token prefetch pays with host compute: the
    adaptive planner keeps most of what always predicting gains (with the warm-up counted, it stayed off:
    1.02x against 1.26x)."""
    from moe_prefetch.sim import CostModel, Policy, simulate, synthetic_trace

    L, E, k = 16, 8, 2
    trace = synthetic_trace(L, E, k, 200, seed=16, repeat=0.6)
    cost = CostModel(1e-3 - k * 1e-4, 1e-4, 11.2e-3, 1000, host_s=11.2e-3 / 2.4)
    slots = L * E // 2
    # keeps on frequency throughout: recency keeps alone take what cross-token prefetch gains here
    # (test_keep_ledger_finds_recency_keeps_where_routing_sticks), and this is the prediction switch's test
    none = simulate(trace, cost, slots, Policy("n", eviction="predictive", host_compute=True,
                                               keep_recency=False)).tokens_per_s
    always = simulate(trace, cost, slots, Policy("a", "oracle", L // 2, eviction="predictive", host_compute=True,
                                                 adaptive=False, keep_recency=False)).tokens_per_s
    adaptive = simulate(trace, cost, slots, Policy("s", "oracle", L // 2, eviction="predictive",
                                                   host_compute=True, keep_recency=False)).tokens_per_s
    assert always > 1.15 * none, (always, none)  # the regime is one where prediction pays
    assert adaptive >= none + 0.6 * (always - none), (none, always, adaptive)


def test_planner_skips_prediction_in_off_epochs_and_never_switches_ungated():
    layers = [0, 1]
    costs = Costs(layer_s=1e-3, expert_s=1e-4, transfer_s=1e-3)
    pl = Planner(4, layers, 4, 2, costs)
    pl.switch.arm = False
    assert not pl.worth_predicting(0.0)
    ungated = Planner(4, layers, 4, 2, costs, gate=False)
    assert ungated.switch is None and ungated.worth_predicting(0.0)
    always = Planner(4, layers, 4, 2, costs, adaptive=False)
    assert always.switch is None and always.worth_predicting(0.0)


@pytest.mark.parametrize("scan_max,flat_max,sized", [(0, 0, False), (4, 0, False), (10_000, 0, False),
                                                      (0, 10_000, False), (0, 17, False), (0, 20, True)],
                         ids=["heaps", "mixed", "layer-scans", "ranked", "ranked-and-heaps", "ranked-sized"])
def test_predictive_policy_per_layer_heaps_agree_with_the_plain_scan(scan_max, flat_max, sized, monkeypatch):
    """PredictivePolicy.victim (one heap per layer plus the predicted keys, or a scan of a layer holding few
    experts: SCAN_MAX, or for a small cache each layer's keys ranked: FLAT_MAX) picks what victim_ref (a
    pass over every resident key) picks, ties and clamped probabilities included, as positions, uses,
    predictions (a layer's steered P too), pins and protected keys change; "ranked-and-heaps" switches
    between the two as the cache fills past FLAT_MAX and drains below it; "ranked-sized" is told the
    cache's size (as the planner tells it), which never exceeds FLAT_MAX, so it keeps no heaps at all."""
    import random

    monkeypatch.setattr(PredictivePolicy, "SCAN_MAX", scan_max)
    monkeypatch.setattr(PredictivePolicy, "FLAT_MAX", flat_max)

    from conftest import insert_checking_victim

    rng = random.Random(7)
    L, E, k = 5, 12, 2
    pol = PredictivePolicy({j: j for j in range(L)}, top_k=k, num_experts=E, slots=20 if sized else None)
    cache = ExpertCache(20, pol)
    checked = 0
    for step in range(4000):
        pol.position = step % L
        if rng.random() < 0.4:  # a run of the layer starts: recency groups move and age
            pol.start_run(pol.position, rng.sample(range(E), rng.choice([k, k, 4])))
        if rng.random() < 0.3:
            for _ in range(rng.randrange(4)):
                key = (rng.randrange(L), rng.randrange(E))
                pol.predicted[key] = rng.choice([0.0, 0.5, 0.999, 1.0, rng.random()])
        if rng.random() < 0.2 and pol.predicted:
            del pol.predicted[rng.choice(list(pol.predicted))]
        if rng.random() < 0.1:  # a steering prediction for a layer's cached experts without one of their own
            pol.set_rest(rng.randrange(L), rng.choice([0.0, 0.2, 0.999, 1.0, rng.random()]))
        if rng.random() < 0.05:
            pol.drop_predictions(rng.randrange(L))
        if step % 400 == 200:  # failed copies: the cache drains below FLAT_MAX and refills past it
            for gone in rng.sample(sorted(cache.keys()), 6):
                cache.remove(gone)
        key = (rng.randrange(L), rng.randrange(E) if rng.random() < 0.7 else rng.randrange(3))  # skewed uses
        if rng.random() < 0.9:
            pol.record_use(key)
        if key in cache:
            cache.touch(key)
            continue
        checked += insert_checking_victim(cache, key, rng, step, max_protected=4)
    assert checked > 1000
    assert (not pol._heaps and not pol._dirty) if sized else pol._dirty, "heap bookkeeping only where heaps can be walked"
    if sized:  # the planner tells its policy the cache's size
        assert not make_planner(PredictivePolicy.FLAT_MAX).policy._heaped and make_planner(PredictivePolicy.FLAT_MAX + 1).policy._heaped
    # a long run of one layer: rarely used resident experts reach the lower clamp and tie there
    pol = PredictivePolicy({0: 0}, top_k=1)
    cache = ExpertCache(4, pol)
    for e in (3, 2, 1, 0):
        cache.insert((0, e))
    for _ in range(3000):
        pol.record_use((0, 0))
    pol.record_use((0, 1))
    everything = set(cache.keys())
    assert pol.use_probability((0, 1)) == pol.use_probability((0, 3)) == PredictivePolicy.P_MIN
    assert pol.victim(everything) == pol.victim_ref(everything) == (0, 3), "clamped tie: the least recently used"


def test_predictive_policy_start_run_that_records_counts_as_record_use_does():
    """start_run(record=True), the planner's one pass per layer run, leaves the policy exactly as
    start_run() followed by record_use() of each expert does: uses, the layer's totals, the squares
    its fit sums from, the recency groups and the fits themselves, so victims agree as well."""
    import random

    rng = random.Random(3)
    L, E, k = 3, 8, 2
    one, two = (PredictivePolicy({j: j for j in range(L)}, top_k=k, num_experts=E) for _ in range(2))
    caches = [ExpertCache(10, pol) for pol in (one, two)]
    for step in range(600):
        layer = step % L
        used = rng.sample(range(E), rng.choice([k, k, 3]))
        one.start_run(layer, used, record=True)
        two.start_run(layer, used)
        for e in used:
            two.record_use((layer, e))
        for pol, cache in zip((one, two), caches):
            pol.position = layer
            for e in used:
                if (layer, e) in cache:
                    cache.touch((layer, e))
                else:
                    cache.insert((layer, e), protected={(layer, x) for x in used})
        state = [(dict(p.uses), dict(p.layer_uses), dict(p._sq), dict(p._last), dict(p._runs), dict(p._fit),
                  {layer: dict(r) for layer, r in p._recent.items()}) for p in (one, two)]
        assert state[0] == state[1], step
        assert sorted(caches[0].keys()) == sorted(caches[1].keys()), step


def test_predictive_policy_learns_how_recency_predicts_use():
    """The history P of an expert used at the last run, and of one used earlier, is what the routing
    shows: a just-used expert is likely to return where routing sticks across tokens, whatever its
    frequency, and recency says nothing where it does not stick."""
    import random

    def rates(sticky: float):
        rng = random.Random(1)
        E, k = 8, 2
        weights = [1.0 / (r + 1) for r in range(E)]  # Zipf popularity: frequency matters too
        pol = PredictivePolicy({0: 0}, top_k=k, num_experts=E)
        used, seen = [], {True: [0, 0], False: [0, 0]}  # used at the last run? -> [P sum, uses]
        n = {True: 0, False: 0}
        for step in range(4000):
            keep = [e for e in used if rng.random() < sticky]
            fresh = []
            while len(keep) + len(fresh) < k:
                e = rng.choices(range(E), weights)[0]
                if e not in keep and e not in fresh:
                    fresh.append(e)
            if step >= 2000:  # the learnt P against what this run then does, per group
                for e in range(E):
                    last = e in used
                    seen[last][0] += pol.use_probability((0, e))
                    seen[last][1] += e in keep + fresh
                    n[last] += 1
            used = keep + fresh
            pol.start_run(0, used)
            for e in used:
                pol.record_use((0, e))
        return {g: (seen[g][0] / n[g], seen[g][1] / n[g]) for g in (True, False)}

    for sticky in (0.7, 0.0):
        r = rates(sticky)
        for group, (predicted, observed) in r.items():
            assert predicted == pytest.approx(observed, abs=0.04), (sticky, group, r)
    assert rates(0.7)[True][1] > 0.75 and rates(0.0)[True][1] < 0.45


# ---- eviction "auto": the predictive rule while it pays for its planning, else LFU's -----------

@pytest.mark.parametrize("flat_max", [10_000, 0], ids=["ranked", "heaps"])
def test_switchable_policy_agrees_with_its_plain_scan_across_rule_changes(flat_max, monkeypatch):
    """A switchable PredictivePolicy evicts by its own rule, by LFU's (fewest uses, ties to the least
    recently used) or by LRU's; victim() picks what victim_ref() picks under each rule as the rule cycles
    through them (nothing of the predictive rule's rankings or heaps is kept while another evicts, so
    coming back must rebuild them), and a policy that stays predictive throughout makes the same
    decisions as one that is not switchable."""
    import random

    from conftest import insert_checking_victim

    monkeypatch.setattr(PredictivePolicy, "FLAT_MAX", flat_max)
    monkeypatch.setattr(PredictivePolicy, "SCAN_MAX", 0)
    rng = random.Random(11)
    L, E, k = 4, 10, 2
    pol = PredictivePolicy({j: j for j in range(L)}, top_k=k, num_experts=E, switchable=True)
    cache = ExpertCache(16, pol)
    checked = dict.fromkeys(PredictivePolicy.RULES, 0)
    for step in range(4500):
        if step % 97 == 0:
            pol.set_rule(PredictivePolicy.RULES[step // 97 % 3], ghosting=step % 2 != 0)
            if len(cache) == cache.n_slots:  # at once: what the rule kept meanwhile must not be trusted
                everything = cache.evictable()
                assert pol.victim(everything) == pol.victim_ref(set(everything)), step
        pol.position = step % L
        if rng.random() < 0.5:
            pol.start_run(pol.position, rng.sample(range(E), k), record=rng.random() < 0.8)
        if rng.random() < 0.05:
            pol.predicted[(rng.randrange(L), rng.randrange(E))] = rng.random()
        key = (rng.randrange(L), rng.randrange(E) if rng.random() < 0.6 else rng.randrange(3))
        if key in cache:
            cache.touch(key)
            continue
        checked[pol.rule] += insert_checking_victim(cache, key, rng, step)
    assert min(checked.values()) > 400, checked

    def decisions(switchable):
        rng = random.Random(5)
        pol = PredictivePolicy({j: j for j in range(L)}, top_k=k, num_experts=E, switchable=switchable)
        cache, out = ExpertCache(12, pol), []
        for step in range(1500):
            pol.position = step % L
            pol.start_run(pol.position, rng.sample(range(E), k), record=True)
            key = (rng.randrange(L), rng.randrange(E))
            if key not in cache:
                out.append(cache.insert(key)[1])
        return out

    assert decisions(True) == decisions(False)


def test_ghost_wins_count_which_choice_the_next_use_proves_right():
    """Where the predictive rule's victim differs from LFU's, whichever of the two is used first tells which
    choice saved a miss; a pair used at once is a tie, and one whose kept key is evicted before either
    is used is dropped."""
    pol = PredictivePolicy({0: 0, 1: 1}, top_k=1, num_experts=8, switchable=True)
    cache = ExpertCache(2, pol)
    pol.position = 0
    pol.start_run(0, [1], record=True)
    pol.start_run(0, [1], record=True)
    cache.insert((0, 1))          # used twice
    pol.position = 1
    pol.start_run(1, [2], record=True)
    cache.insert((1, 2))          # used once, just now
    pol.predicted[(0, 1)] = 0.001  # the predictive rule expects (0, 1) to be gone; LFU's keeps it (more uses)
    everything = set(cache.keys())
    assert pol.victim(everything) == (0, 1) and pol._frequency_victim(everything) == (1, 2)
    cache.insert((1, 3))          # evicts (0, 1): a pair, (1, 2) kept in its place
    assert pol._ghost_out == {(0, 1): (1, 2)} and pol._ghost_kept == {(1, 2): (0, 1)}
    pol.start_run(1, [2], record=True)  # the kept one is used first: the predictive rule was right
    assert pol.ghost_wins == [1, 0] and not pol._ghost_out and not pol._ghost_kept

    def pair():
        pol._ghost_out.clear(), pol._ghost_kept.clear()
        pol._ghost_out[(0, 1)], pol._ghost_kept[(1, 2)] = (1, 2), (0, 1)

    pair()
    pol.start_run(0, [1], record=True)  # the evicted one first: LFU's choice would have saved the miss
    assert pol.ghost_wins == [1, 1]
    pair()
    pol.record_use((0, 1)), pol.record_use((1, 2))  # record_use tells them apart too
    assert pol.ghost_wins == [1, 2]
    for both in ([(0, 1), (1, 2)], [(1, 2), (0, 1)]):
        pair()
        pol._tell_ghosts(both)  # both used at once (one layer's run): a miss either way, a tie
        assert pol.ghost_wins == [1, 2] and not pol._ghost_out
    pol._ghost_out.clear(), pol._ghost_kept.clear()
    pol.predicted[(1, 2)], pol.predicted[(1, 3)] = 0.001, 1.0
    everything = set(cache.keys())
    assert pol.victim(everything) == (1, 2) and pol._frequency_victim(everything) == (1, 3)
    cache.remove((1, 3))  # not the victim just found: no pair
    assert not pol._ghost_out
    cache.insert((1, 3))
    pair()
    cache.remove((1, 2))  # the kept one goes before either is used: nothing to tell
    assert not pol._ghost_out and not pol._ghost_kept and pol.ghost_wins == [1, 2]


def test_eviction_switch_prices_the_predictive_rule_against_its_planning():
    """The rule stays predictive where what its wins save beats its extra planning, and LFU's rule is not
    even tried where those wins beat all of the predictive rule's planning; it turns to LFU's rule where
    they do not, re-testing the predictive rule now and then; once the predictive rule clearly pays, only
    some of its epochs compare victims; warm-up and batched tokens are never measured, and without any
    planning time measured the rule never leaves the predictive one."""
    from moe_prefetch.switch import EvictionSwitch

    def run(plan_on, plan_off, wins_per_epoch, miss_cost, tokens=8 * 40, timed=True, layers=4):
        sw, wins, arms, ghosts = EvictionSwitch(), [0, 0], [], []
        for _ in range(tokens):
            arm = sw.token(True, True, wins, miss_cost, shadowed=False) == "predictive"
            arms.append(arm)
            ghosts.append(arm and sw.ghost)
            for _ in range(layers):
                sw.layer()
                if timed:
                    sw.plan_time(plan_on if arm else plan_off)
                sw.shadow("lru", 4, 0)  # LRU's shadow far behind: LFU's rule is the one in question
            if arm and sw.ghost:  # pairs are made only while victims are compared
                won, lost = wins_per_epoch
                wins[0] += won / 8
                wins[1] += lost / 8
        return sw, arms, ghosts

    # misses cost 20x the predictive rule's whole planning and it wins 6 pairs of 10 per epoch: LFU's rule
    # could not win even if it planned for nothing, so it never runs
    sw, arms, ghosts = run(50e-6, 30e-6, (6, 4), miss_cost=1e-3)
    assert all(arms) and sw.plan["lfu"] is None and sw.epochs["lfu"] == 0
    assert sw.last["lfu"][0] > sw.last["lfu"][1] == pytest.approx(50e-6) and all(ghosts), "not clearly: every epoch compares"
    # misses cheap (a fast host): LFU's planning measured once the gain falls below the predictive rule's
    # planning, then LFU's rule, with one predictive epoch in EXPLOIT + 1 to keep counting wins (in
    # 4 x EXPLOIT + 1 once LFU's rule is clearly better, as here)
    # (the opening's first epoch settles, uncounted against LRU's shadow, so two run before the first decision)
    sw, arms, ghosts = run(50e-6, 30e-6, (6, 4), miss_cost=50e-6)
    assert arms[:16] == [True] * 16 and arms[16:24] == [False] * 8, "the opening: the predictive rule, then LFU's measured"
    assert all(g for a, g in zip(arms, ghosts) if a), "a re-test of the predictive rule compares victims"
    later = arms[24:]
    assert 0.5 / (4 * EvictionSwitch.EXPLOIT + 1) < sum(later) / len(later) < 0.2 and sw.epochs["predictive"] >= 2
    assert sw.last is not None and sw.last["lfu"][0] < sw.last["lfu"][1] == pytest.approx(20e-6)
    # LFU's choices prove right more often: LFU's rule even where misses cost a lot
    sw, arms, _ = run(50e-6, 30e-6, (2, 10), miss_cost=2e-3)
    assert sum(arms[24:]) / len(arms[24:]) < 0.2
    # clearly worth it (a miss costs a second: even the pessimistic gain beats all of the predictive rule's
    # planning once a few epochs have counted wins): one predictive epoch in GHOST_EVERY compares victims
    sw, arms, ghosts = run(50e-6, 30e-6, (6, 4), miss_cost=1.0)
    assert all(arms) and all(ghosts[:16]), "thin evidence: every epoch compares"
    epochs = ghosts[8 * 8::8]
    assert abs(sum(epochs) / len(epochs) - 1 / EvictionSwitch.GHOST_EVERY) < 0.05
    # nothing timed: the predictive rule throughout, no epoch of LFU's
    sw, arms, _ = run(50e-6, 30e-6, (0, 10), miss_cost=50e-6, timed=False)
    assert all(arms)
    # warm-up and batched tokens are not measured: no epoch ends
    sw = EvictionSwitch()
    for _ in range(20):
        sw.token(True, False, [0, 0], 1.0)
        sw.layer(), sw.plan_time(1.0)
        sw.token(False, True, [0, 0], 1.0)
        sw.layer(), sw.plan_time(1.0)
    assert not any(sw.epochs.values()) and not any(sw.plan.values())


def test_eviction_switch_needs_pairs_before_leaving_the_predictive_rule():
    """Unshadowed (host compute), LFU's rule is not chosen on a handful of victim pairs where the pairs
    still missing could make the predictive rule worth its planning: it runs until MIN_PAIRS (decaying)
    have been told apart, or MIN_COMPARED epochs have compared victims, and then gives way where the
    pairs went LFU's way; where even winning every missing pair would not pay, it gives way at once."""
    from moe_prefetch.switch import EvictionSwitch

    def run(per_epoch, miss_cost):
        sw, wins, arms = EvictionSwitch(), [0, 0], []
        for _ in range(8 * 24):
            arm = sw.token(True, True, wins, miss_cost, shadowed=False) == "predictive"
            arms.append(arm)
            for _ in range(4):
                sw.layer()
                sw.plan_time(50e-6 if arm else 30e-6)
                sw.shadow("lru", 4, 0)  # LRU's shadow far behind: LFU's rule is the one in question
            if arm and sw.ghost:
                won, lost = per_epoch
                wins[0] += won / 8
                wins[1] += lost / 8
        return arms[::8], sw

    # a miss costs 40x the predictive rule's planning; 1 pair an epoch, 3 of 5 LFU's: the decaying count
    # stays below MIN_PAIRS (1 / 0.15), so MIN_COMPARED epochs bound the wait
    epochs, sw = run((0.4, 0.6), 2e-3)
    n = EvictionSwitch.MIN_COMPARED
    assert epochs[:n] == [True] * n and not epochs[n], epochs
    # 2 pairs an epoch, all LFU's: held while the missing ones could still pay (2, 3.7 lost: 6 and 4.3
    # missing), given way once they could not
    epochs, sw = run((0, 2), 1e-3)
    assert epochs[:2] == [True, True] and not all(epochs[:8]) and sw.epochs["lfu"] >= 8, epochs
    # a miss worth 1/20 of that: winning the missing pairs would not pay, so LFU's rule after the opening
    # (two epochs: the first settles, uncounted against LRU's shadow)
    epochs, sw = run((0, 2), 50e-6)
    assert epochs[:3] == [True, True, False], epochs


@pytest.mark.parametrize("rival", ["lru", "lfu"])
def test_eviction_switch_turns_to_a_cheaper_rule_where_its_shadow_cache_hits_more(rival):
    """Where misses are copied in, the evidence against each cheaper rule is its shadow cache's hits:
    where the rival's shadow holds more of the uses than the real cache, the switch turns to that rule
    once MIN_COUNTED epochs have been counted, and re-tests the predictive rule for RETEST_EPOCHS epochs in
    a row, the first settling uncounted (rarely, once the rival is clearly better); where the real cache
    holds more it never runs, and victims are never compared with LFU's (the shadow says more). Unshadowed
    (host compute) LFU's shadow is not counted (LFU's rule is judged on victim pairs) while LRU's is (the
    caller feeds the shadow that lands LRU's keeps on a link of its own), and a switch running a cheaper
    rule when the evidence changes kind goes back to the predictive rule, its evidence gone."""
    from moe_prefetch.switch import EvictionSwitch

    other = "lfu" if rival == "lru" else "lru"
    plan = {"predictive": 50e-6, rival: 30e-6, other: 50e-6}

    def run(won, lost, tokens=8 * 80, shadowed=True):
        sw, rules, counted, wins, ghosts = EvictionSwitch(), [], [], [0, 0], []
        for _ in range(tokens):
            rule = sw.token(True, True, wins, 1e-3, shadowed=shadowed)
            if rule == "predictive" and sw.ghost:
                wins[0] += 1  # unshadowed: the predictive rule's victims beat LFU's
            rules.append(rule)
            counted.append(sw.shadowing)
            ghosts.append(sw.ghost)
            for _ in range(4):
                sw.layer()
                sw.plan_time(plan[rule])
            # per token: the real cache held `won` uses the rival's shadow did not, `lost` the reverse; the
            # other rule's shadow holds less than the real cache
            sw.shadow(rival, won, lost)
            sw.shadow(other, 1, 0)
        return sw, rules[::8], counted[::8], ghosts

    n = EvictionSwitch.RETEST_EPOCHS
    for won, lost in ((2, 3), (1, 3)):  # the rival better; clearly so in the second
        sw, rules, counted, ghosts = run(won, lost)
        assert not any(ghosts), "shadowed: no victim compared"
        first = rules.index(rival)
        assert sum(counted[:first]) >= EvictionSwitch.MIN_COUNTED and rules[:n] == ["predictive"] * n
        assert sw.plan[rival] == pytest.approx(30e-6) and sw.shadow_wins[rival][1] > sw.shadow_wins[rival][0]
        assert sw.last[rival][0] < 0 < sw.last[rival][1] and other not in rules
        blocks = "".join("P" if r == "predictive" else "R" for r in rules[first:]).split("R")
        retests = [b for b in blocks if b]
        assert retests and all(b == "P" * n for b in retests[:-1]), retests  # (the last may be cut short)
        for i in range(first + 1, len(rules)):
            if rules[i] == "predictive" and rules[i - 1] != "predictive":
                assert not counted[i] and all(counted[i + 1:i + n]), i
        share = rules[first:].count("predictive") / len(rules[first:])
        limit = n / (EvictionSwitch.EXPLOIT + n) + 0.05 if won == 2 else n / (4 * EvictionSwitch.EXPLOIT + n) + 0.05
        assert 0.0 < share < limit, (won, share)
    # the real cache holds more: the rival never runs, even planning for less
    sw, rules, _, _ = run(3, 1)
    assert set(rules) == {"predictive"} and sw.last[rival][0] > sw.last[rival][1] > 0
    # unshadowed: LFU's shadow never counted, its rule judged by victim pairs (here the predictive rule's);
    # LRU's shadow counted, its rule chosen where it hits more
    sw, rules, counted, ghosts = run(0, 5, shadowed=False)
    assert any(counted) and any(ghosts) and sw.shadow_wins["lfu"] == [0, 0] and sw.evidence["lfu"][0] > 0
    assert "lfu" not in rules and ("lru" in rules) == (rival == "lru"), rules
    assert (sw.shadow_wins["lru"][1] > sw.shadow_wins["lru"][0]) == (rival == "lru")
    # running a cheaper rule when the evidence changes kind: the predictive rule at once, the evidence gone
    sw, rules, _, _ = run(1, 3, tokens=8 * 12)
    assert sw.rule == rival
    assert sw.token(True, True, [1e6, 0], 1e-3, shadowed=False) == "predictive"
    assert sw.evidence == {"lfu": [0, 0, 0], "lru": [0, 0, 0]}

def test_eviction_switch_weighs_lfus_and_lrus_evidence_alike_when_both_beat_the_predictive_rule():
    """Both cheaper rules beat the predictive one (their balances positive on its optimistic gain); the
    one that runs has the better balance with both gains one standard error up. LRU's counts, a few
    more net wins on fewer standard errors, would win on the counted wins alone; LFU's, fewer net wins
    on more certain counts, wins when both are taken alike."""
    from moe_prefetch.switch import EvictionSwitch

    sw = EvictionSwitch()
    sw.plan = {"predictive": 60e-6, "lfu": 40e-6, "lru": 30e-6}
    sw._counted = EvictionSwitch.MIN_COUNTED
    sw.evidence = {"lfu": [-10.0, 20.0, 300.0], "lru": [-5.0, 100.0, 300.0]}  # [net wins, pairs, layers]
    miss = 320e-6
    for r in ("lfu", "lru"):
        assert sw.plan["predictive"] - sw.plan[r] > sw.gain(miss, rival=r), r  # both beat the predictive rule
    on_counts = {r: sw.plan["predictive"] - sw.plan[r] - sw.gain(miss, 0.0, r) for r in ("lfu", "lru")}
    assert on_counts["lru"] > on_counts["lfu"], "the premise: on the counted wins alone, LRU's rule"
    assert sw._decide(miss) == "lfu"
    sw.evidence["lfu"] = [-2.0, 20.0, 300.0]  # LFU's edge gone: LRU's rule
    assert sw._decide(miss) == "lru"


def test_auto_eviction_planner_turns_to_lrus_rule_where_recency_is_all_there_is():
    """The planner feeds the shadow LRU cache every run (where misses are copied in) and the switch
    its told-apart uses. On routing where every expert is as popular as the next and a tenth of a token's
    experts are the last token's, in a cache that holds one token's experts, LRU's rule hits more than the
    predictive one (frequency says nothing there): eviction auto evicts by LRU's rule most of the time
    and hits more than the predictive rule fixed. The simulator, which drives the same planner, shows it."""
    import unittest.mock as um

    import numpy as np

    from moe_prefetch.sim import CostModel, Policy, Trace, simulate

    rng = np.random.default_rng(2)
    L, E, k, n = 6, 8, 2, 300
    routing = np.zeros((n, L, k), dtype=np.int64)
    for t in range(n):
        for i in range(L):
            keep = [e for e in routing[t - 1, i] if rng.random() < 0.1] if t else []
            routing[t, i] = keep + [e for e in rng.permutation(E) if e not in keep][:k - len(keep)]
    trace = Trace(routing, [n], {}, {"experts": E, "top_k": k, "layers": L})
    cost = CostModel(attn_s=0.8e-3, expert_s=0.1e-3, transfer_s=11e-3, expert_bytes=1)
    seen = []
    orig = Planner.__init__

    def keep(self, *a, **kw):
        orig(self, *a, **kw)
        seen.append(self)

    with um.patch.object(Planner, "__init__", keep):
        auto = simulate(trace, cost, L * k, Policy("auto", eviction="auto"))
        pred = simulate(trace, cost, L * k, Policy("p", eviction="predictive"))
        lru = simulate(trace, cost, L * k, Policy("l", eviction="lru"))
    sw = seen[0].eviction_switch
    assert lru.hit_rate > pred.hit_rate + 0.02, "the premise: LRU's rule hits more here"
    assert sw.epochs["lru"] > sw.epochs["predictive"] and sw.shadow_wins["lru"][1] > sw.shadow_wins["lru"][0], sw.epochs
    assert sum(sw.shadow_wins["lfu"]) > 0, "the shadow LFU cache is fed and told apart too"
    assert sw.ghost is False and seen[0].policy.ghost_wins == [0, 0], "shadowed: no victim compared"
    assert auto.hit_rate > pred.hit_rate + 0.005, (auto.hit_rate, pred.hit_rate)
    # host compute: the shadows that copy every miss in are not fed; the one that lands LRU's keeps on its
    # own link is, and its told-apart uses are counted (LFU's rule is judged on victim pairs instead)
    seen.clear()
    with um.patch.object(Planner, "__init__", keep):
        simulate(trace, CostModel(attn_s=0.8e-3, expert_s=0.1e-3, transfer_s=11e-3, expert_bytes=1, host_s=4e-3),
                 L * k, Policy("auto", eviction="auto", host_compute=True))
    sw = seen[0].eviction_switch
    assert not any(len(s) for s in seen[0].shadows.values()) and len(seen[0].host_shadow) == L * k
    assert sum(sw.shadow_wins["lru"]) > 100 and sw.shadow_wins["lfu"] == [0, 0] and sw.epochs["predictive"] > 0


def test_auto_eviction_planner_turns_to_lfus_rule_where_planning_outweighs_misses():
    """eviction "auto" (the default): the planner feeds its switch the planning times it is told of and
    the policy's ghost wins and LRU's shadow its told-apart uses; where a miss costs little (host compute
    on a fast host) the policy evicts by a cheaper rule (both are measured) after the opening, and under
    LFU's rule keeps are judged on frequency; explicit rules have no switch."""
    from moe_prefetch.switch import EvictionSwitch

    host = Costs(layer_s=1.0, expert_s=0.1, transfer_s=1.0, host_s=0.05)
    pl = make_planner(slots=6, layers=3, experts=8, costs=host, host_compute=True)
    assert pl.eviction_switch is not None and pl.policy.switchable
    assert make_planner(eviction="predictive").eviction_switch is None
    assert make_planner(eviction="lfu").eviction_switch is None
    import random

    rng = random.Random(2)
    now, ruled = 0.0, []
    for t in range(8 * 12):
        for layer in range(3):
            now += 1.0
            experts = rng.sample(range(8), 2)
            remaining = experts
            while remaining:
                actions = pl.plan_layer(now, layer, remaining)
                pl.observe_plan_cost(0.2 if pl.policy.rule == "predictive" else 0.01)  # planning: 2x a miss's host time
                pl.release(actions)
                remaining = [e for e in remaining if e not in {a.key[1] for a in actions}]
            pl.take_keeps()
        ruled.append(pl.policy.rule)
    # the opening: MIN_COUNTED + 1 predictive epochs (the first settles), counted against LRU's shadow
    opening = (EvictionSwitch.MIN_COUNTED + 1) * EvictionSwitch.EPOCH_TOKENS
    assert set(ruled[:opening]) == {"predictive"} and {"lfu", "lru"} <= set(ruled), ruled
    later = ruled[opening:]
    assert sum(r != "predictive" for r in later) / len(later) > 0.8, "a cheaper rule after the opening"
    pl.keep_ledger.arm = True  # the keep ledger's choice of recency, which LFU's rule overrides
    pl.policy.set_rule("lfu")
    assert pl.keeps_use_recency() is False
    pl.policy.set_rule("predictive")
    assert pl.keeps_use_recency() is True


def test_lrus_rule_under_eviction_auto_keeps_as_lrus_policy_does():
    """eviction "auto" running LRU's rule with host compute keeps every host-computed miss while the link has
    room, evicting the least recently used (what its shadow counted), where judged on frequency the same
    keep is refused (the victim has been used far more often)."""
    host = Costs(layer_s=1.0, expert_s=0.1, transfer_s=3.0, host_s=0.3)
    kept = {}
    for rule in ("predictive", "lru"):
        pl = make_planner(slots=2, layers=1, experts=8, costs=host, host_compute=True, budget_experts=2)
        now = 0.0
        for experts in [[0, 1]] * 6:  # experts 0 and 1, used often, fill the cache
            now += 10.0
            pl.release(pl.plan_layer(now, 0, experts))
            pl.take_keeps()
        assert set(pl.cache.keys()) == {(0, 0), (0, 1)}
        pl.eviction_switch.rule = rule  # as if it had chosen LRU's rule (it sets the policy's at each token)
        pl._keep_recency = False  # keeps on frequency, unless LRU's rule keeps as LRU's policy does
        now += 10.0
        actions = pl.plan_layer(now, 0, [5])
        assert [a.kind for a in actions] == ["host"] and pl.policy.rule == rule
        kept[rule] = [(a.key, a.evicted) for a in pl.take_keeps()]
        pl.release(actions)
    assert kept == {"predictive": [], "lru": [((0, 5), (0, 0))]}, kept


# ---- predictions steering eviction -------------------------------------------------------------

def _full_planner(**kw):
    """A 4-slot planner over 4 layers of 8 experts, its cache full: (0, 0), (1, 1), (2, 2), (3, 3)."""
    pl = make_planner(**kw)
    for layer in range(4):
        pl.release(pl.plan_layer(float(layer), layer, [layer]))
    assert not pl.cache.has_free()
    return pl


def _fill_budget(pl, now=10.0):
    for e in (5, 6):
        pl.link.send((3, e), now, demand=True)  # the budget (top_k = 2) is full until now + 2 transfers


def test_predictions_steer_eviction_where_misses_are_copied_in():
    """Where no prefetch could start (copies in flight fill the budget) a layer is still predicted, to
    steer eviction: a predicted layer's cached experts outside the top-k share the P that such experts
    are calibrated to (a prior of top_k / experts until that layer runs, then learnt), blended with each
    one's history; a prediction past the target's next run is left alone. Steering needs the predictive
    rule, a full cache and host compute off."""
    pl = _full_planner(eviction="predictive")
    assert pl.steers_eviction()
    _fill_budget(pl)
    assert pl.worth_predicting(10.0) and pl.steering_now() and not pl._prefetching
    pol = pl.policy
    history = pol.use_probability((2, 2))
    pl.steer_eviction(2, 1, {6: 0.9})
    assert pol._rest == {2: pytest.approx(2 / 8)}
    assert pol.use_probability((2, 2)) == pytest.approx(0.5 * 2 / 8 + 0.5 * history)
    pl.steer_eviction(1, 5, {})  # 5 layers ahead on 4: a later run's, not the next
    assert 1 not in pol._rest
    assert pl.plan_prefetch(10.0, 0, [(2, 1, {6: 0.9})], set(), asked=True) == []  # no copy starts
    assert pol.predicted == {(2, 6): pytest.approx(pl.calibration.p(1, 0.9))}, "the top-k: its own P"
    pl.release(pl.plan_layer(14.0, 0, [0]))
    pl.release(pl.plan_layer(15.0, 1, [1]))
    pl.release(pl.plan_layer(16.0, 2, [4]))  # expert 2, cached outside the top-k, is not used
    assert 2 not in pol._rest, "consumed by the run"
    assert pl.steer_calibration.cells == {1: [0, 1]} and pl.steer_calibration.p(1) < 2 / 8
    assert pl.steer_calibration.report() == {"1": {"n": 1, "used": 0.0}}
    host = make_planner(eviction="predictive", host_compute=True, costs=Costs(1.0, 0.1, 10.0, host_s=0.5))
    for layer in range(4):
        host.cache.insert((layer, layer))
    for planner in (_full_planner(eviction="lru"), host):
        _fill_budget(planner)
        assert not planner.steers_eviction() and not planner.worth_predicting(10.0)
        planner.steer_eviction(2, 1, {})
        assert not getattr(planner.policy, "_rest", {})
    auto = _full_planner()
    auto.policy.set_rule("lfu")
    assert not auto.steers_eviction()
    half = make_planner(eviction="predictive")
    half.release(half.plan_layer(0.0, 0, [0]))
    assert not half.steers_eviction(), "a free slot: nothing is evicted"
    free = _full_planner(eviction="predictive")  # the budget free: the layer predicts for its prefetches
    assert free.worth_predicting(100.0) and free._prefetching and not free.steering_now()
    free.steer_eviction(2, 1, {})
    assert not free.policy._rest, "a layer predicted for its prefetches does not steer"


def test_steering_stops_where_it_does_not_pay():
    """Steering's ledger: what judged victims say it saved, per steered layer, against the predictor's cost.
    While it is unknown steering goes on; once it is worth less than predicting costs, a layer is
    predicted for it only on a probe, one in PROBE_EVERY; worth more, on every such layer."""
    pl = _full_planner(eviction="predictive", costs=Costs(layer_s=1.0, expert_s=0.1, transfer_s=0.5))
    _fill_budget(pl)
    pl.observe_predict_cost(1.0)
    for _ in range(20):  # steered layers that saved nothing
        assert pl.worth_predicting(10.0) or pl.steering_value() is not None
    assert pl.steering_value() == 0.0 and pl.prediction_pays()
    asked = [pl.worth_predicting(10.0) for _ in range(64)]
    assert sum(asked) == 64 // pl.PROBE_EVERY
    pl._steer_value = 2.0 * pl._steer_layers  # 2 s saved per steered layer: more than the predictor's 1 s
    assert all(pl.worth_predicting(10.0) for _ in range(8))
    always = _full_planner(eviction="predictive", adaptive=False)
    _fill_budget(always)
    always._steer_value = -1.0 * 50
    always._steer_layers = 50.0
    assert all(always.worth_predicting(10.0) for _ in range(8)), "without adaptation it always steers"


def test_steer_wins_count_whether_predictions_saved_a_miss_or_cost_one(monkeypatch):
    """A judged victim is set against the rule's own choice without steering; whichever of the two is used
    first tells whether steering saved a miss or caused one, weighted by the victims each judged one stands
    for, and the planner counts that into steering's ledger."""
    monkeypatch.setattr(PredictivePolicy, "JUDGE_STRIDE", 1)
    pl = _full_planner(eviction="predictive")
    pol = pl.policy
    pol.judging = True
    everything = set(pl.cache.keys())
    unsteered = pol.victim(everything)  # nothing steered: nothing to judge
    assert pol._steer_choice is None
    pol.set_rest(0, 0.0)                # steered: layer 0's cached experts will not be used
    steered = pol.victim(everything)
    assert steered == (0, 0) != unsteered and pol._steer_choice == (steered, unsteered, 1)
    pl.cache.insert((steered[0], 7))    # evicts the steered victim: a pair to tell apart
    assert pol._steer_out == {steered: (unsteered, 1)} and pol._steer_kept == {unsteered: steered}
    pol.start_run(unsteered[0], [unsteered[1]])  # the kept one is used first: a miss saved
    assert pol.steer_wins == [1, 0] and not pol._steer_out and not pol._steer_kept
    pl.release(pl.plan_layer(20.0, 1, [1]))
    assert pl._steer_value == pytest.approx(pl.costs.transfer_s)
    pol._steer_out[(1, 1)], pol._steer_kept[(2, 2)] = ((2, 2), 3), (1, 1)
    pol.start_run(1, [1])  # the evicted one first: steering caused a miss, one judged of every three
    assert pol.steer_wins == [1, 3]
    pol._steer_out[(1, 1)], pol._steer_kept[(2, 2)] = ((2, 2), 1), (1, 1)
    pol._tell_steer({(1, 1), (2, 2)})  # both at once: a miss either way
    assert pol.steer_wins == [1, 3] and not pol._steer_out
    monkeypatch.setattr(PredictivePolicy, "JUDGE_STRIDE", 2)  # one victim in two judged, weighing two
    pol._judge_tick = 0
    pol.victim(set(pl.cache.keys()))
    assert pol._steer_choice is None and pol._judge_tick == 1
    pol.victim(set(pl.cache.keys()))
    assert pol._judge_tick == 0 and (pol._steer_choice is None or pol._steer_choice[2] == 2)


@pytest.mark.parametrize("flat_max,scan_max", [(64, 8), (4, 8), (4, 0)], ids=["ranked", "heaps-and-scans", "heaps"])
def test_the_victim_without_predictions_is_the_rules_own_with_none(flat_max, scan_max, monkeypatch):
    """_unsteered_victim (the fast search with the steered layers left out, and a pass over those) is what
    victim_ref picks once the layers' steered P are set aside, as positions, uses, predictions, steering,
    pins and protection change, on each of the fast search's paths."""
    import random

    from moe_prefetch.cache import ExpertCache

    monkeypatch.setattr(PredictivePolicy, "FLAT_MAX", flat_max)
    monkeypatch.setattr(PredictivePolicy, "SCAN_MAX", scan_max)
    rng = random.Random(11)
    L, E, k = 4, 10, 2
    pol = PredictivePolicy({j: j for j in range(L)}, top_k=k, num_experts=E, slots=16)
    cache = ExpertCache(16, pol)
    checked = 0
    for step in range(3000):
        pol.position = step % L
        if rng.random() < 0.4:
            pol.start_run(pol.position, rng.sample(range(E), k), record=True)
        if rng.random() < 0.3:
            pol.predicted[(rng.randrange(L), rng.randrange(E))] = rng.choice([0.0, 0.5, 1.0, rng.random()])
        if rng.random() < 0.2:
            pol.set_rest(rng.randrange(L), rng.choice([0.0, 0.3, 1.0, rng.random()]))
        if rng.random() < 0.1:
            pol.drop_predictions(rng.randrange(L))
        key = (rng.randrange(L), rng.randrange(E))
        if key in cache:
            cache.touch(key)
            continue
        if cache.has_free():
            cache.insert(key)
            continue
        protected = set(rng.sample(sorted(cache.keys()), rng.randrange(4)))
        candidates = cache.evictable(protected)
        rest, pol._rest = pol._rest, {}  # steering set aside
        expected = pol.victim_ref(candidates)
        pol._rest = rest
        assert pol._unsteered_victim(candidates) == expected, step
        checked += 1
        cache.insert(key, protected)
    assert checked > 1000


# ---- deferred bookkeeping (settle) ----------------------------------------------------------

def _drive(pl, routing, host: bool, settle_after: bool) -> list:
    """Every decision `pl` makes over `routing` ([tokens][layers] -> experts), with prefetches from a
    fixed pseudo-prediction (the next layer's experts) and keeps; settle_after: the caller settles right
    after each plan, as the runtime does, else only what reads the state settles it."""
    import random
    rng = random.Random(1)
    made, now = [], 0.0
    L = len(pl.layers)
    for t, token in enumerate(routing):
        for i, experts in enumerate(token):
            pending = list(experts)
            while pending:
                acts = pl.plan_layer(now, i, pending)
                made.append([(a.kind, a.key, a.slot, a.evicted) for a in acts])
                if settle_after:
                    pl.settle()
                nxt = routing[t][i + 1] if i + 1 < L else (routing[t + 1][0] if t + 1 < len(routing) else [])
                scores = {e: 0.6 for e in nxt} | {rng.randrange(8): 0.2}
                if pl.worth_predicting(now):
                    pl.steer_eviction((i + 1) % L, 1, set(nxt))
                    sent = pl.plan_prefetch(now, i, [((i + 1) % L, 1, scores)], {(i, e) for e in experts}, asked=True)
                    made.append([(a.kind, a.key, a.slot, a.evicted) for a in sent])
                pl.observe_plan_cost(1e-4)
                now += 1.0
                if host:
                    made.append([(a.key, a.evicted) for a in pl.take_keeps(now)])
                pl.release(acts)
                granted = {a.key[1] for a in acts}
                pending = [e for e in pending if e not in granted]
    return made


@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("eviction", ["lru", "lfu", "predictive", "auto"])
def test_deferred_bookkeeping_makes_the_same_decisions(eviction, host):
    """plan_layer leaves the run's uses, the hits' touches and the shadow caches to settle(); every
    decision (hits, copies, host jobs, victims, prefetches, keeps) is the one made with the bookkeeping
    done first, whether the caller settles after each plan or leaves it to the next call that reads it."""
    import random
    rng = random.Random(7)
    L, E, k = 4, 8, 2
    routing, last = [], [rng.sample(range(E), k) for _ in range(L)]
    for _ in range(120):  # sticky, skewed routing: victims, hits and misses all happen
        token = [sorted(set(rng.sample(last[i], 1) + [min(int(rng.expovariate(0.5)), E - 1)])) for i in range(L)]
        token = [t if len(t) == k else sorted(set(t) | {rng.randrange(E)}) for t in token]
        routing.append(token)
        last = token
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=3.0, host_s=2.0 if host else None)
    runs = [_drive(make_planner(slots=11, layers=L, experts=E, top_k=k, costs=costs, eviction=eviction,
                                host_compute=host, defer=defer), routing, host, settle_after)
            for defer, settle_after in ((False, False), (True, True), (True, False))]
    assert runs[0] == runs[1] == runs[2]
    kinds = {a[0] for step in runs[0] for a in step if len(a) == 4}
    assert {"hit", "copy" if not host else "host"} <= kinds
    assert any(a[3] is not None for step in runs[0] for a in step if len(a) == 4), "no victim was ever chosen"


def test_settle_does_the_plans_bookkeeping_once():
    pl = make_planner(eviction="predictive")
    pl.release(pl.plan_layer(0.0, 1, [3, 4]))  # two copies: settled before their slots were given
    assert pl.policy.uses[(1, 3)] == 1
    acts = pl.plan_layer(20.0, 1, [3, 4])  # the next token's run: two hits
    assert [a.kind for a in acts] == ["hit", "hit"]
    assert pl.policy.uses[(1, 3)] == 1, "a run of hits leaves its uses to settle()"
    assert pl.settle() is True and pl.settle() is False
    assert pl.policy.uses[(1, 3)] == 2 and pl.policy.layer_uses[1] == 4
