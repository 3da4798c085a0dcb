"""The suite's tiny random Hugging Face models, one config per family, the public train loop, and
a tiny learnable classification set (:func:`classification_data`).

Every test file builds its tiny models from :data:`FAMILIES` through :func:`config` / :func:`arch`;
where a test needs something else (a larger vocabulary, a wider init, a classifier head), it
passes that as a keyword override instead of writing another config::

    _tiny.config("llama")                                   # the suite's tiny Llama
    _tiny.config("gpt2", n_positions=64, initializer_range=0.2)
    _tiny.arch("llama", "LlamaForSequenceClassification", num_labels=3)  # task follows the class

Nothing here imports torch: :attr:`Arch.torch_class` resolves the transformers class when a test
asks for it, so the pure-JAX files can use the configs (with ``models.X.from_config``) without it.

:func:`train` is the loop a user writes from the README's quick start (``peftjax.split``,
``peftjax.make_train_step``, ``peft_model.update``), shared by every test that trains an adapter
and writes it back.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

import jax
import numpy as np
import optax
import pytest

import peftjax

# family -> (transformers config class, the family's usual model class, the config's fields)
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, sliding_window=4)),
    # OLMo in small: parameter-free LayerNorms, projections clamped at 0.05 (below the tiny weights' outputs)
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, clip_qkv=0.05)),
    # OLMoE-1B-7B in small: whole-projection q/k norms, clamped projections, top 2 of 4 experts not renormalised
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=2, clip_qkv=2.0)),
    # FlexOlmo: OLMoE's experts (renormalised top 2 of 4) under OLMo 2's post-norm layers
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, pad_token_id=0,
        eos_token_id=2)),
    # EXAONE 4.0 in small: a sliding RoPE layer (window 4), then a global NoPE one; post-norm layers
    "exaone4": ("Exaone4Config", "Exaone4ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4,
        sliding_window_pattern=2)),
    # Apertus in small: per-head q/k norms, a gate-less xIELU MLP, Llama 3's RoPE
    "apertus": ("ApertusConfig", "ApertusForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0)),
    # Arcee AFM in small: a gate-less ReLU² MLP
    "arcee": ("ArceeConfig", "ArceeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Granite MoE in small: every multiplier away from 1, 4 experts, top 2
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=2.0,
        attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=4.0, pad_token_id=0)),
    # Granite MoE with a shared expert in small: Granite MoE's multipliers and experts, a shared SwiGLU of 20
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=20,
        embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=4.0,
        pad_token_id=0)),
    # Granite 4.0 in small: Mamba-2, attention, Mamba-2 (the Hub's layer names), 4 experts top 2 and the shared
    # expert, every multiplier away from 1, no RoPE (as the releases); Mamba-2 of 4 heads of 16 in 2 groups of
    # state 8, chunks of 4 tokens (so a 9-token batch spans three), biased projections
    "granitemoehybrid": ("GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, shared_intermediate_size=20,
        embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5, logits_scaling=4.0,
        layer_types=["mamba", "attention", "mamba"], position_embedding_type="nope", mamba_n_heads=4,
        mamba_n_groups=2, mamba_d_state=8, mamba_d_head=16, mamba_d_conv=4, mamba_chunk_size=4,
        mamba_proj_bias=True, pad_token_id=0)),
    # Nemotron-H in small, the Hub's pattern: Mamba-2, MoE, attention, MLP, Mamba-2 (4 heads of 16 in 2 groups
    # of state 8, chunks of 4 tokens, biased projections); 8 experts in 4 groups (top 3 within the best 2),
    # latent experts of 24, the shared expert, scaled by 2.5
    "nemotron_h": ("NemotronHConfig", "NemotronHForCausalLM", dict(
        vocab_size=96, hidden_size=32, hybrid_override_pattern="ME*-M", num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=4, use_bias=True, n_routed_experts=8,
        num_experts_per_tok=3, n_group=4, topk_group=2, moe_intermediate_size=16, moe_latent_size=24,
        moe_shared_expert_intermediate_size=20, routed_scaling_factor=2.5, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    # Bamba in small: Mamba-2, attention (RoPE on half of each head), Mamba-2; 4 Mamba-2 heads of 16 in 2 groups of
    # state 8, chunks of 4 tokens; the z-loss on
    "bamba": ("BambaConfig", "BambaForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2,
        mamba_d_state=8, mamba_chunk_size=4, z_loss_coefficient=0.01, pad_token_id=0)),
    # Jamba in small: Mamba, attention, Mamba, attention (period 2 from 1); 4 experts top 2 on layers 0 and 2
    # (period 2 from 0), SwiGLUs on the others; Mamba of 64 channels, state 8, time steps of rank 4
    "jamba": ("JambaConfig", "JambaForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
        expert_layer_offset=0, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4,
        mamba_proj_bias=True, pad_token_id=0)),
    # Falcon-H1 in small: Mamba-2 (a width of its own, mamba_d_ssm, 4 heads of 16 in 2 groups of state 8, chunks of
    # 4 tokens, the gated norm before the gate, biased out_proj) beside the attention in each of 2 layers, every
    # µP multiplier away from 1
    "falcon_h1": ("FalconH1Config", "FalconH1ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=4, mamba_rms_norm=True, mamba_norm_before_gate=True, projectors_bias=True,
        lm_head_multiplier=0.7, embedding_multiplier=1.5, mlp_multipliers=[0.8, 1.2], key_multiplier=0.9,
        attention_out_multiplier=1.1, attention_in_multiplier=0.6, ssm_multipliers=[1.2, 0.7, 0.9, 1.3, 0.5],
        ssm_in_multiplier=1.4, ssm_out_multiplier=0.8, pad_token_id=0)),
    # Mamba in small: three Mamba layers of 64 channels, state 8, time steps of rank 4 (chunks of 64 steps: the
    # selective scan's default, so the tests' rows are one chunk unless they ask for more), the head tied
    "mamba": ("MambaConfig", "MambaForCausalLM", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, state_size=8, time_step_rank=4, use_bias=True,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "falcon_mamba": ("FalconMambaConfig", "FalconMambaForCausalLM", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, state_size=8, time_step_rank=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    # Mamba-2 in small: three Mamba-2 layers (4 heads of 16 in 2 groups of state 8, chunks of 4 tokens), the head tied
    "mamba2": ("Mamba2Config", "Mamba2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=3, num_heads=4, head_dim=16, state_size=8, n_groups=2,
        chunk_size=4, time_step_rank=8, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Nemotron in small: ReLU² MLP, RoPE on half of each head, (1 + weight) LayerNorms, biases
    "nemotron": ("NemotronConfig", "NemotronForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_bias=True)),
    # Helium in small: RoPE on adjacent pairs
    "helium": ("HeliumConfig", "HeliumForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0)),
    # InternLM3 in small: Llama's decoder (transformers builds LlamaForCausalLM), biases on
    "internlm3": ("InternLM3Config", "LlamaForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, qkv_bias=True, bias=True)),
    # Ministral 8B in small: a sliding layer, then a full one (head_dim given: transformers 5.25 derives none)
    "ministral": ("MinistralConfig", "MinistralForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    # Ministral 3 in small: YaRN, the queries scaled from position 8 on (original_max_position_embeddings)
    "ministral3": ("Ministral3Config", "Ministral3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0, max_position_embeddings=256,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.5})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, pad_token_id=0)),
    # a sliding layer then a global one, with a window the suite's 9-token batches cross
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, pad_token_id=0)),
    # VaultGemma: Gemma 2's tiny config (two norms a layer instead of four)
    "vaultgemma": ("VaultGemmaConfig", "VaultGemmaForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, pad_token_id=0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4, pad_token_id=0,
        layer_types=["sliding_attention", "full_attention"])),
    # Gemma 4's text model in small, every branch: sliding layers (window 4) and global ones with a
    # head of their own (16 wide, one key/value head, values from the key projection, half the
    # frequencies rotated), the last two layers reusing the keys of earlier ones (with MLPs twice as
    # wide), per-layer embeddings, top 2 of 4 experts beside each MLP, capped logits
    "gemma4_text": ("Gemma4TextConfig", "Gemma4ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=True,
        sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
        num_kv_shared_layers=2, use_double_wide_mlp=True, hidden_size_per_layer_input=16,
        vocab_size_per_layer_input=96, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=16, final_logit_softcapping=3.0, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                            "rope_theta": 10000.0}})),
    # Gemma 3n's text model in small, every branch: three AltUp streams (the second active), LAuReL of
    # rank 4, sliding layers (window 4) and global ones, the last two layers reading earlier layers' keys,
    # MLPs of two widths, the first two sparse (at 0.95 and 0.6), per-layer embeddings over a table that
    # leaves the vocabulary's last 8 ids out, capped logits
    "gemma3n_text": ("Gemma3nTextConfig", "Gemma3nForCausalLM", dict(
        vocab_size=96, vocab_size_per_layer_input=88, hidden_size=32, intermediate_size=[48, 40, 48, 40],
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2,
        hidden_size_per_layer_input=16, altup_num_inputs=3, altup_active_idx=1, laurel_rank=4,
        activation_sparsity_pattern=[0.95, 0.6, 0.0, 0.0], final_logit_softcapping=3.0, pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0)),
    # Zamba (v1) in small: three hybrid layers sharing one block, Mamba heads of 16 channels, padded rows
    "zamba": ("ZambaConfig", "ZambaForCausalLM", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=6, intermediate_size=40, num_attention_heads=4,
        num_key_value_heads=2, layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"],
        mamba_d_state=8, n_mamba_heads=4, mamba_dt_rank=4, pad_token_id=0)),
    # Zamba2 in small: three hybrid layers over two shared blocks (the third ties to the first), the model's
    # own attention adapters and RoPE on; chunks of 4 so the Mamba-2 scan crosses chunks
    "zamba2": ("Zamba2Config", "Zamba2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=6, intermediate_size=40, num_attention_heads=4,
        layers_block_type=["mamba", "hybrid", "mamba", "hybrid", "mamba", "hybrid"], mamba_d_state=8,
        n_mamba_heads=4, mamba_ngroups=2, num_mem_blocks=2, use_shared_attention_adapter=True, adapter_rank=4,
        use_mem_rope=True, chunk_size=4, pad_token_id=0)),
    # MPT in small: 6 heads (not a power of two: MPT's interleaved ALiBi slopes), clipped q/k/v
    "mpt": ("MptConfig", "MptForCausalLM", dict(
        vocab_size=96, d_model=48, n_heads=6, n_layers=2, max_seq_len=64, pad_token_id=0,
        attn_config={"clip_qkv": 0.6})),
    # Phi-3.5-MoE in small: SparseMixer's top 2 of 4, biases, LayerNorms, LongRoPE whose mscale
    # changes past 8 positions (the short factors at every length, as transformers 5.24 computes them)
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, attention_bias=True,
        lm_head_bias=True, max_position_embeddings=64, router_jitter_noise=0.2,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                         "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 4.0, 6.0, 8.0],
                         "short_mscale": 1.1, "long_mscale": 1.3})),
    # Qwen3-30B-A3B's routing (renormalised top k) in small; layer 1 dense, so sparse and dense layers mix
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], pad_token_id=0)),
    # Qwen1.5-MoE's routing (top k not renormalised) with a shared expert; layer 1 dense
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24,
        shared_expert_intermediate_size=20, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1], pad_token_id=0)),
    # DeepSeek-V3 in small: latent attention (a q LoRA, values narrower than keys, interleaved RoPE),
    # a dense layer, then 8 sigmoid-routed experts in 4 groups (top 3 within the best 2) and a shared one
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5, pad_token_id=0)),
    # Hunyuan dense in small: q/k norms after RoPE, the checkpoints' fixed NTK alpha (a base of
    # 10000 * 1000 ** (16 / 14))
    "hunyuan_v1_dense": ("HunYuanDenseV1Config", "HunYuanDenseV1ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0, rope_parameters={
            "rope_type": "dynamic", "factor": 1.0, "alpha": 1000.0, "rope_theta": 10000.0})),
    # Hunyuan MoE in small: Hunyuan dense's attention, 4 experts top 2 (renormalised) and a shared SwiGLU per layer
    "hunyuan_v1_moe": ("HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_experts=4, moe_topk=2, pad_token_id=0, rope_parameters={
            "rope_type": "dynamic", "factor": 1.0, "alpha": 1000.0, "rope_theta": 10000.0})),
    # ERNIE 4.5 MoE in small: a dense layer, then two sparse ones (8 experts, top 3, a shared expert),
    # biases everywhere (use_bias: the LM head's too, so untied)
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, moe_num_experts=8, moe_k=3, moe_num_shared_experts=1,
        use_bias=True, tie_word_embeddings=False, pad_token_id=0)),
    # LFM2 in small: a convolution layer, an attention layer, another convolution (with biases: conv_bias),
    # the SwiGLU's width cut to two thirds and rounded up to 8 (40 -> 26 -> 32)
    "lfm2": ("Lfm2Config", "Lfm2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, full_attn_idxs=[1], conv_bias=True, block_multiple_of=8, pad_token_id=0)),
    # LFM2-MoE in small: a dense first layer, then 4 experts (top 2) by biased sigmoid scores, renormalised and
    # scaled; convolutions and one attention layer
    "lfm2_moe": ("Lfm2MoeConfig", "Lfm2MoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, layer_types=["conv", "full_attention", "conv"],
        num_dense_layers=1, num_experts=4, num_experts_per_tok=2, routed_scaling_factor=1.5, conv_bias=True,
        pad_token_id=0, tie_word_embeddings=False)),
    # DeepSeek-V2 in small: V3's layers above with V2's router, by groups (top 3 within the best 2 of 4
    # groups by their best softmax score, scaled by 2.5, not renormalised), and two shared experts
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3,
        topk_method="group_limited_greedy", n_shared_experts=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        pad_token_id=0)),
    # Mistral 4 in small: DeepSeek-V3's above with softmax routing (top 2 within the best of 2 groups),
    # YaRN on a third of each head, and queries scaled up every 4 positions (Llama 4's scale)
    "mistral4": ("Mistral4Config", "Mistral4ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2,
        n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=1.5, pad_token_id=0,
        max_position_embeddings=16, rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 4,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.5})),
    # Llama 4 text: layer 0 RoPE (llama3 scaling, q/k norm), chunked by 4, dense; layer 1 NoPE, full,
    # temperature-tuned every 2 slots, 4 sigmoid-routed experts (top 2) and a shared one
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=12, intermediate_size_mlp=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        moe_layers=[1], no_rope_layers=[1, 0], attention_chunk_size=4, floor_scale=2, attn_scale=0.5,
        pad_token_id=0, max_position_embeddings=64, rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
    # Granite 3's multipliers in kind (embeddings x12, scores x1/8, branches x0.2, logits /8)
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, embedding_multiplier=12.0, attention_multiplier=0.125,
        residual_multiplier=0.2, logits_scaling=8.0)),
    # q/k norms over whole projections, norms after each branch
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0)),
    # a sliding layer then a global one, each with its own RoPE base
    "olmo3": ("Olmo3Config", "Olmo3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 50.0}})),
    # a RoPE layer, then a layer without RoPE (NoPE) that slides
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, no_rope_layer_interval=2, use_sliding_window=True, sliding_window=4)),
    # Phi-2 in small: parallel blocks, RoPE on half of each head, q/k LayerNorms, biases, a biased LM head
    "phi": ("PhiConfig", "PhiForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, qk_layernorm=True, partial_rotary_factor=0.5)),
    # Falcon-7B in small: multi-query attention, parallel branches on one norm, RoPE, a tied head
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=96, hidden_size=32, ffn_hidden_size=48, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    # GPT-J in small: one LayerNorm, parallel branches, pairwise RoPE on half of each head, a biased LM head
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(
        vocab_size=96, n_embd=32, n_inner=48, n_layer=2, n_head=4, rotary_dim=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2)),
    # StarCoder in small: GPT-2's blocks with multi-query attention, learned positions, a tied head
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(
        vocab_size=96, n_embd=32, n_inner=48, n_layer=2, n_head=4, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)),
    # GPT-Neo in small: a global layer, then a local one (a window of 3 tokens), unscaled scores, learned positions
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
        attention_types=[[["global", "local"], 1]], window_size=3, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # StableLM 2 in small: LayerNorms, RoPE on half of each head, q/k/v biases, a LayerNorm per head of q and k
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.5, use_qkv_bias=True, qk_layernorm=True)),
    # StarCoder2 in small: LayerNorms, biases, a gate-less GELU MLP, a window on every layer, grouped keys
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4)),
    # BLOOM in small: ALiBi, fused per-head q/k/v, the embeddings' LayerNorm, a tied head
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(
        vocab_size=96, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)),
    # OPT in small: learned positions, pre-norm layers, biases, a tied head
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
        dropout=0.0)),
    # Pythia in small: fused per-head q/k/v, parallel residual under two LayerNorms, RoPE on a quarter of each head
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        pad_token_id=0, rotary_pct=0.5)),
    # Command R in small: parallel blocks, pairwise RoPE, per-head q/k norms, logits scaled
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, use_qk_norm=True, logit_scale=0.5)),
    # Command R7B in small: a sliding layer with RoPE (a 3-token window), then a global one without
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, sliding_window=3, layer_types=["sliding_attention", "full_attention"],
        logit_scale=0.5)),
    # GPT-OSS in small: a sliding layer (a 3-token window), then a full one; top 2 of 4 biased experts
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=3,
        pad_token_id=0)),
    # ERNIE 4.5 in small: pairwise RoPE over whole heads, biases on every projection, tied embeddings
    "ernie4_5": ("Ernie4_5Config", "Ernie4_5ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, use_bias=True, pad_token_id=0)),
    # GLM-4 in small: half of each 16-wide head rotated pairwise, biased q/k/v, four norms a layer
    # GLM-4.5 in small: biased q/k/v, q/k norms, RoPE on half of each head (halves turned), a dense
    # layer, then 8 sigmoid-routed experts in 2 groups (top 3 within the best 1) and a shared one
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
        attention_bias=True, use_qk_norm=True, pad_token_id=0)),
    # GLM-4.5 Lite in small: DeepSeek-V3's latent attention (q_proj, interleaved RoPE) and MoE, the
    # layers dense, sparse, dense as mlp_layer_types says (8 experts in 2 groups, top 3 within the best 1)
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=12, qk_rope_head_dim=4,
        qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3,
        n_shared_experts=1, mlp_layer_types=["dense", "sparse", "dense"], routed_scaling_factor=2.5,
        pad_token_id=0)),
    # GLM-4-9B in small: glm4's layers without the norms after each branch
    "glm": ("GlmConfig", "GlmForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=2)),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0, eos_token_id=2)),
    # Seed-OSS in small: q/k/v biases, an output bias too, an explicit head_dim
    "seed_oss": ("SeedOssConfig", "SeedOssForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, attention_out_bias=True, pad_token_id=0)),
    # Qwen3.5's text model in small: a Gated DeltaNet layer (2 key heads serving 4 value heads) then
    # a gated full attention layer (16-wide heads, 4 of them turned by the partial RoPE)
    "qwen3_5_text": ("Qwen3_5TextConfig", "Qwen3_5ForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention"], pad_token_id=0)),
    # its mixture of experts: 4 experts of 12, top 2, a shared expert of 20, in both layers
    "qwen3_5_moe_text": ("Qwen3_5MoeTextConfig", "Qwen3_5MoeForCausalLM", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"], moe_intermediate_size=12,
        shared_expert_intermediate_size=20, num_experts=4, num_experts_per_tok=2, pad_token_id=0)),
    # Qwen3-Next in small: Qwen3.5-MoE's tiny layout with the fused linear projections, 3 layers
    # (linear, full, linear), the last dense (mlp_only_layers), top-2 of 4 experts not renormalised
    "qwen3_next": ("Qwen3NextConfig", "Qwen3NextForCausalLM", dict(
        vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_only_layers=[2], moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, pad_token_id=0)),
    "bert": ("BertConfig", "BertForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=3)),
    # RoBERTa's own checkpoints: one token type, fairseq's padding id 1, 2 + 512 positions (here 40)
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=3, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=3, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5)),
    # ALBERT: embeddings narrower than the layers; 4 steps over 2 groups of 2 shared layers (the releases
    # share one layer: 1 group of 1), so the step -> group -> layer order shows
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", dict(
        vocab_size=96, embedding_size=16, hidden_size=32, num_hidden_layers=4, num_hidden_groups=2,
        inner_group_num=2, num_attention_heads=4, intermediate_size=37, num_labels=3, max_position_embeddings=40)),
    # CamemBERT: RoBERTa's architecture under its own model type and class names
    "camembert": ("CamembertConfig", "CamembertForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        num_labels=3, max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5)),
    # BERT's encoder under DistilBERT's names; a hidden_dim that is no multiple of dim
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", dict(
        vocab_size=96, dim=32, n_layers=2, n_heads=4, hidden_dim=37, pad_token_id=0, num_labels=3)),
    # ELECTRA: embeddings narrower than the layers (embeddings_project between them)
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", dict(
        vocab_size=96, embedding_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=40, num_labels=3)),
    # 40-token rows reach the relative bias's log buckets (distances past 8 of 32 buckets, up to 128)
    "mpnet": ("MPNetConfig", "MPNetForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=3)),
    # DeBERTa-v3's layout (shared keys, a normalised relative table, no absolute positions or token
    # types) with 4 buckets up to 16: distances past 2 fall in log buckets within 11-token rows
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, relative_attention=True, position_buckets=4, max_relative_positions=16,
        pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
        num_labels=3)),
    # DeBERTa (v1), as deberta-base: c2p and p2c relative attention (a table clipped at 6 within 11-token
    # rows), no absolute positions
    "deberta": ("DebertaConfig", "DebertaForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, relative_attention=True, max_relative_positions=6, pos_att_type="c2p|p2c",
        position_biased_input=False, num_labels=3)),
    # a global layer, then local ones reaching 2 tokens either side (local_attention 4)
    "modernbert": ("ModernBertConfig", "ModernBertForSequenceClassification", dict(
        vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        local_attention=4, num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
        sep_token_id=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    # T5 v1.1 in small (gated-gelu, its own lm_head); no dropout
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0)),
    "bart": ("BartConfig", "BartForConditionalGeneration", dict(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0)),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", dict(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0,
        scale_embedding=True, decoder_start_token_id=2)),
    "marian": ("MarianConfig", "MarianMTModel", dict(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0,
        scale_embedding=True, pad_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
    "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", dict(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0,
        attention_dropout=0.0, encoder_layerdrop=0.0, decoder_layerdrop=0.0)),
    "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", dict(
        vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64, dropout=0.0,
        scale_embedding=True)),
}


def fields(family: str, **overrides) -> dict[str, Any]:
    """The family's tiny config fields with ``overrides`` applied (``pad_token_id=None`` unsets
    the family's pad id)."""
    return {**FAMILIES[family][2], **overrides}


def config(family: str, **overrides):
    """The family's tiny ``transformers`` config, with ``overrides`` applied."""
    import transformers

    return getattr(transformers, FAMILIES[family][0])(**fields(family, **overrides))


_TASKS = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
          "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


class Arch(NamedTuple):
    """A tiny model to build: its family, config overrides, transformers class name and task."""

    family: str
    overrides: tuple[tuple[str, Any], ...]
    class_name: str
    task: str

    def config(self):
        return config(self.family, **dict(self.overrides))

    @property
    def torch_class(self):
        """The transformers (PyTorch) class; the test asking for it skips without torch."""
        import transformers

        pytest.importorskip("torch")
        return getattr(transformers, self.class_name)


def arch(family: str, class_name: str | None = None, **overrides) -> Arch:
    """The family's tiny model (``class_name`` defaults to the family's usual head; the task follows it)."""
    class_name = class_name or FAMILIES[family][1]
    task = next((t for suffix, t in _TASKS.items() if class_name.endswith(suffix)), None)
    return Arch(family, tuple(sorted(overrides.items())), class_name, task)


def task_arch(family: str, suffix: str, **overrides) -> Arch:
    """The family's tiny model as its ``suffix`` class (``"ForTokenClassification"``): the usual
    class's name up to ``For`` (GPT-2's ``GPT2LMHeadModel``: ``GPT2``) plus ``suffix``."""
    name = FAMILIES[family][1]
    stem = name[: -len("LMHeadModel")] if name.endswith("LMHeadModel") else name.split("For")[0]
    return arch(family, stem + suffix, **overrides)


def save(spec: Arch | str, directory, seed: int = 0, **save_kwargs):
    """Builds the torch model of ``spec`` (an :class:`Arch` or a family name) with a fixed seed, in
    eval mode, saves it to ``directory`` and returns it (needs torch)."""
    from _torch_models import save_tiny

    spec = arch(spec) if isinstance(spec, str) else spec
    return save_tiny(spec.torch_class, spec.config(), directory, seed=seed, **save_kwargs)


# ---------------------------------------------------------------- the public train-and-write-back loop


class Trained(NamedTuple):
    losses: list[float]
    adapters: Any  # the step's last output (written back into the model unless write_back=False)
    opt_state: Any
    donated: Any  # the adapter state first handed to the step: its buffers are gone


def train(peft_model, batch: dict, steps: int = 5, optimizer: optax.GradientTransformation | None = None,
          dropout: bool = True, write_back: bool = True) -> Trained:
    """Trains ``peft_model``'s adapters for ``steps`` through the public functional core, the README's
    quick start: ``peftjax.split`` -> ``peftjax.make_train_step`` -> ``peft_model.update``.

    ``dropout``: step ``i`` gets the key ``jax.random.key(i)``, which drives dropout; ``False`` passes
    ``None`` (no dropout). ``write_back=False`` leaves the trained adapters out of the model (whose
    own adapter buffers were then donated to the step).
    """
    graphdef, adapters, base = peftjax.split(peft_model.base_model)
    optimizer = optimizer if optimizer is not None else optax.adam(1e-2)
    opt_state = optimizer.init(adapters)
    step = peftjax.make_train_step(graphdef, optimizer)
    donated, losses = adapters, []
    for i in range(steps):
        adapters, opt_state, loss = step(adapters, opt_state, base, batch, jax.random.key(i) if dropout else None)
        losses.append(float(loss))
    if write_back:
        peft_model.update(adapters)
    return Trained(losses, adapters, opt_state, donated)


def batch(ids, mask=None, task: str = "CAUSAL_LM", labels=(0, 2)) -> dict:
    """A training batch for ``task``: a causal LM's labels are the ids, padded positions ignored (-100);
    a sequence classifier's are ``labels``, one per row; a token classifier's each id's remainder by
    3; a question-answering model's answer spans ``labels`` and ``labels`` reversed, as start and
    end positions."""
    ids = np.asarray(ids)
    mask = np.ones_like(ids) if mask is None else np.asarray(mask)
    if task == "SEQ_CLS":
        return {"input_ids": ids, "attention_mask": mask, "labels": np.asarray(labels)}
    if task == "TOKEN_CLS":
        return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids % 3, -100)}
    if task == "QUESTION_ANS":
        spans = np.sort(np.stack([np.asarray(labels), np.asarray(labels)[::-1]]), axis=0)
        return {"input_ids": ids, "attention_mask": mask, "start_positions": spans[0], "end_positions": spans[1]}
    return {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}


def assert_the_trainer_learns(model, output_dir, *, data=None) -> peftjax.Trainer:
    """``peftjax.Trainer`` on ``model`` (4 epochs of :func:`classification_data` (64), batch 16,
    a loss logged each step) writing to ``output_dir``: the last four losses' mean below the first
    four's. Returns the trainer."""
    args = peftjax.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=16, num_train_epochs=4,
                                     learning_rate=5e-3, logging_steps=1, report_to="none", disable_tqdm=True,
                                     plot=False)
    trainer = peftjax.Trainer(model, args, classification_data(64) if data is None else data)
    trainer.train()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]), losses
    return trainer


# ---------------------------------------------------------------- data


def classification_data(n=96, seed=0):
    """Rows whose label is whether token 7 occurs: learnable by a tiny BERT with LoRA."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        length = int(rng.integers(4, 12))
        row = rng.integers(10, 60, length)
        label = int(rng.integers(0, 2))
        if label:
            row[rng.integers(1, length)] = 7
        ids.append([1, *row.tolist()])
        labels.append(label)
    return {"input_ids": ids, "label": labels}
