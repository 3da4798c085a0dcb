"""LoRA on a user's ``nnx.LinearGeneral``, ``nnx.Einsum`` and ``nnx.Conv`` layers.

Every adapted layer is checked against a dense reference written here by hand from the kernels,
against its own merged kernel, and (2-D conv) against HF PEFT + PyTorch on the same weights.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from _torch_models import lazy
from peftjax.config import LoraConfig
from peftjax import tuners

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

R, ALPHA = 4, 8
S = ALPHA / R


class Net(nnx.Module):
    """A user's sequence model with one layer of each kind (none of them a bundled peftjax model)."""

    def __init__(self, rngs: nnx.Rngs):
        self.emb = nnx.Embed(50, 16, rngs=rngs)
        self.proj = nnx.LinearGeneral(16, (4, 8), rngs=rngs)
        self.mix = nnx.Einsum("bshk,hkd->bsd", (4, 8, 16), (16,), rngs=rngs)
        self.conv = nnx.Conv(16, 12, kernel_size=(3,), padding="SAME", rngs=rngs)
        self.head = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, ids):
        return self.head(jax.nn.relu(self.conv(self.mix(self.proj(self.emb(ids))))))


class ImageNet(nnx.Module):
    """A user's NHWC image classifier."""

    def __init__(self, rngs: nnx.Rngs, padding="VALID", use_bias=True):
        self.conv = nnx.Conv(3, 8, kernel_size=(3, 3), strides=2, padding=padding, use_bias=use_bias, rngs=rngs)
        self.head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, images):
        return self.head(jax.nn.relu(self.conv(images)).mean(axis=(1, 2)))


class Holder(nnx.Module):
    def __init__(self, layer: nnx.Module):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


def conv(x, w, strides, padding):
    nd = w.ndim - 2
    spatial = "DHW"[-nd:] if nd > 1 else "W"
    spec = ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=spec)


def conv_delta(a, b):
    return jnp.einsum("...ir,ro->...io", a, b)


class Case(NamedTuple):
    build: Callable[[nnx.Rngs], nnx.Module]
    target: str
    x_shape: tuple[int, ...]
    dense: Callable  # (x, effective kernel, bias) -> y, written out with jnp.einsum / lax.conv, bias axes explicit
    delta: Callable  # (A, B) -> the kernel-shaped A·B, by hand
    peft_shapes: dict[str, tuple[int, ...]]


CASES = {
    "linear_general": Case(
        Net, "proj", (2, 5, 16),
        lambda x, w, b: jnp.einsum("bsd,dhk->bshk", x, w) + b[None, None],
        lambda a, b: (a @ b).reshape(16, 4, 8),
        {"lora_A.weight": (R, 16), "lora_B.weight": (32, R)},
    ),
    "linear_general_two_axes": Case(
        lambda rngs: Holder(nnx.LinearGeneral((4, 8), (3, 2), axis=(1, -1), rngs=rngs)), "layer", (2, 4, 5, 8),
        lambda x, w, b: jnp.einsum("bhsk,hkop->bsop", x, w) + b[None, None],
        lambda a, b: (a @ b).reshape(4, 8, 3, 2),
        {"lora_A.weight": (R, 32), "lora_B.weight": (6, R)},
    ),
    "einsum": Case(
        Net, "mix", (2, 5, 4, 8),
        lambda x, w, b: jnp.einsum("bshk,hkd->bsd", x, w) + b[None, None],
        lambda a, b: (a @ b).reshape(4, 8, 16),
        {"lora_A.weight": (R, 32), "lora_B.weight": (16, R)},
    ),
    "einsum_interleaved_ellipsis": Case(  # contracted and output kernel axes alternate
        lambda rngs: Holder(nnx.Einsum("...de,hdke->...hk", (4, 16, 8, 2), (4, 8), rngs=rngs)), "layer",
        (2, 5, 16, 2),
        lambda x, w, b: jnp.einsum("bsde,hdke->bshk", x, w) + b[None, None],
        lambda a, b: (a @ b).reshape(16, 2, 4, 8).transpose(2, 0, 3, 1),  # (d, e, h, k) -> (h, d, k, e)
        {"lora_A.weight": (R, 32), "lora_B.weight": (32, R)},
    ),
    "conv1d_same": Case(
        Net, "conv", (2, 5, 16),
        lambda x, w, b: conv(x, w, (1,), "SAME") + b[None, None],
        conv_delta,
        {"lora_A.weight": (R, 16, 3), "lora_B.weight": (12, R, 1)},
    ),
    "conv2d_valid_stride2": Case(
        ImageNet, "conv", (2, 9, 9, 3),
        lambda x, w, b: conv(x, w, (2, 2), "VALID") + b[None, None, None],
        conv_delta,
        {"lora_A.weight": (R, 3, 3, 3), "lora_B.weight": (8, R, 1, 1)},
    ),
    "conv2d_int_padding": Case(
        lambda rngs: ImageNet(rngs, padding=1), "conv", (2, 8, 8, 3),
        lambda x, w, b: conv(x, w, (2, 2), [(1, 1), (1, 1)]) + b[None, None, None],
        conv_delta,
        {"lora_A.weight": (R, 3, 3, 3), "lora_B.weight": (8, R, 1, 1)},
    ),
    "conv2d_circular": Case(
        lambda rngs: ImageNet(rngs, padding="CIRCULAR"), "conv", (2, 8, 8, 3),
        lambda x, w, b: conv(jnp.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="wrap"), w, (2, 2), "VALID") + b[None, None, None],
        conv_delta,
        {"lora_A.weight": (R, 3, 3, 3), "lora_B.weight": (8, R, 1, 1)},
    ),
}


def config(target: str, **kw) -> LoraConfig:
    return LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[target], init_lora_weights=False, **kw)


def inputs(shape, seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def call(jit: bool):
    def run(module, x):
        return module(x)

    return nnx.jit(run) if jit else run


def adapted(case: Case, before: Callable | None = None, **kw):
    """The case's model with an adapter on its target, the target layer and its base kernel.

    ``before(layer)`` runs on the layer just before the adapter goes in.
    """
    model = case.build(nnx.Rngs(0))
    layer = getattr(model, case.target)
    base_kernel = np.array(layer.kernel.get_value())
    seen = before(layer) if before is not None else None
    tuners.inject_lora(model, config(case.target, **kw), key=jax.random.key(0))
    return model, layer, base_kernel, seen


@pytest.mark.parametrize("case", CASES, ids=str)
def test_adapter_equals_dense_reference(case, jit):
    case = CASES[case]
    x = inputs(case.x_shape)
    _, layer, base_kernel, before = adapted(case, lambda layer: np.asarray(call(jit)(layer, x)))
    a, b = layer.lora_A["default"].get_value(), layer.lora_B["default"].get_value()
    ours = np.asarray(call(jit)(layer, x))
    ref = case.dense(x, base_kernel + S * case.delta(a, b), layer.bias.get_value())
    np.testing.assert_allclose(ours, np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert np.abs(ours - before).max() > 1e-3  # init_lora_weights=False: a non-zero B changes the output


def test_user_model_with_every_layer_kind(jit):
    ids = np.array([[1, 4, 9, 16, 25], [2, 3, 5, 7, 11]])
    model = Net(nnx.Rngs(0))
    before = np.asarray(call(jit)(model, ids))
    targets = ["proj", "mix", "conv", "head"]
    tuners.inject_lora(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets, init_lora_weights=False))
    assert {n: type(m).__name__ for n, m in tuners.lora.lora_layers(model).items()} == {
        "proj": "LoraLinearGeneral", "mix": "LoraEinsum", "conv": "LoraConv", "head": "LoraLinear"
    }
    adapted_out = np.asarray(call(jit)(model, ids))
    assert np.abs(adapted_out - before).max() > 1e-3
    tuners.unload(model, merge_first=True)
    assert type(model.conv) is nnx.Conv and type(model.mix) is nnx.Einsum and type(model.proj) is nnx.LinearGeneral
    np.testing.assert_allclose(np.asarray(call(jit)(model, ids)), adapted_out, atol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_merge_equals_unmerged_and_unmerge_restores(case, jit):
    case = CASES[case]
    x = inputs(case.x_shape)
    model, layer, base_kernel, _ = adapted(case)
    unmerged = np.asarray(call(jit)(layer, x))
    tuners.merge(model)
    assert layer.merged_adapter_names() == ("default",)
    assert np.abs(np.asarray(layer.kernel.get_value()) - base_kernel).max() > 1e-4
    np.testing.assert_allclose(np.asarray(call(jit)(layer, x)), unmerged, atol=1e-5, rtol=1e-5)
    tuners.unmerge(model)
    np.testing.assert_allclose(np.asarray(layer.kernel.get_value()), base_kernel, atol=1e-6)
    np.testing.assert_allclose(np.asarray(call(jit)(layer, x)), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_peft_tensors_shapes_and_round_trip(case):
    case = CASES[case]
    _, layer, _, _ = adapted(case)
    tensors = layer.peft_tensors("default")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == case.peft_shapes
    changed = {k: 2.0 * v + 1.0 for k, v in tensors.items()}
    assert layer.load_peft_tensors("default", changed, "base_model.model.x") == []
    for k, v in layer.peft_tensors("default").items():
        np.testing.assert_array_equal(np.asarray(v), np.asarray(changed[k]))
    wrong = dict(changed, **{"lora_A.weight": jnp.zeros((R + 1, *case.peft_shapes["lora_A.weight"][1:]))})
    expected = list(case.peft_shapes["lora_A.weight"])
    found = [R + 1, *expected[1:]]
    with pytest.raises(ValueError) as e:
        layer.load_peft_tensors("default", wrong, "base_model.model.x")
    assert f"base_model.model.x.lora_A.weight: expected shape {expected}" in str(e.value)
    assert f"found {found}" in str(e.value)


def test_conv_dora_peft_layout_and_merge(jit):
    model = ImageNet(nnx.Rngs(0))
    tuners.inject_lora(model, config("conv", use_dora=True), key=jax.random.key(0))
    m = model.conv.lora_magnitude_vector["default"].get_value()
    w = model.conv.kernel.get_value() + model.conv.delta_weight("default")
    np.testing.assert_allclose(np.asarray(m), np.linalg.norm(np.asarray(w).reshape(-1, 8), axis=0), rtol=1e-6)
    assert model.conv.peft_tensors("default")["lora_magnitude_vector"].shape == (1, 8, 1, 1)
    x = inputs((2, 9, 9, 3))
    before = np.asarray(call(jit)(model, x))
    tuners.merge(model)
    np.testing.assert_allclose(np.asarray(call(jit)(model, x)), before, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True],
                         ids=["lora", "dora"])
@pytest.mark.parametrize("padding", ["VALID", 1], ids=["valid", "pad1"])
def test_conv2d_matches_peft_torch(padding, use_dora):
    model = ImageNet(nnx.Rngs(0), padding=padding)
    twin = torch.nn.Sequential()  # ImageNet's conv: the adapted layer's output is compared
    twin.add_module("conv", torch.nn.Conv2d(3, 8, 3, stride=2, padding=0 if padding == "VALID" else padding))
    with torch.no_grad():  # HWIO -> OIHW
        twin.conv.weight.copy_(torch.tensor(np.asarray(model.conv.kernel.get_value()).transpose(3, 2, 0, 1)))
        twin.conv.bias.copy_(torch.tensor(np.asarray(model.conv.bias.get_value())))
    tuners.inject_lora(model, config("conv", use_dora=use_dora), key=jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.inject_adapter_in_model(
            peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["conv"], use_dora=use_dora), twin
        ).eval()
    ours = model.conv.peft_tensors("default")
    layer = theirs.conv
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor(np.asarray(ours["lora_A.weight"])))
        layer.lora_B["default"].weight.copy_(torch.tensor(np.asarray(ours["lora_B.weight"])))
        if use_dora:
            layer.lora_magnitude_vector["default"].weight.copy_(
                torch.tensor(np.asarray(ours["lora_magnitude_vector"]))
            )
    x = np.asarray(inputs((2, 9, 9, 3)))
    with torch.no_grad():
        ref = theirs(torch.tensor(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    for jit in (False, True):
        np.testing.assert_allclose(np.asarray(call(jit)(model.conv, jnp.asarray(x))), ref, atol=1e-5)
    with torch.no_grad():
        layer.merge()
        merged = layer.base_layer.weight.numpy().transpose(2, 3, 1, 0)
    tuners.merge(model)
    np.testing.assert_allclose(np.asarray(model.conv.kernel.get_value()), merged, atol=1e-5)


def test_conv_transpose_is_rejected():
    model = nnx.Module()
    model.up = nnx.ConvTranspose(3, 4, (2, 2), rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"up \(ConvTranspose\)"):
        tuners.inject_lora(model, config("up"))
    assert type(model.up) is nnx.ConvTranspose


def test_grouped_conv_is_not_implemented():
    model = nnx.Module()
    model.grouped = nnx.Conv(4, 8, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match=r"grouped \(Conv\).*feature_group_count=2"):
        tuners.inject_lora(model, config("grouped"))


@pytest.mark.parametrize(
    "einsum_str, kernel_shape, why",
    [("bhd,hdk->bhk", (4, 16, 8), "batch axis"), ("bd,dkz->bk", (16, 8, 2), "summed over")],
)
def test_unfactorable_einsum_is_not_implemented(einsum_str, kernel_shape, why):
    model = Holder(nnx.Einsum(einsum_str, kernel_shape, rngs=nnx.Rngs(0)))
    with pytest.raises(NotImplementedError, match=re.escape(repr(einsum_str)) + ".*" + why):
        tuners.inject_lora(model, config("layer"))


@pytest.mark.parametrize("target", ["proj", "mix"])
def test_dora_on_flat_layers_is_not_implemented(target):
    with pytest.raises(NotImplementedError, match=rf"{target} \((LinearGeneral|Einsum)\): DoRA"):
        tuners.inject_lora(Net(nnx.Rngs(0)), config(target, use_dora=True))


def test_linear_general_batch_axis_is_not_implemented():
    model = Holder(nnx.LinearGeneral(16, 8, axis=-1, batch_axis={0: 2}, rngs=nnx.Rngs(0)))
    with pytest.raises(NotImplementedError, match=r"layer \(LinearGeneral\): batch_axis"):
        tuners.inject_lora(model, config("layer"))
