"""peftjax against HF PEFT + PyTorch: one LoRA training step on the same model, batch and optimizer.

    python benchmarks/speed_vs_peft.py [--trials 3 --warmup 3 --steps 10 --hidden 512 --layers 4 ...]

The model is built once in PyTorch from a fixed seed and saved with ``save_pretrained``; both
frameworks load that directory. Each trial runs each framework in its own child process (the
order alternates between trials), so peak resident memory (``ru_maxrss``) is one framework's
alone and a noisy neighbour hurts both sides alike. Both sides: float32, LoRA on all seven
linear projections of every layer, AdamW with the same hyperparameters, next-token loss over all
positions, ``--warmup`` untimed steps then ``--steps`` timed ones, each waited on.

Reported (medians over trials): step time, tokens per second, peak resident memory, time to first
step (from the start of the child process: imports, loading the weights, adding LoRA, building
the optimizer, compiling (peftjax) and running step one). The peftjax child also counts the
step's FLOPs with XLA's cost analysis and measures a large float32 matmul, which gives the
step's floor on this machine.

peftjax runs as a memory-conscious user would run it: layers scanned with full remat
(``--no-scan-layers``, ``--remat none`` change that), ``peftjax.release_host_memory()`` after
setup and after compiling the step ahead of its first call (``--no-release``), and without torch, which peftjax does not
depend on (``--torch-visible`` lets transformers' config code import it, as it does whenever
torch is installed). ``--peft-gradient-checkpointing`` turns on PEFT's counterpart of remat.
The last line is a one-line summary.
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

T_START = time.perf_counter()

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1376)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--matmul-size", type=int, default=4096, help="side of the square matmul that measures peak")
    p.add_argument("--only", choices=["peftjax", "peft"], default=None, help="run one framework (no ratios)")
    p.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=True,
                   help="peftjax: stack and scan the layers (default; --no-scan-layers unrolls them)")
    p.add_argument("--remat", default="full", help="peftjax: the layers' remat policy (full, none, dots_saveable)")
    p.add_argument("--release", action=argparse.BooleanOptionalAction, default=True,
                   help="peftjax: release_host_memory() after setup and after compiling the step ahead")
    p.add_argument("--torch-visible", action="store_true",
                   help="peftjax: leave torch importable (transformers' config code then imports it)")
    p.add_argument("--peft-gradient-checkpointing", action="store_true",
                   help="PEFT: gradient checkpointing on (transformers' gradient_checkpointing_enable)")
    # internal: run one framework in this process and print a JSON line
    p.add_argument("--child", choices=["peftjax", "peft"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


BETAS, EPS = (0.9, 0.999), 1e-8


def model_flops(args) -> float:
    """Matmul FLOPs of one LoRA step by hand: forward and input-gradient of every linear layer
    (the frozen weights need no weight gradient), attention's two batched matmuls (forward and
    backward), and the adapters' ``6 T r (in + out)``."""
    t, h, i, r = args.batch * args.seq, args.hidden, args.intermediate, args.rank
    shapes = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    linear = sum(a * b for a, b in shapes) * args.layers + h * args.vocab
    attention = 3 * 4 * args.batch * args.seq**2 * h * args.layers
    lora = sum(6 * t * r * (a + b) for a, b in shapes) * args.layers
    return 4 * t * linear + attention + lora


def batch_arrays(args):
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(0, args.vocab, (args.batch, args.seq)).astype(np.int32)
    return ids


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# --------------------------------------------------------------------------- children


def run_peftjax(args) -> dict:
    if not args.torch_visible:
        # peftjax does not depend on torch, and a JAX machine does not have it; here it is
        # installed for the PEFT side, and transformers' config code imports it (257 MiB
        # resident) whenever it can. A None entry makes transformers see it as absent.
        sys.modules["torch"] = None
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import peftjax
    from peftjax import models

    imported = time.perf_counter()
    rss_imports = current_rss_bytes()
    config = models.load_config(args.model_dir)
    del config
    rss_config = current_rss_bytes()
    model = models.from_pretrained(args.model_dir, scan_layers=args.scan_layers, remat=args.remat)
    rss_loaded = current_rss_bytes()
    peft_model = peftjax.get_peft_model(
        model, peftjax.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=PROJECTIONS)
    )
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    tx = optax.adamw(args.lr, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=args.weight_decay)
    opt_state = tx.init(trainable)
    step = peftjax.make_train_step(graphdef, tx)
    ids = jnp.asarray(batch_arrays(args))
    batch = {"input_ids": ids, "labels": ids}
    if args.release:  # loading's and injection's one-off executables, freed heap
        peftjax.release_host_memory(clear_compiled=True)
    rss_setup = current_rss_bytes()
    if args.release:  # compiled ahead (the calls reuse it), then the compiler's freed heap returned
        step.lower(trainable, opt_state, rest, batch, None).compile()
        peftjax.release_host_memory()

    times = []
    first = None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        loss.block_until_ready()
        now = time.perf_counter()
        if first is None:
            first = now - T_START  # from the start of the process: imports count too
            rss_compiled = current_rss_bytes()
        if i >= args.warmup:
            times.append(now - t)
    rss = peak_rss_bytes()

    # measured after the peak: neither enters the memory figure. XLA's cost analysis counts a
    # loop body once, so the fused loss is counted as one chunk (same FLOPs, one trip).
    from peftjax.models import _losses

    chunk, _losses.FUSED_CHUNK_ELEMENTS = _losses.FUSED_CHUNK_ELEMENTS, 1 << 62
    # a new step function: jit would reuse the traced one
    compiled = peftjax.make_train_step(graphdef, tx).lower(trainable, opt_state, rest, batch, None).compile()
    _losses.FUSED_CHUNK_ELEMENTS = chunk
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    temp = step.lower(trainable, opt_state, rest, batch, None).compile().memory_analysis().temp_size_in_bytes
    n = args.matmul_size
    a = jnp.asarray(np.random.RandomState(1).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    mm_times = []
    for _ in range(3):
        t = time.perf_counter()
        mm(a, a).block_until_ready()
        mm_times.append(time.perf_counter() - t)
    return {
        "step_s": statistics.median(times),
        "first_step_s": first,
        "import_s": imported - T_START,
        "peak_rss": rss,
        "loss": float(loss),
        "flops": float(cost["flops"]),
        "step_temp_bytes": temp,
        "rss_imports": rss_imports,
        "rss_config": rss_config,
        "rss_loaded": rss_loaded,
        "rss_setup": rss_setup,
        "rss_compiled": rss_compiled,
        "matmul_flops_per_s": 2 * n**3 / min(mm_times),
    }


def run_peft(args) -> dict:
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    imported = time.perf_counter()
    rss_imports = current_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    rss_loaded = current_rss_bytes()
    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=PROJECTIONS)
    )
    if args.peft_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay,
    )
    ids = torch.as_tensor(batch_arrays(args).astype(np.int64))

    times = []
    first = None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        now = time.perf_counter()
        if first is None:
            first = now - T_START  # from the start of the process: imports count too
        if i >= args.warmup:
            times.append(now - t)
    return {
        "step_s": statistics.median(times),
        "first_step_s": first,
        "import_s": imported - T_START,
        "peak_rss": peak_rss_bytes(),
        "loss": float(loss.detach()),
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
    }


# --------------------------------------------------------------------------- parent


def build_model(args, directory: str) -> None:
    """The shared random init: a transformers Llama saved in float32."""
    code = (
        "import sys, torch, transformers as tr;"
        "torch.manual_seed(0);"
        f"c = tr.LlamaConfig(vocab_size={args.vocab}, hidden_size={args.hidden}, "
        f"intermediate_size={args.intermediate}, num_hidden_layers={args.layers}, "
        f"num_attention_heads={args.heads}, num_key_value_heads={args.heads}, "
        f"max_position_embeddings={max(2048, args.seq)}, tie_word_embeddings=False);"
        "tr.LlamaForCausalLM(c).save_pretrained(sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, directory], check=True)


def run_child(args, framework: str, directory: str) -> dict:
    argv = [sys.executable, os.path.abspath(__file__), "--child", framework, "--model-dir", directory]
    for name in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "seq", "rank", "alpha", "lr",
                 "weight_decay", "warmup", "steps", "matmul_size", "remat"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    argv += ["--scan-layers" if args.scan_layers else "--no-scan-layers"]
    argv += ["--release" if args.release else "--no-release"]
    argv += ["--torch-visible"] if args.torch_visible else []
    argv += ["--peft-gradient-checkpointing"] if args.peft_gradient_checkpointing else []
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(results, key):
    return statistics.median(r[key] for r in results)


def main() -> None:
    args = parse_args()
    if args.child:
        result = (run_peftjax if args.child == "peftjax" else run_peft)(args)
        print(json.dumps(result))
        return

    tokens = args.batch * args.seq
    frameworks = [args.only] if args.only else ["peftjax", "peft"]
    print(f"Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, intermediate {args.intermediate}, "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; LoRA r={args.rank} on "
          f"{', '.join(PROJECTIONS)}; float32; AdamW; {args.warmup} warmup + {args.steps} timed steps; "
          f"peftjax scan_layers={args.scan_layers} remat={args.remat!r} release={args.release} "
          f"torch_visible={args.torch_visible}; PEFT gradient checkpointing {args.peft_gradient_checkpointing}; "
          f"{args.trials} trials; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results = {f: [] for f in frameworks}
    with tempfile.TemporaryDirectory() as directory:
        build_model(args, directory)
        for trial in range(args.trials):
            order = frameworks if trial % 2 == 0 else frameworks[::-1]
            for framework in order:
                r = run_child(args, framework, directory)
                results[framework].append(r)
                print(f"  trial {trial} {framework:8s} step {r['step_s']:.3f} s  first step {r['first_step_s']:.1f} s  "
                      f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB  loss {r['loss']:.4f}", flush=True)

    print(f"{'':24s}" + "".join(f"{f:>12s}" for f in frameworks) + ("       ratio" if len(frameworks) == 2 else ""))
    rows = [
        ("step time (s)", "step_s", 1.0, "{:12.3f}"),
        ("tokens per second", "step_s", None, "{:12.0f}"),
        ("peak resident (GiB)", "peak_rss", 2**-30, "{:12.2f}"),
        ("time to first step (s)", "first_step_s", 1.0, "{:12.2f}"),
        ("  of which imports (s)", "import_s", 1.0, "{:12.2f}"),
    ]
    med = {f: {k: median(results[f], k) for k in ("step_s", "peak_rss", "first_step_s", "import_s")}
           for f in frameworks}
    for label, key, scale, fmt in rows:
        values = [tokens / med[f][key] if scale is None else med[f][key] * scale for f in frameworks]
        line = f"{label:24s}" + "".join(fmt.format(v) for v in values)
        if len(values) == 2:
            line += f"{values[0] / values[1]:12.3f}"
        print(line)

    summary = {}
    if "peftjax" in results:
        # XLA's cost analysis counts a loop body once: with scanned layers, count by hand
        flops = model_flops(args) if args.scan_layers else median(results["peftjax"], "flops")
        peak = median(results["peftjax"], "matmul_flops_per_s")
        floor = flops / peak
        step = med["peftjax"]["step_s"]
        how = ("by hand: XLA's cost analysis counts a scanned loop's body once" if args.scan_layers
               else f"XLA cost analysis; by hand {model_flops(args) / 1e9:.1f}")
        print(f"peftjax step: {flops / 1e9:.1f} GFLOP ({how}); "
              f"float32 matmul {args.matmul_size}^3: {peak / 1e9:.0f} GFLOP/s; floor {floor:.3f} s; achieved "
              f"{flops / step / 1e9:.0f} GFLOP/s = {floor / step:.2f} of the floor")
        mib = {k: median(results["peftjax"], k) / 2**20
               for k in ("rss_imports", "rss_config", "rss_loaded", "rss_setup", "rss_compiled", "step_temp_bytes",
                         "peak_rss")}
        print(f"peftjax resident memory (MiB): jax+peftjax imported {mib['rss_imports']:.0f}; + transformers config "
              f"code {mib['rss_config']:.0f}; weights loaded {mib['rss_loaded']:.0f}; LoRA and AdamW added "
              f"{mib['rss_setup']:.0f}; after compiling and the first step {mib['rss_compiled']:.0f}; "
              f"peak {mib['peak_rss']:.0f}; XLA temporaries of the step {mib['step_temp_bytes']:.0f}")
        summary["floor_fraction"] = floor / step
        summary["step_gflop"] = flops / 1e9
        summary["matmul_gflops"] = peak / 1e9
    if "peft" in results:
        r = results["peft"][0]
        mib = {k: median(results["peft"], k) / 2**20 for k in ("rss_imports", "rss_loaded", "peak_rss")}
        print(f"peft: torch threads {r['torch_threads']}, attention {r['attn_implementation']}; resident memory (MiB): "
              f"torch+transformers+peft imported {mib['rss_imports']:.0f}; weights loaded {mib['rss_loaded']:.0f}; "
              f"peak {mib['peak_rss']:.0f}")
    if len(frameworks) == 2:
        a, b = med["peftjax"], med["peft"]
        print(f"targets: step time <= 0.65 x PEFT's: {'met' if a['step_s'] <= 0.65 * b['step_s'] else 'MISSED'}; "
              f"peak memory <= 0.5 x PEFT's: {'met' if a['peak_rss'] <= 0.5 * b['peak_rss'] else 'MISSED'}")
        print(f"ratio_time={a['step_s'] / b['step_s']:.3f} ratio_mem={a['peak_rss'] / b['peak_rss']:.3f} "
              f"ratio_first_step={a['first_step_s'] / b['first_step_s']:.3f} peftjax_step_s={a['step_s']:.3f} "
              f"peft_step_s={b['step_s']:.3f} floor_fraction={summary['floor_fraction']:.3f}")
    else:
        f = frameworks[0]
        print(f"{f}_step_s={med[f]['step_s']:.3f} {f}_peak_gib={med[f]['peak_rss'] / 2**30:.3f} "
              + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
