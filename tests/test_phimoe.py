"""Phi-3.5-MoE (``phimoe``) against PyTorch transformers: logits past LongRoPE's switch, SparseMixer's
routing in evaluation and (given torch's draws) in training with its gradients, the load-balancing
loss, generation across the switch, scanned layers' gradients, the classifier, both checkpoint
layouts and LoRA with PEFT both ways."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_layouts_round_trip,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
    save_tiny,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models._phimoe import sparsemixer

torch = lazy("torch")
tr = lazy("transformers")
peft = lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["phimoe"][2]["vocab_size"]


@pytest.fixture(scope="module")
def phimoe(tmp_path_factory):
    """(torch model, its checkpoint as transformers saves it (per-expert), the fused checkpoint, peftjax model)."""
    root = tmp_path_factory.mktemp("phimoe")
    torch_model = randomised(tr.PhimoeForCausalLM(_tiny.config("phimoe")).eval())
    hub, fused = save_both_layouts(torch_model, root)
    return torch_model, hub, fused, models.from_pretrained(hub)


def test_logits_match_transformers_before_and_past_the_longrope_switch(phimoe, jit):
    torch_model, _, _, model = phimoe
    assert type(model).__name__ == "PhimoeForCausalLM"
    for seq in (7, 11):  # longest position 7 (short mscale), then past original_max_position_embeddings=8
        ids, mask = padded_batch(VOCAB, seq=seq)
        valid = mask.astype(bool)
        ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
        if jit:
            out = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a))(model, jnp.asarray(ids), jnp.asarray(mask))
        else:
            out = model(input_ids=ids, attention_mask=mask)
        # logits up to 5 in size (mscale 1.3): float32 rounding reaches 1.2e-5 there
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref, atol=1e-5, rtol=1e-5, err_msg=f"seq {seq}")


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(phimoe, tmp_path):
    torch_model, hub, fused, model = phimoe
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert {"model.layers.1.block_sparse_moe.experts.3.w3.weight", "model.layers.1.block_sparse_moe.gate.weight",
            "lm_head.bias", "model.norm.bias"} <= keys(hub)
    assert "model.layers.1.mlp.router.weight" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def _torch_draws(monkeypatch, draws):
    """torch's random fills in transformers' ``sparsemixer`` replaced by ``draws``, in the order it
    takes them: an exponential fill, a ``rand_like``, an exponential fill, a ``rand_like`` refilled by
    ``uniform_`` (the second ``rand_like``'s own values are never read)."""
    queue = [torch.tensor(np.asarray(d)) for d in (draws[0], draws[1], draws[2], np.zeros_like(draws[3]), draws[3])]

    def take(t, *args, **kwargs):
        return t.copy_(queue.pop(0))

    monkeypatch.setattr(torch.Tensor, "exponential_", take)
    monkeypatch.setattr(torch.Tensor, "uniform_", take)
    monkeypatch.setattr("torch.rand_like", lambda t, *a, **k: queue.pop(0).to(t.dtype).clone())
    return queue


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_sparsemixer_matches_transformers_with_its_gradient(training, monkeypatch):
    from transformers.models.phimoe import modeling_phimoe

    rng = np.random.default_rng(0)
    tokens, experts, eps = 64, 6, 0.05
    scores = rng.normal(size=(tokens, experts)).astype(np.float32)
    scores[:4] = [3.0, 2.99, -1.0, 0.5, 2.0, 1.0]  # gaps inside and outside the mask, a near tie
    upstream = rng.normal(size=(tokens, 2)).astype(np.float32)
    draws = None
    if training:
        draws = (rng.exponential(size=(tokens, experts)).astype(np.float32), rng.uniform(size=(tokens, 1)).astype(
            np.float32), rng.exponential(size=(tokens, experts)).astype(np.float32),
                 rng.uniform(size=(tokens, 1)).astype(np.float32))
        queue = _torch_draws(monkeypatch, draws)
    t_scores = torch.tensor(scores, requires_grad=True)
    t_weights, t_experts = modeling_phimoe.sparsemixer(t_scores, jitter_eps=eps, training=training)
    (t_weights * torch.tensor(upstream)).sum().backward()
    if training:
        assert not queue  # every draw taken
        monkeypatch.undo()

    def weighted(s):
        weights, chosen = sparsemixer(s, eps, draws)
        return jnp.sum(weights * upstream), (weights, chosen)

    grad, (weights, chosen) = jax.jit(jax.grad(weighted, has_aux=True))(jnp.asarray(scores))
    np.testing.assert_array_equal(np.asarray(chosen), t_experts.numpy())
    np.testing.assert_allclose(np.asarray(weights), t_weights.detach().numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(grad), t_scores.grad.numpy(), atol=1e-6, rtol=0)
    if training:  # the sampling and Heun's rule showed: some second picks are not the best, some weights scaled
        assert (np.asarray(chosen)[:, 1] != np.argsort(-scores, axis=1)[:, 1]).any()
        plain, _ = sparsemixer(jnp.asarray(scores), eps, None)
        assert not np.allclose(np.asarray(weights), np.asarray(plain))


def test_training_routes_by_the_dropout_key_and_the_step_learns_the_router(phimoe):
    torch_model, hub, _, model = phimoe
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid]
    with peftjax.dropout_key(jax.random.key(0)):
        noisy = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid]
        again = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid]
    with peftjax.dropout_key(jax.random.key(1)):
        other = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid]
    np.testing.assert_array_equal(noisy, again)
    assert np.abs(noisy - ref).max() > 1e-2 and np.abs(noisy - other).max() > 1e-2
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid], ref, atol=1e-5)
    jittered = models.from_pretrained(hub, input_jitter_noise=0.3)  # the MLP's input scaled by noise, in training only
    np.testing.assert_array_equal(np.asarray(jittered(input_ids=ids, attention_mask=mask).logits)[valid],
                                  np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid])
    with peftjax.dropout_key(jax.random.key(0)):
        assert np.abs(np.asarray(jittered(input_ids=ids, attention_mask=mask).logits)[valid] - noisy).max() > 1e-2

    # the public train loop (a dropout key per step) trains the router through SparseMixer's gradient
    config = peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], target_parameters=["router.weight"])
    peft_model = peftjax.get_peft_model(models.from_pretrained(hub), config)
    before = {k: np.asarray(v) for k, v in peftjax.get_peft_model_state_dict(peft_model).items()}
    labels = np.where(mask == 1, ids, -100)
    losses = _tiny.train(peft_model, _tiny.batch(ids, mask) | {"labels": labels}, steps=3).losses
    after = peftjax.get_peft_model_state_dict(peft_model)
    assert np.isfinite(losses).all()
    router_b = [k for k in after if "router" in k and "lora_B" in k]
    assert router_b and all(np.abs(np.asarray(after[k]) - before[k]).max() > 0 for k in router_b)


def test_loss_includes_the_load_balancing_loss_as_transformers_adds_it(phimoe):
    torch_model, _, _, model = phimoe
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    t = {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    with torch.no_grad():
        ref = torch_model(**t, output_router_logits=True)
    out = jax.jit(lambda i, a, y: model(input_ids=i, attention_mask=a, labels=y, output_router_logits=True))(
        ids, mask, labels)
    assert abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    real = mask.reshape(-1).astype(bool)
    for a, b in zip(out.router_logits, ref.router_logits, strict=True):
        np.testing.assert_allclose(np.asarray(a)[real], b.numpy()[real], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers_across_the_longrope_switch(phimoe):
    torch_model, _, _, model = phimoe
    ids, mask = padded_batch(VOCAB, seq=5)  # 5 + 6 tokens: the sequence crosses 8 on the way, so both rerun
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)


def test_scanned_and_rematerialised_layers_match_transformers_with_gradients(phimoe):
    torch_model, hub, _, _ = phimoe
    scanned = models.from_pretrained(hub, scan_layers=True, remat="full", output_router_logits=True)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                      output_router_logits=True)
    ref.loss.backward()

    def loss(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out

    grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(scanned)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    layer = grads.model.layers.layer
    for ours, name in ((layer.mlp.router.weight, "mlp.router.weight"),
                       (layer.mlp.experts.gate_up_proj, "mlp.experts.gate_up_proj"),
                       (layer.self_attn.q_proj.bias, "self_attn.q_proj.bias"),
                       (layer.input_layernorm.bias, "input_layernorm.bias")):
        for i in range(2):
            theirs = torch_model.get_parameter(f"model.layers.{i}.{name}").grad.numpy()
            np.testing.assert_allclose(np.asarray(ours[...])[i], theirs, atol=1e-5, rtol=1e-4, err_msg=f"{i} {name}")
    np.testing.assert_allclose(np.asarray(grads.lm_head.bias[...]), torch_model.lm_head.bias.grad.numpy(), atol=1e-5)
    torch_model.zero_grad(set_to_none=True)


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = save_tiny(tr.PhimoeForSequenceClassification, _tiny.config("phimoe", num_labels=3), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "PhimoeForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=7)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_lora_on_attention_and_experts_moves_between_peft_and_peftjax(phimoe, tmp_path):
    torch_model, hub, _, model = phimoe
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj"],
                  target_parameters=["experts.gate_up_proj", "experts.down_proj"], init_lora_weights=False)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tr.PhimoeForCausalLM.from_pretrained(hub).eval(), peft.LoraConfig(**config))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid]
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(hub), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=ids, attention_mask=mask).logits)[valid], ref, atol=1e-5)

    ours = peftjax.get_peft_model(models.from_pretrained(hub), peftjax.LoraConfig(**config))
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tr.PhimoeForCausalLM.from_pretrained(hub).eval(), tmp_path / "ours")
    np.testing.assert_allclose(torch_logits(back, input_ids=ids, attention_mask=mask)[valid],
                               np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid], atol=1e-5)


def test_configs_it_cannot_run_are_refused_by_name(phimoe):
    _, hub, _, _ = phimoe
    with pytest.raises(ValueError, match="num_experts_per_tok=3: PhiMoE's SparseMixer routes each token to exactly 2"):
        models.from_pretrained(hub, num_experts_per_tok=3)
    rope = dict(_tiny.FAMILIES["phimoe"][2]["rope_parameters"])
    with pytest.raises(ValueError, match="need numbers short_mscale and long_mscale; got None and 1.3"):
        models.from_pretrained(hub, rope_parameters={k: v for k, v in rope.items() if k != "short_mscale"})
    with pytest.raises(ValueError, match="phimoe: rope_type 'yarn' is not supported"):
        models.from_pretrained(hub, rope_parameters={"rope_type": "yarn", "factor": 2.0, "short_mscale": 1.0,
                                                     "long_mscale": 1.0})
