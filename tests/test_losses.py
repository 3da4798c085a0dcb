"""The fused causal-LM loss against the plain one (logits first): values, gradients, chunking,
ignored labels, a frozen or trained output layer, and the bundled decoders that use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
import peftjax
from peftjax.models import GPT2LMHeadModel, LlamaForCausalLM, _losses
from peftjax.models._losses import causal_lm_loss, causal_lm_loss_from_hidden


def _case(b=3, s=11, d=16, v=40, seed=0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.standard_normal((b, s, d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((d, v)) * 0.3, jnp.float32)
    y = rng.integers(0, v, (b, s))
    y[0, :4] = -100  # ignored positions, including a whole prefix
    y[2, -3:] = -100
    return h, w, jnp.asarray(y)


@pytest.mark.parametrize("chunk", [None, 1, 4, 7, 1000], ids=lambda c: f"chunk{c}")
def test_value_and_gradients_equal_the_plain_loss(chunk):
    h, w, y = _case()
    fused = lambda h, w: causal_lm_loss_from_hidden(h, w, y, chunk_tokens=chunk)  # noqa: E731
    plain = lambda h, w: causal_lm_loss(h @ w, y)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(h, w)
    ref_value, ref_grads = jax.value_and_grad(plain, argnums=(0, 1))(h, w)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(grads, ref_grads):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


def test_a_frozen_output_layer_gets_no_gradient_work():
    """Differentiating only the hidden states: the same gradient, and the kernel's gradient
    (a [hidden, vocab] accumulation) is not computed at all."""
    h, w, y = _case(d=32, v=4096)
    grad_h = jax.jit(jax.grad(lambda h: causal_lm_loss_from_hidden(h, w, y, chunk_tokens=8)))
    np.testing.assert_allclose(grad_h(h), jax.grad(lambda h: causal_lm_loss(h @ w, y))(h), atol=1e-6, rtol=1e-5)
    both = jax.jit(jax.grad(lambda h, w: causal_lm_loss_from_hidden(h, w, y, chunk_tokens=8), argnums=(0, 1)))
    one = grad_h.lower(h).compile().cost_analysis()
    two = both.lower(h, w).compile().cost_analysis()
    one, two = (c[0] if isinstance(c, list) else c for c in (one, two))
    assert one["flops"] < 0.8 * two["flops"]  # no h^T @ g per chunk


def test_a_chunk_needs_one_logits_array_of_scratch():
    """The chunk's gradient (softmax minus the one-hot labels) is written over its logits: the
    compiled loss and gradient need one ``[chunk, vocab]`` float32 array of scratch, not two."""
    h, w, y = _case(b=4, s=64, d=32, v=4096)
    grad_h = jax.jit(jax.grad(lambda h: causal_lm_loss_from_hidden(h, w, y, chunk_tokens=64)))
    temp = grad_h.lower(h).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = 64 * 4096 * 4
    assert logits_bytes <= temp < 1.5 * logits_bytes, temp / logits_bytes


def test_all_labels_ignored_gives_zero_not_nan():
    h, w, _ = _case()
    y = jnp.full(h.shape[:2], -100)
    value, grad = jax.value_and_grad(lambda h: causal_lm_loss_from_hidden(h, w, y))(h)
    assert float(value) == 0.0 and not np.any(np.isnan(grad))


def _lora_grads(model, ids, from_logits: bool):
    graphdef, trainable, rest = peftjax.split(model)

    def loss(trainable):
        m = nnx.merge(graphdef, trainable, rest)
        if from_logits:
            return causal_lm_loss(m(input_ids=ids).logits, jnp.asarray(ids))
        return m(input_ids=ids, labels=ids).loss

    return jax.jit(jax.value_and_grad(loss))(trainable)


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "gpt2"])
def test_decoders_train_on_the_fused_loss_with_the_same_gradients(kind, monkeypatch):
    """Traced, the model's loss is the fused one (small chunks here): the same loss and adapter
    gradients as the loss of its logits."""
    monkeypatch.setattr(_losses, "FUSED_CHUNK_ELEMENTS", 5 * 96)  # 5-token chunks
    if kind == "gpt2":
        config = _tiny.config("gpt2", n_layer=1)
        model, targets = GPT2LMHeadModel.from_config(config), ["c_attn", "c_fc"]
    else:
        config = _tiny.config("llama", num_hidden_layers=1, pad_token_id=None, tie_word_embeddings=kind == "llama-tied")
        model, targets = LlamaForCausalLM.from_config(config), ["q_proj", "v_proj"]
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=targets,
                                                                   init_lora_weights=False))
    ids = np.random.default_rng(1).integers(0, 96, (2, 13))
    calls = []
    fused = _losses.causal_lm_loss_from_hidden
    monkeypatch.setattr(_losses, "causal_lm_loss_from_hidden", lambda *a, **k: calls.append(1) or fused(*a, **k))
    value, grads = _lora_grads(peft_model.base_model, ids, from_logits=False)
    assert calls, "the traced loss did not take the fused path"
    ref_value, ref_grads = _lora_grads(peft_model.base_model, ids, from_logits=True)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
