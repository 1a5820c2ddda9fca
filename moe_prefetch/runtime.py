"""load_model: a transformers MoE model whose experts live in a host store and reach the compute
device through a bounded expert cache.

Steps: resolve the checkpoint; build the model skeleton on the meta device (no weights); swap every
sparse MoE block for an OffloadedMoE (so expert weights are never allocated); materialise the rest on
the device and fill it from the checkpoint; size the expert cache from the memory budget; wire the
store, cache and transfer engine; count prefill/decode time with forward hooks.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .budget import MemoryPlan, estimate_reserve, plan_memory
from .cache import make_policy
from .checkpoint import Checkpoint
from .config import OffloadConfig
from .errors import MoePrefetchError
from .families import FamilyAdapter, adapter_for
from .hub import resolve_model
from .moe_block import OffloadedMoE
from .offloader import ExpertOffloader
from .prefetch import Prefetcher
from .predictors import ModelView, Predictor, make_predictor
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

    def stats_dict(self) -> dict:
        d = self.stats.as_dict()
        d["stall_seconds"] += self.offloader.engine.stall_seconds()  # CUDA: measured on the compute stream
        d.update(device=str(self.device), backend=self.offloader.engine.backend,
                 predictor=self.prefetcher.predictor.name if self.prefetcher else "none",
                 lookahead=self.prefetcher.lookahead if self.prefetcher else 0,
                 expert_cache_slots=self.plan.slots, total_experts=self.plan.total_experts)
        return d

    def close(self) -> None:
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.offloader.close()


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoePrefetchError("--device cuda was requested but no CUDA GPU is visible to PyTorch; use --device cpu")
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


def _build_skeleton(model_config, adapter: FamilyAdapter, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    for layer in adapter.moe_layers():
        block = adapter.get_block(model, layer)
        adapter.set_block(model, layer, OffloadedMoE(adapter, layer, adapter.router(block), adapter.extra_modules(block)))
    return model


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers (rotary frequencies) are not in checkpoints: construct them anew."""
    for name, module in list(model.named_modules()):
        if not module._non_persistent_buffers_set:
            continue
        if not hasattr(module, "rope_type"):
            raise MoePrefetchError(f"cannot rebuild non-persistent buffers of {name} ({type(module).__name__})")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        parent_name, _, child = name.rpartition(".")
        model.get_submodule(parent_name).register_module(child, fresh.to(device))


def _load_dense(model: nn.Module, adapter: FamilyAdapter, ckpt: Checkpoint, model_config, progress: bool) -> None:
    tied = bool(getattr(model_config, "tie_word_embeddings", False))
    state = model.state_dict()
    for name, param in tqdm(state.items(), desc="loading dense weights", unit="tensor", disable=not progress):
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


def _install_timers(model: nn.Module, stats: RunStats, device: torch.device, runtime_ref: list) -> None:
    """Prefill = a forward with an empty KV cache, decode = one with a filled cache."""
    state = {}

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def pre(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        n = (ids if ids is not None else embeds).shape[1]
        past = kwargs.get("past_key_values")
        seen = past.get_seq_length() if past is not None and hasattr(past, "get_seq_length") else 0
        sync()
        state.update(start=time.perf_counter(), n=n, prefill=seen == 0)
        prefetcher = runtime_ref[0].prefetcher if runtime_ref else None
        if prefetcher is not None:
            prefetcher.start_forward(seen == 0)

    def post(module, args, kwargs, output):
        sync()
        dt = time.perf_counter() - state["start"]
        if state["prefill"]:
            stats.prefill_seconds += dt
            stats.prompt_tokens += state["n"]
        else:
            stats.decode_seconds += dt
            stats.decode_steps += 1
        stats.generated_tokens += 1  # every forward of a causal LM yields the next token

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def load_model(model: str, config: OffloadConfig | None = None, **overrides):
    """Load `model` (alias, checkpoint directory or hub id) with offloaded experts.

    Returns (model, tokenizer): a regular transformers causal LM (use `.generate` or your own loop)
    whose MoE blocks fetch experts through the cache. `moe_prefetch.stats(model)` reads its counters.
    """
    cfg = (config or OffloadConfig()).replace(**overrides) if overrides else (config or OffloadConfig())
    path = resolve_model(model)
    model_config = _load_config(path)
    adapter = adapter_for(model_config)
    ckpt = Checkpoint(path)
    from .predictors.accelerated import fingerprint, read

    model_fingerprint = fingerprint(adapter, ckpt)
    if cfg.predictor == "m2r2":
        read(cfg.predictor_path, model_fingerprint)  # refuse a wrong file before loading anything
    device = _resolve_device(cfg.device)
    if cfg.link_bandwidth is not None and device.type == "cuda":
        raise MoePrefetchError("--link-gbps / link_bandwidth emulates a link on the CPU backend only; drop it for a CUDA device")
    dtype = _resolve_dtype(cfg.dtype, model_config, device)
    logging.getLogger("transformers.modeling_utils").setLevel(logging.ERROR)

    skeleton = _build_skeleton(model_config, adapter, dtype)
    store = ExpertStore(ckpt, adapter, dtype, pinned=False)
    dense_bytes = sum(t.numel() * t.element_size() for t in skeleton.state_dict().values())
    reserve = cfg.reserve if cfg.reserve is not None else estimate_reserve(
        model_config, dtype, cfg.max_context, adapter.top_k, device)
    plan = plan_memory(cfg, dense_bytes, reserve, store.expert_nbytes, store.total_experts, adapter.top_k, device)

    pinned = cfg.pin_memory if cfg.pin_memory is not None else device.type == "cuda"
    if pinned:
        store = ExpertStore(ckpt, adapter, dtype, pinned=True, progress=cfg.show_progress)
    skeleton.to_empty(device=device)
    with torch.no_grad():
        _load_dense(skeleton, adapter, ckpt, model_config, cfg.show_progress)
    _rebuild_buffers(skeleton, device)
    skeleton.eval().requires_grad_(False)

    stats = RunStats()
    engine = make_engine(device, link_bandwidth=cfg.link_bandwidth)
    offloader = ExpertOffloader(store, plan.slots, device, make_policy(cfg.eviction), engine, stats)
    for layer in adapter.moe_layers():
        adapter.get_block(skeleton, layer).offloader = offloader
    runtime = OffloadRuntime(cfg, adapter, ckpt, store, offloader, plan, device, dtype, stats,
                             fingerprint=model_fingerprint)
    # the copy worker must not outlive a model that was dropped without close()
    weakref.finalize(skeleton, engine.close)
    _install_timers(skeleton, stats, device, [runtime])
    _load_generation_config(skeleton, path)
    skeleton.moe_runtime = runtime
    if cfg.predictor != "none" and cfg.lookahead > 0:
        set_predictor(skeleton, make_predictor(cfg.predictor, ModelView.of(skeleton, adapter), cfg.predictor_path, device))
    return skeleton, _load_tokenizer(path)


def set_predictor(model: nn.Module, predictor: Predictor | None, lookahead: int | None = None,
                  prefetch_budget: int | None = None) -> None:
    """Install (or, with None, remove) the predictor that drives prefetching of an offloaded model."""
    rt: OffloadRuntime = model.moe_runtime
    if rt.prefetcher is not None:
        rt.prefetcher.close()
        rt.prefetcher = None
    K = rt.config.lookahead if lookahead is None else lookahead
    if predictor is not None and K > 0:
        # default: one layer's worth (top-k experts) in flight, so prefetches use an idle link rather than
        # queueing up ahead of it (bench/throughput.py: deeper queues lose to LRU on a busy link)
        budget = prefetch_budget or rt.config.prefetch_budget or rt.adapter.top_k * rt.plan.expert_bytes
        rt.prefetcher = Prefetcher(model, predictor.view, rt.offloader, predictor, K, budget, rt.stats)
    for layer in rt.adapter.moe_layers():
        rt.adapter.get_block(model, layer).prefetcher = rt.prefetcher


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


def stats(model: nn.Module) -> dict:
    """Counters of an offloaded model as a dict (see RunStats)."""
    runtime = getattr(model, "moe_runtime", None)
    if runtime is None:
        raise MoePrefetchError("stats() needs a model returned by moe_prefetch.load_model")
    return runtime.stats_dict()


def reset_stats(model: nn.Module) -> None:
    """Zero the counters of an offloaded model (e.g. after a warm-up)."""
    model.moe_runtime.stats.reset()
    model.moe_runtime.offloader.engine.reset_stats()
