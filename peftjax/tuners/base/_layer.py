"""The base adapter layer: the contract every adapter-carrying layer keeps, and its bookkeeping.

A method's layer is a mixin applied to the user's own layer class (:func:`mixin_subclass`); the
model-wide operations (activate, disable, merge, unmerge, delete, unload; ``tuners.base._model``)
only use the :class:`AdapterLayer` interface. :class:`AdapterDictLayer` is the bookkeeping every
layer method shares (LoRA, IA³, bottleneck): adapters kept as per-name ``nnx.Dict`` entries, which
are active, merged or disabled, and the map from those entries to PEFT's key suffixes and torch
layouts that the one state-dict walk (``tuners.base._state_dict``) reads and writes.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.nn._dropout import apply_dropout


class AdapterLayer(abc.ABC):
    """A layer (or model) that holds named adapters beside its frozen weights."""

    # attributes the mixin adds to the layer; ``remove_adapter_state`` deletes them
    adapter_state_attrs: tuple[str, ...] = ()
    # whether several adapters merge last to first: a rotation of the input folded into the kernel
    # from the left (OFT's ``R kernel``), whose forward applies the adapters first to last
    merge_last_first: bool = False

    @abc.abstractmethod
    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter on this layer."""

    @abc.abstractmethod
    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        """Activates the given adapters (names this layer lacks are ignored)."""

    @abc.abstractmethod
    def set_adapters_disabled(self, disabled: bool) -> None:
        """Bypasses every adapter while ``disabled``."""

    @abc.abstractmethod
    def active_adapter_names(self) -> tuple[str, ...]:
        """The active adapters."""

    @abc.abstractmethod
    def merged_adapter_names(self) -> tuple[str, ...]:
        """The adapters folded into the base weights, in merge order."""

    @abc.abstractmethod
    def merge_adapter(self, name: str) -> None:
        """Folds the adapter into the base weights."""

    @abc.abstractmethod
    def unmerge_adapter(self, name: str) -> None:
        """Undoes :meth:`merge_adapter`."""

    @abc.abstractmethod
    def delete_adapter(self, name: str) -> None:
        """Removes the adapter's weights."""

    @abc.abstractmethod
    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        """The ``{adapter name: variable}`` containers of this layer's adapter weights."""

    def frozen_adapter_dicts(self, name: str) -> tuple[nnx.Dict, ...]:
        """Those of :meth:`adapter_variable_dicts` whose entry for adapter ``name`` never trains
        (saved with the adapter, frozen even while it trains: MiCA's ``lora_B``)."""
        return ()

    def remove_adapter_state(self) -> None:
        for attr in self.adapter_state_attrs:
            if hasattr(self, attr):
                delattr(self, attr)


class ModelLevelAdapter(AdapterLayer):
    """A model mixin whose method keeps its weights at model level, one adapter active at a time
    (X-LoRA's classifier, Shadow's backbone): ``stores`` name the ``nnx.Dict`` attributes holding
    each adapter's modules (the first one's keys are the adapters), ``model_active`` and
    ``model_disabled`` its state; the weights are made trainable or frozen when they are built."""

    stores: tuple[str, ...] = ()
    method: str = "model-level"  # the method's name, for messages
    merge_refusal: str = "this adapter cannot be merged"

    @classmethod
    def refuse_another_method(cls, model) -> None:
        """Refuses to add this method to a ``model`` that carries another model-level method's
        adapter: their active and disabled state is one (``model_active``, ``model_disabled``).

        Raises:
          NotImplementedError: naming both methods and the adapters already there.
        """
        if isinstance(model, ModelLevelAdapter) and not isinstance(model, cls):
            raise NotImplementedError(f"{type(model).__name__} carries {model.method} adapters "
                                      f"{list(model.adapter_names())}; a {cls.method} adapter cannot join them (one "
                                      "model-level method per model: delete_adapter them first)")

    @property
    def adapter_stores(self) -> tuple[str, ...]:
        """What the base model's checkpoint walk (``iter_hf_params``) leaves out."""
        return self.stores

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(getattr(self, self.stores[0]).keys())

    def current_adapter(self) -> str | None:
        """The active adapter, or ``None`` (none active, or disabled)."""
        return None if self.model_disabled or not self.model_active else self.model_active[0]

    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        self.model_active = tuple(n for n in names if n in self.adapter_names())[:1]

    def set_adapters_disabled(self, disabled: bool) -> None:
        self.model_disabled = bool(disabled)

    def active_adapter_names(self) -> tuple[str, ...]:
        return self.model_active

    def merged_adapter_names(self) -> tuple[str, ...]:
        return ()

    def merge_adapter(self, name: str) -> None:
        raise ValueError(f"adapter {name!r}: {self.merge_refusal}")

    def unmerge_adapter(self, name: str) -> None:
        pass

    def delete_adapter(self, name: str) -> None:
        for store in self.stores:
            if name in getattr(self, store):
                del getattr(self, store)[name]
        self.model_active = tuple(n for n in self.model_active if n != name)
        if not self.adapter_names():  # the last one: the model is plain again
            self.remove_adapter_state()
            self.__class__ = original_class(self)

    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        return ()


class AdapterDictLayer(AdapterLayer):
    """The bookkeeping of a layer whose adapter weights are per-name ``nnx.Dict`` entries.

    Subclasses name their trainable weight containers in ``weight_dicts`` (and non-trainable
    per-adapter state in ``cache_dicts``; those a merge fills in ``merge_cache_dicts`` too), add adapters with
    :meth:`_add_spec`, and map their weights to PEFT's key suffixes and torch layouts in
    :meth:`peft_layout`. Like every mixin applied by :func:`mixin_subclass`, methods reach the
    original layer through ``self._peftjax_base``, never ``super()``.
    """

    method_name: str = "adapter"
    weight_dicts: tuple[str, ...] = ()
    cache_dicts: tuple[str, ...] = ()
    merge_cache_dicts: tuple[str, ...] = ()  # those of ``cache_dicts`` a merge fills (dropped by a failed merge)
    adapter_state_attrs = ("adapter_path", "adapter_specs", "adapter_active", "adapter_merged", "adapter_disabled")

    def _adapter_setup(self, path: str) -> None:
        if not hasattr(self, "adapter_specs"):
            self.adapter_path = path
            self.adapter_specs = ()
            self.adapter_active = ()
            self.adapter_merged = ()
            self.adapter_disabled = False
            for attr in self.weight_dicts + self.cache_dicts:
                setattr(self, attr, nnx.Dict())

    def remove_adapter_state(self) -> None:
        for attr in self.adapter_state_attrs + self.weight_dicts + self.cache_dicts:
            if hasattr(self, attr):
                delattr(self, attr)

    def spec(self, name: str):
        """The static settings of adapter ``name`` on this layer."""
        return dict(self.adapter_specs)[name]

    def _live_adapters(self) -> list[tuple[str, object]]:
        """The adapters the forward applies: active, not merged, and not disabled."""
        if self.adapter_disabled:
            return []
        specs = dict(self.adapter_specs)
        return [(n, specs[n]) for n in self.adapter_active if n in specs and n not in self.adapter_merged]

    def _serves_rows(self) -> bool:
        """Whether a mixed batch adds this layer's adapters: not while disabled; merged ones are refused.

        Raises:
          ValueError: an adapter is merged (PEFT's message).
        """
        if self.adapter_disabled:
            return False
        if self.adapter_merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )
        return True

    # AdapterLayer
    def adapter_names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.adapter_specs)

    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        own = self.adapter_names()
        self.adapter_active = tuple(n for n in names if n in own)

    def set_adapters_disabled(self, disabled: bool) -> None:
        self.adapter_disabled = disabled

    def active_adapter_names(self) -> tuple[str, ...]:
        return self.adapter_active

    def merged_adapter_names(self) -> tuple[str, ...]:
        return self.adapter_merged

    def delete_adapter(self, name: str) -> None:
        for d in self.adapter_variable_dicts() + tuple(getattr(self, attr) for attr in self.cache_dicts):
            if name in d:
                del d[name]
        self.adapter_specs = tuple((n, s) for n, s in self.adapter_specs if n != name)
        self.adapter_active = tuple(n for n in self.adapter_active if n != name)

    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        return tuple(getattr(self, attr) for attr in self.weight_dicts)

    def _check_new(self, name: str) -> None:
        if name in self.adapter_names():
            raise ValueError(f"adapter {name!r} already exists on {self.adapter_path}")

    def _add_spec(self, name: str, spec) -> None:
        self.adapter_specs = self.adapter_specs + ((name, spec),)
        if not self.adapter_active:  # the first adapter on a layer is active, as in PEFT
            self.adapter_active = (name,)

    def _mark_merged(self, name: str, merged: bool) -> None:
        if merged:
            self.adapter_merged = self.adapter_merged + (name,)
        else:
            self.adapter_merged = tuple(n for n in self.adapter_merged if n != name)

    def _shift_kernel(self, delta: jax.Array, sign: float) -> None:
        """``kernel += sign * delta`` in float32, cast back to the kernel's dtype: an additive
        method's merge (+1) and unmerge (-1); ``delta`` in the kernel's ``[in, out]`` layout."""
        w = self.kernel.get_value()
        self.kernel.set_value((w.astype(jnp.float32) + sign * delta).astype(w.dtype))

    def _plus_updates(self, x: jax.Array, args, kwargs, update: Callable[[str, object], jax.Array]) -> jax.Array:
        """The base layer's output plus ``update(name, spec)`` of every live adapter, summed in
        float32 and cast back to the output's dtype: the forward of a method that adds to the output."""
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        live = self._live_adapters()
        if not live:
            return y
        out = y.astype(jnp.float32)
        for name, spec in live:
            out = out + update(name, spec)
        return out.astype(y.dtype)

    # PEFT file protocol: ``peft_layout(name)`` gives {key suffix: (variable dict, to_torch, from_torch)}

    def peft_layout(self, name: str) -> dict[str, tuple[nnx.Dict, Callable, Callable]]:
        raise NotImplementedError

    def peft_tensors(self, name: str) -> dict[str, np.ndarray]:
        """The adapter's weights as PEFT stores them (torch layouts), by key suffix: host arrays,
        so that saving transposes without compiling an XLA program per shape."""
        return {
            suffix: to_torch(np.asarray(store[name].get_value()))
            for suffix, (store, to_torch, _) in self.peft_layout(name).items()
            if name in store
        }

    def load_peft_tensors(self, name: str, tensors: Mapping, source: str) -> list[str]:
        """Sets the adapter's weights from torch-layout tensors, checking shapes.

        Returns:
          The full keys absent from ``tensors`` (those weights keep their init values).

        Raises:
          ValueError: a tensor has the wrong shape (names the key, expected and found shapes).
        """
        missing = []
        for suffix, (store, to_torch, from_torch) in self.peft_layout(name).items():
            if name not in store:
                continue
            key = f"{source}.{suffix}"
            if suffix not in tensors:
                missing.append(key)
                continue
            value = tensors[suffix]
            current = store[name].get_value()
            if np.issubdtype(value.dtype, np.integer) != np.issubdtype(current.dtype, np.integer):
                kind = "an integer" if np.issubdtype(current.dtype, np.integer) else "a float"
                raise ValueError(f"{key}: expected {kind} tensor, found dtype {value.dtype}")
            expected = tuple(jax.eval_shape(to_torch, current).shape)
            if tuple(value.shape) != expected:
                raise ValueError(
                    f"{key}: expected shape {list(expected)} ({self._describe(name)}), found {list(value.shape)}"
                )
            # converted on the host: no XLA program per tensor shape
            host = np.asarray(from_torch(np.asarray(value)), current.dtype).reshape(current.shape)
            store[name].set_value(jax.device_put(host))
        return missing

    def _describe(self, name: str) -> str:
        return f"{self.method_name} adapter {name!r}"


class AdditiveLayer(AdapterDictLayer):
    """A method whose update is a weight delta added to the kernel: it defines :meth:`kernel_delta`
    and merges by adding it (``convert_to_lora`` reads it too)."""

    def kernel_delta(self, name: str) -> jax.Array:
        """``delta_W`` of adapter ``name`` in the kernel's ``[in, out]`` layout, float32."""
        raise NotImplementedError

    def merge_adapter(self, name: str) -> None:
        self._shift_kernel(self.kernel_delta(name), 1.0)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._shift_kernel(self.kernel_delta(name), -1.0)
        self._mark_merged(name, False)


def layer_bias(module: nnx.Module) -> nnx.Variable | None:
    """The layer's bias variable, or ``None`` where it has none (``use_bias=False``)."""
    bias = getattr(module, "bias", None)
    return bias if isinstance(bias, nnx.Variable) and bias.get_value() is not None else None


class PreMergeWeight(nnx.Variable):
    """A layer's weight (or bias) before its first merge, kept while an adapter is merged (not saved)."""


class WeightReadingLayer(AdapterDictLayer):
    """A method whose update is computed from the frozen weight itself (HiRA, GLoRA, PEANuT).

    Merging adds each adapter's delta taken from the weights as they were before the first merge
    (kept while one is merged, as PEFT keeps them), so merged adapters do not compound; unmerging
    the last restores them exactly. Subclasses define :meth:`merge_deltas`.
    """

    weight_name = "kernel"
    adapter_state_attrs = AdapterDictLayer.adapter_state_attrs + ("premerge_weight", "premerge_bias")

    def merge_deltas(self, name: str, weight: jax.Array, bias: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        """What adapter ``name`` adds to the weight (in its layout) and to the bias (``None``: nothing),
        float32, given the pre-merge ``weight`` and ``bias`` (float32; ``None`` without one)."""
        raise NotImplementedError

    def _shift_weights(self, name: str, sign: float) -> None:
        weight, bias = getattr(self, self.weight_name), layer_bias(self)
        w0 = self.premerge_weight.get_value().astype(jnp.float32)
        b0 = None if bias is None else self.premerge_bias.get_value().astype(jnp.float32)
        dw, db = self.merge_deltas(name, w0, b0)
        weight.set_value((weight.get_value().astype(jnp.float32) + sign * dw).astype(weight.get_value().dtype))
        if db is not None:
            bias.set_value((bias.get_value().astype(jnp.float32) + sign * db).astype(bias.get_value().dtype))

    def merge_adapter(self, name: str) -> None:
        if not self.adapter_merged:
            self.premerge_weight = PreMergeWeight(getattr(self, self.weight_name).get_value())
            bias = layer_bias(self)
            if bias is not None:
                self.premerge_bias = PreMergeWeight(bias.get_value())
        self._shift_weights(name, 1.0)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        self._mark_merged(name, False)
        if self.adapter_merged:
            self._shift_weights(name, -1.0)
            return
        getattr(self, self.weight_name).set_value(self.premerge_weight.get_value())  # the last: exactly as it was
        bias = layer_bias(self)
        if bias is not None:
            bias.set_value(self.premerge_bias.get_value())
            del self.premerge_bias
        del self.premerge_weight


class LowRankFactorsLayer(AdditiveLayer):
    """A method whose update is a LoRA pair it assembles from other weights (VB-LoRA's bank
    mixtures, Uni-LoRA's vector entries): it defines :meth:`factors`; the forward adds
    ``dropout(x) A^T B^T`` (the spec's ``dropout``) and merging adds ``B A``."""

    def factors(self, name: str) -> tuple[jax.Array, jax.Array]:
        """``(A [r, in], B [out, r])`` of adapter ``name``, float32."""
        raise NotImplementedError

    def kernel_delta(self, name: str) -> jax.Array:
        """PEFT's ``get_delta_weight`` (``B A``), in the kernel's ``[in, out]`` layout."""
        a, b = self.factors(name)
        return (b @ a).T

    def _update(self, x: jax.Array, name: str, spec) -> jax.Array:
        a, b = self.factors(name)
        h = apply_dropout(x, spec.dropout, f"{self.adapter_path}/{name}").astype(jnp.float32)
        return (h @ a.T) @ b.T

    def __call__(self, x, *args, **kwargs):
        return self._plus_updates(x, args, kwargs, lambda name, spec: self._update(x, name, spec))


def check_adaptable(modules: Mapping[str, nnx.Module], targets: list[str], layer_type: type, method: str) -> None:
    """Fails on targets that are not ``nnx.Linear`` or already carry another method's adapter.

    Raises:
      TypeError: a target already has another method's adapter (one method per layer, as in
        PEFT outside ``PeftMixedModel``) or is a layer type the method cannot adapt (names path
        and class).
      NotImplementedError: a target is a convolution / general linear layer, which HF PEFT's
        method may support but peftjax's does not yet.
    """
    mixed = [n for n in targets if isinstance(modules[n], AdapterLayer) and not isinstance(modules[n], layer_type)]
    if mixed:
        listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in mixed[:10])
        raise TypeError(f"{listed} already carry another method's adapter; one method per layer is supported")
    wanted = [n for n in targets if not isinstance(modules[n], nnx.Linear)]
    later = [n for n in wanted if isinstance(modules[n], nnx.Conv | nnx.LinearGeneral | nnx.Einsum)]
    listed = ", ".join(f"{n} ({type(modules[n]).__name__})" for n in (later or wanted)[:10])
    if later:
        raise NotImplementedError(f"{method} on {listed} is not implemented; supported: nnx.Linear (and subclasses)")
    if wanted:
        raise TypeError(f"{method} cannot adapt {listed}; supported: nnx.Linear (and subclasses such as GPT-2's Conv1D)")


class ModelMixin(abc.ABC):
    """Marks a mixin swapped onto a whole model (not a layer) by a method whose layers need
    something from the model's call (Poly's ``task_ids``); ``unload`` restores the class."""


class CallValue:
    """A value a :class:`ModelMixin`'s call makes current for the layers it runs (Poly's task ids,
    aLoRA's offsets): ``with value.during(x):`` sets it, ``value.get()`` reads it (``None``
    outside such a call). Under ``jit`` the value is a traced array of the same call."""

    def __init__(self, name: str):
        self._var: contextvars.ContextVar = contextvars.ContextVar(name, default=None)

    def get(self):
        return self._var.get()

    @contextlib.contextmanager
    def during(self, value):
        token = self._var.set(value)
        try:
            yield
        finally:
            self._var.reset(token)


_SWAPPED: dict[tuple[type, type], type] = {}


def mixin_subclass(base: type, mixin: type[abc.ABC], prefix: str) -> type:
    """A subclass of ``base`` carrying ``mixin``'s methods, with ``base``'s exact memory layout.

    CPython only allows ``obj.__class__ = cls`` between layout-identical classes, and a mixin
    among the bases changes the layout; so the methods are copied in and the class is
    registered as a virtual subclass of ``mixin`` to keep ``isinstance`` working.
    """
    key = (mixin, base)
    if key not in _SWAPPED:
        ns: dict = {"__slots__": (), "__module__": mixin.__module__, "_peftjax_base": base}
        for klass in reversed(mixin.__mro__):
            if klass in (object, abc.ABC):
                continue
            for k, v in vars(klass).items():
                if not k.startswith(("__", "_abc")) or k == "__call__":
                    ns[k] = v
        cls = type(f"{prefix}{base.__name__}", (base,), ns)
        mixin.register(cls)
        _SWAPPED[key] = cls
    return _SWAPPED[key]


def with_base_signature(cls: type, call: Callable) -> type:
    """``cls`` (from :func:`mixin_subclass`), its ``__call__`` (the mixin's ``call``) showing the
    swapped class's own signature and docs, so that code inspecting ``type(model).__call__`` (the
    Trainer picks the batch keys it passes that way) sees the model's real arguments, not
    ``*args, **kwargs``."""
    if cls.__dict__.get("__call__") is call:
        @functools.wraps(cls._peftjax_base.__call__)
        def __call__(self, *args, **kwargs):
            return call(self, *args, **kwargs)

        cls.__call__ = __call__
    return cls


def original_class(module: nnx.Module) -> type:
    """The layer's class before any peftjax swap."""
    return getattr(type(module), "_peftjax_base", type(module))
