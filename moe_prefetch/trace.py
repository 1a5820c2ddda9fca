"""Routing traces: which experts every MoE layer chose, per forward pass.

record_routing(model) records them from an offloaded model; save_routing/load_routing store them as
npz (one [T, L, k] array per forward pass, the model's shape in the header). The oracle predictor
replays a trace; benchmarks and the simulator read them.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import torch

from .errors import MoePrefetchError


@contextlib.contextmanager
def record_routing(model):
    """Yield a list that fills with trace[step][i] = indices [T, k] while the model runs."""
    rt = model.moe_runtime
    trace: list[list[torch.Tensor]] = []
    handles = [model.register_forward_pre_hook(lambda m, a, k: trace.append([]), with_kwargs=True)]
    for layer in rt.adapter.moe_layers():
        block = rt.adapter.get_block(model, layer)
        handles.append(block.register_forward_hook(lambda m, a, o: trace[-1].append(m._indices.detach().cpu().clone())))
    try:
        yield trace
    finally:
        for h in handles:
            h.remove()


def save_routing(trace, path, meta: dict | None = None) -> None:
    arrays = {f"step{s:06d}": torch.stack(layers, dim=1).numpy().astype(np.int16) for s, layers in enumerate(trace)}
    header = dict(meta or {}, steps=len(trace), format="moe_prefetch.routing.v1")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, header=np.array(json.dumps(header)), **arrays)
    tmp.replace(path)


def load_routing(path) -> list[list[torch.Tensor]]:
    path = Path(path)
    try:
        with np.load(path) as z:
            header = json.loads(str(z["header"]))
            steps = [z[f"step{s:06d}"] for s in range(header["steps"])]
    except Exception as e:  # noqa: BLE001
        raise MoePrefetchError(f"cannot read routing trace {path} ({type(e).__name__})") from None
    return [[torch.from_numpy(a[:, i].astype(np.int64)) for i in range(a.shape[1])] for a in steps]
