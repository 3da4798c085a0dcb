"""Square-matmul throughput of JAX (XLA:CPU) and PyTorch on this machine, float32 and bfloat16.

    python benchmarks/matmul_peak.py [--size 4096 --repeats 5]

Each framework runs in its own child process with its default threading; the best of
``--repeats`` timed runs after one warmup counts (2 n^3 FLOPs per matmul). This is the ceiling a
training step's matmuls can reach, and why bfloat16 is not the CPU comparison: XLA's CPU
backend has no fast bfloat16 GEMM path here, PyTorch's oneDNN has one (AVX512-BF16/AMX).
The last line is a one-line summary in GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def measure_jax(n: int, repeats: int, dtypes=("float32", "bfloat16")) -> dict:
    import jax
    import jax.numpy as jnp

    out = {}
    for name in dtypes:
        dtype = jnp.dtype(name)
        a = jax.random.normal(jax.random.key(0), (n, n), dtype)
        f = jax.jit(lambda x, y: x @ y)
        f(a, a).block_until_ready()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            f(a, a).block_until_ready()
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    return out


def measure_torch(n: int, repeats: int, dtypes=("float32", "bfloat16")) -> dict:
    import torch

    out = {}
    for name in dtypes:
        dtype = getattr(torch, name)
        a = torch.randn(n, n).to(dtype)
        a @ a
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t)
        out[name] = 2 * n**3 / best / 1e9
    out["threads"] = torch.get_num_threads()
    return out


def float32_gflops(framework: str, n: int, repeats: int = 3) -> float:
    """``framework``'s (``"jax"`` or ``"torch"``) float32 peak in this process, for a benchmark's
    child to print beside its ratios (no bfloat16: torch's takes minutes without AVX512-BF16)."""
    measure = measure_jax if framework == "jax" else measure_torch
    return measure(n, repeats, dtypes=("float32",))["float32"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        fn = measure_jax if args.child == "jax" else measure_torch
        print(json.dumps(fn(args.size, args.repeats)))
        return
    results = {}
    for child in ("jax", "torch"):
        argv = [sys.executable, os.path.abspath(__file__), "--child", child, "--size", str(args.size),
                "--repeats", str(args.repeats)]
        proc = subprocess.run(argv, capture_output=True, text=True, check=True)
        results[child] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{args.size}x{args.size} matmul, best of {args.repeats}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    for child, r in results.items():
        print(f"  {child:6s} float32 {r['float32']:8.0f} GFLOP/s   bfloat16 {r['bfloat16']:8.0f} GFLOP/s")
    j, t = results["jax"], results["torch"]
    print(f"jax_f32_gflops={j['float32']:.0f} jax_bf16_gflops={j['bfloat16']:.0f} "
          f"torch_f32_gflops={t['float32']:.0f} torch_bf16_gflops={t['bfloat16']:.0f}")


if __name__ == "__main__":
    main()
