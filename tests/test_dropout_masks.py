"""The dropout masks every peftjax layer draws (``peftjax.nn.keep_mask``, keys from ``fold_key``).

They replace ``jax.random.bernoulli`` + ``fold_in`` (threefry) for speed and compile time, so
these tests hold them to what dropout needs from a random stream: the rate, the same mask for the
same key, and no detectable dependence between elements, between sites folded from one key, or
between the keys of successive steps. Bounds are five standard deviations of the binomial.
"""

from __future__ import annotations

import itertools
import math

import _tiny
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax.nn import apply_dropout, fold_key, keep_mask

N = 1 << 20


def _close(observed: float, expected: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.999])
def test_rate(keep):
    mask = np.asarray(keep_mask(jax.random.key(3), (N,), keep))
    assert mask.dtype == bool and mask.shape == (N,)
    assert _close(mask.mean(), keep, N)


def test_same_key_same_mask_eager_and_jit_any_shape():
    key = jax.random.key(7)
    eager = np.asarray(keep_mask(key, (4, 8, 16), 0.7))
    jitted = np.asarray(jax.jit(lambda k: keep_mask(k, (4, 8, 16), 0.7))(key))
    np.testing.assert_array_equal(eager, jitted)
    # the mask is a function of the flat position: a reshape of the same mask
    np.testing.assert_array_equal(eager.reshape(-1), np.asarray(keep_mask(key, (512,), 0.7)))


def test_edges_of_the_rate():
    key = jax.random.key(0)
    assert np.asarray(keep_mask(key, (1000,), 1.0)).all()
    assert not np.asarray(keep_mask(key, (1000,), 0.0)).any()
    assert np.asarray(keep_mask(key, (), 0.5)).shape == ()


def test_neighbouring_elements_are_independent():
    keep = 0.5
    mask = np.asarray(keep_mask(jax.random.key(11), (1024, 1024), keep))
    for a, b in [(mask[:, :-1], mask[:, 1:]), (mask[:-1], mask[1:]), (mask[:, :-8], mask[:, 8:])]:
        n = a.size
        assert _close((a & b).mean(), keep * keep, n), "adjacent elements correlate"
    # no period along the flat index: counts per block of 1024 are binomial
    blocks = mask.reshape(-1, 1024).sum(axis=1)
    chi2 = ((blocks - 512) ** 2 / (1024 * 0.25)).sum()
    dof = blocks.size - 1
    assert abs(chi2 - dof) < 5 * math.sqrt(2 * dof)


def _agreement_ok(a: np.ndarray, b: np.ndarray, keep: float) -> bool:
    # independent masks agree where both keep or both drop
    return _close((a == b).mean(), keep * keep + (1 - keep) * (1 - keep), a.size)


def test_folded_keys_draw_unrelated_masks():
    keep = 0.9
    base = jax.random.key(0)  # key data [0, 0]: the folds must do the mixing
    keys = [fold_key(base, i) for i in range(6)] + [fold_key(base, 2**31 + i) for i in range(3)]
    keys += [fold_key(fold_key(base, 1), 2), fold_key(fold_key(base, 2), 1)]  # nesting in either order
    keys += [jax.random.key(1), jax.random.key(2)]  # keys a user passes one after another
    masks = [np.asarray(keep_mask(k, (N,), keep)) for k in keys]
    for (i, a), (j, b) in itertools.combinations(enumerate(masks), 2):
        assert _agreement_ok(a, b, keep), f"masks {i} and {j} are related"


def test_traced_and_static_folds_agree_on_distinctness():
    key = jax.random.key(5)
    traced = jax.jit(lambda k, i: fold_key(k, i))
    data = [np.asarray(jax.random.key_data(traced(key, jnp.uint32(i)))) for i in range(64)]
    assert len({d.tobytes() for d in data}) == 64
    static = {np.asarray(jax.random.key_data(fold_key(key, i))).tobytes() for i in range(64)}
    assert len(static) == 64


def test_every_key_kind():
    for key in (jax.random.key(1), jax.random.PRNGKey(1), jax.random.key(1, impl="rbg")):
        mask = np.asarray(keep_mask(fold_key(key, 3), (N,), 0.8))
        assert _close(mask.mean(), 0.8, N)
    with pytest.raises(TypeError, match="jax.random key"):
        keep_mask(jnp.zeros((2,), jnp.float32), (4,), 0.5)


def test_adapter_dropout_masks_differ_by_layer_and_step():
    """What an adapter layer draws (``peftjax.nn.apply_dropout`` under ``peftjax.dropout_key``, its
    path folded into the step's key): unrelated masks per layer and per step, at the rate."""
    masks = {}
    for layer, step in itertools.product(range(2), range(2)):
        with peftjax.dropout_key(jax.random.key(step)):
            out = apply_dropout(jnp.ones((N,)), 0.25, f"model.layers.{layer}.self_attn.q_proj/default")
        np.testing.assert_allclose(np.unique(np.asarray(out)), [0.0, 1 / 0.75], rtol=1e-6)
        masks[layer, step] = np.asarray(out) != 0
    for (ka, a), (kb, b) in itertools.combinations(masks.items(), 2):
        assert _close(a.mean(), 0.75, N)
        assert _agreement_ok(a, b, 0.75), f"{ka} and {kb}"
    np.testing.assert_array_equal(np.asarray(apply_dropout(jnp.ones((4,)), 0.25, "x")), np.ones(4))  # no key


def test_the_train_step_compiles_no_random_bits_loop():
    """threefry compiled one loop per draw on CPU (71 in the MiniLM step, twice the compile time):
    the step of a bundled model with base-model and adapter dropout has none, and still drops."""
    from peftjax.models import BertForSequenceClassification

    model = BertForSequenceClassification.from_config(_tiny.config("bert"))
    peft_model = peftjax.get_peft_model(
        model, peftjax.LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS"),
        key=jax.random.key(0))
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    tx = optax.adamw(1e-3)
    step = peftjax.make_train_step(graphdef, tx, donate=False)
    batch = {"input_ids": np.arange(16, dtype=np.int32).reshape(2, 8) + 3,
             "attention_mask": np.ones((2, 8), np.int32), "labels": np.array([0, 2], np.int32)}
    opt_state = tx.init(trainable)
    text = step.lower(trainable, opt_state, rest, batch, jax.random.key(0)).as_text()
    assert "threefry" not in text and "stablehlo.while" not in text
    losses = [float(step(trainable, opt_state, rest, batch, key)[2]) for key in
              (jax.random.key(0), jax.random.key(0), jax.random.key(1), None)]
    assert losses[0] == losses[1]  # same key, same masks
    assert len({losses[0], losses[2], losses[3]}) == 3  # another key, or none, drops otherwise
