"""PyTorch's CPU random numbers, reproduced in NumPy, for the PEFT methods that never save them.

VeRA regenerates its shared projections from ``projection_prng_key`` when they are not saved, and
FourierFT never saves its spectral positions: both draw them from ``torch.Generator()`` seeded
with ``manual_seed(seed)``. That generator is a 32-bit Mersenne Twister seeded with MT19937's
standard ``init_genrand(seed)``, which is exactly NumPy's legacy ``RandomState(seed)`` stream
(frozen by NEP 19), so the values can be drawn without torch:

- ``Tensor.uniform_(a, b, generator=g)`` on float32: per element one 32-bit draw ``u``, then
  ``(u & (2**24 - 1)) * 2**-24 * (b - a) + a`` in double, rounded to float32;
- ``torch.randperm(n, generator=g)`` for ``n < 2**32 / 20``: Fisher-Yates, step ``i`` swapping
  ``i`` with ``i + u_i % (n - i)``; the first ``k`` entries are final after ``k`` steps.

The tests check both against torch itself.
"""

from __future__ import annotations

import functools
import math

import numpy as np

# torch draws 64-bit numbers for larger permutations (``randperm_cpu``); not reproduced here
RANDPERM_32BIT_LIMIT = (2**32 - 1) // 20


class TorchGenerator:
    """``torch.Generator().manual_seed(seed)`` on the CPU, for the draws PEFT makes with it."""

    def __init__(self, seed: int):
        # torch's mt19937 keeps the seed's low 32 bits (``init_with_uint32``)
        self._state = np.random.RandomState(seed & 0xFFFFFFFF)

    def _u32(self, n: int) -> np.ndarray:
        return self._state.randint(0, 2**32, size=n, dtype=np.uint32)

    def uniform(self, shape: tuple[int, ...], low: float, high: float) -> np.ndarray:
        """``torch.empty(shape).uniform_(low, high, generator=g)`` (float32)."""
        lo, hi = float(np.float32(low)), float(np.float32(high))
        x = (self._u32(math.prod(shape)) & np.uint32((1 << 24) - 1)).astype(np.float64) * 2.0**-24
        return (x * (hi - lo) + lo).astype(np.float32).reshape(shape)

    def normal(self, shape: tuple[int, ...], mean: float, std: float) -> np.ndarray:
        """``torch.normal(mean, std, shape, generator=g)`` (float32), for 16 values or more: torch's
        ``normal_fill`` draws one uniform per value (as :meth:`uniform`), turns each 16 into normals
        by Box-Muller on the pairs ``(j, j + 8)``, and redraws the last 16 when the size is not a
        multiple of 16. Computed in float64 here, float32 there: equal to about 1e-7.

        Raises:
          ValueError: fewer than 16 values (torch's scalar path, not reproduced).
        """
        size = math.prod(shape)
        if size < 16:
            raise ValueError(f"torch.normal of {size} values draws them one by one (fewer than 16); peftjax "
                             "reproduces only torch's vectorised path (16 values or more)")
        data = self.uniform((size,), 0.0, 1.0).astype(np.float64)

        def fill16(chunk: np.ndarray) -> np.ndarray:
            u1, u2 = 1.0 - chunk[:8], chunk[8:]
            radius, theta = np.sqrt(-2.0 * np.log(u1)), 2.0 * math.pi * u2
            return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)]) * std + mean

        for i in range(0, size - 15, 16):
            data[i:i + 16] = fill16(data[i:i + 16])
        if size % 16:
            data[size - 16:] = fill16(self.uniform((16,), 0.0, 1.0).astype(np.float64))
        return data.astype(np.float32).reshape(shape)

    def kaiming_uniform(self, shape: tuple[int, int]) -> np.ndarray:
        """PEFT's VeRA ``_kaiming_init(shape, generator)``: fan-in, gain ``sqrt(2)``."""
        std = math.sqrt(2) / math.sqrt(shape[1])
        bound = math.sqrt(3.0) * std
        return self.uniform(shape, -bound, bound)

    def randperm_head(self, n: int, k: int) -> np.ndarray:
        """``torch.randperm(n, generator=g)[:k]`` (int64).

        Raises:
          ValueError: ``n >= 2**32 / 20``, where torch switches to 64-bit draws (not reproduced).
        """
        if n >= RANDPERM_32BIT_LIMIT:
            raise ValueError(
                f"torch.randperm({n}) draws 64-bit numbers (n >= {RANDPERM_32BIT_LIMIT}); peftjax reproduces "
                "only the 32-bit path, so the layer is too large for PEFT-compatible random positions"
            )
        k = min(k, n)
        draws = self._u32(k)
        moved: dict[int, int] = {}
        out = np.empty(k, np.int64)
        for i in range(k):
            j = i + int(draws[i]) % (n - i)
            vi, vj = moved.get(i, i), moved.get(j, j)
            moved[j] = vi
            out[i] = vj
        return out


@functools.lru_cache(maxsize=64)
def randperm_head(seed: int, n: int, k: int) -> np.ndarray:
    """``torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]``, cached (read-only)."""
    out = TorchGenerator(seed).randperm_head(n, k)
    out.setflags(write=False)
    return out
