"""IBM's Bamba (``model_type`` ``"bamba"``: Bamba-9B v1 and v2) in Flax NNX, under transformers' names.

A hybrid decoder: the layers listed in ``attn_layer_indices`` attend (``self_attn``: Llama's
grouped-query attention, biased with ``attention_bias``, RoPE on the first half of each head, which
transformers fixes for Bamba), the others are Mamba-2 layers (``mamba``, see ``_mamba2``); each
mixer after ``input_layernorm``, then ``pre_ff_layernorm`` and a SwiGLU ``feed_forward``
(``gate_proj``, ``up_proj``, ``down_proj``), each added to the residual; ``final_layernorm`` last.
With ``z_loss_coefficient`` the loss adds that times the mean over every position of the squared
log-partition of the logits, as transformers' ``BambaForCausalLM`` does.

Generation keeps, per layer, the keys and values (attention) or the convolution's last inputs and
the scan's state (Mamba-2). Prefix tuning is refused (the Mamba-2 layers have no keys);
``scan_layers=True`` is refused where the two kinds mix. transformers has only the causal LM.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._hybrid import HybridDecoder, hybrid_cache
from peftjax.models._llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from peftjax.models._mamba2 import Mamba2Mixer, mamba_cache
from peftjax.models._outputs import ModelOutput
from peftjax.nn._dropout import split_keys
from peftjax.nn._norm import RMSNorm


def bamba_layer_types(config) -> list[str]:
    """Each layer's mixer, as transformers' ``BambaConfig.layers_block_type`` reads it from
    ``attn_layer_indices``.

    Raises:
      ValueError: an attention index outside the layers.
    """
    indices = list(config.attn_layer_indices or ())
    n = config.num_hidden_layers
    if any(not 0 <= i < n for i in indices):
        raise ValueError(f"bamba: attn_layer_indices {indices} must lie in 0..{n - 1} (num_hidden_layers={n})")
    return ["full_attention" if i in indices else "linear_attention" for i in range(n)]


class BambaAttention(LlamaAttention):
    """Llama's attention; every attention layer global."""

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None


class BambaDecoderLayer(nnx.Module):
    """The mixer (``mamba`` or ``self_attn``) and the SwiGLU, each pre-normed and added to the residual."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_type = bamba_layer_types(config)[layer_idx]
        if self.layer_type == "linear_attention":
            self.mamba = Mamba2Mixer(config, **kw)
        else:
            self.self_attn = BambaAttention(config, layer_idx, **kw)
        self.feed_forward = LlamaMLP(config, **kw)
        self.input_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return False

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, None)``; arguments as ``_hybrid.HybridDecoder``'s layers take them."""
        h = self.input_layernorm(x)
        if self.layer_type == "linear_attention":
            a, cache = self.mamba(h, token_mask, cache, segment_ids)
        else:
            (attn_key,) = split_keys(dropout_rng, 1)
            a, cache = self.self_attn(h, cos, sin, {None: mask}, cache, cache_index, None, attn_key)
        x = x + a
        return x + self.feed_forward(self.pre_ff_layernorm(x)), cache, None


class BambaModel(HybridDecoder):
    """The decoder stack: ``embed_tokens``, ``layers``, ``final_layernorm``."""

    layer_class: ClassVar[type[nnx.Module]] = BambaDecoderLayer
    norm_name: ClassVar[str] = "final_layernorm"
    recurrent: ClassVar[str] = "Mamba-2"

    @staticmethod
    def layer_types(config) -> list[str]:
        return bamba_layer_types(config)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (attention) or Mamba-2's ``{"conv", "ssm"}``."""
    return hybrid_cache(config, bamba_layer_types(config), batch, max_len, dtype, mamba_cache)


class BambaForCausalLM(LlamaForCausalLM):
    """Bamba's causal LM (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = BambaModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv`` (the Mamba-2 layers
        have no keys to prefix); with ``labels``, the loss includes the z-loss where the config asks."""
        out = super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                               None, dropout_rng, logits_to_keep, segment_ids=segment_ids)
        coefficient = float(getattr(self.config, "z_loss_coefficient", 0.0) or 0.0)
        if labels is None or coefficient <= 0:
            return out
        z = jax.nn.logsumexp(out.logits.astype(jnp.float32), axis=-1)
        return out.replace(loss=out.loss + coefficient * jnp.mean(z * z))

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)


register(BambaForCausalLM, model_types=("bamba",), default=True)
