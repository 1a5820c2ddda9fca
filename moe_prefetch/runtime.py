"""load_model: a transformers MoE model whose experts live in a host store and reach the compute
device through a bounded expert cache.

Steps: resolve the checkpoint; build the model skeleton on the meta device (no weights); point every
experts module at the offloaded implementation (moe_block.install: its [E, ...] parameters are
dropped, so expert weights are never allocated; routers and shared experts stay transformers');
materialise the rest on the device and fill it from the checkpoint; size the expert cache from the memory budget; wire the
store, cache and transfer engine; count prefill/decode time with forward hooks.
"""
from __future__ import annotations

import inspect
import logging
import math
import time
import weakref
from dataclasses import dataclass, field

import psutil
import torch
from torch import nn

from .budget import MemoryPlan, estimate_reserve, plan_memory
from .checkpoint import Checkpoint
from .config import OffloadConfig, format_size
from .errors import MoePrefetchError
from .families import FamilyAdapter, adapter_for, build_skeleton
from .hostmem import HostPlan, PinningError, host_margin, plan_host
from .hub import resolve_model
from .moe_block import install, offloaded
from .host_compute import HostExecutor
from .host_kernels import HostPacks
from .offloader import ExpertOffloader
from .planner import Costs, Planner
from .prefetch import Prefetcher
from .predictors import ModelView, Predictor, make_predictor
from .progress import progress_bar as tqdm  # plain lines when stderr is not a terminal
from .stats import RunStats
from .store import ExpertStore
from .transfer import make_engine

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class OffloadRuntime:
    """Everything load_model wired together; reachable as `model.moe_runtime`."""

    config: OffloadConfig
    adapter: FamilyAdapter
    checkpoint: Checkpoint
    store: ExpertStore
    offloader: ExpertOffloader
    plan: MemoryPlan
    device: torch.device
    dtype: torch.dtype
    stats: RunStats = field(default_factory=RunStats)
    prefetcher: Prefetcher | None = None
    fingerprint: str | None = None
    lookahead_note: str | None = None  # why the lookahead in use is below the one asked for (set_predictor)
    host: HostPlan | None = None
    timer: _ForwardTimer | None = None

    def stats_dict(self) -> dict:
        if self.timer is not None:
            self.timer.flush()
        d = self.stats.as_dict()
        d["stall_seconds"] += self.offloader.engine.stall_seconds()  # CUDA: measured on the compute stream
        d.update(device=str(self.device), backend=self.offloader.engine.backend,
                 predictor=self.prefetcher.predictor.name if self.prefetcher else "none",
                 lookahead=self.prefetcher.lookahead if self.prefetcher else 0,
                 expert_cache_slots=self.plan.slots, total_experts=self.plan.total_experts,
                 host_store="pinned" if self.store.pinned else "memory-mapped",
                 expert_dtype=self.config.expert_dtype if self.config.expert_dtype != "auto" else
                 str(self.dtype).removeprefix("torch."), expert_bytes=self.store.expert_nbytes,
                 bytes_per_token=d["bytes_to_device"] / max(1, d.get("generated_tokens", 0)),
                 host_compute=self.offloader.host is not None,
                 host_kernel=None if self.offloader.host is None else
                 ("fused" if self.offloader.host.packs is not None else "exact"), eviction=self.config.eviction,
                 prefetch_gated=self.offloader.planner.counters.prefetch_gated,
                 prefetch_skipped_budget=self.offloader.planner.counters.prefetch_budget,
                 prediction_skipped=self.offloader.planner.counters.prediction_skipped,
                 predictor_calibration=self.offloader.planner.calibration.report(),
                 steering_calibration=self.offloader.planner.steer_calibration.report(),
                 prediction_epochs=None if (sw := self.offloader.planner.switch) is None or not self.prefetcher else
                 {"on": sw.epochs[True], "off": sw.epochs[False], "predicting": sw.arm},
                 prediction_value=self.offloader.planner.prediction_value() if self.prefetcher else None,
                 keeps=self.offloader.planner.counters.keeps,
                 keep_ledger=None if (kl := self.offloader.planner.keep_ledger) is None else kl.report(),
                 eviction_epochs=None if (es := self.offloader.planner.eviction_switch) is None else
                 {**es.epochs, "now": es.rule, "wins": list(self.offloader.planner.policy.ghost_wins),
                  "shadow_wins": {r: list(w) for r, w in es.shadow_wins.items()}})
        return d

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.offloader.close()


def initial_costs(expert_bytes: int, device: torch.device, cfg: OffloadConfig) -> Costs:
    """The planner's starting cost model; the offloader refines it from measurements as it runs (layer
    wall time, the engine's time per copy, the host executor's time per expert). Nominal rates where
    nothing is known yet: a PCIe 4.0 x16 link (20 GB/s), GPU memory at 1 TB/s, a host reading 30 GB/s."""
    if device.type == "cuda":
        expert_s, link, host = expert_bytes / 1e12, 20e9, 30e9
    else:  # the CPU backend: "device" and host are the same memory
        expert_s, link, host = expert_bytes / 20e9, 10e9, 20e9
    link = cfg.link_bandwidth or link
    host = cfg.host_bandwidth or host
    return Costs(layer_s=4 * expert_s, expert_s=expert_s, transfer_s=expert_bytes / link, host_s=expert_bytes / host)


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoePrefetchError(f"--device {name} was requested but no CUDA GPU is visible to PyTorch; use --device cpu")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise MoePrefetchError(f"--device {name} was requested but PyTorch sees {n} CUDA GPU{'s' if n > 1 else ''} "
                               f"(cuda:0{f'..cuda:{n - 1}' if n > 1 else ''})")
    return torch.device(name)


def _resolve_dtype(name: str, model_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = _DTYPES.get(dtype, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32  # half-precision matmuls are slow or missing on CPUs
    return dtype


def _load_config(path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MoePrefetchError(f"cannot read {path}/config.json as a transformers config: {first}") from None


def _rebuild_buffers(model: nn.Module, adapter: FamilyAdapter) -> None:
    """Non-persistent buffers (rotary frequencies, embedding scales) are not in checkpoints: after the
    dense weights are loaded, let transformers initialise what is still uninitialised, as from_pretrained
    does. Everything loaded is marked initialised first, and so are the offloaded experts modules."""
    for t in model.state_dict(keep_vars=True).values():
        t._is_hf_initialized = True
    for layer in adapter.moe_layers():
        adapter.experts_module(model, layer)._is_hf_initialized = True
    model.initialize_weights()


def _load_dense(model: nn.Module, adapter: FamilyAdapter, ckpt: Checkpoint, model_config, progress: bool) -> None:
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    state = model.state_dict()
    converted = adapter.keys.converted_tensors(ckpt, model, model_config)  # fused/split dense tensors
    for name, param in tqdm(state.items(), desc="loading dense weights", unit="tensor", disable=not progress):
        if name in converted:
            key, src = name, converted[name]
        else:
            key = adapter.checkpoint_key(name, ckpt)
            if key is None:
                if tied and name == "lm_head.weight":
                    continue
                raise MoePrefetchError(f"checkpoint {ckpt.directory} has no tensor for {name}")
            src = ckpt.tensor(key)
        if tuple(src.shape) != tuple(param.shape):
            raise MoePrefetchError(
                f"checkpoint tensor {key} has shape {list(src.shape)}, the model expects {list(param.shape)}: "
                "config.json does not match the weights")
        param.copy_(src)
    if tied:
        model.tie_weights()


class _ForwardTimer:
    """Prefill and decode time without ever synchronising the device.

    CPU: wall-clock around each forward. CUDA: a pair of events recorded on the compute stream around
    each forward, read only when the counters are (stats()); a device-wide synchronize here would also
    wait for the copy streams, so prefetches could no longer overlap the next token's compute."""

    def __init__(self, stats: RunStats, device: torch.device):
        self.stats = stats
        self.cuda = device.type == "cuda"
        self.device = device
        self._pending: list[tuple[bool, object, object]] = []  # (prefill, start event, end event)

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def stop(self, prefill: bool, start) -> None:
        if not self.cuda:
            self._add(prefill, time.perf_counter() - start)
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(self.device))
        self._pending.append((prefill, start, end))
        while self._pending and self._pending[0][2].query():  # fold in what has finished, without waiting
            self._fold(*self._pending.pop(0))

    def flush(self) -> None:
        """Fold in every pending measurement (waits for the compute stream to reach the last one)."""
        if self._pending:
            self._pending[-1][2].synchronize()
        while self._pending:
            self._fold(*self._pending.pop(0))

    def _fold(self, prefill, start, end) -> None:
        self._add(prefill, start.elapsed_time(end) / 1000.0)

    def _add(self, prefill: bool, seconds: float) -> None:
        if prefill:
            self.stats.prefill_seconds += seconds
        else:
            self.stats.decode_seconds += seconds


def _install_timers(model: nn.Module, stats: RunStats, device: torch.device, runtime_ref: list) -> _ForwardTimer:
    """Prefill = a forward with an empty KV cache, decode = one with a filled cache."""
    state = {}
    timer = _ForwardTimer(stats, device)

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        n = (ids if ids is not None else embeds).shape[1]
        # transformers >= 5.24 passes the KV cache as `cache`; older 5.x (and callers) as past_key_values
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        seen = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        state.update(start=timer.start(), n=n, prefill=seen == 0)
        prefetcher = runtime_ref[0].prefetcher if runtime_ref else None
        if prefetcher is not None:
            prefetcher.start_forward(seen == 0)

    def post(module, args, kwargs, output):
        timer.stop(state["prefill"], state["start"])
        if state["prefill"]:
            stats.prompt_tokens += state["n"]
        else:
            stats.decode_steps += 1
        stats.generated_tokens += 1  # every forward of a causal LM yields the next token

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)
    return timer


def _host_packs(cfg: OffloadConfig, device: torch.device, dequant, dtype: torch.dtype, store: ExpertStore,
                plan: MemoryPlan, device_side: int):
    """host_kernels.HostPacks when the host computes int8/int4 experts with the fused CPU kernels, else None.
    The packed copies grow to about the size of the quantized store: checked against available RAM now."""
    if dequant is None or dequant.fmt.spec is None:
        return None  # full-precision or down-cast experts: the host multiplies them as they are
    kernel = cfg.host_kernel if cfg.host_kernel != "auto" else ("fused" if device.type == "cuda" else "exact")
    if kernel == "exact":
        return None
    vm = psutil.virtual_memory()
    free = vm.available - host_margin(vm.total) - (device_side + plan.cache_bytes if device.type == "cpu" else 0)
    if store.store_bytes > free:
        why = (f"the fused host kernels keep a repacked copy of the quantized experts ({format_size(store.store_bytes)}) "
               f"but only {format_size(max(free, 0))} of RAM is free beyond the margin")
        if cfg.host_kernel == "fused":
            raise MoePrefetchError(f"{why}: use --host-kernel exact")
        logging.getLogger("moe_prefetch").warning("%s; the host dequantizes experts instead", why)
        return None
    # bf16 activations for half-precision models: PyTorch's CPU kernels are fastest there (fp16 ones are slower)
    return HostPacks(dequant, torch.float32 if dtype == torch.float32 else torch.bfloat16)


def cache_kwargs(model: nn.Module, cache) -> dict:
    """{name: cache} for passing a KV cache to `model`'s forward: transformers 5.24 renamed
    `past_key_values` to `cache` (the old name still works there, with a deprecation warning)."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def load_model(model: str, config: OffloadConfig | None = None, **overrides):
    """Load `model` (alias, checkpoint directory or hub id) with offloaded experts.

    Returns (model, tokenizer): a regular transformers causal LM (use `.generate` or your own loop)
    whose MoE blocks fetch experts through the cache. `moe_prefetch.stats(model)` reads its counters.
    """
    # transformers' loading warnings about the skeleton (weights it finds on the meta device, keys it
    # leaves for the runtime to fill) are quieted while it is built, and the level restored after: a
    # level left set would quiet the user's own later loads and, as transformers reads any explicit level
    # as "verify the tensor-parallel plan", make them warn about layers "not sharded"
    quiet = logging.getLogger("transformers.modeling_utils")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return _load_model(model, config, overrides)
    finally:
        quiet.setLevel(level)


def _load_model(model: str, config: OffloadConfig | None, overrides: dict):
    cfg = (config or OffloadConfig()).replace(**overrides) if overrides else (config or OffloadConfig())
    path = resolve_model(model)
    model_config = _load_config(path)
    ckpt = Checkpoint(path)
    device = _resolve_device(cfg.device)
    if cfg.link_bandwidth is not None and device.type == "cuda":
        raise MoePrefetchError("--link-gbps / link_bandwidth emulates a link on the CPU backend only; drop it for a CUDA device")
    dtype = _resolve_dtype(cfg.dtype, model_config, device)
    skeleton = build_skeleton(model_config, dtype)
    adapter = adapter_for(model_config, ckpt, skeleton)
    from .predictors.accelerated import fingerprint, read

    model_fingerprint = fingerprint(adapter, ckpt)
    if cfg.predictor == "m2r2":
        read(cfg.predictor_path, model_fingerprint)  # refuse a wrong file before loading anything
    elif cfg.predictor == "oracle":
        from .trace import read_routing_header

        read_routing_header(cfg.predictor_path, model_fingerprint)
    states = install(skeleton, adapter)
    fmt = quantized = None
    if cfg.expert_dtype != "auto":  # experts kept (and moved, and cached) in another format, built once
        from .quant_store import ExpertFormat, describe, ensure

        fmt = ExpertFormat.of(cfg.expert_dtype, cfg.expert_group_size)
        quantized = describe(adapter, ckpt, fmt)  # sizes only: the plan is checked before anything is built
    dense_bytes = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    reserve = cfg.reserve if cfg.reserve is not None else estimate_reserve(
        model_config, dtype, cfg.max_context, adapter.top_k, device, getattr(skeleton.config, "_attn_implementation", None))
    if quantized is not None and cfg.reserve is None:
        # one expert's weights dequantized just before use, plus the float32 working copy of its largest matrix
        reserve += sum(math.prod(shape) for _, shape in adapter.params) * dtype.itemsize
        reserve += 2 * max(math.prod(shape) for _, shape in adapter.params) * 4
    dequant = None
    if quantized is None:
        store = ExpertStore(ckpt, adapter, dtype, pinned=False)
        store_ckpt, store_src = ckpt, adapter
        plan = plan_memory(cfg, dense_bytes, reserve, store.expert_nbytes, store.total_experts, adapter.top_k, device)
    else:
        total = len(adapter.moe_layers()) * adapter.num_experts
        plan = plan_memory(cfg, dense_bytes, reserve, quantized.expert_nbytes, total, adapter.top_k, device)
        store_ckpt, store_src = ensure(adapter, ckpt, fmt, progress=cfg.show_progress)
        store = ExpertStore(store_ckpt, store_src, dtype, pinned=False)
        dequant = store_src.dequantizer(dtype)
        for state in states.values():
            state.dequant = dequant
    # host RAM is planned before anything is allocated: a refusal here costs nothing
    host = plan_host(cfg.pin_memory, device.type, store.store_bytes,
                     device_side_bytes=dense_bytes + reserve + plan.cache_bytes)
    if host.pinned:
        try:
            store = ExpertStore(store_ckpt, store_src, dtype, pinned=True, progress=cfg.show_progress)
        except PinningError as e:
            if cfg.pin_memory == "on":
                raise
            logging.getLogger("moe_prefetch").warning("%s; streaming experts from the checkpoint instead", e)
    skeleton.to_empty(device=device)
    with torch.no_grad():
        _load_dense(skeleton, adapter, ckpt, model_config, cfg.show_progress)
    _rebuild_buffers(skeleton, adapter)
    skeleton.eval().requires_grad_(False)

    stats = RunStats()
    if cfg.host_bandwidth is not None and device.type == "cuda":
        raise MoePrefetchError("--host-gbps / host_bandwidth emulates the host on the CPU backend only; drop it for a CUDA device")
    engine = make_engine(device, link_bandwidth=cfg.link_bandwidth, expert_bytes=store.expert_nbytes)
    host_compute = cfg.host_compute == "on" or (cfg.host_compute == "auto" and device.type == "cpu"
                                                 and cfg.host_bandwidth is not None)
    if host_compute and adapter.eager:
        if cfg.host_compute == "on":
            raise MoePrefetchError("--host-compute on needs the grouped experts implementation; this model is set to "
                                   "experts_implementation='eager'")
        host_compute = False
    planner = Planner(plan.slots, adapter.moe_layers(), adapter.num_experts, adapter.top_k,
                      initial_costs(store.expert_nbytes, device, cfg), eviction=cfg.eviction,
                      host_compute=host_compute, gate=cfg.prefetch_gate,
                      adaptive=cfg.adaptive_prediction,
                      keep_recency={"auto": None, "frequency": False, "recency": True}[cfg.keep_rule])
    packs = _host_packs(cfg, device, dequant, dtype, store, plan, dense_bytes + reserve) if host_compute else None
    executor = HostExecutor(store, device, cfg.host_bandwidth, packs=packs) if host_compute else None
    offloader = ExpertOffloader(store, planner, device, engine, stats, host=executor)
    for layer in adapter.moe_layers():
        offloaded(skeleton, adapter, layer).offloader = offloader
    runtime = OffloadRuntime(cfg, adapter, ckpt, store, offloader, plan, device, dtype, stats,
                             fingerprint=model_fingerprint, host=host)
    # the copy worker must not outlive a model that was dropped without close()
    weakref.finalize(skeleton, offloader.close)
    runtime.timer = _install_timers(skeleton, stats, device, [runtime])
    _load_generation_config(skeleton, path)
    skeleton.moe_runtime = runtime
    if cfg.predictor != "none" and cfg.lookahead > 0:
        set_predictor(skeleton, make_predictor(cfg.predictor, ModelView.of(skeleton, adapter), cfg.predictor_path, device))
    return skeleton, _load_tokenizer(path)


def set_predictor(model: nn.Module, predictor: Predictor | str | None, lookahead: int | None = None,
                  prefetch_budget: int | None = None, path: str | None = None) -> int:
    """Install (or, with None or "none", remove) the predictor that drives prefetching of an offloaded model.

    predictor: a Predictor, or a name as --predictor takes it: "auto", "next-gate", "history", "m2r2" (path: a
    predictor file from moe_prefetch.calibrate) or "oracle" (path: a routing trace from moe_prefetch.trace);
    a file made for another model is refused. lookahead: K (default: the config's). A K beyond what the
    predictor can use on this model (see Predictor.max_lookahead) runs at that limit: stats() reports the
    K in use and `model.moe_runtime.lookahead_note` says why. Returns the K in use.
    """
    rt = _runtime(model, "set_predictor()")
    if isinstance(predictor, str):
        predictor = None if predictor == "none" else make_predictor(
            predictor, ModelView.of(model, rt.adapter), path, rt.device)
    if rt.prefetcher is not None:
        rt.prefetcher.close()
        rt.prefetcher = None
    K = rt.config.lookahead if lookahead is None else lookahead
    rt.lookahead_note = None
    if predictor is not None and K > 0:
        limit, why = predictor.max_lookahead()
        if K > limit:
            rt.lookahead_note = f"lookahead {K} is more than {predictor.name} can use: {why}; running with {limit}"
            K = limit
    if predictor is not None and K > 0:
        # default: one layer's worth (top-k experts) in flight, so prefetches use an idle link rather than
        # queueing up ahead of it (bench/throughput.py: deeper queues lose to LRU on a busy link)
        budget = prefetch_budget or rt.config.prefetch_budget or rt.adapter.top_k * rt.plan.expert_bytes
        rt.prefetcher = Prefetcher(model, predictor.view, rt.offloader, predictor, K, budget, rt.stats)
    for layer in rt.adapter.moe_layers():
        offloaded(model, rt.adapter, layer).prefetcher = rt.prefetcher
    return K if rt.prefetcher is not None else 0


def _load_generation_config(model: nn.Module, path) -> None:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as e:
        raise MoePrefetchError(f"cannot load a tokenizer from {path} ({type(e).__name__}); "
                               "the checkpoint directory needs tokenizer.json or tokenizer.model") from None


def _runtime(model, what: str) -> OffloadRuntime:
    runtime = getattr(model, "moe_runtime", None)
    if runtime is None:
        raise MoePrefetchError(f"{what} needs a model returned by moe_prefetch.load_model")
    return runtime


def stats(model: nn.Module) -> dict:
    """Counters of an offloaded model as a dict (see RunStats)."""
    return _runtime(model, "stats()").stats_dict()


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of an offloaded model (e.g. after a warm-up)."""
    _runtime(model, "reset_stats()")
    if model.moe_runtime.timer is not None:
        model.moe_runtime.timer.flush()  # forwards timed before the reset must not land after it
    model.moe_runtime.stats.reset()
    model.moe_runtime.offloader.engine.reset_stats()
