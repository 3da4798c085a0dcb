"""``resize_token_embeddings`` (a vocabulary grown for a tokenizer's added tokens) against
transformers, and the adapter files of a resized model both ways with HF PEFT (its
``save_embedding_layers="auto"`` writes the embeddings whole beside the adapter)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import models
from peftjax.io import read_safetensors

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

GROWN = 100  # the tiny vocabulary's 96 tokens and four added ones
IDS = np.array([[1, 5, 97, 40, 99, 3], [2, 98, 7, 96, 11, 4]])  # old and new tokens
OLD = np.array([[1, 5, 40], [2, 7, 11]])  # old tokens only


def _torch_logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=torch.as_tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family, cls, tied", [("llama", "LlamaForCausalLM", False), ("gpt2", "GPT2LMHeadModel", True),
                                               ("bert", "BertForMaskedLM", True)])
def test_resizing_keeps_the_old_rows_starts_new_ones_at_the_mean_and_saves_what_transformers_loads(
        tiny_checkpoint, family, cls, tied, tmp_path):
    """The old tokens' rows unchanged (their logits too), the new rows near the old rows' mean
    (transformers' ``mean_resizing``), a masked LM's decoder bias grown with its mean, the config's
    vocabulary updated, and the saved model is one transformers loads with the same logits;
    shrinking keeps the first rows; ``pad_to_multiple_of`` rounds up."""
    spec = _tiny.arch(family, cls)
    path = tiny_checkpoint(spec)
    model = models.from_pretrained(path)
    before = np.asarray(model(input_ids=OLD).logits)
    embed = next(v for k, (v, _, i) in models._resize.vocabulary_weights(model).items() if i)
    old = np.asarray(embed.get_value()).copy()
    assert model.resize_token_embeddings(GROWN) == GROWN and model.config.vocab_size == GROWN
    new = np.asarray(embed.get_value())
    np.testing.assert_array_equal(new[:96], old)
    np.testing.assert_allclose(new[96:], np.broadcast_to(old.mean(0), (4, old.shape[1])), atol=1e-4)
    assert np.abs(new[96:] - old.mean(0)).max() > 0  # a draw, not the mean itself
    out = np.asarray(model(input_ids=IDS).logits)
    assert out.shape[-1] == GROWN and np.isfinite(out).all()
    np.testing.assert_allclose(np.asarray(model(input_ids=OLD).logits)[..., :96], before, atol=1e-5)
    model.save_pretrained(tmp_path / "grown")
    theirs = spec.torch_class.from_pretrained(tmp_path / "grown").eval()
    assert theirs.config.vocab_size == GROWN
    np.testing.assert_allclose(_torch_logits(theirs, IDS), out, atol=1e-5)
    assert model.resize_token_embeddings(90) == 90 and np.asarray(model(input_ids=OLD).logits).shape[-1] == 90
    assert model.resize_token_embeddings(91, pad_to_multiple_of=8) == 96


def test_a_resized_model_s_lora_adapter_moves_both_ways_with_peft(tiny_checkpoint, tmp_path):
    """PEFT's LoRA on a resized Llama writes its embedding and untied head whole
    (``save_embedding_layers="auto"``); peftjax on a base resized alike, or ``AutoPeftModel`` (which
    resizes to the file's vocabulary), gives PEFT's logits, new tokens included, and so does the
    model ``peftjax merge`` writes, in transformers. peftjax's adapter
    on its resized model writes the same keys, and PEFT on transformers' resized base gives its
    logits. A base not resized is refused by key and shapes."""
    spec = _tiny.arch("llama")
    path = tiny_checkpoint(spec)
    theirs = spec.torch_class.from_pretrained(path).eval()
    theirs.resize_token_embeddings(GROWN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                         init_lora_weights=False))
        pm.save_pretrained(tmp_path / "peft")
    saved, _ = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= set(saved)
    expected = _torch_logits(pm.eval(), IDS)

    base = models.from_pretrained(path)
    base.resize_token_embeddings(GROWN)
    ours = peftjax.PeftModel.from_pretrained(base, tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS).logits), expected, atol=1e-5)
    auto = peftjax.AutoPeftModel.from_pretrained(tmp_path / "peft")
    assert auto.base_model.config.vocab_size == GROWN
    np.testing.assert_allclose(np.asarray(auto(input_ids=IDS).logits), expected, atol=1e-5)
    with pytest.raises(ValueError, match=r"(lm_head|embed_tokens).weight has shape \(100, 32\), the model's "
                                                          r"is \(96, 32\).*resize_token_embeddings\(100\)"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")

    base = models.from_pretrained(path)
    base.resize_token_embeddings(GROWN, seed=3)
    mine = peftjax.get_peft_model(base, peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    mine.save_pretrained(tmp_path / "ours")
    written, _ = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(written) == set(saved)
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(path)
    back = spec.torch_class.from_pretrained(path).eval()
    back.resize_token_embeddings(GROWN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(back, tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch_logits(loaded, IDS), np.asarray(mine(input_ids=IDS).logits), atol=1e-5)

    from peftjax.cli import main  # the command merges onto a base it resizes to the file's vocabulary

    assert main(["merge", str(path), str(tmp_path / "peft"), str(tmp_path / "merged")]) == 0
    merged = spec.torch_class.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.vocab_size == GROWN
    np.testing.assert_allclose(_torch_logits(merged, IDS), expected, atol=1e-5)

    plain = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=4, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")  # not resized: the adapter alone, as PEFT's
    kept, _ = read_safetensors(tmp_path / "plain" / "adapter_model.safetensors")
    assert all("lora_" in k for k in kept)


def test_a_tied_model_s_file_carries_the_head_s_copy_as_peft_s_does(tiny_checkpoint, tmp_path):
    """GPT-2 (tied head) resized: PEFT writes ``transformer.wte.weight`` and the tied
    ``lm_head.weight``; peftjax reads that file (the copy checked against the embedding) and writes
    the same two keys."""
    spec = _tiny.arch("gpt2")
    path = tiny_checkpoint(spec)
    theirs = spec.torch_class.from_pretrained(path).eval()
    theirs.resize_token_embeddings(GROWN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, peft.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights=False))
        pm.save_pretrained(tmp_path / "peft")
    saved, _ = read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")
    base = models.from_pretrained(path)
    base.resize_token_embeddings(GROWN)
    ours = peftjax.PeftModel.from_pretrained(base, tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS).logits), _torch_logits(pm.eval(), IDS), atol=1e-5)
    ours.save_pretrained(tmp_path / "ours")
    written, _ = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert set(written) == set(saved) and {"base_model.model.lm_head.weight",
                                           "base_model.model.transformer.wte.weight"} <= set(written)


def test_added_tokens_trained_as_trainable_tokens_move_both_ways_with_peft(tiny_checkpoint, tmp_path):
    """The whole added-tokens recipe: Llama resized for four new tokens, LoRA with
    ``trainable_token_indices`` on the new tokens' input and (untied) output rows; PEFT's file (the
    resized tables under ``token_adapter.base_layer``) gives PEFT's logits here, and peftjax's file
    has PEFT's keys and gives peftjax's logits in PEFT."""
    spec = _tiny.arch("llama")
    path = tiny_checkpoint(spec)
    new = [96, 97, 98, 99]

    def config(lib):
        return lib.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                              trainable_token_indices={"embed_tokens": new, "lm_head": new})

    theirs = spec.torch_class.from_pretrained(path).eval()
    theirs.resize_token_embeddings(GROWN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, config(peft))
        with torch.no_grad():
            for name, param in pm.named_parameters():
                if "trainable_tokens_delta" in name:
                    param.add_(0.5 * torch.randn_like(param))
        pm.save_pretrained(tmp_path / "peft")
    saved = set(read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")[0])
    assert "base_model.model.lm_head.token_adapter.base_layer.weight" in saved
    base = models.from_pretrained(path)
    base.resize_token_embeddings(GROWN)
    ours = peftjax.PeftModel.from_pretrained(base, tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS).logits), _torch_logits(pm.eval(), IDS), atol=1e-5)

    base = models.from_pretrained(path)
    base.resize_token_embeddings(GROWN)
    mine = peftjax.get_peft_model(base, config(peftjax))
    mine.save_pretrained(tmp_path / "ours")
    assert set(read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")[0]) == saved
    back = spec.torch_class.from_pretrained(path).eval()
    back.resize_token_embeddings(GROWN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(back, tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch_logits(loaded, IDS), np.asarray(mine(input_ids=IDS).logits), atol=1e-5)
