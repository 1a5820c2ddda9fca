"""OffloadedMoE: the module that replaces a family's sparse MoE block.

The family's own router decides which experts run (so output is exactly the reference's); the
experts come from the offloader's device slots instead of resident weights. The arithmetic mirrors
transformers' experts implementations operation for operation, so greedy decoding is token-identical:
  grouped (transformers' default, "grouped_mm"): rows sorted by expert, one matmul per expert group
      (on CUDA, transformers' own grouped-mm dispatcher with that one group, so the kernel is the one
      the reference picks for the dtype), routing weights applied after, per-token sum over top-k;
  eager: experts in ascending id, F.linear per expert, index_add_ into a zero buffer.
When a layer needs more experts than there are slots (long prompts), experts run in rounds; each
group's rows are computed independently, so rounds do not change a single bit.

Per layer the host reads the device once (devsync.read_back): the routing, together with the
predictor's summary. Then, in the grouped path, experts whose bytes are already in their slots are
computed first and the missed ones after, each waiting only for its own copy.
"""
from __future__ import annotations

import torch
from torch import nn

from .devsync import read_back
from .families import FamilyAdapter


def _grouped_mm_dispatch():
    """transformers' grouped-mm dispatcher (picks grouped_mm or its fallback as the reference does)."""
    try:
        from transformers.integrations.moe import _grouped_mm
    except ImportError:  # an older transformers: the reference then runs plain matmuls, as we do
        return None
    return _grouped_mm


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
        self._grouped_mm = _grouped_mm_dispatch()

    def extra_repr(self) -> str:
        return f"layer={self.layer}, experts={self.adapter.num_experts}, top_k={self.adapter.top_k}"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # [T, H]
        weights, indices = self.adapter.route(self.gate, x)  # [T, k], [T, k]
        self._indices = indices  # trace.record_routing reads it
        routed = self._experts_eager(x, weights, indices) if self.eager else self._experts_grouped(x, weights, indices)
        out = self.adapter.combine({n: getattr(self, n) for n in self.extra_names}, x, routed)
        return out.reshape(shape)

    def _read_routing(self, indices: torch.Tensor):
        """The layer's one device read: routing rows [T][k] (+ the predictor's summary), and the
        number of rows routed to each expert."""
        summary = self.prefetcher.device_scores(self.layer) if self.prefetcher is not None else None
        host = read_back([indices] if summary is None else [indices, summary])
        routing = host[0]
        counts = [0] * self.adapter.num_experts
        for row in routing:
            for e in row:
                counts[e] += 1
        return routing, counts, (host[1] if summary is not None else None)

    def _run(self, experts: list[int], compute, routing, summary) -> None:
        """Acquire `experts` in as many rounds as the cache needs and call compute(e, views) for each:
        landed ones first (grouped path), then the missed ones as their copies land. The prefetcher plans
        once, after the demand copies are queued and, on an asynchronous device, after the landed
        experts' compute is enqueued, so the host plans while the device computes."""
        off, layer = self.offloader, self.layer
        plan = None
        if self.prefetcher is not None:
            plan = lambda: self.prefetcher.plan(layer, routing, experts, summary)  # noqa: E731
        asynchronous = off.device.type == "cuda"
        pending = experts
        while pending:
            granted = off.acquire(layer, pending, in_order=self.eager)  # eager adds up in ascending order
            try:
                order = granted if self.eager else \
                    [e for e in granted if off.landed(layer, e)] + [e for e in granted if not off.landed(layer, e)]
                landed = sum(1 for e in order if off.landed(layer, e)) if asynchronous else 0
                if plan is not None and not asynchronous:
                    plan()  # host = device: queue the prefetches first, the copy thread moves them meanwhile
                    plan = None
                for n, e in enumerate(order):
                    if plan is not None and n == landed:
                        plan()
                        plan = None
                    compute(e, off.ready(layer, e))
                if plan is not None:
                    plan()
                    plan = None
            finally:
                off.release(layer, granted)
            done = set(granted)
            pending = [e for e in pending if e not in done]

    def _mm(self, rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
        """rows [n, in] @ weight[out, in]^T -> [n, out], with the reference's kernel for the device."""
        if offs is None:
            return torch.mm(rows, weight.t())
        return self._grouped_mm(rows, weight.t().unsqueeze(0), offs=offs)  # one group of n rows

    def _experts_grouped(self, x, weights, indices):
        T, k = indices.shape
        ids_sorted, perm = torch.sort(indices.reshape(-1))  # [T*k]
        rows = x[perm // k]  # [S, H], grouped by expert
        ends = None
        if x.device.type == "cuda" and self._grouped_mm is not None:  # the group sizes, on the device
            ends = torch.zeros(self.adapter.num_experts, dtype=torch.int32, device=x.device)
            ends = ends.scatter_add_(0, indices.reshape(-1), torch.ones_like(ids_sorted, dtype=torch.int32)).cumsum(0, dtype=torch.int32)  # [E]
        routing, counts, summary = self._read_routing(indices)
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        out = torch.empty_like(rows)  # [S, H]

        def compute(e, views):
            s, n = starts[e], counts[e]
            offs = None if ends is None else ends[e:e + 1] - s  # [1]: this group's rows end at n
            mm = (lambda r, w: self._mm(r, w, offs)) if offs is not None else None
            out[s:s + n] = self.adapter.expert_mlp(views, rows[s:s + n], mm=mm)

        self._run([e for e, n in enumerate(counts) if n], compute, routing, summary)
        weighted = out * weights.reshape(-1)[perm].unsqueeze(-1)  # [S, H] (promotes like the reference)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return weighted[inverse].view(T, k, -1).sum(dim=1).to(x.dtype)  # [T, H]

    def _experts_eager(self, x, weights, indices):
        T, k = indices.shape
        final = torch.zeros_like(x)  # [T, H]
        # The order transformers' eager loop visits (expert, top-k position, token) in, without a
        # data-dependent op: sort by expert, then position, then token.
        flat = torch.arange(T * k, device=x.device)  # [T*k] = token * k + position
        key = indices.reshape(-1) * (T * k) + (flat % k) * T + flat // k
        _, perm = torch.sort(key)  # [T*k]
        routing, counts, summary = self._read_routing(indices)
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]

        def compute(e, views):
            p = perm[starts[e]:starts[e] + counts[e]]
            tok, pos = p // k, p % k
            h = self.adapter.expert_mlp_eager(views, x[tok]) * weights[tok, pos, None]
            final.index_add_(0, tok, h.to(final.dtype))

        self._run([e for e, n in enumerate(counts) if n], compute, routing, summary)
        return final
