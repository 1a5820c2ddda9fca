"""Mixtral (and checkpoints laid out like it): 8 experts of SwiGLU MLPs, softmax-then-top-k routing,
every decoder layer sparse. Hub checkpoints name experts `block_sparse_moe.experts.E.w1/w3/w2`."""
from __future__ import annotations

from .base import GatedExpertsAdapter


class MixtralAdapter(GatedExpertsAdapter):
    model_types = ("mixtral",)
    family = "Mixtral"
    legacy_expert = "model.layers.{layer}.block_sparse_moe.experts.{expert}."
    legacy_names = ("w1", "w3", "w2")

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    def moe_layers(self) -> list[int]:
        return list(range(self.config.num_hidden_layers))

    def checkpoint_key(self, module_key: str, checkpoint):
        if module_key in checkpoint:
            return module_key
        legacy = module_key.replace(".mlp.", ".block_sparse_moe.")
        return legacy if legacy in checkpoint else None
