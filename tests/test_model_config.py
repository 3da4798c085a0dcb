"""``config.json`` read without transformers' config classes (which import torch), against them.

The oracle is transformers itself: the defaults table and every field a loaded config answers are
compared with transformers' config class on the same file, and loading a model is checked not to
import torch (nor transformers) although torch is installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import _tiny
from peftjax import models
from peftjax.models import ModelConfig

tr = pytest.importorskip("transformers")

CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
           "phi3": "Phi3Config", "phimoe": "PhimoeConfig", "mixtral": "MixtralConfig", "bert": "BertConfig",
           "gpt2": "GPT2Config",
           "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig", "roberta": "RobertaConfig",
           "xlm-roberta": "XLMRobertaConfig", "camembert": "CamembertConfig", "albert": "AlbertConfig",
           "mpt": "MptConfig", "zamba": "ZambaConfig", "zamba2": "Zamba2Config", "lfm2_moe": "Lfm2MoeConfig",
           "vaultgemma": "VaultGemmaConfig", "flex_olmo": "FlexOlmoConfig",
           "qwen3_moe": "Qwen3MoeConfig",
           "qwen2_moe": "Qwen2MoeConfig", "olmo2": "Olmo2Config", "olmo3": "Olmo3Config",
           "smollm3": "SmolLM3Config", "granite": "GraniteConfig",
           "gemma": "GemmaConfig", "modernbert": "ModernBertConfig", "gpt_oss": "GptOssConfig",
           "distilbert": "DistilBertConfig", "deberta-v2": "DebertaV2Config",
           "electra": "ElectraConfig",
           "seed_oss": "SeedOssConfig", "glm": "GlmConfig", "glm4": "Glm4Config", "ernie4_5": "Ernie4_5Config",
           "glm4_moe": "Glm4MoeConfig", "glm4_moe_lite": "Glm4MoeLiteConfig", "deepseek_v3": "DeepseekV3Config",
           "deepseek_v2": "DeepseekV2Config", "lfm2": "Lfm2Config",
           "granitemoeshared": "GraniteMoeSharedConfig", "granitemoehybrid": "GraniteMoeHybridConfig",
           "nemotron_h": "NemotronHConfig", "mamba2": "Mamba2Config", "mamba": "MambaConfig",
           "falcon_mamba": "FalconMambaConfig", "bamba": "BambaConfig", "jamba": "JambaConfig",
           "falcon_h1": "FalconH1Config", "hunyuan_v1_moe": "HunYuanMoEV1Config",
           "ernie4_5_moe": "Ernie4_5_MoeConfig",
           "hunyuan_v1_dense": "HunYuanDenseV1Config",
           "mistral4": "Mistral4Config", "gemma4_text": "Gemma4TextConfig", "gemma3n_text": "Gemma3nTextConfig",
           "qwen3_5_text": "Qwen3_5TextConfig", "qwen3_5_moe_text": "Qwen3_5MoeTextConfig",
           "llama4_text": "Llama4TextConfig", "qwen3_next": "Qwen3NextConfig", "cohere": "CohereConfig",
           "cohere2": "Cohere2Config", "phi": "PhiConfig", "gpt_neox": "GPTNeoXConfig", "opt": "OPTConfig",
           "bloom": "BloomConfig", "starcoder2": "Starcoder2Config", "stablelm": "StableLmConfig",
           "gptj": "GPTJConfig", "falcon": "FalconConfig", "gpt_bigcode": "GPTBigCodeConfig",
           "gpt_neo": "GPTNeoConfig", "ministral": "MinistralConfig", "ministral3": "Ministral3Config",
           "olmo": "OlmoConfig", "olmoe": "OlmoeConfig", "arcee": "ArceeConfig", "helium": "HeliumConfig",
           "internlm3": "InternLM3Config", "exaone4": "Exaone4Config", "apertus": "ApertusConfig",
           "bart": "BartConfig", "mbart": "MBartConfig", "marian": "MarianConfig", "pegasus": "PegasusConfig",
           "m2m_100": "M2M100Config",
           "mpnet": "MPNetConfig",
           "nemotron": "NemotronConfig", "granitemoe": "GraniteMoeConfig"}
# transformers' bookkeeping: not model fields (rope settings are compared through rope_parameters(),
# Gemma 4's per-layer table through each layer's head layout)
SKIP = {"transformers_version", "rope_parameters", "_name_or_path", "architectures", "per_layer_config"}


def _field(config, key):
    """A transformers config's field; Gemma 4's, whose global head size may differ per layer, unchecked."""
    read = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return read(key) if read is not None else getattr(config, key)


def assert_same_fields(ours, theirs):
    from peftjax.models._rope import rope_parameters

    for key in sorted(set(theirs.to_dict()) - SKIP):
        value = _field(theirs, key)
        if key == "attn_config":  # MPT's nested config: its own fields (not its PreTrainedConfig bookkeeping)
            value = {k: getattr(value, k) for k in type(value).__dataclass_fields__ if k in getattr(ours, key)}
        assert getattr(ours, key) == value, key
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings", "num_labels"):
        if not hasattr(theirs, key):  # BLOOM has no position limit (ALiBi): neither has ours
            assert not hasattr(ours, key), key
            continue
        assert getattr(ours, key) == getattr(theirs, key), key
    assert ours.id2label == theirs.id2label and ours.label2id == theirs.label2id
    if theirs.model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "phimoe", "gemma2", "mixtral", "qwen3_moe",
                            "qwen2_moe",
                            "olmo2", "smollm3", "granite", "gemma", "gpt_oss", "seed_oss", "glm", "glm4",
                            "glm4_moe", "glm4_moe_lite", "ernie4_5", "ernie4_5_moe", "deepseek_v2", "deepseek_v3",
                            "hunyuan_v1_dense", "hunyuan_v1_moe",
                            "mistral4",
                            "qwen3_5_text", "qwen3_5_moe_text", "llama4_text", "qwen3_next", "cohere", "cohere2",
                            "phi", "gpt_neox", "starcoder2", "stablelm", "falcon", "olmo", "olmoe", "ministral",
                            "ministral3", "arcee", "helium", "internlm3", "exaone4", "nemotron", "granitemoe",
                            "apertus", "granitemoeshared", "granitemoehybrid", "bamba", "falcon_h1", "zamba2", "mpt",
                            "vaultgemma", "flex_olmo"):
        assert rope_parameters(ours) == rope_parameters(theirs)
    if theirs.model_type in ("gemma3_text", "gemma3n_text"):  # a RoPE per layer type
        from peftjax.models._gemma3 import gemma3_rope_parameters

        assert gemma3_rope_parameters(ours) == theirs.rope_parameters
    if theirs.model_type == "modernbert":
        from peftjax.models._modernbert import modernbert_rope_parameters

        assert modernbert_rope_parameters(ours) == theirs.rope_parameters
    if theirs.model_type == "gemma4_text":  # a RoPE per layer type, a head layout per layer
        from peftjax.models._gemma4 import kv_sharing_modes, layer_layouts

        assert ours.rope_parameters == theirs.rope_parameters
        assert layer_layouts(ours) == layer_layouts(theirs)
        assert kv_sharing_modes(ours) == theirs.kv_sharing_modes
    if theirs.model_type == "olmo3":
        from peftjax.models._olmo import olmo3_rope_parameters

        assert olmo3_rope_parameters(ours) == theirs.rope_parameters


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_the_defaults_are_transformers(family):
    assert_same_fields(ModelConfig(family), getattr(tr, CLASSES[family])())
    assert set(getattr(tr, CLASSES[family])().to_dict()) - SKIP <= set(ModelConfig(family).to_dict())


VARIANTS = [
    ("llama", {}),
    ("bart", dict(num_labels=2, d_model=32, encoder_attention_heads=4, scale_embedding=True)),
    ("bart", dict(id2label={0: "a", 1: "b", 2: "c", 3: "d"}, tie_word_embeddings=False, decoder_start_token_id=0)),
    ("mbart", dict(encoder_layers=3, decoder_layers=1, forced_eos_token_id=None)),
    ("marian", dict(vocab_size=500, pad_token_id=499, decoder_start_token_id=499, scale_embedding=True)),
    ("marian", dict(decoder_vocab_size=500, vocab_size=500)),
    ("pegasus", dict(scale_embedding=True, activation_function="relu", max_position_embeddings=512)),
    ("m2m_100", dict(encoder_layerdrop=0.0, scale_embedding=False, pad_token_id=0)),
    ("mpnet", dict(relative_attention_num_buckets=16, pad_token_id=0, num_labels=4)),
    ("llama", dict(num_key_value_heads=None, head_dim=4, rope_scaling={"rope_type": "linear", "factor": 2.0},
                   rope_theta=500000.0, num_labels=3)),
    ("llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                   id2label={0: "neg", 1: "pos"}, tie_word_embeddings=True, attention_bias=True)),
    ("mistral", dict(sliding_window=None)),
    ("mistral", dict(sliding_window=3, num_key_value_heads=1)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    ("qwen2", dict(eos_token_id=[1, 2])),
    ("qwen3", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, head_dim=16)),
    ("qwen3", dict(num_key_value_heads=None, attention_bias=True, tie_word_embeddings=True)),
    ("phi3", dict(num_key_value_heads=None, sliding_window=5, pad_token_id=None)),
    ("phi3", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
                  original_max_position_embeddings=64, resid_pdrop=0.1)),
    ("gemma2", dict(final_logit_softcapping=None, num_hidden_layers=3, num_key_value_heads=4)),
    ("gemma3_text", dict(layer_types=None, num_hidden_layers=7, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 500.0}})),
    ("gemma4_text", {}),
    # Gemma 3n: one MLP width, the layer types and sparse layers derived
    ("gemma3n_text", dict(intermediate_size=64, num_hidden_layers=12, layer_types=None,
                          activation_sparsity_pattern=None)),
    ("gemma4_text", dict(layer_types=None, num_hidden_layers=7, attention_k_eq_v=False, rope_parameters=None,
                         num_kv_shared_layers=1, global_head_dim=32, hidden_size_per_layer_input=0)),
    ("mixtral", dict(num_experts=4, num_experts_per_tok=1, sliding_window=3, output_router_logits=True)),
    ("lfm2_moe", dict(layer_types=["conv", "full_attention"], num_hidden_layers=2, num_dense_layers=1,
                      use_expert_bias=False, tie_embedding=False, routed_scaling_factor=2.5)),
    # Zamba (v1): the layer kinds from attn_layer_period/offset, the dt rank "auto", the attention widths derived
    ("zamba", dict(hidden_size=64, num_attention_heads=8, num_hidden_layers=11, layers_block_type=None,
                   attn_layer_period=3, attn_layer_offset=1, mamba_dt_rank="auto")),
    ("zamba2", dict(hidden_size=64, num_attention_heads=8, layers_block_type=["mamba", "hybrid", "hybrid"],
                    num_hidden_layers=3, num_mem_blocks=2, use_mem_rope=True, intermediate_size=None,
                    use_long_context=True)),
    ("mpt", dict(d_model=64, n_heads=8, attn_config={"clip_qkv": 8.0, "softmax_scale": 0.2},
                 max_seq_len=128)),
    ("albert", dict(embedding_size=64, hidden_size=256, num_attention_heads=4, num_hidden_groups=2,
                    inner_group_num=2, classifier_dropout_prob=0.0, hidden_act="gelu")),
    # Phi-3.5-MoE's config.json: the legacy rope_scaling with its mscales, biases, a window
    ("phimoe", dict(num_key_value_heads=16, sliding_window=131072, attention_bias=True, lm_head_bias=True,
                    original_max_position_embeddings=4096, rope_scaling={
                        "type": "longrope", "short_factor": [1.0] * 64, "long_factor": [1.5] * 64,
                        "short_mscale": 1.243, "long_mscale": 1.243, "original_max_position_embeddings": 4096})),
    ("qwen3_moe", dict(mlp_only_layers=None, use_sliding_window=True, sliding_window=3, norm_topk_prob=False)),
    ("qwen3_moe", dict(decoder_sparse_step=2, rope_theta=1e6, tie_word_embeddings=True, num_labels=3)),
    ("qwen2_moe", dict(mlp_only_layers=None, use_sliding_window=True, sliding_window=3, max_window_layers=1)),
    ("qwen2_moe", dict(qkv_bias=False, norm_topk_prob=True, layer_types=["full_attention", "sliding_attention"])),
    ("deepseek_v3", dict(num_key_value_heads=None, num_experts=16, head_dim=10, num_labels=3)),
    # ERNIE 4.5 MoE's aliases (num_experts, num_experts_per_tok), its last MoE layer by -1, no key/value heads
    ("ernie4_5_moe", dict(num_experts=16, num_experts_per_tok=4, moe_layer_end_index=-1, num_key_value_heads=None,
                          num_hidden_layers=6, moe_layer_interval=2, use_bias=True, num_labels=3)),
    # the Hub's LFM2 names (tie_embedding, block_ff_dim) and its attention layers by index
    ("lfm2", dict(tie_embedding=False, block_ff_dim=64, full_attn_idxs=[0, 2], conv_L_cache=4, num_labels=3)),
    # the Hub's DeepSeek-V2-Lite fields (the remote code's among them); head_dim is always derived
    ("deepseek_v2", dict(num_key_value_heads=None, num_experts=16, head_dim=10, num_labels=3, q_lora_rank=None,
                         scoring_func="softmax", moe_layer_freq=1, topk_method="greedy", rope_scaling={
                             "type": "yarn", "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707, "beta_fast": 32,
                             "beta_slow": 1, "original_max_position_embeddings": 4096}, rope_theta=10000)),
    ("deepseek_v3", dict(q_lora_rank=None, rope_interleave=False, num_mtp_layers=0, rope_scaling={
        "type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 8})),
    ("glm4_moe", dict(num_key_value_heads=1, n_routed_experts=16, use_qk_norm=False, num_mtp_layers=0, num_labels=3)),
    ("glm4_moe", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6,
                                       "partial_rotary_factor": 0.25}, tie_word_embeddings=True)),
    ("glm4_moe_lite", dict(mlp_layer_types=None, num_hidden_layers=4, q_lora_rank=16, num_labels=3)),
    ("glm4_moe_lite", dict(rope_interleave=False, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                   "rope_theta": 1e6,
                                                                   "original_max_position_embeddings": 16})),
    ("mistral4", dict(rope_parameters=None, num_key_value_heads=None, qk_nope_head_dim=12, num_labels=3)),
    ("mistral4", dict(n_group=1, topk_group=1, head_dim=16, pad_token_id=None)),
    ("olmo2", dict(num_key_value_heads=None, attention_bias=True, rope_theta=500000.0)),
    ("olmo3", dict(layer_types=None, num_hidden_layers=5, rope_parameters=None, rope_theta=1000.0,
                   rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("olmo3", dict(sliding_window=3)),
    ("smollm3", dict(no_rope_layers=None, num_hidden_layers=5, no_rope_layer_interval=3)),
    ("smollm3", dict(use_sliding_window=False, tie_word_embeddings=False, num_key_value_heads=None)),
    ("gemma", dict(hidden_act="gelu", num_key_value_heads=1, head_dim=16)),
    ("granite", dict(num_key_value_heads=None, logits_scaling=16.0, rope_theta=10000000.0)),
    ("cohere", dict(num_key_value_heads=None, use_qk_norm=True, logit_scale=0.25, rope_theta=10000.0)),
    ("phi", dict(partial_rotary_factor=0.4, qk_layernorm=True, resid_pdrop=0.1, num_key_value_heads=None)),
    ("phi", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0,
                                  "partial_rotary_factor": 0.25}, hidden_act="gelu")),
    ("cohere2", dict(layer_types=None, num_hidden_layers=6, sliding_window_pattern=3, head_dim=64)),
    ("gpt_neox", dict(rotary_pct=0.5, rotary_emb_base=500.0, use_parallel_residual=False)),  # old files' names
    ("opt", dict(word_embed_proj_dim=512, do_layer_norm_before=False, hidden_size=1024, num_attention_heads=16)),
    ("opt", dict(enable_bias=False, layer_norm_elementwise_affine=False, tie_word_embeddings=False, init_std=0.01)),
    ("bloom", dict(n_layer=4, n_head=16, hidden_size=1024, apply_residual_connection_post_layernorm=True)),
    ("starcoder2", dict(sliding_window=4096, use_bias=False, rope_theta=100000.0, num_key_value_heads=4)),
    ("stablelm", dict(use_parallel_residual=True, qk_layernorm=True, use_qkv_bias=True, num_key_value_heads=8)),
    ("stablelm", dict(partial_rotary_factor=0.5, rope_theta=100000.0, hidden_dropout=0.1)),
    ("gptj", dict(n_embd=1024, n_head=8, rotary_dim=32, n_inner=2048, resid_pdrop=0.1)),
    ("gptj", dict(hidden_size=512, num_attention_heads=4, num_hidden_layers=3, max_position_embeddings=1024)),
    ("falcon", dict(new_decoder_architecture=True, num_kv_heads=8, num_attention_heads=64, hidden_size=1024)),
    ("falcon", dict(multi_query=False, parallel_attn=False, alibi=True, ffn_hidden_size=3000)),
    ("gpt_bigcode", dict(multi_query=False, n_embd=1024, n_head=16, n_inner=2048, scale_attn_weights=False)),
    ("gpt_bigcode", dict(hidden_size=512, num_attention_heads=8, num_hidden_layers=3, max_position_embeddings=8192)),
    ("olmo", dict(clip_qkv=8.0, attention_bias=True, num_key_value_heads=8)),
    ("arcee", dict(hidden_act="relu2", mlp_bias=True, head_dim=64)),
    ("granitemoe", dict(num_local_experts=4, embedding_multiplier=12.0, logits_scaling=8.0)),
    ("granitemoeshared", dict(shared_intermediate_size=512, num_key_value_heads=None, num_labels=3)),
    # the released Mamba and Falcon-Mamba files: time_step_rank derived ("auto") or given
    ("mamba", dict(hidden_size=2560, time_step_rank="auto", expand=2, num_hidden_layers=4, tie_word_embeddings=True)),
    ("falcon_mamba", dict(hidden_size=4096, time_step_rank=256, mixer_rms_eps=1e-6, use_conv_bias=True)),
    # Bamba-9B's fields: its attention layers, a derived Mamba-2 head size, RoPE's partial factor fixed
    ("bamba", dict(attn_layer_indices=[0, 2], mamba_d_head="auto", mamba_n_heads=8, num_key_value_heads=None)),
    # Jamba 1.5 Mini's layout: attention every 8th from 4, experts every 2nd from 1; the derived time-step rank
    ("jamba", dict(num_hidden_layers=8, attn_layer_period=8, attn_layer_offset=4, num_experts=16, mamba_dt_rank="auto",
                   num_labels=3)),
    # Falcon-H1's µP fields and a head size derived from mamba_d_ssm
    ("falcon_h1", dict(mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head="auto", mlp_multipliers=[0.5, 0.25],
                       ssm_multipliers=[0.3, 0.2, 0.1, 0.4, 0.5], rope_theta=1e11, num_labels=3)),
    ("hunyuan_v1_moe", dict(num_experts=64, moe_topk=8, num_key_value_heads=None, num_labels=3)),
    ("mamba2", dict(num_heads=64, head_dim=32, hidden_size=1024, tie_word_embeddings=True, residual_in_fp32=False)),
    # Nemotron Nano 2's Hub fields: the pattern, the old mamba_* names, a num_hidden_layers the pattern overrides
    ("nemotron_h", dict(hybrid_override_pattern="M-M-M*-E", num_hidden_layers=56, mamba_n_groups=4, mamba_d_conv=3,
                        mamba_expand=2, mamba_chunk_size=256, mamba_conv_bias=True, num_labels=3)),
    # Granite 4.0's Hub fields: the legacy layer names, the derived Mamba-2 head size, NoPE
    ("granitemoehybrid", dict(layer_types=["mamba", "attention", "mamba"], num_hidden_layers=3, mamba_d_head="auto",
                              mamba_n_heads=64, position_embedding_type="nope", num_local_experts=0)),
    ("nemotron", dict(num_key_value_heads=2, head_dim=None, partial_rotary_factor=0.25, attention_bias=True)),
    ("exaone4", dict(sliding_window=1024, sliding_window_pattern=3, num_hidden_layers=7)),
    ("apertus", dict(hidden_act="relu2", num_key_value_heads=8, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 5e5})),
    ("exaone4", dict(layer_types=["full_attention", "sliding_attention"], num_hidden_layers=2)),
    ("helium", dict(num_key_value_heads=4, rms_norm_eps=1e-6)),
    ("internlm3", dict(qkv_bias=True, bias=True, num_key_value_heads=8)),
    ("olmoe", dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, clip_qkv=4.0, router_aux_loss_coef=0.1)),
    ("ministral", dict(sliding_window=None, head_dim=64)),
    ("ministral", dict(layer_types=["sliding_attention", "full_attention"], num_hidden_layers=2, head_dim=64)),
    ("ministral3", dict(sliding_window=4096, rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                                                               "original_max_position_embeddings": 4096,
                                                               "llama_4_scaling_beta": 0.2})),
    ("gpt_neo", dict(num_layers=4, attention_types=[[["global"], 2], [["local"], 2]], window_size=128,
                     intermediate_size=3000)),
    ("bloom", dict(num_hidden_layers=3, num_attention_heads=6, hidden_dropout=0.1, pretraining_tp=2)),
    ("gpt_neox", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0,
                                       "partial_rotary_factor": 0.5}, hidden_dropout=0.1, classifier_dropout=0.2)),
    ("cohere2", dict(num_key_value_heads=None, sliding_window=16, tie_word_embeddings=False)),
    ("deberta-v2", dict(pos_att_type="p2c|c2p", relative_attention=True, position_buckets=256, share_att_key=True)),
    ("deberta-v2", dict(pos_att_type=["c2p"], pooler_hidden_size=32, hidden_size=32, num_attention_heads=4)),
    ("modernbert", dict(layer_types=None, num_hidden_layers=5, global_attn_every_n_layers=2, classifier_pooling="mean")),
    ("modernbert", dict(rope_parameters=None, global_rope_theta=500.0, local_rope_theta=7.0, norm_bias=True)),
    ("qwen3_5_text", dict(layer_types=None, num_hidden_layers=5, full_attention_interval=2)),
    ("qwen3_5_text", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.5,
                                           "mrope_section": [11, 11, 10], "mrope_interleaved": True},
                          num_key_value_heads=1, tie_word_embeddings=True)),
    ("qwen3_5_moe_text", dict(layer_types=None, num_hidden_layers=4, router_aux_loss_coef=0.01)),
    ("llama4_text", {}),
    ("llama4_text", dict(no_rope_layers=None, moe_layers=None, layer_types=None, num_hidden_layers=5,
                         interleave_moe_layer_step=2, no_rope_layer_interval=2, rope_parameters=None)),
    ("llama4_text", dict(no_rope_layers=[], attention_chunk_size=None, layer_types=None, num_labels=3)),
    ("qwen3_next", dict(layer_types=None, num_hidden_layers=5, full_attention_interval=2, mlp_only_layers=None)),
    ("qwen3_next", dict(decoder_sparse_step=2, norm_topk_prob=True, partial_rotary_factor=0.5, num_labels=3)),
    ("bert", dict(num_labels=4, classifier_dropout=0.2)),
    ("distilbert", dict(sinusoidal_pos_embds=True, activation="relu", seq_classif_dropout=0.3, num_labels=2)),
    ("gpt2", dict(n_inner=24, num_labels=1, problem_type="regression")),
    ("roberta", dict(classifier_dropout=0.3)),
    ("xlm-roberta", dict(num_labels=2, pad_token_id=0)),
]


@pytest.mark.parametrize("family, overrides", VARIANTS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(VARIANTS)])
def test_a_saved_config_reads_as_transformers_reads_it(family, overrides, tmp_path):
    theirs = _tiny.config(family, **overrides)
    theirs.save_pretrained(tmp_path)  # transformers writes only what differs from its defaults
    ours = models.load_config(tmp_path)
    assert_same_fields(ours, tr.AutoConfig.from_pretrained(tmp_path))
    # and an override is applied as AutoConfig applies it
    assert_same_fields(models.load_config(tmp_path, num_labels=5, pad_token_id=0),
                       tr.AutoConfig.from_pretrained(tmp_path, num_labels=5, pad_token_id=0))


def test_a_transformers_4_gemma3_config_reads_as_transformers_reads_it(tmp_path):
    """Before per-type ``rope_parameters``: ``rope_theta`` (global), ``rope_local_base_freq``
    (sliding), ``rope_scaling`` (global) and ``sliding_window_pattern``."""
    fields = dict(_tiny.fields("gemma3_text", layer_types=None, num_hidden_layers=5), model_type="gemma3_text",
                  rope_theta=2000.0, rope_local_base_freq=30.0, sliding_window_pattern=2,
                  rope_scaling={"rope_type": "linear", "factor": 4.0})
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert_same_fields(models.load_config(tmp_path), tr.AutoConfig.from_pretrained(tmp_path))


def test_the_hub_s_gemma3n_text_config_reads_as_transformers_reads_it(tmp_path):
    """The Hub's Gemma 3n files (transformers 4.53): ``rope_theta`` (global), ``rope_local_base_freq``
    (sliding) and ``rope_scaling``, one MLP width per layer in a list, the text config inside the
    vision-language model's."""
    text = dict(_tiny.fields("gemma3n_text", num_hidden_layers=12, layer_types=None, rope_parameters=None,
                             intermediate_size=[64] * 12, activation_sparsity_pattern=[0.95] * 10 + [0.0] * 2),
                model_type="gemma3n_text", rope_theta=2000.0, rope_local_base_freq=30.0, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(text))
    assert_same_fields(models.load_config(tmp_path), tr.AutoConfig.from_pretrained(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3n", "text_config": text}))
    assert_same_fields(models.load_config(tmp_path), tr.AutoConfig.from_pretrained(tmp_path).text_config)


def test_a_hub_deberta_v3_config_reads_as_transformers_reads_it(tmp_path):
    """The v3 releases' file: ``pos_att_type`` as a ``"p2c|c2p"`` string, no ``pooler_hidden_size``."""
    (tmp_path / "config.json").write_text(json.dumps(dict(
        model_type="deberta-v2", hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
        relative_attention=True, position_buckets=256, norm_rel_ebd="layer_norm", share_att_key=True,
        pos_att_type="p2c|c2p", layer_norm_eps=1e-7, max_relative_positions=-1, position_biased_input=False,
        type_vocab_size=0, vocab_size=128100)))
    ours = models.load_config(tmp_path)
    assert_same_fields(ours, tr.AutoConfig.from_pretrained(tmp_path))
    assert ours.pos_att_type == ["p2c", "c2p"] and ours.pooler_hidden_size == 32


def test_what_save_pretrained_writes_transformers_reads_back(tmp_path):
    _tiny.config("gpt2", num_labels=3).save_pretrained(tmp_path / "in")
    config = models.load_config(tmp_path / "in")
    models.GPT2LMHeadModel.from_config(config).save_pretrained(tmp_path / "out")
    assert_same_fields(models.load_config(tmp_path / "out"), tr.AutoConfig.from_pretrained(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]


def test_an_unknown_override_is_named(tmp_path):
    _tiny.config("llama").save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"\['hiden_size'\] are not fields of the llama config"):
        models.load_config(tmp_path, hiden_size=8)
    with pytest.raises(ValueError, match="model_type 'blenderbot' is not supported; supported: .*'llama'"):
        ModelConfig("blenderbot")


def test_loading_a_model_imports_neither_torch_nor_transformers(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the point is a process where torch is installed")
    models.LlamaForCausalLM.from_config(_tiny.config("llama")).save_pretrained(tmp_path / "llama")
    code = (
        "import sys\n"
        "from peftjax import models\n"
        f"model = models.from_pretrained({str(tmp_path / 'llama')!r})\n"
        "model(input_ids=[[1, 2, 3]])\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("scan_layers", [False, True])
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_loading_builds_the_model_without_walking_its_trace(family, scan_layers, tmp_path, monkeypatch):
    """``from_pretrained`` builds the model abstractly (``nnx.eval_shape``) before filling it. A
    plain ``nnx.Rngs`` there made flax ask each traced key counter for its sharding, and JAX's
    answer, an error message, walks everything traced so far: once per parameter, a build time
    quadratic in the model's size. The loaded weights are the saved ones either way."""
    import jax
    import numpy as np
    from flax import nnx
    from jax._src.interpreters import partial_eval

    from peftjax.models import hf_state_dict

    cls = {"llama": models.LlamaForCausalLM, "bert": models.BertModel}[family]
    saved = cls.from_config(_tiny.config(family))
    saved.save_pretrained(tmp_path / family)
    walks = []
    origin_msg = partial_eval.DynamicJaxprTracer._origin_msg
    monkeypatch.setattr(partial_eval.DynamicJaxprTracer, "_origin_msg", lambda self: walks.append(1) or origin_msg(self))
    loaded = models.from_pretrained(tmp_path / family, scan_layers=scan_layers)
    assert walks == []
    expected, got = hf_state_dict(saved), hf_state_dict(loaded)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(loaded)))
