"""Trainable tokens (standalone and LoRA's ``trainable_token_indices``) and DoRA on embeddings,
against HF PEFT 0.22.0 + PyTorch on tiny Llamas (tied and untied embeddings) and GPT-2, both ways."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.io import read_safetensors, read_safetensors_header, write_safetensors

torch, peft = lazy("torch"), lazy("peft")

IDS = np.array([[3, 5, 7, 3, 9, 1, 12], [5, 2, 3, 4, 6, 8, 5]])  # the trained tokens 3 and 5 occur
TOKENS = [3, 5]
ARCHS = {"llama-tied": _tiny.arch("llama", tie_word_embeddings=True), "llama": _tiny.arch("llama"),
         "gpt2": _tiny.arch("gpt2")}


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def configs(method: str, lib):
    """The same adapter in PEFT (``lib=peft``) or peftjax (``lib=peftjax``)."""
    if method == "tokens":
        return lib.TrainableTokensConfig(token_indices=TOKENS)
    if method == "lora+tokens":
        return lib.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], trainable_token_indices=TOKENS,
                              init_lora_weights=False)
    if method == "lora+tokens-dict":
        return lib.LoraConfig(r=4, target_modules=["q_proj"], trainable_token_indices={"embed_tokens": TOKENS},
                              init_lora_weights=False)
    assert method == "dora-embed"
    return lib.LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], use_dora=True,
                          init_lora_weights=False)


def torch_model(path, arch):
    return quiet(ARCHS[arch].torch_class.from_pretrained, path).eval()


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits.numpy()


def run_jax(model):
    return np.asarray(model(input_ids=IDS).logits)


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=0)


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return lambda arch: tiny_checkpoint(ARCHS[arch])


# ---------------------------------------------------------------- PEFT -> peftjax


@pytest.mark.parametrize("arch,method", [
    ("llama-tied", "tokens"), ("llama", "tokens"), ("gpt2", "tokens"),
    ("llama-tied", "lora+tokens"), ("llama", "lora+tokens-dict"), ("llama", "dora-embed"),
])
def test_peft_made_adapter_gives_same_logits_and_merges(arch, method, path, tmp_path):
    theirs_model = quiet(peft.get_peft_model, torch_model(path(arch), arch), configs(method, peft))
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial rows / magnitudes: both init to (near) no-ops
        for name, p in theirs_model.named_parameters():
            if "trainable_tokens_delta" in name or "magnitude" in name:
                p.add_(torch.randn_like(p) * 0.5)
    theirs_model.save_pretrained(tmp_path)
    keys = set(read_safetensors_header(tmp_path / "adapter_model.safetensors")[0])
    if method == "tokens" and arch != "llama":  # PEFT also writes the tied head's copy of the rows
        assert "base_model.model.lm_head.trainable_tokens_delta" in keys
    theirs = run_torch(theirs_model)
    base = run_torch(torch_model(path(arch), arch))
    assert np.abs(theirs - base).max() > 1e-3

    ours_model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path(arch)), tmp_path)
    assert_close(run_jax(ours_model), theirs)
    assert_close(_jit_logits(ours_model), theirs)
    with ours_model.disable_adapter():
        assert_close(run_jax(ours_model), base, atol=1e-4)
    if method != "dora-embed" or arch == "llama":  # a tied table's merge also moves the tied head, as in PEFT
        ours_model.merge_adapter()
        assert_close(run_jax(ours_model), theirs)
        ours_model.unmerge_adapter()
        assert_close(run_jax(ours_model), theirs)
        assert_close(run_jax(ours_model.merge_and_unload()), theirs)


def _jit_logits(model):
    from flax import nnx

    return np.asarray(nnx.jit(lambda m, i: m(input_ids=i).logits)(model.base_model, IDS))


# ---------------------------------------------------------------- peftjax trains -> PEFT


@pytest.mark.parametrize("arch,method", [
    ("llama-tied", "tokens"), ("gpt2", "tokens"), ("llama", "lora+tokens"), ("llama", "dora-embed"),
])
def test_trained_here_loads_in_peft(arch, method, path, tmp_path, capsys):
    model = peftjax.get_peft_model(models.from_pretrained(path(arch)), configs(method, peftjax))
    counted = quiet(peft.get_peft_model, torch_model(path(arch), arch), configs(method, peft))
    counted.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs_line, ours_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line

    layer = embedding(model)
    table = lambda: np.asarray(layer.embedding.get_value())  # noqa: E731
    table_before = table()
    base = run_jax(model)
    if arch == "gpt2":  # the Trainer here, the functional core (split / make_train_step) for the others
        args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                         max_steps=3, learning_rate=1e-2, logging_steps=1, save_steps=100,
                                         disable_tqdm=True, plot=False, report_to="none")
        result = peftjax.Trainer(model, args, {"input_ids": IDS, "labels": IDS}).train()
        assert result.global_step == 3 and np.isfinite(result.training_loss)
    else:
        trained = _tiny.train(model, _tiny.batch(IDS), steps=3, dropout=False)
        assert trained.losses[-1] < trained.losses[0]
    if method != "dora-embed":
        delta = layer.trainable_tokens_delta["default"].get_value()
        assert np.abs(np.asarray(delta) - table_before[TOKENS]).max(axis=1).min() > 0  # every selected row trained
        np.testing.assert_array_equal(table(), table_before)  # the table itself is frozen
    ours = run_jax(model)
    assert np.abs(ours - base).max() > 1e-3
    model.save_pretrained(tmp_path / "adapter")
    loaded = quiet(peft.PeftModel.from_pretrained, torch_model(path(arch), arch), tmp_path / "adapter")
    assert_close(run_torch(loaded), ours)

    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == ("TRAINABLE_TOKENS" if method == "tokens" else "LORA")
    if method != "dora-embed":
        assert info["token_indices"] == TOKENS


def embedding(model):
    from peftjax.tuners.base import named_modules
    from peftjax.tuners.trainable_tokens import input_embedding_name

    return named_modules(model.base_model)[input_embedding_name(model.base_model)]


def test_only_the_selected_rows_are_trainable(path):
    model = peftjax.get_peft_model(models.from_pretrained(path("llama")), configs("lora+tokens", peftjax))
    _, adapters, _ = peftjax.split(model.base_model)
    shapes = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(adapters)}
    tokens = [k for k in shapes if "trainable_tokens_delta" in k]
    assert len(tokens) == 1 and shapes[tokens[0]] == (2, 32)
    assert len(shapes) == 1 + 2 * 2 * 2  # the rows, and A and B of q_proj and v_proj in both layers
    assert not [k for k in shapes if "'embedding'" in k]


# ---------------------------------------------------------------- configs and bad input


def test_configs_round_trip_peft_dicts():
    for method in ("tokens", "lora+tokens-dict"):
        theirs = json.loads(json.dumps(configs(method, peft).to_dict(), default=str))
        ours = peftjax.PeftConfig.from_dict(theirs)
        assert type(ours) is type(configs(method, peftjax))
        again = ours.to_dict()
        assert {k: again[k] for k in theirs if k in again} == {k: theirs[k] for k in theirs if k in again}
        assert set(again) <= set(theirs)
        assert peftjax.PeftConfig.from_dict(again) == ours


@pytest.mark.parametrize("config,error,match", [
    (dict(token_indices=[3, 96]), ValueError, "outside model.embed_tokens's 96"),
    (dict(token_indices=[3], target_modules=["q_proj"]), NotImplementedError, "q_proj.*linear layer"),
    (dict(token_indices=[-1]), ValueError, "non-negative"),
    (dict(token_indices=["a"]), TypeError, "token_indices"),
])
def test_bad_trainable_tokens_configs(config, error, match, path):
    with pytest.raises(error, match=match):
        peftjax.get_peft_model(models.from_pretrained(path("llama")), peftjax.TrainableTokensConfig(**config))


def test_lora_trainable_tokens_refusals(path):
    base = models.from_pretrained(path("llama"))
    with pytest.raises(ValueError, match="already marked to be trained fully"):
        peftjax.get_peft_model(base, peftjax.LoraConfig(target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                        trainable_token_indices=TOKENS))
    with pytest.raises(TypeError, match="also LoRA target_modules"):
        peftjax.get_peft_model(base, peftjax.LoraConfig(target_modules=["embed_tokens"],
                                                        trainable_token_indices=TOKENS))
    with pytest.raises(ValueError, match="no module name ends with 'wte'"):
        peftjax.get_peft_model(base, peftjax.LoraConfig(target_modules=["q_proj"],
                                                        trainable_token_indices={"wte": TOKENS}))
    with pytest.raises(NotImplementedError, match="lora_bias on embeddings"):
        peftjax.get_peft_model(base, peftjax.LoraConfig(target_modules=["embed_tokens"], lora_bias=True))


def test_tied_head_copy_must_match_the_embedding_rows(path, tmp_path):
    model = peftjax.get_peft_model(models.from_pretrained(path("llama-tied")), configs("tokens", peftjax))
    model.save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = {k: np.array(v) for k, v in read_safetensors(file)[0].items()}
    key = "base_model.model.lm_head.trainable_tokens_delta"
    assert set(tensors) == {key, "base_model.model.model.embed_tokens.trainable_tokens_delta"}
    tensors[key] = tensors[key] + 1
    write_safetensors(file, tensors)
    with pytest.raises(ValueError, match="lm_head.trainable_tokens_delta differs from the tied"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path("llama-tied")), tmp_path)


@pytest.mark.parametrize("method", ["tokens", "lora+tokens-dict"])
def test_an_untied_lm_head_s_token_rows_move_both_ways_with_peft(method, path, tmp_path):
    """Trainable tokens on ``embed_tokens`` and an untied ``lm_head`` (a token's input row and its
    output row: what a new token needs on Llama 3's kind of model), standalone and as LoRA's
    ``trainable_token_indices``: PEFT's file read here gives PEFT's logits, peftjax's file read by
    PEFT gives peftjax's, and merging gives the unmerged logits. A linear layer that is not a
    bias-free output over the vocabulary is refused by name."""
    p = path("llama")

    def config(lib):
        if method == "tokens":
            return lib.TrainableTokensConfig(target_modules=["embed_tokens", "lm_head"], token_indices=TOKENS,
                                             init_weights=False)
        return lib.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False,
                              trainable_token_indices={"embed_tokens": TOKENS, "lm_head": TOKENS})

    pm = quiet(peft.get_peft_model, torch_model(p, "llama"), config(peft))
    with torch.no_grad():  # the rows moved, so both layers' copies show in the logits
        for name, param in pm.named_parameters():
            if "trainable_tokens_delta" in name:
                param.add_(0.5 * torch.randn_like(param))
    quiet(pm.save_pretrained, tmp_path / "peft")
    keys = set(read_safetensors(tmp_path / "peft" / "adapter_model.safetensors")[0])
    assert any(k.startswith("base_model.model.lm_head.") and "trainable_tokens_delta" in k for k in keys)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(p), tmp_path / "peft")
    assert_close(run_jax(ours), run_torch(pm.eval()))

    mine = peftjax.get_peft_model(models.from_pretrained(p), config(peftjax), key=jax.random.key(1))
    for module in [m for _, m in nnx.iter_modules(mine.base_model) if hasattr(m, "trainable_tokens_delta")]:
        for name in module.trainable_tokens_delta:
            rows = module.trainable_tokens_delta[name]
            rows.set_value(rows.get_value() + 0.5)
    mine.save_pretrained(tmp_path / "ours")
    assert set(read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")[0]) == keys
    back = quiet(peft.PeftModel.from_pretrained, torch_model(p, "llama"), tmp_path / "ours")
    expected = run_jax(mine)
    assert_close(run_torch(back.eval()), expected)
    assert_close(run_jax(mine.merge_and_unload()), expected)

    with pytest.raises(NotImplementedError, match=r"q_proj \(.*32 outputs\) is a linear layer that is not a "
                                                  r"bias-free output layer over the vocabulary \(96 tokens\)"):
        peftjax.get_peft_model(models.from_pretrained(p), peftjax.TrainableTokensConfig(
            target_modules=["q_proj"], token_indices=TOKENS))
