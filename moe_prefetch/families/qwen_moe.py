"""Qwen2-MoE, Qwen3-MoE and OLMoE: SwiGLU experts under `mlp.experts.E.{gate,up,down}_proj`,
softmax-then-top-k routing (renormalised when norm_topk_prob), some layers possibly dense
(mlp_only_layers, decoder_sparse_step), and for Qwen2-MoE a resident shared expert whose output,
scaled by sigmoid(shared_expert_gate(x)), is added to the routed experts'."""
from __future__ import annotations

import torch

from .base import GatedExpertsAdapter


class QwenMoeAdapter(GatedExpertsAdapter):
    model_types = ("qwen2_moe", "qwen3_moe", "olmoe")
    family = "Qwen-MoE/OLMoE"

    @property
    def num_experts(self) -> int:
        return self.config.num_experts

    def moe_layers(self) -> list[int]:
        c = self.config
        dense = set(getattr(c, "mlp_only_layers", None) or [])
        step = getattr(c, "decoder_sparse_step", 1) or 1
        return [l for l in range(c.num_hidden_layers) if l not in dense and c.num_experts > 0 and (l + 1) % step == 0]

    def extra_modules(self, block):
        if hasattr(block, "shared_expert"):
            return {"shared_expert": block.shared_expert, "shared_expert_gate": block.shared_expert_gate}
        return {}

    def combine(self, extras, x, routed):
        if not extras:
            return routed
        shared = extras["shared_expert"](x)  # [T, H]
        return routed + torch.sigmoid(extras["shared_expert_gate"](x)) * shared
