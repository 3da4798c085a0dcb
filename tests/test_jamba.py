"""Jamba against PyTorch transformers and HF PEFT.

_tiny's Jamba: Mamba, attention, Mamba, attention; 4 experts (top 2, not renormalised) on layers 0
and 2, SwiGLUs on 1 and 3; Mamba of 64 channels, state 8, time steps of rank 4 with Jamba's
weighted RMSNorms. transformers runs its PyTorch fallbacks of the Mamba kernels here; logits are
checked against its float64 run (its float32 logits sit up to 2.4e-5 from it, peftjax's 2.7e-5).
"""

from __future__ import annotations

import copy
import re
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_packed_rows_as_alone,
    assert_close_where,
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_in_memory_layout,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["jamba"][2]["vocab_size"]
TOL = dict(atol=5e-5, rtol=1e-5)
EXPERTS = ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]


@pytest.fixture(scope="module")
def jamba(tmp_path_factory):
    """(torch model, its checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.JambaForCausalLM(_tiny.config("jamba")).eval())
    path = tmp_path_factory.mktemp("jamba")
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


def test_logits_losses_generation_packed_rows_and_both_layouts_match_transformers(jamba, tmp_path):
    """Left- and right-padded logits (eager, jitted) against transformers' float64 run; the loss
    with the load-balancing loss over the expert layers; greedy generation; two packed sequences;
    the Hub's per-expert layout written and read back by transformers, the fused one read here."""
    torch_model, path, model = jamba
    assert [(layer.layer_type, layer.sparse) for layer in model.model.layers] == [
        ("linear_attention", True), ("full_attention", False), ("linear_attention", True), ("full_attention", False)]
    exact = copy.deepcopy(torch_model).double()
    exact.set_experts_implementation("eager")  # torch's grouped GEMM has no float64
    for left in (True, False):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        valid = mask.astype(bool)
        ref = torch_logits(exact, input_ids=ids, attention_mask=mask)
        for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
            np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             labels=torch.tensor(labels), output_router_logits=True)
    inputs = {k: jnp.asarray(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    ours = nnx.jit(lambda m, kw: m(**kw, output_router_logits=True))(model, inputs)
    assert abs(float(ours.aux_loss) - theirs.aux_loss.item()) <= 1e-5
    assert abs(float(ours.loss) - theirs.loss.item()) <= 1e-5

    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        gen = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), gen)
    assert_packed_rows_as_alone(model, exact, TOL)

    model.save_pretrained(tmp_path / "ours")
    keys = set(safetensors_torch.load_file(str(tmp_path / "ours" / "model.safetensors")))
    assert keys == set(safetensors_torch.load_file(str(path / "model.safetensors")))
    assert {"model.layers.0.feed_forward.experts.3.up_proj.weight", "model.layers.2.mamba.dt_layernorm.weight"} <= keys
    valid = mask.astype(bool)
    expected = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    reloaded = tr.JambaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid], expected, atol=0,
                               rtol=0)
    save_in_memory_layout(torch_model, tmp_path / "fused")
    fused = models.from_pretrained(tmp_path / "fused")
    np.testing.assert_allclose(np.asarray(jitted(fused, input_ids=ids, attention_mask=mask).logits)[valid], expected,
                               atol=1e-5, rtol=1e-5)


def test_lora_on_every_linear_but_dt_proj_and_the_experts_both_ways(jamba, tmp_path):
    """``all-linear`` without ``dt_proj`` (its LoRA is refused here: transformers' forward pass
    skips it) plus the experts' parameters: made here, PEFT's logits; made by PEFT, its logits here."""
    torch_model, path, model = jamba
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)
    fields = dict(r=2, target_modules="all-linear", exclude_modules=["dt_proj"], target_parameters=EXPERTS,
                  init_lora_weights=False)
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**fields))
    names = {s.name for s in ours.get_layer_status()}
    assert {"model.model.layers.0.mamba.x_proj", "model.model.layers.1.self_attn.o_proj",
            "model.model.layers.3.feed_forward.gate_proj", "model.model.layers.0.feed_forward.experts"} <= names
    ours.save_pretrained(tmp_path / "ours")
    logits = ours(input_ids=ids, attention_mask=mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path / "ours").eval()
        made = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(**fields))
    assert names == {s.name for s in made.get_layer_status()}
    assert_close_where(logits, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **TOL)
    made.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits,
                       torch_logits(made, input_ids=ids, attention_mask=mask), mask, **TOL)
    with pytest.raises(ValueError, match=r"modules named \['dt_proj'\] of a Mamba-based model \(model_type='jamba'\)"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules="all-linear"))


def test_the_refusals(jamba, tmp_path):
    """Prefix tuning (the Mamba layers have no keys), scanning unlike layers, an offset not below
    its period, and a per-expert checkpoint that lacks one expert's linear (named, with the file)."""
    state = safetensors_torch.load_file(str(jamba[1] / "model.safetensors"))
    del state["model.layers.2.feed_forward.experts.3.up_proj.weight"]
    (tmp_path / "config.json").write_text((jamba[1] / "config.json").read_text())
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(models.CheckpointError, match=re.escape(str(tmp_path)) + (
            r": model.layers.2.feed_forward.experts: the per-expert layout needs down_proj, gate_proj, up_proj of "
            r"experts 0..N-1 .*'up_proj': \[0, 1, 2\]")):
        models.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="JambaForCausalLM does not implement peftjax's prefix attention protocol"):
        peftjax.get_peft_model(jamba[2], peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    fields = _tiny.fields("jamba")
    with pytest.raises(ValueError, match=r"scan_layers=True needs alike layers; jamba's layer_types mix "
                                         r"\['full_attention', 'linear_attention \+ experts'\]"):
        models.JambaForCausalLM.from_config(ModelConfig("jamba", **fields, scan_layers=True))
    with pytest.raises(ValueError, match=r"attn_layer_offset \(2\) must be below attn_layer_period \(2\)"):
        models.JambaForCausalLM.from_config(ModelConfig("jamba", **{**fields, "attn_layer_offset": 2}))


def test_the_sequence_classifier_matches_transformers(jamba, tmp_path):
    """``JambaForSequenceClassification`` from the causal LM's checkpoint (a new ``score``) and
    from its own: the logits and loss at each row's last real token, left and right padded."""
    _, path, _ = jamba
    torch_model = randomised(tr.JambaForSequenceClassification(_tiny.config("jamba", num_labels=3)).eval())
    torch_model.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == "JambaForSequenceClassification"
    for left in (True, False):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        with torch.no_grad():
            ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              labels=torch.tensor([0, 2, 1]))
        out = jitted(ours, input_ids=ids, attention_mask=mask, labels=np.array([0, 2, 1]))
        np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), **TOL)
        assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    head = models.JambaForSequenceClassification.from_pretrained(path, num_labels=3)
    assert head.score.kernel.shape == (32, 3)
