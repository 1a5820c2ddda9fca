"""Offloaded experts: transformers' own MoE blocks and routers run unchanged; only the experts
module's arithmetic is served from the expert cache, through transformers' experts interface.

`install(model, adapter)` takes every experts module of the skeleton (any family whose experts use
`use_experts_implementation`), drops its [E, ...] parameters (they are never allocated) and points
its dispatch at the "moe_prefetch" implementation registered with `ExpertsInterface`: the module
keeps its flags, activation, `_apply_gate` and post-expert norm, and our implementation calls them.
The arithmetic mirrors the implementation transformers would have dispatched to, operation for
operation, so greedy decoding is token-identical:
  grouped ("grouped_mm", transformers' default): rows sorted by expert, one matmul per expert group
      (on CUDA, transformers' own grouped-mm dispatcher with that one group, so the kernel is the one
      the reference picks for the dtype), biases added after each matmul, gate or activation, optional
      post-expert norm, routing weights applied after, per-token sum over top-k;
  eager: the family's own eager loop (its original forward) runs as is; its `self.gate_up_proj[e]`
      lookups return views of expert e's cache slot.
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
from .errors import MoePrefetchError
from .families import FamilyAdapter
from .families.adapter import interface_forward
from .host_kernels import PackedExpert, PackedMatrix

IMPLEMENTATION = "moe_prefetch"


def _dispatch(module: nn.Module, hidden_states: torch.Tensor, top_k_index=None, top_k_weights=None, **kwargs):
    """The function registered with transformers' ExpertsInterface (GPT-OSS names the routing
    router_indices / routing_weights)."""
    offload = module.__dict__.get("_moe_offload")
    if offload is None:
        raise MoePrefetchError(f"experts implementation {IMPLEMENTATION!r} serves models loaded with "
                               "moe_prefetch.load_model only")
    if top_k_index is None:
        top_k_index = kwargs.pop("router_indices")
    if top_k_weights is None:
        top_k_weights = kwargs.pop("routing_weights")
    return offload(hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, _dispatch)


def _grouped_mm_dispatch():
    """transformers' grouped-mm dispatcher (picks grouped_mm or its fallback as the reference does)."""
    try:
        from transformers.integrations.moe import _grouped_mm
    except ImportError:  # an older transformers: the reference then runs plain matmuls, as we do
        return None
    return _grouped_mm


def _native_grouped_mm(rows, weight, offs) -> bool:
    """True where transformers' _grouped_mm would call torch's native grouped kernel for these operands."""
    try:
        from transformers.integrations.moe import _can_use_grouped_mm
    except ImportError:
        return False
    return bool(_can_use_grouped_mm(rows, weight, offs))


class _ConfigView:
    """The experts module's config as it was, except that it names our implementation (a per-module
    view: the model's own config, shared with every other module, is left as transformers set it)."""

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name):
        if name == "_experts_implementation":
            return IMPLEMENTATION
        return getattr(self._config, name)

    def __setattr__(self, name, value):
        setattr(self._config, name, value)


class _ExpertRows:
    """Stands for an [E, ...] expert parameter inside the family's eager loop: `p[e]` is expert e's
    matrix in its cache slot (acquired through the offloader as the loop reaches it)."""

    def __init__(self, owner: "OffloadedExperts", name: str):
        self.owner, self.name = owner, name

    def __getitem__(self, expert) -> torch.Tensor:
        return self.owner._eager_views(int(expert))[self.name]


class OffloadedExperts:
    """The offloaded arithmetic of one experts module (state only: the module stays transformers')."""

    def __init__(self, module: nn.Module, adapter: FamilyAdapter, layer: int):
        self.module = module
        self.adapter = adapter
        self.layer = layer
        self.eager = adapter.eager
        self.offloader = None  # set by runtime.load_model once the cache exists
        self.prefetcher = None  # optional: predicts and prefetches later layers' experts
        self.last_indices = None  # trace.record_routing reads it
        self._grouped_mm = _grouped_mm_dispatch()
        self._native = None  # whether transformers' grouped mm runs a native kernel here (decided on first use)
        flags = adapter.flags
        self.transposed = flags["is_transposed"]
        self.has_bias = flags["has_bias"]
        self.has_gate = flags["has_gate"]
        self.post_norm = flags["has_post_expert_norm"]
        self.up = "gate_up_proj" if self.has_gate else "up_proj"
        self.dequant = None  # quant_store.Dequantizer when experts are kept quantized: slot parts -> weights
        self._round = None

    # ---- installation ----------------------------------------------------------------------
    @classmethod
    def install(cls, module: nn.Module, adapter: FamilyAdapter, layer: int) -> "OffloadedExperts":
        state = cls(module, adapter, layer)
        for name, _ in adapter.params:
            del module._parameters[name]
            if state.eager:
                object.__setattr__(module, name, _ExpertRows(state, name))
        module.config = _ConfigView(module.config)
        module.__dict__["_moe_offload"] = state
        return state

    def __call__(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        self.last_indices = self._token_routing(top_k_index)
        if self.eager:
            return self._experts_eager(x, top_k_weights, top_k_index)
        return self._experts_grouped(x, top_k_weights, top_k_index)

    def _token_routing(self, indices: torch.Tensor) -> torch.Tensor:
        """The routing as the tokens' top-k rows [T, k]: what the planner, the predictors and traces read. Experts
        modules that call the interface with one route per row (Ergo's, to norm each route's output with its
        expert's own weights: token-major rows [T*k, 1]) are regrouped."""
        k = self.adapter.top_k
        if indices.dim() == 2 and indices.shape[-1] == 1 and k > 1 and indices.shape[0] % k == 0:
            return indices.reshape(-1, k)
        return indices

    # ---- one expert ------------------------------------------------------------------------
    def _linear(self, rows: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
        """rows [n, in] @ weight -> [n, out] (weight [out, in], or [in, out] when transposed), with the
        reference's kernel for the device."""
        if isinstance(weight, PackedMatrix):  # host compute through a weight-only CPU kernel
            return weight(rows)
        w = weight if self.transposed else weight.t()  # [in, out]
        if offs is not None and self._native is None:  # asked once: a host-side check of device and dtypes
            self._native = _native_grouped_mm(rows, w.unsqueeze(0), offs)
        if offs is None or not self._native:
            # transformers' fallback (no native grouped mm: CPU, GPUs before sm80) is this same torch.mm per
            # group; calling it directly spares the fallback's per-call offsets read (a host sync per expert)
            return torch.mm(rows.to(w.dtype), w)  # transformers casts the rows to the weights' dtype too
        return self._grouped_mm(rows, w.unsqueeze(0), offs=offs)  # one group of n rows

    def expert_mlp(self, views: dict[str, torch.Tensor], rows: torch.Tensor, offs: torch.Tensor | None = None) -> torch.Tensor:
        """rows [n, H] -> [n, H] through one expert (no routing weight applied), as transformers'
        grouped implementation computes each group."""
        m = self.module
        if self.dequant is not None and not isinstance(views, PackedExpert):
            views = self.dequant(views)  # the expert's weights in the compute dtype, just before use
        h = self._linear(rows, views[self.up], offs)  # [n, 2I] or [n, I]
        if self.has_bias:
            h.add_(views[self.up + "_bias"])
        h = m._apply_gate(h) if self.has_gate else m.act_fn(h)  # [n, I]
        out = self._linear(h, views["down_proj"], offs)  # [n, H]
        if self.has_bias:
            out.add_(views["down_proj_bias"])
        if self.post_norm:
            out = m.post_expert_norm(out)
        return out

    # ---- the layer ---------------------------------------------------------------------------
    def _read_routing(self, indices: torch.Tensor):
        """The layer's one device read: routing rows [T][k] (+ the predictor's summary), and the
        number of rows routed to each expert."""
        summary = self.prefetcher.device_scores(self.layer) if self.prefetcher is not None else None
        host = read_back([indices] if summary is None else [indices, summary])
        routing = host[0]
        counts = [0] * self.adapter.num_experts
        for row in routing:
            for e in row:
                if 0 <= e < len(counts):
                    counts[e] += 1
        return routing, counts, (host[1] if summary is not None else None)

    def _plan(self, routing, experts, summary):
        if self.prefetcher is None:
            return None
        return lambda: self.prefetcher.plan(self.layer, routing, experts, summary)  # noqa: E731

    def _run(self, counts: list[int], device_fn, host_fn, host_store, routing, summary) -> None:
        """Run the layer's routed experts (counts[e] rows each) as the planner decides, in as many rounds
        as the cache needs: host experts are queued on the host executor first, then the device computes
        its landed experts, then the missed ones as their copies land, then the keeps of the host's experts
        are decided and started (while the host still works), then the host results are stored.
        device_fn(e, views) computes on a slot; host_fn(e) -> (mlp, rows) is what the host runs;
        host_store(e, out) stores its result. The prefetcher plans once, after the demand copies are
        queued and, on an asynchronous device, after the landed experts' compute is enqueued, so the
        host plans while the device computes (on the CPU backend, before: the copy thread then moves the
        prefetches while the host computes)."""
        off, layer = self.offloader, self.layer
        experts = [e for e, n in enumerate(counts) if n]
        rows = {e: counts[e] for e in experts}
        plan = self._plan(routing, experts, summary)
        asynchronous = off.device.type == "cuda"
        pending = experts
        while pending:
            actions = off.acquire(layer, pending, rows, in_order=False)
            try:
                jobs = {a.key[1]: off.host.submit(layer, a.key[1], *host_fn(a.key[1]))
                        for a in actions if a.kind == "host"}  # the host works while the device computes
                device = [a.key[1] for a in actions if a.kind != "host"]
                here = {e for e in device if off.landed(layer, e)}  # asked once: the engine may change its answer
                device = [e for e in device if e in here] + [e for e in device if e not in here]
                # the planner's bookkeeping and the prefetches go once the landed experts' compute is enqueued
                # (CUDA), or before any compute where host = device (the copy thread moves the copies meanwhile)
                landed = len(here) if asynchronous else 0
                for done, e in enumerate(device):
                    if done == landed:
                        off.settle(actions, jobs.values())  # while the copies move and the device computes
                        if plan is not None:
                            plan()
                            plan = None
                    device_fn(e, off.ready(layer, e))
                off.settle(actions, jobs.values())
                if plan is not None:
                    plan()
                    plan = None
                if jobs:  # while the host still computes: what is worth keeping of its experts
                    off.start_keeps(jobs.values())
                for e, job in jobs.items():
                    host_store(e, off.host.result(job))
            finally:
                off.release(actions)
            granted = {a.key[1] for a in actions}
            pending = [e for e in pending if e not in granted]

    def _experts_grouped(self, x, weights, indices):
        T, k = indices.shape
        ids_sorted, perm = torch.sort(indices.reshape(-1))  # [T*k]
        rows = x[perm // k]  # [S, H], grouped by expert
        ends = None
        if x.device.type == "cuda" and self._grouped_mm is not None:  # the group sizes, on the device
            ends = torch.zeros(self.adapter.num_experts, dtype=torch.int32, device=x.device)
            ends = ends.scatter_add_(0, indices.reshape(-1), torch.ones_like(ids_sorted, dtype=torch.int32)).cumsum(0, dtype=torch.int32)  # [E]
        routing, counts, summary = self._read_routing(self.last_indices)
        starts = [0] * len(counts)
        for e in range(1, len(counts)):
            starts[e] = starts[e - 1] + counts[e - 1]
        out = None  # [S, H], allocated at the first result (its dtype is the experts' output dtype)

        def put(e, h):
            nonlocal out
            if out is None:
                out = rows.new_empty((rows.shape[0], h.shape[-1]), dtype=h.dtype)
            out[starts[e]:starts[e] + counts[e]] = h

        def compute(e, views):
            s, n = starts[e], counts[e]
            offs = None if ends is None else ends[e:e + 1] - s  # [1]: this group's rows end at n
            put(e, self.expert_mlp(views, rows[s:s + n], offs))

        def host_rows(e):
            return self.expert_mlp, rows[starts[e]:starts[e] + counts[e]]

        self._run(counts, compute, host_rows, put, routing, summary)
        weighted = out * weights.reshape(-1)[perm].unsqueeze(-1)  # [S, H] (promotes like the reference)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return weighted[inverse].view(T, k, -1).sum(dim=1).to(x.dtype)  # [T, H]

    # ---- eager: the family's own loop ---------------------------------------------------------
    def _experts_eager(self, x, weights, indices):
        routing, counts, summary = self._read_routing(self.last_indices)
        experts = [e for e, n in enumerate(counts) if n]
        self._round = dict(pending=experts, rows={e: counts[e] for e in experts}, actions=None, views={},
                           plan=self._plan(routing, experts, summary))
        try:
            return interface_forward(type(self.module)).__wrapped__(self.module, x, indices, weights)
        finally:
            if self._round["actions"] is not None:
                self.offloader.release(self._round["actions"])
            self._round = None

    def _eager_views(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e's slot views for the eager loop, which visits experts in ascending order: the
        experts are acquired in rounds of as many as fit, in that order."""
        r, off = self._round, self.offloader
        if r is None:
            raise MoePrefetchError("offloaded expert weights are only readable inside the model's forward")
        if e not in r["views"]:
            if r["actions"] is not None and e in {a.key[1] for a in r["actions"]}:
                r["views"][e] = self._weights(off.ready(self.layer, e))
                return r["views"][e]
            if r["actions"] is not None:
                off.release(r["actions"])
                r["actions"], r["views"] = None, {}
            pending = [p for p in r["pending"] if p >= e]
            if e not in pending:
                raise MoePrefetchError(f"the eager experts loop of layer {self.layer} asked for expert {e}, "
                                       "which the routing does not use")
            r["actions"] = off.acquire(self.layer, pending, r["rows"], in_order=True)
            granted = {a.key[1] for a in r["actions"]}
            r["pending"] = [p for p in pending if p not in granted]
            off.settle(r["actions"])  # the planner's bookkeeping while the copies move
            if r["plan"] is not None:
                r["plan"]()
                r["plan"] = None
            r["views"][e] = self._weights(off.ready(self.layer, e))
        return r["views"][e]

    def _weights(self, views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return views if self.dequant is None else self.dequant(views)


def install(model: nn.Module, adapter: FamilyAdapter) -> dict[int, OffloadedExperts]:
    """Offload every experts module of `model` (a meta skeleton); returns the state per MoE layer."""
    register()
    return {layer: OffloadedExperts.install(adapter.experts_module(model, layer), adapter, layer)
            for layer in adapter.moe_layers()}


def offloaded(model: nn.Module, adapter: FamilyAdapter, layer: int) -> OffloadedExperts:
    return adapter.experts_module(model, layer).__dict__["_moe_offload"]
