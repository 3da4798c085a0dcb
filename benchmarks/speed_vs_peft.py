"""peftjax against HF PEFT + PyTorch: one LoRA training step on the same model, batch and optimizer.

    python benchmarks/speed_vs_peft.py [--trials 3 --warmup 3 --steps 10 --hidden 512 --layers 4 ...]

The model is built once in PyTorch from a fixed seed and saved with ``save_pretrained``; both
frameworks load that directory. ``--model PATH`` measures a checkpoint of your own instead (a
Llama, Mistral, Qwen2 or Qwen3 directory; the size flags are read from its ``config.json``). Each
configuration runs in its own child process per trial (the order rotates between trials), so
peak resident memory (``ru_maxrss``) is one run's alone and a noisy neighbour hurts every side
alike. All sides: float32, LoRA on all seven linear projections
of every layer, AdamW with the same hyperparameters, next-token loss over all positions,
``--warmup`` untimed steps then ``--steps`` timed ones, each waited on. torch is installed and
importable in every child, as the test extra installs it.

Configurations (``--configs`` picks some):

- ``peftjax`` (the headline): the plain public path the README shows, ``models.from_pretrained``,
  ``get_peft_model``, ``split``, ``optax.adamw``, ``make_train_step``, nothing else;
- ``peftjax-tuned``: the same plus the memory options, ``scan_layers=True, remat="full"`` and
  ``peftjax.release_host_memory()`` after setup and after compiling the step ahead;
- ``peftjax-cached``: the plain path with JAX's persistent compilation cache in a directory the
  trials share (trial 0 fills it: a cold start; later trials read it);
- ``peft``: PEFT's LoRA on transformers' model, eager PyTorch; ``peft-gc``: with gradient
  checkpointing (transformers' ``gradient_checkpointing_enable``), PEFT's counterpart of remat;
- ``peftjax-bf16`` and ``peft-bf16`` (not run by default): the model loaded in bfloat16 (peftjax
  ``from_pretrained(dtype="bfloat16")``, transformers ``dtype=torch.bfloat16``), each library's
  default adapter dtype; their matmul peak is measured in bfloat16.

Reported (medians over trials): step time, tokens per second, peak resident memory, and time to
first step from the start of the child process, split into phases: imports, loading the weights,
adding LoRA and the optimizer, and the first step (peftjax compiles during it). Each child also
measures its framework's float32 matmul peak (``--matmul-size`` cubed), which with the step's
FLOPs (XLA's cost analysis, or counted by hand) gives each framework's floor fraction. The last
line is a one-line summary.
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

# name -> (framework, options)
CONFIGS = {
    "peftjax": ("peftjax", {}),
    "peftjax-tuned": ("peftjax", {"scan_layers": True, "remat": "full", "release": True}),
    "peftjax-cached": ("peftjax", {"compilation_cache": True}),
    "peft": ("peft", {}),
    "peft-gc": ("peft", {"gradient_checkpointing": True}),
    "peftjax-bf16": ("peftjax", {"dtype": "bfloat16"}),
    "peft-bf16": ("peft", {"dtype": "bfloat16"}),
}
DEFAULT_CONFIGS = ["peftjax", "peftjax-tuned", "peftjax-cached", "peft", "peft-gc"]


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
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=DEFAULT_CONFIGS,
                   help=f"what to run (default: {' '.join(DEFAULT_CONFIGS)}); ratios need peftjax and peft")
    add_model_flag(p)
    # internal: run one framework in this process and print a JSON line
    p.add_argument("--child", choices=list(CONFIGS), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


BETAS, EPS = (0.9, 0.999), 1e-8


# the families whose checkpoints --model takes: their decoder layers have the seven PROJECTIONS
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="PATH",
                   help="a Llama-architecture checkpoint directory (llama, mistral, qwen2 or qwen3) to measure "
                        "instead of a random one; --hidden, --layers, --heads, --intermediate and --vocab are "
                        "then read from its config.json")


def model_directory(args, directory: str) -> str:
    """Where the children load the model from: ``--model``'s checkpoint, whose sizes replace the
    size flags in ``args``; else a random Llama of the flags' sizes, built into ``directory``."""
    if args.model is None:
        build_model(args, directory)
        return directory
    path = os.path.join(args.model, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--model {args.model}: cannot read {path} ({e})") from None
    if config.get("model_type") not in LLAMA_LIKE:
        raise SystemExit(f"--model {args.model}: model_type {config.get('model_type')!r} is not one of "
                         f"{', '.join(LLAMA_LIKE)} (the benchmark puts LoRA on {', '.join(PROJECTIONS)})")
    args.hidden, args.layers = config["hidden_size"], config["num_hidden_layers"]
    args.heads, args.intermediate = config["num_attention_heads"], config["intermediate_size"]
    args.vocab = config["vocab_size"]
    args.kv_heads = config.get("num_key_value_heads") or args.heads
    args.head_dim = config.get("head_dim") or args.hidden // args.heads
    return args.model


def model_flops(args) -> float:
    """Matmul FLOPs of one LoRA step by hand: forward and input-gradient of every linear layer
    (the frozen weights need no weight gradient), attention's two batched matmuls (forward and
    backward), and the adapters' ``6 T r (in + out)``. Grouped key/value heads and a head size of
    its own (a ``--model`` checkpoint's) shrink the k/v and q/o projections."""
    t, h, i, r = args.batch * args.seq, args.hidden, args.intermediate, args.rank
    head_dim = getattr(args, "head_dim", None) or h // args.heads
    q, kv = args.heads * head_dim, (getattr(args, "kv_heads", None) or args.heads) * head_dim
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    linear = sum(a * b for a, b in shapes) * args.layers + h * args.vocab
    attention = 3 * 4 * args.batch * args.seq**2 * q * args.layers
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


def matmul_peak(fn, n: int) -> float:
    """FLOP/s of the fastest of 3 float32 ``n x n`` matmuls (after one warm-up call)."""
    fn()
    best = min(_timed(fn) for _ in range(3))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def lora_training(args, model):
    """peftjax's side after loading, as the quick start writes it: LoRA on ``PROJECTIONS``, ``split``,
    AdamW and the batch. Returns ``(graphdef, tx, trainable, opt_state, rest, batch)`` for
    ``peftjax.make_train_step(graphdef, tx)`` (``step_profile.py`` builds the same)."""
    import jax.numpy as jnp
    import optax

    import peftjax

    peft_model = peftjax.get_peft_model(
        model, peftjax.LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=PROJECTIONS)
    )
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    tx = optax.adamw(args.lr, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=args.weight_decay)
    ids = jnp.asarray(batch_arrays(args))
    return graphdef, tx, trainable, tx.init(trainable), rest, {"input_ids": ids, "labels": ids}


def peft_training(args, model, gradient_checkpointing: bool = False):
    """PEFT's side after loading: LoRA on ``PROJECTIONS``, train mode, AdamW over the adapters, the
    batch. Returns ``(peft model, optimizer, ids)`` for :func:`peft_step`."""
    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=PROJECTIONS)
    )
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=args.lr, betas=BETAS, eps=EPS, weight_decay=args.weight_decay,
    )
    return model, opt, torch.as_tensor(batch_arrays(args).astype(np.int64))


def peft_step(model, opt, ids):
    """One step of PEFT's eager loop; returns the loss."""
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def run_peftjax(args, options: dict) -> dict:
    import jax

    if options.get("compilation_cache"):
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp
    import numpy as np
    import optax  # noqa: F401 - lora_training's, imported in the imports phase

    import peftjax
    from peftjax import models

    phases = {"import_s": time.perf_counter() - T_START}
    rss_imports = current_rss_bytes()
    t = time.perf_counter()
    if options.get("scan_layers"):
        model = models.from_pretrained(args.model_dir, scan_layers=True, remat=options["remat"])
    elif options.get("dtype"):
        model = models.from_pretrained(args.model_dir, dtype=options["dtype"])
    else:
        model = models.from_pretrained(args.model_dir)
    phases["load_s"] = time.perf_counter() - t
    torch_after_load = "torch" in sys.modules
    rss_loaded = current_rss_bytes()
    t = time.perf_counter()
    graphdef, tx, trainable, opt_state, rest, batch = lora_training(args, model)
    step = peftjax.make_train_step(graphdef, tx)
    phases["adapters_s"] = time.perf_counter() - t
    if options.get("release"):  # loading's and injection's one-off executables, freed heap
        peftjax.release_host_memory(clear_compiled=True)
    rss_setup = current_rss_bytes()
    t = time.perf_counter()
    if options.get("release"):  # compiled ahead (the calls reuse it), then the compiler's freed heap returned
        step.lower(trainable, opt_state, rest, batch, None).compile()
        peftjax.release_host_memory()

    times = []
    first = None
    for i in range(args.warmup + args.steps):
        t_step = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        loss.block_until_ready()
        now = time.perf_counter()
        if first is None:
            first = now - T_START  # from the start of the process: imports count too
            phases["step1_s"] = now - t
            rss_compiled = current_rss_bytes()
        if i >= args.warmup:
            times.append(now - t_step)
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
    a = jnp.asarray(np.random.RandomState(1).standard_normal((n, n)), options.get("dtype", jnp.float32))
    mm = jax.jit(lambda x, y: x @ y)
    return {
        "step_s": statistics.median(times),
        "first_step_s": first,
        **phases,
        "peak_rss": rss,
        "loss": float(loss),
        "flops": float(cost["flops"]),
        "step_temp_bytes": temp,
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "rss_setup": rss_setup,
        "rss_compiled": rss_compiled,
        "torch_after_load": torch_after_load,
        "matmul_flops_per_s": matmul_peak(lambda: mm(a, a).block_until_ready(), n),
    }


def run_peft(args, options: dict) -> dict:
    import numpy as np
    import peft  # noqa: F401 - peft_training's, imported in the imports phase
    import torch
    from transformers import AutoModelForCausalLM

    phases = {"import_s": time.perf_counter() - T_START}
    rss_imports = current_rss_bytes()
    t = time.perf_counter()
    dtype = getattr(torch, options.get("dtype", "float32"))
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    phases["load_s"] = time.perf_counter() - t
    rss_loaded = current_rss_bytes()
    t = time.perf_counter()
    model, opt, ids = peft_training(args, model, options.get("gradient_checkpointing", False))
    phases["adapters_s"] = time.perf_counter() - t

    times = []
    first = None
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = peft_step(model, opt, ids)
        now = time.perf_counter()
        if first is None:
            first = now - T_START  # from the start of the process: imports count too
            phases["step1_s"] = now - t
        if i >= args.warmup:
            times.append(now - t)
    rss = peak_rss_bytes()
    n = args.matmul_size
    a = torch.as_tensor(np.random.RandomState(1).standard_normal((n, n)).astype(np.float32)).to(dtype)
    return {
        "step_s": statistics.median(times),
        "first_step_s": first,
        **phases,
        "peak_rss": rss,
        "loss": float(loss.detach()),
        "rss_imports": rss_imports,
        "rss_loaded": rss_loaded,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,
        "matmul_flops_per_s": matmul_peak(lambda: torch.mm(a, a), n),
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


def run_child(args, config: str, directory: str, cache_dir: str, script: str = __file__) -> dict:
    """Runs ``script`` (this one, or another sharing its flags) as ``--child config``; its last line's JSON."""
    argv = [sys.executable, os.path.abspath(script), "--child", config, "--model-dir", directory,
            "--cache-dir", cache_dir]
    for name in ("hidden", "layers", "heads", "intermediate", "vocab", "batch", "seq", "rank", "alpha", "lr",
                 "weight_decay", "warmup", "steps", "matmul_size"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} child failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def median(results, key):
    return statistics.median(r[key] for r in results)


def main() -> None:
    args = parse_args()
    if args.child:
        framework, options = CONFIGS[args.child]
        result = (run_peftjax if framework == "peftjax" else run_peft)(args, options)
        print(json.dumps(result))
        return

    tokens = args.batch * args.seq
    configs = args.configs
    directory = tempfile.TemporaryDirectory()
    model_dir = model_directory(args, directory.name)
    print(f"{args.model or 'random'} Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads, "
          f"intermediate {args.intermediate}, "
          f"vocab {args.vocab}; batch {args.batch} x {args.seq} tokens; LoRA r={args.rank} on "
          f"{', '.join(PROJECTIONS)}; float32 (the -bf16 rows: bfloat16); AdamW; {args.warmup} warmup + {args.steps} timed steps; "
          f"{args.trials} trials; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    results = {c: [] for c in configs}
    with directory, tempfile.TemporaryDirectory() as cache_dir:
        for trial in range(args.trials):
            k = trial % len(configs)
            for config in configs[k:] + configs[:k]:
                r = run_child(args, config, model_dir, cache_dir)
                results[config].append(r)
                print(f"  trial {trial} {config:15s} step {r['step_s']:.3f} s  first step {r['first_step_s']:.1f} s  "
                      f"peak RSS {r['peak_rss'] / 2**30:.2f} GiB  loss {r['loss']:.4f}", flush=True)

    keys = ("step_s", "peak_rss", "first_step_s", "import_s", "load_s", "adapters_s", "step1_s",
            "matmul_flops_per_s")
    med = {c: {k: median(results[c], k) for k in keys} for c in configs}
    print(f"{'':26s}" + "".join(f"{c:>15s}" for c in configs))
    rows = [
        ("step time (s)", "step_s", 1.0, "{:15.3f}"),
        ("tokens per second", "step_s", None, "{:15.0f}"),
        ("peak resident (GiB)", "peak_rss", 2**-30, "{:15.2f}"),
        ("time to first step (s)", "first_step_s", 1.0, "{:15.2f}"),
        ("  imports (s)", "import_s", 1.0, "{:15.2f}"),
        ("  loading (s)", "load_s", 1.0, "{:15.2f}"),
        ("  LoRA + optimizer (s)", "adapters_s", 1.0, "{:15.2f}"),
        ("  first step (s)", "step1_s", 1.0, "{:15.2f}"),
        ("matmul peak (GFLOP/s)", "matmul_flops_per_s", 1e-9, "{:15.0f}"),
    ]
    for label, key, scale, fmt in rows:
        values = [tokens / med[c][key] if scale is None else med[c][key] * scale for c in configs]
        print(f"{label:26s}" + "".join(fmt.format(v) for v in values))
    if "peftjax-cached" in configs and args.trials > 1:
        cold = results["peftjax-cached"][0]["first_step_s"]
        warm = statistics.median(r["first_step_s"] for r in results["peftjax-cached"][1:])
        print(f"peftjax-cached: time to first step {cold:.2f} s cold (trial 0 fills the cache), {warm:.2f} s warm")

    summary = {}
    hand = model_flops(args)
    for config in configs:
        framework, options = CONFIGS[config]
        step, peak = med[config]["step_s"], med[config]["matmul_flops_per_s"]
        if framework == "peftjax" and not options.get("scan_layers"):
            flops, how = median(results[config], "flops"), f"XLA cost analysis; by hand {hand / 1e9:.1f}"
        else:  # XLA's cost analysis counts a scanned loop's body once; torch has none
            flops, how = hand, "counted by hand"
        floor = flops / peak
        kind = options.get("dtype", "float32")
        print(f"{config}: {flops / 1e9:.1f} GFLOP a step ({how}); own {kind} matmul peak {peak / 1e9:.0f} GFLOP/s; "
              f"floor {floor:.3f} s; achieved {flops / step / 1e9:.0f} GFLOP/s = {floor / step:.2f} of the floor")
        summary[config] = floor / step
    for config in configs:
        r = results[config][0]
        mib = {k: median(results[config], k) / 2**20 for k in ("rss_imports", "rss_loaded", "peak_rss")}
        extra = (f"torch imported by loading: {r['torch_after_load']}" if CONFIGS[config][0] == "peftjax"
                 else f"torch threads {r['torch_threads']}, attention {r['attn_implementation']}")
        print(f"{config}: resident memory (MiB): imports {mib['rss_imports']:.0f}; weights loaded "
              f"{mib['rss_loaded']:.0f}; peak {mib['peak_rss']:.0f}; {extra}")

    def ratio(a, b, key):
        return med[a][key] / med[b][key]

    fields = {}
    if {"peftjax", "peft"} <= set(configs):
        fields.update(ratio_time=ratio("peftjax", "peft", "step_s"), ratio_mem=ratio("peftjax", "peft", "peak_rss"),
                      ratio_first_step=ratio("peftjax", "peft", "first_step_s"))
    if {"peftjax-tuned", "peft-gc"} <= set(configs):
        fields.update(tuned_ratio_time=ratio("peftjax-tuned", "peft-gc", "step_s"),
                      tuned_ratio_mem=ratio("peftjax-tuned", "peft-gc", "peak_rss"))
    def f32_peak(framework):
        return next((med[c]["matmul_flops_per_s"] for c in configs
                     if CONFIGS[c][0] == framework and "dtype" not in CONFIGS[c][1]), None)

    jax_peak, torch_peak = f32_peak("peftjax"), f32_peak("peft")
    if jax_peak:
        fields["jax_f32_gflops"] = jax_peak / 1e9
    if torch_peak:
        fields["torch_f32_gflops"] = torch_peak / 1e9
    fields.update({f"floor_{c.replace('-', '_')}": v for c, v in summary.items()})
    fields.update({f"{c.replace('-', '_')}_step_s": med[c]["step_s"] for c in configs})
    if "ratio_time" in fields:
        print(f"headline (plain public path against plain PEFT): step time {fields['ratio_time']:.3f}x, "
              f"peak memory {fields['ratio_mem']:.3f}x, time to first step {fields['ratio_first_step']:.3f}x; "
              f"matmul peaks JAX {fields.get('jax_f32_gflops', 0):.0f} / torch {fields.get('torch_f32_gflops', 0):.0f} "
              "GFLOP/s")
    if {"peftjax-bf16", "peft-bf16"} <= set(configs):
        fields.update(bf16_ratio_time=ratio("peftjax-bf16", "peft-bf16", "step_s"),
                      bf16_ratio_mem=ratio("peftjax-bf16", "peft-bf16", "peak_rss"))
        print(f"bfloat16: step time {fields['bf16_ratio_time']:.3f}x PEFT's; bf16 matmul peaks JAX "
              f"{med['peftjax-bf16']['matmul_flops_per_s'] / 1e9:.0f} / torch "
              f"{med['peft-bf16']['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s")
    print(" ".join(f"{k}={v:.4g}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
