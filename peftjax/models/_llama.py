"""The Llama family (Llama 1-3, Mistral, Qwen2) in Flax NNX, with transformers' module names.

Grouped-query attention, RoPE (default, linear, llama3, yarn, dynamic, longrope), RMSNorm, SwiGLU,
optional q/k/v biases (Qwen2), tied embeddings, and sliding-window layers where the config sets
them. Qwen3 (``_qwen3``) and Phi-3 (``_phi3``) subclass the attention and MLP here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models import _attention as attn
from peftjax.models._auto import register
from peftjax.models._dropout import dropout, token_classifier_dropout
from peftjax.nn._dropout import layer_key, split_keys
from peftjax.nn._functional import swiglu
from peftjax.models._generation import GenerationMixin
from peftjax.models._losses import (
    causal_lm_head_loss,
    pool_last_token,
    pool_last_token_of_segments,
    sequence_classification_loss,
    span_outputs,
    token_labels_loss,
)
from peftjax.models._modeling import ConfigRef, PreTrainedModel
from peftjax.models._outputs import ModelOutput, kept_positions
from peftjax.models._rope import apply_rotary, rotary_embedding
from peftjax.nn._activations import ACTIVATIONS
from peftjax.nn._scan import check_remat, make_layers, run_layers
from peftjax.nn._norm import RMSNorm


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _biases(config) -> tuple[bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP bias) for the config's model type."""
    if config.model_type == "qwen2":
        return True, False, False
    if config.model_type == "qwen2_moe":
        return bool(getattr(config, "qkv_bias", True)), False, False
    if config.model_type == "phi3":  # transformers' Phi-3 has no biases, whatever attention_bias says
        return False, False, False
    if config.model_type == "phi":  # biases on every projection, always
        return True, True, True
    if config.model_type in ("ernie4_5", "ernie4_5_moe", "starcoder2"):  # one flag for every projection
        bias = bool(getattr(config, "use_bias", config.model_type == "starcoder2"))
        return bias, bias, bias
    if config.model_type == "opt":  # one flag for every projection, the MLP's too
        bias = bool(getattr(config, "enable_bias", True))
        return bias, bias, bias
    if config.model_type == "gpt_neo":  # the output projection's and the MLP's only
        return False, True, True
    if config.model_type == "stablelm":  # q/k/v only, by their flag
        return bool(getattr(config, "use_qkv_bias", False)), False, False
    if config.model_type in ("glm", "glm4", "glm4_moe"):  # q/k/v only
        return bool(config.attention_bias), False, False
    if config.model_type == "nemotron_h":  # attention never biased, whatever attention_bias says
        return False, False, bool(getattr(config, "mlp_bias", False))
    if config.model_type == "seed_oss":  # the output projection's has a flag of its own
        return (bool(config.attention_bias), bool(getattr(config, "attention_out_bias", False)),
                bool(getattr(config, "mlp_bias", False)))
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias, bool(getattr(config, "mlp_bias", False))


def sliding_windows(config) -> list[int | None]:
    """The attention window of each layer (``None``: full causal attention)."""
    n = config.num_hidden_layers
    if config.model_type == "gpt_neo":  # GPT-Neo's local layers see the last window_size tokens
        return [config.window_size if kind == "local" else None for kind in config.attention_layers]
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = sorted({t for t in layer_types} - {"full_attention", "sliding_attention"})
        if unknown:
            raise ValueError(f"layer_types {unknown} are not supported; supported: ['full_attention', "
                             f"'sliding_attention']")
        return [window if t == "sliding_attention" else None for t in layer_types]
    if config.model_type in ("mistral", "phi3", "mixtral", "phimoe", "qwen3_moe", "starcoder2",
                             "ministral3") and window is not None:
        return [window] * n
    return [None] * n


def layer_norm(config, **kw) -> nnx.LayerNorm:
    """A LayerNorm over the hidden size at ``layer_norm_epsilon`` (BLOOM's, Falcon's, GPT-J's,
    GPTBigCode's and GPT-Neo's norms)."""
    return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_epsilon, **kw)


class LlamaAttention(nnx.Module):
    out_name: ClassVar[str] = "o_proj"  # the output projection's attribute (Phi's: dense)

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.set_layout(config, layer_idx)
        qkv_bias, o_bias, _ = _biases(config)
        h, d = config.hidden_size, self.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(h, self.num_heads * d, use_bias=qkv_bias, **kw)
        self.k_proj = nnx.Linear(h, self.num_kv_heads * d, use_bias=qkv_bias, **kw)
        self.v_proj = nnx.Linear(h, self.num_kv_heads * d, use_bias=qkv_bias, **kw)
        setattr(self, self.out_name, nnx.Linear(self.num_heads * d, h, use_bias=o_bias, **kw))

    def set_layout(self, config, layer_idx: int) -> None:
        """Heads, head size, window, dropout and score scale: what every family's attention reads from the config."""
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = head_dim_of(config)
        self.window = self.mask_key(config, layer_idx)
        self.dropout_rate = float(getattr(config, "attention_dropout", 0.0) or 0.0)
        self.scale = self.head_dim**-0.5

    @staticmethod
    def mask_key(config, layer_idx: int):
        """Which of the decoder's masks the layer reads (Llama: its window; see ``LlamaModel.attention_masks``)."""
        return sliding_windows(config)[layer_idx]

    def project(self, x):
        """Queries ``[b, s, heads, head_dim]``, keys and values ``[b, s, kv_heads, head_dim]``, before RoPE."""
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        return q, k, v

    def rotate(self, x, cos, sin):
        """RoPE on queries or keys (GLM turns adjacent pairs instead of halves)."""
        return apply_rotary(x, cos, sin)

    def encode_positions(self, q, k, cos, sin, masks):
        """Queries and keys with their positions: RoPE on both (Llama 4 also reads ``masks``); as
        they are where the decoder has no RoPE (``cos`` ``None``: learned positions in the layers'
        input, as OPT's, or ALiBi in the scores, as BLOOM's)."""
        if cos is None:
            return q, k
        return self.rotate(q, cos, sin), self.rotate(k, cos, sin)

    def score_options(self, masks) -> dict:
        """A family's further arguments of ``dot_product_attention`` (GPT-OSS: its sinks; BLOOM: its
        ALiBi bias, from the decoder's ``masks``)."""
        return {}

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        b, s, _ = x.shape
        q, k, v = self.project(x)
        q, k = self.encode_positions(q, k, cos, sin, masks)
        if cache is not None:
            cache = attn.update_kv_cache(cache, k, v, cache_index)
            k, v = cache["k"], cache["v"]
        if prefix is not None:  # prefix keys are cached keys: no RoPE
            k, v = attn.prepend_prefix(k, prefix[0]), attn.prepend_prefix(v, prefix[1])
        mask = masks[self.window]
        out = attn.dot_product_attention(q, k, v, mask, scale=self.scale, dropout_rate=self.dropout_rate,
                                         dropout_rng=dropout_rng,
                                         causal_offset=attn.causal_offset(cache, prefix, cache_index),
                                         **self.score_options(masks))
        return self.project_out(out.reshape(b, s, -1)), cache

    def project_out(self, x):
        """The output projection of the heads' ``[b, s, heads * head_dim]``."""
        return getattr(self, self.out_name)(x)


class LlamaMLP(nnx.Module):
    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs, intermediate_size: int | None = None):
        _, _, bias = _biases(config)
        kw = dict(use_bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        h, i = config.hidden_size, intermediate_size or config.intermediate_size
        self.gate_proj = nnx.Linear(h, i, **kw)
        self.up_proj = nnx.Linear(h, i, **kw)
        self.down_proj = nnx.Linear(i, h, **kw)
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")

    def __call__(self, x):
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


class DenseMLP(nnx.Module):
    """``down(act(up(x)))``, no gate: the MLP of the LayerNorm decoders (Phi, GPT-NeoX, BLOOM, GPT-J,
    StarCoder2), its two layers under the family's ``names``, its width, activation (the config's
    ``activation_field``) and biases read from the config by the family's rules."""

    names: ClassVar[tuple[str, str]] = ("fc1", "fc2")
    activation_field: ClassVar[str] = "hidden_act"

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(use_bias=self.bias(config), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        width = self.width(config)
        up, down = self.names
        setattr(self, up, nnx.Linear(config.hidden_size, width, **kw))
        setattr(self, down, nnx.Linear(width, config.hidden_size, **kw))
        self.activation = self.activation_of(config)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{config.model_type}: {self.activation_field} {self.activation!r} is not supported; "
                             f"supported: {sorted(ACTIVATIONS)}")

    @staticmethod
    def width(config) -> int:
        return config.intermediate_size

    @classmethod
    def activation_of(cls, config) -> str:
        return getattr(config, cls.activation_field)

    @staticmethod
    def bias(config) -> bool:
        return True

    def __call__(self, x):
        up, down = self.names
        return getattr(self, down)(ACTIVATIONS[self.activation](getattr(self, up)(x)))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm attention and MLP; a family that differs only inside them names its own classes."""

    attention_class: ClassVar[type[nnx.Module]] = LlamaAttention
    mlp_class: ClassVar[type[nnx.Module]] = LlamaMLP

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = self.mlp_class(config, **kw)
        self.input_layernorm = self.make_norm(config, **kw)
        self.post_attention_layernorm = self.make_norm(config, **kw)
        self.resid_dropout_rate = residual_dropout_rate(config)

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        """Each branch's norm (StarCoder2's: a LayerNorm)."""
        return RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training); ``None``: no base-model dropout.

        With a key, the attention probabilities drop at ``attention_dropout``, and each branch's
        output at ``resid_pdrop`` before its residual add (Phi-3's; Llama's is 0).
        """
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, masks, cache, cache_index, prefix, attn_key)
        x = x + dropout(a, self.resid_dropout_rate, attn_out_key)
        return x + dropout(self.mlp(self.post_attention_layernorm(x)), self.resid_dropout_rate, mlp_out_key), cache


def residual_dropout_rate(config) -> float:
    """Phi's and Phi-3's ``resid_pdrop``, Seed-OSS's ``residual_dropout``: each branch's output,
    before its residual add (0 elsewhere)."""
    return float(getattr(config, "resid_pdrop", None) or getattr(config, "residual_dropout", 0.0) or 0.0)


class ParallelDecoderLayer(LlamaDecoderLayer):
    """One norm (``make_norm``), then attention and MLP side by side on its output, both added to
    the residual, each after the residual dropout (Command R's and Phi's blocks)."""

    make_norm: ClassVar[Callable[..., nnx.Module]]

    def __init__(self, config, layer_idx: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = self.attention_class(config, layer_idx, **kw)
        self.mlp = self.mlp_class(config, **kw)
        self.input_layernorm = self.make_norm(config, **kw)
        self.resid_dropout_rate = residual_dropout_rate(config)

    def __call__(self, x, cos, sin, masks, cache=None, cache_index=None, prefix=None, dropout_rng=None):
        """``dropout_rng``: the layer's dropout key (training): ``attention_dropout`` on the
        attention probabilities, the residual dropout on each branch's output; ``None``: none."""
        attn_key, attn_out_key, mlp_out_key = split_keys(dropout_rng, 3)
        n = self.input_layernorm(x)
        a, cache = self.self_attn(n, cos, sin, masks, cache, cache_index, prefix, attn_key)
        a = dropout(a, self.resid_dropout_rate, attn_out_key)
        return x + a + dropout(self.mlp(n), self.resid_dropout_rate, mlp_out_key), cache


def kv_layout(config) -> tuple[int, int]:
    """``(key/value heads, head dim)`` of every layer's attention."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim_of(config)


def decoder_packs(decoder: type) -> bool:
    """Whether a decoder class runs packed rows: it says so (``packs_sequences``) and its call
    takes ``segment_ids``."""
    return bool(getattr(decoder, "packs_sequences", False)) and (
        "segment_ids" in inspect.signature(decoder.__call__).parameters)


def packed_kwargs(model, segment_ids) -> dict:
    """What a task model passes its decoder for packed rows: ``{"segment_ids": ...}``, or nothing
    without them.

    Raises:
      ValueError: packed rows for a model whose decoder does not run them (``packs_sequences``).
    """
    if segment_ids is None:
        return {}
    if not model.packs_sequences:
        raise ValueError(f"{type(model).__name__} does not run packed rows (segment_ids)")
    return {"segment_ids": segment_ids}


class LlamaModel(nnx.Module):
    """The decoder stack: ``embed_tokens``, ``layers``, ``norm``."""

    layer_class: ClassVar[type[nnx.Module]] = LlamaDecoderLayer
    embed_name: ClassVar[str] = "embed_tokens"  # the input embeddings' attribute (GPT-NeoX's: embed_in)
    layers_name: ClassVar[str] = "layers"  # the layers' attribute (BLOOM's: h)
    norm_name: ClassVar[str] = "norm"  # the final norm's attribute (Phi's: final_layernorm)
    # the config's field of the embeddings' dropout rate (Phi's embd_pdrop); None: no such dropout
    # (and the dropout key goes to the layers whole)
    embedding_dropout: ClassVar[str | None] = None
    # whether the decoder can run packed rows (segment_ids: several sequences end to end, each
    # attending to itself alone, its positions restarting): every layer reads its attention mask
    # and position ids and nothing else of the row (a family whose RoPE or masks depend on more
    # turns it off)
    packs_sequences: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # a family naming its embeddings or layers otherwise is read by Llama's names too
        for llama_name, own in (("embed_tokens", cls.embed_name), ("layers", cls.layers_name)):
            if own != llama_name and llama_name not in cls.__dict__:
                setattr(cls, llama_name, property(lambda self, own=own: getattr(self, own)))

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = ConfigRef(config)
        setattr(self, self.embed_name, self.make_embedding(config, **kw))
        # peftjax options set on the config (see nn._scan): layers stacked and scanned; remat policy
        self.remat = check_remat(getattr(config, "remat", "none"))
        if getattr(config, "scan_layers", False):
            self.check_scan(config)
        setattr(self, self.layers_name, make_layers(
            config, lambda i, r: self.layer_class(config, i, dtype=dtype, param_dtype=param_dtype, rngs=r), rngs=rngs
        ))
        setattr(self, self.norm_name, self.make_norm(config, **kw))
        # static data, not state: it never trains and is rebuilt from the config
        self.rotary = self.make_rotary(config)

    def final_norm(self, x):
        """The final norm of the layers' output."""
        return getattr(self, self.norm_name)(x)

    def add_positions(self, x, position_ids):
        """The layers' input from the embeddings and positions (OPT adds learned position
        embeddings; here RoPE carries the positions, inside the attention)."""
        return x

    @staticmethod
    def make_embedding(config, **kw) -> nnx.Embed:
        """``embed_tokens`` (Gemma's scales its lookups)."""
        return nnx.Embed(config.vocab_size, config.hidden_size, **kw)

    @staticmethod
    def make_norm(config, **kw) -> nnx.Module:
        """The final ``norm`` (Gemma's multiplies by ``1 + weight``)."""
        return RMSNorm(config.hidden_size, epsilon=config.rms_norm_eps, **kw)

    @staticmethod
    def make_rotary(config):
        """The decoder's RoPE (a decoder with a RoPE per layer kind returns the one its kinds' shapes follow;
        ``None``: none, the layers get ``cos`` and ``sin`` as ``None``)."""
        return rotary_embedding(config, head_dim_of(config))

    @staticmethod
    def check_scan(config) -> None:
        """Refuses ``scan_layers=True`` where the stacked layers would differ (their windows)."""
        if len(set(sliding_windows(config))) > 1:
            raise ValueError(f"scan_layers=True needs one attention window for all layers; "
                             f"found {sliding_windows(config)}")

    def attention_masks(self, pos: attn.DecoderPositions, segment_ids=None) -> dict:
        """What every layer's attention may read, by key (Llama: each window's ``[b, 1, q, k]`` mask;
        a layer reads the one of its :meth:`LlamaAttention.mask_key`); with ``segment_ids`` (packed
        rows), within each token's own sequence only."""
        return {w: attn.within_segments(attn.attention_mask_4d(pos.query_positions, pos.key_mask, causal=True,
                                                               window=w), segment_ids)
                for w in set(sliding_windows(self.config))}

    def packed_inputs(self, segment_ids, attention_mask, position_ids, cache, prefix_kv) -> tuple:
        """``(segment_ids, attention_mask, position_ids)`` of a call with packed rows: the positions
        restart at each sequence and the mask covers its tokens, unless given; unchanged without
        ``segment_ids``.

        Raises:
          ValueError: packed rows with a cache or a prefix, or in a decoder that does not pack.
        """
        if segment_ids is None:
            return None, attention_mask, position_ids
        if cache is not None or prefix_kv is not None:
            raise ValueError("segment_ids (packed rows) is for training and scoring: not with a cache or prefix_kv")
        if not self.packs_sequences:
            raise ValueError(f"{type(self).__name__} does not run packed rows (segment_ids)")
        segment_ids = jnp.asarray(segment_ids)
        if position_ids is None:
            position_ids = attn.segment_positions(segment_ids)
        if attention_mask is None:
            attention_mask = segment_ids > 0
        return segment_ids, attention_mask, position_ids

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
        prefix_kv=None,
        dropout_rng=None,
        segment_ids=None,
    ) -> ModelOutput:
        """Runs the decoder; ``prefix_kv`` follows the prefix attention protocol (``_attention``).

        ``dropout_rng``: a ``jax.random`` key to apply the config's dropout (training); ``None``: none.
        ``segment_ids``: ``[batch, seq]`` packed rows (``Batcher(packing=True)``): a positive id per
        sequence laid end to end, 0 on padding; each token attends causally within its own
        sequence, whose positions start at 0 (``position_ids`` default to that), so each
        sequence's hidden states are those it has alone. Not with a cache or a prefix. A family with
        an ``embedding_dropout`` drops from the embeddings (those passed in place of ids too), their
        learned positions added.
        """
        embed_key = None
        if self.embedding_dropout is not None:
            embed_key, dropout_rng = split_keys(dropout_rng, 2)
        segment_ids, attention_mask, position_ids = self.packed_inputs(segment_ids, attention_mask, position_ids,
                                                                       cache, prefix_kv)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(jnp.asarray(input_ids))
        x = jnp.asarray(inputs_embeds)
        b, s, _ = x.shape
        pos = attn.decoder_positions(
            b, s, attention_mask=attention_mask, position_ids=position_ids, cache=cache, cache_index=cache_index,
            prefix_kv=prefix_kv, num_layers=len(self.layers), owner=type(self).__name__,
            prefix_layout=lambda: kv_layout(self.config),
        )
        start = pos.start
        masks = self.attention_masks(pos, segment_ids)  # causal within each packed sequence
        x = self.add_positions(x, pos.position_ids)
        if self.embedding_dropout is not None:  # after learned positions are added (GPTBigCode's)
            x = dropout(x, float(getattr(self.config, self.embedding_dropout, 0.0) or 0.0), embed_key)
        cos, sin = (None, None) if self.rotary is None else self.rotary.cos_sin(pos.position_ids, x.dtype)
        new_cache = [] if cache is not None else None
        if cache is None and prefix_kv is None:  # training and scoring: scanned and/or rematerialised
            x = run_layers(self.layers, lambda layer, h, k: layer(h, cos, sin, masks, dropout_rng=k)[0], x,
                           self.remat, dropout_rng)
        for i, layer in enumerate(self.layers if cache is not None or prefix_kv is not None else ()):
            prefix = None if prefix_kv is None else prefix_kv[i]
            x, layer_cache = layer(x, cos, sin, masks, None if cache is None else cache[i], start, prefix,
                                   layer_key(dropout_rng, i))
            if cache is not None:
                new_cache.append(layer_cache)
        return ModelOutput(last_hidden_state=self.final_norm(x), past_key_values=new_cache)


class DecoderUnderPrefix:
    """Mixin of a family whose task models keep the decoder under another name than ``model``
    (``base_model_prefix``: GPT-NeoX's ``gpt_neox``, BLOOM's and GPT-J's ``transformer``), as
    transformers names it; Llama's code reads it as ``model`` too."""

    @property
    def model(self):
        return getattr(self, self.base_model_prefix)


class LlamaForCausalLM(GenerationMixin, PreTrainedModel):
    """Causal LM: ``model`` (the decoder) and ``lm_head`` (absent when embeddings are tied)."""

    base_model_prefix: ClassVar[str] = "model"
    ignored_keys: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq",)
    model_class: ClassVar[type[nnx.Module]] = LlamaModel
    lm_head_bias: ClassVar[bool] = False  # Phi's head has one

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        if self.lm_head_bias and getattr(config, "tie_word_embeddings", False):  # a tied head would drop the bias
            raise ValueError(f"{config.model_type}: tie_word_embeddings=True is not supported ({type(self).__name__}'s "
                             "LM head has a bias of its own)")
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        # the decoder, under base_model_prefix (GPT-NeoX's: gpt_neox, which it also reads as ``model``)
        setattr(self, self.base_model_prefix, self.model_class(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = nnx.data(None)
        if not self.tied:
            self.lm_head = nnx.Linear(self.head_width(config), config.vocab_size, use_bias=self.lm_head_bias,
                                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def head_width(config) -> int:
        """The width of the decoder's output the head reads (OPT's: ``word_embed_proj_dim``)."""
        return config.hidden_size

    def _tied(self, key: str) -> bool:
        return self.tied and key == "lm_head.weight"

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        cache=None,
        cache_index=None,
        prefix_kv=None,
        dropout_rng=None,
        logits_to_keep=0,
        segment_ids=None,
    ) -> ModelOutput:
        """``dropout_rng``: a key to apply the config's dropout, as transformers' ``.train()``;
        ``logits_to_keep``: the positions whose logits are computed, as transformers' (0: all; ``n``:
        the last ``n``; 1-D indices: those), see :func:`~peftjax.models._outputs.kept_positions`;
        ``segment_ids``: packed rows, where :attr:`packs_sequences` (see ``LlamaModel``); their
        ``labels`` must not score a sequence's first token from the one before it (``Batcher``
        sets it to -100)."""
        out = self.model(input_ids, attention_mask, position_ids, inputs_embeds, cache, cache_index, prefix_kv,
                         dropout_rng, **packed_kwargs(self, segment_ids))
        h = out.last_hidden_state
        scaled = self.head_input(h)
        head_in = kept_positions(scaled, logits_to_keep, labels)
        logits = self.model.embed_tokens.attend(head_in) if self.lm_head is None else self.lm_head(head_in)
        loss = None
        if labels is not None:  # fused with lm_head when traced: the full logits are never held
            loss = causal_lm_head_loss(scaled, logits, jnp.asarray(labels), self.lm_head, self.model.embed_tokens)
        return ModelOutput(logits=logits, loss=loss, last_hidden_state=h, past_key_values=out.past_key_values)

    @property
    def packs_sequences(self) -> bool:
        """Whether the model runs packed rows (``segment_ids``): its decoder does and takes them."""
        return decoder_packs(type(self.model))

    def head_input(self, h):
        """What the LM head reads: the final hidden states (Granite divides them by its ``logits_scaling``)."""
        return h

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return attn.init_kv_cache(self.config.num_hidden_layers, batch, max_len, *kv_layout(self.config),
                                  dtype or self.dtype)


class DecoderWithHead(PreTrainedModel):
    """The decoder (``model_class``, under ``base_model_prefix``) and a new task head: the base of
    the decoders' sequence and token classifiers and question answering, whose checkpoints are
    the causal LM's without its ``lm_head`` or the task class's own."""

    base_model_prefix: ClassVar[str] = "model"
    optional_keys: ClassVar[tuple[str, ...]] = (r"score\.(weight|bias)",)
    ignored_keys: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq", r"lm_head\.weight")
    model_class: ClassVar[type[nnx.Module]] = LlamaModel

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        setattr(self, self.base_model_prefix, self.model_class(self.config, dtype=dtype, param_dtype=param_dtype,
                                                               rngs=rngs))

    head_width = staticmethod(LlamaForCausalLM.head_width)  # the task head reads the same width

    def decoder(self, input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv, dropout_rng,
                segment_ids=None) -> ModelOutput:
        return getattr(self, self.base_model_prefix)(input_ids, attention_mask, position_ids, inputs_embeds,
                                                     prefix_kv=prefix_kv, dropout_rng=dropout_rng,
                                                     **packed_kwargs(self, segment_ids))

    @property
    def packs_sequences(self) -> bool:
        """Whether the decoder runs packed rows (``segment_ids``), as ``LlamaForCausalLM``'s."""
        return decoder_packs(type(getattr(self, self.base_model_prefix)))

    def _align_prefix(self, keys: set[str], expected: set[str]) -> dict[str, str]:
        # a class keeping its decoder under another name (most question-answering classes:
        # ``transformer``) reads a causal LM's decoder, ``model.*``, as its own
        p = self.base_model_prefix
        if p != "model" and not any(k.startswith(p + ".") for k in keys) and any(k.startswith("model.") for k in keys):
            return {k: p + k[len("model"):] if k.startswith("model.") else k for k in keys}
        return super()._align_prefix(keys, expected)


class LlamaForSequenceClassification(DecoderWithHead):
    """Sequence classification: the decoder plus a ``score`` head read at the last real token."""

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.score = nnx.Linear(
            self.head_width(config), config.num_labels, use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        prefix_kv=None,
        dropout_rng=None,
        segment_ids=None,
        segment_starts=None,
    ) -> ModelOutput:
        """Classifies each row at its last non-pad token, as transformers' decoder classifiers do.

        ``segment_ids`` and ``segment_starts``: packed rows (``Batcher(packing=True)``, where
        :attr:`packs_sequences`): several sequences end to end, each attending to itself alone;
        one row of logits per sequence, read at its own last non-pad token (``labels`` one per
        sequence likewise).
        """
        if (segment_ids is None) != (segment_starts is None):
            raise ValueError("segment_ids and segment_starts come together (packed rows: Batcher(packing=True))")
        out = self.decoder(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv, dropout_rng,
                           segment_ids=segment_ids)
        logits = self.score(out.last_hidden_state)
        if segment_ids is None:
            pooled = pool_last_token(logits, input_ids, self.config.pad_token_id)
        else:
            pooled = pool_last_token_of_segments(logits, input_ids, self.config.pad_token_id, segment_ids,
                                                 jnp.asarray(segment_starts))
        loss = None if labels is None else sequence_classification_loss(pooled, jnp.asarray(labels), self.config)
        return ModelOutput(logits=pooled, loss=loss, last_hidden_state=out.last_hidden_state)


class LlamaForTokenClassification(DecoderWithHead):
    """Token classification (PEFT's ``TOKEN_CLS``): the decoder, dropout and a ``score`` head on every
    token, as transformers' decoder token classifiers (``GenericForTokenClassification``). Each
    token sees only the tokens before it (the decoder is causal)."""

    head_name: ClassVar[str] = "score"  # the head's attribute (GPT-NeoX's and BLOOM's: classifier)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        config = self.config
        self.dropout_rate = token_classifier_dropout(config)
        setattr(self, self.head_name, nnx.Linear(self.head_width(config), config.num_labels,
                                                 use_bias=bool(getattr(config, "token_classification_bias", True)),
                                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs))

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        labels=None,
        inputs_embeds=None,
        prefix_kv=None,
        dropout_rng=None,
    ) -> ModelOutput:
        """Classifies every token, ``[batch, seq, num_labels]``; ``labels`` (``[batch, seq]`` ints,
        ``-100`` where no label counts) add the mean cross entropy over the labelled tokens."""
        base_rng, head_rng = split_keys(dropout_rng, 2)
        out = self.decoder(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv, base_rng)
        logits = getattr(self, self.head_name)(dropout(out.last_hidden_state, self.dropout_rate, head_rng))
        return ModelOutput(logits=logits, loss=token_labels_loss(logits, labels),
                           last_hidden_state=out.last_hidden_state)


class LlamaForQuestionAnswering(DecoderWithHead):
    """Extractive question answering (PEFT's ``QUESTION_ANS``): the decoder and a biased
    ``qa_outputs`` giving every token a start and an end logit, as transformers'
    ``GenericForQuestionAnswering``. Each token sees only the tokens before it.

    transformers keeps this class's decoder under ``transformer`` (Llama, Qwen2, Qwen3, Qwen3-MoE,
    Seed-OSS and SmolLM3; Mistral, Mixtral and Qwen2-MoE: ``model``), so its files and PEFT's
    adapters for it name ``transformer.layers...``. A causal LM checkpoint's decoder (``model.*``)
    loads here as well; transformers 5 draws the decoder of those six families' classes at random
    instead (it looks for ``transformer.*`` keys, finds none and reports them missing), so from a
    causal LM checkpoint this class and transformers' agree only where the decoder is ``model``.
    """

    base_model_prefix: ClassVar[str] = "transformer"
    optional_keys: ClassVar[tuple[str, ...]] = (r"qa_outputs\.(weight|bias)",)

    def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qa_outputs = nnx.Linear(self.head_width(self.config), 2, dtype=dtype, param_dtype=param_dtype,
                                     rngs=rngs)

    def __call__(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        inputs_embeds=None,
        start_positions=None,
        end_positions=None,
        prefix_kv=None,
        dropout_rng=None,
    ) -> ModelOutput:
        """``start_logits`` and ``end_logits``, ``[batch, seq]``; ``start_positions`` and
        ``end_positions`` (``[batch]`` token indices) add transformers' loss (:func:`span_loss`)."""
        out = self.decoder(input_ids, attention_mask, position_ids, inputs_embeds, prefix_kv, dropout_rng)
        logits = self.qa_outputs(out.last_hidden_state)
        return ModelOutput(**span_outputs(logits, start_positions, end_positions),
                           last_hidden_state=out.last_hidden_state)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama with a sliding attention window."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: Llama with q/k/v biases and per-layer sliding windows."""


class MistralForSequenceClassification(LlamaForSequenceClassification):
    pass


class Qwen2ForSequenceClassification(LlamaForSequenceClassification):
    pass


class MistralForTokenClassification(LlamaForTokenClassification):
    pass


class Qwen2ForTokenClassification(LlamaForTokenClassification):
    pass


class MistralForQuestionAnswering(LlamaForQuestionAnswering):
    base_model_prefix: ClassVar[str] = "model"


class Qwen2ForQuestionAnswering(LlamaForQuestionAnswering):
    pass


for _cls, _type in (
    (LlamaForCausalLM, "llama"),
    (MistralForCausalLM, "mistral"),
    (Qwen2ForCausalLM, "qwen2"),
):
    register(_cls, model_types=(_type,), default=True)
for _cls in (LlamaForSequenceClassification, MistralForSequenceClassification, Qwen2ForSequenceClassification,
             LlamaForTokenClassification, MistralForTokenClassification, Qwen2ForTokenClassification,
             LlamaForQuestionAnswering, MistralForQuestionAnswering, Qwen2ForQuestionAnswering):
    register(_cls)
