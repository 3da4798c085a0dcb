"""Picking a bundled model class for a checkpoint: ``peftjax.models.from_pretrained``."""

from __future__ import annotations

import json
import os

from peftjax.models._config import TEXT_OF_VISION_LANGUAGE, read_config
from peftjax.models._modeling import CONFIG_NAME, PreTrainedModel
from peftjax.nn._scan import MODEL_OPTIONS

# architecture name -> class; filled by register()
MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {}
# model_type -> the class used when config.architectures names none we know
DEFAULT_CLASSES: dict[str, type[PreTrainedModel]] = {}


def register(cls: type[PreTrainedModel], *, model_types: tuple[str, ...] = (), default: bool = False):
    """Makes ``cls`` loadable by its class name (``architectures`` in config.json)."""
    MODEL_CLASSES[cls.__name__] = cls
    if default:
        for t in model_types:
            DEFAULT_CLASSES[t] = cls
    return cls


def load_config(
    path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    **overrides,
):
    """Reads ``config.json`` of a directory or Hub repo id into a :class:`ModelConfig`.

    The fields are transformers' (its class defaults fill what the file leaves out), but nothing
    of transformers or torch is imported. From the Hub only ``config.json`` is fetched (see
    ``peftjax.io._hub.resolve`` for ``revision``, ``subfolder``, ``token`` and ``cache_dir``).

    Raises:
      TypeError: an override that is not a field of the family's config.
    """
    from peftjax.io._hub import is_repo_id, resolve

    repo_id = os.fspath(path) if is_repo_id(path) else None
    path = resolve(path, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                   allow_patterns=[CONFIG_NAME])
    file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    model_type = TEXT_OF_VISION_LANGUAGE.get(model_type, model_type)  # read as its text model
    supported = sorted({c for c in DEFAULT_CLASSES})
    if model_type not in DEFAULT_CLASSES:
        raise ValueError(f"{file}: model_type {model_type!r} is not supported; supported: {supported}")
    options = {k: overrides.pop(k) for k in MODEL_OPTIONS if k in overrides}
    config = read_config(raw, str(file))
    config._name_or_path = str(path)
    unused = sorted(k for k in overrides if not config.has_field(k))
    if unused:
        raise TypeError(f"{file}: {unused} are not fields of the {model_type} config")
    for k, v in {**overrides, **options}.items():  # peftjax's own options ride on the config too;
        setattr(config, k, v)                        # save_pretrained drops them
    if repo_id:  # the repo id, not the snapshot path, as transformers records it
        config._name_or_path = repo_id
    return config


# PEFT's task_type -> the endings of the class names that serve it
TASK_CLASS_SUFFIXES = {
    "SEQ_CLS": ("ForSequenceClassification",),
    "TOKEN_CLS": ("ForTokenClassification",),
    "QUESTION_ANS": ("ForQuestionAnswering",),
    "CAUSAL_LM": ("ForCausalLM", "LMHeadModel"),
    "FEATURE_EXTRACTION": ("Model",),
    "SEQ_2_SEQ_LM": ("ForConditionalGeneration", "MTModel"),  # MarianMTModel
    # transformers' head for which PEFT has no task type (its adapters have none: task_type=None)
    "MULTIPLE_CHOICE": ("ForMultipleChoice",),
}


def model_class_for(config, task_type: str | None = None) -> type[PreTrainedModel]:
    """The class for ``task_type`` (PEFT's names), else the one ``config.architectures`` names.

    Without a task, the class named by ``config.architectures``, else the default for
    ``config.model_type``. With one, the bundled class of that family for the task, whatever the
    checkpoint was saved as (a ``BertForMaskedLM`` checkpoint gives ``BertForSequenceClassification``
    for ``"SEQ_CLS"``), as transformers' ``AutoModelFor...`` classes do.
    """
    if task_type is not None:
        return _class_for_task(config, str(task_type))
    for arch in getattr(config, "architectures", None) or ():
        if arch in MODEL_CLASSES:
            return MODEL_CLASSES[arch]
    if config.model_type in DEFAULT_CLASSES:
        return DEFAULT_CLASSES[config.model_type]
    raise ValueError(
        f"model_type {config.model_type!r} (architectures {config.architectures}) is not supported; "
        f"supported architectures: {sorted(MODEL_CLASSES)}"
    )


def _class_for_task(config, task_type: str) -> type[PreTrainedModel]:
    if task_type not in TASK_CLASS_SUFFIXES:
        raise ValueError(f"task_type {task_type!r} has no bundled model classes; supported: {sorted(TASK_CLASS_SUFFIXES)}")
    family = config.model_type.replace("_", "").replace("-", "").lower()  # xlm-roberta: XLMRoberta...
    for suffix in TASK_CLASS_SUFFIXES[task_type]:
        for name, cls in MODEL_CLASSES.items():
            # a class name's underscores are not the model_type's (qwen3_5_text: Qwen3_5TextFor...)
            if name.endswith(suffix) and name.replace("_", "").lower() == family + suffix.lower():
                return cls
    # a family whose class names do not spell its model_type (gemma3_text: Gemma3ForCausalLM): the
    # default class's own prefix
    default = DEFAULT_CLASSES.get(config.model_type)
    if default is not None and "For" in default.__name__:
        prefix = default.__name__.split("For")[0]
        for suffix in TASK_CLASS_SUFFIXES[task_type]:
            if suffix.startswith("For") and prefix + suffix in MODEL_CLASSES:
                return MODEL_CLASSES[prefix + suffix]
    raise ValueError(
        f"no bundled {task_type} model for model_type {config.model_type!r}; bundled classes: {sorted(MODEL_CLASSES)}"
    )


def from_pretrained(
    path: str | os.PathLike,
    dtype=None,
    *,
    task_type: str | None = None,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    quantization_config=None,
    seed: int | None = None,
    **config_overrides,
) -> PreTrainedModel:
    """Loads a Hugging Face checkpoint (a directory or a Hub repo id) into the matching bundled Flax NNX model.

    Args:
      path: a directory with ``config.json`` and ``model.safetensors`` or
        ``model.safetensors.index.json`` plus its shards, or a Hub repo id (``"org/name"``), fetched
        into the Hub cache (``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` reads only the cache).
      dtype: parameter and compute dtype (``None``: float32).
      task_type: build the family's class for this PEFT task (``"SEQ_CLS"``, ``"TOKEN_CLS"``,
        ``"CAUSAL_LM"``, ``"SEQ_2_SEQ_LM"``, ``"FEATURE_EXTRACTION"``, or ``"MULTIPLE_CHOICE"``:
        transformers' ``...ForMultipleChoice``, for which PEFT has no task type) instead of the
        checkpoint's own; a head the checkpoint lacks is newly initialised (pass ``num_labels=``
        for a classifier).
      **config_overrides: config fields to override, e.g. ``num_labels=2``, and peftjax's model
        options: ``scan_layers=True`` (stack the layers and run them with ``jax.lax.scan``: Llama
        family, Gemma, GPT-2, BERT, RoBERTa, DistilBERT; generation, prefix adapters and base-model dropout loop
        over the stacked layers instead), ``remat="none" | "full" | "dots_saveable"`` (``jax.checkpoint``
        policy of each layer when they are scanned or looped without a cache) and, for a mixture
        of experts, ``expert_dispatch="dense" | "grouped"`` (every expert on every token, the
        default; or each token's top k only, through ``jax.lax.ragged_dot``).
      revision: the branch, tag or commit of a Hub repo (default ``"main"``).
      subfolder: the checkpoint's folder inside the directory or repo.
      token: a Hub token for private or gated repos (default: the login token).
      cache_dir: the Hub cache to use instead of ``HF_HUB_CACHE``.
      quantization_config: store the linear weights quantized (``peftjax.QuantizationConfig``, its
        dict, or transformers' ``BitsAndBytesConfig``); see ``peftjax.quantization``. A checkpoint
        saved quantized (its ``config.json`` has a ``quantization_config``: bitsandbytes' tensors, as
        transformers or ``save_pretrained`` here write them) loads quantized without it, from its
        own tensors.
      seed: what a weight the checkpoint lacks (the new head of ``task_type``) is drawn from:
        ``None`` (default) draws it from the weight's name, the same values on every load; an
        integer draws it from that seed and the name, so runs with different seeds start from
        different heads, as transformers' ``set_seed(seed)`` before ``from_pretrained`` gives.

    Returns:
      The model, e.g. a ``LlamaForCausalLM``.

    Raises:
      FileNotFoundError: the directory, ``config.json`` or the weights are missing, or the Hub repo
        cannot be fetched (the message names the repo, the revision and why).
      ValueError: the model type is unsupported, or a weight is missing or mis-shaped.

    >>> model = from_pretrained("meta-llama/Llama-3.2-1B")  # doctest: +SKIP
    >>> model(input_ids=[[1, 2, 3]]).logits.shape  # doctest: +SKIP
    (1, 3, 128256)
    """
    from peftjax.io._hub import is_repo_id, resolve

    local = resolve(path, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)
    config = load_config(local, **config_overrides)
    model = model_class_for(config, task_type).from_pretrained(local, dtype=dtype, quantization_config=quantization_config,
                                                               seed=seed, **config_overrides)
    if is_repo_id(path):  # the repo id, not the snapshot path, as transformers records it
        model.config.hf_config._name_or_path = os.fspath(path)
    return model
