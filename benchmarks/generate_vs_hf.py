"""peftjax's ``generate`` against transformers' on the same Llama, from long prompts.

    python benchmarks/generate_vs_hf.py [--seq 1024 --new 16 --batch 4 --trials 3 --hidden 512 ...]

The model is speed_vs_peft.py's random Llama (built once in PyTorch, saved, loaded by both), or
``--model PATH``'s checkpoint (as speed_vs_peft.py takes it). Each
framework runs in its own child process, so peak resident memory (``ru_maxrss``) is its run's
alone. Both: float32, greedy decoding of ``--new`` tokens from ``--batch`` prompts of ``--seq``
tokens (the first rows left-padded by a few tokens), no EOS. peftjax: ``model.generate``, one
compiled program (prefill and decoding loop); its first call compiles. transformers:
``generate`` with its default cache, eager PyTorch, torch threads = cores.

``--eos-after K`` gives both an EOS set instead: the tokens each row writes at step ``K`` of a
first greedy run, so every row ends by step ``K`` of ``--new`` (a decoding loop that runs on past
its rows' ends pays for every step anyway; transformers stops once all rows have ended).

``--streamer`` gives both ``generate`` calls a streamer (``put`` / ``end``, transformers' protocol)
that notes when the first new tokens arrive: the time to first token (median of the trials) is
reported too, and the call's time includes handing each step's tokens to the host.

Reported per framework: the first call (compilation included for peftjax), the median of
``--trials`` further calls, prompt tokens per second of those, peak resident memory, the steps
generated, and the float32 matmul peak the child measured (``--matmul-size`` cubed). The
children's tokens must agree; the last line is a one-line summary.
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

import speed_vs_peft as svp


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 512), ("layers", 4), ("heads", 8), ("intermediate", 1376), ("vocab", 32000),
                          ("batch", 4), ("seq", 1024), ("new", 16), ("trials", 3), ("matmul_size", 2048),
                          ("eos_after", 0)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    svp.add_model_flag(p)
    p.add_argument("--streamer", action="store_true", help="stream the tokens; report the time to first token")
    p.add_argument("--child", choices=["peftjax", "transformers"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eos", default="", help=argparse.SUPPRESS)  # the EOS ids, comma-separated
    args = p.parse_args(argv)
    if args.model is not None:  # its sizes replace the flags'
        svp.model_directory(args, None)
    return args


def prompts(args):
    import numpy as np

    rng = np.random.RandomState(0)
    ids = rng.randint(1, args.vocab, (args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(args.batch - 1):  # every row but the last left-padded by a few tokens
        mask[row, : 3 * (row + 1)] = 0
    ids[mask == 0] = 0
    return ids, mask


def run_peftjax(args) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from peftjax import models

    model = models.from_pretrained(args.model_dir)
    ids, mask = prompts(args)

    eos = [int(t) for t in args.eos.split(",") if t]

    def call(streamer):
        return model.generate(ids, mask, max_new_tokens=args.new, pad_token_id=0, eos_token_id=eos, streamer=streamer)

    a = jnp.ones((args.matmul_size, args.matmul_size), jnp.float32)
    peak = svp.matmul_peak(lambda: (a @ a).block_until_ready(), args.matmul_size)
    return timed(args, call, np.asarray, peak)


def run_transformers(args) -> dict:
    import torch
    import transformers as tr

    torch.set_num_threads(os.cpu_count() or 1)
    model = tr.LlamaForCausalLM.from_pretrained(args.model_dir).eval()
    ids, mask = prompts(args)

    eos = [int(t) for t in args.eos.split(",") if t]
    until = {"eos_token_id": eos} if eos else {"min_new_tokens": args.new}

    def call(streamer):
        with torch.no_grad():
            return model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                  max_new_tokens=args.new, pad_token_id=0, streamer=streamer, **until)

    a = torch.ones(args.matmul_size, args.matmul_size)
    peak = svp.matmul_peak(lambda: a @ a, args.matmul_size)
    return timed(args, call, lambda t: t.numpy(), peak)


class FirstToken:
    """A streamer that notes when the first new tokens arrive (its second ``put``; the first is the prompt)."""

    def __init__(self):
        self.start, self.puts, self.first_s = time.perf_counter(), 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:
            self.first_s = time.perf_counter() - self.start

    def end(self):
        pass


def timed(args, call, to_numpy, peak: float) -> dict:
    t = time.perf_counter()
    tokens = to_numpy(call(FirstToken() if args.streamer else None))
    first = time.perf_counter() - t
    times, first_tokens = [], []
    for _ in range(args.trials):
        streamer = FirstToken() if args.streamer else None
        t = time.perf_counter()
        to_numpy(call(streamer))
        times.append(time.perf_counter() - t)
        if streamer is not None:
            first_tokens.append(streamer.first_s)
    return {"first_s": first, "call_s": statistics.median(times) if times else first, "peak_rss": svp.peak_rss_bytes(),
            "gflops": peak / 1e9, "tokens": tokens[:, args.seq:].tolist(), "steps": tokens.shape[1] - args.seq,
            "first_token_s": statistics.median(first_tokens) if first_tokens else 0.0}


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(run_peftjax(args) if args.child == "peftjax" else run_transformers(args)))
        return
    load = os.getloadavg()[0]
    print(f"# generate: batch {args.batch} x prompt {args.seq} + {args.new} new tokens, Llama hidden {args.hidden} "
          f"x {args.layers} layers, vocab {args.vocab}; load average {load:.2f}")
    results = {}

    def run_child(child: str, directory: str, *extra: str) -> dict:
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child", child, "--model-dir",
                args.model or directory, *extra]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{child} child failed:\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    with tempfile.TemporaryDirectory() as directory:
        if args.model is None:
            svp.build_model(argparse.Namespace(**{**vars(args), "seq": args.seq + args.new}), directory)
        eos = []
        if args.eos_after:  # the token each row writes at that step ends it
            first = run_child("peftjax", directory, "--new", str(args.eos_after), "--trials", "0")
            eos = sorted({row[-1] for row in first["tokens"]})
            print(f"# EOS ids {eos}: every row ends by step {args.eos_after} of {args.new}")
        for child in ("peftjax", "transformers"):
            results[child] = run_child(child, directory, "--eos", ",".join(map(str, eos)))
    ours, theirs = results["peftjax"], results["transformers"]
    same = ours.pop("tokens") == theirs.pop("tokens")
    print(f"{'':28}{'peftjax':>14}{'transformers':>14}")
    for key, label, scale in (("first_s", "first call (s)", 1), ("call_s", "call, median (s)", 1),
                              *([("first_token_s", "first token, median (s)", 1)] if args.streamer else []),
                              ("peak_rss", "peak resident (GiB)", 2**-30), ("gflops", "f32 matmul peak (GFLOP/s)", 1)):
        print(f"{label:28}{ours[key] * scale:>14.3f}{theirs[key] * scale:>14.3f}")
    prompt_tokens = args.batch * args.seq
    print(f"{'prompt tokens/s (median)':28}{prompt_tokens / ours['call_s']:>14.0f}"
          f"{prompt_tokens / theirs['call_s']:>14.0f}")
    print(f"{'steps generated':28}{ours['steps']:>14}{theirs['steps']:>14}")
    print(f"same tokens: {same}")
    streamed = (f"ratio_first_token={ours['first_token_s'] / theirs['first_token_s']:.3f} " if args.streamer
                else "")
    print(f"ratio_call={ours['call_s'] / theirs['call_s']:.3f} ratio_first={ours['first_s'] / theirs['first_s']:.3f} "
          f"{streamed}"
          f"ratio_mem={ours['peak_rss'] / theirs['peak_rss']:.3f} same_tokens={int(same)} "
          f"jax_f32_gflops={ours['gflops']:.0f} torch_f32_gflops={theirs['gflops']:.0f}")


if __name__ == "__main__":
    main()
