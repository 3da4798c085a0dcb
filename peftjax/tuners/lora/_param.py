"""LoRA on bare parameters: PEFT's ``target_parameters`` (its ``lora.ParamWrapper``).

Some weights are not a layer's: transformers 5 fuses a mixture of experts into 3-D parameters
(Mixtral's ``mlp.experts.gate_up_proj [experts, 2I, hidden]`` and ``down_proj [experts, hidden, I]``)
and its router keeps a bare ``weight [experts, hidden]``. PEFT adapts such a parameter ``W`` by
using ``W + s * ΔW`` wherever the module reads it. Per adapter and parameter (torch layouts, as PEFT
stores them; ``E`` experts, ``E = 1`` for a 2-D parameter ``[out, in]``):

* ``lora_A [r * E, in]``, read as ``[E, r, in]`` (expert-major rows);
* ``lora_B [out, r * E]``, read as ``[out, r, E]`` (expert-minor columns);
* ``ΔW[e] = B[:, :, e] @ A[e]``, i.e. ``einsum("ore,eri->eoi")`` for ``[E, out, in]`` parameters and
  ``"eio"`` for those a module declares ``is_transposed`` (``[E, in, out]``); ``B @ A`` in 2-D.

A module whose parameters can be targeted reads them through ``param_value(attr)`` (see
:class:`peftjax.nn.ParamReader`); the LoRA mixin overrides that method, so nothing else in the
model changes. Like PEFT, one module carries all its targeted parameters, nested in its file keys:
the parameter that comes first in the module's ``hf_param_map`` is the innermost wrapper, so of
Mixtral's experts ``gate_up_proj`` is saved under ``experts.base_layer.lora_A.weight`` and
``down_proj`` under ``experts.lora_A.weight``. PEFT's refusals hold: no dropout, DoRA, ``lora_bias``,
``fan_in_fan_out``, mixed adapter batches, and every adapter targets the same parameters.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._modeling import hf_param_map
from peftjax.tuners.base import AdapterLayer, LoraParam, mixin_subclass
from peftjax.tuners.base._rows import rows_of
from peftjax.tuners.lora._layer import LoraLayer
from peftjax.tuners.lora._math import LoraSpec, canonical_init, nora_normalized


class ParamSpecs(NamedTuple):
    """One adapter's settings on a module: ``((attr, LoraSpec), ...)``, innermost parameter first."""

    params: tuple[tuple[str, LoraSpec], ...]


def param_names(module: nnx.Module) -> list[tuple[str, str]]:
    """``[(attr, torch name)]`` of the module's own parameters, in its torch registration order."""
    rule = hf_param_map(module)
    return [(attr, name) for attr, (name, _) in rule.items() if isinstance(getattr(module, attr, None), nnx.Param)]


def check_param_target(module: nnx.Module, path: str, attr: str, config) -> None:
    """PEFT's ``ParamWrapper`` refusals, and what this module must offer; before anything changes.

    Raises:
      ValueError: ``lora_dropout``, ``fan_in_fan_out``, ``lora_bias`` or ``use_dora`` is set (PEFT's
        messages), or the parameter is neither 2-D nor 3-D.
      TypeError: the module does not read its parameters through ``param_value``, or carries
        another method's adapter.
      NotImplementedError: an ``init_lora_weights`` that needs the base weight (PiSSA, OLoRA, ...).
    """
    for flag, what in (("lora_dropout", "lora_dropout != 0"), ("fan_in_fan_out", "fan_in_fan_out"),
                       ("lora_bias", "lora_bias=True"), ("use_dora", "use_dora=True"),
                       ("arrow_config", "an Arrow router (arrow_config)")):
        if getattr(config, flag):
            raise ValueError(f"lora.ParamWrapper does not work with {what} (target_parameters on {path}.{attr}).")
    if not callable(getattr(type(module), "param_value", None)):
        raise TypeError(f"target_parameters: {path} ({type(module).__name__}) reads its parameters directly; "
                        "LoRA on a parameter needs a module that reads them through `param_value(attr)` "
                        "(peftjax.nn.ParamReader)")
    if isinstance(module, AdapterLayer) and not isinstance(module, LoraParamLayer):
        raise TypeError(f"{path} already carries another method's adapter; one method per layer is supported")
    ndim = getattr(module, attr).get_value().ndim
    if ndim not in (2, 3):
        raise ValueError(f"lora.ParamWrapper was initialized with {ndim} dimensional Parameter ({path}.{attr}), "
                         "but only 2d and 3d are supported.")
    init = canonical_init(config.init_lora_weights)
    if init not in (True, False, "gaussian", "nora"):
        raise NotImplementedError(f"init_lora_weights={init!r} with target_parameters ({path}.{attr}) is not "
                                  "implemented; supported there: True, False, 'gaussian', 'nora'")


class LoraParamLayer(LoraLayer):
    """LoRA on some of a module's bare parameters (PEFT's nested ``ParamWrapper``)."""

    lora_kind = "param"
    status_module_type = "lora.ParamWrapper"  # PEFT's, in get_layer_status
    supports_adapter_rows = False
    weight_dicts = ("lora_A", "lora_B")  # {attr: {adapter: LoraParam}}
    cache_dicts = ()

    # -- shapes: (experts, in, out) of a parameter, as PEFT's ParamWrapper reads it
    def _param_dims(self, attr: str) -> tuple[int, int, int]:
        w = getattr(self, attr).get_value()
        if w.ndim == 2:
            return 1, *self._torch_2d(attr, w).shape[::-1]
        e, d1, d2 = w.shape
        return (e, d1, d2) if getattr(self, "is_transposed", False) else (e, d2, d1)

    def _transposed_2d(self, attr: str) -> bool:
        return bool(hf_param_map(self).get(attr, (attr, False))[1])

    def _torch_2d(self, attr: str, w: jax.Array) -> jax.Array:
        return w.T if self._transposed_2d(attr) else w

    def add_param_lora(self, name: str, specs: ParamSpecs, key: jax.Array, init) -> None:
        self._check_new(name)
        init = canonical_init(init)
        for i, (attr, spec) in enumerate(specs.params):
            e, n_in, n_out = self._param_dims(attr)
            dtype = getattr(self, attr).get_value().dtype
            ka, kb = jax.random.split(jax.random.fold_in(key, i))
            if init == "gaussian":
                a = jax.random.normal(ka, (spec.r * e, n_in), jnp.float32) / spec.r
            else:  # torch's nn.Linear init (kaiming_uniform(a=sqrt(5))) on nn.Linear(in, r * E)
                a = jax.random.uniform(ka, (spec.r * e, n_in), jnp.float32, -1, 1) / math.sqrt(n_in)
            if init == "nora":  # each expert's r values of an input scaled to unit norm
                a = nora_normalized(a.reshape(e, spec.r, n_in), axis=1).reshape(spec.r * e, n_in)
            if init is False:  # PEFT leaves nn.Linear(r * E, out)'s own init on B as well
                b = jax.random.uniform(kb, (n_out, spec.r * e), jnp.float32, -1, 1) / math.sqrt(spec.r * e)
            else:
                b = jnp.zeros((n_out, spec.r * e), jnp.float32)
            for store, value in (("lora_A", a), ("lora_B", b)):
                if attr not in getattr(self, store):
                    getattr(self, store)[attr] = nnx.Dict()
                getattr(self, store)[attr][name] = LoraParam(value.astype(dtype))
        self._add_spec(name, specs)

    def frozen_adapter_dicts(self, name: str) -> tuple:
        return ()  # its specs are per parameter (ParamSpecs), and MiCA is refused here

    def arrow_expert_names(self) -> tuple[str, ...]:
        return ()  # an Arrow router routes over linear layers only

    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        return tuple(getattr(self, store)[attr] for store in self.weight_dicts for attr in getattr(self, store))

    def _describe(self, name: str) -> str:
        return ", ".join(f"{attr}: r={spec.r}" for attr, spec in self.spec(name).params)

    def peft_layout(self, name: str | None = None):
        """``{suffix: (store, to_torch, from_torch)}``: the factors are kept in torch layout already."""
        attrs = [attr for attr, _ in param_names(self) if attr in self.lora_A]
        same = lambda v: v  # noqa: E731
        out = {}
        for depth, attr in enumerate(reversed(attrs)):  # the last-registered parameter is the outer wrapper
            prefix = "base_layer." * depth
            out[f"{prefix}lora_A.weight"] = (self.lora_A[attr], same, same)
            out[f"{prefix}lora_B.weight"] = (self.lora_B[attr], same, same)
        return out

    def status_suffixes(self) -> tuple[str, ...]:
        """PEFT's wrapper names in ``get_layer_status``: the module, then ``.base_layer`` per nested one."""
        n = sum(1 for attr, _ in param_names(self) if attr in self.lora_A and len(self.lora_A[attr]))
        return tuple(".base_layer" * depth for depth in range(max(n, 1)))

    def param_delta(self, name: str, attr: str) -> jax.Array:
        """``s * ΔW`` of adapter ``name`` on parameter ``attr``, in the parameter's own layout (float32)."""
        spec = dict(self.spec(name).params)[attr]
        a = self.lora_A[attr][name].get_value().astype(jnp.float32)
        b = self.lora_B[attr][name].get_value().astype(jnp.float32)
        w = getattr(self, attr).get_value()
        if w.ndim == 2:
            d = b @ a
            return spec.scaling * (d.T if self._transposed_2d(attr) else d)
        e = w.shape[0]
        a3, b3 = a.reshape(e, -1, a.shape[-1]), b.reshape(b.shape[0], -1, e)
        layout = "ore,eri->eio" if getattr(self, "is_transposed", False) else "ore,eri->eoi"
        return spec.scaling * jnp.einsum(layout, b3, a3)

    def delta_weight(self, name: str, spec=None) -> jax.Array:
        raise TypeError(f"{self.adapter_path}: a LoRA on parameters has one delta per parameter; use param_delta")

    def param_value(self, attr: str) -> jax.Array:
        """The parameter as the module computes with it: ``W + Σ s ΔW`` over the live adapters."""
        w = self._peftjax_base.param_value(self, attr)
        if rows_of(self) is not None:
            raise ValueError("lora.ParamWrapper does not support mixed adapter batches yet.")
        if attr not in self.lora_A:
            return w
        for name, _ in self._live_adapters():
            if name in self.lora_A[attr]:
                w = w + self.param_delta(name, attr).astype(w.dtype)
        return w

    def __call__(self, *args, **kwargs):
        return self._peftjax_base.__call__(self, *args, **kwargs)

    def merge_adapter(self, name: str) -> None:
        for attr, _ in self.spec(name).params:
            var = getattr(self, attr)
            var.set_value((var.get_value() + self.param_delta(name, attr)).astype(var.get_value().dtype))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        for attr, _ in self.spec(name).params:
            var = getattr(self, attr)
            var.set_value((var.get_value() - self.param_delta(name, attr)).astype(var.get_value().dtype))
        self._mark_merged(name, False)


def param_class_for(module: nnx.Module) -> type:
    return type(module) if isinstance(module, LoraParamLayer) else mixin_subclass(type(module), LoraParamLayer, "Lora")


def match_parameters(config, modules: dict[str, nnx.Module]) -> dict[str, list[tuple[str, str]]]:
    """``{module path: [(attr, parameter key)]}`` the config's ``target_parameters`` select.

    A parameter key is ``<module path>.<torch name>``; it matches an entry that equals it or that
    it ends with after a dot (PEFT's rule).
    """
    wanted = tuple(config.target_parameters or ())
    out: dict[str, list[tuple[str, str]]] = {}
    for path, module in modules.items():
        if not path:
            continue
        for attr, torch_name in param_names(module):
            key = f"{path}.{torch_name}"
            if any(key == t or key.endswith("." + t) for t in wanted):
                out.setdefault(path, []).append((attr, key))
    return out


def check_same_parameters(modules: dict[str, nnx.Module], matched: dict[str, list[tuple[str, str]]]) -> None:
    """PEFT's rule: every adapter that targets parameters targets the same ones (they nest in the file keys).

    Raises:
      ValueError: a module's adapters target other parameters than ``matched`` gives it.
    """
    for path, module in modules.items():
        if not isinstance(module, LoraParamLayer) or not module.adapter_specs:
            continue
        new = tuple(attr for attr, _ in matched.get(path, ()))
        other, theirs = module.adapter_specs[0]
        held = tuple(attr for attr, _ in theirs.params)
        if new != held:
            raise ValueError(
                "When using multiple adapters with `target_parameters`, all adapters must target the same set of "
                f"parameters, but got {sorted(new)} for the new adapter and {sorted(held)} for adapter "
                f"'{other}' (on {path}).")


def check_parameters(modules: dict[str, nnx.Module], matched: dict[str, list[tuple[str, str]]], config) -> None:
    """Every refusal :func:`inject_parameters` could meet, before the model changes."""
    check_same_parameters(modules, matched)
    for path, params in matched.items():
        for attr, _ in params:
            check_param_target(modules[path], path, attr, config)


def inject_parameters(modules: dict[str, nnx.Module], matched: dict[str, list[tuple[str, str]]], config,
                      adapter_name: str, key: jax.Array) -> None:
    """Adds adapter ``adapter_name`` on the ``matched`` parameters (:func:`match_parameters`),
    after :func:`check_parameters` passed."""
    for i, (path, params) in enumerate(matched.items()):
        module = modules[path]
        module.__class__ = param_class_for(module)
        module._adapter_setup(path)
        specs = ParamSpecs(tuple((attr, LoraSpec.for_target(config, k)) for attr, k in params))
        module.add_param_lora(adapter_name, specs, jax.random.fold_in(key, 1_000_003 + i), config.init_lora_weights)
