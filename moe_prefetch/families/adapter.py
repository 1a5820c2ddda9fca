"""MoeAdapter: one description of any transformers Mixture-of-Experts model whose experts module
follows transformers' experts interface (`use_experts_implementation`: fused `gate_up_proj` or
`up_proj` and `down_proj` parameters [E, ...], optional biases, transposed or interleaved layouts,
custom gates). Nothing here is written per family: the experts modules, their flags and shapes are
read from the model skeleton; checkpoint names come from transformers' conversion mapping
(keys.py); the routers are the family's own modules. What little varies between families and is
not in the modules themselves is data (data.py).

Layers are numbered by decoder layer (the index of the layer in its ModuleList), so trace files,
predictor files and stats speak of the same layers as the model does.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoePrefetchError
from . import data
from .keys import CheckpointKeys
from .layout import ExpertLayout, ExpertPart, TensorSource

#: attributes `use_experts_implementation` sets on every experts module it decorates
FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")


def interface_forward(cls: type):
    """The forward `use_experts_implementation` wrapped (its `__wrapped__` is the family's eager loop): the class's
    own, or that of the decorated class it derives from (Ergo's experts subclass their decorated projections and
    call that forward with one route per row, applying each expert's own norm around it); None if none is."""
    for klass in cls.__mro__:
        forward = klass.__dict__.get("forward")
        if forward is not None and hasattr(forward, "__wrapped__"):
            return forward
    return None


def is_experts_module(module: nn.Module) -> bool:
    return (all(hasattr(module, f) for f in FLAGS) and hasattr(module, "_apply_gate")
            and interface_forward(type(module)) is not None
            and isinstance(getattr(module, "down_proj", None), torch.Tensor))


@dataclass(frozen=True)
class MoeLayer:
    layer: int     # decoder layer index
    experts: str   # module path of the experts module
    block: str     # module path of the MoE block holding it (and the router)
    decoder: str   # module path of the decoder layer


class Router:
    """The family's own routing for one MoE layer, callable ahead of time by predictors.

    `select(x)` returns what the MoE block hands its experts (weights [T, k], indices [T, k]), computed
    by the family's router module (DeepSeek's grouped top-k with score bias, GPT-OSS's softmax over the
    top-k, ...). `probs(x)` turns that into scores [T, E] in [0, 1] for ranking: the softmax of the
    router's logits where it returns them, capped so that the experts the router actually selects
    always rank first."""

    def __init__(self, module: nn.Module, block: nn.Module, num_experts: int, hidden: int):
        self.module = module
        self.num_experts = num_experts
        sig = inspect.signature(module.forward)
        extra = [(n, p) for n, p in list(sig.parameters.items())[1:]
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        missing = [n for n, p in extra if p.default is inspect.Parameter.empty and not hasattr(block, n)]
        if missing:
            raise MoePrefetchError(f"router {type(module).__name__} takes {', '.join(missing)}, which its MoE block "
                                   f"{type(block).__name__} does not hold, so it cannot be run ahead of time: use a "
                                   "predictor that does not call routers (history) or none")
        extra = [n for n, _ in extra if hasattr(block, n)]  # e.g. MiniMax-M2's e_score_correction_bias
        self._block = block
        self._hidden = hidden
        self._batched = False
        self._plain = False
        self._extra = tuple(extra)  # e.g. MiniMax-M2: the block's e_score_correction_bias
        weights = [p for p in module.parameters() if p.dim() == 2 and tuple(p.shape) == (num_experts, hidden)]
        # what calibrate trains against (a softmax surrogate of the routing); None: a router that is not one
        # linear map of the block's input (m2r2 cannot be trained for it)
        self.weight = weights[0] if weights else None
        self.dtype = next(module.parameters()).dtype

    def __call__(self, x: torch.Tensor):
        """x [T, H] -> (logits, weights [T, k], indices [T, k]) as the family's router returns them. Blocks hand
        their router either the flat rows or [batch, seq, H]; `probe` found which this one takes."""
        kwargs = {n: getattr(self._block, n) for n in self._extra}
        out = self.module(x.unsqueeze(0) if self._batched else x, **kwargs)
        if not (isinstance(out, tuple) and len(out) >= 3):
            raise MoePrefetchError(f"router {type(self.module).__name__} does not return (logits, weights, indices)")
        k = out[2].shape[-1]
        return out[0], out[1].reshape(-1, k), out[2].reshape(-1, k)

    def probe(self, device, dtype) -> None:
        """Run the router once on a dummy row, flat and then batched, and keep the form it accepts; a router
        that accepts neither cannot be run ahead of time (one clear error at load, not mid-generation)."""
        x = torch.zeros(1, self.weight.shape[1] if self.weight is not None else self._hidden, device=device, dtype=dtype)
        errors = []
        for batched in (False, True):
            self._batched = batched
            try:
                with torch.no_grad():
                    self(x)
            except Exception as e:  # noqa: BLE001 - any failure means this form is not the one
                errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            try:
                with torch.no_grad():
                    self._plain = self._is_plain(device, dtype)
            except Exception:  # noqa: BLE001 - not a plain router: the general path serves it
                self._plain = False
            return
        raise MoePrefetchError(f"the router of this model ({type(self.module).__name__}) cannot be run ahead of time "
                               f"({errors[-1]}); use --predictor history or none")

    def _is_plain(self, device, dtype) -> bool:
        """True when this router is a bias-free linear map followed by top-k of its softmax (Mixtral, Qwen,
        OLMoE...): checked on random rows, its logits are exactly F.linear(x, weight) and its choice the
        top-k of their softmax. Predictions then skip the router's own selection (fewer device ops)."""
        if self.weight is None:
            return False
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, self.weight.shape[1], generator=g).to(device=device, dtype=dtype)
        logits, _, idx = self(x)
        if not (isinstance(logits, torch.Tensor) and tuple(logits.shape) == (64, self.num_experts)):
            return False
        mine = torch.nn.functional.linear(x.to(self.weight.dtype), self.weight)
        if not torch.equal(logits, mine):
            return False
        top = torch.topk(torch.softmax(mine.float(), -1), idx.shape[-1], dim=-1).indices
        return torch.equal(top.sort(-1).values, idx.sort(-1).values)

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self(x)
        return out[1], out[2]  # [T, k], [T, k]

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, H] (the MoE block's input) -> scores [T, E] float32 (E: the experts with weights)."""
        if self._plain:
            return torch.softmax(torch.nn.functional.linear(x.to(self.weight.dtype), self.weight).float(), dim=-1)
        logits, weights, idx = self(x)
        T, E = idx.shape[0], self.num_experts
        width = logits.numel() // T if isinstance(logits, torch.Tensor) and T and logits.numel() % T == 0 else 0
        if width >= E:
            # logits over the E experts, and over any choices without weights the router also makes (Zaya's skip
            # expert, LongCat-Flash's zero experts), numbered after them: ranked with the rest, dropped at the end
            p = torch.softmax(logits.reshape(T, width).float(), dim=-1)
        else:
            w = weights.float().abs()
            p = torch.zeros(T, E, device=idx.device).scatter_(1, idx, w / w.sum(-1, keepdim=True).clamp_min(1e-12))
        chosen = p.gather(1, idx)  # [T, k]
        floor = chosen.amin(dim=-1, keepdim=True) * (1 - 1e-3)
        return torch.minimum(p, floor).scatter_(1, idx, chosen)[:, :E]


class MoeAdapter:
    """Everything the runtime needs to know about a model's MoE layers (see the module docstring)."""

    def __init__(self, config, model: nn.Module, checkpoint=None):
        """model: the skeleton as transformers builds it (on the meta device), experts still in place."""
        self.config = config
        self.model_type = getattr(config, "model_type", None)
        self.family = self.model_type
        found = [(name, m) for name, m in model.named_modules() if is_experts_module(m)]
        if not found:
            raise MoePrefetchError(
                f"model type {self.model_type!r} is not a supported Mixture-of-Experts family: it has no experts module "
                f"using transformers' experts interface; supported: {data.supported_summary()}")
        self.layers_info: list[MoeLayer] = []
        for name, _ in found:
            block = name.rpartition(".")[0]
            parts = block.split(".")
            ix = max(i for i, p in enumerate(parts) if p.isdigit()) if any(p.isdigit() for p in parts) else None
            if ix is None:
                raise MoePrefetchError(f"experts module {name} is not inside a numbered decoder layer")
            self.layers_info.append(MoeLayer(int(parts[ix]), name, block, ".".join(parts[:ix + 1])))
        first = found[0][1]
        self.flags = {f: bool(getattr(first, f)) for f in FLAGS}
        self.num_experts = int(getattr(first, "num_experts", None) or first.down_proj.shape[0])
        E = self.num_experts
        self.params: tuple[tuple[str, tuple[int, ...]], ...] = tuple(
            (n, tuple(p.shape[1:])) for n, p in first.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == E)
        for name, m in found[1:]:
            shapes = tuple((n, tuple(p.shape[1:])) for n, p in m.named_parameters(recurse=False) if p.dim() >= 2 and p.shape[0] == E)
            if shapes != self.params or {f: bool(getattr(m, f)) for f in FLAGS} != self.flags:
                raise MoePrefetchError(f"experts module {name} differs in shape from {found[0][0]}: layers with "
                                       "different expert shapes are not supported")
        impl = getattr(first.config, "_experts_implementation", None) or "grouped_mm"
        if impl not in ("grouped_mm", "eager"):
            raise MoePrefetchError(f"experts_implementation {impl!r} is not mirrored by the offloaded experts (their "
                                   "output would not be bit-identical); set it to grouped_mm (the default) or eager")
        self.eager = impl == "eager"  # mirror transformers' eager loop instead of its grouped one
        self.implementation = impl
        self.hidden_size = int(config.get_text_config().hidden_size) if hasattr(config, "get_text_config") else int(config.hidden_size)
        self._top_k = data.top_k(config, model.get_submodule(self.layers_info[0].block))
        self.routing_params = [f"{prefix}.{n}" for layer in self.moe_layers() for prefix in self.resident_names(model, layer)
                               for n, _ in model.get_submodule(prefix).named_parameters()]
        self.keys = None
        if checkpoint is not None:
            self.keys = CheckpointKeys(model, checkpoint.keys(), set(model.state_dict().keys()))
        self._check_checkpoint(checkpoint)

    # ---- shape ---------------------------------------------------------------------------
    @property
    def top_k(self) -> int:
        return self._top_k

    def moe_layers(self) -> list[int]:
        return [l.layer for l in self.layers_info]

    def info(self, layer: int) -> MoeLayer:
        for l in self.layers_info:
            if l.layer == layer:
                return l
        raise KeyError(layer)

    # ---- where ---------------------------------------------------------------------------
    def experts_module(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.info(layer).experts)

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return model.get_submodule(self.info(layer).block)

    def moe_norm(self, model: nn.Module, layer: int) -> nn.Module | None:
        """The norm between the residual stream and layer `layer`'s MoE block; None where there is none
        or it is not known (predictors then read the block's input)."""
        decoder = model.get_submodule(self.info(layer).decoder)
        name = data.pre_moe_norm(self.model_type, decoder)
        return None if name is None else getattr(decoder, name)

    def router_module(self, model: nn.Module, layer: int) -> nn.Module:
        """The MoE block's router: the child (other than the experts) holding a [E, H] weight, at any depth
        (some families wrap an nn.Linear), else one named like a router."""
        block = self.block(model, layer)
        experts = self.experts_module(model, layer)
        children = [(n, c) for n, c in block.named_children() if c is not experts]
        for _, child in children:
            if any(p.dim() == 2 and tuple(p.shape) == (self.num_experts, self.hidden_size) for p in child.parameters()):
                return child
        for name, child in children:
            if name in data.ROUTER_NAMES:
                return child
        raise MoePrefetchError(f"cannot find the router of MoE layer {layer} (a module of {self.info(layer).block} "
                               f"with a [{self.num_experts}, {self.hidden_size}] weight)")

    def router(self, model: nn.Module, layer: int) -> Router:
        return Router(self.router_module(model, layer), self.block(model, layer), self.num_experts, self.hidden_size)

    def resident_names(self, model: nn.Module, layer: int) -> tuple[str, ...]:
        """Module paths whose parameters decide the routing of `layer` (its pre-MoE norm, its router):
        what a predictor file or a routing trace is tied to (routing_params, the fingerprint)."""
        info = self.info(layer)
        decoder = model.get_submodule(info.decoder)
        norm = data.pre_moe_norm(self.model_type, decoder)
        router = self.router_module(model, layer)
        router_name = next(n for n, c in self.block(model, layer).named_children() if c is router)
        return tuple(x for x in (f"{info.decoder}.{norm}" if norm else None, f"{info.block}.{router_name}") if x)

    # ---- names ---------------------------------------------------------------------------
    def _check_checkpoint(self, checkpoint) -> None:
        if checkpoint is None:
            return
        quantized = getattr(self.config, "quantization_config", None)
        fp8 = next((k for k, i in checkpoint.tensors.items() if i.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
                    or k.endswith(("weight_scale_inv", ".weight_scale"))), None)
        if quantized is not None or fp8 is not None:
            method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else \
                getattr(quantized, "quant_method", None) or fp8
            raise MoePrefetchError(
                f"checkpoint {checkpoint.directory} is quantized ({method}); this runtime reads bf16/fp16/fp32 "
                "weights and quantizes experts itself (--expert-dtype int8|int4): use the unquantized checkpoint")
        info = self.layers_info[0]
        for name, _ in self.params:
            key = f"{info.experts}.{name}"
            if self.keys.expert_sources(key, 0) is None:
                quant = [k for k in checkpoint.keys() if k.startswith(f"{info.experts}.{name}_") or
                         (k.startswith(f"{info.experts}.") and k.endswith(("_blocks", "_scales", ".qweight", ".weight_packed")))]
                if quant:
                    raise MoePrefetchError(
                        f"checkpoint {checkpoint.directory} stores its experts quantized ({quant[0]}); this runtime reads "
                        "bf16/fp16/fp32 experts only: use a dequantized checkpoint (GPT-OSS MXFP4 blocks are not dequantized "
                        "on load)")
                raise MoePrefetchError(f"checkpoint {checkpoint.directory} has no weights for {key} (expert 0), "
                                       "checked under transformers' conversion mapping for this model type")

    def expert_layout(self, checkpoint, layer: int, expert: int) -> ExpertLayout:
        prefix = self.info(layer).experts
        parts, offset = [], 0
        for name, shape in self.params:
            found = self.keys.expert_sources(f"{prefix}.{name}", expert)
            if found is None:
                raise MoePrefetchError(f"checkpoint {checkpoint.directory} has no weights for expert {expert} of "
                                       f"{prefix}.{name}")
            sources = tuple(TensorSource(k, i) for k, i in found)
            part = ExpertPart(name, shape, offset, sources)
            parts.append(part)
            offset += part.numel
        return ExpertLayout(tuple(parts))

    def checkpoint_key(self, module_key: str, checkpoint=None) -> str | None:
        """Checkpoint name of a dense parameter of the skeleton (None if absent)."""
        return self.keys.dense(module_key)
