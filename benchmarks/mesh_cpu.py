"""The LoRA train step on a simulated 8-device CPU mesh against one device, for the tiny Llama.

    python benchmarks/mesh_cpu.py [--steps 20 --warmup 2 --batch 8 --seq 16 --devices 8]

One process with ``--devices`` host-platform devices (``XLA_FLAGS`` is set before JAX starts).
Each row is one configuration: the plain jitted step on one device, then ``make_train_step``
with a mesh and a preset. Reported per row: compile time, median step time (each step waited
on), tokens per second, and the largest adapter difference from the one-device run after the
timed steps (the mesh must not change the numbers).

What this measures: the cost of partitioning (collectives, smaller per-device kernels) on one
machine. The simulated devices share this machine's cores, so a mesh is not expected to be
faster here; on real accelerators each device brings its own compute and memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    flag = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + flag
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import numpy as np
    import optax
    import transformers as tr

    import peftjax
    from peftjax import sharding as shd
    from peftjax.models import LlamaForCausalLM

    config = tr.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.seq)).astype(np.int32)
    batch = {"input_ids": ids, "labels": ids}
    n = args.devices
    configs = [
        ("1 device", None, None),
        (f"data={n}", {"data": n}, "dp"),
        (f"model={n}", {"data": 1, "model": n}, "tp"),
        (f"data=2,model={n // 2}", {"data": 2, "model": n // 2}, "tp"),
        (f"fsdp={n}", {"fsdp": n}, "fsdp"),
        (f"fsdp=2,model={n // 2}", {"fsdp": 2, "model": n // 2}, "fsdp+tp"),
    ]
    print(f"# jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices on {os.cpu_count()} "
          f"cores; tiny Llama (hidden 64, 2 layers), LoRA r={args.rank} on all linears, batch {args.batch} x seq "
          f"{args.seq}, Adam; median of {args.steps} steps after {args.warmup}")
    print(f"{'mesh':<22}{'preset':<9}{'compile s':>10}{'step ms':>10}{'tokens/s':>11}{'vs 1 dev':>9}{'max |dA|':>11}")
    reference, base_ms = None, None
    for name, shape, rules in configs:
        model = LlamaForCausalLM.from_config(config, seed=0)
        pm = peftjax.get_peft_model(model, peftjax.LoraConfig(r=args.rank, target_modules="all-linear"))
        mesh = shd.make_mesh(shape) if shape else None
        if mesh is not None:
            shd.shard_model(pm.base_model, mesh, rules)
        graphdef, trainable, rest = peftjax.split(pm.base_model)
        tx = optax.adam(1e-3)
        opt_state = tx.init(trainable)
        step = peftjax.make_train_step(graphdef, tx, mesh=mesh, rules=rules)
        t0 = time.perf_counter()
        compiled = step.lower(trainable, opt_state, rest, batch, None).compile()
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            trainable, opt_state, loss = compiled(trainable, opt_state, rest, batch, None)
            jax.block_until_ready(loss)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        ms = 1000 * statistics.median(times)
        leaves = [np.asarray(x) for x in jax.tree.leaves(trainable)]
        if reference is None:
            reference, base_ms = leaves, ms
        diff = max(float(np.max(np.abs(a - b))) for a, b in zip(leaves, reference))
        tok_s = args.batch * args.seq / (ms / 1000)
        print(f"{name:<22}{rules or '-':<9}{compile_s:>10.2f}{ms:>10.2f}{tok_s:>11.0f}{ms / base_ms:>8.2f}x"
              f"{diff:>11.1e}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
