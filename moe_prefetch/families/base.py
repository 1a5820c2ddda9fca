"""FamilyAdapter: everything model-family specific, so the rest of the runtime never touches
transformers internals. Adding a model family means adding one file in this package.

An adapter answers four questions:
  where:  which decoder layers hold a sparse MoE block, and how to swap that block out;
  names:  which checkpoint tensors make up expert e of layer l (packed into one contiguous buffer),
          and which checkpoint name a dense parameter of the skeleton comes from;
  route:  the reference router math (the family's own router module is reused as is);
  math:   one expert's MLP on a group of rows, given views into its cache slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSource:
    """A checkpoint tensor, or row `index` of a fused [num_experts, ...] checkpoint tensor."""

    key: str
    index: int | None = None


@dataclass(frozen=True)
class ExpertPart:
    """One matrix of an expert, stored at `offset` (elements) in the expert's flat buffer.
    Its content is the concatenation, along dim 0, of `sources`."""

    name: str
    shape: tuple[int, ...]
    offset: int
    sources: tuple[TensorSource, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ExpertLayout:
    """The parts of one expert (same for every expert of a model, up to the source names)."""

    parts: tuple[ExpertPart, ...]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parts)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Split a flat [numel] buffer into named matrices (views, no copy)."""
        return {p.name: flat[p.offset:p.offset + p.numel].view(p.shape) for p in self.parts}


class FamilyAdapter:
    """Interface; see mixtral.py for the reference implementation."""

    #: transformers `model_type` values this adapter serves
    model_types: tuple[str, ...] = ()
    #: human-readable family name used in messages
    family: str = ""

    def __init__(self, config):
        self.config = config

    # ---- shape ---------------------------------------------------------------------------
    @property
    def num_experts(self) -> int:
        raise NotImplementedError

    @property
    def top_k(self) -> int:
        raise NotImplementedError

    def moe_layers(self) -> list[int]:
        """Indices of decoder layers whose MLP is a sparse MoE block."""
        raise NotImplementedError

    # ---- where ---------------------------------------------------------------------------
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def get_block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.decoder_layers(model)[layer].mlp

    def set_block(self, model: nn.Module, layer: int, block: nn.Module) -> None:
        self.decoder_layers(model)[layer].mlp = block

    def moe_norm(self, model: nn.Module, layer: int) -> nn.Module:
        """The norm whose input is the residual stream just before layer `layer`'s MoE block and whose
        output feeds its router (predictors read the residual there and reuse the norm)."""
        return self.decoder_layers(model)[layer].post_attention_layernorm

    def router(self, block: nn.Module) -> nn.Module:
        """The family's router module inside the original block (kept and reused verbatim)."""
        raise NotImplementedError

    def extra_modules(self, block: nn.Module) -> dict[str, nn.Module]:
        """Resident submodules besides the router (e.g. shared experts), kept under these names."""
        return {}

    # ---- names ---------------------------------------------------------------------------
    def expert_layout(self, checkpoint, layer: int, expert: int) -> ExpertLayout:
        raise NotImplementedError

    def checkpoint_key(self, module_key: str, checkpoint) -> str | None:
        """Checkpoint name of a dense parameter of the skeleton (None if absent)."""
        return module_key if module_key in checkpoint else None

    # ---- math ----------------------------------------------------------------------------
    def route(self, router: nn.Module, x: torch.Tensor):
        """x [T, H] -> (weights [T, k], indices [T, k]) exactly as the reference block computes them."""
        raise NotImplementedError

    def router_probs(self, router: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> routing distribution [T, E] (float32) used to score experts ahead of time."""
        return torch.softmax(torch.nn.functional.linear(x, router.weight).float(), dim=-1)

    def expert_mlp(self, views: dict[str, torch.Tensor], rows: torch.Tensor, mm=None) -> torch.Tensor:
        """rows [n, H] -> [n, H] through one expert (no routing weight applied). mm(rows, weight[out, in])
        is the matmul to use (default: torch.mm against weight^T; on CUDA the block passes the grouped
        kernel the reference would use)."""
        raise NotImplementedError

    def expert_mlp_eager(self, views: dict[str, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        """Same as expert_mlp, computed the way transformers' eager experts loop does (F.linear)."""
        raise NotImplementedError

    def combine(self, extras: dict[str, nn.Module], x: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Add resident contributions (shared experts) to the routed output; x, routed [T, H]."""
        return routed


class GatedExpertsAdapter(FamilyAdapter):
    """Shared by families whose experts are SwiGLU MLPs (down(act(gate x) * up x)) routed by a
    transformers TopKRouter: only the checkpoint names and the layer pattern differ between them.

    Checkpoints keep either one tensor per expert matrix (`legacy_expert`, with `legacy_names` for
    gate, up, down; transformers 5 still writes this layout) or the fused in-memory layout
    `mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]."""

    legacy_expert = "model.layers.{layer}.mlp.experts.{expert}."
    legacy_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config):
        super().__init__(config)
        from transformers.activations import ACT2FN

        self.act_fn = ACT2FN[config.hidden_act]

    @property
    def top_k(self) -> int:
        return self.config.num_experts_per_tok

    @property
    def expert_intermediate(self) -> int:
        return getattr(self.config, "moe_intermediate_size", None) or self.config.intermediate_size

    def router(self, block):
        return block.gate

    def expert_layout(self, checkpoint, layer: int, expert: int) -> ExpertLayout:
        from ..errors import MoePrefetchError

        H, I = self.config.hidden_size, self.expert_intermediate
        legacy = self.legacy_expert.format(layer=layer, expert=expert)
        fused = f"model.layers.{layer}.mlp.experts."
        g, u, d = (f"{legacy}{n}.weight" for n in self.legacy_names)
        if g in checkpoint:
            gate_up, down = (TensorSource(g), TensorSource(u)), (TensorSource(d),)
        elif f"{fused}gate_up_proj" in checkpoint:
            gate_up = (TensorSource(f"{fused}gate_up_proj", expert),)
            down = (TensorSource(f"{fused}down_proj", expert),)
        else:
            raise MoePrefetchError(
                f"checkpoint {checkpoint.directory} has no weights for expert {expert} of layer {layer} "
                f"(looked for {g} and {fused}gate_up_proj)")
        return ExpertLayout((
            ExpertPart("gate_up", (2 * I, H), 0, gate_up),  # rows: gate then up, as transformers fuses them
            ExpertPart("down", (H, I), 2 * I * H, down),
        ))

    # mirrors transformers' TopKRouter and its experts implementations
    def route(self, router, x):
        _, weights, indices = router(x)  # [T, k], [T, k]
        return weights, indices

    def expert_mlp(self, views, rows, mm=None):
        mm = mm or (lambda r, w: torch.mm(r, w.t()))
        h = mm(rows, views["gate_up"])  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        return mm(self.act_fn(gate) * up, views["down"])  # [n, H]

    def expert_mlp_eager(self, views, rows):
        gate, up = torch.nn.functional.linear(rows, views["gate_up"]).chunk(2, dim=-1)  # [n, I] each
        return torch.nn.functional.linear(self.act_fn(gate) * up, views["down"])  # [n, H]
