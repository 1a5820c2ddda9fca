"""Expert predictors. make_predictor(name, view, ...) builds one by its --predictor name."""
from __future__ import annotations

from ..errors import MoePrefetchError
from .base import ModelView, NoPredictor, Predictor
from .history import HistoryPredictor
from .next_gate import NextGatePredictor
from .oracle import OraclePredictor

PREDICTORS = ("none", "next-gate", "history", "m2r2", "oracle")


def make_predictor(name: str, view: ModelView, path=None, device="cpu", trace=None) -> Predictor:
    if name == "none":
        return NoPredictor(view)
    if name == "next-gate":
        return NextGatePredictor(view)
    if name == "history":
        return HistoryPredictor(view)
    if name == "m2r2":
        from .accelerated import AcceleratedPredictor, load

        if path is None:
            raise MoePrefetchError("--predictor m2r2 needs --predictor-path FILE (train it with python -m moe_prefetch.calibrate)")
        return AcceleratedPredictor(view, load(view, path, device))
    if name == "oracle":
        if trace is None:
            if path is None:
                raise MoePrefetchError("--predictor oracle needs --predictor-path TRACE (record one with python -m moe_prefetch.trace)")
            from ..trace import load_routing

            trace = load_routing(path)
        return OraclePredictor(view, trace)
    raise MoePrefetchError(f"unknown predictor {name!r}: use one of {', '.join(PREDICTORS)}")


__all__ = ["PREDICTORS", "HistoryPredictor", "ModelView", "NextGatePredictor", "NoPredictor", "OraclePredictor", "Predictor", "make_predictor"]
