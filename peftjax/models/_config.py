"""A checkpoint's ``config.json`` as a plain object with transformers' defaults, without importing torch.

Every transformers config class imports transformers' RoPE utilities, and those import torch
whenever it is installed: a quarter of a gigabyte of host memory and seconds of start-up that a
JAX job never uses. :func:`read_config` builds a :class:`ModelConfig` from the JSON and a table of
each bundled family's defaults (transformers 5's class defaults; ``tests/test_model_config.py``
checks the table against transformers so it cannot drift), applies what the family's ``__init__``
derives (``head_dim``, ``num_key_value_heads``, Qwen2's, Qwen3's, Gemma's, OLMo 3's, SmolLM3's and
GPT-OSS's ``layer_types``, SmolLM3's ``no_rope_layers``, Qwen3-MoE's window, GPT-OSS's YaRN,
DeepSeek-V3's and Mistral 4's ``head_dim``, Mistral 4's YaRN, GLM-4.5 Lite's ``mlp_layer_types``,
Gemma 4's per-layer head sizes, Llama 4's RoPE, MoE and attention layers), and
answers attribute reads like a ``PretrainedConfig`` does (GPT-2's ``hidden_size`` is its ``n_embd``). The bundled models
accept either kind of config: ``from_config`` still takes transformers' classes.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any

# Fields every transformers config has (PretrainedConfig), with their defaults.
COMMON_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "dtype": None,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "problem_type": None,
    "_name_or_path": "",
}

# transformers 5's defaults of each family's config class (RoPE settings excepted: they stay as the
# file gives them, and ``peftjax.models._rope.rope_parameters`` reads old and new spellings).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
        "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "head_dim": None,
    },
    "mistral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "sliding_window": 4096, "attention_dropout": 0.0,
    },
    # Exaone4Config (layer_types derived from sliding_window_pattern; head_dim the hidden size over the heads)
    "exaone4": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": None, "tie_word_embeddings": False, "attention_dropout": 0.0, "sliding_window": 4096,
        "sliding_window_pattern": 4, "layer_types": None,
    },
    # ApertusConfig (Llama 3's RoPE by default)
    "apertus": {
        "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "xielu",
        "max_position_embeddings": 65536, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0,
    },
    # ArceeConfig (a gate-less ReLU² MLP)
    "arcee": {
        "vocab_size": 32000, "hidden_size": 2560, "intermediate_size": 18432, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "head_dim": None, "hidden_act": "relu2",
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    },
    # GraniteMoeConfig (Granite's multipliers, Mixtral's experts)
    "granitemoe": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": None,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    },
    # GraniteMoeSharedConfig: Granite MoE's fields and the shared expert's width (0: none)
    "granitemoeshared": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": None,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "shared_intermediate_size": 0,
    },
    # GraniteMoeHybridConfig (Granite 4.0): the shared expert always, Mamba-2 layers by layer_types (every
    # layer by default; the Hub's "mamba"/"attention" read as linear_attention/full_attention), no RoPE
    # unless position_embedding_type is "rope", mamba_d_head "auto" derived
    "granitemoehybrid": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": None,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "attention_multiplier": 1.0, "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "shared_intermediate_size": 1024, "position_embedding_type": None,
        "layer_types": None, "mamba_n_heads": 128, "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_head": "auto",
        "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True,
        "mamba_proj_bias": False, "time_step_limit": (0.0, float("inf")),
    },
    # NemotronHConfig (Nemotron-H, Nemotron Nano 2, Nemotron 3 Nano): one mixer a layer by layers_block_type
    # (num_hidden_layers its length; the Hub's hybrid_override_pattern "M*-E" and the old mamba_* names read)
    "nemotron_h": {
        "vocab_size": 131072, "hidden_size": 4096, "layers_block_type": None, "tie_word_embeddings": False,
        "use_cache": True, "num_logits_to_keep": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "max_position_embeddings": 4096,
        "attention_bias": False, "attention_dropout": 0.0, "sliding_window": None, "intermediate_size": 21504,
        "mlp_hidden_act": "relu2", "mlp_bias": False, "use_mamba_kernels": True, "ssm_state_size": 128,
        "mamba_num_heads": 128, "mamba_head_dim": 64, "mamba_hidden_act": "silu", "n_groups": 8, "conv_kernel": 4,
        "expand": 2, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_limit": (0.0, float("inf")),
        "time_step_floor": 0.0001, "use_conv_bias": True, "chunk_size": 128, "mamba_proj_bias": False,
        "mamba_ssm_cache_dtype": "float32", "n_routed_experts": 8, "output_router_logits": False,
        "n_shared_experts": 1, "moe_intermediate_size": 7688, "moe_shared_expert_intermediate_size": 7688,
        "moe_latent_size": None, "moe_shared_expert_overlap": True, "num_experts_per_tok": 2,
        "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "num_nextn_predict_layers": 0, "mtp_layers_block_type": None, "use_bias": False, "initializer_range": 0.02,
        "layer_norm_epsilon": 1e-05, "residual_in_fp32": False, "hidden_dropout": 0.0,
        "rescale_prenorm_residual": True,
    },
    # BambaConfig: Mamba-2 layers with attention at attn_layer_indices; RoPE on half of each head, always
    "bamba": {
        "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "num_logits_to_keep": 1,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 262144,
        "attention_dropout": 0.0, "attn_layer_indices": None, "mamba_n_heads": 128, "mamba_d_head": "auto",
        "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
        "mamba_conv_bias": True, "mamba_proj_bias": False, "time_step_limit": (0.0, float("inf")),
        "z_loss_coefficient": 0.0, "attention_bias": False, "mlp_bias": False,
    },
    # JambaConfig: Mamba-1 layers, attention every attn_layer_period-th from attn_layer_offset, experts every
    # expert_layer_period-th from expert_layer_offset; mamba_dt_rank "auto" derived
    "jamba": {
        "vocab_size": 65536, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        "max_position_embeddings": 262144, "attention_dropout": 0.0, "num_experts_per_tok": 2, "num_experts": 16,
        "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 8, "attn_layer_offset": 4,
        "use_mamba_kernels": True, "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto",
        "mamba_conv_bias": True, "mamba_proj_bias": False, "use_mambapy": False, "use_associative_scan": True,
    },
    # FalconH1Config: Mamba-2 and attention in every layer, µP multipliers; mamba_d_head "auto" derived from
    # mamba_d_ssm (or mamba_expand x hidden_size)
    "falcon_h1": {
        "vocab_size": 128000, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "num_logits_to_keep": 1,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 8192,
        "attention_dropout": 0.0, "mamba_d_ssm": 1024, "mamba_n_heads": 128, "mamba_d_head": "auto",
        "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256,
        "mamba_conv_bias": True, "mamba_proj_bias": False, "mamba_norm_before_gate": True, "mamba_rms_norm": False,
        "time_step_limit": (0.0, float("inf")), "projectors_bias": False, "lm_head_multiplier": 1.0,
        "embedding_multiplier": 1.0, "mlp_multipliers": None, "key_multiplier": 1.0,
        "attention_out_multiplier": 1.0, "attention_in_multiplier": 1.0, "ssm_multipliers": None,
        "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0, "attention_bias": False, "mlp_bias": False,
    },
    # MambaConfig: attention-free Mamba-1 mixers; intermediate_size (expand x hidden_size) and time_step_rank
    # ("auto": ceil(hidden_size / 16)) derived; FalconMambaConfig adds the mixers' RMS epsilon
    "mamba": {
        "vocab_size": 50280, "hidden_size": 768, "state_size": 16, "num_hidden_layers": 32, "layer_norm_epsilon": 1e-05,
        "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0, "expand": 2, "conv_kernel": 4, "use_bias": False,
        "use_conv_bias": True, "hidden_act": "silu", "initializer_range": 0.1, "residual_in_fp32": True,
        "time_step_rank": "auto", "time_step_scale": 1.0, "time_step_min": 0.001, "time_step_max": 0.1,
        "time_step_init_scheme": "random", "time_step_floor": 0.0001, "rescale_prenorm_residual": False,
        "use_cache": True, "use_mambapy": False, "use_associative_scan": True, "tie_word_embeddings": True,
    },
    # Mamba2Config: attention-free, Mamba-2 mixers of num_heads x head_dim (expand x hidden_size)
    "mamba2": {
        "num_heads": 128, "head_dim": 64, "vocab_size": 32768, "hidden_size": 4096, "state_size": 128,
        "num_hidden_layers": 64, "layer_norm_epsilon": 1e-05, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "expand": 2, "conv_kernel": 4, "n_groups": 8, "use_bias": False, "use_conv_bias": True, "hidden_act": "silu",
        "initializer_range": 0.1, "residual_in_fp32": True, "time_step_rank": 256, "time_step_min": 0.001,
        "time_step_max": 0.1, "time_step_floor": 0.0001, "time_step_limit": (0.0, float("inf")),
        "rescale_prenorm_residual": False, "use_cache": True, "chunk_size": 256, "tie_word_embeddings": False,
    },
    # NemotronConfig (RoPE on half of each head unless partial_rotary_factor says otherwise)
    "nemotron": {
        "vocab_size": 256000, "hidden_size": 6144, "intermediate_size": 24576, "num_hidden_layers": 32,
        "num_attention_heads": 48, "head_dim": None, "num_key_value_heads": None, "hidden_act": "relu2",
        "max_position_embeddings": 4096, "initializer_range": 0.0134, "norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 2, "eos_token_id": 3, "tie_word_embeddings": False,
        "partial_rotary_factor": 0.5, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    },
    # HeliumConfig (pairwise RoPE)
    "helium": {
        "vocab_size": 48000, "hidden_size": 2560, "intermediate_size": 7040, "num_hidden_layers": 24,
        "num_attention_heads": 20, "num_key_value_heads": None, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-08, "use_cache": True,
        "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    },
    # InternLM3Config (Llama's; qkv_bias and bias by ATTRIBUTE_MAPS)
    "internlm3": {
        "vocab_size": 128512, "hidden_size": 4096, "intermediate_size": 10240, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
    },
    # MinistralConfig (layer_types derived: every layer sliding when sliding_window is set)
    "ministral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "sliding_window": 4096, "attention_dropout": 0.0, "layer_types": None,
    },
    # Ministral3Config (YaRN and Llama 4's query scale in rope_parameters by default)
    "ministral3": {
        "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 34,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 262144, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": 11, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "sliding_window": None, "attention_dropout": 0.0,
    },
    "qwen2": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "layer_types": None, "attention_dropout": 0.0, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None,
    },
    "qwen3": {
        "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "tie_word_embeddings": False, "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096,
        "max_window_layers": 28, "layer_types": None, "attention_dropout": 0.0, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None,
    },
    "phi3": {
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "hidden_act": "silu", "max_position_embeddings": 4096,
        "original_max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-05,
        "use_cache": True, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 32000,
        "pad_token_id": 32000, "sliding_window": None,
    },
    "gemma": {
        "vocab_size": 256000, "hidden_size": 3072, "intermediate_size": 24576, "num_hidden_layers": 28,
        "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "use_bidirectional_attention": None,
    },
    "gemma2": {
        "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 8192, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "query_pre_attn_scalar": 256, "sliding_window": 4096, "layer_types": None,
        "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "use_bidirectional_attention": None,
    },
    "gemma3_text": {
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "query_pre_attn_scalar": 256, "sliding_window": 4096, "layer_types": None,
        "final_logit_softcapping": None, "attn_logit_softcapping": None, "use_bidirectional_attention": False,
        "_sliding_window_pattern": 6,
    },
    # Gemma4TextConfig (its RoPE per layer type and per-layer head sizes are set by _derive)
    "gemma4_text": {
        "vocab_size": 262144, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 30,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "sliding_window": 512, "layer_types": None,
        "final_logit_softcapping": None, "use_bidirectional_attention": None, "vocab_size_per_layer_input": 262144,
        "hidden_size_per_layer_input": 256, "attention_k_eq_v": False, "num_kv_shared_layers": 0,
        "enable_moe_block": False, "use_double_wide_mlp": False, "num_experts": None, "top_k_experts": None,
        "moe_intermediate_size": None,
    },
    # Gemma3nTextConfig (E4B's sizes; the per-layer lists and layer types set by _derive_gemma3n)
    "gemma3n_text": {
        "vocab_size": 262400, "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 35,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": True, "attention_bias": False,
        "attention_dropout": 0.0, "sliding_window": 512, "layer_types": None, "final_logit_softcapping": 30.0,
        "vocab_size_per_layer_input": 262144, "hidden_size_per_layer_input": 256, "altup_active_idx": 0,
        "altup_coef_clip": 120.0, "altup_correct_scale": True, "altup_num_inputs": 4, "num_kv_shared_layers": 15,
        "laurel_rank": 64, "activation_sparsity_pattern": None,
    },
    "mixtral": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
        "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "sliding_window": None, "attention_dropout": 0.0, "num_experts_per_tok": 2, "num_local_experts": 8,
        "output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
    },
    # FlexOlmoConfig (FlexOlmo-7x7B's sizes)
    "flex_olmo": {
        "vocab_size": 100352, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": 100277,
        "bos_token_id": None, "eos_token_id": 100257, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "num_experts_per_tok": 5, "num_experts": 7, "output_router_logits": False,
        "router_aux_loss_coef": 0.01, "norm_topk_prob": False,
    },
    # Lfm2MoeConfig (LFM2-8B-A1B's sizes; layer_types must be given, as transformers' model needs them)
    "lfm2_moe": {
        "vocab_size": 65536, "hidden_size": 2048, "intermediate_size": 7168, "moe_intermediate_size": 1792,
        "num_hidden_layers": 32, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": True,
        "max_position_embeddings": 128000, "initializer_range": 0.02, "use_cache": True, "norm_eps": 1e-05,
        "num_attention_heads": 32, "num_key_value_heads": 8, "conv_bias": False, "conv_L_cache": 3,
        "num_dense_layers": 2, "num_experts_per_tok": 4, "output_router_logits": False, "num_experts": 32,
        "use_expert_bias": True, "routed_scaling_factor": 1.0, "norm_topk_prob": True, "layer_types": None,
    },
    # ZambaConfig (Zamba-7B-v1's sizes; the derived fields below as its __post_init__ computes them)
    "zamba": {
        "vocab_size": 32000, "tie_word_embeddings": True, "hidden_size": 3712, "attention_hidden_size": None,
        "intermediate_size": 14848, "num_hidden_layers": 76, "num_attention_heads": 16, "attention_head_dim": None,
        "num_key_value_heads": 16, "n_mamba_heads": 2, "hidden_act": "gelu", "hidden_mamba_act": "silu",
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "num_logits_to_keep": 1,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "max_position_embeddings": 4096,
        "attention_dropout": 0.0, "attn_layer_period": 6, "attn_layer_offset": 4, "use_mamba_kernels": True,
        "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto",
        "use_associative_scan": True, "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001,
        "mamba_conv_bias": True, "mamba_proj_bias": False, "layers_block_type": None,
    },
    # Zamba2Config (Zamba2-2.7B's sizes; the derived fields below as its __post_init__ computes them)
    "zamba2": {
        "vocab_size": 32000, "max_position_embeddings": 4096, "hidden_size": 2560, "num_hidden_layers": 54,
        "layers_block_type": None, "mamba_d_state": 64, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_ngroups": 1,
        "time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 0.0001, "n_mamba_heads": 8,
        "use_mamba_kernels": True, "use_conv_bias": True, "chunk_size": 256, "use_mem_eff_path": False,
        "add_bias_linear": False, "intermediate_size": None, "hidden_act": "gelu", "num_attention_heads": 32,
        "num_key_value_heads": None, "attention_dropout": 0.0, "num_mem_blocks": 1,
        "use_shared_attention_adapter": False, "adapter_rank": 128, "use_mem_rope": False,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "num_logits_to_keep": 1,
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "use_long_context": False,
        "tie_word_embeddings": True,
    },
    # MptConfig (MPT-1B's sizes; attn_config a dict of MptAttentionConfig's fields)
    "mpt": {
        "d_model": 2048, "n_heads": 16, "n_layers": 24, "expansion_ratio": 4, "max_seq_len": 2048,
        "vocab_size": 50368, "resid_pdrop": 0.0, "layer_norm_epsilon": 1e-05, "emb_pdrop": 0.0,
        "learned_pos_emb": True, "attn_config": {
            "attn_type": "multihead_attention", "attn_pdrop": 0, "attn_impl": "torch", "clip_qkv": None,
            "softmax_scale": None, "prefix_lm": False, "qk_ln": False, "attn_uses_sequence_id": False,
            "alibi": True, "alibi_bias_max": 8},
        "init_device": "cpu", "logit_scale": None, "no_bias": True, "embedding_fraction": 1.0,
        "norm_type": "low_precision_layernorm", "use_cache": False, "initializer_range": 0.02,
        "tie_word_embeddings": True, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    # PhimoeConfig (Phi-3.5-MoE's sizes; its release's config sets the biases, LongRoPE and mscales)
    "phimoe": {
        "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 6400, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "pad_token_id": None,
        "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "sliding_window": None,
        "attention_dropout": 0.0, "num_experts_per_tok": 2, "num_local_experts": 16, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.01, "input_jitter_noise": 0.0,
        "attention_bias": False, "lm_head_bias": False,
    },
    # Ernie4_5Config
    "ernie4_5": {
        "vocab_size": 103424, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 18,
        "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 131072,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": True, "use_bias": False, "head_dim": 128,
    },
    # GlmConfig (GLM-4-9B; half of each head rotated by default: partial_rotary_factor); Glm4Config's are the same
    "glm": {
        "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "hidden_act": "silu",
        "attention_dropout": 0.0, "max_position_embeddings": 131072, "initializer_range": 0.02,
        "rms_norm_eps": 1.5625e-07, "use_cache": True, "tie_word_embeddings": False, "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338], "bos_token_id": None, "attention_bias": True,
        "partial_rotary_factor": 0.5,
    },
    # Glm4MoeConfig (half of each head rotated by default: partial_rotary_factor); experts in
    # n_routed_experts (alias num_local_experts), no head_dim field (the attention reads one if set)
    "glm4_moe": {
        "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 10944, "num_hidden_layers": 46,
        "num_attention_heads": 96, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "moe_intermediate_size": 1408, "num_experts_per_tok": 8,
        "output_router_logits": False, "n_shared_experts": 1, "n_routed_experts": 128, "routed_scaling_factor": 1.0,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "norm_topk_prob": True, "use_qk_norm": False,
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 0.5,
    },
    # Glm4MoeLiteConfig: DeepSeek-V3's fields, mlp_layer_types for dense/sparse (derived), head_dim an alias
    "glm4_moe_lite": {
        "vocab_size": 154880, "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
        "num_hidden_layers": 47, "num_attention_heads": 20, "num_key_value_heads": 20, "n_shared_experts": 1,
        "n_routed_experts": 64, "output_router_logits": False, "routed_scaling_factor": 1.8, "kv_lora_rank": 512,
        "q_lora_rank": 768, "qk_rope_head_dim": 64, "v_head_dim": 256, "qk_nope_head_dim": 192, "n_group": 1,
        "topk_group": 1, "num_experts_per_tok": 4, "norm_topk_prob": True, "hidden_act": "silu",
        "max_position_embeddings": 202752, "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": None, "bos_token_id": 0, "eos_token_id": 1, "pretraining_tp": 1, "tie_word_embeddings": False,
        "rope_interleave": True, "mlp_layer_types": None, "attention_bias": False, "attention_dropout": 0.0,
    },
    # SeedOssConfig
    "seed_oss": {
        "vocab_size": 155136, "hidden_size": 4096, "intermediate_size": 27648, "num_hidden_layers": 64,
        "num_attention_heads": 80, "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 524288,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": 1, "bos_token_id": 0,
        "eos_token_id": 2, "pretraining_tp": 1, "tie_word_embeddings": False, "attention_bias": True,
        "attention_out_bias": False, "attention_dropout": 0.1, "residual_dropout": 0.1, "mlp_bias": False,
        "head_dim": 128,
    },
    # Qwen3_5TextConfig (its RoPE turns the first quarter of each head: partial_rotary_factor, set
    # by _derive; layer_types from full_attention_interval, 4, where the file gives none)
    "qwen3_5_text": {
        "vocab_size": 248320, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32,
        "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": 256, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "layer_types": None, "pad_token_id": None, "bos_token_id": None,
        "eos_token_id": None,
    },
    # Qwen3_5MoeTextConfig (as Qwen3_5TextConfig's, with Qwen2-MoE's experts and no dense MLP)
    "qwen3_5_moe_text": {
        "vocab_size": 248320, "hidden_size": 2048, "num_hidden_layers": 40, "num_attention_heads": 16,
        "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768, "initializer_range": 0.02,
        "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False, "attention_bias": False,
        "attention_dropout": 0.0, "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512, "num_experts_per_tok": 8,
        "num_experts": 256, "output_router_logits": False, "router_aux_loss_coef": 0.001, "layer_types": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    # Qwen3NextConfig (Qwen3.5's hybrid decoder, layer_types and partial RoPE derived alike, with
    # Qwen2-MoE's experts, dense where mlp_only_layers or decoder_sparse_step say)
    "qwen3_next": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 48,
        "num_attention_heads": 16, "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 32768,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": 256, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "decoder_sparse_step": 1, "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512, "num_experts_per_tok": 10, "num_experts": 512, "norm_topk_prob": True,
        "output_router_logits": False, "router_aux_loss_coef": 0.001, "mlp_only_layers": None, "layer_types": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    # GptOssConfig (its default RoPE, YaRN, is set by _derive where the file gives none)
    "gpt_oss": {
        "num_hidden_layers": 36, "num_local_experts": 128, "vocab_size": 201088, "hidden_size": 2880,
        "intermediate_size": 2880, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
        "sliding_window": 128, "tie_word_embeddings": False, "hidden_act": "silu", "initializer_range": 0.02,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "attention_dropout": 0.0,
        "num_experts_per_tok": 4, "swiglu_alpha": 1.702, "swiglu_limit": 7.0, "router_aux_loss_coef": 0.001,
        "output_router_logits": False, "use_cache": True, "layer_types": None, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None, "attention_bias": True,
    },
    # Qwen2MoeConfig: experts counted in num_experts (no num_local_experts alias); q/k/v biases by qkv_bias
    "qwen2_moe": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
        "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu", "max_position_embeddings": 32768,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "attention_dropout": 0.0,
        "decoder_sparse_step": 1, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts_per_tok": 4, "num_experts": 60, "norm_topk_prob": False, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "mlp_only_layers": None, "qkv_bias": True, "layer_types": None,
        "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    # Qwen3MoeConfig: no head_dim field (a config.json may carry one); num_experts is stored as num_local_experts
    "qwen3_moe": {
        "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "tie_word_embeddings": False,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": 4096, "attention_dropout": 0.0,
        "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8, "num_local_experts": 128,
        "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
        "mlp_only_layers": None, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    },
    # OlmoeConfig (experts in num_experts, alias num_local_experts)
    "olmoe": {
        "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 2048, "num_hidden_layers": 16,
        "num_attention_heads": 16, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 4096,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "pad_token_id": 1, "bos_token_id": None,
        "eos_token_id": 50279, "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "num_experts_per_tok": 8, "num_experts": 64, "output_router_logits": False,
        "router_aux_loss_coef": 0.01, "norm_topk_prob": False,
    },
    # DeepseekV3Config: experts in n_routed_experts (alias num_local_experts); head_dim is derived
    "deepseek_v3": {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1,
        "n_routed_experts": 256, "output_router_logits": False, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8,
        "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True,
        "hidden_act": "silu", "max_position_embeddings": 4096, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "use_cache": True, "pad_token_id": None, "bos_token_id": 0, "eos_token_id": 1, "pretraining_tp": 1,
        "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0,
        "num_nextn_predict_layers": 1,
    },
    # HunYuanDenseV1Config (the checkpoints' RoPE: "dynamic" with a fixed alpha, see _rope)
    "hunyuan_v1_dense": {
        "vocab_size": 290943, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "eod_token_id": 3, "pretraining_tp": 1, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "head_dim": None,
    },
    # HunYuanMoEV1Config: experts in num_experts (alias num_local_experts), top k in moe_topk (alias
    # num_experts_per_tok), each expert and the shared MLP intermediate_size wide
    "hunyuan_v1_moe": {
        "vocab_size": 290943, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-05, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "eod_token_id": 3, "sep_token_id": 4, "pretraining_tp": 1, "tie_word_embeddings": False,
        "attention_bias": False, "attention_dropout": 0.0, "num_experts": 1, "output_router_logits": False,
        "moe_topk": 1, "head_dim": None,
    },
    # Ernie4_5_MoeConfig: experts in moe_num_experts (alias num_experts), top k in moe_k (alias
    # num_experts_per_tok); moe_layer_end_index -1 is the last layer
    "ernie4_5_moe": {
        "vocab_size": 103424, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "hidden_size": 2560,
        "intermediate_size": 12288, "num_hidden_layers": 28, "num_attention_heads": 20, "num_key_value_heads": 4,
        "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-05,
        "use_cache": True, "tie_word_embeddings": True, "use_bias": False, "moe_intermediate_size": 1536,
        "moe_k": 6, "moe_num_experts": 64, "moe_num_shared_experts": 2, "moe_layer_start_index": 1,
        "moe_layer_end_index": -1, "moe_layer_interval": 1, "moe_norm_min": 1e-12, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "num_nextn_predict_layers": None,
    },
    # Lfm2Config: layer_types derived from full_attn_idxs (every layer attends by default); the Hub's
    # tie_embedding and block_ff_dim are tie_word_embeddings and intermediate_size (ATTRIBUTE_MAPS)
    "lfm2": {
        "vocab_size": 65536, "hidden_size": 2560, "intermediate_size": 12288, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 128000,
        "initializer_range": 0.02, "norm_eps": 1e-05, "use_cache": True, "pad_token_id": 0, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": True, "conv_bias": False, "conv_L_cache": 3,
        "block_multiple_of": 256, "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": True,
        "full_attn_idxs": None, "layer_types": None,
    },
    # DeepseekV2Config: experts in n_routed_experts (alias num_experts); head_dim and qk_head_dim are derived
    "deepseek_v2": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None, "n_shared_experts": 2,
        "n_routed_experts": 64, "output_router_logits": False, "routed_scaling_factor": 1.0, "kv_lora_rank": 512,
        "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": None,
        "topk_group": None, "topk_method": "greedy", "num_experts_per_tok": None, "first_k_dense_replace": 0,
        "norm_topk_prob": False, "hidden_act": "silu", "max_position_embeddings": 2048, "initializer_range": 0.02,
        "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
        "pretraining_tp": 1, "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False,
    },
    # Mistral4Config: DeepSeek-V3's fields (no MTP); its default RoPE (YaRN) is set by _derive
    "mistral4": {
        "vocab_size": 131072, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 2048,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 32, "n_shared_experts": 1,
        "n_routed_experts": 128, "output_router_logits": False, "routed_scaling_factor": 1.0, "kv_lora_rank": 256,
        "q_lora_rank": 1024, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 64, "n_group": 1,
        "topk_group": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 0, "norm_topk_prob": True,
        "hidden_act": "silu", "max_position_embeddings": 1048576, "initializer_range": 0.02, "rms_norm_eps": 1e-06,
        "use_cache": True, "pad_token_id": 11, "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1,
        "tie_word_embeddings": False, "rope_interleave": True, "attention_bias": False, "attention_dropout": 0.0,
    },
    # Llama4TextConfig (no_rope_layers, moe_layers and layer_types are set by _derive)
    "llama4_text": {
        "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
        "hidden_act": "silu", "max_position_embeddings": 131072, "initializer_range": 0.02, "rms_norm_eps": 1e-05,
        "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
        "attention_dropout": 0.0, "num_experts_per_tok": 1, "num_local_experts": 16, "moe_layers": None,
        "interleave_moe_layer_step": 1, "use_qk_norm": True, "output_router_logits": False,
        "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "no_rope_layers": None,
        "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "layer_types": None,
        "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1, "attention_bias": False,
    },
    "granite": {
        "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": None, "bos_token_id": 1,
        "eos_token_id": 2, "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0,
        "mlp_bias": False, "embedding_multiplier": 1.0, "logits_scaling": 1.0, "residual_multiplier": 1.0,
        "attention_multiplier": 1.0,
    },
    # OlmoConfig (no norm epsilon: OLMo's LayerNorms take 1e-5)
    "olmo": {
        "vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "use_cache": True, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    },
    "olmo2": {
        "vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "use_cache": True, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": 1e-05,
    },
    # Olmo3Config: OLMo 2's fields, a window and layer types; a RoPE per layer type (see _olmo.olmo3_rope_parameters)
    "olmo3": {
        "vocab_size": 50304, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu", "max_position_embeddings": 2048,
        "initializer_range": 0.02, "use_cache": True, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279,
        "tie_word_embeddings": False, "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": 1e-05,
        "sliding_window": 4096, "layer_types": None,
    },
    "phi": {
        "vocab_size": 51200, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
        "num_attention_heads": 32, "num_key_value_heads": None, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attention_dropout": 0.0, "hidden_act": "gelu_new", "max_position_embeddings": 2048, "initializer_range": 0.02,
        "layer_norm_eps": 1e-05, "use_cache": True, "tie_word_embeddings": False, "qk_layernorm": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
    },
    # FalconConfig (num_key_value_heads and ffn_hidden_size derived, as FalconConfig.__post_init__ derives them)
    "falcon": {
        "vocab_size": 65024, "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
        "num_ln_in_parallel_attn": None, "layer_norm_epsilon": 1e-05, "initializer_range": 0.02, "use_cache": True,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "num_kv_heads": None, "alibi": False,
        "new_decoder_architecture": False, "multi_query": True, "parallel_attn": True, "bias": False,
        "max_position_embeddings": 2048, "bos_token_id": 11, "eos_token_id": 11, "pad_token_id": None,
        "ffn_hidden_size": None, "activation": "gelu", "tie_word_embeddings": True,
    },
    # GPTJConfig (n_embd, n_layer, n_head, n_positions by ATTRIBUTE_MAPS; RoPE on rotary_dim dims of each head)
    "gptj": {
        "vocab_size": 50400, "n_positions": 2048, "n_embd": 4096, "n_layer": 28, "n_head": 16, "rotary_dim": 64,
        "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "layer_norm_epsilon": 1e-05, "initializer_range": 0.02, "use_cache": True, "bos_token_id": 50256,
        "eos_token_id": 50256, "pad_token_id": None, "tie_word_embeddings": False,
    },
    # GPTBigCodeConfig (n_embd, n_layer, n_head, n_positions by ATTRIBUTE_MAPS; one key/value head with multi_query)
    "gpt_bigcode": {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
        "activation_function": "gelu_pytorch_tanh", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-05, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None, "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True, "multi_query": True, "add_cross_attention": False,
        "tie_word_embeddings": True,
    },
    # GPTNeoConfig (num_heads, num_layers by ATTRIBUTE_MAPS; attention_layers derived from attention_types)
    "gpt_neo": {
        "vocab_size": 50257, "max_position_embeddings": 2048, "hidden_size": 2048, "num_layers": 24,
        "attention_types": [[["global", "local"], 12]], "attention_layers": None, "num_heads": 16,
        "intermediate_size": None, "window_size": 256, "activation_function": "gelu_new", "resid_dropout": 0.0,
        "embed_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": 0.1, "layer_norm_epsilon": 1e-05,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": 50256, "eos_token_id": 50256,
        "pad_token_id": None, "tie_word_embeddings": True,
    },
    # StableLmConfig (RoPE on a quarter of each head unless the file says otherwise)
    "stablelm": {
        "vocab_size": 50304, "intermediate_size": 6912, "hidden_size": 2560, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 4096,
        "initializer_range": 0.02, "layer_norm_eps": 1e-05, "use_cache": True, "tie_word_embeddings": False,
        "use_qkv_bias": False, "qk_layernorm": False, "use_parallel_residual": False, "hidden_dropout": 0.0,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None,
    },
    # Starcoder2Config
    "starcoder2": {
        "vocab_size": 49152, "hidden_size": 3072, "intermediate_size": 12288, "num_hidden_layers": 30,
        "num_attention_heads": 24, "num_key_value_heads": 2, "hidden_act": "gelu_pytorch_tanh",
        "max_position_embeddings": 4096, "initializer_range": 0.018042, "norm_epsilon": 1e-05, "use_cache": True,
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None, "sliding_window": None,
        "attention_dropout": 0.0, "residual_dropout": 0.0, "embedding_dropout": 0.0, "use_bias": True,
        "tie_word_embeddings": True,
    },
    # BloomConfig (n_layer, n_head: num_hidden_layers and num_attention_heads by ATTRIBUTE_MAPS)
    "bloom": {
        "vocab_size": 250880, "hidden_size": 64, "n_layer": 2, "n_head": 8, "layer_norm_epsilon": 1e-05,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": None,
        "apply_residual_connection_post_layernorm": False, "hidden_dropout": 0.0, "attention_dropout": 0.0,
        "pretraining_tp": 1, "slow_but_exact": False, "tie_word_embeddings": True,
    },
    # OPTConfig (word_embed_proj_dim defaults to the hidden size)
    "opt": {
        "vocab_size": 50272, "hidden_size": 768, "num_hidden_layers": 12, "ffn_dim": 3072,
        "max_position_embeddings": 2048, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
        "word_embed_proj_dim": None, "dropout": 0.1, "attention_dropout": 0.0, "num_attention_heads": 12,
        "activation_function": "relu", "layerdrop": 0.0, "init_std": 0.02, "use_cache": True, "pad_token_id": 1,
        "bos_token_id": 2, "eos_token_id": 2, "enable_bias": True, "layer_norm_elementwise_affine": True,
        "tie_word_embeddings": True,
    },
    # GPTNeoXConfig (Pythia, GPT-NeoX-20B); old files' rotary_pct and rotary_emb_base are read as
    # partial_rotary_factor and rope_theta (ATTRIBUTE_MAPS)
    "gpt_neox": {
        "vocab_size": 50432, "hidden_size": 6144, "num_hidden_layers": 44, "num_attention_heads": 64,
        "intermediate_size": 24576, "hidden_act": "gelu", "attention_dropout": 0.0, "hidden_dropout": 0.0,
        "classifier_dropout": 0.1, "max_position_embeddings": 2048, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
        "use_cache": True, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": False,
        "use_parallel_residual": True, "attention_bias": True, "is_decoder": False,
    },
    # CohereConfig (Command R) and Cohere2Config (Command R7B: layer_types, from sliding_window_pattern)
    "cohere": {
        "vocab_size": 256000, "hidden_size": 8192, "intermediate_size": 22528, "logit_scale": 0.0625,
        "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": None, "hidden_act": "silu",
        "max_position_embeddings": 8192, "initializer_range": 0.02, "layer_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": 0, "bos_token_id": 5, "eos_token_id": 255001, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "use_qk_norm": False,
    },
    "cohere2": {
        "vocab_size": 256000, "hidden_size": 8192, "intermediate_size": 22528, "logit_scale": 0.0625,
        "num_hidden_layers": 40, "num_attention_heads": 64, "num_key_value_heads": None, "hidden_act": "silu",
        "max_position_embeddings": 8192, "initializer_range": 0.02, "layer_norm_eps": 1e-05, "use_cache": True,
        "pad_token_id": 0, "bos_token_id": 5, "eos_token_id": 255001, "tie_word_embeddings": True,
        "attention_bias": False, "attention_dropout": 0.0, "sliding_window": 4096, "layer_types": None,
        "head_dim": None,
    },
    "smollm3": {
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 32768,
        "initializer_range": 0.02, "rms_norm_eps": 1e-06, "use_cache": True, "pad_token_id": 128004,
        "bos_token_id": 128000, "eos_token_id": 128001, "use_sliding_window": False, "sliding_window": None,
        "no_rope_layers": None, "no_rope_layer_interval": 4, "layer_types": None, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "tie_word_embeddings": True,
    },
    "bert": {
        "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0, "use_cache": True,
        "classifier_dropout": None, "is_decoder": False, "add_cross_attention": False, "bos_token_id": None,
        "eos_token_id": None, "tie_word_embeddings": True,
    },
    # AlbertConfig (its defaults are ALBERT-xxlarge's sizes)
    "albert": {
        "vocab_size": 30000, "embedding_size": 128, "hidden_size": 4096, "num_hidden_layers": 12,
        "num_hidden_groups": 1, "num_attention_heads": 64, "intermediate_size": 16384, "inner_group_num": 1,
        "hidden_act": "gelu_new", "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
        "classifier_dropout_prob": 0.1, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3,
        "tie_word_embeddings": True, "chunk_size_feed_forward": 0,
    },
    # RobertaConfig and XLMRobertaConfig: BERT's fields, fairseq's special tokens (padding 1)
    "roberta": {
        "vocab_size": 50265, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 1, "use_cache": True,
        "classifier_dropout": None, "is_decoder": False, "add_cross_attention": False, "bos_token_id": 0,
        "eos_token_id": 2, "tie_word_embeddings": True,
    },
    # DistilBertConfig: BERT's encoder under its own field names (dim, n_layers, n_heads, hidden_dim)
    "distilbert": {
        "vocab_size": 30522, "max_position_embeddings": 512, "sinusoidal_pos_embds": False, "n_layers": 6,
        "n_heads": 12, "dim": 768, "hidden_dim": 3072, "dropout": 0.1, "attention_dropout": 0.1,
        "activation": "gelu", "initializer_range": 0.02, "qa_dropout": 0.1, "seq_classif_dropout": 0.2,
        "pad_token_id": 0, "eos_token_id": None, "bos_token_id": None, "tie_word_embeddings": True,
    },
    # ModernBertConfig: layer_types from global_attn_every_n_layers (3), a RoPE per layer type
    "modernbert": {
        "vocab_size": 50368, "hidden_size": 768, "intermediate_size": 1152, "num_hidden_layers": 22,
        "num_attention_heads": 12, "hidden_activation": "gelu", "max_position_embeddings": 8192,
        "initializer_range": 0.02, "initializer_cutoff_factor": 2.0, "norm_eps": 1e-05, "norm_bias": False,
        "pad_token_id": 50283, "eos_token_id": 50282, "bos_token_id": 50281, "cls_token_id": 50281,
        "sep_token_id": 50282, "attention_bias": False, "attention_dropout": 0.0, "layer_types": None,
        "local_attention": 128, "embedding_dropout": 0.0, "mlp_bias": False, "mlp_dropout": 0.0,
        "decoder_bias": True, "classifier_pooling": "cls", "classifier_dropout": 0.0, "classifier_bias": False,
        "classifier_activation": "gelu", "deterministic_flash_attn": False, "sparse_prediction": False,
        "sparse_pred_ignore_index": -100, "tie_word_embeddings": True,
    },
    # ElectraConfig: BERT's fields, embeddings embedding_size wide; the summary_* fields are unused here
    "electra": {
        "vocab_size": 30522, "embedding_size": 128, "hidden_size": 256, "num_hidden_layers": 12,
        "num_attention_heads": 4, "intermediate_size": 1024, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
        "initializer_range": 0.02, "layer_norm_eps": 1e-12, "summary_type": "first", "summary_use_proj": True,
        "summary_activation": "gelu", "summary_last_dropout": 0.1, "pad_token_id": 0, "use_cache": True,
        "classifier_dropout": None, "is_decoder": False, "add_cross_attention": False, "bos_token_id": None,
        "eos_token_id": None, "tie_word_embeddings": True,
    },
    # DebertaV2Config (v2 and v3): relative attention, buckets, shared keys and the rest come from the file
    "deberta-v2": {
        "vocab_size": 128100, "hidden_size": 1536, "num_hidden_layers": 24, "num_attention_heads": 24,
        "intermediate_size": 6144, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 0,
        "initializer_range": 0.02, "layer_norm_eps": 1e-07, "relative_attention": False,
        "max_relative_positions": -1, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None,
        "position_biased_input": True, "pos_att_type": None, "pooler_dropout": 0.0, "pooler_hidden_act": "gelu",
        "legacy": True, "tie_word_embeddings": True,
    },
    "gpt2": {
        "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
        "activation_function": "gelu_new", "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1,
        "layer_norm_epsilon": 1e-05, "initializer_range": 0.02, "summary_type": "cls_index",
        "summary_use_proj": True, "summary_activation": None, "summary_proj_to_labels": True,
        "summary_first_dropout": 0.1, "scale_attn_weights": True, "use_cache": True, "bos_token_id": 50256,
        "eos_token_id": 50256, "pad_token_id": None, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "add_cross_attention": False, "tie_word_embeddings": True,
    },
    "t5": {
        "vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": None,
        "num_heads": 8, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "dropout_rate": 0.1, "layer_norm_epsilon": 1e-06, "initializer_factor": 1.0, "feed_forward_proj": "relu",
        "is_encoder_decoder": True, "use_cache": True, "pad_token_id": 0, "eos_token_id": 1,
        "classifier_dropout": 0.0, "is_decoder": False, "tie_word_embeddings": True, "scale_decoder_outputs": None,
    },
    # BartConfig (three labels unless id2label or num_labels says otherwise)
    "bart": {
        "vocab_size": 50265, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
        "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096, "decoder_attention_heads": 16,
        "encoder_layerdrop": 0.0, "decoder_layerdrop": 0.0, "activation_function": "gelu", "d_model": 1024,
        "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0, "init_std": 0.02,
        "classifier_dropout": 0.0, "scale_embedding": False, "use_cache": True, "pad_token_id": 1, "bos_token_id": 0,
        "eos_token_id": 2, "is_encoder_decoder": True, "decoder_start_token_id": 2, "forced_eos_token_id": 2,
        "is_decoder": False, "tie_word_embeddings": True,
    },
    # MT5Config: no scale_decoder_outputs (MT5ForConditionalGeneration never scales)
    "mt5": {
        "vocab_size": 250112, "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_decoder_layers": None,
        "num_heads": 6, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "dropout_rate": 0.1, "layer_norm_epsilon": 1e-06, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True, "use_cache": True, "tie_word_embeddings": True, "bos_token_id": None,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0, "classifier_dropout": 0.0,
        "is_decoder": False,
    },
    "umt5": {
        "vocab_size": 250112, "d_model": 512, "d_kv": 64, "d_ff": 1024, "num_layers": 8, "num_decoder_layers": None,
        "num_heads": 6, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
        "dropout_rate": 0.1, "layer_norm_epsilon": 1e-06, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
        "is_encoder_decoder": True, "use_cache": True, "pad_token_id": 0, "eos_token_id": 1,
        "decoder_start_token_id": 0, "classifier_dropout": 0.0, "is_decoder": False, "tie_word_embeddings": True,
        "scale_decoder_outputs": None,
    },
}

FAMILY_DEFAULTS["mbart"] = {**FAMILY_DEFAULTS["bart"], "decoder_start_token_id": None}  # MBartConfig
# MarianConfig (Helsinki-NLP's opus-mt) and PegasusConfig: BART's fields without bos, classifier_dropout
_BART_LIKE = {k: v for k, v in FAMILY_DEFAULTS["bart"].items() if k not in ("bos_token_id", "classifier_dropout")}
FAMILY_DEFAULTS["marian"] = {**_BART_LIKE, "vocab_size": 58101, "decoder_vocab_size": None, "bos_token_id": None,
                             "decoder_start_token_id": 58100, "pad_token_id": 58100, "eos_token_id": 0,
                             "forced_eos_token_id": 0, "share_encoder_decoder_embeddings": True}
# M2M100Config (NLLB-200's too): no forced_eos_token_id
FAMILY_DEFAULTS["m2m_100"] = {**{k: v for k, v in _BART_LIKE.items() if k != "forced_eos_token_id"},
                              "vocab_size": 128112, "encoder_layerdrop": 0.05, "decoder_layerdrop": 0.05,
                              "activation_function": "relu", "attention_dropout": 0.1, "scale_embedding": True,
                              "bos_token_id": 0, "decoder_start_token_id": 2}
FAMILY_DEFAULTS["pegasus"] = {**_BART_LIKE, "vocab_size": 50265, "decoder_start_token_id": 0, "pad_token_id": 0,
                              "eos_token_id": 1, "forced_eos_token_id": 1}
# MPNetConfig
FAMILY_DEFAULTS["mpnet"] = {
    "vocab_size": 30527, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    "relative_attention_num_buckets": 32, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
    "tie_word_embeddings": True,
}
FAMILY_DEFAULTS["xlm-roberta"] = {**FAMILY_DEFAULTS["roberta"], "vocab_size": 30522}
FAMILY_DEFAULTS["camembert"] = {**FAMILY_DEFAULTS["roberta"], "vocab_size": 30522}
# VaultGemmaConfig: Gemma2Config's fields but use_bidirectional_attention
FAMILY_DEFAULTS["vaultgemma"] = {k: v for k, v in FAMILY_DEFAULTS["gemma2"].items()
                                 if k != "use_bidirectional_attention"}

FAMILY_DEFAULTS["falcon_mamba"] = {**FAMILY_DEFAULTS["mamba"], "mixer_rms_eps": 1e-06}

# transformers' older layer-kind names (``remap_legacy_layer_types``), as the hybrid configs read them
LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}

# other names for fields (transformers' ``attribute_map``)
# DebertaConfig (v1): DeBERTa-v2's fields (no buckets, convolution or shared keys), deberta-base's sizes
FAMILY_DEFAULTS["glm4"] = {**FAMILY_DEFAULTS["glm"]}
FAMILY_DEFAULTS["deberta"] = {**FAMILY_DEFAULTS["deberta-v2"], "vocab_size": 50265, "hidden_size": 768,
                              "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}

ATTRIBUTE_MAPS: dict[str, dict[str, str]] = {
    "mixtral": {"num_experts": "num_local_experts"},
    "qwen3_moe": {"num_experts": "num_local_experts"},
    "gpt_oss": {"num_experts": "num_local_experts"},
    "olmoe": {"num_local_experts": "num_experts"},
    "flex_olmo": {"num_local_experts": "num_experts"},
    "deepseek_v3": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "glm4_moe": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "glm4_moe_lite": {"num_local_experts": "n_routed_experts", "head_dim": "qk_rope_head_dim"},
    "mistral4": {"num_local_experts": "n_routed_experts"},
    "deepseek_v2": {"num_experts": "n_routed_experts"},
    "lfm2": {"tie_embedding": "tie_word_embeddings", "block_ff_dim": "intermediate_size"},
    "hunyuan_v1_moe": {"num_experts_per_tok": "moe_topk", "num_local_experts": "num_experts"},
    "granitemoehybrid": {"layers_block_type": "layer_types"},
    "zamba": {"layer_types": "layers_block_type", "head_dim": "attention_head_dim"},
    "zamba2": {"layer_types": "layers_block_type", "head_dim": "attention_head_dim"},
    "lfm2_moe": {"tie_embedding": "tie_word_embeddings"},
    "nemotron_h": {"layer_types": "layers_block_type", "num_local_experts": "n_routed_experts",
                   "mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
                   "mamba_dt_min": "time_step_min", "mamba_dt_max": "time_step_max",
                   "mamba_dt_limit": "time_step_limit", "mamba_dt_init_floor": "time_step_floor",
                   "mamba_conv_bias": "use_conv_bias", "mamba_chunk_size": "chunk_size"},
    "ernie4_5_moe": {"num_experts": "moe_num_experts", "num_experts_per_tok": "moe_k",
                     "num_mtp_layers": "num_nextn_predict_layers"},
    "gpt2": {"hidden_size": "n_embd", "max_position_embeddings": "n_positions", "num_attention_heads": "n_head",
             "num_hidden_layers": "n_layer"},
    "t5": {"hidden_size": "d_model", "num_attention_heads": "num_heads", "num_hidden_layers": "num_layers",
           "head_dim": "d_kv"},
    "distilbert": {"hidden_size": "dim", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers"},
}
ATTRIBUTE_MAPS["mt5"] = ATTRIBUTE_MAPS["umt5"] = ATTRIBUTE_MAPS["t5"]
ATTRIBUTE_MAPS["bart"] = ATTRIBUTE_MAPS["mbart"] = {"num_attention_heads": "encoder_attention_heads",
                                                    "hidden_size": "d_model", "num_hidden_layers": "encoder_layers"}
ATTRIBUTE_MAPS["marian"] = ATTRIBUTE_MAPS["pegasus"] = ATTRIBUTE_MAPS["m2m_100"] = ATTRIBUTE_MAPS["bart"]
ATTRIBUTE_MAPS["gpt_neox"] = {"rotary_pct": "partial_rotary_factor", "rotary_emb_base": "rope_theta"}
ATTRIBUTE_MAPS["bloom"] = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head"}
ATTRIBUTE_MAPS["gptj"] = ATTRIBUTE_MAPS["gpt_bigcode"] = {**ATTRIBUTE_MAPS["gpt2"]}
ATTRIBUTE_MAPS["mpt"] = {"num_attention_heads": "n_heads", "hidden_size": "d_model", "num_hidden_layers": "n_layers"}
ATTRIBUTE_MAPS["internlm3"] = {"qkv_bias": "attention_bias", "bias": "mlp_bias"}
ATTRIBUTE_MAPS["gpt_neo"] = {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}

# the number of labels a config without id2label or num_labels has (transformers' default: 2)
DEFAULT_NUM_LABELS = {"bart": 3}

# fields a config.json may carry that no default lists: RoPE settings, generation leftovers, ...
OPEN_FIELDS = ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor", "rope_local_base_freq",
               "global_rope_theta", "local_rope_theta", "global_attn_every_n_layers",
               "sliding_window_pattern", "transformers_version",
               "torch_dtype", "id2label", "label2id", "num_labels", "decoder_start_token_id")


class ModelConfig:
    """A model's config: ``config.json``'s fields over its family's transformers defaults.

    Reads like a transformers ``PretrainedConfig`` (attributes, ``num_labels``, ``id2label``,
    ``to_dict``, ``to_json_string``), but it is a plain object: building one imports nothing.

    >>> config = ModelConfig("gpt2", n_embd=16, n_layer=2)
    >>> config.hidden_size, config.num_hidden_layers, config.num_labels
    (16, 2, 2)
    """

    def __init__(self, model_type: str, **fields):
        if model_type not in FAMILY_DEFAULTS:
            raise ValueError(f"model_type {model_type!r} is not supported; supported: {sorted(FAMILY_DEFAULTS)}")
        object.__setattr__(self, "model_type", model_type)
        values = {**COMMON_DEFAULTS, **copy.deepcopy(FAMILY_DEFAULTS[model_type])}
        num_labels = fields.pop("num_labels", None)
        id2label = fields.pop("id2label", None)
        fields.pop("model_type", None)
        for name, value in fields.items():
            values[ATTRIBUTE_MAPS.get(model_type, {}).get(name, name)] = value
        values.setdefault("label2id", None)  # as transformers 5: None when only id2label is given
        self.__dict__.update(values)
        if id2label is not None:
            self.id2label = {int(k): v for k, v in id2label.items()}
        if not hasattr(self, "id2label") or num_labels is not None and len(self.id2label) != num_labels:
            self.num_labels = DEFAULT_NUM_LABELS.get(model_type, 2) if num_labels is None else num_labels
        self._derive()

    def _derive(self) -> None:
        """What the family's transformers ``__init__`` computes from the other fields."""
        t = self.model_type
        if t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "olmo", "olmo2", "olmo3", "olmoe", "smollm3",
                 "granite", "seed_oss", "glm", "glm4", "ernie4_5", "ministral", "ministral3", "arcee", "helium",
                 "internlm3", "hunyuan_v1_dense", "hunyuan_v1_moe", "deepseek_v2", "granitemoeshared",
                 "granitemoehybrid", "phimoe", "flex_olmo"):
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if t in ("llama", "mistral", "seed_oss", "glm", "glm4", "ernie4_5", "ministral3", "arcee", "helium",
                     "internlm3") and self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
        if t == "nemotron" and self.head_dim is None:  # NemotronConfig.__post_init__ (no key/value heads derived)
            self.head_dim = self.hidden_size // self.num_attention_heads
        if t == "zamba":  # ZambaConfig.__post_init__: its derived sizes where the file leaves them out
            h = self.hidden_size
            self.attention_hidden_size = self.attention_hidden_size or 2 * h
            self.attention_head_dim = self.attention_head_dim or 2 * h // self.num_attention_heads
            if self.mamba_dt_rank == "auto":
                self.mamba_dt_rank = math.ceil(h / 16)
            if self.layers_block_type is None:
                self.layers_block_type = ["linear_attention", "linear_attention", "hybrid"] + [
                    "hybrid" if i % self.attn_layer_period == self.attn_layer_offset else "linear_attention"
                    for i in range(self.num_hidden_layers - 3)]
            self.layers_block_type = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in self.layers_block_type]
        if t == "zamba2":  # Zamba2Config.__post_init__: its derived sizes (a file's own values recomputed)
            h, heads = self.hidden_size, self.num_attention_heads
            self.intermediate_size = self.intermediate_size or 4 * h
            self.attention_hidden_size = 2 * h
            self.attention_head_dim = 2 * h // heads
            self.mamba_headdim = int(self.mamba_expand * h) // self.n_mamba_heads
            if self.use_long_context:
                self.max_position_embeddings = 16384
            if self.num_key_value_heads is None:
                self.num_key_value_heads = heads
            self.kv_channels, self.num_query_groups = h // heads, heads
            if self.layers_block_type is None:
                self.layers_block_type = (["linear_attention"] + (["linear_attention"] * 5 + ["hybrid"]) * 7
                                          + ["linear_attention"] * 4 + ["hybrid"] + ["linear_attention"] * 3
                                          + ["hybrid"] + ["linear_attention"] * 2)
            self.layers_block_type = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in self.layers_block_type]
            self.hybrid_layer_ids = [i for i, kind in enumerate(self.layers_block_type) if kind == "hybrid"]
        if t == "mpt":  # MptConfig.__post_init__ makes attn_config an MptAttentionConfig: its fields, defaults filled
            defaults = FAMILY_DEFAULTS["mpt"]["attn_config"]
            given = self.attn_config or {}
            given = given if isinstance(given, dict) else given.to_dict()  # an MptAttentionConfig
            self.attn_config = {k: given.get(k, v) for k, v in defaults.items()}
        if t == "exaone4":  # Exaone4Config.__post_init__
            if self.sliding_window is None:
                self.sliding_window_pattern = 0
            if self.layer_types is None:
                from peftjax.models._exaone4 import exaone4_layer_types

                self.layer_types = exaone4_layer_types(self)
        if t == "apertus":  # ApertusConfig.__post_init__
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if self.__dict__.get("rope_parameters") is None and self.__dict__.get("rope_scaling") is None:
                self.rope_parameters = {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                                        "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0}
        if t == "ministral" and self.layer_types is None:  # MinistralConfig.__post_init__
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        if t == "ministral3" and self.__dict__.get("rope_parameters") is None:  # Ministral3Config.__post_init__
            self.rope_parameters = {
                "type": "yarn", "rope_theta": 1000000.0, "factor": 16.0, "original_max_position_embeddings": 16384,
                "max_position_embeddings": self.max_position_embeddings, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
        if t == "marian" and self.decoder_vocab_size is None:  # MarianConfig.__post_init__
            self.decoder_vocab_size = self.vocab_size
        if t in ("t5", "mt5", "umt5"):  # T5Config.__post_init__ (MT5Config's, UMT5Config's)
            if self.num_decoder_layers is None:
                self.num_decoder_layers = self.num_layers
            act = self.feed_forward_proj.split("-")
            self.dense_act_fn = "gelu_new" if self.feed_forward_proj == "gated-gelu" else act[-1]
            self.is_gated_act = act[0] == "gated"
            if t != "mt5" and self.scale_decoder_outputs is None:  # v1.0 (tied) scales the decoder output, v1.1 does not
                self.scale_decoder_outputs = self.tie_word_embeddings is not False
            self.tie_word_embeddings = True
        if t == "gpt_oss":  # GptOssConfig.__post_init__: even layers slide; YaRN by default
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            if self.layer_types is None:
                self.layer_types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                    for i in range(self.num_hidden_layers)]
            if self.__dict__.get("rope_parameters") is None and self.__dict__.get("rope_scaling") is None:
                self.rope_parameters = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "truncate": False, "original_max_position_embeddings": 4096}
        if t == "ernie4_5_moe" and self.moe_layer_end_index == -1:  # Ernie4_5_MoeConfig.__post_init__
            self.moe_layer_end_index = self.num_hidden_layers - 1
        if t == "lfm2" and self.layer_types is None:  # Lfm2Config.__post_init__
            if self.full_attn_idxs is None:
                self.full_attn_idxs = list(range(self.num_hidden_layers))
            self.layer_types = ["full_attention" if i in self.full_attn_idxs else "conv"
                                for i in range(self.num_hidden_layers)]
        if t == "jamba":  # JambaConfig.__post_init__
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if self.mamba_dt_rank == "auto":
                self.mamba_dt_rank = -(-self.hidden_size // 16)
        if t in ("granitemoehybrid", "bamba", "falcon_h1"):  # their __post_init__: the Mamba-2 head size, the limit
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if self.mamba_d_head == "auto":  # the width (Falcon-H1's own mamba_d_ssm where given) over the heads
                d_ssm = self.mamba_d_ssm if t == "falcon_h1" else None
                width = self.mamba_expand * self.hidden_size if d_ssm is None else d_ssm
                self.mamba_d_head = width // self.mamba_n_heads
            if self.time_step_limit is not None:
                self.time_step_limit = tuple(self.time_step_limit)
        if t == "falcon_h1":  # FalconH1Config.__post_init__
            if self.mlp_multipliers is None:
                self.mlp_multipliers = [1.0, 1.0]
            if self.ssm_multipliers is None:
                self.ssm_multipliers = [1.0, 1.0, 1.0, 1.0, 1.0]
        if t == "bamba":  # BambaConfig.__post_init__: its RoPE's partial factor fixed at 0.5
            self.partial_rotary_factor = 0.5
        if t == "granitemoehybrid":  # transformers' legacy layer names
            self.layer_types = ([LEGACY_LAYER_TYPES.get(kind, kind) for kind in self.layer_types]
                                if self.layer_types is not None else ["linear_attention"] * self.num_hidden_layers)
        if t in ("mamba", "falcon_mamba"):  # MambaConfig.__post_init__
            self.intermediate_size = int(self.expand * self.hidden_size)
            if self.time_step_rank == "auto":
                self.time_step_rank = -(-self.hidden_size // 16)
        if t == "nemotron_h":  # NemotronHConfig.__post_init__: the Hub's pattern, legacy names; the layers' count
            pattern = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
            override = self.__dict__.pop("hybrid_override_pattern", None)
            mtp_override = self.__dict__.pop("mtp_hybrid_override_pattern", None)
            if self.layers_block_type is None:
                self.layers_block_type = ([pattern[c] for c in override] if override is not None
                                          else ["linear_attention", "moe", "full_attention", "mlp"])
            self.layers_block_type = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in self.layers_block_type]
            if self.mtp_layers_block_type is None:
                self.mtp_layers_block_type = ([pattern[c] for c in mtp_override] if mtp_override is not None
                                              else ["full_attention", "moe"])
            self.mtp_layers_block_type = [LEGACY_LAYER_TYPES.get(kind, kind) for kind in self.mtp_layers_block_type]
            self.num_hidden_layers = len(self.layers_block_type)  # a property in transformers: the file's is ignored
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
        if t == "deepseek_v2":  # DeepseekV2Config.__post_init__ (its key/value heads as LlamaConfig's, above)
            self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            self.head_dim = self.qk_rope_head_dim
        if t == "deepseek_v3":  # DeepseekV3Config.__post_init__; a file's own values (no fields) come after
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            self.__dict__.setdefault("qk_head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)
            self.__dict__.setdefault("head_dim", self.qk_rope_head_dim)
        if t == "glm4_moe_lite":  # Glm4MoeLiteConfig.__post_init__: the first layer dense, then sparse
            if self.mlp_layer_types is None:
                self.mlp_layer_types = ["dense"] + ["sparse"] * (self.num_hidden_layers - 1)
            self.__dict__.setdefault("qk_head_dim", self.qk_nope_head_dim + self.qk_rope_head_dim)
        if t == "mistral4":  # Mistral4Config.__post_init__: YaRN by default, RoPE on the heads' rotary part
            if self.__dict__.get("rope_parameters") is None:
                self.rope_parameters = {
                    "type": "yarn", "rope_theta": 10000.0, "factor": 128.0, "original_max_position_embeddings": 8192,
                    "max_position_embeddings": self.max_position_embeddings, "beta_fast": 32.0, "beta_slow": 1.0,
                    "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1,
                    "partial_rotary_factor": self.qk_rope_head_dim / (self.qk_nope_head_dim + self.qk_rope_head_dim)}
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            self.rope_parameters.setdefault("partial_rotary_factor", self.qk_rope_head_dim / qk)
            self.__dict__.setdefault("qk_head_dim", qk)
            self.__dict__.setdefault("head_dim", qk)
        if t in ("qwen2_moe", "qwen3_moe", "qwen3_next") and self.mlp_only_layers is None:
            self.mlp_only_layers = []
        if t == "qwen2_moe":  # Qwen2MoeConfig.__post_init__: even layers below max_window_layers slide
            if not self.use_sliding_window:
                self.sliding_window = 0
            if self.layer_types is None:
                self.layer_types = [
                    "sliding_attention" if (i + 1) % 2 and i < self.max_window_layers and self.use_sliding_window
                    else "full_attention" for i in range(self.num_hidden_layers)
                ]
        if t == "qwen3_moe" and not self.use_sliding_window:  # Qwen3MoeConfig: one window for every layer, or none
            self.sliding_window = None
        if t in ("qwen2", "qwen3"):
            if not self.use_sliding_window:
                self.sliding_window = None
            if self.layer_types is None:
                self.layer_types = [
                    "sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                    else "full_attention" for i in range(self.num_hidden_layers)
                ]
        if t in ("qwen3_5_text", "qwen3_5_moe_text", "qwen3_next"):  # Qwen3_5TextConfig.__post_init__ (and alike)
            interval = self.__dict__.pop("full_attention_interval", 4)  # an argument, not a field
            if self.layer_types is None:
                self.layer_types = ["linear_attention" if (i + 1) % interval else "full_attention"
                                    for i in range(self.num_hidden_layers)]
            if self.__dict__.get("partial_rotary_factor") is None and "partial_rotary_factor" not in (
                    self.__dict__.get("rope_parameters") or {}):
                self.partial_rotary_factor = 0.25
        if t == "gemma" and self.hidden_act == "gelu":  # GemmaConfig: the releases' "gelu" means the tanh one
            self.hidden_act = "gelu_pytorch_tanh"
        if t in ("deberta-v2", "deberta"):  # Deberta(V2)Config.__post_init__: "p2c|c2p" strings, the pooler
            if isinstance(self.pos_att_type, str):
                self.pos_att_type = [x.strip() for x in self.pos_att_type.lower().split("|")]
            self.__dict__.setdefault("pooler_hidden_size", self.hidden_size)
        if t == "modernbert" and self.layer_types is None:  # ModernBertConfig.__post_init__
            every = self.__dict__.get("global_attn_every_n_layers", 3)
            self.layer_types = ["sliding_attention" if i % every else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if t == "olmo3" and self.layer_types is None:  # Olmo3Config: three sliding layers, then a global one
            self.layer_types = ["sliding_attention" if (i + 1) % 4 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if t == "gptj" and self.rotary_dim:  # GPT-J rotates the first rotary_dim dims of each head
            self.__dict__.setdefault("partial_rotary_factor", self.rotary_dim / (self.n_embd // self.n_head))
        if t == "falcon":  # FalconConfig.__post_init__
            if self.num_kv_heads is None:
                self.num_kv_heads = self.num_attention_heads
            self.num_key_value_heads = (self.num_kv_heads if self.new_decoder_architecture or not self.multi_query
                                        else 1)
            if self.ffn_hidden_size is None:
                self.ffn_hidden_size = 4 * self.hidden_size
        if t == "gpt_neo" and self.attention_layers is None:  # GPTNeoConfig: the pattern times its repeats
            from peftjax.models._gpt_neo import attention_layers

            self.attention_layers = attention_layers(self.attention_types)
        if t == "gpt_bigcode":  # GPTBigCodeConfig: one key/value head with multi-query attention
            self.num_key_value_heads = 1 if self.multi_query else self.n_head
        if t == "opt" and self.word_embed_proj_dim is None:  # OPTConfig.__post_init__
            self.word_embed_proj_dim = self.hidden_size
        if t in ("phi", "gpt_neox", "stablelm"):  # RoPE on half (Phi) or a quarter of each head unless the file says
            if self.__dict__.get("partial_rotary_factor") is None and "partial_rotary_factor" not in (
                    self.__dict__.get("rope_parameters") or {}):
                self.partial_rotary_factor = 0.5 if t == "phi" else 0.25
        if t in ("cohere", "cohere2", "phi") and self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if t == "cohere2":  # Cohere2Config.__post_init__: the head size from the sizes; every 4th layer global
            if self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            pattern = self.__dict__.pop("sliding_window_pattern", 4)  # an argument (old files), not a field
            if self.layer_types is None:
                self.layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                    for i in range(self.num_hidden_layers)]
        if t == "smollm3":  # SmolLM3Config: every no_rope_layer_interval-th layer without RoPE (0), sliding if set
            if self.no_rope_layers is None:
                self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0)
                                       for i in range(self.num_hidden_layers)]
            if self.layer_types is None:
                self.layer_types = [
                    "sliding_attention" if self.use_sliding_window and self.sliding_window is not None
                    and not self.no_rope_layers[i] else "full_attention" for i in range(self.num_hidden_layers)
                ]
        if t == "gemma3_text" and "sliding_window_pattern" in self.__dict__:  # transformers 4's name
            self._sliding_window_pattern = self.__dict__["sliding_window_pattern"]
        if t in ("gemma2", "vaultgemma", "gemma3_text") and self.layer_types is None:
            every = 2 if t in ("gemma2", "vaultgemma") else self._sliding_window_pattern
            self.layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if t == "gemma4_text":
            self._derive_gemma4()
        if t == "gemma3n_text":  # Gemma3nTextConfig.__post_init__
            n = self.num_hidden_layers
            if not isinstance(self.intermediate_size, (list, tuple)):
                self.intermediate_size = [self.intermediate_size] * n
            if self.layer_types is None:
                self.layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
            if self.activation_sparsity_pattern is None:
                sparse = 10 if n > 10 else 0
                self.activation_sparsity_pattern = [0.95] * sparse + [0.0] * (n - sparse)
        if t == "llama4_text":  # Llama4TextConfig.__post_init__
            if self.num_key_value_heads is None:
                self.num_key_value_heads = self.num_attention_heads
            if self.head_dim is None:
                self.head_dim = self.hidden_size // self.num_attention_heads
            if not self.no_rope_layers:  # every no_rope_layer_interval-th layer without RoPE (0)
                self.no_rope_layers = [int((i + 1) % self.no_rope_layer_interval != 0)
                                       for i in range(self.num_hidden_layers)]
            if self.moe_layers is None:
                step = self.interleave_moe_layer_step
                self.moe_layers = list(range(step - 1, self.num_hidden_layers, step))
            if self.layer_types is None:
                self.layer_types = ["chunked_attention" if rope and self.attention_chunk_size is not None
                                    else "full_attention" for rope in self.no_rope_layers]

    def _derive_gemma4(self) -> None:
        """Gemma4TextConfig.__post_init__: five sliding layers then a global one, the last one global;
        a RoPE per layer type; the global layers' head size (``global_head_dim``) and, with
        ``attention_k_eq_v``, key/value heads (``num_global_key_value_heads``) as ``per_layer_config``
        (``{layer index: overrides}``), unless the file gives that table itself."""
        if self.layer_types is None:
            self.layer_types = ["sliding_attention" if (i + 1) % 6 else "full_attention"
                                for i in range(self.num_hidden_layers)]
        if self.layer_types:
            self.layer_types = [*self.layer_types[:-1], "full_attention"]
        if self.__dict__.get("rope_parameters") is None:
            self.rope_parameters = {
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0}}
        global_head_dim = self.__dict__.pop("global_head_dim", 512)
        global_kv_heads = self.__dict__.pop("num_global_key_value_heads", None)
        table = self.__dict__.get("per_layer_config")
        if table is None:
            overrides = {"head_dim": global_head_dim}
            if global_kv_heads is not None and self.attention_k_eq_v:
                overrides["num_key_value_heads"] = global_kv_heads
            table = {i: dict(overrides) for i, t in enumerate(self.layer_types) if t == "full_attention"}
        # as transformers keeps them: by layer index (a string key, as JSON has it), without the
        # overrides equal to the global value
        kept = {}
        for i, layer in table.items():
            layer = {k: v for k, v in layer.items() if self.__dict__.get(k, object()) != v}
            if layer:
                kept[str(int(i))] = layer
        self.per_layer_config = kept

    # ---------------------------------------------------------------- PretrainedConfig's surface

    def __getattr__(self, name: str):  # only for names not in __dict__: the attribute map
        target = ATTRIBUTE_MAPS.get(self.__dict__.get("model_type"), {}).get(name)
        if target is None:
            raise AttributeError(f"{type(self).__name__} ({self.__dict__.get('model_type')}) has no field {name!r}")
        return self.__dict__[target]

    def __setattr__(self, name: str, value) -> None:
        if name == "num_labels":
            if getattr(self, "id2label", None) is None or len(self.id2label) != value:
                self.__dict__["id2label"] = {i: f"LABEL_{i}" for i in range(value)}
                self.__dict__["label2id"] = {f"LABEL_{i}": i for i in range(value)}
            return
        self.__dict__[ATTRIBUTE_MAPS.get(self.model_type, {}).get(name, name)] = value

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def has_field(self, name: str) -> bool:
        """Whether ``name`` is a field of this family's config (what an override may set)."""
        return (name in self.__dict__ or name in ATTRIBUTE_MAPS.get(self.model_type, {}) or name in OPEN_FIELDS)

    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items()}
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        return out

    def to_json_string(self) -> str:
        """The fields as JSON, infinities and NaNs tagged as transformers writes them (``{"__float__":
        "Infinity"}``: plain JSON has no such numbers)."""
        return json.dumps(_tag_floats(self.to_dict()), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        values = dict(values)
        return cls(values.pop("model_type", None), **values)

    def __eq__(self, other) -> bool:
        return isinstance(other, ModelConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, as PretrainedConfig

    def __repr__(self) -> str:
        return f"ModelConfig {self.to_json_string()}"


# transformers' JSON tags for the floats plain JSON cannot hold (a Mamba-2 config's unbounded time_step_limit)
_FLOAT_TAGS = {"Infinity": float("inf"), "-Infinity": float("-inf"), "NaN": float("nan")}


def _tag_floats(value):
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return {"__float__": "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"}
    if isinstance(value, Mapping):
        return {k: _tag_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag_floats(v) for v in value]
    return value


def _untag_floats(value):
    if isinstance(value, Mapping):
        if set(value) == {"__float__"} and value["__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[value["__float__"]]
        return {k: _untag_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


# vision-language model types whose text model is bundled: their ``text_config`` is read instead,
# as transformers' text classes read it (``base_config_key``)
TEXT_OF_VISION_LANGUAGE = {"qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text", "gemma3": "gemma3_text",
                          "gemma4": "gemma4_text", "llama4": "llama4_text",
                          "gemma3n": "gemma3n_text"}


def read_config(raw: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """A :class:`ModelConfig` from a parsed ``config.json`` (``source`` names it in errors).

    Raises:
      ValueError: not a JSON object, an unsupported ``model_type``, or a vision-language config
        without its ``text_config``.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    raw = _untag_floats(dict(raw))
    model_type = raw.pop("model_type", None)
    if model_type in TEXT_OF_VISION_LANGUAGE:
        text = raw.get("text_config")
        if not isinstance(text, Mapping):
            raise ValueError(f"{source}: a {model_type!r} config needs its text_config (an object) to read the text "
                             f"model; found {type(text).__name__}")
        raw, model_type = dict(text), TEXT_OF_VISION_LANGUAGE[model_type]
        raw.pop("model_type", None)
    if model_type not in FAMILY_DEFAULTS:
        raise ValueError(f"{source}: model_type {model_type!r} is not supported; supported: {sorted(FAMILY_DEFAULTS)}")
    return ModelConfig(model_type, **raw)
