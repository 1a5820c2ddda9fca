"""m2r2: accelerated-residual predictor, in the spirit of M2R2 (arXiv 2502.02040).

For MoE layer i and distance d a low-rank map  A(h) = h + U V^T rmsnorm(h)  moves the residual
stream at layer i towards where it will be at layer i+d, so that layer i+d's own norm and router,
applied to A(h_i), reproduce that layer's routing ahead of time. U starts at zero, so an untrained
map is exactly next-gate; training (calibrate.py) can only move it towards the true routing.
Maps trained across the token boundary (calibrate --next-token) also cover i+d >= L, the layer
(i+d) - L of the *next* token, up to d = L: the residual at layer i carries what the model is about
to emit, and the next token's routing follows from that (next-gate applied there is near chance).
The file is a small safetensors holding U and V, tied to its model by a fingerprint of the routers.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import MoePrefetchError
from .base import ModelView, Predictor

FORMAT = "moe_prefetch.m2r2.v1"


def fingerprint(adapter, checkpoint) -> str:
    """Identifies the model a predictor was trained for: the checkpoint's routers and pre-MoE norms,
    read from the files (so it does not depend on the dtype the model runs in)."""
    h = hashlib.sha256()
    for module_key in adapter.routing_params:
        key = adapter.checkpoint_key(module_key, checkpoint)
        if key is not None:
            h.update(checkpoint.tensor(key).float().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def read(path: str | Path, expected_fingerprint: str | None = None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Metadata, U and V of a predictor file; refuses a file made for another model."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MoePrefetchError(f"predictor file {path} does not exist (train one with python -m moe_prefetch.calibrate)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            U, V = f.get_tensor("U"), f.get_tensor("V")
    except Exception as e:  # noqa: BLE001
        raise MoePrefetchError(f"{path} is not a readable m2r2 predictor file ({type(e).__name__})") from None
    if meta.get("format") != FORMAT:
        raise MoePrefetchError(f"{path} is not an m2r2 predictor file (format {meta.get('format')!r})")
    if expected_fingerprint is not None and meta.get("fingerprint") != expected_fingerprint:
        raise MoePrefetchError(f"predictor {path} was trained for a different model (router fingerprint mismatch); "
                               "recalibrate it for this model with python -m moe_prefetch.calibrate")
    return meta, U, V


class AcceleratedResidual(nn.Module):
    """Maps for all (layer, distance) pairs: U, V [L, K, H, r]."""

    def __init__(self, n_layers: int, lookahead: int, hidden: int, rank: int, eps: float = 1e-6,
                 wraps: bool = False):
        super().__init__()
        self.lookahead, self.rank, self.eps = lookahead, rank, eps
        self.wraps = wraps  # maps with i + d >= n_layers are trained for the next token's layer i + d - n_layers
        self.U = nn.Parameter(torch.zeros(n_layers, lookahead, hidden, rank))
        self.V = nn.Parameter(torch.randn(n_layers, lookahead, hidden, rank) / hidden**0.5)

    def forward(self, i: int, d: int, h: torch.Tensor) -> torch.Tensor:
        x = h.float()  # [T, H]
        x_n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x + (x_n @ self.V[i, d - 1]) @ self.U[i, d - 1].T  # [T, H]

    def many(self, i: int, distances: tuple[int, ...], h: torch.Tensor) -> torch.Tensor:
        """forward() for several distances at once: h [T, H] -> [D, T, H] (one norm, two batched matmuls
        on views of the maps: nothing is copied when the distances are consecutive)."""
        lo, hi = distances[0] - 1, distances[-1]
        sel = slice(lo, hi) if hi - lo == len(distances) else [d - 1 for d in distances]
        V, U = self.V[i, sel], self.U[i, sel]  # [D, H, r] each
        x = h.float()  # [T, H]
        x_n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        low = torch.matmul(x_n, V)  # [D, T, r]
        return torch.baddbmm(x.unsqueeze(0), low, U.transpose(1, 2))  # [D, T, H]: x + low @ U^T per distance


class AcceleratedPredictor(Predictor):
    name = "m2r2"

    def __init__(self, view: ModelView, maps: AcceleratedResidual):
        super().__init__(view)
        self.maps = maps
        self.wraps = maps.wraps  # the next token's layers too (trained with calibrate --next-token)

    def _reach(self, i: int, d: int) -> bool:
        n = len(self.view.layers)
        return d <= self.maps.lookahead and (i + d < n or (self.wraps and d <= n))  # at most one token ahead

    def max_lookahead(self):
        limit, why = super().max_lookahead()
        if self.maps.lookahead < limit:
            return self.maps.lookahead, f"its maps were trained for distances up to {self.maps.lookahead} (calibrate --lookahead)"
        return limit, why

    def predict(self, i, h, distances):
        n = len(self.view.layers)
        out = {}
        for d in distances:
            if self._reach(i, d):
                a = self.maps(i, d, h).to(h.dtype)
                out[d] = self.view.router_probs((i + d) % n, a)  # [T, E]: row t's own next token past the last layer
        return out

    def predict_stacked(self, i, h, distances):
        n = len(self.view.layers)
        done = tuple(d for d in distances if self._reach(i, d))
        if not done:
            return [], None
        a = self.maps.many(i, done, h).to(h.dtype)  # [D, T, H]
        return list(done), self.view.router_probs_many([(i + d) % n for d in done], a)  # [D, T, E]


def save(maps: AcceleratedResidual, view: ModelView, path: str | Path, extra: dict | None = None) -> None:
    from safetensors.torch import save as to_bytes

    meta = {"format": FORMAT, "fingerprint": view.fingerprint, "lookahead": str(maps.lookahead),
            "rank": str(maps.rank), "layers": str(len(view.layers)), "hidden": str(view.hidden_size),
            "next_token": "1" if maps.wraps else "0",
            "extra": json.dumps(extra or {})}
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    # written by open(), so the file gets the usual permissions (safetensors' save_file makes it 0600)
    tmp.write_bytes(to_bytes({"U": maps.U.detach().contiguous(), "V": maps.V.detach().contiguous()}, metadata=meta))
    tmp.replace(path)  # never leave a half-written predictor behind


def load(view: ModelView, path: str | Path, device: torch.device | str = "cpu") -> AcceleratedResidual:
    meta, U, V = read(path, view.fingerprint)
    n, K, H, r = U.shape
    if (n, H) != (len(view.layers), view.hidden_size):
        raise MoePrefetchError(f"predictor {path} has maps for {n} layers of width {H}; this model has "
                               f"{len(view.layers)} MoE layers of width {view.hidden_size}")
    # files written before --next-token have no such field: their maps past the last layer were never trained
    maps = AcceleratedResidual(n, K, H, r, wraps=meta.get("next_token") == "1")
    with torch.no_grad():
        maps.U.copy_(U)
        maps.V.copy_(V)
    return maps.to(device).requires_grad_(False)
