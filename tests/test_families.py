"""Qwen2-MoE (shared expert, dense layers), Qwen3-MoE (sparse step) and OLMoE through the same
runtime: greedy output identical to transformers for every cache size, with prefetching on."""
from __future__ import annotations

import pytest
import torch

import moe_prefetch as mp
from conftest import VOCAB, reference_generate, save_tokenizer

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 42, 11, 90, 23, 7, 54, 3]])
NEW = 16


def make(path, kind, dtype=torch.float32, **extra):
    from transformers import (OlmoeConfig, OlmoeForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig,
                              Qwen3MoeForCausalLM)

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  num_experts=6, num_experts_per_tok=2, max_position_embeddings=128, initializer_range=0.15,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cls = {"qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM,
                         dict(intermediate_size=64, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                              mlp_only_layers=[1])),
           "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM,
                         dict(intermediate_size=64, moe_intermediate_size=24, decoder_sparse_step=2, head_dim=8)),
           "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(intermediate_size=24))}[kind]
    torch.manual_seed(3)
    model = cls[1](cls[0](**common, **{**cls[2], **extra})).to(dtype)
    model.save_pretrained(path)
    save_tokenizer(path)
    return path


@pytest.mark.parametrize("kind,extra,dtype", [
    ("qwen2_moe", {}, torch.float32),
    ("qwen2_moe", {"norm_topk_prob": True}, torch.bfloat16),
    ("qwen3_moe", {}, torch.float32),
    ("olmoe", {}, torch.float32),
])
def test_family_identical_across_cache_sizes(tmp_path, kind, extra, dtype):
    path = make(tmp_path / kind, kind, dtype, **extra)
    ref = reference_generate(path, PROMPT, NEW, dtype=dtype)
    probe, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", show_progress=False))
    layers = probe.moe_runtime.adapter.moe_layers()
    total = probe.moe_runtime.plan.total_experts
    assert total == len(layers) * 6
    if kind == "qwen2_moe":
        assert layers == [0, 2, 3]
    if kind == "qwen3_moe":
        assert layers == [1, 3]
    for slots in sorted({2, 3, 6, total}):
        for predictor in ("none", "next-gate"):
            model, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", expert_cache=slots, predictor=predictor,
                                                                  lookahead=2, show_progress=False))
            with torch.inference_mode():
                out = model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            assert torch.equal(out, ref), f"{kind} {extra} slots={slots} predictor={predictor}"
            st = mp.stats(model)
            assert st["misses"] > 0 and st["total_experts"] == total
            model.moe_runtime.close()
