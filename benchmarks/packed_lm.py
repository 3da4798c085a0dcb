"""A causal LM fine-tune on rows of mixed lengths: packed (the Trainer's default) against padded.

    python benchmarks/packed_lm.py [--rows 256 --batch 8 --seq 512 --median-length 96 --repeats 3 ...]

The model is a Llama of speed_vs_peft.py's shape, drawn in each child from one seed
(``models.LlamaForCausalLM.from_config``: no PyTorch here); LoRA ``r=8`` on every linear layer; ``--rows`` random rows whose lengths are log-normal around
``--median-length`` tokens (clipped to ``[8, --seq]``), as a conversation dataset's are. Each
configuration trains one epoch with the public ``Trainer`` in a fresh process, ``--repeats``
times, alternating:

- ``packed``: ``TrainingArguments()`` as a user leaves it (``packing=None``: a Llama causal LM
  packs: each batch's sequences end to end, ``segment_ids``);
- ``padded``: ``packing=False``, each batch padded to one of the fitted bucket lengths.

Prints, per configuration, the median over repeats of the run's wall time (compilation
included), the median step's real tokens per second, the tokens computed per real token, and the
last logged loss (equal between the two up to float rounding: the same sequences in the same
batches), then the ratios (packed over padded), ``same_loss`` (1 where every repeat's losses
agree to 1e-4) and the host's float32 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import speed_vs_peft as svp

CONFIGS = ("packed", "padded")


def arguments(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 512), ("layers", 4), ("heads", 8), ("intermediate", 1376), ("vocab", 32000),
                          ("rows", 256), ("batch", 8), ("seq", 512), ("median_length", 96), ("repeats", 3),
                          ("matmul_size", 2048)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def rows(args) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = np.clip(np.round(args.median_length * np.exp(rng.normal(0.0, 0.8, args.rows))), 8, args.seq)
    return [rng.integers(1, args.vocab, int(n)).tolist() for n in lengths]


def child(args) -> dict:
    import numpy as np

    import peftjax
    from peftjax import models
    from peftjax.training import Batcher, Trainer, TrainingArguments

    data = rows(args)
    columns = {"input_ids": data, "labels": data}
    config = models.ModelConfig.from_dict({
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": args.intermediate, "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.heads, "max_position_embeddings": max(2048, args.seq),
        "tie_word_embeddings": False})
    model = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(config, seed=0),
                                   peftjax.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    with tempfile.TemporaryDirectory() as out:
        extra = {} if args.child == "packed" else {"packing": False}
        training = TrainingArguments(output_dir=out, per_device_train_batch_size=args.batch, num_train_epochs=1,
                                     logging_steps=1, save_steps=0, disable_tqdm=True, plot=False,
                                     compilation_cache=False, **extra)
        trainer = Trainer(model, training, train_dataset=columns)
        start = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - start
        packed = trainer.packs()
    batcher = Batcher(columns, args.batch, seed=training.seed, packing=packed, next_token_labels=True)
    computed = sum(int(np.prod(shape)) if packed else args.batch * shape[0] for shape in batcher.batch_shapes(0))
    real = sum(len(r) for r in data)
    logged = [r for r in trainer.log_history if "tokens_per_second" in r]
    return {"config": args.child, "packed": packed, "wall_s": wall, "steps": len(logged),
            "tokens_per_s": statistics.median(r["tokens_per_second"] for r in logged[1:] or logged),
            "computed_per_real": computed / real, "last_loss": logged[-1]["loss"]}


def main() -> None:
    args = arguments()
    if args.child:
        print(json.dumps(child(args)))
        return
    results = {c: [] for c in CONFIGS}
    for _ in range(args.repeats):
        for config in CONFIGS:
            argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", config]
            proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
            if proc.returncode != 0:
                raise RuntimeError(f"{config} child failed:\n{proc.stderr[-4000:]}")
            results[config].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    import jax.numpy as jnp

    a = jnp.ones((args.matmul_size, args.matmul_size), jnp.float32)
    peak = svp.matmul_peak(lambda: (a @ a).block_until_ready(), args.matmul_size)
    print(f"# {args.rows} rows, median length {args.median_length} (max {args.seq}), batch {args.batch}, "
          f"{args.layers} layers x {args.hidden}, vocab {args.vocab}; median of {args.repeats} runs; "
          f"JAX float32 matmul peak {peak / 1e9:.0f} GFLOP/s; load average {os.getloadavg()[0]:.2f}")
    median = {c: {k: statistics.median(r[k] for r in results[c])
                  for k in ("wall_s", "tokens_per_s", "computed_per_real", "last_loss")} for c in CONFIGS}
    for c in CONFIGS:
        m = median[c]
        print(f"{c:7s} packed={results[c][0]['packed']} steps={results[c][0]['steps']} wall_s={m['wall_s']:.2f} "
              f"tokens_per_s={m['tokens_per_s']:.0f} computed_per_real={m['computed_per_real']:.3f} "
              f"last_loss={m['last_loss']:.5f}")
    same = all(abs(p["last_loss"] - q["last_loss"]) <= 1e-4 * abs(q["last_loss"])
               for p, q in zip(results["packed"], results["padded"]))
    print(f"ratio_wall={median['packed']['wall_s'] / median['padded']['wall_s']:.3f} "
          f"ratio_tokens_per_s={median['packed']['tokens_per_s'] / median['padded']['tokens_per_s']:.3f} "
          f"ratio_computed={median['packed']['computed_per_real'] / median['padded']['computed_per_real']:.3f} "
          f"same_loss={int(same)} jax_f32_gflops={peak / 1e9:.0f}")


if __name__ == "__main__":
    main()
