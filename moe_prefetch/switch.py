"""Measured choices: two ways of running, chosen by what each does to decode time on this machine.

The planner prices what it can model (a copy's link time, the host's compute); what it cannot model is
the whole effect of a choice on the machine at hand: the predictor's own compute, a copy's hand-off on
the CPU backend, copies that land but save less than their transfer. Two such choices are measured:
whether to predict at all (PredictionSwitch) and how to judge a host-computed miss for a keep
(KeepSwitch). Pure Python, no tensors; time is the caller's clock.
"""
from __future__ import annotations

import math
from collections import deque


# one-sided 95% Student t quantiles by degrees of freedom (1-14): a MeasuredSwitch's significance test
T95_ONE_SIDED = (6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761)


class MeasuredSwitch:
    """A choice between two ways of running (arms True and False), decided by what each does to decode
    time, measured on the caller's clock (wall time in the runtime, modelled time in the simulator).

    Decode runs in epochs of EPOCH_TOKENS tokens on one arm at a time; the switch keeps a mean token
    time per arm (decaying by DECAY per epoch, or over the arm's last WINDOW epochs) and runs the faster
    arm, re-testing the slower one every EXPLOIT epochs (so a regime change is seen; the cost is one
    epoch in EXPLOIT + 1 on the worse arm), or every 4 x EXPLOIT when the two differ by more than WIDE
    (a re-test then costs more and is less likely to change the answer), and, with WIDE_T95, by more
    than the epochs' noise too. True must win by MARGIN to be chosen: within noise, False (the simpler
    arm) is kept. `opening` is the order of the first epochs, before any decision."""

    EPOCH_TOKENS = 4
    EXPLOIT = 7
    WIDE = 0.15
    MARGIN = 0.01
    MAX_GAP_S = 1.0  # longer between two tokens: an idle pause between generate calls, not a token
    WARMUP_TOKENS = 32  # a cache that is still not full after these decode tokens is measured as it is
    SETTLE_TOKENS = 0   # decode tokens not measured after the arm changes (what the last arm left behind)
    # a significance test (one-sided 95% Student t quantiles by degrees of freedom), or None: the faster mean
    T95: tuple | None = None
    # without T95: the quantiles a WIDE difference between the plain means must also pass, beyond the
    # epochs' noise, before it holds the faster arm for 4 x EXPLOIT epochs (None: the difference alone)
    WIDE_T95: tuple | None = None
    WINDOW = 8          # with a test: epochs of each arm it weighs (the latest)
    DECAY = 0.5         # without a test: each arm's mean keeps this share of its last value per epoch (None: WINDOW's mean)
    EXPLORE = 0         # with the test: rounds of one epoch per arm the opening may add while neither arm wins

    def __init__(self, opening: tuple[bool, ...] = (True, False)):
        # arm -> mean seconds per decode token: decaying, or (with the test) over its last WINDOW epochs
        self.mean = {True: None, False: None}
        self._schedule = list(opening)  # epochs still to run before the next decision
        self.arm = self._schedule.pop(0)  # the current epoch's arm
        self._t0 = None           # when the current token started (its first MoE layer)
        self._tokens, self._seconds = 0, 0.0
        self._warmup = 0          # decode tokens not measured because the cache was still filling
        self._settling = 0        # decode tokens still to run unmeasured since the arm changed
        self.epochs = {True: 0, False: 0}
        # each arm's last WINDOW epoch times (for a significance test: T95's or WIDE_T95's), and opening rounds
        # still allowed (T95)
        self._recent = {True: deque(maxlen=self.WINDOW), False: deque(maxlen=self.WINDOW)}
        self._explore = self.EXPLORE

    def best(self) -> bool:
        on, off = self.mean[True], self.mean[False]
        if on is None or off is None:
            return True
        return on < off * (1.0 - self.MARGIN)

    def _significant(self, quantiles: tuple | None = None) -> bool | None:
        """With a significance test: the arm that is faster beyond the epochs' noise (True must also win by
        MARGIN), or None while neither is. The noise is the epochs' spread about their arm's mean, pooled
        over both arms (a token's time varies with its routing whichever arm runs), and the difference
        must exceed one-sided 95% Student t standard errors of it. quantiles: T95 unless given."""
        quantiles = quantiles or self.T95
        a, b = self._recent[True], self._recent[False]
        dof = len(a) + len(b) - 2
        if not a or not b or dof < 1:
            return None
        on, off = sum(a) / len(a), sum(b) / len(b)  # the windows' means
        var = (sum((x - on) ** 2 for x in a) + sum((x - off) ** 2 for x in b)) / dof
        margin = quantiles[min(dof, len(quantiles)) - 1] * math.sqrt(var * (1.0 / len(a) + 1.0 / len(b)))
        if on < off * (1.0 - self.MARGIN) and off - on > margin:
            return True
        if off < on and on - off > margin:
            return False
        return None

    def token(self, now: float, decode: bool, warm: bool = True) -> None:
        """A token's first MoE layer starts at `now` (decode: one row). warm: the expert cache is full.
        Decode tokens while it still fills are warm-up, not measured (at most WARMUP_TOKENS of them):
        they are slow whatever the arm, and counted against the first arm they would bias the
        comparison for many epochs (measured in the simulator: prediction then stayed off where it
        made decode 1.4x faster)."""
        if decode and not warm and self._warmup < self.WARMUP_TOKENS:
            self._warmup += 1
            decode = False
        if self._t0 is not None and decode and 0.0 < now - self._t0 < self.MAX_GAP_S:
            if self._settling:
                self._settling -= 1
            else:
                self._tokens += 1
                self._seconds += now - self._t0
        self._t0 = now if decode else None
        if self._tokens >= self.EPOCH_TOKENS:
            self._end_epoch()

    def _end_epoch(self) -> None:
        t = self._seconds / self._tokens
        recent = self._recent[self.arm]
        recent.append(t)
        if self.T95 or self.DECAY is None:
            self.mean[self.arm] = sum(recent) / len(recent)
        else:
            m = self.mean[self.arm]
            self.mean[self.arm] = t if m is None else self.DECAY * m + (1.0 - self.DECAY) * t
        self.epochs[self.arm] += 1
        self._tokens, self._seconds = 0, 0.0
        if not self._schedule and None in (self.mean[True], self.mean[False]):
            self._schedule = [self.mean[True] is None]  # an opening without both arms: measure the other first
        if not self._schedule:
            if self.T95:
                self._decide_tested()
            else:
                self._exploit(self.best(), wide=True)
        arm = self._schedule.pop(0)
        self._settling = self.SETTLE_TOKENS if arm != self.arm else 0
        self.arm = arm

    def _decide_tested(self) -> None:
        """The next schedule under a significance test: the significantly faster arm for EXPLOIT epochs (4 x
        as many when it is faster by more than WIDE), then a re-test of the other; while neither is, one
        more epoch of each (at most EXPLORE such rounds, in the run's opening), then False (the simpler
        arm), whose re-tests of True add to the evidence one epoch at a time."""
        verdict = self._significant()
        if verdict is None and self._explore > 0:
            self._explore -= 1
            self._schedule = [not self.arm, self.arm]
            return
        self._explore = 0
        self._exploit(bool(verdict), wide=verdict is not None)

    def _exploit(self, best: bool, wide: bool) -> None:
        """Run `best` for EXPLOIT epochs (4 x as many where `wide` may apply and the arms' means differ by
        more than WIDE), then re-test the other arm."""
        on, off = self.mean[True], self.mean[False]
        wide = wide and abs(on - off) > self.WIDE * min(on, off)
        if wide and not self.T95 and self.WIDE_T95:  # a wide gap between plain means holds only beyond noise
            wide = self._significant(self.WIDE_T95) is best
        self._schedule = [best] * (self.EXPLOIT * (4 if wide else 1)) + [not best]


class PredictionSwitch(MeasuredSwitch):
    """Whether predicting pays at all (arm True: predict), measured.

    The gate prices each prefetch from a model of the link and the host; what it cannot see is the
    whole effect of predicting on this machine: the predictor's own compute, the planning, copies that
    land but save less than their transfer (a layer computes its landed experts while the rest copy).
    So decode alternates epochs with and without prediction and keeps the faster (MeasuredSwitch),
    opening with two epochs of prediction and one without.

    Each arm's mean is over its last WINDOW epochs, and a gap wider than WIDE holds the faster arm for
    4 x EXPLOIT epochs only when a Student t test says it is beyond the epochs' noise (else EXPLOIT, then
    a re-test). Before 2026-12-07 the means decayed by half each epoch and any wide gap held: a 4-token
    epoch's time varies by 20-30% with its tokens' routing, so one lucky epoch could hold the wrong arm
    for 28 epochs (on a second trained model with host compute at 75% cache, predicting ran 36-37 of a
    192-token run's 45 epochs where predicting on every layer was 0.88-1.00 of not predicting).
    Choosing the arm by the test alone was tried and kept prediction off too long where it pays
    (bench/switch.py: worst 0.820 of the better fixed arm against 0.894). Simulated (bench/switch.py,
    180 configurations, the adaptive planner over the better of never and always predicting): mean
    0.988 and worst 0.895 before, 0.988 and 0.906 now; with each token's time seen x lognormal(0, 0.2)
    (`--clock-noise 0.2`, a wall clock's noise), 0.985 / 0.876 before, 0.988 / 0.893 now."""

    DECAY = None
    WIDE_T95 = T95_ONE_SIDED

    def __init__(self):
        super().__init__(opening=(True, True, False))


class KeepSwitch(MeasuredSwitch):
    """How a host-computed miss is judged for a keep (arm True: with recency, False: on frequency
    alone), measured.

    Where routing sticks from one token to the next, a just-used expert is likelier to return than its
    frequency says, and judging keeps with the recency line eviction uses fills the cache with what the
    next token needs (simulated with a GPU's costs, 60% of a token's experts kept from the last: 1.25-1.4x).
    Where it barely sticks, nearly every just-used expert beats its victim by a little, and each such
    keep costs a copy that gains little: free on a GPU's DMA engine, but on the CPU backend the copy
    and its hand-off take compute from the layer (measured on the demo: 8x the keeps, 2-9% slower).
    That cost is the machine's, not the model's, so it is measured rather than priced. The opening
    epochs are (False, True, False) against the prediction switch's (True, True, False), so both
    switches' first decisions see more than one arm of the other, and their later re-tests fall on
    different epochs. Frequency first: decode that is never measured (every layer computing several
    rows for some expert: a batch) keeps the rule that cannot churn.

    The planner times it on its keep clock (Planner.keep_clock: per layer a fixed device time, per host
    job the host's measured time, per keep what starting it took the caller), not the wall clock, and
    only while the predictive rule evicts. A rule is chosen only when it is faster beyond the epochs'
    noise (a Student t test on each arm's last WINDOW epochs); while neither is, the opening runs up to
    EXPLORE more rounds of one epoch each, then frequency runs, re-testing recency one epoch in EXPLOIT
    + 1. An 8-token epoch's time varies by 20-30% with its tokens' routing: on the demo with host compute
    (4 x 128 tokens, 75% cache, six paired rounds, 2026-12-07), comparing plain means, one slow opening
    epoch (26 against 17 ms a token) chose recency, the gap, counted as wide, held it for 60 epochs, and
    recency keeps moved 2-6x the bytes for no hits: 0.95 of LFU's decode where keeps on frequency gave
    0.98 (the keep clock alone: 0.945; with the test: 0.970). Simulated, where a token's routing is the
    only noise, the test costs 1-2% of the better rule on average against plain means
    (bench/keep_switch.py)."""

    EPOCH_TOKENS = 8    # a keep rule acts through the cache it leaves, which outlasts a short epoch:
    SETTLE_TOKENS = 8   # the first tokens after a change still run on the other arm's cache
    EXPLOIT = 15        # stickiness and the cost of a copy belong to the model and the machine: re-test rarely
    T95 = T95_ONE_SIDED
    EXPLORE = 4         # opening rounds while neither rule is faster beyond noise

    def __init__(self):
        super().__init__(opening=(False, True, False))


class EvictionSwitch:
    """Which rule evicts: the predictive one ("predictive") while it pays for its planning, else the
    cheaper of LFU's ("lfu": use count alone, ties to the least recently used) and LRU's ("lru"), priced
    from what each is measured to gain and to cost.

    Gain: while the predictive rule evicts, what it saves over each cheaper rule is counted on the same
    uses. Against LFU's, its policy sets each victim against the one LFU's rule would have chosen and
    counts which choice the next use proved right (ghosting; the policy's ghost_wins). Against LRU's, a
    shadow LRU cache fed the same uses (cache.ShadowLRU) tells which of a run's experts LRU's rule would
    have held: a use the real cache holds and the shadow does not is the predictive rule's win, the
    reverse LRU's (shadow()). A victim at a time says little for LRU, whose own choices make its cache:
    on the demo's trace at 25% cache the predictive rule won 153 of 175 victim pairs against LRU's while
    LRU's rule hit 30.6% of uses against its 28.3%. The shadow is not fed where misses run on the host
    (host compute): a shadow that copies every miss in is not what LRU's rule would do there, so LRU's
    rule is not a candidate then. The net wins per layer times what a miss costs (the planner's cost
    model) is the time the predictive rule saves a layer over that rule, taken optimistically: the net
    wins plus Z standard errors of their count, with one pair of doubt added, so that thin evidence
    favours the predictive rule. Cost: each rule's planning time per layer, as the caller measures it
    (observe_plan_cost: the runtime's wall clock; the simulator's model). The hit rates differ by a point
    or two, so the wins are counted on the same uses rather than timed (a wall clock's noise over a few
    tokens is larger than that).

    Decode runs in epochs of EPOCH_TOKENS tokens on one rule, the first on the predictive rule. After
    every epoch each cheaper rule's balance (the planning it would save less the gain) is priced, and the
    rule with the best balance runs (the predictive rule unless one is positive). A cheaper rule is tried
    only where it could win, where the gain over it is below the predictive rule's whole planning time
    (no rule can save more than that), and its own planning is then measured. The other rule is re-tested
    after EXPLOIT epochs of the better one (4 x as many when the predictive rule is clearly better: its
    gain over every candidate, taken pessimistically, beats what that rule could save): the predictive
    rule, to count its wins afresh (4 x as rarely when the cheaper rule is clearly better: the gain taken
    twice as optimistically is still below what it saves); a cheaper one, only while it could still
    win. Where LRU's rule could win, the predictive rule runs RETEST_EPOCHS epochs in a row whenever it
    starts, the first of them settling uncounted (see shadowing), and LRU's rule is chosen only after
    MIN_COUNTED counted epochs (the predictive rule's fits learn over the first tokens), which the
    opening runs before its first decision, so that it weighs both cheaper rules. Once the predictive
    rule is clearly worth its cost, only one of its epochs in GHOST_EVERY compares victims (the
    comparison costs planning too; the shadow costs a few dictionary operations per use and runs on).
    A caller that times no plans keeps the predictive rule (and compares victims as rarely)."""

    EPOCH_TOKENS = 8
    EXPLOIT = 7
    GHOST_EVERY = 4      # once it clearly pays: predictive epochs per epoch that compares victims
    DECAY = 0.85         # per epoch that gathers evidence: the wins of the last several such epochs count
    Z = 1.0
    # x Z for the shadow's counts: one cache state's uses, correlated from one epoch to the next. At 1 Z,
    # simulated, auto gained 1-2% at 25% cache where LRU's rule hits more, but on a second trained model
    # (8 layers, Python code) it ran LRU's rule on early counts for 8 of 23 epochs at 50% cache, where
    # the predictive rule hits 60.1% against LRU's 57.3%: 0.93-0.98 of 2 Z in the real runtime at 50 and
    # 75% cache (one run each, 2026-12-06)
    Z_SHADOW = 2.0
    RETEST_EPOCHS = 3    # predictive epochs in a row once it starts, where LRU's rule is a candidate (one settles)
    MIN_COUNTED = 4      # epochs counted against the shadow before LRU's rule may be chosen
    WARMUP_TOKENS = MeasuredSwitch.WARMUP_TOKENS
    RULES = ("predictive", "lfu", "lru")

    def __init__(self):
        self.rule = "predictive"
        self.ghost = True                 # this epoch compares victims (predictive rule)
        self._best = "predictive"         # the rule the last decision found best
        self._since = 0                   # epochs since the other rule last ran (or the best one changed)
        self._clear = False               # the last decision found the predictive rule clearly worth its cost
        self._quiet = 0                   # predictive epochs since the last that compared victims
        self.plan = dict.fromkeys(self.RULES)  # rule -> decaying mean planning seconds per layer under it
        self._measuring = False           # the current token counts (decode, the cache full)
        self._tokens = self._layers = 0
        self._seconds = 0.0
        self._timed = False               # a planning time was observed this epoch
        self._seen = (0, 0)               # ghost wins already counted
        self._shadowed = [0, 0]           # this epoch's uses told apart by the shadow: [predictive's, LRU's]
        self._settling = True             # this predictive epoch follows another rule's (or opens the run)
        # predictive epochs still to run after this one before a decision: at the opening, until LRU's rule
        # may be chosen, so that the first decision weighs both cheaper rules
        self._hold = self.MIN_COUNTED
        self._counted = 0                 # epochs counted against the shadow so far
        self.shadow_wins = [0, 0]         # uses told apart by the shadow, all counted epochs: [predictive's, LRU's]
        self.lru_ok = True                # LRU's rule is a candidate (the caller feeds the shadow)
        # cheaper rule -> [net wins, pairs, layers] of the predictive rule against it, decaying over the
        # epochs that gather them (comparing epochs for LFU's, every predictive epoch for LRU's)
        self.evidence = {"lfu": [0.0, 0.0, 0.0], "lru": [0.0, 0.0, 0.0]}
        self._warmup = 0
        self.epochs = dict.fromkeys(self.RULES, 0)
        self.last = None                  # the last decision's {rule: (gain, what it could save)} per layer, seconds

    def token(self, decode: bool, warm: bool, wins, miss_cost: float, lru_ok: bool = True) -> str:
        """A token's first MoE layer starts (decode: one row; warm: the cache is full); wins: the policy's
        ghost_wins; miss_cost: seconds a miss costs; lru_ok: the shadow LRU cache is fed (misses are copied
        in). Returns the rule for this token; `ghost` says whether it compares victims."""
        if self._measuring:
            self._tokens += 1
            if self._tokens >= self.EPOCH_TOKENS:
                self._end_epoch(wins, miss_cost)
        if not lru_ok and self.lru_ok:  # LRU's rule stops being a candidate: its evidence is void
            self.evidence["lru"] = [0.0, 0.0, 0.0]
            self._counted = 0
            if self.rule == "lru":
                self.rule, self._best, self._since = "predictive", "predictive", 0
        self.lru_ok = lru_ok
        if decode and not warm and self._warmup < self.WARMUP_TOKENS:
            self._warmup += 1
            decode = False
        self._measuring = decode
        return self.rule

    def layer(self) -> None:
        """A layer's run starts."""
        if self._measuring:
            self._layers += 1

    @property
    def shadowing(self) -> bool:
        """The current token's uses are told apart against the shadow LRU cache (shadow()): not in the
        first predictive epoch after another rule's, nor in the run's first. That epoch runs on the cache
        the other rule left (the shadow's own, after LRU's rule) with fits that have not seen it, and
        loses to LRU's rule while it reshapes the cache: simulated on the demo's trace at 50% cache, the
        predictive rule lost 6-16 of its first epoch's told-apart uses and 12-16 of a re-test's, and won
        by 160 to 90 over the next ten. So that epoch settles, uncounted, and the rule runs again."""
        return self._measuring and self.lru_ok and self.rule == "predictive" and not self._settling

    def shadow(self, won: int, lost: int) -> None:
        """Of a run's uses, `won` were held by the real cache and not by the shadow LRU cache, `lost` the
        reverse."""
        if self.shadowing:
            self._shadowed[0] += won
            self._shadowed[1] += lost
            self.shadow_wins[0] += won
            self.shadow_wins[1] += lost

    def plan_time(self, seconds: float) -> None:
        """The caller's planning of a layer (or of one round of it) took `seconds`."""
        if self._measuring:
            self._seconds += seconds
            self._timed = True

    def gain(self, miss_cost: float, z: float | None = None, rival: str = "lfu") -> float | None:
        """Seconds the predictive rule saves per layer over `rival`'s, optimistically (the net wins z
        standard errors up, Z by default; pessimistically with -Z), or None without evidence."""
        net, pairs, layers = self.evidence[rival]
        if not layers:
            return None
        z = (self.Z if z is None else z) * (self.Z_SHADOW if rival == "lru" else 1.0)
        return (net + z * math.sqrt(pairs + 1.0)) / layers * miss_cost

    def _end_epoch(self, wins, miss_cost: float) -> None:
        rule = self.rule
        if self._timed and self._layers:
            t = self._seconds / self._layers
            m = self.plan[rule]
            self.plan[rule] = t if m is None else 0.5 * m + 0.5 * t
        won, lost = wins[0] - self._seen[0], wins[1] - self._seen[1]  # pairs told apart this epoch
        self._seen = (wins[0], wins[1])
        d, ev = self.DECAY, self.evidence["lfu"]
        if rule == "predictive" and self.ghost:
            ev[0], ev[1], ev[2] = d * ev[0] + won - lost, d * ev[1] + won + lost, d * ev[2] + self._layers
        else:  # pairs made in a comparing epoch, told apart now
            ev[0], ev[1] = ev[0] + won - lost, ev[1] + won + lost
        if rule == "predictive" and self.lru_ok and not self._settling:
            (won, lost), ev = self._shadowed, self.evidence["lru"]
            ev[0], ev[1], ev[2] = d * ev[0] + won - lost, d * ev[1] + won + lost, d * ev[2] + self._layers
            self._counted += 1
        self._shadowed = [0, 0]
        self.epochs[rule] += 1
        self._tokens = self._layers = 0
        self._seconds, self._timed = 0.0, False
        # where LRU's rule is a candidate, the predictive rule runs RETEST_EPOCHS in a row once it starts
        # (the first settling, uncounted: see shadowing) before anything is decided
        if rule == "predictive" and self._hold > 0 and self._lru_could_win(miss_cost):
            self._hold -= 1
            self.rule = "predictive"
        else:
            self.rule = self._decide(miss_cost)
        self._settling = self.rule == "predictive" and rule != "predictive"
        if self._settling:
            self._hold = self.RETEST_EPOCHS - 1
        if self.rule == "predictive":
            self.ghost = not self._clear or self._quiet >= self.GHOST_EVERY - 1
            self._quiet = 0 if self.ghost else self._quiet + 1

    def _alike(self, rival: str) -> float:
        """The z that puts `rival`'s gain one standard error up (gain() scales LRU's by Z_SHADOW)."""
        return self.Z / self.Z_SHADOW if rival == "lru" else self.Z

    def _lru_could_win(self, miss_cost: float) -> bool:
        """LRU's rule is a candidate and the gain over it is below all of the predictive rule's planning
        (below twice that while fewer than MIN_COUNTED epochs have been counted: early counts favour LRU's
        rule, so one that is far behind even then is let go): only then do predictive epochs run in a
        row to count against the shadow."""
        if not self.lru_ok:
            return False
        gain, on = self.gain(miss_cost, rival="lru"), self.plan["predictive"]
        if gain is None or on is None:
            return True
        return gain <= (2.0 * on if self._counted < self.MIN_COUNTED else on)

    def _decide(self, miss_cost: float) -> str:
        """The rule for the next epoch: decided again after every epoch, on the evidence so far."""
        on = self.plan["predictive"]
        if on is None:  # untimed: nothing to weigh, so the rule never changes and victims are compared rarely
            self.last, self._clear = None, True
            return "predictive"
        rivals = ("lfu", "lru") if self.lru_ok else ("lfu",)
        self.last, balance = {}, {}
        for r in rivals:
            gain = self.gain(miss_cost, rival=r)
            if gain is None or (r == "lru" and self._counted < self.MIN_COUNTED):
                continue
            off = self.plan[r]
            saving = on if off is None else on - off  # what its rule could save per layer (at most all of it)
            self.last[r] = (gain, saving)
            balance[r] = saving - gain
        # the predictive rule gives way only to a rule whose balance is positive on the optimistic gain;
        # of those, the one whose balance is best with the gain one standard error up for both (the two
        # cheaper rules' evidence weighed alike, where LRU's doubt is twice LFU's)
        better = [r for r in balance if balance[r] > 0.0]
        best = max(better, key=lambda r: self.last[r][1] - self.gain(miss_cost, self._alike(r), r), default="predictive")
        # clear: even the pessimistic gain over every candidate beats what it could save
        self._clear = best == "predictive" and len(balance) == len(rivals) and all(
            self.gain(miss_cost, -self.Z, r) > max(self.last[r][1], 0.0) for r in balance)
        if best != "predictive" and self.plan[best] is None:
            return best  # never ran: its planning is measured once it could win
        if best != self._best:
            self._best, self._since = best, 0
        self._since += 1
        if best != "predictive":
            other = "predictive"  # to count its wins afresh
            # clearly better: even a gain twice as optimistic would not pay for the predictive rule's planning
            clear = self.last[best][1] > self.gain(miss_cost, 2.0 * self.Z, best)
        else:  # a cheaper rule that ran before and could still win (its gain below all of the planning)
            could = [r for r in balance if self.plan[r] is not None and self.last[r][0] <= on]
            other = max(could, key=balance.get, default=None)
            clear = self._clear
        if other is not None and self._since > self.EXPLOIT * (4 if clear else 1):
            self._since = 0
            return other
        return best
