"""TensorBoard scalars without a TensorBoard package: the ``events.out.tfevents.*`` file format.

The Trainer logs floats only, and the usual writers import more than that needs (tensorboardX
imports torch whenever it is installed). An event file is a sequence of TFRecords, each an
``Event`` protocol buffer: the first holds ``file_version``, the others one scalar ``Summary``
each. The few fields used are encoded here by hand.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum TFRecord uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1  # int64 as protobuf encodes negatives
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalar: tuple[str, float] | None = None) -> bytes:
    """An ``Event`` message: ``wall_time``, ``step``, and a version string or one scalar value."""
    out = bytes([1 << 3 | 1]) + struct.pack("<d", wall_time)  # double wall_time = 1
    if step:
        out += _varint(2 << 3) + _varint(int(step))  # int64 step = 2
    if file_version is not None:
        out += _field(3, file_version.encode())  # string file_version = 3
    if scalar is not None:
        tag, value = scalar
        summary_value = _field(1, tag.encode()) + bytes([2 << 3 | 5]) + struct.pack("<f", value)
        out += _field(5, _field(1, summary_value))  # Summary summary = 5 { repeated Value value = 1 }
    return out


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class ScalarWriter:
    """Appends scalars to a new ``events.out.tfevents.<time>.<host>`` file in ``log_dir``.

    >>> writer = ScalarWriter("runs")  # doctest: +SKIP
    >>> writer.add_scalar("train/loss", 0.5, step=10)  # doctest: +SKIP
    >>> writer.close()  # doctest: +SKIP
    """

    def __init__(self, log_dir: str | os.PathLike):
        directory = Path(log_dir)
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._file.write(tfrecord(encode_event(now, file_version="brain.Event:2")))
        self._file.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._file.write(tfrecord(encode_event(time.time(), step, scalar=(tag, float(value)))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
