"""The little that differs between MoE families and is not in their modules: data, not code.

Everything else (where the experts are, their layout flags and shapes, the checkpoint names, the
routers) is read from transformers itself (adapter.py, keys.py).
"""
from __future__ import annotations

from torch import nn

from ..errors import MoePrefetchError

#: config attributes that hold the number of experts each token is routed to, in the order tried
TOP_K_ATTRS = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "top_k_experts", "moe_k",
               "n_activated_experts", "experts_per_token", "num_selected_experts")

#: names a MoE block gives its router, for routers that are not a plain [E, H] linear map
ROUTER_NAMES = ("gate", "router")

#: decoder-layer attributes that hold the norm between the residual stream and the MoE block, in the
#: order tried: an explicit pre-MLP norm first (sandwich-norm families also have a post_attention_layernorm,
#: applied to the attention output), then post_attention_layernorm, the pre-MLP norm of most families
PRE_MOE_NORMS = ("pre_feedforward_layernorm", "pre_mlp_layernorm", "pre_ff_layernorm", "pre_moe_layernorm",
                 "post_attention_layernorm", "ffn_norm", "post_attention_norm")

#: families whose MoE block reads the raw residual (the norm named like a pre-MLP norm is applied to
#: the block's output instead), so predictors apply no norm
POST_NORM_FAMILIES = frozenset({"flex_olmo"})

#: families verified token-identical to transformers by tests/test_families.py (kept in step with
#: tests/moe_families.py, which holds their tiny test configurations)
TESTED: tuple[str, ...] = ("afmoe", "aria_text", "axk1", "axk2", "bailing_hybrid", "beam", "cohere2_moe",
    "deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4", "dots1", "dots3_note", "dots3_note_text", "ergo",
    "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "gemma4", "gemma4_text", "glm4_moe", "glm4_moe_lite",
    "glm_moe_dsa", "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoehybrid", "granitemoeshared", "hunyuan_v1_moe",
    "hy_v3", "hy_v4", "inkling_text", "jamba", "kimi_linear", "kolibri1", "kolibri1_1", "laguna", "lara_mini",
    "lfm2_moe", "longcat_flash", "mellum", "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2",
    "minimax_m3_vl_text", "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe", "qwen3_5_moe_text",
    "qwen3_moe", "qwen3_next", "qwen4_exp", "qwen4_exp_text", "solar_open", "zaya")

#: families whose experts use the interface but that are not served, and why (refused at load with that reason)
UNTESTED: dict[str, str] = {
    "inkling2_text": "its checkpoint keeps each expert's gate and up rows interleaved in one tensor for all experts "
                     "(an Interleave conversion), and the store reads experts as they are stored",
    "inkling2_loop_text": "its checkpoint keeps each expert's gate and up rows interleaved in one tensor for all "
                          "experts (an Interleave conversion, after dequantizing the original NVFP4/MXFP8 experts), "
                          "and the store reads experts as they are stored",
}

#: families whose routers need more than the MoE block's input (DeepSeek-V4's hash router reads the token
#: ids): next-gate and m2r2 cannot run them ahead of time, history and oracle predictors still work
ROUTERS_NOT_AHEAD = frozenset({"deepseek_v4"})


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
    """The decoder attribute holding the pre-MoE norm, or None. An attribute named like one that is not a
    module with a forward of its own (LongCat-Flash keeps one norm per sublayer in a ModuleList) does not
    say which norm feeds the MoE block: predictors then read the block's own input."""
    if model_type in POST_NORM_FAMILIES:
        return None
    for name in PRE_MOE_NORMS:
        if hasattr(decoder, name):
            norm = getattr(decoder, name)
            return name if getattr(type(norm), "forward", None) is not nn.Module.forward else None
    return None


def supported_summary() -> str:
    return (f"every family whose experts use that interface ({len(TESTED)} tested, listed by "
            "python -m moe_prefetch.families)")
