"""Trace-driven simulator: replay recorded routing under a cost model and a policy.

One decode step = for each MoE layer: attention (attn_s), then the routed experts, each available
once its copy has landed, then their compute (expert_s each); after the layer's own demand copies
are queued, the policy's predictor queues prefetches for the next K layers. One link, one expert
takes transfer_s; demand copies overtake queued prefetches and an evicted expert's queued copy is
withdrawn, as both of the runtime's transfer engines do (priority=False: a FIFO link, for comparison). Slots are managed with the
runtime's own ExpertCache and eviction policies, plus Belady (farthest next use) for the bound.
"""
from __future__ import annotations

import bisect
import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import CacheFullError, EvictionPolicy, ExpertCache, make_policy

PROFILES = Path(__file__).resolve().parent / "profiles"
BYTES_PER_PARAM = {"fp16": 2.0, "int8": 1.0 + 1 / 64, "int4": 0.5 + 1 / 64}


def load_profiles(kind: str) -> dict:
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

    @classmethod
    def for_gpu(cls, hw: dict, shape: dict, dtype: str, trace_layers: int) -> "CostModel":
        """Batch-1 decode is memory-bound: time = bytes read / device bandwidth (+ launch overhead)."""
        bpp = BYTES_PER_PARAM[dtype]
        bw = hw["mem_gbps"] * 1e9
        expert_bytes = int(shape["expert_params"] * bpp)
        return cls(attn_s=shape["dense_params_per_layer"] * 2 / bw + hw["layer_overhead_us"] * 1e-6,  # attention weights stay fp16
                   expert_s=expert_bytes / bw, transfer_s=expert_bytes / (hw["h2d_gbps"] * 1e9),
                   expert_bytes=expert_bytes, tail_s=shape["other_dense_params"] * 2 / bw / 2,  # lm_head only (embedding is a gather)
                   layer_scale=shape["moe_layers"] / trace_layers)


@dataclass(frozen=True)
class Policy:
    name: str
    predictor: str | None = None  # a score array in the trace, "oracle", or None
    lookahead: int = 0
    eviction: str = "lru"         # lru | lfu | belady | none (no reuse: every use is a copy)
    budget_experts: int | None = None  # prefetch bytes in flight, in experts (None: top-k, the runtime's default)


@dataclass
class SimResult:
    policy: str
    slots: int
    tokens: int
    seconds: float
    stall_seconds: float
    requests: int
    hits: int
    bytes_moved: int
    prefetch_issued: int = 0
    prefetch_wasted: int = 0

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
                    prefetch_issued=self.prefetch_issued, prefetch_wasted=self.prefetch_wasted)


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
        with np.load(path) as z:
            header = json.loads(str(z["header"]))
            scores = {k[len("scores_"):]: z[k].astype(np.float32) for k in z.files if k.startswith("scores_")}
            return cls(z["routing"].astype(np.int64), [int(x) for x in z["seq_lengths"]], scores, header)

    def save(self, path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp.npz")
        arrays = {f"scores_{k}": v.astype(np.float16) for k, v in self.scores.items()}
        np.savez_compressed(tmp, header=np.array(json.dumps(self.header)), routing=self.routing.astype(np.int16),
                            seq_lengths=np.array(self.seq_lengths), **arrays)
        tmp.replace(path)


class BeladyPolicy(EvictionPolicy):
    """Evict the expert whose next use is farthest in the future (optimal for a known trace)."""

    name = "belady"

    def __init__(self, routing: np.ndarray):
        N, L, _ = routing.shape
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


class Link:
    """One host-to-device link, as the CPU engine runs it: one copy at a time; with `priority`, demand
    copies go ahead of prefetches that have not started, and a queued prefetch can be withdrawn."""

    def __init__(self, transfer_s: float, priority: bool = True):
        self.transfer_s = transfer_s
        self.priority = priority
        self.queue: list[list] = []  # [key, start, end, demand] in link order
        self.ready: dict = {}        # key -> time its bytes have landed

    def _settle(self, now: float) -> None:
        self.queue = [q for q in self.queue if q[2] > now]

    def _reflow(self, now: float, start_at: int) -> None:
        prev_end = self.queue[start_at - 1][2] if start_at > 0 else now
        for q in self.queue[start_at:]:
            q[1] = max(prev_end, now)
            q[2] = q[1] + self.transfer_s
            self.ready[q[0]] = q[2]
            prev_end = q[2]

    def send(self, key, now: float, demand: bool) -> None:
        self._settle(now)
        pos = len(self.queue)
        if demand and self.priority:  # ahead of every prefetch that has not started
            pos = next((j for j, q in enumerate(self.queue) if q[1] > now and not q[3]), pos)
        self.queue.insert(pos, [key, 0.0, 0.0, demand])
        self._reflow(now, pos)

    def cancel(self, key, now: float) -> bool:
        """Withdraw a copy that has not started (the expert was evicted or is needed right away)."""
        if not self.priority:
            return False
        self._settle(now)
        for j, q in enumerate(self.queue):
            if q[0] == key and q[1] > now:
                del self.queue[j]
                self.ready.pop(key, None)
                self._reflow(now, j)
                return True
        return False

    def in_flight(self, now: float) -> int:
        self._settle(now)
        return len(self.queue)


def simulate(trace: Trace, cost: CostModel, slots: int, policy: Policy, priority: bool = True) -> SimResult:
    """Replay `trace`; priority=True models the runtime's engines (demand first, withdrawable prefetches;
    on CUDA the demand and prefetch streams share the link, which lands a demand copy a little earlier
    than modelled here), False a strictly FIFO link for comparison."""
    routing = trace.routing
    N, L, k = routing.shape
    E = int(trace.header.get("experts", routing.max() + 1))
    K = policy.lookahead
    no_reuse = policy.eviction == "none"
    if policy.eviction == "belady":
        evict = BeladyPolicy(routing)
    else:
        evict = make_policy("lru" if no_reuse else policy.eviction)
    cache = ExpertCache(max(slots, k), evict)
    scores = None
    if policy.predictor and K:
        scores = _oracle_scores(routing, E, K) if policy.predictor == "oracle" else trace.scores[policy.predictor]
        if scores.shape[2] < K:
            raise ValueError(f"trace has scores for lookahead {scores.shape[2]}, policy asks {K}")
    budget = (policy.budget_experts or k) * cost.expert_bytes
    attn, expert_s = cost.attn_s, cost.expert_s
    link = Link(cost.transfer_s, priority)
    now = stall = 0.0
    prefetched: set = set()
    requests = hits = copies = issued = wasted = 0

    def evicted(key) -> None:
        nonlocal wasted, copies
        if key is None:
            return
        if link.cancel(key, now):
            copies -= 1
        if key in prefetched:
            prefetched.discard(key)
            wasted += 1

    for t in range(N):
        for i in range(L):
            now += attn
            if isinstance(evict, BeladyPolicy):
                evict.position = t * L + i
            needed = sorted(set(routing[t, i].tolist()))
            pinned = set()
            wanted = {(i, e) for e in needed}  # as the runtime: hits first, and a miss never evicts a needed one
            for e in sorted(needed, key=lambda e: (i, e) not in cache):
                key = (i, e)
                requests += 1
                if not no_reuse and key in cache:
                    hits += 1
                    cache.touch(key)
                    if key in prefetched:
                        prefetched.discard(key)
                        if link.cancel(key, now):  # late and not started: promote to a demand copy
                            link.send(key, now, demand=True)
                else:
                    if not no_reuse:
                        _, ev = cache.insert(key, protected=wanted)
                        evicted(ev)
                    link.send(key, now, demand=True)
                    copies += 1
                pinned.add(key)
            if scores is not None:  # prefetch after this layer's demand copies, nearest layer first
                planned = set(pinned)
                for d in range(1, K + 1):
                    s = scores[t, i, d - 1]
                    if np.isnan(s).all():
                        continue
                    j = (i + d) % L
                    for e in np.argsort(-s, kind="stable")[:k].tolist():
                        key = (j, e)
                        if key in cache:
                            cache.touch(key)
                        elif (link.in_flight(now) + 1) * cost.expert_bytes <= budget:
                            try:
                                _, ev = cache.insert(key, protected=planned)
                            except CacheFullError:
                                continue
                            evicted(ev)
                            link.send(key, now, demand=False)
                            copies += 1
                            prefetched.add(key)
                            issued += 1
                        planned.add(key)
            t_ready = max((link.ready.get(key, 0.0) for key in pinned), default=now)
            if t_ready > now:
                stall += t_ready - now
                now = t_ready
            now += len(needed) * expert_s
        now += cost.tail_s / cost.layer_scale
    scale = cost.layer_scale
    return SimResult(policy.name, slots, N, now * scale, stall * scale, requests, hits,
                     int(copies * cost.expert_bytes * scale), issued, wasted)


def physical_bound(trace: Trace, cost: CostModel, slots: int) -> SimResult:
    """max(compute, minimum copies x transfer time): Belady misses with no prefetch, fully overlapped."""
    belady = simulate(trace, cost, slots, Policy("belady", eviction="belady"))
    N, L, k = trace.routing.shape
    compute = N * (L * cost.attn_s + cost.tail_s / cost.layer_scale) + cost.expert_s * sum(
        len(set(trace.routing[t, i].tolist())) for t in range(N) for i in range(L))
    copies = belady.requests - belady.hits
    seconds = max(compute, copies * cost.transfer_s) * cost.layer_scale
    return SimResult("physical bound", slots, N, seconds, 0.0, belady.requests, belady.hits,
                     int(copies * cost.expert_bytes * cost.layer_scale))


def standard_policies(predictors: list[str], max_lookahead: int = 4) -> list[Policy]:
    """The comparison set: peers' approaches, ours per predictor and K, and the oracle."""
    out = [Policy("on-demand, no reuse (HF accelerate)", eviction="none"),
           Policy("LRU, no prefetch (mixtral-offloading code)"),
           Policy("LFU, no prefetch", eviction="lfu"),
           Policy("LRU + next-gate K=1 (mixtral-offloading paper)", "next-gate", 1)]
    if "history" in predictors:
        out.append(Policy("history + LFU (MoE-Infinity-like)", "history", 1, eviction="lfu"))
    for p in predictors:
        for K in range(1, max_lookahead + 1):
            out.append(Policy(f"ours: {p} K={K}, LFU", p, K, eviction="lfu"))
    out.append(Policy(f"oracle prediction + Belady, K={max_lookahead}", "oracle", max_lookahead, eviction="belady"))
    return out
