"""Adaption-prompt attention for Flax NNX: the wrapped attention's output plus a gated prompt attention.

An adapted attention module keeps its weights and gains, per adapter name, ``adaption_prompt``
``[1, L, hidden]`` and ``adaption_gate`` ``[1]`` (``self_attn/adaption_prompt/default``), as HF
PEFT 0.22.0's ``AdaptedAttention`` / ``AdaptedAttentionGPT`` (``peft/tuners/adaption_prompt/layer.py``)
define them. With ``x`` the attention's input and ``P`` the prompt:

- Llama / Mistral: ``K = k_proj(P)``, ``V = v_proj(P)`` (the key/value heads repeated for grouped
  queries, no RoPE); ``Q = RoPE(q_proj(x))`` at the tokens' positions;
  ``out = attn(x) + o_proj(gate * softmax(Q K^T / sqrt(head_dim)) V)``;
- GPT-2: ``K`` and ``V`` from ``c_attn(P)``, ``Q`` from ``c_attn(x)``, and the gated prompt
  attention is added to the attention output without ``c_proj`` (PEFT's ``AdaptedAttentionGPT``).

The softmax runs in float32 over the ``L`` prompt tokens only, with no mask: every token, padded
or not, attends to the whole prompt; the prompt attention is independent of the KV cache, so
cached generation needs nothing more. There is nothing to merge into the weights.

On disk (PEFT's keys): ``base_model.model.<attention path>.adaption_prompt`` ``[1, L, hidden]`` and
``...adaption_gate`` ``[1]``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from peftjax.models._rope import apply_rotary
from peftjax.tuners.base import AdapterDictLayer, AdapterParam


@dataclasses.dataclass(frozen=True)
class AdaptionPromptSpec:
    """Static settings of one adaption prompt on one attention module.

    Attributes:
      adapter_len: the number of prompt tokens ``L``.
    """

    adapter_len: int


def _same(x):
    return x


class AdaptionPromptLayer(AdapterDictLayer):
    """Mixin marking an attention module that carries adaption prompts."""

    method_name = "adaption prompt"
    weight_dicts = ("adaption_prompt", "adaption_gate")

    def add_adaption_prompt(self, name: str, spec: AdaptionPromptSpec, hidden: int, key: jax.Array) -> None:
        """Adds a prompt ~ N(0, 1) (PEFT's ``normal_()``) and a zero gate (a no-op adapter)."""
        self._check_new(name)
        self.adaption_prompt[name] = AdapterParam(jax.random.normal(key, (1, spec.adapter_len, hidden), jnp.float32))
        self.adaption_gate[name] = AdapterParam(jnp.zeros((1,), jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        return {
            "adaption_prompt": (self.adaption_prompt, _same, _same),
            "adaption_gate": (self.adaption_gate, _same, _same),
        }

    def _describe(self, name: str) -> str:
        return f"adaption prompt of {self.spec(name).adapter_len} tokens"

    def _live_prompt(self) -> str | None:
        """The one live adapter's name, or ``None``; PEFT runs at most one adaption prompt at a time."""
        live = self._live_adapters()
        if len(live) > 1:
            raise ValueError(
                f"{self.adapter_path}: {len(live)} adaption prompts are active ({[n for n, _ in live]}); PEFT runs "
                "one at a time (\"Unable to stack multiple adaption prompts\"): set_adapter one of them"
            )
        return live[0][0] if live else None

    def _gated_prompt_attention(self, name: str, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        """``gate * softmax(q k^T / sqrt(d)) v`` as ``[batch, seq, heads * head_dim]``.

        ``q``: ``[batch, seq, heads, d]``; ``k``, ``v``: ``[1, L, kv_heads, d]`` (repeated to the query
        heads, each key/value head serving consecutive query heads, as ``repeat_interleave`` does).
        """
        b, s, h, d = q.shape
        group = h // k.shape[2]
        k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        scores = jnp.einsum("bqhd,lkhd->bhqk", q, k.astype(q.dtype)) / math.sqrt(d)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        probs = self.adaption_gate[name].get_value().astype(probs.dtype).reshape(1, 1, 1, 1) * probs
        out = jnp.einsum("bhqk,lkhd->bqhd", probs, v.astype(probs.dtype))
        return out.reshape(b, s, h * d)

    def merge_adapter(self, name: str) -> None:
        raise NotImplementedError(
            f"{self.adapter_path}: an adaption prompt is an extra attention over learned tokens and cannot be merged "
            "into the base weights (PEFT has no merge for it either); keep the adapter for inference, or unload() "
            "to drop it"
        )

    def unmerge_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{self.adapter_path}: adaption prompts are never merged")


class AdaptedLlamaAttention(AdaptionPromptLayer):
    """Adaption prompts on a Llama / Mistral ``LlamaAttention`` (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)."""

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        out, cache = self._peftjax_base.__call__(self, x, cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        name = self._live_prompt()
        if name is None:
            return out, cache
        b, s, _ = x.shape
        prompt = self.adaption_prompt[name].get_value().astype(x.dtype)
        length = prompt.shape[1]
        q = apply_rotary(self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim), cos, sin)
        k = self.k_proj(prompt).reshape(1, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(prompt).reshape(1, length, self.num_kv_heads, self.head_dim)
        extra = self.o_proj(self._gated_prompt_attention(name, q, k, v))
        return (out + extra).astype(out.dtype), cache


class AdaptedGPT2Attention(AdaptionPromptLayer):
    """Adaption prompts on GPT-2's attention (fused ``c_attn``; the prompt output skips ``c_proj``)."""

    def __call__(self, x, mask, cache=None, cache_index=None, dropout_rng=None, prefix=None):
        out, cache = self._peftjax_base.__call__(self, x, mask, cache, cache_index, dropout_rng, prefix)
        name = self._live_prompt()
        if name is None:
            return out, cache
        b, s, _ = x.shape
        prompt = self.adaption_prompt[name].get_value().astype(x.dtype)
        length = prompt.shape[1]
        q, _, _ = jnp.split(self.c_attn(x), 3, axis=-1)
        _, k, v = jnp.split(self.c_attn(prompt), 3, axis=-1)
        q = q.reshape(b, s, self.num_heads, self.head_dim)
        k, v = (t.reshape(1, length, self.num_heads, self.head_dim) for t in (k, v))
        return (out + self._gated_prompt_attention(name, q, k, v)).astype(out.dtype), cache
