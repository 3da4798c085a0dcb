"""Randomized PiSSA (``init_lora_weights="pissa_niter_<N>"``), ``fan_in_fan_out`` and the case of
init names, against HF PEFT 0.22.0 + PyTorch on the same base weights.

PEFT draws the randomized SVD's test matrix from torch's global RNG, which JAX cannot reproduce, so
the tests compare what does not depend on it: the adapter on a matrix whose spectrum decays fast
enough for the subspace iteration to converge to float32 rounding, the identity ``residual +
s * B @ A == W`` for any draw, and the singular values' convergence to the exact SVD's as ``N`` grows.
"""

from __future__ import annotations

import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import models
from peftjax.linen import inject, intercept, save_adapter
from peftjax import tuners
from peftjax.tuners.lora import svd_lowrank

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

R, ALPHA = 4, 8
S = ALPHA / R
# PEFT's own warnings (peft/tuners/lora/layer.py, dispatch_default)
LINEAR_WARNING = (
    "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False."
)
CONV1D_WARNING = "fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True."


def spectrum(out: int, inn: int, decay: float, seed: int = 0) -> np.ndarray:
    """A ``[out, in]`` float32 matrix with random singular vectors and singular values ``decay**k``."""
    rng = np.random.RandomState(seed)
    u = np.linalg.qr(rng.randn(out, out))[0]
    v = np.linalg.qr(rng.randn(inn, inn))[0]
    k = min(out, inn)
    return ((u[:, :k] * decay ** np.arange(k)) @ v[:, :k].T).astype(np.float32)


def peft_linear(w: np.ndarray, init, seed: int = 0, **kw):
    """PEFT on ``Sequential(proj=Linear)`` holding ``w [out, in]``: ``(s * B @ A, residual W)``."""
    torch.manual_seed(seed)
    seq = torch.nn.Sequential()
    seq.add_module("proj", torch.nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        seq.proj.weight.copy_(torch.from_numpy(w))
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=init, **kw)
    layer = peft.get_peft_model(seq, cfg).base_model.model.proj
    delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy() * S
    return delta, layer.base_layer.weight.detach().numpy()


class Proj(nnx.Module):
    def __init__(self, w: np.ndarray):
        self.proj = nnx.Linear(w.shape[1], w.shape[0], rngs=nnx.Rngs(0))
        self.proj.kernel.set_value(jnp.asarray(w.T))

    def __call__(self, x):
        return self.proj(x)


def ours_linear(w: np.ndarray, init, key: int = 0):
    """peftjax on an ``nnx.Linear`` holding ``w``: ``(s * B @ A, residual W, model)``, torch layout."""
    model = Proj(w)
    cfg = peftjax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=init)
    tuners.inject_lora(model, cfg, key=jax.random.key(key))
    delta = np.asarray(model.proj.delta_weight("default")).T
    return delta, np.asarray(model.proj.kernel.get_value()).T, model


def call(jit):
    return nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_0", "pissa_niter_1", "pissa_niter_16", "pissa_niter_100"])
def test_config_accepts_what_peft_injects(init):
    cfg = peftjax.LoraConfig(init_lora_weights=init)
    assert peftjax.LoraConfig.from_dict(cfg.to_dict()).init_lora_weights == init
    peft_linear(spectrum(6, 5, 0.5), init)  # PEFT runs it (pissa_niter_0: no subspace iteration)


@pytest.mark.parametrize("init", ["pissa_niter_x", "pissa_niter_", "pissa_niter_1.5", "pissa_niter_4_x", "pissa_x"])
def test_config_rejects_what_peft_fails_to_inject(init):
    with pytest.raises(ValueError, match=r"`init_lora_weights` must be 'pissa' .*'pissa_niter_<N>' with N a non-neg"):
        peftjax.LoraConfig(init_lora_weights=init)
    with pytest.raises(ValueError):  # PEFT accepts the config, then fails in get_peft_model
        peft_linear(spectrum(6, 5, 0.5), init)


def test_config_rejects_a_negative_niter():
    # PEFT runs int("-1") through range(), i.e. no iteration; torch documents niter >= 0, and so do we
    with pytest.raises(ValueError, match="non-negative integer"):
        peftjax.LoraConfig(init_lora_weights="pissa_niter_-1")


# ---------------------------------------------------------------- (a) against PEFT where the draw does not matter


@pytest.mark.parametrize("shape", [(20, 24), (24, 20)], ids=["wide", "tall"])
def test_converged_pissa_niter_equals_peft(shape):
    # s_k = 10 * 0.3**k: the subspace error after N iterations is ~(s_5/s_4)**(2N+1) = 0.3**17 ~ 1e-9 for
    # N = 8, far below float32's ~6e-8; so both sides are the exact rank-4 truncation up to the rounding
    # of a few QR/SVD steps (measured 2.3e-7 * max|W|). B and A alone are only defined up to signs.
    w = 10 * spectrum(*shape, decay=0.3)
    their_delta, their_residual = peft_linear(w, "pissa_niter_8")
    our_delta, our_residual, _ = ours_linear(w, "pissa_niter_8")
    tol = 1e-5 * np.abs(w).max()
    np.testing.assert_allclose(our_delta, their_delta, rtol=0, atol=tol)
    np.testing.assert_allclose(our_residual, their_residual, rtol=0, atol=tol)
    exact_delta, _, _ = ours_linear(w, "pissa")
    np.testing.assert_allclose(our_delta, exact_delta, rtol=0, atol=tol)
    assert np.abs(our_residual).max() < 0.1 * np.abs(w).max()  # the top components moved into the adapter


# ---------------------------------------------------------------- (b) the adapted model starts as the base model


@pytest.mark.parametrize("niter", [0, 1, 4])
def test_output_right_after_init_equals_the_base(niter, jit):
    w = spectrum(24, 32, 0.95, seed=1)  # a slow decay: the randomized factors are far from the exact ones
    x = jax.random.normal(jax.random.key(3), (5, 32))
    base = np.asarray(call(jit)(Proj(w), x))
    delta, residual, model = ours_linear(w, f"pissa_niter_{niter}")
    np.testing.assert_allclose(residual + delta, w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(call(jit)(model, x)), base, rtol=0, atol=1e-5)
    assert np.abs(residual - w).max() > 0.1  # the base really was rewritten


def test_the_draw_follows_the_init_key():
    w = spectrum(24, 32, 0.95, seed=1)
    first, _, _ = ours_linear(w, "pissa_niter_1", key=0)
    again, _, _ = ours_linear(w, "pissa_niter_1", key=0)
    other, _, _ = ours_linear(w, "pissa_niter_1", key=1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("niter", [0, 8])
def test_linen_scanned_layers_start_as_the_base(niter, jit):
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(16, name="v_proj")(jnp.tanh(nn.Dense(16, name="q_proj")(x))), None

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="layers")(x, None)[0]

    model, x = Stack(), jax.random.normal(jax.random.key(2), (2, 5, 16))
    params = model.init(jax.random.key(0), x)["params"]
    config = peftjax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"],
                                init_lora_weights=f"pissa_niter_{niter}")
    lora_params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))

    def forward(p, x):
        with intercept(spec):
            return model.apply({"params": p}, x)

    run = jax.jit(forward) if jit else forward
    np.testing.assert_allclose(run(lora_params, x), model.apply({"params": params}, x), rtol=0, atol=1e-5)
    q = lora_params["layers"]["q_proj"]
    assert np.abs(q["kernel"] - params["layers"]["q_proj"]["kernel"]).max() > 1e-2
    # each scanned copy got its own draw and its own residual: residual + s * A @ B is its kernel
    a, b = q["lora_A"]["default"], q["lora_B"]["default"]
    np.testing.assert_allclose(q["kernel"] + S * a @ b, params["layers"]["q_proj"]["kernel"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- (c) convergence to the exact SVD


def test_singular_values_approach_the_exact_ones_as_niter_grows():
    w = spectrum(32, 40, 0.85)  # s_5 / s_4 = 0.85: convergence takes a few dozen iterations
    exact = np.linalg.svd(w, compute_uv=False)[:R]
    exact_delta, _, _ = ours_linear(w, "pissa")
    errors, delta_errors = [], []
    for niter in (0, 2, 8, 32):
        sv, dv = [], []
        for key in range(4):
            delta, _, model = ours_linear(w, f"pissa_niter_{niter}", key=key)
            a = np.asarray(model.proj.lora_A["default"].get_value())  # [in, r] = (sqrt(S / s) * U_h)^T
            sv.append(np.abs(np.sort(S * (a**2).sum(0))[::-1] - exact).max() / exact[0])
            dv.append(np.abs(delta - exact_delta).max() / np.abs(exact_delta).max())
        errors.append(np.median(sv))
        delta_errors.append(np.median(dv))
    assert errors == sorted(errors, reverse=True) and delta_errors == sorted(delta_errors, reverse=True)
    assert errors[0] > 1e-2 and errors[-1] < 1e-5 and delta_errors[-1] < 1e-4


def test_randomized_svd_error_is_distributed_as_torchs():
    """``svd_lowrank`` against ``torch.svd_lowrank`` over 32 draws each: the same median error."""
    w = spectrum(32, 40, 0.85)
    exact = np.linalg.svd(w, compute_uv=False)[:R]
    ours = jax.jit(lambda k, n: svd_lowrank(jnp.asarray(w), R, niter=n, key=k)[1], static_argnums=1)
    for niter in (2, 8):
        mine = [np.abs(np.asarray(ours(jax.random.key(i), niter)) - exact).max() for i in range(32)]
        theirs = []
        for i in range(32):
            torch.manual_seed(i)
            theirs.append(np.abs(torch.svd_lowrank(torch.from_numpy(w), R, niter=niter)[1].numpy() - exact).max())
        assert 0.25 < np.median(mine) / np.median(theirs) < 4, (niter, np.median(mine), np.median(theirs))


# ---------------------------------------------------------------- tiny transformers: PEFT loads our adapter

# name -> (the tiny model, the layers whose weights get a fast-decaying spectrum and the adapter)
ARCHS = {
    "llama": (_tiny.arch("llama", vocab_size=64), ["q_proj", "v_proj"]),
    "gpt2": (_tiny.arch("gpt2", vocab_size=64, n_positions=16), ["c_attn"]),
}
IDS = np.random.RandomState(0).randint(1, 64, (2, 6))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Builds (once per name) a tiny model whose targeted weights have fast-decaying spectra, saved."""
    built = {}

    def build(name):
        if name not in built:
            spec, targets = ARCHS[name]
            cls = spec.torch_class
            torch.manual_seed(0)
            model = cls(spec.config()).eval()
            with torch.no_grad():
                for i, (module_name, module) in enumerate(model.named_modules()):
                    if module_name.rsplit(".", 1)[-1] in targets:
                        conv1d = type(module).__name__ == "Conv1D"  # weight stored [in, out]
                        out, inn = module.weight.shape[::-1] if conv1d else module.weight.shape
                        w = spectrum(out, inn, 0.3, seed=i)
                        module.weight.copy_(torch.from_numpy(w.T if conv1d else w))
            path = tmp_path_factory.mktemp(name)
            model.save_pretrained(path)
            built[name] = (name, path, cls, targets)
        return built[name]

    return build


@pytest.fixture(params=sorted(ARCHS))
def arch(request, tiny):
    return tiny(request.param)


def torch_base(arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return arch[2].from_pretrained(arch[1]).eval()


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i: m(input_ids=i).logits)(model, IDS))
    return np.asarray(model(input_ids=IDS).logits)


def perturb(model):
    """What training does: moves every adapter weight away from its init."""
    for i, layer in enumerate(tuners.lora.lora_layers(model.base_model).values()):
        for store in (layer.lora_A, layer.lora_B):
            value = store["default"].get_value()
            noise = 0.05 * jax.random.normal(jax.random.key(i), value.shape)
            store["default"].set_value(value + noise * jnp.abs(value).max())


@pytest.mark.parametrize("init", ["pissa_niter_8", "olora"])
def test_decomposed_adapter_loads_in_peft(init, arch, tmp_path):
    """PEFT's loader re-runs ``pissa_niter_8`` (its own draw) or OLoRA's QR on the original base and
    loads our A, B: the same model. On GPT-2's ``Conv1D`` both factor the weight in the linear layout
    (PEFT 0.22's OLoRA does; 0.21.2's factored the stored ``[in, out]`` weight)."""
    name, path, _, targets = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # GPT-2: the Conv1D fan_in_fan_out warning
        model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
            r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=init))
    base = run_torch(torch_base(arch))
    for jit in (False, True):
        np.testing.assert_allclose(run_jax(model, jit), base, rtol=0, atol=1e-5)  # (b) on a whole model
    perturb(model)
    ours = run_jax(model)
    assert np.abs(ours - base).max() > 1e-3
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == init and saved["fan_in_fan_out"] == (name == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base(arch), tmp_path).eval()
    assert theirs.peft_config["default"].init_lora_weights == init
    # converged decompositions on both sides (see test_converged_pissa_niter_equals_peft): measured 1.3e-7
    np.testing.assert_allclose(run_torch(theirs), ours, rtol=0, atol=1e-5)


def test_unconverged_pissa_niter_reloads_exactly_in_peftjax(tiny, tmp_path):
    """``k_proj``/``o_proj`` keep their random init (a slow spectral decay), so one iteration is far
    from the exact SVD and the residual depends on the draw; peftjax's default init key is fixed per
    adapter name, so loading re-draws the very same residual (PEFT's loader draws its own)."""
    _, path, _, _ = tiny("llama")
    config = peftjax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["k_proj", "o_proj"],
                                init_lora_weights="pissa_niter_1")
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    exact = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=R, lora_alpha=ALPHA, target_modules=["k_proj", "o_proj"], init_lora_weights="pissa"))
    layer, exact_layer = (m.base_model.model.layers[0].self_attn.o_proj for m in (model, exact))
    assert np.abs(layer.kernel.get_value() - exact_layer.kernel.get_value()).max() > 1e-3
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    for jit in (False, True):
        np.testing.assert_array_equal(run_jax(loaded, jit), run_jax(model, jit))


# ---------------------------------------------------------------- fan_in_fan_out


def _peft_messages(record) -> list[str]:
    return [str(w.message) for w in record if "fan_in_fan_out" in str(w.message)]


def test_fan_in_fan_out_is_reset_on_linear_layers_as_peft_does(tiny, tmp_path):
    arch = tiny("llama")
    _, path, _, targets = arch
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        twin = peft.get_peft_model(torch_base(arch), peft.LoraConfig(r=R, target_modules=targets, fan_in_fan_out=True))
    assert _peft_messages(record) == [LINEAR_WARNING]
    twin.save_pretrained(tmp_path / "theirs")

    config = peftjax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, fan_in_fan_out=True,
                                init_lora_weights=False)
    with pytest.warns(UserWarning, match=re.escape(LINEAR_WARNING)) as record:
        model = peftjax.get_peft_model(models.from_pretrained(path), config)
    assert _peft_messages(record) == [LINEAR_WARNING]  # once, as PEFT: the config is reset at the first layer
    assert model.peft_config["default"].fan_in_fan_out is False
    model.save_pretrained(tmp_path / "ours")
    for who in ("ours", "theirs"):
        assert json.loads((tmp_path / who / "adapter_config.json").read_text())["fan_in_fan_out"] is False, who

    default = peftjax.get_peft_model(
        models.from_pretrained(path),
        peftjax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False),
    )
    for jit in (False, True):
        np.testing.assert_array_equal(run_jax(model, jit), run_jax(default, jit))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_base(arch), tmp_path / "ours").eval()
    np.testing.assert_allclose(run_torch(loaded), run_jax(model), rtol=0, atol=1e-5)
    assert np.abs(run_jax(model) - run_torch(torch_base(arch))).max() > 1e-3


@pytest.mark.parametrize("given", [False, True])
def test_conv1d_forces_fan_in_fan_out(tiny, given, tmp_path):
    arch = tiny("gpt2")
    _, path, _, targets = arch
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        twin = peft.get_peft_model(torch_base(arch), peft.LoraConfig(r=R, target_modules=targets, fan_in_fan_out=given))
    theirs = _peft_messages(record)
    twin.save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = peftjax.get_peft_model(
            models.from_pretrained(path), peftjax.LoraConfig(r=R, target_modules=targets, fan_in_fan_out=given)
        )
    assert _peft_messages(record) == theirs == ([] if given else [CONV1D_WARNING])
    assert model.peft_config["default"].fan_in_fan_out is True
    model.save_pretrained(tmp_path / "ours")
    for who in ("ours", "theirs"):
        assert json.loads((tmp_path / who / "adapter_config.json").read_text())["fan_in_fan_out"] is True, who


def test_linen_dense_writes_fan_in_fan_out_false(tmp_path):
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))

    model, x = Mlp(), jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    config = peftjax.LoraConfig(r=2, target_modules=["hidden"], fan_in_fan_out=True, init_lora_weights=False)
    with pytest.warns(UserWarning, match=re.escape(LINEAR_WARNING)):
        lora_params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
    save_adapter(tmp_path, lora_params, spec, config)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is False


# ---------------------------------------------------------------- the case of init names, as PEFT


def test_init_names_keep_their_case_in_the_config_as_in_peft():
    for init in ("OLoRA", "Gaussian"):
        ours = peftjax.LoraConfig(init_lora_weights=init).to_dict()["init_lora_weights"]
        assert ours == peft.LoraConfig(init_lora_weights=init).to_dict()["init_lora_weights"] == init


def test_olora_any_case_on_nnx_linear_matches_peft():
    w = spectrum(10, 12, 0.8)
    their_delta, their_residual = peft_linear(w, "OLoRA")
    lower_delta, lower_residual, _ = ours_linear(w, "olora")
    for init in ("OLoRA", "OLORA"):
        delta, residual, _ = ours_linear(w, init)
        np.testing.assert_array_equal(delta, lower_delta)
        np.testing.assert_array_equal(residual, lower_residual)
        np.testing.assert_allclose(delta, their_delta, rtol=0, atol=1e-5)
        np.testing.assert_allclose(residual, their_residual, rtol=0, atol=1e-5)


def test_gaussian_any_case_on_nnx_linear_and_embed():
    def adapted(init):
        model = nnx.Module()
        model.proj = nnx.Linear(64, 64, rngs=nnx.Rngs(0))
        model.emb = nnx.Embed(20, 8, rngs=nnx.Rngs(0))
        cfg = peftjax.LoraConfig(r=R, target_modules=["proj", "emb"], init_lora_weights=init)
        tuners.inject_lora(model, cfg, key=jax.random.key(0))
        return {n: np.asarray(v) for n, v in nnx.to_flat_state(nnx.state(model, peftjax.LoraParam))}

    lower = adapted("gaussian")
    assert abs(lower[("proj", "lora_A", "default")].std() - 1 / R) < 0.03  # N(0, 1/r), not Kaiming U(+-1/8)
    for init in ("Gaussian", "GAUSSIAN"):
        ours = adapted(init)
        assert ours.keys() == lower.keys()
        for k in lower:
            np.testing.assert_array_equal(ours[k], lower[k])


def test_olora_any_case_on_linen():
    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="hidden")(x)

    model, x = Mlp(), jnp.ones((2, 5))
    params = model.init(jax.random.key(0), x)["params"]

    def adapted(init):
        cfg = peftjax.LoraConfig(r=2, target_modules=["hidden"], init_lora_weights=init)
        return inject(model, params, cfg, sample_args=(x,), key=jax.random.key(1))[0]["hidden"]

    lower = adapted("olora")
    for init in ("OLoRA", "Olora"):
        jax.tree.map(np.testing.assert_array_equal, adapted(init), lower)


@pytest.mark.parametrize("init", ["PiSSA", "Pissa_niter_4", "PISSA"])
def test_pissa_is_case_sensitive_as_in_peft(init):
    with pytest.raises(ValueError, match="init_lora_weights"):
        peftjax.LoraConfig(init_lora_weights=init)
    with pytest.raises(ValueError, match="Unknown initialization"):
        peft_linear(spectrum(6, 5, 0.5), init)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_dora_magnitude_after_a_decomposing_init_is_peft_s(init, tmp_path):
    """PiSSA/OLoRA + DoRA: PEFT takes the magnitude from the residual base plus the adapter (the
    original weight's norm), on NNX and Linen alike, and the two paths agree on the forward."""
    w = spectrum(10, 12, 0.8)
    torch.manual_seed(0)
    seq = torch.nn.Sequential()
    seq.add_module("proj", torch.nn.Linear(12, 10))
    with torch.no_grad():
        seq.proj.weight.copy_(torch.from_numpy(w))
        seq.proj.bias.zero_()  # as nnx.Linear's
    cfg = peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=init, use_dora=True)
    theirs = peft.get_peft_model(seq, cfg).base_model.model.proj.lora_magnitude_vector["default"].weight
    theirs = theirs.detach().numpy()
    np.testing.assert_allclose(theirs, np.linalg.norm(w, axis=1), rtol=1e-5)  # the original weight's rows

    ours_cfg = peftjax.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], init_lora_weights=init,
                                  use_dora=True)
    model = Proj(w)
    tuners.inject_lora(model, ours_cfg, key=jax.random.key(0))
    nnx_m = np.asarray(model.proj.lora_magnitude_vector["default"].get_value())
    np.testing.assert_allclose(nnx_m, theirs, rtol=1e-5)

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(10, name="proj")(x)

    x = np.random.RandomState(1).randn(3, 12).astype(np.float32)
    linen = Mlp()
    params = linen.init(jax.random.key(0), x)["params"]
    params = {"proj": {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(model.proj.bias.get_value())}}
    params, spec = inject(linen, params, ours_cfg, sample_args=(x,), key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(params["proj"]["lora_magnitude_vector"]["default"]), theirs, rtol=1e-5)
    with intercept(spec):
        linen_out = linen.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(linen_out), np.asarray(model(x)), atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(np.asarray(model(x)), seq(torch.from_numpy(x)).numpy(), atol=1e-5)
