"""Granite MoE against PyTorch transformers and HF PEFT: logits with every multiplier away from 1,
the load-balancing loss, both checkpoint layouts (the Hub's ``input_linear``/``output_linear``/
``router.layer`` and transformers 5's fused names), greedy generation, scanned layers with
gradients, and LoRA on the attention and the fused experts both ways."""

from __future__ import annotations

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

from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["granitemoe"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def granitemoe(tmp_path_factory):
    torch_model = randomised(tr.GraniteMoeForCausalLM(_tiny.config("granitemoe")).eval())
    hub, fused = save_both_layouts(torch_model, tmp_path_factory.mktemp("granitemoe"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def test_logits_the_load_balancing_loss_and_both_layouts_match_transformers(granitemoe, tmp_path):
    torch_model, hub, fused, model = granitemoe
    assert type(model).__name__ == "GraniteMoeForCausalLM"
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
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert {"model.layers.0.block_sparse_moe.input_linear.weight",
            "model.layers.0.block_sparse_moe.router.layer.weight"} <= keys(hub)
    assert "model.layers.0.block_sparse_moe.experts.gate_up_proj" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def test_greedy_generation_and_scanned_layers_with_gradients_match_transformers(granitemoe):
    torch_model, hub, _, model = granitemoe
    assert_moe_generates_and_scans_as_torch(torch_model, hub, model, VOCAB)


def test_lora_on_attention_and_experts_both_ways(granitemoe, tmp_path):
    """LoRA on the attention and the fused experts (PEFT's ``target_parameters``) both ways and
    merged; PEFT's all-linear adapter read here."""
    assert_moe_lora_both_ways(
        tr.GraniteMoeForCausalLM, granitemoe[1], tmp_path,
        dict(r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"],
             target_parameters=["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"]),
        VOCAB, TOL)
