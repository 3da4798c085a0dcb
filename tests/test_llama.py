"""The Llama family (Llama, Mistral, Qwen2, Qwen3, Phi-3, OLMo 2/3, SmolLM3, Granite) against PyTorch
transformers: logits, sliding windows, RoPE scaling, generation, I/O."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _compiles import compilations
from _generate import Recorder
from _torch_models import (assert_grads_match_torch, assert_long_prompts_generate_as_torch,
                           assert_long_rows_match_torch, lazy, padded_batch, save_tiny, torch_logits)

from peftjax import models

torch = lazy("torch")  # the PyTorch oracle: a test that uses it skips without it

# _tiny's decoders, twice as wide, with a larger vocabulary
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96)
VARIANTS = {  # name -> (_tiny family, transformers class, config overrides)
    "llama": ("llama", tr.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "llama-tied-bias": ("llama", tr.LlamaForCausalLM, dict(tie_word_embeddings=True, attention_bias=True)),
    "llama3-rope": (
        "llama",
        tr.LlamaForCausalLM,
        dict(
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=10000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=16,
            )
        ),
    ),
    "mistral-window": ("mistral", tr.MistralForCausalLM, dict(sliding_window=4)),
    "qwen2-window": (
        "qwen2",
        tr.Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
    ),
    # explicit head_dim (8, not 64 / 4), q/k norms, biases on all four projections, a sliding layer
    "qwen3-window-bias": (
        "qwen3",
        tr.Qwen3ForCausalLM,
        dict(use_sliding_window=True, sliding_window=4, max_window_layers=1, attention_bias=True),
    ),
    # fused qkv_proj / gate_up_proj, half of each head rotated, a window on every layer
    "phi3-partial-window": (
        "phi3",
        tr.Phi3ForCausalLM,
        dict(sliding_window=4, rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5)),
    ),
    # q/k norms over whole projections, norms after each branch, biases
    "olmo2-bias": ("olmo2", tr.Olmo2ForCausalLM, dict(attention_bias=True)),
    # _tiny's: a sliding layer and a global one, a RoPE base each; a layer of each kind (_layer_kinds)
    "olmo3-window": ("olmo3", tr.Olmo3ForCausalLM, {}),
    # _tiny's: a RoPE layer, then a sliding one without RoPE
    "smollm3-nope-window": ("smollm3", tr.SmolLM3ForCausalLM, {}),
    # _tiny's multipliers of embeddings, scores, branches and logits
    "granite-multipliers": ("granite", tr.GraniteForCausalLM, {}),
    # _tiny's q/k/v and output biases, head_dim 16 (not 32 / 4)
    "seed_oss-biases": ("seed_oss", tr.SeedOssForCausalLM, {}),
    # _tiny's pairwise partial RoPE, biased q/k/v, norms after both branches
    "glm4-pairs": ("glm4", tr.Glm4ForCausalLM, {}),
    # _tiny's pairwise partial RoPE, biased q/k/v, the fused MLP, Llama's two norms a layer
    "glm-pairs": ("glm", tr.GlmForCausalLM, {}),
    # _tiny's q/k norms after RoPE and its fixed NTK alpha
    "hunyuan_v1_dense-alpha": ("hunyuan_v1_dense", tr.HunYuanDenseV1ForCausalLM, {}),
    # _tiny's pairwise RoPE over whole heads, biases on every projection, tied embeddings
    "ernie4_5-biases": ("ernie4_5", tr.Ernie4_5ForCausalLM, {}),
    # _tiny's parallel blocks, per-head q/k norms, scaled logits
    "cohere-qk-norm": ("cohere", tr.CohereForCausalLM, {}),
    # _tiny's parallel blocks, partial RoPE, q/k LayerNorms, biases and a biased LM head
    "phi-partial-qk-norm": ("phi", tr.PhiForCausalLM, {}),
    # _tiny's sliding RoPE layer, then a global NoPE one
    "cohere2-nope-window": ("cohere2", tr.Cohere2ForCausalLM, {}),
    # _tiny's fused per-head q/k/v, two LayerNorms, parallel residual, half-rotary RoPE, biases
    "gpt_neox-parallel": ("gpt_neox", tr.GPTNeoXForCausalLM, {}),
    # the same one after the other (use_parallel_residual=False), GPT-2's GELU, no biases in attention
    "gpt_neox-sequential": ("gpt_neox", tr.GPTNeoXForCausalLM, dict(use_parallel_residual=False,
                                                                   hidden_act="gelu_new", attention_bias=False)),
    # _tiny's learned positions from each row's real tokens, pre-norm layers, a tied head
    "opt-pre-norm": ("opt", tr.OPTForCausalLM, {}),
    # _tiny's Falcon-7B: multi-query attention, parallel branches on one norm
    "falcon-7b": ("falcon", tr.FalconForCausalLM, {}),
    # Falcon-40B's layout: grouped queries per key/value head, ln_attn and ln_mlp, biases
    "falcon-40b": ("falcon", tr.FalconForCausalLM, dict(new_decoder_architecture=True, num_kv_heads=2, bias=True)),
    # falcon-rw's: ALiBi (bfloat16 slopes over the head size's root), per-head q/k/v, one branch after the other
    "falcon-rw-alibi": ("falcon", tr.FalconForCausalLM, dict(alibi=True, multi_query=False, parallel_attn=False,
                                                             bias=True)),
    # _tiny's StarCoder: multi-query attention, learned positions, GPT-2's blocks, a tied head
    "gpt_bigcode-mqa": ("gpt_bigcode", tr.GPTBigCodeForCausalLM, {}),
    # SantaCoder-like per-head q/k/v, unscaled scores, untied
    "gpt_bigcode-per-head": ("gpt_bigcode", tr.GPTBigCodeForCausalLM, dict(multi_query=False, scale_attn_weights=False,
                                                                           tie_word_embeddings=False)),
    # _tiny's OLMo: parameter-free LayerNorms, clamped projections
    "olmo-clip": ("olmo", tr.OlmoForCausalLM, {}),
    # _tiny's EXAONE 4.0: a sliding RoPE layer, then a global NoPE one; and without a window (RoPE everywhere)
    "exaone4-hybrid": ("exaone4", tr.Exaone4ForCausalLM, {}),
    "exaone4-no-window": ("exaone4", tr.Exaone4ForCausalLM, dict(sliding_window=None,
                                                                  layer_types=["full_attention"] * 2)),
    # _tiny's Apertus: per-head q/k norms, a gate-less xIELU MLP, Llama 3's RoPE
    "apertus-xielu": ("apertus", tr.ApertusForCausalLM, {}),
    # _tiny's Arcee (a gate-less ReLU² MLP), Helium (pairwise RoPE), InternLM3 (Llama with every bias)
    "arcee-relu2": ("arcee", tr.ArceeForCausalLM, {}),
    # _tiny's Nemotron: Arcee's MLP, RoPE on half of each head, (1 + weight) LayerNorms, every bias
    "nemotron-partial-biases": ("nemotron", tr.NemotronForCausalLM, {}),
    "helium-pairs": ("helium", tr.HeliumForCausalLM, dict(head_dim=16)),  # o_proj reads hidden_size wide
    "internlm3-biases": ("internlm3", tr.LlamaForCausalLM, {}),
    # _tiny's Ministral 8B: a sliding layer, then a full one
    "ministral-layer-types": ("ministral", tr.MinistralForCausalLM, {}),
    # _tiny's Ministral 3 with a window on every layer: YaRN, queries scaled past position 8
    "ministral3-window": ("ministral3", tr.Ministral3ForCausalLM, dict(sliding_window=5)),
    # _tiny's GPT-Neo: a global layer, then a local one, unscaled scores, learned positions
    "gpt_neo-local": ("gpt_neo", tr.GPTNeoForCausalLM, {}),
    # _tiny's one LayerNorm, parallel branches, pairwise RoPE on half of each head, a biased LM head
    "gptj-pairs": ("gptj", tr.GPTJForCausalLM, {}),
    # _tiny's LayerNorms, half-rotary RoPE, q/k/v biases, a LayerNorm per head of q and k
    "stablelm-qk-norm": ("stablelm", tr.StableLmForCausalLM, {}),
    # StableLM 2 12B's layout: one norm, attention and MLP side by side
    "stablelm-parallel": ("stablelm", tr.StableLmForCausalLM, dict(use_parallel_residual=True)),
    # _tiny's LayerNorms, biases, a gate-less GELU MLP, a window on every layer, grouped keys and values
    "starcoder2-window": ("starcoder2", tr.Starcoder2ForCausalLM, {}),
    # without biases, untied, no window
    "starcoder2-plain": ("starcoder2", tr.Starcoder2ForCausalLM, dict(use_bias=False, tie_word_embeddings=False,
                                                                      sliding_window=None)),
    # _tiny's ALiBi over four heads, the embeddings' LayerNorm, fused per-head q/k/v
    "bloom-alibi": ("bloom", tr.BloomForCausalLM, {}),
    # each branch added to its normalised input (six heads, past a power of two: test_bloom.py)
    "bloom-post-norm-residual": ("bloom", tr.BloomForCausalLM, dict(apply_residual_connection_post_layernorm=True)),
    # opt-350m's layout: post-norm layers, no final norm, embeddings narrower than the hidden size
    # (project_in, project_out), untied, no biases
    "opt-350m-layout": ("opt", tr.OPTForCausalLM, dict(do_layer_norm_before=False, word_embed_proj_dim=16,
                                                        tie_word_embeddings=False, enable_bias=False,
                                                        layer_norm_elementwise_affine=False)),
}


# generation's own machinery (EOS, sampling) is family-independent: checked on the first five only
GENERATION_ONLY = sorted(k for k in VARIANTS if not k.startswith(("qwen3", "phi3", "olmo", "smollm3", "granite",
                                                                   "seed_oss", "glm", "ernie4_5", "cohere", "hunyuan",
                                                                   "phi-", "gpt_neox", "opt", "bloom",
                                                                   "starcoder2", "stablelm", "gptj", "falcon",
                                                                   "gpt_bigcode", "gpt_neo", "ministral", "olmo-",
                                                                   "arcee", "helium", "internlm3", "exaone4",
                                                                   "apertus", "nemotron")))


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def causal(request, tmp_path_factory):
    family, model_cls, extra = VARIANTS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_tiny(model_cls, _tiny.config(family, **TINY, **extra), path)
    return torch_model, models.from_pretrained(path), path


def _forward(model, jit, **inputs):
    if not jit:
        return model(**inputs)
    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def test_logits_match_torch_on_padded_batch(causal, jit):
    torch_model, model, _ = causal
    assert type(model).__name__ == type(torch_model).__name__
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)


def test_loss_matches_torch(causal):
    torch_model, model, _ = causal
    # right padding: with left padding the first real label is predicted from a fully masked
    # query row, whose output no implementation defines the same way
    ids, mask = padded_batch(TINY["vocab_size"], seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
        ).loss.item()
    out = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(out) - ref) <= 1e-5


# a family's second variant whose attention is its first's (the same module, masks and cache:
# projections, norms or residual layout differ, which the forward tests here check, with gradients):
# the long-row and generation tests run on the first (and on Llama 3's RoPE, whose positions
# generation reaches past the forward tests')
SAME_ATTENTION = ("llama-tied-bias", "gpt_neox-sequential", "opt-350m-layout", "bloom-post-norm-residual",
                  "stablelm-parallel", "starcoder2-plain", "exaone4-no-window")


@pytest.mark.parametrize("causal", sorted(set(VARIANTS) - set(SAME_ATTENTION)), indirect=True)
def test_greedy_generation_matches_hf_generate(causal):
    torch_model, model, _ = causal
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=6)
    ours = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("causal", GENERATION_ONLY, indirect=True)
def test_generation_stops_at_eos_and_pads(causal):
    _, model, _ = causal
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=6)
    free = model.generate(ids, mask, max_new_tokens=6, pad_token_id=0)
    eos = int(free[0, 7])  # a token row 0 produces becomes its EOS
    stop = 6 + int(np.argmax(free[0, 6:] == eos)) + 1
    out = model.generate(ids, mask, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out[0, :stop], free[0, :stop])
    assert (out[0, stop:] == 0).all()


@pytest.mark.parametrize("causal", GENERATION_ONLY, indirect=True)
def test_sampling_is_seeded_and_top_k_1_is_greedy(causal):
    _, model, _ = causal
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=6)
    a = model.generate(ids, mask, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    b = model.generate(ids, mask, max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, seed=3)
    np.testing.assert_array_equal(a, b)
    greedy = model.generate(ids, mask, max_new_tokens=5)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=5, do_sample=True, top_k=1), greedy)


def _kept_by_transformers(logits, temperature, top_k=None, top_p=None) -> set[int]:
    """The tokens transformers' sampling warpers leave drawable, applied in generate's order."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    scores = TemperatureLogitsWarper(temperature)(None, torch.tensor(logits)[None])
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(np.flatnonzero(np.isfinite(scores[0].numpy())).tolist())


def test_sampling_settings_are_values_of_one_compiled_generate(tmp_path):
    """A new temperature, top-k, top-p or pad token reuses the compiled generate (a server's clients
    send their own); only turning a filter on or off compiles anew (``top_k=0``: off). Every token
    drawn is one that transformers' warpers keep, from the PyTorch model's logits."""
    torch_model = save_tiny(tr.LlamaForCausalLM, _tiny.config("llama", **TINY), tmp_path)
    model = models.from_pretrained(tmp_path)
    prompt, _ = padded_batch(TINY["vocab_size"], batch=1, seq=6)
    ids = np.repeat(prompt, 256, axis=0)  # 256 draws of the first new token, one per row
    logits = torch_logits(torch_model, input_ids=prompt, attention_mask=np.ones_like(prompt))[0, -1]
    settings = [dict(temperature=0.7, top_k=5), dict(temperature=2.0, top_k=3),  # top-k alone
                dict(temperature=1.3, top_p=0.6, top_k=0), dict(temperature=0.5, top_p=0.9, top_k=0),  # top-p alone
                dict(temperature=0.9, top_k=20, top_p=0.5), dict(temperature=1.1, top_k=4, top_p=0.95)]
    with compilations() as compiled:
        for i, setting in enumerate(settings):
            drawn = set(model.generate(ids, max_new_tokens=1, do_sample=True, seed=i, pad_token_id=i,
                                       **setting)[:, -1].tolist())
            kept = _kept_by_transformers(logits, **setting)
            assert 1 < len(kept) < TINY["vocab_size"], setting  # the filter cuts, and leaves a choice
            assert drawn <= kept and len(drawn) > 1, (setting, sorted(drawn - kept))
        greedy = [model.generate(ids[:2], max_new_tokens=3, temperature=t, pad_token_id=t) for t in (1, 3)]
    np.testing.assert_array_equal(greedy[0], greedy[1])  # greedy ignores the sampling settings
    assert compiled.count("_generate") == 4, compiled  # top-k, top-p, both, greedy: one program each
    for bad, message in ((dict(top_k=-1), "top_k must be an integer >= 0"), (dict(top_k=2.5), "top_k must be"),
                         (dict(top_p=1.5), r"top_p must be in \[0, 1\]"), (dict(temperature=0), "temperature")):
        with pytest.raises(ValueError, match=message):
            model.generate(ids[:1], max_new_tokens=1, do_sample=True, **bad)


def test_prompts_left_padded_to_a_common_length_share_one_compiled_generate(tmp_path):
    """generate's docstring: left-padding prompts to a multiple reuses the compiled loop across
    prompt lengths, and each row generates what its prompt alone does."""
    save_tiny(tr.LlamaForCausalLM, _tiny.config("llama", **TINY), tmp_path)
    model = models.from_pretrained(tmp_path)
    prompts = [np.random.default_rng(n).integers(1, TINY["vocab_size"], (1, n)) for n in (5, 9, 12)]
    alone = [model.generate(p, max_new_tokens=6, pad_token_id=0)[:, p.shape[1]:] for p in prompts]
    with compilations() as compiled:
        for p, expected in zip(prompts, alone):
            ids, mask = np.zeros((1, 16), np.int64), np.zeros((1, 16), np.int64)
            ids[:, 16 - p.shape[1]:], mask[:, 16 - p.shape[1]:] = p, 1
            np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=6, pad_token_id=0)[:, 16:], expected)
    assert compiled.count("_generate") == 1, compiled


def test_saved_checkpoint_loads_in_transformers(causal, tmp_path):
    torch_model, model, _ = causal
    model.save_pretrained(tmp_path)
    reloaded = type(torch_model).from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(TINY["vocab_size"], seq=7)
    valid = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid], ours[valid], atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "phi3", "olmo2", "olmo3", "smollm3", "seed_oss",
                                  "glm4", "glm", "hunyuan_v1_dense", "phi", "gpt_neox", "opt", "bloom", "starcoder2", "stablelm", "gptj",
                                  "falcon", "gpt_bigcode", "gpt_neo", "ministral", "ministral3", "olmo", "arcee",
                                  "exaone4", "nemotron"])
def test_sequence_classification_matches_torch(kind, tmp_path):
    cls = {"llama": tr.LlamaForSequenceClassification, "qwen2": tr.Qwen2ForSequenceClassification,
           "qwen3": tr.Qwen3ForSequenceClassification, "phi3": tr.Phi3ForSequenceClassification,
           "olmo2": tr.Olmo2ForSequenceClassification, "olmo3": tr.Olmo3ForSequenceClassification,
           "smollm3": tr.SmolLM3ForSequenceClassification, "seed_oss": tr.SeedOssForSequenceClassification,
           "glm4": tr.Glm4ForSequenceClassification, "glm": tr.GlmForSequenceClassification,
           "hunyuan_v1_dense": tr.HunYuanDenseV1ForSequenceClassification,
           "phi": tr.PhiForSequenceClassification,
           "gpt_neox": tr.GPTNeoXForSequenceClassification, "opt": tr.OPTForSequenceClassification,
           "bloom": tr.BloomForSequenceClassification, "starcoder2": tr.Starcoder2ForSequenceClassification,
           "stablelm": tr.StableLmForSequenceClassification, "gptj": tr.GPTJForSequenceClassification,
           "falcon": tr.FalconForSequenceClassification,
           "gpt_bigcode": tr.GPTBigCodeForSequenceClassification,
           "gpt_neo": tr.GPTNeoForSequenceClassification, "ministral": tr.MinistralForSequenceClassification,
           "ministral3": tr.Ministral3ForSequenceClassification, "olmo": tr.OlmoForSequenceClassification,
           "arcee": tr.ArceeForSequenceClassification, "exaone4": tr.Exaone4ForSequenceClassification,
           "nemotron": tr.NemotronForSequenceClassification}[kind]
    torch_model = save_tiny(cls, _tiny.config(kind, **TINY, num_labels=3), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == cls.__name__
    ids, mask = padded_batch(TINY["vocab_size"], seq=8, left=False)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_sharded_checkpoint_and_bfloat16(family, tmp_path):
    torch_model = save_tiny(_tiny.arch(family).torch_class, _tiny.config(family, **TINY), tmp_path,
                            max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch(TINY["vocab_size"], seq=5)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid], ref[valid], atol=1e-5)
    half = models.from_pretrained(tmp_path, dtype="bfloat16")
    assert half.model.layers[0].self_attn.o_proj.kernel.get_value().dtype == jnp.bfloat16
    out = np.asarray(half(input_ids=ids, attention_mask=mask).logits.astype(jnp.float32))
    assert np.abs(out[valid] - ref[valid]).max() < 0.1


def test_llama3_rope_frequencies_match_transformers():
    pytest.importorskip("torch")  # transformers' reference computes them with torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from peftjax.models._rope import inv_frequencies

    cfg = _tiny.config("llama", **TINY, **VARIANTS["llama3-rope"][2])
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    np.testing.assert_allclose(inv_frequencies(cfg, 16), ref.numpy(), rtol=1e-6)


# LayerNorm families too: their biases (transformers starts them at zero), GPT-NeoX's and BLOOM's fused
# per-head projections, StableLM's norm per head, OPT's narrow embeddings
@pytest.mark.parametrize("family, overrides", [
    ("qwen3", {}), ("phi3", {}), ("gpt_neox", {}), ("opt", dict(word_embed_proj_dim=16)), ("bloom", {}),
    ("starcoder2", {}), ("stablelm", {}), ("stablelm", dict(use_parallel_residual=True)), ("gptj", {}), ("falcon", {}),
    ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, bias=True)),
    ("falcon", dict(alibi=True, multi_query=False, parallel_attn=False)), ("gpt_bigcode", {}),
    ("gpt_bigcode", dict(multi_query=False)), ("gpt_neo", dict(attention_types=[[["local"], 2]])),
    ("exaone4", {}), ("apertus", {}), ("nemotron", {}), ("hunyuan_v1_dense", {})])
def test_every_weight_is_read_where_transformers_reads_it(family, overrides, tmp_path):
    """All weights random, norms too (transformers starts them at one), so a swapped q_norm/k_norm,
    a fused projection split in the wrong order or a per-head norm on the wrong side of RoPE (Hunyuan's
    after it) shows; then scanned and rematerialised, the same."""
    torch.manual_seed(0)
    torch_model = _tiny.arch(family).torch_class(_tiny.config(family, **TINY, **overrides)).eval()
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
    torch_model.save_pretrained(tmp_path)
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    for options in ({}, dict(scan_layers=True, remat="full")):
        model = models.from_pretrained(tmp_path, **options)
        out = np.asarray(_forward(model, bool(options), input_ids=ids, attention_mask=mask).logits)[valid]
        np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-5)
    # a fused weight goes back to transformers unchanged
    model.save_pretrained(tmp_path / "out")
    np.testing.assert_allclose(
        torch_logits(type(torch_model).from_pretrained(tmp_path / "out").eval(), input_ids=ids, attention_mask=mask)[valid],
        ref, atol=1e-6, rtol=0)


# name -> (family, config overrides); every threshold is 8 positions, so the 6- and 12-token calls
# below fall on either side of it (dynamic grows its base, longrope switches to its long factors)
ROPE_SCALINGS = {
    "yarn": ("llama", dict(max_position_embeddings=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8))),
    "yarn-mscale": ("qwen3", dict(max_position_embeddings=32, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=8, mscale=0.7,
        mscale_all_dim=1.0, beta_fast=16, beta_slow=2))),
    "dynamic": ("qwen3", dict(max_position_embeddings=8, rope_parameters=dict(
        rope_type="dynamic", rope_theta=10000.0, factor=3.0))),
    "longrope": ("phi3", dict(max_position_embeddings=32, original_max_position_embeddings=8, rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1 + 0.1 * i for i in range(8)],
        long_factor=[1 + 0.5 * i for i in range(8)]))),
    "longrope-partial": ("phi3", dict(max_position_embeddings=32, original_max_position_embeddings=8,
                                      rope_parameters=dict(rope_type="longrope", rope_theta=10000.0,
                                                           partial_rotary_factor=0.5,
                                                           short_factor=[1.0, 1.2, 1.5, 2.0],
                                                           long_factor=[1.0, 2.0, 4.0, 8.0]))),
}


@pytest.mark.parametrize("name", sorted(ROPE_SCALINGS))
def test_rope_scalings_match_transformers(name, tmp_path):
    """cos/sin against transformers' rotary module (scaling factor included), then the logits."""
    family, extra = ROPE_SCALINGS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = save_tiny(_tiny.arch(family).torch_class, _tiny.config(family, **TINY, **extra), tmp_path)
    model = models.from_pretrained(tmp_path)
    plain = []
    for seq in (6, 12):
        rotary = type(torch_model.model.rotary_emb)(torch_model.config)  # fresh: no state from another call
        with torch.no_grad():
            cos, sin = rotary(torch.zeros(1), torch.arange(seq)[None])
        for positions in (jnp.arange(seq)[None], np.arange(seq)[None]):  # traced, and known while tracing
            ours = model.model.rotary.cos_sin(positions, jnp.float32)
            np.testing.assert_allclose(np.asarray(ours[0]), cos.numpy(), atol=2e-6, rtol=0)
            np.testing.assert_allclose(np.asarray(ours[1]), sin.numpy(), atol=2e-6, rtol=0)
        uneven = np.stack([np.arange(seq), np.arange(seq) + 5])  # host rows that differ: each its own
        host, traced = model.model.rotary.cos_sin(uneven, jnp.float32), model.model.rotary.cos_sin(
            jnp.asarray(uneven), jnp.float32)
        for a, b in zip(host, traced):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-7, rtol=0)
        ids, mask = padded_batch(TINY["vocab_size"], seq=seq)
        valid = mask.astype(bool)
        ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
        for jit in (True,) if seq == 6 else (False, True):  # eagerly once: op by op is slow here
            out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask).logits)
            np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)
        unscaled = models.from_pretrained(tmp_path, rope_parameters=None, rope_scaling=None)
        plain.append(np.asarray(_forward(unscaled, True, input_ids=ids, attention_mask=mask).logits)[valid])
        assert np.abs(plain[-1] - ref[valid]).max() > 1e-4 or seq == 6 and name == "dynamic"  # the scaling acts


# Phi-3 LongRoPE on _tiny's phi3, factors far apart so a key rotated with the wrong set shows
LONGROPE = dict(max_position_embeddings=32, original_max_position_embeddings=8, initializer_range=0.2,
                rope_parameters=dict(rope_type="longrope", rope_theta=10000.0, short_factor=[1.0, 1.2, 1.5, 2.0],
                                     long_factor=[1.0, 4.0, 16.0, 64.0]))
VOCAB = _tiny.FAMILIES["phi3"][2]["vocab_size"]


@pytest.fixture(scope="module")
def longrope(tmp_path_factory):
    path = tmp_path_factory.mktemp("longrope")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers: "set `factor` instead of original_max_position_embeddings"
        torch_model = save_tiny(tr.Phi3ForCausalLM, _tiny.config("phi3", **LONGROPE), path)
    return torch_model, models.from_pretrained(path), path


def _hf_generate(torch_model, ids, mask, new, **kwargs):
    with torch.no_grad():
        return torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=new,
                                    do_sample=False, pad_token_id=0, **kwargs).numpy()


def test_longrope_generation_across_the_switch_matches_transformers(longrope):
    """5 padded prompt tokens + 8 cross original_max_position_embeddings=8 at step 3, where
    transformers' Phi-3 drops its cache and reruns the sequence with the long factors; row 1 ends
    at an EOS before that, so its padding is rerun too. A 9-token prompt: long factors throughout."""
    torch_model, model, _ = longrope
    ids, mask = padded_batch(VOCAB, batch=3, seq=5)
    eos = int(_hf_generate(torch_model, ids, mask, 8)[1, 6])  # row 1's second token
    ref = _hf_generate(torch_model, ids, mask, 8, eos_token_id=eos)
    assert ref.shape == (3, 13) and (ref[1, 7:] == 0).all() and (ref[0, 5:] != eos).all()
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0), ref)
    ours, theirs = Recorder(), Recorder()  # a streamer gets the rerun step's tokens too, as transformers'
    model.generate(ids, mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0, streamer=ours)
    _hf_generate(torch_model, ids, mask, 8, eos_token_id=eos, streamer=theirs)
    ours.assert_same(theirs)
    ids, mask = padded_batch(VOCAB, batch=2, seq=9)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=4, pad_token_id=0),
                                  _hf_generate(torch_model, ids, mask, 4))
    # beam search: the long factors throughout, as transformers'; across the switch it is refused
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=4, pad_token_id=0, num_beams=3),
                                  _hf_generate(torch_model, ids, mask, 4, num_beams=3))
    ids, mask = padded_batch(VOCAB, batch=2, seq=5)
    with pytest.raises(NotImplementedError, match=r"beam search past Phi3ForCausalLM's cache rerun \(LongRoPE"):
        model.generate(ids, mask, max_new_tokens=8, num_beams=2)


def test_longrope_sampling_across_the_switch_draws_the_same_keys(longrope):
    """The rerun step splits the key as any step does: the tokens before the switch are those of a
    generation that stops short of it, and a seed repeats."""
    _, model, _ = longrope
    ids, mask = padded_batch(VOCAB, batch=2, seq=5)
    kw = dict(do_sample=True, temperature=2.0, seed=3)
    long = model.generate(ids, mask, max_new_tokens=8, **kw)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=8, **kw), long)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=3, **kw), long[:, :8])


def _torch_greedy_embeds(torch_model, embeds, mask, new):
    """No cache: the whole sequence (prompt embeddings, then the generated tokens') every step, so
    every key is rotated with the factors of the current length (what the rerun restores)."""
    embeds, mask, tokens = torch.tensor(np.asarray(embeds)), torch.tensor(mask), []
    with torch.no_grad():
        for _ in range(new):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            logits = torch_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
            token = logits[:, -1].argmax(-1)
            tokens.append(token)
            embeds = torch.cat([embeds, torch_model.model.embed_tokens(token)[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(tokens, 1).numpy()


def test_longrope_generation_from_inputs_embeds_reruns_the_embeddings(longrope):
    """An ``inputs_embeds`` prompt is rerun from its embeddings (transformers' generate would rerun
    ``input_ids``' own embeddings instead): equal to no-cache greedy decoding in transformers,
    which equals transformers' generate on token ids."""
    torch_model, model, _ = longrope
    ids, mask = padded_batch(VOCAB, batch=2, seq=5)
    table = torch_model.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(_torch_greedy_embeds(torch_model, table[ids], mask, 8),
                                  _hf_generate(torch_model, ids, mask, 8, eos_token_id=None)[:, 5:])
    embeds = (table[ids] + np.random.RandomState(0).randn(*table[ids].shape)).astype(np.float32)
    ref = _torch_greedy_embeds(torch_model, embeds, mask, 8)
    out = model.generate(ids, mask, max_new_tokens=8, inputs_embeds=embeds, eos_token_id=[])
    np.testing.assert_array_equal(out[:, 5:], ref)


def test_longrope_generation_with_lora_matches_peft_and_prefix_tuning_is_refused(longrope, tmp_path):
    torch_model, _, path = longrope
    peft = pytest.importorskip("peft")
    import peftjax

    config = dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    pm = peft.get_peft_model(tr.Phi3ForCausalLM.from_pretrained(path).eval(), peft.LoraConfig(**config)).eval()
    pm.save_pretrained(tmp_path / "lora")
    ids, mask = padded_batch(VOCAB, batch=3, seq=5)
    with torch.no_grad():
        ref = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                          do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    assert (ref != _hf_generate(torch_model, ids, mask, 8, eos_token_id=None)).any()  # the adapter acts
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "lora")
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=8, pad_token_id=0), ref)
    prefix = peftjax.get_peft_model(models.from_pretrained(path),
                                    peftjax.PrefixTuningConfig(num_virtual_tokens=2, task_type="CAUSAL_LM"))
    refused = r"prefix-tuning adapter \(2 virtual tokens\).*original_max_position_embeddings=8"
    with pytest.raises(ValueError, match=refused):
        prefix.generate(ids, mask, max_new_tokens=8)


def test_dynamic_rope_generation_matches_transformers_and_later_calls_equal_a_fresh_model(tmp_path):
    """Greedy generation from 6 to 14 tokens (past max_position_embeddings=8: every step grows the
    base) equals transformers'. transformers' rotary then keeps the frequencies grown for 13
    positions, so its next 10-token call differs from a fresh model's; ours is stateless: each call
    equals a fresh transformers model."""
    family, extra = ROPE_SCALINGS["dynamic"]
    torch_model = save_tiny(_tiny.arch(family).torch_class, _tiny.config(family, **TINY, **extra), tmp_path)
    model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=6)
    ref = _hf_generate(torch_model, ids, mask, 8)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=8, pad_token_id=0), ref)
    assert torch_model.model.rotary_emb.max_seq_len_cached == 13
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=10)
    valid = mask.astype(bool)
    stale = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    fresh = torch_logits(type(torch_model).from_pretrained(tmp_path).eval(), input_ids=ids, attention_mask=mask)[valid]
    assert np.abs(stale - fresh).max() > 1e-4  # transformers' state shows
    ours = np.asarray(_forward(model, True, input_ids=ids, attention_mask=mask).logits)[valid]
    np.testing.assert_allclose(ours, fresh, atol=1e-5, rtol=0)


def test_a_scaling_without_its_fields_is_named(tmp_path):
    config = models.ModelConfig("phi3", **_tiny.fields("phi3", rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 4)))
    with pytest.raises(ValueError, match=r"longrope.*\['long_factor'\]"):
        models.Phi3ForCausalLM.from_config(config)
    config = models.ModelConfig("llama", **_tiny.fields("llama", rope_parameters=dict(rope_type="ntk-by-parts")))
    with pytest.raises(ValueError, match="'ntk-by-parts' is not supported; supported: .*'longrope'"):
        models.LlamaForCausalLM.from_config(config)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_src")
    save_tiny(tr.LlamaForCausalLM, _tiny.config("llama", **TINY), path)
    return path


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file

    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_directory_config_and_weights(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        models.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors.*\.bin"):
        models.from_pretrained(tmp_path)


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blenderbot"}))
    with pytest.raises(ValueError, match=r"'blenderbot'.*supported.*llama"):
        models.from_pretrained(tmp_path)


def test_missing_and_misshaped_weights_name_the_key(tmp_path, llama_dir):
    key = "model.layers.1.self_attn.k_proj.weight"
    missing = _rewrite(llama_dir, tmp_path / "missing", lambda sd: sd.pop(key))
    with pytest.raises(models.CheckpointError, match=key.replace(".", r"\.")):
        models.from_pretrained(missing)

    def reshape(sd):
        sd[key] = sd[key][:16].clone()

    bad = _rewrite(llama_dir, tmp_path / "bad", reshape)
    with pytest.raises(models.CheckpointError, match=r"k_proj\.weight: expected shape \(32, 64\), found \(16, 64\)"):
        models.from_pretrained(bad)

    def integer(sd):
        sd[key] = sd[key].to(torch.int32)

    ints = _rewrite(llama_dir, tmp_path / "ints", integer)
    with pytest.raises(models.CheckpointError, match="float"):
        models.from_pretrained(ints)


def test_truncated_weights_file(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    data = (llama_dir / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        models.from_pretrained(tmp_path)


def test_unexpected_keys_warn(tmp_path, llama_dir):
    def extra(sd):
        sd["model.layers.0.mlp.extra.weight"] = torch.zeros(2)

    path = _rewrite(llama_dir, tmp_path / "extra", extra)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models.from_pretrained(path)
    assert any("extra.weight" in str(w.message) for w in caught)


def test_numpy_and_list_inputs(llama_dir):
    model = models.from_pretrained(llama_dir)
    a = model(input_ids=[[1, 2, 3]]).logits
    b = model(input_ids=jnp.array([[1, 2, 3]])).logits
    assert a.shape == (1, 3, TINY["vocab_size"])
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert jax.tree.leaves(nnx.state(model, nnx.Param))  # the model is a plain NNX module with params


@pytest.mark.parametrize(("family", "overrides", "named"), [
    ("phi3", dict(hidden_act="gelu_new"), "hidden_act 'gelu_new'"),
    ("qwen3", dict(hidden_act="relu"), "hidden_act 'relu'"),
    ("qwen3", dict(layer_types=["full_attention", "chunked_attention"]), r"layer_types \['chunked_attention'\]"),
    ("olmo3", dict(layer_types=["sliding_attention", "chunked_attention"]), r"layer_types \['chunked_attention'\]"),
    ("olmo3", dict(layer_types=["full_attention"]), "layer_types has 1 entries for num_hidden_layers=2"),
    ("olmo3", dict(sliding_window=None), "sliding_attention layers but sliding_window is None"),
    ("olmo3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10.0}),
     r"rope_parameters must map layer types .*found keys \['rope_theta', 'rope_type'\]"),
    ("smollm3", dict(no_rope_layers=[1, 0, 1]), "no_rope_layers has 3 entries for num_hidden_layers=2"),
    ("smollm3", dict(layer_types=["full_attention", "sliding_attention"], sliding_window=None),
     "sliding_attention layers but sliding_window is None"),
    ("gpt_neox", dict(num_key_value_heads=2), "num_key_value_heads must be num_attention_heads"),
    ("gpt_neox", dict(hidden_act="swish_unknown"), "hidden_act 'swish_unknown' is not supported"),
    ("opt", dict(layerdrop=0.1), "layerdrop 0.1"),
    ("phi", dict(tie_word_embeddings=True), r"tie_word_embeddings=True is not supported \(PhiForCausalLM's LM head"),
    ("gptj", dict(tie_word_embeddings=True), r"tie_word_embeddings=True is not supported \(GPTJForCausalLM's LM"),
    ("gptj", dict(rotary_dim=None), "rotary_dim must be set"),
    ("gpt_bigcode", dict(add_cross_attention=True, multi_query=False), "add_cross_attention=True .* not implemented"),
    ("gpt_neo", dict(attention_layers=["global", "sparse"]), r"attention_layers \['sparse'\] are not supported"),
    ("ministral3", dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
     r"ministral3: its queries are scaled by rope_parameters' llama_4_scaling_beta .*\['llama_4_scaling_beta', "),
    ("opt", dict(activation_function="relu7"), "activation_function 'relu7' is not supported"),
])
def test_unimplemented_options_are_named(family, overrides, named):
    cls = getattr(models, _tiny.FAMILIES[family][1])
    with pytest.raises(ValueError, match=named):
        cls.from_config(models.ModelConfig(family, **_tiny.fields(family, **overrides)))


def test_gpt_neo_s_global_and_local_layers_do_not_scan_together(tmp_path):
    """GPT-Neo's alternating global and local layers take different masks: ``scan_layers=True`` is
    refused by name (one window throughout scans: ``test_every_weight_is_read_where_transformers_reads_it``)."""
    _tiny.save(_tiny.arch("gpt_neo"), tmp_path)
    with pytest.raises(ValueError, match=r"scan_layers=True needs one attention window for all layers; found "
                                         r"\[None, 3\]"):
        models.from_pretrained(tmp_path, scan_layers=True)


@pytest.mark.parametrize(("family", "rates"), [
    ("llama", dict(attention_dropout=1.0)),
    ("phi3", dict(resid_pdrop=1.0)),
    ("gemma2", dict(attention_dropout=1.0)),
    ("gpt_neox", dict(attention_dropout=1.0)),
    ("gpt_neox", dict(hidden_dropout=1.0)),  # the embeddings and both branches' outputs
    ("opt", dict(attention_dropout=1.0)),
    ("opt", dict(dropout=1.0)),  # both branches' outputs
    ("bloom", dict(attention_dropout=1.0)),
    ("bloom", dict(hidden_dropout=1.0)),  # both branches' outputs
    ("starcoder2", dict(residual_dropout=1.0)),  # both branches' outputs
    ("starcoder2", dict(embedding_dropout=1.0)),
    ("stablelm", dict(attention_dropout=1.0)),
    ("stablelm", dict(hidden_dropout=1.0)),  # the MLP's output only
    ("gptj", dict(attn_pdrop=1.0)),
    ("gptj", dict(resid_pdrop=1.0)),  # both branches' outputs
    ("gptj", dict(embd_pdrop=1.0)),
    ("falcon", dict(hidden_dropout=1.0)),  # the two parallel branches' sum
    ("falcon", dict(attention_dropout=1.0, parallel_attn=False, multi_query=False)),  # the attention's output too
    ("gpt_bigcode", dict(attn_pdrop=1.0)),
    ("gpt_bigcode", dict(resid_pdrop=1.0)),  # both branches' outputs
    ("gpt_bigcode", dict(embd_pdrop=1.0)),
    ("gpt_neo", dict(attention_dropout=1.0)),
    ("gpt_neo", dict(resid_dropout=1.0)),  # both branches' outputs
    ("gpt_neo", dict(embed_dropout=1.0)),
    ("nemotron", dict(attention_dropout=1.0)),
])
def test_base_model_dropout_equals_transformers_train_mode(family, rates, tmp_path):
    """At rate 1 transformers' ``.train()`` forward is deterministic (every probability, or every
    branch output, is zeroed), so it is an exact oracle for where the dropout sits."""
    config = _tiny.config(family, **TINY, **rates)
    config._attn_implementation = "eager"  # the dropout transformers' eager attention applies
    torch_model = save_tiny(_tiny.arch(family).torch_class, config, tmp_path)
    model = models.from_pretrained(tmp_path)
    ids, mask = padded_batch(TINY["vocab_size"], seq=6, left=False)
    valid = mask.astype(bool)
    torch_model.train()
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    trained = np.asarray(model(input_ids=ids, attention_mask=mask, dropout_rng=jax.random.key(0)).logits)
    np.testing.assert_allclose(trained[valid], ref[valid], atol=1e-5)
    torch_model.eval()
    evaluated = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(evaluated[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               atol=1e-5)
    assert np.abs(trained - evaluated)[valid].max() > 1e-2


def test_base_model_dropout_draws_per_key_and_scans_like_the_loop(tmp_path):
    """Phi-3 at rate 0.3: a key changes the output (and nothing without one), the same key gives
    the same masks whether the layers loop or scan (under remat), and the gradient is finite."""
    config = models.ModelConfig("phi3", **_tiny.fields("phi3", resid_pdrop=0.3, attention_dropout=0.3))
    looped = models.Phi3ForCausalLM.from_config(config)
    looped.save_pretrained(tmp_path)
    scanned = models.from_pretrained(tmp_path, scan_layers=True, remat="full")
    ids = jnp.array([[3, 5, 7, 9, 11]])
    key = jax.random.key(1)
    logits = nnx.jit(lambda m, k: m(input_ids=ids, dropout_rng=k).logits)
    base = nnx.jit(lambda m: m(input_ids=ids).logits)
    a = logits(looped, key)
    assert not np.allclose(a, base(looped), atol=1e-3)
    np.testing.assert_array_equal(a, logits(looped, key))
    assert not np.allclose(a, logits(looped, jax.random.key(2)), atol=1e-3)
    np.testing.assert_allclose(logits(scanned, key), a, atol=1e-5)
    np.testing.assert_allclose(base(scanned), base(looped), atol=1e-5)

    def loss(model):
        return model(input_ids=ids, labels=ids, dropout_rng=key).loss

    grads = nnx.jit(nnx.grad(loss))(scanned)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_unknown_config_override_is_an_error(llama_dir):
    with pytest.raises(TypeError, match="num_label"):
        models.from_pretrained(llama_dir, num_label=2)


def test_rope_of_a_call_without_positions_is_a_constant_of_the_compiled_step(tmp_path):
    """Without ``position_ids`` (and without a cache) the positions are known while tracing, so RoPE's
    cos and sin are NumPy constants: the compiled training step computes no cosine or sine (XLA
    would otherwise compute them inside each fusion reading them, per head, per layer, forward and
    backward). The same positions passed as ``position_ids`` are traced: they compute them, and the
    loss and gradients agree. The host values against transformers: ``test_rope_scalings_match_transformers``."""
    import optax

    import peftjax

    save_tiny(tr.LlamaForCausalLM, _tiny.config("llama", **TINY), tmp_path)
    peft_model = peftjax.get_peft_model(models.from_pretrained(tmp_path),
                                        peftjax.LoraConfig(r=4, target_modules=["q_proj", "k_proj"]))
    graphdef, adapters, base = peftjax.split(peft_model.base_model)
    adapters = jax.tree.map(lambda a: a + 0.01, adapters)  # B nonzero: q and k's gradients reach A
    tx = optax.sgd(1.0)
    ids, mask = padded_batch(TINY["vocab_size"], seq=12)
    implicit = _tiny.batch(ids, mask)
    explicit = {**implicit, "position_ids": jnp.broadcast_to(jnp.arange(12), ids.shape)}
    results = []
    for batch in (implicit, explicit):
        step = peftjax.make_train_step(graphdef, tx)
        start = jax.tree.map(jnp.copy, adapters)
        compiled = step.lower(start, tx.init(start), base, batch, None).compile()
        new, _, loss = compiled(start, tx.init(start), base, batch, None)  # the program read below
        hlo = compiled.as_text()
        results.append((hlo.count(" cosine("), hlo.count(" sine("), float(loss), new))
    assert results[0][:2] == (0, 0) and results[1][0] > 0 and results[1][1] > 0
    assert abs(results[0][2] - results[1][2]) < 1e-6
    for a, b in zip(jax.tree.leaves(results[0][3]), jax.tree.leaves(results[1][3])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)


@pytest.mark.parametrize("causal", sorted(set(VARIANTS) - {*SAME_ATTENTION, "llama3-rope"}), indirect=True)
def test_long_rows_attend_in_causal_blocks_and_match_torch_with_gradients(causal):
    torch_model, model, _ = causal
    assert_long_rows_match_torch(torch_model, model, TINY["vocab_size"])


@pytest.mark.parametrize("variant", ["llama", "mistral-window", "phi3-partial-window"])
def test_long_prompts_prefill_in_causal_blocks_and_generate_as_transformers(variant, tmp_path):
    """An untied head, a sliding window, fused projections with partial RoPE (_torch_models). The
    vocabulary (120) is no other width of these models, so a [batch, seq, 120] array is logits."""
    family, model_cls, extra = VARIANTS[variant]
    torch_model = save_tiny(model_cls, _tiny.config(family, **{**TINY, "vocab_size": 120}, **extra), tmp_path)
    assert_long_prompts_generate_as_torch(torch_model, models.from_pretrained(tmp_path), 120)


def test_logits_to_keep_is_checked(causal):
    _, model, _ = causal
    ids, mask = padded_batch(TINY["vocab_size"])
    full = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    picked = model(input_ids=ids, attention_mask=mask, logits_to_keep=np.array([0, 4, 8])).logits
    np.testing.assert_array_equal(np.asarray(picked), full[:, [0, 4, 8]])
    np.testing.assert_array_equal(np.asarray(model(input_ids=ids, logits_to_keep=0).logits).shape, full.shape)
    for bad, message in ((-1, "must be >= 0"), (np.array([[1]]), "1-D integer indices"),
                         (np.array([0.5]), "1-D integer indices")):
        with pytest.raises(ValueError, match=message):
            model(input_ids=ids, logits_to_keep=bad)
    with pytest.raises(ValueError, match="labels need every position"):
        model(input_ids=ids, labels=ids, logits_to_keep=1)


@pytest.mark.parametrize("causal", ["olmo2-bias", "olmo3-window", "smollm3-nope-window", "granite-multipliers",
                                    "seed_oss-biases", "glm4-pairs", "ernie4_5-biases", "cohere-qk-norm",
                                    "cohere2-nope-window", "phi-partial-qk-norm", "gpt_neox-parallel",
                                    "gpt_neox-sequential", "opt-pre-norm", "opt-350m-layout", "bloom-alibi",
                                    "bloom-post-norm-residual", "starcoder2-window", "stablelm-qk-norm",
                                    "stablelm-parallel", "gptj-pairs", "falcon-40b", "falcon-rw-alibi"], indirect=True)
def test_layers_of_each_kind_scan_together_and_match_torch(causal):
    """OLMo 3's sliding and global layers (a RoPE base each) and SmolLM3's RoPE and NoPE layers,
    stacked in one scan under remat (OLMo 2's and Granite's layers too): the logits, the loss and
    every weight's gradient are transformers'."""
    torch_model, _, path = causal
    scanned = models.from_pretrained(path, scan_layers=True, remat="full")
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    valid = mask.astype(bool)
    out = np.asarray(_forward(scanned, True, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               atol=1e-5, rtol=0)
    ids, mask = padded_batch(TINY["vocab_size"], seq=9, left=False)  # no label read at a padded position
    labels = np.where(mask == 1, ids, -100)
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p, rest)(input_ids=ids, attention_mask=mask, labels=labels).loss))(params)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref.loss.backward()
    assert abs(float(value) - ref.loss.item()) <= 1e-5
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), torch_model)
