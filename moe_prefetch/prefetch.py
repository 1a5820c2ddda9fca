"""Prefetcher: after each layer's routing, turn predictions for layers l+1 .. l+K into transfers.

Split in two so the layer reads the device only once (devsync.py):
  device_scores()  enqueued right after the router: the predictor's small matmuls (every distance in
                   one batched computation where the model allows, predictors/stacked.py) and a [D, 2, E]
                   summary per distance (best score of each expert over the tokens, and whether it is in
                   some token's top-k); it travels to the host in the same read as the routing.
  plan()           host work only, after the layer's expert compute has been enqueued (on the CPU
                   backend, before it: there the host *is* the device, and queuing the copies first lets
                   the copy thread move them while the host computes).
What moves is the planner's decision (planner.plan_prefetch): nearest layer first, each candidate's
raw score turned into a calibrated probability of use, and a copy made only when it is expected to
save more time than it takes from demand copies plus the value of the expert it evicts; it never
evicts an expert the executing layer needs, nor one planned for a nearer layer, and copies in flight
stay under the budget. Where no copy could start, a layer may still be predicted to steer eviction
(planner.steer_eviction: a target's cached experts outside the top-k are ranked as unlikely), and
then a target layer whose experts are all resident is predicted too; otherwise it is not (with every
expert cached, no copy could start). The model's router still decides what runs: a wrong guess costs
link time and a slot, never a different output.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from .devsync import host_list
from .offloader import ExpertOffloader
from .predictors import ModelView, Predictor
from .stats import RunStats


def summarise(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """scores [D, T, E] float32 -> [D, 2, E] float32: per distance, each expert's best score over the
    tokens and 1.0 where it is in some token's top-k (the union the prefetcher considers). Device ops
    only, no synchronisation."""
    best = scores.amax(dim=1)  # [D, E]
    top = torch.topk(scores, top_k, dim=-1).indices.flatten(1)  # [D, T*k]
    chosen = torch.zeros_like(best).scatter_(1, top, 1.0)  # [D, E]
    return torch.stack([best, chosen], dim=1)  # [D, 2, E]


class Prefetcher:
    def __init__(self, model: nn.Module, view: ModelView, offloader: ExpertOffloader, predictor: Predictor,
                 lookahead: int, budget_bytes: int, stats: RunStats):
        self.view = view
        self.offloader = offloader
        self.predictor = predictor
        self.lookahead = lookahead
        offloader.planner.budget = budget_bytes // offloader.store.expert_nbytes  # copies in flight (0: none)
        self.stats = stats
        self.distances = list(range(1, lookahead + 1))
        self._position = {layer: i for i, layer in enumerate(view.layers)}
        self._residual: dict[int, torch.Tensor] = {}
        self._pending: dict[tuple[int, int], dict[int, float]] = {}  # (target i, d) -> {expert: raw score}
        self._asked: dict[int, list[int]] = {}  # layer position -> distances summarised by device_scores
        self._spent: dict[int, float] = {}  # layer -> seconds its device_scores() took, until its plan()
        self._handles = [] if predictor.on_host else \
            [tap.register_forward_pre_hook(self._capture(i)) for i, tap in enumerate(view.taps)]

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

    def _targets(self, i: int, steering: bool) -> list[int]:
        """Distances worth predicting from layer position i: the target exists (or the predictor can
        look past the last layer) and it has experts that are not resident, or (steering) the
        prediction would steer eviction among its resident ones."""
        n, out = len(self.view.layers), []
        for d in self.distances:
            if i + d >= n and not self.predictor.wraps:
                continue
            if steering or self.offloader.resident_count(self.view.layers[(i + d) % n]) < self.view.num_experts:
                out.append(d)
        return out

    # Both entry points are timed whole (stats.predict_seconds): everything a configured predictor costs
    # the compute thread, the layers it skips and the calibration of earlier predictions included, so
    # the simulator can charge it per predicted layer (stats.predicted_layers) and add up to the same.
    def device_scores(self, layer: int) -> torch.Tensor | None:
        """Enqueue the predictor's device work for the residual entering `layer`'s MoE block; returns the
        [D, 2, E] summary to read back with the routing, or None (host-side predictor, nothing to predict)."""
        t0 = time.perf_counter()
        try:
            return self._device_scores(layer)
        finally:
            spent = time.perf_counter() - t0
            self.stats.predict_seconds += spent
            self._spent[layer] = spent

    def plan(self, layer: int, routing: list[list[int]], experts: list[int], summary: list | None) -> None:
        """Prefetch from the predictions made at `layer`, through the planner. routing: the layer's
        top-k rows [T][k] (host lists); summary: device_scores()'s result, read back."""
        t0, predicted = time.perf_counter(), self.stats.predicted_layers
        try:
            self._plan(layer, routing, experts, summary)
        finally:
            spent = time.perf_counter() - t0
            self.stats.predict_seconds += spent
            spent += self._spent.pop(layer, 0.0)
            if self.stats.predicted_layers > predicted:  # the planner weighs this against what prefetching saves
                self.stats.predicted_seconds += spent
                self.offloader.planner.observe_predict_cost(spent)

    def _device_scores(self, layer: int) -> torch.Tensor | None:
        i = self._position[layer]
        h = self._residual.pop(i, None)
        self._asked[i] = []
        if self.predictor.on_host or h is None:
            return None
        off = self.offloader
        if off.planner.epoch_without_prediction():  # (most decode layers where predicting does not pay)
            off.planner.counters.prediction_skipped += 1
            return None  # what worth_predicting() would say, without the lookups it makes first
        planner = off.planner
        may_steer = planner.steers_eviction()
        targets = self._targets(i, may_steer)
        if not targets or not planner.worth_predicting(off.clock(), off.copies_in_flight()):
            if targets:
                planner.counters.prediction_skipped += 1
            return None  # nothing could be prefetched nor steered: the predictor's compute is skipped
        if may_steer and not planner.steering_now():  # for its prefetches only: fully resident targets go
            targets = self._targets(i, False)
            if not targets:
                return None
        within = [d for d in targets if i + d < len(self.view.layers)] if h.dim() == 3 and h.shape[1] > 1 else targets
        if len(within) < len(targets):
            # prefill: the next token's layers follow each sequence's last position, not every prompt token's
            # (the last column: generate() pads batched prompts on the left)
            parts = [self.predictor.predict_stacked(i, x.reshape(-1, x.shape[-1]), ds)
                     for x, ds in ((h, within), (h[:, -1], targets[len(within):])) if ds]  # [D, T, E] each
            self._asked[i] = [d for done, _ in parts for d in done]
            summaries = [summarise(sc, self.view.top_k) for done, sc in parts if done]
            return torch.cat(summaries) if summaries else None  # [D, 2, E], in the order of the distances
        self._asked[i], scores = self.predictor.predict_stacked(i, h.reshape(-1, h.shape[-1]), targets)  # [D, T, E]
        return summarise(scores, self.view.top_k) if self._asked[i] else None

    def _plan(self, layer: int, routing: list[list[int]], experts: list[int], summary: list | None) -> None:
        i = self._position[layer]
        decode = len(routing) == 1
        actual = set(experts)
        planner = self.offloader.planner
        for d in self.distances:
            predicted = self._pending.pop((i, d), None)
            if predicted is not None:
                planner.observe_prediction(d, predicted, actual)  # calibrates the scores
                if decode:
                    chosen = set(predicted)
                    self.stats.record_prediction(d, len(chosen & actual), len(chosen), len(actual))
        distances = self._asked.pop(i, [])
        off = self.offloader
        if self.predictor.on_host:
            self.predictor.observe_rows(i, routing)  # [T][k] host lists
            worth = planner.worth_predicting(off.clock(), off.copies_in_flight())
            distances = self._targets(i, planner.steering_now()) if worth else []
            if distances:
                distances, scores = self.predictor.predict_stacked(i, torch.empty(len(routing), 0), distances)
                summary = host_list(summarise(scores, self.view.top_k)) if distances else None
        if not summary:
            planner.plan_prefetch(off.clock(), layer, [], set())  # the evidence still ages
            return
        n = len(self.view.layers)
        predictions = []
        for d, (best, chosen) in zip(distances, summary):
            j = (i + d) % n  # past the last layer: the next token's (wrapping predictors)
            scores = {e: best[e] for e, c in enumerate(chosen) if c}
            self._pending[(j, d)] = scores
            predictions.append((self.view.layers[j], d, scores))
            planner.steer_eviction(self.view.layers[j], d, scores)  # its cached others, for eviction
        protected = {(layer, e) for e in experts}
        off.prefetch(planner.plan_prefetch(off.clock(), layer, predictions, protected, in_flight=off.copies_in_flight(),
                                           asked=True))  # worth_predicting() said yes before predicting
        self.stats.predicted_layers += 1

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
