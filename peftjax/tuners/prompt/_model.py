"""Prompt learning — prefix tuning, prompt tuning (multitask too) and P-tuning — computed and saved as HF PEFT does.

These methods change a model's inputs, not its layers:

- prefix tuning gives every attention layer ``V`` learned key/value entries, through the prefix
  attention protocol (``prefix_kv``; see ``peftjax.models._attention``);
- prompt tuning and P-tuning prepend ``V`` learned embeddings to the token embeddings
  (``inputs_embeds``); the attention mask grows by ``V`` ones, token type ids by ``V`` zeros, and
  per-token outputs (a causal LM's or a token classifier's logits, a question-answering model's
  start and end logits, a feature extractor's hidden states) have ``V + seq`` positions, as in
  PEFT. Labels move with the tokens (``PromptLearningModel.virtual_positions``).
- multitask prompt tuning is prompt tuning whose prompt each row's task (``task_ids``) scales
  element-wise by that task's low-rank matrix ``prefix_task_cols[t] @ prefix_task_rows[t]``.

Where the weights live: each adapter's :class:`PromptEncoder` sits in
``model.peft_prompt_encoders[name]`` with ``AdapterParam`` weights, and the model's class gets a
mixin (as LoRA layers get theirs, keeping the class name) whose ``__call__`` applies the active
adapter. So the model itself computes PEFT's forward: ``peftjax.split(model)`` sees the prompt
weights as trainable, ``make_train_step``'s default loss trains them, and ``generate`` uses them.
The encoders hold plain arrays, not ``nnx.Linear`` layers, so checkpoint I/O (``iter_hf_params``)
and LoRA targeting never see them; ``unload`` (or deleting the last prompt adapter) removes them
and restores the class.

On disk, as in PEFT: ``prompt_embeddings`` is the encoder's *output* (``[V, num_layers * 2 *
token_dim]`` for prefix tuning, ``[V, token_dim]`` otherwise; multitask prompt tuning adds its task
factors), never the MLP/LSTM weights; a
classifier or span head is saved as ``base_model.<head>.weight``. Loaded for inference, an encoder
is that one matrix; like PEFT, peftjax refuses to load one as trainable.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.nn._init import torch_linear
from peftjax.config import TaskType
from peftjax.models._multiple_choice import MultipleChoice
from peftjax.config._other import (
    CartridgeConfig,
    CPTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    MultitaskPromptTuningConfig,
    PromptLearningConfig,
    PromptTuningConfig,
    prepare_prompt_learning_config,
)
from peftjax.config._targeting import add_task_modules_to_save
from peftjax.nn._dropout import apply_dropout
from peftjax.tuners.prompt import _cpt
from peftjax.tuners.base import (
    AdapterLayer,
    AdapterParam,
    FrozenAdapterParam,
    ProjectedAdapterParam,
    add_saved_copy,
    match_modules_to_save,
    mixin_subclass,
    named_modules,
    original_class,
    outside_tasks,
    task_id_rows,
    task_rows,
    validate_adapter_name,
    with_base_signature,
)

PREFIX_TUNING, PROMPT_TUNING, P_TUNING, CARTRIDGE = "PREFIX_TUNING", "PROMPT_TUNING", "P_TUNING", "CARTRIDGE"
CPT = "CPT"
MULTITASK = "MULTITASK_PROMPT_TUNING"
# multitask prompt tuning's inits from a source run's file
SOURCE_INITS = ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
SUPPORTED_TASKS = tuple(t.value for t in (TaskType.CAUSAL_LM, TaskType.SEQ_CLS, TaskType.SEQ_2_SEQ_LM,
                                           TaskType.TOKEN_CLS, TaskType.QUESTION_ANS, TaskType.FEATURE_EXTRACTION))
# the module names PEFT's file format uses for a prompt-learning model's heads: no tuner wrapper
SAVED_PREFIX = "base_model."
# the bundled models' input embeddings, preferred over any other vocabulary-sized table
_WORD_EMBEDDING_NAMES = ("word_embeddings", "embed_tokens", "wte", "embed_in")


# ---------------------------------------------------------------- the encoders


def _linear(w: Mapping[str, jax.Array], name: str, x: jax.Array) -> jax.Array:
    """torch's ``nn.Linear`` with its ``[out, in]`` weight."""
    y = x @ w[f"{name}.weight"].T
    return y + along_last(w[f"{name}.bias"], y.ndim)


def _lstm_direction(x, w_ih, w_hh, b_ih, b_hh, *, reverse: bool) -> jax.Array:
    """One direction of one ``torch.nn.LSTM`` layer over ``x: [T, in]``; gates in torch's order i, f, g, o."""
    hidden = w_hh.shape[1]
    gates_x = x @ w_ih.T
    gates_x = gates_x + along_last(b_ih + b_hh, gates_x.ndim)

    def step(carry, g_x):
        h, c = carry
        i, f, g, o = jnp.split(g_x + h @ w_hh.T, 4)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

    zeros = jnp.zeros((hidden,), x.dtype)
    # reverse=True walks the sequence backwards but stacks the outputs in the original order, as torch does
    _, hs = jax.lax.scan(step, (zeros, zeros), gates_x, reverse=reverse)
    return hs


def bidirectional_lstm(
    x: jax.Array, weights: Mapping[str, jax.Array], num_layers: int, *, dropout: float = 0.0, path: str = ""
) -> jax.Array:
    """``torch.nn.LSTM(bidirectional=True, num_layers=num_layers)`` on one sequence ``[T, in]`` -> ``[T, 2h]``.

    ``weights`` uses torch's names (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...). Dropout falls
    between layers, only under an active ``peftjax.dropout_key``, as torch applies it in training.
    """
    for layer in range(num_layers):
        outs = []
        for suffix, reverse in (("", False), ("_reverse", True)):
            w = [weights[f"{kind}_l{layer}{suffix}"] for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            outs.append(_lstm_direction(x, *w, reverse=reverse))
        x = jnp.concatenate(outs, axis=-1)
        if layer < num_layers - 1:
            x = apply_dropout(x, dropout, f"{path}.lstm_head.l{layer}")
    return x


class PromptEncoder(nnx.Module):
    """One adapter's virtual tokens: PEFT's encoder weights (under torch's names) and their output.

    Calling it returns the matrix PEFT saves as ``prompt_embeddings``: ``[V, num_layers * 2 *
    token_dim]`` for prefix tuning, ``[V * num_transformer_submodules, token_dim]`` otherwise.

    Attributes:
      weights: ``{torch name: variable}``, e.g. ``embedding.weight``, ``transform.0.weight``
        (prefix projection), ``mlp_head.0.weight`` or ``lstm_head.weight_ih_l0`` (P-tuning),
        ``prefix_task_cols`` and ``prefix_task_rows`` (multitask prompt tuning: each task's
        ``[V, ranks]`` and ``[ranks, token_dim]`` factors); only the saved matrices in inference mode.
    """

    def __init__(self, config: PromptLearningConfig, *, word_embeddings: jax.Array | nnx.Embed | None, key: jax.Array):
        self.peft_type = config.peft_type
        self.task_type = config.task_type
        self.num_virtual_tokens = int(config.num_virtual_tokens)
        self.total_virtual_tokens = self.num_virtual_tokens * int(config.num_transformer_submodules)
        self.num_layers = int(config.num_layers)
        self.num_heads = int(config.num_attention_heads)
        self.token_dim = int(config.token_dim)
        self.inference_mode = bool(config.inference_mode)
        self.head = None  # "projection", "MLP", "LSTM" or None: what turns the embedding into the output
        self.lstm_layers = int(getattr(config, "encoder_num_layers", 1))
        self.dropout = float(getattr(config, "encoder_dropout", 0.0))
        self.kv_prefix = bool(config.kv_prefix)  # prefix tuning, Cartridge: per-layer keys and values
        self.num_frozen_tokens = int(getattr(config, "num_frozen_tokens", 0))  # Cartridge's leading frozen rows
        if self.kv_prefix and self.token_dim % self.num_heads:
            raise ValueError(
                f"token_dim {self.token_dim} is not a multiple of num_attention_heads {self.num_heads}"
            )
        if self.peft_type == CPT:  # what the template is and how it trains and is scored (see _cpt)
            self.cpt_token_ids = tuple(config.cpt_token_ids)
            self.cpt_types = tuple(config.cpt_tokens_type_mask)
            self.cpt_loss = (config.opt_weighted_loss_type, float(config.opt_loss_decay_factor))
            self.cpt_trained = _cpt.trained_rows(self.cpt_types)
            self.cpt_ball = _cpt.EpsilonBall(_cpt.token_radii(
                self.cpt_types, self.token_dim, config.opt_projection_epsilon, config.opt_projection_format_epsilon))
        arrays = self._init_arrays(config, word_embeddings, key)
        self.weights = nnx.Dict({k: self._variable(k, v) for k, v in arrays.items()})

    def _variable(self, name: str, value: jax.Array) -> nnx.Variable:
        if self.inference_mode or name == "frozen_embedding" or (self.peft_type == CPT and name == "embedding.weight"):
            return FrozenAdapterParam(value)  # Cartridge's leading rows, CPT's template embeddings
        if self.peft_type == CPT:
            return ProjectedAdapterParam(value, projection=self.cpt_ball)
        return AdapterParam(value)

    def _init_arrays(self, config, word_embeddings, key) -> dict[str, jax.Array]:
        out_dim = self.num_layers * 2 * self.token_dim if self.kv_prefix else self.token_dim
        # PEFT's PrefixEncoder has V rows whatever the submodules; the embeddings have V per submodule
        n = self.num_virtual_tokens if self.kv_prefix else self.total_virtual_tokens
        d = self.token_dim
        if self.peft_type == MULTITASK:
            self.num_tasks = int(config.num_tasks)
            t, r = self.num_tasks, int(config.num_ranks)
            shapes = {"prefix_task_cols": (t, self.total_virtual_tokens, r), "prefix_task_rows": (t, r, d)}
        if self.peft_type == CARTRIDGE:  # the cache itself, N(0, 1) as torch's Embedding (zeros to be loaded)
            shapes = {"frozen_embedding": (self.num_frozen_tokens, out_dim),
                      "trainable_embedding": (n - self.num_frozen_tokens, out_dim)}
            draw = (lambda k, shape: jnp.zeros(shape, jnp.float32)) if self.inference_mode else (
                lambda k, shape: jax.random.normal(k, shape, jnp.float32))
            return {name: draw(k, shape) for k, (name, shape) in zip(jax.random.split(key), shapes.items())
                    if shape[0]}
        if self.peft_type == CPT and not self.inference_mode:  # the template's embeddings, a zero delta
            return {"embedding.weight": _token_embeddings(word_embeddings, self.cpt_token_ids),
                    "delta_embedding.weight": jnp.zeros((n, d), jnp.float32)}
        if self.inference_mode:  # PEFT skips the init: the saved output is loaded next
            arrays = {"embedding.weight": jnp.zeros((n, out_dim), jnp.float32)}
            if self.peft_type == MULTITASK:
                arrays.update({k: jnp.zeros(shape, jnp.float32) for k, shape in shapes.items()})
            return arrays
        keys = iter(jax.random.split(key, 4 + 4 * 2 * self.lstm_layers))
        hidden = getattr(config, "encoder_hidden_size", None) or d
        arrays: dict[str, jax.Array] = {}
        if self.peft_type == PREFIX_TUNING:
            zero = config.init_weights == "zero"
            if config.prefix_projection:
                self.head = "projection"
                arrays["embedding.weight"] = jax.random.normal(next(keys), (n, d), jnp.float32)
                w0, b0 = torch_linear(next(keys), d, hidden)
                w2, b2 = torch_linear(next(keys), hidden, out_dim)
                if zero:
                    w2, b2 = jnp.zeros_like(w2), jnp.zeros_like(b2)
                arrays.update({"transform.0.weight": w0, "transform.0.bias": b0,
                               "transform.2.weight": w2, "transform.2.bias": b2})
            else:
                shape = (n, out_dim)
                arrays["embedding.weight"] = (
                    jnp.zeros(shape, jnp.float32) if zero else jax.random.normal(next(keys), shape, jnp.float32)
                )
        elif self.peft_type == PROMPT_TUNING:
            arrays["embedding.weight"] = _prompt_tuning_init(config, n, d, word_embeddings, next(keys))
        elif self.peft_type == MULTITASK:  # PEFT's: the prompt as prompt tuning's, the factors N(0, 0.02)
            arrays["embedding.weight"] = _prompt_tuning_init(config, n, d, word_embeddings, next(keys))
            arrays.update({k: 0.02 * jax.random.normal(next(keys), shape, jnp.float32) for k, shape in shapes.items()})
            arrays.update(_source_init(config, {k: v.shape for k, v in arrays.items()}))
        else:  # P-tuning
            arrays["embedding.weight"] = jax.random.normal(next(keys), (n, d), jnp.float32)
            self.head = config.encoder_reparameterization_type
            if self.head == "LSTM":
                bound = 1.0 / math.sqrt(hidden)
                for layer in range(self.lstm_layers):
                    fan_in = d if layer == 0 else 2 * hidden
                    for suffix in ("", "_reverse"):
                        for kind, shape in (("weight_ih", (4 * hidden, fan_in)), ("weight_hh", (4 * hidden, hidden)),
                                            ("bias_ih", (4 * hidden,)), ("bias_hh", (4 * hidden,))):
                            arrays[f"lstm_head.{kind}_l{layer}{suffix}"] = jax.random.uniform(
                                next(keys), shape, jnp.float32, -bound, bound
                            )
                sizes = [(2 * hidden, 2 * hidden), (2 * hidden, d)]
            else:
                if config.encoder_num_layers != PromptEncoderConfig.encoder_num_layers:
                    warnings.warn(
                        f"for MLP, the argument `encoder_num_layers` is ignored. Exactly "
                        f"{PromptEncoderConfig.encoder_num_layers} MLP layers are used.",
                        stacklevel=4,
                    )
                sizes = [(d, hidden), (hidden, hidden), (hidden, d)]
            for i, (fan_in, fan_out) in enumerate(sizes):
                w, b = torch_linear(next(keys), fan_in, fan_out)
                arrays[f"mlp_head.{2 * i}.weight"], arrays[f"mlp_head.{2 * i}.bias"] = w, b
        return arrays

    def __call__(self) -> jax.Array:
        """The virtual tokens' output, ``[V * submodules, out]`` (what PEFT saves)."""
        w = {k: v.get_value() for k, v in self.weights.items()}
        if self.peft_type == CARTRIDGE:
            return jnp.concatenate([w[k] for k in ("frozen_embedding", "trainable_embedding") if k in w], axis=0)
        x = w["embedding.weight"]
        if "delta_embedding.weight" in w:  # CPT
            return x + _cpt.used_delta(w["delta_embedding.weight"], self.cpt_ball, self.cpt_trained)
        if self.head == "projection":
            return _linear(w, "transform.2", jnp.tanh(_linear(w, "transform.0", x)))
        if self.head == "MLP":
            x = jax.nn.relu(_linear(w, "mlp_head.0", x))
            return _linear(w, "mlp_head.4", jax.nn.relu(_linear(w, "mlp_head.2", x)))
        if self.head == "LSTM":
            lstm = {k[len("lstm_head."):]: v for k, v in w.items() if k.startswith("lstm_head.")}
            x = bidirectional_lstm(x, lstm, self.lstm_layers, dropout=self.dropout, path="peft_prompt_encoders")
            return _linear(w, "mlp_head.2", jax.nn.relu(_linear(w, "mlp_head.0", x)))
        return x

    def task_prompts(self, task_ids) -> jax.Array:
        """Multitask prompt tuning's virtual tokens for each row's task, ``[rows, V * submodules,
        token_dim]`` (one row for all when ``task_ids`` is left out of a single-task adapter): the
        shared prompt times ``prefix_task_cols[t] @ prefix_task_rows[t]``.

        Raises:
          ValueError: ``task_ids`` missing with several tasks, not 1-D integers, or (when known on
            the host) outside ``[0, num_tasks)``; traced ids out of range give NaN prompts.
        """
        ids = task_id_rows(task_ids, self.num_tasks, f"task_ids cannot be None: this multitask prompt tuning "
                                                     f"adapter has {self.num_tasks} tasks (num_tasks); pass each "
                                                     f"row's task id")
        if outside_tasks(ids, self.num_tasks):
            raise ValueError(f"task_ids: expected values in [0, {self.num_tasks}) (num_tasks), got {ids.tolist()}")
        w = {k: v.get_value() for k, v in self.weights.items()}
        cols, rows = task_rows(w["prefix_task_cols"], ids), task_rows(w["prefix_task_rows"], ids)
        return w["embedding.weight"][None] * (cols @ rows)

    def prefix_kv(self) -> list:
        """Per-layer ``(key, value)``, each ``[1, V, heads, head_dim]``: layer ``i`` takes PEFT's
        ``past_key_values[2i]`` and ``[2i + 1]``.

        For an encoder-decoder (``SEQ_2_SEQ_LM``) each decoder layer gets ``((key, value), None)``:
        PEFT fills the self-attention cache with the prefix and empties the cross-attention cache,
        and the encoder gets none (transformers' encoders take no cache). Which entries a layer
        gets follows PEFT's ``get_prompt`` (see below), so its files mean the same here.
        """
        v, L, h = self.num_virtual_tokens, self.num_layers, self.num_heads
        out = self()[:v].reshape(v, 2 * L, h, self.token_dim // h)
        if self.task_type == TaskType.SEQ_2_SEQ_LM:
            # PEFT concatenates the 2L entries with themselves and gives layer i the 4 entries from 4i
            # on, the first two to the self-attention: entries 4i and 4i + 1, modulo 2L
            return [((out[None, :, 4 * i % (2 * L)], out[None, :, (4 * i + 1) % (2 * L)]), None) for i in range(L)]
        return [(out[None, :, 2 * i], out[None, :, 2 * i + 1]) for i in range(L)]

    def load_prompt_embeddings(self, value, source: str = "prompt_embeddings") -> None:
        """Sets the encoder to output ``value``, the matrix PEFT saves as ``prompt_embeddings``
        (``[V, num_layers * 2 * token_dim]`` for a key/value prefix): a Cartridge's cache cut at its
        frozen tokens, else the embedding of an encoder without a head (inference mode, or prefix
        tuning without projection).

        Raises:
          ValueError: the shape differs from the encoder's output (names ``source``), or the encoder
            computes its output through a head (a projection, an MLP or LSTM) that a matrix cannot set.
        """
        value = np.asarray(value)
        expected = tuple(self().shape)
        if tuple(value.shape) != expected:
            raise ValueError(f"{source}: expected shape {list(expected)} (from num_virtual_tokens, token_dim, "
                             f"num_layers in the config), found {list(value.shape)}")
        if self.head is not None:
            raise ValueError(f"{source}: this {self.peft_type} encoder computes its output through its {self.head} "
                             "head; a matrix of virtual tokens sets only an encoder without one")
        if self.peft_type == CARTRIDGE:  # PEFT's load_prompt_embeddings
            parts = {"frozen_embedding": value[:self.num_frozen_tokens],
                     "trainable_embedding": value[self.num_frozen_tokens:]}
            self.set_weights({k: v for k, v in parts.items() if k in self.weights}, source)
        else:
            self.set_weights({"embedding.weight": value}, source)

    def set_weights(self, arrays: Mapping[str, np.ndarray], source: str = "weights") -> None:
        """Sets weights by torch name (e.g. from a PEFT encoder's ``state_dict()``); shapes are checked."""
        problems = [f"unknown weight {k!r}" for k in sorted(set(arrays) - set(self.weights.keys()))]
        for k, v in arrays.items():
            if k in self.weights and tuple(np.shape(v)) != tuple(self.weights[k].get_value().shape):
                problems.append(f"{k}: expected {tuple(self.weights[k].get_value().shape)}, found {tuple(np.shape(v))}")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems) + f" (weights: {sorted(self.weights.keys())})")
        for k, v in arrays.items():
            self.weights[k].set_value(jnp.asarray(v, jnp.float32))


def _source_init(config: MultitaskPromptTuningConfig, shapes: Mapping[str, tuple]) -> dict[str, jax.Array]:
    """Multitask prompt tuning's init from a source run's adapter file, as PEFT's: the shared
    prompt, with the mean of its tasks' factors (``AVERAGE_SOURCE_TASKS``) or one task's
    (``EXACT_SOURCE_TASK``), or the prompt alone (``ONLY_SOURCE_SHARED``).

    Raises:
      ValueError: a file other than ``.safetensors``, a missing tensor, shapes that do not fit
        the config (a single source task's factors fill ``num_tasks=1`` only, as in PEFT).
    """
    init, path = config.prompt_tuning_init, config.prompt_tuning_init_state_dict_path
    if init not in SOURCE_INITS:
        return {}
    if not str(path).endswith(".safetensors"):
        raise ValueError(f"prompt_tuning_init_state_dict_path {path!r}: expected a .safetensors file (peftjax "
                         f"does not unpickle torch files)")
    from safetensors.numpy import load_file

    source = load_file(path)
    wanted = ["prompt_embeddings"] + ([] if init == "ONLY_SOURCE_SHARED" else ["prefix_task_cols", "prefix_task_rows"])
    missing = [k for k in wanted if k not in source]
    if missing:
        raise ValueError(f"{path}: no {missing} for prompt_tuning_init={init!r}; found {sorted(source)}")
    out = {"embedding.weight": source["prompt_embeddings"]}
    if init != "ONLY_SOURCE_SHARED":
        for name in ("prefix_task_cols", "prefix_task_rows"):
            factors = source[name]
            if init == "AVERAGE_SOURCE_TASKS":
                out[name] = factors.mean(0, keepdims=True)
            else:
                task = config.prompt_tuning_init_task
                if not 0 <= task < len(factors):
                    raise ValueError(f"prompt_tuning_init_task {task}: {path} holds {len(factors)} source tasks")
                out[name] = factors[task][None]
    for name, value in out.items():
        if tuple(value.shape) != tuple(shapes[name]):
            key = "prompt_embeddings" if name == "embedding.weight" else name  # the file's name
            raise ValueError(f"{path}: {key} has shape {list(value.shape)}; this config (num_virtual_tokens, "
                             f"token_dim, num_ranks, num_tasks) needs {list(shapes[name])}")
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}


def _prompt_tuning_init(config: PromptTuningConfig, n: int, d: int, word_embeddings, key) -> jax.Array:
    """PEFT's ``PromptEmbedding`` init: N(0, 1), rows of random vocabulary, or of a text's tokens.

    ``word_embeddings`` is a ``[vocab, d]`` table or the model's ``nnx.Embed``; PEFT calls the
    embedding module, so a module's own lookup (Gemma's scaled one) is used when it is given.
    """
    init = config.prompt_tuning_init
    if init == "RANDOM" or init in SOURCE_INITS:  # a source file's prompt replaces this one
        return jax.random.normal(key, (n, d), jnp.float32)
    if word_embeddings is None:
        raise ValueError(f"prompt_tuning_init={init!r} needs the model's word embeddings; none were found")
    lookup, vocab = _lookup(word_embeddings)
    if init == "SAMPLE_VOCAB":
        ids = jax.random.randint(key, (n,), 0, vocab)
    else:  # TEXT
        from peftjax.io import load_tokenizer

        kwargs = dict(config.tokenizer_kwargs or {})
        kwargs.pop("trust_remote_code", None)  # as PEFT: a config must not run remote code
        tokenizer = load_tokenizer(config.tokenizer_name_or_path, **kwargs)
        ids = list(tokenizer(config.prompt_tuning_init_text)["input_ids"])
        if not ids:
            raise ValueError(f"prompt_tuning_init_text {config.prompt_tuning_init_text!r} tokenizes to nothing")
        ids = (ids * math.ceil(n / len(ids)))[:n]  # truncated, or repeated cyclically
        ids = jnp.asarray(ids, jnp.int32)
    return lookup(ids).astype(jnp.float32)


def _lookup(word_embeddings) -> tuple:
    """``(lookup, vocabulary size)`` of a ``[vocab, d]`` table or an ``nnx.Embed`` (whose own
    lookup is used, as PEFT calls the module: Gemma's is scaled)."""
    if isinstance(word_embeddings, nnx.Embed):
        return word_embeddings, word_embeddings.num_embeddings
    table = jnp.asarray(word_embeddings)
    return table.__getitem__, table.shape[0]


def _token_embeddings(word_embeddings, ids) -> jax.Array:
    """CPT's start: the embeddings of the template's tokens, in float32."""
    if word_embeddings is None:
        raise ValueError("CPT starts from the embeddings of cpt_token_ids; the model's word embeddings were not found")
    lookup, vocab = _lookup(word_embeddings)
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"cpt_token_ids: {bad} are outside the vocabulary [0, {vocab})")
    return lookup(jnp.asarray(ids, jnp.int32)).astype(jnp.float32)


# ---------------------------------------------------------------- the model mixin


def _active_encoder(model) -> PromptEncoder | None:
    if model.peft_prompt_disabled or not model.peft_prompt_active:
        return None
    return model.peft_prompt_encoders[model.peft_prompt_active[0]]


@functools.lru_cache(maxsize=None)
def _signature(fn) -> inspect.Signature:
    return inspect.signature(fn)


def _bind(fn, model, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by name (``**kwargs`` flattened), to edit and pass on as keywords."""
    sig = _signature(fn)
    bound = sig.bind(model, *args, **kwargs).arguments
    params = list(sig.parameters.values())
    bound.pop(params[0].name)
    out = {}
    for name, value in bound.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise TypeError(f"{type(model).__name__}: prompt learning cannot pass on *{name} arguments")
        else:
            out[name] = value
    return out


def _word_embed(model, ids) -> jax.Array:
    path = model.peft_word_embeddings
    if path is None:
        raise ValueError(f"{type(model).__name__}: no word embeddings were found for prompt learning")
    return _submodule(model, path)(jnp.asarray(ids))


def _submodule(model, path: str):
    node = model
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


# PEFT's warnings, word for word
_NO_POSITIONS = "Position ids are not supported for parameter efficient tuning. Ignoring position ids."
_NO_TOKEN_TYPES = "Token type ids are not supported for parameter efficient tuning. Ignoring token type ids"


def _drop(kwargs: dict, name: str, message: str) -> None:
    if kwargs.get(name) is not None:
        warnings.warn(message, stacklevel=4)
        kwargs[name] = None


# the tasks whose per-token outputs (logits, hidden states) and labels start with the virtual
# tokens' positions under prompt tuning and P-tuning
_PER_TOKEN_TASKS = (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS, TaskType.QUESTION_ANS, TaskType.FEATURE_EXTRACTION)
# the tasks whose PEFT forward drops token_type_ids (PEFT's _adjust_prompt_learning_kwargs)
_NO_TOKEN_TYPE_TASKS = (TaskType.CAUSAL_LM, TaskType.FEATURE_EXTRACTION)


def virtual_tokens(encoder: PromptEncoder, rows: int, dtype, task_ids=None) -> jax.Array:
    """The first ``V`` virtual tokens for ``rows`` rows, ``[rows, V, token_dim]``: the encoder's
    output, or multitask prompt tuning's per-task prompts (``task_ids``, which may be left out
    when the adapter has one task only: every row is task 0).

    Raises:
      ValueError: ``task_ids`` missing with several tasks, or one per row for another row count.
    """
    v = encoder.num_virtual_tokens
    if encoder.peft_type != MULTITASK:
        prompts = encoder()[None, :v]
    else:
        prompts = encoder.task_prompts(task_ids)[:, :v]
        if prompts.shape[0] not in (1, rows):
            raise ValueError(f"task_ids: expected one task id per row ({rows}) or one for all, got {prompts.shape[0]}")
    return jnp.broadcast_to(prompts.astype(dtype), (rows, v, prompts.shape[-1]))


def prompt_inputs(model, encoder: PromptEncoder, kwargs: dict, task_ids=None) -> dict:
    """The call's keyword arguments rewritten as PEFT's forward rewrites them (see the module doc).

    Where PEFT leaves the labels of a longer sequence as they were, they are moved with the tokens:
    a token classifier's labels get ``V`` times ``-100`` before them (PEFT's loss fails on the
    mismatched lengths), and a question-answering model's ``start_positions``/``end_positions``
    move ``V`` positions on (PEFT's loss scores the tokens ``V`` places before the answer).
    """
    v = encoder.num_virtual_tokens
    task = encoder.task_type
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    if ids is None and embeds is None and kwargs.get("encoder_outputs") is None:
        raise ValueError("prompt learning needs input_ids or inputs_embeds")
    if task in _NO_TOKEN_TYPE_TASKS:
        _drop(kwargs, "token_type_ids", _NO_TOKEN_TYPES)
    if encoder.kv_prefix:
        if kwargs.get("prefix_kv") is not None:
            raise ValueError("prefix_kv is set by the active prefix-tuning adapter; do not pass it as well")
        kwargs["prefix_kv"] = encoder.prefix_kv()
        if kwargs.get("position_ids") is not None:  # the prefix takes positions 0..V-1
            kwargs["position_ids"] = jnp.asarray(kwargs["position_ids"]) + v
        return kwargs
    if kwargs.get("cache") is not None or kwargs.get("encoder_outputs") is not None:
        # a generation step: `generate` prefilled (or encoded) the virtual tokens already
        return kwargs
    if embeds is None:
        embeds = _word_embed(model, ids)
    embeds = jnp.asarray(embeds)
    batch = embeds.shape[0]
    prompts = virtual_tokens(encoder, batch, embeds.dtype, task_ids)  # a seq2seq encoder gets the first V (PEFT)
    kwargs["inputs_embeds"] = jnp.concatenate([prompts, embeds], 1)
    kwargs["input_ids"] = None
    if kwargs.get("attention_mask") is not None:
        mask = jnp.asarray(kwargs["attention_mask"])
        kwargs["attention_mask"] = jnp.concatenate([jnp.ones((batch, v), mask.dtype), mask], axis=1)
    _drop(kwargs, "position_ids", _NO_POSITIONS)
    if kwargs.get("token_type_ids") is not None:
        types = jnp.asarray(kwargs["token_type_ids"])
        kwargs["token_type_ids"] = jnp.concatenate([jnp.zeros((batch, v), types.dtype), types], axis=1)
    if task in (TaskType.CAUSAL_LM, TaskType.TOKEN_CLS) and kwargs.get("labels") is not None:
        labels = jnp.asarray(kwargs["labels"])
        kwargs["labels"] = jnp.concatenate([jnp.full((batch, v), -100, labels.dtype), labels], axis=1)
    if task == TaskType.QUESTION_ANS:
        for name in ("start_positions", "end_positions"):
            if kwargs.get(name) is not None:
                kwargs[name] = jnp.asarray(kwargs[name]) + v
    return kwargs


class PromptLearningModel(AdapterLayer):
    """Mixin for a model carrying prompt-learning adapters; its ``__call__`` applies the active one."""

    adapter_state_attrs = ("peft_prompt_encoders", "peft_prompt_active", "peft_prompt_disabled", "peft_word_embeddings")

    def __call__(self, *args, task_ids=None, input_type_mask=None, **kwargs):
        """The model's call with the active adapter's virtual tokens; ``task_ids`` (one per row):
        the rows' tasks for a multitask prompt tuning adapter (ignored by the other methods, as in
        PEFT); ``input_type_mask`` (``[batch, seq]``): a CPT adapter's token types of the batch,
        which say which labels its loss scores (all, when left out; see ``CPTConfig``)."""
        base_call = self._peftjax_base.__call__
        encoder = _active_encoder(self)
        if input_type_mask is not None and getattr(encoder, "peft_type", None) != CPT:
            raise ValueError(f"input_type_mask is a CPT adapter's argument; the active adapter is "
                             f"{getattr(encoder, 'peft_type', 'none')}")
        if encoder is None:
            return base_call(self, *args, **kwargs)
        kwargs = _bind(base_call, self, args, kwargs)
        labels = kwargs.pop("labels", None) if encoder.peft_type == CPT else None
        out = base_call(self, **prompt_inputs(self, encoder, kwargs, task_ids))
        if labels is None:
            return out
        # CPT: the template's answers are scored too, weighted by example (PEFT's calculate_loss)
        labels, weights = _cpt.cpt_labels(labels, input_type_mask, encoder.cpt_token_ids, encoder.cpt_types,
                                          *encoder.cpt_loss)
        return out.replace(loss=_cpt.cpt_loss(out.logits, labels, weights))

    def virtual_positions(self) -> int:
        """How many positions the active adapter puts before each row's own in the model's per-token
        outputs (logits, hidden states) and labels: ``V`` for prompt tuning and P-tuning on a causal
        LM, a token classifier, a question-answering model or a feature extractor; 0 for prefix
        tuning (its virtual tokens are keys and values only), a sequence classifier (one output per
        row) and an encoder-decoder (the virtual tokens go into the encoder, not the decoder).

        A causal LM's labels get that many ``-100`` before them, so its loss also scores the first
        label, predicted from the last virtual token, as PEFT's does.
        """
        encoder = _active_encoder(self)
        if encoder is None or encoder.kv_prefix or encoder.task_type not in _PER_TOKEN_TASKS:
            return 0
        return encoder.num_virtual_tokens

    def adapter_names(self) -> tuple[str, ...]:
        return tuple(self.peft_prompt_encoders.keys())

    def set_active_adapters(self, names: tuple[str, ...]) -> None:
        self.peft_prompt_active = tuple(n for n in names if n in self.peft_prompt_encoders)

    def set_adapters_disabled(self, disabled: bool) -> None:
        self.peft_prompt_disabled = bool(disabled)

    def active_adapter_names(self) -> tuple[str, ...]:
        return self.peft_prompt_active

    def merged_adapter_names(self) -> tuple[str, ...]:
        return ()

    def merge_adapter(self, name: str) -> None:
        raise ValueError(
            f"adapter {name!r} is a prompt-learning adapter: it changes the inputs, not weights, so it cannot be "
            "merged into the model"
        )

    def unmerge_adapter(self, name: str) -> None:
        pass

    def delete_adapter(self, name: str) -> None:
        if name in self.peft_prompt_encoders:
            del self.peft_prompt_encoders[name]
        self.peft_prompt_active = tuple(n for n in self.peft_prompt_active if n != name)
        if not self.peft_prompt_encoders:  # the last one: the model is plain again
            self.remove_adapter_state()
            self.__class__ = original_class(self)

    def adapter_variable_dicts(self) -> tuple[nnx.Dict, ...]:
        # an encoder's variables are made frozen or trainable when it is built (``inference_mode``)
        return ()


class PromptLearningSeq2SeqModel(PromptLearningModel):
    """Mixin for an encoder-decoder: ``generate`` encodes prompt/P-tuning's virtual tokens first.

    As PEFT's ``PeftModelForSeq2SeqLM.generate``: the first ``V`` virtual tokens are prepended to
    the encoder's input embeddings (the mask grows by ``V`` ones); a prefix is passed to every
    decoder step by ``__call__``.
    """

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        base_generate = self._peftjax_base.generate
        encoder = _active_encoder(self)
        if encoder is None or encoder.kv_prefix:
            kwargs.pop("task_ids", None)
            return base_generate(self, input_ids, attention_mask, **kwargs)
        if input_ids is None:
            raise ValueError("input_ids must be provided for Peft model generation")  # PEFT's message
        embeds = _word_embed(self, jnp.asarray(input_ids, jnp.int32))
        b, n = embeds.shape[:2]
        v = encoder.num_virtual_tokens
        prompts = virtual_tokens(encoder, b, embeds.dtype, kwargs.pop("task_ids", None))
        mask = jnp.ones((b, n), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        return base_generate(self, None, jnp.concatenate([jnp.ones((b, v), jnp.int32), mask], axis=1),
                             inputs_embeds=jnp.concatenate([prompts, embeds], axis=1), **kwargs)


class PromptLearningCausalModel(PromptLearningModel):
    """Mixin for a generating model: ``generate`` prefills prompt/P-tuning's virtual tokens."""

    def generate(self, input_ids, attention_mask=None, **kwargs):
        base_generate = self._peftjax_base.generate
        encoder = _active_encoder(self)
        if encoder is None or encoder.kv_prefix:
            kwargs.pop("task_ids", None)
            # every forward step adds the prefix (PEFT's cache holds it) and shifts the positions by V
            return base_generate(self, input_ids, attention_mask, **kwargs)
        if kwargs.pop("position_ids", None) is not None:
            warnings.warn(_NO_POSITIONS, stacklevel=2)
        ids = jnp.asarray(input_ids, jnp.int32)
        embeds = kwargs.pop("inputs_embeds", None)
        embeds = _word_embed(self, ids) if embeds is None else jnp.asarray(embeds)
        b, n = embeds.shape[:2]
        v = encoder.num_virtual_tokens
        prompts = virtual_tokens(encoder, b, embeds.dtype, kwargs.pop("task_ids", None))
        mask = jnp.ones((b, n), jnp.int32) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
        # PEFT drops position ids, so the model counts positions over the whole prefill, padding included
        return base_generate(
            self,
            ids,
            jnp.concatenate([jnp.ones((b, v), jnp.int32), mask], axis=1),
            inputs_embeds=jnp.concatenate([prompts, embeds], axis=1),
            position_ids=jnp.broadcast_to(jnp.arange(v + n), (b, v + n)),
            **kwargs,
        )

    def _generation_prefix_length(self) -> int:
        encoder = _active_encoder(self)
        return encoder.num_virtual_tokens if encoder is not None and encoder.kv_prefix else 0


# ---------------------------------------------------------------- the tuner


def _call_parameters(model) -> Mapping[str, inspect.Parameter]:
    return _signature(original_class(model).__call__).parameters


def _check_protocol(model, config: PromptLearningConfig) -> None:
    params = _call_parameters(model)
    name = type(model).__name__
    if config.kv_prefix and "prefix_kv" not in params:
        raise TypeError(
            f"{name} does not implement peftjax's prefix attention protocol: its __call__ takes no `prefix_kv` "
            "argument. Prefix tuning needs a model whose attention layers prepend per-layer prefix keys/values "
            "(see peftjax.models._attention; the bundled Llama, GPT-2 and BERT models do)."
        )
    if not config.kv_prefix and "inputs_embeds" not in params:
        raise TypeError(
            f"{name}.__call__ takes no `inputs_embeds` argument, which {type(config).__name__} needs to prepend "
            "its virtual tokens to the token embeddings."
        )


def _find_word_embeddings(model, vocab_size: int | None) -> str | None:
    """The input embedding's path, as PEFT finds it: the known names, else a vocabulary-sized table."""
    embeds = {n: m for n, m in named_modules(model).items() if isinstance(m, nnx.Embed) and n}
    fits = [n for n, m in embeds.items() if vocab_size is None or m.num_embeddings == vocab_size]
    known = [n for n in fits if n.rsplit(".", 1)[-1] in _WORD_EMBEDDING_NAMES]
    return (known or fits or [None])[0]


def inject_prompt_learning(
    model: nnx.Module, config: PromptLearningConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> PromptLearningConfig:
    """Adds prompt-learning adapter ``adapter_name`` to ``model``, in place.

    Args:
      model: a bundled model, or any NNX model implementing the prefix attention protocol
        (prefix tuning) or taking ``inputs_embeds`` (prompt tuning, P-tuning).
      config: a ``PrefixTuningConfig``, ``CartridgeConfig``, ``PromptTuningConfig`` or ``PromptEncoderConfig`` with
        ``task_type`` ``"CAUSAL_LM"``, ``"SEQ_CLS"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``,
        ``"FEATURE_EXTRACTION"`` or ``"SEQ_2_SEQ_LM"`` (an encoder-decoder such as T5: prefixes
        on the decoder's self-attention, virtual tokens before the encoder's input, as PEFT's
        ``PeftModelForSeq2SeqLM``); unset shape fields come from
        ``model.config`` (``prepare_prompt_learning_config``, with PEFT's GQA rule).
      adapter_name: the adapter's name.
      key: the init key.

    Returns:
      The config with its model-shape fields and the task head's ``modules_to_save`` filled.

    Raises:
      TypeError: the model lacks the protocol the method needs (names class and argument).
      ValueError: an unsupported task type, a multiple-choice model (its inputs are ``[batch,
        choices, seq]``: PEFT's models take no virtual tokens or prefixes there either), or the
        adapter exists already.

    Example:
      >>> from transformers import LlamaConfig
      >>> from peftjax import PromptTuningConfig, models
      >>> model = models.LlamaForCausalLM.from_config(LlamaConfig(
      ...     vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      ...     num_attention_heads=4, num_key_value_heads=2))
      >>> config = inject_prompt_learning(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
      >>> model(input_ids=[[5, 6, 7]]).logits.shape  # the 3 virtual tokens come first
      (1, 6, 64)
      >>> config.token_dim, model.peft_prompt_encoders["default"]().shape
      (32, (3, 32))
    """
    validate_adapter_name(adapter_name)
    if not isinstance(config, PromptLearningConfig):
        raise TypeError(f"expected a prompt-learning config, got {type(config).__name__}")
    if isinstance(model, MultipleChoice):
        raise ValueError(f"{type(config).__name__} on {type(model).__name__}: prompt-learning methods do not "
                         "take multiple-choice inputs ([batch, choices, seq]); use LoRA, IA3, ... (weight adapters)")
    if config.task_type not in SUPPORTED_TASKS:
        raise ValueError(
            f"{type(config).__name__}: task_type {config.task_type!r} is not supported for prompt learning; "
            f"use one of {list(SUPPORTED_TASKS)}"
        )
    _check_protocol(model, config)
    model_config = getattr(model, "config", None)
    config = prepare_prompt_learning_config(config, model_config if model_config is not None else {})
    seq2seq = config.task_type == TaskType.SEQ_2_SEQ_LM
    if seq2seq != (config.num_transformer_submodules == 2) or not hasattr(type(model), "encode") and seq2seq:
        raise ValueError(
            f"{type(config).__name__}: num_transformer_submodules={config.num_transformer_submodules} with task_type "
            f"{config.task_type!r} on {type(model).__name__}: peftjax runs 2 submodules only for SEQ_2_SEQ_LM on an "
            "encoder-decoder model (with an `encode` method, e.g. T5ForConditionalGeneration), and 1 otherwise"
        )
    config = add_task_modules_to_save(config)
    if isinstance(model, PromptLearningModel) and adapter_name in model.peft_prompt_encoders:
        raise ValueError(f"adapter {adapter_name!r} already exists on {type(model).__name__}")
    word_path = _find_word_embeddings(model, getattr(model_config, "vocab_size", None))
    if word_path is None and not config.kv_prefix:
        raise TypeError(f"{type(model).__name__} has no nnx.Embed word embeddings for {type(config).__name__}")
    table = None
    starts_from_words = isinstance(config, CPTConfig) or (
        isinstance(config, PromptTuningConfig) and config.prompt_tuning_init != "RANDOM")
    if starts_from_words and not config.inference_mode:
        table = _submodule(model, word_path)
    encoder = PromptEncoder(config, word_embeddings=table, key=jax.random.key(0) if key is None else key)
    if not isinstance(model, PromptLearningModel):
        mixin = PromptLearningCausalModel if hasattr(type(model), "generate") else PromptLearningModel
        if seq2seq:
            mixin = PromptLearningSeq2SeqModel
        # no name prefix: configs and ``architectures`` keep naming the user's class
        model.__class__ = with_base_signature(mixin_subclass(type(model), mixin, ""), PromptLearningModel.__call__)
        model.peft_prompt_encoders = nnx.Dict()
        model.peft_prompt_active = ()
        model.peft_prompt_disabled = False
        model.peft_word_embeddings = word_path
    model.peft_prompt_encoders[adapter_name] = encoder
    if not model.peft_prompt_active:
        model.peft_prompt_active = (adapter_name,)
    modules = named_modules(model)
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


PROMPT_LEARNING_CONFIGS = (PrefixTuningConfig, PromptTuningConfig, MultitaskPromptTuningConfig, PromptEncoderConfig,
                           CartridgeConfig, CPTConfig)


def cpt_scored_labels(model, labels, input_type_mask=None):
    """Where the loss of ``model``'s active CPT adapter (a ``PeftModel`` or the NNX model) scores a
    batch's next-token labels, ``[rows, V + seq - 1]`` booleans: the template's answers and the
    batch's (see ``CPTConfig``); ``None`` where no CPT adapter is active. The count a training loop
    weighs such a batch's mean loss by."""
    if not isinstance(model, PromptLearningModel):
        model = getattr(model, "base_model", None)  # a PeftModel
    encoder = _active_encoder(model) if isinstance(model, PromptLearningModel) else None
    if encoder is None or encoder.peft_type != CPT:
        return None
    full, _ = _cpt.cpt_labels(labels, input_type_mask, encoder.cpt_token_ids, encoder.cpt_types, "none", 1.0)
    return full[:, 1:] != _cpt.IGNORE_INDEX


def virtual_positions(model) -> int:
    """How many positions a prompt or P-tuning adapter puts before each row's own in the per-token
    outputs of ``model`` (a ``PeftModel`` or the NNX model): the first ``V`` positions of a token
    classifier's or a causal LM's logits, of a question-answering model's start and end logits and
    of a feature extractor's hidden states belong to the virtual tokens, as in PEFT. 0 where no such
    adapter is active (prefix tuning adds keys and values only; a sequence classifier has one
    output per row).

    >>> from transformers import BertConfig
    >>> from peftjax import PromptTuningConfig, get_peft_model, models, virtual_positions
    >>> base = models.BertForTokenClassification.from_config(BertConfig(
    ...     vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48))
    >>> model = get_peft_model(base, PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3))
    >>> virtual_positions(model), model(input_ids=[[5, 6, 7, 8]]).logits.shape
    (3, (1, 7, 2))
    """
    method = getattr(model, "virtual_positions", None)
    if method is None and isinstance(getattr(model, "base_model", None), PromptLearningModel):
        method = model.base_model.virtual_positions  # a PeftModel
    return int(method()) if method is not None else 0
