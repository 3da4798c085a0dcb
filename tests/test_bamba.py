"""Bamba against PyTorch transformers and HF PEFT.

_tiny's Bamba: Mamba-2, attention (RoPE on half of each head), Mamba-2; 4 Mamba-2 heads of 16 in 2
groups of state 8, chunks of 4 tokens so a 9-token row spans three; the z-loss on. transformers
runs its PyTorch fallbacks of the Mamba-2 kernels here; logits are checked against its float64 run.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

import _tiny
from _torch_models import (
    assert_all_linear_lora_both_ways,
    assert_packed_rows_as_alone,
    jitted,
    lazy,
    padded_batch,
    randomised,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr = lazy("torch"), lazy("transformers")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["bamba"][2]["vocab_size"]
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bamba(tmp_path_factory):
    """(torch model, its checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.BambaForCausalLM(_tiny.config("bamba")).eval())
    path = tmp_path_factory.mktemp("bamba")
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


def test_logits_the_z_loss_generation_and_packed_rows_match_transformers(bamba, tmp_path):
    """Left- and right-padded logits (eager, jitted) against transformers' float64 run; the loss
    with its z-loss term; greedy generation through both kinds of cache; two packed sequences, each
    as transformers gives it alone; ``save_pretrained`` read back by transformers."""
    torch_model, path, model = bamba
    assert [layer.layer_type for layer in model.model.layers] == ["linear_attention", "full_attention",
                                                                  "linear_attention"]
    exact = copy.deepcopy(torch_model).double()
    for left in (True, False):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        valid = mask.astype(bool)
        ref = torch_logits(exact, input_ids=ids, attention_mask=mask)
        for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
            np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    labels = np.where(mask == 1, ids, -100)
    tensors = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    with torch.no_grad():
        loss = torch_model(**tensors).loss.item()
        torch_model.z_loss_coefficient = 0.0  # read at construction, not from the config
        plain = torch_model(**tensors).loss.item()
        torch_model.z_loss_coefficient = _tiny.FAMILIES["bamba"][2]["z_loss_coefficient"]
    assert abs(loss - plain) > 1e-3  # the z-loss counts
    assert abs(float(jitted(model, input_ids=ids, attention_mask=mask, labels=labels).loss) - loss) <= 1e-5

    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        gen = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), gen)
    assert_packed_rows_as_alone(model, exact, TOL)

    model.save_pretrained(tmp_path)
    assert set(safetensors_torch.load_file(str(tmp_path / "model.safetensors"))) == set(
        safetensors_torch.load_file(str(path / "model.safetensors")))
    reloaded = tr.BambaForCausalLM.from_pretrained(tmp_path).eval()
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], atol=0, rtol=0)


def test_all_linear_lora_both_ways_and_the_refusals(bamba, tmp_path):
    """PEFT's all-linear on Bamba (the Mamba-2 ``in_proj``/``out_proj``, the attention, the
    SwiGLUs) both ways; prefix tuning, scanning mixed layers and attention indices past the layers
    refused."""
    names = assert_all_linear_lora_both_ways(tr.BambaForCausalLM, bamba[1], tmp_path, VOCAB, TOL)
    assert {"model.model.layers.0.mamba.in_proj", "model.model.layers.1.self_attn.q_proj",
            "model.model.layers.2.feed_forward.down_proj"} <= names
    with pytest.raises(TypeError, match="BambaForCausalLM does not implement peftjax's prefix attention protocol"):
        peftjax.get_peft_model(bamba[2], peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    fields = _tiny.fields("bamba")
    with pytest.raises(ValueError, match=r"scan_layers=True needs alike layers; bamba's layer_types mix "
                                         r"\['full_attention', 'linear_attention'\]"):
        models.BambaForCausalLM.from_config(ModelConfig("bamba", **fields, scan_layers=True))
    with pytest.raises(ValueError, match=r"attn_layer_indices \[1, 3\] must lie in 0..2"):
        models.BambaForCausalLM.from_config(ModelConfig("bamba", **{**fields, "attn_layer_indices": [1, 3]}))
