"""Model families: one generic adapter for every transformers MoE whose experts follow transformers'
experts interface. `adapter_for(config, checkpoint)` describes a model; `build_skeleton` makes the
weightless model it describes."""
from __future__ import annotations

import torch

from ..errors import MoePrefetchError
from .adapter import MoeAdapter, Router, is_experts_module
from .data import supported_summary
from .layout import ExpertLayout, ExpertPart, TensorSource

FamilyAdapter = MoeAdapter  # the name the rest of the runtime uses


def build_skeleton(config, dtype: torch.dtype = torch.float32):
    """The model transformers builds for `config`, on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoePrefetchError(f"transformers cannot build a causal LM for model type "
                               f"{getattr(config, 'model_type', None)!r}: {first}") from None
    _keep_in_fp32(model, dtype)
    return model


def _keep_in_fp32(model, dtype: torch.dtype) -> None:
    """Parameters and buffers transformers keeps in float32 whatever the model dtype (its dtype plan, as
    from_pretrained applies it: DeepSeek's score-correction biases, GPT-OSS's norms in fp16...)."""
    from transformers.core_model_loading import build_glob_alternation

    plan = model._get_dtype_plan(dtype) if hasattr(model, "_get_dtype_plan") else {}
    if not plan:
        return
    alternation, by_group, _ = build_glob_alternation(list(plan.keys()))
    for name, t in list(model.state_dict(keep_vars=True).items()):
        m = alternation.search(name)
        if m is not None and t.is_floating_point():
            t.data = t.data.to(plan[by_group[m.lastgroup]])


def adapter_for(config, checkpoint=None, model=None) -> MoeAdapter:
    """The adapter for `config` (pass the checkpoint to resolve expert and dense tensor names, and the
    meta skeleton if one is already built)."""
    return MoeAdapter(config, model if model is not None else build_skeleton(config), checkpoint)


def supported_families() -> str:
    return supported_summary()


__all__ = ["ExpertLayout", "ExpertPart", "FamilyAdapter", "MoeAdapter", "Router", "TensorSource", "adapter_for",
           "build_skeleton", "is_experts_module", "supported_families"]
