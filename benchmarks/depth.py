"""Compile time and step time of a LoRA training step as the model deepens, with and without scan.

    python benchmarks/depth.py [--depths 4 8 16 32 --ranks 8 64 --seqs 128 256 512 --hidden 256]

A randomly initialised Llama (hidden 256, intermediate 688, 4 heads, vocab 32000 by default),
LoRA on all seven linear projections of every layer, AdamW, float32, the jitted step of
``peftjax.make_train_step``. For each configuration: compile time (trace + lower + XLA compile
of the step, ahead of time), the median step time over ``--steps`` steps after one warmup step,
and XLA's temporary buffer size for the step. Three tables:

  depth:  4, 8, 16, 32 layers, layers unrolled (``scan_layers=False``) and scanned (``True``);
  rank:   LoRA rank 8 and 64 (scanned, ``--fixed-layers`` layers, ``--seq`` tokens);
  seq:    sequence length 128, 256, 512 (scanned, ``--fixed-layers`` layers, rank 8).

The last line is a one-line summary of the deepest model's compile times and step times.
"""

from __future__ import annotations

import argparse
import statistics
import time

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def run(args, *, layers: int, scan: bool, rank: int, seq: int, remat: str = "none") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import peftjax
    from peftjax.models import LlamaForCausalLM, ModelConfig

    config = ModelConfig(
        "llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
        max_position_embeddings=max(2048, seq), tie_word_embeddings=False, scan_layers=scan, remat=remat,
    )
    model = LlamaForCausalLM.from_config(config)
    peftjax.get_peft_model(model, peftjax.LoraConfig(r=rank, lora_alpha=16, target_modules=PROJECTIONS))
    graphdef, trainable, rest = peftjax.split(model)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = tx.init(trainable)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, args.vocab, (args.batch, seq)).astype(np.int32))
    batch = {"input_ids": ids, "labels": ids}

    t = time.perf_counter()
    step = peftjax.make_train_step(graphdef, tx).lower(trainable, opt_state, rest, batch, None).compile()
    compile_s = time.perf_counter() - t
    temp = step.memory_analysis().temp_size_in_bytes
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        loss.block_until_ready()
        if i:
            times.append(time.perf_counter() - t)
    jax.clear_caches()
    return {"compile_s": compile_s, "step_s": statistics.median(times), "temp_mib": temp / 2**20,
            "tokens_per_s": args.batch * seq / statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 64])
    p.add_argument("--seqs", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--fixed-layers", type=int, default=8, help="layers for the rank and sequence tables")
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()

    import os

    import jax

    print(f"Llama hidden {args.hidden}, intermediate {args.intermediate}, {args.heads} heads, vocab {args.vocab}; "
          f"batch {args.batch}; LoRA on {', '.join(PROJECTIONS)}; float32; AdamW; jax {jax.__version__}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    header = f"{'':>8s} {'compile (s)':>12s} {'step (s)':>10s} {'tokens/s':>10s} {'XLA temp (MiB)':>15s}"

    def row(label, r):
        return f"{label:>8s} {r['compile_s']:12.2f} {r['step_s']:10.3f} {r['tokens_per_s']:10.0f} {r['temp_mib']:15.0f}"

    depth = {}
    print(f"\ndepth (seq {args.seq}, rank 8): layers unrolled | scanned")
    print(f"{'layers':>8s}  unrolled: {header[9:]}   scanned: {header[9:]}")
    for n in args.depths:
        a = run(args, layers=n, scan=False, rank=8, seq=args.seq)
        b = run(args, layers=n, scan=True, rank=8, seq=args.seq)
        depth[n] = (a, b)
        print(f"{n:8d}  {row('', a)[9:]}   {row('', b)[9:]}", flush=True)

    print(f"\nrank (scanned, {args.fixed_layers} layers, seq {args.seq})")
    print(header.replace("        ", "    rank", 1))
    for r in args.ranks:
        print(row(str(r), run(args, layers=args.fixed_layers, scan=True, rank=r, seq=args.seq)), flush=True)

    print(f"\nsequence length (scanned, {args.fixed_layers} layers, rank 8)")
    print(header.replace("        ", "     seq", 1))
    for s in args.seqs:
        print(row(str(s), run(args, layers=args.fixed_layers, scan=True, rank=8, seq=s)), flush=True)

    deep = max(depth)
    a, b = depth[deep]
    shallow = min(depth)
    print(f"layers={deep} compile_unrolled_s={a['compile_s']:.2f} compile_scanned_s={b['compile_s']:.2f} "
          f"step_unrolled_s={a['step_s']:.3f} step_scanned_s={b['step_s']:.3f} "
          f"compile_growth_unrolled={a['compile_s'] / depth[shallow][0]['compile_s']:.1f}x "
          f"compile_growth_scanned={b['compile_s'] / depth[shallow][1]['compile_s']:.1f}x "
          f"(from {shallow} layers)")


if __name__ == "__main__":
    main()
