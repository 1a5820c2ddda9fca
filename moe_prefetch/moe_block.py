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
predictor's summary. The planner (through the offloader) then says where each expert runs: experts
sent to the host start there first, experts whose bytes are already in their slots are computed
next, and the missed ones after, each waiting only for its own copy.
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

    def _run(self, counts: list[int], device_fn, host_fn, host_store, routing, summary) -> None:
        """Run the layer's routed experts (counts[e] rows each) as the planner decides, in as many rounds
        as the cache needs: host experts are queued on the host executor first, then the device computes
        its landed experts, then the missed ones as their copies land, then the host results are stored.
        device_fn(e, views) computes on a slot; host_fn(e) -> (mlp, rows) is what the host runs;
        host_store(e, out) stores its result. The prefetcher plans once, after the demand copies are
        queued and, on an asynchronous device, after the landed experts' compute is enqueued, so the
        host plans while the device computes (on the CPU backend, before: the copy thread then moves the
        prefetches while the host computes)."""
        off, layer = self.offloader, self.layer
        experts = [e for e, n in enumerate(counts) if n]
        rows = {e: counts[e] for e in experts}
        plan = None
        if self.prefetcher is not None:
            plan = lambda: self.prefetcher.plan(layer, routing, experts, summary)  # noqa: E731
        asynchronous = off.device.type == "cuda"
        pending = experts
        while pending:
            actions = off.acquire(layer, pending, rows, in_order=self.eager)  # eager adds up in ascending order
            try:
                jobs = {}
                if not self.eager:  # start the host early: it works while the device computes
                    jobs = {a.key[1]: off.host.submit(layer, a.key[1], *host_fn(a.key[1]))
                            for a in actions if a.kind == "host"}
                device = [a.key[1] for a in actions if a.kind != "host"]
                here = {e for e in device if off.landed(layer, e)}  # asked once: the engine may change its answer
                if not self.eager:
                    device = [e for e in device if e in here] + [e for e in device if e not in here]
                landed = len(here) if asynchronous else 0
                if plan is not None and not asynchronous:
                    plan()  # host = device: queue the prefetches first, the copy thread moves them meanwhile
                    plan = None
                order = [a.key[1] for a in actions] if self.eager else device
                done = 0
                for e in order:
                    if plan is not None and done == landed:
                        plan()
                        plan = None
                    if self.eager and e not in device:  # in order: this host expert's sum comes now
                        host_store(e, off.host.result(off.host.submit(layer, e, *host_fn(e))))
                        continue
                    device_fn(e, off.ready(layer, e))
                    done += 1
                if plan is not None:
                    plan()
                    plan = None
                for e, job in jobs.items():
                    host_store(e, off.host.result(job))
            finally:
                off.release(actions)
            granted = {a.key[1] for a in actions}
            pending = [e for e in pending if e not in granted]

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

        def host_rows(e):
            return self.adapter.expert_mlp, rows[starts[e]:starts[e] + counts[e]]

        def host_store(e, h):
            out[starts[e]:starts[e] + counts[e]] = h

        self._run(counts, compute, host_rows, host_store, routing, summary)
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

        def token_positions(e):
            p = perm[starts[e]:starts[e] + counts[e]]
            return p // k, p % k

        def add(e, h):
            tok, pos = token_positions(e)
            final.index_add_(0, tok, (h * weights[tok, pos, None]).to(final.dtype))

        def compute(e, views):
            add(e, self.adapter.expert_mlp_eager(views, x[token_positions(e)[0]]))

        def host_rows(e):
            return self.adapter.expert_mlp_eager, x[token_positions(e)[0]]

        self._run(counts, compute, host_rows, add, routing, summary)
        return final
