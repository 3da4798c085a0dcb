"""Mixtral (sparse mixture of experts) against PyTorch transformers: logits, loss with the
load-balancing loss, generation, scanned layers, classification, and both checkpoint layouts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_layouts_round_trip,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
    save_tiny,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models import CheckpointError

torch = lazy("torch")
tr = lazy("transformers")
safetensors_torch = lazy("safetensors.torch")

# 4 experts, top 2; a window shorter than the batch, so Mixtral's all-layer window shows
EXTRA = dict(sliding_window=6)
VOCAB = _tiny.FAMILIES["mixtral"][2]["vocab_size"]


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(torch model, its checkpoint as transformers saves it (per-expert), the fused checkpoint, peftjax model)."""
    root = tmp_path_factory.mktemp("mixtral")
    torch_model = randomised(tr.MixtralForCausalLM(_tiny.config("mixtral", **EXTRA)).eval())
    hub, fused = save_both_layouts(torch_model, root)
    return torch_model, hub, fused, models.from_pretrained(hub)


def _forward(model, jit, **inputs):
    if not jit:
        return model(**inputs)
    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def test_logits_match_transformers_on_a_padded_batch(mixtral, jit):
    torch_model, _, _, model = mixtral
    assert type(model).__name__ == "MixtralForCausalLM"
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask).logits)[valid]
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(mixtral, tmp_path):
    torch_model, hub, fused, model = mixtral
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in keys(hub)
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def test_loss_includes_the_load_balancing_loss_as_transformers_adds_it(mixtral):
    torch_model, _, _, model = mixtral
    # right padding (see test_llama.test_loss_matches_torch); the aux loss leaves the padding out
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    t = {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    with torch.no_grad():
        ref = torch_model(**t, output_router_logits=True)
        plain = torch_model(**t).loss.item()
    assert torch_model.config.output_router_logits is False
    assert ref.loss.item() - plain > 1e-4  # the aux term is visible at this tolerance
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.aux_loss is None and out.router_logits is None and abs(float(out.loss) - plain) <= 1e-5
    step = jax.jit(lambda ids, mask, labels: model(input_ids=ids, attention_mask=mask, labels=labels,
                                                   output_router_logits=True))
    for out in (model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True),
                step(ids, mask, labels)):
        assert abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
        assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
        assert_router_logits(out.router_logits, ref.router_logits, mask)


def assert_router_logits(ours, theirs, mask):
    """Per layer ``[batch * seq, experts]``, equal on the real tokens (a padded query row attends to
    nothing, and torch's and ours fill it differently)."""
    assert isinstance(ours, tuple) and len(ours) == len(theirs) == 2
    real = mask.reshape(-1).astype(bool)
    for a, b in zip(ours, theirs):
        assert a.shape == tuple(b.shape)
        np.testing.assert_allclose(np.asarray(a)[real], b.detach().numpy()[real], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(mixtral):
    torch_model, _, _, model = mixtral
    ids, mask = padded_batch(VOCAB, seq=6)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)


def test_scanned_and_rematerialised_layers_match_transformers_with_gradients(mixtral):
    torch_model, hub, _, _ = mixtral
    scanned = models.from_pretrained(hub, scan_layers=True, remat="full", output_router_logits=True)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                      output_router_logits=True)
    ref.loss.backward()
    valid = mask.astype(bool)

    def loss(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out

    grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(scanned)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.detach().numpy()[valid], atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5 and abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
    assert_router_logits(out.router_logits, ref.router_logits, mask)  # out of the scan's stacked buffer
    # the router learns through the routing weights and the aux loss; the experts through their tokens
    mlp = grads.model.layers.layer.mlp
    for ours, name in ((mlp.gate.weight, "gate.weight"), (mlp.experts.gate_up_proj, "experts.gate_up_proj"),
                       (mlp.experts.down_proj, "experts.down_proj")):
        for i in range(2):
            theirs = torch_model.get_parameter(f"model.layers.{i}.mlp.{name}").grad.numpy()
            np.testing.assert_allclose(np.asarray(ours[...])[i], theirs, atol=1e-5, rtol=1e-4, err_msg=f"{i} {name}")
    torch_model.zero_grad(set_to_none=True)


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = save_tiny(tr.MixtralForSequenceClassification, _tiny.config("mixtral", num_labels=3), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "MixtralForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=7)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = _forward(model, True, input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_router_jitter_noise_applies_only_while_a_dropout_key_is_active(mixtral):
    torch_model, hub, _, _ = mixtral
    model = models.from_pretrained(hub, router_jitter_noise=0.5)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid], ref, atol=1e-5)
    with peftjax.dropout_key(jax.random.key(0)):
        noisy = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid]
        again = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid]
    np.testing.assert_array_equal(noisy, again)
    assert np.abs(noisy - ref).max() > 1e-2


def test_bad_checkpoints_and_configs_are_refused_by_name(mixtral, tmp_path):
    _, hub, _, _ = mixtral
    state = safetensors_torch.load_file(str(hub / "model.safetensors"))
    del state["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    (tmp_path / "bad").mkdir()
    safetensors_torch.save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((hub / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing expert keys \['model.layers.0.block_sparse_moe.experts.2.w3"):
        models.from_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be between 1 and num_local_experts=4"):
        models.from_pretrained(hub, num_experts_per_tok=5)


def test_logits_to_keep_matches_transformers(mixtral):
    torch_model, _, _, model = mixtral
    ids, mask = padded_batch(VOCAB, seq=9)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), logits_to_keep=2).logits
    out = model(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits
    assert out.shape == (3, 2, VOCAB)
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-5, rtol=0)
