"""bitsandbytes' quantization formats as pure functions: NF4/FP4 blockwise, double quant, int8 rows.

Every function reproduces bitsandbytes 0.50.2 bit for bit (``tests/test_quantization_codes.py``
checks each against it): a weight quantized here dequantizes to the same float32 values there,
and the packed bytes, scales and nested tensors are the ones bitsandbytes writes.

Quantization runs on the host, once, at load time (NumPy); dequantization is written once over an
array namespace, so it runs in NumPy for files and in ``jax.numpy`` inside a jitted forward.

Layouts (bitsandbytes'):

- 4-bit: the torch ``[out, in]`` weight flattened, cut into blocks of ``blocksize`` (64)
  consecutive values; each block is scaled by its absolute maximum and each value takes the index
  of the nearest code (ties to the lower code). Two codes per byte, the first value in the high
  nibble; ``packed`` is ``uint8 [(n + 1) // 2, 1]``. A last partial block has its own absmax.
- Double quantization (``compress_statistics``): ``offset`` = the mean of the float32 absmax
  values, and ``absmax - offset`` quantized to 8 bits in blocks of 256 with bitsandbytes'
  dynamic map (``nested_absmax``, ``nested_code``) through its CPU kernel's lookup table (see
  :func:`quantize_blockwise`); the 4-bit ``absmax`` is then ``uint8``.
- int8 (LLM.int8()): per output row ``SCB = max |w|`` and ``CB = round(w * (127 / SCB))``, on the
  weight cast to float16 first as bitsandbytes' ``Int8Params`` does.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

QUANT_TYPES = ("nf4", "fp4")

# bitsandbytes.functional.get_4bit_type("nf4"), float32
NF4_CODE = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    np.float32,
)
# get_4bit_type("fp4"): 1 sign, 2 exponent, 1 mantissa bit in bit-pattern order, divided by 12. Code 8
# is +0.0 here; bitsandbytes' CPU kernels give +0.0 or -0.0 for it depending on the path they take
FP4_CODE = (np.array([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], np.float32)
            / np.float32(12.0)).astype(np.float32)
CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}


def code_for(quant_type: str) -> np.ndarray:
    """The 16 float32 values of ``quant_type`` (``"nf4"`` or ``"fp4"``) in code order."""
    if quant_type not in CODES:
        raise ValueError(f"quant_type {quant_type!r} is not supported; expected one of {list(QUANT_TYPES)}")
    return CODES[quant_type]


# bitsandbytes.functional.create_dynamic_map() (signed, 7 exponent bits), float32 little-endian bits.
# Stored rather than recomputed: it is built with torch.linspace, whose float32 rounding is
# torch's own; tests/test_quantization_codes.py checks the table against bitsandbytes.
_DYNAMIC_MAP_HEX = (
    "33337ebf9a997abf000077bf666673bfcdcc6fbf33336cbf9a9968bf000065bf666661bfcdcc5dbf33335abf9a9956bf"
    "000053bf66664fbfcdcc4bbf333348bf9a9944bf000041bf66663dbfcdcc39bf343336bf9a9932bf00002fbf66662bbf"
    "cdcc27bf343324bf9a9920bf00001dbf666619bfcdcc15bf343312bf9a990ebf00000bbf666607bfcccc03bf333300bf"
    "3233f9be0000f2becccceabe9a99e3be6666dcbe3333d5be0000cebeccccc6be9a99bfbe6666b8be3333b1be0000aabe"
    "cccca2be9a999bbe666694be34338dbe000086be99997dbe33336fbecdcc60be666652be000044be9a9935be333327be"
    "cdcc18be66660abe0000f8bd3433dbbd85ebc9bdf728c4bd6766bebdd7a3b8bd48e1b2bdb81eadbd2a5ca7bd9a99a1bd"
    "0ad79bbd7b1496bdeb5190bd5d8f8abdcdcc84bd7b147ebd5d8f72bd3d0a67bd1f855bbd000050bde17a44bdc3f538bd"
    "a3702dbd85eb21bd676616bd48e10abd52b8febc15aee7bcd7a3d0bc9a99b9bc5d8fa2bc1f858bbcc3f568bc48e13abc"
    "643b1fbc180416bccdcc0cbc819503bc6abcf4bbd34de2bb3bdfcfbba470bdbb0d02abbb749398bbdd2486bb8a6c67bb"
    "5c8f42bb2db21dbbfca9f1ba9defa7baff6577ba3ee859ba806a3cbac1ec1eba016f01ba83e2c7b905e78cb90bd723b9"
    "4b1fbab8b3ef8ab8348037b80642b2b7ff0502b7941a5ab6b7a313b500000000b7a31335941a5a36ff0502370642b237"
    "34803738b3ef8a384b1fba380bd7233905e78c3983e2c739016f013ac1ec1e3a806a3c3a3ee8593aff65773a9defa73a"
    "fca9f13a2db21d3b5c8f423b8a6c673bdd24863b7493983b0d02ab3ba470bd3b3bdfcf3bd34de23b6abcf43b8195033c"
    "cdcc0c3c1804163c643b1f3c48e13a3cc3f5683c1f858b3c5d8fa23c9a99b93cd7a3d03c15aee73c52b8fe3c48e10a3d"
    "6766163d85eb213da3702d3dc3f5383de17a443d0000503d1f855b3d3d0a673d5d8f723d7b147e3dcdcc843d5d8f8a3d"
    "eb51903d7b14963d0ad79b3d9a99a13d2a5ca73db81ead3d48e1b23dd7a3b83d6766be3df728c43d85ebc93d3433db3d"
    "0000f83d66660a3ecdcc183e3333273e9a99353e0000443e6666523ecdcc603e33336f3e99997d3e0000863e34338d3e"
    "6666943e9a999b3ecccca23e0000aa3e3333b13e6666b83e9a99bf3eccccc63e0000ce3e3333d53e6666dc3e9a99e33e"
    "ccccea3e0000f23e3233f93e3333003fcccc033f6666073f00000b3f9a990e3f3433123fcdcc153f6666193f00001d3f"
    "9a99203f3433243fcdcc273f66662b3f00002f3f9a99323f3433363fcdcc393f66663d3f0000413f9a99443f3333483f"
    "cdcc4b3f66664f3f0000533f9a99563f33335a3fcdcc5d3f6666613f0000653f9a99683f33336c3fcdcc6f3f6666733f"
    "0000773f9a997a3f33337e3f0000803f"
)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map: 256 sorted float32 values in [-0.99297, 1]."""
    return np.frombuffer(bytes.fromhex(_DYNAMIC_MAP_HEX), "<f4").astype(np.float32)


# ------------------------------------------------------------------------------ torch's float32 mean


def torch_float32_mean(x: np.ndarray, *, threads: int = 1) -> np.float32:
    """``torch.Tensor.mean()`` of a contiguous float32 vector on x86 CPUs, to the last bit.

    bitsandbytes' double quantization subtracts this mean, so its value decides the nested codes.
    torch sums in 8 float32 lanes with 4-way interleaving and a 4-level cascade
    (``aten/src/ATen/native/cpu/SumKernel.cpp``); inputs of 32768 values or more are split among
    ``threads`` (``torch.get_num_threads()`` where bitsandbytes ran) and the partial sums added in
    order. The mean is that sum divided by the length.
    """
    x = np.ascontiguousarray(x, np.float32).reshape(-1)
    return np.float32(_torch_sum(x, threads) / np.float32(x.shape[0]))


_GRAIN = 32768
_LANES = 8


def _torch_sum(x: np.ndarray, threads: int) -> np.float32:
    n = x.shape[0]
    if threads <= 1 or n < _GRAIN:
        return _chunk_sum(x)
    parts = min(threads, -(-n // _GRAIN))
    size = -(-n // parts)
    total = np.float32(0)
    for t in range(parts):
        total = np.float32(total + _chunk_sum(x[t * size:(t + 1) * size]))
    return total


def _chunk_sum(x: np.ndarray) -> np.float32:
    n = x.shape[0]
    if n < _LANES:
        return np.float32(_row_sum(x[:, None])[0])
    vecs = n // _LANES
    lanes = _row_sum(x[: vecs * _LANES].reshape(vecs, _LANES))
    total = np.float32(0)
    for v in x[vecs * _LANES:]:
        total = np.float32(total + v)
    for v in lanes:
        total = np.float32(total + v)
    return total


def _row_sum(x: np.ndarray) -> np.ndarray:
    ilp = 4
    size = x.shape[0]
    rows = size // ilp
    partial = _multi_row_sum(x[: rows * ilp].reshape(rows, ilp, *x.shape[1:]))
    for v in x[rows * ilp:]:
        partial[0] = partial[0] + v
    for k in range(1, ilp):
        partial[0] = partial[0] + partial[k]
    return partial[0]


def _multi_row_sum(x: np.ndarray) -> np.ndarray:
    size, levels = x.shape[0], 4
    power = max(4, (int(size - 1).bit_length() if size > 1 else 0) // levels)
    step, mask = 1 << power, (1 << power) - 1
    acc = np.zeros((levels, *x.shape[1:]), np.float32)
    i = 0
    while i + step <= size:
        acc[0] = acc[0] + np.cumsum(x[i:i + step], axis=0, dtype=np.float32)[-1]  # sequential, like the loop
        i += step
        for j in range(1, levels):
            acc[j] = acc[j] + acc[j - 1]
            acc[j - 1] = 0
            if i & (mask << (j * power)):
                break
    if i < size:
        acc[0] = acc[0] + np.cumsum(x[i:], axis=0, dtype=np.float32)[-1]
    for j in range(1, levels):
        acc[0] = acc[0] + acc[j]
    return acc[0]


# ------------------------------------------------------------------------------ 8-bit blockwise


_LUT_SIZE = 65536


def _code_lut(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU lookup table: the code index of each of 65536 evenly spaced values in [-1, 1].

    Value ``i`` is ``-1 + 2i / 65535`` (float32); it takes the first code whose midpoint with the
    next one (``0.5 * (code[k] + code[k + 1])`` in float32) is not below it.
    """
    code = np.asarray(code, np.float32)
    mid = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    grid = (np.float32(2.0) * np.arange(_LUT_SIZE, dtype=np.float32)) / np.float32(_LUT_SIZE - 1)
    val = (np.float32(-1.0) + grid.astype(np.float32)).astype(np.float32)
    return np.searchsorted(mid, val, side="left").astype(np.uint8)


def quantize_blockwise(a: np.ndarray, code: np.ndarray, blocksize: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``bitsandbytes.functional.quantize_blockwise`` on the CPU: ``(uint8 codes, float32 absmax)``.

    bitsandbytes 0.50.2's CPU kernel does not search for the nearest code: it scales each value by
    its block's reciprocal absmax (``v * (1 / absmax)``, clamped to [-1, 1]), maps it to one of
    65536 grid points (``trunc(((v + 1) * 0.5) * 65535 + 0.5)``, each step rounded to float32) and
    reads that point's code from a table built from the code midpoints (:func:`_code_lut`). For
    about 0.2% of values near a midpoint that is a neighbour of the nearest code; this function
    reproduces its choice (``tests/test_quantization_codes.py`` checks every code). An all-zero
    block gets code 0 and absmax 0. (bitsandbytes' CUDA kernel searches for the nearest code, so
    a file quantized on a GPU can differ in those few codes; any file dequantizes the same here.)
    """
    flat = np.ascontiguousarray(a, np.float32).reshape(-1)
    n = flat.shape[0]
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, np.float32)
    padded[:n] = flat
    absmax = np.abs(padded).reshape(blocks, blocksize).max(axis=1).astype(np.float32)
    recip = (np.float32(1.0) / np.where(absmax == 0, np.float32(1.0), absmax)).astype(np.float32)
    scaled = (padded.reshape(blocks, blocksize) * recip[:, None]).reshape(-1)[:n]
    scaled = np.clip(scaled, np.float32(-1.0), np.float32(1.0)).astype(np.float32)
    grid = ((scaled + np.float32(1.0)) * np.float32(0.5)).astype(np.float32)
    grid = ((grid * np.float32(_LUT_SIZE - 1)).astype(np.float32) + np.float32(0.5)).astype(np.float32)
    q = _code_lut(code)[grid.astype(np.int64)]
    q = np.where(np.repeat(absmax == 0, blocksize)[:n], np.uint8(0), q)  # an all-zero block: code 0
    return q.astype(np.uint8).reshape(np.shape(a)), absmax


def _scale_blocks(values, absmax, blocksize: int, *, xp=np):
    """``values[i] * absmax[i // blocksize]`` (one float32 multiply each) for a flat ``values``."""
    n, blocks = values.shape[0], absmax.shape[0]
    padded = xp.pad(values, (0, blocks * blocksize - n))
    return (padded.reshape(blocks, blocksize) * absmax[:, None]).reshape(-1)[:n]


def dequantize_blockwise(q, absmax, code, blocksize: int = 256, *, xp=np):
    """``code[q] * absmax[block]`` in float32, over ``xp`` (NumPy or ``jax.numpy``)."""
    values = xp.asarray(code, xp.float32)[q.reshape(-1).astype(xp.int32)]
    return _scale_blocks(values, xp.asarray(absmax, xp.float32), blocksize, xp=xp).reshape(q.shape)


# ------------------------------------------------------------------------------ 4-bit


class Quant4(NamedTuple):
    """A 4-bit weight in bitsandbytes' layout (see the module docstring).

    Attributes:
      packed: ``uint8 [(n + 1) // 2, 1]``, two codes per byte, the first in the high nibble.
      absmax: ``float32 [blocks]``, or with double quantization ``uint8 [blocks]`` codes.
      shape: the torch shape of the weight (``(out, in)``).
      quant_type: ``"nf4"`` or ``"fp4"``.
      blocksize: values per absmax (64).
      nested_absmax: ``float32 [ceil(blocks / 256)]`` with double quantization, else ``None``.
      nested_code: the 256-value dynamic map with double quantization, else ``None``.
      offset: the subtracted mean (``float32`` scalar) with double quantization, else ``None``.
    """

    packed: np.ndarray
    absmax: np.ndarray
    shape: tuple[int, ...]
    quant_type: str
    blocksize: int = 64
    nested_absmax: np.ndarray | None = None
    nested_code: np.ndarray | None = None
    offset: np.ndarray | None = None

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_CHUNK = 1 << 16  # values quantized at once: bounds the temporaries (about 1 MB), not the result
NESTED_BLOCKSIZE = 256


def quantize_4bit(
    weight,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = False,
    sum_threads: int = 1,
) -> Quant4:
    """``bitsandbytes.functional.quantize_4bit`` on the CPU, as NumPy.

    Args:
      weight: a float array in torch layout (``[out, in]`` for a linear); float16/bfloat16 values
        are read exactly as float32, as bitsandbytes does. Any size: a last partial block has its
        own absmax, and an odd count is padded with one zero code.
      quant_type: ``"nf4"`` or ``"fp4"``.
      blocksize: values per absmax; one of bitsandbytes' sizes (64 is what transformers uses).
      compress_statistics: double quantization of the absmax values.
      sum_threads: torch's thread count where the file is to match bitsandbytes exactly; it only
        changes the last bit of the double-quant ``offset`` for layers of 2M+ values (see
        :func:`torch_float32_mean`), never the format.

    Raises:
      ValueError: an unknown ``quant_type`` or ``blocksize``, a non-float weight, or non-finite values.
    """
    code = code_for(quant_type)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize {blocksize} is not one of bitsandbytes' {list(BLOCKSIZES)}")
    w = np.asarray(weight)
    if not (np.issubdtype(w.dtype, np.floating) or w.dtype.name == "bfloat16"):
        raise ValueError(f"quantize_4bit needs a float weight; found dtype {w.dtype}")
    shape = tuple(w.shape)
    flat = np.asarray(w, np.float32).reshape(-1)  # no copy for a contiguous float32 weight
    n = flat.shape[0]
    full_blocks = n // blocksize
    blocks = -(-n // blocksize)
    absmax = np.empty(blocks, np.float32)
    packed = np.empty((n + 1) // 2, np.uint8)
    order = np.argsort(code, kind="stable")
    bounds = ((code[order[:-1]] + code[order[1:]]) / np.float32(2)).astype(np.float32)

    def codes(scaled):
        return order[np.searchsorted(bounds, scaled, side="left")].astype(np.uint8)

    # whole blocks a chunk at a time (the temporaries stay a few MB, whatever the layer's size);
    # bitsandbytes multiplies by the reciprocal for whole blocks and divides for the last partial one
    step = max(1, _CHUNK // blocksize)
    for first in range(0, full_blocks, step):
        last = min(first + step, full_blocks)
        body = flat[first * blocksize:last * blocksize].reshape(-1, blocksize)
        if not np.all(np.isfinite(body)):
            raise ValueError(f"cannot quantize a weight of shape {shape} holding inf or NaN")
        am = np.abs(body).max(axis=1)
        absmax[first:last] = am
        recip = (np.float32(1.0) / np.maximum(am, np.float32(1e-38))).astype(np.float32)
        q = codes(np.clip(body * recip[:, None], -1, 1).reshape(-1))
        packed[first * blocksize // 2:last * blocksize // 2] = (q[0::2] << 4) | q[1::2]
    if n % blocksize:
        tail = flat[full_blocks * blocksize:]
        if not np.all(np.isfinite(tail)):
            raise ValueError(f"cannot quantize a weight of shape {shape} holding inf or NaN")
        am = np.maximum(np.abs(tail).max(), np.float32(1e-38)).astype(np.float32)
        absmax[-1] = am
        scaled = np.clip(tail / am, -1, 1).astype(np.float32)
        if scaled.shape[0] % 2:  # an odd count: one padding nibble, the code of 0
            scaled = np.concatenate([scaled, np.zeros(1, np.float32)])
        q = codes(scaled)
        packed[full_blocks * blocksize // 2:] = (q[0::2] << 4) | q[1::2]
    packed = packed[:, None]
    absmax = absmax.astype(np.float32)
    if not compress_statistics:
        return Quant4(packed, absmax, shape, quant_type, blocksize)
    offset = torch_float32_mean(absmax, threads=sum_threads)
    nested_code = dynamic_map()
    q_absmax, nested_absmax = quantize_blockwise((absmax - offset).astype(np.float32), nested_code, NESTED_BLOCKSIZE)
    return Quant4(packed, q_absmax, shape, quant_type, blocksize, nested_absmax, nested_code, np.float32(offset))


def unpack_4bit(packed, n: int, *, xp=np):
    """The ``n`` 4-bit codes of ``packed`` as int32, high nibble first."""
    flat = packed.reshape(-1).astype(xp.int32)
    return xp.stack([flat >> 4, flat & 15], axis=-1).reshape(-1)[:n]


def block_scales(q: Quant4, *, xp=np):
    """The float32 absmax of every 4-bit block (double quantization undone as bitsandbytes does)."""
    if not q.nested:
        return xp.asarray(q.absmax, xp.float32)
    absmax = dequantize_blockwise(q.absmax, q.nested_absmax, q.nested_code, NESTED_BLOCKSIZE, xp=xp)
    # XLA:CPU fuses this multiply-add into one FMA (one rounding, where bitsandbytes rounds twice), so
    # under jit a double-quantized absmax can differ from bitsandbytes' by one float32 ulp
    return absmax + xp.asarray(q.offset, xp.float32)


def dequantize_4bit(q: Quant4, *, xp=np):
    """``bitsandbytes.functional.dequantize_4bit`` in float32: ``code[nibble] * absmax[block]``."""
    n = int(np.prod(q.shape))
    codes = unpack_4bit(q.packed, n, xp=xp)
    values = xp.asarray(code_for(q.quant_type))[codes]
    return _scale_blocks(values, block_scales(q, xp=xp), q.blocksize, xp=xp).reshape(q.shape)


# ------------------------------------------------------------------------------ int8


def int8_vectorwise_quant(weight) -> tuple[np.ndarray, np.ndarray]:
    """LLM.int8()'s weight format: ``(CB int8 [out, in], SCB float32 [out])``, rows scaled to ±127.

    As bitsandbytes' ``Int8Params``, the weight is first cast to float16; ``CB`` is
    ``round_half_even(w * ((1 / SCB) * 127))`` in float32, in the order its torch kernel rounds
    (``A * (127.0 / SCB)``: torch's reverse division is a reciprocal times the scalar).
    """
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ValueError(f"int8 quantization needs a 2-D [out, in] weight; found shape {w.shape}")
    cb = np.empty(w.shape, np.int8)
    scb = np.empty(w.shape[0], np.float32)
    rows = max(1, _CHUNK // max(1, w.shape[1]))
    for first in range(0, w.shape[0], rows):  # a chunk of rows at a time: small temporaries
        w16 = w[first:first + rows].astype(np.float32).astype(np.float16)
        s = np.abs(w16).max(axis=1).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = ((np.float32(1.0) / s).astype(np.float32) * np.float32(127.0)).astype(np.float32)
            c = np.rint((w16.astype(np.float32) * scale[:, None]).astype(np.float32))
        cb[first:first + rows] = np.nan_to_num(c, nan=0.0)  # an all-zero row: bitsandbytes' 0 * inf is NaN, cast to 0
        scb[first:first + rows] = s
    return cb, scb


def int8_dequantize(cb, scb, *, xp=np):
    """``CB * SCB * (1/127)`` in float32, as ``bitsandbytes.functional.int8_vectorwise_dequant`` (``[out, in]``)."""
    return (cb.astype(xp.float32) * xp.asarray(scb, xp.float32)[:, None]) * xp.float32(7.874015718698502e-3)
