"""LFM2-MoE against PyTorch transformers and HF PEFT: LFM2's convolutions and attention over a dense
first layer and experts routed by biased sigmoid scores; logits, loss, every weight's gradient,
generation, both checkpoint layouts and LoRA (experts through ``target_parameters``) both ways."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_grads_match_torch,
    assert_layouts_round_trip,
    assert_moe_lora_both_ways,
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
    torch_logits,
)

from peftjax import models

torch, tr = lazy("torch"), lazy("transformers")

VOCAB = _tiny.FAMILIES["lfm2_moe"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lfm2_moe(tmp_path_factory):
    """(torch model with expert biases that change the routing, its Hub and fused checkpoints, ours)."""
    torch_model = randomised(tr.Lfm2MoeForCausalLM(_tiny.config("lfm2_moe")).eval())
    with torch.no_grad():
        for layer in torch_model.model.layers[1:]:
            layer.feed_forward.expert_bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.25]))
    hub, fused = save_both_layouts(torch_model, tmp_path_factory.mktemp("lfm2_moe"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def test_logits_loss_and_generation_match_transformers(lfm2_moe):
    torch_model, _, _, model = lfm2_moe
    assert type(model.model.layers[0].feed_forward).__name__ == "Lfm2MLP"
    assert type(model.model.layers[1].feed_forward).__name__ == "Lfm2MoeSparseMoeBlock"
    for left in (True, False):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        valid = mask.astype(bool)
        ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
        for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
            np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        gen = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), gen)


def test_every_gradient_matches_transformers_rematerialised(lfm2_moe):
    """The router learns through its sigmoid weights (the bias only picks), the experts through their tokens."""
    torch_model, hub, _, _ = lfm2_moe
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    loss.backward()
    graphdef, params, rest = nnx.split(models.from_pretrained(hub, remat="full"), nnx.Param, ...)
    value, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(
        input_ids=ids, attention_mask=mask, labels=labels).loss))(params)
    assert abs(float(value) - loss.item()) <= 1e-5
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), torch_model)
    torch_model.zero_grad(set_to_none=True)


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(lfm2_moe, tmp_path):
    torch_model, hub, fused, model = lfm2_moe
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def test_lora_on_attention_convolutions_and_experts_moves_both_ways(lfm2_moe, tmp_path):
    _, hub, _, _ = lfm2_moe
    assert_moe_lora_both_ways(tr.Lfm2MoeForCausalLM, hub, tmp_path, dict(
        r=4, lora_alpha=8, target_modules=["q_proj", "in_proj", "w1"],
        target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]), VOCAB, TOL)


def test_scanning_mixed_layers_is_refused_by_name(lfm2_moe):
    _, hub, _, _ = lfm2_moe
    with pytest.raises(ValueError, match="scan_layers=True needs alike layers"):
        models.from_pretrained(hub, scan_layers=True)
    with pytest.raises(ValueError, match="num_dense_layers=1 layers are dense and the rest sparse"):
        models.from_pretrained(hub, scan_layers=True, layer_types=["conv", "conv", "conv"])
