"""The attention-free Mamba language models in Flax NNX, under transformers' names: Mamba
(``model_type`` ``"mamba"``: state-spaces' mamba-130m-hf to 2.8b-hf), Falcon-Mamba (``"falcon_mamba"``:
Falcon-Mamba-7B, its instruct and 4-bit releases) and Mamba-2 (``"mamba2"``: mamba2-130m to 2.7b,
Mistral's Mamba-Codestral-7B).

``backbone`` holds ``embeddings``, ``layers`` (each a ``norm`` and a ``mixer``: Mamba's, see
``_mamba``, or Mamba-2's, see ``_mamba2``, added to the residual, which ``residual_in_fp32`` keeps
in float32) and ``norm_f``; ``lm_head`` after it, tied to the embeddings with ``tie_word_embeddings``. Old
checkpoints' ``backbone.embedding`` loads as transformers renames it. Generation keeps each layer's
convolution inputs and scan state, nothing that grows with the sequence. Every layer is alike, so
``scan_layers=True`` stacks them. Prefix tuning is refused (no keys to prefix), so is LoRA on the
mixers' ``out_proj`` and ``conv1d``, as PEFT refuses them for these families (and Mamba's
``dt_proj``, which transformers multiplies by past any adapter). transformers has only the causal
LMs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._hybrid import HybridDecoder
from peftjax.models._llama import DecoderUnderPrefix, LlamaForCausalLM
from peftjax.models._mamba import MambaMixer, mamba_cache
from peftjax.models._mamba2 import Mamba2Mixer
from peftjax.models._mamba2 import mamba_cache as mamba2_cache
from peftjax.models._outputs import ModelOutput
from peftjax.nn._norm import RMSNorm


class MambaBlock(nnx.Module):
    """``norm`` (of the residual in the compute dtype) then the ``mixer``, added to the residual
    (float32 from the embeddings on with ``residual_in_fp32``: see :class:`MambaModel`)."""

    mixer_class: ClassVar[type[nnx.Module]] = MambaMixer

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        del layer_idx
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = RMSNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, **kw)
        self.mixer = self.mixer_class(config, **kw)
        self.dtype = dtype

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        return False

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, None)``; arguments as ``_hybrid.HybridDecoder``'s layers take them (the
        attention's ``cos``, ``sin`` and ``mask`` unused)."""
        out, cache = self.mixer(self.norm(x.astype(self.dtype)), token_mask, cache, segment_ids)
        return x + out.astype(x.dtype), cache, None


class Mamba2Block(MambaBlock):
    mixer_class: ClassVar[type[nnx.Module]] = Mamba2Mixer


class MambaModel(HybridDecoder):
    """``backbone``: ``embeddings``, ``layers``, ``norm_f``."""

    layer_class: ClassVar[type[nnx.Module]] = MambaBlock
    recurrent: ClassVar[str] = "Mamba"
    embed_name: ClassVar[str] = "embeddings"
    norm_name: ClassVar[str] = "norm_f"

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return RMSNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, **kw)

    @staticmethod
    def make_rotary(config):
        return None

    @staticmethod
    def layer_types(config) -> list[str]:
        return ["linear_attention"] * config.num_hidden_layers  # every layer alike

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, cache=None,
                 cache_index=None, prefix_kv=None, dropout_rng=None, output_router_logits: bool = False,
                 segment_ids=None) -> ModelOutput:
        """As ``HybridDecoder.__call__``; with ``residual_in_fp32`` the
        residual stream is float32 from the embeddings on, as transformers keeps it."""
        if inputs_embeds is None:
            inputs_embeds = self.embeddings(jnp.asarray(input_ids))
        if self.config.residual_in_fp32:
            inputs_embeds = jnp.asarray(inputs_embeds).astype(jnp.float32)
        return super().__call__(None, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                                dropout_rng, output_router_logits, segment_ids)


class Mamba2Model(MambaModel):
    layer_class: ClassVar[type[nnx.Module]] = Mamba2Block


class MambaForCausalLM(DecoderUnderPrefix, LlamaForCausalLM):
    """Mamba's causal LM (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = MambaModel
    base_model_prefix: ClassVar[str] = "backbone"
    layer_cache: ClassVar = staticmethod(mamba_cache)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv`` (no keys to prefix)."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None) -> list[dict[str, jax.Array]]:
        """An empty generation cache: the mixer's ``{"conv", "ssm"}`` per layer (``max_len``
        unused: nothing grows with the sequence)."""
        return [self.layer_cache(self.config, batch, dtype or self.dtype) for _ in range(self.config.num_hidden_layers)]

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        renamed = {k.replace("backbone.embedding.", "backbone.embeddings.", 1): k for k in state_dict}
        super().load_hf_state_dict(_Renamed(state_dict, renamed), source=source, seed=seed)


class _Renamed(Mapping):
    """``tensors`` under other names (``names``: new -> old), read lazily."""

    def __init__(self, tensors: Mapping, names: Mapping[str, str]):
        self.tensors, self.names = tensors, names

    def __getitem__(self, key):
        return self.tensors[self.names[key]]

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)


class FalconMambaForCausalLM(MambaForCausalLM):
    """Falcon-Mamba's causal LM: Mamba's, its mixers normalising the time step's input, ``B`` and ``C``."""


class Mamba2ForCausalLM(MambaForCausalLM):
    """Mamba-2's causal LM (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = Mamba2Model
    layer_cache: ClassVar = staticmethod(mamba2_cache)


register(MambaForCausalLM, model_types=("mamba",), default=True)
register(FalconMambaForCausalLM, model_types=("falcon_mamba",), default=True)
register(Mamba2ForCausalLM, model_types=("mamba2",), default=True)
