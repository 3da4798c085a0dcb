"""OLMoE against PyTorch transformers and HF PEFT: logits (OLMo's whole-projection q/k norms and
clamp over Mixtral's experts, routing renormalised or not), the load-balancing loss, both
checkpoint layouts, greedy generation, scanned layers with gradients, and LoRA on the attention,
the router and the fused experts both ways."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_layouts_round_trip,
    assert_moe_generates_and_scans_as_torch,
    assert_moe_lora_both_ways,
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
    torch_logits,
)

import peftjax
from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["olmoe"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)  # random 0.3-std weights: logits of ~10, float32 sums


def _build(root, **overrides):
    """(torch model, its checkpoint as transformers saves it (per-expert), the fused checkpoint)."""
    torch_model = randomised(tr.OlmoeForCausalLM(_tiny.config("olmoe", **overrides)).eval())
    return (torch_model, *save_both_layouts(torch_model, root))


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    torch_model, hub, fused = _build(tmp_path_factory.mktemp("olmoe"))
    return torch_model, hub, fused, models.from_pretrained(hub)


@pytest.mark.parametrize("overrides", [{}, dict(norm_topk_prob=True, clip_qkv=None)])
def test_logits_and_the_load_balancing_loss_match_transformers(overrides, olmoe, tmp_path):
    """A padded batch's logits (the tiny model's clamp at 2 bites on its 0.3-std weights), and the
    loss with and without the router terms, each routing."""
    if overrides:
        torch_model, hub, _ = _build(tmp_path, **overrides)
        model = models.from_pretrained(hub)
    else:
        torch_model, _, _, model = olmoe
    assert type(model).__name__ == "OlmoeForCausalLM"
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          labels=torch.tensor(labels), output_router_logits=True)
    inputs = {k: jnp.asarray(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    out = nnx.jit(lambda m, kw: m(**kw, output_router_logits=True))(model, inputs)
    assert abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_the_clamp_is_read_from_the_config(olmoe):
    """Without ``clip_qkv`` the same weights give other logits: the tiny model's clamp is live."""
    torch_model, hub, _, model = olmoe
    unclamped = models.from_pretrained(hub, clip_qkv=None)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    a = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid]
    b = np.asarray(unclamped(input_ids=ids, attention_mask=mask).logits)[valid]
    assert np.abs(a - b).max() > 1e-3


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(olmoe, tmp_path):
    torch_model, hub, fused, model = olmoe
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in keys(hub)
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def test_greedy_generation_and_scanned_layers_with_gradients_match_transformers(olmoe):
    torch_model, hub, _, model = olmoe
    assert_moe_generates_and_scans_as_torch(torch_model, hub, model, VOCAB)


def test_lora_on_attention_router_and_experts_both_ways(olmoe, tmp_path):
    """LoRA made here on the attention and the experts (PEFT's ``target_parameters`` for the fused
    ones) trains, loads in PEFT with the same logits and merges for transformers; PEFT's all-linear
    adapter gives its logits here."""
    assert_moe_lora_both_ways(
        tr.OlmoeForCausalLM, olmoe[1], tmp_path,
        dict(r=2, lora_alpha=4, task_type="CAUSAL_LM",
             target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), VOCAB, TOL)


def test_expert_targets_named_as_transformers_4_did_become_peft_s_target_parameters(olmoe):
    """PEFT 0.22.0 turns ``gate_proj``/``up_proj``/``down_proj`` (OLMoE's per-expert linears before
    transformers 5 fused them) into ``target_parameters`` on the fused experts, rank doubled on
    ``gate_up_proj``: so does peftjax, so the experts train rather than the names matching nothing."""
    targets = ["q_proj", "gate_proj", "up_proj", "down_proj"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tr.OlmoeForCausalLM.from_pretrained(olmoe[1]),
                                     peft.LoraConfig(r=2, target_modules=targets)).peft_config["default"]
    ours = peftjax.get_peft_model(models.from_pretrained(olmoe[1]),
                                  peftjax.LoraConfig(r=2, target_modules=targets)).peft_config["default"]
    assert set(ours.target_modules) == set(theirs.target_modules) == {"q_proj"}
    assert set(ours.target_parameters) == set(theirs.target_parameters) == {"gate_up_proj", "down_proj"}
    assert dict(ours.rank_pattern) == dict(theirs.rank_pattern)


def test_flex_olmo_matches_transformers_and_moves_lora_both_ways(tmp_path):
    """FlexOlmo (OLMoE's experts under OLMo 2's post-norm layers): padded logits, both checkpoint
    layouts, generation, the loss and every gradient of the scanned layers, LoRA both ways."""
    torch_model = randomised(tr.FlexOlmoForCausalLM(_tiny.config("flex_olmo")).eval(), scale=0.2)
    hub, fused = save_both_layouts(torch_model, tmp_path / "ckpt")
    model = models.from_pretrained(hub)
    assert type(model).__name__ == "FlexOlmoForCausalLM"
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path / "saved", VOCAB)
    # post-norm layers: float32 rounding reaches 1.3e-6 in a word embedding's gradient
    assert_moe_generates_and_scans_as_torch(torch_model, hub, model, VOCAB, grad_atol=5e-6)
    assert_moe_lora_both_ways(tr.FlexOlmoForCausalLM, hub, tmp_path / "lora", dict(
        r=2, lora_alpha=4, target_modules=["q_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), VOCAB, TOL)
