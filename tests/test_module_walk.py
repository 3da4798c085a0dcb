"""The adapter functions find a model's modules with ``peftjax.nn._graph.iter_modules``, a walk
that skips the weights: it must give flax's own ``nnx.iter_modules`` pairs, in its order (a
module shared by two attributes once, at its first path), on bundled and user-written models."""

from __future__ import annotations

import jax
import pytest
from flax import nnx

import peftjax
from peftjax import models
from peftjax.nn._graph import iter_modules


class Shared(nnx.Module):
    """A user's module whose block sits at two attributes and inside a list and a dict."""

    def __init__(self, rngs: nnx.Rngs):
        self.block = nnx.Linear(4, 4, rngs=rngs)
        self.again = self.block
        self.stack = nnx.List([nnx.Linear(4, 4, rngs=rngs), nnx.LayerNorm(4, rngs=rngs)])
        self.named = nnx.Dict(a=nnx.Linear(4, 2, rngs=rngs), b=self.stack[0])
        self.scale = nnx.Param(jax.numpy.ones(4))
        self.static = (1, "two")


def _llama(scan: bool, tmp_path):
    config = models.ModelConfig("llama", vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1)
    if not scan:
        return models.LlamaForCausalLM.from_config(config)
    models.LlamaForCausalLM.from_config(config).save_pretrained(tmp_path)
    return models.from_pretrained(tmp_path, scan_layers=True)


@pytest.mark.parametrize("case", ["shared", "llama", "llama-lora", "scanned-lora", "llama-prefix"])
def test_the_walk_gives_nnx_iter_modules(case, tmp_path):
    if case == "shared":
        model = Shared(nnx.Rngs(0))
    else:
        model = _llama(case.startswith("scanned"), tmp_path)
        if case.endswith("lora"):
            model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules="all-linear")).base_model
        elif case.endswith("prefix"):
            model = peftjax.get_peft_model(model, peftjax.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                               num_virtual_tokens=2)).base_model
    ours, flax_s = list(iter_modules(model)), list(nnx.iter_modules(model))
    assert [path for path, _ in ours] == [tuple(path) for path, _ in flax_s]
    assert all(a is b for (_, a), (_, b) in zip(ours, flax_s))
    assert len({id(m) for _, m in ours}) == len(ours)  # a shared module once
    if case == "shared":  # at the first path by attribute name: "again" before "block", "named" before "stack"
        assert [p for p, _ in ours] == [("again",), ("named", "a"), ("named", "b"), ("named",), ("stack", 1),
                                        ("stack",), ()]
