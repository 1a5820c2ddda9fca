"""Host compute of missed experts: chosen by the planner when the host beats the link, token-identical
on the CPU backend, errors reach the caller, flags validated."""
from __future__ import annotations

import pytest
import torch

import moe_prefetch as mp
from moe_prefetch.errors import MoePrefetchError
from moe_prefetch.switch import EvictionSwitch
from conftest import make_mixtral, reference_generate

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 42, 11, 90, 23, 7]])
NEW = 12


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("host") / "m", layers=3, experts=6, top_k=2, seed=4)


def run(path, slots, **kw):
    model, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", expert_cache=slots, show_progress=False, **kw))
    with torch.inference_mode():
        out = model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    st = mp.stats(model)
    model.moe_runtime.close()
    return out, st


# a slow link and a fast host: every miss goes to the host
SLOW_LINK = dict(link_bandwidth=2e6, host_bandwidth=1e12)


@pytest.mark.parametrize("slots", [2, 5, 9, 18])
@pytest.mark.parametrize("predictor", ["none", "next-gate"])
def test_host_compute_is_token_identical_on_cpu(ckpt, slots, predictor):
    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    out, st = run(ckpt, slots, predictor=predictor, **SLOW_LINK)
    assert torch.equal(out, ref), f"{slots} slots, {predictor}: host compute changed the output"
    assert st["host_compute"] is True
    assert st["expert_requests"] == st["hits"] + st["misses"] + st["host_computed"]
    if slots < 18:
        assert st["host_computed"] > 0, "a miss on a slow link must go to a fast host"


@pytest.mark.parametrize("rule", ["auto", "frequency", "recency"])
def test_every_keep_rule_is_token_identical(ckpt, rule):
    """How host-computed misses are judged for a keep decides what is cached, never what is computed."""
    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    # a host twice the link's speed: misses go to the host while the link is busy, and are kept when it is idle
    out, st = run(ckpt, 5, predictor="none", link_bandwidth=2e7, host_bandwidth=4e7, keep_rule=rule)
    assert torch.equal(out, ref), f"keep rule {rule} changed the output"
    assert st["host_computed"] > 0 and st["keeps"] > 0
    assert (st["keep_ledger"] is None) == (rule != "auto")


def test_keep_ledger_counts_the_keeps_the_rules_disagree_on_in_decode(ckpt):
    """With the predictive rule evicting (eviction "auto" may run LFU's, under which keeps are on frequency
    and nothing is paired), the keeps the two rules judge differently are paired and their uses counted;
    stats report it, and what a keep cost the caller, measured."""
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=5, predictor="none",
                                                         eviction="predictive",
                                                         link_bandwidth=2e7, host_bandwidth=4e7, show_progress=False))
    with torch.inference_mode():
        model.generate(PROMPT, max_new_tokens=48, min_new_tokens=48, do_sample=False)
    st = mp.stats(model)
    model.moe_runtime.close()
    led = st["keep_ledger"]
    assert led["pairs"] > 0 and led["recency_saved"] + led["recency_cost"] > 0, led
    assert led["keep_ms"] is not None and led["keep_ms"] >= 0.0
    assert led["recency_tokens"] + led["frequency_tokens"] >= 48
    with pytest.raises(MoePrefetchError, match="keep_rule"):
        mp.OffloadConfig(keep_rule="newest")


def test_keeps_are_decided_while_the_host_computes_and_charged_only_past_it(ckpt, monkeypatch):
    """A layer's keeps are not decided with its plan: acquire() leaves them to start_keeps(), which the
    layer calls after its device work while the (emulated) host still computes its misses. Decided and
    started there, they cost the layer nothing while the host is busy: neither planning nor the keep
    ledger's price of a keep is charged for them. The output stays the reference's."""
    from moe_prefetch.offloader import ExpertOffloader
    from moe_prefetch.planner import Planner

    calls, charged = [], []
    acquire, start_keeps = ExpertOffloader.acquire, ExpertOffloader.start_keeps
    plan_cost, keep_cost = Planner.observe_plan_cost, Planner.observe_keep_cost

    def acquire_spy(self, *a, **kw):
        actions = acquire(self, *a, **kw)
        if any(x.kind == "host" for x in actions):
            assert self.planner.keeps_undecided, "the keeps of host-computed misses wait for start_keeps()"
        return actions

    def start_keeps_spy(self, jobs=()):
        jobs = list(jobs)
        before, charged[:] = self.planner.counters.keeps, []
        start_keeps(self, jobs)
        busy = bool(jobs) and self.host.ready_at(jobs) > self.clock()  # the host still computes after them
        calls.append((busy, self.planner.counters.keeps - before, list(charged)))

    monkeypatch.setattr(ExpertOffloader, "acquire", acquire_spy)
    monkeypatch.setattr(ExpertOffloader, "start_keeps", start_keeps_spy)
    monkeypatch.setattr(Planner, "observe_plan_cost", lambda self, s: (charged.append(s), plan_cost(self, s))[1])
    monkeypatch.setattr(Planner, "observe_keep_cost", lambda self, s: (charged.append(s), keep_cost(self, s))[1])
    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    # a host job takes 18 ms (the test experts are 18 kB), far longer than the layer's device work
    out, st = run(ckpt, 5, predictor="none", eviction="predictive", link_bandwidth=1e6, host_bandwidth=1e6)
    assert torch.equal(out, ref)
    assert st["keeps"] == sum(n for _, n, _ in calls) > 0, "every keep is started by start_keeps()"
    # (a layer whose device work waited on a copy longer than its host jobs took finds the host done)
    hidden = [costs for busy, n, costs in calls if busy and n]
    assert len(hidden) >= 3, calls
    assert all(c == 0.0 for costs in hidden for c in costs), "a keep inside the host's work is charged nothing"


def test_auto_eviction_turns_to_lfus_rule_where_misses_are_cheap(ckpt):
    """Eviction "auto" (the default) in the runtime: with a host that computes a miss in far less time than
    the predictive rule's planning saves, the runtime's measured planning times turn it to a cheaper rule
    after the opening (its epochs counted against LRU's shadow, which the planner feeds with host compute);
    the output stays the reference's; stats report every rule's epochs."""
    ref = reference_generate(ckpt, PROMPT, 96, device="cpu")
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=5, predictor="none",
                                                         link_bandwidth=2e7, host_bandwidth=1e12, show_progress=False))
    with torch.inference_mode():
        out = model.generate(PROMPT, max_new_tokens=96, min_new_tokens=96, do_sample=False)
    st = mp.stats(model)
    switch = model.moe_runtime.offloader.planner.eviction_switch
    model.moe_runtime.close()
    assert torch.equal(out, ref)
    ep = st["eviction_epochs"]
    assert ep["predictive"] >= EvictionSwitch.MIN_COUNTED + 1 and ep["lfu"] + ep["lru"] >= 3, ep
    assert ep["now"] != "predictive", ep
    assert ep["shadow_wins"]["lfu"] == [0, 0] and sum(ep["shadow_wins"]["lru"]) > 0, "host compute: LRU's shadow alone"
    assert switch.plan["predictive"] > 0 and switch.plan[ep["now"]] > 0, "the runtime reports its planning times"
    from moe_prefetch.stats import format_summary

    now = {"lfu": "LFU", "lru": "LRU"}[ep["now"]]
    assert (f"eviction           auto ({now} now; epochs predictive {ep['predictive']}, LFU {ep['lfu']}, "
            f"LRU {ep['lru']})" in format_summary(st))
    _, st = run(ckpt, 5, predictor="none", eviction="predictive", link_bandwidth=2e7, host_bandwidth=1e12)
    assert st["eviction_epochs"] is None


def test_auto_turns_host_compute_on_only_with_an_emulated_host(ckpt):
    _, st = run(ckpt, 4, predictor="none", link_bandwidth=2e6)
    assert st["host_compute"] is False and st["host_computed"] == 0
    _, st = run(ckpt, 4, predictor="none", host_compute="off", **SLOW_LINK)
    assert st["host_compute"] is False and st["host_computed"] == 0


def test_a_slow_host_is_not_used(ckpt):
    _, st = run(ckpt, 4, predictor="none", link_bandwidth=1e12, host_bandwidth=1e5, host_compute="on")
    assert st["host_computed"] == 0, "the host must lose to a fast link"


def test_eager_experts_run_on_the_device_only(tmp_path):
    """The eager experts implementation runs the family's own loop, which reads each expert's weights
    where it computes: host compute stays off under `auto` (output still identical) and `on` is refused."""
    path = make_mixtral(tmp_path / "eager", layers=2, experts=6, top_k=3, seed=11)
    ref = reference_generate(path, PROMPT, NEW, device="cpu", experts_implementation="eager")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg.experts_implementation = "eager"
    cfg.save_pretrained(path)
    out, st = run(path, 4, predictor="none", **SLOW_LINK)
    assert torch.equal(out, ref) and st["host_computed"] == 0 and not st["host_compute"]
    with pytest.raises(MoePrefetchError, match="grouped experts implementation"):
        mp.load_model(str(path), mp.OffloadConfig(device="cpu", expert_cache=4, host_compute="on", show_progress=False))


def test_host_errors_reach_the_caller(ckpt, monkeypatch):
    from moe_prefetch.host_compute import HostExecutor

    def broken(self, layer, expert):
        raise OSError("disk went away")

    monkeypatch.setattr(HostExecutor, "_views", broken)
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=2, predictor="none",
                                                         show_progress=False, **SLOW_LINK))
    with pytest.raises(MoePrefetchError, match="disk went away"), torch.inference_mode():
        model(PROMPT)
    assert not any(model.moe_runtime.offloader.cache.is_pinned(k) for k in list(model.moe_runtime.offloader.cache.keys()))
    model.moe_runtime.close()


def test_host_flags(ckpt, capsys):
    from moe_prefetch.run import main

    assert main(["--model", str(ckpt), "--device", "cpu", "--host-gbps", "-1", "--no-progress"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host-gbps" in err[0]
    with pytest.raises(MoePrefetchError, match="host_compute"):
        mp.OffloadConfig(host_compute="maybe")


@pytest.mark.parametrize("emulated", [True, False])
def test_host_executor_runs_jobs_one_at_a_time_at_the_emulated_speed(ckpt, emulated):
    """With host_bandwidth on the CPU backend the host is a timeline (no thread): a job's result is exact
    and ready once the emulated host, taking one job at a time, would have finished it; without it, a
    worker thread computes. Either way errors reach result() and a closed executor refuses jobs."""
    import threading
    import time

    from moe_prefetch.host_compute import HostExecutor

    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=2, predictor="none", show_progress=False))
    store = model.moe_runtime.store
    threads = threading.active_count()
    ex = HostExecutor(store, torch.device("cpu"), store.expert_nbytes / 0.1 if emulated else None)  # 0.1 s a job
    assert ex.inline is emulated and threading.active_count() == threads + (0 if emulated else 1)
    assert store.expert_nbytes <= HostExecutor.INLINE_MAX_BYTES  # a small expert: inline when emulated

    def fn(views, rows):  # [n, H] -> [n, H], reading the expert's weights
        w = next(iter(views.values())).reshape(-1)
        return rows * 2 + w[:rows.shape[-1]]

    rows = torch.randn(1, 8)
    t0 = time.perf_counter()
    jobs = [ex.submit(0, e, fn, rows) for e in (1, 2)]
    outs = [ex.result(j) for j in jobs]
    if emulated:
        assert time.perf_counter() - t0 >= 0.2 - 1e-3  # serial: the second waits for the first
        assert ex.busy_seconds >= 0.2 - 1e-9 and ex.jobs == 2
        assert ex.seconds_per_job() == pytest.approx(0.1)  # the emulated speed, whatever the arithmetic took
    for e, out in zip((1, 2), outs):
        with torch.inference_mode():
            assert torch.equal(out, fn(ex._views(0, e), rows))

    def broken(views, rows):
        raise OSError("disk went away")

    with pytest.raises(MoePrefetchError, match="host compute of expert 3 of layer 0 failed: OSError: disk went away"):
        ex.result(ex.submit(0, 3, broken, rows))
    ex.close()
    with pytest.raises(MoePrefetchError, match="closed"):
        ex.submit(0, 1, fn, rows)
    assert threading.active_count() == threads
    model.moe_runtime.close()


def test_a_cold_first_host_job_does_not_price_the_host(ckpt):
    """The planner prices host compute with the executor's time per job, the first (warm-up) job left out:
    a slow cold start counted in would make the host look too slow to be chosen again, and so never
    measured again (seen as a run that computed 4 experts on the host instead of 43)."""
    import time

    from moe_prefetch.host_compute import HostExecutor

    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=2, predictor="none", show_progress=False))
    ex = HostExecutor(model.moe_runtime.store, torch.device("cpu"))  # the worker thread, timed for real
    calls = []

    def fn(views, rows):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.2)  # cold
        return rows

    rows = torch.randn(1, 8)
    ex.result(ex.submit(0, 1, fn, rows))
    assert ex.seconds_per_job() is None  # one job: no measure yet (the planner keeps its estimate)
    for e in (2, 3, 4):
        ex.result(ex.submit(0, e, fn, rows))
    assert ex.busy_seconds >= 0.2 and ex.seconds_per_job() < 0.05
    ex.close()
    model.moe_runtime.close()


def test_an_interrupted_copy_is_forgotten_and_the_next_run_is_exact(ckpt, monkeypatch):
    """With an emulated link the copy runs on the compute thread, where a Ctrl-C can cut it short. It
    reaches the caller as KeyboardInterrupt, and the expert whose slot may be half-written is forgotten,
    so the same model, used again, is still token-identical."""
    from moe_prefetch.transfer import EmulatedLinkEngine

    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_cache=3, predictor="none",
                                                         link_bandwidth=1e9, show_progress=False))
    original, calls = EmulatedLinkEngine._copy, []

    def cut_short(self, job):
        calls.append(1)
        if len(calls) == 5:
            job.dst.fill_(float("nan"))  # a half-written slot
            raise KeyboardInterrupt
        original(self, job)

    monkeypatch.setattr(EmulatedLinkEngine, "_copy", cut_short)
    with pytest.raises(KeyboardInterrupt), torch.inference_mode():
        model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    off = model.moe_runtime.offloader
    assert not any(off.cache.is_pinned(k) for k in list(off.cache.keys()))
    with torch.inference_mode():
        out = model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    model.moe_runtime.close()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("slots", [2, 5])
def test_large_experts_copy_on_a_worker_and_stay_token_identical(ckpt, slots, monkeypatch):
    """Above INLINE_MAX_BYTES the emulated link's memcpys run on a worker thread (the timeline still says
    when each lands) and an emulated host computes on its own thread: the output is unchanged, prefetches
    and host compute included."""
    from moe_prefetch.host_compute import HostExecutor
    from moe_prefetch.transfer import EmulatedLinkEngine

    monkeypatch.setattr(EmulatedLinkEngine, "INLINE_MAX_BYTES", 0)  # every expert counts as large
    monkeypatch.setattr(HostExecutor, "INLINE_MAX_BYTES", 0)  # and is computed on the host's thread
    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    for kw in (dict(predictor="next-gate", adaptive_prediction=False), dict(predictor="none", host_compute="on")):
        out, st = run(ckpt, slots, link_bandwidth=2e7, host_bandwidth=4e7, **kw)
        assert torch.equal(out, ref), (slots, kw)
        assert st["backend"].startswith("cpu-link/") and st["backend"].endswith("+thread")
        assert st["misses"] > 0
        assert st["host_computed"] > 0 or kw["predictor"] != "none"


def test_what_prefetches_delivered_is_reported_per_distance_with_host_compute(ckpt):
    """stats: prediction_value["delivered"], the factor the gate scales P by, per distance with host compute
    (a late copy saves nothing there) and as one record without it; the output stays the reference's."""
    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    for host in ("on", "off"):
        out, st = run(ckpt, 6, predictor="next-gate", lookahead=2, adaptive_prediction=False, host_compute=host,
                      link_bandwidth=2e7, host_bandwidth=4e7)
        assert torch.equal(out, ref), host
        assert st["prefetch_issued"] > 0, "prefetches must have been tried for their record to exist"
        delivered = st["prediction_value"]["delivered"]
        assert 0.0 < delivered["all"] <= 1.0 and all(0.0 < v <= 1.0 for v in delivered.values())
        distances = set(delivered) - {"all"}
        assert (distances and distances <= {"1", "2"}) if host == "on" else not distances, (host, delivered)


@pytest.mark.parametrize("host", [False, True])
def test_planner_bookkeeping_runs_while_the_layer_waits(ckpt, host):
    """The planner's bookkeeping of a layer (Planner.settle) runs once its copies or host jobs are started:
    on a slow link it is mostly hidden behind them, with everything resident nothing is in flight and it
    is paid as planning; the output is the reference's either way."""
    ref = reference_generate(ckpt, PROMPT, NEW, device="cpu")
    # a slow link, and a host twice its speed: misses go to the host, which the layer then waits for
    slow = dict(link_bandwidth=2e6, host_bandwidth=4e6) if host else dict(link_bandwidth=2e6, host_compute="off")
    hidden = {}
    for slots in (5, 18):  # 18: every expert, once the first uses have copied them in
        out, st = run(ckpt, slots, predictor="none", eviction="auto", **slow)
        assert torch.equal(out, ref)
        assert st["settle_seconds"] > 0 and 0 <= st["settle_hidden_seconds"] <= st["settle_seconds"]
        assert st["plan_seconds"] >= st["settle_seconds"] - st["settle_hidden_seconds"], "the rest is paid as planning"
        hidden[slots] = st["settle_hidden_seconds"] / st["settle_seconds"]
    assert hidden[5] > 0.3 and hidden[18] < hidden[5], hidden
