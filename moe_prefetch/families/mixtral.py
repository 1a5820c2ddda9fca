"""Mixtral (and checkpoints laid out like it): 8 experts of SwiGLU MLPs, softmax-then-top-k routing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import MoePrefetchError
from .base import ExpertLayout, ExpertPart, FamilyAdapter, TensorSource


class MixtralAdapter(FamilyAdapter):
    model_types = ("mixtral",)
    family = "Mixtral"

    def __init__(self, config):
        super().__init__(config)
        from transformers.activations import ACT2FN

        self.act_fn = ACT2FN[config.hidden_act]

    @property
    def num_experts(self) -> int:
        return self.config.num_local_experts

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    def moe_layers(self) -> list[int]:
        return list(range(self.config.num_hidden_layers))

    def router(self, block):
        return block.gate

    # ---- names ---------------------------------------------------------------------------
    # Hub checkpoints keep one tensor per expert matrix under `block_sparse_moe.experts.E.w{1,2,3}`
    # (transformers 5 still writes this layout); a checkpoint saved from the fused in-memory
    # layout has `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I].
    def expert_layout(self, checkpoint, layer: int, expert: int) -> ExpertLayout:
        H, I = self.config.hidden_size, self.config.intermediate_size
        legacy = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        fused = f"model.layers.{layer}.mlp.experts."
        if f"{legacy}w1.weight" in checkpoint:
            gate_up = (TensorSource(f"{legacy}w1.weight"), TensorSource(f"{legacy}w3.weight"))
            down = (TensorSource(f"{legacy}w2.weight"),)
        elif f"{fused}gate_up_proj" in checkpoint:
            gate_up = (TensorSource(f"{fused}gate_up_proj", expert),)
            down = (TensorSource(f"{fused}down_proj", expert),)
        else:
            raise MoePrefetchError(
                f"checkpoint {checkpoint.directory} has no weights for expert {expert} of layer {layer} "
                f"(looked for {legacy}w1.weight and {fused}gate_up_proj)")
        return ExpertLayout((
            ExpertPart("gate_up", (2 * I, H), 0, gate_up),  # rows: w1 (gate) then w3 (up), as transformers fuses them
            ExpertPart("down", (H, I), 2 * I * H, down),
        ))

    def checkpoint_key(self, module_key: str, checkpoint):
        if module_key in checkpoint:
            return module_key
        legacy = module_key.replace(".mlp.", ".block_sparse_moe.")
        return legacy if legacy in checkpoint else None

    # ---- math (mirrors transformers' MixtralTopKRouter and its experts implementations) ------
    def route(self, router, x):
        _, weights, indices = router(x)  # [T, k] float32 weights, [T, k] indices
        return weights, indices

    def expert_mlp(self, views, rows):
        h = torch.mm(rows, views["gate_up"].t())  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        return torch.mm(self.act_fn(gate) * up, views["down"].t())  # [n, H]

    def expert_mlp_eager(self, views, rows):
        gate, up = F.linear(rows, views["gate_up"]).chunk(2, dim=-1)  # [n, I] each
        return F.linear(self.act_fn(gate) * up, views["down"])  # [n, H]
