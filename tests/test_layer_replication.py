"""LoRA's ``layer_replication`` (PEFT's layer stacking) against HF PEFT, both ways.

A 3-layer Llama and a 3-layer BERT classifier, every weight perturbed; ``[[0, 2], [1, 3]]`` stacks
layers ``0 1 1 2``: the copy shares layer 1's weights, each of the four has its own LoRA. The oracle
is PEFT on transformers' model (logits, greedy generation through the 4-layer cache, parameter
counts, the saved file's keys).
"""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest
from flax import nnx
from safetensors.numpy import load_file

import _tiny
from _torch_models import lazy, moved_off_start, padded_batch, quiet, save_random, torch_logits
import peftjax
from peftjax import models
from peftjax.cli import main

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

MAP = [[0, 2], [1, 3]]
VOCAB = _tiny.fields("llama")["vocab_size"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_random("llama", "LlamaForCausalLM", path, num_hidden_layers=3)
    return path


def their(path, cls="AutoModelForCausalLM"):
    return quiet(getattr(tr, cls).from_pretrained, path).eval()


def test_peft_s_replicated_adapter_gives_its_logits_and_generation_here(llama, tmp_path):
    torch.manual_seed(0)
    theirs = quiet(peft.get_peft_model, their(llama), peft.LoraConfig(r=4, layer_replication=MAP,
                                                                     init_lora_weights=False)).eval()
    assert theirs.base_model.model.config.num_hidden_layers == 4
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(llama), tmp_path / "peft")
    assert ours.peft_config["default"].layer_replication == ((0, 2), (1, 3))
    layers = ours.base_model.model.layers
    assert len(layers) == 4 and ours.base_model.config.num_hidden_layers == 4
    # the copy shares layer 1's base weights (one variable), not its adapter
    assert layers[2].self_attn.q_proj.kernel is layers[1].self_attn.q_proj.kernel
    assert layers[2].self_attn.q_proj.lora_A["default"] is not layers[1].self_attn.q_proj.lora_A["default"]
    ids, mask = padded_batch(VOCAB)
    valid = mask.astype(bool)
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    out = np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(ours.base_model, ids, mask))
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)
    with torch.no_grad():
        want = theirs.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=5,
                               do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours.generate(ids, mask, max_new_tokens=5, pad_token_id=0), want)
    # the copies add adapters, not base weights: PEFT's counts
    made = peftjax.get_peft_model(models.from_pretrained(llama), peftjax.LoraConfig(r=4, layer_replication=MAP))
    assert made.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_a_replicated_adapter_trained_here_loads_in_peft(llama, tmp_path, capsys):
    ours = peftjax.get_peft_model(models.from_pretrained(llama), peftjax.LoraConfig(r=4, layer_replication=MAP))
    ids, mask = padded_batch(VOCAB, left=False)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": np.where(mask == 1, ids, -100)}
    losses = _tiny.train(ours, batch, steps=3, optimizer=optax.adam(1e-2), dropout=False).losses
    assert losses[-1] < losses[0]
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["layer_replication"] == MAP
    assert main(["inspect", str(tmp_path / "ours"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layer_replication"] == MAP
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k.split(".layers.")[1].split(".")[0] for k in keys} == {"0", "1", "2", "3"}
    # every copy trained its own adapter: layer 2 (the copy of 1) differs from layer 1
    b = "base_model.model.model.layers.{}.self_attn.q_proj.lora_B.weight"
    assert np.abs(keys[b.format(1)] - keys[b.format(2)]).max() > 1e-4
    theirs = quiet(peft.PeftModel.from_pretrained, their(llama), tmp_path / "ours").eval()
    valid = mask.astype(bool)
    out = np.asarray(ours(input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid],
                               atol=1e-5, rtol=0)


def test_a_replicated_bert_classifier_moves_both_ways(tmp_path):
    """PEFT finds BERT's layers under ``bert.encoder.layer``; its classifier head is saved beside."""
    save_random("bert", "BertForSequenceClassification", tmp_path / "base", num_hidden_layers=3)
    config = dict(r=4, layer_replication=MAP, task_type="SEQ_CLS", init_lora_weights=False)
    torch.manual_seed(0)
    theirs = quiet(peft.get_peft_model, their(tmp_path / "base", "AutoModelForSequenceClassification"),
                   peft.LoraConfig(**config)).eval()
    moved_off_start(theirs, seed=1)  # the classifier too
    theirs.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(_tiny.fields("bert")["vocab_size"], left=False)
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "peft")
    assert len(ours.base_model.bert.encoder.layer) == 4
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits), ref, atol=1e-5)
    ours = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), peftjax.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    loaded = quiet(peft.PeftModel.from_pretrained, their(tmp_path / "base", "AutoModelForSequenceClassification"),
                   tmp_path / "ours").eval()
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits),
                               torch_logits(loaded, input_ids=ids, attention_mask=mask), atol=1e-5)


def test_what_replication_cannot_do_is_refused_by_name(llama, tmp_path):
    for bad, message in (([[2, 1]], r"\[2, 1\) is not a range"), ([0, 2], "pairs of layer indices"),
                         ([], "non-empty list")):
        with pytest.raises(ValueError, match=message):
            peftjax.LoraConfig(layer_replication=bad)
    base = models.from_pretrained(llama)
    with pytest.raises(ValueError, match=r"\[1, 4\) reaches past the model's 3 layers"):
        peftjax.get_peft_model(base, peftjax.LoraConfig(layer_replication=[[0, 2], [1, 4]]))
    assert len(base.model.layers) == 3 and base.config.num_hidden_layers == 3  # untouched
    with pytest.raises(ValueError, match=r"target_modules \['nothing_here'\] matched none"):
        peftjax.get_peft_model(base, peftjax.LoraConfig(layer_replication=MAP, target_modules=["nothing_here"]))
    assert len(base.model.layers) == 3 and base.config.num_hidden_layers == 3  # put back
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(r=2, layer_replication=MAP))
    for merge in (model.merge_adapter, model.merge_and_unload):
        with pytest.raises(ValueError, match="cannot merge LoRA layers when the base model's layers are replicated"):
            merge()
    with pytest.raises(ValueError, match="comes with the first adapter"):
        model.add_adapter("second", peftjax.LoraConfig(r=2, layer_replication=MAP))
    scanned = models.from_pretrained(llama, scan_layers=True)
    with pytest.raises(ValueError, match="scan_layers=False"):
        peftjax.get_peft_model(scanned, peftjax.LoraConfig(layer_replication=MAP))
    path = tmp_path / "gemma2"
    models.Gemma2ForCausalLM.from_config(_tiny.config("gemma2")).save_pretrained(path)
    with pytest.raises(ValueError, match="not model_type 'gemma2'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(layer_replication=[[0, 1]]))
