"""Serving many LoRA adapters on one base: mixed batches, grouped batches, PEFT, and hot-swap latency.

    python benchmarks/multi_adapter.py [--batch 16 --seq 64 --adapters 1 4 16 --trials 3]

One random Llama (built in PyTorch with a seed and saved), 16 LoRA adapters (r=8 on q, k, v, o,
random B) written by HF PEFT, loaded by both frameworks. For each number of distinct adapters k,
the batch's rows are spread over k adapters (row i uses adapter i mod k) and the full forward
(prefill logits) is timed:

- peftjax mixed: ``peft_model.mixed_batch(rows)`` around one ``nnx.jit`` function of the model;
  one compilation serves every assignment;
- peftjax grouped: the rows of each adapter run as their own batch with that adapter set
  (one compiled function per adapter, compiled during warmup, not timed);
- PEFT: ``model(input_ids, adapter_names=rows)`` under ``torch.no_grad()``, in a child process.

The reference is peftjax with one adapter set (no mixed path) on the whole batch; the target is
a 16-adapter mixed batch at most 1.25x that. Hot-swap: ``hotswap_adapter`` plus the next call,
against compiling the same function afresh. Medians of ``--repeats`` calls per trial, median
over trials. Each framework runs in its own child process, which measures its float32 matmul
peak after its timed calls (median over trials); the peaks are printed beside the ratios. The
last line is a summary.
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
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(root: Path, args) -> None:
    import torch
    import transformers as tr
    import peft

    torch.manual_seed(0)
    config = tr.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.heads, pad_token_id=0)
    tr.LlamaForCausalLM(config).save_pretrained(root / "base")
    for i in range(max(args.adapters)):
        torch.manual_seed(100 + i)
        base = tr.LlamaForCausalLM.from_pretrained(root / "base")
        lora = peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, init_lora_weights=False,
                               target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        peft.get_peft_model(base, lora).save_pretrained(root / f"a{i}")


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def child_jax(root: Path, args) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    import peftjax
    from peftjax import models

    n = max(args.adapters)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(root / "base"), root / "a0", adapter_name="a0")
    for i in range(1, n):
        model.load_adapter(root / f"a{i}", adapter_name=f"a{i}")
    ids = np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.seq))

    @nnx.jit
    def logits(m, x):
        return m(input_ids=x).logits

    def run(x):
        jax.block_until_ready(logits(model.base_model, x))

    out = {"single": timed(lambda: run(ids), args.repeats)}
    for k in args.adapters:
        rows = [f"a{i % k}" for i in range(args.batch)]
        with model.mixed_batch(rows):
            out[f"mixed_{k}"] = timed(lambda: run(ids), args.repeats)
        groups = {f"a{j}": ids[[i for i in range(args.batch) if i % k == j]] for j in range(k)}

        def grouped():
            for name, x in groups.items():
                model.set_adapter(name, inference_mode=True)
                run(x)

        out[f"grouped_{k}"] = timed(grouped, args.repeats)
    model.set_adapter("a0", inference_mode=True)
    run(ids)
    swaps = []
    for i in range(args.repeats):
        t = time.perf_counter()
        peftjax.hotswap_adapter(model, root / f"a{1 + i % (n - 1)}", adapter_name="a0")
        run(ids)
        swaps.append(time.perf_counter() - t)
    out["swap_and_call"] = statistics.median(swaps)

    @nnx.jit
    def fresh(m, x):
        return m(input_ids=x).logits

    t = time.perf_counter()
    jax.block_until_ready(fresh(model.base_model, ids))
    out["compile_and_call"] = time.perf_counter() - t
    return out


def child_torch(root: Path, args) -> dict:
    import numpy as np
    import torch
    import transformers as tr
    import peft

    n = max(args.adapters)
    base = tr.LlamaForCausalLM.from_pretrained(root / "base").eval()
    model = peft.PeftModel.from_pretrained(base, root / "a0", adapter_name="a0")
    for i in range(1, n):
        model.load_adapter(root / f"a{i}", adapter_name=f"a{i}")
    model.eval()
    ids = torch.from_numpy(np.random.default_rng(0).integers(1, args.vocab, (args.batch, args.seq)))

    def run(**kw):
        with torch.no_grad():
            model(input_ids=ids, **kw)

    out = {"single": timed(run, args.repeats)}
    for k in args.adapters:
        rows = [f"a{i % k}" for i in range(args.batch)]
        out[f"mixed_{k}"] = timed(lambda: run(adapter_names=rows), args.repeats)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--child", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = child_jax if args.child == "jax" else child_torch
        from matmul_peak import float32_gflops  # this script's folder is on sys.path

        print(json.dumps({**fn(Path(args.root), args), "f32_gflops": float32_gflops(args.child, args.matmul_size)}))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args)
        results = {"jax": [], "torch": []}
        forwarded = [a for a in sys.argv[1:]]
        for trial in range(args.trials):
            for child in (("jax", "torch") if trial % 2 == 0 else ("torch", "jax")):
                argv = [sys.executable, __file__, *forwarded, "--child", child, "--root", str(root)]
                env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
                proc = subprocess.run(argv, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{child} child failed:\n{proc.stderr[-3000:]}")
                results[child].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in results.items()}
    j, t = med["jax"], med["torch"]
    peak = {"jax_f32_gflops": f"{j['f32_gflops']:.0f}", "torch_f32_gflops": f"{t['f32_gflops']:.0f}"}
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}; batch {args.batch} x {args.seq} "
          f"tokens; LoRA r={args.rank} on q,k,v,o; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"float32 matmul peaks ({args.matmul_size}^3): JAX {peak['jax_f32_gflops']} GFLOP/s, "
          f"torch {peak['torch_f32_gflops']} GFLOP/s")
    print(f"{'forward (ms, median)':32s}{'peftjax':>10s}{'PEFT':>10s}{'peftjax/PEFT':>14s}")
    print(f"{'one adapter set':32s}{j['single'] * 1e3:10.2f}{t['single'] * 1e3:10.2f}{j['single'] / t['single']:14.2f}")
    for k in args.adapters:
        print(f"{f'mixed batch, {k} adapters':32s}{j[f'mixed_{k}'] * 1e3:10.2f}{t[f'mixed_{k}'] * 1e3:10.2f}"
              f"{j[f'mixed_{k}'] / t[f'mixed_{k}']:14.2f}")
        print(f"{f'grouped per adapter, {k}':32s}{j[f'grouped_{k}'] * 1e3:10.2f}{'':10s}{'':14s}")
    kmax = max(args.adapters)
    ratio = j[f"mixed_{kmax}"] / j["single"]
    print(f"peftjax mixed {kmax} adapters / one adapter set: {ratio:.2f} (target <= 1.25)")
    print(f"hot-swap + call {j['swap_and_call'] * 1e3:.1f} ms; compile + call {j['compile_and_call'] * 1e3:.1f} ms")
    print(f"mixed_ratio={ratio:.3f} vs_peft={j[f'mixed_{kmax}'] / t[f'mixed_{kmax}']:.3f} "
          f"swap_ms={j['swap_and_call'] * 1e3:.1f} compile_ms={j['compile_and_call'] * 1e3:.1f} "
          f"jax_f32_gflops={peak['jax_f32_gflops']} torch_f32_gflops={peak['torch_f32_gflops']}")


if __name__ == "__main__":
    main()
