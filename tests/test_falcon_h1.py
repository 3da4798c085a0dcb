"""Falcon-H1 against PyTorch transformers and HF PEFT.

_tiny's Falcon-H1: 2 layers each running Mamba-2 (its own width, ``mamba_d_ssm``; 4 heads of 16 in 2
groups of state 8, chunks of 4 tokens; the gated norm before the gate; a biased ``out_proj``) beside
the attention, every µP multiplier away from 1. transformers runs its PyTorch fallbacks of the
Mamba-2 kernels here; logits are checked against its float64 run (its float32 logits sit up to
4.3e-5 from it, peftjax's 1.9e-5).
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

VOCAB = _tiny.FAMILIES["falcon_h1"][2]["vocab_size"]
TOL = dict(atol=5e-5, rtol=1e-5)


def _pair(tmp_path_factory, **overrides):
    torch_model = randomised(tr.FalconH1ForCausalLM(_tiny.config("falcon_h1", **overrides)).eval())
    path = tmp_path_factory.mktemp("falcon_h1")
    torch_model.save_pretrained(path)
    return torch_model, copy.deepcopy(torch_model).double(), path, models.from_pretrained(path)


@pytest.fixture(scope="module")
def falcon(tmp_path_factory):
    """(torch model, its float64 twin, its checkpoint, ours loaded from it)."""
    return _pair(tmp_path_factory)


def test_logits_loss_generation_and_scanned_gradients_match_transformers(falcon):
    """Left- and right-padded logits (eager, jitted), the loss, greedy generation (each layer's keys
    and Mamba-2 state cached together), and the layers stacked under ``scan_layers=True`` with
    rematerialisation: the loss and every weight's gradient of torch's float64 autograd."""
    torch_model, exact, path, model = falcon
    assert_matches_float64_torch(torch_model, exact, path, model, VOCAB, TOL, {
        "model.layers.0.mamba.out_proj.bias", "model.layers.1.mamba.norm.weight",
        "model.layers.0.self_attn.k_proj.weight"})
    assert sorted(model.init_cache(2, 8)[0]) == ["conv", "k", "ssm", "v"]


@pytest.mark.parametrize("variant", [dict(mamba_rms_norm=False), dict(mamba_norm_before_gate=False, mamba_d_ssm=None)],
                         ids=["gate-only", "gate-then-norm"])
def test_the_mixer_s_norm_variants_match_transformers(tmp_path_factory, variant):
    """Without the gated norm (the scan's output only gated: no norm weights), and with the gate
    before the norm at the default width (``mamba_expand x hidden_size``)."""
    _, exact, _, model = _pair(tmp_path_factory, **variant)
    assert hasattr(model.model.layers[0].mamba, "norm") == variant.get("mamba_rms_norm", True)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(exact, input_ids=ids, attention_mask=mask)[valid], **TOL)


def test_packed_rows_the_checkpoint_and_lora_both_ways(falcon, tmp_path):
    """Two packed sequences as transformers gives each alone; ``save_pretrained`` read back by
    transformers; LoRA on the mixers' ``in_proj``, the attention and the SwiGLU both ways with PEFT,
    ``out_proj`` refused on both sides, prefix tuning here."""
    torch_model, exact, path, model = falcon
    assert_packed_rows_as_alone(model, exact, TOL)
    model.save_pretrained(tmp_path / "model")
    assert set(safetensors_torch.load_file(str(tmp_path / "model" / "model.safetensors"))) == set(
        safetensors_torch.load_file(str(path / "model.safetensors")))
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)
    reloaded = tr.FalconH1ForCausalLM.from_pretrained(tmp_path / "model").eval()
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[mask == 1],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[mask == 1], atol=0, rtol=0)

    targets = ["in_proj", "q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"]
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules=targets, init_lora_weights=False))
    ours.save_pretrained(tmp_path / "ours")
    logits = ours(input_ids=ids, attention_mask=mask).logits
    plain = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    assert np.abs(np.asarray(logits) - plain)[mask == 1].max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "ours").eval()
        made = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2, target_modules=targets,
                                                                               init_lora_weights=False))
    assert_close_where(logits, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **TOL)
    made.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits,
                       torch_logits(made, input_ids=ids, attention_mask=mask), mask, **TOL)
    with pytest.raises(ValueError, match=r"modules named \['out_proj'\] of a Mamba-based model "
                                         r"\(model_type='falcon_h1'\) take no adapter, as PEFT refuses them"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(ValueError, match="incompatible with Mamba-based models"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(TypeError, match="FalconH1ForCausalLM does not implement peftjax's prefix attention protocol"):
        peftjax.get_peft_model(model, peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
