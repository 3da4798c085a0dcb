"""ERNIE 4.5 MoE against PyTorch transformers and HF PEFT.

_tiny's ERNIE 4.5 MoE: a dense layer, then two sparse ones (8 experts chosen by softmax score plus a
nonzero ``e_score_correction_bias``, top 3, renormalised; a shared expert), biases on every
projection and on the LM head (``use_bias``). Logits, loss and the load-balancing loss, generation,
both checkpoint layouts (the Hub's bias name among them), LoRA both ways with PEFT's MoE target
conversion, and the refusals.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import _tiny
from _torch_models import (
    assert_all_linear_lora_both_ways,
    assert_layouts_round_trip,
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
)

from peftjax import models
from peftjax.models import ModelConfig

torch, tr = lazy("torch"), lazy("transformers")

VOCAB = _tiny.FAMILIES["ernie4_5_moe"][2]["vocab_size"]
# random 0.3-std weights through three biased layers gave logits of ~7 whose float32 sums disagreed with
# torch's by up to 4e-5 under LoRA (against torch's float64 run: ours 2-3e-5, torch's own float32 1.6e-5;
# measured 2026-12-07): the fixture's weights are 0.2-std (a wrong routing or bias is off by 1e-2 and more)
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def ernie(tmp_path_factory):
    """(torch model, its checkpoint as transformers saves it, the in-memory layout, ours from the first)."""
    torch_model = randomised(tr.Ernie4_5_MoeForCausalLM(_tiny.config("ernie4_5_moe")).eval(), scale=0.2)
    with torch.no_grad():  # a parameter transformers initialises to zero: the choice by the bias
        for layer in torch_model.model.layers[1:]:
            layer.mlp.gate.moe_statics.e_score_correction_bias.copy_(0.3 * torch.randn(1, 8))
    hub, fused = save_both_layouts(torch_model, tmp_path_factory.mktemp("ernie4_5_moe"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def test_logits_loss_router_loss_and_generation_match_transformers(ernie):
    torch_model, _, _, model = ernie
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == [
        "LlamaMLP", "Ernie4_5_MoeSparseMoeBlock", "Ernie4_5_MoeSparseMoeBlock"]
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    valid = mask.astype(bool)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                          output_router_logits=True)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], **TOL)
    np.testing.assert_allclose(np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
                               ref.logits.numpy()[valid], **TOL)
    # the loss adds router_aux_loss_coef times the load-balancing loss, as transformers' does
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5 and abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(ernie, tmp_path):
    """The Hub's per-expert files with the routing bias at ``mlp.moe_statics``, and the in-memory
    layout (``mlp.gate.moe_statics``); the multi-token-prediction block is skipped, as transformers
    skips it."""
    torch_model, hub, fused, model = ernie
    keys = lambda d: set(lazy("safetensors.torch").load_file(str(d / "model.safetensors")))  # noqa: E731
    assert {"model.layers.1.mlp.moe_statics.e_score_correction_bias", "model.layers.1.mlp.experts.7.up_proj.weight",
            "lm_head.bias"} <= keys(hub)
    assert "model.layers.1.mlp.gate.moe_statics.e_score_correction_bias" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)
    st = lazy("safetensors.torch")
    tensors = st.load_file(str(hub / "model.safetensors"))
    st.save_file({**tensors, "model.mtp_block.0.mlp.down_proj.weight": torch.zeros(2, 2)},
                 str(hub / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unexpected-key warning
        models.from_pretrained(hub)


def test_unsupported_settings_are_refused_by_name():
    fields = _tiny.fields("ernie4_5_moe")
    with pytest.raises(ValueError, match=r"ernie4_5_moe: tie_word_embeddings=True is not supported "
                                         r"\(Ernie4_5_MoeForCausalLM's LM head has a bias of its own\)"):
        models.Ernie4_5_MoeForCausalLM.from_config(ModelConfig("ernie4_5_moe", **{**fields, "tie_word_embeddings": True}))


def test_all_linear_lora_on_attention_router_and_experts_both_ways(ernie, tmp_path):
    """PEFT turns all-linear into LoRA on the attention, the router and the fused experts, and keeps
    it on the dense layer's and the shared experts' MLPs (named as the experts were: PEFT 0.21.2
    moved them), both ways."""
    names = assert_all_linear_lora_both_ways(tr.Ernie4_5_MoeForCausalLM, ernie[1], tmp_path, VOCAB, TOL)
    assert {"model.model.layers.1.mlp.gate", "model.model.layers.1.mlp.experts"} <= names
    assert {"model.model.layers.0.mlp.up_proj", "model.model.layers.1.mlp.shared_experts.down_proj"} <= names
