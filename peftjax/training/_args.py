"""``TrainingArguments``: the fields of the HF PEFT tutorial's trainer, plus what JAX training needs."""

from __future__ import annotations

import dataclasses
import math
import os
import re

import jax
import optax
from flax import nnx

from peftjax.sharding._place import dotted

SCHEDULES = ("linear", "cosine", "constant", "constant_with_warmup")
STRATEGIES = ("no", "steps", "epoch")


@dataclasses.dataclass(kw_only=True)
class TrainingArguments:
    """How to train; field names and defaults follow ``transformers.TrainingArguments``.

    Attributes:
      output_dir: where checkpoints, metrics, the plot and the final adapter go.
      overwrite_output_dir: let a new run delete what an earlier run left in ``output_dir``
        (checkpoints, metrics, plot, adapter); otherwise such a directory is refused, so two
        runs never mix. Resuming keeps it.
      per_device_train_batch_size: rows per micro-batch.
      per_device_eval_batch_size: rows per evaluation batch.
      num_train_epochs: epochs to run when ``max_steps`` is not set.
      max_steps: optimizer steps to run; overrides ``num_train_epochs`` when > 0.
      learning_rate: the peak learning rate of AdamW.
      weight_decay: AdamW's decoupled weight decay, applied as ``transformers.Trainer`` applies it:
        not to biases or normalisation weights (see :func:`weight_decay_mask`).
      adam_beta1, adam_beta2, adam_epsilon: AdamW's moments.
      max_grad_norm: global-norm gradient clipping (0 disables it).
      lr_scheduler_type: ``linear``, ``cosine``, ``constant`` or ``constant_with_warmup``.
      warmup_steps: linear warmup steps, or a float in ``(0, 1)``: that fraction of the total
        steps, rounded up (transformers 5's field); takes precedence over ``warmup_ratio``.
      warmup_ratio: warmup as a fraction of the total steps (transformers 4's field).
      gradient_accumulation_steps: micro-batches per optimizer step; an epoch's last step takes
        the batches left over (no step spans two epochs, :class:`StepPlan`), and a language
        model's micro-batches weigh by their label tokens, as in transformers' Trainer.
      logging_steps: log every this many optimizer steps (the loop waits on the device only here).
      eval_strategy: ``no``, ``steps`` (every ``eval_steps``) or ``epoch``.
      eval_steps: evaluation interval for ``eval_strategy="steps"`` (defaults to ``logging_steps``).
      save_steps: checkpoint every this many optimizer steps (0 disables intermediate checkpoints).
      save_total_limit: keep at most this many checkpoints (oldest deleted first).
      seed: seeds the data order and dropout (the adapters' and the base model's, a key per step
        derived from it, so a resumed run is bit-identical). The adapters' initialisation comes from
        ``get_peft_model(..., key=jax.random.key(seed))``, as ``peftjax train`` does.
      bf16: compute in bfloat16 (load the model with ``dtype="bfloat16"``); adapters and optimizer
        state stay float32.
      report_to: ``"auto"`` or ``"tensorboard"`` (TensorBoard event files in ``output_dir/runs``,
        written by peftjax itself: no package needed), or ``"none"``.
      disable_tqdm: no progress bar.
      plot: write ``training_curves.png`` at the end.
      compile_ahead: compile the step for the batch shapes after the first, and the evaluation
        for its shapes, on a background thread while training runs (each shape still compiles
        once; ``False`` compiles each on its first use, as a plain ``jax.jit`` loop does, and
        holds no second compilation's memory).
      packing: lay the sequences of each batch end to end in shared rows
        (``Batcher(packing=True)``) instead of padding each to the batch's longest, for the
        same loss per sequence with fewer tokens computed. ``None`` (the default): wherever the
        run allows it (:meth:`Trainer.packs`: a classifier that takes packed rows, as peftjax's
        BERT and the classifiers on Llama's decoder and most built on it do, or a causal LM whose
        decoder does: its training and evaluation batches, not ``predict``'s or
        ``compute_metrics``' logits); ``True``: required
        (an error where it cannot be done); ``False``: never.
      compilation_cache: JAX's persistent compilation cache, so that a second run of the same job
        loads its compiled steps instead of compiling them again. ``True`` (the default): the
        directory ``$PEFTJAX_CACHE_DIR/xla`` or ``~/.cache/peftjax/xla`` (``$XDG_CACHE_HOME``
        respected), unless JAX already has one (``jax_compilation_cache_dir``); a path: that
        directory; ``False``: none from peftjax. JAX caches programs that took at least
        ``jax_persistent_cache_min_compile_time_secs`` (1 s) to compile.
      resume_from_checkpoint: a checkpoint directory, or ``True`` for the newest in ``output_dir``.
      predict_with_generate: an encoder-decoder's (``SEQ_2_SEQ_LM``) evaluation also generates each
        row's output, and ``compute_metrics`` gets those token ids (``[rows,
        generation_max_length]``: the decoder's start token first, ``pad_token_id`` after the end)
        with the labels, as transformers' ``Seq2SeqTrainer`` gives them; ``predict`` returns them
        (``Seq2SeqTrainingArguments``' field).
      generation_max_length: the generated sequences' length, the start token counted
        (transformers' ``max_length``); ``None``: the model's generation config's ``max_length``,
        else 20.
      generation_num_beams: beams of that generation; ``None``: the generation config's.
    """

    output_dir: str
    overwrite_output_dir: bool = False
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    num_train_epochs: float = 3.0
    max_steps: int = -1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    warmup_ratio: float = 0.0
    gradient_accumulation_steps: int = 1
    logging_steps: int = 500
    eval_strategy: str = "no"
    eval_steps: int | None = None
    save_steps: int = 500
    save_total_limit: int | None = None
    seed: int = 42
    bf16: bool = False
    report_to: str = "auto"
    disable_tqdm: bool = False
    plot: bool = True
    compile_ahead: bool = True
    packing: bool | None = None
    compilation_cache: bool | str = True
    resume_from_checkpoint: str | bool | None = None
    predict_with_generate: bool = False
    generation_max_length: int | None = None
    generation_num_beams: int | None = None

    def __post_init__(self) -> None:
        positive = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                    "logging_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainingArguments.{name} must be a positive integer, got {value!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise ValueError(f"lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.eval_strategy not in STRATEGIES:
            raise ValueError(f"eval_strategy must be one of {STRATEGIES}, got {self.eval_strategy!r}")
        if self.report_to not in ("auto", "tensorboard", "none"):
            raise ValueError(f"report_to must be 'auto', 'tensorboard' or 'none', got {self.report_to!r}")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ValueError("set max_steps > 0 or num_train_epochs > 0")
        if self.packing not in (None, True, False):
            raise ValueError(f"packing must be None, True or False, got {self.packing!r}")
        if not isinstance(self.compilation_cache, (bool, str, os.PathLike)) or self.compilation_cache == "":
            raise ValueError(f"compilation_cache must be True, False or a directory, got {self.compilation_cache!r}")
        for name, least in (("generation_max_length", 2), ("generation_num_beams", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"TrainingArguments.{name} must be None or an integer >= {least}, got {value!r}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if (isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, (int, float))
                or self.warmup_steps < 0 or (self.warmup_steps >= 1 and self.warmup_steps != int(self.warmup_steps))):
            raise ValueError(f"warmup_steps must be a whole number of steps or a fraction in [0, 1) of the total, "
                             f"got {self.warmup_steps!r}")

    @property
    def tensorboard(self) -> bool:
        return self.report_to != "none"

    def total_steps(self, batches_per_epoch: int) -> int:
        """Optimizer steps of the run: ``max_steps``, else ``num_train_epochs`` times the steps of
        an epoch (transformers' count: an epoch's last step takes the batches left over)."""
        if self.max_steps > 0:
            return self.max_steps
        return max(1, math.ceil(self.num_train_epochs * StepPlan(batches_per_epoch, self.gradient_accumulation_steps)
                                .steps_per_epoch))

    def num_training_steps(self, num_rows: int) -> int:
        """Optimizer steps ``Trainer.train()`` runs on ``num_rows`` training rows on one device
        (every batch full but an epoch's last): what AdaLoRA's ``total_step`` should be."""
        if not isinstance(num_rows, int) or isinstance(num_rows, bool) or num_rows < 1:
            raise ValueError(f"num_rows must be a positive number of training rows, got {num_rows!r}")
        return self.total_steps(math.ceil(num_rows / self.per_device_train_batch_size))

    def warmup(self, total_steps: int) -> int:
        """Warmup steps of a run of ``total_steps``: ``warmup_steps`` (a fraction of the total when
        below 1, rounded up, as transformers' ``get_warmup_steps``), else ``warmup_ratio``'s."""
        if self.warmup_steps >= 1:
            return int(self.warmup_steps)
        return math.ceil((self.warmup_steps or self.warmup_ratio) * total_steps)

    def schedule(self, total_steps: int) -> optax.Schedule:
        warmup = self.warmup(total_steps)
        peak = self.learning_rate
        decay_steps = max(1, total_steps - warmup)
        if self.lr_scheduler_type == "linear":
            after = optax.linear_schedule(peak, 0.0, decay_steps)
        elif self.lr_scheduler_type == "cosine":
            after = optax.cosine_decay_schedule(peak, decay_steps)
        else:
            after = optax.constant_schedule(peak)
        if warmup == 0 or self.lr_scheduler_type == "constant":
            return after
        return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])

    def optimizer(self, total_steps: int, decay_mask=None,
                  batches_per_epoch: int | None = None) -> optax.GradientTransformation:
        """AdamW with clipping and the schedule, accumulating over ``gradient_accumulation_steps``.

        ``decay_mask``: which parameters ``weight_decay`` applies to (a pytree of bools over the
        trainable state, :func:`weight_decay_mask`'s; the Trainer passes it); ``None``: all.
        ``batches_per_epoch``: with accumulation, each epoch's last step accumulates only the
        batches left over (:class:`StepPlan`, as transformers' Trainer); ``None``: every step
        accumulates ``gradient_accumulation_steps``.
        """
        parts = [optax.clip_by_global_norm(self.max_grad_norm)] if self.max_grad_norm > 0 else []
        mask = decay_mask if self.weight_decay > 0 else None  # no decay: the optimizer state as ever
        parts.append(
            optax.adamw(self.schedule(total_steps), b1=self.adam_beta1, b2=self.adam_beta2, eps=self.adam_epsilon,
                        weight_decay=self.weight_decay, mask=mask)
        )
        tx = optax.chain(*parts)
        if self.gradient_accumulation_steps > 1:
            every = (self.gradient_accumulation_steps if batches_per_epoch is None
                     else StepPlan(batches_per_epoch, self.gradient_accumulation_steps).micro_batches)
            tx = optax.MultiSteps(tx, every_k_schedule=every)
        return tx


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """How an epoch's ``batches`` micro-batches group into optimizer steps, as transformers'
    Trainer groups them: runs of ``accum`` in order, the epoch's last run shorter when ``accum``
    does not divide ``batches`` (no step spans two epochs). Micro-batches are counted over the
    whole run: micro-batch ``m`` is batch ``m % batches`` of epoch ``m // batches``."""

    batches: int
    accum: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.batches // self.accum)

    def micro_batches(self, step):
        """Micro-batches of optimizer step ``step`` (counted from 0; an int or a traced array,
        ``optax.MultiSteps``' ``every_k_schedule``)."""
        last = self.batches - (self.steps_per_epoch - 1) * self.accum
        if isinstance(step, int):
            return last if step % self.steps_per_epoch == self.steps_per_epoch - 1 else self.accum
        return jax.numpy.where(step % self.steps_per_epoch == self.steps_per_epoch - 1, last, self.accum)

    def first_micro(self, step: int) -> int:
        """The first micro-batch of optimizer step ``step`` (the run's end for ``step`` = its steps)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        return epoch * self.batches + index * self.accum

    def steps_done(self, micro: int) -> int:
        """Optimizer steps completed once micro-batches ``0 .. micro - 1`` have run."""
        epoch, index = divmod(micro, self.batches)
        return epoch * self.steps_per_epoch + index // self.accum

    def ends_step(self, micro: int) -> bool:
        """Whether micro-batch ``micro - 1`` was the last of its optimizer step."""
        return micro > 0 and (micro % self.batches) % self.accum == 0


# transformers.Trainer.get_decay_parameter_names: no weight decay for a parameter whose lower-cased
# name matches one of these, or that belongs to a LayerNorm module
NO_DECAY_PATTERNS = tuple(re.compile(p) for p in (r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)",
                                                  r"_norm(?:$|\.)"))


def weight_decay_mask(state, model: nnx.Module | None = None):
    """Which leaves of ``state`` (the trainable state ``split`` returns) get weight decay, as
    ``transformers.Trainer`` decides it: not a bias, not a normalisation weight.

    A leaf is excluded when its dotted path, lower-cased, matches one of :data:`NO_DECAY_PATTERNS`
    (``bias``, ``layernorm``, ``rmsnorm``, ``norm`` or ``..._norm`` as a path part), or when it lies
    in an ``nnx.LayerNorm`` of ``model`` (the module ``split`` was given; transformers excludes
    ``torch.nn.LayerNorm`` parameters by type, e.g. GPT-2's ``ln_1``). LoRA's ``A`` and ``B``, a
    classifier's kernel and the other adapter weights decay.

    Returns:
      A pytree of ``state``'s structure with a bool per leaf (``optax.adamw``'s ``mask``).
    """
    norms = () if model is None else tuple(
        ".".join(map(str, p)) + "." for p, n in nnx.iter_graph(model) if isinstance(n, nnx.LayerNorm))

    def decays(path, _):
        name = dotted(path)
        if name.startswith(norms):
            return False
        return not any(p.search(name.lower()) for p in NO_DECAY_PATTERNS)

    return jax.tree_util.tree_map_with_path(decays, state)
