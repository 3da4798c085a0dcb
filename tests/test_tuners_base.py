"""A new PEFT method is one folder's worth of code and one registry line.

A toy method, defined here the way ``tuners/<method>/`` would define it, gets every model-wide
operation from the base tuner: get_peft_model, switching, disabling, merge/unmerge, unload, PEFT's
state-dict functions and inject_adapter_in_model. No torch needed.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax
from peftjax.config import PeftConfig, match_modules
from peftjax.tuners import Tuner, register_tuner
from peftjax.tuners.base import (
    AdapterDictLayer,
    AdapterParam,
    add_saved_copy,
    check_adaptable,
    match_modules_to_save,
    mixin_subclass,
    named_modules,
    validate_adapter_name,
)


# ------------------------------------------------------------------ the method, as a folder would hold it


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShiftConfig(PeftConfig):
    """Adds a learned vector to each targeted layer's output."""

    peft_type: ClassVar[str] = "SHIFT"
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None


class ShiftLayer(AdapterDictLayer):
    method_name = "shift"
    weight_dicts = ("shift",)

    def add_shift(self, name: str, value: jax.Array) -> None:
        self._check_new(name)
        self.shift[name] = AdapterParam(value)
        self._add_spec(name, None)

    def peft_layout(self, name: str):
        return {"shift": (self.shift, lambda v: v, lambda v: v)}

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, _ in self._live_adapters():
            shift = self.shift[name].get_value()  # [out], over y's leading axes (written out: rank promotion raises)
            y = y + shift.reshape((1,) * (y.ndim - 1) + shift.shape)
        return y

    def merge_adapter(self, name: str) -> None:
        self.bias.set_value(self.bias.get_value() + self.shift[name].get_value())
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self.bias.set_value(self.bias.get_value() - self.shift[name].get_value())
        self._mark_merged(name, False)


def inject_shift(model, config: ShiftConfig, *, adapter_name: str = "default", key=None) -> ShiftConfig:
    validate_adapter_name(adapter_name)
    key = jax.random.key(0) if key is None else key
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n])
    check_adaptable(modules, targets, ShiftLayer, "shift")
    for i, name in enumerate(targets):
        module = modules[name]
        if not isinstance(module, ShiftLayer):
            module.__class__ = mixin_subclass(type(module), ShiftLayer, "Shift")
        module._adapter_setup(name)
        module.add_shift(adapter_name, jax.random.normal(jax.random.fold_in(key, i), module.bias.get_value().shape))
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


register_tuner(Tuner.for_layers(ShiftConfig, inject=inject_shift, layer_type=ShiftLayer))  # the registry line


# ------------------------------------------------------------------ what it gets for free


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


X = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)


def reference(net, shifts):
    """The method's math by hand, on the plain layers' weights."""
    h = X @ net.hidden.kernel.get_value() + (net.hidden.bias.get_value() + shifts["hidden"])[None]
    return jax.nn.relu(h) @ net.out.kernel.get_value() + (net.out.bias.get_value() + shifts["out"])[None]


def _run(model, jit):
    model = getattr(model, "base_model", model)
    return np.asarray(nnx.jit(lambda m, x: m(x))(model, X) if jit else model(X))


def test_a_registered_method_runs_merges_and_unloads_through_the_base_tuner(jit):
    plain = Net(nnx.Rngs(0))
    peft_model = peftjax.get_peft_model(Net(nnx.Rngs(0)), ShiftConfig(target_modules=["hidden", "out"]))
    shifts = {n: getattr(peft_model.base_model, n).shift["default"].get_value() for n in ("hidden", "out")}
    expected = np.asarray(reference(plain, shifts))
    assert np.abs(expected - _run(plain, jit)).max() > 1e-3  # the adapter changes the output
    np.testing.assert_allclose(_run(peft_model, jit), expected, atol=1e-6)

    with peft_model.disable_adapter():
        np.testing.assert_allclose(_run(peft_model, jit), _run(plain, jit), atol=1e-6)
    peft_model.merge_adapter()
    np.testing.assert_allclose(_run(peft_model, jit), expected, atol=1e-6)
    peft_model.unmerge_adapter()
    np.testing.assert_allclose(_run(peft_model, jit), expected, atol=1e-6)

    _, trainable, _ = peftjax.split(peft_model.base_model)
    assert jax.tree.map(jnp.shape, trainable) == {"hidden": {"shift": {"default": (8,)}},
                                                  "out": {"shift": {"default": (3,)}}}

    sd = peftjax.get_peft_model_state_dict(peft_model)
    assert {k: v.shape for k, v in sd.items()} == {"base_model.model.hidden.shift": (8,),
                                                   "base_model.model.out.shift": (3,)}
    other = peftjax.get_peft_model(Net(nnx.Rngs(0)), ShiftConfig(target_modules=["hidden", "out"]),
                                   key=jax.random.key(7))
    assert peftjax.set_peft_model_state_dict(other, sd) == ([], [])
    np.testing.assert_allclose(_run(other, jit), expected, atol=1e-6)

    merged = peft_model.merge_and_unload()
    assert not any(isinstance(m, ShiftLayer) for m in named_modules(merged).values())
    np.testing.assert_allclose(_run(merged, jit), expected, atol=1e-6)


def test_inject_adapter_in_model_takes_any_registered_method():
    model = peftjax.inject_adapter_in_model(ShiftConfig(target_modules=["out"]), Net(nnx.Rngs(0)), "mine")
    assert isinstance(model.out, ShiftLayer) and model.out.adapter_names() == ("mine",)
    assert not isinstance(model.hidden, ShiftLayer)


def test_an_unregistered_config_lists_the_supported_ones():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Unknown(PeftConfig):
        peft_type: ClassVar[str] = "UNKNOWN"

    with pytest.raises(NotImplementedError, match="Unknown is not supported yet; supported: .*ShiftConfig"):
        peftjax.inject_adapter_in_model(Unknown(), Net(nnx.Rngs(0)))
