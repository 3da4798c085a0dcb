"""The ``peftjax`` command: train, merge, inspect, generate and predict.

Every failure is one line on stderr (``peftjax: error: ...``) and exit status 1, not a traceback;
``PEFTJAX_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _inspect(args) -> int:
    from peftjax.config import load_config
    from peftjax.io import read_safetensors_header

    directory = Path(args.adapter)
    config = load_config(directory)
    weights = directory / "adapter_model.safetensors"
    entries, metadata = read_safetensors_header(weights)
    count = sum(_numel(e["shape"]) for e in entries.values())
    nbytes = sum(int(e["data_offsets"][1]) - int(e["data_offsets"][0]) for e in entries.values())
    version = config.peft_version or "unknown"
    writer = f"peftjax {metadata['peftjax']}" if "peftjax" in metadata else "HF PEFT (or another PEFT-format writer)"
    d = config.to_dict()
    targets = d.get("target_modules")
    ranks = sorted({e["shape"][0] for k, e in entries.items() if k.endswith("lora_A.weight")})
    info = {
        "method": d["peft_type"],
        "task_type": d.get("task_type"),
        "target_modules": targets,
        "r": d.get("r"),
        "lora_alpha": d.get("lora_alpha"),
        "ranks_in_file": ranks,
        "rank_pattern": d.get("rank_pattern") or None,
        "modules_to_save": d.get("modules_to_save"),
        "tensors": len(entries),
        "parameters": count,
        "size_bytes": nbytes,
        "dtypes": sorted({e["dtype"] for e in entries.values()}),
        "written_by": writer,
        "peft_version": version,
        "base_model_name_or_path": d.get("base_model_name_or_path"),
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            if v is not None:
                print(f"{k.ljust(width)}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k.ljust(width)}  {v}")
    return 0


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _merge(args) -> int:
    import peftjax
    from peftjax import models

    model = models.from_pretrained(args.base, dtype=args.dtype)
    peft_model = peftjax.PeftModel.from_pretrained(model, args.adapter)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.base}; wrote {args.output}")
    return 0


def _load_with_adapter(args):
    import peftjax
    from peftjax import models
    from peftjax.config import load_config

    config = load_config(args.adapter) if args.adapter else None
    if config is not None and config.task_type == "SEQ_CLS":
        # the adapter carries the classifier head: build the classification model it was trained on
        from peftjax.io import read_safetensors_header
        from peftjax.training._run import _classifier_class

        header, _ = read_safetensors_header(Path(args.adapter) / "adapter_model.safetensors")
        heads = [e["shape"][0] for k, e in header.items() if k.endswith(("classifier.weight", "score.weight"))]
        base_config = models.load_config(args.base)
        cls = _classifier_class(base_config)
        model = cls.from_pretrained(args.base, dtype=args.dtype, **({"num_labels": heads[0]} if heads else {}))
    else:
        model = models.from_pretrained(args.base, dtype=args.dtype)
    if args.adapter:
        return peftjax.PeftModel.from_pretrained(model, args.adapter)
    return model


def _texts(args) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        texts += [line.rstrip("\n") for line in open(args.file) if line.strip()]
    if not texts:
        raise ValueError("give text with --text or --file")
    return texts


def _generate(args) -> int:
    from transformers import AutoTokenizer

    model = _load_with_adapter(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = _texts(args)
    batch = tokenizer(texts, return_tensors="np", padding=True)
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                         do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
                         top_k=args.top_k, pad_token_id=tokenizer.pad_token_id, seed=args.seed)
    for text, row in zip(texts, out):
        new = tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
        print(json.dumps({"prompt": text, "completion": new}, ensure_ascii=False))
    return 0


def _predict(args) -> int:
    import numpy as np
    from transformers import AutoTokenizer

    model = _load_with_adapter(args)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.base)
    texts = _texts(args)
    batch = tokenizer(texts, return_tensors="np", padding=True, truncation=True, max_length=args.max_length)
    accepted = _accepted(model)
    logits = np.asarray(model(**{k: v for k, v in batch.items() if k in accepted}).logits)
    if logits.ndim != 2:
        raise ValueError("predict needs a sequence-classification model; use generate for language models")
    config = getattr(model, "config", None)
    names = getattr(config, "id2label", None) or {}
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    for text, p in zip(texts, probs):
        k = int(p.argmax())
        print(json.dumps({"text": text, "label": names.get(k, str(k)), "score": round(float(p[k]), 4)},
                         ensure_ascii=False))
    return 0


def _accepted(model) -> set[str]:
    import inspect

    target = getattr(model, "base_model", model)
    return set(inspect.signature(type(target).__call__).parameters)


def _train(args) -> int:
    from peftjax.training._run import run_from_cli

    return run_from_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftjax", description="Parameter-efficient fine-tuning for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with LoRA (a YAML config file and/or flags)",
                       description="Fine-tune a model with an adapter. Flags override the YAML config.")
    from peftjax.training._run import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("merge", help="merge an adapter into its base checkpoint",
                       description="Base checkpoint + adapter -> a merged checkpoint that transformers loads.")
    p.add_argument("base", help="base model directory (config.json + model.safetensors)")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("output", help="directory for the merged checkpoint")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.set_defaults(func=_merge)

    p = sub.add_parser("inspect", help="describe an adapter directory",
                       description="Method, targets, ranks, parameter count, size and writer of an adapter.")
    p.add_argument("adapter", help="adapter directory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_inspect)

    for name, func, what in (("generate", _generate, "continue prompts with a causal LM"),
                             ("predict", _predict, "classify texts with a sequence-classification model")):
        p = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]} (base + optional adapter).")
        p.add_argument("base", help="base model directory")
        p.add_argument("--adapter", help="adapter directory")
        p.add_argument("--tokenizer", help="tokenizer directory (default: the base directory)")
        p.add_argument("--text", action="append", help="an input text (repeatable)")
        p.add_argument("--file", help="a file with one input per line")
        p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--top-k", type=int, default=None)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--max-length", type=int, default=128)
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError, NotImplementedError, RuntimeError, KeyError) as e:
        if os.environ.get("PEFTJAX_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"peftjax: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
