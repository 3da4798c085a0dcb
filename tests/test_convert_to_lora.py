"""Any additive adapter as a plain LoRA (``peftjax.convert_to_lora`` / ``save_as_lora``), against HF
PEFT 0.22.0's own ``convert_to_lora`` on the same adapter and against the adapter it came from."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

import _tiny
import peftjax
from _torch_models import lazy, padded_batch, torch_logits
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")

ARCH = _tiny.arch("llama")
IDS, MASK = padded_batch(96, seq=6)
VALID = MASK.astype(bool)


@pytest.fixture(scope="module")
def loha(tmp_path_factory):
    """A LoHa adapter PEFT made (random factors, a saved head copy is not involved), loaded both sides."""
    root = tmp_path_factory.mktemp("loha")
    _tiny.save(ARCH, root / "base")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(ARCH.torch_class.from_pretrained(root / "base"), peft.LoHaConfig(
            r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)).eval()
    theirs.save_pretrained(root / "adapter")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(root / "base"), root / "adapter")
    return root, theirs, ours


def logits(model):
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


@pytest.mark.parametrize("rank", [3, 0.9])
def test_loha_converts_as_peft_converts(loha, rank):
    _, theirs, ours = loha
    config, tensors, errors = peftjax.convert_to_lora(ours, rank)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their_config, their_tensors = peft.convert_to_lora(theirs, rank)
    assert set(tensors) == set(their_tensors)
    for key in (k for k in tensors if ".lora_A." in k):  # the same truncated ΔW (factors differ by signs)
        b = key.replace(".lora_A.", ".lora_B.")
        ours_delta = tensors[b] @ tensors[key]
        np.testing.assert_allclose(ours_delta, (their_tensors[b] @ their_tensors[key]).numpy(), atol=1e-5)
    # the same ranks per layer, whether fixed or chosen by the energy threshold
    theirs_r = {n: their_config.rank_pattern.get(n, their_config.r) for n in errors}
    assert {n: config.rank_pattern.get(n, config.r) for n in errors} == theirs_r
    assert all(0 < e < 1 for e in errors.values())


def test_full_rank_lora_equals_the_adapter_here_and_in_peft(loha, tmp_path):
    root, theirs, ours = loha
    errors = peftjax.save_as_lora(tmp_path, ours, rank=1.0)  # all the energy: each layer's full rank
    assert max(errors.values()) < 1e-5
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] >= 16  # LoHa r=4: ΔW rank 16
    assert saved["rank_pattern"] == saved["alpha_pattern"]
    converted = peftjax.PeftModel.from_pretrained(models.from_pretrained(root / "base"), tmp_path)
    np.testing.assert_allclose(logits(converted)[VALID], logits(ours)[VALID], atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(ARCH.torch_class.from_pretrained(root / "base"), tmp_path).eval()
    np.testing.assert_allclose(torch_logits(in_peft, input_ids=IDS, attention_mask=MASK)[VALID],
                               torch_logits(theirs, input_ids=IDS, attention_mask=MASK)[VALID], atol=1e-5)


def test_vera_and_a_classifier_head_convert_which_peft_cannot(tmp_path):
    """VeRA is additive too (PEFT has no conversion for it): at full rank the LoRA is the same
    model, and ``modules_to_save`` copies travel unchanged."""
    spec = _tiny.arch("llama", "LlamaForSequenceClassification", num_labels=3)
    model = models.LlamaForSequenceClassification.from_config(models.ModelConfig("llama", **dict(
        spec.overrides), **_tiny.fields("llama")))
    vera = peftjax.get_peft_model(model, peftjax.VeraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            task_type="SEQ_CLS"))
    _tiny.train(vera, _tiny.batch(IDS, MASK, task="SEQ_CLS", labels=(0, 2, 1)), steps=2, dropout=False)
    config, tensors, errors = peftjax.convert_to_lora(vera, rank=16)
    assert max(errors.values()) < 1e-5 and "score" in config.modules_to_save
    assert "base_model.model.score.weight" in tensors
    peftjax.save_as_lora(tmp_path, vera, rank=16)
    fresh = models.LlamaForSequenceClassification.from_config(models.ModelConfig("llama", **dict(
        spec.overrides), **_tiny.fields("llama")))
    converted = peftjax.PeftModel.from_pretrained(fresh, tmp_path)
    np.testing.assert_allclose(logits(converted), logits(vera), atol=1e-5)


def test_what_is_not_a_weight_delta_is_refused():
    model = models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **_tiny.fields("llama")))
    ia3 = peftjax.get_peft_model(model, peftjax.IA3Config(target_modules=["k_proj", "down_proj"],
                                                          feedforward_modules=["down_proj"]))
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.k_proj \(IA3Linear"):
        peftjax.convert_to_lora(ia3, rank=2)
    shira = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(models.ModelConfig(
        "llama", **_tiny.fields("llama"))), peftjax.ShiraConfig(r=1, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj \(SHiRA"):  # as PEFT: not for SHiRA
        peftjax.convert_to_lora(shira, rank=2)
    sparse = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(models.ModelConfig(
        "llama", **_tiny.fields("llama"))), peftjax.SupertuningConfig(sparsity=0.9, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj \(Supertuning"):  # nor Super-Tuning
        peftjax.convert_to_lora(sparse, rank=2)
    for config in (peftjax.BeftConfig(target_modules=["v_proj"]), peftjax.PeanutConfig(r=2, target_modules=["q_proj"]),
                   peftjax.GloraConfig(r=2, target_modules=["q_proj"])):  # PEFT 0.22 converts none of them
        other = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(models.ModelConfig(
            "llama", **_tiny.fields("llama"))), config)
        with pytest.raises(TypeError, match="not a weight delta a LoRA can carry"):
            peftjax.convert_to_lora(other, rank=2)
    lora = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(models.ModelConfig(
        "llama", **_tiny.fields("llama"))), peftjax.LoraConfig(r=2, target_modules=["q_proj"]))
    for bad, err in ((0, ValueError), (1.5, ValueError), ("4", TypeError), (64, ValueError)):
        with pytest.raises(err, match="rank"):
            peftjax.convert_to_lora(lora, bad)


def test_adalora_converts_exactly_at_full_rank():
    """AdaLoRA's ``B (A ⊙ E) / (ranknum + 1e-5)`` is a weight delta too (its E set away from zero)."""
    import jax

    model = models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **_tiny.fields("llama")))
    ada = peftjax.get_peft_model(model, peftjax.AdaLoraConfig(init_r=4, target_r=2, total_step=10,
                                                              target_modules=["q_proj", "v_proj"]))
    from peftjax.tuners.adalora import AdaLoraLayer

    for i, layer in enumerate(m for m in peftjax.tuners.base.named_modules(ada.base_model).values()
                              if isinstance(m, AdaLoraLayer)):
        e = layer.lora_E["default"]
        e.set_value(jax.random.normal(jax.random.key(i), e.get_value().shape))
    config, tensors, errors = peftjax.convert_to_lora(ada, rank=4)
    assert max(errors.values()) < 1e-5 and config.r == 4
    ids = np.asarray(IDS)
    converted = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(models.ModelConfig(
        "llama", **_tiny.fields("llama"))), config)
    peftjax.set_peft_model_state_dict(converted, tensors)
    np.testing.assert_allclose(np.asarray(converted(input_ids=ids).logits), np.asarray(ada(input_ids=ids).logits),
                               atol=1e-5)
    assert np.abs(np.asarray(ada(input_ids=ids).logits) - np.asarray(model_logits_base(ids))).max() > 1e-3


def model_logits_base(ids):
    return models.LlamaForCausalLM.from_config(models.ModelConfig("llama", **_tiny.fields("llama")))(input_ids=ids).logits


FULL_RANK = ("RandLoraConfig", "OFTConfig", "BOFTConfig", "DeftConfig")


@pytest.mark.parametrize(("method", "fields"), [("MissConfig", dict(r=4, init_weights=False)),
                                               ("MissConfig", dict(r=8, init_weights="bat")),
                                               ("DeloraConfig", dict(r=4, init_weights=False)),
                                               ("C3AConfig", dict(block_size=8)),
                                               ("GraloraConfig", dict(r=4, gralora_k=2, init_weights=False)),
                                               ("RandLoraConfig", dict(r=8, randlora_alpha=8, init_weights=False)),
                                               ("VBLoRAConfig", dict(r=4, num_vectors=16, vector_length=8)),
                                               ("WaveFTConfig", dict(n_frequency=40, wavelet_family="db3")),
                                               ("PacaConfig", dict(r=4, init_weights=False)),
                                               ("OFTConfig", dict(oft_block_size=8, r=0, init_weights=False)),
                                               ("BOFTConfig", dict(boft_block_size=8, init_weights=False)),
                                               ("DeftConfig", dict(r=4, init_weights=False))],
                         ids=["miss-balance", "miss-bat", "delora", "c3a", "gralora", "randlora", "vblora", "waveft",
                              "paca", "oft", "boft", "deft"])
def test_newer_methods_convert_to_the_update_peft_converts_to(method, fields, tmp_path):
    """PEFT writes MiSS's balance update as its exact rank-r factors and SVDs the others (bat,
    DeLoRA, C3A's block-circulant update, GraLoRA's blocks, RandLoRA's full-rank one, WaveFT's wavelet
    update, PaCA's columns, and PEFT 0.22's OFT, BOFT and DEFT from the merged weight, ``W' - W``);
    here all go through the SVD: the
    products agree (balance, DeLoRA and GraLoRA's rank-8 update exactly, bat and C3A truncated alike)."""
    _tiny.save(ARCH, tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(ARCH.torch_class.from_pretrained(tmp_path / "base"), getattr(peft, method)(
            target_modules=["q_proj", "down_proj"], **fields)).eval()
        torch.manual_seed(0)
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path / "adapter")
        their_config, their_tensors = peft.convert_to_lora(theirs, 8)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    config, tensors, errors = peftjax.convert_to_lora(ours, 8)
    assert set(tensors) == set(their_tensors)
    for key in (k for k in tensors if ".lora_A." in k):
        b = key.replace(".lora_A.", ".lora_B.")
        np.testing.assert_allclose(tensors[b] @ tensors[key], (their_tensors[b] @ their_tensors[key]).numpy(),
                                   atol=1e-5)
    if fields.get("init_weights") is False and method not in FULL_RANK:  # rank 8 >= the update's rank
        # (RandLoRA's, OFT's, BOFT's and DEFT's updates are full-rank: truncated, not exact)
        assert max(errors.values()) < 1e-5
        peftjax.save_as_lora(tmp_path / "lora", ours, rank=8)
        converted = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "lora")
        np.testing.assert_allclose(logits(converted)[VALID], logits(ours)[VALID], atol=1e-5)
    if method in ("OFTConfig", "BOFTConfig", "DeftConfig"):  # read from the merged weight: the layers put back
        unmerged = logits(ours)
        peftjax.convert_to_lora(ours, 8)
        np.testing.assert_array_equal(logits(ours), unmerged)
        ours.merge_adapter()
        with pytest.raises(ValueError, match="has merged adapters .'default'.; unmerge them first"):
            peftjax.convert_to_lora(ours, 8)
