"""PEFT files for Linen adapters, against HF PEFT + PyTorch: a Linen adapter saved by peftjax loads
in ``peft.PeftModel.from_pretrained`` on a PyTorch twin and gives the same outputs; an adapter PEFT
made loads into the Linen params and gives PEFT's outputs; scanned layers become numbered keys."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from _torch_models import lazy
from peftjax.config import LoraConfig
from peftjax.io import read_safetensors, write_safetensors
from peftjax.io._adapter import AdapterFileError
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

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

V, D, H, L, C = 20, 8, 12, 3, 3  # vocab, width, hidden, scanned layers, classes
IDS = np.array([[1, 5, 7, 2, 19, 3], [4, 4, 0, 11, 8, 6]])
TOL = {"rtol": 1e-5, "atol": 1e-5}
TARGETS_TORCH = ["embed", "dense.0", "dense.1", "q_proj", "v_proj"]


# --------------------------------------------------------------------------------------------
# The Linen model and its PyTorch twin: Linen `dense_0` / the scan `layers` <-> torch `dense.0` /
# the ModuleList `layers.{i}` (the default key mapping)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        y = x + nn.Dense(D, name="v_proj")(x) * jnp.tanh(nn.Dense(D, name="q_proj")(x))
        return nn.LayerNorm(epsilon=1e-6, name="ln")(y), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        h = nn.Dense(D, name="dense_1")(nn.relu(nn.Dense(H, name="dense_0")(h)))
        scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)
        h, _ = scan(name="layers")(h, None)
        return nn.Dense(C, name="classifier")(h.mean(axis=1))


def torch_state(params) -> dict:
    """The twin's state dict from Linen params (kernels transposed, scanned layers unstacked)."""
    p = jax.tree.map(np.asarray, params)
    out = {"embed.weight": p["embed"]["embedding"]}
    for i in range(2):
        out[f"dense.{i}.weight"], out[f"dense.{i}.bias"] = p[f"dense_{i}"]["kernel"].T, p[f"dense_{i}"]["bias"]
    for i in range(L):
        for proj in ("q_proj", "v_proj"):
            out[f"layers.{i}.{proj}.weight"] = p["layers"][proj]["kernel"][i].T
            out[f"layers.{i}.{proj}.bias"] = p["layers"][proj]["bias"][i]
        out[f"layers.{i}.ln.weight"] = p["layers"]["ln"]["scale"][i]
        out[f"layers.{i}.ln.bias"] = p["layers"]["ln"]["bias"][i]
    out["classifier.weight"], out["classifier.bias"] = p["classifier"]["kernel"].T, p["classifier"]["bias"]
    return {k: torch.from_numpy(np.array(v)) for k, v in out.items()}


def twin(params):
    """Net's PyTorch twin (torch ``dense.0`` / ``layers.{i}`` for Linen ``dense_0`` / the scan ``layers``)."""

    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = torch.nn.Linear(D, D), torch.nn.Linear(D, D)
            self.ln = torch.nn.LayerNorm(D, eps=1e-6)

        def forward(self, x):
            return self.ln(x + self.v_proj(x) * torch.tanh(self.q_proj(x)))

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(V, D)
            self.dense = torch.nn.ModuleList([torch.nn.Linear(D, H), torch.nn.Linear(H, D)])
            self.layers = torch.nn.ModuleList([TorchBlock() for _ in range(L)])
            self.classifier = torch.nn.Linear(D, C)

        def forward(self, ids):
            h = self.dense[1](torch.relu(self.dense[0](self.embed(ids))))
            for layer in self.layers:
                h = layer(h)
            return self.classifier(h.mean(dim=1))

    model = TorchNet().eval()
    model.load_state_dict(torch_state(params), strict=True)
    return model


def run_torch(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids)).numpy()


def forward(spec):
    @jax.jit
    def f(params, ids):
        with intercept(spec):
            return Net().apply({"params": params}, ids)

    return f


@pytest.fixture(scope="module")
def base_params():
    return jax.jit(Net().init)(jax.random.key(0), IDS)["params"]


def test_twin_matches_the_linen_model(base_params):
    np.testing.assert_allclose(run_torch(twin(base_params)), Net().apply({"params": base_params}, IDS), **TOL)


# --------------------------------------------------------------------------------------------
# (a) peftjax trains, PEFT loads


def _train(params, spec, steps=4):
    labels_y = jnp.array([0, 2])
    trainable, base = split(params, spec)

    def loss_fn(trainable):
        with intercept(spec):
            logits = Net().apply({"params": combine(trainable, base)}, IDS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels_y).mean()

    tx = optax.adam(5e-2)
    state = tx.init(trainable)

    @jax.jit
    def step(trainable, state):
        grads = jax.grad(loss_fn)(trainable)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state

    for _ in range(steps):
        trainable, state = step(trainable, state)
    return combine(trainable, base)


def test_peftjax_adapter_loads_in_peft(base_params, tmp_path):
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["embed", "dense_0", "dense_1", "q_proj", "v_proj"],
        rank_pattern={"dense_1": 2}, init_lora_weights=False, modules_to_save=["classifier"], bias="all",
    )  # fmt: skip
    params, spec = inject(Net(), base_params, config, sample_args=(IDS,), key=jax.random.key(1))
    labels = trainable_labels(params, spec)
    assert labels["layers"]["ln"]["bias"] == "trainable" and labels["layers"]["ln"]["scale"] == "frozen"
    assert labels["classifier"]["modules_to_save"]["default"]["kernel"] == "trainable"
    trained = _train(params, spec)
    # the biases, the head's copy and the adapters all moved; the head's original did not
    assert not np.allclose(trained["layers"]["ln"]["bias"], base_params["layers"]["ln"]["bias"])
    assert not np.allclose(trained["classifier"]["modules_to_save"]["default"]["kernel"],
                           base_params["classifier"]["kernel"])  # fmt: skip
    np.testing.assert_array_equal(trained["classifier"]["kernel"], base_params["classifier"]["kernel"])

    out_dir = save_adapter(tmp_path, trained, spec, config)
    tensors, metadata = read_safetensors(out_dir / "adapter_model.safetensors")
    assert metadata["format"] == "pt"
    assert tensors["base_model.model.embed.lora_embedding_A"].shape == (4, V)
    assert tensors["base_model.model.embed.lora_embedding_B"].shape == (D, 4)
    assert tensors["base_model.model.dense.1.lora_A.weight"].shape == (2, H)  # rank_pattern
    assert tensors["base_model.model.dense.0.base_layer.bias"].shape == (H,)
    assert tensors["base_model.model.classifier.weight"].shape == (C, D)
    for i in range(L):  # (c) the scanned adapters, one numbered key per layer
        a = tensors[f"base_model.model.layers.{i}.q_proj.lora_A.weight"]
        np.testing.assert_array_equal(a, np.asarray(trained["layers"]["q_proj"]["lora_A"]["default"][i]).T)
        assert f"base_model.model.layers.{i}.ln.bias" in tensors
    assert not any("layers.3" in k or "modules_to_save" in k for k in tensors)
    saved_config = json.loads((out_dir / "adapter_config.json").read_text())
    assert sorted(saved_config["target_modules"]) == sorted(
        ["embed", "dense.0", "dense.1"] + [f"layers.{i}.{p}" for i in range(L) for p in ("q_proj", "v_proj")]
    )
    assert saved_config["rank_pattern"] == {"dense.1": 2} and saved_config["modules_to_save"] == ["classifier"]

    base_torch = twin(base_params)
    expected = np.asarray(forward(spec)(trained, IDS))
    assert not np.allclose(expected, run_torch(base_torch), atol=1e-3)  # the adapter matters
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "missing adapter keys"
        torch_model = peft.PeftModel.from_pretrained(base_torch, str(out_dir)).eval()
    np.testing.assert_allclose(run_torch(torch_model), expected, **TOL)
    merged = Net().apply({"params": merge_and_unload(trained, spec)}, IDS)
    np.testing.assert_allclose(merged, expected, **TOL)

    # (c) and back: the file read into the plain params rebuilds the adapter exactly
    loaded, loaded_spec = load_adapter(out_dir, Net(), base_params, sample_args=(IDS,))
    assert loaded_spec.layers == spec.layers and loaded_spec.saved == spec.saved and loaded_spec.bias == "all"
    jax.tree.map(np.testing.assert_array_equal, loaded, trained)


@pytest.mark.parametrize("extra", [{"use_dora": True}, {"lora_bias": True}], ids=["dora", "lora_bias"])
def test_conv_dora_and_lora_bias_load_in_peft(tmp_path, extra):
    class ConvNet(nn.Module):
        @nn.compact
        def __call__(self, x):  # NHWC
            h = nn.relu(nn.Conv(6, (3, 3), padding=1, name="conv")(x))
            return nn.Dense(3, name="head")(h.mean(axis=(1, 2)))

    class TorchConvNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.Linear(6, 3)

        def forward(self, x):
            return self.head(torch.relu(self.conv(x.permute(0, 3, 1, 2))).mean(dim=(2, 3)))

    x = np.random.RandomState(0).randn(2, 5, 5, 4).astype(np.float32)
    model = ConvNet()
    params = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["conv", "head"], init_lora_weights=False, **extra)
    params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(  # trained values, so both matter
        lambda path, v: v * 1.5 + 0.1 if "magnitude" in str(path) or "lora_B_bias" in str(path) else v, params
    )
    out_dir = save_adapter(tmp_path, params, spec, config)
    tensors, _ = read_safetensors(out_dir / "adapter_model.safetensors")
    assert tensors["base_model.model.conv.lora_A.weight"].shape == (2, 4, 3, 3)
    assert tensors["base_model.model.conv.lora_B.weight"].shape == (6, 2, 1, 1)
    if "use_dora" in extra:
        assert tensors["base_model.model.conv.lora_magnitude_vector"].shape == (1, 6, 1, 1)
        assert tensors["base_model.model.head.lora_magnitude_vector"].shape == (3,)
    else:
        assert tensors["base_model.model.conv.lora_B.bias"].shape == (6,)

    p = jax.tree.map(np.asarray, split(params).rest)
    torch_model = TorchConvNet().eval()
    state = {"conv.weight": p["conv"]["kernel"].transpose(3, 2, 0, 1), "conv.bias": p["conv"]["bias"],
             "head.weight": p["head"]["kernel"].T, "head.bias": p["head"]["bias"]}  # fmt: skip
    torch_model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    expected = run_torch(torch_model, x)
    np.testing.assert_allclose(model.apply({"params": p}, x), expected, **TOL)
    torch_model = peft.PeftModel.from_pretrained(torch_model, str(out_dir)).eval()
    with intercept(spec):
        ours = model.apply({"params": params}, x)
    assert not np.allclose(ours, expected, atol=1e-3)
    np.testing.assert_allclose(run_torch(torch_model, x), ours, **TOL)


# --------------------------------------------------------------------------------------------
# (b) PEFT trains, peftjax loads


def test_peft_adapter_loads_into_linen(base_params, tmp_path):
    torch_model = twin(base_params)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS_TORCH, init_lora_weights=False, modules_to_save=["classifier"],
        bias="all", rank_pattern={"v_proj": 2}, alpha_pattern={"dense.1": 16}, use_rslora=True,
    )  # fmt: skip
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(torch_model, config).eval()
    with torch.no_grad():  # "trained" biases and head copy
        for name, param in peft_model.named_parameters():
            if name.endswith("bias") or "modules_to_save" in name:
                param.add_(0.2 * torch.randn_like(param))
    expected = run_torch(peft_model)
    peft_model.save_pretrained(str(tmp_path))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, spec = load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,))
    messages = [str(w.message) for w in caught]
    assert not any("missing adapter keys" in m for m in messages), messages
    # PEFT's bias="all" quirk also writes the head's wrapped biases verbatim; nothing else is left over
    for m in messages:
        if "ignored" in m:
            assert "classifier.modules_to_save.bias" in m and "classifier.original_module.bias" in m
            assert "lora" not in m

    assert [layer.name for layer in spec.layers] == ["embed", "dense_0", "dense_1", "layers.v_proj", "layers.q_proj"]
    v_proj = spec.layer("layers.v_proj").adapter["default"]
    assert (v_proj.r, v_proj.scaling) == (2, pytest.approx(8 / np.sqrt(2)))
    assert spec.layer("dense_1").adapter["default"].scaling == pytest.approx(16 / 2)
    assert [s.name for s in spec.saved] == ["classifier"] and spec.bias == "all"
    np.testing.assert_allclose(forward(spec)(params, IDS), expected, **TOL)
    assert not np.allclose(Net().apply({"params": base_params}, IDS), expected, atol=1e-3)


def test_nested_scans_get_one_index_each_and_a_custom_mapping(tmp_path):
    class Inner(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
            return scan(name="sub")(x, None)[0], None

    class Outer(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Inner, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
            return scan(name="blocks")(nn.Dense(D, name="Dense_0")(x), None)[0]

    x = jnp.ones((2, 4, 5))
    model = Outer()
    params = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, target_modules=["q_proj", "Dense_0"], init_lora_weights=False)
    params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
    mapping = {r"^blocks\.": "model.layers.", r"^Dense_0$": "proj_in"}  # applied after the indices go in
    out_dir = save_adapter(tmp_path, params, spec, config, key_mapping=mapping)
    tensors, _ = read_safetensors(out_dir / "adapter_model.safetensors")
    a = np.asarray(params["blocks"]["sub"]["q_proj"]["lora_A"]["default"])  # [3, 2, in, r]
    for i in range(3):
        for j in range(2):
            np.testing.assert_array_equal(tensors[f"base_model.model.model.layers.{i}.sub.{j}.q_proj.lora_A.weight"],
                                          a[i, j].T)  # fmt: skip
    assert "base_model.model.proj_in.lora_B.weight" in tensors and len(tensors) == 2 + 3 * 2 * 2
    loaded, _ = load_adapter(out_dir, model, split(params).rest, sample_args=(x,), key_mapping=mapping)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


# --------------------------------------------------------------------------------------------
# (d) errors


@pytest.fixture(scope="module")
def saved_dir(base_params, tmp_path_factory):
    config = LoraConfig(r=4, target_modules=["dense_0", "q_proj"], init_lora_weights=False)
    params, spec = inject(Net(), base_params, config, sample_args=(IDS,), key=jax.random.key(1))
    return save_adapter(tmp_path_factory.mktemp("adapter"), params, spec, config)


def test_wrong_shape_names_the_key_and_both_shapes(base_params, saved_dir, tmp_path):
    tensors, _ = read_safetensors(saved_dir / "adapter_model.safetensors")
    tensors = dict(tensors)
    key = "base_model.model.layers.1.q_proj.lora_B.weight"
    tensors[key] = np.zeros((D, 3), np.float32)
    (tmp_path / "adapter_config.json").write_text((saved_dir / "adapter_config.json").read_text())
    write_safetensors(tmp_path / "adapter_model.safetensors", tensors)
    with pytest.raises(AdapterFileError, match=rf"{key}: expected shape \[8, 4\] \(r=4\), found \[8, 3\]"):
        load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,))

    tensors[key] = np.zeros((D, 4), np.int32)
    write_safetensors(tmp_path / "adapter_model.safetensors", tensors)
    with pytest.raises(AdapterFileError, match=rf"{key}: expected a float tensor, found dtype int32"):
        load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,))

    del tensors[key]
    tensors["base_model.model.nowhere.lora_A.weight"] = np.zeros((4, 8), np.float32)
    write_safetensors(tmp_path / "adapter_model.safetensors", tensors)
    with pytest.warns(UserWarning, match=rf"missing adapter keys.*{key}"), pytest.warns(UserWarning, match="nowhere"):
        params, _ = load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,))
    assert params["layers"]["q_proj"]["lora_B"]["default"].shape == (L, 4, D)


def test_missing_files_name_the_path(base_params, saved_dir, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing / "adapter_config.json")):
        load_adapter(missing, Net(), base_params, sample_args=(IDS,))
    (tmp_path / "adapter_config.json").write_text((saved_dir / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match=f"no adapter_model.safetensors in {tmp_path}"):
        load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,))


def test_other_adapter_names_use_peft_subfolders(base_params, tmp_path):
    config = LoraConfig(r=2, target_modules=["dense_0"], init_lora_weights=False)
    params, spec = inject(Net(), base_params, config, sample_args=(IDS,), key=jax.random.key(1), adapter_name="mine")
    out_dir = save_adapter(tmp_path, params, spec, config, adapter_name="mine")
    assert out_dir == tmp_path / "mine" and (out_dir / "adapter_model.safetensors").is_file()
    with pytest.raises(FileNotFoundError, match="adapter 'mine' is in"):
        load_adapter(tmp_path, Net(), base_params, sample_args=(IDS,), adapter_name="mine")
    loaded, loaded_spec = load_adapter(out_dir, Net(), base_params, sample_args=(IDS,), adapter_name="mine")
    assert loaded_spec.active == ("mine",)
    jax.tree.map(np.testing.assert_array_equal, loaded, params)


# --------------------------------------------------------------------------------------------
# (c) mixed batches: a different adapter per row, as PEFT's ``adapter_names``


def test_mixed_batch_rows_equal_peft_adapter_names_and_each_adapter_alone(base_params, tmp_path):
    ids = np.random.RandomState(1).randint(0, V, (5, 6))
    rows = ["two", "__base__", "one", "two", "one"]
    torch_model = twin(base_params)
    torch.manual_seed(5)
    a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["embed", "dense.0", "q_proj"], init_lora_weights=False,
                        modules_to_save=["classifier"])
    b = peft.LoraConfig(r=2, lora_alpha=8, target_modules=["dense.1", "q_proj", "v_proj"], init_lora_weights=False,
                        lora_bias=True, modules_to_save=["classifier"])  # PEFT's mixed batch needs a copy for each
    peft_model = peft.get_peft_model(torch_model, a, adapter_name="one")
    peft_model.add_adapter("two", b)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name or "lora_B.two.bias" in name:
                param.add_(0.2 * torch.randn_like(param))
    peft_model.save_pretrained(str(tmp_path))
    with torch.no_grad():
        expected = peft_model.eval()(torch.from_numpy(ids), adapter_names=rows).numpy()

    params, spec = load_adapter(tmp_path / "one", Net(), base_params, sample_args=(IDS,), adapter_name="one")
    params, spec = load_adapter(tmp_path / "two", Net(), params, sample_args=(IDS,), spec=spec, adapter_name="two")
    traces = []

    @jax.jit
    def mixed(params, ids, indices):
        traces.append(1)
        with intercept(spec, rows=indices):
            return Net().apply({"params": params}, ids)

    from peftjax.tuners import adapter_index

    got = np.asarray(mixed(params, ids, adapter_index(rows, spec.adapter_names)))
    np.testing.assert_allclose(got, expected, **TOL)
    for i, name in enumerate(rows):
        alone = spec.with_active() if name == "__base__" else spec.with_active(name)
        np.testing.assert_allclose(got[i], forward(alone)(params, ids[i:i + 1])[0], atol=1e-6, rtol=0)
    assert np.abs(got[0] - got[2]).max() > 1e-3  # the adapters differ
    for other in (["one"] * 5, ["__base__", "two", "two", "one", "one"]):  # any assignment: no new compilation
        mixed(params, ids, adapter_index(other, spec.adapter_names))
    assert len(traces) == 1
    with intercept(spec, rows=rows):  # names work too (a constant assignment)
        np.testing.assert_allclose(Net().apply({"params": params}, ids), got, atol=1e-6, rtol=0)
    # an adapter without a copy of the head: its rows run the original head
    params, spec = inject(Net(), params, LoraConfig(r=2, target_modules=["dense_0"], init_lora_weights=False),
                          sample_args=(IDS,), key=jax.random.key(4), spec=spec, adapter_name="three")
    with intercept(spec, rows=["three", "one"]):
        two_rows = Net().apply({"params": params}, ids[:2])
    for i, name in enumerate(["three", "one"]):
        np.testing.assert_allclose(two_rows[i], forward(spec.with_active(name))(params, ids[i:i + 1])[0],
                                   atol=1e-6, rtol=0)

    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): c \(adapters: \['one', 'three', 'two'\]\)"):
        with intercept(spec, rows=["one", "c", "one", "one", "one"]):
            pass
    with pytest.raises(ValueError, match="embed: a mixed batch needs the batch as the leading axis.*5 entries"):
        with intercept(spec, rows=["one", "two", "one", "one", "one"]):
            Net().apply({"params": params}, ids[:2])
    dora_params, dora_spec = inject(Net(), base_params, LoraConfig(r=2, target_modules=["dense_0"], use_dora=True),
                                    sample_args=(IDS,), key=jax.random.key(2))
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        with intercept(dora_spec, rows=["default", "default"]):
            pass
