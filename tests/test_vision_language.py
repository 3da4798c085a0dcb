"""The Hub's vision-language checkpoints (Gemma 3 4B and up, Gemma 4) read as their text model, and
LoRA adapters both ways with HF PEFT on the vision-language class (its module names,
``model.language_model.*``). Qwen3.5's: ``tests/test_qwen3_5.py``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import models
from peftjax.io import read_safetensors

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

IDS = np.array([[2, 5, 7, 9, 11, 13, 17, 19, 23], [2, 31, 37, 41, 43, 47, 53, 59, 61]])
TOL = {"gemma3": 1e-5, "gemma4": 2e-5}  # Gemma 4's unscaled attention scores magnify rounding (test_gemma4)
TEXT_CLASS = {"gemma3": "Gemma3ForCausalLM", "gemma4": "Gemma4ForCausalLM"}


def _vision_language(family: str, directory):
    """A tiny ``...ForConditionalGeneration`` (Gemma 3 with a SigLIP tower; Gemma 4 text only),
    saved by transformers; returns the torch model."""
    text = _tiny.config(f"{family}_text").to_dict()
    if family == "gemma3":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=8)
        config = tr.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
        cls = tr.Gemma3ForConditionalGeneration
    else:
        config = tr.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
        cls = tr.Gemma4ForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():  # norms and scalars away from their init, so a misread weight shows
        for name, p in model.named_parameters():
            if "norm" in name or "scalar" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def _logits(model) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=torch.as_tensor(IDS)).logits.float().numpy()


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
def test_a_vision_language_checkpoint_reads_as_its_text_model_and_its_adapters_move_both_ways(family, tmp_path):
    """``models.from_pretrained`` of a ``...ForConditionalGeneration`` checkpoint gives the text
    model (the towers skipped), with the vision-language model's text logits; PEFT's LoRA on the
    vision-language class loads here with PEFT's logits, and peftjax's LoRA is saved under that
    class's module names and gives peftjax's logits in PEFT."""
    theirs = _vision_language(family, tmp_path / "hub")
    ours = models.from_pretrained(tmp_path / "hub")
    assert type(ours).__name__ == TEXT_CLASS[family]
    base_logits = _logits(theirs)
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS).logits), base_logits, atol=TOL[family], rtol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(theirs, peft.LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                                                         init_lora_weights=False))
        pm.save_pretrained(tmp_path / "peft")
    expected = _logits(pm.eval())
    assert np.abs(expected - base_logits).max() > 1e-3  # the adapter shows
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "hub"), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS).logits), expected, atol=TOL[family], rtol=0)
    auto = peftjax.AutoPeftModel.from_pretrained(tmp_path / "peft", tmp_path / "hub")  # the Hub checkpoint
    np.testing.assert_allclose(np.asarray(auto(input_ids=IDS).logits), expected, atol=TOL[family], rtol=0)

    mine = peftjax.get_peft_model(models.from_pretrained(tmp_path / "hub"), peftjax.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    mine.save_pretrained(tmp_path / "ours")
    written = set(read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")[0])
    assert written == set(read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")[0])
    base = _vision_language(family, tmp_path / "again")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    np.testing.assert_allclose(_logits(back), np.asarray(mine(input_ids=IDS).logits), atol=TOL[family], rtol=0)
