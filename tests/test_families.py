"""Every MoE family of the installed transformers whose experts use transformers' experts interface runs
through the same offloaded path, token-identical to the unmodified model: tiny random checkpoints
written with save_pretrained (odd expert counts, top-3, shared experts, dense first layers, grouped
routing, biases, transposed experts, sharded files; see moe_families.py), at cache sizes from the
minimum to every expert, with and without prefetching. The families covered are listed in
moe_prefetch.families.data (TESTED) and printed by `python -m moe_prefetch.families`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import moe_prefetch as mp
from conftest import reference_generate, save_tokenizer
from moe_families import FAMILIES, SHARDED, make_family
from moe_prefetch.errors import MoePrefetchError
from moe_prefetch.families import data
from moe_prefetch.predictors import ModelView, make_predictor

PROMPT = torch.tensor([[5, 17, 33, 8, 61, 42, 11, 90, 23, 7, 54, 3]])
NEW = 8
VOCAB = 128  # the vocabulary of moe_families' configurations
#: families run again with experts_implementation="eager" (the family's own loop, over slot views):
#: the common template, a transposed + biased + custom-gate one, a gate-less one, a matmul-form one, and one whose
#: experts subclass the decorated class (Ergo: the interface called with one route per row)
EAGER = ("mixtral", "gpt_oss", "nemotron_h", "aria_text", "deepseek_v3", "ergo")


def _checkpoint(tmp_path, model_type: str, eager: bool = False) -> Path:
    path = tmp_path / model_type
    config = make_family(model_type, path)
    if eager:
        config.experts_implementation = "eager"
        config.save_pretrained(path)
    save_tokenizer(path, VOCAB)
    return path


def _generate(path, check=None, **cfg):
    model, _ = mp.load_model(str(path), mp.OffloadConfig(device="cpu", show_progress=False, **cfg))
    try:
        if check is not None:
            check(model)
        with torch.inference_mode():
            out = model.generate(PROMPT, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
        return out, mp.stats(model), model.moe_runtime.adapter
    finally:
        model.moe_runtime.close()


@torch.inference_mode()
def _stacked_matches(model):
    """The prefetcher's batched scoring of several later layers (fused where this family's norms and
    routers allow, layer by layer otherwise) gives the scores the family's own modules give."""
    view = ModelView.of(model, model.moe_runtime.adapter)
    if not view.routers:
        return  # routers that cannot run ahead of time: no residual predictor here
    ng = make_predictor("next-gate", view)
    h = 2 * torch.randn(3, view.hidden_size, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).dtype)
    done, stacked = ng.predict_stacked(0, h, [1, 2])
    ref = ng.predict(0, h, [1, 2])
    assert done == sorted(ref) and done
    for n, d in enumerate(done):
        assert torch.allclose(stacked[n], ref[d].float(), atol=1e-5), f"distance {d}"


@pytest.mark.parametrize("model_type", data.TESTED)
def test_family_identical_across_cache_sizes(tmp_path, model_type):
    path = _checkpoint(tmp_path, model_type)
    ref = reference_generate(path, PROMPT, NEW, device="cpu")
    out, st, adapter = _generate(path, check=_stacked_matches, predictor="none")
    assert torch.equal(out, ref), f"{model_type}: all experts resident"
    total, k = st["total_experts"], adapter.top_k
    assert total == len(adapter.moe_layers()) * adapter.num_experts and len(adapter.moe_layers()) >= 2
    ahead = "history" if model_type in data.ROUTERS_NOT_AHEAD else "next-gate"
    if ahead == "history":
        with pytest.raises(MoePrefetchError, match="ahead of time"):
            _generate(path, expert_cache=k, predictor="next-gate")
    out, st, _ = _generate(path, expert_cache=k)  # no predictor named: auto runs what this family allows
    assert torch.equal(out, ref) and st["predictor"] == ahead, f"{model_type}: default predictor"
    scored = 0
    for slots, predictor in ((k, "none"), (k, ahead), ((k + total) // 2, ahead), (total - 1, ahead)):
        # the benefit gate off: every prediction the planner can act on is prefetched (the path under test)
        out, st, _ = _generate(path, expert_cache=slots, predictor=predictor, lookahead=2, prefetch_gate=False)
        assert torch.equal(out, ref), f"{model_type} slots={slots} predictor={predictor}"
        assert st["misses"] > 0 and st["expert_cache_slots"] == slots
        scored += sum(v["n"] for v in st["predictor_calibration"].values())
    # the predictor ran on this family's routers and its predictions were scored against the real routing;
    # whether one was worth a prefetch depends on the cache contents (a few tiny families never need one)
    assert scored > 0, f"{model_type}: the predictor made no predictions"


@pytest.mark.parametrize("model_type", EAGER)
def test_family_eager_experts_identical(tmp_path, model_type):
    path = _checkpoint(tmp_path, model_type, eager=True)
    ref = reference_generate(path, PROMPT, NEW, device="cpu")
    for slots in (2, None):
        out, st, adapter = _generate(path, expert_cache=max(slots or 0, 3) if slots else None, predictor="next-gate")
        assert adapter.eager
        assert torch.equal(out, ref), f"{model_type} eager slots={slots}"


#: run again in bfloat16: families with parameters transformers keeps in float32 (score-correction biases,
#: hyper-connection weights, a float32 router, per-expert norm weights and a float32 residual stream), and a
#: biased transposed one
BF16 = ("deepseek_v3", "hy_v4", "hunyuan_v1_moe", "gpt_oss", "qwen2_moe", "ergo")


@pytest.mark.parametrize("model_type", BF16)
def test_family_bfloat16_identical(tmp_path, model_type):
    path = _checkpoint(tmp_path, model_type)
    ref = reference_generate(path, PROMPT, NEW, dtype=torch.bfloat16, device="cpu")
    for slots in (None, 3):
        out, _, _ = _generate(path, dtype="bfloat16", expert_cache=slots, predictor="next-gate")
        assert torch.equal(out, ref), f"{model_type} bf16 slots={slots}"


def test_families_cover_every_interface_family():
    """Each causal-LM family whose modeling uses transformers' experts interface is either tested here or
    listed with the reason it is not; the package's registry names exactly the tested ones."""
    import transformers
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(transformers.__file__).parent / "models"
    interface = set()
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        folder = root / model_type_to_module_name(model_type)
        if any("use_experts_implementation" in f.read_text() for f in folder.glob("modeling_*.py")):
            interface.add(model_type)
    assert interface, "the experts interface was not found in this transformers"
    assert set(data.TESTED) | set(data.UNTESTED) == set(FAMILIES)
    assert not set(data.TESTED) & set(data.UNTESTED)
    assert interface <= set(data.TESTED) | set(data.UNTESTED), sorted(interface - set(data.TESTED) - set(data.UNTESTED))
    for name in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss",
                 "glm4_moe", "qwen3_next", "ernie4_5_moe", "granitemoe", "minimax_m2", "hunyuan_v1_moe", "dots1",
                 "flex_olmo", "lfm2_moe"):
        assert name in data.TESTED, name
    assert SHARDED <= set(FAMILIES)


@pytest.mark.parametrize("model_type", [t for t in data.UNTESTED if t in FAMILIES])
def test_unserved_families_are_refused_at_load(tmp_path, model_type):
    """A family listed as not served fails at load with one clear line, not mid-generation."""
    path = _checkpoint(tmp_path, model_type)
    with pytest.raises(MoePrefetchError, match="conversion"):
        mp.load_model(str(path), mp.OffloadConfig(device="cpu", show_progress=False))


def test_readme_family_table_is_generated():
    from moe_prefetch.families.__main__ import markdown

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- families:start -->\n(.*?)<!-- families:end -->", readme, re.S)
    assert block, "README lacks the generated families table"
    assert block.group(1).strip() == markdown().strip(), "regenerate it: python -m moe_prefetch.families"


def test_mxfp4_experts_refused(tmp_path):
    """GPT-OSS checkpoints with MXFP4 expert blocks are refused with one line (not dequantized)."""
    from safetensors.torch import load_file, save_file

    path = _checkpoint(tmp_path, "gpt_oss")
    files = sorted(path.glob("*.safetensors"))
    tensors = {}
    for f in files:
        tensors.update(load_file(f))
        f.unlink()
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        t = tensors.pop(name)
        tensors[name + "_blocks"] = torch.zeros(t.shape[0], t.shape[1], 4, 16, dtype=torch.uint8)
        tensors[name + "_scales"] = torch.zeros(t.shape[0], t.shape[1], 4, dtype=torch.uint8)
    for idx in path.glob("*.index.json"):
        idx.unlink()
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(MoePrefetchError, match="quantized"):
        mp.load_model(str(path), mp.OffloadConfig(device="cpu", show_progress=False))
