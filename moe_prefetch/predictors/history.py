"""history: per-sequence routing statistics (as MoE-Infinity's expert activation matrix) blended
with the experts the previous token used at the same layer (routing is sticky across tokens).
Host-only: it keeps its statistics in numpy and reads the routing as Python lists, so it never
touches the device."""
from __future__ import annotations

import numpy as np
import torch

from .base import Predictor


class HistoryPredictor(Predictor):
    name = "history"
    sequential = True
    wraps = True
    on_host = True

    def __init__(self, view, recent_weight: float = 0.5):
        super().__init__(view)
        self.recent_weight = recent_weight
        self.reset()

    def reset(self):
        n, E = len(self.view.layers), self.view.num_experts
        self.counts = np.zeros((n, E))  # [L, E] activations in this sequence
        self.last = np.zeros((n, E))    # [L, E] one-hot of the latest token's experts

    def observe(self, i, indices):
        self.observe_rows(i, indices.reshape(-1, indices.shape[-1]).tolist())

    def observe_rows(self, i, rows):
        for row in rows:
            for e in row:
                self.counts[i, e] += 1
        self.last[i] = 0.0
        self.last[i, rows[-1]] = 1.0

    def predict(self, i, h, distances):
        T, n = h.shape[0], len(self.view.layers)
        out = {}
        for d in distances:
            j = (i + d) % n  # past the last layer: the next token's layers
            total = self.counts[j].sum()
            freq = self.counts[j] / total if total > 0 else np.full(self.view.num_experts, 1.0 / self.view.num_experts)
            score = self.recent_weight * self.last[j] + (1 - self.recent_weight) * freq  # [E]
            out[d] = torch.from_numpy(score.astype(np.float32)).expand(T, -1)
        return out
