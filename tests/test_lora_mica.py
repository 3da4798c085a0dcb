"""LoRA's MiCA init (Minor Component Adaptation, ``init_lora_weights="mica"``) against HF PEFT 0.22.0.

MiCA sets ``A`` to zero and ``B`` to the ``r`` left singular vectors of the base weight with the
smallest singular values, and keeps ``B`` frozen: only ``A`` trains. Both factors are saved. The
oracle is PEFT's own layer: its ``B`` (equal up to each singular vector's sign), its trainable
parameter count, its training run from its own init (a flipped sign flips ``A``'s gradient with
it, so the logits after training must agree), and its files both ways.
"""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _method_cases import ARCHS, IDS, LLAMA, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch
from _method_cases import peft_steps, torch, torch_base
import peftjax
from peftjax import models

TARGETS = LLAMA + ["embed_tokens"]  # three linear shapes (32 x 32, 32 x 16, 48 x 32) and the embedding


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {"llama": tiny_checkpoint(ARCHS["llama"])}


def factors(model):
    """``{layer path: (A, B, trainable?)}``, PEFT's ``[r, in]`` / ``[out, r]`` layout (an
    embedding's ``A [r, num]``, ``B [dim, r]``), from a peftjax or a PEFT model."""
    if isinstance(model, peftjax.PeftModel):
        from peftjax.tuners.lora import lora_layers

        return {name.removeprefix("model."): (np.asarray(m.lora_A["default"].get_value()).T,
                                             np.asarray(m.lora_B["default"].get_value()).T,
                                             isinstance(m.lora_B["default"], peftjax.AdapterParam))
                for name, m in lora_layers(model.base_model).items()}
    out = {}
    for name, m in model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and "default" in m.lora_A:
            out[name.removeprefix("model.")] = (m.lora_A["default"].weight.detach().numpy(),
                                                m.lora_B["default"].weight.detach().numpy(),
                                                m.lora_B["default"].weight.requires_grad)
        elif hasattr(m, "lora_embedding_A") and "default" in m.lora_embedding_A:
            out[name.removeprefix("model.")] = (m.lora_embedding_A["default"].detach().numpy(),
                                                m.lora_embedding_B["default"].detach().numpy(),
                                                m.lora_embedding_B["default"].requires_grad)
    return out


def peft_mica(path, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(torch_base("llama", path), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica", **fields))


def test_mica_starts_as_peft_s_and_trains_to_peft_s_logits(checkpoints, tmp_path):
    """peftjax's MiCA factors are PEFT's (``B`` up to each vector's sign, frozen; ``A`` zero); the
    adapted model starts as the base; three Adam steps from each framework's own init give the same
    logits, ``B`` untouched; the file loads in PEFT with those logits."""
    path = checkpoints["llama"]
    theirs = peft_mica(path)
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica")
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    ours, ref = factors(model), factors(theirs)
    assert ours.keys() == ref.keys() and len(ours) == 3 * 2 + 1
    for name, (a, b, trains) in ours.items():
        peft_a, peft_b, peft_trains = ref[name]
        assert not trains and not peft_trains, name
        assert a.shape == peft_a.shape and not a.any() and not peft_a.any(), name
        signs = np.sign(np.sum(b * peft_b, axis=0))  # per singular vector
        assert np.all(np.abs(signs) == 1), name
        np.testing.assert_allclose(b * signs, peft_b, atol=2e-5, rtol=0, err_msg=name)
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    base = run_torch(torch_base("llama", path))
    assert_close(run_jax(model), base)

    batch = _tiny.batch(IDS, MASK)
    losses = _tiny.train(model, batch, steps=3, optimizer=optax.adam(2e-2), dropout=False).losses
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    peft_steps(theirs, batch, optimizer)
    trained = run_jax(model, jit=True)
    assert losses[-1] < losses[0] and changed(trained, base) > 1e-3
    assert_close(trained, run_torch(theirs), atol=2e-5)
    after = factors(model)
    for name, (a, b, _) in ours.items():
        np.testing.assert_array_equal(after[name][1], b, err_msg=name)  # B frozen
        assert np.abs(after[name][0]).max() > 1e-3, name  # A trained

    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_base("llama", path), tmp_path, is_trainable=True)
    assert_close(run_torch(loaded.eval()), trained)
    assert all(not trains for _, _, trains in factors(loaded).values())  # PEFT keeps it frozen too


def test_a_peft_mica_adapter_both_ways_keeps_b_frozen(checkpoints, tmp_path, capsys, monkeypatch):
    """A PEFT-made MiCA adapter (``A`` moved off zero) gives PEFT's logits here, loaded trainable its
    ``B`` stays frozen through ``set_adapter`` and training, and it goes back to PEFT, merged and
    exported as ``_method_cases.check_interop`` checks every method; the layer status says
    ``"irregular"`` for its mixed ``requires_grad``, as PEFT's does. Loading takes no SVD (the file
    holds ``B``)."""
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="mica")
    check_interop(("LoraConfig", "llama", fields, False), checkpoints, tmp_path, capsys)
    base = models.from_pretrained(checkpoints["llama"])
    with monkeypatch.context() as patch:
        patch.setattr(jnp.linalg, "svd", lambda *a, **k: pytest.fail("loading a MiCA file took an SVD"))
        model = peftjax.PeftModel.from_pretrained(base, tmp_path / "ours", is_trainable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base("llama", checkpoints["llama"]), tmp_path / "ours",
                                                is_trainable=True)
    status = lambda m: sorted((s.name, s.requires_grad["default"]) for s in m.get_layer_status())  # noqa: E731
    assert status(model) == status(theirs) and {g for _, g in status(model)} == {"irregular"}
    model.set_adapter("default")  # trainable again: A only
    before = factors(model)
    _tiny.train(model, _tiny.batch(IDS, MASK), steps=1, optimizer=optax.sgd(1.0), dropout=False)
    for name, (a, b, trains) in factors(model).items():
        assert not trains and np.array_equal(b, before[name][1]), name
        assert not np.array_equal(a, before[name][0]), name


def test_mica_in_another_case_trains_b_too_as_in_peft(checkpoints):
    """PEFT's layers run MiCA's init for any case, but freeze ``B`` only for the exact ``"mica"``
    (its variant is looked up by equality): with ``"MiCA"`` both factors train, in PEFT and here."""
    path = checkpoints["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.LoraConfig(
            r=4, target_modules=["q_proj"], init_lora_weights="MiCA"))
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="MiCA"))
    ours, ref = factors(model), factors(theirs)
    assert all(trains for _, _, trains in ours.values()) and all(trains for _, _, trains in ref.values())
    for name, (_, b, _) in ours.items():
        np.testing.assert_allclose(np.abs(b), np.abs(ref[name][1]), atol=2e-5, rtol=0, err_msg=name)
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def test_mica_under_scanned_layers_keeps_b_frozen(checkpoints):
    """``scan_layers=True`` stacks the adapters; MiCA's ``B`` stays a frozen variable in the stack
    and equals the unscanned model's, and a train step leaves it as it was."""
    config = peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="mica")
    plain = peftjax.get_peft_model(models.from_pretrained(checkpoints["llama"]), config)
    scanned = peftjax.get_peft_model(models.from_pretrained(checkpoints["llama"], scan_layers=True), config)

    def frozen_b():
        state = nnx.to_flat_state(nnx.state(scanned.base_model, peftjax.FrozenAdapterParam))
        return {k: np.asarray(v.get_value()) for k, v in state if "lora_B" in k}

    stacked_b = frozen_b()
    assert len(stacked_b) == 2
    assert {k[-2] for k, _ in nnx.to_flat_state(nnx.state(scanned.base_model, peftjax.LoraParam))} == {"lora_A"}
    layers = plain.base_model.model.layers
    for k, v in stacked_b.items():
        proj = "q_proj" if "q_proj" in k else "v_proj"
        expect = np.stack([np.asarray(getattr(layer.self_attn, proj).lora_B["default"].get_value())
                           for layer in layers])
        np.testing.assert_allclose(v, expect, atol=1e-6, rtol=0, err_msg=str(k))
    _tiny.train(scanned, _tiny.batch(IDS, MASK), steps=1, optimizer=optax.sgd(1.0), dropout=False)
    after = frozen_b()
    assert all(np.array_equal(after[k], stacked_b[k]) for k in stacked_b)


def _llama(**fields):
    return models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **_tiny.fields("llama", **fields)))


def test_mica_refusals_name_the_layer_and_change_nothing(checkpoints):
    """PEFT's refusals: a rank above ``min(in, out)`` (named layer, shape, usable rank), DoRA (no
    variant of MiCA for it), a quantized base (its SVD needs the float weight); and a convolution
    (PEFT has no MiCA variant there)."""
    too_big = r"MiCA requires `r` <= min\(in_features, out_features\) but got r=20 for a layer with weight shape " \
              r"\(16, 32\) \(max usable r is 16\)"
    with pytest.raises(ValueError, match=too_big):
        peft_mica(checkpoints["llama"], rank_pattern={"v_proj": 20})
    model = _llama()
    with pytest.raises(ValueError, match="v_proj: " + too_big):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, rank_pattern={"v_proj": 20},
                                                         target_modules=["q_proj", "v_proj"], init_lora_weights="mica"))
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "lora_A")
    with pytest.raises(ValueError, match=r"\('mica', 'use_dora'\)"):
        peftjax.LoraConfig(init_lora_weights="mica", use_dora=True)

    quantized = models.from_pretrained(checkpoints["llama"],
                                       quantization_config=peftjax.QuantizationConfig(load_in_8bit=True))
    with pytest.raises(TypeError, match="q_proj: Please initialize MiCA under float32, float16, or bfloat16"):
        peftjax.get_peft_model(quantized, peftjax.LoraConfig(target_modules=["q_proj"], init_lora_weights="mica"))

    class Conv(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))

    with pytest.raises(NotImplementedError, match=r"conv: init_lora_weights='mica' is not supported on convolutions"):
        peftjax.get_peft_model(Conv(), peftjax.LoraConfig(target_modules=["conv"], init_lora_weights="mica"))



def test_combining_mica_adapters_keeps_mica_as_peft_does(checkpoints, tmp_path):
    """``add_weighted_adapter`` takes the first adapter's config, MiCA's init included, as PEFT does:
    the combined adapter's ``B`` stays frozen once it is the active one, and its file says ``"mica"``."""
    path = checkpoints["llama"]
    config = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="mica")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.LoraConfig(**config))
        theirs.add_adapter("other", peft.LoraConfig(**config))
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**config))
    ours.add_adapter("other", peftjax.LoraConfig(**config))
    for model in (theirs, ours):
        model.add_weighted_adapter(["default", "other"], [1.0, 0.5], "mix", combination_type="cat")
        model.set_adapter("mix")
    status = lambda m: sorted((s.name, s.requires_grad["mix"]) for s in m.get_layer_status())  # noqa: E731
    assert status(ours) == status(theirs) and {g for _, g in status(ours)} == {"irregular"}
    ours.save_pretrained(tmp_path, selected_adapters=["mix"])
    assert json.loads((tmp_path / "mix" / "adapter_config.json").read_text())["init_lora_weights"] == "mica"


def test_mica_through_linen_trains_a_only_with_the_nnx_factors():
    """A Linen model's MiCA adapter has the NNX layer's factors (both PEFT's, tested above) and PEFT's
    rank refusal; ``split``
    with the spec keeps ``lora_B`` in the frozen rest and ``trainable_labels`` labels it frozen, so
    an optax step moves ``A`` alone; ``combine`` puts the split dict back; without the spec ``B``
    sits on the trainable side but the forward gives it no gradient."""
    import flax.linen as nn
    import optax

    from peftjax import linen

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="out")(nn.relu(nn.Dense(12, name="hidden")(x)))

    x = jax.random.normal(jax.random.key(1), (3, 10))
    params = Mlp().init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"hidden: MiCA requires .* weight shape \(12, 10\) \(max usable r is 10\)"):
        linen.inject(Mlp(), params, peftjax.LoraConfig(r=11, target_modules=["hidden"], init_lora_weights="mica"),
                     sample_args=(x,), key=jax.random.key(2))
    config = peftjax.LoraConfig(r=3, target_modules=["hidden", "out"], init_lora_weights="mica")
    adapted, spec = linen.inject(Mlp(), params, config, sample_args=(x,), key=jax.random.key(2))

    class Twin(nnx.Module):
        def __init__(self):
            self.hidden, self.out = nnx.Linear(10, 12, rngs=nnx.Rngs(0)), nnx.Linear(12, 4, rngs=nnx.Rngs(0))

    twin = Twin()
    for name in ("hidden", "out"):
        getattr(twin, name).kernel.set_value(params[name]["kernel"])
    peftjax.tuners.inject_lora(twin, config)
    for name in ("hidden", "out"):
        theirs = getattr(twin, name).lora_B["default"].get_value()
        np.testing.assert_allclose(adapted[name]["lora_B"]["default"], theirs, atol=1e-6, err_msg=name)
        assert not np.asarray(adapted[name]["lora_A"]["default"]).any()

    trainable, rest = linen.split(adapted, spec)
    assert {k for layer in trainable.values() for k in layer} == {"lora_A"}
    assert all("lora_B" in rest[name] for name in ("hidden", "out"))
    labels = linen.trainable_labels(adapted, spec)
    assert labels["hidden"]["lora_B"]["default"] == "frozen" and labels["hidden"]["lora_A"]["default"] == "trainable"
    jax.tree.map(np.testing.assert_array_equal, linen.combine(trainable, rest), adapted)

    def loss(trainable, rest):
        with linen.intercept(spec):
            return jnp.sum(Mlp().apply({"params": linen.combine(trainable, rest)}, x) ** 2)

    tx = optax.adam(1e-2)
    update, _ = tx.update(jax.grad(loss)(trainable, rest), tx.init(trainable), trainable)
    moved = optax.apply_updates(trainable, update)
    assert all(np.abs(moved[n]["lora_A"]["default"] - trainable[n]["lora_A"]["default"]).max() > 1e-4
               for n in ("hidden", "out"))
    # no spec: B on the trainable side, where the forward gives it no gradient (A moved: B's would be non-zero)
    everything, base = linen.split(linen.combine(moved, rest))
    grads = jax.grad(loss)(everything, base)
    assert all(not np.asarray(grads[n]["lora_B"]["default"]).any() for n in ("hidden", "out"))
