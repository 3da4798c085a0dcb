"""Nemotron-H against PyTorch transformers and HF PEFT.

_tiny's Nemotron-H, from the Hub's ``hybrid_override_pattern`` ``ME*-M``: a Mamba-2 layer (chunks of
4 tokens, so a 9-token row spans three; 2 groups for 4 heads; biased projections), a mixture of
experts (8 experts in 4 groups, top 3 within the best 2, latent projections, the shared expert,
scaled by 2.5), attention, a ReLU² MLP, another Mamba-2 layer. transformers runs its PyTorch
fallbacks of the Mamba-2 kernels here, the oracle for the scan.
"""

from __future__ import annotations

import copy
import json
import warnings

import jax
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

VOCAB = _tiny.FAMILIES["nemotron_h"][2]["vocab_size"]
# float32 rounding through the Mamba-2 scan and the latent experts depends on the host's vector width: one logit in a thousand
# reached 1.2e-5 from transformers' on the AVX-512 host kind (within 1e-5 on the AVX2 kind)
TOL = dict(atol=2e-5, rtol=1e-5)
TARGETS = ["in_proj", "q_proj", "o_proj", "up_proj", "down_proj", "fc1_latent_proj"]
EXPERTS = ["mixer.experts.up_proj", "mixer.experts.down_proj"]


@pytest.fixture(scope="module")
def nemotron(tmp_path_factory):
    """(torch model, its Hub checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.NemotronHForCausalLM(_tiny.config("nemotron_h")).eval())
    path = tmp_path_factory.mktemp("nemotron_h")
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_logits_and_loss_match_transformers(nemotron, left):
    torch_model, _, model = nemotron
    assert [layer.block_type for layer in model.model.layers] == ["linear_attention", "moe", "full_attention", "mlp",
                                                                  "linear_attention"]
    ids, mask = padded_batch(VOCAB, seq=9, left=left)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    if left:  # a pad's prediction of the first token would count: a pad's logits are nobody's
        return
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           labels=torch.tensor(labels)).loss.item()
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - loss) <= 1e-5


def test_generation_packed_rows_and_both_checkpoint_layouts_match_transformers(nemotron, tmp_path):
    """Greedy generation from left-padded prompts (Mamba-2 states, attention keys, nothing for the
    MLP and MoE layers cached); two packed sequences, the second starting inside a chunk, each get
    the logits transformers gives it alone; the Hub's layout (``backbone.``, per-expert) is what
    ``save_pretrained`` writes, and transformers 5's in-memory one loads too."""
    torch_model, path, model = nemotron
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)
    assert [sorted(c) for c in model.init_cache(2, 8)] == [["conv", "ssm"], [], ["k", "v"], [], ["conv", "ssm"]]

    assert_packed_rows_as_alone(model, torch_model, TOL)

    model.save_pretrained(tmp_path / "ours")
    keys = set(safetensors_torch.load_file(str(tmp_path / "ours" / "model.safetensors")))
    assert keys == set(safetensors_torch.load_file(str(path / "model.safetensors")))
    assert {"backbone.layers.1.mixer.experts.7.up_proj.weight", "backbone.norm_f.weight"} <= keys
    ids, mask = padded_batch(VOCAB, seq=7)
    valid = mask.astype(bool)
    expected = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    reloaded = tr.NemotronHForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid], expected, atol=0,
                               rtol=0)
    save_in_memory_layout(torch_model, tmp_path / "fused")
    assert "model.layers.1.mixer.experts.up_proj" in safetensors_torch.load_file(
        str(tmp_path / "fused" / "model.safetensors"))
    fused = models.from_pretrained(tmp_path / "fused")
    np.testing.assert_allclose(np.asarray(jitted(fused, input_ids=ids, attention_mask=mask).logits)[valid], expected,
                               **TOL)


def test_every_weight_s_gradient_matches_torch(nemotron):
    """Full fine-tuning's gradients (right padding): the Mamba-2 layers' own parameters through the
    chunked scan, the router's (its ``e_score_correction_bias`` gets none in either), the latent
    experts', the attention's and the MLP's, against torch's autograd in float64."""
    torch_model, _, model = nemotron
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    exact = copy.deepcopy(torch_model).double()
    exact.set_experts_implementation("eager")  # torch's grouped GEMM has no float64
    exact(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss.backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(
        input_ids=ids, attention_mask=mask, labels=labels).loss))(params)
    ours = models.hf_state_dict(nnx.merge(graphdef, grads, rest))
    theirs = {name: p.grad.numpy() for name, p in exact.named_parameters() if p.grad is not None}
    assert {"model.layers.0.mixer.A_log", "model.layers.1.mixer.experts.up_proj", "model.layers.1.mixer.gate.weight",
            "model.layers.4.mixer.norm.weight"} <= set(theirs) <= set(ours)
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, atol=5e-5, rtol=1e-4, err_msg=name)


def test_lora_on_mixers_mlps_and_experts_both_ways(nemotron, tmp_path):
    """LoRA on the Mamba-2 ``in_proj``, the attention, the MLPs, the latent projection and the
    experts' parameters (``target_parameters``): made and trained here, PEFT's logits and the merged
    checkpoint's in transformers; made by PEFT, its logits here."""
    torch_model, path, model = nemotron
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)

    def base():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tr.NemotronHForCausalLM.from_pretrained(path).eval()

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, lora_alpha=4, target_modules=TARGETS, target_parameters=EXPERTS))
    losses = _tiny.train(ours, _tiny.batch(ids, mask), steps=3).losses
    assert losses[-1] < losses[0]
    ours.save_pretrained(tmp_path / "ours")
    logits = ours(input_ids=ids, attention_mask=mask).logits
    assert np.abs(np.asarray(logits) - torch_logits(base(), input_ids=ids, attention_mask=mask))[mask == 1].max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert_close_where(logits, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **TOL)
    ours.merge_and_unload().save_pretrained(tmp_path / "merged")
    merged = tr.NemotronHForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close_where(logits, torch_logits(merged, input_ids=ids, attention_mask=mask), mask, **TOL)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=TARGETS, target_parameters=EXPERTS,
                                                           init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits,
                       torch_logits(made, input_ids=ids, attention_mask=mask), mask, **TOL)


def test_the_config_reads_the_hub_s_names_and_refuses_what_peft_and_the_layers_refuse(nemotron, tmp_path):
    """The Hub's ``hybrid_override_pattern``, its ``mamba_*`` names and a stale ``num_hidden_layers``
    read as transformers reads them; LoRA on a Mamba-2 ``out_proj`` (``all-linear`` too) is refused
    as PEFT refuses it; prefix tuning and scanning mixed layers are refused."""
    hub = dict(_tiny.fields("nemotron_h"), hybrid_override_pattern="M*M-", num_hidden_layers=52, mamba_n_groups=4,
               mamba_d_conv=3, mamba_chunk_size=8, mamba_dt_limit=[0.0, {"__float__": "Infinity"}])
    hub.pop("n_groups"), hub.pop("conv_kernel"), hub.pop("chunk_size")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "nemotron_h", **hub}))
    ours = models.load_config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tr.NemotronHConfig.from_pretrained(tmp_path)
    for name in ("layers_block_type", "num_hidden_layers", "n_groups", "conv_kernel", "chunk_size", "time_step_limit"):
        assert getattr(ours, name) == getattr(theirs, name), name

    model = nemotron[2]
    for targets in (["in_proj", "out_proj"], "all-linear"):
        with pytest.raises(ValueError, match=r"model.layers.0.mixer.out_proj, model.layers.4.mixer.out_proj: modules "
                                             r"named \['out_proj'\] of a Mamba-based model "
                                             r"\(model_type='nemotron_h'\) take no adapter, as PEFT refuses them"):
            peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=targets))
        with pytest.raises(ValueError, match="incompatible with Mamba-based models"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(copy.deepcopy(nemotron[0]), peft.LoraConfig(r=2, target_modules=targets))
    with pytest.raises(TypeError, match="NemotronHForCausalLM does not implement peftjax's prefix attention protocol"):
        peftjax.get_peft_model(model, peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match=r"scan_layers=True needs alike layers; nemotron_h's layer_types mix "
                                         r"\['full_attention', 'linear_attention', 'mlp', 'moe'\]"):
        models.NemotronHForCausalLM.from_config(ModelConfig("nemotron_h", **_tiny.fields("nemotron_h"),
                                                            scan_layers=True))


def test_peft_s_default_targets_the_attention_both_ways(nemotron, tmp_path):
    """A LoRA config without targets takes PEFT's defaults for the family (the attention's four
    projections): the same layers as PEFT's, and an adapter made here gives PEFT's logits there."""
    torch_model, path, model = nemotron
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2, init_lora_weights=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(torch_model), peft.LoraConfig(r=2))
    names = {s.name for s in ours.get_layer_status()}
    assert names == {s.name for s in theirs.get_layer_status()} == {
        f"model.model.layers.2.mixer.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
    ours.save_pretrained(tmp_path)
    logits = ours(input_ids=ids, attention_mask=mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(torch_model), tmp_path).eval()
    plain = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    assert np.abs(np.asarray(logits) - plain)[mask == 1].max() > 1e-3
    assert_close_where(logits, torch_logits(loaded, input_ids=ids, attention_mask=mask), mask, **TOL)
