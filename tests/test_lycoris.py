"""LoHa and LoKr (LyCORIS) against HF PEFT + PyTorch on Llama and BERT, both ways, and the layer math."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.io import read_safetensors
from peftjax.tuners.base import adapter_layers

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
ARCHS = {"llama": _tiny.arch("llama"), "bert": _tiny.arch("bert")}
# every key kind on disk: LoHa's four factors with a rank_pattern; LoKr's whole and factored w1/w2
# (llama q_proj 32 -> 32 splits 4x8 / 4x8; decompose_both with r=2 factors both, r=8 neither)
CONFIGS = {
    ("loha", "llama"): dict(r=4, alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2}),
    ("loha", "bert"): dict(r=4, alpha=8, target_modules=["query", "value", "output.dense"],
                           alpha_pattern={"value": 3}),
    ("lokr", "llama"): dict(r=2, alpha=3, target_modules=["q_proj", "v_proj", "gate_proj"], decompose_both=True,
                            rank_pattern={"gate_proj": 8}),
    ("lokr", "bert"): dict(r=2, alpha=4, target_modules=["query", "value", "intermediate.dense"],
                           decompose_factor=4),
}
COMBOS = sorted(CONFIGS)
TORCH_CONFIG = {"loha": "LoHaConfig", "lokr": "LoKrConfig"}
OUR_CONFIG = {"loha": peftjax.LoHaConfig, "lokr": peftjax.LoKrConfig}


@pytest.fixture(scope="module")
def paths(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


def torch_base(paths, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(paths[arch]).eval()


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x):
    return x[MASK.astype(bool)] if x.ndim == 3 else x


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(np.asarray(a)), valid(np.asarray(b)), atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(valid(np.asarray(a)) - valid(np.asarray(b))).max())


# ---------------------------------------------------------------- PEFT -> peftjax


@pytest.mark.parametrize("method,arch", COMBOS)
def test_peft_made_adapter_gives_same_logits(method, arch, paths, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = getattr(peft, TORCH_CONFIG[method])(task_type=ARCHS[arch].task, **CONFIGS[method, arch])
        torch_model = peft.get_peft_model(torch_base(paths, arch), config)
    torch.manual_seed(1)
    with torch.no_grad():  # PEFT's init is a no-op (a zero factor) and the head copy equals the original
        for name, p in torch_model.named_parameters():
            if "hada_" in name or "lokr_" in name or "modules_to_save" in name:
                p.copy_(0.3 * torch.randn_like(p))
    torch_model.save_pretrained(tmp_path)
    ref = run_torch(torch_model)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(paths[arch]), tmp_path)
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)
    assert changed(ref, run_torch(torch_base(paths, arch))) > 1e-3


# ---------------------------------------------------------------- peftjax trains -> PEFT, merge, export


@pytest.mark.parametrize("method,arch", [("loha", "bert"), ("lokr", "llama")])
def test_random_adapter_made_here_loads_in_peft(method, arch, paths, tmp_path):
    """The cheap half of the other two pairs (the training path is the next test's); alpha=256 makes the
    Kaiming-initialised update large enough to move the tiny models' logits well past the tolerance."""
    config = OUR_CONFIG[method](task_type=ARCHS[arch].task, init_weights=False, **{**CONFIGS[method, arch], "alpha": 256})
    model = peftjax.get_peft_model(models.from_pretrained(paths[arch]), config)
    ours = run_jax(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(torch_base(paths, arch), tmp_path).eval()
    assert_close(ours, run_torch(torch_model))
    assert changed(ours, run_torch(torch_base(paths, arch))) > 1e-3


@pytest.mark.parametrize("method,arch,trainer", [("loha", "llama", True), ("lokr", "bert", False)])
def test_trained_adapter_loads_in_peft_and_merges(method, arch, trainer, paths, tmp_path):
    """Trained by the Trainer (LoHa) or the functional core (``split`` / ``make_train_step``, LoKr)."""
    task = ARCHS[arch].task
    # dropouts on: training runs them (with the step's key); evaluation and the saved adapter do not
    config = OUR_CONFIG[method](task_type=task, rank_dropout=0.2, module_dropout=0.1, **CONFIGS[method, arch])
    model = peftjax.get_peft_model(models.from_pretrained(paths[arch]), config)
    base_logits = run_jax(model)
    if trainer:
        args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                         max_steps=4, learning_rate=5e-2, disable_tqdm=True, plot=False,
                                         report_to="none", save_steps=0)
        result = peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
        assert np.isfinite(result.training_loss)
    else:
        losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), optimizer=optax.adam(5e-2)).losses
        assert losses[-1] < losses[0]
    ours = run_jax(model)
    assert changed(ours, base_logits) > 1e-3

    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(torch_base(paths, arch), tmp_path).eval()
    assert_close(ours, run_torch(torch_model))

    # merged == unmerged, and unmerge restores the kernels
    layers = adapter_layers(model.base_model)
    kernels = {n: np.array(m.kernel.get_value()) for n, m in layers.items() if hasattr(m, "kernel")}
    model.merge_adapter()
    assert_close(run_jax(model, jit=True), ours)
    model.unmerge_adapter()
    for n, k in kernels.items():
        np.testing.assert_allclose(layers[n].kernel.get_value(), k, atol=1e-6, rtol=0)
    assert_close(run_jax(model), ours)

    # merged and exported, transformers alone reproduces the logits
    merged = model.merge_and_unload()
    assert not jax.tree.leaves(nnx.state(merged, peftjax.TRAINABLE))
    merged.save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = ARCHS[arch].torch_class.from_pretrained(tmp_path / "merged").eval()
    assert_close(run_torch(exported), ours)


# ---------------------------------------------------------------- counts, files, configs, inspect


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_counts_files_and_configs_match_peft(method, paths, tmp_path, capsys):
    """Default targets (PEFT's LoRA table), parameter counts, keys and shapes, and the config both ways."""
    from peftjax.cli import main

    extra = dict(decompose_both=True, r=2, rank_pattern={"v_proj": 16}) if method == "lokr" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(paths, "llama"),
                                          getattr(peft, TORCH_CONFIG[method])(task_type="CAUSAL_LM", **extra))
    model = peftjax.get_peft_model(models.from_pretrained(paths["llama"]),
                                   OUR_CONFIG[method](task_type="CAUSAL_LM", **extra))
    assert set(adapter_layers(model.base_model)) == set(torch_model.targeted_module_names)
    assert model.get_nb_trainable_parameters() == torch_model.get_nb_trainable_parameters()
    torch_model.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs
    status = {s.name: s.module_type for s in model.get_layer_status()}
    assert status == {s.name: s.module_type for s in torch_model.get_layer_status()}  # "loha.Linear", ...

    torch_model.save_pretrained(tmp_path / "theirs")
    model.save_pretrained(tmp_path / "ours")
    theirs, _ = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")
    ours, _ = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key, value in their_cfg.items():
        if key not in ("peft_version", "auto_mapping", "base_model_name_or_path", "target_modules"):
            assert our_cfg[key] == value, key
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    # each reads the other's file into an equal config
    assert peftjax.PeftConfig.from_pretrained(tmp_path / "theirs").to_dict()["rank_pattern"] == extra.get(
        "rank_pattern", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(loaded).__name__ == TORCH_CONFIG[method] and loaded.r == torch_model.peft_config["default"].r

    assert main(["inspect", str(tmp_path / "theirs"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == method.upper() and info["alpha"] == 8
    assert info["parameters"] == torch_model.get_nb_trainable_parameters()[0]
    # LoKr: v_proj (16 -> 32) at r=16 keeps both factors whole; q_proj's w2 is factored at r=2
    assert info["ranks_in_file"] == ([8] if method == "loha" else [2])


# ---------------------------------------------------------------- layer math


def _linear(n_in=12, n_out=10):
    model = nnx.Module()
    model.proj = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0))
    return model


def test_factorization_factor_shapes_and_init_are_peft_s():
    from peftjax.tuners.lokr import factorization

    peft_factorization = peft.tuners.lokr.layer.factorization

    for dim in (1, 2, 7, 12, 32, 37, 48, 96, 128, 127, 360):
        for factor in (-1, 1, 2, 3, 4, 5, 8, 16, 0, -3):
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)
    # on a 12 -> 10 layer: the factor shapes PEFT picks for (decompose_both, r, decompose_factor), and
    # for each init the same factors are zero (True, "lycoris": a no-op start) and the others within
    # Kaiming-uniform's bound 1/sqrt(fan_in)
    cases = [("lokr", dict(decompose_both=True, r=1)), ("lokr", dict(decompose_both=True, r=2, decompose_factor=2)),
             ("lokr", dict(r=8, decompose_factor=3, init_weights="lycoris")),
             ("lokr", dict(decompose_both=True, r=1, init_weights="lycoris")), ("loha", dict(r=2))]
    for method, kw in cases:
        kw = dict(target_modules=["proj"], **kw)
        ours = peftjax.get_peft_model_state_dict(peftjax.get_peft_model(_linear(), OUR_CONFIG[method](**kw)))
        tm = torch.nn.Sequential()
        tm.proj = torch.nn.Linear(12, 10)
        theirs = peft.get_peft_model_state_dict(peft.get_peft_model(tm, getattr(peft, TORCH_CONFIG[method])(**kw)))
        theirs = {k: v.numpy() for k, v in theirs.items()}
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}, kw
        for k, v in theirs.items():
            assert (not np.any(ours[k])) == (not np.any(v)), (kw, k)
            assert np.abs(ours[k]).max() <= 1 / np.sqrt(v.shape[1]) + 1e-7, (kw, k)


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_layer_equals_dense_reference(method, jit):
    """LoHa: ((w1a w1b) * (w2a w2b)) alpha/r; LoKr: kron(w1_a w1_b, w2) alpha/r; two adapters add; merged too."""
    model = _linear()
    kw = dict(target_modules=["proj"], init_weights=False, r=2, alpha=3)
    if method == "lokr":  # 10 = 2x5, 12 = 3x4: at r=1 both factors are low-rank products
        kw.update(decompose_both=True, r=1, alpha=1.5)
    peft_model = peftjax.get_peft_model(model, OUR_CONFIG[method](**kw))
    peft_model.add_adapter("second", OUR_CONFIG[method](**{**kw, "alpha": 5}), key=jax.random.key(3))
    layer = model.proj
    v = {k: np.asarray(getattr(layer, k)[n].get_value(), np.float64)
         for k in layer.weight_dicts for n in ("default",) if n in getattr(layer, k)}
    if method == "loha":
        dense = (v["hada_w1_a"] @ v["hada_w1_b"]) * (v["hada_w2_a"] @ v["hada_w2_b"]) * 1.5
    else:
        assert set(v) == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
        dense = np.kron(v["lokr_w1_a"] @ v["lokr_w1_b"], v["lokr_w2_a"] @ v["lokr_w2_b"]) * 1.5
    w, b = np.asarray(layer.kernel.get_value()), np.asarray(layer.bias.get_value())
    second = np.asarray(layer.delta_weight("second"))
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 12)))
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    np.testing.assert_allclose(call(layer, x), x @ w + b[None] + x @ dense.T, atol=1e-5)
    layer.set_active_adapters(("default", "second"))
    both = x @ w + b[None] + x @ dense.T + x @ second.T
    np.testing.assert_allclose(call(layer, x), both, atol=1e-5)
    peft_model.merge_adapter(["default", "second"])
    np.testing.assert_allclose(layer.kernel.get_value(), w + dense.T + second.T, atol=1e-5)
    np.testing.assert_allclose(call(layer, x), both, atol=1e-5)

    # a bfloat16 layer: the update is computed in the adapter's float32 and the output stays bfloat16
    low = nnx.Module()
    low.proj = nnx.Linear(12, 10, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    peftjax.get_peft_model(low, OUR_CONFIG[method](**kw))
    w16 = np.asarray(low.proj.kernel.get_value(), np.float32)
    x16 = jnp.asarray(x, jnp.bfloat16)
    out = call(low.proj, x16)
    assert out.dtype == jnp.bfloat16
    assert {v.dtype for v in jax.tree.leaves(nnx.state(low, peftjax.TRAINABLE))} == {jnp.dtype(jnp.float32)}
    ref = np.asarray(x16, np.float32) @ w16 + np.asarray(low.proj.bias.get_value(), np.float32)[None]
    ref = ref + np.asarray(x16, np.float32) @ np.asarray(low.proj.delta_weight("default")).T
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, atol=3e-2)


@pytest.mark.parametrize("method,scaled", [("loha", True), ("lokr", False), ("lokr", True)])
def test_dropouts_are_training_only_and_follow_peft(method, scaled):
    """module_dropout skips the whole update; rank_dropout zeroes output rows of ΔW (divided by the kept
    fraction for LoHa, and for LoKr with rank_dropout_scale); without a key nothing is dropped."""
    kw = dict(target_modules=["proj"], init_weights=False, r=2, rank_dropout=0.5, module_dropout=0.3)
    if method == "lokr":
        kw["rank_dropout_scale"] = scaled
    model = _linear(12, 16)
    peftjax.get_peft_model(model, OUR_CONFIG[method](**kw))
    layer = model.proj
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, 12)))
    w, b = np.asarray(layer.kernel.get_value()), np.asarray(layer.bias.get_value())
    base, full = x @ w + b[None], x @ np.asarray(layer.delta_weight("default")).T
    np.testing.assert_allclose(layer(x), base + full, atol=1e-5)  # evaluation: no dropout at all

    step = nnx.jit(lambda m, x, key: _with_key(m, x, key))
    skipped = kept = thinned = 0
    for i in range(24):
        extra = np.asarray(step(layer, x, jax.random.key(i))) - base
        if np.abs(extra).max() < 1e-6:  # module dropout: the adapter skipped for this step
            skipped += 1
            continue
        kept += 1
        # rank dropout: each output column of the update is 0 or the full one times one common factor
        ratio = np.array([np.dot(extra[:, j], full[:, j]) / np.dot(full[:, j], full[:, j]) for j in range(16)])
        np.testing.assert_allclose(extra, full * ratio[None], atol=1e-5)
        on = ratio > 0.5
        assert np.all(np.isclose(ratio, 0, atol=1e-5) | on)
        expected = 1 / on.mean() if scaled else 1.0
        np.testing.assert_allclose(ratio[on], expected, rtol=1e-4)
        thinned += not on.all()
    assert skipped and kept > skipped and thinned  # module p = 0.3; rank p = 0.5 over 16 rows


def _with_key(layer, x, key):
    with peftjax.dropout_key(key):
        return layer(x)


# ---------------------------------------------------------------- bad input


def test_errors_name_the_problem(paths, tmp_path):
    gpt2 = models.GPT2LMHeadModel.from_config(_tiny.config("gpt2"))
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.attn\.c_attn \(Conv1D\).*Conv1D"):
        peftjax.get_peft_model(gpt2, peftjax.LoHaConfig())  # PEFT refuses GPT-2's Conv1D for LyCORIS too
    llama = models.from_pretrained(paths["llama"])
    with pytest.raises(TypeError, match=r"model\.embed_tokens \(Embed\)"):
        peftjax.get_peft_model(llama, peftjax.LoKrConfig(target_modules=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match="use_effective_conv2d"):
        peftjax.LoKrConfig(use_effective_conv2d=True)
    with pytest.raises(TypeError, match="init_weights"):
        peftjax.LoHaConfig(init_weights="lycoris")
    with pytest.raises(ValueError, match="init_weights"):
        peftjax.LoKrConfig(init_weights="gaussian")
    with pytest.raises(ValueError, match="rank_dropout"):
        peftjax.LoHaConfig(rank_dropout=1.5)

    peftjax.get_peft_model(llama, peftjax.LoHaConfig(r=4)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(ValueError, match=r"q_proj\.hada_w1_a: expected shape \[32, 2\].*found \[32, 4\]"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(paths["llama"]), tmp_path)
