"""Trace-driven simulator: replay recorded routing through the runtime's own planner under a cost model.

Nothing here decides what moves, what stays or where an expert runs: planner.Planner does, exactly as
it does in the runtime, and this file only keeps the clock. One decode step = for each MoE layer:
attention (attn_s); the planner's actions for the routed experts (hit, wait for a copy in flight,
demand copy, or compute on the host); the predictions made at this layer for the next K layers
(and the next token's first layers) offered to the planner, which gates them; then the device
computes its experts (expert_s each) once their copies have landed, while the host computes its own.
The link is the planner's Link (one copy at a time, demand first, withdrawable prefetches); here its
times are exact, in the runtime they are estimates. Belady (farthest next use, which needs the
future) is the one eviction policy that exists only here.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import CacheFullError, EvictionPolicy
from .errors import MoePrefetchError
from .planner import EVICTIONS, Costs, Link, Planner, PredictivePolicy

__all__ = ["BYTES_PER_PARAM", "BeladyPolicy", "CostModel", "Link", "Policy", "SimResult", "Trace",
           "load_profiles", "min_transfers", "physical_bound", "simulate", "standard_policies"]

PROFILES = Path(__file__).resolve().parent / "profiles"
# the runtime's stored formats (quant.py, group size 128): int8 codes + an fp16 scale per group; int4
# packed codes + an fp16 scale and an fp16 zero point per group (asymmetric, the default)
BYTES_PER_PARAM = {"fp16": 2.0, "int8": 1.0 + 2 / 128, "int4": 0.5 + 4 / 128}


def load_profiles(kind: str) -> dict:
    """One profile file ("hardware", "models" or "hosts") as {name: profile}."""
    data = json.loads((PROFILES / f"{kind}.json").read_text())
    data.pop("_about", None)
    return data


@dataclass(frozen=True)
class CostModel:
    attn_s: float      # per MoE layer: attention, norms, router (everything resident)
    expert_s: float    # one routed expert for one token
    transfer_s: float  # one expert over the host-to-device link
    expert_bytes: int
    tail_s: float = 0.0  # per token: embeddings, lm_head, dense layers
    layer_scale: float = 1.0  # real layers / trace layers when the trace stands in for a deeper model
    host_s: float | None = None  # one expert for one token on the host (None: no host profile)
    # fixed costs the compute thread pays (the CPU backend's: Python, thread hand-offs; on a GPU a few
    # microseconds): per copy started (demand or prefetch), per expert sent to the host, per layer on
    # which the predictor runs (its compute and the planning of its prefetches), and per layer on which
    # a configured predictor does not run (the prefetcher's calibration and bookkeeping)
    copy_s: float = 0.0
    host_job_s: float = 0.0
    predict_s: float = 0.0
    prefetch_layer_s: float = 0.0
    # per MoE layer: the planner's own host time beyond what planning a layer of hits takes (which the
    # compute timings hold): what an eviction policy's victim search and bookkeeping cost per layer
    plan_s: float = 0.0
    # per MoE layer: the planner's bookkeeping done once the layer's copies and host jobs are started
    # (Planner.settle: the run's uses and recency fits, the hits' touches, the shadow caches), not in
    # attn_s: it delays the layer only where nothing it waits for is still in flight
    settle_s: float = 0.0

    @classmethod
    def for_gpu(cls, hw: dict, shape: dict, dtype: str, trace_layers: int, host: dict | None = None) -> "CostModel":
        """Batch-1 decode is memory-bound: time = bytes read / device bandwidth (+ launch overhead). With
        a host profile, an expert computed on the host costs its bytes / the host's memory read rate
        (the same memory-bound assumption, which is optimistic for a CPU kernel that also dequantizes)."""
        bpp = BYTES_PER_PARAM[dtype]
        bw = hw["mem_gbps"] * 1e9
        expert_bytes = int(shape["expert_params"] * bpp)
        return cls(attn_s=shape["dense_params_per_layer"] * 2 / bw + hw["layer_overhead_us"] * 1e-6,  # attention weights stay fp16
                   expert_s=expert_bytes / bw, transfer_s=expert_bytes / (hw["h2d_gbps"] * 1e9),
                   expert_bytes=expert_bytes, tail_s=shape["other_dense_params"] * 2 / bw / 2,  # lm_head only (embedding is a gather)
                   layer_scale=shape["moe_layers"] / trace_layers,
                   host_s=None if host is None else expert_bytes / (host["read_gbps"] * 1e9))

    def costs(self) -> Costs:
        """The planner's view of these costs."""
        return Costs(layer_s=self.attn_s, expert_s=self.expert_s, transfer_s=self.transfer_s, host_s=self.host_s)


@dataclass(frozen=True)
class Policy:
    name: str
    predictor: str | None = None  # a score array in the trace, "oracle", or None
    lookahead: int = 0
    eviction: str = "lru"         # lru | lfu | predictive | auto | predictive-frequency (no recency) | belady | none (no reuse: every use is a copy)
    budget_experts: int | None = None  # prefetch copies in flight (None: top-k, the runtime's default)
    host_compute: bool = False    # a miss may run on the host when that finishes first (needs CostModel.host_s)
    gate: bool = True             # False: every predicted prefetch under the budget (the behaviour before the planner)
    adaptive: bool = True         # False: predict whether or not it has lately paid (bounds, mechanism tests)
    keep_recency: bool | None = None  # host-computed misses kept judged with recency (True) or on frequency; None: measured (KeepSwitch)


@dataclass
class SimResult:
    policy: str
    slots: int
    tokens: int
    seconds: float
    stall_seconds: float
    requests: int
    hits: int                # served from a slot without a demand copy (landed, or a prefetch still in flight)
    bytes_moved: int
    prefetch_issued: int = 0
    prefetch_wasted: int = 0
    host_computed: int = 0
    prefetch_gated: int = 0  # refused by the planner's benefit test
    late: int = 0            # of the hits, prefetches that had not landed when the layer needed them

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def stall_fraction(self) -> float:
        return self.stall_seconds / self.seconds

    def row(self) -> dict:
        return dict(policy=self.policy, slots=self.slots, tokens_per_s=self.tokens_per_s, hit_rate=self.hit_rate,
                    stall_fraction=self.stall_fraction, mb_per_token=self.bytes_moved / self.tokens / 1e6,
                    host_fraction=self.host_computed / self.requests if self.requests else 0.0,
                    prefetch_issued=self.prefetch_issued, prefetch_wasted=self.prefetch_wasted,
                    prefetch_gated=self.prefetch_gated, late=self.late)


@dataclass
class Trace:
    """Routing [N, L, k] per decode step plus predictor scores [N, L, K, E] (NaN: no prediction)."""

    routing: np.ndarray
    seq_lengths: list[int]
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    header: dict = field(default_factory=dict)

    @property
    def shape(self):
        return self.routing.shape

    @classmethod
    def load(cls, path) -> "Trace":
        """A trace written by save() (python -m moe_prefetch.trace --data); a missing or unreadable file,
        or a routing trace of another kind (one per forward pass), is refused in one line."""
        path = Path(path)
        if not path.is_file():
            raise MoePrefetchError(f"trace {path} does not exist or is not a file (record one with python -m "
                                   "moe_prefetch.trace --data TEXT --out FILE)")
        record = "record one with python -m moe_prefetch.trace --data TEXT --out FILE"
        try:
            with np.load(path) as z:
                missing = [k for k in ("header", "routing", "seq_lengths") if k not in z.files]
                if missing:
                    header = json.loads(str(z["header"])) if "header" in z.files else {}
                    what = ("the routing of one run (trace --prompt, for --predictor oracle)"
                            if header.get("format") == "moe_prefetch.routing.v1" else f"no {missing[0]!r} array in it")
                    raise MoePrefetchError(f"{path} is not a simulator trace ({what}); {record}")
                header = json.loads(str(z["header"]))
                scores = {k[len("scores_"):]: z[k].astype(np.float32) for k in z.files if k.startswith("scores_")}
                routing, lengths = z["routing"].astype(np.int64), [int(x) for x in z["seq_lengths"]]
        except MoePrefetchError:
            raise
        except Exception as e:  # noqa: BLE001 - not an .npz, truncated, a pickle...
            raise MoePrefetchError(f"cannot read trace {path} ({type(e).__name__})") from None
        if routing.ndim != 3:
            raise MoePrefetchError(f"{path} is not a simulator trace (routing of shape {routing.shape}, not [N, L, k])")
        return cls(routing, lengths, scores, header)

    def head(self, n: int) -> "Trace":
        """The first n decode steps, with the sequence boundaries that fall in them."""
        lengths, left = [], n
        for length in self.seq_lengths:
            if left <= 0:
                break
            lengths.append(min(length, left))
            left -= length
        return Trace(self.routing[:n], lengths, {k: v[:n] for k, v in self.scores.items()}, dict(self.header))

    def save(self, path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {f"scores_{k}": v.astype(np.float16) for k, v in self.scores.items()}
        np.savez_compressed(tmp, header=np.array(json.dumps(self.header)), routing=self.routing.astype(np.int16),
                            seq_lengths=np.array(self.seq_lengths), **arrays)
        tmp.replace(path)


class BeladyPolicy(EvictionPolicy):
    """Evict the expert whose next use is farthest in the future (optimal for a known trace).
    The caller sets `position` (t * L + i) before each layer."""

    name = "belady"

    def __init__(self, routing: np.ndarray):
        N, L, _ = routing.shape
        self.layers = L
        self.uses: dict[tuple[int, int], list[int]] = defaultdict(list)
        for t in range(N):
            for i in range(L):
                for e in set(routing[t, i].tolist()):
                    self.uses[(i, e)].append(t * L + i)
        self.position = 0

    def next_use(self, key) -> float:
        u = self.uses.get(key, [])
        j = bisect.bisect_right(u, self.position)
        return u[j] if j < len(u) else math.inf

    def use_probability(self, key, recency: bool = True) -> float:
        """Whether the key is used at its layer's next run, known: 1 or 0 (the planner's keep rule and
        prefetch gate ask this of the policy that can say)."""
        return 1.0 if self.next_use(key) - self.position <= self.layers else 0.0

    def victim(self, candidates):
        if not candidates:
            raise CacheFullError("no evictable expert")
        return max(candidates, key=lambda k: (self.next_use(k), k))


def _oracle_scores(routing: np.ndarray, E: int, K: int) -> np.ndarray:
    """Perfect predictions (with wrap-around to the next step) in the trace score layout."""
    N, L, _ = routing.shape
    out = np.full((N, L, K, E), np.nan, dtype=np.float32)
    for t in range(N):
        for i in range(L):
            for d in range(1, K + 1):
                step, j = t + (i + d) // L, (i + d) % L
                if step < N:
                    out[t, i, d - 1] = 0.0
                    out[t, i, d - 1, routing[step, j]] = 1.0
    return out


class _CountingLink(Link):
    """The planner's link, counting the copies that really cross it (a withdrawn copy moves nothing)."""

    def __init__(self, transfer_s: float, priority: bool):
        super().__init__(transfer_s, priority)
        self.copies = 0

    def send(self, key, now, demand):
        self.copies += 1
        return super().send(key, now, demand)

    def cancel(self, key, now):
        withdrawn = super().cancel(key, now)
        self.copies -= withdrawn
        return withdrawn


def _predictions(trace: Trace, policy: Policy, E: int, k: int):
    """Per (t, i, d-1): the top-k experts and their scores as lists, or None where there is no
    prediction. The runtime's prefetcher offers the planner the union of the tokens' top-k: in
    decode (one token), the top-k."""
    K = policy.lookahead
    if not policy.predictor or not K:
        return None
    routing = trace.routing
    if policy.predictor == "oracle":
        scores = _oracle_scores(routing, E, K)
    elif policy.predictor == "history":  # a function of the routing, as the oracle: any K up to a token
        from .predictors.history import history_scores

        if K > routing.shape[1]:
            raise MoePrefetchError(f"history predicts at most one token ahead ({routing.shape[1]} layers on this "
                                   f"trace), policy {policy.name!r} asks {K}")
        scores = history_scores(routing, trace.seq_lengths, K, E)
    elif policy.predictor in trace.scores:
        scores = trace.scores[policy.predictor]
    else:
        raise MoePrefetchError(f"trace has no {policy.predictor} scores (it has: {', '.join(sorted(trace.scores)) or 'none'}; "
                               "oracle and history need none)")
    if scores.shape[2] < K:
        raise MoePrefetchError(f"the trace has {policy.predictor} scores for a lookahead of at most {scores.shape[2]}, "
                               f"policy {policy.name!r} asks {K} (record it with a larger --lookahead, or ask for less)")
    scores = scores[:, :, :K]                                             # [N, L, K, E]
    missing = np.isnan(scores).all(-1)                                    # [N, L, K]
    top = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=-1, kind="stable")[..., :k]  # [N, L, K, k]
    values = np.take_along_axis(scores, top, axis=-1)                     # [N, L, K, k]
    return missing.tolist(), top.tolist(), values.tolist()


def make_planner(trace: Trace, cost: CostModel, slots: int, policy: Policy, priority: bool = True) -> Planner:
    """The planner a simulated run drives: layers are trace positions 0..L-1."""
    _, L, k = trace.routing.shape
    E = int(trace.header.get("experts", trace.routing.max() + 1))
    if policy.host_compute and cost.host_s is None:
        raise ValueError(f"policy {policy.name!r} computes on the host but the cost model has no host_s "
                         "(give CostModel.for_gpu a host profile)")
    custom = None
    eviction = policy.eviction
    if eviction == "belady":
        custom = BeladyPolicy(trace.routing)
    elif eviction == "predictive-frequency":  # predictive without recency (for comparison)
        custom = PredictivePolicy({j: j for j in range(L)}, k, E, recency=False)
    elif eviction == "none":
        eviction = "lru"  # the slots only hold a layer's experts while it runs: simulate() drops them after
    elif eviction not in EVICTIONS:
        raise ValueError(f"unknown eviction {eviction!r}: one of {', '.join(EVICTIONS + ('predictive-frequency', 'belady', 'none'))}")
    planner = Planner(max(slots, k), list(range(L)), E, k, cost.costs(), eviction=eviction,
                      host_compute=policy.host_compute, budget_experts=policy.budget_experts, gate=policy.gate,
                      adaptive=policy.adaptive, keep_recency=policy.keep_recency, policy=custom, link=_CountingLink(cost.transfer_s, priority))  # + a copy count, the FIFO option
    return planner


def simulate(trace: Trace, cost: CostModel, slots: int, policy: Policy, priority: bool = True) -> SimResult:
    """Replay `trace` through the planner; priority=True models the runtime's engines (demand first,
    withdrawable prefetches; on CUDA the demand and prefetch streams share the link, which lands a
    demand copy a little earlier than modelled here), False a strictly FIFO link for comparison."""
    routing = trace.routing
    N, L, k = routing.shape
    E = int(trace.header.get("experts", routing.max() + 1))
    K = policy.lookahead
    planner = make_planner(trace, cost, slots, policy, priority)
    link = planner.link
    belady = planner.policy if isinstance(planner.policy, BeladyPolicy) else None
    no_reuse = policy.eviction == "none"
    preds = _predictions(trace, policy, E, k)
    expert_s = cost.expert_s
    pending: dict[int, list[tuple[int, dict[int, float]]]] = defaultdict(list)  # global layer index -> predictions for it
    now = stall = 0.0
    requests = 0
    for t in range(N):
        for i in range(L):
            g = t * L + i
            now += cost.attn_s + cost.plan_s
            if belady is not None:
                belady.position = g
            needed = sorted(set(routing[t, i].tolist()))
            requests += len(needed)
            remaining, first = needed, True
            while remaining:  # as the runtime: rounds until every routed expert has run
                actions = planner.plan_layer(now, i, remaining)
                planner.observe_plan_cost(cost.plan_s if first else 0.0)  # the model's planning time per layer
                if not actions:
                    raise RuntimeError(f"planner made no progress at token {t}, layer {i}")
                if planner.settle() and first:  # as the runtime: once the copies and host jobs are started
                    now += cost.settle_s
                    covered = any(planner.host_free > now if a.kind == "host" else
                                  a.kind != "hit" and not link.landed(a.key, now) for a in actions)
                    if cost.settle_s and not covered:
                        planner.observe_plan_cost(cost.settle_s)  # nothing in flight covered it
                if first:  # after the layer's own demand copies, as the runtime plans prefetches
                    first = False
                    used = set(needed)
                    for d, sc in pending.pop(g, ()):
                        planner.observe_prediction(d, sc, used)
                    if preds is not None:
                        offered = []
                        missing, top, values = preds[0][t][i], preds[1][t][i], preds[2][t][i]
                        for d in range(1, K + 1):
                            if missing[d - 1]:
                                continue
                            sc = dict(zip(top[d - 1], values[d - 1]))
                            offered.append(((i + d) % L, d, sc))
                            if g + d < N * L:  # a layer past the trace's end never runs
                                pending[g + d].append((d, sc))
                        ran = bool(offered) and planner.worth_predicting(now)  # as the runtime asks, before predicting
                        if ran:
                            for target, d, sc in offered:  # the top-k's cached others, for eviction
                                planner.steer_eviction(target, d, sc)
                            sent = planner.plan_prefetch(now, i, offered, {(i, e) for e in needed}, asked=True)
                            now += cost.predict_s + cost.copy_s * len(sent)
                            planner.observe_predict_cost(cost.predict_s)
                        else:
                            if offered:
                                planner.counters.prediction_skipped += 1
                            planner.plan_prefetch(now, i, [], set())  # the evidence still ages
                            now += cost.prefetch_layer_s
                # the device computes its experts as their bytes land (landed ones first, as the
                # runtime does), while the host computes its own
                device_end = now
                for ready in sorted(now if a.kind == "hit" else link.ready.get(a.key, now)
                                    for a in actions if a.kind != "host"):
                    device_end = max(device_end, ready) + expert_s
                work = sum(a.kind != "host" for a in actions) * expert_s
                on_host = any(a.kind == "host" for a in actions)
                # the keeps of host-computed misses are decided and started once the device's work is done,
                # while the host's goes on (as the runtime does): their hand-offs cost the layer only past
                # the host's end
                keeps = len(planner.take_keeps(device_end))
                keep_end = device_end + cost.copy_s * keeps
                if keeps:  # as the runtime times them: the part past the host's results
                    planner.observe_keep_cost(max(0.0, keep_end - max(device_end, planner.host_free)))
                # fixed costs of this round's copies and host jobs: paid on the compute thread after the
                # work they hand off (the CPU backend's wake-ups and hand-offs), so they add, not overlap
                overhead = cost.copy_s * sum(a.kind == "copy" for a in actions) \
                    + cost.host_job_s * sum(a.kind == "host" for a in actions)
                end = max(device_end, planner.host_free if on_host else now)
                stall += end - now - work  # waiting for copies, or for the host's share
                end = max(end, keep_end) + overhead
                now = end
                planner.release(actions)
                if no_reuse:
                    for a in actions:
                        planner.remove(a.key)
                granted = {a.key[1] for a in actions}
                remaining = [e for e in remaining if e not in granted]
        now += cost.tail_s / cost.layer_scale
    c = planner.counters
    scale = cost.layer_scale
    return SimResult(policy.name, slots, N, now * scale, stall * scale, requests, c.hits + c.waits,
                     int(link.copies * cost.expert_bytes * scale), c.prefetch_issued, c.prefetch_wasted,
                     host_computed=c.host, prefetch_gated=c.prefetch_gated, late=c.waits)


def min_transfers(routing: np.ndarray, slots: int, bypass: bool = False) -> int:
    """The fewest experts any policy must bring in (or, with `bypass`, bring in or compute without a
    slot) to serve `routing` with `slots` slots: Belady's MIN over the requests in order, which no
    prefetching policy can beat on fetch count. Requests of one layer are treated one after another,
    which only loosens the bound (a real layer also needs its experts resident together).
    bypass: a miss may leave the cache alone (host compute); MIN then skips caching the requested
    expert when it is the one needed farthest in the future."""
    N, L, _ = routing.shape
    seq = [(i, e) for t in range(N) for i in range(L) for e in sorted(set(routing[t, i].tolist()))]
    nxt = [math.inf] * len(seq)
    last: dict = {}
    for p in range(len(seq) - 1, -1, -1):
        nxt[p] = last.get(seq[p], math.inf)
        last[seq[p]] = p
    cache: dict = {}  # key -> position of its next request
    faults = 0
    for p, key in enumerate(seq):
        if key in cache:
            cache[key] = nxt[p]
            continue
        faults += 1
        if len(cache) >= slots:
            far = max(cache, key=cache.__getitem__)
            if bypass and cache[far] <= nxt[p]:
                continue  # the requested expert is the one needed last: compute it without a slot
            del cache[far]
        cache[key] = nxt[p]
    return faults


def synthetic_trace(L: int, E: int, k: int, tokens: int, seed: int = 0, repeat: float = 0.3) -> Trace:
    """A synthetic trace: routing [tokens, L, k] with per-layer Zipf popularity and `repeat` of each
    token's experts kept from the previous token (routing that sticks across tokens); next-gate-like scores for distances 1, 2 (the truth's experts scored higher)."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, E + 1)
    pop = np.stack([rng.permutation(1.0 / ranks) for _ in range(L)])
    pop /= pop.sum(1, keepdims=True)  # [L, E]
    routing = np.zeros((tokens, L, k), dtype=np.int64)
    for t in range(tokens):
        for i in range(L):
            keep = [e for e in routing[t - 1, i] if rng.random() < repeat] if t else []
            p = pop[i].copy()
            p[keep] = 0.0
            fresh = rng.choice(E, k - len(keep), replace=False, p=p / p.sum())
            routing[t, i] = np.array(keep + list(fresh))
    scores = rng.random((tokens, L, 2, E)).astype(np.float32) * 0.5
    for t in range(tokens):
        for i in range(L):
            for d in (1, 2):
                if i + d < L:
                    scores[t, i, d - 1, routing[t, i + d]] += 0.5
                else:
                    scores[t, i, d - 1] = np.nan
    scores /= np.nansum(scores, -1, keepdims=True)
    return Trace(routing, [tokens], {"next-gate": scores}, {"experts": E, "top_k": k, "layers": L, "lookahead": 2})


def physical_bound(trace: Trace, cost: CostModel, slots: int, host_compute: bool = False) -> SimResult:
    """A lower bound on time for any policy: the device's own work, the link's and the host's are each
    serial, and the fewest fetches come from Belady's MIN (min_transfers).

    Copy only: max(device compute, MIN copies x transfer_s). With host compute (cost.host_s), a split of
    h misses to the host and c copies must still cover MIN-with-bypass faults (c + h >= M_b; c >= M when
    h = 0), and the time is at least max(device compute - h x expert_s, c x transfer_s, h x host_s),
    minimised over h."""
    routing = trace.routing
    N, L, k = routing.shape
    n = max(slots, k)
    requests = sum(len(set(routing[t, i].tolist())) for t in range(N) for i in range(L))
    device = N * (L * cost.attn_s + cost.tail_s / cost.layer_scale) + cost.expert_s * requests
    copies = min_transfers(routing, n)
    seconds, host, name = max(device, copies * cost.transfer_s), 0, "physical bound, copy only"
    if host_compute:
        if cost.host_s is None:
            raise ValueError("a host-compute bound needs CostModel.host_s")
        name = "physical bound, host compute"
        faults = min_transfers(routing, n, bypass=True)
        h = np.arange(1, faults + 1)
        times = np.maximum.reduce([device - h * cost.expert_s, (faults - h) * cost.transfer_s, h * cost.host_s])
        best = int(np.argmin(times))
        if times[best] < seconds:
            seconds, host, copies = float(times[best]), int(h[best]), int(faults - h[best])
    s = cost.layer_scale
    return SimResult(name, slots, N, seconds * s, 0.0, requests, requests - copies - host,
                     int(copies * cost.expert_bytes * s), host_computed=host)


def standard_policies(predictors: list[str], max_lookahead: int = 4, host_compute: bool = False) -> list[Policy]:
    """The comparison set: peers' approaches (ungated: they prefetch whatever they predict), the
    previous design (ungated LFU), ours through the planner (predictive eviction, gated prefetch),
    the oracle; with host_compute also the rows that may compute misses on the host."""
    out = [Policy("on-demand, no reuse (HF accelerate)", eviction="none"),
           Policy("LRU, no prefetch (mixtral-offloading code)"),
           Policy("LFU, no prefetch", eviction="lfu")]
    if host_compute:
        out.append(Policy("LFU, no prefetch, host compute (Fiddler-like)", eviction="lfu", host_compute=True))
    out.append(Policy("LRU + next-gate K=1 (mixtral-offloading paper)", "next-gate", 1, gate=False))
    if "history" in predictors:
        out.append(Policy("history + LFU (MoE-Infinity-like)", "history", 1, eviction="lfu", gate=False))
    for p in predictors:
        for K in range(1, max_lookahead + 1):
            out.append(Policy(f"ungated: {p} K={K}, LFU", p, K, eviction="lfu", gate=False))
    for p in predictors:
        for K in range(1, max_lookahead + 1):
            out.append(Policy(f"ours: {p} K={K}, predictive eviction, gated", p, K, eviction="predictive"))
    if host_compute:
        for p in predictors:
            for K in range(1, max_lookahead + 1):
                out.append(Policy(f"ours: {p} K={K}, predictive eviction, gated, host compute", p, K,
                                  eviction="predictive", host_compute=True))
    out.append(Policy(f"oracle prediction + Belady, K={max_lookahead}", "oracle", max_lookahead, eviction="belady",
                      adaptive=False))
    if host_compute:
        out.append(Policy(f"oracle prediction + Belady, K={max_lookahead}, host compute", "oracle", max_lookahead,
                          eviction="belady", host_compute=True, adaptive=False))
    return out
