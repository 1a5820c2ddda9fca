"""Tiny random-weight configurations for the Mixture-of-Experts families of the installed transformers.

Every family here has an experts module decorated with `transformers.integrations.moe.use_experts_implementation`
and a model type in `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`. `FAMILIES[model_type]` overrides the defaults of
`AutoConfig.for_model(model_type)` so the model is tiny (hidden 32-64, 2-4 layers, vocab 128, 128 positions) and
builds and generates on CPU in float32 in well under two seconds, while exercising unusual shapes: odd expert
counts, top-k 3, shared experts, dense first layers, grouped routing. `SKIPPED` names the families that cannot
build or generate on CPU here, with the error seen. `make_family` writes a checkpoint with `save_pretrained`.
"""
from __future__ import annotations

import torch

# Shared by (nearly) every family: token ids and a large init std, so routing and next-token choices are decisive.
_TOK = {"vocab_size": 128, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "initializer_range": 0.15,
        "tie_word_embeddings": False}
_POS = {"max_position_embeddings": 128}


def _f(*drop: str, **kw) -> dict:
    """The shared settings plus `kw`, less the shared keys named in `drop` (fields a family's config lacks)."""
    return {k: v for k, v in {**_TOK, **_POS, **kw}.items() if k not in drop}


FAMILIES: dict[str, dict] = {
    # dense layer 0 (num_dense_layers), sliding/full attention mix, shared expert
    "afmoe": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=64, moe_intermediate_size=16, num_dense_layers=1, num_experts=7,
                num_experts_per_tok=3, num_shared_experts=1, global_attn_every_n_layers=2, sliding_window=16),
    # no dense-layer knob; experts stored transposed
    "aria_text": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    intermediate_size=16, moe_num_experts=5, moe_topk=3, moe_num_shared_experts=1),
    # DeepSeek-V3 style grouped routing: 6 experts = 2 groups of 3, 1 group kept
    "axk1": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=64, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=6, n_group=2,
               topk_group=1, num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
               qk_nope_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"]),
    # no groups (n_group=None), odd expert count; indexed (sparse) attention
    "axk2": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, n_shared_experts=1,
               n_routed_experts=5, num_experts_per_tok=3, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8,
               v_head_dim=8, qk_nope_head_dim=8, index_topk=8, index_head_dim=8, index_n_heads=2, gated_norm_rank=4,
               mlp_layer_types=["dense", "sparse", "sparse"]),
    # linear (delta-rule) + MLA attention layers, grouped routing 2x3; its config has no max_position_embeddings
    "bailing_hybrid": _f("max_position_embeddings", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, num_shared_experts=1,
                         num_experts=6, num_expert_group=2, topk_group=1, num_experts_per_token=2,
                         first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                         qk_nope_head_dim=8, head_dim=8, linear_head_dim=8, linear_num_heads=4, layer_group_size=3,
                         num_nextn_predict_layers=0, model_max_length=128),
    # grouped routing, no shared experts; dense layer 0
    "beam": _f(initializer_range=0.3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=6,
               num_experts_per_tok=2, n_group=2, topk_group=1, sliding_window=16,
               mlp_layer_types=["dense", "sparse", "sparse"]),
    # parallel attention + MoE off one input_layernorm; dense layer 0
    "cohere2_moe": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=64, num_experts=5, num_experts_per_tok=3,
                      num_shared_experts=1, sliding_window=16, prefix_dense_intermediate_size=48,
                      mlp_layer_types=["dense", "sparse", "sparse"]),
    # greedy top-k (no groups), odd experts, no q LoRA
    "deepseek_v2": _f(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=7, n_shared_experts=1,
                      num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
                      qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8),
    # grouped routing: 2 groups of 3, 1 group kept
    "deepseek_v3": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                      intermediate_size=64, moe_intermediate_size=16, n_routed_experts=6, n_shared_experts=1,
                      n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16,
                      q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                      num_nextn_predict_layers=0),
    # grouped routing: 4 groups of 2, 2 groups kept, top-3 from the 4 survivors
    "deepseek_v32": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                       intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
                       n_group=4, topk_group=2, num_experts_per_tok=3, first_k_dense_replace=1, kv_lora_rank=16,
                       q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, index_topk=8,
                       index_head_dim=8, index_n_heads=2),
    # layer 0 hash-routed (token id -> experts, see _AFTER_INIT); every layer is MoE
    "deepseek_v4": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                      q_lora_rank=16, moe_intermediate_size=16, n_routed_experts=5, n_shared_experts=1,
                      num_experts_per_tok=3, sliding_window=16, o_groups=2, o_lora_rank=16, index_n_heads=2,
                      index_head_dim=8, index_topk=8, num_nextn_predict_layers=0,
                      mlp_layer_types=["hash_moe", "moe", "moe"]),
    # dense layer 0, odd experts, shared expert
    "dots1": _f(initializer_range=0.3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, n_shared_experts=1,
                n_routed_experts=5, num_experts_per_tok=3, first_k_dense_replace=1, sliding_window=16),
    # indexed + sliding MLA layers (swa_* are legacy kwargs the config folds into per_layer_config)
    "dots3_note_text": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=16, intermediate_size=64, moe_intermediate_size=16,
                          shared_experts_intermediate_size=24, n_shared_experts=1, n_routed_experts=6, n_group=2,
                          topk_group=1, num_experts_per_tok=2, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8,
                          qk_nope_head_dim=8, v_head_dim=8, index_topk=8, index_head_dim=8, index_n_heads=2,
                          sliding_window=16, first_k_dense_replace=1, swa_num_attention_heads=4,
                          swa_num_key_value_heads=4, swa_q_lora_rank=24, swa_kv_lora_rank=16, swa_head_dim=16,
                          swa_qk_nope_head_dim=8, swa_v_head_dim=8),
    # MoE from layer 1 (moe_layer_start_index)
    "ernie4_5_moe": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, moe_k=3,
                       moe_num_experts=7, moe_num_shared_experts=1, moe_layer_start_index=1),
    # gate-less transposed experts, each with its own post-norm (subclasses the interface class); dense layer 0
    "ergo": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
               first_dense_intermediate_size=64, num_dense_blocks=1, moe_intermediate_size=16,
               shared_intermediate_size=24, num_experts=7, num_experts_per_tok=3, sliding_window=16,
               global_attention_every_n_layers=3),
    # dense layer 0 (first_k_dense_replace)
    "exaone_moe": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, moe_intermediate_size=16, num_experts=5, num_experts_per_tok=3,
                     num_shared_experts=1, first_k_dense_replace=1, sliding_window=16),
    # post-norm family: no norm before the MoE block
    "flex_olmo": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=16, num_experts=7, num_experts_per_tok=3),
    # dense layer 0 (mlp_only_layers), shared expert
    "flint": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=5,
                num_experts_per_tok=2, mlp_only_layers=[0], sliding_window=16),
    # MoE block beside a dense MLP in every layer; global_head_dim is a kwarg the config pops
    "gemma4_text": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                      intermediate_size=64, sliding_window=16, vocab_size_per_layer_input=128,
                      hidden_size_per_layer_input=8, enable_moe_block=True, num_experts=6, top_k_experts=2,
                      moe_intermediate_size=16, global_head_dim=16,
                      layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    # dense layer 0, odd experts, top-3
    "glm4_moe": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, n_shared_experts=1,
                   n_routed_experts=5, num_experts_per_tok=3, first_k_dense_replace=1, num_nextn_predict_layers=0),
    # MLA; dense layer 0 (mlp_layer_types)
    "glm4_moe_lite": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        intermediate_size=64, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=7,
                        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8,
                        qk_nope_head_dim=8, mlp_layer_types=["dense", "sparse", "sparse"]),
    # MLA + indexer; grouped routing 2x3, top-3 from the one kept group
    "glm_moe_dsa": _f(initializer_range=0.3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, n_shared_experts=1,
                      n_routed_experts=6, n_group=2, topk_group=1, num_experts_per_tok=3, kv_lora_rank=16,
                      q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, index_topk=8,
                      index_head_dim=8, index_n_heads=2, first_k_dense_replace=1),
    # experts transposed, with biases; clamped SwiGLU
    "gpt_oss": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  intermediate_size=16, num_local_experts=5, num_experts_per_tok=3, sliding_window=16),
    # fused legacy checkpoint keys (input_linear/output_linear); 2 attention heads
    "granitemoe": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                     intermediate_size=16, num_local_experts=5, num_experts_per_tok=3),
    # shared MLP outside the MoE block
    "granitemoe_swa": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=16, num_local_experts=7, num_experts_per_tok=2,
                         shared_intermediate_size=24, sliding_window=16, layer_rope_theta=[10000.0, 10000.0]),
    # mamba2 + attention layers; shared MLP outside the MoE block
    "granitemoehybrid": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=16, num_local_experts=5, num_experts_per_tok=2,
                           shared_intermediate_size=24,
                           layer_types=["linear_attention", "full_attention", "linear_attention"], mamba_n_heads=4,
                           mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=16),
    # shared MLP outside the MoE block
    "granitemoeshared": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=16, num_local_experts=6, num_experts_per_tok=3,
                           shared_intermediate_size=24),
    # shared MLP inside the MoE block
    "hunyuan_v1_moe": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, intermediate_size=16, num_experts=5, moe_topk=2),
    # dense layer 0, odd experts, shared expert
    "hy_v3": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, intermediate_size=64, moe_intermediate_size=16, num_experts=7,
                num_experts_per_tok=2, num_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"]),
    # MLA + indexer + hyper-connections; dense layer 0
    "hy_v4": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                intermediate_size=64, moe_intermediate_size=16, n_routed_experts=6, n_shared_experts=1,
                num_experts_per_tok=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                v_head_dim=8, index_topk=8, index_head_dim=8, index_n_heads=2,
                mlp_layer_types=["dense", "sparse", "sparse"]),
    # the config has no tie_word_embeddings (never tied); shared experts weighted by the router
    "inkling_text": _f("tie_word_embeddings", initializer_range=0.3, hidden_size=32, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4,
                       swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=16, d_rel=4, rel_extent=32,
                       intermediate_size=64, moe_intermediate_size=16, n_routed_experts=5, num_experts_per_tok=3,
                       n_shared_experts=1, mlp_layer_types=["dense", "sparse", "sparse"]),
    # the config has no tie_word_embeddings (never tied)
    "inkling2_text": _f("tie_word_embeddings", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2,
                        swa_head_dim=8, sliding_window_size=16, d_rel=4, rel_extent=32, unpadded_vocab_size=120,
                        moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2),
    # looped middle layer (run twice per step, messages between passes); sliding/full attention mix
    "inkling2_loop_text": _f("tie_word_embeddings", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, swa_num_attention_heads=4,
                             swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=16, d_rel=4,
                             rel_extent=32, unpadded_vocab_size=120, moe_intermediate_size=16, n_routed_experts=5,
                             num_experts_per_tok=3, n_layers_per_attn_res_block=1, loop_layer_index_start=1,
                             loop_layer_index_end=2, loop_num_passes=2, loop_gate_rank=8,
                             layer_types=["hybrid_sliding", "hybrid", "hybrid_sliding"]),
    # mamba + attention; MoE on layers 1 and 3 (expert_layer_period=2); pure-torch mamba path
    "jamba": _f(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=16, num_experts=5, num_experts_per_tok=2, expert_layer_period=2,
                expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=0, use_mamba_kernels=False,
                mamba_d_state=8, mamba_dt_rank=4),
    # KDA linear attention + MLA; dense layer 0; its config has no max_position_embeddings
    "kimi_linear": _f("max_position_embeddings", hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16, num_shared_experts=1,
                      num_experts=5, num_experts_per_token=3, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                      qk_nope_head_dim=8, head_dim=8, linear_head_dim=8, linear_num_heads=4, model_max_length=128,
                      mlp_layer_types=["dense", "sparse", "sparse"],
                      layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # no dense-layer knob; odd experts, top-3, shared expert
    "kolibri1": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                   moe_intermediate_size=16, shared_expert_intermediate_size=16, num_local_experts=7,
                   num_experts_per_tok=3, sliding_window=16),
    # indexed (NoPE) attention, layer 3 reusing layer 1's K/V; head_dim 16 (NVFP4 blocks); dense layer 0
    "kolibri1_1": _f(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     moe_intermediate_size=16, shared_expert_intermediate_size=24, num_local_experts=5,
                     num_experts_per_tok=3, sliding_window=16, mlp_only_layers=[0], mlp_only_intermediate_size=64,
                     layer_types=["sliding_attention", "indexed_attention", "sliding_attention", "indexed_attention"],
                     index_topk=4, index_pool_size=8, index_compression=4, index_num_heads=2,
                     index_num_local_tokens=4, index_num_sink_tokens=2),
    # mlp_layer_types defaults to dense layer 0
    "laguna": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=6,
                 num_experts_per_tok=2, sliding_window=16),
    # gated delta-net + sliding + full attention layers; every layer MoE with an ungated shared expert
    "lara_mini": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                    moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=5,
                    num_experts_per_tok=3, sliding_window=16,
                    layer_types=["linear_attention", "sliding_attention", "full_attention"]),
    # conv + attention layers; dense layer 0 (num_dense_layers)
    "lfm2_moe": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, moe_intermediate_size=16, num_dense_layers=1, num_experts=5,
                   num_experts_per_tok=3, layer_types=["conv", "full_attention", "conv"]),
    # MoE as a shortcut beside two attention + MLP sublayers per layer; the router also picks zero (identity) experts
    "longcat_flash": _f(hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=4,
                        ffn_hidden_size=64, expert_ffn_hidden_size=16, n_routed_experts=5, zero_expert_num=3,
                        moe_topk=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                        head_dim=8, v_head_dim=8),
    # dense layer in the middle
    "mellum": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 moe_intermediate_size=16, num_local_experts=5, num_experts_per_tok=2, sliding_window=16,
                 intermediate_size=64, mlp_layer_types=["sparse", "dense", "sparse"]),
    # head_dim 12 with partial rotary 0.334; dense layer 0
    "mimo_v2_flash": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, moe_intermediate_size=16, n_routed_experts=6, num_experts_per_tok=2,
                        head_dim=12, v_head_dim=8, sliding_window=16, mlp_layer_types=["dense", "sparse", "sparse"]),
    # grouped routing 2x3, one group kept; shared MLP two experts wide; gated attention; dense layer 0
    "minicpm5_moe": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       intermediate_size=64, moe_intermediate_size=16, n_routed_experts=6, n_shared_experts=2,
                       n_group=2, topk_group=1, num_experts_per_tok=2, mlp_layer_types=["dense", "sparse", "sparse"]),
    # lightning (linear) + full attention layers
    "minimax": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, intermediate_size=16, num_local_experts=5, num_experts_per_tok=2,
                  block_size=16),
    # odd experts, top-3
    "minimax_m2": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     intermediate_size=16, num_local_experts=7, num_experts_per_tok=3),
    # dense layer 0; shared expert
    "minimax_m3_vl_text": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, intermediate_size=16, dense_intermediate_size=64,
                             shared_intermediate_size=16, num_local_experts=6, num_experts_per_tok=2, rotary_dim=4,
                             index_n_heads=2, index_head_dim=8, index_block_size=4, index_topk_blocks=2,
                             mlp_layer_types=["dense", "sparse", "sparse"]),
    "mixtral": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=16, num_local_experts=5, num_experts_per_tok=2),
    # mamba2 / MoE / attention / MoE blocks; experts without a gate (up_proj, relu2)
    "nemotron_h": _f(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     layers_block_type=["linear_attention", "moe", "full_attention", "moe"], intermediate_size=64,
                     use_mamba_kernels=False, ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=16, n_groups=2,
                     chunk_size=16, n_routed_experts=6, n_shared_experts=1, moe_intermediate_size=16,
                     moe_shared_expert_intermediate_size=24, num_experts_per_tok=2),
    # hidden 64
    "olmoe": _f(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=16, num_experts=7, num_experts_per_tok=3),
    # sparsemixer routing, hard-wired top-2
    "phimoe": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=16, num_local_experts=6, num_experts_per_tok=2),
    # dense layer 0 (mlp_only_layers), gated shared expert
    "qwen2_moe": _f(initializer_range=0.3, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                    shared_expert_intermediate_size=24, num_experts=7, num_experts_per_tok=3, mlp_only_layers=[0]),
    # gated delta-net + attention layers; no dense-layer knob
    "qwen3_5_moe_text": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                           linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                           num_experts=5, num_experts_per_tok=2,
                           layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # MoE on layers 1 and 3 (decoder_sparse_step=2)
    "qwen3_moe": _f(initializer_range=0.2, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16, num_local_experts=5,
                    num_experts_per_tok=3, decoder_sparse_step=2),
    # gated delta-net + attention; dense layer 0; gated shared expert
    "qwen3_next": _f(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                     intermediate_size=64, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                     num_experts=6, num_experts_per_tok=3, mlp_only_layers=[0],
                     layer_types=["linear_attention", "full_attention", "linear_attention"]),
    # hyper-connections; indexed attention needs the indexer_* fields
    "qwen4_exp_text": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                         linear_num_value_heads=4, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                         num_experts=5, num_experts_per_tok=3, hc_lowrank=8, indexer_n_heads=2, indexer_kv_heads=1,
                         indexer_head_dim=8, indexer_budget=8, indexer_compress_ratio=4,
                         layer_types=["linear_attention", "indexed_attention"]),
    # no dense-layer knob; odd experts, top-3, shared expert
    "solar_open": _f(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                     moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=7, num_experts_per_tok=3),
    # the config validator allows top-1 only; the router can pick a 'skip' expert
    "zaya": _f(initializer_range=0.3, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, moe_intermediate_size=16, num_experts=5, num_experts_per_tok=1,
               router_hidden_size=16),
}

# Composite (multimodal) model types: AutoModelForCausalLM builds the text model only (gemma4: the conditional-
# generation class without a vision tower), with the same text settings nested under `text_config`.
for _composite, _text, _extra in (
        ("dots3_note", "dots3_note_text", {"vision_config": {"adapter_out_dim": 32},  # must equal text hidden
                                           "audio_config": {"adapter_out_dim": 32}}),
        ("gemma4", "gemma4_text", {"initializer_range": 0.15}),  # the outer config has its own
        ("qwen3_5_moe", "qwen3_5_moe_text", {}),
        ("qwen4_exp", "qwen4_exp_text", {})):
    FAMILIES[_composite] = dict(text_config=dict(FAMILIES[_text]), tie_word_embeddings=False, **_extra)

# None so far: every family above builds, round-trips through save_pretrained and generates on CPU in float32
# (the hybrid families through their pure-torch paths: mamba/delta-net/KDA kernels are not needed).
SKIPPED: dict[str, str] = {}

# Families saved with a small max_shard_size so multi-file (sharded) checkpoints are covered.
SHARDED: set[str] = {"mixtral", "deepseek_v3", "qwen3_next"}
SHARD_SIZE = "64KB"


def _hash_routes(model, seed: int) -> None:
    """DeepSeek-V4's hash-routed layers pick experts from a fixed token-id -> expert-ids table (`tid2eid`), which
    `from_config` leaves all zeros (every token to expert 0, k times). Fill it with k distinct experts per token."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "tid2eid"):
            vocab, k = module.tid2eid.shape
            rows = [torch.randperm(module.num_experts, generator=g)[:k] for _ in range(vocab)]
            module.tid2eid.copy_(torch.stack(rows))


# Changes to the freshly initialised model that `from_config` cannot express.
_AFTER_INIT = {"deepseek_v4": _hash_routes}


def build_family(model_type: str, seed: int = 0):
    """(config, model) for the tiny `model_type` model, initialised with `torch.manual_seed(seed)`; eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **FAMILIES[model_type])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if model_type in _AFTER_INIT:
        with torch.no_grad():
            _AFTER_INIT[model_type](model, seed)
    return config, model.eval()


def make_family(model_type: str, path, seed: int = 0):
    """Build the tiny `model_type` model (seeded), save it to `path` with `save_pretrained`; return its config.
    Families in `SHARDED` are saved in several safetensors files with an index."""
    config, model = build_family(model_type, seed)
    kwargs = {"max_shard_size": SHARD_SIZE} if model_type in SHARDED else {}
    model.save_pretrained(path, **kwargs)
    return config
