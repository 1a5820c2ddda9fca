"""OffloadedMoE: the module that replaces a family's sparse MoE block.

The family's own router decides which experts run (so output is exactly the reference's); the
experts come from the offloader's device slots instead of resident weights. The arithmetic mirrors
transformers' experts implementations operation for operation, so greedy decoding is token-identical:
  grouped (transformers' default, "grouped_mm"): rows sorted by expert, one matmul per expert group,
      routing weights applied after, per-token sum over the top-k positions;
  eager: experts in ascending id, F.linear per expert, index_add_ into a zero buffer.
When a layer needs more experts than there are slots (long prompts), experts run in rounds; each
group's rows are computed independently, so rounds do not change a single bit.
"""
from __future__ import annotations

import torch
from torch import nn

from .families import FamilyAdapter


class OffloadedMoE(nn.Module):
    def __init__(self, adapter: FamilyAdapter, layer: int, gate: nn.Module, extras: dict[str, nn.Module]):
        super().__init__()
        self.adapter = adapter
        self.layer = layer
        self.gate = gate  # same attribute name as the reference block, so parameter names line up
        self.extra_names = tuple(extras)
        for name, module in extras.items():
            self.add_module(name, module)
        self.offloader = None  # set by runtime.load_model once the cache exists
        self.prefetcher = None  # optional: predicts and prefetches later layers' experts
        self.eager = getattr(adapter.config, "_experts_implementation", None) == "eager"

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.adapter.num_experts}, top_k={self.adapter.top_k}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        weights, indices = self.adapter.route(self.gate, x)  # [T, k], [T, k]
        self._indices = indices
        routed = self._experts_eager(x, weights, indices) if self.eager else self._experts_grouped(x, weights, indices)
        out = self.adapter.combine({n: getattr(self, n) for n in self.extra_names}, x, routed)
        return out.reshape(shape)

    def _run(self, experts: list[int], compute) -> None:
        """Acquire `experts` in as many rounds as the cache needs, calling compute(e, views) for each.
        Demand copies are queued first; then the prefetcher queues later layers' experts behind them,
        and they move while this layer computes."""
        off, layer = self.offloader, self.layer
        pending = experts
        first = True
        while pending:
            granted = off.acquire(layer, pending, in_order=self.eager)  # eager adds up in ascending order
            try:
                if first and self.prefetcher is not None:
                    self.prefetcher.after_routing(layer, self._indices, experts)
                first = False
                for e in granted:
                    compute(e, off.ready(layer, e))
            finally:
                off.release(layer, granted)
            done = set(granted)
            pending = [e for e in pending if e not in done]

    def _experts_grouped(self, x, weights, indices):
        T, k = indices.shape
        ids_sorted, perm = torch.sort(indices.reshape(-1))  # [T*k]
        rows = x[perm // k]  # [S, H], grouped by expert
        counts = torch.bincount(ids_sorted, minlength=self.adapter.num_experts).tolist()  # the one host sync
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        out = torch.empty_like(rows)  # [S, H]

        def compute(e, views):
            s, n = starts[e], counts[e]
            out[s:s + n] = self.adapter.expert_mlp(views, rows[s:s + n])

        self._run([e for e, n in enumerate(counts) if n], compute)
        weighted = out * weights.reshape(-1)[perm].unsqueeze(-1)  # [S, H] (promotes like the reference)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return weighted[inverse].view(T, k, -1).sum(dim=1).to(x.dtype)  # [T, H]

    def _experts_eager(self, x, weights, indices):
        final = torch.zeros_like(x)  # [T, H]
        mask = torch.nn.functional.one_hot(indices, num_classes=self.adapter.num_experts).permute(2, 1, 0)  # [E, k, T]
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist()

        def compute(e, views):
            pos, tok = torch.where(mask[e])
            h = self.adapter.expert_mlp_eager(views, x[tok]) * weights[tok, pos, None]
            final.index_add_(0, tok, h.to(final.dtype))

        self._run(hit, compute)
        return final
