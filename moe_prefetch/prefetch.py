"""Prefetcher: after each layer's routing, turn predictions for layers l+1 .. l+K into transfers.

Order: nearest layer first, then by score. Each planned expert is protected from eviction by the
ones planned after it, so a far-ahead guess never evicts a nearer one, and nothing evicts an expert
the executing layer needs. Bytes in flight stay under the prefetch budget. The model's router still
decides what runs: a wrong guess costs link time and a slot, never a different output.
"""
from __future__ import annotations

import torch
from torch import nn

from .offloader import ExpertOffloader
from .predictors import ModelView, Predictor
from .stats import RunStats


class Prefetcher:
    def __init__(self, model: nn.Module, view: ModelView, offloader: ExpertOffloader, predictor: Predictor,
                 lookahead: int, budget_bytes: int, stats: RunStats):
        self.view = view
        self.offloader = offloader
        self.predictor = predictor
        self.lookahead = lookahead
        self.budget_bytes = budget_bytes
        self.stats = stats
        self.distances = list(range(1, lookahead + 1))
        self._position = {layer: i for i, layer in enumerate(view.layers)}
        self._residual: dict[int, torch.Tensor] = {}
        self._pending: dict[tuple[int, int], set[int]] = {}  # (target i, d) -> predicted experts
        self._handles = [norm.register_forward_pre_hook(self._capture(i)) for i, norm in enumerate(view.norms)]

    def _capture(self, i: int):
        def hook(module, args):
            self._residual[i] = args[0]  # [B, S, H] residual stream entering the MoE block
        return hook

    def start_forward(self, prefill: bool) -> None:
        if prefill:
            self.predictor.reset()
            self._pending.clear()
        begin = getattr(self.predictor, "begin_step", None)
        if begin is not None:
            begin()

    def after_routing(self, layer: int, indices: torch.Tensor, experts: list[int]) -> None:
        """Called by the MoE block of `layer` once its own experts are requested (demand copies first)."""
        i = self._position[layer]
        decode = indices.shape[0] == 1
        actual = set(experts)
        for d in self.distances:
            predicted = self._pending.pop((i, d), None)
            if predicted is not None and decode:
                self.stats.record_prediction(d, len(predicted & actual), len(predicted), len(actual))
        self.predictor.observe(i, indices)
        h = self._residual.pop(i, None)
        if h is None or not self.distances:
            return
        scores = self.predictor.predict(i, h.reshape(-1, h.shape[-1]), self.distances)
        protected = {(layer, e) for e in experts}
        for d in self.distances:
            if d not in scores:
                continue
            j = (i + d) % len(self.view.layers)  # past the last layer: the next token's (wrapping predictors)
            target = self.view.layers[j]
            s = scores[d]  # [T, E]
            chosen = torch.topk(s, self.view.top_k, dim=-1).indices.flatten().unique()  # per-token top-k, union
            best = s.max(dim=0).values  # [E]
            order = sorted(chosen.tolist(), key=lambda e: -float(best[e]))
            self._pending[(j, d)] = set(order)
            for e in order:
                key = (target, e)
                self.offloader.prefetch(target, e, protected, self.budget_bytes)
                protected.add(key)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
