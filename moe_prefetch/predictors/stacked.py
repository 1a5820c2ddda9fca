"""StackedRouting: the norms and routers of several later layers applied as one batched computation.

A residual predictor scores layers i+1 .. i+K from one residual. Run layer by layer, each distance is
its own norm (five or six small ops), router matmul and softmax; at decode (one row) every op is
launch overhead, so on a GPU or a small CPU the predictor costs a sizeable share of a layer. When a
layer's pre-MoE norm is a plain RMSNorm (x * rsqrt(mean(x^2) + eps) * w, w its weight or 1 + its
weight) or no norm at all, and its router a plain bias-free linear map (Router._plain), the D target
layers stack: their norm weights [D, 1, H], eps [D, 1, 1] and router weights [D, E, H] turn D
distances into one batched norm, one bmm and one softmax (stacks are kept for reuse up to KEEP_BYTES
in all, and made per call past that).
Which layers qualify is found once, at load, by running each norm on random rows and comparing with
the formula (no device read in the hot path); any other norm or router is served layer by layer
through the family's own modules (ModelView.router_probs), with the same result up to float rounding.
"""
from __future__ import annotations

import torch
from torch import nn

_EPS_NAMES = ("variance_epsilon", "eps", "epsilon")


def _plain_norm(norm: nn.Module, hidden: int, device, dtype):
    """What `norm` computes, when it is one of the forms stacked here: (eps, effective weight [H]) for
    x * rsqrt(mean(x^2) + eps) * w, with w its weight or 1 + its weight (the Gemma / Qwen3-Next form);
    "none" for no norm at all (nn.Identity: the block reads the residual as is); None for anything else."""
    if isinstance(norm, nn.Identity):
        return "none"
    w = getattr(norm, "weight", None)
    eps = next((getattr(norm, n) for n in _EPS_NAMES if isinstance(getattr(norm, n, None), float)), None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (hidden,) or eps is None or getattr(norm, "bias", None) is not None:
        return None
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(16, hidden, generator=g)).to(device=device, dtype=dtype)
    with torch.no_grad():
        try:
            got = norm(x)
        except Exception:  # noqa: BLE001 - not a norm of rows: the general path serves it
            return None
        if not isinstance(got, torch.Tensor) or got.shape != x.shape:
            return None
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for weight in (w.detach(), 1 + w.detach().float()):
            mine = _rms(x.float().unsqueeze(0), torch.tensor(eps, device=device)).to(dtype) * weight
            if torch.allclose(got.float(), mine[0].float(), rtol=tol, atol=tol):
                return eps, weight
    return None


def _rms(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """x [D, T, H] float32, eps broadcastable to [D, 1, 1] -> normalised rows (no weight)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class StackedRouting:
    """Routing distributions of several target layers for residuals [D, T, H] (one per target)."""

    #: stacked copies of router and norm weights kept for reuse, in bytes in all; past it, a target set's
    #: stack is made per call (one copy op): a model with many layers and wide routers gets no hidden
    #: device memory outside the budget
    KEEP_BYTES = 8 << 20

    def __init__(self, view, device, dtype):
        self.view = view
        self._norms: list = []  # per layer position: (eps, weight), "none", or None (not stackable)
        for norm, router in zip(view.norms, view.routers):
            plain = getattr(router, "_plain", False) and router.weight is not None
            self._norms.append(_plain_norm(norm, view.hidden_size, device, dtype) if plain else None)
        self._stacks: dict[tuple[int, ...], tuple] = {}
        self._kept = 0

    def fused(self, targets: tuple[int, ...]) -> bool:
        """Whether every target layer's norm and router can run as one batched computation (all norms
        of one form: RMSNorms, or none at all)."""
        kinds = {None if self._norms[j] is None else self._norms[j] == "none" for j in targets}
        return bool(targets) and None not in kinds and len(kinds) == 1

    def _stack(self, targets: tuple[int, ...]):
        s = self._stacks.get(targets)
        if s is not None:
            return s
        v = self.view
        r = torch.stack([v.routers[j].weight.detach() for j in targets])  # [D, E, H]
        if self._norms[targets[0]] == "none":
            s = (None, None, r)
        else:
            w = torch.stack([self._norms[j][1] for j in targets]).unsqueeze(1)  # [D, 1, H]
            eps = torch.tensor([self._norms[j][0] for j in targets], device=r.device).view(-1, 1, 1)  # [D, 1, 1]
            s = (w, eps, r)
        nbytes = sum(t.numel() * t.element_size() for t in s if t is not None)
        if self._kept + nbytes <= self.KEEP_BYTES:
            self._stacks[targets] = s
            self._kept += nbytes
        return s

    def probs(self, targets: tuple[int, ...], a: torch.Tensor) -> torch.Tensor:
        """targets: D layer positions that fused() accepts; a [D, T, H] the residual predicted for each ->
        scores [D, T, E] float32 (ModelView.router_probs_many serves the others layer by layer)."""
        w, eps, r = self._stack(targets)
        x = a if w is None else _rms(a.float(), eps).to(a.dtype) * w  # [D, T, H], cast as the norm does
        return torch.softmax(torch.bmm(x.to(r.dtype), r.transpose(1, 2)).float(), dim=-1)  # [D, T, E], as the router casts
