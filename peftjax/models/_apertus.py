"""The Swiss AI Initiative's Apertus (``model_type`` ``"apertus"``: Apertus-8B, 70B) in Flax NNX,
with transformers' module names.

What differs from Llama:

- each layer normalises its input with ``attention_layernorm`` and ``feedforward_layernorm``
  (Llama's pre-norm order under other names);
- the attention normalises each head's query and key (``q_norm``, ``k_norm``: Qwen3's);
- the MLP has no gate: ``down_proj(act_fn(up_proj(x)))``, the activation xIELU by default
  (``act_fn``: trained scalars ``alpha_p`` and ``alpha_n``, kept through softplus, and the
  checkpoint's ``beta`` and ``eps``): ``alpha_p x^2 + beta x`` above 0, else
  ``alpha_n (expm1(min(x, eps)) - x) + beta x`` with ``alpha_n`` offset by ``beta``;
- RoPE is Llama 3's by default (base 12 000 000, factor 8 over 8192 positions).
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._llama import LlamaForCausalLM, LlamaForTokenClassification, LlamaModel
from peftjax.models._qwen3 import Qwen3Attention
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._dropout import split_keys
from peftjax.nn._norm import RMSNorm


class XIELU(nnx.Module):
    """transformers' ``XIELUActivation`` (its Python path), its four values read from the checkpoint."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "alpha_p": ("alpha_p", False), "alpha_n": ("alpha_n", False), "beta": ("beta", False), "eps": ("eps", False)}

    def __init__(self, *, param_dtype, alpha_p_init: float = 0.8, alpha_n_init: float = 0.8, beta: float = 0.5,
                 eps: float = -1e-6):
        raw = lambda v: np.log(np.expm1(np.float32(v))).reshape(1)  # noqa: E731  (softplus's inverse)
        self.alpha_p = nnx.Param(jnp.asarray(raw(alpha_p_init), param_dtype))
        self.alpha_n = nnx.Param(jnp.asarray(raw(alpha_n_init - beta), param_dtype))
        self.beta = nnx.Param(jnp.asarray(beta, param_dtype))
        self.eps = nnx.Param(jnp.asarray(eps, param_dtype))

    def __call__(self, x):
        beta, eps = self.beta.get_value().astype(x.dtype), self.eps.get_value().astype(x.dtype)
        alpha_p = jax.nn.softplus(self.alpha_p.get_value().astype(x.dtype).reshape(()))  # stored [1]
        alpha_n = beta + jax.nn.softplus(self.alpha_n.get_value().astype(x.dtype).reshape(()))
        return jnp.where(x > 0, alpha_p * x * x + beta * x, (jnp.expm1(jnp.minimum(x, eps)) - x) * alpha_n + beta * x)


class ApertusMLP(nnx.Module):
    """``down_proj(act_fn(up_proj(x)))``, no biases; ``act_fn`` xIELU, or the named activation."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up_proj = nnx.Linear(config.hidden_size, config.intermediate_size, **kw)
        self.down_proj = nnx.Linear(config.intermediate_size, config.hidden_size, **kw)
        if config.hidden_act == "xielu":
            self.act_fn = XIELU(param_dtype=param_dtype)
        elif config.hidden_act in ACTIVATIONS:
            self.act_fn = nnx.data(ACTIVATIONS[config.hidden_act])
        else:
            raise ValueError(f"apertus: hidden_act {config.hidden_act!r} is not supported; supported: "
                             f"{sorted(['xielu', *ACTIVATIONS])}")

    def __call__(self, x):
        return self.down_proj(self.act_fn(self.up_proj(x)))


class ApertusDecoderLayer(nnx.Module):
    """Pre-norm attention and MLP under Apertus' norm names."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = Qwen3Attention(config, layer_idx, **kw)
        self.mlp = ApertusMLP(config, **kw)
        self.attention_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)
        self.feedforward_layernorm = RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's key for ``attention_dropout`` (training); ``None``: none."""
        (attn_key,) = split_keys(dropout_rng, 1)
        a, cache = self.self_attn(self.attention_layernorm(x), cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + a
        return x + self.mlp(self.feedforward_layernorm(x)), cache


class ApertusModel(LlamaModel):
    layer_class: ClassVar[type[nnx.Module]] = ApertusDecoderLayer


class ApertusForCausalLM(LlamaForCausalLM):
    """Apertus: Llama with per-head q/k norms and a gate-less xIELU MLP."""

    model_class: ClassVar[type[nnx.Module]] = ApertusModel


class ApertusForTokenClassification(LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = ApertusModel


register(ApertusForCausalLM, model_types=("apertus",), default=True)
register(ApertusForTokenClassification)
