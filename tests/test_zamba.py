"""Zamba (v1) against PyTorch transformers and HF PEFT: multi-head Mamba layers and hybrid layers
that all run one shared transformer block (no positions); logits, the loss and every weight's
gradient (the shared block's summed over its three uses) against torch's float64 autograd,
generation, packed rows, the checkpoint as transformers writes it, LoRA both ways on shared and
Mamba layers, and the merge refused where a weight is shared."""

from __future__ import annotations

import copy

import jax
import numpy as np
import pytest

import _tiny
from _torch_models import (
    assert_classifier_matches_torch,
    assert_matches_float64_torch,
    assert_packed_rows_as_alone,
    lazy,
    padded_batch,
    randomised,
    torch_logits,
)

import peftjax
from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["zamba"][2]["vocab_size"]
TOL = dict(atol=2e-5, rtol=1e-5)  # weights drawn at 0.15, as test_zamba2's
PEFT_TOL = dict(atol=5e-5, rtol=1e-5)  # against PEFT's float32 torch, adapters on


@pytest.fixture(scope="module")
def zamba(tmp_path_factory):
    """(torch model, its float64 twin, its checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.ZambaForCausalLM(_tiny.config("zamba")).eval(), scale=0.15)
    path = tmp_path_factory.mktemp("zamba")
    torch_model.save_pretrained(path)
    return torch_model, copy.deepcopy(torch_model).double(), path, models.from_pretrained(path)


def test_logits_gradients_and_generation_match_transformers(zamba):
    """Logits (left and right padding, eager and jitted), the loss and every weight's gradient against
    torch's float64 autograd (the shared block's weights serve layers 1, 3 and 5: their gradients sum
    the three uses, as torch's tied parameters'), rematerialised; greedy generation token for token."""
    torch_model, exact, path, model = zamba
    assert_matches_float64_torch(torch_model, exact, path, model, VOCAB, TOL, {
        "model.layers.1.shared_transf.self_attn.q_proj.weight",
        "model.layers.1.shared_transf.feed_forward.up_proj.weight",
        "model.layers.3.linear.weight",
        "model.layers.2.mamba.x_proj_weight",
        "model.layers.4.mamba.dt_proj_weight",
        "model.layers.0.mamba.A_log"}, stacked=False)


def test_the_shared_block_is_one_weight_and_the_checkpoint_is_what_transformers_writes(zamba, tmp_path):
    torch_model, _, path, model = zamba
    first, third = model.model.layers[1].shared_transf, model.model.layers[5].shared_transf
    assert third.self_attn.q_proj.kernel is first.self_attn.q_proj.kernel
    assert model.model.layers[3].shared_transf.feed_forward.down_proj.kernel is first.feed_forward.down_proj.kernel
    assert third.self_attn.q_proj is not first.self_attn.q_proj  # a module per layer (PEFT wraps each)
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert not any(k.startswith(("model.layers.3.shared_transf.", "model.layers.5.shared_transf.")) for k in keys(path))
    model.save_pretrained(tmp_path)
    assert keys(tmp_path) == keys(path)
    ids, mask = padded_batch(VOCAB, seq=9)
    reloaded = tr.ZambaForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, input_ids=ids, attention_mask=mask),
                                  torch_logits(torch_model, input_ids=ids, attention_mask=mask))


def test_each_layer_caches_its_kind_and_packed_rows_match_transformers(zamba):
    _, exact, _, model = zamba
    cache = model.init_cache(2, 8)
    assert sorted(cache[1]) == ["conv", "k", "ssm", "v"] and sorted(cache[0]) == ["conv", "ssm"]
    assert cache[0]["ssm"].shape == (2, 4, 16, 8)  # [batch, Mamba heads, head channels, state]
    assert_packed_rows_as_alone(model, exact, TOL)


def test_lora_on_shared_and_mamba_layers_moves_both_ways_and_the_merge_is_refused(zamba, tmp_path):
    """PEFT wraps each hybrid layer's q_proj (one weight, an adapter per layer), and the Mamba layers'
    in_proj and out_proj: so does peftjax, both ways; it trains through the functional core. Merging
    into the shared block is refused by name; an adapter on the Mamba layers alone merges."""
    _, _, path, _ = zamba
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "gate_proj", "linear", "in_proj", "out_proj"],
                  init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tr.ZambaForCausalLM.from_pretrained(path).eval(), peft.LoraConfig(**config))
    assert "base_model.model.model.layers.5.shared_transf.self_attn.q_proj.lora_A.default.weight" in dict(
        theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft", is_trainable=True)
    np.testing.assert_allclose(np.asarray(loaded(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], **PEFT_TOL)
    losses = _tiny.train(loaded, _tiny.batch(ids, mask) | {"labels": np.where(mask == 1, ids, -100)}).losses
    assert losses[-1] < losses[0]
    loaded.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tr.ZambaForCausalLM.from_pretrained(path).eval(), tmp_path / "ours")
    np.testing.assert_allclose(torch_logits(back, input_ids=ids, attention_mask=mask)[valid],
                               np.asarray(loaded(input_ids=ids, attention_mask=mask).logits)[valid], **PEFT_TOL)
    _, adapters, _ = peftjax.split(loaded.base_model)
    assert len(jax.tree.leaves(adapters)) == 2 * (3 * 2 + 3 + 6 * 2)  # q/gate per hybrid layer, linear, Mamba
    with pytest.raises(ValueError, match=r"cannot merge the adapter at model\.layers\.\d\.shared_transf\..*"
                                         r"also \['model\.layers\.\d\.shared_transf"):
        loaded.merge_and_unload()
    mamba_only = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, target_modules=["in_proj", "out_proj"], init_lora_weights=False))
    before = np.asarray(mamba_only(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(np.asarray(mamba_only.merge_and_unload()(input_ids=ids, attention_mask=mask).logits),
                               before, atol=1e-5)


def test_the_classifier_matches_transformers(tmp_path):
    assert_classifier_matches_torch(tr.ZambaForSequenceClassification, _tiny.config("zamba", num_labels=3), tmp_path,
                                    VOCAB, TOL)


def test_what_it_does_not_run_is_refused_by_name(zamba):
    _, _, path, model = zamba
    with pytest.raises(ValueError, match="scan_layers=True needs alike layers"):
        models.from_pretrained(path, scan_layers=True)
    with pytest.raises(ValueError, match=r"layers_block_type \['moe'\] are not supported"):
        models.from_pretrained(path, layers_block_type=["mamba", "hybrid", "moe", "hybrid", "mamba", "hybrid"])
    with pytest.raises(ValueError, match="layers_block_type has 6 entries for num_hidden_layers=4"):
        models.from_pretrained(path, num_hidden_layers=4)
    with pytest.raises(ValueError, match="n_mamba_heads \\(5\\) must divide the Mamba width"):
        models.from_pretrained(path, n_mamba_heads=5)
    with pytest.raises(ValueError, match="prefix_kv is not supported: the Mamba layers"):
        model.model(input_ids=[[3, 4]], prefix_kv=[(np.zeros((1, 2, 2, 16)),) * 2] * 6)
