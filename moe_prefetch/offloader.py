"""ExpertOffloader: the data-movement side of the expert cache.

Owns the device slot pool (one [slots, expert_numel] tensor), the cache bookkeeping (cache.py),
the host store (store.py) and the transfer engine (transfer.py). A layer asks for its experts with
acquire(); hits are pinned at once, misses get a slot (evicting by policy) and a demand copy;
ready() waits for that expert's copy only; release() unpins and, on CUDA, records when the compute
stream is done reading the slots so a later copy never overwrites them early.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from .cache import CacheFullError, ExpertCache, EvictionPolicy
from .stats import RunStats
from .store import ExpertStore
from .transfer import CopyJob, Ticket, TransferEngine, TransferError


class ExpertOffloader:
    def __init__(self, store: ExpertStore, n_slots: int, device: torch.device, policy: EvictionPolicy,
                 engine: TransferEngine, stats: RunStats | None = None):
        self.store = store
        self.device = device
        self.engine = engine
        self.stats = stats or RunStats()
        self.cache = ExpertCache(n_slots, policy)
        self.pool = torch.empty(n_slots, store.numel, dtype=store.dtype, device=device)  # [slots, numel]
        self._views = [store.layout.views(self.pool[s]) for s in range(n_slots)]
        self._tickets: dict[tuple[int, int], Ticket] = {}
        self._prefetched: set[tuple[int, int]] = set()  # brought in by prefetch, not yet used
        self._slot_free: list = [None] * n_slots  # CUDA events: compute stream done with the slot
        self._slot_copy: list[Ticket | None] = [None] * n_slots  # the latest copy into each slot

    @property
    def n_slots(self) -> int:
        return self.cache.n_slots

    # ---- the executing layer -----------------------------------------------------------------
    def acquire(self, layer: int, experts: list[int], in_order: bool = False) -> list[int]:
        """Pin the resident ones among `experts` and start demand copies for missing ones, as long as
        a slot can be had without evicting another expert this layer needs. Returns the granted
        experts (in the order given); the caller computes them, calls release(), and asks again for
        the rest. in_order=True grants only a prefix of `experts` (for arithmetic whose result
        depends on the order experts are added up)."""
        needed = {(layer, e) for e in experts}
        granted: set[int] = set()
        if not in_order:  # hits first, so a miss can never evict an expert this layer is about to use
            for e in experts:
                if (layer, e) in self.cache:
                    self._hit((layer, e))
                    granted.add(e)
        for e in experts:
            key = (layer, e)
            if e in granted:
                continue
            if key in self.cache:
                self._hit(key)
            else:
                try:
                    slot, evicted = self.cache.insert(key, protected=needed)
                except CacheFullError:
                    if granted:
                        break  # every slot is in use by this layer: the caller runs another round
                    slot, evicted = self.cache.insert(key)  # must make progress: a later expert goes
                self._evicted(evicted)
                self.cache.pin(key)
                self._submit(key, slot)
                self.stats.misses += 1
                self.stats.expert_requests += 1
            granted.add(e)
        if not granted:
            raise RuntimeError(f"expert cache of {self.n_slots} slots could not grant any expert of layer {layer}")
        return [e for e in experts if e in granted]

    def _hit(self, key: tuple[int, int]) -> None:
        self.cache.touch(key)
        self.cache.pin(key)
        self.stats.hits += 1
        self.stats.expert_requests += 1
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.prefetch_used += 1
            ticket = self._tickets.get(key)
            if ticket is not None and not ticket.done():
                self.stats.prefetch_late += 1
                if self.engine.cancel(ticket):  # still queued: move it to the demand queue
                    self._tickets[key] = self.engine.submit(replace(ticket.job, demand=True))
                    self._slot_copy[self.cache.lookup(key)] = self._tickets[key]

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
                self._tickets.pop(key, None)
                self.cache.unpin(key)
                self.cache.remove(key)
                raise
            # forget the ticket only once the copy has landed: an interrupted wait keeps it, so the
            # next use of this expert still waits instead of reading a half-written slot
            self._tickets.pop(key, None)
        return self._views[self.cache.lookup(key)]

    def release(self, layer: int, experts: list[int]) -> None:
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
        for e in experts:
            key = (layer, e)
            if not self.cache.is_pinned(key):
                continue  # its copy failed and ready() already dropped it
            self.cache.unpin(key)
            if done is not None:
                self._slot_free[self.cache.lookup(key)] = done

    # ---- ahead of time -------------------------------------------------------------------------
    def prefetch(self, layer: int, expert: int, protected, budget_bytes: int) -> bool:
        """Start copying an expert a later layer is predicted to need. Never evicts a pinned or
        `protected` expert; skipped when it would push bytes in flight over `budget_bytes`."""
        key = (layer, expert)
        if key in self.cache:
            self.cache.touch(key)  # predicted again: keep it
            return False
        if self.bytes_in_flight() + self.store.expert_nbytes > budget_bytes:
            self.stats.prefetch_skipped_budget += 1
            return False
        try:
            slot, evicted = self.cache.insert(key, protected)
        except CacheFullError:
            return False
        self._evicted(evicted)
        self._submit(key, slot, demand=False)
        self._prefetched.add(key)
        self.stats.prefetch_issued += 1
        return True

    def bytes_in_flight(self) -> int:
        """Bytes of all copies (demand and prefetch) not yet landed: a prefetch is only issued while
        this stays under the budget, i.e. into link capacity the executing layers leave idle."""
        return sum(t.job.nbytes for t in self._tickets.values() if not t.done())

    def _evicted(self, key) -> None:
        if key is None:
            return
        ticket = self._tickets.pop(key, None)
        # A copy still queued for the evicted expert is withdrawn (it would overwrite the slot's new
        # occupant); one already running finishes first, since the engine copies one job at a time.
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

    # ---- data movement -----------------------------------------------------------------------
    def _submit(self, key: tuple[int, int], slot: int, demand: bool = True) -> None:
        job = CopyJob(dst=self.pool[slot], pieces=self.store.pieces(*key), nbytes=self.store.expert_nbytes,
                      label=f"expert {key[1]} of layer {key[0]}", after=self._slot_free[slot], demand=demand,
                      follows=prev if (prev := self._slot_copy[slot]) is not None and not prev.done() else None)
        self._tickets[key] = self._slot_copy[slot] = self.engine.submit(job)
        self.stats.bytes_to_device += job.nbytes

    def resident(self) -> list[tuple[int, int]]:
        return sorted(self.cache.keys())

    def close(self) -> None:
        self.engine.close()
        self._tickets.clear()
