"""Adaption prompt (LLaMA-Adapter) against HF PEFT 0.22.0 + PyTorch on Llama and GPT-2, both ways."""

from __future__ import annotations

import dataclasses
import json
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy, quiet, torch_logits
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.io import read_safetensors

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

FAMILIES = ("llama", "gpt2")  # trained here and loaded in PEFT
PEFT_MADE = ("llama", "mistral", "gpt2")  # PEFT 0.22.0's three model types, made there and loaded here
# left-padded rows, as generation pads them; the padded ids are the pad id
IDS = np.random.RandomState(0).randint(1, 96, (3, 7))
MASK = np.array([[1] * 7, [0, 0] + [1] * 5, [0] * 5 + [1] * 2])
IDS[MASK == 0] = 0
LEN, LAYERS = 3, 1  # PEFT's adapter: 3 prompt tokens in the top layer


def run_torch(model):
    return torch_logits(model, input_ids=IDS, attention_mask=MASK)


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x):  # padded positions are not compared (each side fills them its own way)
    return np.asarray(x)[MASK.astype(bool)]


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(a), valid(b), atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(valid(a) - valid(b)).max())


def torch_base(path, family):
    return quiet(_tiny.arch(family).torch_class.from_pretrained, path).eval()


@pytest.fixture(scope="module")
def made(tiny_checkpoint, tmp_path_factory):
    """Per family: the base checkpoint, PEFT's adapter with random prompt AND gate (PEFT zero-inits the
    gate, a no-op), saved, the PEFT model and its logits."""
    out = {}
    for family in PEFT_MADE:
        path = tiny_checkpoint(family)
        config = peft.AdaptionPromptConfig(adapter_len=LEN, adapter_layers=LAYERS, task_type="CAUSAL_LM")
        pm = quiet(peft.get_peft_model, torch_base(path, family), config)
        torch.manual_seed(1)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "adaption_" in name:
                    p.copy_(torch.randn_like(p))
        adapter = tmp_path_factory.mktemp(f"ap_{family}")
        pm.save_pretrained(adapter)
        out[family] = dict(path=path, adapter=adapter, pm=pm, logits=run_torch(pm), base=run_torch(torch_base(path, family)))
    return out


# ---------------------------------------------------------------- the config


def test_config_round_trips_with_peft(tmp_path):
    ours = peftjax.AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM")
    theirs = peft.AdaptionPromptConfig(adapter_len=5, adapter_layers=2, task_type="CAUSAL_LM")
    expected = {k: (v.value if hasattr(v, "value") else v) for k, v in theirs.to_dict().items()}
    assert ours.to_dict() == {**expected, "peft_version": None}  # PEFT's field set, no modules_to_save
    ours.save_pretrained(tmp_path / "ours")
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(loaded).__name__ == "AdaptionPromptConfig" and (loaded.adapter_len, loaded.adapter_layers) == (5, 2)
    theirs.save_pretrained(tmp_path / "theirs")
    theirs_read = peftjax.PeftConfig.from_pretrained(tmp_path / "theirs")
    assert theirs_read == dataclasses.replace(ours, peft_version=peft.__version__)
    with pytest.raises(ValueError, match="adapter_len"):
        peftjax.AdaptionPromptConfig(adapter_len=0, adapter_layers=1)
    with pytest.raises(TypeError, match="target_modules"):
        peftjax.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, target_modules=["self_attn"])
    with pytest.raises(ValueError, match="modules_to_save"):
        peftjax.AdaptionPromptConfig(adapter_len=2, adapter_layers=1, modules_to_save=["lm_head"])


# ---------------------------------------------------------------- PEFT -> peftjax


@pytest.mark.parametrize("family", PEFT_MADE)
def test_peft_made_adapter_gives_peft_logits(made, family, capsys):
    m = made[family]
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(m["path"]), m["adapter"])
    for jit in (False, True) if family != "mistral" else (False,):  # Mistral runs Llama's attention code
        assert_close(run_jax(model, jit=jit), m["logits"])
    assert changed(m["logits"], m["base"]) > 1e-3
    # the file's keys are PEFT's: the top attention module's prompt and gate
    top = "transformer.h.1.attn" if family == "gpt2" else "model.layers.1.self_attn"
    assert sorted(read_safetensors(m["adapter"] / "adapter_model.safetensors")[0]) == [
        f"base_model.model.{top}.adaption_gate", f"base_model.model.{top}.adaption_prompt"]
    # PEFT's parameter counts (its inactive adapters are outside the model; here there is one)
    fresh = peftjax.get_peft_model(models.from_pretrained(m["path"]),
                                   peftjax.AdaptionPromptConfig(adapter_len=LEN, adapter_layers=LAYERS))
    m["pm"].print_trainable_parameters()
    fresh.print_trainable_parameters()
    theirs_line, ours_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line


def test_greedy_generation_matches_peft(made):
    """PEFT's own cached generate: the prompt attention at each decoded position, left padding included."""
    m = made["llama"]
    with torch.no_grad():
        ref = m["pm"].generate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), max_new_tokens=6,
                               do_sample=False, pad_token_id=0, eos_token_id=2).numpy()
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(m["path"]), m["adapter"])
    out = model.generate(IDS, MASK, max_new_tokens=6, pad_token_id=0, eos_token_id=2)
    np.testing.assert_array_equal(out, ref)
    with torch.no_grad():
        base = torch_base(m["path"], "llama").generate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                                                       max_new_tokens=6, do_sample=False, pad_token_id=0,
                                                       eos_token_id=2).numpy()
    assert (base != ref).any()  # the adapter steers the generation


def test_adapters_switch_disable_and_inspect(made, capsys):
    m = made["llama"]
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(m["path"]), m["adapter"])
    # a second prompt on both layers: added inactive, as in PEFT; active, its zero gate is a no-op
    model.add_adapter("both", peftjax.AdaptionPromptConfig(adapter_len=2, adapter_layers=2))
    assert_close(run_jax(model), m["logits"])
    model.set_adapter("both")
    assert_close(run_jax(model), m["base"])
    # PEFT's counts: its inactive prompts are swapped out of the model (97 + base, then 130 + base)
    theirs = quiet(peft.PeftModel.from_pretrained, torch_base(m["path"], "llama"), m["adapter"], is_trainable=True)
    theirs.add_adapter("both", peft.AdaptionPromptConfig(adapter_len=2, adapter_layers=2, task_type="CAUSAL_LM"))
    theirs.set_adapter("both")
    theirs.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs_line, ours_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line
    model.set_adapter("default")
    with model.disable_adapter():
        assert_close(run_jax(model), m["base"])
    assert_close(run_jax(model), m["logits"])
    with pytest.raises(ValueError, match="one at a time"):
        model.set_adapter(["default", "both"])
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        model.merge_and_unload()
    assert_close(run_jax(model), m["logits"])  # the failed merge left the adapter as it was
    with pytest.raises(TypeError, match="adaption prompt are not supported"):
        model.get_layer_status()
    model.delete_adapter("both")
    assert list(model.peft_config) == ["default"]
    bare = model.unload()  # no merge: the prompts are dropped, the base model is left
    assert not jax.tree.leaves(nnx.state(bare, peftjax.TRAINABLE)) and not hasattr(bare.model.layers[1].self_attn,
                                                                                    "adaption_prompt")
    assert_close(run_jax(bare), m["base"])

    assert main(["inspect", str(m["adapter"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["method"], info["adapter_len"], info["adapter_layers"], info["target_modules"]) == (
        "ADAPTION_PROMPT", LEN, LAYERS, "self_attn")
    assert info["parameters"] == LEN * 32 + 1


# ---------------------------------------------------------------- peftjax trains -> PEFT


@pytest.mark.parametrize("family", FAMILIES)
def test_trained_adapter_loads_in_peft(made, family, tmp_path):
    """Llama through the functional core (split / make_train_step), GPT-2 through the Trainer."""
    m = made[family]
    model = peftjax.get_peft_model(models.from_pretrained(m["path"]),
                                   peftjax.AdaptionPromptConfig(adapter_len=4, adapter_layers=2, task_type="CAUSAL_LM"))
    _, trainable, _ = peftjax.split(model.base_model)
    paths = [[str(getattr(k, "key", k)) for k in path] for path, _ in jax.tree_util.tree_leaves_with_path(trainable)]
    # only the prompts and gates train: one of each in each of the 2 layers
    assert sorted(next(k for k in path if k.startswith("adaption_")) for path in paths) == [
        "adaption_gate", "adaption_gate", "adaption_prompt", "adaption_prompt"]
    assert_close(run_jax(model), m["base"])  # the zero gate: a no-op at init
    if family == "llama":
        losses = _tiny.train(model, _tiny.batch(IDS, MASK), optimizer=optax.adam(5e-2)).losses
        assert losses[-1] < losses[0]
    else:
        args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=3,
                                         max_steps=3, learning_rate=5e-2, logging_steps=1, save_steps=100,
                                         disable_tqdm=True, plot=False, report_to="none")
        result = peftjax.Trainer(model, args, {"input_ids": IDS, "attention_mask": MASK, "labels": IDS}).train()
        assert result.global_step == 3 and np.isfinite(result.training_loss)
    ours = run_jax(model)
    assert changed(ours, m["base"]) > 1e-3

    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base(m["path"], family), tmp_path / "adapter").eval()
    assert_close(run_torch(theirs), ours)
    if family == "llama":  # every layer adapted: the stacked (scan_layers) model loads it too
        scanned = peftjax.PeftModel.from_pretrained(models.from_pretrained(m["path"], scan_layers=True),
                                                    tmp_path / "adapter")
        assert_close(run_jax(scanned), ours)


# ---------------------------------------------------------------- refusals


def test_refusals():
    def config(**kw):
        return peftjax.AdaptionPromptConfig(**{"adapter_len": 2, "adapter_layers": 1, **kw})

    def abstract(cls, family, **kw):  # shapes only: every refusal comes before a weight is touched
        return nnx.eval_shape(lambda: cls.from_config(_tiny.config(family, **kw)))

    with pytest.raises(ValueError, match=r"Unsupported model type for adaption prompt: 'qwen2'.*'gpt2', 'llama'"):
        peftjax.get_peft_model(abstract(models.Qwen2ForCausalLM, "qwen2"), config())
    llama = abstract(models.LlamaForCausalLM, "llama")
    with pytest.raises(ValueError, match="more adapter layers '3' than the model has '2'"):
        peftjax.get_peft_model(llama, config(adapter_layers=3))
    with pytest.raises(ValueError, match="adapter_len is None"):
        peftjax.get_peft_model(llama, peftjax.AdaptionPromptConfig(adapter_layers=1))
    with pytest.raises(ValueError, match="target_modules='mlp'"):
        peftjax.get_peft_model(llama, config(target_modules="mlp"))
    with pytest.raises(ValueError, match="adapts only the top 1 of 2 layers, but the model was built with scan_layers"):
        peftjax.get_peft_model(abstract(models.LlamaForCausalLM, "llama", scan_layers=True), config())
