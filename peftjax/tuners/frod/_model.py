"""Putting FRoD into an NNX model: each kind's joint basis and sparse positions, the layers' own
parts, PEFT's file layout (the kinds' tensors saved once, at model level)."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.config import FrodConfig
from peftjax.io._adapter import AdapterFileError, KeyMapping
from peftjax.tuners.base import (
    adapter_layers,
    adding_from_file,
    inject_each_layer,
    layer_state_dict,
    load_layer_state_dict,
    modules_in_definition_order,
)
from peftjax.tuners.frod._layer import FrodLayer, FrodShared, FrodSpec, frod_class_for

# the kinds' tensors: ``base_model.frod_V.<kind>`` and so on (PEFT appends the adapter in memory)
KIND_KEYS = ("base_model.frod_V", "base_model.frod_s_indices", "base_model.frod_s_size")


def frod_kind(path: str) -> str:
    """PEFT's category of a module path: its last part after a layer number, else its last two
    joined (``layers.0.self_attn.q_proj`` -> ``self_attn_q_proj``); BERT's attention output dense
    is ``attention_output``, apart from the MLP's ``output_dense``."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    kind = f"{parts[-2]}_{parts[-1]}"
    if kind == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return kind


def frod_layer_index(path: str, fallback: int) -> int:
    """PEFT's block number of a module path: the number after ``layers``, else the first number
    in it, else ``fallback``."""
    parts = path.split(".")
    if "layers" in parts:
        after = parts.index("layers") + 1
        if after < len(parts) and parts[after].isdigit():
            return int(parts[after])
    return next((int(p) for p in parts if p.isdigit()), fallback)


def joint_basis(weights: list[np.ndarray], regularization_alpha: float) -> np.ndarray:
    """PEFT's ``V [in, in]`` of one kind from its layers' ``[out, in]`` weights (float32, block
    order): the stacked weights' right singular vectors where they have fewer rows than columns;
    else ``R^T E`` from their QR ``Q R``, ``E`` the eigenvectors of the mean over layers of
    ``(Q_l^T Q_l + alpha I)^-1``. Computed on the host CPU (the eigenvectors' signs are LAPACK's)."""
    with jax.default_device(jax.devices("cpu")[0]):
        stacked = jnp.asarray(np.concatenate(weights, axis=0), jnp.float32)
        if stacked.shape[0] < stacked.shape[1]:
            return np.asarray(jnp.linalg.svd(stacked, full_matrices=True)[2].T)
        q, r = jnp.linalg.qr(stacked)
        dim = r.shape[1]
        ridge = regularization_alpha * jnp.eye(dim, dtype=jnp.float32)
        t, start = jnp.zeros((dim, dim), jnp.float32), 0
        for w in weights:
            block = q[start:start + w.shape[0]]
            t, start = t + jnp.linalg.inv(block.T @ block + ridge), start + w.shape[0]
        vectors = jnp.linalg.eigh(t / len(weights))[1]
        return np.asarray(r.T @ vectors)


def sparse_positions(n: int, sparse_rate: float, rng: np.random.Generator | None) -> np.ndarray:
    """``[2, nnz]`` (row, column) of ``S [n, n]``: ``sparse_rate`` of the off-diagonal positions
    (at least one where the rate is positive), drawn by ``rng`` in a random order; ``None``: zeros
    of that shape (a file gives them)."""
    off = n * n - n
    nnz = min(int(n * n * sparse_rate), off)
    if sparse_rate > 0 and off > 0:
        nnz = max(1, nnz)
    if rng is None:
        return np.zeros((2, nnz), np.int32)
    k = rng.choice(off, size=nnz, replace=False)
    rows, rest = k // (n - 1), k % (n - 1)
    return np.stack([rows, rest + (rest >= rows)]).astype(np.int32)  # the diagonal skipped in each row


def inject_frod(
    model, config: FrodConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> FrodConfig:
    """Adds FRoD adapter ``adapter_name`` to every layer ``config`` targets, in place.

    The targets are grouped by kind (PEFT's category, :func:`frod_kind`), each kind's layers
    ordered by block number (:func:`frod_layer_index`, in the model's module order); each kind
    gets one basis from its layers' weights (:func:`joint_basis`) and one set of sparse positions
    (seeded by ``projection_prng_key``), which its layers share. Adding an adapter that a file then
    fills (``PeftModel.from_pretrained``, ``load_adapter``) skips the decomposition: the file
    carries the bases.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (GPT-2's ``Conv1D`` too).
      config: the FRoD settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the tensors are stored under.
      key: draws the start for ``init_weights=False``.

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; layers of one kind differ in input width; the
        adapter already exists.
      TypeError: a target is not a supported layer (embeddings: not implemented).
      NotImplementedError: the model stacks its layers (``scan_layers=True``: a kind's basis is
        shared across layers).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_frod(model, peftjax.FrodConfig(target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.frod_lambda_l["default"].shape  # doctest: +SKIP
    (32,)
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "FRoD on a model built with scan_layers=True is not implemented (each kind's basis is shared across "
            "layers, not stacked per layer); load the model with scan_layers=False")
    key = jax.random.key(0) if key is None else key
    from_file = adding_from_file()
    prepared: dict[str, tuple[str, np.ndarray]] = {}
    shared: dict[str, tuple[FrodShared, FrodShared]] = {}

    def prepare(config, name, module):
        prepared[name] = frod_kind(name), np.asarray(module.kernel.get_value(), np.float32).T
        return name

    def build_kinds() -> None:  # every target is prepared by now
        blocks: dict[int, dict[str, np.ndarray]] = {}
        order = [n for n in modules_in_definition_order(model) if n in prepared]
        for fallback, name in enumerate(order):
            kind, weight = prepared[name]
            blocks.setdefault(frod_layer_index(name, fallback), {})[kind] = weight
        rng = np.random.default_rng(config.projection_prng_key)
        for kind in sorted({kind for kind, _ in prepared.values()}):
            weights = [block[kind] for _, block in sorted(blocks.items()) if kind in block]
            widths = {w.shape[1] for w in weights}
            if len(widths) > 1:
                raise ValueError(f"FRoD shares one basis among the layers of kind {kind!r}, whose input widths "
                                 f"differ ({sorted(widths)}); target them in separate adapters")
            n = widths.pop()
            if from_file:  # the file's bases and positions replace these
                basis, positions = np.eye(n, dtype=np.float32), sparse_positions(n, config.sparse_rate, None)
            else:
                basis = joint_basis(weights, config.regularization_alpha)
                positions = sparse_positions(n, config.sparse_rate, rng)
            shared[kind] = FrodShared(jnp.asarray(basis)), FrodShared(jnp.asarray(positions))

    def add(module, name, layer_key):
        if not shared:
            build_kinds()
        kind = prepared[name][0]
        basis, positions = shared[kind]
        module.add_frod(adapter_name, FrodSpec(kind=kind, dropout=float(config.frod_dropout)), basis, positions)
        if not config.init_weights:  # PEFT's test start: S drawn, lambda moved
            k1, k2 = jax.random.split(layer_key)
            lambda_l, s_values = module.frod_lambda_l[adapter_name], module.frod_lambda_s_values[adapter_name]
            lambda_l.set_value(lambda_l.get_value() + 0.1 * jax.random.normal(k1, lambda_l.get_value().shape))
            s_values.set_value(0.1 * jax.random.normal(k2, s_values.get_value().shape))

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=FrodLayer,
                             method="FRoD", class_for=frod_class_for, prepare=prepare, add=add, conv1d=True)


def _kinds(model, adapter_name: str) -> dict[str, FrodLayer]:
    """One layer of each kind the adapter has (its shared tensors are the kind's)."""
    kinds: dict[str, FrodLayer] = {}
    for layer in adapter_layers(model, FrodLayer, adapter_name).values():
        kinds.setdefault(layer.spec(adapter_name).kind, layer)
    return kinds


def frod_state_dict(model, adapter_name: str, config: FrodConfig, *, key_mapping: KeyMapping = None,
                    save_embedding_layers: bool | str = "auto") -> dict[str, np.ndarray]:
    """PEFT's on-disk dict: every layer's ``lambda`` and sparse values, each kind's basis,
    positions (int64) and ``S``'s size once."""
    out = layer_state_dict(model, adapter_name, config, layer_type=FrodLayer, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    for kind, layer in _kinds(model, adapter_name).items():
        v = np.asarray(layer.frod_V[adapter_name].get_value(), np.float32)
        out[f"{KIND_KEYS[0]}.{kind}"] = v
        out[f"{KIND_KEYS[1]}.{kind}"] = np.asarray(layer.frod_s_indices[adapter_name].get_value(), np.int64)
        out[f"{KIND_KEYS[2]}.{kind}"] = np.asarray(v.shape, np.int64)
    return out


def load_frod_state_dict(model, tensors: Mapping[str, np.ndarray], adapter_name: str, *,
                         key_mapping: KeyMapping = None, source: str = "adapter") -> tuple[list[str], list[str]]:
    """Fills an injected FRoD adapter from PEFT's keys: each kind's basis and positions, then every
    layer's ``U`` computed again from its weight and the file's basis (PEFT 0.22.0 keeps the ``U``
    of the basis it computed itself, which equals the file's only where its decomposition gave the
    same eigenvector signs), then the layers' trained tensors.

    Raises:
      AdapterFileError: a kind's tensor is missing (PEFT's ``save_projection`` message), has the
        wrong shape or kind (names the key, expected and found), or a position lies outside ``S``.
    """
    tensors = dict(tensors)
    kinds = _kinds(model, adapter_name)
    for kind, layer in kinds.items():
        keys = [f"{k}.{kind}" for k in KIND_KEYS]
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise AdapterFileError(
                f"{source}: Specified to load FRoD projection tensors from state dictionary however they were not "
                f"present ({missing}); FRoD files without them (save_projection=False) are not supported")
        basis, positions = layer.frod_V[adapter_name], layer.frod_s_indices[adapter_name]
        n, nnz = basis.get_value().shape[0], positions.get_value().shape[1]
        v, p, size = (np.asarray(tensors.pop(k)) for k in keys)
        for k, found, expected in zip(keys, (v, p, size), ((n, n), (2, nnz), (2,))):
            if found.shape != expected:
                raise AdapterFileError(f"{source}: {k}: expected shape {list(expected)} (kind {kind!r}: {n} inputs, "
                                       f"{nnz} sparse entries), found {list(found.shape)}")
        if not np.issubdtype(p.dtype, np.integer) or size.tolist() != [n, n] or p.min(initial=0) < 0 \
                or p.max(initial=0) >= n:
            raise AdapterFileError(f"{source}: {keys[1]} / {keys[2]}: expected integer positions inside a [{n}, {n}] "
                                   f"S, found size {size.tolist()} and positions in [{p.min(initial=0)}, "
                                   f"{p.max(initial=0)}] ({p.dtype})")
        basis.set_value(jnp.asarray(v, jnp.float32))
        positions.set_value(jnp.asarray(p, jnp.int32))
    for layer in adapter_layers(model, FrodLayer, adapter_name).values():
        layer.rebase(adapter_name)
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=FrodLayer, key_mapping=key_mapping,
                                 source=source)
