"""FLOPs of a LoRA train step against the frozen model's forward+backward (XLA cost analysis).

    python benchmarks/lora_flops.py [--hidden 2048 --intermediate 5632 --seq 1024 --rank 8]

Three programs are compiled for one Llama decoder block (nothing is executed, so the sizes can be
realistic on any machine):
  frozen:  loss and its gradient w.r.t. the block's input activations (what any backward through
           a frozen layer costs);
  lora:    the same, plus gradients w.r.t. LoRA r=8 on all seven linear projections, computed the
           peftjax way, x@W + s*(x@A)@B;
  merged:  the same adapters, computed by building W + s*A@B in the step (the approach peftjax
           rejects), for comparison.
The last line is a one-line summary; the target is ratio_lora <= 1.03.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx
from transformers import LlamaConfig

import peftjax
from peftjax.models import LlamaModel
from peftjax import tuners

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    config = LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=1,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
    )
    model = nnx.eval_shape(lambda: LlamaModel(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((args.batch, args.seq, args.hidden), jnp.float32)

    graphdef, state = nnx.split(model)

    def frozen_loss(state, x):
        return jnp.mean(nnx.merge(graphdef, state)(inputs_embeds=x).last_hidden_state ** 2)

    frozen = flops(jax.grad(frozen_loss, argnums=1), state, x)

    def lora_model():
        m = LlamaModel(config, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        tuners.inject_lora(m, peftjax.LoraConfig(r=args.rank, lora_alpha=16, target_modules=PROJECTIONS))
        return m

    lora = nnx.eval_shape(lora_model)
    lgraph, adapters, rest = peftjax.split(lora)

    def lora_loss(adapters, rest, x):
        m = peftjax.combine(lgraph, adapters, rest)
        return jnp.mean(m(inputs_embeds=x).last_hidden_state ** 2)

    scaling = 16 / args.rank

    def merged_loss(adapters, state, x):
        # W + s*A@B built inside the step, then the plain model: gradients reach A and B through W'
        pure, ad = state.to_pure_dict(), adapters.to_pure_dict()
        for layer, blocks in ad["layers"].items():
            for block, projections in blocks.items():
                for name, lora in projections.items():
                    w = pure["layers"][layer][block][name]["kernel"]
                    delta = lora["lora_A"]["default"] @ lora["lora_B"]["default"]
                    pure["layers"][layer][block][name]["kernel"] = w + scaling * delta
        merged_state = jax.tree.map(lambda v: v, state)  # a copy to fill, leaving `state` alone
        merged_state.replace_by_pure_dict(pure)
        return jnp.mean(nnx.merge(graphdef, merged_state)(inputs_embeds=x).last_hidden_state ** 2)

    xab = flops(jax.grad(lora_loss, argnums=(0, 2)), adapters, rest, x)
    merged = flops(jax.grad(merged_loss, argnums=(0, 2)), adapters, state, x)

    tokens = args.batch * args.seq
    print(f"Llama block: hidden {args.hidden}, intermediate {args.intermediate}, {tokens} tokens, LoRA r={args.rank} "
          f"on {', '.join(PROJECTIONS)}")
    print(f"  frozen forward+backward   {frozen / 1e9:10.2f} GFLOP")
    print(f"  LoRA x@W + s(x@A)@B       {xab / 1e9:10.2f} GFLOP   ratio {xab / frozen:.4f}")
    print(f"  LoRA merged W + s A@B     {merged / 1e9:10.2f} GFLOP   ratio {merged / frozen:.4f}")
    print(f"ratio_lora={xab / frozen:.4f} ratio_merged={merged / frozen:.4f} target_lora<=1.03 "
          f"{'PASS' if xab / frozen <= 1.03 else 'FAIL'}")


if __name__ == "__main__":
    main()
