"""Gemma 4's text model against PyTorch transformers: logits, loss, generation, checkpoints both
ways, and the options that are refused.

The tiny config (``_tiny.FAMILIES["gemma4_text"]``) has every branch of transformers'
``Gemma4TextModel``: sliding and global layers with different head sizes, values from the key
projection, key/value sharing layers with wide MLPs, per-layer embeddings, experts beside each MLP
and capped logits. Every weight is random (norms, ``layer_scalar`` and the router's scales around
one), so a norm read as ``1 + weight``, a missing scale or a layer reading another's keys shows.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import assert_transformers_reloads, lazy, padded_batch, torch_logits

import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it
VOCAB = 96
SCALE = 0.3  # the weights' std
# Gemma 4 does not scale its attention scores (q and k are normed instead), which magnifies float32
# rounding: cos and sin alone differ from torch's by an ulp. Logits reach 1.3e-5 of transformers'
# here; in float64 (cos and sin still float32 in both) they agree to 5e-6.
ATOL = 2e-5
LORA_NOISE = 0.05  # how far the LoRA tests move every adapter weight
# a variant with the other branches: values projected on the global layers, no per-layer
# embeddings, no experts, no cap (so the jitted loss is the one fused with the tied head);
# bidirectional attention for images only, which leaves text causal
PLAIN = dict(attention_k_eq_v=False, hidden_size_per_layer_input=0, enable_moe_block=False,
             final_logit_softcapping=None, use_double_wide_mlp=False, use_bidirectional_attention="vision")


def _random_model(**overrides):
    config = _tiny.config("gemma4_text", **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tr.Gemma4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name or "scale" in name else 0.0) + SCALE * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1.0 + SCALE * torch.randn_like(b))
    return model


@pytest.fixture(scope="module")
def gemma4(tmp_path_factory):
    """(transformers model, its sharded checkpoint directory, peftjax model loaded from it)."""
    torch_model = _random_model()
    path = tmp_path_factory.mktemp("gemma4_text")
    torch_model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return torch_model, path, models.from_pretrained(path)


def _forward(model, jit, **inputs):
    if not jit:
        return model(**inputs)
    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def _assert_logits_and_loss_match(torch_model, model, jit):
    ids, mask = padded_batch(VOCAB, seq=9)  # 9 tokens: the sliding layers' window (4) cuts in
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], ref[valid], atol=ATOL, rtol=0)
    # right padding for the loss: a fully masked query row has no agreed output
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref_loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               labels=torch.tensor(labels)).loss.item()
    loss = _forward(model, jit, input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(loss) - ref_loss) <= 1e-5


def test_logits_and_loss_match_transformers(gemma4, jit):
    torch_model, _, model = gemma4
    assert type(model).__name__ == "Gemma4ForCausalLM"
    _assert_logits_and_loss_match(torch_model, model, jit)


def test_the_other_branches_match_transformers_with_rematerialised_layers(tmp_path):
    """Values projected on the global layers, no per-layer embeddings, experts or cap (the fused
    loss), each layer under ``jax.checkpoint``."""
    torch_model = _random_model(**PLAIN)
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path, remat="full")
    assert hasattr(model.model.layers[1].self_attn, "v_proj")  # the global layer projects its values
    _assert_logits_and_loss_match(torch_model, model, jit=True)


def test_greedy_generation_matches_transformers(gemma4):
    """The KV cache: sliding layers, global ones, and the layers reading the cache of earlier ones."""
    torch_model, _, model = gemma4
    ids, mask = padded_batch(VOCAB, batch=2, seq=6)
    ours = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_saved_checkpoint_loads_in_transformers(gemma4, tmp_path):
    torch_model, _, model = gemma4
    assert_transformers_reloads(torch_model, model, tmp_path)


def test_lora_has_no_default_targets_as_in_peft(gemma4):
    """PEFT 0.22.0 maps ``gemma4`` (the vision-language model) to default targets, not ``gemma4_text``."""
    _, _, model = gemma4
    with pytest.raises(ValueError, match="target_modules"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(task_type="CAUSAL_LM"))


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(use_bidirectional_attention="all"), "use_bidirectional_attention='all'"),
    (dict(hidden_activation="relu"), "hidden_activation 'relu'"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0},
                           "full_attention": {"rope_type": "default", "rope_theta": 10.0}}),
     r"rope_parameters\['sliding_attention'\] rope_type 'linear'"),
    (dict(per_layer_config={"1": {"intermediate_size": 8}}), r"per_layer_config overrides \['intermediate_size'\]"),
    (dict(num_kv_shared_layers=4), "num_kv_shared_layers=4"),
    (dict(scan_layers=True), "scan_layers=True"),
    (dict(expert_dispatch="grouped"), "expert_dispatch='grouped'"),
    (dict(num_experts=None), r"enable_moe_block=True needs \['num_experts'\]"),
])
def test_unimplemented_options_are_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        models.Gemma4ForCausalLM.from_config(models.ModelConfig("gemma4_text", **_tiny.fields("gemma4_text",
                                                                                              **overrides)))


def test_per_layer_embeddings_need_the_ids(gemma4):
    _, _, model = gemma4
    ids, mask = padded_batch(VOCAB, seq=5)
    embeds = model.model.embed_tokens(jnp.asarray(ids))
    with pytest.raises(ValueError, match="need input_ids"):
        model(inputs_embeds=embeds, attention_mask=mask)
    with pytest.raises(ValueError, match=r"input_ids \(3, 4\) must match inputs_embeds \(3, 5\)"):
        model(input_ids=ids[:, 1:], inputs_embeds=embeds, attention_mask=mask)
    # both given and alike: the embeddings are used, the ids only for the per-layer embeddings
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, inputs_embeds=embeds, attention_mask=mask).logits),
                               np.asarray(model(input_ids=ids, attention_mask=mask).logits), atol=1e-6, rtol=0)


def _moved(tree, seed: int, scale: float):
    rng = np.random.RandomState(seed)  # NumPy's noise: no JAX op to compile per parameter shape
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)),
                        tree)


LORA_TARGETS = {
    "all-linear": dict(target_modules="all-linear"),
    # the experts' 3-D parameters through PEFT's ParamWrapper (two on one module: PEFT nests them)
    "experts": dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"]),
}


@pytest.mark.parametrize("targets", sorted(LORA_TARGETS))
def test_lora_gives_peft_logits_both_ways(gemma4, targets, tmp_path):
    """LoRA on every linear layer (PEFT's ``all-linear``: the per-layer embeddings' projections and
    the router's too) or on the experts, made by PEFT and read here, and made here and read by PEFT.
    The adapters move less than test_family_methods' (0.3): with unscaled attention scores, 0.3 on
    every linear magnifies float32 rounding to 5e-5."""
    torch_model, path, _ = gemma4
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, **LORA_TARGETS[targets])
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    base = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]

    def torch_base():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tr.Gemma4ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()

    theirs = peft.get_peft_model(torch_base(), peft.LoraConfig(task_type="CAUSAL_LM", **config))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(LORA_NOISE * torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert {s.name for s in ours.get_layer_status()} == {s.name for s in theirs.get_layer_status()}
    assert any(("experts" if targets == "experts" else "per_layer_model_projection") in s.name
               for s in ours.get_layer_status())
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid]
    out = np.asarray(_forward(ours.base_model, True, input_ids=ids, attention_mask=mask).logits)[valid]
    np.testing.assert_allclose(out, ref, atol=ATOL, rtol=0)
    assert np.abs(ref - base).max() > 1e-2  # the adapter changes the output

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="CAUSAL_LM", **config),
                                  key=jax.random.key(3))
    _, adapters, _ = peftjax.split(ours.base_model)
    ours.update(_moved(adapters, 4, LORA_NOISE))
    ours.save_pretrained(tmp_path / "here")
    out = np.asarray(_forward(ours.base_model, True, input_ids=ids, attention_mask=mask).logits)[valid]
    theirs = peft.PeftModel.from_pretrained(torch_base(), tmp_path / "here").eval()
    np.testing.assert_allclose(out, torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=ATOL, rtol=0)
    assert np.abs(out - base).max() > 1e-2


def test_prefix_and_prompt_adapters_are_refused(gemma4):
    """No ``prefix_kv`` (the layers' key shapes differ); virtual tokens have no ids for the per-layer
    embeddings (transformers' model looks them up by reversing the word embedding)."""
    _, path, _ = gemma4
    with pytest.raises(TypeError, match="prefix_kv"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                        num_virtual_tokens=2))
    prompt = peftjax.get_peft_model(models.from_pretrained(path), peftjax.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                             num_virtual_tokens=2))
    with pytest.raises(ValueError, match="need input_ids"):
        prompt(input_ids=np.ones((1, 3), np.int32))


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_prompt_adapters_without_per_layer_embeddings_give_peft_logits(method, tmp_path):
    """Without per-layer embeddings the virtual tokens need no ids: prompt and P-tuning made here,
    moved, saved, give peftjax's logits in PEFT."""
    torch_model = _random_model(hidden_size_per_layer_input=0)
    torch_model.save_pretrained(tmp_path / "base")
    fields = dict(encoder_hidden_size=24) if method == "PromptEncoderConfig" else {}
    ours = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                  getattr(peftjax, method)(task_type="CAUSAL_LM", num_virtual_tokens=4, **fields),
                                  key=jax.random.key(3))
    _, adapters, _ = peftjax.split(ours.base_model)
    ours.update(_moved(adapters, 4, 0.3))
    ours.save_pretrained(tmp_path / "here")
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = np.concatenate([np.ones((len(mask), 4), bool), mask.astype(bool)], axis=1)
    out = np.asarray(_forward(ours.base_model, True, input_ids=ids, attention_mask=mask).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_model, tmp_path / "here").eval()
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(out[valid], ref[valid], atol=ATOL, rtol=0)
    assert np.abs(out[:, 4:] - torch_logits(torch_model, input_ids=ids, attention_mask=mask))[mask == 1].max() > 1e-2
