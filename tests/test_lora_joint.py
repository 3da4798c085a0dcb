"""LoRA's joint matmul: ``[x, s x A] @ [W; B]`` where a plain ``nnx.Linear`` carries plain adapters.

Oracles: the plain sum ``x @ W + u @ B`` and its autodiff; the same layer traced inside
``peftjax.sharding.partitioned()``, where it adds the branch to the base output as before. What
the joint form is for, one buffer where the sum kept two, is checked on XLA's own accounting of
a compiled step's temporaries.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
import peftjax
from peftjax.sharding import make_mesh, partitioned
from peftjax.tuners.lora._math import joint_matmul


def _rand(shape, seed):
    return jnp.asarray(np.random.RandomState(seed).standard_normal(shape), jnp.float32)


def _plain(x, w, u, b):
    return x @ w + u @ b


@pytest.mark.parametrize("use_jit", [True, False])
@pytest.mark.parametrize("wrt", [(0, 1, 2, 3), (0, 2, 3), (2, 3), (1,)])
def test_joint_matmul_equals_the_sum_of_products_in_value_and_gradient(use_jit, wrt):
    args = _rand((6, 5), 0), _rand((5, 7), 1), _rand((6, 3), 2), _rand((3, 7), 3)
    weights = _rand((6, 7), 4)

    def loss(f):
        g = lambda *a: jnp.sum(f(*a) * weights)  # noqa: E731
        g = jax.grad(g, argnums=wrt)
        return jax.jit(g) if use_jit else g

    np.testing.assert_allclose(joint_matmul(*args), _plain(*args), rtol=1e-5, atol=1e-6)
    for ours, ref in zip(loss(joint_matmul)(*args), loss(_plain)(*args), strict=True):
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


class _Mlp(nnx.Module):
    """A user's own NNX block: biased projections, SwiGLU, as a Llama MLP."""

    def __init__(self, rngs):
        self.gate = nnx.Linear(16, 40, rngs=rngs)
        self.up = nnx.Linear(16, 40, rngs=rngs)
        self.down = nnx.Linear(40, 16, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


def _lora_mlp():
    model = _Mlp(nnx.Rngs(0))
    config = peftjax.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.25, target_modules=["gate", "up", "down"],
                                init_lora_weights=False)  # B nonzero: the branch changes the output
    peft_model = peftjax.get_peft_model(model, config)
    peft_model.add_adapter("second", peftjax.LoraConfig(r=2, lora_alpha=2, target_modules=["gate", "down"],
                                                        init_lora_weights=False))
    peft_model.set_adapter(["default", "second"])  # two adapters live on gate and down
    return peft_model


def _path(joint: bool):
    """The joint matmul's path, or the added branch (traced inside ``partitioned()``)."""
    return contextlib.nullcontext() if joint else partitioned()


def _loss_and_grads(peft_model, x, key, *, joint: bool, use_jit: bool):
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)

    def loss(trainable):
        model = peftjax.combine(graphdef, trainable, rest)
        with peftjax.dropout_key(key):
            return jnp.sum(model(x) ** 2)

    def run(trainable):
        with _path(joint):
            return jax.value_and_grad(loss)(trainable)

    return (jax.jit(run) if use_jit else run)(trainable)


def _traced_ops(peft_model, x, *, joint: bool) -> set:
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    f = lambda t: peftjax.combine(graphdef, t, rest)(x)  # noqa: E731
    with _path(joint):
        return {e.primitive.name for e in jax.make_jaxpr(f)(trainable).eqns}


@pytest.mark.parametrize("use_jit", [True, False])
def test_lora_layers_joint_path_equals_the_added_branch(use_jit):
    peft_model = _lora_mlp()
    x, key = _rand((3, 5, 16), 5), jax.random.key(7)
    # the two paths are really different programs: the joint one concatenates, the other does not
    assert "custom_vjp_call" in _traced_ops(peft_model, x, joint=True)
    assert "custom_vjp_call" not in _traced_ops(peft_model, x, joint=False)
    loss, grads = _loss_and_grads(peft_model, x, key, joint=True, use_jit=use_jit)
    ref_loss, ref_grads = _loss_and_grads(peft_model, x, key, joint=False, use_jit=use_jit)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    assert len(flat) == len(ref_flat) == 10  # A and B of 3 + 2 adapted layers
    for g, ref in zip(flat, ref_flat, strict=True):  # float32 rounding of sums of ~100s
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    # and the adapters count: without them the output is the base model's
    with peft_model.disable_adapter():
        base = peft_model.base_model(x)
    assert np.abs(np.asarray(peft_model.base_model(x)) - np.asarray(base)).max() > 1e-2


def test_joint_path_is_skipped_where_it_would_change_the_result():
    """DoRA, ``lora_bias``, a bfloat16 input to float32 adapters and a mixed batch keep the added branch."""
    x = _rand((2, 16), 6)
    for config in (peftjax.LoraConfig(r=4, target_modules=["gate"], use_dora=True),
                   peftjax.LoraConfig(r=4, target_modules=["gate"], lora_bias=True)):
        assert "custom_vjp_call" not in _traced_ops(peftjax.get_peft_model(_Mlp(nnx.Rngs(0)), config), x, joint=True)
    plain = peftjax.get_peft_model(_Mlp(nnx.Rngs(0)), peftjax.LoraConfig(r=4, target_modules=["gate"]))
    assert "custom_vjp_call" in _traced_ops(plain, x, joint=True)
    assert "custom_vjp_call" not in _traced_ops(plain, x.astype(jnp.bfloat16), joint=True)
    peftjax.set_adapter_rows(plain.base_model, ["default", "__base__"], ["default"])
    try:
        assert "custom_vjp_call" not in _traced_ops(plain, x, joint=True)
    finally:
        peftjax.clear_adapter_rows(plain.base_model)


def test_joint_path_leaves_fewer_temporaries_in_a_llama_step():
    """What the joint matmul is for: the step keeps each adapted output once (XLA's buffer sizes)."""
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama", hidden_size=64, intermediate_size=256))
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules="all-linear"))
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 64)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}

    def temp_bytes(joint: bool) -> int:
        def loss(t):
            return peftjax.combine(graphdef, t, rest)(**batch).loss

        def grads(t):
            with _path(joint):
                return jax.grad(loss)(t)

        return jax.jit(grads).lower(trainable).compile().memory_analysis().temp_size_in_bytes

    joint, added = temp_bytes(True), temp_bytes(False)
    # per layer, gate and up outputs [2 * 64, 256] float32 kept once instead of twice: 256 KiB
    assert added - joint >= 2 * 128 * 1024 * _tiny.config("llama").num_hidden_layers, (joint, added)


def test_sharded_steps_trace_partitioned():
    """``make_train_step(mesh=)`` and the Trainer's sharded steps trace under ``partitioned()``: the
    layers there add the branch (a row-parallel kernel is never concatenated)."""
    from peftjax.nn._partitioned import is_partitioned

    peft_model = peftjax.get_peft_model(_Mlp(nnx.Rngs(0)), peftjax.LoraConfig(r=4, target_modules=["gate"]))
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    tx = optax.sgd(0.1)
    seen = []

    def loss_fn(model, batch):
        seen.append(is_partitioned())
        return jnp.sum(model(batch["x"]) ** 2)

    batch = {"x": _rand((2, 16), 8)}
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    step = peftjax.make_train_step(graphdef, tx, loss_fn, mesh=mesh)
    step.lower(trainable, tx.init(trainable), rest, batch, None)
    plain = peftjax.make_train_step(graphdef, tx, loss_fn)
    plain.lower(trainable, tx.init(trainable), rest, batch, None)
    assert seen == [True, False]
    assert not is_partitioned()
