"""Per-token weights of several LoRA adapters, set around a forward: X-LoRA's scalings.

Inside :func:`lora_scalings`, a LoRA linear layer that X-LoRA numbered (``xlora_index``) adds
every one of the block's adapters it holds, each input scaled per token by that adapter's weight
for the layer (PEFT's ``XLoraLinearLayer``), whatever the layer's active adapters are:

    y = base(x) + sum_j  B_j(A_j(dropout_j(x * s[..., layer, j]))) * scaling_j * global_scaling_weight

``s`` is ``[batch, seq, layers, adapters]`` (or one number for every token, layer and adapter:
X-LoRA's scaling pass); ``top_k`` keeps each token's largest weights only, ``softmax_top_k``
then softmaxes the kept ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import jax
import jax.numpy as jnp

_state = threading.local()


@dataclasses.dataclass(frozen=True)
class LoraScalings:
    """What :func:`lora_scalings` sets: the weights, the adapters they weigh (in order) and PEFT's
    ``top_k_lora``, ``enable_softmax_topk`` and ``global_scaling_weight``."""

    scalings: jax.Array | float
    adapters: tuple[str, ...]
    top_k: int | None = None
    softmax_top_k: bool = False
    weight: float = 1.0

    def for_layer(self, index: int, lead_shape: tuple[int, ...]) -> jax.Array:
        """Layer ``index``'s weights ``[*lead_shape, adapters]``, top-k and softmax applied."""
        n = len(self.adapters)
        if isinstance(self.scalings, float | int):
            s = jnp.full((*lead_shape, n), float(self.scalings), jnp.float32)
        else:
            s = self.scalings[..., index, :]
        if self.top_k is not None:
            _, index_top = jax.lax.top_k(s, self.top_k)
            keep = jnp.sum(jax.nn.one_hot(index_top, n, dtype=s.dtype), axis=-2) > 0
            s = s * keep.astype(s.dtype)
        if self.softmax_top_k:
            nonzero = s != 0
            s = jnp.where(nonzero, jax.nn.softmax(jnp.where(nonzero, s, -jnp.inf), axis=-1), 0.0)
        return s


@contextlib.contextmanager
def lora_scalings(value: LoraScalings | None):
    """Inside the block, X-LoRA-numbered LoRA layers weigh their adapters by ``value``."""
    previous = getattr(_state, "value", None)
    _state.value = value
    try:
        yield
    finally:
        _state.value = previous


def active_lora_scalings() -> LoraScalings | None:
    return getattr(_state, "value", None)
