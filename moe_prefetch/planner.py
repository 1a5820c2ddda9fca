"""Planner: for each MoE layer, what runs where, what moves and what stays. Pure Python, no tensors.

The runtime (offloader.py, moe_block.py) and the simulator (sim.py) both execute its decisions, so
the two cannot drift. It knows nothing of model families: keys are (layer, expert) pairs.

Three speeds decide everything (Costs): the device computing an expert, the link moving one, and the
host computing one. For the executing layer every routed expert becomes one action:
  hit    its bytes are in a slot;
  wait   its copy is in flight and lands before the host could compute it;
  copy   a demand copy into a slot (evicting by policy, never an expert this layer needs);
  host   computed on the host from the store, when that finishes before a copy would land and the
         device computed it (Fiddler's rule; host compute is opt-in);
and after it, predictions for later layers (and the next token's first layers) become prefetches only
when they pay: P(used) x time saved > link time taken from demand copies + the value of the evicted
expert. P comes from the predictor's score through an online calibration table (Calibration), so
raw router probabilities, history frequencies and an oracle's 0/1 all mean the same thing.
Eviction may use the same predictions (PredictivePolicy): the expert least likely to be used soon,
per layer distance, goes first, an approximation of Belady's farthest-next-use. On a layer where no
prefetch could start (a saturated link), a prediction is still made, while that pays, to steer
eviction (steer_eviction): a predicted layer's cached experts outside its top-k share a calibrated P,
so the ones it passes over go first. There what a prediction is worth is which experts stay, not which
copies start early.
Time is whatever clock the caller passes as `now` (the runtime's wall clock, the simulator's model).
"""
from __future__ import annotations

import bisect
import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

from .cache import (CacheFullError, EvictionPolicy, Evictable, ExpertCache, LFUPolicy, LRUPolicy, ShadowHostLRU,
                    ShadowLFU, ShadowLRU, fewest_uses, fewest_uses_ref, make_policy, push_uses)
from .switch import EvictionSwitch, KeepLedger, PredictionSwitch

Key = tuple[int, int]


@dataclass(frozen=True)
class Costs:
    """Seconds. host_s None: no host compute."""

    layer_s: float          # device: one MoE layer's resident work (attention, norms, router), batch 1
    expert_s: float         # device: one expert applied to one token
    transfer_s: float       # link: one expert
    host_s: float | None = None  # host: one expert applied to one token (reads the whole expert: memory-bound)

    def layer_time(self, top_k: int) -> float:
        return self.layer_s + top_k * self.expert_s

    def host_time(self, rows: int) -> float:
        return math.inf if self.host_s is None else self.host_s * max(rows, 1)


class Link:
    """One host-to-device link as both transfer engines run it: one copy at a time; demand copies go
    ahead of prefetches that have not started; a queued copy can be withdrawn. Tracks when each key's
    bytes land (exact in the simulator, an estimate in the runtime)."""

    def __init__(self, transfer_s: float, priority: bool = True):
        self.transfer_s = transfer_s
        self.priority = priority
        self.queue: list[list] = []  # [key, start, end, demand] in link order
        self.ready: dict = {}        # key -> time its bytes land

    def _settle(self, now: float) -> None:
        self.queue = [q for q in self.queue if q[2] > now]

    def _reflow(self, now: float, start_at: int) -> None:
        prev_end = self.queue[start_at - 1][2] if start_at > 0 else now
        for q in self.queue[start_at:]:
            q[1] = max(prev_end, now)
            q[2] = q[1] + self.transfer_s
            self.ready[q[0]] = q[2]
            prev_end = q[2]

    def _demand_position(self, now: float) -> int:
        if not self.priority:
            return len(self.queue)
        return next((j for j, q in enumerate(self.queue) if q[1] > now and not q[3]), len(self.queue))

    def send(self, key, now: float, demand: bool) -> float:
        """Queue a copy; returns when it lands."""
        self._settle(now)
        pos = self._demand_position(now) if demand else len(self.queue)
        self.queue.insert(pos, [key, 0.0, 0.0, demand])
        self._reflow(now, pos)
        return self.ready[key]

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

    def demand_eta(self, now: float) -> float:
        """When a demand copy queued now would land."""
        self._settle(now)
        pos = self._demand_position(now)
        start = max(now, self.queue[pos - 1][2]) if pos else now
        return start + self.transfer_s

    def prefetch_eta(self, now: float) -> float:
        """When a prefetch queued now would land (behind everything queued)."""
        self._settle(now)
        return max(now, self.queue[-1][2] if self.queue else now) + self.transfer_s

    def in_flight(self, now: float) -> int:
        self._settle(now)
        return len(self.queue)

    def landed(self, key, now: float) -> bool:
        return self.ready.get(key, -math.inf) <= now


class Calibration:
    """Online reliability table: raw predictor score -> probability the expert is then used.

    Per distance d, scores fall in BINS equal bins; each bin keeps (uses, predictions) plus a prior of
    `prior_weight` pseudo-observations at min(1, top_k x score) (a router probability of 1/top_k
    already makes top-k membership likely). Updated every time a predicted layer runs."""

    BINS = 10

    def __init__(self, top_k: int, prior_weight: float = 2.0):
        self.top_k = top_k
        self.w = prior_weight
        # (d, bin) -> [uses, predictions seen, sum of the P given]: one lookup per score (the planner asks
        # for every candidate of every distance, K x top-k a layer: a whole token ahead, hundreds)
        self.cells: dict[tuple[int, int], list[float]] = {}

    def _bin(self, score: float) -> int:
        b = int(score * self.BINS)
        return 0 if b < 0 else (self.BINS - 1 if b >= self.BINS else b)

    def prior(self, score: float) -> float:
        return min(1.0, max(0.0, self.top_k * score))

    def p(self, d: int, score: float) -> float:
        cell = self.cells.get((d, self._bin(score)))
        uses, seen = (cell[0], cell[1]) if cell is not None else (0.0, 0.0)
        return (uses + self.w * self.prior(score)) / (seen + self.w)

    def update(self, d: int, score: float, used: bool) -> None:
        self.update_all(d, {0: score}, (0,) if used else ())

    def update_all(self, d: int, scores: dict[int, float], used) -> None:
        """update() for every (expert, score) of one distance, `used` the experts the layer then used
        (the same arithmetic inline: a whole token ahead this is hundreds of scores per layer)."""
        cells, w, k, bins = self.cells, self.w, self.top_k, self.BINS
        for e, score in scores.items():
            b = int(score * bins)
            if b < 0:
                b = 0
            elif b >= bins:
                b = bins - 1
            cell = cells.get((d, b))
            if cell is None:
                cell = cells[d, b] = [0.0, 0.0, 0.0]
            prior = k * score  # prior(), clamped to [0, 1] without two builtin calls per score
            if prior > 1.0:
                prior = 1.0
            elif prior < 0.0:
                prior = 0.0
            cell[2] += (cell[0] + w * prior) / (cell[1] + w)
            cell[1] += 1
            if e in used:
                cell[0] += 1.0

    def report(self) -> dict[str, dict]:
        """Per distance: predictions seen, mean calibrated P, observed use rate, expected calibration error."""
        out = {}
        for d in sorted({d for d, _ in self.cells}):
            cells = [c for (dd, _), c in self.cells.items() if dd == d and c[1]]
            n = sum(c[1] for c in cells)
            out[str(d)] = dict(n=int(n), mean_p=sum(c[2] for c in cells) / n, used=sum(c[0] for c in cells) / n,
                               ece=sum(abs(c[2] - c[0]) for c in cells) / n)
        return out


class SteerCalibration:
    """P(used at its layer's next run) for a cached expert of a predicted layer outside the prediction's
    top-k, per distance d: (uses + PRIOR x base) / (seen + PRIOR), base the share of a layer's experts
    a run uses (top_k / experts). One rate per distance, not per score: outside the top-k a router's
    scores are small and close together, and one rate lets a layer's whole cached rest take it at once
    (PredictivePolicy.set_rest), at no cost per expert, so steering costs a few operations per predicted
    layer on a 128-expert model as on an 8-expert one. Updated when the predicted layer runs, from the
    counts of its cached experts outside the top-k and how many of them it used."""

    PRIOR = 2.0

    def __init__(self, base: float):
        self.base = base
        self.cells: dict[int, list[int]] = {}  # d -> [uses, seen]

    def p(self, d: int) -> float:
        cell = self.cells.get(d)
        uses, seen = (cell[0], cell[1]) if cell is not None else (0, 0)
        return (uses + self.PRIOR * self.base) / (seen + self.PRIOR)

    def update(self, d: int, uses: int, seen: int) -> None:
        cell = self.cells.setdefault(d, [0, 0])
        cell[0] += uses
        cell[1] += seen

    def report(self) -> dict[str, dict]:
        """Per distance: cached experts outside the predicted top-k seen, and how often they were then used."""
        return {str(d): dict(n=seen, used=uses / seen) for d, (uses, seen) in sorted(self.cells.items()) if seen}


class _Predictions(dict):
    """key -> calibrated P, telling its owner which key's entry changed (the planner writes it directly)."""

    def __init__(self, changed):
        super().__init__()
        self._changed = changed

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed(key)

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed(key)

    def pop(self, key, *default):
        had = key in self
        value = super().pop(key, *default)
        if had:
            self._changed(key)
        return value

    def update(self, *args, **kw):
        for key, value in dict(*args, **kw).items():
            self[key] = value

    def clear(self):
        keys = list(self)
        super().clear()
        for key in keys:
            self._changed(key)


class PredictivePolicy(LRUPolicy):
    """Belady's rule with estimated next uses: evict the expert expected to be needed last.

    A key of layer j comes up again in dist(j) layers and then every L layers (one token); if it is
    used at each of its layer's runs with probability p, its expected next use is
    dist + L x (1 - p) / p layers away. p is the planner's latest calibrated prediction for the key
    when there is one, blended with what its layer's history says: its frequency share f among the
    layer's routed uses (counted for every use, host-computed ones included, and kept across
    evictions), recalibrated by how recently it was used. That recalibration is learnt online per
    layer and recency bucket (experts used at the layer's last run, at each of the GAPS - 2 runs before
    it, earlier, or never): a least-squares line P = a + b f fitted to what each run then used, pulled
    towards P = f by PRIOR pseudo-observations. Stickiness adds to frequency (a just-used rare expert
    returns about as often as a just-used popular one), so a line fits where a factor on f would not:
    where routing sticks from one token to the next, the recent buckets get a > 0 and the rule leans
    towards LRU; where it does not, every line tends to P = f and the rule is frequency's (LFU's). Ties
    go to the least recently used.

    Within a layer, experts last used at the same run share a line whose slope is kept positive, so
    those without a prediction rank by their use count alone: each layer keeps a heap of
    (uses, stamp, key) per such group (GAPS + 1 of them at most), and a victim costs a few candidates
    per layer plus the layer's predicted keys, not a pass over the cache (thousands of slots on a 64- or
    128-expert model). Each layer's best key of all (pinned and protected ones included) is kept from
    one victim to the next until something of that layer changes (a use, an insert, a touch, an
    eviction, a run starting, a prediction); while it may be evicted it is the layer's answer for any
    candidates, so a victim usually re-examines only the layers the last plan touched. Heap entries
    are renewed lazily, once per changed key when its layer is next read. The layers' best keys wait in
    one more heap, by when each would next be needed (its layer's next run, counted in positions
    advanced, plus h): a victim looks at layers latest first and stops at the first that cannot beat the
    best candidate found, so it costs a few layers, not a pass over all of them (32 to 48 on Mixtral,
    DeepSeek or Qwen3 shapes). A layer holding at most SCAN_MAX experts (any layer of an 8-expert model)
    finds its best by a pass over them instead of its heaps: the same answer, for less there. A cache
    of at most FLAT_MAX experts keeps each layer's experts ranked instead (_victim_flat), re-ranked only
    when that layer changes. victim_ref() is the plain scan every path must agree with, ties included.

    A switchable policy (eviction "auto": the planner's EvictionSwitch decides) can also evict by use
    count alone, LFU's rule, from a lazy heap of (uses, stamp, key) kept alongside, or by LRU's rule from
    its recency order (set_rule: under either, the recency fits and the rankings are not kept, so
    planning costs about what that policy's does; uses are still counted into the recency groups, so
    the predictive rule finds them when it comes back). While it
    evicts by its own rule it counts what that rule gains over LFU's: each victim is set against the one
    LFU's rule would have picked, and whichever of the two is used first tells which choice saved a miss
    (ghost_wins: the predictive rule's, LFU's; a pair not yet told apart is dropped when its kept key is
    evicted too, or its evicted key comes back, before either is used). That comparison needs the uses
    heap kept, which costs about a tenth more planning on large caches, so the switch asks for it
    (ghosting) only where misses run on the host (elsewhere shadow caches count what LFU's rule would
    hit), and there on fewer epochs once the predictive rule is clearly worth its cost.

    A predicted layer's cached experts without a prediction of their own (outside its top-k) may also
    share one P from the prediction (set_rest, by Planner.steer_eviction), blended half and half with
    each one's history as a prediction is: one number per layer, so a victim costs what it did, and
    within a recency group the order by use count still holds (the blend is increasing in frequency).
    What that steering is worth is counted the same way as the rules' gains (judging, which the planner
    turns on where predictions may steer eviction): one victim in JUDGE_STRIDE (or in one per JUDGE_KEYS
    keys of the steered layers, where those are more) is set against the one this rule would have picked
    without it (_unsteered_victim: one more victim search and a pass over the steered layers' keys), each
    pair then weighing the victims it stands for, and whichever of the two is used first tells whether
    steering saved a miss or cost one (steer_wins)."""

    name = "predictive"
    P_MIN, P_MAX = 1e-3, 1.0  # use_probability's clamp
    # recency buckets: used 1, 2, ... GAPS - 1 runs ago, GAPS or more runs ago (OLD), never. Trained routing
    # remembers more than one token: on a second trained model (8 layers, Python code) the chance of an
    # expert's use falls from 0.36 one token after its last use to 0.31, 0.25, 0.23, 0.22 at 2-5 tokens
    # and 0.13 at 16. Simulated over 4096 tokens, 6 buckets instead of 2 (the last run and the rest)
    # gained 7% and 15% at 50 and 75% cache there (link 11.2, 6-13% with host compute), within 1-2% on
    # the demo's trace and on synthetic ones; 9 or 17 buckets, log-spaced, within 1-2% of 6
    GAPS = 6
    OLD, NEVER = "old", "never"

    def __init__(self, positions: dict[int, int], top_k: int, num_experts: int | None = None, recency: bool = True,
                 slots: int | None = None, switchable: bool = False):
        super().__init__()
        self.switchable = switchable
        self.rule = "predictive"     # switchable: which rule evicts, one of RULES (set_rule)
        self._cheap = False          # the rule is LFU's or LRU's: the predictive rule's fits and rankings are not kept
        self.ghosting = switchable   # switchable: each victim compared with LFU's (set_rule)
        self._keeping_uses = switchable  # the uses heap is kept: LFU's rule or ghosting
        self._by_uses: list = []     # (uses, stamp, key) of resident keys, lazily renewed (fewest_uses)
        self._choice = None          # switchable: (the victim, LFU's victim) of the last victim() where they differ
        self._ghost_out: dict = {}   # evicted by this rule -> the resident key LFU's rule would have evicted instead
        self._ghost_kept: dict = {}  # that resident key -> the evicted one
        self.ghost_wins = [0, 0]     # pairs told apart: [this rule's choice saved a miss, LFU's would have]
        self.judging = False         # set by the planner: victims compared with the rule's own without steering
        self._rest: dict = {}        # layer -> P for its cached experts without a prediction, from steering (set_rest)
        self._judge_tick = 0
        # (the victim, the victim without steering, weight) of the last judged victim() where they differ
        self._steer_choice = None
        self._steer_out: dict = {}   # evicted with steering -> (the key the rule would have evicted without it, weight)
        self._steer_kept: dict = {}  # that resident key -> the evicted one
        self.steer_wins = [0.0, 0.0]  # judged pairs told apart, weighted: [steering saved a miss, it caused one]
        # slots: the cache's size where known. One of at most FLAT_MAX experts never walks the heaps
        # (victim() ranks each layer instead), so their bookkeeping is not kept
        self._heaped = slots is None or slots > self.FLAT_MAX
        self.recency = recency      # False: P = f in every bucket (frequency alone, the rule before recency)
        self.positions = positions  # layer id -> position in execution order
        self.n = len(positions)
        self.top_k = top_k
        self.num_experts = num_experts  # per layer (None: unknown, the never-used bucket keeps P = f)
        self._position = 0          # the executing layer's position (the `position` property)
        self._layer_at = {i: layer for layer, i in positions.items()}
        self._g = 0                 # positions advanced so far: g + a layer's distance is its next run's index
        self.uses: Counter = Counter()
        self.layer_uses: Counter = Counter()
        self._predicted_of: dict = defaultdict(set)   # layer -> its keys in `predicted`
        self.predicted: dict = _Predictions(self._changed)  # key -> calibrated P of use at its next run
        self._picks: dict = {}                     # layer -> (h, stamp, key) of its groups' best (or None), while nothing of it changed
        self._unpicked: set = set()                # layers whose pick changed since victim() last looked
        self._ranks: dict = {}                     # layer -> its resident keys' _scored() entries, sorted (small caches)
        self._unranked: set = set()                # layers changed since _victim_flat() last ranked them
        # max-heap of the layers' picks by when their key would next be needed, g + distance + h, as
        # (-(A + h), stamp, layer, A, pick) with A the layer's next run; an entry holds while its pick is
        # the layer's pick and its A the layer's next run (the others are dropped as they surface): a
        # new pick is queued when victim() finds it, and a layer the position passes is requeued
        self._by_next_use: list = []
        self._runs: Counter = Counter()            # layer -> runs started
        self._last: dict = {}                      # key -> the run of its layer it was last used at
        self._recent: dict = defaultdict(dict)     # layer -> {run: keys last used then}, the last GAPS - 1 runs
        self._ever: Counter = Counter()            # layer -> experts used at least once
        # (layer, bucket) -> [n, sum f, sum f^2, sum y, sum f y] over the bucket's experts at each run start:
        # f its frequency then, y whether that run used it (the least-squares fit of y = a + b f)
        self._fit: dict = defaultdict(lambda: [0, 0.0, 0.0, 0, 0.0])
        self._lines: dict = defaultdict(dict)      # layer -> {(layer, bucket): its fitted (a, b)}, until the fit changes
        self._sq: Counter = Counter()              # layer -> sum of (uses + 0.5)^2 over its experts ever used
        self._heaps: dict = defaultdict(dict)      # layer -> {group: [(uses, stamp, key)]}, stale entries lazily dropped
        self._resident: dict = defaultdict(set)    # layer -> its resident keys
        self._pushed: Counter = Counter()          # layer -> entries pushed since its heaps were rebuilt
        self._dirty: dict = defaultdict(set)       # layer -> resident keys whose heap entry is out of date

    @property
    def position(self) -> int:
        return self._position

    @position.setter
    def position(self, p: int) -> None:
        """The layers passed (the new one included) are next needed a token later: their picks are requeued."""
        steps = (p - self._position) % self.n if self.n else 0
        old, self._g, self._position = self._position, self._g + steps, p
        for i in range(1, steps + 1):
            layer = self._layer_at[(old + i) % self.n]
            entry = self._picks.get(layer)
            if entry is not None:
                a = self._next_run(layer)
                heapq.heappush(self._by_next_use, (-(a + entry[0]), entry[1], layer, a, entry))

    def _unpick(self, layer, rerank: bool = True) -> None:
        """Something of `layer` changed: its best key is found again when a victim is next asked for.
        rerank False: the others' P did not move, so the layer's ranking holds (_rank_one, _victim_flat)."""
        self._picks.pop(layer, None)
        self._unpicked.add(layer)
        if rerank:
            self._unranked.add(layer)

    # ---- recency groups ----------------------------------------------------------------------
    def _group(self, key):
        """A recent run id, OLD or NEVER: the experts of one group share their recency line."""
        last = self._last.get(key)
        if last is None:
            return self.NEVER
        return self.OLD if self._runs[key[0]] - last >= self.GAPS else last

    def _bucket(self, layer, group):
        return group if group in (self.OLD, self.NEVER) else self._runs[layer] - group

    PRIOR = 4.0      # pseudo-observations pulling each bucket's line towards P = frequency
    SLOPE_MIN = 0.05  # keeps P rising with uses within a bucket, so a heap by uses orders it

    def recency_line(self, key) -> tuple[float, float]:
        """(a, b): P(used at the next run) = a + b x frequency, for experts last used as long ago as `key`."""
        return self._line((key[0], self._bucket(key[0], self._group(key))))

    def _line(self, bucket) -> tuple[float, float]:
        if not self.recency:
            return 0.0, 1.0
        lines = self._lines[bucket[0]]
        line = lines.get(bucket)
        if line is None:
            line = lines[bucket] = self._solve(bucket)
        return line

    def _solve(self, bucket) -> tuple[float, float]:
        n, sf, sff, sy, sfy = self._fit[bucket] if bucket in self._fit else (0, 0.0, 0.0, 0, 0.0)
        a11, a12, a22 = n + self.PRIOR, sf, sff + self.PRIOR  # ridge towards a = 0, b = 1
        b1, b2 = sy, sfy + self.PRIOR
        slope = max(self.SLOPE_MIN, (a11 * b2 - a12 * b1) / (a11 * a22 - a12 * a12))
        a = (b1 - a12 * slope) / a11
        if a < 0.0:  # through the origin instead: a negative intercept would clamp the rarest experts' P
            a, slope = 0.0, max(self.SLOPE_MIN, b2 / a22)  # to P_MIN, where only a scan can tell them apart
        return a, slope

    def start_run(self, layer, experts, record: bool = False) -> None:
        """A run of `layer` starts and will use `experts` (ids): add what it uses to each recency bucket's
        fit, then move those experts to the newest group; record: also count their uses (record_use() for
        each, in the same pass). (Every layer runs it: lookups hoisted.) Evicting by frequency, the fits
        are left as they are: they learn from the runs the predictive rule sees."""
        keys = {(layer, e) for e in experts}
        if self._steer_out:
            self._tell_steer(keys)
        if self.switchable:
            self._tell_ghosts(keys)
            if self._cheap:  # the fits are left alone
                self._move_to_newest(layer, keys, record)
                return
        self._unpick(layer)
        runs, uses, last_of, fits = self._runs, self.uses, self._last, self._fit
        r = runs[layer]
        self._lines.pop(layer, None)  # every bucket of the layer gets new observations: re-solved when asked
        layer_uses, ever = self.layer_uses[layer], self._ever[layer]
        t1 = layer_uses / self.top_k + 1.0
        recent = self._recent[layer]
        n_recent = u_recent = 0
        q_recent = 0.0
        for run, members in recent.items():  # the recent buckets, expert by expert (a few)
            fit = fits[layer, r - run]
            for key in members:
                u = uses[key] + 0.5
                f = u / t1
                fit[0] += 1
                fit[1] += f
                fit[2] += f * f
                if key in keys:
                    fit[3] += 1
                    fit[4] += f
                u_recent += u
                q_recent += u * u
            n_recent += len(members)
        # the older experts and the never used, from their layer's totals (no pass over the experts)
        fit = fits[layer, self.OLD]
        fit[0] += ever - n_recent
        fit[1] += (layer_uses + 0.5 * ever - u_recent) / t1
        fit[2] += (self._sq[layer] - q_recent) / (t1 * t1)
        never = fits[layer, self.NEVER]
        counted_never = self.num_experts is not None
        if counted_never:
            n_never = self.num_experts - ever
            never[0] += n_never
            never[1] += 0.5 * n_never / t1
            never[2] += 0.25 * n_never / (t1 * t1)
        for key in keys:  # what this run uses of the never used and the OLD group (the recent ones: above)
            last = last_of.get(key)
            if last is None:  # never used: counted where the layer's experts are known
                if counted_never:
                    never[3] += 1
                    never[4] += (uses[key] + 0.5) / t1
            elif r - last >= self.GAPS:
                fit[3] += 1
                fit[4] += (uses[key] + 0.5) / t1
        aged = self._move_to_newest(layer, keys, record)
        if self._heaped:
            if aged is not None:
                self._heaps[layer].pop(r + 1 - self.GAPS, None)
                keys = aged | keys
            stamps = self._stamp
            self._dirty[layer].update([key for key in keys if key in stamps])  # their heap entries, renewed lazily

    def _move_to_newest(self, layer, keys, record: bool):
        """The run's `keys` join the layer's newest recency group (and its ever-used totals); record: their
        uses are counted too (record_use()'s bookkeeping). Returns the group that aged into OLD, if any."""
        runs, uses, last_of, recent = self._runs, self.uses, self._last, self._recent[layer]
        r = runs[layer]
        for key in keys:
            last = last_of.get(key)
            if last is None:
                self._ever[layer] += 1
                self._sq[layer] += (uses[key] + 0.5) ** 2
            elif last in recent:
                recent[last].discard(key)
            last_of[key] = r
            if record:  # (u + 1.5)^2 - (u + 0.5)^2 added, as the key is in _last now
                self._sq[layer] += 2.0 * uses[key] + 2.0
                uses[key] += 1
        if record:
            self.layer_uses[layer] += len(keys)
            if self._keeping_uses:
                self._renew_uses(keys)
        recent[r] = keys
        runs[layer] = r + 1
        return recent.pop(r + 1 - self.GAPS, None)  # now GAPS runs ago: that group joins OLD

    # ---- which rule evicts (a switchable policy) ------------------------------------------------
    def _renew_uses(self, keys) -> None:
        """The resident `keys`' uses or stamps changed: their current entries join the uses heap."""
        stamps, uses = self._stamp, self.uses
        for key in keys:
            if key in stamps:
                self._by_uses = push_uses(self._by_uses, uses, stamps, key)

    RULES = ("predictive", "lfu", "lru")

    def set_rule(self, rule: str, ghosting: bool = True) -> None:
        """Evict by `rule`: "predictive" (this policy's own), "lfu" (use count alone, ties to the least
        recently used) or "lru"; under the predictive rule, compare each victim with LFU's (ghosting) or
        not. The uses heap is kept only while LFU's rule or the comparison needs it (rebuilt from the
        resident keys when it is needed again). Leaving the predictive rule, its layers' picks are dropped
        (nothing keeps them current meanwhile); coming back, every layer is ranked and its heaps are
        rebuilt afresh."""
        assert self.switchable, "a policy built without switchable=True has one rule"
        assert rule in self.RULES, f"unknown eviction rule {rule!r}"
        keeping = rule == "lfu" or (ghosting and rule == "predictive")
        if keeping and not self._keeping_uses:
            self._by_uses = [(self.uses[k], stamp, k) for k, stamp in self._stamp.items()]
            heapq.heapify(self._by_uses)
        elif not keeping:
            self._by_uses = []
        self._keeping_uses, self.ghosting = keeping, ghosting
        self._choice = None
        if rule == self.rule:
            return
        cheap, self.rule = self._cheap, rule
        self._cheap = rule != "predictive"
        if self._cheap and not cheap:  # the position setter would otherwise requeue the stale picks every layer
            self._picks.clear()
            self._by_next_use.clear()
        elif cheap and not self._cheap:  # (no picks are kept meanwhile: every layer holding experts is found afresh)
            for layer, keys in self._resident.items():
                self._unpick(layer)
                if self._heaped:
                    self._heaps.pop(layer, None)
                    self._pushed[layer] = 0
                    self._dirty[layer] = set(keys)

    def _frequency_victim(self, candidates):
        found, self._by_uses = fewest_uses(self._by_uses, self.uses, self._stamp, candidates)
        if found is None:
            raise CacheFullError("no evictable expert")
        return found

    def _tell_ghosts(self, keys) -> None:
        """`keys` are used now: a pair whose kept key comes first is this rule's win, one whose evicted
        key comes first LFU's."""
        kept, out, wins = self._ghost_kept, self._ghost_out, self.ghost_wins
        for key in keys:
            if key in kept:
                partner = kept.pop(key)
                del out[partner]
                if partner not in keys:  # both used at once: a miss either way, a tie
                    wins[0] += 1
            elif key in out:
                partner = out.pop(key)
                del kept[partner]
                if partner not in keys:
                    wins[1] += 1

    @staticmethod
    def _drop_ghost(key, role: dict, other: dict) -> None:
        partner = role.pop(key, None)
        if partner is not None:
            del other[partner]

    # ---- eviction state ----------------------------------------------------------------------
    def _changed(self, key) -> None:
        """`key`'s prediction was set or dropped."""
        self._unpick(key[0])
        if key in self.predicted:
            self._predicted_of[key[0]].add(key)
        else:
            self._predicted_of[key[0]].discard(key)

    def drop_predictions(self, layer) -> None:
        """`layer` runs now: its predictions are consumed (its own keys only, not a pass over every
        prediction: a whole token ahead those are thousands)."""
        keys = self._predicted_of.pop(layer, None)
        rest = self._rest.pop(layer, None)
        if keys:
            for key in keys:
                dict.__delitem__(self.predicted, key)  # _changed()'s bookkeeping, done here for the layer at once
        if keys or rest is not None:
            self._unpick(layer)

    REST_TOL = 0.02  # a steered P that moves less is left as it is (its layer is not ranked again for it)

    def set_rest(self, layer, p: float) -> None:
        """`layer`'s cached experts without a prediction are used at its next run with probability p (a
        steering prediction: Planner.steer_eviction), until that run; blended with each one's history.
        A change below REST_TOL keeps the last one: a token ahead, each layer is steered from every layer
        before it, and re-ranking it each time dominated planning on large shapes (with the judge's bound,
        from 1.25 to 0.88 s for a 32-token replay a token ahead on DeepSeek-V2-Lite's shape)."""
        old = self._rest.get(layer)
        if old is None or abs(old - p) >= self.REST_TOL:
            self._rest[layer] = p
            self._unpick(layer)

    def _push(self, key, rerank: bool = True) -> None:
        """`key`'s uses, stamp or group changed: its heap entry is renewed when its layer's heaps are next
        read (a hit changes all three in one plan, so this pushes once, not three times). rerank False:
        only its stamp changed or it came in, and the layer's ranking takes its new entry (_rank_one)."""
        layer = key[0]
        self._unpick(layer, rerank)
        if not rerank:
            self._rank_one(key)
        if self._heaped:
            self._dirty[layer].add(key)

    def _rank_one(self, key) -> None:
        """`key` came in or was touched, nothing else of its layer changed: its entry joins the layer's
        ranking where it belongs (its old one, with its old stamp, is skipped as stale), so a layer that
        gains experts after its first victim is not ranked again for its next."""
        layer = key[0]
        ranked = self._ranks.get(layer)
        if ranked is None or layer in self._unranked:
            self._unranked.add(layer)  # ranked afresh when next needed
            return
        p = self.use_probability(key)
        bisect.insort(ranked, (-(self.n * (1.0 - p) / p), self._stamp[key], key))

    def _flush(self, layer) -> None:
        """Push the layer's changed resident keys' current entries (older ones are stale and dropped as
        they surface), or rebuild its heaps when they are mostly stale."""
        dirty = self._dirty.pop(layer, None)
        if not dirty:
            return
        heaps, resident = self._heaps[layer], self._resident[layer]
        self._pushed[layer] += len(dirty)
        if self._pushed[layer] > 4 * len(resident) + 16:  # mostly stale: rebuild
            self._pushed[layer] = len(resident)
            heaps.clear()
            for k in resident:
                heaps.setdefault(self._group(k), []).append((self.uses[k], self._stamp[k], k))
            for h in heaps.values():
                heapq.heapify(h)
            return
        for key in dirty:
            if key in resident:
                heapq.heappush(heaps.setdefault(self._group(key), []), (self.uses[key], self._stamp[key], key))

    def on_insert(self, key):
        super().on_insert(key)
        self._resident[key[0]].add(key)
        if key in self._steer_out:  # back before either was used
            del self._steer_kept[self._steer_out.pop(key)[0]]
        if self.switchable:
            if self._keeping_uses:
                self._by_uses = push_uses(self._by_uses, self.uses, self._stamp, key)
            self._drop_ghost(key, self._ghost_out, self._ghost_kept)  # back before either was used
            if self._cheap:
                return
        self._push(key, rerank=False)

    def on_access(self, key):
        super().on_access(key)
        if self._keeping_uses:
            self._by_uses = push_uses(self._by_uses, self.uses, self._stamp, key)
        if self._cheap:
            return
        self._push(key, rerank=False)

    def on_remove(self, key):
        super().on_remove(key)
        self._resident[key[0]].discard(key)
        choice, self._steer_choice = self._steer_choice, None
        out, kept = self._steer_out, self._steer_kept
        if key in kept:  # evicted too before either was used
            del out[kept.pop(key)]
        if choice is not None and choice[0] == key:  # the judged victim goes: a pair to tell apart
            victim, other, weight = choice
            if other in kept:
                del out[kept.pop(other)]
            out[victim], kept[other] = (other, weight), victim
        if self.switchable:
            self._drop_ghost(key, self._ghost_kept, self._ghost_out)  # evicted too before either was used
            choice, self._choice = self._choice, None
            if choice is not None and choice[0] == key:  # the last victim found goes: a pair to tell apart
                self._drop_ghost(key, self._ghost_out, self._ghost_kept)
                self._drop_ghost(choice[1], self._ghost_kept, self._ghost_out)
                self._ghost_out[key], self._ghost_kept[choice[1]] = choice[1], key
            if self._cheap:
                return
        self._unpick(key[0], rerank=False)  # _victim_flat() skips a key no longer resident

    def record_use(self, key) -> None:
        if key in self._last:
            self._sq[key[0]] += 2.0 * self.uses[key] + 2.0  # (u + 1.5)^2 - (u + 0.5)^2
        self.uses[key] += 1
        self.layer_uses[key[0]] += 1
        if self.switchable:
            self._tell_ghosts((key,))
            if self._keeping_uses:
                self._renew_uses((key,))
            if self._cheap:
                return
        self._unpick(key[0])  # its layer's frequencies all moved
        if key in self._stamp:
            self._push(key)

    def _frequency(self, key) -> float:
        tokens = self.layer_uses[key[0]] / self.top_k  # runs of its layer seen so far
        return (self.uses[key] + 0.5) / (tokens + 1.0)  # smoothed: a new expert is not worthless

    def _history(self, key) -> float:
        a, b = self.recency_line(key)
        return a + b * self._frequency(key)

    def use_probability(self, key, recency: bool = True) -> float:
        """P(key is used at its layer's next run); recency False: from its frequency alone."""
        history = self._history(key) if recency else self._frequency(key)
        if key in self.predicted:
            p = 0.5 * self.predicted[key] + 0.5 * history
        else:
            rest = self._rest.get(key[0])
            p = history if rest is None else 0.5 * rest + 0.5 * history
        return min(self.P_MAX, max(p, self.P_MIN))

    def next_use(self, key) -> float:
        """Expected layers until the key is used again."""
        dist = (self.positions[key[0]] - self.position) % self.n or self.n
        p = self.use_probability(key)
        return dist + self.n * (1.0 - p) / p

    def _layer_best(self, layer, candidates):
        """(h, stamp, key) of the layer's key expected to be needed last, among `candidates` (None: any
        resident key), h = L x (1 - p) / p its next use beyond its layer's distance, ties to the least
        recently used; None if there is none. Of the keys without a prediction, per recency group only
        the one with the fewest uses can be it (a group shares its line, whose slope is positive), unless
        P clamps, where every key of the group ties with it; the keys with a prediction are each looked at.
        One function, its lookups hoisted: it runs for every layer a plan changed. A layer holding at most
        SCAN_MAX experts is scanned instead (_layer_scan, the same answer), which costs less there."""
        if len(self._resident[layer]) <= self.SCAN_MAX:
            return self._layer_scan(layer, candidates)
        self._flush(layer)
        n, stamps, uses, predicted = self.n, self._stamp, self.uses, self.predicted
        last_of, run, gaps, old, never = self._last, self._runs[layer], self.GAPS, self.OLD, self.NEVER
        t1 = self.layer_uses[layer] / self.top_k + 1.0
        p_min, p_max = self.P_MIN, self.P_MAX
        rest = self._rest.get(layer)
        best = None
        heaps = self._heaps[layer]
        for group, heap in list(heaps.items()):
            # the group's key without a prediction and with the fewest uses (the oldest of those)
            aside, key = [], None
            while heap:
                u, stamp, k = heap[0]
                last = last_of.get(k)
                if (stamps.get(k) != stamp or uses[k] != u
                        or group != (never if last is None else (old if run - last >= gaps else last))):
                    heapq.heappop(heap)  # stale: used, touched, moved or evicted since
                elif k in predicted or (candidates is not None and k not in candidates):
                    aside.append(heapq.heappop(heap))
                else:
                    key = k
                    break
            for entry in aside:
                heapq.heappush(heap, entry)
            if key is None:
                if not heap:
                    del heaps[group]
                continue
            a, slope = self._line((layer, group if group in (old, never) else run - group))
            p = a + slope * ((uses[key] + 0.5) / t1)
            if rest is not None:
                p = 0.5 * rest + 0.5 * p
            if p_min < p < p_max:
                h, s = n * (1.0 - p) / p, stamps[key]
                if best is None or h > best[0] or (h == best[0] and s < best[1]):
                    best = (h, s, key)
                continue
            # clamped: keys with more uses clamp to the same P and tie with it; the oldest of them goes
            for k in self._resident[layer]:
                if self._group(k) == group and k not in predicted and (candidates is None or k in candidates):
                    p = self.use_probability(k)
                    h, s = n * (1.0 - p) / p, stamps[k]
                    if best is None or h > best[0] or (h == best[0] and s < best[1]):
                        best = (h, s, k)
        for k in self._predicted_of.get(layer, ()):
            if k in stamps and (candidates is None or k in candidates):
                p = self.use_probability(k)
                h, s = n * (1.0 - p) / p, stamps[k]
                if best is None or h > best[0] or (h == best[0] and s < best[1]):
                    best = (h, s, k)
        return best

    SCAN_MAX = 8  # resident experts of a layer up to which a plain scan finds its best faster than the heaps

    def _layer_scan(self, layer, candidates):
        """_layer_best() by a pass over the layer's resident keys (_scored): the definition the heaps
        shortcut, for a layer with few experts in the cache (8-expert models), where a few
        multiplications per key cost less than keeping and walking a heap per recency group. Its keys'
        heap entries are renewed when the heaps are next walked (_flush), so the two paths mix."""
        best = min((e for e in self._scored(layer) if candidates is None or e[2] in candidates), default=None)
        return None if best is None else (-best[0], best[1], best[2])

    def _scored(self, layer, steered: bool = True) -> list:
        """The layer's resident keys as (-h, stamp, key), h = L x (1 - p) / p their next use beyond their
        layer's distance, each key's P as use_probability() gives it (its recency group's line at its
        frequency, blended with its prediction or the layer's steered P, clamped), with the lookups hoisted
        out of the pass: the smallest entry is the layer's best victim, ties to the least recently used.
        steered False: the layer's steered P set aside (_unsteered_victim)."""
        n, stamps, uses, predicted = self.n, self._stamp, self.uses, self.predicted
        last_of, run, gaps, old, never = self._last, self._runs[layer], self.GAPS, self.OLD, self.NEVER
        t1 = self.layer_uses[layer] / self.top_k + 1.0
        p_min, p_max = self.P_MIN, self.P_MAX
        rest = self._rest.get(layer) if steered else None
        lines = {}
        scored = []
        for k in self._resident[layer]:
            last = last_of.get(k)
            group = never if last is None else (old if run - last >= gaps else last)
            line = lines.get(group)
            if line is None:
                line = lines[group] = self._line((layer, group if group in (old, never) else run - group))
            p = line[0] + line[1] * ((uses[k] + 0.5) / t1)
            if k in predicted:
                p = 0.5 * predicted[k] + 0.5 * p
            elif rest is not None:
                p = 0.5 * rest + 0.5 * p
            p = p_max if p > p_max else (p_min if p < p_min else p)
            scored.append((-(n * (1.0 - p) / p), stamps[k], k))
        return scored

    TOL = 1e-6  # layers: a heap key's rounding (A + h in floats) is far below it

    def _next_run(self, layer) -> int:
        """The index (in positions advanced, as g) of `layer`'s next run."""
        return self._g + ((self.positions[layer] - self._position) % self.n or self.n)

    def _refresh(self) -> None:
        """Find the best key of each layer that changed, and queue it by when it would next be needed."""
        heap = self._by_next_use
        for layer in self._unpicked:
            if not self._resident[layer]:
                self._heaps.pop(layer, None)
                continue
            entry = self._picks[layer] = self._layer_best(layer, None)  # the layer's best of all: holds for any candidates it is in
            if entry is not None:
                a = self._next_run(layer)
                heapq.heappush(heap, (-(a + entry[0]), entry[1], layer, a, entry))
        self._unpicked.clear()
        if len(heap) > 4 * len(self._picks) + 64:  # mostly stale: rebuilt from the live picks
            heap[:] = [(-(a + entry[0]), entry[1], layer, a, entry) for layer, entry in self._picks.items()
                       if entry is not None for a in (self._next_run(layer),)]
            heapq.heapify(heap)

    FLAT_MAX = 64  # resident experts up to which victim() walks each layer's ranking (_victim_flat) instead of the heaps

    def victim(self, candidates):
        """The key to evict among `candidates`: by this policy's rule, or by LFU's or LRU's while a switchable
        policy evicts by one of those. Comparing (ghosting), it notes LFU's choice beside its own, to tell
        later which was right."""
        if self._cheap:
            return self._frequency_victim(candidates) if self.rule == "lfu" else LRUPolicy.victim(self, candidates)
        key = self._predictive_victim(candidates)
        self._observe_victim(key, candidates)
        return key

    def _observe_victim(self, key, candidates) -> None:
        """`key` is this rule's victim among `candidates`: note what it is compared with, LFU's choice
        (ghosting) and, on a judged victim, this rule's choice without steering (judging)."""
        if self.ghosting:
            other = self._frequency_victim(candidates)
            self._choice = (key, other) if other != key else None
        self._steer_choice = None
        if self.judging and self._rest:
            self._judge_tick += 1
            if self._judge_tick >= self.JUDGE_STRIDE:
                # the pass over the steered layers' keys is bounded, amortised: a token ahead on a large
                # model those are most of the cache
                resident = self._resident
                steered_keys = sum(len(resident.get(layer, ())) for layer in self._rest)
                stride = max(self.JUDGE_STRIDE, steered_keys // self.JUDGE_KEYS)
                if self._judge_tick >= stride:
                    self._judge_tick = 0
                    other = self._unsteered_victim(candidates)
                    self._steer_choice = (key, other, stride) if other != key else None

    JUDGE_STRIDE = 2  # victims per one compared with the rule's choice without steering, at least
    JUDGE_KEYS = 64   # steered layers' keys per victim that comparison may pass over, amortised

    def _unsteered_victim(self, candidates):
        """The victim this rule would pick without steering (the layers' steered P set aside): only the
        steered layers rank differently without it, so the best of the others (the fast search, those
        layers skipped) is set against a pass over the steered layers' keys alone (_scored() without their
        steered P; a few layers: those predicted since they last ran), the one needed last, ties to the
        least recently used. As victim_ref() would pick with every steered P dropped (tested)."""
        rest = self._rest
        try:
            best = self._predictive_victim(candidates, skip=rest)
            best_t, best_s = self.next_use(best), self._stamp[best]  # a layer without a steered P: the same
        except CacheFullError:
            best, best_t, best_s = None, -1.0, math.inf
        n, pos, positions = self.n, self._position, self.positions
        for layer in rest:
            if not self._resident.get(layer):
                continue
            dist = (positions[layer] - pos) % n or n
            for neg_h, st, k in self._scored(layer, steered=False):
                if k in candidates:
                    t = dist - neg_h
                    if t > best_t or (t == best_t and st < best_s):
                        best, best_t, best_s = k, t, st
        return best

    def _tell_steer(self, keys) -> None:
        """`keys` are used now: a judged pair whose kept key comes first is a miss steering saved, one whose
        evicted key comes first a miss it caused (each weighing the victims it stands for)."""
        kept, out, wins = self._steer_kept, self._steer_out, self.steer_wins
        for key in keys:
            if key in kept:
                partner = kept.pop(key)
                weight = out.pop(partner)[1]
                if partner not in keys:  # both used at once: a miss either way
                    wins[0] += weight
            elif key in out:
                partner, weight = out.pop(key)
                del kept[partner]
                if partner not in keys:
                    wins[1] += weight

    def _predictive_victim(self, candidates, skip=()):
        """The layers are looked at by when their best key would next be needed, latest first, until no
        layer left can beat the best candidate found: usually one or two layers, not all of them. A
        layer's best key that may not be evicted now gives way to its best among the candidates, which
        is needed no later. A cache of at most FLAT_MAX experts is scanned instead (_victim_flat).
        skip: layers left out (_unsteered_victim looks at those itself)."""
        if not self._heaped or len(self._stamp) <= self.FLAT_MAX:
            return self._victim_flat(candidates, skip)
        self._refresh()
        heap, picks = self._by_next_use, self._picks
        g, tol = self._g, self.TOL
        best, best_t, best_s = None, -1.0, math.inf
        looked = []
        while heap:
            neg, stamp, layer, a, entry = heap[0]
            if picks.get(layer) is not entry:
                heapq.heappop(heap)  # stale: the layer's pick changed since
                continue
            if a != self._next_run(layer):
                heapq.heappop(heap)  # queued before its run came round: the position setter requeued it
                continue
            if best is not None and -neg - g < best_t - tol:
                break  # no layer left is needed later than the best candidate found
            looked.append(heapq.heappop(heap))
            if layer in skip:
                continue
            if entry[2] not in candidates:
                entry = self._layer_best(layer, candidates)  # for these candidates only
                if entry is None:
                    continue
            t = (a - g) + entry[0]
            if t > best_t or (t == best_t and entry[1] < best_s):
                best, best_t, best_s = entry[2], t, entry[1]
        for item in looked:
            heapq.heappush(heap, item)
        if best is None:
            raise CacheFullError("no evictable expert")
        return best

    def _victim_flat(self, candidates, skip=()):
        """victim() for a small cache (tens of slots: an 8-expert model), where the per-layer picks and
        their heap cost more to keep and walk than the layers are to rank: each layer's resident keys
        are ranked once (_scored, sorted) and kept until something of the layer changes, so a victim re-ranks the
        one or two layers the last plan touched and takes, per layer, its first key that may be evicted,
        then the one needed last of those (its layer's distance plus h). With the run's uses counted
        before its first victim (start_run(record=True)), a victim re-ranks about one layer, not two or
        three. In the simulator's replay of the demo's trace (12-36 slots) planning fell 7-15% per
        layer; on Mixtral's and DeepSeek-V2-Lite's shapes (64-832 slots) the two ways tie within noise,
        as a victim here walks every layer where the heaps stop after a few."""
        ranks, stale = self._ranks, self._unranked
        for layer in stale:
            ranks[layer] = sorted(self._scored(layer))
        stale.clear()
        if isinstance(candidates, Evictable):  # every ranked key is resident: only pins and protection to check
            pins, protected = candidates._cache._pins, candidates._protected
            allowed = None
        else:
            pins, protected, allowed = (), (), candidates
        n, pos, positions = self.n, self._position, self.positions
        best, best_t, best_s = None, -1.0, math.inf
        stamps = self._stamp
        for layer, ranked in ranks.items():
            if layer in skip:
                continue
            for neg_h, s, k in ranked:
                if stamps.get(k) != s:
                    continue  # evicted or touched since: stale (a key back in has an entry with its new stamp)
                if (k in allowed) if allowed is not None else (k not in pins and k not in protected):
                    t = ((positions[layer] - pos) % n or n) - neg_h
                    if t > best_t or (t == best_t and s < best_s):
                        best, best_t, best_s = k, t, s
                    break
        if best is None:
            raise CacheFullError("no evictable expert")
        return best

    def victim_ref(self, candidates):
        """The definition: a pass over every resident key, oldest first (under LFU's rule: the fewest uses;
        under LRU's: the oldest stamp)."""
        if self.rule == "lfu":
            return fewest_uses_ref(self._order, self.uses, candidates)
        if self.rule == "lru":
            return min((k for k in self._order if k in candidates), key=self._stamp.__getitem__)
        best, best_t = None, -1.0
        for key in self._order:  # oldest first: ties go to LRU
            if key in candidates:
                t = self.next_use(key)
                if t > best_t:
                    best, best_t = key, t
        if best is None:
            raise CacheFullError("no evictable expert")
        return best


EVICTIONS = ("lru", "lfu", "predictive", "auto")


class Action(NamedTuple):
    """One decision (immutable; a named tuple, built in a few hundred ns: several per layer)."""

    kind: str            # hit | wait | copy | host | prefetch
    key: Key
    slot: int | None = None
    evicted: Key | None = None
    rows: int = 1


@dataclass
class PlanCounters:
    hits: int = 0
    waits: int = 0
    copies: int = 0
    host: int = 0
    keeps: int = 0              # host-computed misses also copied in while the link was idle
    prefetch_issued: int = 0
    prefetch_gated: int = 0      # refused by the benefit test
    prefetch_budget: int = 0     # refused by the bytes-in-flight cap
    prediction_skipped: int = 0  # layers where no prefetch could be issued nor eviction steered, so nothing was predicted
    prefetch_used: int = 0
    prefetch_wasted: int = 0


class Planner:
    """One planner per offloaded model (or simulated run).

    layers: MoE layer ids in execution order. budget_experts: prefetch copies allowed in flight
    (None: top_k). gate=False issues every predicted prefetch that fits the budget (the old
    behaviour, for comparison). adaptive=False predicts on every layer where a prefetch could be
    issued, whether or not predicting has lately paid (PredictionSwitch). keep_recency: how host-computed
    misses are judged for a keep, True with eviction's recency line, False on frequency alone; None
    (the default): counted by a KeepLedger on the uses where the two rules' keeps differ (predictive
    eviction with its recency line; other policies judge keeps by their own use_probability). eviction
    "auto" (the default): predictive eviction while it pays for its planning, the better of LFU's and
    LRU's rules where it does not
    (EvictionSwitch, priced from the caller's planning times, observe_plan_cost, the policy's ghost wins
    against LFU's victims and a shadow LRU cache's hits). defer: plan_layer leaves the bookkeeping its
    decisions do not read to settle() (the default); False does it first, with the same decisions."""

    def __init__(self, n_slots: int, layers: list[int], num_experts: int, top_k: int, costs: Costs,
                 eviction: str = "auto", host_compute: bool = False, budget_experts: int | None = None,
                 gate: bool = True, policy: EvictionPolicy | None = None, link: Link | None = None,
                 adaptive: bool = True, keep_recency: bool | None = None, defer: bool = True):
        self.layers = list(layers)
        self.positions = {layer: i for i, layer in enumerate(self.layers)}
        self.num_experts, self.top_k = num_experts, top_k
        self.costs = costs
        self._host_enabled = host_compute
        self.host_compute = host_compute and costs.host_s is not None
        self.budget = budget_experts or top_k
        self.gate = gate
        if policy is None:
            policy = PredictivePolicy(self.positions, top_k, num_experts, slots=n_slots, switchable=eviction == "auto") \
                if eviction in ("predictive", "auto") else make_policy(eviction)
        self.policy = policy
        # eviction "auto": the predictive rule while what it saves beats what its planning costs, else LFU's or LRU's
        self.eviction_switch = EvictionSwitch() if getattr(policy, "switchable", False) else None
        # the caches LFU's and LRU's rules would make, fed the same uses where misses are copied in; with host
        # compute, the experts LRU's rule would have landed (its keeps on a link of its own)
        self.shadows = {"lfu": ShadowLFU(n_slots), "lru": ShadowLRU(n_slots)} if self.eviction_switch is not None else {}
        self.cache = ExpertCache(n_slots, policy)
        self.link = link or Link(costs.transfer_s)  # the simulator passes one that also counts copies
        self.host_shadow = None if self.eviction_switch is None else \
            ShadowHostLRU(n_slots, Link(costs.transfer_s, priority=self.link.priority))
        self.calibration = Calibration(top_k)
        # P of use for a cached expert of a predicted layer outside its top-k (steer_eviction)
        self.steer_calibration = SteerCalibration(top_k / num_experts)
        self._steer_pending: dict = defaultdict(list)  # layer -> [(d, the prediction's top-k)] steering its next run
        self._prefetching = True       # worth_predicting()'s answer for prefetches (it may predict for eviction alone)
        self._steering = False         # worth_predicting()'s answer for eviction: this layer's predictions steer it
        # what steering eviction saved (judged victims, net of the misses it caused) per steered layer,
        # decaying sums: below what predicting costs, a layer is predicted for it only on a probe
        self._steer_seen = [0, 0]      # the policy's steer_wins already counted into _steer_value
        self._steer_value = 0.0
        self._steer_layers = 0.0
        self._steer_skipped = 0
        self.prefetched: set = set()   # brought in by prefetch, not yet used
        self.host_free = 0.0           # when the host finishes the expert computations queued on it
        self.demand_pressure = 0.0     # EMA of demand copies per layer
        self.link_traffic = 0.0        # EMA of all copies (demand + prefetch) per layer: link utilisation
        self._sent = 0                 # prefetches sent since the last layer
        self.keeps: list[Action] = []  # background copies of host-computed experts (take_keeps())
        # the last plan_layer's host-computed misses and its run's keys, whose keeps take_keeps() decides
        self._keep_pending: list[Key] = []
        self._keep_needed: set = set()
        self._keep_now = 0.0
        # Realised value of the planner's own prefetches, against the P it expected (decaying sums):
        # a prefetch counts as good when it is used with its bytes landed (with host compute a late
        # one saves nothing; without, half), bad when evicted unused. P is scaled by good / expected,
        # so in a regime where prefetching does not pay the gate closes by itself.
        self._issued_p: dict = {}
        # prefetches issued per layer that was predicted (EMA): a predictor whose output is almost never
        # acted on is not run at all, except one layer in PROBE_EVERY, which keeps the estimate current
        self.prediction_yield = 1.0
        self._skipped_in_a_row = 0
        # What predicting costs the caller per predicted layer (observe_predict_cost: the runtime's measured
        # predictor and planning time; the simulator's model of it), against the net time its prefetches
        # saved per predicted layer (decaying sums over predicted layers): an adaptive planner skips the
        # predictor, but for probes, where it does not pay for itself
        self.predict_cost: float | None = None
        self._predicted = 0.0        # predicted layers (decaying)
        self._predicted_value = 0.0  # seconds saved by the prefetches of those layers, waste deducted (decaying)
        # with host compute, a miss is not copied in, so a later hit of an expert a prediction brought in is a
        # host job saved too (where routing sticks, most of what prefetching gains), unless a keep would have
        # copied it in after its miss: counted in the share of time the link is busy (keeps wait for an idle one)
        self._reused: set = set()
        self._expected = 0.0
        self._good = 0.0
        # the same per distance: {d: [expected, good, the age tick they were last brought up to]}, aged
        # lazily (0.999 per tick, as the two above), so that ageing stays one step whatever the lookahead
        self._by_distance: dict[int, list] = {}
        self._ticks = 0
        # adaptive: predict only while it measurably speeds decode up (PredictionSwitch); ungated: the
        # peers' behaviour, always predicting
        self.switch = PredictionSwitch() if gate and adaptive else None
        # with host compute and predictive eviction: keeps judged with recency only while the uses where the
        # two rules' keeps differ say it pays (KeepLedger), unless keep_recency fixes the rule; other
        # policies have no recency line
        self._keep_recency = keep_recency
        two_rules = keep_recency is None and host_compute and isinstance(policy, PredictivePolicy) and policy.recency
        self.keep_ledger = KeepLedger() if two_rules else None
        self._taken = 0            # keeps handed to the caller by the last take_keeps() (observe_keep_cost)
        self._virtual_end = 0.0    # when the keeps the rule not running would have made are through the link
        self._layer_seen = None
        self._round_left: set = set()  # experts of the executing layer's run not granted yet (its next round's)
        # wall time per MoE layer as the caller's clock shows it (EMA over decode and prefill layers): with
        # host compute or stalls a layer lasts far longer than its device work, and that is the time a
        # prefetch for d layers ahead has to land in, and the time the link's utilisation is measured over
        self.layer_wall: float | None = None
        self._layer_start: float | None = None
        self.counters = PlanCounters()
        # the last plan_layer's bookkeeping that none of its decisions read (settle()): None when done.
        # defer False: done in plan_layer before its decisions (the same decisions; for comparison)
        self.defer = defer
        self._unsettled: list | None = None
        self._unsettled_shadows: tuple | None = None  # (the run's keys, those the real cache held, when) for the shadows

    # ---- the executing layer ----------------------------------------------------------------
    def set_costs(self, costs: Costs) -> None:
        self.costs = costs
        self.link.transfer_s = costs.transfer_s
        if self.host_shadow is not None:
            self.host_shadow.link.transfer_s = costs.transfer_s
        self.host_compute = self._host_enabled and costs.host_s is not None

    def plan_layer(self, now: float, layer: int, experts: list[int], rows: dict[int, int] | None = None,
                   in_order: bool = False) -> list[Action]:
        """Actions for as many of `experts` (layer's routed experts, pending this round) as can run now:
        every slot this layer holds stays pinned until release(). in_order: grant a prefix only.
        Bookkeeping that none of the plan's decisions read (the run's uses and recency fits, the hits'
        touches, the shadow caches' uses) is left to settle(): the caller does it once the plan's copies and
        host jobs are started, while it waits for them (a victim search does it first)."""
        self.settle()  # the last plan's, where the caller did not
        if isinstance(self.policy, PredictivePolicy):
            self.policy.position = self.positions[layer]
            self.policy.drop_predictions(layer)  # consumed now
        rows = rows or {}
        predictive = isinstance(self.policy, PredictivePolicy)
        # another round of the same run asks for what the last round left; anything else starts a run (a
        # model with one MoE layer runs the same layer at every token)
        new_run = layer != self._layer_seen or not self._round_left.issuperset(experts)
        needed = {(layer, e) for e in experts}
        unsettled = self._unsettled = []
        self._unsettled_shadows = None
        if new_run:
            if predictive and self.policy.steer_wins != self._steer_seen:  # what steering did to eviction
                (won, lost), (won0, lost0) = self.policy.steer_wins, self._steer_seen
                self._steer_seen = list(self.policy.steer_wins)
                self._steer_value += ((won - won0) - (lost - lost0)) * self._miss_cost_and_saturation()[0]
            pending = self._steer_pending.pop(layer, None)
            if pending:  # the first round holds all the run's routed experts; the cache, what it held then, or nearly
                resident = {key[1] for key in self.policy._resident.get(layer, ())} if predictive else set()
                used = resident.intersection(experts)
                for d, chosen in pending:
                    self.steer_calibration.update(d, len(used - chosen), len(resident - chosen))
            if predictive:  # the first round holds all the layer's routed experts: their uses are counted
                # before any victim, so the layer is ranked once; on a token's first layer before the eviction
                # switch reads the rules' evidence, which the run adds to
                if self.positions[layer] == 0 and self.eviction_switch is not None:
                    self.policy.start_run(layer, experts, record=True)
                else:
                    unsettled.append(partial(self.policy.start_run, layer, experts, record=True))
            if self.keep_ledger is not None:  # what the keep rule not running would have changed
                self.keep_ledger.run(layer, needed, now, self.cache.__contains__,
                                     lambda key: self.link.landed(key, now))
            if self._layer_start is not None and 0.0 < now - self._layer_start < PredictionSwitch.MAX_GAP_S:
                gap = now - self._layer_start
                self.layer_wall = gap if self.layer_wall is None else 0.9 * self.layer_wall + 0.1 * gap
            self._layer_start = now
            if self.positions[layer] == 0:
                decode, warm = all(n <= 1 for n in rows.values()), not self.cache.has_free()
                if self.switch is not None:
                    self.switch.token(now, decode, warm=warm)
                if self.eviction_switch is not None:
                    rule = self.eviction_switch.token(decode, warm, self.policy.ghost_wins,
                                                      self._miss_cost_and_saturation()[0],
                                                      shadowed=not self.host_compute)
                    self.policy.set_rule(rule, ghosting=self.eviction_switch.ghost)
                if self.keep_ledger is not None:
                    self.keep_ledger.token(self.costs.host_s)
            if self.eviction_switch is not None:
                self.eviction_switch.layer()
                # what LFU's and LRU's rules would have held; with host compute, what LRU's would have landed,
                # against what the real cache had landed (a use before its copy lands is a host job either way)
                keys = [(layer, e) for e in experts]
                held = None
                if self.eviction_switch.shadowing:
                    held = {key for key in keys if key in self.cache and
                            (not self.host_compute or self.link.landed(key, now))}
                self._unsettled_shadows = (keys, held, now)  # no decision reads them: not even a victim waits
        self._layer_seen = layer
        if not self.defer:
            self.settle()
        actions: list[Action] = []
        copies = 0
        order = experts if in_order else sorted(experts, key=lambda e: (layer, e) not in self.cache)  # hits first
        for e in order:
            key, n = (layer, e), rows.get(e, 1)
            if key in self.cache:
                if self._unsettled is None:
                    self.cache.touch(key)
                else:
                    unsettled.append(partial(self.cache.touch, key))
                self.cache.pin(key)
                landed = self.link.landed(key, now)
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    self.counters.prefetch_used += 1
                    self._outcome(key, 1.0 if landed else (0.0 if self.host_compute else 0.5))
                elif landed and key in self._reused:
                    miss_cost, saturation = self._miss_cost_and_saturation()
                    self._predicted_value += miss_cost * saturation  # on an idle link a keep would have brought it in
                if landed:
                    self.counters.hits += 1
                    actions.append(Action("hit", key, self.cache.lookup(key), rows=n))
                    continue
                if self.link.cancel(key, now):  # a prefetch that has not started: it becomes a demand copy
                    self.link.send(key, now, demand=True)
                eta = self.link.ready.get(key, now)
                if self.host_compute and self._host_done(now, n) < eta + n * self.costs.expert_s:
                    self.cache.unpin(key)  # the copy still lands, for later use
                    actions.append(self._host(now, key, n))
                else:
                    self.counters.waits += 1
                    actions.append(Action("wait", key, self.cache.lookup(key), rows=n))
                continue
            if self.host_compute and self._host_done(now, n) < self.link.demand_eta(now) + n * self.costs.expert_s:
                actions.append(self._host(now, key, n))
                continue
            self._settle_state()  # a victim is chosen on the state the bookkeeping leaves
            try:
                slot, evicted = self.cache.insert(key, protected=needed)
            except CacheFullError:
                if actions:
                    break  # every slot is in use by this layer: the caller runs another round
                slot, evicted = self.cache.insert(key)  # must make progress: a later expert goes
            self._forget(now, evicted)
            self.cache.pin(key)
            self.link.send(key, now, demand=True)
            copies += 1
            self.counters.copies += 1
            actions.append(Action("copy", key, slot, evicted, rows=n))
        self._round_left = set(experts).difference([a.key[1] for a in actions])
        self.demand_pressure = 0.9 * self.demand_pressure + 0.1 * copies
        if new_run:  # once per layer, not per round
            self.link_traffic = 0.9 * self.link_traffic + 0.1 * (copies + self._sent)
            self._sent = 0
        # the keeps of this round's host-computed misses are decided when the caller takes them (take_keeps),
        # while it waits for the host's results, not here on the way to the layer's compute
        self._keep_pending = [a.key for a in actions if a.kind == "host"]
        if self._keep_pending:
            self._keep_needed, self._keep_now = needed, now
        return actions

    def settle(self) -> bool:
        """Do the last plan_layer()'s bookkeeping that none of its decisions read, leaving the state as
        doing it first would have (the run's uses, then its hits' touches, in their order; the shadow
        caches, from what the real cache held at the plan); every other entry point that reads the
        cache's or the policy's state does this first. Returns whether there was any."""
        shadows, self._unsettled_shadows = self._unsettled_shadows, None
        if shadows is not None:
            self._shadow_run(*shadows)
        return self._settle_state() or shadows is not None

    def _settle_state(self) -> bool:
        """The part of settle() that decisions read: the run's uses and fits, the hits' touches."""
        pending, self._unsettled = self._unsettled, None
        if not pending:
            return False
        for step in pending:
            step()
        return True

    def _shadow_run(self, keys: list[Key], real: set[Key] | None, now: float) -> None:
        """A run's `keys` are used at `now`: each shadow cache takes them, after telling the eviction switch
        which of them it and the real cache held (`real`: those the real cache held at the run's start, with
        host compute those it had landed; None while the switch does not count them). With host compute
        only LRU's is fed, its keeps queued on its own link (ShadowHostLRU); LFU's rule is judged on victims."""
        switch = self.eviction_switch
        if self.host_compute:
            won, lost = self.host_shadow.use(keys, now, self.budget, real)
            if won or lost:
                switch.shadow("lru", won, lost)
            return
        for rival, shadow in self.shadows.items():
            won, lost = shadow.use(keys, real)
            if won or lost:
                switch.shadow(rival, won, lost)

    def keeps_use_recency(self) -> bool:
        """Whether keeps are judged with the recency line now (keep_recency, else the KeepLedger's choice)."""
        if getattr(self.policy, "rule", "predictive") != "predictive":
            return False  # LFU's or LRU's rule evicts now (eviction "auto"): keeps are judged on frequency
        if self._keep_recency is not None:
            return self._keep_recency
        return self.keep_ledger is not None and self.keep_ledger.arm

    def _keep(self, now: float, key: Key, needed: set[Key]) -> None:
        """A host-computed miss is also copied in, in the background, when the link is idle and it is
        more likely to be used again than the expert it would evict: host compute must not leave the
        cache cold (otherwise every later use of a popular expert goes to the host as well).
        "More likely" is judged with the recency line eviction uses while the KeepLedger counts that it
        pays (routing that sticks across tokens), else on frequency alone: with recency, nearly every
        host-computed miss beats its victim by a little, and where routing barely sticks such a copy
        gains little and costs its transfer plus, on the CPU backend, the compute thread's time. Where
        the two rules judge it differently the ledger records the pair (_pair_keep)."""
        if key in self.cache or self.link.in_flight(now) >= self.budget:
            return
        victim = None
        if not self.cache.has_free():
            victim = self._victim(needed)
            frequency = not self.keeps_use_recency()
            if victim is False:
                return
            # under LRU's rule the expert just used outranks the least recently used one, always: judged by a
            # probability LRU's policy has none of, no keep ever passed and the cache froze once full (eviction
            # "auto" running LRU's rule keeps as LRU's policy does, the way its shadow counted it)
            if type(self.policy) is not LRUPolicy and getattr(self.policy, "rule", None) != "lru":
                ledger = self.keep_ledger
                pair = ledger is not None and not self.policy._cheap and not ledger.standing(key)
                by_frequency = by_recency = None
                if frequency or pair:
                    by_frequency = self._use_probability(key, keep=True) > self._use_probability(victim, keep=True)
                if not frequency or pair:
                    by_recency = self._use_probability(key) > self._use_probability(victim)
                if pair and by_recency != by_frequency:
                    self._pair_keep(now, key, victim, by_recency)
                if not (by_frequency if frequency else by_recency):
                    return
        slot, evicted = self.cache.insert(key, protected=needed, victim=victim)
        self._forget(now, evicted)
        self.link.send(key, now, demand=False)
        self.prefetched.add(key)
        self._sent += 1
        self.counters.keeps += 1
        self.keeps.append(Action("prefetch", key, slot, evicted))

    def _pair_keep(self, now: float, key: Key, victim: Key, recency: bool) -> None:
        """The keep rules disagree on `key` over `victim`: the ledger records the pair. Where the rule not
        running would keep, its copy goes on a virtual link, the real one's queue plus that rule's own
        keeps: a keep it could not start (its link full) is not one it makes, and one it makes lands when
        that link says."""
        ledger = self.keep_ledger
        kept = recency == ledger.arm
        eta = now
        if not kept:
            t = self.costs.transfer_s
            end = max(self._virtual_end, self.link.prefetch_eta(now) - t, now)
            if end - now > (self.budget - 1) * t:  # budget copies or more in flight there
                return
            eta = self._virtual_end = end + t
        ledger.pair(key, victim, recency, kept=kept, eta=eta)

    def take_keeps(self, now: float | None = None) -> list[Action]:
        """The background copies of the last plan_layer's host-computed misses, decided now (at `now`, by
        default the plan's time), for the caller to start. The runtime asks once the layer's device work is
        done and it would otherwise wait for the host's results: a keep's victim search (with the
        predictive rule, most of a host-computed layer's planning) and, on the CPU backend, its copy's
        hand-off then cost the layer nothing while the host is still busy. Before the run's experts are
        released, as they stay protected; release() decides any the caller has not taken (for its next
        take_keeps())."""
        self._decide_keeps(now)
        keeps, self.keeps = self.keeps, []
        self._taken = len(keeps)
        return keeps

    def _decide_keeps(self, now: float | None = None) -> None:
        self.settle()
        pending, self._keep_pending = self._keep_pending, []
        now = self._keep_now if now is None else max(now, self._keep_now)
        for key in pending:
            self._keep(now, key, self._keep_needed)

    @property
    def keeps_undecided(self) -> bool:
        """The last plan's host-computed misses wait for take_keeps() to decide their keeps."""
        return bool(self._keep_pending)

    def cancel_keeps(self) -> None:
        """Forget the last plan's keeps not yet decided (its actions were never carried out)."""
        self._keep_pending = []

    def layer_period(self) -> float:
        """Seconds from one MoE layer to the next: measured wall time, at least the device's own work."""
        device = self.costs.layer_time(self.top_k)
        return device if self.layer_wall is None else max(device, self.layer_wall)

    def _host_done(self, now: float, rows: int) -> float:
        return max(now, self.host_free) + self.costs.host_time(rows)

    def _host(self, now: float, key: Key, rows: int) -> Action:
        if isinstance(self.policy, LFUPolicy) and key not in self.cache:
            self.policy.count_use(key)  # LFU: a use, though the expert stays out of the cache
        self.host_free = self._host_done(now, rows)
        self.counters.host += 1
        return Action("host", key, rows=rows)

    def release(self, actions: list[Action]) -> None:
        """The layer has finished with the slots it was granted (keeps not taken yet are decided first, for
        the caller's next take_keeps())."""
        self.settle()
        if self._keep_pending:
            self._decide_keeps()
        for a in actions:
            if a.kind in ("hit", "wait", "copy") and self.cache.is_pinned(a.key):
                self.cache.unpin(a.key)

    def remove(self, key: Key) -> None:
        """A copy failed: forget the expert (its slot becomes free)."""
        self.settle()
        if key in self.cache:
            if self.cache.is_pinned(key):
                self.cache.unpin(key)
            self.cache.remove(key)
        self.prefetched.discard(key)
        self._reused.discard(key)

    def _forget(self, now: float, key: Key | None) -> None:
        if key is None:
            return
        self.link.cancel(key, now)
        self._reused.discard(key)
        if key in self.prefetched:
            self.prefetched.discard(key)
            self.counters.prefetch_wasted += 1
            self._outcome(key, 0.0, wasted=True)

    def _outcome(self, key: Key, good: float, wasted: bool = False) -> None:
        issued = self._issued_p.pop(key, None)
        if issued is None:
            return  # a keep, not a prediction
        p, d = issued
        self._expected = 0.98 * self._expected + p
        self._good = 0.98 * self._good + good
        expected, good_d = self._distance_record(d)
        self._by_distance[d] = [0.98 * expected + p, 0.98 * good_d + good, self._ticks]
        # the time it saved (a miss's cost, in the share `good`), less the link time a wasted one took from
        # demand copies: what the gate expected of it, now realised
        miss_cost, saturation = self._miss_cost_and_saturation()
        self._predicted_value += good * miss_cost - (self.costs.transfer_s * saturation if wasted else 0.0)
        if good > 0.0 and self.host_compute:
            self._reused.add(key)

    MIN_PREDICTED = 16  # predicted layers of evidence before the predictor's cost is weighed

    def observe_plan_cost(self, seconds: float) -> None:
        """plan_layer() took `seconds` of the caller's critical path (what the eviction rule is priced on)."""
        if self.eviction_switch is not None:
            self.eviction_switch.plan_time(seconds)

    def observe_keep_cost(self, seconds: float) -> None:
        """Starting the keeps the last take_keeps() handed out took `seconds` of the caller's critical path
        (on the CPU backend the copies themselves, on CUDA their launch; the runtime counts only what ran
        past the host's results): the keep ledger's price of a keep."""
        if self.keep_ledger is not None and self._taken:
            self.keep_ledger.observe_keep(seconds, self._taken)

    def observe_predict_cost(self, seconds: float) -> None:
        """A predicted layer's predictor and prefetch planning took `seconds` of the caller's critical path."""
        self.predict_cost = seconds if self.predict_cost is None else 0.9 * self.predict_cost + 0.1 * seconds

    def prediction_value(self) -> dict:
        """Per predicted layer, lately: what predicting cost and what its prefetches saved (ms); per layer
        predicted to steer eviction, what steering saved (ms, net of the misses it caused, from judged
        victims: steer_wins, saved and caused), and whether the last predicted layer steered; and
        `delivered`, what prefetches delivered per unit of the P they were issued at, the factor the gate
        scales P by (realised()): {"all": ...} and, with host compute, one per distance."""
        self.settle()
        saved = self._predicted_value / self._predicted if self._predicted else None
        delivered = {"all": self._delivered(self._expected, self._good)}
        if self.host_compute:
            delivered.update({str(d): self.realised(d) for d in sorted(self._by_distance)})
        steering = self.steering_value()
        wins = getattr(self.policy, "steer_wins", None)
        return {"cost_ms": None if self.predict_cost is None else self.predict_cost * 1e3,
                "saved_ms": None if saved is None else saved * 1e3, "pays": self.prediction_pays(),
                "steering_saved_ms": None if steering is None else steering * 1e3,
                "steer_wins": None if wins is None else list(wins), "steering": self._steering,
                "delivered": delivered}

    def prediction_pays(self) -> bool:
        """Whether the time prefetches lately saved per predicted layer beats what predicting a layer costs
        (True until there is evidence, or with no measured cost)."""
        if not self.predict_cost or self._predicted < self.MIN_PREDICTED:
            return True
        return self._predicted_value / self._predicted > self.predict_cost

    def realised(self, d: int | None = None) -> float:
        """Good prefetch outcomes per unit of expected P (1 until there is evidence). With host compute, per
        distance d (None: the best distance): there a copy still in flight when its layer starts saves
        nothing, so copies for the next layer or two land late on a slow link while those for the next
        token land in time, and one record for all distances made the late ones close the gate for the
        timely ones (README, "the planner"). Without host compute a late copy still shortens the wait (it
        counts half) and one record serves: per distance, perfect predictions lost 2% there (simulated)."""
        overall = self._delivered(self._expected, self._good)
        if not self.host_compute:
            return overall
        if d is None:
            return max([overall] + [self.realised(d) for d in self._by_distance])
        return self._delivered(*self._distance_record(d))

    @staticmethod
    def _delivered(expected: float, good: float) -> float:
        """Good outcomes per unit of expected P, pulled towards 1 by two pseudo-outcomes (no evidence: 1)."""
        return min(1.0, (good + 2.0) / (expected + 2.0))

    def _distance_record(self, d: int) -> tuple[float, float]:
        """(expected, good) of the prefetches issued `d` layers ahead, aged to now."""
        record = self._by_distance.get(d)
        if record is None:
            return 0.0, 0.0
        fade = 0.999 ** (self._ticks - record[2])
        return record[0] * fade, record[1] * fade

    # ---- ahead of time ------------------------------------------------------------------------
    def observe_prediction(self, d: int, scores: dict[int, float], used: set[int]) -> None:
        """A layer predicted `d` layers earlier has run: calibrate the scores against what it used."""
        self.calibration.update_all(d, scores, used)

    def _miss_cost_and_saturation(self) -> tuple[float, float]:
        c = self.costs
        miss_cost = min(c.transfer_s, c.host_time(1)) if self.host_compute else c.transfer_s
        # How much of the link copies need: at 1 every byte a prefetch moves is taken from them.
        # A used prefetch replaces a demand copy of the same size (no net link time); a wasted one
        # costs its whole transfer, to the extent the link is saturated.
        saturation = min(1.0, self.link_traffic * c.transfer_s / max(self.layer_period(), 1e-12))
        return miss_cost, saturation

    PROBE_EVERY = 16
    MIN_YIELD = 0.1

    def epoch_without_prediction(self) -> bool:
        """The prediction switch runs this epoch without prediction: worth_predicting() says no on every
        layer of it, whatever the link or the evidence."""
        return self.switch is not None and not self.switch.arm

    def steers_eviction(self) -> bool:
        """Whether predictions would rank what eviction keeps: misses are copied in (not host-computed),
        the predictive rule evicts (eviction "auto" may be running LFU's or LRU's) and the cache is full.
        With host compute a miss costs the host's time rather than a copy, and in simulation even
        perfect predictions a token ahead did not reliably pay there (0.96-1.04 of eviction without
        them on the demo's trace, with a first version of steering), so there they act only through
        prefetches, as before."""
        self.settle()
        return (not self.host_compute and isinstance(self.policy, PredictivePolicy) and not self.policy._cheap
                and not self.cache.has_free())

    def worth_predicting(self, now: float, in_flight: int | None = None) -> bool:
        """Is a prediction worth making now? False in an epoch the prediction switch runs without
        prediction. Else True if a prefetch could be issued: not when copies in flight fill the budget,
        when even a certain prediction would not pass the gate, or when predictions have lately yielded
        almost no prefetches or (adaptive) saved less time per predicted layer than predicting one costs
        (but for a probe now and then); or if predictions may steer eviction (_steering_verdict()). The
        runtime skips the predictor's compute where it says no. Whether the prediction may start
        prefetches, and whether it steers eviction, is kept for plan_prefetch() and steer_eviction()."""
        self.settle()
        if self.epoch_without_prediction():
            self._prefetching = self._steering = False
            return False  # an epoch without prediction (measured, or the faster arm lately)
        structural = self.steers_eviction()
        if isinstance(self.policy, PredictivePolicy):
            self.policy.judging = structural  # what steering does to its victims is counted (steer_wins)
        self._prefetching = self._worth_prefetching(now, in_flight)
        # a layer predicted for its prefetches does not steer: where prefetching pays, a prefetch brings
        # a needed expert back anyway, and steering's changes to what the cache holds and to the victims
        # the gate prices cost more than they saved (simulated with noisy predictors at link ratio 1: up
        # to 9% slower than prefetching alone). A steered layer may still start a copy that passes the
        # gate (its predictor runs anyway); forbidding that cost up to 7% (bench/steering.py's rows).
        self._steering = structural and not self._prefetching and self._steering_verdict()
        if self._steering:
            self._prefetching = self._could_prefetch(now, in_flight)
            self._steer_layers = 0.98 * self._steer_layers + 1.0
            self._steer_value *= 0.98
        return self._prefetching or self._steering

    def steering_now(self) -> bool:
        """Whether the layer worth_predicting() last said yes to steers eviction (steer_eviction acts)."""
        return self._steering

    MIN_STEERED = 8  # steered layers (decaying) before steering's ledger decides

    def _steering_verdict(self) -> bool:
        """Whether a layer whose prediction starts no copy is predicted to steer eviction
        (worth_predicting()): while steering's net value per steered layer (judged victims,
        steering_value()) is unknown or beats what predicting a layer costs; else on a probe, one such
        layer in PROBE_EVERY, which keeps the ledger current. Always without adaptation."""
        if self.switch is None:
            return True
        value = self.steering_value()
        if value is None or value > (self.predict_cost or 0.0):
            return True
        self._steer_skipped += 1
        if self._steer_skipped < self.PROBE_EVERY:
            return False
        self._steer_skipped = 0
        return True

    def steering_value(self) -> float | None:
        """Seconds of misses that steering eviction lately saved, net, per steered layer (None: too few
        steered layers yet)."""
        if self._steer_layers < self.MIN_STEERED:
            return None
        return self._steer_value / self._steer_layers

    def _worth_prefetching(self, now: float, in_flight: int | None) -> bool:
        """Could a prefetch be issued now, and has prefetching lately paid for predicting (worth_predicting())?"""
        if max(self.link.in_flight(now), in_flight or 0) >= self.budget:
            return False
        if not self.gate:
            return True
        if self.prediction_yield < self.MIN_YIELD or (self.switch is not None and not self.prediction_pays()):
            self._skipped_in_a_row += 1
            if self._skipped_in_a_row < self.PROBE_EVERY:
                return False
            self._skipped_in_a_row = 0
        return self._gate_open()

    def _could_prefetch(self, now: float, in_flight: int | None) -> bool:
        """Could a prefetch be issued now (room in the budget and the gate open), whatever prefetches
        saved lately (a layer predicted to steer eviction: its predictor runs anyway)?"""
        if max(self.link.in_flight(now), in_flight or 0) >= self.budget:
            return False
        return not self.gate or self._gate_open()

    def _gate_open(self) -> bool:
        """Would even a certain prediction pass the gate, at what prefetches lately delivered?"""
        q = self.realised()
        miss_cost, saturation = self._miss_cost_and_saturation()
        return q * miss_cost > (1.0 - q) * self.costs.transfer_s * saturation

    def plan_prefetch(self, now: float, layer: int, predictions: list[tuple[int, int, dict[int, float]]],
                      protected: set[Key], in_flight: int | None = None, asked: bool = False) -> list[Action]:
        """Prefetches from predictions made at `layer`: (target layer, distance d, {expert: raw score}),
        nearest first. Never evicts a pinned or `protected` expert, nor one planned for a nearer layer.
        in_flight: copies really in flight (the runtime's engine knows; the link model is an estimate
        there); the budget holds against the larger of the two. asked: the caller already had
        worth_predicting() say yes for this layer (the runtime asks before computing predictions); else
        it is asked here, so the simulator drops the predictions the runtime would not have made."""
        self.settle()
        # evidence fades slowly even when nothing is issued, so a closed gate reopens now and then and
        # re-tests the regime (the cache, the link and the predictor's accuracy all change over a run)
        self._expected *= 0.999
        self._good *= 0.999
        self._ticks += 1  # the records per distance age as they are read
        if not predictions:
            return []  # a layer without predictions (most layers, where predicting does not pay): ageing only
        if not asked and not self.worth_predicting(now, in_flight):
            self.counters.prediction_skipped += 1
            return []
        if not self._prefetching:  # predicted for eviction alone: what the predictions say is noted, no copy starts
            if isinstance(self.policy, PredictivePolicy):
                for target, d, scores in predictions:
                    if d > self.policy.n:
                        continue  # a later run's, not the next one's (a lookahead past a token)
                    for e, s in scores.items():
                        self._note_prediction((target, e), self.calibration.p(d, s))
            return []
        in_flight = 0 if in_flight is None else in_flight
        c = self.costs
        layer_time = self.layer_period()
        protected = set(protected)
        miss_cost, saturation = self._miss_cost_and_saturation()
        actions = []
        predictive = isinstance(self.policy, PredictivePolicy)
        # what prefetches delivered, per distance with host compute, else one record (realised): read once
        # per distance per call, where a candidate reaches the gate
        realised: dict = {}
        issued_before = self.counters.prefetch_issued
        victim_memo = None
        for target, d, scores in predictions:
            # by calibrated probability, then raw score (bins tie), then expert id
            ranked = sorted(((self.calibration.p(d, s), s, e) for e, s in scores.items()), key=lambda r: (-r[0], -r[1], r[2]))
            for p, _, e in ranked:
                key = (target, e)
                if predictive and d <= self.policy.n:  # about its next run (further: a later token's)
                    self._note_prediction(key, p)
                if key in self.cache:
                    protected.add(key)
                    if key == victim_memo:
                        victim_memo = None
                    continue
                if self.gate and p < 0.05:
                    self.counters.prefetch_gated += 1
                    continue
                if max(self.link.in_flight(now), in_flight) >= self.budget:
                    self.counters.prefetch_budget += 1
                    continue
                if self.cache.has_free():
                    victim = None
                else:  # the same until a copy is issued or the victim becomes protected: found once
                    victim = victim_memo = self._victim(protected) if victim_memo is None else victim_memo
                if victim is False:
                    continue  # nothing may be evicted
                if self.gate:
                    need_at = now + d * layer_time
                    # demand copies that arrive while it waits go ahead of it (demand first)
                    eta = self.link.prefetch_eta(now) + self.demand_pressure * d * c.transfer_s
                    late = max(0.0, eta - need_at)
                    # with a host, a copy that is still in flight when needed saves nothing: that use
                    # runs on the host anyway; without one it still shortens the demand wait
                    q = realised.get(d)
                    if q is None:
                        q = realised[d] = self.realised(d)
                    q *= p  # what a prefetch of this P has really delivered lately
                    saving = q * (miss_cost if late <= 0 else 0.0) if self.host_compute else q * max(0.0, miss_cost - late)
                    victim_value = 0.0
                    if victim is not None:
                        victim_value = self._use_probability(victim) * miss_cost
                    if saving <= (1.0 - q) * c.transfer_s * saturation + victim_value:
                        self.counters.prefetch_gated += 1
                        continue
                slot, evicted = self.cache.insert(key, protected, victim=victim)
                self._forget(now, evicted)
                self.link.send(key, now, demand=False)
                self.prefetched.add(key)
                victim_memo = None
                self._issued_p[key] = (p, d)
                self.counters.prefetch_issued += 1
                self._sent += 1
                in_flight += 1
                protected.add(key)
                actions.append(Action("prefetch", key, slot, evicted))
        self.prediction_yield = 0.9 * self.prediction_yield + 0.1 * (self.counters.prefetch_issued - issued_before)
        self._predicted = 0.98 * self._predicted + 1.0
        self._predicted_value *= 0.98
        return actions

    def _note_prediction(self, key: Key, p: float) -> None:
        """A top-k prediction's calibrated P for `key`, for eviction: the highest of its layer's so far."""
        known = self.policy.predicted.get(key)
        if known is None or p > known:  # unchanged: its layer's cached victim pick still holds
            self.policy.predicted[key] = p

    def steer_eviction(self, target: int, d: int, chosen) -> None:
        """A prediction made `d` layers ahead of `target`'s next run, whose top-k (`chosen`: the experts
        offered to plan_prefetch(), which gives them their own P) leaves out the rest: `target`'s cached
        experts outside it all get the P that cached experts outside a top-k at this distance are
        calibrated to (SteerCalibration, learnt when `target` runs; the latest prediction replaces an
        earlier one), blended with each one's history. So eviction ranks the cached experts a prediction
        passes over below those it picks, where the top-k alone would leave the others to their history.
        Call it before plan_prefetch(), on layers where worth_predicting() said yes; a no-op unless that
        answer included steering."""
        self.settle()
        if not self._steering or not self.steers_eviction() or d > self.policy.n:  # further: a later run's
            return
        self.policy.set_rest(target, self.steer_calibration.p(d))
        self._steer_pending[target].append((d, frozenset(chosen)))

    def _victim(self, protected: set[Key]):
        candidates = self.cache.evictable(protected)
        if not candidates:
            return False
        return self.policy.victim(candidates)

    def _use_probability(self, key: Key, keep: bool = False) -> float:
        """How likely an evicted `key` is to be needed at its layer's next run."""
        if isinstance(self.policy, PredictivePolicy):
            return self.policy.use_probability(key, recency=not keep)
        if hasattr(self.policy, "use_probability"):  # a policy that knows (the simulator's Belady)
            return self.policy.use_probability(key)
        if isinstance(self.policy, LFUPolicy) and self.policy.counts:
            layer_total = self.policy.group_counts[key[0]]
            return min(1.0, self.top_k * self.policy.counts[key] / layer_total) if layer_total else 0.0
        return self.top_k / self.num_experts
