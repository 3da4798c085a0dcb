"""``AutoPeftModel``: an adapter directory in, the model class it was trained on out.

An adapter knows its task (``task_type``) and carries its head (``modules_to_save``); the base
checkpoint may be saved as another class (MiniLM as ``BertModel``, ``bert-base-uncased`` as
``BertForMaskedLM``). Loading the adapter onto the checkpoint's own class would drop the head, so
this builds the family's class for the adapter's task, with as many labels as the saved head has.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from peftjax.config import PeftConfig, load_config
from peftjax.io import read_safetensors_header
from peftjax.io._adapter import WEIGHTS_NAME
from peftjax.io._hub import resolve
from peftjax.peft_model import PeftModel

HEAD_NAMES = ("classifier", "score", "qa_outputs", "classification_head")  # the last: T5's
CLASSIFIER_TASKS = ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")  # tasks whose adapters carry (or need) a trained head


def task_for_adapter(config: PeftConfig, head_shapes: dict[str, list[int]]) -> str | None:
    """The PEFT task an adapter was trained for: its ``task_type``; without one,
    ``"MULTIPLE_CHOICE"`` where its ``auto_mapping`` names a ``...ForMultipleChoice`` class (PEFT
    and peftjax record the class of an adapter without a task there), else what its saved head
    implies."""
    if config.task_type is not None:
        return str(config.task_type)
    if str((config.auto_mapping or {}).get("base_model_class", "")).endswith("ForMultipleChoice"):
        return "MULTIPLE_CHOICE"
    return "SEQ_CLS" if head_shapes else None


def saved_tensor_shapes(adapter_dir: str | os.PathLike) -> dict[str, list[int]]:
    """``{key: shape}`` of every tensor in an adapter file (its header alone is read): its adapters'
    and the whole modules it saves (``modules_to_save``: ``base_model.model.classifier.weight``, and
    every other module listed, such as DistilBERT's ``pre_classifier``); ``{}`` without a file."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        return {}
    header, _ = read_safetensors_header(path)
    return {k: list(e["shape"]) for k, e in header.items()}


def head_shapes(tensor_shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """The task-head weights among an adapter file's tensors (:func:`saved_tensor_shapes`): a head
    layer's (``classifier.weight``), or each layer's of a head made of layers (RoBERTa's
    ``classifier.dense.weight`` and ``classifier.out_proj.weight``)."""
    return {k: shape for k, shape in tensor_shapes.items()
            if k.endswith(".weight") and ".lora_" not in k and any(p in HEAD_NAMES for p in k.split(".")[-3:-1])}


def saved_head_shapes(adapter_dir: str | os.PathLike) -> dict[str, list[int]]:
    """``{key: shape}`` of the task-head weights an adapter file carries (see :func:`head_shapes`)."""
    return head_shapes(saved_tensor_shapes(adapter_dir))


def num_labels_of_head(head_shapes: dict[str, list[int]]) -> int:
    """The label count a saved head produces: its one layer's outputs, or, for a head made of
    layers, those of its output layer (``out_proj``, else the layer whose outputs no other layer
    of the head takes in)."""
    if len(head_shapes) == 1:
        return next(iter(head_shapes.values()))[0]
    last = [k for k in head_shapes if k.endswith(".out_proj.weight")]
    if not last:
        inputs = {shape[-1] for shape in head_shapes.values()}
        last = [k for k, shape in head_shapes.items() if shape[0] not in inputs] or sorted(head_shapes)[-1:]
    return head_shapes[last[0]][0]


class AutoPeftModel:
    """Loads base model + adapter as PEFT's ``AutoPeftModel`` does, choosing the class by the adapter's task.

    >>> model = AutoPeftModel.from_pretrained("out/adapter", "path/to/bert")  # doctest: +SKIP
    >>> type(model.base_model).__name__  # doctest: +SKIP
    'BertForSequenceClassification'
    """

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike,
        base_model_name_or_path: str | os.PathLike | None = None,
        *,
        adapter_name: str = "default",
        is_trainable: bool = False,
        dtype=None,
        strict: bool = True,
        revision: str | None = None,
        **model_kwargs,
    ) -> PeftModel:
        """The adapter in ``pretrained_model_name_or_path`` on the base model of its task.

        Args:
          pretrained_model_name_or_path: the adapter directory or Hub repo id.
          base_model_name_or_path: the base checkpoint; default: the adapter config's
            ``base_model_name_or_path``.
          adapter_name: the name to give the adapter.
          is_trainable: keep the adapter trainable.
          dtype: the base model's dtype (``None``: float32).
          strict: as in ``PeftModel.from_pretrained``.
          revision: the adapter's Hub revision.
          **model_kwargs: config overrides for the base model (``scan_layers=True``, ...).

        Raises:
          ValueError: no base checkpoint is known, the family has no class for the task, or a
            classification adapter has no saved head and the base checkpoint is not a classifier.
        """
        from peftjax import models
        from peftjax.models._auto import TASK_CLASS_SUFFIXES

        adapter = resolve(pretrained_model_name_or_path, revision=revision, kind="adapter")
        config = load_config(adapter)
        base = base_model_name_or_path or config.base_model_name_or_path
        if not base:
            raise ValueError(f"{adapter}: adapter_config.json names no base_model_name_or_path; pass the base model")
        saved = saved_tensor_shapes(adapter)  # the file's header, read once
        heads = head_shapes(saved)
        task = task_for_adapter(config, heads)
        if task in CLASSIFIER_TASKS:
            if heads:
                model_kwargs.setdefault("num_labels", num_labels_of_head(heads))
            else:
                base_config = models.load_config(base)
                if not any(a.endswith(TASK_CLASS_SUFFIXES[task]) for a in base_config.architectures or ()):
                    raise ValueError(
                        f"{adapter}: a {task} adapter without a saved classifier head, on a base checkpoint "
                        f"({base}) that is not a classifier ({base_config.architectures}): its head would be random"
                    )
        if task is None and trained_on_backbone(models.load_config(base), saved):
            task = "FEATURE_EXTRACTION"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = models.from_pretrained(base, dtype=dtype, task_type=_bundled_task(task), **model_kwargs)
        for w in caught:  # a head the adapter file supplies is not "newly initialised" for the user
            keys = getattr(w.message, "keys", None)
            if keys and all(any(s.endswith("." + k) for s in saved) for k in keys):
                continue
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        _resize_to_file(model, saved)
        return PeftModel.from_pretrained(model, adapter, adapter_name, is_trainable=is_trainable, strict=strict)


def trained_on_backbone(base_config, adapter_keys) -> bool:
    """Whether an adapter without a task was trained on its family's bare backbone (``BertModel``)
    though the base checkpoint names a class around it (the Hub's BERT, RoBERTa and DistilBERT are
    masked LMs): its keys then lack the backbone's name (``base_model.model.encoder...``, not
    ``base_model.model.bert.encoder...``), as PEFT's ``AutoModel`` loads such a checkpoint."""
    from peftjax import models

    cls = models.model_class_for(base_config)
    prefix = cls.base_model_prefix
    if not prefix or not adapter_keys or hasattr(cls, "generate"):  # a language model keeps its class
        return False
    return not any(k.startswith(f"base_model.model.{prefix}.") for k in adapter_keys)


def _bundled_task(task: str | None) -> str | None:
    """Tasks without their own bundled classes load the checkpoint's class; a FEATURE_EXTRACTION
    adapter gets the family's backbone (``BertModel``) whatever head the checkpoint was saved with."""
    return task if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "CAUSAL_LM", "SEQ_2_SEQ_LM",
                            "FEATURE_EXTRACTION", "MULTIPLE_CHOICE") else None


def _resize_to_file(model, saved: dict) -> None:
    """Resizes ``model``'s vocabulary to the one an adapter file's saved input embedding has (a
    model resized for added tokens: PEFT's AutoPeftModel resizes to the adapter's tokenizer)."""
    from peftjax.io._adapter import PREFIX
    from peftjax.models._resize import vocabulary_weights

    for key, (_, _, is_input) in vocabulary_weights(model).items():
        shape = saved.get(PREFIX + key)
        if is_input and shape is not None and shape[0] != model.config.vocab_size:
            model.resize_token_embeddings(int(shape[0]))
            return
