"""ExpertCache bookkeeping and eviction policies (pure Python, no tensors)."""
import pytest

from moe_prefetch.cache import CacheFullError, ExpertCache, LFUPolicy, LRUPolicy


def test_fills_free_slots_then_evicts_least_recently_used():
    c = ExpertCache(3, LRUPolicy())
    for k in ("a", "b", "c"):
        assert c.insert(k)[1] is None
    c.touch("a")  # b is now the oldest
    slot_b = c.lookup("b")
    slot, evicted = c.insert("d")
    assert evicted == "b" and slot == slot_b
    assert "b" not in c and c.lookup("d") == slot_b
    assert len(c) == 3


def test_pinned_expert_is_never_evicted():
    c = ExpertCache(2, LRUPolicy())
    c.insert("a"), c.insert("b")
    c.pin("a")
    assert c.insert("c")[1] == "b"
    c.pin("c")
    with pytest.raises(CacheFullError):
        c.insert("d")
    c.unpin("a")
    assert c.insert("d")[1] == "a"


def test_protected_keys_are_skipped():
    c = ExpertCache(2, LRUPolicy())
    c.insert("a"), c.insert("b")
    assert c.insert("c", protected={"a"})[1] == "b"


def test_insert_evicts_the_victim_the_caller_chose():
    c = ExpertCache(3, LRUPolicy())
    for k in "abc":
        c.insert(k)
    slot_b = c.lookup("b")
    assert c.insert("d", victim="b") == (slot_b, "b")  # not the LRU "a": the planner's own choice
    assert "a" in c and "b" not in c
    with pytest.raises(AssertionError):
        c.insert("e", protected={"a"}, victim="a")  # a protected expert is never evicted, chosen or not
    assert "a" in c and "e" not in c


def test_pin_counts_nest():
    c = ExpertCache(1, LRUPolicy())
    c.insert("a")
    c.pin("a"), c.pin("a")
    c.unpin("a")
    with pytest.raises(CacheFullError):
        c.insert("b")
    c.unpin("a")
    assert c.insert("b")[1] == "a"


def test_lfu_evicts_least_used_with_lru_tiebreak():
    c = ExpertCache(3, LFUPolicy())
    for k in ("a", "b", "c"):
        c.insert(k)
    c.touch("a"), c.touch("a"), c.touch("c")
    assert c.insert("d")[1] == "b"  # b used once
    assert c.insert("e")[1] == "d"  # d and ... d has 1 use, c has 2
    c.remove("e")
    assert c.insert("f")[1] is None  # removal frees the slot


def test_slot_count_never_exceeded_under_churn():
    import random

    rng = random.Random(0)
    c = ExpertCache(5, LRUPolicy())
    for _ in range(2000):
        k = rng.randrange(40)
        if k in c:
            c.touch(k)
        else:
            c.insert(k)
        assert len(c) <= 5
        slots = [c.lookup(x) for x in c.keys()]
        assert len(set(slots)) == len(slots), "two experts share a slot"


def test_lfu_heap_agrees_with_the_plain_scan_under_churn():
    """LFUPolicy.victim (a heap with stale entries) picks what victim_ref (the definition) picks, with
    pins, protected keys and uses counted for experts that are not resident."""
    import random

    from conftest import insert_checking_victim

    rng = random.Random(3)
    pol = LFUPolicy()
    c = ExpertCache(12, pol)
    for step in range(3000):
        key = (rng.randrange(4), rng.randrange(16))
        if rng.random() < 0.1:
            pol.count_use(key)  # a host-computed use
        elif key in c:
            c.touch(key)
        else:
            insert_checking_victim(c, key, rng, step)
    assert len(pol._heap) <= 4 * len(c) + 64 + 1, "stale entries are compacted"


def test_evictable_is_a_view_of_unpinned_unprotected_experts():
    c = ExpertCache(3, LRUPolicy())
    for k in "abc":
        c.insert(k)
    c.pin("a")
    view = c.evictable({"b"})
    assert "c" in view and "a" not in view and "b" not in view and "z" not in view
    assert list(view) == ["c"] and view
    c.pin("c")
    assert not view, "the view follows the cache"


def test_uses_heaps_stay_bounded_when_nothing_is_evicted():
    """LFU's heap takes an entry per use; a cache that holds every expert never asks for a victim, so the
    heap is compacted as entries are pushed (it stays within a few times the cache), for LFUPolicy and for
    eviction "auto"'s uses heap under LFU's rule, and victims still agree with the plain scan after."""
    from moe_prefetch.planner import PredictivePolicy

    lfu = LFUPolicy()
    auto = PredictivePolicy({0: 0, 1: 1}, top_k=2, num_experts=8, switchable=True)
    auto.set_rule("lfu")
    for policy in (lfu, auto):
        cache = ExpertCache(16, policy)
        for layer in (0, 1):
            for e in range(8):
                cache.insert((layer, e))
        for step in range(20_000):
            key = (step % 2, (step * 7) % 8)
            if policy is auto:
                auto.start_run(key[0], [key[1]], record=True)
            cache.touch(key)
        heap = lfu._heap if policy is lfu else auto._by_uses
        assert len(heap) <= 4 * 16 + 64 + 1, len(heap)
        everything = set(cache.keys())
        assert policy.victim(everything) == policy.victim_ref(everything)


def test_shadow_lru_holds_what_an_lru_cache_fed_the_same_uses_holds():
    """ShadowLRU (eviction auto's view of LRU's rule) against a real ExpertCache run by LRUPolicy, every
    use a demand fetch: after each run of keys both hold the same keys."""
    import random

    from moe_prefetch.cache import ShadowLRU

    rng = random.Random(4)
    for slots in (3, 8, 20):
        shadow, cache = ShadowLRU(slots), ExpertCache(slots, LRUPolicy())
        for step in range(2000):
            layer = step % 4
            keys = [(layer, e) for e in rng.sample(range(8), 2)]
            assert shadow.use(keys, set(cache.keys())) == (0, 0), "the same keys held: no use told apart"
            for key in keys:
                if key in cache:
                    cache.touch(key)
                else:
                    cache.insert(key)
            assert set(cache.keys()) == {k for k in shadow._order} and len(shadow) == len(cache), (slots, step)
    shadow = ShadowLRU(2)
    shadow.use([(0, 1), (0, 2)])
    assert shadow.use([(0, 1), (0, 3)], real={(0, 3)}) == (1, 1)  # (0, 3) the real cache's only, (0, 1) the shadow's
    assert (0, 2) not in shadow and len(shadow) == 2


def test_shadow_lfu_holds_what_an_lfu_cache_fed_the_same_uses_holds():
    """ShadowLFU (eviction auto's view of LFU's rule) against a real ExpertCache run by LFUPolicy, every use
    a demand fetch with the run's keys pinned: after each run both hold the same keys, on skewed routing
    (so that counts, not recency, decide) and on runs as large as the cache."""
    import random

    from moe_prefetch.cache import ShadowLFU

    rng = random.Random(5)
    weights = [8, 4, 2, 1, 1, 1, 1, 1]
    for slots, per_run in ((2, 2), (3, 2), (8, 3), (20, 2)):
        shadow, cache = ShadowLFU(slots), ExpertCache(slots, LFUPolicy())
        for step in range(2000):
            layer = step % 4
            experts = set()
            while len(experts) < per_run:
                experts.add(rng.choices(range(8), weights)[0])
            keys = [(layer, e) for e in sorted(experts)]
            assert shadow.use(keys, set(cache.keys())) == (0, 0), "the same keys held: no use told apart"
            for key in keys:
                if key in cache:
                    cache.touch(key)
                else:
                    cache.insert(key)
                cache.pin(key)
            for key in keys:
                cache.unpin(key)
            assert set(cache.keys()) == set(shadow._stamp) and len(shadow) == len(cache), (slots, step)
    shadow = ShadowLFU(2)
    for _ in range(3):
        shadow.use([(0, 1)])
    shadow.use([(0, 2)])
    # (0, 3) comes in: (0, 2), used once, goes, not (0, 1), used three times though less recently
    assert shadow.use([(0, 3)], real={(0, 2), (0, 3)}) == (1, 0)  # (0, 3) held by the real cache only
    assert (0, 1) in shadow and (0, 2) not in shadow and (0, 3) in shadow
    assert shadow.use([(0, 2), (0, 4)], real={(0, 2)}) == (1, 0)  # (0, 2) held by the real cache only
    assert shadow.counts[(0, 2)] == 2 and (0, 1) not in shadow, "the run's keys stay; (0, 1) and (0, 3) the others"


def test_shadow_host_lru_lands_what_an_lru_planner_with_host_compute_lands():
    """ShadowHostLRU (eviction auto's view of LRU's rule with host compute) against a real Planner run by
    LRU's policy with host compute, where every miss runs on the host and is kept in while the link has
    room: after each run both hold the same experts, and each has landed the same ones at every use; the
    uses told apart against the real cache's landed experts are none."""
    import random

    from moe_prefetch.cache import ShadowHostLRU
    from moe_prefetch.planner import Costs, Link, Planner

    rng = random.Random(6)
    costs = Costs(layer_s=1.0, expert_s=0.1, transfer_s=3.0, host_s=0.3)  # the host always beats a copy
    for slots, budget in ((3, 1), (6, 2), (12, 2), (20, 3)):
        pl = Planner(slots, [0, 1, 2, 3], 8, 2, costs, eviction="lru", host_compute=True, budget_experts=budget)
        shadow = ShadowHostLRU(slots, Link(costs.transfer_s))
        now, kept = 0.0, 0
        for step in range(1500):
            layer, now = step % 4, now + rng.choice((0.5, 1.0, 1.5))
            keys = [(layer, e) for e in rng.sample(range(8), 2)]
            landed = {k for k in keys if k in pl.cache and pl.link.landed(k, now)}
            assert shadow.use(keys, now, budget, landed) == (0, 0), (slots, step)
            actions = pl.plan_layer(now, layer, [k[1] for k in keys])
            assert {a.kind for a in actions} <= {"hit", "host"}, "every miss on the host"
            kept += len(pl.take_keeps())
            pl.release(actions)
            assert set(pl.cache.keys()) == set(shadow._order), (slots, step)
            assert all(shadow.landed(k, now + 0.7) == pl.link.landed(k, now + 0.7) for k in shadow._order)
        assert kept > 50
    # by hand: one copy at a time, a use before the keep lands is a miss, a full link keeps nothing more
    shadow = ShadowHostLRU(2, Link(1.0))
    assert shadow.use([(0, 1), (0, 2)], 0.0, 1) == (0, 0)
    assert (0, 1) in shadow and (0, 2) not in shadow and not shadow.landed((0, 1), 0.5)
    assert shadow.use([(0, 1)], 0.5, 1, real={(0, 1)}) == (1, 0)  # the real cache had it landed
    assert shadow.use([(0, 1), (0, 3)], 1.0, 1, real=set()) == (0, 1)  # landed here only
    assert shadow.use([(0, 4)], 1.5, 1) == (0, 0) and (0, 4) not in shadow  # (0, 3)'s copy fills the link
    assert shadow.use([(0, 4)], 2.0, 1) == (0, 0) and set(shadow._order) == {(0, 3), (0, 4)}
