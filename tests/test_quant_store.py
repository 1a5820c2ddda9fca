"""Experts kept as int8 / int4 (or bf16): built once into the cache directory, reused, rebuilt when stale,
moved and cached quantized, and computed token-identically to the unmodified transformers model whose
expert weights are replaced by the dequantized ones, at every cache size and with host compute."""
from __future__ import annotations

import json
import logging
import os

import pytest
import torch

import moe_prefetch as mp
from conftest import make_mixtral, save_tokenizer
from moe_prefetch.families import is_experts_module
from moe_prefetch.quant_store import ExpertFormat, store_dir
from moe_prefetch.checkpoint import Checkpoint

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 42, 11, 90]])
NEW = 12
GROUP = 32


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_PREFETCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_mixtral(tmp_path_factory.mktemp("q") / "m", layers=2, experts=4, top_k=2, hidden=64, inter=128, seed=5)


def dequantized_reference(path, fmt: ExpertFormat, dtype=torch.float32, **kwargs):
    """Greedy tokens of transformers' model with every expert matrix replaced by dequantize(quantize(w))."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    with torch.no_grad():
        for module in model.modules():
            if not is_experts_module(module):
                continue
            for name, p in module.named_parameters(recurse=False):
                if p.dim() != 3:
                    continue  # biases stay as they are
                for e in range(p.shape[0]):
                    w = p.data[e].t() if module.is_transposed else p.data[e]  # [out, in]
                    d = fmt.decode(fmt.encode(w.float()), dtype, w.shape[1])
                    p.data[e] = d.t() if module.is_transposed else d
        return model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)


def run(path, **cfg):
    model, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", show_progress=False, expert_group_size=GROUP, **cfg))
    try:
        with torch.inference_mode():
            out = model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        return out, mp.stats(model)
    finally:
        model.moe_runtime.close()


@pytest.mark.parametrize("kind", ["int8", "int4", "bf16"])
def test_identical_to_dequantized_reference_at_every_cache_size(ckpt, kind):
    ref = dequantized_reference(ckpt, ExpertFormat.of(kind, GROUP))
    full = None
    for slots in (2, 5, 8):
        out, st = run(ckpt, expert_cache=slots, expert_dtype=kind, predictor="next-gate")
        assert torch.equal(out, ref), f"{kind} slots={slots}"
        assert st["expert_dtype"] == kind and st["misses"] > 0
        full = st
    dense = 3 * 64 * 128 * 4  # fp32 expert bytes
    ratio = dense / full["expert_bytes"]
    assert {"bf16": 2.0, "int8": 3.7, "int4": 6.3}[kind] <= ratio <= {"bf16": 2.0, "int8": 4.0, "int4": 8.0}[kind], ratio
    # every copy moves one expert at its stored size
    assert full["bytes_to_device"] > 0 and full["bytes_to_device"] % full["expert_bytes"] == 0


def test_not_identical_to_full_precision(ckpt):
    """int4 is lossy: its logits differ from the full-precision model's (what the README's quality table measures)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", expert_dtype="int4", expert_group_size=GROUP,
                                                          show_progress=False))
    with torch.inference_mode():
        a, b = ref(PROMPT).logits, model(PROMPT).logits
    model.moe_runtime.close()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert not torch.equal(a, b) and cos > 0.95, cos  # close, not equal


def test_eager_and_host_compute_identical(tmp_path, ckpt):
    fmt = ExpertFormat.of("int4", GROUP)
    out, st = run(ckpt, expert_cache=3, expert_dtype="int4", host_compute="on", link_bandwidth=2e6, host_bandwidth=5e6)
    assert torch.equal(out, dequantized_reference(ckpt, fmt)) and st["host_computed"] > 0
    eager = make_mixtral(tmp_path / "eager", layers=2, experts=4, top_k=2, hidden=64, inter=128, seed=5)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(eager)
    cfg.experts_implementation = "eager"
    cfg.save_pretrained(eager)
    out, _ = run(eager, expert_cache=3, expert_dtype="int8")
    assert torch.equal(out, dequantized_reference(eager, ExpertFormat.of("int8", GROUP), experts_implementation="eager"))


def test_transposed_biased_experts(tmp_path):
    """GPT-OSS: experts stored transposed ([in, out]) with biases; matrices quantized along their input
    dimension, biases kept as they are."""
    from moe_families import make_family

    path = tmp_path / "gpt_oss"
    make_family("gpt_oss", path)
    save_tokenizer(path, 128)
    for kind in ("int8", "int4"):
        out, st = run(path, expert_cache=4, expert_dtype=kind, predictor="none")
        assert torch.equal(out, dequantized_reference(path, ExpertFormat.of(kind, GROUP))), kind


def test_store_built_once_reused_and_rebuilt_when_stale(ckpt, cache, caplog):
    fmt = ExpertFormat.of("int8", GROUP)
    out1, _ = run(ckpt, expert_cache=4, expert_dtype="int8")
    where = store_dir(Checkpoint(ckpt), fmt)
    meta = where / "meta.json"
    assert meta.is_file() and sorted(p.name for p in where.glob("*.safetensors")) == ["layer-00000.safetensors",
                                                                                        "layer-00001.safetensors"]
    stamp = meta.stat().st_mtime_ns
    out2, _ = run(ckpt, expert_cache=4, expert_dtype="int8")
    assert meta.stat().st_mtime_ns == stamp and torch.equal(out1, out2)  # reused, not rebuilt

    # the checkpoint changes: the store is rebuilt, with a warning, never used as it is
    weights = ckpt / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    with caplog.at_level(logging.WARNING, logger="moe_prefetch"):
        run(ckpt, expert_cache=4, expert_dtype="int8")
    assert "rebuilding" in caplog.text and meta.stat().st_mtime_ns != stamp

    # a foreign or damaged store (another spec in meta.json) is rebuilt too
    data = json.loads(meta.read_text())
    data["format"] = "int8-g64"
    meta.write_text(json.dumps(data))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moe_prefetch"):
        out3, _ = run(ckpt, expert_cache=4, expert_dtype="int8")
    assert "rebuilding" in caplog.text and torch.equal(out3, out1)
    leftovers = [p for p in where.parent.iterdir() if p.name not in (where.name, where.name + ".lock")]
    assert not leftovers  # no half-written stores left behind


def test_quantized_experts_fit_more_slots_in_the_same_budget(ckpt):
    """The memory plan counts experts at their stored size: the same budget holds ~6x more int4 experts."""
    budget = 150784 + 3 * 98304 + 1000  # dense weights + three fp32 experts
    plans = {}
    for kind in ("auto", "int4"):
        model, _ = mp.load_model(str(ckpt), mp.OffloadConfig(device="cpu", device_memory=budget, reserve=0,
                                                              expert_dtype=kind, expert_group_size=GROUP,
                                                              show_progress=False))
        plans[kind] = model.moe_runtime.plan
        model.moe_runtime.close()
    assert plans["int4"].expert_bytes * 6 < plans["auto"].expert_bytes
    assert plans["auto"].slots == 3 and plans["int4"].slots == 8  # all eight int4 experts fit


def test_cli_expert_dtype_and_bad_values(ckpt, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, MOE_PREFETCH_CACHE=str(tmp_path / "c"))
    r = subprocess.run([sys.executable, "-m", "moe_prefetch.run", "--model", str(ckpt), "--prompt", "w5 w17",
                        "--max-new-tokens", "3", "--device", "cpu", "--expert-dtype", "int4", "--expert-group-size", "32",
                        "--json", "--no-progress"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout)["stats"] if "stats" in json.loads(r.stdout) else json.loads(r.stdout)
    assert stats["expert_dtype"] == "int4" and stats["bytes_to_device"] > 0
    r = subprocess.run([sys.executable, "-m", "moe_prefetch.run", "--model", str(ckpt), "--device", "cpu",
                        "--expert-dtype", "int4", "--expert-group-size", "0", "--prompt", "w5"],
                       capture_output=True, text=True, env=env)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "group size" in r.stderr


def test_unwritable_cache_is_one_clear_error(ckpt, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MOE_PREFETCH_CACHE", str(blocker / "cache"))
    with pytest.raises(mp.MoePrefetchError, match="MOE_PREFETCH_CACHE"):
        run(ckpt, expert_cache=4, expert_dtype="int8")


def test_prequantized_checkpoints_refused(tmp_path):
    """FP8 checkpoints (weights in float8 with weight_scale_inv, a quantization_config) are refused at load,
    never cast and run unscaled."""
    from safetensors.torch import load_file, save_file

    path = make_mixtral(tmp_path / "fp8", layers=2, experts=4, top_k=2, hidden=64, inter=128, seed=5)
    tensors = load_file(path / "model.safetensors")
    name = next(k for k in tensors if k.endswith("experts.0.w1.weight") or k.endswith("experts.gate_up_proj"))
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    tensors[name + "_scale_inv"] = torch.ones(1)
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(mp.MoePrefetchError, match="quantized"):
        run(path)


def test_budget_refused_before_quantizing(ckpt, cache):
    """A budget too small even for quantized experts is refused before the (long) first quantization."""
    with pytest.raises(mp.MoePrefetchError, match="minimum"):
        run(ckpt, device_memory="16KiB", expert_dtype="int4")
    assert not cache.exists() or not any(p.suffix != ".lock" for p in (cache / "experts").glob("*"))
