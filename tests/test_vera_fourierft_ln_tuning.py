"""VeRA, FourierFT and LN tuning against HF PEFT 0.22.0 + PyTorch on tiny Llama and GPT-2, both ways.

One table of methods drives the interop tests: a PEFT-made adapter with randomised weights gives
the same logits here; an adapter trained here loads in PEFT with the same logits, merges to the
same outputs, and counts the same parameters. The methods' own rules (VeRA's shared projections
and dropout, FourierFT's unsaved spectral positions, LN tuning's swap-merge) follow.
"""

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
from peftjax.cli import main
from peftjax.io import read_safetensors

torch, peft = lazy("torch"), lazy("peft")

IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
pytestmark = pytest.mark.filterwarnings("ignore:.*fan_in_fan_out.*:UserWarning")

# method -> (PEFT config class name, peftjax config class, options per family); options are the same for both
METHODS = {
    "vera": ("VeraConfig", peftjax.VeraConfig, {
        "llama": dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
        "gpt2": dict(r=4, target_modules=["c_attn", "c_proj"], save_projection=False, bias="vera_only")}),
    "fourierft": ("FourierFTConfig", peftjax.FourierFTConfig, {
        "llama": dict(n_frequency=24, scaling=10.0, target_modules=["q_proj", "v_proj"],
                      n_frequency_pattern={"v_proj": 12}),
        "gpt2": dict(n_frequency=30, scaling=10.0, bias="fourier_only")}),  # PEFT's default target: mlp.c_proj
    "ln_tuning": ("LNTuningConfig", peftjax.LNTuningConfig, {"llama": {}, "gpt2": {}}),  # PEFT's default norms
}
# the adapter weights of each method, by the torch parameter name's part
TORCH_ADAPTER_PARTS = {"vera": ("vera_lambda_", "base_layer.bias"), "fourierft": ("fourierft_spectrum", "base_layer.bias"),
                       "ln_tuning": ("ln_tuning_",)}
CASES = [(m, f) for m in METHODS for f in ("llama", "gpt2")]


def torch_base(path, family):
    cls = _tiny.arch(family).torch_class
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path).eval()


def peft_config(method, family, **extra):
    name, _, options = METHODS[method]
    return getattr(peft, name)(task_type="CAUSAL_LM", **options[family], **extra)


def our_config(method, family, **extra):
    _, cls, options = METHODS[method]
    return cls(task_type="CAUSAL_LM", **options[family], **extra)


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def assert_close(a, b, atol=1e-5):
    keep = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], atol=atol, rtol=0)


def changed(a, b) -> float:
    keep = MASK.astype(bool)
    return float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())


# ---------------------------------------------------------------- PEFT -> peftjax


@pytest.mark.parametrize("method,family", CASES)
def test_peft_made_adapter_gives_same_logits(method, family, tiny_checkpoint, tmp_path):
    path = tiny_checkpoint(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base(path, family), peft_config(method, family))
    torch.manual_seed(1)
    with torch.no_grad():  # VeRA and LN tuning start as no-ops: randomise every adapter weight
        for name, p in theirs.named_parameters():
            if any(part in name for part in TORCH_ADAPTER_PARTS[method]):
                p.copy_(p + 0.5 * torch.randn_like(p))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs")
    ref = run_torch(theirs)
    assert changed(ref, run_torch(torch_base(path, family))) > 1e-3

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # VeRA's save_projection=False warning, as PEFT gives it
        model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs")
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)
    model.merge_adapter()  # GPT-2's Conv1D stores its weight (in, out): the merge must transpose as PEFT does
    assert_close(run_jax(model), ref)
    model.unmerge_adapter()

    # written back by peftjax: the same config fields and tensors as PEFT's
    model.save_pretrained(tmp_path / "ours")
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key in set(their_cfg) - {"peft_version", "target_modules", "base_model_name_or_path"}:
        assert our_cfg[key] == their_cfg[key], key
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    theirs_t, _ = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")
    ours_t, _ = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours_t) == sorted(theirs_t)
    for k in theirs_t:
        np.testing.assert_allclose(ours_t[k], theirs_t[k], atol=1e-6, rtol=0, err_msg=k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(torch_base(path, family), tmp_path / "ours").eval()
    assert_close(run_torch(again), ref)


# ---------------------------------------------------------------- peftjax trains -> PEFT, merge, counts


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trained_adapter_loads_in_peft_and_merges(method, tiny_checkpoint, tmp_path, capsys):
    family = "llama"
    path = tiny_checkpoint(family)
    extra = {"vera_dropout": 0.1} if method == "vera" else {}
    model = peftjax.get_peft_model(models.from_pretrained(path), our_config(method, family, **extra))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        counted = peft.get_peft_model(torch_base(path, family), peft_config(method, family, **extra))
    assert model.get_nb_trainable_parameters() == counted.get_nb_trainable_parameters()
    counted.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs_line, ours_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line
    status, their_status = model.get_layer_status(), counted.get_layer_status()
    assert sorted((s.name, s.module_type) for s in status) == sorted((s.name, s.module_type) for s in their_status)
    assert model.get_model_status().adapter_model_type == counted.get_model_status().adapter_model_type

    before = run_jax(model)
    if method == "ln_tuning":  # the Trainer here, the functional core (split / make_train_step) for the others
        args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                         max_steps=5, learning_rate=5e-2, logging_steps=1, save_steps=100,
                                         disable_tqdm=True, plot=False, report_to="none")
        result = peftjax.Trainer(model, args, {"input_ids": IDS, "labels": IDS}).train()
        assert result.global_step == 5 and np.isfinite(result.training_loss)
    else:
        losses = _tiny.train(model, _tiny.batch(IDS, MASK), optimizer=optax.adam(5e-2)).losses
        assert losses[-1] < losses[0]
    ours = run_jax(model)
    assert changed(ours, before) > 1e-3

    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base(path, family), tmp_path / "adapter").eval()
    assert_close(run_torch(theirs), ours)

    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    tensors, _ = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    assert info["method"] == METHODS[method][1].peft_type
    assert info["parameters"] == sum(int(np.prod(v.shape)) for v in tensors.values())

    # merged == unmerged (jitted too); unmerge restores; merge_and_unload exports what transformers runs
    base_params = {k: np.array(v) for k, v in jax.tree.leaves_with_path(nnx.state(model.base_model, peftjax.FROZEN))}
    model.merge_adapter()
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ours)
    model.unmerge_adapter()
    for k, v in jax.tree.leaves_with_path(nnx.state(model.base_model, peftjax.FROZEN)):
        np.testing.assert_allclose(np.asarray(v), base_params[k], atol=1e-5, rtol=0)
    assert_close(run_jax(model), ours)
    merged = model.merge_and_unload()
    assert not jax.tree.leaves(nnx.state(merged, peftjax.TRAINABLE))
    merged.save_pretrained(tmp_path / "merged")
    assert_close(run_torch(torch_base(tmp_path / "merged", family)), ours)


# ---------------------------------------------------------------- the random numbers PEFT never saves


def test_projections_and_positions_are_torchs_own():
    """VeRA's Kaiming-uniform projections and FourierFT's randperm positions, drawn without torch, equal torch's."""
    from peft.tuners.vera.model import _kaiming_init

    from peftjax.tuners.fourierft import fourier_indices
    from peftjax.tuners.vera import vera_projections

    generator = torch.Generator(device="cpu").manual_seed(5)
    want_a, want_b = _kaiming_init((8, 48), generator=generator), _kaiming_init((96, 8), generator=generator)
    got_a, got_b = vera_projections(8, 48, 96, 5)
    np.testing.assert_array_equal(got_a, want_a.numpy())
    np.testing.assert_array_equal(got_b, want_b.numpy())

    for n_in, n_out, n, seed in [(32, 96, 200, 777), (48, 32, 1536, 3), (16, 8, 10, 2**32 + 5)]:
        flat = torch.randperm(n_out * n_in, generator=torch.Generator().manual_seed(seed))[:n]
        want = torch.stack([flat // n_in, flat % n_in]).numpy()
        np.testing.assert_array_equal(fourier_indices(n_in, n_out, n, seed), want)


def test_normal_draws_are_torchs_own():
    """TinyLoRA's projections (``torch.normal`` from a seeded generator), drawn without torch: the
    vectorised Box-Muller torch runs on 16 values or more, the last 16 redrawn when the size is not
    a multiple of 16; fewer than 16 values (torch's scalar path) are refused by name."""
    from peftjax.nn._torch_rng import TorchGenerator

    for seed, shape, std in [(42, (64, 2, 2), 2**-0.5), (43, (5, 3, 3), 3**-0.5), (7, (16,), 1.0), (9, (33,), 0.5),
                             (2**32 + 1, (1000,), 2.0)]:
        want = torch.normal(mean=0.0, std=std, size=shape, generator=torch.Generator().manual_seed(seed)).numpy()
        got = TorchGenerator(seed).normal(shape, 0.0, std)
        np.testing.assert_allclose(got, want, atol=2e-6 * std * 4, rtol=1e-6, err_msg=str((seed, shape)))
    with pytest.raises(ValueError, match="torch.normal of 8 values draws them one by one"):
        TorchGenerator(0).normal((2, 2, 2), 0.0, 1.0)


# ---------------------------------------------------------------- VeRA's rules


def _tiny_llama(**kw):
    return models.LlamaForCausalLM.from_config(_tiny.config("llama", **kw))


def test_vera_layer_math_dropout_and_shared_projections():
    """PEFT's forward: lambda_b * (B[:out] @ (lambda_d * (A[:, :in] @ dropout(x)))); dropout in training only."""
    model = nnx.Module()
    model.q_proj, model.v_proj, model.down_proj = (nnx.Linear(i, o, rngs=nnx.Rngs(k))
                                                   for k, (i, o) in enumerate([(32, 32), (32, 16), (48, 32)]))
    peftjax.inject_adapter_in_model(peftjax.VeraConfig(
        r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False, vera_dropout=0.5), model)
    q, v, down = model.q_proj, model.v_proj, model.down_proj
    # one pair for the model, sized by the largest layer: in 48 (down_proj), out 32 (q_proj, down_proj)
    assert q.vera_A["default"] is down.vera_A["default"] and q.vera_B["default"] is v.vera_B["default"]
    assert q.vera_A["default"].get_value().shape == (4, 48) and q.vera_B["default"].get_value().shape == (32, 4)
    from peftjax.tuners.vera import VeraProjection

    assert len(jax.tree.leaves(nnx.state(model, VeraProjection))) == 2  # kept once, frozen

    def branch(layer, x):
        a = layer.vera_A["default"].get_value()[:, :x.shape[-1]]
        b = layer.vera_B["default"].get_value()[:layer.kernel.get_value().shape[1]]
        d, lb = layer.vera_lambda_d["default"].get_value(), layer.vera_lambda_b["default"].get_value()
        return lb[None] * ((d[None] * (x @ a.T)) @ b.T)

    x = jnp.eye(32)  # one input feature per row: a dropped row contributes nothing, a kept one 1/(1-p) times
    base = x @ v.kernel.get_value() + v.bias.get_value()[None]
    np.testing.assert_allclose(v(x), base + branch(v, x), atol=1e-5)  # eval: no key, no dropout
    with peftjax.dropout_key(jax.random.key(3)):
        y = v(x) - base
    full = branch(v, x) / 0.5
    kept = np.all(np.isclose(y, full, atol=1e-5), axis=1)
    dropped = np.all(np.abs(y) < 1e-6, axis=1)
    assert np.all(kept | dropped) and kept.any() and dropped.any()


def test_vera_file_rules(tiny_checkpoint, tmp_path):
    path = tiny_checkpoint("llama")
    config = peftjax.VeraConfig(r=4, target_modules=["q_proj", "v_proj"], init_weights=False)
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    model.save_pretrained(tmp_path / "a")
    tensors, _ = read_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    assert tensors["base_model.vera_A"].shape == (4, 32) and tensors["base_model.vera_B"].shape == (32, 4)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.vera_lambda_b"].shape == (16,)
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.vera_lambda_d"].shape == (4,)

    import shutil

    from peftjax.io import write_safetensors

    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "adapter_config.json", tmp_path / "b")
    write_safetensors(tmp_path / "b" / "adapter_model.safetensors",
                      {k: np.array(v) for k, v in tensors.items() if k != "base_model.vera_B"})
    with pytest.raises(ValueError, match=r"save_projection is true.*base_model\.vera_B"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "b")

    with pytest.raises(ValueError, match="PRNG initialisation key must be the same"):
        model.add_adapter("other", peftjax.VeraConfig(r=4, target_modules=["q_proj"], projection_prng_key=1))
    with pytest.raises(TypeError, match=r"embed_tokens \(Embed\)"):
        model.add_adapter("other", peftjax.VeraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(NotImplementedError, match="scan_layers=True"):
        peftjax.get_peft_model(_tiny_llama(scan_layers=True), peftjax.VeraConfig(r=4))


# ---------------------------------------------------------------- FourierFT's and LN tuning's rules


def test_fourierft_layer_equals_dense_reference(jit):
    model = _tiny_llama()
    peftjax.get_peft_model(model, peftjax.FourierFTConfig(n_frequency=40, scaling=3.0, target_modules=["v_proj"]))
    v = model.model.layers[0].self_attn.v_proj  # [in 32, out 16]
    rows, cols = v.fourierft_indices["default"].get_value()
    dense = np.zeros((16, 32), np.complex128)
    dense[np.asarray(rows), np.asarray(cols)] = np.asarray(v.fourierft_spectrum["default"].get_value())
    delta = np.fft.ifft2(dense).real * 3.0  # numpy's FFT, torch [out, in]
    x = np.asarray(jax.random.normal(jax.random.key(1), (3, 32)))
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    np.testing.assert_allclose(call(v, x), x @ (np.asarray(v.kernel.get_value()) + delta.T), atol=1e-5)
    with pytest.raises(ValueError, match="n_frequency.*product is 512"):
        peftjax.get_peft_model(_tiny_llama(), peftjax.FourierFTConfig(n_frequency=513, target_modules=["v_proj"]))


def test_ln_tuning_one_adapter_at_a_time_and_swap_merge():
    model = _tiny_llama()
    peft_model = peftjax.get_peft_model(model, peftjax.LNTuningConfig())
    base = run_jax(peft_model)
    norm = model.model.norm
    assert set(peftjax.tuners.adapter_layers(model)) == {
        f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")
    } | {"model.norm"}
    norm.ln_tuning_scale["default"].set_value(norm.scale.get_value() * 3.0)
    tuned = run_jax(peft_model)
    assert changed(tuned, base) > 1e-3
    peft_model.add_adapter("second", peftjax.LNTuningConfig())
    peft_model.set_adapter(["default", "second"])
    with pytest.raises(ValueError, match="more than one adapter at a time"):
        run_jax(peft_model)
    peft_model.set_adapter("default")
    with peft_model.disable_adapter():
        assert_close(run_jax(peft_model), base)
    peft_model.merge_adapter()  # the copy's weights are now the layer's, the layer's the adapter's
    np.testing.assert_allclose(norm.ln_tuning_scale["default"].get_value(), np.ones(32), atol=0)
    assert_close(run_jax(peft_model), tuned)
    peft_model.unmerge_adapter()
    assert_close(run_jax(peft_model), tuned)
    with pytest.raises(TypeError, match=r"LN tuning cannot adapt .*q_proj \(Linear\)"):
        peftjax.get_peft_model(_tiny_llama(), peftjax.LNTuningConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'bert'"):
        peftjax.get_peft_model(models.BertModel.from_config(_tiny.config("bert")), peftjax.LNTuningConfig())


def test_configs_round_trip_peft_dicts_and_name_bad_values():
    samples = {
        "VeraConfig": dict(r=8, target_modules=["q_proj"], projection_prng_key=3, save_projection=False,
                           vera_dropout=0.1, d_initial=0.2, bias="vera_only", layers_to_transform=[0]),
        "FourierFTConfig": dict(n_frequency=9, scaling=2.0, random_loc_seed=1, target_modules="q_proj",
                                n_frequency_pattern={"q_proj": 3}, init_weights=True, bias="fourier_only"),
        "LNTuningConfig": dict(target_modules=["norm"], exclude_modules=["model.norm"], modules_to_save=["lm_head"]),
    }
    for name, kw in samples.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = json.loads(json.dumps(getattr(peft, name)(**kw).to_dict(), default=sorted))
        ours = peftjax.PeftConfig.from_dict(theirs)
        assert type(ours).__name__ == name
        back = ours.to_dict()
        assert set(back) == set(theirs)
        for key in set(theirs) - {"peft_version"}:
            same = sorted(back[key]) == sorted(theirs[key]) if isinstance(theirs[key], list) else back[key] == theirs[key]
            assert same, (name, key, back[key], theirs[key])
    with pytest.raises(ValueError, match="`bias` must be one of"):
        peftjax.VeraConfig(bias="lora_only")
    with pytest.raises(ValueError, match="`vera_dropout` must be in"):
        peftjax.VeraConfig(vera_dropout=1.0)
    with pytest.raises(ValueError, match="`layers_pattern` is specified, `layers_to_transform` must"):
        peftjax.FourierFTConfig(layers_pattern="layers")
    with pytest.raises(ValueError, match=r"n_frequency_pattern\['q'\]"):
        peftjax.FourierFTConfig(n_frequency_pattern={"q": 0})
