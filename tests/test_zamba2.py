"""Zamba2 against PyTorch transformers and HF PEFT: Mamba-2 layers and hybrid layers running two
shared transformer blocks (the third hybrid layer ties to the first), with the model's own
per-use adapters and RoPE; logits, the loss and every weight's gradient (a shared weight's summed
over its uses) against torch's float64 autograd, generation, packed rows, the checkpoint as
transformers writes it, LoRA both ways on shared and unshared layers, and the merge refused where
a weight is shared."""

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

VOCAB = _tiny.FAMILIES["zamba2"][2]["vocab_size"]
# weights drawn at 0.15: at the suite's usual 0.3 this stack's float32 logits move by 1e-3 from float64 (torch's
# as much as ours), which would hide a real difference
TOL = dict(atol=2e-5, rtol=1e-5)
# against PEFT's float32 torch (no float64 twin), adapters on: float32 rounding on both sides
PEFT_TOL = dict(atol=5e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def zamba2(tmp_path_factory):
    """(torch model, its float64 twin, its checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.Zamba2ForCausalLM(_tiny.config("zamba2")).eval(), scale=0.15)
    path = tmp_path_factory.mktemp("zamba2")
    torch_model.save_pretrained(path)
    return torch_model, copy.deepcopy(torch_model).double(), path, models.from_pretrained(path)


def test_logits_gradients_and_generation_match_transformers(zamba2):
    """Logits (left and right padding, eager and jitted), the loss and every weight's gradient against
    torch's float64 autograd (the first block's weights serve layers 1 and 5: their gradients sum
    both uses, as torch's tied parameters'), rematerialised; greedy generation token for token."""
    torch_model, exact, path, model = zamba2
    assert_matches_float64_torch(torch_model, exact, path, model, VOCAB, TOL, {
        "model.layers.1.shared_transformer.self_attn.q_proj.weight",
        "model.layers.1.shared_transformer.self_attn.linear_q_adapter_list.2.0.weight",
        "model.layers.3.shared_transformer.feed_forward.gate_up_proj_adapter_list.1.1.weight",
        "model.layers.4.mamba.A_log"}, stacked=False)


def test_shared_blocks_are_one_weight_and_the_checkpoint_is_what_transformers_writes(zamba2, tmp_path):
    torch_model, _, path, model = zamba2
    first, third = model.model.layers[1].shared_transformer, model.model.layers[5].shared_transformer
    assert third.self_attn.q_proj.kernel is first.self_attn.q_proj.kernel
    assert third.self_attn.q_proj is not first.self_attn.q_proj  # a module per layer (PEFT wraps each)
    assert model.model.layers[3].shared_transformer.self_attn.q_proj.kernel is not first.self_attn.q_proj.kernel
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert not any(k.startswith("model.layers.5.shared_transformer.") for k in keys(path))
    model.save_pretrained(tmp_path)
    assert keys(tmp_path) == keys(path)
    # the functional core holds each shared weight once, and LoRA on the shared blocks trains
    peft_model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, target_modules=["q_proj", "in_proj"], lora_dropout=0.1))
    _, adapters, base = peftjax.split(peft_model.base_model)
    assert len(jax.tree.leaves(base)) == len(keys(path)) and len(jax.tree.leaves(adapters)) == 2 * (3 + 6)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    losses = _tiny.train(peft_model, _tiny.batch(ids, mask) | {"labels": np.where(mask == 1, ids, -100)}).losses
    assert losses[-1] < losses[0]
    ids, mask = padded_batch(VOCAB, seq=9)
    reloaded = tr.Zamba2ForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, input_ids=ids, attention_mask=mask),
                                  torch_logits(torch_model, input_ids=ids, attention_mask=mask))


def test_each_layer_caches_its_kind_and_packed_rows_match_transformers(zamba2):
    _, exact, _, model = zamba2
    assert sorted(model.init_cache(2, 8)[1]) == ["conv", "k", "ssm", "v"] and sorted(model.init_cache(2, 8)[0]) == [
        "conv", "ssm"]
    assert_packed_rows_as_alone(model, exact, TOL)


def test_lora_on_shared_and_mamba_layers_moves_both_ways_and_the_merge_is_refused(zamba2, tmp_path, capsys):
    """PEFT wraps each hybrid layer's q_proj (one weight, an adapter per layer): so does peftjax.
    Merging one of those would change the other layers holding that weight: refused by name; an
    adapter on the Mamba-2 layers alone merges."""
    _, _, path, _ = zamba2
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "in_proj", "gate_up_proj"],
                  init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tr.Zamba2ForCausalLM.from_pretrained(path).eval(), peft.LoraConfig(**config))
    assert "base_model.model.model.layers.5.shared_transformer.self_attn.q_proj.lora_A.default.weight" in dict(
        theirs.named_parameters())
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], **PEFT_TOL)
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tr.Zamba2ForCausalLM.from_pretrained(path).eval(), tmp_path / "ours")
    np.testing.assert_allclose(torch_logits(back, input_ids=ids, attention_mask=mask)[valid],
                               np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid], **PEFT_TOL)
    with pytest.raises(ValueError, match=r"cannot merge the adapter at model\.layers\.\d\.shared_transformer\..*"
                                         r"also \['model\.layers\.\d\.shared_transformer"):
        ours.merge_and_unload()
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(back, input_ids=ids, attention_mask=mask)[valid], **PEFT_TOL)  # untouched
    # the command line says so too, and leaves the output directory as it was
    from peftjax.cli import main

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["merge", str(path), str(tmp_path / "ours"), str(tmp_path / "out")]) == 1
    assert "its base weight is also" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt"]
    mamba_only = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, target_modules=["in_proj"], init_lora_weights=False))
    before = np.asarray(mamba_only(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(np.asarray(mamba_only.merge_and_unload()(input_ids=ids, attention_mask=mask).logits),
                               before, atol=1e-5)


def test_the_classifier_matches_transformers(tmp_path):
    assert_classifier_matches_torch(tr.Zamba2ForSequenceClassification, _tiny.config("zamba2", num_labels=3), tmp_path,
                                    VOCAB, TOL)


def test_what_it_does_not_run_is_refused_by_name(zamba2):
    _, _, path, model = zamba2
    with pytest.raises(ValueError, match="scan_layers=True needs alike layers"):
        models.from_pretrained(path, scan_layers=True)
    with pytest.raises(ValueError, match=r"layers_block_type \['moe'\] are not supported"):
        models.from_pretrained(path, layers_block_type=["mamba", "hybrid", "moe", "hybrid", "mamba", "hybrid"])
    with pytest.raises(ValueError, match="layers_block_type has 6 entries for num_hidden_layers=4"):
        models.from_pretrained(path, num_hidden_layers=4)
    with pytest.raises(ValueError, match="prefix_kv is not supported: the Mamba-2 layers"):
        model.model(input_ids=[[3, 4]], prefix_kv=[(np.zeros((1, 2, 4, 16)),) * 2] * 6)
