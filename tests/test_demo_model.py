"""The packaged demo model: present, within budget, loads through the normal path, deterministic,
and identical to plain transformers."""
from __future__ import annotations

import json
import math

import torch

import moe_prefetch as mp
from moe_prefetch.hub import DEMO_DIR

PROMPT = "And God said"


def test_packaged_files_and_size():
    names = {p.name for p in DEMO_DIR.iterdir()}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "heldout.txt"):
        assert required in names, required
    total = sum(p.stat().st_size for p in DEMO_DIR.iterdir() if p.is_file())
    assert total <= 20 * 2**20, f"demo model is {total / 2**20:.1f} MiB"


def test_config_is_a_real_moe():
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["model_type"] == "mixtral"
    assert cfg["num_hidden_layers"] >= 6 and cfg["num_local_experts"] >= 8 and cfg["num_experts_per_tok"] == 2


def test_model_card_reports_heldout_quality():
    card = (DEMO_DIR / "README.md").read_text().lower()
    for word in ("licen", "perplexity", "held-out", "reproduce"):
        assert word in card, word


def test_generates_deterministically_and_matches_transformers():
    from transformers import AutoModelForCausalLM

    model, tok = mp.load_model("demo", mp.OffloadConfig(device="cpu", expert_cache=12, show_progress=False))
    assert model.config.num_local_experts == json.loads((DEMO_DIR / "config.json").read_text())["num_local_experts"]
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        a = model.generate(ids, max_new_tokens=30, do_sample=False)
        b = model.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(a, b)
    ref = AutoModelForCausalLM.from_pretrained(DEMO_DIR)
    with torch.inference_mode():
        r = ref.generate(ids, max_new_tokens=30, do_sample=False)
    assert torch.equal(a, r)
    text = tok.decode(a[0, ids.shape[1]:], skip_special_tokens=True)
    words = text.split()
    assert len(words) >= 5 and sum(w.isalpha() for w in words) >= len(words) // 2, text


def test_heldout_loss_is_far_below_random():
    """Held-out next-token loss on a slice of heldout.txt is under 60% of ln(vocab)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(DEMO_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_DIR)
    ids = tok((DEMO_DIR / "heldout.txt").read_text(encoding="utf-8")[:6000], return_tensors="pt").input_ids[:, :512]
    with torch.inference_mode():
        loss = model(ids, labels=ids).loss.item()
    assert loss < 0.6 * math.log(model.config.vocab_size), loss
