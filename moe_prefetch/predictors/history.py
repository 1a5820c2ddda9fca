"""history: per-sequence routing statistics (as MoE-Infinity's expert activation matrix) blended
with the experts the previous token used at the same layer (routing is sticky across tokens).
Host-only: it keeps its statistics in numpy and reads the routing as Python lists, so it never
touches the device."""
from __future__ import annotations

import numpy as np
import torch

from .base import Predictor


def blend(counts: np.ndarray, last: np.ndarray, recent_weight: float = 0.5) -> np.ndarray:
    """counts, last [D, E] (a layer's uses this sequence, its latest token's experts one-hot) -> scores
    [D, E] float32: the latest token's experts blended with the frequencies (uniform before any use)."""
    total = counts.sum(axis=1, keepdims=True)  # [D, 1]
    freq = np.where(total > 0, counts / np.maximum(total, 1.0), 1.0 / counts.shape[1])
    return (recent_weight * last + (1 - recent_weight) * freq).astype(np.float32)


def history_scores(routing: np.ndarray, seq_lengths: list[int] | None, K: int, num_experts: int,
                   recent_weight: float = 0.5) -> np.ndarray:
    """routing [N, L, k] (one decode step per token) -> [N, L, K, E] float32: what HistoryPredictor scores
    at each (token, layer) for distances 1..K, as the runtime asks it: after observing the layer's own
    routing, its statistics reset at each sequence's start. The simulator's `history` (like its oracle,
    a function of the routing alone, so any K can be replayed); trace.py records the same."""
    N, L, _ = routing.shape
    out = np.empty((N, L, K, num_experts), np.float32)
    js = [[(i + d) % L for d in range(1, K + 1)] for i in range(L)]
    lengths = list(seq_lengths or [])
    if sum(lengths) < N:
        lengths.append(N - sum(lengths))  # steps past the recorded sequences: one more sequence
    start = 0
    for length in lengths:
        counts, last = np.zeros((L, num_experts)), np.zeros((L, num_experts))
        for t in range(start, min(start + length, N)):
            for i in range(L):
                experts = list(routing[t, i])
                np.add.at(counts[i], experts, 1.0)
                last[i] = 0.0
                last[i, experts] = 1.0
                out[t, i] = blend(counts[js[i]], last[js[i]], recent_weight)
        start += length
    return out


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
        counts, last = self.counts[i], self.last[i]  # [E] views: element writes, no index arrays (every layer)
        for row in rows:
            for e in row:
                counts[e] += 1
        last.fill(0.0)
        for e in rows[-1]:
            last[e] = 1.0

    def _scores(self, i, distances) -> np.ndarray:
        """[D, E] float32: the scores of layers i + d (past the last layer: the next token's), all at once."""
        n = len(self.view.layers)
        js = [(i + d) % n for d in distances]
        return blend(self.counts[js], self.last[js], self.recent_weight)

    def predict(self, i, h, distances):
        done, scores = self.predict_stacked(i, h, list(distances))  # [D, T, E]
        return {d: scores[n] for n, d in enumerate(done)}

    def predict_stacked(self, i, h, distances):
        # one array op for every distance: at a lookahead of a whole token (K = the MoE layers) a
        # distance at a time would cost K small tensors per layer
        if not distances:
            return [], None
        scores = torch.from_numpy(self._scores(i, list(distances)))  # [D, E]
        return list(distances), scores.unsqueeze(1).expand(-1, h.shape[0], -1)  # [D, T, E]
