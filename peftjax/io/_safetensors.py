"""A small, dependency-free reader and writer for the safetensors format.

Our own reader: small files come back as NumPy views of a memory map; checkpoints are read one
tensor at a time (:class:`SafetensorsFile`), so loading holds the weights once plus one tensor.
bfloat16 tensors work through ml_dtypes (``safetensors.numpy`` cannot represent them). Every
failure names the file and what was wrong.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import NamedTuple

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
_ALIGN = 64


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


class _Span(NamedTuple):
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int


def _index(path: Path) -> tuple[dict[str, _Span], dict[str, str]]:
    """Every tensor's dtype, shape and byte range, checked against the file's size."""
    entries, metadata = read_safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        size = os.fstat(f.fileno()).st_size
    spans: dict[str, _Span] = {}
    for name, rec in entries.items():
        dtype = _DTYPES.get(rec.get("dtype"))
        if dtype is None:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has unsupported dtype {rec.get('dtype')!r}; supported: {sorted(_DTYPES)}"
            )
        shape = tuple(int(d) for d in rec["shape"])
        lo, hi = (int(o) for o in rec["data_offsets"])
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if hi - lo != expected:
            raise SafetensorsError(
                f"{path}: tensor {name!r} spans {hi - lo} bytes, but dtype {rec['dtype']} and "
                f"shape {list(shape)} need {expected}"
            )
        if 8 + n + hi > size:
            raise SafetensorsError(
                f"{path}: truncated; tensor {name!r} ends at byte {8 + n + hi} but the file has {size}"
            )
        spans[name] = _Span(dtype, shape, 8 + n + lo, expected)
    return spans, metadata


def read_safetensors(
    path: str | os.PathLike, keys: list[str] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads tensors from a safetensors file as read-only NumPy arrays backed by a memory map.

    For adapters and other small files; :class:`SafetensorsFile` reads a large checkpoint one
    tensor at a time.

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
    spans, metadata = _index(path)
    for name in keys or ():
        if name not in spans:
            raise SafetensorsError(f"{path}: no tensor named {name!r}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    return {
        name: np.frombuffer(buf, dtype=s.dtype, count=s.nbytes // s.dtype.itemsize, offset=s.offset).reshape(s.shape)
        for name, s in spans.items()
        if keys is None or name in keys
    }, metadata


class SafetensorsFile(Mapping[str, np.ndarray]):
    """The tensors of one or more safetensors files, each read from disk when it is asked for.

    Every lookup returns a new array that owns its memory (writable, 64-byte aligned, so JAX on
    CPU can adopt it without a copy). A loader that places one tensor and drops it before asking
    for the next keeps one tensor on the host at a time, where a memory map would leave every
    page it touched resident until the last view is gone: twice the checkpoint at the peak.
    The headers are read and checked when the object is made.

    Raises:
      FileNotFoundError: a file does not exist.
      SafetensorsError: a file is truncated or malformed, or two files hold the same key.
    """

    def __init__(self, *paths: str | os.PathLike):
        self._spans: dict[str, tuple[Path, _Span]] = {}
        self.metadata: dict[str, str] = {}
        for path in map(Path, paths):
            spans, metadata = _index(path)
            for name, span in spans.items():
                if name in self._spans:
                    raise SafetensorsError(f"{path}: tensor {name!r} is also in {self._spans[name][0]}")
                self._spans[name] = (path, span)
            self.metadata.update(metadata)

    def __getitem__(self, name: str) -> np.ndarray:
        path, span = self._spans[name]
        raw = np.empty(span.nbytes + _ALIGN, np.uint8)
        start = -raw.ctypes.data % _ALIGN
        out = raw[start : start + span.nbytes]
        with open(path, "rb", buffering=0) as f:
            f.seek(span.offset)
            view, done = memoryview(out), 0
            while done < span.nbytes:
                got = f.readinto(view[done:])
                if not got:
                    raise SafetensorsError(f"{path}: truncated while reading tensor {name!r}")
                done += got
        return out.view(span.dtype).reshape(span.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)

    def __contains__(self, name: object) -> bool:
        return name in self._spans

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        return self._spans[name][1].shape

    def dtype(self, name: str) -> np.dtype:
        """A tensor's dtype, without reading it."""
        return self._spans[name][1].dtype


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes tensors to ``path`` in the safetensors format (row-major, 8-byte aligned header).

    The file is written beside ``path`` and then renamed over it, so a file already there is whole
    until the new one is, and tensors that :func:`read_safetensors` mapped from it stay readable
    while they are written back (read, change a tensor, write to the same path).

    Raises:
      TypeError: a tensor has a dtype that safetensors cannot store.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        arr = np.require(np.asarray(tensors[name]), requirements="C")  # keeps 0-d (ascontiguousarray makes them 1-d)
        code = _NAMES.get(arr.dtype)
        if code is None:
            raise TypeError(f"tensor {name!r} has dtype {arr.dtype}, which safetensors cannot store")
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        arrays.append(arr)
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(partial, "xb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in arrays:
                f.write(arr.tobytes())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
