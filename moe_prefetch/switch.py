"""Measured choices: two ways of running, chosen by what each does to decode time on this machine.

The planner prices what it can model (a copy's link time, the host's compute); what it cannot model is
the whole effect of a choice on the machine at hand: the predictor's own compute, a copy's hand-off on
the CPU backend, copies that land but save less than their transfer. Two such choices are measured:
whether to predict at all (PredictionSwitch) and how to judge a host-computed miss for a keep
(KeepSwitch). Pure Python, no tensors; time is the caller's clock.
"""
from __future__ import annotations

import math


class MeasuredSwitch:
    """A choice between two ways of running (arms True and False), decided by what each does to decode
    time, measured on the caller's clock (wall time in the runtime, modelled time in the simulator).

    Decode runs in epochs of EPOCH_TOKENS tokens on one arm at a time; the switch keeps a decaying mean
    token time per arm and runs the faster arm, re-testing the slower one every EXPLOIT epochs (so a
    regime change is seen; the cost is one epoch in EXPLOIT + 1 on the worse arm), or every
    4 x EXPLOIT when the two differ by more than WIDE (a re-test then costs more and is less likely
    to change the answer). True must win by MARGIN to be chosen: within noise, False (the simpler arm)
    is kept. `opening` is the order of the first epochs, before any decision."""

    EPOCH_TOKENS = 4
    EXPLOIT = 7
    WIDE = 0.15
    MARGIN = 0.01
    MAX_GAP_S = 1.0  # longer between two tokens: an idle pause between generate calls, not a token
    WARMUP_TOKENS = 32  # a cache that is still not full after these decode tokens is measured as it is
    SETTLE_TOKENS = 0   # decode tokens not measured after the arm changes (what the last arm left behind)
    CONFIRM = False     # a decision that reverses the last one runs one epoch each way before it is kept

    def __init__(self, opening: tuple[bool, ...] = (True, False)):
        self.mean = {True: None, False: None}  # arm -> decaying mean seconds per decode token
        self._schedule = list(opening)  # epochs still to run before the next decision
        self.arm = self._schedule.pop(0)  # the current epoch's arm
        self._t0 = None           # when the current token started (its first MoE layer)
        self._tokens, self._seconds = 0, 0.0
        self._warmup = 0          # decode tokens not measured because the cache was still filling
        self._settling = 0        # decode tokens still to run unmeasured since the arm changed
        self._decision = None     # the arm the last decision chose
        self.epochs = {True: 0, False: 0}

    def best(self) -> bool:
        on, off = self.mean[True], self.mean[False]
        if on is None or off is None:
            return True
        return on < off * (1.0 - self.MARGIN)

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
        m = self.mean[self.arm]
        self.mean[self.arm] = t if m is None else 0.5 * m + 0.5 * t
        self.epochs[self.arm] += 1
        self._tokens, self._seconds = 0, 0.0
        if not self._schedule and None in (self.mean[True], self.mean[False]):
            self._schedule = [self.mean[True] is None]  # an opening without both arms: measure the other first
        if not self._schedule:
            best = self.best()
            on, off = self.mean[True], self.mean[False]
            wide = abs(on - off) > self.WIDE * min(on, off)
            if self.CONFIRM and self._decision is not None and best != self._decision:
                self._schedule = [best, not best]  # a change of mind, on one epoch's evidence: check it first
            else:
                self._schedule = [best] * (self.EXPLOIT * (4 if wide else 1)) + [not best]
            self._decision = best
        arm = self._schedule.pop(0)
        self._settling = self.SETTLE_TOKENS if arm != self.arm else 0
        self.arm = arm


class PredictionSwitch(MeasuredSwitch):
    """Whether predicting pays at all (arm True: predict), measured.

    The gate prices each prefetch from a model of the link and the host; what it cannot see is the
    whole effect of predicting on this machine: the predictor's own compute, the planning, copies that
    land but save less than their transfer (a layer computes its landed experts while the rest copy).
    So decode alternates epochs with and without prediction and keeps the faster (MeasuredSwitch),
    opening with two epochs of prediction and one without."""

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
    different epochs; three opening epochs, not four, as a short generation is mostly opening (simulated
    with the CPU backend's cost per copy: 0.98 -> 0.99 of the better rule on 192 tokens of the demo's
    trace). Frequency first: decode that is never measured (every layer computing several rows for some
    expert: a batch) keeps the rule that cannot churn."""

    EPOCH_TOKENS = 8    # a keep rule acts through the cache it leaves, which outlasts a short epoch:
    SETTLE_TOKENS = 8   # the first tokens after a change still run on the other arm's cache
    EXPLOIT = 15        # stickiness and the cost of a copy belong to the model and the machine: re-test rarely
    CONFIRM = True      # so a re-test that inherits the better cache and looks good is checked before it is kept

    def __init__(self):
        super().__init__(opening=(False, True, False))


class EvictionSwitch:
    """Whether the predictive eviction rule pays for its planning (arm True) or LFU's rule, by use count
    alone, evicts instead (False): priced from what each rule is measured to gain and to cost.

    Gain: while the predictive rule evicts, its policy can set each victim against the one LFU's rule
    would have chosen and count which choice the next use proved right (ghosting; the policy's
    ghost_wins); the net wins per layer times what a miss costs (the planner's cost model) is the time
    the rule saves a layer, taken optimistically: the net wins plus Z standard errors of their count,
    with one pair of doubt added, so that thin evidence favours the predictive rule. Cost: its planning
    time per layer against LFU's rule's, as the caller measures them (observe_plan_cost: the runtime's
    wall clock; the simulator's model). The hit rates differ by a point or two, so the wins are counted
    on the same uses rather than timed (a wall clock's noise over a few tokens is larger than that).
    Decode runs in epochs of EPOCH_TOKENS tokens on one rule, the first on the predictive rule. LFU's
    rule is tried only where it could win: where the gain is below the predictive rule's whole planning
    time (LFU's rule cannot save more than that), and then its own planning is measured and the two are
    compared, again after every epoch; the other rule is re-tested after EXPLOIT epochs of the better
    one (4 x as many when the predictive rule is clearly better: its gain, taken pessimistically, beats
    what LFU's rule could save): the predictive rule, to count its wins afresh; LFU's, only while it
    could still win. Once the predictive rule is clearly worth its cost, only one of its epochs in
    GHOST_EVERY compares victims (the comparison costs planning too). A caller that times no plans keeps
    the predictive rule (and compares victims as rarely)."""

    EPOCH_TOKENS = 8
    EXPLOIT = 7
    GHOST_EVERY = 4      # once it clearly pays: predictive epochs per epoch that compares victims
    DECAY = 0.85         # per comparing epoch: the wins of the last several such epochs count
    Z = 1.0
    WARMUP_TOKENS = MeasuredSwitch.WARMUP_TOKENS

    def __init__(self):
        self.arm = True
        self.ghost = True                 # this epoch compares victims (predictive arm)
        self._best = True                 # the rule the last decision found better
        self._since = 0                   # epochs since the other rule last ran (or the better one changed)
        self._clear = False               # the last decision found the predictive rule clearly worth its cost
        self._quiet = 0                   # predictive epochs since the last that compared victims
        self.plan = {True: None, False: None}  # decaying mean planning seconds per layer under each rule
        self._measuring = False           # the current token counts (decode, the cache full)
        self._tokens = self._layers = 0
        self._seconds = 0.0
        self._timed = False               # a planning time was observed this epoch
        self._seen = (0, 0)               # ghost wins already counted
        self._net = self._pairs = self._layers_on = 0.0  # decaying over comparing epochs
        self._warmup = 0
        self.epochs = {True: 0, False: 0}
        self.last = None                  # the last decision's (gain, what LFU's rule could save) per layer, seconds

    def token(self, decode: bool, warm: bool, wins, miss_cost: float) -> bool:
        """A token's first MoE layer starts (decode: one row; warm: the cache is full); wins: the policy's
        ghost_wins; miss_cost: seconds a miss costs. Returns the rule for this token (True: predictive);
        `ghost` says whether it compares victims."""
        if self._measuring:
            self._tokens += 1
            if self._tokens >= self.EPOCH_TOKENS:
                self._end_epoch(wins, miss_cost)
        if decode and not warm and self._warmup < self.WARMUP_TOKENS:
            self._warmup += 1
            decode = False
        self._measuring = decode
        return self.arm

    def layer(self) -> None:
        """A layer's run starts."""
        if self._measuring:
            self._layers += 1

    def plan_time(self, seconds: float) -> None:
        """The caller's planning of a layer (or of one round of it) took `seconds`."""
        if self._measuring:
            self._seconds += seconds
            self._timed = True

    def gain(self, miss_cost: float, z: float | None = None) -> float | None:
        """Seconds the predictive rule saves per layer over LFU's, optimistically (the net wins z standard
        errors up, Z by default; pessimistically with -Z), or None without evidence."""
        if not self._layers_on:
            return None
        z = self.Z if z is None else z
        return (self._net + z * math.sqrt(self._pairs + 1.0)) / self._layers_on * miss_cost

    def _end_epoch(self, wins, miss_cost: float) -> None:
        arm = self.arm
        if self._timed and self._layers:
            t = self._seconds / self._layers
            m = self.plan[arm]
            self.plan[arm] = t if m is None else 0.5 * m + 0.5 * t
        won, lost = wins[0] - self._seen[0], wins[1] - self._seen[1]  # pairs told apart this epoch
        self._seen = (wins[0], wins[1])
        if arm and self.ghost:
            d = self.DECAY
            self._net, self._pairs = d * self._net + won - lost, d * self._pairs + won + lost
            self._layers_on = d * self._layers_on + self._layers
        else:  # pairs made in a comparing epoch, told apart now
            self._net, self._pairs = self._net + won - lost, self._pairs + won + lost
        self.epochs[arm] += 1
        self._tokens = self._layers = 0
        self._seconds, self._timed = 0.0, False
        self.arm = self._decide(miss_cost)
        if self.arm:
            self.ghost = not self._clear or self._quiet >= self.GHOST_EVERY - 1
            self._quiet = 0 if self.ghost else self._quiet + 1

    def _decide(self, miss_cost: float) -> bool:
        """The rule for the next epoch: decided again after every epoch, on the evidence so far."""
        on, off = self.plan[True], self.plan[False]
        gain = self.gain(miss_cost)
        self._clear = False
        if on is None or gain is None:  # untimed, or no comparing epoch yet: nothing to weigh
            self.last = None
            self._clear = on is None  # untimed: the rule never changes, so victims are compared rarely
            return True
        saving = on if off is None else on - off  # what LFU's rule could save per layer (at most all of it)
        self.last = (gain, saving)
        best = gain > saving
        self._clear = best and self.gain(miss_cost, -self.Z) > max(saving, 0.0)  # even the pessimistic gain
        if off is None:  # LFU's rule never ran: its planning is measured once it could win
            return best
        if best != self._best:
            self._best, self._since = best, 0
        self._since += 1
        could_win = not best or gain <= on  # LFU's rule is re-tested only while it could still win
        if could_win and self._since > self.EXPLOIT * (4 if self._clear else 1):
            self._since = 0
            return not best
        return best
