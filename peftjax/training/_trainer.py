"""``Trainer``: the HF tutorial's training loop, jitted, resumable, and honest about its numbers.

The step is one jitted function over (adapters, optimizer state, frozen base, batch, key); the
loop keeps the per-step losses on the device and waits for them only when it logs, evaluates or
saves. Batches come in a few bucketed shapes, so the step compiles a bounded number of times.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import math
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.training._args import StepPlan, TrainingArguments, weight_decay_mask
from peftjax.training._cache import use_compilation_cache
from peftjax.training._checkpoint import list_checkpoints, load_checkpoint, prune_checkpoints, save_checkpoint
from peftjax.training._data import Batcher
from peftjax.training._precompile import Precompiler, abstract, first_batch_of_each_shape, signature
from peftjax.training._step import CompiledFirst, make_train_step, split
from peftjax.models._auto import TASK_CLASS_SUFFIXES
from peftjax.models._seq2seq_generation import is_seq2seq_lm
from peftjax.nn._dropout import active_dropout_key, fold_key
from peftjax.nn._keys import default_key, fold_in
from peftjax.nn._partitioned import traced_partitioned
from peftjax.tuners.base._variables import fresh_copy
from peftjax.tuners.lora import kasa_loss
from peftjax.tuners.prompt import cpt_scored_labels, virtual_positions

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# what packed batches add (Batcher(packing=True)), passed to a model that takes them
PACKED_INPUTS = ("segment_ids", "segment_starts")
# what a run writes into output_dir (besides checkpoint-N/): cleaned by overwrite_output_dir
RUN_FILES = ("metrics.jsonl", "training_curves.png", "runs", "adapter_config.json", "adapter_model.safetensors",
             "summary.json")


class TrainingError(RuntimeError):
    """Training stopped: a NaN loss, or data that cannot be trained on."""


@dataclasses.dataclass
class TrainOutput:
    """What ``Trainer.train`` returns."""

    global_step: int
    training_loss: float
    metrics: dict[str, float]


PROBLEM_TYPES = ("regression", "single_label_classification", "multi_label_classification")
CAUSAL_LM = "causal_lm"  # next-token prediction: the model's own (fused) loss
SEQ2SEQ_LM = "seq2seq_lm"  # an encoder-decoder's target tokens: labels are a second sequence
TOKEN_CLS = "token_classification"  # a label per token (-100: none), no shift: PEFT's TOKEN_CLS
QUESTION_ANS = "question_answering"  # each row's answer span, [start, end] token indices: PEFT's QUESTION_ANS
SPAN_COLUMNS = ("start_positions", "end_positions")  # a question-answering dataset's labels
TASK_COLUMN = "task_ids"  # each row's task, for the methods that route by it (Poly, multitask prompt tuning)
CPT_COLUMN = "input_type_mask"  # each token's type, for CPT's loss (PEFT's name)
# the methods whose rows each have a task: peft_type -> the config field counting the tasks
TASK_METHODS = {"MULTITASK_PROMPT_TUNING": "num_tasks", "POLY": "n_tasks"}


def _as_columns(dataset, name: str):
    """``dataset`` as columns: an HF ``Dataset`` or a mapping of lists as it is; a list of rows
    (mappings with the same keys, what a PyTorch map-style dataset of dicts holds) turned into one."""
    if hasattr(dataset, "column_names") or isinstance(dataset, Mapping):
        return dataset
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):
        rows = list(dataset)
        if not rows:
            raise TrainingError(f"{name} is empty")
        keys = None
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TrainingError(f"{name}[{i}] is a {type(row).__name__}; expected each row to be a mapping of "
                                    f"column names to values (such as {{'input_ids': [...], 'labels': ...}})")
            if keys is None:
                keys = list(row)
            elif set(row) != set(keys):
                raise TrainingError(f"{name}[{i}] has the columns {sorted(row)}; row 0 has {sorted(keys)}")
        return {k: [row[k] for row in rows] for k in keys}
    raise TrainingError(f"{name} is a {type(dataset).__name__}; expected an HF Dataset, a dict of columns or a "
                        f"list of rows (dicts)")


def _columns(dataset, name: str, *, collated_labels: bool = False) -> dict[str, list]:
    """The trainer's columns of a tokenized dataset (HF ``Dataset``, a dict of lists or a list of rows).

    ``collated_labels``: the data collator makes each batch's labels, so the rows must have none.
    """
    dataset = _as_columns(dataset, name)
    names = _names(dataset)
    if "input_ids" not in names:
        raise TrainingError(f"{name} has no input_ids column (columns: {names}); tokenize it first")
    cols = {k: list(dataset[k]) for k in (*MODEL_INPUTS, TASK_COLUMN, CPT_COLUMN) if k in names}
    if set(SPAN_COLUMNS) <= set(names):  # question answering: each row's [start, end] is its label
        cols["labels"] = [[s, e] for s, e in zip(dataset[SPAN_COLUMNS[0]], dataset[SPAN_COLUMNS[1]])]
        return cols
    label = "labels" if "labels" in names else "label" if "label" in names else None
    if collated_labels:
        if label is not None:
            raise TrainingError(f"{name} has a {label} column, but the data_collator makes each batch's labels "
                                "(it would mask rows already masked): pass the rows unmasked "
                                "(peftjax.training.tokenize_masked_lm(..., masking='dynamic'))")
        return cols
    if label is None:
        raise TrainingError(f"{name} has no labels or label column, nor start_positions and end_positions "
                            f"(columns: {names})")
    cols["labels"] = list(dataset[label])
    return cols


def infer_problem_type(labels, num_labels: int) -> str:
    """transformers' rule: one label is regression; integer labels single-label, float multi-label."""
    if num_labels == 1:
        return "regression"
    first = np.asarray(labels[0]) if len(labels) else np.zeros((), np.int64)
    return "single_label_classification" if np.issubdtype(first.dtype, np.integer) else "multi_label_classification"


def check_labels(labels, problem_type: str, num_labels: int, name: str) -> None:
    """Raises ``ValueError`` naming the first row whose label does not fit ``problem_type``."""
    for i, label in enumerate(labels):
        value = np.asarray(label)
        if problem_type == "single_label_classification":
            ok = value.ndim == 0 and np.issubdtype(value.dtype, np.integer) and 0 <= int(value) < num_labels
            want = f"an integer class in [0, {num_labels})"
        elif problem_type == "multi_label_classification":
            ok = value.shape == (num_labels,) and bool(np.all((value >= 0) & (value <= 1)))
            want = f"a vector of {num_labels} targets in [0, 1] (multi-hot)"
        else:
            ok = value.size == num_labels and np.issubdtype(value.dtype, np.number) and bool(np.all(np.isfinite(value)))
            want = f"{num_labels} finite number(s)"
        if not ok:
            raise ValueError(
                f"{name}: row {i} has label {label!r}; {problem_type} with num_labels={num_labels} needs {want} "
                "(set num_labels / problem_type on the model's config to match the data)"
            )


def _concatenate_rows(parts: list[np.ndarray], fill) -> np.ndarray:
    """The batches' rows in one array; per-token arrays of different bucket lengths are padded
    on the right to the longest with ``fill`` (labels with -100, which no metric should count)."""
    if parts and parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
        width = max(p.shape[1] for p in parts)
        parts = [np.pad(p, [(0, 0), (0, width - p.shape[1])] + [(0, 0)] * (p.ndim - 2), constant_values=fill)
                 for p in parts]
    return np.concatenate(parts)


def check_token_labels(cols: dict, num_labels: int, name: str) -> None:
    """Raises ``ValueError`` naming the first row whose labels are not one per token, each a class
    in ``[0, num_labels)`` or ``-100`` (no label: padding, a word's later sub-tokens)."""
    for i, (ids, label) in enumerate(zip(cols["input_ids"], cols["labels"])):
        value = np.asarray(label)
        ok = (value.ndim == 1 and len(value) == len(ids) and np.issubdtype(value.dtype, np.integer)
              and bool(np.all((value == -100) | ((value >= 0) & (value < num_labels)))))
        if not ok:
            raise ValueError(
                f"{name}: row {i} has labels {label!r}; token classification needs one label per input_ids token "
                f"({len(ids)} here), each a class in [0, {num_labels}) or -100 "
                "(peftjax.training.tokenize_token_classification aligns word labels to tokens)"
            )


def check_span_labels(cols: dict, name: str) -> None:
    """Raises ``ValueError`` naming the first row whose answer span is not two token indices
    ``start <= end`` inside the row (an answer outside it is conventionally ``[0, 0]``, the
    first token: :func:`peftjax.training.tokenize_question_answering` labels it so)."""
    for i, (ids, span) in enumerate(zip(cols["input_ids"], cols["labels"])):
        value = np.asarray(span)
        ok = (value.shape == (2,) and np.issubdtype(value.dtype, np.integer)
              and 0 <= int(value[0]) <= int(value[1]) < len(ids))
        if not ok:
            raise ValueError(
                f"{name}: row {i} has start_positions/end_positions {span!r}; question answering needs two token "
                f"indices start <= end inside the row ({len(ids)} tokens), [0, 0] for an answer it does not hold "
                "(peftjax.training.tokenize_question_answering)"
            )


def span_logits(out) -> jax.Array:
    """A question-answering model's ``start_logits`` and ``end_logits`` as one ``[batch, seq, 2]``
    array (the layout of transformers' ``qa_outputs``), which the Trainer treats as its logits."""
    return jnp.stack([out.start_logits, out.end_logits], axis=-1)


LOSS_SCALE = "loss_scale"  # a batch entry ([rows], one value) the training loss is multiplied by


def _with_loss_scale(batch: dict, scale: float) -> dict:
    return {**batch, LOSS_SCALE: np.full(len(batch["input_ids"]), scale, np.float32)}


def scored_labels(labels, first: bool):
    """Where a language model's loss scores ``labels`` ``[rows, length]`` (NumPy or JAX): every
    label but -100, from each row's second on unless ``first`` (a causal LM predicts label ``i + 1``
    at position ``i``; an encoder-decoder, or a prompt-learning model from its last virtual token,
    scores the first label too)."""
    return (labels if first else labels[:, 1:]) != -100


def _loss_terms(logits: jax.Array, labels: jax.Array, weight: jax.Array, problem_type: str | None):
    """Summed loss, the count it is averaged over, and correct predictions (classification).

    Filler rows (``weight`` 0, or label -100 for tokens) never count.
    """
    logits = logits.astype(jnp.float32)
    if problem_type == QUESTION_ANS:
        # transformers' loss: the mean of the start and the end cross entropy over the rows;
        # correct: rows whose likeliest start and end are both the labelled ones
        logp = jax.nn.log_softmax(logits, axis=1)  # over the positions, for the start and the end
        spans = labels.astype(jnp.int32)
        nll = -jnp.take_along_axis(logp, spans[:, None, :], axis=1)[:, 0, :]  # [batch, 2]
        exact = jnp.all(jnp.argmax(logits, axis=1) == spans, axis=-1)
        # a filler row's span may point at its masked positions (a huge loss): not added, not even as 0 * inf
        nll = jnp.where(weight[:, None] > 0, nll, 0.0)
        return jnp.sum(jnp.mean(nll, -1) * weight), jnp.sum(weight), jnp.sum(exact * weight)
    if problem_type in (CAUSAL_LM, SEQ2SEQ_LM, TOKEN_CLS) or (problem_type is None and logits.ndim == 3):
        if problem_type not in (SEQ2SEQ_LM, TOKEN_CLS):  # a decoder's input is already the labels shifted right
            logits, labels = logits[:, :-1], labels[:, 1:]
        valid = labels != -100
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * valid) if problem_type == TOKEN_CLS else jnp.zeros(())
        return jnp.sum(nll * valid), jnp.sum(valid).astype(jnp.float32), correct
    if problem_type == "regression":
        target = labels.astype(jnp.float32).reshape(logits.shape)
        err = jnp.mean(((logits - target) ** 2).reshape(logits.shape[0], -1), axis=-1)
        return jnp.sum(err * weight), jnp.sum(weight), jnp.zeros(())
    if problem_type == "multi_label_classification":
        target = labels.astype(jnp.float32)
        # binary cross-entropy with logits, the mean over labels as torch's BCEWithLogitsLoss
        bce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
        exact = jnp.all((logits > 0) == (target > 0.5), axis=-1)
        return jnp.sum(jnp.mean(bce, -1) * weight), jnp.sum(weight), jnp.sum(exact * weight)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]
    correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weight)
    return jnp.sum(nll * weight), jnp.sum(weight), correct


def _pyplot():
    """matplotlib's ``pyplot`` on the file-writing Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _import_pyplot_in_background() -> None:
    """Imports ``pyplot`` on a daemon thread, so that the plot a run writes at its end does not wait
    for the import (0.9 s on a 2-core host): it runs while the first step compiles, which releases
    the GIL. A failed import is left to :meth:`Trainer.plot`, which imports again and raises."""

    def run() -> None:
        try:
            _pyplot()
        except Exception:  # noqa: BLE001 - reported by plot()'s own import
            pass

    threading.Thread(target=run, name="peftjax-import-pyplot", daemon=True).start()


class Trainer:
    """Trains a ``PeftModel``'s adapters, like ``transformers.Trainer`` in the PEFT tutorial.

    The training loss is the task's; with a KaSA adapter (``LoraConfig(kasa_config=...)``) it adds
    KaSA's regularisers (:func:`peftjax.kasa_loss`), which PEFT leaves to the loop to add.

    Args:
      model: a ``peftjax.PeftModel`` (its adapters train; the base stays frozen).
      args: a :class:`TrainingArguments`.
      train_dataset: tokenized rows with ``input_ids`` (and ``attention_mask``,
        ``token_type_ids``) and ``labels``/``label``; an HF ``Dataset``, a dict of lists or a list
        of rows (dicts with those keys). For an encoder-decoder (``...ForConditionalGeneration``,
        ``MarianMTModel``: SEQ_2_SEQ_LM), ``labels`` are the target token lists
        (:func:`peftjax.training.tokenize_seq2seq`), padded to their own length with -100; the model
        feeds its decoder ``shift_right(labels)`` and trains on its own loss. For a token classifier
        (``...ForTokenClassification``, TOKEN_CLS), a label per token, -100 where none counts
        (:func:`peftjax.training.tokenize_token_classification`). For a question-answering
        model (``...ForQuestionAnswering``, QUESTION_ANS), ``start_positions`` and ``end_positions``
        instead of labels (:func:`peftjax.training.tokenize_question_answering`); its logits, for
        ``compute_metrics`` and ``predict``, are ``[rows, seq, 2]``: the start and end logits. For
        a masked LM (``...ForMaskedLM``), masked rows with a label per token
        (:func:`peftjax.training.tokenize_masked_lm`), or unmasked rows without labels and a
        ``data_collator`` that masks them.
      eval_dataset: the same, for evaluation.
      pad_token_id: the padding id (default: the model config's, else 0).
      compute_metrics: optional ``f(logits, labels) -> dict`` added to evaluation metrics; for an
        encoder-decoder, ``f(generated ids, labels)`` (``TrainingArguments.predict_with_generate``).
      data_collator: called on each padded batch of the train and eval datasets as
        ``data_collator(batch, rng)`` (see :class:`~peftjax.training.Batcher`'s ``collate``), such
        as :class:`~peftjax.training.DataCollatorForLanguageModeling`, which masks each training
        batch anew every epoch (its draw seeded by ``args.seed``, the epoch and the batch, so a
        resumed run draws what the stopped one would have) and each evaluation batch the same way
        at every evaluation (comparable losses). ``predict`` takes its rows as they are.
      mesh: a device mesh (``peftjax.sharding.make_mesh``) to train over. The model is placed on
        it under ``sharding`` when the Trainer is made; each step's batch holds
        ``per_device_train_batch_size`` rows per data-parallel device (the product of the
        ``data`` and ``fsdp`` axis sizes), as HF's global batch is per-device size times devices.
        On several hosts, every process runs the same Trainer on the same data (see
        ``docs/multi_host.md``).
      sharding: with ``mesh``: a preset (``"dp"``, ``"fsdp"``, ``"tp"``, ``"fsdp+tp"``...),
        ``(regex, PartitionSpec)`` pairs, or ``peftjax.sharding.ShardingRules``.
    """

    def __init__(
        self,
        model,
        args: TrainingArguments,
        train_dataset=None,
        eval_dataset=None,
        *,
        pad_token_id: int | None = None,
        compute_metrics: Callable[[np.ndarray, np.ndarray], Mapping[str, float]] | None = None,
        data_collator: Callable[[dict, np.random.Generator], dict] | None = None,
        mesh: jax.sharding.Mesh | None = None,
        sharding: Any = "dp",
    ):
        if not hasattr(model, "base_model") or not hasattr(model, "peft_config"):
            raise TypeError(f"Trainer needs a peftjax.PeftModel (from get_peft_model), got {type(model).__name__}")
        base_name = type(model.base_model).__name__
        # an encoder-decoder LM, whose labels are a second sequence (T5's classifiers and question
        # answering take the rows' labels as the encoders do: the model derives its decoder's input)
        encoder_decoder = is_seq2seq_lm(model)
        if encoder_decoder and compute_metrics is not None and not args.predict_with_generate:
            raise ValueError("compute_metrics with an encoder-decoder (SEQ_2_SEQ_LM) model reads the sequences it "
                             "generates: set TrainingArguments(predict_with_generate=True), as for transformers' "
                             "Seq2SeqTrainer")
        if args.predict_with_generate and not encoder_decoder:
            raise ValueError(f"predict_with_generate is for encoder-decoder (SEQ_2_SEQ_LM) models; {base_name} is not "
                             "one (a causal LM's completions: model.generate)")
        self._generates = bool(args.predict_with_generate)
        # adapters routing each row by its task: (name, peft_type, task count); their rows need a task_ids column
        self._task_adapters = [(name, config.peft_type, getattr(config, TASK_METHODS[config.peft_type]))
                               for name, config in model.peft_config.items()
                               if getattr(config, "peft_type", None) in TASK_METHODS]
        self.model = model
        self.args = args
        # before anything compiles: a later run of the same job reads the executables back
        self.compilation_cache_dir = use_compilation_cache(args.compilation_cache)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.compute_metrics = compute_metrics
        if data_collator is not None and not callable(data_collator):
            raise TypeError(f"data_collator must be callable as data_collator(batch, rng), "
                            f"got {type(data_collator).__name__}")
        self.data_collator = data_collator
        config = getattr(model.base_model, "config", None)
        self.num_labels = int(getattr(config, "num_labels", 2) or 2)
        if base_name.endswith("ForMaskedLM"):  # its classes are the vocabulary's tokens
            self.num_labels = int(config.vocab_size)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        self.pad_token_id = int(pad_token_id or 0)
        accepted = inspect.signature(type(model.base_model).__call__).parameters
        self.model_inputs = tuple(k for k in MODEL_INPUTS + PACKED_INPUTS if k in accepted)
        if self._task_adapters:
            self.model_inputs += (TASK_COLUMN,)
        # CPT's loss scores labels of its own (its template's answers too): batches carry token types
        self._cpt = getattr(model.peft_config.get(getattr(model, "active_adapter", None)), "peft_type", None) == "CPT"
        if self._cpt:
            self.model_inputs += (CPT_COLUMN,)
        self._model_loss = "labels" in accepted
        # the base model's own dropout (transformers' .train()) runs when it takes a key
        self._model_dropout = "dropout_rng" in accepted
        self._kasa = any(getattr(c, "kasa_config", None) is not None for c in model.peft_config.values())
        self._precompiler: Precompiler | None = None  # while train() runs: its background compilations
        self.problem_type = getattr(config, "problem_type", None)
        self._multiple_choice = base_name.endswith(TASK_CLASS_SUFFIXES["MULTIPLE_CHOICE"])
        if base_name.endswith(TASK_CLASS_SUFFIXES["CAUSAL_LM"]):
            self.problem_type = CAUSAL_LM
        elif base_name.endswith((*TASK_CLASS_SUFFIXES["TOKEN_CLS"], "ForMaskedLM")):
            # a masked LM scores a label per token as a token classifier does (over the vocabulary;
            # rows masked beforehand: peftjax.training.mask_tokens), never the next token's
            self.problem_type = TOKEN_CLS
        elif base_name.endswith(TASK_CLASS_SUFFIXES["QUESTION_ANS"]):
            self.problem_type = QUESTION_ANS
        elif self._multiple_choice:
            # a row's classes are its choices (how many: its data's), its label the right one's index
            self.problem_type = "single_label_classification"
        elif encoder_decoder:
            # the decoder input is shift_right(labels), which the model derives itself
            self.problem_type = SEQ2SEQ_LM
        elif self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"config.problem_type must be one of {PROBLEM_TYPES}, got {self.problem_type!r}")
        self.output_dir = Path(args.output_dir)
        self.log_history: list[dict[str, Any]] = []
        self.mesh, self.sharding = mesh, None
        if mesh is not None:
            from peftjax.sharding import as_rules, shard_model

            self.sharding = as_rules(sharding)
            shard_model(model.base_model, mesh, self.sharding)
        if args.bf16:
            dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model.base_model, nnx.Param))}
            if not any(d == jnp.bfloat16 for d in dtypes):
                raise ValueError("bf16=True needs the base model loaded with dtype='bfloat16'")

    # ------------------------------------------------------------ jitted pieces

    def _forward_terms(self, model, batch, *, logits: bool = True):
        """``(logits, (summed loss, count, correct))`` of a batch; ``logits=False``: ``(None, terms)``,
        and a language model's terms come from its own loss, which the bundled decoders fuse with the
        output projection, so that evaluation never holds ``[batch, seq, vocab]`` logits either."""
        inputs = {k: batch[k] for k in self.model_inputs if k in batch}
        labels = batch["labels"]
        virtual = virtual_positions(model)
        if (not logits or self._cpt) and self.problem_type in (CAUSAL_LM, SEQ2SEQ_LM) and self._model_loss:
            # the model's loss is the mean over the labels it scores: a causal LM's every next token
            # (CPT's: its template's answers and the batch's, weighted as it weighs them)
            count = jnp.sum(self._scored_labels(model, batch)).astype(jnp.float32)
            out = model(**inputs, labels=labels)
            return (out.logits if logits else None), (out.loss * count, count, jnp.zeros(()))
        if self.problem_type == SEQ2SEQ_LM:
            inputs["labels"] = labels
        out = self._logits(model(**inputs))
        scored, labels = self._scored(model, out, batch)
        terms = _loss_terms(scored, labels, batch["sample_weight"], self.problem_type)
        if virtual and self.problem_type in (TOKEN_CLS, QUESTION_ANS):
            out = out[:, virtual:]  # the rows' own tokens, as their labels are
        return out, terms

    def _loss(self, model, batch):
        """The training loss; inside the step, with the step's dropout key active."""
        key = active_dropout_key()
        extra = {"dropout_rng": fold_key(key, 1)} if self._model_dropout and key is not None else {}
        if self.problem_type in (CAUSAL_LM, SEQ2SEQ_LM) and self._model_loss:
            # the model's own loss, which the bundled decoders fuse with the output projection, so
            # the whole logits never exist (an encoder-decoder's decoder input is its labels shifted
            # right); filler rows carry label -100
            inputs = {k: batch[k] for k in self.model_inputs if k in batch}
            loss = model(**inputs, labels=batch["labels"], **extra).loss
        else:
            inputs = {k: batch[k] for k in self.model_inputs if k in batch}
            logits, labels = self._scored(model, self._logits(model(**inputs, **extra)), batch)
            total, count, _ = _loss_terms(logits, labels, batch["sample_weight"], self.problem_type)
            loss = total / jnp.maximum(count, 1.0)
        if LOSS_SCALE in batch:  # accumulation over token-scored micro-batches (see _loss_scales)
            loss = loss * jnp.mean(batch[LOSS_SCALE])
        if self._kasa:  # KaSA's regularisers, as PEFT asks a loop to add them (its _get_kasa_loss)
            loss = loss + kasa_loss(model)
        return loss

    def _logits(self, out) -> jax.Array:
        """A model output's logits: a question-answering model's start and end logits stacked."""
        return span_logits(out) if self.problem_type == QUESTION_ANS else out.logits

    def _scored(self, model, logits: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
        """The logits the loss scores and their labels.

        Where a prompt or P-tuning adapter puts ``V`` virtual tokens before each row
        (:func:`virtual_positions`), the labels move with the row's tokens: a language model's or
        a token classifier's get ``V`` times ``-100`` before them (so a causal LM's loss also scores
        the first label, from the last virtual token, as PEFT's does), a question-answering
        model's answer positions move ``V`` on. A question-answering model's logits are never
        scored at padding: its softmax runs over the row's positions (the virtual ones included),
        so that neither the loss nor the likeliest span depends on how far a bucket pads the row
        (transformers' loss counts the padded positions of however its batch was padded; the two
        agree on unpadded rows)."""
        labels, mask = batch["labels"], batch.get("attention_mask")
        virtual = virtual_positions(model)
        if virtual and self.problem_type == QUESTION_ANS:
            labels = labels + virtual
        elif virtual:
            labels = jnp.concatenate([jnp.full((labels.shape[0], virtual), -100, labels.dtype), labels], axis=1)
        if self.problem_type != QUESTION_ANS or mask is None:
            return logits, labels
        if virtual:
            mask = jnp.concatenate([jnp.ones((mask.shape[0], virtual), mask.dtype), mask], axis=1)
        return jnp.where(mask[..., None] > 0, logits, jnp.finfo(jnp.float32).min), labels

    def _token_weighted(self) -> bool:
        """Whether gradient accumulation weighs micro-batches by their scored tokens: a language
        model's (as transformers' Trainer does with ``num_items_in_batch``); a classifier's
        micro-batches count alike, each its rows' mean (transformers divides its loss by the steps)."""
        return self.args.gradient_accumulation_steps > 1 and self.problem_type in (CAUSAL_LM, SEQ2SEQ_LM)

    def _scored_labels(self, model, batch: dict):
        """Where a language model's loss scores the batch's labels (NumPy or JAX), whose count
        weighs its mean: :func:`scored_labels`, or an active CPT adapter's own."""
        cpt = cpt_scored_labels(model, batch["labels"], batch.get(CPT_COLUMN))
        return scored_labels(batch["labels"], self._scores_first_label(model)) if cpt is None else cpt

    def _scores_first_label(self, model) -> bool:
        """Whether a language model's loss scores each row's first label (see :func:`scored_labels`)."""
        return self.problem_type == SEQ2SEQ_LM or virtual_positions(model) > 0

    def _scaled_batches(self, batches: Iterator[dict], plan: StepPlan, micro: int) -> Iterator[dict]:
        """An epoch's ``batches`` from micro-batch ``micro`` (a step's first) on, each with its loss
        scale: its scored label tokens over its optimizer step's mean, so that the accumulated
        gradient (the micro-batches' mean) is that of the step's token-mean loss, however the
        tokens fall. Read a step ahead; no step spans two epochs (:class:`StepPlan`)."""
        batches = iter(batches)
        while group := list(itertools.islice(batches, plan.micro_batches(plan.steps_done(micro)))):
            counts = [int(np.sum(self._scored_labels(self.model.base_model, b))) for b in group]
            total = sum(counts)
            for batch, count in zip(group, counts):
                yield _with_loss_scale(batch, count * len(group) / total if total else 1.0)
            micro += len(group)

    def _make_step(self, graphdef, tx):
        name = getattr(self.model, "active_adapter", None)
        config = self.model.peft_config.get(name)
        if getattr(config, "peft_type", None) == "ADALORA" and not config.inference_mode:
            # AdaLoRA budgets ranks after each optimizer step with that step's gradients (PEFT's
            # update_and_allocate), and adds its orthogonal regulariser to the loss
            refused = [what for what, on in (("gradient_accumulation_steps > 1",
                                              self.args.gradient_accumulation_steps > 1),
                                             ("mesh=", self.mesh is not None)) if on]
            if refused:
                raise NotImplementedError(
                    f"Trainer with an AdaLoRA adapter and {', '.join(refused)} is not implemented")
            from peftjax.training._adalora import AdaLoraStep

            return CompiledFirst(AdaLoraStep(graphdef, tx, config, self._loss, adapter_name=name))
        return make_train_step(graphdef, tx, self._loss, mesh=self.mesh, rules=self.sharding)

    def _precompile(self, step_fn, batcher: Batcher, *, micro: int, until: int, trainable, opt_state, rest,
                    key) -> Precompiler | None:
        """Compiles on a background thread the step for each batch shape of the run's batches
        ``micro`` to ``until`` (at most two epochs read) but the first, which the step's first
        call compiles, then the evaluation for each of its shapes
        (:mod:`peftjax.training._precompile`). ``None`` where ``compile_ahead`` is off or the
        step is not a plain jitted one (a mesh, AdaLoRA). What has not started when training ends
        is dropped."""
        if (not self.args.compile_ahead or self.mesh is not None or not isinstance(step_fn, CompiledFirst)
                or hasattr(step_fn, "global_step")):
            return None
        state = abstract((trainable, opt_state, rest))
        jobs = []
        for batch in first_batch_of_each_shape(batcher, micro, until)[1:]:
            placed = self._place(_with_loss_scale(batch, 1.0) if self._token_weighted() else batch)
            jobs.append((("train", signature(placed)),
                         functools.partial(step_fn.lower, *state, abstract(placed), abstract(key))))
        if self.eval_dataset is not None:  # evaluated during training, or by evaluate() after it
            columns = self._dataset_columns(self.eval_dataset, "eval_dataset")
            evaluation = self._batcher(columns, self.args.per_device_eval_batch_size, "eval_dataset", shuffle=False,
                                       collate=self._eval_collate, per_row_logits=self.compute_metrics is not None)
            for batch in first_batch_of_each_shape(evaluation, 0, evaluation.num_batches):
                placed = self._place(batch)
                jobs.append((("eval", signature(placed)), functools.partial(
                    self._eval_step.lower, self._graphdef, (state[0], state[2]), abstract(placed))))
        return Precompiler(jobs) if jobs else None

    def _resolve_problem_type(self, cols: dict, name: str) -> None:
        """Fixes the problem type (from the config, else transformers' rule) and checks the labels."""
        if self.problem_type == CAUSAL_LM or "labels" not in cols:  # or the data collator makes them
            return
        if self.problem_type == TOKEN_CLS:
            check_token_labels(cols, self.num_labels, name)
            return
        if self.problem_type == QUESTION_ANS:
            check_span_labels(cols, name)
            return
        if self.problem_type == SEQ2SEQ_LM:
            bad = next((i for i, y in enumerate(cols["labels"]) if np.ndim(y) != 1), None)
            if bad is not None:
                raise ValueError(f"{name}: row {bad} has label {cols['labels'][bad]!r}; a SEQ_2_SEQ_LM model "
                                 "needs labels that are target token lists (peftjax.training.tokenize_seq2seq)")
            return
        if self._multiple_choice:
            self.num_labels = len(cols["input_ids"][0]) if len(cols["input_ids"]) else self.num_labels
        if self.problem_type is None:
            lengths = [len(x) for x in cols["input_ids"]]
            per_token = all(np.ndim(y) == 1 and len(y) == n for y, n in zip(cols["labels"], lengths))
            classifier = type(self.model.base_model).__name__.endswith("ForSequenceClassification")
            if per_token and not classifier:  # a user's language model: labels are its tokens
                self.problem_type = CAUSAL_LM
                return
            self.problem_type = infer_problem_type(cols["labels"], self.num_labels)
        check_labels(cols["labels"], self.problem_type, self.num_labels, name)

    @property
    def _eval_step(self):
        """The evaluation's compiled step: the loss terms, and the logits only where
        ``compute_metrics`` reads them."""
        logits = self.compute_metrics is not None and not self._generates  # generated ids are read instead
        return self._predict_step if logits else self._loss_step

    @functools.cached_property
    def _predict_step(self):
        return self._logits_step(logits=True)

    @functools.cached_property
    def _loss_step(self):
        return self._logits_step(logits=False)

    def _logits_step(self, *, logits: bool):
        def eval_step(graphdef, state, batch):
            return self._forward_terms(nnx.merge(graphdef, *state), batch, logits=logits)

        if self.mesh is None:
            return jax.jit(eval_step, static_argnums=0)
        from peftjax.sharding import replicated

        # replicated outputs: every process can read the logits and sums (several hosts)
        return jax.jit(traced_partitioned(eval_step), static_argnums=0, out_shardings=replicated(self.mesh))

    def _batcher(self, columns: dict, per_device: int, name: str, *, shuffle: bool, collate=None,
                 per_row_logits: bool = False) -> Batcher:
        """Batches of ``columns`` (the dataset ``name``), their tokens checked against the model's
        vocabulary; an encoder-decoder's labels are padded to their own length; packed where
        :meth:`packs`, unless a causal LM's logits are to be read row by row (``per_row_logits``:
        ``predict``, ``compute_metrics``); each passed through ``collate``."""
        targets = ("labels",) if self.problem_type == SEQ2SEQ_LM else ()
        causal = self.problem_type == CAUSAL_LM
        batcher = Batcher(columns, self._batch_size(per_device), pad_token_id=self.pad_token_id, shuffle=shuffle,
                          seed=self.args.seed, target_columns=targets,
                          packing=self.packs() and not (causal and per_row_logits), next_token_labels=causal,
                          collate=collate)
        vocab_size = getattr(getattr(self.model.base_model, "config", None), "vocab_size", None)
        if vocab_size:
            batcher.check_token_ids(int(vocab_size), name)
        return batcher

    def _dataset_columns(self, dataset, name: str) -> dict:
        """A train or eval dataset's columns, without labels where the data collator makes them;
        the problem type fixed and the labels checked."""
        collated = bool(getattr(self.data_collator, "makes_labels", False))
        cols = self._check_tasks(_columns(dataset, name, collated_labels=collated), name)
        self._resolve_problem_type(cols, name)
        return cols

    def _eval_collate(self, batch: dict, rng: np.random.Generator) -> dict:
        """The data collator on an evaluation batch, drawn from a stream of its own (a child of the
        batch's, not the one training's first epoch draws from for its batch of the same index)."""
        if self.data_collator is None:
            return batch
        return self.data_collator(batch, np.random.default_rng(rng.bit_generator.seed_seq.spawn(1)[0]))

    def _check_tasks(self, columns: dict, name: str) -> dict:
        """``columns`` with each row's task where an adapter routes by it: the dataset's ``task_ids``
        column, or task 0 for every row of a single-task adapter.

        Raises:
          TrainingError: a multi-task adapter and no ``task_ids`` column, or ids outside its tasks.
        """
        if not self._task_adapters:
            columns.pop(TASK_COLUMN, None)
            return columns
        if TASK_COLUMN not in columns:
            several = [(n, t, k) for n, t, k in self._task_adapters if k != 1]
            if several:
                adapter, peft_type, tasks = several[0]
                raise TrainingError(f"{name} has no {TASK_COLUMN} column, which {peft_type} adapter {adapter!r} "
                                    f"({tasks} tasks) needs: each row's task, an integer in [0, {tasks})")
            columns[TASK_COLUMN] = [0] * len(columns["input_ids"])
        ids = np.asarray(columns[TASK_COLUMN])
        for adapter, peft_type, tasks in self._task_adapters:
            bad = np.flatnonzero((ids < 0) | (ids >= tasks)) if ids.ndim == 1 and ids.dtype.kind in "iu" else [0]
            if len(bad):
                row = int(bad[0])
                raise TrainingError(f"{name}: {TASK_COLUMN} row {row} is {columns[TASK_COLUMN][row]!r}; "
                                    f"{peft_type} adapter {adapter!r} takes integers in [0, {tasks})")
        return columns

    def packs(self) -> bool:
        """Whether batches are packed (``TrainingArguments.packing``; by default wherever it can be).

        Packing needs a model that takes ``segment_ids`` and ``segment_starts`` (peftjax's BERT,
        and the decoder classifiers whose decoder packs) with one label per sequence
        (classification or regression), or a causal LM that runs
        packed rows (``packs_sequences``: Llama's decoder and those built on it, whose next-token labels
        the batches unlabel at each sequence's first token, so the loss is the unpacked one's);
        an adapter that is not prompt learning (whose virtual tokens go before each row), no
        routing by task, and no mesh.

        Raises:
          ValueError: ``packing=True`` where it cannot be done, saying why.
        """
        why = self._no_packing()
        if self.args.packing and why:
            raise ValueError(f"TrainingArguments.packing=True: {why}")
        return why is None if self.args.packing is None else bool(self.args.packing)

    def _no_packing(self) -> str | None:
        """Why this run cannot pack its batches, or ``None``."""
        base = self.model.base_model
        if self.problem_type == CAUSAL_LM:
            if "segment_ids" not in self.model_inputs or not getattr(base, "packs_sequences", False):
                return f"{type(base).__name__} does not run packed rows (segment_ids)"
        elif not set(PACKED_INPUTS) <= set(self.model_inputs):
            return f"{type(base).__name__} does not take {' and '.join(PACKED_INPUTS)}"
        elif not getattr(base, "packs_sequences", True):  # a decoder classifier whose decoder cannot
            return f"{type(base).__name__} does not run packed rows (segment_ids)"
        if self.problem_type in (SEQ2SEQ_LM, TOKEN_CLS):
            return f"a {self.problem_type} model's labels are per token, not one per sequence"
        if self.problem_type == QUESTION_ANS:
            return "a question-answering model's answer spans are token positions in their own row"
        config = self.model.peft_config.get(getattr(self.model, "active_adapter", None))
        if getattr(config, "is_prompt_learning", False):
            return f"{config.peft_type} puts its virtual tokens before each row"
        if getattr(config, "peft_type", None) == "SHADOW":
            return "a Shadow adapter's backbone runs each row whole"
        if getattr(config, "alora_invocation_tokens", None) is not None:
            return "an aLoRA adapter switches on at its invocation tokens in each row, and a packed row holds several"
        if self._task_adapters:
            return f"{self._task_adapters[0][1]} routes each row by its task"
        if self.mesh is not None:
            return "packed rows are not split over a mesh yet"
        return None

    def _batch_size(self, per_device: int) -> int:
        """The global batch: ``per_device`` rows on each data-parallel device."""
        if self.mesh is None:
            return per_device
        from peftjax.sharding import data_parallel_size

        return per_device * data_parallel_size(self.mesh)

    def _place(self, batch: dict) -> dict:
        """The host batch, or with a mesh, its rows split over the data-parallel devices."""
        if self.mesh is None:
            return batch
        from peftjax.sharding import shard_batch

        return shard_batch(batch, self.mesh)

    def _init_optimizer(self, tx, trainable, rest):
        if self.mesh is None:  # one compiled program, not an eager one per state shape
            return jax.jit(tx.init)(trainable)
        from peftjax.sharding import opt_state_shardings, state_shardings

        shardings = state_shardings(trainable, self.mesh, self.sharding, weights=rest)
        abstract = jax.eval_shape(tx.init, trainable)
        return jax.jit(tx.init, out_shardings=opt_state_shardings(abstract, trainable, shardings, self.mesh))(trainable)

    # ------------------------------------------------------------ public API

    def train(self, resume_from_checkpoint: str | bool | None = None) -> TrainOutput:
        """Runs training; returns the step count, mean training loss and final metrics."""
        args = self.args
        if self.train_dataset is None:
            raise TrainingError("Trainer.train needs a train_dataset")
        columns = self._dataset_columns(self.train_dataset, "train_dataset")
        self._prepare_output_dir(resume_from_checkpoint if resume_from_checkpoint is not None
                                 else args.resume_from_checkpoint)
        batcher = self._batcher(columns, args.per_device_train_batch_size, "train_dataset", shuffle=True,
                                collate=self.data_collator)
        total = args.total_steps(batcher.num_batches)
        plan = StepPlan(batcher.num_batches, args.gradient_accumulation_steps)
        end = plan.first_micro(total)  # micro-batches of the run
        if hasattr(self.model, "_check_live"):
            self.model._check_live("train")
        graphdef, trainable, rest = split(self.model.base_model)
        tx = args.optimizer(total, decay_mask=weight_decay_mask(trainable, self.model.base_model),
                            batches_per_epoch=batcher.num_batches)
        self._graphdef = graphdef
        # the step donates its inputs: work on a copy so the model keeps valid weights if training stops
        trainable = jax.tree.map(fresh_copy, trainable)
        opt_state = self._init_optimizer(tx, trainable, rest)
        micro = 0
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        if resume:
            path = self._resolve_checkpoint(resume)
            state, info = load_checkpoint(path, {"trainable": trainable, "opt_state": opt_state})
            if self.mesh is None:
                # restored arrays come back committed to their device, fresh ones are not: the step
                # would lower differently (parameter shardings) and miss the compilation cache
                state = jax.tree.map(lambda x: jax.device_put(np.asarray(x)), state)
            trainable, opt_state, micro = state["trainable"], state["opt_state"], int(info["micro_step"])
            if micro and not plan.ends_step(micro):  # checkpoints are written as steps end
                raise TrainingError(
                    f"{path} stopped inside an optimizer step (micro-batch {micro}, with {batcher.num_batches} "
                    f"batches an epoch grouped {plan.accum} a step): it was not written by this Trainer's "
                    f"step plan; resume from a checkpoint written at a step's end")
            self.log_history = info.get("log_history", [])
            if jax.process_index() == 0:  # records after the checkpoint belong to the stopped run
                self.output_dir.mkdir(parents=True, exist_ok=True)
                (self.output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.log_history))
            print(f"resumed from {path} at step {plan.steps_done(micro)}", file=sys.stderr)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if args.plot and jax.process_index() == 0:
            _import_pyplot_in_background()
        step_fn = self._make_step(graphdef, tx)
        if resume and hasattr(step_fn, "global_step"):
            raise NotImplementedError("resuming AdaLoRA training is not implemented (the rank allocator's statistics "
                                      "are not in the checkpoint)")
        base_key = default_key(args.seed)  # jax.random.key(seed), formed on the host
        self._precompiler = self._precompile(step_fn, batcher, micro=micro, until=end, trainable=trainable,
                                             opt_state=opt_state, rest=rest, key=base_key)
        schedule = jax.jit(args.schedule(total))  # the logged rate: one program, not an eager one per op
        writer = self._tensorboard()
        bar = self._progress(total, plan.steps_done(micro))
        pending: list[jax.Array] = []
        tokens, t_log, losses_seen = 0, time.perf_counter(), []
        last_ckpt = (list_checkpoints(self.output_dir) or [None])[-1]
        epoch, position = divmod(micro, batcher.num_batches)
        try:
            while micro < end:
                batches = batcher.batches(epoch, start=position)
                if self._token_weighted():
                    batches = self._scaled_batches(batches, plan, micro)
                for batch in batches:
                    key = fold_in(base_key, micro)  # jax.random.fold_in, on the host
                    placed = self._place(batch)
                    if self._precompiler is not None:
                        self._precompiler.wait(("train", signature(placed)))
                    trainable, opt_state, loss = step_fn(trainable, opt_state, rest, placed, key)
                    if self._precompiler is not None:  # the first step has compiled: the rest may
                        self._precompiler.start()
                    pending.append(loss)
                    tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].size
                    micro += 1
                    position += 1
                    if plan.ends_step(micro):
                        step = plan.steps_done(micro)
                        if bar is not None:
                            bar.update(1)
                        if step % args.logging_steps == 0 or step == total:
                            mean = self._drain(pending, step, last_ckpt)
                            losses_seen.append(mean)
                            now = time.perf_counter()
                            record = {"step": step, "epoch": round(micro / batcher.num_batches, 4), "loss": mean,
                                      "learning_rate": float(schedule(step - 1)),
                                      "tokens_per_second": tokens / max(now - t_log, 1e-9)}
                            tokens, t_log = 0, now
                            self._log(record, writer, bar)
                        if self._should_eval(step, epoch_end=False):
                            self._log({"step": step, **self._evaluate_state(trainable, rest)}, writer, bar)
                        if args.save_steps and step % args.save_steps == 0 and step < total:
                            self._drain(pending, step, last_ckpt, keep=True)
                            last_ckpt = self._save(step, micro, epoch, position, trainable, opt_state)
                    if micro >= end:
                        break
                else:
                    epoch, position = epoch + 1, 0
                    if args.eval_strategy == "epoch" and self.eval_dataset is not None:
                        self._log({"step": plan.steps_done(micro), **self._evaluate_state(trainable, rest)}, writer, bar)
                    continue
                break
        finally:
            if bar is not None:
                bar.close()
            if self._precompiler is not None:
                self._precompiler.close()
                self._precompiler = None
        if pending:
            losses_seen.append(self._drain(pending, plan.steps_done(micro), last_ckpt))
        nnx.update(self.model.base_model, trainable)
        if hasattr(step_fn, "global_step"):  # AdaLoRA: the final rank_pattern is saved with the adapter
            self.model.peft_config[step_fn.adapter_name] = step_fn.config
        metrics: dict[str, float] = {}
        if self.eval_dataset is not None and args.eval_strategy != "no":
            last = next((r for r in reversed(self.log_history) if "eval_loss" in r), None)
            if last is not None and last["step"] == plan.steps_done(micro):  # the loop just evaluated this state
                metrics = {k: v for k, v in last.items() if k.startswith("eval_")}
            else:
                metrics = self._evaluate_state(trainable, rest)
                self._log({"step": plan.steps_done(micro), **metrics}, writer, None)
        self.save_model()
        if writer is not None:
            writer.close()
        if args.plot and jax.process_index() == 0:
            self.plot()
        return TrainOutput(plan.steps_done(micro), float(np.mean(losses_seen)) if losses_seen else float("nan"), metrics)

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Loss (and accuracy, or perplexity for language modelling) on ``eval_dataset``."""
        graphdef, trainable, rest = split(self.model.base_model)
        self._graphdef = graphdef
        return self._evaluate_state(trainable, rest, eval_dataset)

    def predict(self, dataset) -> np.ndarray:
        """Logits for every row of a tokenized dataset, in order: ``[rows, labels]`` for a sequence
        classifier, ``[rows, length, labels]`` for a token classifier or a language model (rows of
        several bucket lengths padded on the right with 0), ``[rows, length, 2]`` for question
        answering (start and end logits); for an encoder-decoder (SEQ_2_SEQ_LM) with
        ``predict_with_generate``, the generated token ids ``[rows, generation_max_length]``.
        Labels, where the dataset has them, are not needed.

        Raises:
          NotImplementedError: an encoder-decoder without ``predict_with_generate``.
        """
        if self.problem_type == SEQ2SEQ_LM and not self._generates:
            raise NotImplementedError("Trainer.predict for an encoder-decoder (SEQ_2_SEQ_LM) model gives the "
                                      "sequences it generates: set TrainingArguments(predict_with_generate=True), "
                                      "or call model.generate(input_ids, attention_mask)")
        graphdef, trainable, rest = split(self.model.base_model)
        self._graphdef = graphdef
        dataset = _as_columns(dataset, "dataset")
        names = _names(dataset)
        if {"labels", "label"} & set(names) or set(SPAN_COLUMNS) <= set(names):
            cols = _columns(dataset, "dataset")
        else:
            cols = {k: list(dataset[k]) for k in (*MODEL_INPUTS, TASK_COLUMN, CPT_COLUMN) if k in names}
        if "input_ids" not in cols:
            raise TrainingError(f"dataset has no input_ids column (columns: {names}); tokenize it first")
        cols = self._check_tasks(cols, "dataset")
        if "labels" not in cols:
            cols["labels"] = self._stand_in_labels(cols["input_ids"])
        batcher = self._batcher(cols, self.args.per_device_eval_batch_size, "dataset", shuffle=False,
                                per_row_logits=True)
        out = []
        generating = nnx.merge(graphdef, trainable, rest) if self._generates else None
        for batch in batcher.batches(0):
            if generating is not None:
                out.append(self._generated(generating, batch))
                continue
            logits, _ = self._predict_step(graphdef, (trainable, rest), self._place(batch))
            logits = np.asarray(logits)[batch["sample_weight"] > 0]
            out.append(logits)
        return _concatenate_rows(out, 0.0)  # per-token logits: batches of several bucket lengths

    def _generated(self, model, batch) -> np.ndarray:
        """The batch's real rows generated by ``model`` (the base model with its adapters), as
        ``Seq2SeqTrainer`` generates them: ``[rows, length]`` token ids, the decoder's start token
        first, padded with ``pad_token_id`` to ``length``, the ``generation_max_length`` (else the
        generation config's ``max_length``, else 20)."""
        keep = batch["sample_weight"] > 0
        length = self.args.generation_max_length
        if length is None:
            defaults = getattr(model, "generation_config", None)
            length = int((defaults.get("max_length") if defaults is not None else None) or 20)
        ids = model.generate(batch["input_ids"][keep], batch["attention_mask"][keep], max_new_tokens=length - 1,
                             num_beams=self.args.generation_num_beams, pad_token_id=self.pad_token_id)
        ids = np.asarray(ids)
        out = np.full((ids.shape[0], length), self.pad_token_id, ids.dtype)
        out[:, :ids.shape[1]] = ids
        return out

    def _stand_in_labels(self, input_ids: list) -> list:
        """Labels of the problem's shape for rows that have none, so that ``predict`` can run the
        evaluation step (its loss terms are not returned)."""
        n = len(input_ids)
        if self.problem_type in ("multi_label_classification", "regression"):
            return [[0.0] * self.num_labels] * n
        if self.problem_type == QUESTION_ANS:
            return [[0, 0]] * n
        classifier = type(self.model.base_model).__name__.endswith("ForSequenceClassification")
        if self.problem_type in (CAUSAL_LM, TOKEN_CLS) or (self.problem_type is None and not classifier):
            return [[-100] * len(ids) for ids in input_ids]
        return [0] * n

    def save_model(self, output_dir: str | None = None) -> None:
        """Saves the adapters in HF PEFT format (``output_dir`` by default)."""
        self.model.save_pretrained(output_dir or self.output_dir)

    def plot(self) -> Path | None:
        """Writes ``training_curves.png``: training loss and evaluation curves against the step."""
        plt = _pyplot()

        train = [r for r in self.log_history if "loss" in r]
        evals = [r for r in self.log_history if "eval_loss" in r]
        if not train and not evals:
            return None
        extra = [k for k in ("eval_accuracy", "eval_perplexity") if any(k in r for r in evals)]
        fig, axes = plt.subplots(1, 1 + len(extra), figsize=(6 + 4 * len(extra), 4), squeeze=False)
        ax = axes[0, 0]
        if train:
            ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
        if evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        for i, key in enumerate(extra, start=1):
            axes[0, i].plot([r["step"] for r in evals if key in r], [r[key] for r in evals if key in r], "o-")
            axes[0, i].set_xlabel("step")
            axes[0, i].set_ylabel(key)
        fig.tight_layout()
        path = self.output_dir / "training_curves.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # ------------------------------------------------------------ internals

    def _evaluate_state(self, trainable, rest, dataset=None) -> dict[str, float]:
        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise TrainingError("no eval_dataset to evaluate on")
        columns = self._dataset_columns(dataset, "eval_dataset")
        batcher = self._batcher(columns, self.args.per_device_eval_batch_size, "eval_dataset", shuffle=False,
                                collate=self._eval_collate, per_row_logits=self.compute_metrics is not None)
        sums = np.zeros(3)
        all_logits, all_labels = [], []
        # the model that generates (predict_with_generate): merged once, as every batch reads it
        generating = (nnx.merge(self._graphdef, trainable, rest) if self._generates and self.compute_metrics is not None
                      else None)
        token_level = False
        for batch in batcher.batches(0):
            placed = self._place(batch)
            if self._precompiler is not None:
                self._precompiler.wait(("eval", signature(placed)))
            logits, terms = self._eval_step(self._graphdef, (trainable, rest), placed)
            sums += np.array([float(t) for t in terms])
            token_level = self.problem_type in (CAUSAL_LM, SEQ2SEQ_LM)
            if self.compute_metrics is not None:
                keep = batch["sample_weight"] > 0
                if generating is not None:  # the sequences generated, not the logits, as Seq2SeqTrainer's
                    all_logits.append(self._generated(generating, batch))
                else:
                    all_logits.append(np.asarray(logits)[keep])
                all_labels.append(batch["labels"][keep])
        loss = sums[0] / max(sums[1], 1.0)
        metrics = {"eval_loss": float(loss)}
        if token_level:
            metrics["eval_perplexity"] = float(math.exp(min(loss, 50.0)))
        elif self.problem_type in ("single_label_classification", "multi_label_classification", TOKEN_CLS,
                                   QUESTION_ANS):
            # multi-label: the fraction of rows whose every label is right (exact match); tokens:
            # the fraction of labelled tokens whose label is right; question answering: the
            # fraction of rows whose predicted start and end are both the labelled ones
            metrics["eval_accuracy"] = float(sums[2] / max(sums[1], 1.0))
        if self.compute_metrics is not None:
            logits, labels = _concatenate_rows(all_logits, 0.0), _concatenate_rows(all_labels, -100)
            metrics.update({f"eval_{k}": float(v) for k, v in self.compute_metrics(logits, labels).items()})
        return metrics

    def _prepare_output_dir(self, resume) -> None:
        """A new run starts in an empty ``output_dir``, or a cleaned one with ``overwrite_output_dir``.

        Resuming keeps the directory and rewrites ``metrics.jsonl`` from the checkpoint's history
        when the run restarts, so the two runs' records never mix.
        """
        if resume or jax.process_index() != 0 or not self.output_dir.exists():
            return
        ours = [p for p in self.output_dir.iterdir() if p.name in RUN_FILES or p.name.startswith("checkpoint-")]
        if not ours:
            return
        if not self.args.overwrite_output_dir:
            raise ValueError(
                f"output_dir {self.output_dir} already holds a training run ({', '.join(sorted(p.name for p in ours)[:4])}"
                "...); pass overwrite_output_dir=True (--overwrite-output-dir) to start it afresh, "
                "resume_from_checkpoint=True to continue it, or another output_dir"
            )
        for path in ours:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _should_eval(self, step: int, epoch_end: bool) -> bool:
        if self.eval_dataset is None or self.args.eval_strategy != "steps":
            return False
        every = self.args.eval_steps or self.args.logging_steps
        return step % every == 0

    def _drain(self, pending: list, step: int, last_ckpt, keep: bool = False) -> float:
        """Waits for the queued losses; stops the run on a NaN."""
        values = np.asarray(jax.device_get(pending), dtype=np.float64)
        if not keep:
            pending.clear()
        if not np.all(np.isfinite(values)):
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
            raise TrainingError(
                f"loss became {values[~np.isfinite(values)][0]} by step {step}; training stopped and nothing "
                f"after the last checkpoint was saved ({where}; resume with resume_from_checkpoint=True "
                "after lowering the learning rate)"
            )
        return float(values.mean()) if len(values) else float("nan")

    def _save(self, step, micro, epoch, position, trainable, opt_state) -> Path:
        path = self.output_dir / f"checkpoint-{step}"
        info = {"global_step": step, "micro_step": micro, "epoch": epoch, "batch_in_epoch": position,
                "seed": self.args.seed, "rng": f"fold_in(key({self.args.seed}), micro_step)",
                "log_history": self.log_history}
        save_checkpoint(path, {"trainable": trainable, "opt_state": opt_state}, info)
        nnx.update(self.model.base_model, jax.tree.map(fresh_copy, trainable))
        self.model.save_pretrained(path / "adapter")  # the adapter alone, loadable by HF PEFT
        prune_checkpoints(self.output_dir, self.args.save_total_limit)
        return path

    def _resolve_checkpoint(self, resume) -> Path:
        if resume is True:
            found = list_checkpoints(self.output_dir)
            if not found:
                raise FileNotFoundError(f"resume_from_checkpoint=True but {self.output_dir} has no checkpoint")
            return found[-1]
        return Path(resume)

    def _log(self, record: dict[str, Any], writer, bar) -> None:
        self.log_history.append(record)
        if jax.process_index() == 0:  # one writer when several hosts share output_dir
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    writer.add_scalar(k if k.startswith("eval") else f"train/{k}", v, record["step"])
        if bar is not None and "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_second']:.0f}")
        elif bar is not None:
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))

    def _tensorboard(self):
        if not self.args.tensorboard or jax.process_index() != 0:
            return None
        from peftjax.training._events import ScalarWriter

        return ScalarWriter(self.output_dir / "runs")

    def _progress(self, total: int, initial: int):
        if self.args.disable_tqdm:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _names(dataset) -> list[str]:
    return list(dataset.column_names if hasattr(dataset, "column_names") else dataset.keys())
