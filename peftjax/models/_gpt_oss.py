"""GPT-OSS in Flax NNX: OpenAI's open-weight mixture of experts, under transformers' names.

Against Mixtral (``_mixtral``, whose decoder stack, load-balancing loss and dispatch options this
reuses), as transformers 5's ``GptOssForCausalLM`` computes it:

* attention with biases on all four projections and a learned per-head *sink*
  (``self_attn.sinks [heads]``): a logit that joins every query's softmax over the keys and is
  dropped after it, so the attention weights sum to less than one; layers alternate between a
  sliding window (``layer_types``; a query sees itself and the ``sliding_window - 1`` keys before
  it) and full causal attention; YaRN rotary embeddings (split-half rotation);
* the MLP (``mlp``): a router with a bias (``mlp.router.weight [experts, hidden]``, ``.bias``)
  whose top ``num_experts_per_tok`` logits are softmaxed among themselves; experts stored
  input-major with biases, ``gate_up_proj [experts, hidden, 2I]`` (gate and up *interleaved*:
  even columns gate, odd up), ``down_proj [experts, I, hidden]``; an expert computes
  ``(clamp(up, -L, L) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, L)``
  (``L = swiglu_limit``, ``alpha = swiglu_alpha``), then ``down``;
* the checkpoints keep that layout (nothing is converted); OpenAI's published weights store the
  experts in MXFP4 (``*_blocks`` of packed 4-bit values and ``*_scales`` of power-of-two
  exponents), which loading dequantizes (:func:`dequantize_mxfp4`, transformers' rule).

LoRA reaches the attention and the experts as PEFT's does: ``target_modules`` for the linears,
``target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]`` for the experts
(transformers declares them ``is_transposed``: ``[experts, in, out]``). PEFT 0.22.0 has no default
targets for the family.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.io._errors import CheckpointError
from peftjax.models._auto import register
from peftjax.models._llama import LlamaAttention, LlamaForSequenceClassification, LlamaForTokenClassification
from peftjax.models._mixtral import (
    MixtralDecoderLayer,
    MixtralForCausalLM,
    MixtralModel,
    MixtralSparseMoeBlock,
    check_top_k,
    expert_count,
    expert_dispatch,
)
from peftjax.nn._param_reader import ParamReader

# the 16 values of a 4-bit MXFP4 code (E2M1), as transformers' FP4_VALUES
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                      np.float32)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """An expert tensor from its MXFP4 ``blocks [experts, out, groups, 16]`` (uint8: two 4-bit codes
    a byte, the low nibble first) and ``scales [experts, out, groups]`` (uint8 exponents biased by
    127): each group's 32 values times ``2 ** (scale - 127)``, then transposed to the in-memory
    ``[experts, in, out]`` (float32)."""
    blocks, scales = np.asarray(blocks, np.uint8), np.asarray(scales, np.uint8)
    if blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match")
    values = np.empty((*blocks.shape[:-1], blocks.shape[-1] * 2), np.float32)
    values[..., 0::2], values[..., 1::2] = FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    e, out = blocks.shape[:2]
    return values.reshape(e, out, -1).transpose(0, 2, 1)


class _Mxfp4Experts(Mapping):
    """A checkpoint whose experts are MXFP4 (``<name>_blocks``, ``<name>_scales``) read as the
    in-memory float tensors (a view: each is dequantized when it is looked up)."""

    def __init__(self, tensors: Mapping, source: str):
        self.tensors, self.packed = tensors, {}
        for key in tensors:
            m = re.match(r"^(?P<name>.*\.experts\.(gate_up_proj|down_proj))_blocks$", key)
            if m:
                if f"{m['name']}_scales" not in tensors:
                    raise CheckpointError(f"{source}: {key} has no {m['name']}_scales beside it (MXFP4 experts)")
                self.packed[m["name"]] = (key, f"{m['name']}_scales")
        self.hidden = {k for pair in self.packed.values() for k in pair}

    def __getitem__(self, key: str):
        if key in self.packed:
            blocks, scales = self.packed[key]
            return dequantize_mxfp4(self.tensors[blocks], self.tensors[scales])
        if key in self.hidden:
            raise KeyError(key)
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self.tensors if k not in self.hidden)
        yield from self.packed

    def __len__(self) -> int:
        return len(self.tensors) - len(self.hidden) + len(self.packed)

    def __contains__(self, key) -> bool:
        return key in self.packed or (key in self.tensors and key not in self.hidden)


class GptOssAttention(LlamaAttention):
    """Llama's attention (biases on all four projections) with a learned sink logit per head."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"sinks": ("sinks", False)}

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        super().__init__(config, layer_idx, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window = None  # the decoder passes each layer its own window's mask (so the layers scan)
        init = nnx.initializers.normal(config.initializer_range)
        self.sinks = nnx.Param(init(rngs.params(), (self.num_heads,), param_dtype))

    def score_options(self, masks) -> dict:
        return {"sinks": self.sinks.get_value()}


class GptOssTopKRouter(ParamReader, nnx.Module):
    """``mlp.router``: ``weight [experts, hidden]`` and ``bias [experts]`` (bare parameters, as
    transformers keeps them; LoRA reaches the weight through ``target_parameters``)."""

    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {"weight": ("weight", False), "bias": ("bias", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.normal(config.initializer_range)
        e, h = expert_count(config), config.hidden_size
        self.weight = nnx.Param(init(rngs.params(), (e, h), param_dtype))
        self.bias = nnx.Param(init(rngs.params(), (e,), param_dtype))
        self.dtype = dtype

    def __call__(self, x):
        return x @ self.param_value("weight").astype(self.dtype).T + self.param_value("bias").astype(self.dtype)[None]


class GptOssExperts(ParamReader, nnx.Module):
    """``mlp.experts``: ``gate_up_proj [experts, hidden, 2I]`` (gate and up interleaved),
    ``down_proj [experts, I, hidden]`` and their biases; input-major (``is_transposed``, which
    LoRA on these parameters follows, as PEFT does)."""

    is_transposed: ClassVar[bool] = True
    hf_param_map: ClassVar[dict[str, tuple[str, bool]]] = {
        "gate_up_proj": ("gate_up_proj", False), "gate_up_proj_bias": ("gate_up_proj_bias", False),
        "down_proj": ("down_proj", False), "down_proj_bias": ("down_proj_bias", False)}

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        e, h, i = expert_count(config), config.hidden_size, config.intermediate_size
        init = nnx.initializers.normal(config.initializer_range)
        self.gate_up_proj = nnx.Param(init(rngs.params(), (e, h, 2 * i), param_dtype))
        self.gate_up_proj_bias = nnx.Param(jnp.zeros((e, 2 * i), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (e, i, h), param_dtype))
        self.down_proj_bias = nnx.Param(jnp.zeros((e, h), param_dtype))
        self.limit = float(config.swiglu_limit)
        self.alpha = float(config.swiglu_alpha)
        self.dtype = dtype

    def _param(self, attr: str) -> jax.Array:
        return self.param_value(attr).astype(self.dtype)

    def activation(self, gate_up: jax.Array) -> jax.Array:
        """The clamped, gated activation of ``gate_up [..., 2I]`` (interleaved) -> ``[..., I]``."""
        gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
        gate = jnp.minimum(gate, self.limit)
        up = jnp.clip(up, -self.limit, self.limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * self.alpha))

    def __call__(self, x, weights):
        """``x [tokens, hidden]`` through every expert, summed with ``weights [tokens, experts]``."""
        gate_up = jnp.einsum("th,eho->teo", x, self._param("gate_up_proj")) + self._param("gate_up_proj_bias")[None]
        out = jnp.einsum("tei,eih->teh", self.activation(gate_up), self._param("down_proj"))
        out = out + self._param("down_proj_bias")[None]
        return jnp.einsum("teh,te->th", out, weights.astype(out.dtype))

    def grouped(self, x, top, index):
        """``x [tokens, hidden]`` through its own top-k experts only (a grouped GEMM,
        ``jax.lax.ragged_dot``; see Mixtral's), weighted by ``top`` and summed per token."""
        t, k = index.shape
        flat = index.reshape(-1)
        order = jnp.argsort(flat, stable=True)
        rows, experts = order // k, flat[order]
        sizes = jnp.bincount(flat, length=self.gate_up_proj.get_value().shape[0]).astype(jnp.int32)
        gate_up = jax.lax.ragged_dot(x[rows], self._param("gate_up_proj"), sizes)
        gate_up = gate_up + self._param("gate_up_proj_bias")[experts]
        out = jax.lax.ragged_dot(self.activation(gate_up), self._param("down_proj"), sizes)
        out = (out + self._param("down_proj_bias")[experts]) * top.reshape(-1)[order][:, None].astype(out.dtype)
        return jnp.zeros((t, out.shape[-1]), out.dtype).at[rows].add(out)


class GptOssMLP(MixtralSparseMoeBlock):
    """``mlp``: the router and the experts; returns ``(output, router logits)`` as Mixtral's block."""

    def __init__(self, config, layer_idx: int = 0, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        check_top_k(config)  # (hidden_act is not read: GPT-OSS's activation is its own)
        self.top_k = config.num_experts_per_tok
        self.dispatch = expert_dispatch(config)
        self.layer_idx = layer_idx
        self.router = GptOssTopKRouter(config, **kw)
        self.experts = GptOssExperts(config, **kw)

    def __call__(self, x):
        b, s, h = x.shape
        flat = x.reshape(b * s, h)
        logits = self.router(flat)
        top, index = jax.lax.top_k(logits, self.top_k)
        top = jax.nn.softmax(top.astype(jnp.float32), axis=-1).astype(logits.dtype)  # among the chosen k
        if self.dispatch == "grouped":
            out = self.experts.grouped(flat, top, index)
        else:
            weights = jnp.sum(jax.nn.one_hot(index, logits.shape[-1], dtype=top.dtype) * top[..., None], axis=-2)
            out = self.experts(flat, weights)
        return out.reshape(b, s, h), logits


class GptOssDecoderLayer(MixtralDecoderLayer):
    attention_class: ClassVar[type[nnx.Module]] = GptOssAttention
    moe_class: ClassVar[type[nnx.Module]] = GptOssMLP


class GptOssModel(MixtralModel):
    layer_class: ClassVar[type[nnx.Module]] = GptOssDecoderLayer
    mask_per_layer: ClassVar[bool] = True

    @staticmethod
    def check_scan(config) -> None:
        """Sliding and full layers scan: each reads its window's mask by index."""


class _GptOssCheckpoints:
    """The checkpoint is the in-memory layout, its experts possibly MXFP4 (dequantized on load);
    ``save_pretrained`` writes the float layout, as transformers' does for an unquantized model."""

    fused_adapter_tensors = None  # transformers 4 kept the experts fused too: no per-expert adapters

    def load_hf_state_dict(self, state_dict: Mapping[str, np.ndarray], *, source: str = "state dict",
                           seed: int | None = None) -> None:
        super().load_hf_state_dict(_Mxfp4Experts(state_dict, source), source=source, seed=seed)

    def checkpoint_layout(self, state: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        return state


class GptOssForCausalLM(_GptOssCheckpoints, MixtralForCausalLM):
    """GPT-OSS: sinks and alternating sliding windows in attention, a biased, clamped mixture of experts."""

    model_class: ClassVar[type[nnx.Module]] = GptOssModel


class GptOssForSequenceClassification(_GptOssCheckpoints, LlamaForSequenceClassification):
    model_class: ClassVar[type[nnx.Module]] = GptOssModel


class GptOssForTokenClassification(_GptOssCheckpoints, LlamaForTokenClassification):
    model_class: ClassVar[type[nnx.Module]] = GptOssModel


register(GptOssForCausalLM, model_types=("gpt_oss",), default=True)
register(GptOssForSequenceClassification)
register(GptOssForTokenClassification)
