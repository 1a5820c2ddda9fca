"""ExpertOffloader: the data-movement side of the expert cache. The planner (planner.py) decides;
this executes.

Owns the device slot pool (one [slots, expert_numel] tensor), the host store (store.py), the transfer
engine (transfer.py) and the host executor (host_compute.py). A layer asks for its experts with
acquire(): the planner answers with one action per expert (hit, wait, copy, host) and this starts the
demand copies, promotes a late prefetch still queued to a demand copy, and withdraws the queued copy
of any expert the planner evicted. ready() waits for one expert's copy only; release() unpins and, on
CUDA, records when the compute stream is done reading the slots so a later copy never overwrites them
early. prefetch() executes the planner's prefetch actions; start_keeps() its copies of host-computed
misses worth keeping, decided while the layer waits for the host. The planner's clock is perf_counter, and
its cost model is refreshed from what the engine and the host executor measured.
"""
from __future__ import annotations

import time

import torch

from .planner import Action, Costs, Planner
from .stats import RunStats
from .store import ExpertStore
from .transfer import CopyJob, Ticket, TransferEngine, TransferError


class ExpertOffloader:
    def __init__(self, store: ExpertStore, planner: Planner, device: torch.device, engine: TransferEngine,
                 stats: RunStats | None = None, host=None):
        self.store = store
        self.planner = planner
        self.cache = planner.cache
        self.device = device
        self.engine = engine
        self.host = host  # HostExecutor, when host compute is on
        self.stats = stats or RunStats()
        n_slots = self.cache.n_slots
        self.pool = torch.empty(n_slots, store.numel, dtype=store.dtype, device=device)  # [slots, numel]
        self._views = [store.layout.views(self.pool[s]) for s in range(n_slots)]
        self._tickets: dict[tuple[int, int], Ticket] = {}
        # the same tickets less those seen done (a done ticket stays done): copies_in_flight() asks only these,
        # not every ticket of an expert brought in and not used yet (on CUDA each ask is an event query)
        self._outstanding: dict[tuple[int, int], Ticket] = {}
        self._prefetched: set[tuple[int, int]] = set()  # brought in by prefetch, not yet used
        self._slot_free: list = [None] * n_slots  # CUDA events: compute stream done with the slot
        self._slot_copy: list[Ticket | None] = [None] * n_slots  # the latest copy into each slot
        self._last_plan: float | None = None
        self._layer_gap = None  # EMA of wall time between consecutive layers' plans (one layer's work)

    @property
    def n_slots(self) -> int:
        return self.cache.n_slots

    @staticmethod
    def clock() -> float:
        return time.perf_counter()

    # ---- the executing layer -----------------------------------------------------------------
    def acquire(self, layer: int, experts: list[int], rows: dict[int, int] | None = None,
                in_order: bool = False) -> list[Action]:
        """The planner's actions for as many of `experts` as can run now (the caller computes them,
        calls release(), and asks again for the rest). in_order=True grants only a prefix of
        `experts` (for arithmetic whose result depends on the order experts are added up)."""
        now = self.clock()
        self._track_layer_time(now)
        actions = self.planner.plan_layer(now, layer, experts, rows, in_order)
        spent = self.clock() - now
        self.stats.plan_seconds += spent
        self.planner.observe_plan_cost(spent)
        if not actions:
            raise RuntimeError(f"expert cache of {self.n_slots} slots could not grant any expert of layer {layer}")
        started = 0
        try:
            for a in actions:
                self.stats.expert_requests += 1
                if a.kind == "copy":
                    self._evicted(a.evicted)
                    self._submit(a.key, a.slot)
                    self.stats.misses += 1
                elif a.kind == "host":
                    self.stats.host_computed += 1
                    self._used_prefetch(a.key)
                else:
                    self.stats.hits += 1
                    self._used_prefetch(a.key)
                started += 1
        except BaseException:  # e.g. Ctrl-C in a copy made on this thread: the caller never gets these actions
            self._abandon([a for a in actions[started + 1:] if a.kind == "copy"])
            self.planner.cancel_keeps()
            self.planner.release(actions)
            raise
        return actions

    def settle(self, actions: list[Action] = (), jobs=()) -> None:
        """Do the planner's bookkeeping of the last acquire() (Planner.settle). The layer calls this once
        its copies and host `jobs` are started, before it computes: while one of the copies or jobs of
        `actions` is still in flight when it is done, the layer waits for that anyway, so the time is
        charged to planning (and to the eviction rule's price) only when nothing was."""
        t0 = self.clock()
        if not self.planner.settle():
            return
        t1 = self.clock()
        self.stats.settle_seconds += t1 - t0
        waiting = any(a.kind in ("copy", "wait") and not self.landed(*a.key) for a in actions) \
            or (self.host is not None and bool(jobs) and self.host.ready_at(jobs) > t1)
        if waiting:
            self.stats.settle_hidden_seconds += t1 - t0
        else:
            self.stats.plan_seconds += t1 - t0
            self.planner.observe_plan_cost(t1 - t0)

    def start_keeps(self, jobs=()) -> None:
        """Decide and start the copies of the last acquire()'s host-computed misses that are worth keeping
        (planner.take_keeps). The layer calls this once its device work is done, before it waits for the
        host's `jobs`: the decisions and the copies' hand-offs then cost it only what runs past the host's
        results, and only that part is charged to planning and to the keeps (the keep ledger's price of one)."""
        t0 = self.clock()
        keeps = self.planner.take_keeps(t0)
        t1 = self.clock()
        if keeps:
            self.prefetch(keeps)
        t2 = self.clock()
        ready = self.host.ready_at(jobs) if self.host is not None and jobs else -float("inf")
        planning = max(0.0, t1 - max(t0, ready))  # what the host's wait did not cover
        self.stats.plan_seconds += planning
        self.planner.observe_plan_cost(planning)
        if keeps:
            self.planner.observe_keep_cost(max(0.0, t2 - max(t1, ready)))

    def _abandon(self, actions: list[Action]) -> None:
        """Copies the planner decided on that were never submitted: their slots hold nothing, so the
        planner forgets those experts (the experts they evicted are gone already)."""
        for a in actions:
            self._evicted(a.evicted)
            self.planner.remove(a.key)

    def _used_prefetch(self, key: tuple[int, int]) -> None:
        if key not in self._prefetched:
            return
        self._prefetched.discard(key)
        self.stats.prefetch_used += 1
        ticket = self._tickets.get(key)
        if ticket is not None and not ticket.done():
            self.stats.prefetch_late += 1
            if self.engine.cancel(ticket):  # still queued: move it to the demand queue
                self.stats.bytes_to_device -= ticket.job.nbytes  # counted again by its demand copy
                self._submit(key, self.cache.lookup(key))

    def landed(self, layer: int, expert: int) -> bool:
        """The expert's bytes are in its slot (no copy outstanding); asks the engine, never waits."""
        ticket = self._tickets.get((layer, expert))
        return ticket is None or ticket.done()

    def resident_count(self, layer: int) -> int:
        """Experts of `layer` holding a slot (landed or in flight)."""
        return self.cache.count(layer)

    def ready(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Views of the expert's matrices in its slot, once its copy (if any) has landed."""
        key = (layer, expert)
        ticket = self._tickets.get(key)
        if ticket is not None:
            try:
                self.stats.stall_seconds += self.engine.wait(ticket)
            except TransferError:
                self._drop_ticket(key)
                self.planner.remove(key)
                raise
            # forget the ticket only once the copy has landed: an interrupted wait keeps it, so the
            # next use of this expert still waits instead of reading a half-written slot
            self._drop_ticket(key)
        return self._views[self.cache.lookup(key)]

    def release(self, actions: list[Action]) -> None:
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        for a in actions:
            if a.kind != "host" and self.cache.is_pinned(a.key) and done is not None:
                self._slot_free[self.cache.lookup(a.key)] = done
        self.settle()  # where the layer did not (a caller of acquire() that never settles)
        if self.planner.keeps_undecided:
            self.start_keeps()  # where the layer did not (a caller of acquire() that never waits on the host)
        self.planner.release(actions)  # a copy that failed was already dropped by ready()

    # ---- ahead of time -------------------------------------------------------------------------
    def prefetch(self, actions: list[Action]) -> None:
        """Start the copies the planner decided to make ahead of time."""
        for i, a in enumerate(actions):
            self._evicted(a.evicted)
            try:
                self._submit(a.key, a.slot, demand=False)
            except BaseException:  # _submit forgot this one; the rest were never started
                self._abandon(actions[i + 1:])
                raise
            self._prefetched.add(a.key)
            self.stats.prefetch_issued += 1

    def _track(self, key, ticket: Ticket) -> Ticket:
        """`key`'s copy is now `ticket` (in both maps: every ticket kept, and those not seen done)."""
        self._tickets[key] = self._outstanding[key] = ticket
        return ticket

    def _drop_ticket(self, key) -> Ticket | None:
        """Forget `key`'s ticket in both maps; returns it (None if there was none)."""
        self._outstanding.pop(key, None)
        return self._tickets.pop(key, None)

    def copies_in_flight(self) -> int:
        """Copies (demand and prefetch) submitted and not yet landed, as the engine reports them."""
        outstanding = self._outstanding
        for key in [key for key, t in outstanding.items() if t.done()]:
            del outstanding[key]
        return len(outstanding)

    def _evicted(self, key) -> None:
        if key is None:
            return
        ticket = self._drop_ticket(key)
        # A copy still queued for the evicted expert is withdrawn (it would overwrite the slot's new
        # occupant); one already running finishes first (the engines order copies into one slot).
        cancelled = ticket is not None and self.engine.cancel(ticket)
        if cancelled:
            self.stats.bytes_to_device -= ticket.job.nbytes
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.prefetch_wasted += 1
            if cancelled:
                self.stats.prefetch_cancelled += 1
            else:
                self.stats.bytes_wasted += self.store.expert_nbytes

    # ---- costs ---------------------------------------------------------------------------------
    def _track_layer_time(self, now: float) -> None:
        """Refresh the planner's costs from measurements: one layer's wall time (between plans),
        the link time per expert the engine measured, the host executor's time per expert."""
        if self._last_plan is not None:
            gap = now - self._last_plan
            if gap < 1.0:  # not across an idle pause between generate calls
                self._layer_gap = gap if self._layer_gap is None else 0.9 * self._layer_gap + 0.1 * gap
        self._last_plan = now
        c = self.planner.costs
        transfer_s = getattr(self.engine, "seconds_per_copy", lambda: None)() or c.transfer_s
        measured = self.host.seconds_per_job() if self.host is not None else None  # asked once per layer
        host_s = c.host_s if measured is None else measured
        layer_s = c.layer_s if self._layer_gap is None else max(self._layer_gap - self.planner.top_k * c.expert_s, 0.0)
        if (transfer_s, host_s, layer_s) != (c.transfer_s, c.host_s, c.layer_s):
            self.planner.set_costs(Costs(layer_s, c.expert_s, transfer_s, host_s))

    # ---- data movement -----------------------------------------------------------------------
    def _submit(self, key: tuple[int, int], slot: int, demand: bool = True) -> None:
        job = CopyJob(dst=self.pool[slot], pieces=self.store.pieces(*key), nbytes=self.store.expert_nbytes,
                      label=f"expert {key[1]} of layer {key[0]}", after=self._slot_free[slot], demand=demand,
                      follows=prev if (prev := self._slot_copy[slot]) is not None and not prev.done() else None)
        try:
            ticket = self.engine.submit(job)
        except BaseException:  # e.g. Ctrl-C in a copy made on this thread: the slot may be half-written
            self.planner.remove(key)
            raise
        self._slot_copy[slot] = self._track(key, ticket)
        self.stats.bytes_to_device += job.nbytes

    def resident(self) -> list[tuple[int, int]]:
        return sorted(self.cache.keys())

    def close(self) -> None:
        self.engine.close()
        if self.host is not None:
            self.host.close()
        self._tickets.clear()
        self._outstanding.clear()
