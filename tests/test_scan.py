"""Stacked, scanned decoder layers (``scan_layers=True``) and remat, against the unscanned model,
transformers and HF PEFT."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import lazy, padded_batch, save_tiny, torch_logits

import peftjax
from peftjax import models
from peftjax.io import read_safetensors
from peftjax.nn._scan import StackedLayers

peft = lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

# _tiny's Llama, twice as wide, with a larger vocabulary, untied, and three layers to scan over
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch_model = save_tiny(tr.LlamaForCausalLM, _tiny.config("llama", **TINY), path)
    return torch_model, path


def _train_adapters(peft_model, ids, mask, steps: int) -> None:
    """A few Adam steps on the next-token loss, asserting it falls; the model keeps the result."""
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(ids)}
    losses = _tiny.train(peft_model, batch, steps, optimizer=optax.adam(1e-2), dropout=False).losses
    assert losses[-1] < losses[0]


def _logits(model, jit, ids, mask):
    if jit:
        return nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, jnp.asarray(ids), jnp.asarray(mask))
    return model(input_ids=ids, attention_mask=mask).logits


def test_scanned_logits_equal_unscanned(tiny, jit):
    torch_model, path = tiny
    plain = models.from_pretrained(path)
    scanned = models.from_pretrained(path, scan_layers=True)
    layers = scanned.model.layers
    assert isinstance(layers, StackedLayers) and len(layers) == 3
    # every layer weight is stacked along a leading layer axis
    assert layers.layer.self_attn.q_proj.kernel.get_value().shape == (3, 64, 64)
    assert layers.layer.mlp.down_proj.kernel.get_value().shape == (3, 96, 64)
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    ours = np.asarray(_logits(scanned, jit, ids, mask))
    theirs = np.asarray(_logits(plain, jit, ids, mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               atol=1e-5, rtol=0)


def test_scanned_checkpoint_loads_in_transformers(tiny, tmp_path):
    torch_model, path = tiny
    scanned = models.from_pretrained(path, scan_layers=True)
    scanned.save_pretrained(tmp_path)
    keys = read_safetensors(tmp_path / "model.safetensors")[0]
    assert {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(3)} <= set(keys)
    assert not any(".layer." in k for k in keys)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "scan_layers" not in config and "remat" not in config
    reloaded = tr.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
        torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], atol=1e-6, rtol=0,
    )
    # and the file loads into either layout of peftjax's model
    assert not isinstance(models.from_pretrained(tmp_path).model.layers, StackedLayers)


def test_scanned_from_config_and_num_parameters(tiny):
    _, path = tiny
    config = _tiny.config("llama", **TINY, scan_layers=True)
    scanned = models.LlamaForCausalLM.from_config(config)
    assert isinstance(scanned.model.layers, StackedLayers)
    assert scanned.num_parameters() == models.from_pretrained(path).num_parameters()


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("remat", ["full", "dots_saveable"])
def test_remat_keeps_loss_and_gradients(tiny, scan, remat):
    _, path = tiny
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(ids)}

    def loss_and_grads(**options):
        model = models.from_pretrained(path, **options)
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        graphdef, trainable, rest = peftjax.split(model)

        def loss(t):
            return peftjax.combine(graphdef, t, rest)(**batch).loss

        value, grads = jax.jit(jax.value_and_grad(loss))(trainable)
        leaves = jax.tree.leaves(grads)
        return value, np.concatenate([np.asarray(g).ravel() for g in leaves])

    reference = loss_and_grads(scan_layers=scan)
    value, grads = loss_and_grads(scan_layers=scan, remat=remat)
    np.testing.assert_allclose(value, reference[0], rtol=1e-6)
    np.testing.assert_allclose(grads, reference[1], atol=1e-6, rtol=1e-5)


def test_bad_remat_and_mixed_windows_are_rejected(tmp_path):
    save_tiny(tr.LlamaForCausalLM, _tiny.config("llama", **TINY), tmp_path)
    with pytest.raises(ValueError, match="dots_saveable"):
        models.from_pretrained(tmp_path, remat="sometimes")
    qwen = _tiny.config("qwen2", **TINY, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="one attention window"):
        models.Qwen2ForCausalLM.from_config(tr.Qwen2Config(**qwen.to_dict(), scan_layers=True))


def test_greedy_generation_under_scan(tiny):
    _, path = tiny
    ids, mask = padded_batch(TINY["vocab_size"], seq=6)
    plain = models.from_pretrained(path).generate(ids, mask, max_new_tokens=5, pad_token_id=0)
    scanned = models.from_pretrained(path, scan_layers=True).generate(ids, mask, max_new_tokens=5, pad_token_id=0)
    np.testing.assert_array_equal(scanned, plain)


def test_lora_under_scan_trains_and_loads_in_peft(tiny, tmp_path):
    torch_model, path = tiny
    model = models.from_pretrained(path, scan_layers=True)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    q = model.model.layers.layer.self_attn.q_proj
    # the adapter is stacked like the weight it adapts
    assert q.lora_A["default"].get_value().shape == (3, 64, 4)
    assert q.lora_B["default"].get_value().shape == (3, 4, 64)

    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    _train_adapters(peft_model, ids, mask, steps=6)
    # each layer learned its own adapter
    b = np.asarray(q.lora_B["default"].get_value())
    assert not np.allclose(b[0], b[1])

    peft_model.save_pretrained(tmp_path / "adapter")
    keys = set(read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")[0])
    assert len(keys) == 3 * len(TARGETS) * 2
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight" in keys

    theirs = peft.PeftModel.from_pretrained(tr.AutoModelForCausalLM.from_pretrained(path).eval(), tmp_path / "adapter")
    valid = mask.astype(bool)
    ours = np.asarray(peft_model(input_ids=ids, attention_mask=mask).logits)
    reference = torch_logits(theirs.eval(), input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(ours[valid], reference[valid], atol=1e-5, rtol=0)
    base = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    assert np.abs(reference[valid] - base[valid]).max() > 1e-3  # the adapter changed the output

    # the file loads back into a scanned model and into an unscanned one
    for options in ({"scan_layers": True}, {}):
        again = peftjax.PeftModel.from_pretrained(models.from_pretrained(path, **options), tmp_path / "adapter")
        np.testing.assert_allclose(np.asarray(again(input_ids=ids, attention_mask=mask).logits)[valid],
                                   ours[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True],
                         ids=["lora", "dora"])
def test_merge_and_unload_under_scan(tiny, use_dora):
    _, path = tiny
    model = models.from_pretrained(path, scan_layers=True)
    peft_model = peftjax.get_peft_model(
        model, peftjax.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False, use_dora=use_dora)
    )
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    before = np.asarray(peft_model(input_ids=ids, attention_mask=mask).logits)
    peft_model.merge_adapter()  # merge and unmerge round-trip, layer by layer
    np.testing.assert_allclose(np.asarray(peft_model(input_ids=ids, attention_mask=mask).logits), before, atol=1e-5)
    peft_model.unmerge_adapter()
    np.testing.assert_allclose(np.asarray(peft_model(input_ids=ids, attention_mask=mask).logits), before, atol=1e-5)
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.model.layers, StackedLayers)
    after = np.asarray(merged(input_ids=ids, attention_mask=mask).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(after[valid], before[valid], atol=1e-5, rtol=0)


def test_adapters_that_differ_per_layer_cannot_be_stacked(tiny):
    _, path = tiny
    model = models.from_pretrained(path, scan_layers=True)
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(ValueError, match="scan_layers=False"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))
    after = jax.tree.map(np.asarray, nnx.state(model))
    assert jax.tree.structure(after) == jax.tree.structure(before)  # the model is left as it was


def test_trainer_bf16_under_scan_keeps_float32_adapters(tmp_path):
    from peftjax.training._args import TrainingArguments
    from peftjax.training._trainer import Trainer

    config = _tiny.config("llama", **{**TINY, "num_hidden_layers": 2}, scan_layers=True, remat="full")
    model = models.LlamaForCausalLM.from_config(config, dtype=jnp.bfloat16)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = np.random.default_rng(0).integers(1, 128, (16, 12)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, bf16=True,
                             learning_rate=1e-2, logging_steps=1, disable_tqdm=True, plot=False, report_to="none")
    result = Trainer(peft_model, args, {"input_ids": ids, "labels": ids}).train()
    assert np.isfinite(result.training_loss)
    _, trainable, rest = peftjax.split(model)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(rest) if x.ndim > 1} == {jnp.dtype(jnp.bfloat16)}
    assert model.model.layers.layer.self_attn.q_proj.lora_B["default"].get_value().shape == (2, 4, 64)
    keys = set(read_safetensors(tmp_path / "adapter_model.safetensors")[0])
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys


def test_functional_inject_lora_and_dropout_under_scan(tiny):
    _, path = tiny
    model = models.from_pretrained(path, scan_layers=True)
    peftjax.inject_lora(model, peftjax.LoraConfig(r=4, lora_dropout=0.5, target_modules=["q_proj", "down_proj"],
                                                  init_lora_weights=False))
    assert model.model.layers.layer.mlp.down_proj.lora_A["default"].get_value().shape == (3, 96, 4)
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    batch = {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(ids)}
    graphdef, trainable, rest = peftjax.split(model)

    def loss(key):
        with peftjax.dropout_key(key):
            return peftjax.combine(graphdef, trainable, rest)(**batch).loss

    plain, dropped = float(jax.jit(loss)(None)), float(jax.jit(loss)(jax.random.key(1)))
    assert np.isfinite(dropped) and dropped != plain


def test_adding_adapters_keeps_the_stacked_base_weights(tiny):
    """Injection runs on per-layer views; restacking must hand back the original stacked base
    arrays (not a copy of every layer's weights) and stack only what changed."""
    _, path = tiny
    model = models.from_pretrained(path, scan_layers=True)
    stack = model.model.layers.layer
    before = {name: getattr(stack.self_attn, name).kernel.get_value() for name in ("q_proj", "o_proj")}
    before["down_proj"] = stack.mlp.down_proj.kernel.get_value()
    config = peftjax.LoraConfig(r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    peftjax.get_peft_model(model, config)
    stack = model.model.layers.layer
    assert stack.self_attn.q_proj.kernel.get_value() is before["q_proj"]  # targeted: kernel kept
    assert stack.self_attn.o_proj.kernel.get_value() is before["o_proj"]  # untouched layer
    assert stack.mlp.down_proj.kernel.get_value() is before["down_proj"]
    assert stack.self_attn.q_proj.lora_A["default"].get_value().shape == (3, 64, 2)  # the adapters are stacked


# ---------------------------------------------------------------------------- GPT-2

GPT2_TINY = dict(vocab_size=128, n_layer=3, n_positions=64)  # _tiny's GPT-2 with three layers


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch_model = save_tiny(tr.GPT2LMHeadModel, _tiny.config("gpt2", **GPT2_TINY), path)
    return torch_model, path


def test_gpt2_scanned_equals_unscanned_and_transformers(tiny_gpt2, jit):
    torch_model, path = tiny_gpt2
    scanned = models.from_pretrained(path, scan_layers=True, remat="full")
    assert isinstance(scanned.transformer.h, StackedLayers)
    assert scanned.transformer.h.layer.attn.c_attn.kernel.get_value().shape == (3, 32, 96)
    ids, mask = padded_batch(GPT2_TINY["vocab_size"], seq=9, left=False)
    valid = mask.astype(bool)
    ours = np.asarray(_logits(scanned, jit, ids, mask))
    np.testing.assert_allclose(ours[valid], np.asarray(_logits(models.from_pretrained(path), jit, ids, mask))[valid],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(ours[valid], torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid],
                               atol=1e-5, rtol=0)
    # the cache path (generation) and the dropout path iterate over the stacked blocks
    plain = models.from_pretrained(path)
    gen = lambda m: m.generate(ids[:, :5], mask[:, :5], max_new_tokens=4, pad_token_id=0)  # noqa: E731
    np.testing.assert_array_equal(gen(scanned), gen(plain))
    key = jax.random.key(3)
    np.testing.assert_allclose(np.asarray(scanned(input_ids=ids, dropout_rng=key).logits),
                               np.asarray(plain(input_ids=ids, dropout_rng=key).logits), atol=1e-5, rtol=0)


def test_gpt2_lora_under_scan_round_trips_through_peft_and_transformers(tiny_gpt2, tmp_path):
    torch_model, path = tiny_gpt2
    model = models.from_pretrained(path, scan_layers=True)
    model.save_pretrained(tmp_path / "base")
    keys = read_safetensors(tmp_path / "base" / "model.safetensors")[0]
    assert {f"transformer.h.{i}.attn.c_attn.weight" for i in range(3)} <= set(keys)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    ids, mask = padded_batch(GPT2_TINY["vocab_size"], seq=9, left=False)
    _train_adapters(peft_model, ids, mask, steps=5)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = set(read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")[0])
    assert "base_model.model.transformer.h.2.mlp.c_fc.lora_A.weight" in saved and len(saved) == 3 * 2 * 2
    theirs = peft.PeftModel.from_pretrained(tr.GPT2LMHeadModel.from_pretrained(path).eval(), tmp_path / "adapter")
    valid = mask.astype(bool)
    ours = np.asarray(peft_model(input_ids=ids, attention_mask=mask).logits)
    reference = torch_logits(theirs.eval(), input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(ours[valid], reference[valid], atol=1e-5, rtol=0)
    assert np.abs(reference - torch_logits(torch_model, input_ids=ids, attention_mask=mask))[valid].max() > 1e-3


def test_gpt2_scan_refuses_a_per_block_attention_scale(tmp_path):
    config = _tiny.config("gpt2", **GPT2_TINY, scale_attn_by_inverse_layer_idx=True, scan_layers=True)
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        models.GPT2LMHeadModel.from_config(config)


# ---------------------------------------------------------------------------- BERT

BERT_TINY = dict(vocab_size=128, num_hidden_layers=3, intermediate_size=48, max_position_embeddings=64,
                 num_labels=2)  # _tiny's BERT with three layers


def test_bert_scanned_classifier_equals_transformers_and_trains_a_peft_adapter(tmp_path, jit):
    torch_model = save_tiny(tr.BertForSequenceClassification, _tiny.config("bert", **BERT_TINY), tmp_path / "base")
    model = models.from_pretrained(tmp_path / "base", scan_layers=True, remat="full")
    assert isinstance(model.bert.encoder.layer, StackedLayers)
    ids, mask = padded_batch(BERT_TINY["vocab_size"], seq=9, left=False)
    np.testing.assert_allclose(np.asarray(_logits(model, jit, ids, mask)),
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask), atol=1e-5, rtol=0)
    plain = models.from_pretrained(tmp_path / "base")
    key = jax.random.key(1)  # the dropout path iterates over the stacked layers
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask, dropout_rng=key).logits),
                               np.asarray(plain(input_ids=ids, attention_mask=mask, dropout_rng=key).logits),
                               atol=1e-5, rtol=0)
    peft_model = peftjax.get_peft_model(
        model, peftjax.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["query", "value"], init_lora_weights=False)
    )
    assert model.bert.encoder.layer.layer.attention.self.query.lora_A["default"].get_value().shape == (3, 32, 2)
    peft_model.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(
        tr.BertForSequenceClassification.from_pretrained(tmp_path / "base").eval(), tmp_path / "adapter"
    )
    np.testing.assert_allclose(np.asarray(peft_model(input_ids=ids, attention_mask=mask).logits),
                               torch_logits(theirs.eval(), input_ids=ids, attention_mask=mask), atol=1e-5, rtol=0)
