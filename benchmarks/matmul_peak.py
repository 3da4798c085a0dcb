"""Square-matmul throughput of JAX (XLA:CPU) and PyTorch on this machine, float32 and bfloat16.

    python benchmarks/matmul_peak.py [--size 4096 --repeats 5]
    python benchmarks/matmul_peak.py --shapes [320x384x384 ...] [--repeats 200]

Each framework runs in its own child process with its default threading; the best of
``--repeats`` timed runs after one warmup counts (2 n^3 FLOPs per matmul). This is the ceiling a
training step's matmuls can reach, and why bfloat16 is not the CPU comparison: XLA's CPU
backend has no fast bfloat16 GEMM path here, PyTorch's oneDNN has one (AVX512-BF16/AMX).
The last line is a one-line summary in GFLOP/s. Each dtype gets about 20 seconds: the size
grows from 512 by doubling up to ``--size`` while the next size's runs would fit, so a slow
kernel (torch's bfloat16 without AVX512-BF16 or AMX: about 1 GFLOP/s, minutes a 4096-cubed call)
is measured smaller and the report says at which size.

``--shapes``: float32 products of the sizes a step really runs instead of the square peak, each
``MxKxN`` as ``x @ w`` (``[M, K] @ [K, N]``, a forward projection) and as ``dy @ w.T`` (the
gradient of a projection's input), the median of ``--repeats`` timed calls per framework (one
jitted call for JAX, its dispatch included: 6 us on a 4x8x8 product against torch's 1.4, small
beside these). Without sizes: the main job's (MiniLM, hidden 384, feed-forward 1536, a packed
batch of 4 rows of 80 tokens). Small products sit further from the peak than a square one, by a
margin that differs between the two libraries; the last line gives the median of XLA's times
over torch's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


# seconds one dtype's measurement may take: a slow kernel (torch's bfloat16 on a CPU without
# AVX512-BF16 or AMX runs at about 1 GFLOP/s, so 4096-cubed takes minutes a call) is measured smaller
BUDGET_S = 20.0


def _best_gflops(make, matmul, n: int, repeats: int, budget: float = BUDGET_S) -> tuple[float, int]:
    """The best of ``repeats`` timed ``matmul(make(size))`` calls in GFLOP/s, and the size they ran at:
    ``n``, or the largest of 512, 1024, ... below it whose runs fit ``budget`` seconds, judged from one
    untimed call (a warmup, compilation included) and one timed call per size on the way up."""
    size = min(n, 512)
    while True:
        a = make(size)
        matmul(a)
        t = time.perf_counter()
        matmul(a)
        probe = time.perf_counter() - t
        # the next size up costs 8x a call; stop where its warmup, probe and repeats would not fit
        if size >= n or 8 * probe * (repeats + 2) > budget:
            break
        size = min(2 * size, n)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best / 1e9, size


def measure_jax(n: int, repeats: int, dtypes=("float32", "bfloat16")) -> dict:
    """GFLOP/s per dtype (and ``"<dtype>_size"`` where a slow kernel was measured below ``n``)."""
    import jax

    f = jax.jit(lambda x, y: x @ y)
    out = {}
    for name in dtypes:
        def make(size, name=name):
            return jax.random.normal(jax.random.key(0), (size, size), jax.numpy.dtype(name))

        out[name], size = _best_gflops(make, lambda a: f(a, a).block_until_ready(), n, repeats)
        if size != n:
            out[f"{name}_size"] = size
    return out


def measure_torch(n: int, repeats: int, dtypes=("float32", "bfloat16")) -> dict:
    """GFLOP/s per dtype (and ``"<dtype>_size"`` where a slow kernel was measured below ``n``)."""
    import torch

    out = {}
    for name in dtypes:
        def make(size, name=name):
            return torch.randn(size, size).to(getattr(torch, name))

        out[name], size = _best_gflops(make, lambda a: a @ a, n, repeats)
        if size != n:
            out[f"{name}_size"] = size
    out["threads"] = torch.get_num_threads()
    return out


# the main job's train step (peftjax/cli/_job.py): MiniLM's projections at its packed batch [4, 80]
STEP_SHAPES = ("320x384x384", "320x384x1536", "320x1536x384")


def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def parse_shape(text: str) -> tuple[int, int, int]:
    """``"MxKxN"`` as ``(M, K, N)``; raises ``ValueError`` naming the text otherwise."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"--shapes: {text!r} is not MxKxN (three positive integers, e.g. 320x384x1536)")
    m, k, n = (int(p) for p in parts)
    return m, k, n


def shape_seconds(framework: str, shapes, repeats: int) -> dict:
    """Median seconds of ``x @ w`` and ``dy @ w.T`` per ``MxKxN`` shape in ``framework``, float32."""
    out = {}
    if framework == "jax":
        import jax
        import numpy as np

        forward, backward = jax.jit(lambda x, w: x @ w), jax.jit(lambda d, w: d @ w.T)
        for text in shapes:
            m, k, n = parse_shape(text)
            rng = np.random.default_rng(0)
            x, w, d = (jax.numpy.asarray(rng.standard_normal(s, np.float32)) for s in ((m, k), (k, n), (m, n)))
            out[text] = (_median_seconds(lambda: forward(x, w).block_until_ready(), repeats),
                         _median_seconds(lambda: backward(d, w).block_until_ready(), repeats))
        return out
    import torch

    for text in shapes:
        m, k, n = parse_shape(text)
        x, w, d = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
        out[text] = (_median_seconds(lambda: x @ w, repeats), _median_seconds(lambda: d @ w.T, repeats))
    return out


def float32_gflops(framework: str, n: int, repeats: int = 3) -> float:
    """``framework``'s (``"jax"`` or ``"torch"``) float32 peak in this process, for a benchmark's
    child to print beside its ratios (no bfloat16: torch's takes minutes without AVX512-BF16)."""
    measure = measure_jax if framework == "jax" else measure_torch
    return measure(n, repeats, dtypes=("float32",))["float32"]


def _child(name: str, args, *extra: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", name, "--repeats", str(args.repeats), *extra]
    proc = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report_shapes(args) -> None:
    results = {name: _child(name, args, "--shapes", *args.shapes) for name in ("jax", "torch")}
    print(f"float32 products, median of {args.repeats}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"  {'MxKxN':14s} {'op':9s} {'jax (us)':>9s} {'GFLOP/s':>8s} {'torch (us)':>11s} {'GFLOP/s':>8s} {'jax/torch':>10s}")
    ratios = []
    for text in args.shapes:
        m, k, n = parse_shape(text)
        for i, op in enumerate(("x @ w", "dy @ w.T")):
            j, t = results["jax"][text][i], results["torch"][text][i]
            ratios.append(j / t)
            flop = 2 * m * k * n
            print(f"  {text:14s} {op:9s} {j * 1e6:9.0f} {flop / j / 1e9:8.0f} {t * 1e6:11.0f} {flop / t / 1e9:8.0f} "
                  f"{j / t:10.3g}")  # significant digits: never 0.00 under a stall
    print(f"shapes_jax_over_torch={statistics.median(ratios):.3f} shapes={len(args.shapes)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 5; 200 with --shapes)")
    p.add_argument("--shapes", nargs="*", default=None, metavar="MxKxN",
                   help=f"time these products instead of the square peak (no sizes: {' '.join(STEP_SHAPES)})")
    p.add_argument("--child", choices=["jax", "torch"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.shapes is not None:
        args.shapes = args.shapes or list(STEP_SHAPES)
        for text in args.shapes:
            try:
                parse_shape(text)
            except ValueError as e:
                p.error(str(e))
    if args.repeats is None:
        args.repeats = 5 if args.shapes is None else 200
    if args.child:
        if args.shapes is not None:
            print(json.dumps(shape_seconds(args.child, args.shapes, args.repeats)))
            return
        fn = measure_jax if args.child == "jax" else measure_torch
        print(json.dumps(fn(args.size, args.repeats)))
        return
    if args.shapes is not None:
        report_shapes(args)
        return
    results = {child: _child(child, args, "--size", str(args.size)) for child in ("jax", "torch")}
    print(f"{args.size}x{args.size} matmul, best of {args.repeats}; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    for child, r in results.items():
        cells = [f"{name} {r[name]:8.0f} GFLOP/s" + (f" (at {r[name + '_size']} cubed: a slow kernel)"
                                                    if name + "_size" in r else "")
                 for name in ("float32", "bfloat16")]
        print(f"  {child:6s} " + "   ".join(cells))
    j, t = results["jax"], results["torch"]
    print(f"jax_f32_gflops={j['float32']:.0f} jax_bf16_gflops={j['bfloat16']:.0f} "
          f"torch_f32_gflops={t['float32']:.0f} torch_bf16_gflops={t['bfloat16']:.0f}")


if __name__ == "__main__":
    main()
