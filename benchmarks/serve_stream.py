"""``peftjax serve`` over HTTP: when a streamed completion's text arrives, against the whole answer.

    python benchmarks/serve_stream.py [--new 256 --trials 5 --hidden 256 --layers 4 ...]

A random Llama (peftjax's init, the packaged MiniLM's vocabulary and tokenizer, no network) with one
LoRA adapter is served by uvicorn on a free local port, as ``peftjax serve`` serves it. Each trial
asks ``/v1/completions`` for ``--new`` greedy tokens of a short prompt (no end of sequence: every
token is generated) twice: streamed (``"stream": true``), noting when the first and the last text
event arrive, and unstreamed, noting when the answer arrives. The first trial compiles and is
reported apart; the figures are the medians of the others. Reported: the time to the first event
and to the last, the unstreamed answer's time, the streamed completion's tokens per second, and the
float32 matmul peak of this host (``--matmul-size`` cubed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in (("hidden", 256), ("layers", 4), ("heads", 4), ("intermediate", 512), ("new", 256),
                          ("trials", 5), ("matmul_size", 2048)):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    return p.parse_args(argv)


def build(args, root: Path):
    """The served model: a random Llama over MiniLM's vocabulary and a random LoRA adapter ``a``."""
    from transformers import AutoTokenizer

    import peftjax
    from peftjax import models
    from peftjax.data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = models.ModelConfig("llama", vocab_size=len(tokenizer), hidden_size=args.hidden,
                                intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                num_attention_heads=args.heads, max_position_embeddings=args.new + 64,
                                pad_token_id=tokenizer.pad_token_id, eos_token_id=None, tie_word_embeddings=False)
    models.LlamaForCausalLM.from_config(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    peftjax.get_peft_model(models.from_pretrained(root / "base"),
                           peftjax.LoraConfig(r=8, init_lora_weights=False)).save_pretrained(root / "a")
    return tokenizer


def main() -> None:
    import httpx
    import jax.numpy as jnp

    import speed_vs_peft as svp
    from peftjax import serving

    args = parse_args()
    with tempfile.TemporaryDirectory() as directory:
        root = Path(directory)
        tokenizer = build(args, root)
        model = serving.load_for_serving(root / "base", {"a": root / "a"})
        generator = serving.BatchingGenerator(model, tokenizer, max_new_tokens=args.new, batch_wait_s=0.0)
        port: list[str] = []
        threading.Thread(target=serving.serve, args=(generator,), kwargs=dict(port=0, announce=port.append),
                         daemon=True).start()
        while not port:
            time.sleep(0.05)
        url = port[0].rsplit(" on ", 1)[1] + "/v1/completions"
        body = {"model": "a", "prompt": "the film was", "max_tokens": args.new, "temperature": 0}
        with httpx.Client(timeout=600) as client:
            while True:  # the server's socket is up before uvicorn answers
                try:
                    client.get(url.rsplit("/v1/", 1)[0] + "/health")
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            trials = []
            for _ in range(args.trials):
                start, events = time.perf_counter(), []
                with client.stream("POST", url, json={**body, "stream": True}) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {"):
                            chunk = json.loads(line[len("data: "):])
                            if chunk["choices"] and chunk["choices"][0]["text"]:
                                events.append(time.perf_counter() - start)
                start = time.perf_counter()
                answer = client.post(url, json=body).json()
                whole = time.perf_counter() - start
                trials.append((events[0], events[-1], whole, len(events), answer["usage"]["completion_tokens"]))
    a = jnp.ones((args.matmul_size, args.matmul_size), jnp.float32)
    peak = svp.matmul_peak(lambda: (a @ a).block_until_ready(), args.matmul_size) / 1e9
    first, rest = trials[0], trials[1:] or trials
    median = {name: statistics.median(t[i] for t in rest) for i, name in enumerate(("first", "last", "whole"))}
    tokens = rest[0][4]
    print(f"# serve: Llama hidden {args.hidden} x {args.layers} layers, one LoRA adapter, {tokens} greedy tokens a "
          f"completion, {len(rest)} trials after a compiling one")
    print(f"{'first trial (compiles): first event, last event, whole answer (s)':66}"
          f"{first[0]:8.3f}{first[1]:8.3f}{first[2]:8.3f}")
    print(f"{'streamed: first text event, median (s)':66}{median['first']:8.3f}")
    print(f"{'streamed: last text event, median (s)':66}{median['last']:8.3f}")
    print(f"{'unstreamed: the whole answer, median (s)':66}{median['whole']:8.3f}")
    print(f"{'text events a streamed completion':66}{rest[0][3]:8d}")
    print(f"first_event_s={median['first']:.4f} last_event_s={median['last']:.4f} whole_s={median['whole']:.4f} "
          f"ratio_first={median['first'] / median['whole']:.3f} stream_tokens_per_s={tokens / median['last']:.1f} "
          f"jax_f32_gflops={peak:.0f}")


if __name__ == "__main__":
    sys.exit(main())
