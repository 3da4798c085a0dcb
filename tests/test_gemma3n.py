"""Gemma 3n's text model against PyTorch transformers: logits, loss, every weight's gradient,
generation, packed rows, checkpoints both ways (the Hub's vision-language layout too), LoRA both ways
with PEFT, and the options that are refused.

The tiny config (``_tiny.FAMILIES["gemma3n_text"]``) has every branch of transformers'
``Gemma3nTextModel``: three AltUp streams with the second active, LAuReL, sliding and global layers,
two layers reading earlier layers' keys, MLPs of two widths with two sparsity targets, per-layer
embeddings whose table leaves the last ids out, and capped logits. Every weight is random (norms
around one, ``correct_output_scale`` around zero), so a stream mixed the wrong way round, a missing
rescale or a misread weight shows.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import (
    assert_all_linear_lora_both_ways,
    assert_grads_match_torch,
    assert_packed_rows_as_alone,
    assert_transformers_reloads,
    lazy,
    padded_batch,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.io import read_safetensors, write_safetensors

torch = lazy("torch")  # the PyTorch oracle: a test that uses it skips without it
VOCAB = 96
PER_LAYER_VOCAB = 88  # the per-layer table's rows: ids 88..95 read its row 0
# unscaled attention scores (q and k are normed instead) magnify float32 rounding, as in Gemma 4
TOLERANCE = dict(atol=2e-5, rtol=0)


def _random_model(**overrides):
    config = _tiny.config("gemma3n_text", **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = tr.Gemma3nForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn_like(p))
    return model


def _batch(left: bool = True):
    """A padded batch whose rows hold ids beyond the per-layer table (88..95: its row 0)."""
    ids, mask = padded_batch(VOCAB, seq=9, left=left)
    ids[:, -2:] = [[90, 95], [88, 93], [94, 89]]
    return ids, mask


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory):
    """(transformers model, its checkpoint directory, peftjax model loaded from it)."""
    torch_model = _random_model()
    path = tmp_path_factory.mktemp("gemma3n_text")
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


def _forward(model, jit, **inputs):
    if not jit:
        return model(**inputs)
    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def test_logits_and_loss_match_transformers(gemma3n, jit):
    torch_model, _, model = gemma3n
    assert type(model).__name__ == "Gemma3nForCausalLM"
    ids, mask = _batch()  # 9 tokens: the sliding layers' window (4) cuts in
    valid = mask.astype(bool)
    out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               **TOLERANCE)
    ids, mask = _batch(left=False)  # right padding for the loss
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          labels=torch.tensor(labels)).loss.item()
    assert abs(float(_forward(model, jit, input_ids=ids, attention_mask=mask, labels=labels).loss) - ref) <= 1e-5


def test_every_weight_s_gradient_matches_transformers_with_rematerialised_layers(gemma3n):
    """The loss's gradient in every weight (AltUp's coefficients and router, LAuReL, the per-layer
    embeddings and projections, the streams' projections in and out) against torch's autograd."""
    torch_model, path, _ = gemma3n
    # ids inside the per-layer table: transformers' tables take no gradient in their padding row
    # (row 0, which the ids beyond the table read), peftjax's do (module docstring)
    ids, mask = padded_batch(PER_LAYER_VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                       labels=torch.tensor(labels)).loss
    loss.backward()
    model = models.from_pretrained(path, remat="full")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    value, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(
        input_ids=ids, attention_mask=mask, labels=labels).loss))(params)
    assert abs(float(value) - loss.item()) <= 1e-5
    names = {name for name, p in torch_model.named_parameters() if p.grad is not None}
    assert {"model.layers.1.altup.prediction_coefs.weight", "model.layers.0.laurel.linear_left.weight",
            "model.altup_unembed_projections.1.weight", "model.embed_tokens_per_layer.weight",
            "model.layers.3.altup.correct_output_scale"} <= names
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), torch_model, atol=2e-5)
    torch_model.zero_grad(set_to_none=True)


def test_a_stream_projected_to_zero_stays_zero_as_in_transformers(tmp_path):
    """A stream's root mean square is floored (at ``sqrt(1e-5)``) before rescaling: a projection of
    all zeros gives a zero stream, not 0 / 0."""
    torch_model = _random_model()
    with torch.no_grad():
        torch_model.model.altup_projections[0].weight.zero_()
    torch_model.save_pretrained(tmp_path)
    ids, mask = _batch()
    valid = mask.astype(bool)
    out = np.asarray(models.from_pretrained(tmp_path)(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               **TOLERANCE)


def test_a_row_of_padding_alone_leaves_the_gradients_finite_and_unchanged(tmp_path):
    """With transformers' initialisation the padding token's embedding is zero, so a row of padding
    alone (a batch filled out, a packed row's tail) carries zero streams and a constant MLP gate,
    where ``sqrt``'s derivative is infinite: transformers' training gets NaN gradients there. The
    adapters here (on the sparse MLPs' gates, LAuReL, the values) get the gradients of the batch
    without that row."""
    torch_model = _tiny.save("gemma3n_text", tmp_path)
    assert float(torch_model.model.embed_tokens.weight[0].abs().max()) == 0.0
    peft_model = peftjax.get_peft_model(models.from_pretrained(tmp_path), peftjax.LoraConfig(
        r=2, target_modules=["v_proj", "laurel.linear_left", "gate_proj"], init_lora_weights=False))
    graphdef, adapters, base = peftjax.split(peft_model.base_model)

    def gradients(ids, mask):
        labels = np.where(mask == 1, ids, -100)
        return jax.jit(jax.grad(lambda a: peftjax.combine(graphdef, a, base)(
            input_ids=ids, attention_mask=mask, labels=labels).loss))(adapters)

    ids, mask = padded_batch(PER_LAYER_VOCAB, seq=9, left=False)
    padded = gradients(np.concatenate([ids, np.zeros_like(ids[:1])]), np.concatenate([mask, np.zeros_like(mask[:1])]))
    for with_row, without in zip(jax.tree.leaves(padded), jax.tree.leaves(gradients(ids, mask))):
        assert np.isfinite(np.asarray(with_row)).all()
        np.testing.assert_allclose(np.asarray(with_row), np.asarray(without), atol=1e-6, rtol=1e-5)


def test_greedy_generation_matches_transformers(gemma3n):
    """The KV cache: sliding layers, global ones, and the layers reading the keys of earlier ones."""
    torch_model, _, model = gemma3n
    ids, mask = padded_batch(VOCAB, batch=2, seq=6)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=8, pad_token_id=0), ref)


def test_packed_rows_get_what_each_sequence_gets_alone(gemma3n):
    torch_model, _, model = gemma3n
    assert_packed_rows_as_alone(model, torch_model, TOLERANCE)


def test_saved_checkpoint_loads_in_transformers(gemma3n, tmp_path):
    torch_model, _, model = gemma3n
    assert_transformers_reloads(torch_model, model, tmp_path)


def test_the_hub_s_vision_language_checkpoint_reads_as_its_text_model(gemma3n, tmp_path):
    """The Hub's Gemma 3n files are ``Gemma3nForConditionalGeneration``'s: the text model under
    ``model.language_model.``, beside vision and audio towers (built here by renaming, as
    transformers' class needs timm to build its vision tower), and the config's ``text_config``.
    They load as the text model with its logits, and a LoRA adapter made on them carries the
    vision-language class's module names, as PEFT names them there."""
    torch_model, path, model = gemma3n
    weights, _ = read_safetensors(path / "model.safetensors")
    hub = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
    hub.update({"model.vision_tower.timm_model.conv_stem.conv.weight": np.zeros((2, 3), np.float32),
                "model.audio_tower.conformer.0.norm.weight": np.zeros(2, np.float32),
                "model.embed_vision.embedding.weight": np.zeros((2, 2), np.float32),
                "model.embed_audio.embedding.weight": np.zeros((2, 2), np.float32)})
    (tmp_path / "hub").mkdir()
    write_safetensors(tmp_path / "hub" / "model.safetensors", hub, metadata={"format": "pt"})
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "hub" / "config.json").write_text(json.dumps(
        {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"], "text_config": text}))
    loaded = models.from_pretrained(tmp_path / "hub")
    assert type(loaded).__name__ == "Gemma3nForCausalLM"
    ids, mask = _batch()
    np.testing.assert_array_equal(np.asarray(loaded(input_ids=ids, attention_mask=mask).logits),
                                  np.asarray(model(input_ids=ids, attention_mask=mask).logits))
    config = peftjax.LoraConfig(r=2, target_modules=["q_proj", "laurel.linear_left"])
    peft_model = peftjax.get_peft_model(loaded, config)
    peft_model.save_pretrained(tmp_path / "adapter")
    keys = set(read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")[0])
    assert "base_model.model.model.language_model.layers.0.laurel.linear_left.lora_A.weight" in keys
    assert all(".language_model.layers." in k for k in keys)


def test_all_linear_lora_gives_peft_logits_both_ways(gemma3n, tmp_path):
    """PEFT's ``all-linear`` reaches AltUp's coefficients and router, LAuReL, the per-layer gates
    and projections and the streams' projections; made by PEFT, read here, and the other way."""
    _, path, _ = gemma3n
    # every linear moved: float32 rounding reaches 2.1e-5
    names = assert_all_linear_lora_both_ways(tr.Gemma3nForCausalLM, path, tmp_path, VOCAB, dict(atol=4e-5, rtol=0))
    for name in ("model.layers.0.altup.prediction_coefs", "model.layers.2.altup.correction_coefs",
                 "model.layers.1.altup.modality_router", "model.layers.3.laurel.linear_right",
                 "model.layers.0.per_layer_input_gate", "model.per_layer_model_projection",
                 "model.altup_projections.0", "model.altup_unembed_projections.1"):
        assert f"model.{name}" in names, name


def test_prefix_adapters_and_virtual_tokens_are_refused(gemma3n):
    """No ``prefix_kv``; virtual tokens have no ids for the per-layer embeddings."""
    _, path, _ = gemma3n
    with pytest.raises(TypeError, match="prefix_kv"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                        num_virtual_tokens=2))
    prompt = peftjax.get_peft_model(models.from_pretrained(path), peftjax.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                             num_virtual_tokens=2))
    with pytest.raises(ValueError, match="need input_ids"):
        prompt(input_ids=np.ones((1, 3), np.int32))


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(hidden_activation="relu"), "hidden_activation 'relu'"),
    (dict(intermediate_size=[48, 40]), "intermediate_size has 2 entries for num_hidden_layers=4"),
    (dict(activation_sparsity_pattern=[0.5]), "activation_sparsity_pattern has 1 entries"),
    (dict(altup_active_idx=3), "altup_active_idx=3 must index one of the altup_num_inputs=3 streams"),
    (dict(num_kv_shared_layers=4), "num_kv_shared_layers=4"),
    (dict(scan_layers=True), "scan_layers=True"),
    (dict(rope_parameters={"sliding_attention": {"rope_type": "unknown", "rope_theta": 10.0},
                           "full_attention": {"rope_type": "default", "rope_theta": 10.0}}), "unknown"),
])
def test_unimplemented_options_are_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        models.Gemma3nForCausalLM.from_config(models.ModelConfig("gemma3n_text", **_tiny.fields("gemma3n_text",
                                                                                                **overrides)))


def test_the_loss_is_transformers_training_loss_while_the_coefficients_are_inside_the_clip(gemma3n):
    """transformers' training mode clamps AltUp's coefficients to ``altup_coef_clip`` and computes the
    correction from the base weight (module docstring); inside the clip, as the checkpoint's are,
    its training loss is the one computed here."""
    torch_model, _, model = gemma3n
    ids, mask = _batch(left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.train()
    try:
        with torch.no_grad():
            ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              labels=torch.tensor(labels)).loss.item()
    finally:
        torch_model.eval()
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - ref) <= 1e-5
