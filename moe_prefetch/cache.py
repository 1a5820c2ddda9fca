"""ExpertCache: which expert sits in which device slot, and which one to evict next.

Plain Python bookkeeping, no tensors: the data movement lives in offloader.py. Keys are
(layer, expert) pairs. An expert that is pinned (in use by the executing layer) is never evicted;
callers may also protect keys for one insertion (e.g. experts fetched for a nearer layer).
"""
from __future__ import annotations

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

    def on_insert(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    def on_access(self, key):
        self._order.move_to_end(key)

    def on_remove(self, key):
        self._order.pop(key, None)

    def victim(self, candidates):
        for key in self._order:  # oldest first
            if key in candidates:
                return key
        raise CacheFullError("no evictable expert")


class LFUPolicy(LRUPolicy):
    """Least frequently used first (counts survive eviction, as in MoE-Infinity); ties go to LRU."""

    name = "lfu"

    def __init__(self):
        super().__init__()
        self.counts: Counter[Key] = Counter()

    def on_access(self, key):
        super().on_access(key)
        self.counts[key] += 1

    def on_insert(self, key):
        super().on_insert(key)
        self.counts[key] += 1

    def victim(self, candidates):
        best, best_count = None, None
        for key in self._order:  # oldest first, so ties resolve to LRU
            if key in candidates and (best_count is None or self.counts[key] < best_count):
                best, best_count = key, self.counts[key]
        if best is None:
            raise CacheFullError("no evictable expert")
        return best


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
        self._pins: Counter[Key] = Counter()
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
        self._pins[key] += 1

    def unpin(self, key: Key) -> None:
        assert self._pins[key] > 0, f"unpin of unpinned expert {key}"
        self._pins[key] -= 1
        if not self._pins[key]:
            del self._pins[key]

    def is_pinned(self, key: Key) -> bool:
        return key in self._pins

    def has_free(self) -> bool:
        return bool(self._free)

    def evictable(self, protected: Collection[Key] = ()) -> set[Key]:
        return {k for k in self._slot_of if k not in self._pins and k not in protected}

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
