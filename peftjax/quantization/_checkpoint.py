"""bitsandbytes' checkpoint layout: the tensors transformers writes for a quantized linear, read and written.

A 4-bit linear ``{prefix}`` (``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``):

- ``{prefix}.weight``: ``uint8 [(n + 1) // 2, 1]``, two codes per byte;
- ``{prefix}.weight.absmax``: ``float32 [blocks]``, or ``uint8`` with double quantization;
- ``{prefix}.weight.quant_map``: ``float32 [16]``, the NF4/FP4 code;
- with double quantization, ``{prefix}.weight.nested_absmax`` (``float32``) and
  ``{prefix}.weight.nested_quant_map`` (``float32 [256]``);
- ``{prefix}.weight.quant_state.bitsandbytes__{nf4|fp4}``: ``uint8``, the UTF-8 JSON of
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and the ``nested_*`` scalars.

An int8 linear (``Linear8bitLt``): ``{prefix}.weight`` ``int8 [out, in]``, ``{prefix}.SCB``
``float32 [out]`` and ``{prefix}.weight_format`` ``uint8`` scalar (0: row-major, the only format).
A bias stays ``{prefix}.bias`` in floating point.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

from peftjax.io._errors import CheckpointError
from peftjax.quantization import _bnb

QUANT_STATE = "weight.quant_state.bitsandbytes__"
FOUR_BIT_KEYS = ("weight", "weight.absmax", "weight.quant_map")
NESTED_KEYS = ("weight.nested_absmax", "weight.nested_quant_map")
INT8_KEYS = ("weight", "SCB")
_STATE_FIELDS = ("quant_type", "blocksize", "dtype", "shape")
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")


class QuantStateError(CheckpointError):
    """A pre-quantized checkpoint's tensors for one linear are missing or do not fit it."""


def stored_format(tensors: Mapping[str, np.ndarray], prefix: str) -> str | None:
    """``"4bit"``, ``"int8"`` or ``None`` (a float weight, or none) for the linear ``prefix`` of a checkpoint."""
    key = f"{prefix}.weight"
    if key not in tensors:
        return None
    dtype = _dtype(tensors, key)
    if dtype == np.uint8:
        return "4bit"
    if dtype == np.int8:
        return "int8"
    return None


def _dtype(tensors, key):
    dtype_of = getattr(tensors, "dtype", None)  # SafetensorsFile answers from its header, without reading
    return np.dtype(dtype_of(key)) if dtype_of is not None else np.asarray(tensors[key]).dtype


def read_4bit(tensors: Mapping[str, np.ndarray], prefix: str, *, shape: tuple[int, int],
              source: str = "checkpoint") -> tuple[_bnb.Quant4, str]:
    """The :class:`~peftjax.quantization._bnb.Quant4` of linear ``prefix`` and its ``dtype`` field.

    Args:
      tensors: the checkpoint (torch keys).
      prefix: the linear's torch name, e.g. ``"model.layers.0.self_attn.q_proj"``.
      shape: the torch ``[out, in]`` shape the model expects.
      source: names the checkpoint in errors.

    Raises:
      QuantStateError: a missing tensor (named), no or several ``quant_state`` entries, a shape,
        dtype, block size or code table that does not fit; each names the module.
    """
    where = f"{source}: {prefix} (a 4-bit bitsandbytes linear)"
    states = sorted(k for k in _keys_under(tensors, prefix) if k.startswith(f"{prefix}.{QUANT_STATE}"))
    if len(states) != 1:
        raise QuantStateError(f"{where}: expected one '{prefix}.{QUANT_STATE}nf4' or '...fp4' tensor; "
                              f"found {states or 'none'}")
    quant_type = states[0].rsplit("__", 1)[1]
    if quant_type not in _bnb.QUANT_TYPES:
        raise QuantStateError(f"{where}: quant type {quant_type!r} in {states[0]!r} is not supported")
    try:
        fields = json.loads(bytes(np.asarray(tensors[states[0]], np.uint8)).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuantStateError(f"{where}: {states[0]!r} is not bitsandbytes' packed JSON ({e})") from None
    nested = "nested_offset" in fields
    required = FOUR_BIT_KEYS + (NESTED_KEYS if nested else ())
    missing = [f"{prefix}.{k}" for k in required if f"{prefix}.{k}" not in tensors]
    missing += [f"{states[0]} field {f!r}" for f in _STATE_FIELDS + (_NESTED_FIELDS if nested else ())
                if f not in fields]
    if missing:
        raise QuantStateError(f"{where}: its quant state lacks {missing}")
    if fields["quant_type"] != quant_type:
        raise QuantStateError(f"{where}: {states[0]!r} says quant_type {fields['quant_type']!r}")
    if tuple(fields["shape"]) != tuple(shape):
        raise QuantStateError(f"{where}: stored shape {tuple(fields['shape'])}, the model expects {tuple(shape)}")
    blocksize = int(fields["blocksize"])
    if blocksize not in _bnb.BLOCKSIZES:
        raise QuantStateError(f"{where}: blocksize {blocksize} is not one of bitsandbytes' {list(_bnb.BLOCKSIZES)}")
    n = int(np.prod(shape))
    blocks = -(-n // blocksize)
    get = {k: np.asarray(tensors[f"{prefix}.{k}"]) for k in required}
    expect = {"weight": (np.uint8, ((n + 1) // 2, 1)),
              "weight.absmax": (np.uint8 if nested else np.float32, (blocks,)),
              "weight.quant_map": (np.float32, (16,))}
    if nested:
        if int(fields["nested_blocksize"]) != _bnb.NESTED_BLOCKSIZE:
            raise QuantStateError(f"{where}: nested_blocksize {fields['nested_blocksize']} is not "
                                  f"{_bnb.NESTED_BLOCKSIZE}, the only one bitsandbytes writes")
        expect["weight.nested_absmax"] = (np.float32, (-(-blocks // _bnb.NESTED_BLOCKSIZE),))
        expect["weight.nested_quant_map"] = (np.float32, (256,))
    bad = [f"{prefix}.{k}: expected {np.dtype(d).name} {s}, found {get[k].dtype.name} {tuple(get[k].shape)}"
           for k, (d, s) in expect.items() if get[k].dtype != d or tuple(get[k].shape) != s]
    if bad:
        raise QuantStateError(f"{where}: " + "; ".join(bad))
    if not np.array_equal(get["weight.quant_map"], _bnb.code_for(quant_type)):
        raise QuantStateError(f"{where}: {prefix}.weight.quant_map is not bitsandbytes' {quant_type} code; "
                              "a custom code table is not supported")
    quant = _bnb.Quant4(
        get["weight"], get["weight.absmax"], tuple(shape), quant_type, blocksize,
        get["weight.nested_absmax"] if nested else None, get["weight.nested_quant_map"] if nested else None,
        np.float32(fields["nested_offset"]) if nested else None,
    )
    return quant, str(fields["dtype"])


def read_int8(tensors: Mapping[str, np.ndarray], prefix: str, *, shape: tuple[int, int],
              source: str = "checkpoint") -> tuple[np.ndarray, np.ndarray]:
    """``(CB int8 [out, in], SCB float32 [out])`` of the int8 linear ``prefix``.

    Raises:
      QuantStateError: ``SCB`` missing, a shape or dtype that does not fit, or a ``weight_format``
        other than 0 (row-major); each names the module.
    """
    where = f"{source}: {prefix} (an int8 bitsandbytes linear)"
    missing = [f"{prefix}.{k}" for k in INT8_KEYS if f"{prefix}.{k}" not in tensors]
    if missing:
        raise QuantStateError(f"{where}: its quant state lacks {missing}")
    cb, scb = np.asarray(tensors[f"{prefix}.weight"]), np.asarray(tensors[f"{prefix}.SCB"])
    if tuple(cb.shape) != tuple(shape):
        raise QuantStateError(f"{where}: stored shape {tuple(cb.shape)}, the model expects {tuple(shape)}")
    if scb.dtype != np.float32 or tuple(scb.shape) != (shape[0],):
        raise QuantStateError(f"{where}: {prefix}.SCB: expected float32 ({shape[0]},), "
                              f"found {scb.dtype.name} {tuple(scb.shape)}")
    fmt_key = f"{prefix}.weight_format"
    if fmt_key in tensors and int(np.asarray(tensors[fmt_key])) != 0:
        raise QuantStateError(f"{where}: {fmt_key} is {int(np.asarray(tensors[fmt_key]))}; only 0 (row) is supported")
    return cb, scb


def _keys_under(tensors, prefix: str):
    start = prefix + "."
    return [k for k in tensors if k.startswith(start)]


def quantized_keys(tensors: Mapping[str, np.ndarray], prefix: str) -> list[str]:
    """Every checkpoint key that belongs to the quantized storage of linear ``prefix`` (not its bias)."""
    own = {f"{prefix}.{k}" for k in FOUR_BIT_KEYS + NESTED_KEYS + INT8_KEYS + ("weight_format",)}
    return [k for k in _keys_under(tensors, prefix) if k in own or k.startswith(f"{prefix}.{QUANT_STATE}")]


def write_4bit(prefix: str, quant: _bnb.Quant4, dtype: str) -> dict[str, np.ndarray]:
    """The tensors transformers writes for a bitsandbytes ``Linear4bit`` holding ``quant``."""
    out = {
        f"{prefix}.weight": np.asarray(quant.packed, np.uint8),
        f"{prefix}.weight.absmax": np.asarray(quant.absmax),
        f"{prefix}.weight.quant_map": _bnb.code_for(quant.quant_type).copy(),
    }
    # QuantState.as_dict's order and spelling (json.dumps of a dict in insertion order)
    fields = {"quant_type": quant.quant_type, "blocksize": int(quant.blocksize), "dtype": dtype,
              "shape": [int(s) for s in quant.shape]}
    if quant.nested:
        out[f"{prefix}.weight.nested_absmax"] = np.asarray(quant.nested_absmax, np.float32)
        out[f"{prefix}.weight.nested_quant_map"] = np.asarray(quant.nested_code, np.float32)
        fields.update(nested_blocksize=_bnb.NESTED_BLOCKSIZE, nested_dtype="float32",
                      nested_offset=float(np.float32(quant.offset)))
    out[f"{prefix}.{QUANT_STATE}{quant.quant_type}"] = np.frombuffer(json.dumps(fields).encode("utf-8"), np.uint8).copy()
    return out


def write_int8(prefix: str, cb, scb) -> dict[str, np.ndarray]:
    """The tensors transformers writes for a bitsandbytes ``Linear8bitLt``."""
    return {f"{prefix}.weight": np.asarray(cb, np.int8), f"{prefix}.SCB": np.asarray(scb, np.float32),
            f"{prefix}.weight_format": np.array(0, np.uint8)}
