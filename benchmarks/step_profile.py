"""Where one LoRA training step spends its time, peftjax and HF PEFT + PyTorch side by side.

    python benchmarks/step_profile.py [--steps 3 --hidden 512 --layers 4 ...]

The model, batch, adapters and optimizer are ``speed_vs_peft.py``'s (the same flags), each
framework in its own child process on its plain path: peftjax's README path (``make_train_step``)
and PEFT's eager loop. After ``--warmup`` steps, ``--steps`` steps are timed without a profiler
(the step time and floor fraction below), then ``--steps`` more are profiled:

- peftjax with ``jax.profiler`` (its Perfetto trace): every event of XLA's threads is matched
  to its instruction in the compiled step's HLO and put in a category by what it computes;
- PEFT with ``torch.profiler``: each ATen operator's self time, in the same categories.

XLA runs independent operations side by side on the host's cores, so an operation's own duration is
not its cost: each moment of the step is shared equally among the operations running then, and
the wall time with no operation running is "idle" (for PyTorch, the step's wall time not inside
any operator: Python and autograd's bookkeeping). The categories are milliseconds of a profiled
step; ``torch.profiler`` slows PyTorch's step more than ``jax.profiler`` slows XLA's, so compare
the steps themselves by the unprofiled row. A category's matmul throughput is its FLOPs over
its share of the wall time; the last rows give each framework's float32 matmul peak on this host
and the step's fraction of the floor (the FLOPs counted by hand over peak x step time).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import math
import os
import re
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import speed_vs_peft as svp  # the shared model, batch, optimizer and child runner

CATEGORIES = [
    ("layers", "linear layers (matmuls)"),
    ("head", "LM head (matmuls)"),
    ("loss", "loss (softmax, cross entropy)"),
    ("attention", "attention (scores, softmax, mask)"),
    ("layout", "copies, transposes, concatenation"),
    ("other", "other element-wise (norms, SiLU, RoPE, adds, AdamW)"),
    ("idle", "idle / framework (no operation running)"),
]
MATMUL_CATEGORIES = ("layers", "head")


# --------------------------------------------------------------------------- peftjax


def _timed_steps(one_step, args) -> float:
    """``--warmup`` steps, then the median of ``--steps`` timed ones, outside any profiler."""
    for _ in range(args.warmup):
        one_step()
    return statistics.median(svp._timed(one_step) for _ in range(args.steps))


def _dims(shape: str) -> list[int]:
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _dot_flops(body: str) -> dict:
    """The FLOPs of each ``dot`` in one HLO computation's ``body``, by name (its operands' shapes are
    defined in the same body)."""
    shapes = {m.group(1): _dims(m.group(2)) for m in re.finditer(r"%([\w.\-]+) = (\w+\[[\d,]*\])", body)}
    flops = {}
    for m in re.finditer(r"%([\w.\-]+) = (\w+\[[\d,]*\])\S* dot\(%([\w.\-]+), %[\w.\-]+\),([^\n]*)", body):
        lhs, contracting = shapes.get(m.group(3)), re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(4))
        if lhs is None or contracting is None:
            continue
        k = math.prod(lhs[int(i)] for i in contracting.group(1).split(",") if i)
        flops[m.group(1)] = 2.0 * math.prod(_dims(m.group(2))) * k
    return flops


def _hlo_instructions(text: str) -> dict:
    """``name -> (opcode, shape dims, op_name, FLOPs of its dots)`` for every HLO instruction: a
    fusion's FLOPs are those of the dots it calls, a plain ``dot``'s its own."""
    computations = [m.group(1) for m in re.finditer(r"^(?:ENTRY )?%[\w.\-]+ [^\n]*\{\n(.*?)^\}", text, re.M | re.S)]
    by_name = dict(zip(re.findall(r"^(?:ENTRY )?(%[\w.\-]+) [^\n]*\{\n", text, re.M), computations))
    table = {}
    for body in computations:
        own = _dot_flops(body)
        for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (\(?\w+\[[\d,]*\][^ ]*) (\w[\w\-]*)\((.*)$", body, re.M):
            name, shape, opcode, rest = m.groups()
            op_name = re.search(r'op_name="([^"]*)"', rest)
            called = re.search(r"calls=(%[\w.\-]+)", rest)
            if opcode == "fusion" and called:
                flops = sum(_dot_flops(by_name.get(called.group(1), "")).values())
            else:
                flops = own.get(name, 0.0)
            table[name] = (opcode, _dims(shape.lstrip("(")), op_name.group(1) if op_name else "", flops)
    return table


def _jax_category(name: str, instruction, seq: int) -> str:
    opcode, shape, op_name, flops = instruction
    # peftjax's attention runs in jax.named_scope("attention"): "jvp(attention)" forward,
    # "transpose(jvp(attention))" backward. (Its causal blocks have no [seq, seq] shape to go by.)
    attention = re.search(r"[(/]attention[)/]", op_name) is not None
    if "/while/body/" in op_name:  # the fused causal-LM loss: logits chunk by chunk
        return "head" if flops else "loss"
    if flops:
        return "attention" if attention or len(shape) >= 4 else "layers"
    if opcode in ("copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice", "pad") or (
        opcode == "fusion" and name.startswith(("copy", "transpose", "concatenate", "slice", "dynamic", "pad"))
    ):
        return "layout"
    if attention or (len(shape) >= 4 and shape[-1] == shape[-2] == seq):
        return "attention"
    return "other"


def _share_wall_time(events: list[tuple[float, float, str]]) -> tuple[dict, float]:
    """Each moment's wall time split equally among the events running then; returns the shares by
    category and the busy wall time (moments with at least one event)."""
    points = sorted([(s, 1, i) for i, (s, e, c) in enumerate(events)] + [(e, -1, i) for i, (s, e, c) in enumerate(events)])
    share, busy, running, last = collections.Counter(), 0.0, set(), None
    for t, kind, i in points:
        if running and last is not None and t > last:
            part = (t - last) / len(running)
            for j in running:
                share[events[j][2]] += part
            busy += t - last
        running.add(i) if kind == 1 else running.discard(i)
        last = t
    return share, busy


def profile_peftjax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import peftjax
    from peftjax import models

    graphdef, tx, trainable, opt_state, rest, batch = svp.lora_training(args, models.from_pretrained(args.model_dir))
    step = peftjax.make_train_step(graphdef, tx)

    def one_step():
        nonlocal trainable, opt_state
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        loss.block_until_ready()

    plain = _timed_steps(one_step, args)
    with tempfile.TemporaryDirectory(prefix="step-trace-") as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        walls = [svp._timed(one_step) for _ in range(args.steps)]
        jax.profiler.stop_trace()
        with gzip.open(max(glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz"))) as f:
            trace = json.load(f)
    # the same program compiled again: the same instruction names as the traced one
    instructions = _hlo_instructions(step.lower(trainable, opt_state, rest, batch, None).compile().as_text())
    trace = trace["traceEvents"] if isinstance(trace, dict) else trace
    threads = {(e["pid"], e["tid"]) for e in trace
               if e.get("ph") == "M" and e.get("name") == "thread_name" and "XLA" in e["args"]["name"]}
    events, flops = [], collections.Counter()
    for e in trace:
        if e.get("ph") != "X" or (e["pid"], e["tid"]) not in threads or e["name"] not in instructions:
            continue
        instruction = instructions[e["name"]]
        if instruction[0] in ("while", "call", "conditional"):  # containers: their bodies are events too
            continue
        category = _jax_category(e["name"], instruction, args.seq)
        events.append((e["ts"] / 1e6, (e["ts"] + e["dur"]) / 1e6, category))
        flops[category] += instruction[3]
    share, busy = _share_wall_time(events)
    wall = sum(walls)
    share["idle"] = max(wall - busy, 0.0)
    n = args.matmul_size
    a = jnp.asarray(np.random.RandomState(1).standard_normal((n, n)), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    return {"step_s": plain, "profiled_step_s": statistics.median(walls),
            "ms": {k: 1e3 * v / args.steps for k, v in share.items()},
            "gflop": {k: v / 1e9 / args.steps for k, v in flops.items()},
            "matmul_flops_per_s": svp.matmul_peak(lambda: mm(a, a).block_until_ready(), n)}


# --------------------------------------------------------------------------- PEFT


def _torch_category(name: str, shapes, vocab: int) -> str | None:
    """The category of an ATen operator's self time; ``None`` for what is not an operator."""
    lowered = name.lower()
    if not name.startswith("aten::"):
        return None  # autograd nodes and record_function ranges: their self time is bookkeeping
    if "scaled_dot_product" in lowered or "flash_attention" in lowered:
        return "attention"
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear"):
        return "head" if any(vocab in (s or []) for s in shapes or []) else "layers"
    if "softmax" in lowered or "nll_loss" in lowered or "cross_entropy" in lowered:
        return "loss"
    if name in ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::_to_copy", "aten::to",
                "aten::transpose", "aten::t", "aten::view", "aten::reshape", "aten::permute", "aten::expand",
                "aten::slice", "aten::select", "aten::unsqueeze", "aten::as_strided", "aten::_unsafe_view"):
        return "layout"
    return "other"


def profile_peft(args) -> dict:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    model, opt, ids = svp.peft_training(args, AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32))

    def one_step():
        svp.peft_step(model, opt, ids)

    plain = _timed_steps(one_step, args)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        walls = [svp._timed(one_step) for _ in range(args.steps)]
    share, flops = collections.Counter(), collections.Counter()
    for row in prof.key_averages(group_by_input_shape=True):
        category = _torch_category(row.key, row.input_shapes, args.vocab)
        if category is None:
            continue
        share[category] += row.self_cpu_time_total / 1e6  # microseconds
        flops[category] += row.flops or 0
    share["idle"] = max(sum(walls) - sum(share.values()), 0.0)
    n = args.matmul_size
    a = torch.as_tensor(np.random.RandomState(1).standard_normal((n, n)).astype(np.float32))
    return {"step_s": plain, "profiled_step_s": statistics.median(walls),
            "ms": {k: 1e3 * v / args.steps for k, v in share.items()},
            "gflop": {k: v / 1e9 / args.steps for k, v in flops.items()}, "torch_threads": torch.get_num_threads(),
            "matmul_flops_per_s": svp.matmul_peak(lambda: torch.mm(a, a), n)}


# --------------------------------------------------------------------------- parent


def parse_args(argv=None):
    args = svp.parse_args(argv)  # speed_vs_peft's model and step flags; --trials and --configs unused
    if args.steps < 1:
        raise SystemExit("--steps must be >= 1")
    return args


def main() -> None:
    if "--child" in sys.argv:
        args = parse_args()
        run = profile_peftjax if args.child == "peftjax" else profile_peft
        print(json.dumps(run(args)))
        return
    args = parse_args()
    with tempfile.TemporaryDirectory() as directory:
        model_dir = svp.model_directory(args, directory)
        results = {framework: svp.run_child(args, framework, model_dir, directory, script=__file__)
                   for framework in ("peftjax", "peft")}
    jx, pt = results["peftjax"], results["peft"]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.steps} profiled steps after {args.warmup}; "
          f"batch {args.batch} x {args.seq}, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"LoRA r={args.rank} on {len(svp.PROJECTIONS)} projections; torch threads {pt['torch_threads']}")
    print(f"{'ms per step':<52}{'peftjax':>10}{'peft':>10}")
    for key, label in CATEGORIES:
        row = f"{label:<52}{jx['ms'].get(key, 0.0):>10.1f}{pt['ms'].get(key, 0.0):>10.1f}"
        if key in MATMUL_CATEGORIES:
            rates = [r["gflop"].get(key, 0.0) / (r["ms"][key] / 1e3) if r["ms"].get(key) else 0.0 for r in (jx, pt)]
            row += f"   GFLOP/s {rates[0]:.0f} / {rates[1]:.0f}"
        print(row)
    print(f"{'step under the profiler (wall, median)':<52}{1e3 * jx['profiled_step_s']:>10.1f}"
          f"{1e3 * pt['profiled_step_s']:>10.1f}")
    print(f"{'step without it (wall, median)':<52}{1e3 * jx['step_s']:>10.1f}{1e3 * pt['step_s']:>10.1f}")
    peaks = [r["matmul_flops_per_s"] / 1e9 for r in (jx, pt)]
    flops = svp.model_flops(args)
    floors = [flops / (r["matmul_flops_per_s"] * r["step_s"]) for r in (jx, pt)]
    print(f"{'float32 matmul peak (GFLOP/s)':<52}{peaks[0]:>10.0f}{peaks[1]:>10.0f}")
    print(f"{'fraction of the floor (' + f'{flops / 1e9:.1f} GFLOP by hand)':<52}{floors[0]:>10.2f}{floors[1]:>10.2f}")
    fields = {"ratio_time": jx["step_s"] / pt["step_s"], "jax_f32_gflops": peaks[0], "torch_f32_gflops": peaks[1],
              "floor_peftjax": floors[0], "floor_peft": floors[1]}
    fields.update({"peftjax_profiled_step_ms": 1e3 * jx["profiled_step_s"],
                   "peft_profiled_step_ms": 1e3 * pt["profiled_step_s"]})
    fields.update({f"peftjax_{k}_ms": jx["ms"].get(k, 0.0) for k, _ in CATEGORIES})
    fields.update({f"peft_{k}_ms": pt["ms"].get(k, 0.0) for k, _ in CATEGORIES})
    print(" ".join(f"{k}={v:.4g}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
