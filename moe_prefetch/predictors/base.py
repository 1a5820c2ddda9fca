"""Predictor interface: from the residual stream at layer l, score the experts of layers l+1 .. l+K.

A predictor sees, for each MoE layer l of a forward pass, the residual stream h_l entering the MoE
block ([T, H], before its norm) and, once the router has run, the experts it chose. It returns
scores [T, E] (higher = more likely to be routed) for each distance d it is asked about.
Predictors never change what runs: the router decides; predictions only decide what moves early.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import MoePrefetchError


@dataclass
class ModelView:
    """What predictors may read of the model: per MoE layer its pre-MoE norm and router."""

    adapter: object
    layers: list[int]            # MoE layer indices, in execution order
    norms: list[nn.Module]       # norms[i] belongs to layers[i] (Identity where the block reads its input as is)
    routers: list                # families.Router: the family's own routing of each layer
    num_experts: int
    top_k: int
    hidden_size: int
    fingerprint: str | None = None  # of the checkpoint's routers (predictor files are tied to it)
    routers_unavailable: str | None = None  # why routers cannot run ahead of time (then `routers` is empty)
    taps: list[nn.Module] | None = None  # taps[i]: the module whose input is the stream predictors read at layers[i]
    stacked: object | None = None  # StackedRouting: several target layers' norms and routers as one computation

    @classmethod
    def of(cls, model: nn.Module, adapter) -> "ModelView":
        layers = adapter.moe_layers()
        runtime = getattr(model, "moe_runtime", None)
        fp = runtime.fingerprint if runtime is not None else None
        param = next(model.parameters())
        try:
            routers = [adapter.router(model, l) for l in layers]
            for r in routers:
                r.probe(param.device, param.dtype)
            why = None
        except MoePrefetchError as e:  # only the predictors that run routers ahead of time need them
            routers, why = [], str(e)
        found = [adapter.moe_norm(model, l) for l in layers]
        norms = [n if n is not None else nn.Identity() for n in found]
        # the residual enters the pre-MoE norm; without one, the MoE block's own input is read
        taps = [n if n is not None else adapter.block(model, l) for n, l in zip(found, layers)]
        view = cls(adapter, layers, norms, routers, adapter.num_experts, adapter.top_k, adapter.hidden_size, fp, why,
                   taps)
        if routers:
            from .stacked import StackedRouting

            view.stacked = StackedRouting(view, param.device, param.dtype)  # probes the norms once, here
        return view

    def need_routers(self, what: str) -> None:
        """Refuse, with the reason, a predictor that runs routers ahead of time on a model whose routers
        cannot be (they read more than the MoE block's input)."""
        if self.routers_unavailable:
            raise MoePrefetchError(f"{what}: {self.routers_unavailable}")

    def router_probs(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Routing distribution [T, E] of MoE layer index i applied to residual h [T, H]."""
        return self.routers[i].probs(self.norms[i](h))

    def router_probs_many(self, targets: list[int], a: torch.Tensor) -> torch.Tensor:
        """Routing distributions [D, T, E] float32 of MoE layer indices `targets` applied to a [D, T, H]
        (one residual per target): batched where the layers' norms and routers allow (stacked.py)."""
        targets = tuple(targets)
        if self.stacked is not None and self.stacked.fused(targets):
            return self.stacked.probs(targets, a)
        return torch.stack([self.router_probs(j, a[n]).float() for n, j in enumerate(targets)])


class Predictor:
    """Base class. `i` below is the position of a layer in ModelView.layers (not its layer number)."""

    name = "base"
    #: True when predictions depend on earlier tokens (evaluation must then feed tokens one by one)
    sequential = False
    #: True when the predictor can also score the *next* token's layers (i + d >= number of layers
    #: means layer i + d - n of the next forward pass); residual-based predictors cannot
    wraps = False
    #: True when the predictor works on host data only (routing history, a recorded trace): it is
    #: called after the layer's routing has been read back and never touches the device
    on_host = False

    def __init__(self, view: ModelView):
        self.view = view

    def reset(self) -> None:
        """Start of a new sequence (a prefill)."""

    def predict(self, i: int, h: torch.Tensor, distances: list[int]) -> dict[int, torch.Tensor]:
        """Scores [T, E] for MoE layers i+d, d in distances (those it can predict; see `wraps`)."""
        raise NotImplementedError

    def predict_stacked(self, i: int, h: torch.Tensor, distances: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """predict() for the prefetcher: (the distances predicted, their scores stacked [D, T, E] float32),
        or ([], None). Residual predictors override it to score all distances in one batched computation."""
        scores = self.predict(i, h, distances)
        done = [d for d in distances if d in scores]
        return done, (torch.stack([scores[d].float() for d in done]) if done else None)

    def observe(self, i: int, indices: torch.Tensor) -> None:
        """The router of MoE layer i chose `indices` [T, k]."""

    def observe_rows(self, i: int, rows: list[list[int]]) -> None:
        """observe() with the routing as host lists [T][k] (what the runtime has after its one read)."""
        self.observe(i, torch.tensor(rows))

    def max_lookahead(self) -> tuple[int, str]:
        """The farthest distance d this predictor can score on this model, and why, in words. One rule
        for every command: a residual predictor reaches the last MoE layer (n - 1 layers ahead), a
        wrapping one the same layer of the next token (n layers ahead)."""
        n = len(self.view.layers)
        if self.wraps:
            return n, f"it predicts at most one token ahead, {n} layers on a model with {n} MoE layers"
        return n - 1, residual_reach(n)


def residual_reach(n_layers: int) -> str:
    """Why a predictor that reads the residual stream cannot look further (run and calibrate say the same)."""
    return (f"it reads the residual stream, so it predicts at most {n_layers - 1} layers ahead "
            f"on a model with {n_layers} MoE layers")


class NoPredictor(Predictor):
    """Demand fetching only."""

    name = "none"

    def predict(self, i, h, distances):
        return {}
