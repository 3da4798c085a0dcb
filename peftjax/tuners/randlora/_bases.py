"""RandLoRA's shared random bases, drawn exactly as PEFT 0.22.0 draws them (``randlora/model.py``).

The generator is ``torch.Generator().manual_seed(projection_prng_key)``, reproduced by
``peftjax.nn._torch_rng``. Dense bases: torch's ``kaiming_uniform_(a=sqrt(5))`` on bfloat16
tensors (``randlora_A [r, 1, min]`` first, then ``n`` slices ``[max, 1, r]`` of ``randlora_B``),
each then divided by its standard deviation in bfloat16. torch rounds a reduced-precision uniform
draw to bfloat16 and maps one that rounds up to the upper bound back to the lower one. Sparse
bases: ``torch.rand`` in float32, ``-1`` below ``1 / (2 s)``, ``1`` above ``1 - 1 / (2 s)``, zero
between, divided by the standard deviation.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from peftjax.nn._torch_rng import TorchGenerator

_BF16 = ml_dtypes.bfloat16


def num_bases(min_dim: int, r: int) -> int:
    """``ceil(min_dim / r)``: the bases a layer (or the model) needs for a full-rank update."""
    return -(-min_dim // r)


def _kaiming_bf16(generator: TorchGenerator, shape: tuple[int, ...]) -> np.ndarray:
    fan_in = shape[1] * math.prod(shape[2:])
    bound = 1.0 / math.sqrt(fan_in)  # gain sqrt(2 / (1 + 5)) times sqrt(3 / fan_in)
    values = generator.uniform(shape, -bound, bound).astype(_BF16)
    values[values == np.asarray(bound, np.float32).astype(_BF16)] = np.asarray(-bound, np.float32).astype(_BF16)
    return values


def _unit_bf16(x: np.ndarray) -> np.ndarray:
    """``x / x.std()`` as torch computes it on a bfloat16 tensor (float32 arithmetic, rounded)."""
    std = np.asarray(np.std(x.astype(np.float64), ddof=1), np.float32).astype(_BF16).astype(np.float32)
    return (x.astype(np.float32) / std).astype(_BF16)


def _ternary(u: np.ndarray, sparsity: float) -> np.ndarray:
    out = np.zeros(u.shape, np.float32)
    out[u < 1 / (2 * sparsity)] = -1
    out[u > 1 - 1 / (2 * sparsity)] = 1
    return out / np.float32(np.std(out.astype(np.float64), ddof=1))


def randlora_bases(r: int, out_max: int, in_max: int, seed: int, *, sparse: bool = False,
                   very_sparse: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's ``randlora_A [r, 1, min]`` and ``randlora_B [max, n, r]`` (float32 arrays), ``min``/``max``
    the smaller/larger of the largest targeted output and input sizes."""
    max_dim, min_dim = max(out_max, in_max), min(out_max, in_max)
    n = num_bases(min_dim, r)
    generator = TorchGenerator(seed)
    if sparse or very_sparse:
        sparsity = math.sqrt(min_dim) if very_sparse else 3
        a = generator.uniform((r, 1, min_dim), 0.0, 1.0)
        b = generator.uniform((max_dim, n, r), 0.0, 1.0)
        return _ternary(a, sparsity), _ternary(b, sparsity)
    a = _kaiming_bf16(generator, (r, 1, min_dim))
    b = np.concatenate([_kaiming_bf16(generator, (max_dim, 1, r)) for _ in range(n)], axis=1)
    return _unit_bf16(a).astype(np.float32), _unit_bf16(b).astype(np.float32)
