"""Gemma, Gemma 2 and Gemma 3 (text) against PyTorch transformers: logits, loss, generation, scanned layers,
classification, checkpoints both ways, and the options that are refused.

Every weight is random, norms included (transformers starts Gemma's ``1 + weight`` norms at zero),
and the soft-caps are small, so a norm read as ``weight``, a missing post-norm, an uncapped logit
or a RoPE base of the wrong layer type shows at once.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import (assert_long_prompts_generate_as_torch, assert_long_rows_match_torch, lazy, padded_batch,
                           torch_logits)

from peftjax import models

torch = lazy("torch")  # the PyTorch oracle: a test that uses it skips without it

# what the tiny configs set beyond _tiny's: Gemma's legacy activation name, caps that bite (Gemma 2), and Gemma 3's two RoPEs (one
# scaled) without a final cap (its default), so its jitted loss is the one fused with the tied head,
# and with the exact GELU (Gemma 2 has the tanh one)
EXTRA = {
    # the releases' legacy "gelu", which transformers reads as the tanh GELU
    "gemma": dict(hidden_act="gelu"),
    "gemma2": dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "vaultgemma": dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3_text": dict(hidden_activation="gelu", rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
        "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}),
}
HEADS = {"gemma": "GemmaForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification", "gemma3_text": "Gemma3TextForSequenceClassification"}


# the weights' std: Gemma's pre-norm-only layers grow larger activations than Gemma 2/3's four norms
# (logits to about 7 at 0.3, where float32's rounding alone reaches 1e-5 on long rows)
SCALE = {"gemma": 0.2, "vaultgemma": 0.2}  # VaultGemma's layers pre-norm only too


def _random_model(class_name: str, family: str, **overrides):
    torch.manual_seed(0)
    model = getattr(tr, class_name)(_tiny.config(family, **EXTRA[family], **overrides)).eval()
    with torch.no_grad():
        for _, p in model.named_parameters():
            p.copy_(SCALE.get(family, 0.3) * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(EXTRA))
def gemma(request, tmp_path_factory):
    """(transformers model, its sharded checkpoint directory, peftjax model loaded from it)."""
    family = request.param
    torch_model = _random_model(_tiny.FAMILIES[family][1], family)
    path = tmp_path_factory.mktemp(family)
    torch_model.save_pretrained(path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    return torch_model, path, models.from_pretrained(path)


def _forward(model, jit, **inputs):
    if not jit:
        return model(**inputs)
    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def test_logits_and_loss_match_transformers(gemma, jit):
    torch_model, _, model = gemma
    assert type(model).__name__ == type(torch_model).__name__
    ids, mask = padded_batch(96, seq=9)  # 9 tokens: the sliding layer's window (4) cuts in
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)
    # right padding for the loss: a fully masked query row has no agreed output
    ids, mask = padded_batch(96, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref_loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                               labels=torch.tensor(labels)).loss.item()
    loss = _forward(model, jit, input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(loss) - ref_loss) <= 1e-5


def test_scanned_and_rematerialised_layers_match(gemma):
    """Sliding and global layers stacked in one scan: each picks its own mask and RoPE."""
    torch_model, path, _ = gemma
    ids, mask = padded_batch(96, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    model = models.from_pretrained(path, scan_layers=True, remat="full")
    out = np.asarray(_forward(model, True, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(gemma):
    torch_model, _, model = gemma
    ids, mask = padded_batch(96, batch=2, seq=6)
    ours = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_saved_checkpoint_loads_in_transformers_and_in_bfloat16(gemma, tmp_path):
    torch_model, path, model = gemma
    model.save_pretrained(tmp_path)
    reloaded = type(torch_model).from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(96, seq=7)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid], ref, atol=1e-6, rtol=0)
    half = models.from_pretrained(path, dtype="bfloat16")
    out = _forward(half, True, input_ids=ids, attention_mask=mask).logits
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out.astype(jnp.float32))[valid] - ref).max() < 0.1


@pytest.mark.parametrize("family", sorted(HEADS))
def test_sequence_classification_matches_transformers(family, tmp_path):
    torch_model = _random_model(HEADS[family], family, num_labels=3)
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == HEADS[family]
    ids, mask = padded_batch(96, seq=8, left=False)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = _forward(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    # PEFT's task types pick the family's classes (gemma3_text's causal LM is Gemma3ForCausalLM)
    with pytest.warns(UserWarning, match=r"unexpected keys: \['score.weight'\]"):
        causal = models.from_pretrained(tmp_path, task_type="CAUSAL_LM")
    assert type(causal).__name__ == _tiny.FAMILIES[family][1]


@pytest.mark.parametrize(("family", "overrides", "named"), [
    ("gemma", dict(hidden_act="relu"), "gemma: hidden_act 'relu' is not supported"),
    ("gemma", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma2", dict(hidden_activation="relu"), "hidden_activation 'relu'"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention"]), r"layer_types \['chunked_attention'\]"),
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(rope_parameters={"rope_type": "default", "rope_theta": 10.0}),
     r"rope_parameters must map layer types.*\['rope_theta', 'rope_type'\]"),
])
def test_unimplemented_options_are_named(family, overrides, named):
    cls = getattr(models, _tiny.FAMILIES[family][1])
    with pytest.raises(ValueError, match=named):
        cls.from_config(models.ModelConfig(family, **_tiny.fields(family, **overrides)))


def test_a_transformers_4_gemma3_checkpoint_config_loads(tmp_path):
    """A config.json from before per-type rope_parameters (legacy RoPE fields) gives transformers' logits."""
    fields = dict(_tiny.fields("gemma3_text", layer_types=None, num_hidden_layers=3), model_type="gemma3_text",
                  rope_theta=5000.0, rope_local_base_freq=50.0, sliding_window_pattern=2,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}, architectures=["Gemma3ForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(fields))
    config = tr.AutoConfig.from_pretrained(tmp_path)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    torch.manual_seed(0)
    torch_model = tr.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for _, p in torch_model.named_parameters():
            p.copy_(0.3 * torch.randn_like(p))
    torch_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(fields))  # the legacy fields, not transformers 5's
    ids, mask = padded_batch(96, seq=9)
    valid = mask.astype(bool)
    out = np.asarray(models.from_pretrained(tmp_path / "ckpt")(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               atol=1e-5, rtol=0)


def test_long_rows_attend_in_causal_blocks_and_match_transformers_with_gradients(gemma):
    """Gemma 2's capped logits and both families' sliding layers, in blocks of queries (_torch_models)."""
    torch_model, _, model = gemma
    assert_long_rows_match_torch(torch_model, model, 96)


def test_long_prompts_prefill_in_causal_blocks_and_generate_as_transformers(gemma):
    """Gemma 2's capped logits from the last position only, both families' sliding layers in the
    prefill's blocks (_torch_models)."""
    torch_model, _, model = gemma
    assert_long_prompts_generate_as_torch(torch_model, model, 96)
