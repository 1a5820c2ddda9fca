"""history: per-sequence routing statistics (as MoE-Infinity's expert activation matrix) blended
with the experts the previous token used at the same layer (routing is sticky across tokens)."""
from __future__ import annotations

import torch

from .base import Predictor


class HistoryPredictor(Predictor):
    name = "history"
    sequential = True
    wraps = True

    def __init__(self, view, recent_weight: float = 0.5):
        super().__init__(view)
        self.recent_weight = recent_weight
        self.reset()

    def reset(self):
        n, E = len(self.view.layers), self.view.num_experts
        self.counts = torch.zeros(n, E)  # [L, E] activations in this sequence
        self.last = torch.zeros(n, E)    # [L, E] one-hot of the latest token's experts

    def observe(self, i, indices):
        idx = indices.reshape(-1, indices.shape[-1]).cpu()  # [T, k]
        self.counts[i] += torch.bincount(idx.flatten(), minlength=self.view.num_experts).float()
        self.last[i].zero_()
        self.last[i, idx[-1]] = 1.0

    def predict(self, i, h, distances):
        T, n = h.shape[0], len(self.view.layers)
        out = {}
        for d in distances:
            j = (i + d) % n  # past the last layer: the next token's layers
            total = self.counts[j].sum()
            freq = self.counts[j] / total if total > 0 else torch.full_like(self.counts[j], 1.0 / self.view.num_experts)
            score = self.recent_weight * self.last[j] + (1 - self.recent_weight) * freq  # [E]
            out[d] = score.expand(T, -1)
        return out
