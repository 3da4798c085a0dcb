"""Mamba and Falcon-Mamba against PyTorch transformers and HF PEFT, and the selective scan against a
step-by-step reference.

_tiny's Mamba and Falcon-Mamba: three layers of 64 channels, state 8, time steps of rank 4, the head
tied. transformers runs its PyTorch fallbacks of the Mamba kernels here; logits and gradients are
checked against its float64 run (its float32 logits sit up to 1.3e-5 from it, peftjax's 2.1e-5).
"""

from __future__ import annotations

import copy
import warnings

import jax
import jax.numpy as jnp
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
from peftjax.nn._selective_scan import selective_scan

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["mamba"][2]["vocab_size"]
TOL = dict(atol=5e-5, rtol=1e-5)


def test_the_chunked_selective_scan_is_the_recurrence_step_by_step():
    """Chunks of 3 over 10 steps (the last one padded), a given initial state and, in one row, a
    second sequence starting mid-chunk: the outputs and final state of the recurrence run step by
    step in float64, jitted and not."""
    rng = np.random.default_rng(0)
    b, s, d, n = 2, 10, 5, 4
    x, dt = rng.normal(size=(b, s, d)), np.log1p(np.exp(rng.normal(size=(b, s, d))))
    A, B, C = -np.exp(rng.normal(size=(d, n))), rng.normal(size=(b, s, n)), rng.normal(size=(b, s, n))
    h0 = rng.normal(size=(b, d, n))
    seg = np.array([[1] * 10, [1] * 4 + [2] * 6])
    ys, h = np.zeros((b, s, d)), h0.copy()
    for t in range(s):
        start = (seg[:, t] != seg[:, t - 1]) if t else np.zeros(b, bool)
        h = np.where(start[:, None, None], 0.0, np.exp(dt[:, t, :, None] * A) * h)
        h = h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys[:, t] = np.einsum("bdn,bn->bd", h, C[:, t])
    args = [jnp.asarray(a, jnp.float32) for a in (x, dt, A, B, C, h0)]
    for scan in (selective_scan, jax.jit(selective_scan, static_argnames="chunk_size")):
        y, state = scan(*args, segment_ids=jnp.asarray(seg), chunk_size=3)
        np.testing.assert_allclose(np.asarray(y), ys, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(state), h, atol=1e-5, rtol=1e-5)


def _pair(tmp_path_factory, family):
    torch_model = randomised(getattr(tr, _tiny.FAMILIES[family][1])(_tiny.config(family)).eval())
    path = tmp_path_factory.mktemp(family)
    torch_model.save_pretrained(path)
    return torch_model, copy.deepcopy(torch_model).double(), path, models.from_pretrained(path)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory):
    """(torch model, its float64 twin, its checkpoint, ours loaded from it)."""
    return _pair(tmp_path_factory, "mamba")


@pytest.fixture(scope="module")
def falcon_mamba(tmp_path_factory):
    return _pair(tmp_path_factory, "falcon_mamba")


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
def test_logits_loss_generation_and_scanned_gradients_match_transformers(family, request):
    """Left- and right-padded logits (eager, jitted; Falcon-Mamba's normalised time steps, ``B`` and
    ``C``), the loss, greedy generation (each layer's convolution inputs and state cached), and the
    layers stacked under ``scan_layers=True`` with rematerialisation: the same loss and every
    weight's gradient as torch's float64 autograd."""
    torch_model, exact, path, model = request.getfixturevalue(family)
    assert type(model).__name__ == _tiny.FAMILIES[family][1]
    assert_matches_float64_torch(torch_model, exact, path, model, VOCAB, TOL, {
        "backbone.layers.2.mixer.A_log", "backbone.layers.0.mixer.dt_proj.bias",
        "backbone.layers.1.mixer.x_proj.weight"})


def test_packed_rows_and_the_checkpoint_both_ways(mamba, tmp_path):
    """Two packed sequences each scanned from zeros; ``save_pretrained`` writes transformers' keys
    (the head tied), which it loads to the same logits."""
    torch_model, exact, path, model = mamba
    assert_packed_rows_as_alone(model, exact, TOL)
    model.save_pretrained(tmp_path)
    keys = set(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    assert keys == set(safetensors_torch.load_file(str(path / "model.safetensors")))
    assert "backbone.layers.0.mixer.A_log" in keys and "lm_head.weight" not in keys
    ids, mask = padded_batch(VOCAB, seq=7)
    valid = mask.astype(bool)
    reloaded = tr.MambaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], atol=0, rtol=0)


def test_lora_both_ways_and_the_targets_neither_side_adapts(mamba, tmp_path):
    """LoRA on ``in_proj`` and ``x_proj`` (PEFT's usual Mamba targets): made here, PEFT's logits;
    made by PEFT, its logits here. ``out_proj`` is refused on both sides; ``dt_proj``, whose LoRA
    transformers' forward pass skips (PEFT's adapter there leaves the logits as they were), here."""
    torch_model, _, path, model = mamba
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)
    targets = ["in_proj", "x_proj"]
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
        skipped = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2, target_modules=["dt_proj"],
                                                                                  init_lora_weights=False))
    assert_close_where(logits, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **TOL)
    made.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits,
                       torch_logits(made, input_ids=ids, attention_mask=mask), mask, **TOL)

    assert_close_where(torch_logits(skipped, input_ids=ids, attention_mask=mask), plain, mask, atol=1e-4)
    with pytest.raises(ValueError, match=r"modules named \['dt_proj'\] of a Mamba-based model \(model_type='mamba'\) "
                                         r"take no adapter, as transformers multiplies by dt_proj.weight"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=["dt_proj"]))
    with pytest.raises(ValueError, match=r"modules named \['out_proj'\] .* as PEFT refuses them"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=["in_proj", "out_proj"]))
    with pytest.raises(ValueError, match="incompatible with Mamba-based models"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2, target_modules=["out_proj"]))
