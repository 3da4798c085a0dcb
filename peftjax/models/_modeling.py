"""The base class of the bundled models: HF checkpoint names, loading and saving.

A model's parameter paths mirror the PyTorch module names of transformers
(``model/layers/0/self_attn/q_proj/kernel`` <-> ``model.layers.0.self_attn.q_proj.weight``).
The mapping is derived from the module types, so it needs no per-model tables:
``nnx.Linear`` kernels are stored ``(in, out)`` and transposed to torch's ``(out, in)``;
a module can override the rule with a ``hf_param_map`` class attribute.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import os
import re
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.io import SafetensorsFile, write_safetensors
from peftjax.io._errors import CheckpointError
from peftjax.io._files import write_atomically
from peftjax.models._generation import GENERATION_CONFIG_NAME, GenerationDefaults
from peftjax.nn._scan import MODEL_OPTIONS

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"

# flax attribute -> (torch parameter name, transpose a 2-D array on the way)
_LINEAR = {"kernel": ("weight", True), "bias": ("bias", False)}
_EMBED = {"embedding": ("weight", False)}
_NORM = {"scale": ("weight", False), "bias": ("bias", False)}


class Buffer(nnx.Variable):
    """A checkpoint tensor that is not a parameter (transformers' persistent buffer, such as BART's
    ``final_logits_bias``): read from and written to checkpoints like a weight, never trained, and
    not counted among the parameters, as PEFT does not count it."""


class NewWeightsWarning(UserWarning):
    """Weights the checkpoint lacks were initialised afresh; ``keys`` names them (torch keys)."""

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


class ConfigRef:
    """A model's config (a ``ModelConfig`` or a transformers config), hashed by identity.

    NNX keeps non-array attributes in the graph definition, which keys jit caches and so must
    be hashable; ``PretrainedConfig`` defines ``__eq__`` and is therefore unhashable. Attribute
    reads pass through to the wrapped config.
    """

    __slots__ = ("hf_config",)

    def __init__(self, config):
        object.__setattr__(self, "hf_config", config.hf_config if isinstance(config, ConfigRef) else config)

    def __getattr__(self, name: str):
        return getattr(self.hf_config, name)

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError("a model's config is read-only; build a new model from an edited config")

    def __hash__(self) -> int:
        return id(self.hf_config)

    def __eq__(self, other) -> bool:
        return isinstance(other, ConfigRef) and other.hf_config is self.hf_config

    def __repr__(self) -> str:
        return repr(self.hf_config)


# How a loaded weight reaches the device: ``place(model, variable, numpy value) -> jax.Array``.
# ``peftjax.sharding.load_sharded`` sets it so each weight goes straight onto its shards.
Placement = Callable[[nnx.Module, nnx.Variable, np.ndarray], jax.Array]
_PLACE: contextvars.ContextVar[Placement | None] = contextvars.ContextVar("peftjax_weight_placement", default=None)


@contextlib.contextmanager
def weight_placement(place: Placement):
    """Inside the block, checkpoint loading puts each weight on the device with ``place``.

    ``place(model, variable, value)`` gets the model being filled, the (abstract) variable and
    the checkpoint's array in Flax layout (usually a memory-mapped view), and returns the
    array to store. Without it a weight is copied whole to the default device.
    """
    token = _PLACE.set(place)
    try:
        yield
    finally:
        _PLACE.reset(token)


def hf_param_map(module: nnx.Module) -> Mapping[str, tuple[str, bool]]:
    """The ``{flax attribute: (torch name, transpose)}`` rule for one module."""
    own = getattr(type(module), "hf_param_map", None)
    if own is not None:
        return own
    if isinstance(module, nnx.Linear):
        return _LINEAR
    if isinstance(module, nnx.Embed):
        return _EMBED
    if isinstance(module, (nnx.LayerNorm, nnx.RMSNorm)):
        return _NORM
    return {}


def iter_hf_params(model: nnx.Module) -> Iterator[tuple[str, nnx.Variable, bool]]:
    """Yields ``(torch key, variable, transpose)`` for every base weight of ``model``.

    A weight of stacked layers (``scan_layers=True``) is yielded once per layer, under that
    layer's key, as a :class:`LayerSlice` of the stacked variable. The attributes the model names
    in ``adapter_stores`` (a method's model-level modules, such as Shadow's backbone) are not base
    weights and are skipped.
    """
    from peftjax.nn._graph import iter_modules
    from peftjax.nn._scan import StackedLayers

    skipped = set(getattr(model, "adapter_stores", ()))
    modules = list(iter_modules(model))
    stacks = {p: n.num_layers for p, n in modules if isinstance(n, StackedLayers)}
    for path, node in modules:
        if path and path[0] in skipped:
            continue
        stack = next((s for s in stacks if path[: len(s) + 1] == (*s, "layer")), None)
        for attr, (name, transpose) in hf_param_map(node).items():
            var = getattr(node, attr, None)
            if not isinstance(var, (nnx.Param, Buffer)):
                continue
            if stack is None:
                prefix = ".".join(str(p) for p in path)
                yield (f"{prefix}.{name}" if prefix else name), var, transpose
                continue
            for i in range(stacks[stack]):
                prefix = ".".join(str(p) for p in (*stack, i, *path[len(stack) + 1 :]))
                yield f"{prefix}.{name}", LayerSlice(var, i), transpose


class LayerSlice:
    """Layer ``index`` of a stacked weight: what checkpoint I/O sees in place of a per-layer variable."""

    __slots__ = ("stacked", "index")

    def __init__(self, stacked: nnx.Variable, index: int):
        self.stacked, self.index = stacked, index

    def get_value(self):
        value = self.stacked.get_value()
        if isinstance(value, jax.ShapeDtypeStruct):  # a model built under nnx.eval_shape
            return jax.ShapeDtypeStruct(value.shape[1:], value.dtype)
        return value[self.index]

    def set_value(self, value) -> None:
        self.stacked.set_value(self.stacked.get_value().at[self.index].set(value))


def _to_torch_layout(value: np.ndarray, transpose: bool) -> np.ndarray:
    return value.T if transpose and value.ndim == 2 else value


def hf_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's weights as a transformers state dict (NumPy, torch layouts)."""
    return {k: _to_torch_layout(np.asarray(v.get_value()), t) for k, v, t in iter_hf_params(model)}


class _ShapeOnlyStream(nnx.RngStream):
    """An RNG stream that hands out its key unchanged, for building a model under ``nnx.eval_shape``.

    A plain stream counts its calls in a variable; under a trace each count is a tracer, and flax's
    update of it asks the tracer for its sharding, which JAX answers with an error message that
    walks the whole program traced so far: one walk per parameter, so the abstract build grew
    quadratically with the model (half of MiniLM's, more for deeper models). Only shapes come out
    of that build, so the keys' values do not matter.
    """

    def __call__(self) -> jax.Array:
        return self.key[...]


def _shape_only_rngs() -> nnx.Rngs:
    """``nnx.Rngs`` whose every stream is a :class:`_ShapeOnlyStream` (call it inside the trace)."""
    rngs = nnx.Rngs(0)
    rngs.default = _ShapeOnlyStream(0, tag="default")
    return rngs


def resolve_dtype(dtype: Any) -> jnp.dtype:
    """Accepts ``jnp.float32``, ``"bfloat16"``, ``"float16"`` and the like."""
    try:
        return jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"dtype {dtype!r} is not a dtype; use e.g. jnp.float32 or 'bfloat16'") from None


def read_checkpoint(path: str | os.PathLike) -> SafetensorsFile:
    """Opens ``model.safetensors`` or a sharded ``model.safetensors.index.json`` in ``path``.

    The headers are read and checked now; each tensor is read from disk when it is looked up,
    so a loader that places one weight at a time holds one on the host.
    """
    path = Path(path)
    single, index = path / SAFE_WEIGHTS_NAME, path / SAFE_WEIGHTS_INDEX_NAME
    if single.is_file():
        return SafetensorsFile(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        tensors = SafetensorsFile(*(path / shard for shard in sorted(set(weight_map.values()))))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise CheckpointError(f"{index}: keys listed but absent from their shards: {missing[:10]}")
        return tensors
    found = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    hint = ""
    if any(n.endswith(".bin") for n in found):
        hint = " (pickled PyTorch .bin weights are not read: convert them to safetensors)"
    raise FileNotFoundError(
        f"no weights in {path}: expected {SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}{hint}; found {found}"
    )


class _Without(Mapping):
    """``tensors`` without the keys in ``dropped`` (a view: nothing is read)."""

    def __init__(self, tensors: Mapping, dropped: set[str]):
        self.tensors, self.dropped = tensors, dropped

    def __getitem__(self, key: str):
        if key in self.dropped:
            raise KeyError(key)
        return self.tensors[key]

    def __iter__(self):
        return (k for k in self.tensors if k not in self.dropped)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key) -> bool:
        return key not in self.dropped and key in self.tensors


class PreTrainedModel(nnx.Module):
    """Base of the bundled models: construction from an HF config, loading and saving.

    Subclasses set:
      base_model_prefix: the attribute holding the backbone (``"model"``, ``"bert"``, ...);
        checkpoints of the bare backbone load into a model with a head and vice versa.
      optional_keys: regexes of torch keys that may be absent from a checkpoint (task heads);
        they are initialised as transformers would and a warning lists them.
      ignored_keys: regexes of checkpoint keys that are not weights (buffers) and are skipped.
    """

    base_model_prefix: ClassVar[str] = ""
    optional_keys: ClassVar[tuple[str, ...]] = ()
    ignored_keys: ClassVar[tuple[str, ...]] = ()
    # keys transformers starts at zeros, unreported, when a checkpoint lacks them (buffers such as
    # BART's final_logits_bias): not new weights to train, nor saved with an adapter
    zeroed_keys: ClassVar[tuple[str, ...]] = ()
    # keys whose value the model computes, unreported, when a checkpoint lacks them (Marian's
    # sinusoidal position tables, which transformers never saves): ``computed_value`` gives it
    computed_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        del rngs
        self.config = ConfigRef(config)
        # the checkpoint's generation_config.json (GenerationDefaults), set by from_pretrained
        self.generation_config = None
        self.dtype = resolve_dtype(dtype)
        self.param_dtype = resolve_dtype(param_dtype)

    # ---------------------------------------------------------------- loading

    def definition_order(self) -> tuple[str, ...]:
        """Every sub-module's dotted path in the order the constructor assigns them (parents first),
        transformers' order: found by building the model's class again under ``jax.eval_shape`` (no
        weights made), since a model rebuilt by ``nnx.merge`` keeps its attributes sorted by name."""
        from peftjax.nn._order import modules_in_assignment_order

        order: list[str] = []

        def build():
            order.extend(modules_in_assignment_order(type(self)(self.config, dtype=self.dtype,
                                                                param_dtype=self.dtype, rngs=_shape_only_rngs())))
            return 0

        jax.eval_shape(build)
        return tuple(order)

    @classmethod
    def from_config(cls, config, *, dtype=jnp.float32, param_dtype=None, seed: int = 0):
        """A randomly initialised model (for tests and training from scratch)."""
        return cls(config, dtype=dtype, param_dtype=param_dtype or dtype, rngs=nnx.Rngs(seed))

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype=None,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
        config_attributes: Mapping | None = None,
        quantization_config=None,
        seed: int | None = None,
        **kwargs,
    ):
        """Loads an HF checkpoint (a directory or a Hub repo id) into this class.

        Args:
          path: a directory with ``config.json`` and ``model.safetensors`` (or a sharded index), or
            a Hub repo id such as ``"org/name"``.
          dtype: parameter and compute dtype; ``None`` means float32.
          revision, subfolder, token, cache_dir: where on the Hub (or in the directory) the
            checkpoint is, as in transformers (see ``peftjax.models.from_pretrained``).
          config_attributes: attributes set on the loaded config that are not transformers config
            fields (a subclass's construction options, e.g. BERT's ``add_pooling_layer``).
          quantization_config: store the linears quantized (see :meth:`from_state_dict`); a checkpoint
            whose ``config.json`` has a ``quantization_config`` (saved quantized by transformers or
            here) is loaded quantized without it.
          seed: draws the weights the checkpoint lacks (see :meth:`load_hf_state_dict`).
          **kwargs: overrides applied to the config (e.g. ``num_labels=3``).
        """
        from peftjax.io._hub import is_repo_id, resolve
        from peftjax.models._auto import load_config

        local = resolve(path, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)
        config = load_config(local, **kwargs)
        if is_repo_id(path):  # the repo id, not the snapshot path, as transformers records it
            config._name_or_path = os.fspath(path)
        for name, value in (config_attributes or {}).items():
            setattr(config, name, value)
        generation_config = GenerationDefaults.read(local)  # a bad file refused before the weights are read
        model = cls.from_state_dict(config, read_checkpoint(local), dtype=dtype, source=str(local),
                                    quantization_config=quantization_config, seed=seed)
        model.generation_config = generation_config
        return model

    @classmethod
    def from_state_dict(cls, config, state_dict: Mapping[str, np.ndarray], *, dtype=None, source: str = "state dict",
                        quantization_config=None, seed: int | None = None):
        """Builds the model and fills it from a transformers state dict, without a random init.

        Args:
          quantization_config: a ``peftjax.QuantizationConfig``, its dict or transformers'
            ``BitsAndBytesConfig``; default: the config's own ``quantization_config`` (what
            transformers writes for a model saved quantized), else none. The linears it quantizes
            are built from the checkpoint's bitsandbytes tensors where it holds them quantized,
            and quantized from the float weights otherwise.
          seed: draws the weights the checkpoint lacks (see :meth:`load_hf_state_dict`).

        Raises:
          CheckpointError: a missing or mis-shaped weight; a quantized layer whose quant state lacks
            a tensor or is stored in another format (``QuantStateError``, naming module and key).
        """
        dtype = resolve_dtype(dtype or jnp.float32)
        model = nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=dtype, rngs=_shape_only_rngs()))
        if quantization_config is None:
            quantization_config = getattr(config, "quantization_config", None)
        if quantization_config is None:
            model.load_hf_state_dict(state_dict, source=source, seed=seed)
            return model
        from peftjax.quantization import QuantizationConfig
        from peftjax.quantization._model import load_quantized_linears, quantize_model

        quantization_config = QuantizationConfig.from_any(quantization_config)
        expected = {k for k, _, _ in iter_hf_params(model)}
        to_checkpoint = {v: k for k, v in model._align_prefix(set(state_dict), expected).items()}

        def checkpoint_prefix(name: str) -> str | None:
            key = to_checkpoint.get(f"{name}.weight")
            return None if key is None else key[: -len(".weight")]

        from peftjax.nn._scan import has_stacked_layers, unstacked

        # stacked layers (scan_layers=True) are filled one layer at a time too, then stacked: the
        # quantized arrays get the layer axis like every other weight
        with unstacked(model, write=True) if has_stacked_layers(model) else contextlib.nullcontext():
            consumed = load_quantized_linears(model, state_dict, quantization_config,
                                              checkpoint_prefix=checkpoint_prefix, source=source)
            model.load_hf_state_dict(_Without(state_dict, consumed), source=source, seed=seed)
            # the linears the checkpoint held in float; those it lacks (a new head: a pooler) stay in float,
            # since the adapter trains them and saves them with it (add_new_head_modules), as the classifier
            new = tuple(dict.fromkeys(k.rsplit(".", 1)[0] for k in model.newly_initialised))
            quantize_model(model, quantization_config, keep_float=new)
        return model

    def _align_prefix(self, keys: set[str], expected: set[str]) -> dict[str, str]:
        """Maps checkpoint keys to model keys, adding or stripping ``base_model_prefix``."""
        p = self.base_model_prefix
        if not p:
            return {k: k for k in keys}
        model_has = any(k.startswith(p + ".") for k in expected)
        ckpt_has = any(k.startswith(p + ".") for k in keys)
        if model_has and not ckpt_has:
            return {k: f"{p}.{k}" for k in keys}
        if ckpt_has and not model_has:
            return {k: k[len(p) + 1 :] if k.startswith(p + ".") else k for k in keys}
        return {k: k for k in keys}

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        """Sets every base weight from a transformers state dict (torch layouts).

        A weight the state dict lacks that the model may initialise (a task head such as a new
        classifier, ``optional_keys``) is drawn as transformers' ``_init_weights`` draws it:
        normal(0, ``initializer_range``) for weights, zeros for biases. ``seed=None`` draws it
        from the weight's name alone (the same head every time); an integer ``seed`` draws it
        from the seed and the name, as transformers' ``set_seed(seed)`` before loading makes
        its head follow the seed.

        Raises:
          CheckpointError: a required key is missing or a shape differs (names key and shapes).
        """
        params = {k: (v, t) for k, v, t in iter_hf_params(self)}
        rename = self._align_prefix(set(state_dict), set(params))
        by_model_key = {rename[k]: k for k in state_dict}
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed={seed!r}: expected a non-negative integer or None")
        missing, bad, initialised = [], [], []
        stacked: dict[int, tuple[nnx.Variable, np.ndarray, set[int]]] = {}
        for key, (var, transpose) in params.items():
            if key not in by_model_key:
                if self._tied(key):
                    continue
                if any(re.fullmatch(p, key) for p in self.zeroed_keys):
                    var.set_value(jnp.zeros(var.get_value().shape, var.get_value().dtype))
                    continue
                if any(re.fullmatch(p, key) for p in self.computed_keys):
                    shape, dtype = var.get_value().shape, var.get_value().dtype
                    var.set_value(jnp.asarray(self.computed_value(key, tuple(shape)), dtype))
                    continue
                if any(re.fullmatch(p, key) for p in self.optional_keys):
                    var.set_value(self._init_missing(key, var, seed))
                    initialised.append(key)
                    continue
                missing.append(key)
                continue
            value = np.asarray(state_dict[by_model_key[key]])
            expected = tuple(var.get_value().shape)
            value = _to_torch_layout(value, transpose)  # the transpose of a transpose: flax layout
            if tuple(value.shape) != expected:
                shown = tuple(reversed(expected)) if transpose and len(expected) == 2 else expected
                found = tuple(reversed(value.shape)) if transpose and value.ndim == 2 else tuple(value.shape)
                bad.append(f"{by_model_key[key]}: expected shape {shown}, found {found}")
                continue
            if not np.issubdtype(value.dtype, np.floating) and value.dtype.name != "bfloat16":
                bad.append(f"{by_model_key[key]}: expected a float tensor, found dtype {value.dtype}")
                continue
            if isinstance(var, LayerSlice):  # stacked layers: placed whole once every layer is read
                if id(var.stacked) not in stacked:
                    whole = var.stacked.get_value()
                    stacked[id(var.stacked)] = (var.stacked, np.empty(whole.shape, whole.dtype), set())
                _, host, filled = stacked[id(var.stacked)]
                host[var.index] = value
                filled.add(var.index)
                continue
            place = _PLACE.get()
            var.set_value(place(self, var, value) if place else jnp.asarray(value, dtype=var.get_value().dtype))
            del value  # one checkpoint tensor on the host at a time
        for var, host, filled in stacked.values():
            if len(filled) == host.shape[0]:
                place = _PLACE.get()
                var.set_value(place(self, var, host) if place else jnp.asarray(host))
        if missing or bad:
            lines = [f"cannot load {source} into {type(self).__name__}:"]
            if missing:
                lines.append(f"  missing keys ({len(missing)}): {missing[:20]}")
            lines += [f"  {b}" for b in bad[:20]]
            raise CheckpointError("\n".join(lines))
        unexpected = [
            k
            for k in state_dict
            if rename[k] not in params
            and not any(re.fullmatch(p, k) for p in self.ignored_keys)
            and not self._tied(rename[k])
        ]
        if unexpected:
            warnings.warn(f"{source}: ignored {len(unexpected)} unexpected keys: {sorted(unexpected)[:10]}", stacklevel=3)
        # the task head's new parts: get_peft_model saves them with the adapter (see add_new_head_modules)
        self.newly_initialised = tuple(initialised)
        if initialised:
            warnings.warn(NewWeightsWarning(
                f"{type(self).__name__}: {initialised} not in {source}; newly initialised (train them)",
                keys=tuple(initialised)), stacklevel=3)

    def _tied(self, key: str) -> bool:
        """Whether ``key`` is an output embedding tied to the input embedding."""
        return False

    def computed_value(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The value of ``key`` (one of ``computed_keys``) where a checkpoint lacks it."""
        raise NotImplementedError(f"{type(self).__name__} computes no value for {key}")

    def _init_missing(self, key: str, var: nnx.Variable, seed: int | None = None) -> jax.Array:
        # transformers' _init_weights: normal(0, initializer_range) (OPT's: init_std) for weights, zeros for biases
        # drawn on the host and put on the device: no XLA program compiles for it (jax.random
        # compiled one per shape, 0.3 s for a new classifier head before the first step)
        shape, dtype = var.get_value().shape, var.get_value().dtype
        if key.endswith(".bias") or len(shape) == 1:
            return jax.device_put(np.zeros(shape, dtype))
        std = getattr(self.config, "initializer_range", None) or getattr(self.config, "init_std", 0.02)
        entropy = sum(key.encode()) if seed is None else [seed, zlib.crc32(key.encode())]
        draws = np.random.default_rng(entropy).standard_normal(shape, dtype=np.float32)
        return jax.device_put((np.float32(std) * draws).astype(dtype))

    # ---------------------------------------------------------------- saving

    def resize_token_embeddings(self, new_num_tokens: int, *, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True, seed: int = 0) -> int:
        """Resizes the vocabulary to ``new_num_tokens`` (``len(tokenizer)`` after adding tokens), in
        place, as transformers' method does: the input embedding, an untied head, a masked LM's
        decoder bias and ``config.vocab_size``; returns the new size. See
        :func:`peftjax.models.resize_token_embeddings`."""
        from peftjax.models._resize import resize_token_embeddings

        return resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of=pad_to_multiple_of,
                                       mean_resizing=mean_resizing, seed=seed)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Writes ``config.json`` and ``model.safetensors`` that ``transformers`` loads, and the
        ``generation_config.json`` the model was loaded with, where it had one.

        Quantized linears are written in bitsandbytes' layout (the tensors transformers writes for a
        model loaded with ``BitsAndBytesConfig``, see ``peftjax.quantization._checkpoint``) and
        ``config.json`` carries the matching ``quantization_config``; transformers and
        ``models.from_pretrained`` load the file quantized, as it is.

        Each file is written to a temporary name and renamed, so a failed save leaves any
        checkpoint already in ``path`` intact.

        Raises:
          ValueError: the quantized linears mix formats that one ``BitsAndBytesConfig`` cannot describe.
        """
        from peftjax.quantization._model import quantized_state_dict, saved_quantization_config

        quantization_config = saved_quantization_config(self)  # before anything is written
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf = self.config.hf_config  # a ModelConfig, or the transformers config the model was built from
        config = type(hf).from_dict(hf.to_dict())
        config.architectures = [type(self).__name__]
        for option in MODEL_OPTIONS:  # peftjax's model options (scan_layers, ...) are not transformers'
            config.__dict__.pop(option, None)
        config.__dict__.pop("quantization_config", None)  # a dequantized model's file is a float checkpoint
        if quantization_config is not None:
            config.quantization_config = quantization_config
        state = self.checkpoint_layout({**hf_state_dict(self), **quantized_state_dict(self)})
        write_atomically(path / SAFE_WEIGHTS_NAME, lambda f: write_safetensors(f, state, {"format": "pt"}))
        write_atomically(path / CONFIG_NAME, lambda f: Path(f).write_text(config.to_json_string()))
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            write_atomically(path / GENERATION_CONFIG_NAME, generation_config.write_file)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """The state dict as ``save_pretrained`` writes it (a family whose files use other keys
        than its modules, such as Mixtral's per-expert weights, overrides this)."""
        return state

    # ---------------------------------------------------------------- helpers

    def num_parameters(self) -> int:
        """The number of base weights (elements)."""
        return sum(int(np.prod(v.get_value().shape)) for _, v, _ in iter_hf_params(self))
