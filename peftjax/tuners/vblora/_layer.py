"""VB-LoRA for Flax NNX: LoRA factors assembled from one trained vector bank the model shares.

As in HF PEFT 0.22.0 (``peft/tuners/vblora/layer.py``), a targeted linear layer holds trained
logits ``vblora_logits_A [r, in/L, N]`` and ``vblora_logits_B [out/L, r, N]`` over the model's
bank ``vblora_vector_bank [N, L]`` (one variable, referenced by every layer, so its gradient
sums theirs). Each sub-vector is ``sum_k softmax(top-k logits)_k * bank[index_k]``:

    A = mix(logits_A).reshape(r, in)                              # [r, in]
    B = mix(logits_B).transpose(0, 2, 1).reshape(out, r)          # [out, r]
    y = base(x) + dropout(x) A^T B^T

On disk (PEFT's keys): ``<path>.vblora_logits_A`` and ``.vblora_logits_B`` (or, with
``save_only_topk_weights``, their ``_topk_indices`` and the first ``k - 1`` ``_topk_weights``),
and the bank once, ``base_model.vblora_vector_bank``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.tuners.base import AdapterParam, LowRankFactorsLayer, mixin_subclass


@dataclasses.dataclass(frozen=True)
class VBLoRASpec:
    """Static settings of one VB-LoRA adapter on one layer."""

    r: int
    topk: int
    dropout: float = 0.0


def mix(logits: jax.Array, bank: jax.Array, topk: int) -> jax.Array:
    """Each row of ``logits [..., N]`` as the softmax-weighted sum of its ``topk`` bank vectors: ``[..., L]``."""
    values, indices = jax.lax.top_k(logits, topk)
    return jnp.einsum("...k,...kl->...l", jax.nn.softmax(values, axis=-1), bank[indices])


class VBLoRALayer(LowRankFactorsLayer):
    """Mixin marking a VB-LoRA layer (``isinstance(m, VBLoRALayer)`` finds them)."""

    method_name = "VB-LoRA"
    status_module_type = "vblora.Linear"
    weight_dicts = ("vblora_logits_A", "vblora_logits_B", "vblora_vector_bank")  # the bank: the model's, shared

    def add_vblora(self, name: str, spec: VBLoRASpec, bank: AdapterParam, logits_a, logits_b) -> None:
        self._check_new(name)
        self.vblora_vector_bank[name] = bank
        self.vblora_logits_A[name] = AdapterParam(jnp.asarray(logits_a, jnp.float32))
        self.vblora_logits_B[name] = AdapterParam(jnp.asarray(logits_b, jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {"vblora_logits_A": (self.vblora_logits_A, same, same),
                "vblora_logits_B": (self.vblora_logits_B, same, same)}

    def _describe(self, name: str) -> str:
        spec = self.spec(name)
        return f"VB-LoRA r={spec.r} topk={spec.topk}"

    def factors(self, name: str) -> tuple[jax.Array, jax.Array]:
        """``(A [r, in], B [out, r])`` of adapter ``name``, float32."""
        spec = self.spec(name)
        bank = self.vblora_vector_bank[name].get_value().astype(jnp.float32)
        logits_a = self.vblora_logits_A[name].get_value().astype(jnp.float32)
        logits_b = self.vblora_logits_B[name].get_value().astype(jnp.float32)
        a = mix(logits_a, bank, spec.topk).reshape(logits_a.shape[0], -1)
        b = jnp.swapaxes(mix(logits_b, bank, spec.topk), 1, 2).reshape(-1, logits_b.shape[1])
        return a, b


def vblora_class_for(module: nnx.Module) -> type:
    if isinstance(module, VBLoRALayer):
        return type(module)
    return mixin_subclass(type(module), VBLoRALayer, "VBLoRA")
