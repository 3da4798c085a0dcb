"""QLoRA's memory and quality: resident bytes of a quantized base, and the logits error it costs.

    python benchmarks/qlora.py

1. Resident bytes of the base weights of a Llama-3.2-1B-shaped model (hidden 2048, 16 layers, 32
   heads, 8 KV heads, intermediate 8192, vocab 128256, tied embeddings) in float32, bfloat16, int8,
   NF4 and NF4 + double quantization. The 1B model is never allocated: its linears' shapes come
   from ``nnx.eval_shape`` and each format's bytes from its layout (``peftjax.quantization._bnb``:
   packed codes, absmax, nested absmax and maps). The same formula is checked, format by format,
   against ``quantized_bytes`` of a small model really quantized here, so the 1B figures are the
   bytes the arrays would hold. Embeddings, norms and the head stay in the compute dtype
   (bfloat16), as transformers leaves them; the table shows the linears and the whole model.
2. Quality: a small Llama with random weights (``--small-*``), its float32 logits against the
   same model with bfloat16 weights, int8, NF4 and NF4 + double quantization (compute in float32).
3. LoRA on each base, through the public path (``get_peft_model``, ``split``, ``optax.adamw``,
   ``make_train_step``): the step time (median of ``--steps``) and the loss after ``--steps``
   steps on the same batch from the same adapter initialisation, float32 base against quantized.

The last line is ``key=value`` pairs (ratios to bfloat16's linear bytes, relative logits errors).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from peftjax import models  # noqa: E402
from peftjax.models import ModelConfig  # noqa: E402
from peftjax.quantization import QuantizationConfig, quantize_model, quantized_bytes  # noqa: E402
from peftjax.quantization._bnb import NESTED_BLOCKSIZE  # noqa: E402

FORMATS = {
    "int8": QuantizationConfig(load_in_8bit=True),
    "nf4": QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float32"),
    "nf4+dq": QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype="float32"),
}


def layout_bytes(fmt: str, out_features: int, in_features: int, blocksize: int = 64) -> int:
    """Bytes a ``[out, in]`` weight holds in ``fmt``, bitsandbytes' layout."""
    n = out_features * in_features
    if fmt == "float32":
        return 4 * n
    if fmt == "bfloat16":
        return 2 * n
    if fmt == "int8":
        return n + 4 * out_features  # CB + float32 SCB per row
    blocks = -(-n // blocksize)
    packed = (n + 1) // 2
    if fmt == "nf4":
        return packed + 4 * blocks
    nested = -(-blocks // NESTED_BLOCKSIZE)
    return packed + blocks + 4 * nested + 4 * 256 + 4  # uint8 absmax, nested absmax, dynamic map, offset
    # (bitsandbytes' 16-value quant_map is a constant here, not per-layer storage)


def linear_shapes(model) -> list[tuple[int, int]]:
    """``[out, in]`` of every linear that quantization replaces (``lm_head`` is skipped, as transformers)."""
    return [tuple(reversed(m.kernel.get_value().shape)) for p, m in nnx.iter_graph(model)
            if type(m) is nnx.Linear and p[-1] != "lm_head"]


def other_params(model) -> int:
    """Elements of every weight that stays in floating point (embeddings, norms, an untied head)."""
    linear = {id(m.kernel) for p, m in nnx.iter_graph(model) if type(m) is nnx.Linear and p[-1] != "lm_head"}
    return sum(int(np.prod(v.get_value().shape)) for _, v in nnx.iter_graph(model)
               if isinstance(v, nnx.Param) and id(v) not in linear)


def llama_config(hidden, layers, heads, kv_heads, intermediate, vocab, tie) -> ModelConfig:
    return ModelConfig("llama", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                       tie_word_embeddings=tie)


def check_formula(config) -> None:
    """The layout formula equals the bytes of a model really quantized here, for every format."""
    for fmt, qc in FORMATS.items():
        model = quantize_model(models.LlamaForCausalLM.from_config(config), qc)
        measured = quantized_bytes(model)
        shapes = linear_shapes(models.LlamaForCausalLM.from_config(config))
        formula = sum(layout_bytes(fmt, o, i) for o, i in shapes)
        if measured != formula:
            raise SystemExit(f"layout formula for {fmt}: {formula} bytes, measured {measured}")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--small-hidden", type=int, default=256)
    p.add_argument("--small-layers", type=int, default=2)
    p.add_argument("--small-intermediate", type=int, default=704)
    p.add_argument("--small-vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=30, help="LoRA steps on each base")
    args = p.parse_args(argv)

    big = llama_config(args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab, True)
    abstract = nnx.eval_shape(lambda: models.LlamaForCausalLM(big, rngs=nnx.Rngs(0)))
    shapes, rest = linear_shapes(abstract), other_params(abstract)
    small = llama_config(args.small_hidden, args.small_layers, 8, 4, args.small_intermediate, args.small_vocab, False)
    check_formula(small)

    print(f"base weights of a Llama (hidden {args.hidden}, {args.layers} layers, intermediate {args.intermediate}, "
          f"vocab {args.vocab}): {sum(o * i for o, i in shapes) / 1e9:.3f}B values in {len(shapes)} linears, "
          f"{rest / 1e9:.3f}B elsewhere (embeddings, norms); layout formula checked against a quantized model")
    print(f"{'format':10} {'linears (GiB)':>14} {'x bf16':>8} {'whole model (GiB)':>18}")
    fields = {}
    bf16 = sum(layout_bytes("bfloat16", o, i) for o, i in shapes)
    for fmt in ("float32", "bfloat16", "int8", "nf4", "nf4+dq"):
        linear = sum(layout_bytes(fmt, o, i) for o, i in shapes)
        whole = linear + rest * (4 if fmt == "float32" else 2)
        print(f"{fmt:10} {linear / 2**30:14.3f} {linear / bf16:8.3f} {whole / 2**30:18.3f}")
        fields[f"{fmt.replace('+', '_')}_x_bf16"] = f"{linear / bf16:.4f}"

    model = models.LlamaForCausalLM.from_config(small, seed=0)
    ids = jax.random.randint(jax.random.key(1), (2, args.seq), 0, args.small_vocab)
    forward = nnx.jit(lambda m, ids: m(input_ids=ids).logits)
    reference = np.asarray(forward(model, ids))
    scale = np.abs(reference).max()
    print(f"logits error against float32 (small Llama: hidden {args.small_hidden}, {args.small_layers} layers, "
          f"random init; max |logit| {scale:.3g}); compute in float32")
    print(f"{'format':10} {'max abs':>10} {'mean abs':>10} {'max / max|logit|':>17}")
    variants = {"bfloat16": None, **FORMATS}
    for fmt, qc in variants.items():
        m = models.LlamaForCausalLM.from_config(small, seed=0)
        if qc is None:  # bfloat16 weights, float32 compute
            for _, v in nnx.iter_graph(m):
                if isinstance(v, nnx.Param):
                    v.set_value(v.get_value().astype(jnp.bfloat16).astype(jnp.float32))
        else:
            m = quantize_model(m, qc)
        err = np.abs(np.asarray(forward(m, ids)) - reference)
        print(f"{fmt:10} {err.max():10.3g} {err.mean():10.3g} {err.max() / scale:17.4f}")
        fields[f"{fmt.replace('+', '_')}_logit_err"] = f"{err.max() / scale:.4g}"
    print(f"LoRA r=8 on every linear of the small Llama, AdamW 1e-3, batch 4 x {args.seq} tokens, "
          f"{args.steps} steps on one batch, the same adapter initialisation on every base")
    print(f"{'format':10} {'step (ms)':>10} {'first loss':>11} {'last loss':>10}")
    batch_ids = jax.random.randint(jax.random.key(2), (4, args.seq), 0, args.small_vocab)
    for fmt, qc in {"float32": None, **FORMATS}.items():
        step_ms, first, last = lora_run(small, qc, batch_ids, args.steps)
        print(f"{fmt:10} {step_ms:10.1f} {first:11.4f} {last:10.4f}")
        fields[f"{fmt.replace('+', '_')}_step_ms"] = f"{step_ms:.1f}"
        fields[f"{fmt.replace('+', '_')}_loss"] = f"{last:.4f}"
    line = " ".join(f"{k}={v}" for k, v in fields.items())
    print(line)
    return line


def lora_run(config, quantization, ids, steps: int) -> tuple[float, float, float]:
    """``(median step ms, first loss, last loss)`` of LoRA on the base stored as ``quantization``."""
    import statistics
    import time

    import optax

    import peftjax

    model = models.LlamaForCausalLM.from_config(config, seed=0)
    if quantization is not None:
        model = quantize_model(model, quantization)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
                                        key=jax.random.key(3))
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(trainable)
    step = peftjax.make_train_step(graphdef, tx)
    batch = {"input_ids": ids, "labels": ids}
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        losses.append(float(loss))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times[1:] or times), losses[0], losses[-1]


if __name__ == "__main__":
    main()
