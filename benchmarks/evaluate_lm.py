"""``Trainer.evaluate`` of a causal LM: time and peak memory, on speed_vs_peft.py's Llama.

    python benchmarks/evaluate_lm.py [--rows 32 --seq 256 --batch 8 --vocab 32000 --hidden 512 ...]

One process: the model built in PyTorch from a fixed seed and saved (speed_vs_peft.py's; or
``--model PATH``'s checkpoint, as speed_vs_peft.py takes it), loaded
with ``models.from_pretrained``, LoRA ``r=8`` on all linear layers, a ``Trainer`` over ``--rows``
random rows of ``--seq`` tokens evaluated twice (the first call compiles). Prints both calls'
times, the loss and the process's peak resident memory (``ru_maxrss``), and the float32 matmul
peak. Run it from two checkouts (``PYTHONPATH``) to compare them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import speed_vs_peft as svp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 512), ("layers", 4), ("heads", 8), ("intermediate", 1376), ("vocab", 32000),
                          ("rows", 32), ("seq", 256), ("batch", 8), ("matmul_size", 2048)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    svp.add_model_flag(p)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.model_dir is None:  # build the model in a child (torch) unless --model, then evaluate in a fresh process
        with tempfile.TemporaryDirectory() as directory:
            model_dir = svp.model_directory(args, directory)
            argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--model-dir", model_dir]
            subprocess.run(argv, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        return

    if args.model is not None:
        svp.model_directory(args, args.model_dir)  # its sizes (--vocab)
    import jax.numpy as jnp
    import numpy as np

    import peftjax
    from peftjax import models
    from peftjax.training import Trainer, TrainingArguments

    model = peftjax.get_peft_model(models.from_pretrained(args.model_dir),
                                   peftjax.LoraConfig(task_type="CAUSAL_LM", r=8, target_modules="all-linear"))
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, args.vocab, args.seq).tolist() for _ in range(args.rows)]
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model, TrainingArguments(output_dir=out, per_device_eval_batch_size=args.batch,
                                                   disable_tqdm=True, plot=False),
                          eval_dataset={"input_ids": ids, "labels": ids})
        times = []
        for _ in range(2):
            t = time.perf_counter()
            loss = trainer.evaluate()["eval_loss"]
            times.append(time.perf_counter() - t)
    a = jnp.ones((args.matmul_size, args.matmul_size), jnp.float32)
    peak = svp.matmul_peak(lambda: (a @ a).block_until_ready(), args.matmul_size)
    print(f"# evaluate: {args.rows} rows x {args.seq} tokens, batch {args.batch}, vocab {args.vocab}; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"first_s={times[0]:.3f} second_s={times[1]:.3f} eval_loss={loss:.6f} "
          f"peak_rss_gib={svp.peak_rss_bytes() / 2**30:.3f} jax_f32_gflops={peak / 1e9:.0f}")


if __name__ == "__main__":
    main()
