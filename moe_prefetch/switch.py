"""Choices between ways of running, made on what each does on this machine and this model's routing.

The planner prices what it can model (a copy's link time, the host's compute); what it cannot model is
the whole effect of a choice on the machine at hand: the predictor's own compute, a copy's hand-off on
the CPU backend, copies that land but save less than their transfer. Whether to predict at all is
measured, in epochs of each way (PredictionSwitch); which eviction rule runs (EvictionSwitch) and how a
host-computed miss is judged for a keep (KeepLedger) are counted on the same uses, where the rules'
choices differ, so that no tokens are spent running the worse rule to learn it. Pure Python, no
tensors; time is the caller's clock.
"""
from __future__ import annotations

import math
from collections import deque


# one-sided 95% Student t quantiles by degrees of freedom (1-14): a MeasuredSwitch's test of a wide gap
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
    # the quantiles a WIDE difference between the plain means must also pass, beyond the epochs' noise,
    # before it holds the faster arm for 4 x EXPLOIT epochs (None: the difference alone)
    WIDE_T95: tuple | None = None
    WINDOW = 8          # epochs of each arm the test weighs (the latest)
    DECAY = 0.5         # each arm's mean keeps this share of its last value per epoch (None: the mean of its last WINDOW)

    def __init__(self, opening: tuple[bool, ...] = (True, False)):
        # arm -> mean seconds per decode token: decaying, or over its last WINDOW epochs
        self.mean = {True: None, False: None}
        self._schedule = list(opening)  # epochs still to run before the next decision
        self.arm = self._schedule.pop(0)  # the current epoch's arm
        self._t0 = None           # when the current token started (its first MoE layer)
        self._tokens, self._seconds = 0, 0.0
        self._warmup = 0          # decode tokens not measured because the cache was still filling
        self.epochs = {True: 0, False: 0}
        # each arm's last WINDOW epoch times (the means without DECAY, and WIDE_T95's test)
        self._recent = {True: deque(maxlen=self.WINDOW), False: deque(maxlen=self.WINDOW)}

    def best(self) -> bool:
        on, off = self.mean[True], self.mean[False]
        if on is None or off is None:
            return True
        return on < off * (1.0 - self.MARGIN)

    def _significant(self, quantiles: tuple) -> bool | None:
        """The arm that is faster beyond the epochs' noise (True must also win by MARGIN), or None while
        neither is. The noise is the epochs' spread about their arm's mean, pooled over both arms (a
        token's time varies with its routing whichever arm runs), and the difference must exceed
        `quantiles` (one-sided Student t, by degrees of freedom) standard errors of it."""
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
            self._tokens += 1
            self._seconds += now - self._t0
        self._t0 = now if decode else None
        if self._tokens >= self.EPOCH_TOKENS:
            self._end_epoch()

    def _end_epoch(self) -> None:
        t = self._seconds / self._tokens
        recent = self._recent[self.arm]
        recent.append(t)
        if self.DECAY is None:
            self.mean[self.arm] = sum(recent) / len(recent)
        else:
            m = self.mean[self.arm]
            self.mean[self.arm] = t if m is None else self.DECAY * m + (1.0 - self.DECAY) * t
        self.epochs[self.arm] += 1
        self._tokens, self._seconds = 0, 0.0
        if not self._schedule and None in (self.mean[True], self.mean[False]):
            self._schedule = [self.mean[True] is None]  # an opening without both arms: measure the other first
        if not self._schedule:
            self._exploit(self.best(), wide=True)
        self.arm = self._schedule.pop(0)

    def _exploit(self, best: bool, wide: bool) -> None:
        """Run `best` for EXPLOIT epochs (4 x as many where `wide` may apply and the arms' means differ by
        more than WIDE), then re-test the other arm."""
        on, off = self.mean[True], self.mean[False]
        wide = wide and abs(on - off) > self.WIDE * min(on, off)
        if wide and self.WIDE_T95:  # a wide gap between plain means holds only beyond noise
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


class EvictionSwitch:
    """Which rule evicts: the predictive one ("predictive") while it pays for its planning, else the
    cheaper of LFU's ("lfu": use count alone, ties to the least recently used) and LRU's ("lru"), priced
    from what each is measured to gain and to cost.

    Gain: while the predictive rule evicts, what it saves over each cheaper rule is counted on the same
    uses. Where misses are copied in, a shadow cache per cheaper rule, fed the same uses
    (cache.ShadowLFU, cache.ShadowLRU), tells which of a run's experts that rule would have held: a use
    the real cache holds and the shadow does not is the predictive rule's win, the reverse the other
    rule's (shadow()). A victim at a time says little, as each rule's own choices make its cache: on the
    demo's trace at 25% cache the predictive rule won 153 of 175 victim pairs against LRU's while LRU's
    rule hit 30.6% of uses against its 28.3%, and on the demo at 75% it won 41-44 pairs against LFU's
    15-21 where the hit rates were within 0.004 (the shadow LFU cache: 118-119 uses to 116). Where misses
    run on the host (host compute), a shadow that copies every miss in is not what either rule would do.
    There LRU's rule is judged by a shadow that keeps misses as LRU's rule would, on a link of its own, and
    holds an expert for a use only once its copy has landed (cache.ShadowHostLRU, set against the experts
    the real cache had landed; simulated over six traces at 25-75% cache, its hit rate came within 0.03 of
    a real LRU run's, 2026-12-08), and against LFU's rule each victim is set against the one LFU's rule
    would have chosen, the next use telling which choice was right (ghosting; the policy's ghost_wins).
    The net wins per layer times what a miss costs (the planner's cost model) is the time the predictive rule saves a layer over that rule, taken optimistically: the
    net wins plus Z standard errors of their count (Z_SHADOW x that for the shadows' counts, Z_HOST_LRU x
    for LRU's with host compute), with one
    pair of doubt added, so that thin evidence favours the predictive rule. Cost: each rule's planning
    time per layer, as the caller measures it (observe_plan_cost: the runtime's wall clock; the
    simulator's model). The hit rates differ by a point or two, so the wins are counted on the same uses
    rather than timed (a wall clock's noise over a few tokens is larger than that).

    Decode runs in epochs of EPOCH_TOKENS tokens on one rule, the first on the predictive rule. After
    every epoch each cheaper rule's balance (the planning it would save less the gain) is priced, and the
    rule with the best balance runs (the predictive rule unless one is positive). A cheaper rule is tried
    only where it could win, where the gain over it is below the predictive rule's whole planning time
    (no rule can save more than that), and its own planning is then measured. The other rule is re-tested
    after EXPLOIT epochs of the better one (4 x as many when the predictive rule is clearly better: its
    gain over every candidate, taken pessimistically, beats what that rule could save): the predictive
    rule, to count its wins afresh (4 x as rarely when the cheaper rule is clearly better: the gain taken
    twice as optimistically is still below what it saves); a cheaper one, only while it could still
    win. Where a shadow is fed and its rule could win, the predictive rule runs RETEST_EPOCHS
    epochs in a row whenever it starts, the first of them settling uncounted (see shadowing), and a
    cheaper rule is chosen only after MIN_COUNTED counted epochs (the predictive rule's fits learn over
    the first tokens), which the opening runs before its first decision. Unshadowed (host compute: LFU's
    evidence is victim pairs; fed(), shadowed, say whose is uses told apart), LFU's rule is chosen
    only on MIN_PAIRS victim pairs told apart, or after MIN_COMPARED comparing epochs, unless even
    winning the missing pairs would not pay for the predictive rule (_thin); and once the predictive
    rule is clearly worth its cost over LFU's, only one of its epochs in GHOST_EVERY compares victims (the
    comparison costs planning too; the shadows cost a few dictionary operations per use and run on).
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
    # 75% cache (one run each, 2026-12-06). Decided on the counts as they are (z = 0), auto would leave
    # the predictive rule for LFU's on the demo at 75% cache (hits within 0.004, planning 11% of a layer
    # more), but early counts favour the cheaper rules: simulated, it ran LRU's rule for 66 of 75 epochs
    # on synthetic routing (stickiness 0.3, 75% cache) where the predictive rule is 1.15x as fast, and
    # gave 0.87-0.98 of it on that trace, the sticky 0.6 one and the demo's (2026-12-07)
    Z_SHADOW = 2.0
    # x Z for LRU's shadow with host compute (ShadowHostLRU). There a cache changes only by keeps, a few
    # a layer while the link has room, so a rule that takes over reaches its own cache slowly and the
    # shadow's steady state overstates what a switch gains for the 7 epochs before a re-test; at 2 Z,
    # simulated (the second model's trace, 75% cache, GPU costs), auto took LRU's rule in 15 of 510 epochs
    # where its shadow led, gave 0.991 of the predictive rule over 4096 tokens and 0.944-1.001 over
    # 192-token windows (those where LRU's rule was ahead all along included), where at 3 Z it never left
    # the predictive rule there (1.000; windows 0.979-1.001, as before LRU's rule was a candidate)
    Z_HOST_LRU = 3.0
    RETEST_EPOCHS = 3    # predictive epochs in a row once it starts, shadowed, where a cheaper rule could win (one settles)
    MIN_COUNTED = 4      # epochs counted against the shadows before a shadowed rule may be chosen
    # unshadowed, LFU's rule is chosen only once the victims compared have told MIN_PAIRS pairs apart (decaying
    # count) or MIN_COMPARED epochs have compared them: see _thin
    MIN_PAIRS = 8
    MIN_COMPARED = 8
    WARMUP_TOKENS = MeasuredSwitch.WARMUP_TOKENS
    RULES = ("predictive", "lfu", "lru")

    def __init__(self):
        self.rule = "predictive"
        self._ghost_due = True            # unshadowed: this predictive epoch compares victims (ghost)
        self._best = "predictive"         # the rule the last decision found best
        self._since = 0                   # epochs since the other rule last ran (or the best one changed)
        self._clear = False               # the last decision found the predictive rule clearly worth its cost
        self._clear_lfu = False           # ... over LFU's rule (whose evidence the victim comparison gathers)
        self._quiet = 0                   # predictive epochs since the last that compared victims
        self.plan = dict.fromkeys(self.RULES)  # rule -> decaying mean planning seconds per layer under it
        self._measuring = False           # the current token counts (decode, the cache full)
        self._tokens = self._layers = 0
        self._seconds = 0.0
        self._timed = False               # a planning time was observed this epoch
        self._seen = (0, 0)               # ghost wins already counted
        # this epoch's uses told apart by each rival's shadow cache: rival -> [predictive's, the rival's]
        self._told = {"lfu": [0, 0], "lru": [0, 0]}
        self._settling = True             # this predictive epoch follows another rule's (or opens the run)
        # predictive epochs still to run after this one before a decision: at the opening (shadowed), until
        # a cheaper rule may be chosen, so that the first decision weighs both
        self._hold = self.MIN_COUNTED
        self._counted = 0                 # epochs counted against the shadows so far
        self._compared = 0                # unshadowed: epochs that compared victims with LFU's so far
        # uses told apart by each shadow, all counted epochs: rival -> [predictive's, the rival's]
        self.shadow_wins = {"lfu": [0, 0], "lru": [0, 0]}
        self.shadowed = True              # misses are copied in: both shadow caches are fed (else LRU's alone)
        # cheaper rule -> [net wins, pairs, layers] of the predictive rule against it, decaying over the
        # epochs that gather them (every counted predictive epoch; unshadowed, LFU's on comparing epochs)
        self.evidence = {"lfu": [0.0, 0.0, 0.0], "lru": [0.0, 0.0, 0.0]}
        self._warmup = 0
        self.epochs = dict.fromkeys(self.RULES, 0)
        self.last = None                  # the last decision's {rule: (gain, what it could save)} per layer, seconds

    def token(self, decode: bool, warm: bool, wins, miss_cost: float, shadowed: bool = True) -> str:
        """A token's first MoE layer starts (decode: one row; warm: the cache is full); wins: the policy's
        ghost_wins; miss_cost: seconds a miss costs; shadowed: misses are copied in and both shadow
        caches are fed (else, host compute, LRU's alone: fed()). Returns the rule for this token; `ghost`
        says whether it compares victims."""
        if self._measuring:
            self._tokens += 1
            if self._tokens >= self.EPOCH_TOKENS:
                self._end_epoch(wins, miss_cost)
        if shadowed != self.shadowed:  # the evidence changes kind: gathered afresh, on the predictive rule
            self.evidence = {r: [0.0, 0.0, 0.0] for r in self.evidence}
            self._counted = self._compared = 0
            if self.rule != "predictive":
                self.rule, self._best, self._since = "predictive", "predictive", 0
        self.shadowed = shadowed
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
    def ghost(self) -> bool:
        """This token's victims are compared with LFU's (the policy's ghosting): only unshadowed (where
        LFU's evidence is victim pairs), under the predictive rule, on the epochs due to compare."""
        return not self.shadowed and self.rule == "predictive" and self._ghost_due

    def _z_counts(self, rival: str) -> float:
        """x Z for `rival`'s counts: Z_SHADOW for a shadow's (Z_HOST_LRU for LRU's with host compute), 1 for
        victim pairs."""
        if not self.fed(rival):
            return 1.0
        return self.Z_SHADOW if self.shadowed else self.Z_HOST_LRU

    def fed(self, rival: str) -> bool:
        """`rival`'s evidence is uses told apart by its shadow cache: LRU's always (with host compute, the
        shadow that lands LRU's keeps on a link of its own), LFU's only where misses are copied in."""
        return self.shadowed or rival == "lru"

    @property
    def shadowing(self) -> bool:
        """The current token's uses are told apart against the shadow caches (shadow()): not in the
        first predictive epoch after another rule's, nor in the run's first. That epoch runs on the cache
        the other rule left (the shadow's own) with fits that have not seen it, and loses to that rule
        while it reshapes the cache: simulated on the demo's trace at 50% cache, the predictive rule lost
        6-16 of its first epoch's uses told apart from LRU's shadow and 12-16 of a re-test's, and won by
        160 to 90 over the next ten. So that epoch settles, uncounted, and the rule runs again."""
        return self._measuring and self.rule == "predictive" and not self._settling

    def shadow(self, rival: str, won: int, lost: int) -> None:
        """Of a run's uses, `won` were held by the real cache and not by `rival`'s shadow cache, `lost`
        the reverse (counted only while shadowing, and only for a rival whose evidence this is: fed())."""
        if self.shadowing and self.fed(rival):
            told, total = self._told[rival], self.shadow_wins[rival]
            told[0] += won
            told[1] += lost
            total[0] += won
            total[1] += lost

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
        z = (self.Z if z is None else z) * self._z_counts(rival)
        return (net + z * math.sqrt(pairs + 1.0)) / layers * miss_cost

    def _end_epoch(self, wins, miss_cost: float) -> None:
        rule = self.rule
        if self._timed and self._layers:
            t = self._seconds / self._layers
            m = self.plan[rule]
            self.plan[rule] = t if m is None else 0.5 * m + 0.5 * t
        won, lost = wins[0] - self._seen[0], wins[1] - self._seen[1]  # pairs told apart this epoch
        self._seen = (wins[0], wins[1])
        d = self.DECAY
        if not self.shadowed:  # LFU's evidence: victim pairs
            ev = self.evidence["lfu"]
            if self.ghost:
                ev[0], ev[1], ev[2] = d * ev[0] + won - lost, d * ev[1] + won + lost, d * ev[2] + self._layers
                self._compared += 1
            else:  # pairs made in a comparing epoch, told apart now
                ev[0], ev[1] = ev[0] + won - lost, ev[1] + won + lost
        if rule == "predictive" and not self._settling:  # the fed rivals': the uses their shadows told apart
            for r, (won, lost) in self._told.items():
                if not self.fed(r):
                    continue
                ev = self.evidence[r]
                ev[0], ev[1], ev[2] = d * ev[0] + won - lost, d * ev[1] + won + lost, d * ev[2] + self._layers
            self._counted += 1
        self._told = {r: [0, 0] for r in self._told}
        self.epochs[rule] += 1
        self._tokens = self._layers = 0
        self._seconds, self._timed = 0.0, False
        # shadowed, the predictive rule runs RETEST_EPOCHS in a row once it starts (the first settling,
        # uncounted: see shadowing) before anything is decided, where a cheaper rule could win
        if rule == "predictive" and self._hold > 0 and self._shadow_could_win(miss_cost):
            self._hold -= 1
            self.rule = "predictive"
        else:
            self.rule = self._decide(miss_cost)
        self._settling = self.rule == "predictive" and rule != "predictive"
        if self._settling:
            self._hold = self.RETEST_EPOCHS - 1
        if self.rule == "predictive":
            self._ghost_due = not self._clear_lfu or self._quiet >= self.GHOST_EVERY - 1
            self._quiet = 0 if self._ghost_due else self._quiet + 1

    def _alike(self, rival: str) -> float:
        """The z that puts `rival`'s gain one standard error up (gain() scales a shadow's counts: _z_counts)."""
        return self.Z / self._z_counts(rival)

    def _thin(self, rival: str, miss_cost: float, saving: float) -> bool:
        """Unshadowed, the victim pairs against LFU's are too few to leave the predictive rule on: fewer
        than MIN_PAIRS told apart (decaying), within the first MIN_COMPARED epochs that compare victims,
        and the pairs still missing, were they all the predictive rule's, would make it worth what LFU's
        rule could save (`saving`, seconds per layer). Where the two rules pick different victims a few
        times an epoch, the opening's first decision otherwise rests on 2-4 pairs, and losing all of them
        (a fair coin's odds are 1 in 4 to 16) sent the run to LFU's rule, where the keep ledger gathers
        nothing (host compute at 75% cache, real runtime, 2026-12-07: on the second model 3 of 12 runs of
        the default or eviction auto left it after the opening on 2 or 3 pairs, all lost; on the demo 4
        of 8, on 2 or 4). Where they rarely differ, MIN_COMPARED epochs bound the wait."""
        if self.fed(rival) or self._compared >= self.MIN_COMPARED:
            return False
        net, pairs, layers = self.evidence[rival]
        missing = self.MIN_PAIRS - pairs
        if missing <= 0.0:
            return False
        could = (net + missing + self.Z * math.sqrt(self.MIN_PAIRS + 1.0)) / layers * miss_cost
        return could > saving

    def _shadow_could_win(self, miss_cost: float) -> bool:
        """The shadows are fed and the gain over a cheaper rule is below all of the predictive rule's
        planning (below twice that while fewer than MIN_COUNTED epochs have been counted: early counts
        favour the cheaper rules, so one that is far behind even then is let go): only then do predictive
        epochs run in a row to count against the shadows."""
        on = self.plan["predictive"]
        for r in ("lfu", "lru"):
            if not self.fed(r):
                continue
            gain = self.gain(miss_cost, rival=r)
            if gain is None or on is None or gain <= (2.0 * on if self._counted < self.MIN_COUNTED else on):
                return True
        return False

    def _decide(self, miss_cost: float) -> str:
        """The rule for the next epoch: decided again after every epoch, on the evidence so far."""
        on = self.plan["predictive"]
        if on is None:  # untimed: nothing to weigh, so the rule never changes and victims are compared rarely
            self.last, self._clear, self._clear_lfu = None, True, True
            return "predictive"
        rivals = ("lfu", "lru")
        self.last, balance = {}, {}
        for r in rivals:
            gain = self.gain(miss_cost, rival=r)
            if gain is None or (self.fed(r) and self._counted < self.MIN_COUNTED):
                continue
            off = self.plan[r]
            saving = on if off is None else on - off  # what its rule could save per layer (at most all of it)
            if self._thin(r, miss_cost, saving):
                continue
            self.last[r] = (gain, saving)
            balance[r] = saving - gain
        # the predictive rule gives way only to a rule whose balance is positive on the optimistic gain;
        # of those, the one whose balance is best with the gain one standard error up for both
        better = [r for r in balance if balance[r] > 0.0]
        best = max(better, key=lambda r: self.last[r][1] - self.gain(miss_cost, self._alike(r), r), default="predictive")
        # clear: even the pessimistic gain over every candidate beats what it could save
        clear = {r: self.gain(miss_cost, -self.Z, r) > max(self.last[r][1], 0.0) for r in balance}
        self._clear = best == "predictive" and len(balance) == len(rivals) and all(clear.values())
        # victims are compared for LFU's evidence alone: as rarely once the predictive rule clearly beats LFU's,
        # whatever LRU's shadow says (comparing more often gathers pairs at more planning, and more of their noise)
        self._clear_lfu = best == "predictive" and clear.get("lfu", False)
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


class KeepLedger:
    """How a host-computed miss is judged for a keep (arm True: with recency, False: on frequency alone),
    counted on the keeps where the two rules disagree rather than timed in epochs of each.

    Where routing sticks from one token to the next, a just-used expert is likelier to return than its
    frequency says, and judging keeps with the recency line eviction uses fills the cache with what the
    next token needs (simulated with a GPU's costs, 60% of a token's experts kept from the last:
    1.25-1.4x). Where it barely sticks, nearly every just-used expert beats its victim by a little, and
    each such keep is a copy that gains little: free on a GPU's DMA engine, but on the CPU backend the
    copy and its hand-off take compute from the layer (measured on the demo: 8x the keeps, 2-9% slower).

    Whenever the rules judge a keep differently (recency would copy the miss in over its victim and
    frequency would not, or, rarely, the reverse), the planner records the pair (pair()): the keep's
    expert, its victim, which of the two the running rule left resident, and, where the running rule does
    not keep, when the other rule's copy would land (the planner queues it on a virtual link: the real
    link's queue plus that rule's own keeps, and records no pair where that link would be full). For
    HORIZON runs of each one's layer, every use while the two caches still differ there (its residency is
    what the running rule made it) is a host job one rule's choice saved: a use of the kept expert, once
    its copy has landed, counts for the rule that keeps it, a use of the victim for the other. An expert
    whose earlier pair still stands is not paired again (the other rule's cache holds it already).
    Recency's balance is its net uses times the host's time per job, less its extra keeps times what
    starting a keep takes the caller (observe_keep: measured, per keep), on sums that decay by DECAY per
    token; recency runs while that balance is positive by Z standard errors of the counts, frequency
    (the rule that cannot churn) otherwise and until MIN_KEEPS keeps have been timed. Both rules'
    evidence gathers whichever runs, so no tokens are spent running the worse one to measure it.

    It replaced a switch that timed 8-token epochs of each rule (2026-12-07). Simulated (bench/keep_switch.py,
    no predictor, 300-400 tokens from a cold cache, against the better fixed rule): 0.995-0.999 on average
    (worst 0.968) over the traces the epochs' settings were chosen on and 0.996-0.998 (worst 0.966) on
    the others, where the epochs gave 0.953-0.985 (worst 0.872) and 0.972-0.983 (worst 0.902): an
    8-token epoch's time varies by 20-30% with its tokens' routing, so the epochs needed a significance
    test, a few rounds of each rule to pass it, and settling tokens after each change, and over a few
    hundred tokens the rounds on the worse rule cost more than the choice won."""

    HORIZON = 4      # runs of a side's layer over which its uses count
    DECAY = 0.98     # per token: about the last 50 tokens' evidence
    Z = 1.645        # one-sided 95%
    MIN_KEEPS = 4    # keeps timed before the balance is trusted (the cost per keep unknown until then)

    def __init__(self):
        self.arm = False
        # layer -> {key: [[sign, resident, runs left, eta]]}: a use while the key's residency is `resident` counts
        # for recency (sign 1) or against it (-1); eta: when the kept expert's copy lands (None: a victim's side)
        self._sides: dict = {}
        self.won = self.lost = 0.0   # decaying: uses where recency's choice saved / cost a host job
        self.extra = 0.0             # decaying: keeps recency makes that frequency does not, net
        self.pairs = 0
        self.keep_s: float | None = None  # seconds a keep takes the caller (EMA)
        self._keeps_timed = 0
        self.tokens = {True: 0, False: 0}

    def standing(self, key) -> bool:
        sides = self._sides.get(key[0])
        return bool(sides and key in sides and any(s[3] is not None for s in sides[key]))

    def pair(self, key, victim, recency_keeps: bool, kept: bool, eta: float) -> None:
        """The rules disagree on keeping `key` over `victim`; the running rule `kept` it or not; a keep
        started now would land at `eta` (the other rule's, where the running one does not keep)."""
        s = 1 if recency_keeps else -1
        self._sides.setdefault(key[0], {}).setdefault(key, []).append([s, kept, self.HORIZON, eta])
        self._sides.setdefault(victim[0], {}).setdefault(victim, []).append([-s, not kept, self.HORIZON, None])
        self.extra += s
        self.pairs += 1

    def run(self, layer, used, now: float, resident, landed) -> None:
        """A run of `layer` starts at `now` using the keys `used`; resident(key): whether the cache holds
        it (its copy may be in flight), landed(key): whether its bytes are there. A kept expert used
        before its copy lands saves nothing (the host computes that use anyway)."""
        sides = self._sides.get(layer)
        if not sides:
            return
        for key in list(sides):
            entries = sides[key]
            hit = key in used
            r = resident(key) if hit else None
            left = []
            for e in entries:
                if hit:
                    if r != e[1]:
                        continue  # the caches agree on it now: what follows is not this pair's doing
                    if e[3] is None or (landed(key) if e[1] else e[3] <= now):
                        if e[0] > 0:
                            self.won += 1
                        else:
                            self.lost += 1
                e[2] -= 1
                if e[2] > 0:
                    left.append(e)
            if left:
                sides[key] = left
            else:
                del sides[key]

    def observe_keep(self, seconds: float, keeps: int) -> None:
        per = seconds / keeps
        self.keep_s = per if self.keep_s is None else 0.9 * self.keep_s + 0.1 * per
        self._keeps_timed += keeps

    def report(self) -> dict:
        """For stats(): the rule now, tokens run under each, pairs recorded, the decaying counts (uses
        recency's choice saved and cost, its extra keeps) and what a keep costs the caller (ms)."""
        return {"recency_now": self.arm, "recency_tokens": self.tokens[True], "frequency_tokens": self.tokens[False],
                "pairs": self.pairs, "recency_saved": round(self.won, 2), "recency_cost": round(self.lost, 2),
                "recency_extra_keeps": round(self.extra, 2),
                "keep_ms": None if self.keep_s is None else round(self.keep_s * 1e3, 4)}

    def balance(self, host_s: float) -> float:
        """Recency's gain over frequency, seconds over the decaying window (negative: frequency's)."""
        return (self.won - self.lost) * host_s - self.extra * (self.keep_s or 0.0)

    def token(self, host_s: float | None) -> None:
        """A token starts: decay the evidence and choose the rule."""
        self.tokens[self.arm] += 1
        if host_s is not None and self._keeps_timed >= self.MIN_KEEPS:
            noise = self.Z * host_s * math.sqrt(self.won + self.lost + 1.0)
            self.arm = self.balance(host_s) > noise
        self.won *= self.DECAY
        self.lost *= self.DECAY
        self.extra *= self.DECAY
