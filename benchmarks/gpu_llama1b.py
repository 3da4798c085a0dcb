"""LoRA training throughput and MFU of a ~1B Llama on one NVIDIA H100/H200: peftjax against HF PEFT.

    python benchmarks/gpu_llama1b.py             # on the accelerator machine (< 5 minutes)
    python benchmarks/gpu_llama1b.py --dry-run   # anywhere: config, parameters and FLOPs, on CPU

The model has TinyLlama-1.1B's shape (hidden 2048, intermediate 5632, 22 layers, 32 heads,
4 key-value heads, vocab 32000) and random weights, in bfloat16; LoRA r=16 (alpha 32) on all
seven linear projections of every layer, adapters and AdamW state in float32; sequences of 2048
tokens. peftjax runs with ``scan_layers=True`` and a ``remat`` policy that keeps the linear
layers' outputs and recomputes attention (its attention materialises the score matrix);
PyTorch runs transformers' SDPA attention and no checkpointing. Each framework runs in its own
child process, so neither holds GPU memory while the other runs.

Reported per framework: step time, tokens per second and MFU, the model FLOPs of a step divided
by the step time and the card's dense bf16 peak (H100 SXM and H200: 989 TFLOP/s; H100 PCIe:
756). Model FLOPs of a LoRA step: forward and input gradient of every frozen linear layer,
4 N T; attention's batched matmuls, 12 B S^2 (heads x head_dim) per layer (no causal
discount); the adapters, 6 T r (in + out) per adapted layer. Recomputation is not counted.

``--dry-run`` builds the config, counts parameters abstractly (``nnx.eval_shape``; PyTorch on
the meta device), prints the model FLOPs of the full step, and lowers the same step for a
2-layer, 256-token variant on CPU to check the FLOP formula against XLA's cost analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}  # dense, SXM unless named


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--remat", default="dots_with_no_batch_dims_saveable", help="peftjax's remat policy")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the card's bf16 peak")
    p.add_argument("--only", choices=["peftjax", "peft"], default=None)
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--child", choices=["peftjax", "peft"], default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def hf_config(args, **extra):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.seq), tie_word_embeddings=False, rms_norm_eps=1e-5, **extra,
    )


def linear_shapes(args) -> list[tuple[int, int]]:
    h, d = args.hidden, args.hidden // args.heads
    kv = args.kv_heads * d
    return [(h, h), (h, kv), (h, kv), (h, h), (h, args.intermediate), (h, args.intermediate), (args.intermediate, h)]


def parameter_count(args) -> int:
    layer = sum(a * b for a, b in linear_shapes(args)) + 2 * args.hidden
    return args.layers * layer + 2 * args.vocab * args.hidden + args.hidden


def model_flops(args) -> float:
    """Model FLOPs of one LoRA training step (see the module docstring)."""
    t = args.batch * args.seq
    linear = args.layers * sum(a * b for a, b in linear_shapes(args)) + args.hidden * args.vocab
    attention = 12 * args.batch * args.seq**2 * args.hidden * args.layers
    lora = args.layers * sum(6 * t * args.rank * (a + b) for a, b in linear_shapes(args))
    return 4 * t * linear + attention + lora


def peak_flops(args, device_kind: str) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    for name, tflops in PEAK_BF16_TFLOPS.items():  # "H100 PCIe" before "H100"
        if name in device_kind:
            return tflops * 1e12
    return None


# --------------------------------------------------------------------------- peftjax


def build_peftjax_step(args, *, remat: str, scan: bool = True):
    import jax.numpy as jnp
    import numpy as np
    import optax

    import peftjax
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(hf_config(args, scan_layers=scan, remat=remat), dtype=jnp.bfloat16)
    peftjax.get_peft_model(model, peftjax.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS))
    graphdef, trainable, rest = peftjax.split(model)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = tx.init(trainable)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, args.vocab, (args.batch, args.seq)).astype(np.int32))
    batch = {"input_ids": ids, "labels": ids}
    return peftjax.make_train_step(graphdef, tx), (trainable, opt_state, rest, batch, None)


def abstract_peftjax_step(args):
    """``build_peftjax_step``'s step (unrolled, no remat) lowered on shapes alone."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import peftjax
    from peftjax.models import LlamaForCausalLM

    config = hf_config(args, scan_layers=False, remat="none")
    model = nnx.eval_shape(lambda: _with_lora(LlamaForCausalLM.from_config(config, dtype=jnp.bfloat16), args))
    graphdef, trainable, rest = peftjax.split(model)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    ids = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}
    return peftjax.make_train_step(graphdef, tx).lower(trainable, jax.eval_shape(tx.init, trainable), rest, batch, None)


def run_peftjax(args) -> dict:
    import jax

    step, (trainable, opt_state, rest, batch, key) = build_peftjax_step(args, remat=args.remat)
    times = []
    t0 = time.perf_counter()
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, key)
        loss.block_until_ready()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    stats = jax.devices()[0].memory_stats() or {}
    return {"step_s": statistics.median(times), "first_step_s": first, "loss": float(loss),
            "device_kind": jax.devices()[0].device_kind, "peak_bytes": stats.get("peak_bytes_in_use")}


# --------------------------------------------------------------------------- HF PEFT


def build_peft_model(args, device):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    with torch.device(device):
        model = LlamaForCausalLM(hf_config(args)).to(torch.bfloat16)
    # PEFT keeps the adapters in float32 over a bfloat16 model (autocast_adapter_dtype=True)
    return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                            target_modules=PROJECTIONS))


def run_peft(args) -> dict:
    import torch

    torch.manual_seed(0)
    model = build_peft_model(args, "cuda")
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    times = []
    t0 = time.perf_counter()
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i == 0:
            first = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "first_step_s": first, "loss": float(loss.detach()),
            "device_kind": torch.cuda.get_device_name(), "peak_bytes": torch.cuda.max_memory_allocated(),
            "attn_implementation": model.config._attn_implementation}


# --------------------------------------------------------------------------- dry run


def dry_run(args) -> None:
    import jax
    from flax import nnx

    import peftjax
    from peftjax.models import LlamaForCausalLM

    config = hf_config(args, scan_layers=True, remat=args.remat)
    abstract = nnx.eval_shape(lambda: LlamaForCausalLM.from_config(config, dtype="bfloat16"))
    n_params = abstract.num_parameters()
    if n_params != parameter_count(args):
        raise SystemExit(f"parameter count {n_params} differs from the formula's {parameter_count(args)}")
    lora = nnx.eval_shape(lambda: _with_lora(LlamaForCausalLM.from_config(config, dtype="bfloat16"), args))
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(lora, peftjax.TRAINABLE)))
    try:  # the PyTorch side, on the meta device: no memory, no GPU
        n_torch, n_torch_lora = (lambda m: (m.get_nb_trainable_parameters()[1] - m.get_nb_trainable_parameters()[0],
                                            m.get_nb_trainable_parameters()[0]))(build_peft_model(args, "meta"))
    except ImportError:
        n_torch = n_torch_lora = None
    flops = model_flops(args)
    print(f"Llama: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, {args.heads} heads "
          f"({args.kv_heads} kv), vocab {args.vocab}; {n_params / 1e9:.3f} B parameters (PyTorch: "
          f"{n_torch / 1e9 if n_torch else float('nan'):.3f} B); LoRA r={args.rank}: {n_lora / 1e6:.2f} M "
          f"(PEFT: {n_torch_lora / 1e6 if n_torch_lora else float('nan'):.2f} M)")
    print(f"step: batch {args.batch} x {args.seq} tokens, {flops / 1e12:.2f} model TFLOP; at 989 TFLOP/s and "
          f"40% MFU, {flops / (0.4 * 989e12):.3f} s per step")
    if n_torch is not None and (n_torch != n_params or n_torch_lora != n_lora):
        raise SystemExit("peftjax and PEFT disagree on the parameter counts")

    # the same step for a small variant, lowered on CPU: XLA's count against the formula. XLA
    # counts a loop body once, so the variant's layers are unrolled and its loss is one chunk.
    small = argparse.Namespace(**{**vars(args), "layers": 2, "seq": 256, "batch": 1})
    # abstract weights, never allocated; the lowered step's count (compiling it, 1.6 s on a 2-core
    # host, changes it by 0.3%: 159.6 against 159.1 GFLOP)
    with jax.default_device(jax.devices("cpu")[0]):
        cost = abstract_peftjax_step(small).cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla = float(cost["flops"])
    print(f"small variant (2 layers unrolled, 1 x 256 tokens): formula {model_flops(small) / 1e9:.1f} GFLOP; "
          f"XLA's cost analysis of the lowered step {xla / 1e9:.1f} GFLOP")
    if abs(xla / model_flops(small) - 1) > 0.05:
        raise SystemExit("the FLOP formula and XLA's cost analysis disagree by more than 5%")
    print(f"dry_run_params={n_params} lora_params={n_lora} step_tflop={flops / 1e12:.3f} "
          f"small_formula_gflop={model_flops(small) / 1e9:.2f} small_xla_gflop={xla / 1e9:.2f}")


def _with_lora(model, args):
    import peftjax

    peftjax.get_peft_model(model, peftjax.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=PROJECTIONS))
    return model


# --------------------------------------------------------------------------- parent


def main() -> None:
    args = parse_args()
    if args.dry_run:
        dry_run(args)
        return
    if args.child:
        print(json.dumps((run_peftjax if args.child == "peftjax" else run_peft)(args)))
        return
    flops = model_flops(args)
    print(f"Llama {parameter_count(args) / 1e9:.2f} B parameters, bf16, LoRA r={args.rank} on "
          f"{', '.join(PROJECTIONS)}; batch {args.batch} x {args.seq} tokens; {flops / 1e12:.1f} model TFLOP per step; "
          f"{args.warmup} warmup + {args.steps} timed steps")
    results = {}
    for framework in [args.only] if args.only else ["peftjax", "peft"]:
        argv = [sys.executable, os.path.abspath(__file__), "--child", framework] + sys.argv[1:]
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{framework} failed:\n{proc.stderr[-3000:]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peak = peak_flops(args, r["device_kind"])
        r["tokens_per_s"] = args.batch * args.seq / r["step_s"]
        r["mfu"] = flops / r["step_s"] / peak if peak else float("nan")
        results[framework] = r
        peak_gib = (r["peak_bytes"] or 0) / 2**30
        print(f"  {framework:8s} {r['device_kind']}: step {r['step_s']:.3f} s, {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {r['mfu']:.3f}, first step {r['first_step_s']:.1f} s, peak device memory {peak_gib:.1f} GiB, "
              f"loss {r['loss']:.3f}", flush=True)
    summary = " ".join(f"{f}_tokens_per_s={r['tokens_per_s']:.0f} {f}_mfu={r['mfu']:.3f}" for f, r in results.items())
    if len(results) == 2:
        summary += f" ratio_tokens_per_s={results['peftjax']['tokens_per_s'] / results['peft']['tokens_per_s']:.3f}"
    print(summary)


if __name__ == "__main__":
    main()
