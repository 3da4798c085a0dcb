"""A small, dependency-free reader and writer for the safetensors format.

Our own reader memory-maps the file and hands back NumPy views, so a checkpoint can be placed
on devices (or sharded) without a full host copy, and bfloat16 tensors work through ml_dtypes
(``safetensors.numpy`` cannot represent them). Every failure names the file and what was wrong.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or malformed."""


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Reads only the header of a safetensors file.

    Returns:
      ``(entries, metadata)``: ``entries`` maps each tensor name to its header record
      (``dtype``, ``shape``, ``data_offsets``); ``metadata`` is the ``__metadata__`` dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: file is {len(raw)} bytes, too short for a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER:
            raise SafetensorsError(f"{path}: header length {n} is implausible; not a safetensors file")
        blob = f.read(n)
    if len(blob) < n:
        raise SafetensorsError(f"{path}: truncated header ({len(blob)} of {n} bytes)")
    try:
        header = json.loads(blob)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata


def read_safetensors(
    path: str | os.PathLike, keys: list[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads tensors from a safetensors file as read-only NumPy arrays backed by a memory map.

    Args:
      path: the ``.safetensors`` file.
      keys: read only these tensors (all when ``None``).

    Returns:
      ``(tensors, metadata)``.

    Raises:
      FileNotFoundError: the file does not exist.
      SafetensorsError: the file is truncated or malformed, or a key is absent.
    """
    path = Path(path)
    entries, metadata = read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    start = 8 + n
    wanted = list(entries) if keys is None else keys
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in entries:
            raise SafetensorsError(f"{path}: no tensor named {name!r}")
        rec = entries[name]
        dtype = _DTYPES.get(rec.get("dtype"))
        if dtype is None:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has unsupported dtype {rec.get('dtype')!r}; "
                f"supported: {sorted(_DTYPES)}"
            )
        shape = tuple(int(d) for d in rec["shape"])
        lo, hi = (int(o) for o in rec["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if hi - lo != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} spans {hi - lo} bytes, but dtype {rec['dtype']} and "
                f"shape {list(shape)} need {expected}"
            )
        if start + hi > size:
            raise SafetensorsError(
                f"{path}: truncated; tensor {name!r} ends at byte {start + hi} but the file has {size}"
            )
        out[name] = np.frombuffer(buf, dtype=dtype, count=expected // dtype.itemsize, offset=start + lo).reshape(shape)
    return out, metadata


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes tensors to ``path`` in the safetensors format (row-major, 8-byte aligned header).

    Raises:
      TypeError: a tensor has a dtype that safetensors cannot store.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        code = _NAMES.get(arr.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
