"""LoHa, LoKr, VeRA, FourierFT, AdaLoRA and IA³ on a Flax Linen model through ``peftjax.linen``, against
HF PEFT + PyTorch: an adapter trained here (a jitted step on ``split``'s trainable side) is saved with
``save_adapter``, loads in ``peft.PeftModel.from_pretrained`` on the PyTorch twin of the model and
gives the same outputs; one PEFT made (weights randomised in torch) loads with ``load_adapter`` and
gives PEFT's outputs; merged equals intercepted; the training-time dropouts follow PEFT's definition."""

import contextlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import peftjax
from _torch_models import lazy
from peftjax.cli import main
from peftjax.io import read_safetensors
from peftjax.config import (
    AdaLoraConfig,
    FourierFTConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    VeraConfig,
)
from peftjax.linen import (
    combine,
    inject,
    intercept,
    load_adapter,
    merge_and_unload,
    save_adapter,
    split,
    trainable_labels,
)

torch, peft = lazy("torch"), lazy("peft")

V, D, H, L, C = 20, 8, 12, 2, 3  # vocab, width, hidden, scanned layers, classes
IDS = np.array([[1, 5, 7, 2, 19, 3], [4, 4, 0, 11, 8, 6]])
TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGETS = ["q", "o", "proj"]  # Linen "q", "o", "layers.proj" (scanned); torch "q", "o", "layers.{i}.proj"

# (peftjax config, PEFT config kwargs, the trained leaves) per method; weights that start non-trivial
METHODS = {
    "loha": (LoHaConfig, dict(r=2, alpha=4, init_weights=False)),
    "lokr": (LoKrConfig, dict(r=2, alpha=4, init_weights=False, decompose_both=True)),
    "vera": (VeraConfig, dict(r=4, init_weights=False, projection_prng_key=3)),
    "fourierft": (FourierFTConfig, dict(n_frequency=16, scaling=2.0, random_loc_seed=5)),
    "adalora": (AdaLoraConfig, dict(init_r=3, lora_alpha=2, total_step=10, init_lora_weights=False)),
    "ia3": (IA3Config, dict(feedforward_modules=["o"], init_ia3_weights=False)),  # "o" scales its input
}
KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
        "lokr_w2_a", "lokr_w2_b", "vera_lambda_b", "vera_lambda_d", "fourierft_spectrum", "lora_A", "lora_E",
        "lora_B", "ia3_l"}  # PEFT's attribute names of these methods' trained weights
PEFT_NAMES = {"loha": "LoHaConfig", "lokr": "LoKrConfig", "vera": "VeraConfig", "fourierft": "FourierFTConfig",
              "adalora": "AdaLoraConfig", "ia3": "IA3Config"}


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + jnp.tanh(nn.Dense(D, name="proj")(x)), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        h = h + nn.Dense(D, name="o")(nn.relu(nn.Dense(H, name="q")(h)))
        h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)(name="layers")(h, None)
        return nn.Dense(C, name="head")(h.mean(axis=1))


def twin(params):
    """Net in PyTorch, with Net's weights (kernels transposed, the scanned layers unstacked)."""

    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(D, D)

        def forward(self, x):
            return x + torch.tanh(self.proj(x))

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.q, self.o = torch.nn.Embedding(V, D), torch.nn.Linear(D, H), torch.nn.Linear(H, D)
            self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(L)])
            self.head = torch.nn.Linear(D, C)

        def forward(self, ids):
            h = self.embed(ids)
            h = h + self.o(torch.relu(self.q(h)))
            for layer in self.layers:
                h = layer(h)
            return self.head(h.mean(dim=1))

    p = jax.tree.map(np.asarray, params)
    state = {"embed.weight": p["embed"]["embedding"]}
    for name in ("q", "o", "head"):
        state[f"{name}.weight"], state[f"{name}.bias"] = p[name]["kernel"].T, p[name]["bias"]
    for i in range(L):
        state[f"layers.{i}.proj.weight"] = p["layers"]["proj"]["kernel"][i].T
        state[f"layers.{i}.proj.bias"] = p["layers"]["proj"]["bias"][i]
    model = TorchNet().eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)
    return model


def run_torch(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS)).numpy()


def config_for(method: str):
    cls, kwargs = METHODS[method]
    return cls(target_modules=TARGETS, **kwargs)


def forward(spec, model=None):
    """``model`` (Net by default) applied, jitted, with ``spec``'s interception (``None``: without)."""

    @jax.jit
    def f(params, ids):
        with intercept(spec) if spec is not None else contextlib.nullcontext():
            return (model or Net()).apply({"params": params}, ids)

    return f


PLAIN = forward(None)  # Net without adapters (merged params), one compile for the module


@pytest.fixture(scope="module")
def base_params():
    return jax.jit(Net().init)(jax.random.key(0), IDS)["params"]


@pytest.fixture(scope="module")
def base_logits(base_params):
    return np.asarray(PLAIN(base_params, IDS))


def _stepper(spec):
    """One jitted SGD step on ``split``'s trainable side; it also returns the logits of the params it got."""

    def loss_fn(trainable, rest):
        with intercept(spec):
            logits = Net().apply({"params": combine(trainable, rest)}, IDS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.array([0, 2])).mean(), logits

    @jax.jit
    def step(trainable, rest):
        grads, logits = jax.grad(loss_fn, has_aux=True)(trainable, rest)
        return jax.tree.map(lambda p, g: p - 0.5 * g, trainable, grads), logits

    return step


@pytest.mark.parametrize("method", list(METHODS))
def test_trained_here_loads_in_peft(method, base_params, base_logits, tmp_path, capsys):
    config = config_for(method)
    params, spec = inject(Net(), base_params, config, sample_args=(IDS,), key=jax.random.key(1))
    assert {layer.name for layer in spec.layers} == {"q", "o", "layers.proj"}
    trainable, rest = split(params, spec)
    # the trainable side is exactly the method's weights (PEFT's names), as trainable_labels says
    assert jax.tree.structure(rest) == jax.tree.structure(base_params)
    labels = jax.tree_util.tree_flatten_with_path(trainable_labels(params, spec))[0]
    trains = [str(path[-2].key) for path, label in labels if label == "trainable"]
    assert len(trains) == len(jax.tree.leaves(trainable)) and set(trains) <= KEYS
    step = _stepper(spec)
    moved, _ = step(trainable, rest)
    assert all(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(trainable)))
    _, ours = step(moved, rest)
    ours = np.asarray(ours)
    trained = combine(moved, rest)
    merged = merge_and_unload(trained, spec)
    assert jax.tree.structure(merged) == jax.tree.structure(base_params)
    np.testing.assert_allclose(np.asarray(PLAIN(merged, IDS)), ours, **TOL)
    assert np.abs(ours - base_logits).max() > 1e-3  # the adapter changes the output

    save_adapter(tmp_path, trained, spec, config)
    loaded = peft.PeftModel.from_pretrained(twin(base_params), str(tmp_path)).eval()
    np.testing.assert_allclose(run_torch(loaded), ours, **TOL)

    assert main(["inspect", str(tmp_path), "--json"]) == 0  # the CLI describes the file
    info = json.loads(capsys.readouterr().out)
    projections = sum(p.numel() for n, p in loaded.named_buffers() if "vera_A" in n or "vera_B" in n)
    assert info["method"] == config.peft_type and info["written_by"].startswith("peftjax")
    assert info["parameters"] == sum(v.size for v in jax.tree.leaves(moved)) + projections


@pytest.mark.parametrize("method", list(METHODS))
def test_made_by_peft_loads_here(method, base_params, base_logits, tmp_path):
    cls, kwargs = METHODS[method]
    model = peft.get_peft_model(twin(base_params), getattr(peft, PEFT_NAMES[method])(target_modules=TARGETS,
                                                                                     **kwargs))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial weights, whatever the method's init
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    model.eval()
    expected = run_torch(model)
    model.save_pretrained(str(tmp_path))

    params, spec = load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,))
    assert spec.peft_type == cls.peft_type
    ours = np.asarray(forward(spec)(params, IDS))
    np.testing.assert_allclose(ours, expected, **TOL)
    assert np.abs(ours - base_logits).max() > 1e-3
    np.testing.assert_allclose(np.asarray(PLAIN(merge_and_unload(params, spec), IDS)), ours, **TOL)


class One(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, use_bias=False, name="w")(x)


@pytest.mark.parametrize("kind", ["rank_dropout", "module_dropout"])
def test_lycoris_dropouts_follow_peft_in_training_only(kind):
    """PEFT's LoKr in train(): ``rank_dropout`` scales each output row of ΔW by ``keep / mean(keep)``
    (with ``rank_dropout_scale``); ``module_dropout`` skips the whole update. Without a key: no dropout."""
    x = jax.random.normal(jax.random.key(2), (4, 8))
    params = One().init(jax.random.key(0), x)["params"]
    config = LoKrConfig(r=2, target_modules=["w"], init_weights=False, rank_dropout_scale=True,
                        **{kind: 0.5})
    params, spec = inject(One(), params, config, sample_args=(x,), key=jax.random.key(1))
    base = One().apply({"params": params}, x)

    @jax.jit
    def run(params, key):
        with peftjax.dropout_key(key), intercept(spec):
            return One().apply({"params": params}, x)

    full = run(params, None) - base  # no key: evaluation
    np.testing.assert_allclose(One().apply({"params": merge_and_unload(params, spec)}, x) - base, full, **TOL)
    seen = set()
    for i in range(4):
        branch = run(params, jax.random.key(10 + i)) - base
        if kind == "module_dropout":
            skipped = bool(jnp.allclose(branch, 0.0, atol=1e-6))
            if not skipped:
                np.testing.assert_allclose(branch, full, **TOL)
            seen.add(skipped)
        else:
            kept = ~jnp.all(jnp.abs(branch) < 1e-7, axis=0)  # per output unit
            scale = kept.size / kept.sum()
            np.testing.assert_allclose(branch, jnp.where(kept, full * scale, 0.0), rtol=1e-4, atol=1e-5)
            seen.add(int(kept.sum()))
    assert len(seen) > 1  # the draws differ from step to step


def test_what_the_linen_path_refuses(base_params):
    kw = dict(sample_args=(IDS,), key=jax.random.key(0))
    with pytest.raises(TypeError, match="OFTConfig"):
        inject(Net(), base_params, OFTConfig(target_modules=["q"]), **kw)
    with pytest.raises(TypeError, match="embed"):
        inject(Net(), base_params, LoHaConfig(target_modules=["embed"]), **kw)
    with pytest.raises(NotImplementedError, match="bias='all'"):
        inject(Net(), base_params, VeraConfig(r=2, target_modules=["q"], bias="all"), **kw)
    with pytest.raises(NotImplementedError, match="modules_to_save"):
        inject(Net(), base_params, LoKrConfig(target_modules=["q"], modules_to_save=["head"]), **kw)
    params, spec = inject(Net(), base_params, FourierFTConfig(n_frequency=4, target_modules=["q"]), **kw)
    with pytest.raises(NotImplementedError, match="rows"):
        with intercept(spec, rows=[0, 0]):
            pass
    with pytest.raises(ValueError, match="FOURIERFT"):
        inject(Net(), params, LoKrConfig(target_modules=["o"]), spec=spec, adapter_name="other", **kw)


class General(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((2, 4), axis=(-2, -1), name="g")(x)  # kernel [3, 4, 2, 4]


def test_dense_general_adds_the_file_weights_delta(tmp_path):
    """LoHa on a DenseGeneral (two contracted, two output axes) equals the dense reference
    ``x_flat @ (W_flat + ΔWᵀ) + b``, ΔW built here from the saved file's factors by LoHa's definition."""
    x = jax.random.normal(jax.random.key(3), (5, 3, 4))
    params = General().init(jax.random.key(0), x)["params"]
    config = LoHaConfig(r=2, alpha=3, target_modules=["g"], init_weights=False)
    params, spec = inject(General(), params, config, sample_args=(x,), key=jax.random.key(1))
    save_adapter(tmp_path, params, spec, config)
    f, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    delta = (f["base_model.model.g.hada_w1_a"] @ f["base_model.model.g.hada_w1_b"]) * (
        f["base_model.model.g.hada_w2_a"] @ f["base_model.model.g.hada_w2_b"]) * 3 / 2
    assert delta.shape == (8, 12)  # torch nn.Linear(12, 8): [out, in]
    w = np.asarray(params["g"]["kernel"]).reshape(12, 8) + delta.T
    expected = (np.asarray(x).reshape(5, 12) @ w + np.asarray(params["g"]["bias"]).reshape(8)).reshape(5, 2, 4)
    np.testing.assert_allclose(forward(spec, General())(params, x), expected, **TOL)
    np.testing.assert_allclose(forward(None, General())(merge_and_unload(params, spec), x), expected, **TOL)


class Swapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral(5, axis=(-1, -2), name="g")(x)  # flax sorts the axes: kernel [3, 4, 5]


def test_ia3_feedforward_scales_dense_general_inputs_in_kernel_order(tmp_path):
    """IA³ on a feedforward DenseGeneral given its axes unsorted: ``ia3_l [1, 12]`` (PEFT's, in the
    flattened kernel's input order) scales ``x`` before the layer, as a dense reference on the
    flattened kernel says; merged too."""
    x = jax.random.normal(jax.random.key(3), (2, 3, 4))
    params = Swapped().init(jax.random.key(0), x)["params"]
    config = IA3Config(target_modules=["g"], feedforward_modules=["g"], init_ia3_weights=False)
    params, spec = inject(Swapped(), params, config, sample_args=(x,), key=jax.random.key(1))
    save_adapter(tmp_path, params, spec, config)
    l = read_safetensors(tmp_path / "adapter_model.safetensors")[0]["base_model.model.g.ia3_l"]
    assert l.shape == (1, 12)
    x_flat = np.asarray(x).reshape(2, 12)
    expected = (x_flat * l) @ np.asarray(params["g"]["kernel"]).reshape(12, 5) + np.asarray(params["g"]["bias"])
    np.testing.assert_allclose(forward(spec, Swapped())(params, x), expected, **TOL)
    np.testing.assert_allclose(forward(None, Swapped())(merge_and_unload(params, spec), x), expected, **TOL)


def test_lora_on_unsorted_dense_general_axes():
    """The contraction axes are taken sorted, as flax orders the kernel (LoRA used them as given, and failed)."""
    x = jax.random.normal(jax.random.key(3), (2, 3, 4))
    params = Swapped().init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["g"], init_lora_weights=False)
    params, spec = inject(Swapped(), params, config, sample_args=(x,), key=jax.random.key(1))
    g = jax.tree.map(np.asarray, params["g"])
    w = g["kernel"].reshape(12, 5) + 2.0 * g["lora_A"]["default"] @ g["lora_B"]["default"]
    np.testing.assert_allclose(forward(spec, Swapped())(params, x), np.asarray(x).reshape(2, 12) @ w + g["bias"],
                               **TOL)


class Heads(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Einsum((4, 2, 3), "bi,ihd->bhd", use_bias=False, name="e")(x)


def test_einsum_adds_the_file_weights_delta(tmp_path):
    """LoHa on an nn.Einsum: the intercepted and merged outputs equal ``x @ (W_flat + ΔWᵀ)``, ΔW from the file."""
    x = jax.random.normal(jax.random.key(3), (5, 4))
    params = Heads().init(jax.random.key(0), x)["params"]
    config = LoHaConfig(r=2, alpha=2, target_modules=["e"], init_weights=False)
    params, spec = inject(Heads(), params, config, sample_args=(x,), key=jax.random.key(1))
    save_adapter(tmp_path, params, spec, config)
    f, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    delta = (f["base_model.model.e.hada_w1_a"] @ f["base_model.model.e.hada_w1_b"]) * (
        f["base_model.model.e.hada_w2_a"] @ f["base_model.model.e.hada_w2_b"])
    expected = (np.asarray(x) @ (np.asarray(params["e"]["kernel"]).reshape(4, 6) + delta.T)).reshape(5, 2, 3)
    np.testing.assert_allclose(forward(spec, Heads())(params, x), expected, **TOL)
    np.testing.assert_allclose(forward(None, Heads())(merge_and_unload(params, spec), x), expected, **TOL)
