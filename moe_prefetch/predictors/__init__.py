"""Expert predictors. make_predictor(name, view, ...) builds one by its --predictor name."""
from __future__ import annotations

from ..errors import MoePrefetchError
from .base import ModelView, NoPredictor, Predictor
from .history import HistoryPredictor
from .next_gate import NextGatePredictor
from .oracle import OraclePredictor

PREDICTORS = ("auto", "none", "next-gate", "history", "m2r2", "oracle")


def resolve_auto(view: ModelView) -> str:
    """What --predictor auto (the default) runs on this model: next-gate, which scores later layers with
    their own routers, where those routers can run ahead of time; history where they cannot (a router
    that reads token ids, as DeepSeek-V4's hash-routed layers do)."""
    return "next-gate" if view.routers_unavailable is None else "history"


def make_predictor(name: str, view: ModelView, path=None, device="cpu", trace=None) -> Predictor:
    if name == "auto":
        name = resolve_auto(view)
    if name == "none":
        return NoPredictor(view)
    if name == "next-gate":
        view.need_routers("--predictor next-gate")
        return NextGatePredictor(view)
    if name == "history":
        return HistoryPredictor(view)
    if name == "m2r2":
        from .accelerated import AcceleratedPredictor, load

        view.need_routers("--predictor m2r2")
        if path is None:
            raise MoePrefetchError("--predictor m2r2 needs --predictor-path FILE (train it with python -m moe_prefetch.calibrate)")
        return AcceleratedPredictor(view, load(view, path, device))
    if name == "oracle":
        if trace is None:
            if path is None:
                raise MoePrefetchError("--predictor oracle needs --predictor-path TRACE (python -m moe_prefetch.trace "
                                       "--prompt ... records the routing of a run; --data ... of a text, token by token)")
            from ..trace import load_routing

            trace = load_routing(path, view.fingerprint)
        if trace and (len(trace[0]) != len(view.layers) or
                      max(int(t.max()) for t in trace[0]) >= view.num_experts or trace[0][0].shape[-1] != view.top_k):
            raise MoePrefetchError(f"routing trace {path or ''} does not match this model "
                                   f"({len(view.layers)} MoE layers, {view.num_experts} experts, top-{view.top_k})")
        return OraclePredictor(view, trace)
    raise MoePrefetchError(f"unknown predictor {name!r}: use one of {', '.join(PREDICTORS)}")


__all__ = ["PREDICTORS", "HistoryPredictor", "ModelView", "NextGatePredictor", "NoPredictor", "OraclePredictor", "Predictor", "make_predictor", "resolve_auto"]
