"""IBM Granite MoE with a shared expert (``model_type`` ``"granitemoeshared"``) in Flax NNX, under
transformers' names.

Granite MoE's layers (``_granitemoe``) plus ``shared_mlp``, a SwiGLU every token goes through
beside its routed experts: ``input_linear`` gives the gate and the up projection (in that order,
``shared_intermediate_size`` each), ``output_linear`` projects back; its output is added to the
experts' before the residual multiplier. ``shared_intermediate_size`` 0 leaves it out, as
transformers does. The Hub's expert names (``input_linear``/``output_linear``/``router.layer``)
load and save as Granite MoE's. transformers has only the causal LM for it.
"""

from __future__ import annotations

from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._granite import attention_residual
from peftjax.models._granitemoe import GraniteMoeDecoderLayer, GraniteMoeForCausalLM, GraniteMoeModel
from peftjax.nn._functional import swiglu


class GraniteMoeSharedMLP(nnx.Module):
    """``shared_mlp``: ``output_linear(silu(gate) * up)``, ``gate`` and ``up`` the two halves of
    ``input_linear``'s output; no biases."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        if config.hidden_act != "silu":
            raise ValueError(f"{config.model_type}: hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = config.shared_intermediate_size
        self.input_linear = nnx.Linear(config.hidden_size, 2 * width, **kw)
        self.output_linear = nnx.Linear(width, config.hidden_size, **kw)

    def __call__(self, x):
        return self.output_linear(swiglu(*jnp.split(self.input_linear(x), 2, axis=-1)))


class GraniteMoeSharedDecoderLayer(GraniteMoeDecoderLayer):
    """Granite MoE's layer, the shared expert's output added to the routed experts'."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.shared_mlp = (GraniteMoeSharedMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                           if config.shared_intermediate_size else nnx.data(None))

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        x, cache = attention_residual(self, x, cos, sin, masks, cache, cache_index, prefix, dropout_rng)
        h = self.post_attention_layernorm(x)
        out, logits = self.block_sparse_moe(h)
        if self.shared_mlp is not None:
            out = out + self.shared_mlp(h)
        return x + out * self.residual_multiplier, cache, logits


class GraniteMoeSharedModel(GraniteMoeModel):
    layer_class: ClassVar[type[nnx.Module]] = GraniteMoeSharedDecoderLayer


class GraniteMoeSharedForCausalLM(GraniteMoeForCausalLM):
    """Granite MoE with a shared expert (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = GraniteMoeSharedModel


register(GraniteMoeSharedForCausalLM, model_types=("granitemoeshared",), default=True)
