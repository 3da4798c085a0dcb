"""NVIDIA Nemotron-H (``model_type`` ``"nemotron_h"``: Nemotron-H 4B/8B/47B, Nemotron Nano 2 9B/12B,
Nemotron 3 Nano 30B-A3B) in Flax NNX, under transformers' names.

A hybrid decoder of one mixer per layer: ``layers_block_type`` (the Hub's
``hybrid_override_pattern``, ``M*-E``) makes each layer's ``mixer`` Mamba-2 (``linear_attention``,
see ``_mamba2``), grouped-query attention without RoPE or biases (``full_attention``), a ReLU²
MLP (``mlp``: ``up_proj``, ``down_proj``) or a mixture of experts (``moe``); each after its
``norm`` and added to the residual. The experts: DeepSeek-V3's router (``gate``: sigmoid scores,
``e_score_correction_bias``, group-limited top k, renormalised with ``norm_topk_prob``, times
``routed_scaling_factor``), ungated ReLU² experts (``experts.up_proj [E, I, in]``,
``experts.down_proj [E, in, I]``, run densely: every expert on every token, weighted), inside
``fc1_latent_proj``/``fc2_latent_proj`` with ``moe_latent_size``, plus ``shared_experts`` on the
layer's input. transformers adds no router loss for it, nor does this.

The Hub's checkpoints keep the decoder under ``backbone.`` and each expert's ``up_proj`` /
``down_proj``; both that layout and transformers 5's (``model.``, fused experts) load, and
``save_pretrained`` writes the Hub's, as transformers does. Multi-token prediction weights
(``mtp.*``) are skipped, as transformers skips them.

Generation keeps, per layer, the keys and values (attention) or the convolution's last inputs and
the scan's state (Mamba-2). Prefix tuning is refused (the Mamba-2 layers have no keys); so is LoRA
on the Mamba-2 layers' ``out_proj`` and ``conv1d``, as PEFT refuses them for this family (its
fused CUDA kernel reads their weights directly). ``scan_layers=True`` is refused where layer types
mix. transformers has only the causal LM for this family.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models._auto import register
from peftjax.models._expert_files import PerExpertFile, per_expert_layout
from peftjax.models._deepseek_v3 import DeepseekV3TopkRouter, check_group_routing
from peftjax.models._hybrid import HybridDecoder, hybrid_cache
from peftjax.models._layer_kinds import checked_layer_types
from peftjax.models._llama import LlamaAttention, LlamaForCausalLM
from peftjax.models._mamba2 import Mamba2Mixer, mamba_cache
from peftjax.models._outputs import ModelOutput
from peftjax.nn._activations import activation
from peftjax.nn._norm import RMSNorm
from peftjax.nn._param_reader import ParamReader

LAYER_TYPES = ("linear_attention", "full_attention", "mlp", "moe")


def nemotron_h_layer_types(config) -> tuple[str, ...]:
    """Each layer's mixer (``layers_block_type``), checked.

    Raises:
      ValueError: an unknown type.
    """
    return checked_layer_types(config, LAYER_TYPES)


class NemotronHAttention(LlamaAttention):
    """Grouped-query attention, no RoPE, no biases; every attention layer global."""

    @staticmethod
    def mask_key(config, layer_idx: int):
        return None


class NemotronHMLP(nnx.Module):
    """``down_proj(act(up_proj(x)))``: ReLU² by default (``mlp_hidden_act``), biased with ``mlp_bias``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs, intermediate_size: int | None = None):
        kw = dict(use_bias=bool(config.mlp_bias), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = intermediate_size or config.intermediate_size
        self.up_proj = nnx.Linear(config.hidden_size, width, **kw)
        self.down_proj = nnx.Linear(width, config.hidden_size, **kw)
        self.act = activation(config.mlp_hidden_act, "mlp_hidden_act")

    def __call__(self, x):
        return self.down_proj(self.act(self.up_proj(x)))


class NemotronHExperts(ParamReader, nnx.Module):
    """``experts``: ``up_proj [experts, I, in]`` and ``down_proj [experts, in, I]``, no gate (both
    LoRA-adaptable through ``target_parameters``); ``in`` is ``moe_latent_size`` or the hidden size."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"up_proj": ("up_proj", False),
                                                           "down_proj": ("down_proj", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, i = config.n_routed_experts, config.moe_intermediate_size
        d = config.moe_latent_size or config.hidden_size
        init = nnx.initializers.normal(config.initializer_range)
        self.up_proj = nnx.Param(init(rngs.params(), (e, i, d), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, d, i), param_dtype))
        self.act = activation(config.mlp_hidden_act, "mlp_hidden_act")
        self.dtype = dtype

    def __call__(self, x, weights, index):
        """``x [tokens, in]`` through every expert, summed with each token's top-k ``weights`` at
        ``index`` (``[tokens, k]``; the other experts weighted 0)."""
        experts = self.up_proj.get_value().shape[0]
        dense = jnp.sum(jax.nn.one_hot(index, experts, dtype=jnp.float32) * weights[..., None], axis=-2)
        up = jnp.einsum("td,eid->tei", x, self.param_value("up_proj").astype(self.dtype))
        out = jnp.einsum("tei,edi->ted", self.act(up), self.param_value("down_proj").astype(self.dtype))
        return jnp.einsum("ted,te->td", out, dense.astype(out.dtype))


class NemotronHMoE(nnx.Module):
    """``gate``, ``experts`` (inside the latent projections, if any) and ``shared_experts``."""

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate = DeepseekV3TopkRouter(config, **kw)
        self.experts = NemotronHExperts(config, **kw)
        self.shared_experts = NemotronHMLP(config, intermediate_size=config.moe_shared_expert_intermediate_size, **kw)
        self.latent = config.moe_latent_size is not None
        if self.latent:
            bias = dict(use_bias=bool(config.mlp_bias), **kw)
            self.fc1_latent_proj = nnx.Linear(config.hidden_size, config.moe_latent_size, **bias)
            self.fc2_latent_proj = nnx.Linear(config.moe_latent_size, config.hidden_size, **bias)

    def __call__(self, x):
        """``(output [b, s, hidden], router logits [b * s, experts])``."""
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        logits, weights, index = self.gate(flat)
        routed = self.fc1_latent_proj(flat) if self.latent else flat
        routed = self.experts(routed, weights, index)
        if self.latent:
            routed = self.fc2_latent_proj(routed)
        return routed.astype(x.dtype).reshape(b, s, h) + self.shared_experts(x), logits


class NemotronHBlock(nnx.Module):
    """``norm`` then the layer's ``mixer``, added to the residual."""

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.block_type = nemotron_h_layer_types(config)[layer_idx]
        self.norm = RMSNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, **kw)
        if self.block_type == "linear_attention":
            self.mixer = Mamba2Mixer(config, **kw)
        elif self.block_type == "full_attention":
            self.mixer = NemotronHAttention(config, layer_idx, **kw)
        elif self.block_type == "moe":
            self.mixer = NemotronHMoE(config, **kw)
        else:
            self.mixer = NemotronHMLP(config, **kw)

    @staticmethod
    def is_sparse(config, layer_idx: int) -> bool:
        """Whether the layer is a mixture of experts."""
        return nemotron_h_layer_types(config)[layer_idx] == "moe"

    def __call__(self, x, cos, sin, mask, token_mask, cache=None, cache_index=None, dropout_rng=None,
                 segment_ids=None):
        """``(x, cache, router logits or None)``; arguments as ``_hybrid.HybridDecoder``'s layers
        take them (the MLP and MoE layers cache nothing: their cache passes through)."""
        h, logits = self.norm(x), None
        if self.block_type == "linear_attention":
            out, cache = self.mixer(h, token_mask, cache, segment_ids)
        elif self.block_type == "full_attention":
            out, cache = self.mixer(h, cos, sin, {None: mask}, cache, cache_index, None, dropout_rng)
        elif self.block_type == "moe":
            out, logits = self.mixer(h)
        else:
            out = self.mixer(h)
        return x + out, cache, logits


class NemotronHModel(HybridDecoder):
    """The decoder stack: ``embeddings``, ``layers``, ``norm_f``."""

    layer_class: ClassVar[type[nnx.Module]] = NemotronHBlock
    recurrent: ClassVar[str] = "Mamba-2"
    embed_name: ClassVar[str] = "embeddings"
    norm_name: ClassVar[str] = "norm_f"

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        check_group_routing(config, sparse="moe" in nemotron_h_layer_types(config))
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        return RMSNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, **kw)

    @staticmethod
    def make_rotary(config):
        return None  # no RoPE in any layer

    @staticmethod
    def layer_types(config) -> tuple[str, ...]:
        return nemotron_h_layer_types(config)


def init_cache(config, batch: int, max_len: int, dtype) -> list[dict[str, jax.Array]]:
    """An empty generation cache: per layer, ``{"k", "v"}`` (``[batch, max_len, kv_heads,
    head_dim]``, attention), Mamba-2's ``{"conv", "ssm"}``, or ``{}`` (MLP, MoE)."""
    return hybrid_cache(config, nemotron_h_layer_types(config), batch, max_len, dtype, mamba_cache)


class NemotronHForCausalLM(LlamaForCausalLM):
    """Nemotron-H's causal LM: ``model`` (the hybrid decoder) and ``lm_head`` (see the module docstring)."""

    model_class: ClassVar[type[nnx.Module]] = NemotronHModel
    ignored_keys: ClassVar[tuple[str, ...]] = (r"mtp\..*",)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 cache=None, cache_index=None, dropout_rng=None, logits_to_keep=0, segment_ids=None) -> ModelOutput:
        """As :class:`~peftjax.models.LlamaForCausalLM`, without ``prefix_kv`` (the Mamba-2 layers
        have no keys to prefix)."""
        return super().__call__(input_ids, attention_mask, position_ids, labels, inputs_embeds, cache, cache_index,
                                None, dropout_rng, logits_to_keep, segment_ids=segment_ids)

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return init_cache(self.config, batch, max_len, dtype or self.dtype)

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        view = PerExpertFile(state_dict, source, "mixer", EXPERTS, rename=_from_hub)
        super().load_hf_state_dict(view, source=source, seed=seed)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return per_expert_layout(state, "mixer", EXPERTS, rename=_to_hub)


EXPERTS = {"up_proj": ("up_proj",), "down_proj": ("down_proj",)}  # ungated: each fused tensor one linear


def _from_hub(key: str) -> str:
    return f"model.{key[len('backbone.'):]}" if key.startswith("backbone.") else key


def _to_hub(key: str) -> str:
    return f"backbone.{key[len('model.'):]}" if key.startswith("model.") else key


register(NemotronHForCausalLM, model_types=("nemotron_h",), default=True)
