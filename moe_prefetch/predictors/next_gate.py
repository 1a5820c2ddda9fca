"""next-gate: apply layer l+d's own norm and router to the residual at layer l (training-free).

This is the speculative expert loading of the mixtral-offloading paper (Eliseev & Mazur, 2023),
generalised to any distance d: consecutive residuals are similar, so a later router applied to an
earlier residual is a fair guess, and a worse one the larger d is.
"""
from __future__ import annotations

from .base import Predictor


class NextGatePredictor(Predictor):
    name = "next-gate"

    def predict(self, i, h, distances):
        n = len(self.view.layers)
        return {d: self.view.router_probs(i + d, h) for d in distances if i + d < n}  # [T, E] each

    def predict_stacked(self, i, h, distances):
        n = len(self.view.layers)
        done = [d for d in distances if i + d < n]
        if not done:
            return [], None
        a = h.unsqueeze(0).expand(len(done), *h.shape)  # [D, T, H]: the same residual for every target
        return done, self.view.router_probs_many([i + d for d in done], a)  # [D, T, E]
