"""Mamba-2 language models against PyTorch transformers and HF PEFT.

_tiny's Mamba-2: three Mamba-2 layers (4 heads of 16 in 2 groups of state 8, chunks of 4 tokens so a
9-token row spans three), the head tied to the embeddings. transformers runs its PyTorch fallbacks
of the Mamba-2 kernels here. Its float32 logits sit up to 1.1e-4 from its own float64 ones on this
model (peftjax's up to 6.7e-5): the logits are checked against the float64 run.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

import _tiny
from _torch_models import (
    assert_close_where,
    assert_matches_float64_torch,
    assert_packed_rows_as_alone,
    jitted,
    lazy,
    padded_batch,
    randomised,
    torch_logits,
)

import peftjax
from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["mamba2"][2]["vocab_size"]
TOL = dict(atol=2e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    """(torch model, its float64 twin, its checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.Mamba2ForCausalLM(_tiny.config("mamba2")).eval())
    path = tmp_path_factory.mktemp("mamba2")
    torch_model.save_pretrained(path)
    return torch_model, copy.deepcopy(torch_model).double(), path, models.from_pretrained(path)


def test_logits_loss_generation_and_scanned_gradients_match_transformers(mamba):
    """Left- and right-padded logits (eager, jitted), the loss, greedy generation (each layer's
    convolution inputs and state cached), and the layers stacked under ``scan_layers=True`` with
    rematerialisation: the same loss and every weight's gradient as torch's float64 autograd."""
    torch_model, exact, path, model = mamba
    assert_matches_float64_torch(torch_model, exact, path, model, VOCAB, TOL, {
        "backbone.layers.2.mixer.A_log", "backbone.layers.0.mixer.conv1d.weight"})


def test_packed_rows_and_the_checkpoint_both_ways(mamba, tmp_path):
    """Two packed sequences, the second starting inside a chunk, each scanned from zeros;
    ``save_pretrained`` writes transformers' keys (the head tied: none of its own), which it loads
    to the same logits; an old checkpoint's ``backbone.embedding`` loads."""
    torch_model, exact, path, model = mamba
    assert_packed_rows_as_alone(model, exact, TOL)

    model.save_pretrained(tmp_path / "ours")
    keys = set(safetensors_torch.load_file(str(tmp_path / "ours" / "model.safetensors")))
    assert keys == set(safetensors_torch.load_file(str(path / "model.safetensors")))
    assert "lm_head.weight" not in keys
    ids, mask = padded_batch(VOCAB, seq=7)
    valid = mask.astype(bool)
    reloaded = tr.Mamba2ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], atol=0, rtol=0)
    state = safetensors_torch.load_file(str(path / "model.safetensors"))
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    (tmp_path / "old").mkdir()
    safetensors_torch.save_file(state, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "old" / "config.json").write_text((path / "config.json").read_text())
    old = models.from_pretrained(tmp_path / "old")
    np.testing.assert_array_equal(np.asarray(old.backbone.embeddings.embedding[...]),
                                  np.asarray(model.backbone.embeddings.embedding[...]))


def test_lora_on_in_proj_both_ways_and_out_proj_refused_as_peft_refuses_it(mamba, tmp_path):
    """LoRA on the mixers' ``in_proj``: made here, PEFT's logits; made by PEFT, its logits here.
    ``out_proj`` is refused on both sides. (Logits to this model's float32 rounding, 2e-4: see the
    module docstring.)"""
    torch_model, _, path, model = mamba
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules=["in_proj"], init_lora_weights=False))
    ours.save_pretrained(tmp_path / "ours")
    logits = ours(input_ids=ids, attention_mask=mask).logits
    plain = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    assert np.abs(np.asarray(logits) - plain)[mask == 1].max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "ours").eval()
        made = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2, target_modules=["in_proj"],
                                                                               init_lora_weights=False))
    assert_close_where(logits, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **TOL)
    made.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits,
                       torch_logits(made, input_ids=ids, attention_mask=mask), mask, **TOL)
    with pytest.raises(ValueError, match=r"backbone.layers.0.mixer.out_proj, .* of a Mamba-based model "
                                         r"\(model_type='mamba2'\) take no adapter"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=["out_proj"]))
    with pytest.raises(ValueError, match="incompatible with Mamba-based models"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2, target_modules=["out_proj"]))
