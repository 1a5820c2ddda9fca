"""Greedy output through the runtime is token-identical to plain transformers, for every cache size.

Runs on TEST_DEVICE (conftest: MOE_PREFETCH_TEST_DEVICE, else CUDA where present, else CPU); the
reference runs on the same device."""
from __future__ import annotations

import pytest
import torch

import moe_prefetch as mp
from conftest import TEST_DEVICE, make_mixtral, reference_generate

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 42, 11, 90, 23, 7, 54, 3, 71, 29, 46, 88]])  # [1, 16]
NEW = 24

SHAPES = {
    # name: (make_mixtral kwargs, reference/runtime kwargs)
    "l2-e4-k2": dict(layers=2, experts=4, top_k=2),
    "l3-e8-k2-sharded": dict(layers=3, experts=8, top_k=2, shard="40KB"),
    "l2-e6-k3-tied": dict(layers=2, experts=6, top_k=3, tie=True, seed=3),
    "l2-e4-k1-bf16": dict(layers=2, experts=4, top_k=1, dtype=torch.bfloat16, seed=5),
}
if TEST_DEVICE.startswith("cuda"):  # half precision is converted to float32 on the CPU backend
    SHAPES["l2-e4-k2-fp16"] = dict(layers=2, experts=4, top_k=2, dtype=torch.float16, seed=7)


def cache_sizes(layers, experts, top_k):
    total = layers * experts
    return sorted({top_k, top_k + 1, experts, total // 2, total})


def run(path, slots, dtype, **kw):
    model, _ = mp.load_model(str(path), mp.OffloadConfig(device=TEST_DEVICE, expert_cache=slots, show_progress=False, **kw))
    with torch.inference_mode():
        out = model.generate(PROMPT.to(TEST_DEVICE), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    st = mp.stats(model)
    model.moe_runtime.close()
    return out.cpu(), st


@pytest.mark.parametrize("name", list(SHAPES))
def test_greedy_identical_across_cache_sizes(tmp_path, name):
    spec = dict(SHAPES[name])
    dtype = spec.get("dtype", torch.float32)
    path = make_mixtral(tmp_path / name, **spec)
    if "shard" in spec:
        assert (path / "model.safetensors.index.json").is_file(), "sharding did not happen"
    ref = reference_generate(path, PROMPT, NEW, dtype=dtype)
    layers, experts, k = spec["layers"], spec["experts"], spec["top_k"]
    for slots in cache_sizes(layers, experts, k):
        out, st = run(path, slots, dtype)
        assert torch.equal(out, ref), f"{name}: cache of {slots} slots diverged from transformers"
        assert st["expert_cache_slots"] == slots
        assert st["expert_requests"] == st["hits"] + st["misses"]
        if slots < layers * experts:
            assert st["misses"] > layers * experts - slots, "a cache smaller than the model must refetch"
        else:
            assert st["misses"] <= layers * experts, "a full cache fetches each expert at most once"


def test_eager_experts_implementation_identical(tmp_path):
    path = make_mixtral(tmp_path / "eager", layers=2, experts=6, top_k=3, seed=11)
    ref = reference_generate(path, PROMPT, NEW, experts_implementation="eager")
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    cfg.experts_implementation = "eager"
    cfg.save_pretrained(path)
    for slots in (3, 5, 12):
        out, _ = run(path, slots, torch.float32)
        assert torch.equal(out, ref), f"eager path with {slots} slots diverged"


def test_full_forward_logits_bitwise_equal(tiny_mixtral):
    """Not just argmax: prefill logits are bit-for-bit the reference's, even with rounds (2 slots)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny_mixtral).to(TEST_DEVICE)
    model, _ = mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device=TEST_DEVICE, expert_cache=2, show_progress=False))
    with torch.inference_mode():
        a = ref(PROMPT.to(TEST_DEVICE)).logits
        b = model(PROMPT.to(TEST_DEVICE)).logits
    assert torch.equal(a, b)


def test_minimum_cache_runs_prefill_in_rounds(tiny_mixtral):
    model, _ = mp.load_model(str(tiny_mixtral), mp.OffloadConfig(device=TEST_DEVICE, expert_cache=2, show_progress=False))
    with torch.inference_mode():
        model(PROMPT.to(TEST_DEVICE))
    st = mp.stats(model)
    # a 16-token prompt routes to all 4 experts of each layer, but only 2 slots exist
    assert st["misses"] == 2 * 4 and st["hits"] == 0
    assert len(model.moe_runtime.offloader.resident()) == 2


@pytest.mark.parametrize("host", [False, True], ids=["copies", "host-compute"])
def test_greedy_identical_while_the_eviction_rule_changes(tmp_path, host, monkeypatch):
    """eviction "auto" (the default) changes its rule (predictive, LFU's or, where misses are copied in,
    LRU's) between epochs of decode; with one-token epochs and the decision made to cycle through the
    rules, the rule changes every token, and output stays the reference's at every cache size (the rule
    decides only what stays in the cache), as with each rule fixed."""
    from moe_prefetch.switch import EvictionSwitch

    def cycle(self, miss_cost):
        rules = self.RULES if self.shadowed else ("predictive", "lfu")
        return rules[(rules.index(self.rule) + 1) % len(rules)] if self.rule in rules else "predictive"

    monkeypatch.setattr(EvictionSwitch, "EPOCH_TOKENS", 1)
    monkeypatch.setattr(EvictionSwitch, "RETEST_EPOCHS", 1)
    monkeypatch.setattr(EvictionSwitch, "WARMUP_TOKENS", 0)
    monkeypatch.setattr(EvictionSwitch, "_decide", cycle)
    path = make_mixtral(tmp_path / "m", layers=3, experts=6, top_k=2, seed=13)
    ref = reference_generate(path, PROMPT, NEW)
    extra = dict(host_compute="on", host_bandwidth=2e9) if host and not TEST_DEVICE.startswith("cuda") else {}
    for slots in (3, 7, 12):
        for eviction in ("auto", "predictive", "lfu", "lru"):
            model, _ = mp.load_model(str(path), mp.OffloadConfig(device=TEST_DEVICE, expert_cache=slots, eviction=eviction,
                                                                 show_progress=False, **extra))
            with torch.inference_mode():
                out = model.generate(PROMPT.to(TEST_DEVICE), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            switch = model.moe_runtime.offloader.planner.eviction_switch
            model.moe_runtime.close()
            assert torch.equal(out.cpu(), ref), f"{eviction} eviction with {slots} slots diverged"
            if eviction == "auto":
                ran = {r for r, n in switch.epochs.items() if n}
                assert ran == ({"predictive", "lfu"} if extra else set(EvictionSwitch.RULES)), ran
            else:
                assert switch is None
