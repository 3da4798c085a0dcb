"""GPT-NeoX (Pythia) beyond the decoder suites' cases (``test_llama.py``'s variants,
``test_family_methods.py``): the Hub's files as Pythia's are written (``rotary_pct`` and
``rotary_emb_base`` in ``config.json``, the head as ``embed_out``, the old attention buffers), task
models from a causal LM's file, and LoRA trained here on the fused ``query_key_value`` read by
PEFT (the token classifier and question answering: ``test_token_classification.py``,
``test_question_answering.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tr
from _tiny import arch
from _torch_models import padded_batch, save_tiny, torch_logits
from safetensors.numpy import load_file, save_file

import peftjax
from peftjax import models

VOCAB = 96


def test_a_pythia_file_loads_as_transformers_reads_it_and_saves_as_it_writes(tmp_path):
    """Pythia's ``config.json`` names RoPE by ``rotary_pct`` and ``rotary_emb_base`` and its weights
    carry ``attention.bias``, ``attention.masked_bias`` and ``rotary_emb.inv_freq`` buffers:
    transformers reads such a file, and so does peftjax, with the same logits; both write the head
    as ``embed_out``."""
    theirs = save_tiny(tr.GPTNeoXForCausalLM, arch("gpt_neox").config(), tmp_path / "new")
    hub = tmp_path / "hub"
    hub.mkdir()
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    del config["rope_parameters"]
    (hub / "config.json").write_text(json.dumps({**config, "rotary_pct": 0.25, "rotary_emb_base": 500}))
    weights = load_file(str(tmp_path / "new" / "model.safetensors"))
    assert "embed_out.weight" in weights and "lm_head.weight" not in weights
    for i in range(2):
        weights[f"gpt_neox.layers.{i}.attention.bias"] = np.tril(np.ones((1, 1, 64, 64), bool))
        weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = np.array(-1e9, np.float32)
        weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    save_file(weights, str(hub / "model.safetensors"))
    theirs = tr.GPTNeoXForCausalLM.from_pretrained(hub).eval()
    assert theirs.config.rope_parameters["partial_rotary_factor"] == 0.25
    ours = models.from_pretrained(hub)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=1e-5)
    default = models.from_pretrained(tmp_path / "new")  # rotary_pct 0.5, base 10000: other logits
    assert np.abs(np.asarray(default(input_ids=ids, attention_mask=mask).logits)
                  - np.asarray(ours(input_ids=ids, attention_mask=mask).logits))[valid].max() > 1e-3
    ours.save_pretrained(tmp_path / "ours")
    written = load_file(str(tmp_path / "ours" / "model.safetensors"))
    assert set(written) == {k for k in weights if not k.endswith(("attention.bias", "masked_bias", "inv_freq"))}
    back = tr.GPTNeoXForCausalLM.from_pretrained(tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(back, input_ids=ids, attention_mask=mask)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=1e-6)


def test_a_task_model_starts_from_a_causal_checkpoint(tmp_path):
    """A sequence classifier, token classifier or question answerer from a Pythia causal LM file:
    the decoder read, the head new, the LM head (``embed_out``) left out, as transformers does."""
    save_tiny(tr.GPTNeoXForCausalLM, arch("gpt_neox").config(), tmp_path)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    for name in ("GPTNeoXForSequenceClassification", "GPTNeoXForTokenClassification", "GPTNeoXForQuestionAnswering"):
        ours = getattr(models, name).from_pretrained(tmp_path, num_labels=3)
        theirs = getattr(tr, name).from_pretrained(tmp_path, num_labels=3).eval()
        with torch.no_grad():
            expected = theirs.gpt_neox(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
        hidden = np.asarray(ours.gpt_neox(input_ids=ids, attention_mask=mask).last_hidden_state)
        np.testing.assert_allclose(hidden[valid], expected.last_hidden_state.numpy()[valid], atol=1e-5)


def test_lora_on_the_fused_projection_moves_both_ways(tmp_path):
    """PEFT's default target, ``query_key_value`` (its output each head's q, k and v in turn):
    an adapter trained here gives its logits in PEFT, and PEFT's gives its logits here."""
    peft = pytest.importorskip("peft")
    theirs_base = save_tiny(tr.GPTNeoXForCausalLM, arch("gpt_neox").config(), tmp_path / "base")
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                   peftjax.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False))
    assert set(model.peft_config["default"].target_modules) == {"query_key_value"}
    model.save_pretrained(tmp_path / "ours")
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    mine = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    theirs = peft.PeftModel.from_pretrained(theirs_base, tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], mine[valid],
                               atol=1e-5)
    with model.disable_adapter():
        assert np.abs(np.asarray(model(input_ids=ids, attention_mask=mask).logits) - mine)[valid].max() > 1e-3
    torch.manual_seed(2)
    fresh = tr.GPTNeoXForCausalLM.from_pretrained(tmp_path / "base").eval()
    theirs = peft.get_peft_model(fresh, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=1e-5)
