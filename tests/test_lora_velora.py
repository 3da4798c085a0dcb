"""VeLoRA (``LoraConfig(velora_config=VeloraConfig(...))``) against HF PEFT 0.22.0.

VeLoRA keeps, of each targeted layer's input, only its sub-tokens' coordinates on one unit vector
for the backward pass, and ``lora_A``'s gradient takes the input rebuilt from them. The oracles:
PEFT's files both ways (``check_interop``), PEFT's training runs from the same file (its
``VeloraFunction`` backward: the per-step batch projection, and a stored random one), which plain
LoRA's gradients miss, and what the backward pass keeps (no ``[tokens, in]`` input).
"""

from __future__ import annotations

import contextlib
import io

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from _method_cases import quiet
from _method_cases import ARCHS, IDS, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch
from _method_cases import assert_linen_refuses, assert_refused_before_any_change, peft_steps, torch, torch_base
import _tiny
import peftjax
from peftjax import models

TARGETS = ["q_proj", "v_proj", "down_proj"]  # in: 32, 32, 48 (48 / 5 groups: padded sub-tokens)
CASES = {
    "llama": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, velora_config=dict(num_groups=5)),
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                 velora_config=dict(num_groups=4, init_type="random", scale=2.0)),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {arch: tiny_checkpoint(ARCHS[arch]) for arch in CASES}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_a_peft_velora_adapter_moves_both_ways(arch, checkpoints, tmp_path, capsys):
    """A PEFT-made VeLoRA adapter (with its stored projection) gives PEFT's logits here, trains here,
    goes back to PEFT with the same logits (merged there too), merges, unmerges and exports."""
    check_interop(("LoraConfig", arch, CASES[arch], False), checkpoints, tmp_path, capsys)


@pytest.mark.parametrize("velora", [dict(num_groups=5), dict(num_groups=4, init_type="random", scale=2.0)],
                         ids=["batch_average", "random"])
def test_training_follows_peft_s_compressed_gradients(velora, checkpoints, tmp_path):
    """Three SGD steps from the same PEFT-made file, PEFT's loop (train mode: its ``VeloraFunction``)
    against ``make_train_step``: the same logits after; plain LoRA's exact gradients end elsewhere."""
    path = checkpoints["llama"]
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, velora_config=velora, init_lora_weights=False)
    theirs = quiet(peft.get_peft_model, torch_base("llama", path), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path)
    batch = _tiny.batch(IDS, MASK)
    # plain SGD: a gradient's size shows (Adam's steps would not see VeLoRA's scale)
    optimizer = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
    reference = run_torch(peft_steps(theirs, batch, optimizer))

    def trained(compressed: bool):
        model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path, is_trainable=True)
        if not compressed:  # the same adapter as plain LoRA: exact gradients
            model = peftjax.PeftModel.from_pretrained(
                models.from_pretrained(path), tmp_path, is_trainable=True,
                config=peftjax.LoraConfig(**{**fields, "velora_config": None}))
        _tiny.train(model, batch, steps=3, optimizer=optax.sgd(0.5), dropout=False)
        return run_jax(model, jit=True)

    assert_close(trained(True), reference, atol=2e-5)
    assert changed(trained(False), reference) > 1e-4


def test_the_backward_pass_keeps_the_compressed_input_only():
    """What a jitted gradient of a VeLoRA layer keeps for its backward pass: ``[tokens, groups]``
    coordinates, not the ``[tokens, in]`` input plain LoRA keeps (the frozen weight needs no input)."""

    class Net(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(32, 16, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.proj(x)

    x = np.random.default_rng(0).standard_normal((40, 32)).astype(np.float32)

    def kept(velora) -> str:
        net = Net()
        peftjax.inject_adapter_in_model(peftjax.LoraConfig(r=4, target_modules=["proj"], velora_config=velora,
                                                           init_lora_weights=False), net)
        graphdef, trainable, rest = peftjax.split(net)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            print_saved_residuals(
                lambda t: jnp.sum(peftjax.combine(graphdef, t, rest)(x) ** 2), trainable)
        return out.getvalue()

    assert "f32[40,32]" in kept(None)
    compressed = kept({"num_groups": 4})
    assert "f32[40,32]" not in compressed and "f32[40,4]" in compressed


REFUSED = {  # (fields, error, message, PEFT refuses it too)
    "embedding": (dict(target_modules=["q_proj", "embed_tokens"]), ValueError,
                  r"embed_tokens: Invalid or unsupported variant combination: \('velora_config',\)", True),
    "dora": (dict(target_modules=["q_proj"], use_dora=True), ValueError,
             r"Invalid or unsupported variant combination: \('use_dora', 'velora_config'\)", True),
    "groups": (dict(target_modules=["q_proj"], velora_config=dict(num_groups=0)), ValueError,
               r"`num_groups` should be positive", True),
    "once": (dict(target_modules=["q_proj"], velora_config=dict(init_type="batch_average_once")),
             NotImplementedError, r"init_type='batch_average_once' .* is not implemented", False),
    "parameters": (dict(target_modules=[], target_parameters=["mlp.down_proj.weight"]), ValueError,
                   r"ParamWrapper does not work when `velora_config` is set", True),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_velora_cannot_adapt_is_refused_by_name_before_any_change(case, checkpoints):
    fields, error, message, peft_refuses = REFUSED[case]
    assert_refused_before_any_change(checkpoints["llama"], {"r": 4, "velora_config": {}, **fields}, error, message,
                                     peft_refuses)


def test_quantized_layers_and_linen_refuse_velora(checkpoints):
    path = checkpoints["llama"]
    config = peftjax.LoraConfig(r=4, target_modules=["q_proj"], velora_config={})
    quantized = models.from_pretrained(path, quantization_config=peftjax.QuantizationConfig(load_in_8bit=True))
    with pytest.raises(NotImplementedError, match=r"q_proj: VeLoRA \(velora_config\) on a quantized layer"):
        peftjax.get_peft_model(quantized, config)
    assert_linen_refuses(dict(r=4, velora_config={}), r"proj: VeLoRA \(LoraConfig.velora_config\) is supported on NNX")
