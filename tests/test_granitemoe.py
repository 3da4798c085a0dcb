"""Granite MoE against PyTorch transformers and HF PEFT: logits with every multiplier away from 1,
the load-balancing loss, both checkpoint layouts (the Hub's ``input_linear``/``output_linear``/
``router.layer`` and transformers 5's fused names), greedy generation, scanned layers with
gradients, and LoRA on the attention and the fused experts both ways."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_close_where,
    assert_layouts_round_trip,
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

VOCAB = _tiny.FAMILIES["granitemoe"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def granitemoe(tmp_path_factory):
    torch_model = randomised(tr.GraniteMoeForCausalLM(_tiny.config("granitemoe")).eval())
    hub, fused = save_both_layouts(torch_model, tmp_path_factory.mktemp("granitemoe"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def _jitted(model, **inputs):
    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def test_logits_the_load_balancing_loss_and_both_layouts_match_transformers(granitemoe, tmp_path):
    torch_model, hub, fused, model = granitemoe
    assert type(model).__name__ == "GraniteMoeForCausalLM"
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(_jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
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
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)
    scanned = models.from_pretrained(hub, scan_layers=True, remat="full", output_router_logits=True)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    out_ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          labels=torch.tensor(labels), output_router_logits=True)
    out_ref.loss.backward()

    def loss(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out

    grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(scanned)
    assert abs(float(out.loss) - out_ref.loss.item()) <= 1e-5
    moe, attn = grads.model.layers.layer.block_sparse_moe, grads.model.layers.layer.self_attn
    for ours, name in ((moe.router.weight, "block_sparse_moe.router.weight"),
                       (moe.experts.gate_up_proj, "block_sparse_moe.experts.gate_up_proj"),
                       (attn.q_proj.kernel, "self_attn.q_proj.weight")):
        for i in range(2):
            theirs = torch_model.get_parameter(f"model.layers.{i}.{name}").grad.numpy()
            mine = np.asarray(ours[...])[i]
            mine = mine.T if name.endswith("q_proj.weight") else mine
            np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=1e-4, err_msg=f"{i} {name}")
    torch_model.zero_grad(set_to_none=True)


def test_lora_on_attention_and_experts_both_ways(granitemoe, tmp_path):
    """LoRA made here on the attention and the fused experts (PEFT's ``target_parameters``) trains,
    loads in PEFT with the same logits and merges for transformers; PEFT's all-linear adapter gives
    its logits here."""
    _, hub, _, _ = granitemoe
    ids, mask = padded_batch(VOCAB, batch=2, seq=7)

    def base():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tr.GraniteMoeForCausalLM.from_pretrained(hub).eval()

    config = dict(r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "o_proj"],
                  target_parameters=["block_sparse_moe.experts.gate_up_proj", "block_sparse_moe.experts.down_proj"])
    model = peftjax.get_peft_model(models.from_pretrained(hub), peftjax.LoraConfig(**config))
    losses = _tiny.train(model, _tiny.batch(ids, mask), steps=3).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    ours = model(input_ids=ids, attention_mask=mask).logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert_close_where(ours, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **TOL)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = tr.GraniteMoeForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close_where(ours, torch_logits(merged, input_ids=ids, attention_mask=mask), mask, **TOL)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    ref = torch_logits(made, input_ids=ids, attention_mask=mask)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(hub), tmp_path / "peft")
    assert_close_where(_jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits, ref, mask, **TOL)
