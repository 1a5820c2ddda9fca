"""The little that differs between MoE families and is not in their modules: data, not code.

Everything else (where the experts are, their layout flags and shapes, the checkpoint names, the
routers) is read from transformers itself (adapter.py, keys.py).
"""
from __future__ import annotations

from ..errors import MoePrefetchError

#: config attributes that hold the number of experts each token is routed to, in the order tried
TOP_K_ATTRS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "top_k_experts", "moe_k",
               "n_activated_experts", "experts_per_token", "num_selected_experts")

#: names a MoE block gives its router, for routers that are not a plain [E, H] linear map
ROUTER_NAMES = ("gate", "router")

#: decoder-layer attributes that hold the norm between the residual stream and the MoE block, in the
#: order tried (post_attention_layernorm is the pre-MLP norm of the pre-norm families)
PRE_MOE_NORMS = ("post_attention_layernorm", "pre_feedforward_layernorm", "pre_mlp_layernorm", "ffn_norm",
                 "post_attention_norm")

#: families whose MoE block reads the raw residual (the norm named like a pre-MLP norm is applied to
#: the block's output instead), so predictors apply no norm
POST_NORM_FAMILIES = frozenset({"flex_olmo"})

#: families verified token-identical to transformers by tests/test_families.py (kept in step with
#: tests/moe_families.py, which holds their tiny test configurations)
TESTED: tuple[str, ...] = ()


def top_k(config, block) -> int:
    """Experts per token: the router's own `top_k` where it keeps one, else the config's."""
    for module in [block, *block.children()]:
        k = getattr(module, "top_k", None)
        if isinstance(k, int) and k > 0:
            return k
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in TOP_K_ATTRS:
        k = getattr(text, attr, None)
        if isinstance(k, int) and k > 0:
            return k
        if isinstance(k, (list, tuple)) and k and all(isinstance(x, int) for x in k) and len(set(k)) == 1:
            return k[0]
    raise MoePrefetchError(f"cannot tell how many experts each token uses for model type {config.model_type!r} "
                           f"(looked for {', '.join(TOP_K_ATTRS)} in its config)")


def pre_moe_norm(model_type: str | None, decoder) -> str | None:
    if model_type in POST_NORM_FAMILIES:
        return None
    for name in PRE_MOE_NORMS:
        if hasattr(decoder, name):
            return name
    return None


def supported_summary() -> str:
    tested = ", ".join(TESTED) if TESTED else "mixtral, qwen2_moe, qwen3_moe, olmoe"
    return f"every family whose experts use that interface (tested: {tested})"
