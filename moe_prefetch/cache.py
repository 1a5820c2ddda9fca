"""ExpertCache: which expert sits in which device slot, and which one to evict next.

Plain Python bookkeeping, no tensors: the data movement lives in offloader.py. Keys are
(layer, expert) pairs. An expert that is pinned (in use by the executing layer) is never evicted;
callers may also protect keys for one insertion (e.g. experts fetched for a nearer layer).
"""
from __future__ import annotations

import heapq
from collections import Counter, OrderedDict
from collections.abc import Collection, Hashable

Key = Hashable


class CacheFullError(RuntimeError):
    """Every slot holds a pinned or protected expert: nothing can be evicted."""


class EvictionPolicy:
    """Orders resident keys for eviction. Subclasses keep their own per-key state."""

    name = "base"

    def on_insert(self, key: Key) -> None: ...
    def on_access(self, key: Key) -> None: ...
    def on_remove(self, key: Key) -> None: ...

    def victim(self, candidates: Collection[Key]) -> Key:
        raise NotImplementedError


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self):
        self._order: OrderedDict[Key, None] = OrderedDict()
        self._stamp: dict[Key, int] = {}  # key -> when it was last inserted or accessed: its place in _order
        self._clock = 0

    def _restamp(self, key) -> None:
        self._clock += 1
        self._stamp[key] = self._clock

    def on_insert(self, key):
        self._order[key] = None
        self._order.move_to_end(key)
        self._restamp(key)

    def on_access(self, key):
        self._order.move_to_end(key)
        self._restamp(key)

    def on_remove(self, key):
        self._order.pop(key, None)
        self._stamp.pop(key, None)

    def victim(self, candidates):
        for key in self._order:  # oldest first: stops at the first evictable one
            if key in candidates:
                return key
        raise CacheFullError("no evictable expert")


class LFUPolicy(LRUPolicy):
    """Least frequently used first (counts survive eviction, as in MoE-Infinity); ties go to LRU.

    A heap of (count, stamp, key) finds the victim in O(log n) (entries made stale by a later use or a
    removal are dropped as they surface); victim_ref() is the plain scan it must agree with."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.counts: Counter[Key] = Counter()
        self.group_counts: Counter = Counter()  # (layer, expert) keys: uses per layer
        self._heap: list = []

    def count_use(self, key) -> None:
        """One more use of `key`, resident or not (a host-computed miss counts too)."""
        self.counts[key] += 1
        if isinstance(key, tuple):
            self.group_counts[key[0]] += 1
        if key in self._stamp:
            self._heap = push_uses(self._heap, self.counts, self._stamp, key)

    def on_access(self, key):
        super().on_access(key)
        self.count_use(key)

    def on_insert(self, key):
        super().on_insert(key)
        self.count_use(key)

    def victim(self, candidates):
        found, self._heap = fewest_uses(self._heap, self.counts, self._stamp, candidates)
        if found is None:
            raise CacheFullError("no evictable expert")
        return found

    def victim_ref(self, candidates):
        """The definition: the fewest uses, ties to the least recently used."""
        return fewest_uses_ref(self._order, self.counts, candidates)


def fewest_uses(heap: list, counts, stamps: dict, candidates) -> tuple:
    """LFU's victim: the candidate with the fewest uses, ties to the least recently used, from a lazy heap
    of (uses, stamp, key), one entry pushed whenever a resident key's uses or stamp change (older entries
    are stale and dropped as they surface). Returns (the key or None, the heap: rebuilt from the resident
    keys, `stamps`, when mostly stale)."""
    aside, found = [], None
    while heap:
        count, stamp, key = heap[0]
        if stamps.get(key) != stamp or counts[key] != count:
            heapq.heappop(heap)
        elif key in candidates:
            found = key
            break
        else:
            aside.append(heapq.heappop(heap))  # pinned or protected now: back in afterwards
    for entry in aside:
        heapq.heappush(heap, entry)
    return found, _compacted(heap, counts, stamps)


def push_uses(heap: list, counts, stamps: dict, key) -> list:
    """Push resident `key`'s current (uses, stamp) entry into fewest_uses()'s heap. A heap grown mostly stale
    (no victim asked for a while: a cache that holds every expert never evicts) is rebuilt from the
    resident keys, so it stays within a few times the cache's size; returns the heap."""
    heapq.heappush(heap, (counts[key], stamps[key], key))
    return _compacted(heap, counts, stamps)


def _compacted(heap: list, counts, stamps: dict) -> list:
    """The heap, or, when it is mostly stale entries, one rebuilt from the resident keys' current ones."""
    if len(heap) > 4 * len(stamps) + 64:
        heap = [(counts[k], t, k) for k, t in stamps.items()]
        heapq.heapify(heap)
    return heap


def fewest_uses_ref(order, counts, candidates):
    """fewest_uses() by a pass over the resident keys, oldest first (so ties resolve to LRU)."""
    best, best_count = None, None
    for key in order:
        if key in candidates and (best_count is None or counts[key] < best_count):
            best, best_count = key, counts[key]
    if best is None:
        raise CacheFullError("no evictable expert")
    return best


def tell_apart(shadow, keys, real: Collection[Key] | None) -> tuple[int, int]:
    """Of a run's `keys`, how many the real cache holds and `shadow` does not, and the reverse ((0, 0)
    without `real`): what ShadowLRU.use() and ShadowLFU.use() report, counted before they take the uses."""
    if real is None:
        return 0, 0
    won = lost = 0
    for key in keys:
        held = key in shadow
        if held != (key in real):
            if held:
                lost += 1
            else:
                won += 1
    return won, lost


class ShadowLRU:
    """The keys an LRU cache of `n_slots` would hold, fed the same uses as the real cache, every use a
    demand fetch (no prefetches, no pins): which of a run's experts LRU's rule would have hit, at a few
    dictionary operations per use. Eviction `auto` sets the real cache's hits against it (EvictionSwitch):
    a rule's victims can be compared one at a time with LFU's (a lazy heap finds LFU's choice), but
    LRU's own choices are what make its cache, and only a cache run by that rule shows them."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self._order: OrderedDict[Key, None] = OrderedDict()

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def use(self, keys, real: Collection[Key] | None = None) -> tuple[int, int]:
        """`keys` (one run's, distinct) are used now: each moves to the newest end, the oldest go past
        `n_slots`. real: the real cache, to tell the uses apart first; returns (held by it only, held by
        the shadow only), (0, 0) without it."""
        told = tell_apart(self, keys, real)
        order = self._order
        for key in keys:
            if key in order:
                order.move_to_end(key)
            else:
                order[key] = None
        while len(order) > self.n_slots:
            order.popitem(last=False)
        return told


class ShadowLFU:
    """The keys an LFU cache of `n_slots` would hold (LFUPolicy's rule: the fewest uses, counts that
    survive eviction, ties to the least recently used), fed the same uses as the real cache, every use a
    demand fetch: ShadowLRU's counterpart for LFU's rule. Set against a cache run by another rule, it
    counts the hits that rule's own choices make, which comparing one victim at a time with LFU's cannot:
    on the demo at 75% cache the predictive rule won 41-44 of its victim pairs to LFU's 15-21 while
    this shadow told apart 119 uses held by the real cache only and 116 by the shadow only, as the two
    rules' hit rates (0.766-0.769 and 0.765) say. A run's keys are never its own victims (the real cache
    pins them).

    A use only counts and stamps its key: a key's (uses, last use) only grow, so a heap entry left
    behind is a lower bound, renewed when it surfaces (a heap push per shadow miss, not per use)."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self.counts: dict[Key, int] = {}  # every key's uses, resident or not
        self._stamp: dict[Key, int] = {}  # resident key -> its last use
        self._clock = 0
        self._heap: list = []             # (uses, stamp, key) per resident key, possibly behind its key's

    def __contains__(self, key: Key) -> bool:
        return key in self._stamp

    def __len__(self) -> int:
        return len(self._stamp)

    def use(self, keys, real: Collection[Key] | None = None) -> tuple[int, int]:
        """`keys` (one run's, distinct) are used now: each is counted and held, then the fewest-used of
        the other keys go past `n_slots`. real: as ShadowLRU.use()."""
        told = tell_apart(self, keys, real)
        stamp, counts, heap = self._stamp, self.counts, self._heap
        for key in keys:
            held = key in stamp
            n = counts[key] = counts.get(key, 0) + 1
            self._clock += 1
            stamp[key] = self._clock
            if not held:
                heapq.heappush(heap, (n, self._clock, key))
        if len(stamp) > self.n_slots:
            self._evict(keys)
        return told

    def _evict(self, run) -> None:
        stamp, counts, heap = self._stamp, self.counts, self._heap
        aside = []
        while len(stamp) > self.n_slots and heap:
            n, t, key = heapq.heappop(heap)
            now = stamp.get(key)
            if now is None or (now == t and counts[key] == n and key in run):
                if now is not None:
                    aside.append((n, t, key))  # this run's: kept, its entry back in afterwards
                continue  # (an entry of a key no longer held is dropped)
            if now != t or counts[key] != n:
                heapq.heappush(heap, (counts[key], now, key))  # behind: renewed
                continue
            del stamp[key]
        for entry in aside:
            heapq.heappush(heap, entry)
        while len(stamp) > self.n_slots:  # a run larger than the cache: its own fewest-used go too
            key = min(stamp, key=lambda k: (counts[k], stamp[k]))
            del stamp[key]
        if len(heap) > 2 * len(stamp) + 64:  # entries of keys gone (evicted ones re-entered on return)
            self._heap = [(counts[k], t, k) for k, t in stamp.items()]
            heapq.heapify(self._heap)


class ShadowHostLRU:
    """The experts an LRU cache would have landed where misses run on the host (host compute): ShadowLRU's
    counterpart when a miss is not copied in on demand. LRU's rule then keeps every host-computed miss
    (copies it in the background, evicting the least recently used) while its link has room (fewer than
    `budget` copies in flight), and the copy saves nothing until it lands: a use before then is a host
    job all the same. So this shadow queues its own keeps on a `link` of its own (the planner's Link: a
    victim's copy that has not started is withdrawn, and a kept expert used before its copy starts goes
    ahead of the keeps queued, as the planner does on the real one) and holds a key for a use only once
    its copy has landed. Fed every run with the time it starts, it tells which uses LRU's rule would have
    hit where the real cache did not (a shadow that copied every miss in at once overrated LRU's rule)."""

    def __init__(self, n_slots: int, link):
        self.n_slots = n_slots
        self.link = link
        self._order: OrderedDict[Key, None] = OrderedDict()  # resident keys, LRU order (their copies on `link`)

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)

    def landed(self, key: Key, now: float) -> bool:
        return key in self._order and self.link.landed(key, now)

    def use(self, keys, now: float, budget: int, real: Collection[Key] | None = None) -> tuple[int, int]:
        """`keys` (one run's, distinct) are used at `now`: held ones move to the newest end, and the misses
        are kept in, in order, while fewer than `budget` copies are in flight. real: the keys whose bytes
        the real cache had at `now`; returns (landed there only, landed here only), (0, 0) without it."""
        order, link = self._order, self.link
        told = tell_apart({key for key in keys if self.landed(key, now)} if real is not None else (), keys, real)
        fresh = []
        for key in keys:
            if key in order:
                order.move_to_end(key)
                if link.cancel(key, now):  # used before its copy started: the copy goes first
                    link.send(key, now, demand=True)
            else:
                fresh.append(key)
        for key in fresh:
            if link.in_flight(now) >= budget:
                break  # the link is full: LRU's rule keeps nothing more now
            if len(order) >= self.n_slots:
                victim = next(iter(order))
                if victim in keys:
                    break  # every slot holds this run's experts
                del order[victim]
                link.cancel(victim, now)  # (a copy on the wire lands all the same)
            order[key] = None
            link.send(key, now, demand=False)
        return told


POLICIES = {"lru": LRUPolicy, "lfu": LFUPolicy}


def make_policy(name: str) -> EvictionPolicy:
    return POLICIES[name]()


class ExpertCache:
    """Slot assignment for `n_slots` experts with a pluggable eviction policy."""

    def __init__(self, n_slots: int, policy: EvictionPolicy | None = None):
        if n_slots < 1:
            raise ValueError("an expert cache needs at least one slot")
        self.n_slots = n_slots
        self.policy = policy or LRUPolicy()
        self._slot_of: dict[Key, int] = {}
        self._free = list(range(n_slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._pins: dict[Key, int] = {}  # key -> pins held (a plain dict: a Counter's misses and deletes are Python-level)
        self._per_layer: Counter = Counter()  # (layer, expert) keys: resident experts per layer

    def count(self, layer) -> int:
        """Resident experts of `layer` (keys are (layer, expert) pairs)."""
        return self._per_layer[layer]

    def _group(self, key: Key):
        return key[0] if isinstance(key, tuple) else None

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, key: Key) -> bool:
        return key in self._slot_of

    def lookup(self, key: Key) -> int | None:
        return self._slot_of.get(key)

    def keys(self):
        return self._slot_of.keys()

    def touch(self, key: Key) -> None:
        self.policy.on_access(key)

    def pin(self, key: Key) -> None:
        assert key in self._slot_of, f"pin of non-resident expert {key}"
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: Key) -> None:
        n = self._pins.get(key, 0)
        assert n > 0, f"unpin of unpinned expert {key}"
        if n > 1:
            self._pins[key] = n - 1
        else:
            del self._pins[key]

    def is_pinned(self, key: Key) -> bool:
        return key in self._pins

    def has_free(self) -> bool:
        return bool(self._free)

    def evictable(self, protected: Collection[Key] = ()) -> "Evictable":
        """The experts that may be evicted now (unpinned, unprotected), as a view: membership is O(1)
        and nothing is copied, so finding a victim does not cost a pass over the whole cache."""
        return Evictable(self, protected)

    def insert(self, key: Key, protected: Collection[Key] = (), victim: Key | None = None) -> tuple[int, Key | None]:
        """Give `key` a slot: a free one, or the policy's victim among unpinned, unprotected experts
        (`victim`: one the caller already had the policy choose among those). Returns (slot, evicted key
        or None). Raises CacheFullError when nothing may be evicted."""
        assert key not in self._slot_of, f"expert {key} is already cached"
        evicted = None
        if self._free:
            slot = self._free.pop()
        else:
            if victim is not None:
                assert victim in self._slot_of and victim not in protected, f"victim {victim} may not be evicted"
                evicted = victim
            else:
                candidates = self.evictable(protected)
                if not candidates:
                    raise CacheFullError(f"all {self.n_slots} expert slots are pinned or protected")
                evicted = self.policy.victim(candidates)
            assert evicted not in self._pins, "policy chose a pinned expert"
            slot = self._slot_of.pop(evicted)
            self._per_layer[self._group(evicted)] -= 1
            self.policy.on_remove(evicted)
        self._slot_of[key] = slot
        self._per_layer[self._group(key)] += 1
        self.policy.on_insert(key)
        assert len(self._slot_of) <= self.n_slots
        return slot, evicted

    def remove(self, key: Key) -> int:
        """Forget `key` (e.g. its copy failed); its slot becomes free."""
        assert key not in self._pins, f"removing pinned expert {key}"
        slot = self._slot_of.pop(key)
        self._per_layer[self._group(key)] -= 1
        self._free.append(slot)
        self.policy.on_remove(key)
        return slot


class Evictable:
    """cache.evictable()'s view: resident, unpinned and not protected. Iterating it is a full pass
    (only the simulator's Belady bound does); `in` and truth are what the policies use."""

    def __init__(self, cache: ExpertCache, protected: Collection[Key]):
        self._cache, self._protected = cache, protected

    def __contains__(self, key) -> bool:
        c = self._cache
        return key in c._slot_of and key not in c._pins and key not in self._protected

    def __iter__(self):
        return (k for k in self._cache._slot_of if k in self)

    def __bool__(self) -> bool:
        c = self._cache
        if len(c._slot_of) > len(c._pins) + len(self._protected):
            return True  # more resident experts than pinned and protected ones together: one is neither
        return any(True for _ in self)
