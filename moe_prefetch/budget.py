"""MemoryPlan: how the device budget splits into dense weights, a reserve for activations and the KV
cache, and expert-cache slots; and the refusal, with the minimum, when it cannot run."""
from __future__ import annotations

from dataclasses import dataclass

import psutil
import torch

from .config import OffloadConfig, format_size
from .errors import MoePrefetchError


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None  # bytes on the device for everything (None: not bounded)
    dense_bytes: int
    reserve_bytes: int
    expert_bytes: int  # one expert in the compute dtype
    total_experts: int
    min_slots: int
    slots: int

    @property
    def cache_bytes(self) -> int:
        return self.slots * self.expert_bytes


def _global(config, name: str):
    """A config value, or None where the config has none or keeps it per layer (Gemma 4 refuses a
    global read of per-layer attributes); the estimate then falls back to the uniform-layer value."""
    try:
        return getattr(config, name, None)
    except Exception:  # noqa: BLE001 - transformers' per-layer attribute error
        return None


def estimate_reserve(model_config, dtype: torch.dtype, max_context: int, top_k: int, device: torch.device,
                     attn_implementation: str | None = None) -> int:
    """KV cache for `max_context` tokens plus the peak activations of a `max_context`-token prefill (batch 1).

    Attention scores are charged only where they are materialised: the eager implementation builds a
    [heads, T, T] score matrix (in the compute dtype, softmax in float32); SDPA and flash attention
    stream over key blocks and keep nothing quadratic."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    item = torch.empty((), dtype=dtype).element_size()
    heads = c.num_attention_heads
    head_dim = _global(c, "head_dim") or c.hidden_size // heads
    kv_heads = _global(c, "num_key_value_heads") or heads
    T, H = max_context, c.hidden_size
    kv = 2 * c.num_hidden_layers * kv_heads * head_dim * T * item
    inter = getattr(c, "moe_intermediate_size", None) or getattr(c, "intermediate_size", H * 4)
    # residual, normed copy, q/k/v/o and MLP input: about 8 [T, H]; the MoE block's rows sorted by expert,
    # their outputs and weighted copy: 3 [T*k, H]; one expert group's gate/up/act: 3 [T, inter] at most
    acts = T * (8 * H + 3 * top_k * H + 3 * inter) * item
    impl = attn_implementation or getattr(c, "_attn_implementation", None) or "sdpa"
    scores = heads * T * T * (2 * item + 4) if impl == "eager" else 0
    return kv + acts + scores


def default_budget(device: torch.device, slack: int = 0) -> int:
    """Free device memory less `slack` (CUDA), or 80% of available RAM (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(free - slack, 0)
    return int(psutil.virtual_memory().available * 0.8)


def plan_memory(cfg: OffloadConfig, dense_bytes: int, reserve_bytes: int, expert_bytes: int,
                total_experts: int, min_slots: int, device: torch.device) -> MemoryPlan:
    budget = cfg.device_memory
    if cfg.expert_cache is not None:
        slots = cfg.expert_cache
        if slots < min_slots:
            raise MoePrefetchError(
                f"--expert-cache {slots} is below the minimum of {min_slots} experts "
                f"(one layer's top-{min_slots} must fit at once)")
        slots = min(slots, total_experts)
        if budget is not None and dense_bytes + reserve_bytes + slots * expert_bytes > budget:
            need = dense_bytes + reserve_bytes + slots * expert_bytes
            raise MoePrefetchError(
                f"--expert-cache {slots} does not fit in --device-memory {format_size(budget)}: "
                f"it needs {format_size(need)} (dense {format_size(dense_bytes)} + reserve "
                f"{format_size(reserve_bytes)} + {slots} x {format_size(expert_bytes)})")
        return MemoryPlan(budget, dense_bytes, reserve_bytes, expert_bytes, total_experts, min_slots, slots)

    bounded = budget if budget is not None else default_budget(device, cfg.device_slack)
    room = bounded - dense_bytes - reserve_bytes
    slots = min(total_experts, max(room, 0) // expert_bytes)
    if slots < min_slots:
        need = dense_bytes + reserve_bytes + min_slots * expert_bytes
        where = f"device memory budget {format_size(bounded)}" if budget is not None else \
            f"free memory on {device} less {format_size(cfg.device_slack)} of slack ({format_size(bounded)})"
        raise MoePrefetchError(
            f"{where} is too small: the minimum is {format_size(need)} (dense weights {format_size(dense_bytes)} "
            f"+ activation/KV reserve {format_size(reserve_bytes)} + {min_slots} expert slots x {format_size(expert_bytes)})")
    return MemoryPlan(budget, dense_bytes, reserve_bytes, expert_bytes, total_experts, min_slots, int(slots))
