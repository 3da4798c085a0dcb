"""Hunyuan MoE (Hunyuan-A13B's ``hunyuan_v1_moe``) against PyTorch transformers and HF PEFT.

_tiny's: Hunyuan dense's attention (per-head q/k norms after RoPE, the fixed NTK alpha), 4 experts
top 2 renormalised and a shared SwiGLU in each of 2 layers.
"""

from __future__ import annotations

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
    torch_logits,
)

from peftjax import models
from peftjax.models import ModelConfig

torch, tr = lazy("torch"), lazy("transformers")

VOCAB = _tiny.FAMILIES["hunyuan_v1_moe"][2]["vocab_size"]
# float32 rounding through the MoE's dense sum and q/k norms depends on the host's vector width: one logit in a thousand
# reached 1.2e-5 from transformers' on the AVX-512 host kind (within 1e-5 on the AVX2 kind)
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def hunyuan(tmp_path_factory):
    """(torch model, its Hub checkpoint, its fused one, ours loaded from the Hub's)."""
    torch_model = randomised(tr.HunYuanMoEV1ForCausalLM(_tiny.config("hunyuan_v1_moe")).eval())
    hub, fused = save_both_layouts(torch_model, tmp_path_factory.mktemp("hunyuan_v1_moe"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def test_logits_loss_generation_and_both_layouts_match_transformers(hunyuan, tmp_path):
    torch_model, hub, fused, model = hunyuan
    for left in (True, False):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        valid = mask.astype(bool)
        ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
        for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
            np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           labels=torch.tensor(labels)).loss.item()
    assert abs(float(jitted(model, input_ids=ids, attention_mask=mask, labels=labels).loss) - loss) <= 1e-5
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        gen = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), gen)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def test_the_classifier_and_all_linear_lora_match_transformers_and_peft(hunyuan, tmp_path):
    """``HunYuanMoEV1ForSequenceClassification`` against transformers'; PEFT's all-linear both ways
    (the attention; the router and experts by ``target_parameters`` as PEFT converts them, and the
    shared SwiGLU, its layers named as the experts', with LoRA: PEFT 0.21.2 moved them); per-layer
    expert counts refused."""
    torch_model = randomised(tr.HunYuanMoEV1ForSequenceClassification(
        _tiny.config("hunyuan_v1_moe", num_labels=3)).eval())
    torch_model.save_pretrained(tmp_path / "cls")
    ours = models.from_pretrained(tmp_path / "cls")
    assert type(ours).__name__ == "HunYuanMoEV1ForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(jitted(ours, input_ids=ids, attention_mask=mask).logits), ref, **TOL)

    names = assert_all_linear_lora_both_ways(tr.HunYuanMoEV1ForCausalLM, hunyuan[1], tmp_path / "lora", VOCAB, TOL)
    assert {"model.model.layers.0.self_attn.q_proj", "model.model.layers.1.mlp.experts"} <= names
    assert "model.model.layers.0.mlp.shared_mlp.down_proj" in names
    with pytest.raises(ValueError, match=r"num_experts per layer \(\[4, 4\]\) is not supported"):
        models.HunYuanMoEV1ForCausalLM.from_config(ModelConfig(
            "hunyuan_v1_moe", **{**_tiny.fields("hunyuan_v1_moe"), "num_experts": [4, 4]}))
