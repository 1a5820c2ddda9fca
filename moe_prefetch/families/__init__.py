"""Model-family adapters. `adapter_for(config)` picks the one serving config.model_type."""
from __future__ import annotations

from ..errors import MoePrefetchError
from .base import ExpertLayout, ExpertPart, FamilyAdapter, GatedExpertsAdapter, TensorSource
from .mixtral import MixtralAdapter
from .qwen_moe import QwenMoeAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (MixtralAdapter, QwenMoeAdapter)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({'/'.join(a.model_types)})" for a in ADAPTERS)


def adapter_for(config) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    raise MoePrefetchError(
        f"model type {model_type!r} is not a supported Mixture-of-Experts family; supported: {supported_families()}")


__all__ = ["ADAPTERS", "ExpertLayout", "ExpertPart", "FamilyAdapter", "GatedExpertsAdapter", "TensorSource", "adapter_for", "supported_families"]
