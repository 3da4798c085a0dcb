"""LoRA's orthogonal, NoRA and LoftQ inits, and PiSSA/OLoRA saved as a plain LoRA
(``save_pretrained(path_initial_model_for_weight_conversion=...)``), against HF PEFT 0.22,
bitsandbytes 0.50.2 and dense references.

PEFT draws the orthogonal init from torch's RNG and runs LoftQ only on a GPU, so the oracles are
what defines each: for the orthogonal init, ``B @ A == 0`` with both factors of rank ``r / 2`` (as
PEFT's own layer has them) and a first step that moves ``A`` too; for LoftQ, PEFT's loop written
here with bitsandbytes' quantizers and torch's SVD.
"""

from __future__ import annotations

import json
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import _tiny
import peftjax
from _torch_models import lazy, padded_batch, torch_logits
from peftjax import models

torch, peft, bnb = lazy("torch"), lazy("peft"), lazy("bitsandbytes")

ARCH = _tiny.arch("llama")
IDS, MASK = padded_batch(96, seq=6)
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch_model = _tiny.save(ARCH, path)
    return path, torch_model


def lora_pairs(peft_model):
    """``(path, A [in, r], B [r, out], base kernel [in, out])`` of every LoRA layer."""
    from peftjax.tuners.lora import lora_layers

    return [(name, np.asarray(m.lora_A["default"].get_value()), np.asarray(m.lora_B["default"].get_value()),
             np.asarray(m.kernel.get_value())) for name, m in lora_layers(peft_model.base_model).items()]


def factors(peft_model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{path: (A, B)}`` of every LoRA layer, embeddings included, in Flax layout."""
    from peftjax.tuners.lora import lora_layers

    return {name: (np.asarray(m.lora_A["default"].get_value()), np.asarray(m.lora_B["default"].get_value()))
            for name, m in lora_layers(peft_model.base_model).items()}


def logits(model, **kw):
    return np.asarray(model(input_ids=IDS, attention_mask=MASK, **kw).logits)


# ------------------------------------------------------------------------------------ orthogonal


def test_orthogonal_init_starts_as_the_base_with_both_factors_live(checkpoint, tmp_path):
    path, torch_model = checkpoint
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="orthogonal")
    peft_model = peftjax.get_peft_model(models.from_pretrained(path), config)
    base = torch_logits(torch_model, input_ids=IDS, attention_mask=MASK)
    valid = MASK.astype(bool)
    np.testing.assert_allclose(logits(peft_model)[valid], base[valid], atol=1e-5)
    # PEFT's layer on the same shapes: B @ A is zero and each factor has rank r / 2; ours too
    torch.manual_seed(0)
    theirs = peft.get_peft_model(ARCH.torch_class.from_pretrained(path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="orthogonal"))
    q = theirs.base_model.model.model.layers[0].self_attn.q_proj
    peft_a, peft_b = q.lora_A["default"].weight.detach().numpy(), q.lora_B["default"].weight.detach().numpy()
    assert np.abs(peft_b @ peft_a).max() < 1e-6 and np.linalg.matrix_rank(peft_a, tol=1e-5) == 2
    for name, a, b, _ in lora_pairs(peft_model):
        assert np.abs(a @ b).max() < 1e-6, name
        assert np.linalg.matrix_rank(a, tol=1e-5) == 2 and np.linalg.matrix_rank(b, tol=1e-5) == 2, name
        # the same scale as PEFT's (entries ~ N(0, 1/200) for A: a Gaussian times half an orthonormal basis / 10)
        assert 0.5 < a.std() / peft_a.std() < 2.0, name
    # one Adam step moves A as well (with B = 0, A's first gradient is zero)
    before = lora_pairs(peft_model)
    _tiny.train(peft_model, _tiny.batch(IDS, MASK), steps=1, optimizer=optax.adam(1e-2), dropout=False)
    after = lora_pairs(peft_model)
    assert all(np.abs(x[1] - y[1]).max() > 1e-4 and np.abs(x[2] - y[2]).max() > 1e-4 for x, y in zip(before, after))
    # the file is a LoRA file: PEFT loads it with the same logits, its config says "orthogonal"
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    loaded = peft.PeftModel.from_pretrained(ARCH.torch_class.from_pretrained(path), tmp_path).eval()
    ours = logits(peft_model)
    np.testing.assert_allclose(torch_logits(loaded, input_ids=IDS, attention_mask=MASK)[valid], ours[valid],
                               atol=1e-5)
    assert np.abs(ours - base)[valid].max() > 1e-3


def test_nora_init_is_the_default_draw_with_unit_columns_as_peft_makes_it(checkpoint, tmp_path):
    """NoRA (PEFT 0.22): ``A`` is the default init's draw with each input's ``r`` values scaled to
    unit norm, ``B`` zero; an embedding takes the default init; on fused experts each expert's
    block is normalised. PEFT's layers have the same norms and zeros, its file loads with our
    logits, and one Adam step moves both factors."""
    path, _ = checkpoint
    targets = [*TARGETS, "embed_tokens"]
    fields = dict(r=4, lora_alpha=4, target_modules=targets)
    nora = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**fields, init_lora_weights="nora"))
    plain = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**fields))  # the same key
    theirs = peft.get_peft_model(ARCH.torch_class.from_pretrained(path), peft.LoraConfig(
        **fields, init_lora_weights="nora"))
    start = factors(plain)
    for name, (a, b) in factors(nora).items():
        a0 = start[name][0]
        layer = theirs.base_model.model.get_submodule(name)
        if "embed" in name:  # [num, r] zero, B normal: the default, as PEFT's embedding takes it
            np.testing.assert_array_equal(a, a0)
            assert not layer.lora_embedding_A["default"].detach().any()
            continue
        np.testing.assert_allclose(a, a0 / np.linalg.norm(a0, axis=1, keepdims=True), rtol=1e-6, err_msg=name)
        peft_a = layer.lora_A["default"].weight.detach().numpy()  # [r, in]
        np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.linalg.norm(peft_a, axis=0), 1.0, rtol=1e-5, err_msg=name)
        assert not b.any() and not layer.lora_B["default"].weight.detach().any(), name
    before = factors(nora)
    _tiny.train(nora, _tiny.batch(IDS, MASK), steps=2, optimizer=optax.adam(1e-2), dropout=False)
    for name, (a, b) in factors(nora).items():
        assert np.abs(b - before[name][1]).max() > 1e-4 and np.abs(a - before[name][0]).max() > 1e-4, name
    nora.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "nora"
    loaded = peft.PeftModel.from_pretrained(ARCH.torch_class.from_pretrained(path), tmp_path).eval()
    valid = MASK.astype(bool)
    np.testing.assert_allclose(torch_logits(loaded, input_ids=IDS, attention_mask=MASK)[valid],
                               logits(nora)[valid], atol=1e-5)

    # target_parameters: each expert's [r, in] block of A normalised over r, the router's [r, in] as a
    # linear layer's (PEFT 0.22 normalises its router the same; on fused experts its nora_init reads the
    # module's `.weight`, which the experts have not, and fails)
    experts = _tiny.arch("mixtral")
    moe = tmp_path / "mixtral"
    _tiny.save(experts, moe)
    config = dict(r=2, target_modules=[], target_parameters=["experts.gate_up_proj", "gate.weight"])
    ours = peftjax.get_peft_model(models.from_pretrained(moe), peftjax.LoraConfig(**config, init_lora_weights="nora"))
    default = peftjax.get_peft_model(models.from_pretrained(moe), peftjax.LoraConfig(**config))
    theirs = peft.get_peft_model(experts.torch_class.from_pretrained(moe), peft.LoraConfig(
        r=2, target_modules=[], target_parameters=["gate.weight"], init_lora_weights="nora"))
    for attr, holder in (("gate_up_proj", "experts"), ("weight", "gate")):
        layer, start = (getattr(m.base_model.model.layers[0].mlp, holder) for m in (ours, default))
        a, a0 = (np.asarray(x.lora_A[attr]["default"].get_value()) for x in (layer, start))  # [E r, in]
        e = len(np.asarray(layer.gate_up_proj.get_value())) if attr == "gate_up_proj" else 1
        blocks, blocks0 = a.reshape(e, 2, -1), a0.reshape(e, 2, -1)
        np.testing.assert_allclose(blocks, blocks0 / np.linalg.norm(blocks0, axis=1, keepdims=True), rtol=1e-6)
        assert not np.asarray(layer.lora_B[attr]["default"].get_value()).any()
    peft_router = theirs.base_model.model.model.layers[0].mlp.gate.lora_A["default"].weight.detach().numpy()
    np.testing.assert_allclose(np.linalg.norm(peft_router, axis=0), 1.0, rtol=1e-5)
    assert peft_router.shape == a.shape


def test_orthogonal_init_refuses_an_odd_rank_before_changing_anything():
    model = models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **_tiny.fields("llama")))
    config = peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 3},
                                init_lora_weights="orthogonal")
    with pytest.raises(ValueError, match=r"v_proj: Orthogonal initialization requires the LoRA rank to be even, "
                                         r"got 3"):
        peftjax.get_peft_model(model, config)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "lora_A")


# ------------------------------------------------------------------------------------ LoftQ


def peft_loftq(weight: np.ndarray, bits: int, r: int, iters: int):
    """PEFT 0.22.0's ``loftq_init`` loop (peft/utils/loftq_utils.py), on the CPU: ``(Q, A, B)``."""
    F = bnb.functional
    w = torch.from_numpy(np.ascontiguousarray(weight))  # bnb blocks the memory order: [out, in] rows
    res = w.clone()
    for i in range(iters):
        if bits == 4:
            packed, state = F.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
            deq = F.dequantize_4bit(packed, state)
        else:
            cb, scb, _ = F.int8_vectorwise_quant(res.half())
            deq = F.int8_vectorwise_dequant(cb, scb)
        res = w - deq
        u, s, vh = torch.linalg.svd(res.double(), full_matrices=False)
        b = u[:, :r] @ torch.diag(s[:r].sqrt())
        a = torch.diag(s[:r].sqrt()) @ vh[:r]
        if i + 1 == iters:
            break
        res = w - (b @ a).float()
    return deq.float().numpy(), a.float().numpy(), b.float().numpy()


@pytest.mark.parametrize(("bits", "iters"), [(4, 1), (4, 3), (8, 2)])
def test_loftq_equals_peft_loop_and_beats_quantization_alone(bits, iters):
    from peftjax.quantization import _bnb

    # rows of 128: bitsandbytes' CPU dequantize_4bit misplaces block scales when a row is not a
    # whole number of 64-blocks (its GPU kernel, which PEFT's LoftQ runs on, does not)
    rng = np.random.RandomState(0)
    fields = _tiny.fields("llama", hidden_size=64, intermediate_size=128)
    model = models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **fields))
    model.model.layers[0].mlp.down_proj.kernel.set_value(jnp.asarray(rng.randn(128, 64).astype(np.float32) * 0.05))
    original = np.asarray(model.model.layers[0].mlp.down_proj.kernel.get_value()).T  # [out, in]
    config = peftjax.LoraConfig(r=4, lora_alpha=4, target_modules=["down_proj"], init_lora_weights="loftq",
                                loftq_config=peftjax.LoftQConfig(loftq_bits=bits, loftq_iter=iters))
    peft_model = peftjax.get_peft_model(model, config)
    layer = peft_model.base_model.model.layers[0].mlp.down_proj
    q = np.asarray(layer.kernel.get_value()).T
    delta = (np.asarray(layer.lora_A["default"].get_value()) @ np.asarray(layer.lora_B["default"].get_value())).T
    ref_q, ref_a, ref_b = peft_loftq(original, bits, 4, iters)
    np.testing.assert_array_equal(q, ref_q)  # bitsandbytes' codes (NF4 and int8): the same Q
    np.testing.assert_allclose(delta, ref_b @ ref_a, atol=1e-5)
    assert np.linalg.norm(q + delta - original) < np.linalg.norm(q - original)  # the SVD's best rank-4 fit
    # NF4 of Q is Q again, so the rewritten base saved and loaded in 4 bits is the model LoftQ fitted
    if bits == 4:
        again = _bnb.dequantize_4bit(_bnb.quantize_4bit(q, quant_type="nf4", blocksize=64))
        np.testing.assert_array_equal(again, q)


def test_loftq_base_saved_and_loaded_in_nf4_gives_the_adapted_model(checkpoint, tmp_path):
    """The LoftQ workflow: init on the float model, save the rewritten base and the adapter, load
    the base in NF4 with the adapter: the same logits as the float model LoftQ left."""
    path, _ = checkpoint
    config = peftjax.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights="loftq",
                                loftq_config={"loftq_bits": 4, "loftq_iter": 1})
    peft_model = peftjax.get_peft_model(models.from_pretrained(path), config)
    expected = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "loftq" and saved["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 1}
    assert peft.LoraConfig.from_pretrained(tmp_path / "adapter").loftq_config == saved["loftq_config"]
    peft_model.unload().save_pretrained(tmp_path / "base")  # Q in the targeted layers
    nf4 = peftjax.QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    quantized = models.from_pretrained(tmp_path / "base", quantization_config=nf4)
    reloaded = peftjax.PeftModel.from_pretrained(quantized, tmp_path / "adapter")
    # the targets' NF4 codes reproduce Q exactly; the other linears are quantized now too, so
    # compare with the float model holding their dequantized weights
    from peftjax.quantization import dequantize_model

    reference = peftjax.PeftModel.from_pretrained(dequantize_model(models.from_pretrained(
        tmp_path / "base", quantization_config=nf4)), tmp_path / "adapter")
    np.testing.assert_allclose(logits(reloaded), logits(reference), atol=1e-5)
    float_q = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    targeted = float_q.base_model.model.layers[0].self_attn.q_proj.kernel.get_value()
    np.testing.assert_array_equal(np.asarray(quantized.model.layers[0].self_attn.q_proj.kernel.get_value()),
                                  np.asarray(targeted))
    assert np.abs(logits(float_q) - expected).max() < 1e-5  # reloading on the float Q base: LoftQ is rerun, Q kept


def test_loftq_refusals():
    fields = _tiny.fields("llama")
    with pytest.raises(ValueError, match="`loftq_config` must be specified when `init_lora_weights` is 'loftq'"):
        peftjax.LoraConfig(init_lora_weights="loftq")
    with pytest.raises(ValueError, match=r"unknown keys \['bits'\]"):
        peftjax.LoraConfig(init_lora_weights="loftq", loftq_config={"bits": 4})
    with pytest.raises(ValueError, match="loftq_bits"):
        peftjax.LoftQConfig(loftq_bits=2)
    with pytest.warns(UserWarning, match="ignored when `init_lora_weights` is not 'loftq'"):
        assert peftjax.LoraConfig(loftq_config={"loftq_bits": 4}).loftq_config == {}
    model = models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **fields))
    loftq = dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})
    with pytest.raises(NotImplementedError, match="embed_tokens: init_lora_weights='loftq' is not supported on emb"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(target_modules=["embed_tokens"], **loftq))
    quantized = models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **fields))
    from peftjax.quantization import quantize_model

    quantize_model(quantized, peftjax.QuantizationConfig(load_in_4bit=True))
    with pytest.raises(TypeError, match="q_proj: init_lora_weights='loftq' quantizes the float base weight"):
        peftjax.get_peft_model(quantized, peftjax.LoraConfig(target_modules=["q_proj"], **loftq))


# ------------------------------------------------------------------------ PiSSA/OLoRA -> LoRA


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_decomposed_adapter_saved_as_lora_applies_to_the_original_base_in_peft(init, checkpoint, tmp_path):
    path, _ = checkpoint
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init)
    peft_model = peftjax.get_peft_model(models.from_pretrained(path), config)
    peft_model.save_pretrained(tmp_path / "initial")
    _tiny.train(peft_model, _tiny.batch(IDS, MASK), steps=3, dropout=False)
    trained = logits(peft_model)
    peft_model.save_pretrained(tmp_path / "as_lora", path_initial_model_for_weight_conversion=tmp_path / "initial")
    saved = json.loads((tmp_path / "as_lora" / "adapter_config.json").read_text())
    assert (saved["r"], saved["lora_alpha"], saved["init_lora_weights"]) == (8, 16, True)
    assert json.loads((tmp_path / "initial" / "adapter_config.json").read_text())["init_lora_weights"] is True
    valid = MASK.astype(bool)
    original = ARCH.torch_class.from_pretrained(path)  # untouched weights
    theirs = peft.PeftModel.from_pretrained(original, tmp_path / "as_lora").eval()
    np.testing.assert_allclose(torch_logits(theirs, input_ids=IDS, attention_mask=MASK)[valid], trained[valid],
                               atol=1e-4)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "as_lora")
    np.testing.assert_allclose(logits(ours)[valid], trained[valid], atol=1e-4)
    base = logits(models.from_pretrained(path))
    assert np.abs(trained - base)[valid].max() > 1e-3


def test_conversion_refusals(checkpoint, tmp_path):
    path, _ = checkpoint
    peft_model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, target_modules=["q_proj"], init_lora_weights="pissa"))
    other = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=4, target_modules=["v_proj"]))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match=r"other: the initial adapter lacks \['base_model.model.model.layers.0."
                                         r"self_attn.q_proj.lora_A.weight'"):
        peft_model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "other")
    assert not (tmp_path / "out").exists()
    for bad in (dict(init_lora_weights=False), dict(init_lora_weights="loftq", loftq_config={"loftq_bits": 4})):
        m = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=4, target_modules=["q_proj"],
                                                                                     **bad))
        m.save_pretrained(tmp_path / "init")
        with pytest.raises(ValueError, match="does not leave the base at W - s"):
            m.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
