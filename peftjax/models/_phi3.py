"""Phi-3 in Flax NNX: the Llama decoder with fused projections, under transformers' names.

``self_attn.qkv_proj`` computes queries, keys and values in one matmul (its output is
``[q: heads * head_dim | k: kv_heads * head_dim | v: kv_heads * head_dim]``) and
``mlp.gate_up_proj`` the gate and the up projection (``[gate | up]``, ``silu(gate) * up``), as
transformers' ``Phi3Attention`` and ``Phi3MLP`` do, so checkpoints and PEFT adapters (which
target the fused names) line up. No biases; ``partial_rotary_factor`` rotates only the first
part of each head; ``sliding_window`` applies to every layer.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
)
from peftjax.nn._functional import swiglu


class Phi3Attention(LlamaAttention):
    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        # no super().__init__: Llama's separate q/k/v_proj would be weights Phi-3 does not have
        self.set_layout(config, layer_idx)
        h, d = config.hidden_size, self.head_dim
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv_proj = nnx.Linear(h, (self.num_heads + 2 * self.num_kv_heads) * d, **kw)
        self.o_proj = nnx.Linear(self.num_heads * d, h, **kw)

    def project(self, x):
        b, s, _ = x.shape
        d, nq, nkv = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.qkv_proj(x)
        q, k, v = jnp.split(qkv, [nq * d, (nq + nkv) * d], axis=-1)
        return q.reshape(b, s, nq, d), k.reshape(b, s, nkv, d), v.reshape(b, s, nkv, d)


class Phi3MLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nnx.Linear(h, 2 * i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)

    def __call__(self, x):
        gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        return self.down_proj(swiglu(gate, up))


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = Phi3Attention
    mlp_class: ClassVar[type[nnx.Module]] = Phi3MLP


class Phi3Model(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = Phi3DecoderLayer


class Phi3ForCausalLM(LlamaForCausalLM):
    """Phi-3: Llama with fused ``qkv_proj`` and ``gate_up_proj``."""

    model_class: ClassVar[type[nnx.Module]] = Phi3Model

    def _generation_rerun_step(self, prefill: int, max_new_tokens: int) -> int | None:
        """LongRoPE: the step that takes the sequence to ``original_max_position_embeddings + 1``.

        transformers' ``Phi3ForCausalLM.prepare_inputs_for_generation`` drops its cache when the
        sequence first reaches ``original_max_position_embeddings + 1`` tokens (left padding
        included) and runs the whole sequence again, so that every cached key is rotated with the
        long factors the rotary embedding switches to there; ``generate`` does the same at this
        step. A prompt already past the threshold uses the long factors from its prefill on.

        An ``inputs_embeds`` prompt (prompt tuning's virtual tokens included) is rerun from its
        embeddings, followed by the generated tokens' (the cache it builds is a no-cache forward's,
        as after an ``input_ids`` prompt). transformers differs there: its check counts
        ``input_ids`` only, so it reruns ``input_ids``' own embeddings when they are as long as the
        prompt's, and never reruns after virtual tokens.

        Raises:
          ValueError: a prefix-tuning adapter is active and the generation crosses the threshold
            (its prefix shifts the positions past the cache's length; not implemented).
        """
        rotary, prefix = self.model.rotary, self._generation_prefix_length()
        start = prefix + prefill  # a prefix's entries come first and shift the positions
        if rotary.kind != "longrope" or not start <= rotary.threshold < start + max_new_tokens:
            return None
        if prefix:
            raise ValueError(
                f"Phi3ForCausalLM.generate: with a prefix-tuning adapter ({prefix} virtual tokens), a generation "
                f"that crosses original_max_position_embeddings={rotary.threshold} (longrope) is not implemented; "
                f"generate at most {rotary.threshold - start} tokens from this prompt of {prefill}")
        return rotary.threshold - prefill

    def embed_input_ids(self, input_ids):
        """The word embeddings of ``input_ids`` (``[batch, seq]``), as the forward looks them up."""
        return self.model.embed_tokens(jnp.asarray(input_ids))


class Phi3ForSequenceClassification(LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = Phi3Model


class Phi3ForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = Phi3Model


register(Phi3ForCausalLM, model_types=("phi3",), default=True)
register(Phi3ForSequenceClassification)
register(Phi3ForTokenClassification)
