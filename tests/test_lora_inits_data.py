"""LoRA's data-driven inits, EVA, CorDA, Astra and LoRA-GA, against HF PEFT 0.22's own
``initialize_lora_eva_weights``, ``preprocess_corda``, ``preprocess_astra`` and ``preprocess_loraga``
run in PyTorch on the same tiny models and the same calibration batches.

PEFT feeds CorDA one row per call (its hook squeezes a batch of one); peftjax takes batches of
several rows with padding and counts each row as one sample, so the oracle runs the rows one at a
time, unpadded. EVA's incremental PCA draws its randomized SVD's test matrix from torch's RNG,
which peftjax reproduces, so the ranks and components are PEFT's to float rounding, signs
included (both flip each component so its largest entry is positive).
"""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest

import _tiny
import peftjax
from _torch_models import lazy, torch_logits
from peftjax import models
from peftjax.tuners.base import named_modules

torch, peft = lazy("torch"), lazy("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
EVA = dict(rho=2.0, tau=0.9)


def calibration(seed: int = 0, rows: int = 16, seq: int = 16):
    """Two batches of ``rows // 2`` rows; row 3 right-padded, the first 2 labels of each row ignored."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, 96, (rows, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[3, seq - 5:] = 0
    ids[mask == 0] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[:, :2] = -100
    half = rows // 2
    return [{"input_ids": ids[i:i + half], "attention_mask": mask[i:i + half], "labels": labels[i:i + half]}
            for i in (0, half)]


BATCHES = calibration()
IDS = BATCHES[0]["input_ids"][:3, :9]


def torch_batches(batches):
    return [{k: torch.as_tensor(v) for k, v in b.items()} for b in batches]


def run_rows(torch_model, batches):
    """PEFT's CorDA ``run_model``: every row alone, without its padding."""
    def run():
        for b in batches:
            for ids, mask in zip(b["input_ids"], b["attention_mask"]):
                torch_model(input_ids=torch.as_tensor(ids[mask == 1][None]))
    return run


def logits(model, ids=IDS):
    return np.asarray(model(input_ids=ids).logits)


def lora_factors(peft_model):
    """``{path: (A [r, in], B [out, r], W [out, in])}`` in torch's layout."""
    from peftjax.tuners.lora import lora_layers

    return {n: (np.asarray(m.lora_A["default"].get_value()).T, np.asarray(m.lora_B["default"].get_value()).T,
                np.asarray(m.kernel.get_value()).T) for n, m in lora_layers(peft_model.base_model).items()}


def torch_factors(torch_peft, names):
    out = {}
    for n in names:
        m = torch_peft.base_model.model.get_submodule(n)
        w = m.base_layer.weight.detach().numpy()
        out[n] = (m.lora_A["default"].weight.detach().numpy(), m.lora_B["default"].weight.detach().numpy(),
                  w.T if m.fan_in_fan_out else w)
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _tiny.save(_tiny.arch("llama"), path)
    return path


GPT2 = _tiny.arch("gpt2", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # PEFT's LoRA-GA runs in train mode


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    _tiny.save(GPT2, path)
    return path


# ---------------------------------------------------------------------------------------- EVA


@pytest.fixture(scope="module")
def eva_pair(llama):
    """EVA by PEFT and by peftjax on the same model and batches: ``(theirs, ours)``."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny.arch("llama").torch_class.from_pretrained(llama).eval(), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva", eva_config=EvaConfig(**EVA)))
        initialize_lora_eva_weights(theirs, torch_batches(BATCHES), show_progress_bar=False)
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                                eva_config=peftjax.EvaConfig(**EVA))
    ours = peftjax.initialize_lora_eva_weights(peftjax.get_peft_model(models.from_pretrained(llama), config),
                                               BATCHES)
    return theirs, ours


def test_eva_ranks_and_components_equal_peft(eva_pair, llama):
    theirs, ours = eva_pair
    mine, peft_config = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == peft_config.rank_pattern and mine.rank_pattern  # ranks were redistributed
    assert mine.alpha_pattern == peft_config.alpha_pattern  # alpha * new_r / r (adjust_scaling_factors)
    assert set(mine.target_modules) == set(peft_config.target_modules)
    ours_f = lora_factors(ours)
    theirs_f = torch_factors(theirs, ours_f)
    for name, (a, b, _) in ours_f.items():
        assert a.shape == theirs_f[name][0].shape, name
        np.testing.assert_allclose(a, theirs_f[name][0], atol=1e-4, err_msg=name)
        assert not b.any()
    # B = 0: the model is the base model; the trainable count is PEFT's
    np.testing.assert_allclose(logits(ours), logits(models.from_pretrained(llama)), atol=1e-6)
    assert ours.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]


def test_eva_adapter_trained_here_loads_in_peft_and_peft_made_one_loads_here(eva_pair, llama, tmp_path, capsys):
    theirs, ours = eva_pair
    _tiny.train(ours, _tiny.batch(IDS), steps=3, dropout=False)
    ours.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["init_lora_weights"] == "eva" and saved["eva_config"] == theirs.peft_config["default"].to_dict()[
        "eva_config"]
    arch = _tiny.arch("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(arch.torch_class.from_pretrained(llama), tmp_path / "ours").eval()
    trained = logits(ours)
    np.testing.assert_allclose(torch_logits(loaded, input_ids=IDS), trained, atol=1e-5)
    assert np.abs(trained - logits(models.from_pretrained(llama))).max() > 1e-3
    # PEFT's EVA adapter, B randomised so that it does something, loads here with PEFT's logits
    with torch.no_grad():
        for m in theirs.modules():
            if hasattr(m, "lora_B") and "default" in getattr(m, "lora_B", {}):
                m.lora_B["default"].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    theirs.save_pretrained(tmp_path / "theirs")
    here = peftjax.PeftModel.from_pretrained(models.from_pretrained(llama), tmp_path / "theirs")
    np.testing.assert_allclose(logits(here), torch_logits(theirs.eval(), input_ids=IDS), atol=1e-5)
    from peftjax.cli import main

    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ours"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # the redistributed ranks, as the file holds them
    assert info["method"] == "LORA" and info["ranks_in_file"] == sorted({a.shape[0] for a, _, _ in
                                                                        lora_factors(ours).values()})
    assert info["parameters"] == ours.get_nb_trainable_parameters()[0]


def test_eva_state_dict_with_a_rank_0_layer_updates_model_and_config_as_peft(llama):
    """Given components (PEFT's ``eva_state_dict`` argument), a layer of rank 0 loses its adapter and
    the others take their new ranks; the config records it as PEFT's does."""
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    rng = np.random.RandomState(1)
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    components = {n: rng.randn(r, 32).astype(np.float32) for n, r in zip(names, [6, 0, 4, 2])}
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="eva")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny.arch("llama").torch_class.from_pretrained(llama), peft.LoraConfig(**kw))
        initialize_lora_eva_weights(theirs, eva_state_dict={
            "base_model.model." + n: torch.as_tensor(v) for n, v in components.items()})
        ours = peftjax.get_peft_model(models.from_pretrained(llama), peftjax.LoraConfig(**kw))
    peftjax.initialize_lora_eva_weights(ours, eva_state_dict=components)
    mine, reference = ours.peft_config["default"], theirs.peft_config["default"]
    assert mine.rank_pattern == reference.rank_pattern == {names[0]: 6, names[3]: 2}
    assert mine.alpha_pattern == reference.alpha_pattern == {names[0]: 12.0, names[3]: 4.0}
    assert set(mine.target_modules) == set(reference.target_modules) == {names[0], names[2], names[3]}
    factors = lora_factors(ours)
    assert sorted(factors) == sorted(reference.target_modules)
    for n in factors:
        np.testing.assert_array_equal(factors[n][0], components[n])
    assert not hasattr(ours.base_model.model.layers[0].self_attn.v_proj, "lora_A")
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()


def _eva_equals_peft(path, family: str, batches, **kw) -> list[str]:
    """EVA with ``kw`` on the tiny ``family`` model at ``path``, here and in PEFT on the same
    batches: the same rank pattern and components (``lora_A``); returns the adapted layers' names."""
    from peft.tuners.lora.config import EvaConfig
    from peft.tuners.lora.eva import initialize_lora_eva_weights

    kw = dict(r=4, lora_alpha=8, init_lora_weights="eva", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny.arch(family).torch_class.from_pretrained(path).eval(),
                                     peft.LoraConfig(**kw, eva_config=EvaConfig(**EVA)))
        initialize_lora_eva_weights(theirs, torch_batches(batches), show_progress_bar=False)
        ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
            **kw, eva_config=peftjax.EvaConfig(**EVA)))
    peftjax.initialize_lora_eva_weights(ours, batches)
    assert ours.peft_config["default"].rank_pattern == theirs.peft_config["default"].rank_pattern
    ours_f = lora_factors(ours)
    for name, (a, _, _) in ours_f.items():
        np.testing.assert_allclose(a, torch_factors(theirs, [name])[name][0], atol=1e-4, err_msg=name)
    return list(ours_f)


def test_eva_on_gpt2_conv1d_equals_peft(gpt2):
    _eva_equals_peft(gpt2, "gpt2", BATCHES, target_modules=["c_attn", "mlp.c_proj"])


def test_eva_on_a_bert_classifier_sees_every_position_of_the_last_layer(tmp_path):
    """peftjax's BERT classifier computes its last layer at the pooled rows only; EVA's calibration
    must see that layer's inputs at every position, as PEFT's hooks do: the same ranks and
    components as PEFT's on the last layer's query and feed-forward input."""
    _tiny.save(_tiny.arch("bert"), tmp_path)
    batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in BATCHES]
    names = _eva_equals_peft(tmp_path, "bert", batches, target_modules=["query", "intermediate.dense"],
                             task_type="SEQ_CLS")
    assert any(".layer.1." in n for n in names)  # the last layer's adapters are compared


def test_eva_and_corda_leave_out_a_multiple_choice_batch_s_padding(tmp_path):
    """A multiple-choice batch (``[rows, choices, tokens]``, a label per row) runs its layers on
    ``[rows * choices, tokens]``: its attention mask still leaves the padding out, so padding the
    choices further changes neither EVA's components nor CorDA's eigens."""
    _tiny.save(_tiny.arch("bert", "BertModel"), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new multiple-choice head
        model = models.from_pretrained(tmp_path, task_type="MULTIPLE_CHOICE")
    ids = np.random.RandomState(0).randint(1, 96, (2, 3, 8))
    tight = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": np.array([0, 2])}
    padded = {"input_ids": np.concatenate([ids, np.zeros((2, 3, 5), ids.dtype)], axis=-1),
              "attention_mask": np.concatenate([np.ones_like(ids), np.zeros((2, 3, 5), ids.dtype)], axis=-1),
              "labels": tight["labels"]}
    eva = peftjax.LoraConfig(r=2, target_modules=["query", "intermediate.dense"], init_lora_weights="eva",
                             eva_config=peftjax.EvaConfig(rho=1.0, tau=0.99))
    want, got = (peftjax.get_eva_state_dict(model, [b], eva) for b in (tight, padded))
    assert sorted(want) == sorted(got) and len(want) == 4
    for name in want:  # each component up to its sign
        np.testing.assert_allclose(np.abs(got[name]), np.abs(want[name]), atol=1e-4, err_msg=name)
    corda = peftjax.LoraConfig(r=2, target_modules=["query"], init_lora_weights="corda",
                               corda_config=peftjax.CordaConfig())
    want, got = (peftjax.preprocess_corda(model, corda, [{k: v for k, v in b.items() if k != "labels"}])
                 for b in (tight, padded))
    for name in want:
        np.testing.assert_allclose(got[name].S_WC, want[name].S_WC, rtol=1e-4, err_msg=name)


def test_eva_and_corda_on_an_encoder_decoder_read_the_encoder_s_layers_only(tmp_path):
    """An encoder-decoder's batch masks the encoder's tokens: its decoder's layers are refused by
    name, and its labels (the decoder's tokens) leave no encoder position out, even where they
    are as long as the inputs."""
    _tiny.save(_tiny.arch("t5"), tmp_path)
    model = models.from_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(3, 96, (4, 8))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    labels = np.random.RandomState(1).randint(3, 96, (4, 8))
    cut = labels.copy()
    cut[:, 4:] = -100  # a shorter target, as long as the source once padded
    for config in (peftjax.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights="eva", eva_config={}),
                   peftjax.LoraConfig(r=2, target_modules=["q", "v"], init_lora_weights="corda", corda_config={})):
        with pytest.raises(ValueError, match=r"decoder\.block\.0\.layer\.0\.SelfAttention\.q \(and 7 more decoder"):
            if config.init_lora_weights == "eva":
                peftjax.get_eva_state_dict(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}],
                                           config)
            else:
                peftjax.preprocess_corda(model, config, [{"input_ids": ids, "attention_mask": mask, "labels": labels}])
    encoder = peftjax.LoraConfig(r=2, target_modules=r"encoder\..*\.(q|v)", init_lora_weights="eva",
                                 eva_config=peftjax.EvaConfig(rho=1.0))
    full, short = (peftjax.get_eva_state_dict(model, [{"input_ids": ids, "attention_mask": mask, "labels": y}], encoder)
                   for y in (labels, cut))
    assert sorted(full) == sorted(short) and all(n.startswith("encoder.") for n in full) and len(full) == 4
    for name in full:
        np.testing.assert_allclose(short[name], full[name], atol=1e-6, err_msg=name)


def test_torch_randn_is_torchs():
    from peftjax.tuners.lora._eva import torch_randn

    for dtype, tdtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
        for shape in ((32, 16), (21, 3)):
            torch.manual_seed(42)
            expected = torch.randn(*shape, dtype=tdtype).numpy()
            np.testing.assert_allclose(torch_randn(42, shape, dtype), expected, atol=2e-6, rtol=0)


# -------------------------------------------------------------------------------------- CorDA


@pytest.mark.parametrize(("family", "method", "targets"), [
    ("llama", "kpm", TARGETS), ("gpt2", "ipm", ["c_attn", "mlp.c_proj"])])
def test_corda_factors_and_residual_equal_peft(family, method, targets, llama, gpt2, tmp_path):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    arch = _tiny.arch(family)
    path = llama if family == "llama" else gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = arch.torch_class.from_pretrained(path).eval()
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                                 corda_config=CordaConfig(corda_method=method))
        preprocess_corda(torch_model, config, run_model=run_rows(torch_model, BATCHES))
        theirs = peft.get_peft_model(torch_model, config)
    model = models.from_pretrained(path)
    original = {n: np.asarray(m.kernel.get_value()).T for n, m in named_modules(model).items()
                if hasattr(m, "kernel")}
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                                corda_config=peftjax.CordaConfig(corda_method=method))
    peftjax.preprocess_corda(model, config, BATCHES)
    ours = peftjax.get_peft_model(model, config)
    ours_f = lora_factors(ours)
    assert len(ours_f) == 2 * len(targets)
    theirs_f = torch_factors(theirs, ours_f)
    for name, (a, b, w) in ours_f.items():
        ta, tb, tw = theirs_f[name]
        sign = np.sign(np.sum(a * ta, axis=1))  # each SVD triplet's sign is the LAPACK's choice
        np.testing.assert_allclose(a * sign[:, None], ta, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(b * sign[None], tb, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(w, tw, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(w + 2.0 * b @ a, original[name], atol=1e-5, err_msg=name)  # s = 8 / 4
    np.testing.assert_allclose(logits(ours), logits(models.from_pretrained(path)), atol=1e-5)
    if family != "llama":
        return
    # PEFT's CorDA adapter, moved as training would move it and saved as a LoRA for the original
    # model by PEFT itself, loads here with PEFT's logits
    assert_peft_moved_as_lora_loads_here(theirs, ours_f, path, tmp_path)


def assert_peft_moved_as_lora_loads_here(theirs, names, path, tmp_path) -> None:
    """PEFT's adapter on a base its init rewrote (CorDA's, Astra's), its factors on ``names`` moved
    as training would move them and saved by PEFT as a LoRA of the original model
    (``path_initial_model_for_weight_conversion``), loads here on that model with PEFT's logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "init")
        with torch.no_grad():
            for name in names:
                layer = theirs.base_model.model.get_submodule(name)
                for factor in (layer.lora_A["default"], layer.lora_B["default"]):
                    noise = torch.randn(factor.weight.shape, generator=torch.Generator().manual_seed(1))
                    factor.weight.add_(0.05 * noise)
        theirs.save_pretrained(tmp_path / "as_lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    expected = torch_logits(theirs.eval(), input_ids=IDS)
    here = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "as_lora")
    np.testing.assert_allclose(logits(here), expected, atol=1e-4)
    assert np.abs(expected - logits(models.from_pretrained(path))).max() > 1e-3


def test_corda_trained_converts_to_a_lora_peft_applies_to_the_original_model(llama, tmp_path):
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda",
                                corda_config={"corda_method": "ipm", "cache_file": str(tmp_path / "cache.safetensors"),
                                              "covariance_file": str(tmp_path / "cov.safetensors")})
    model = models.from_pretrained(llama)
    eigens = peftjax.preprocess_corda(model, config, BATCHES)
    # the files stand in for the data: the same eigens again without batches
    again = peftjax.preprocess_corda(models.from_pretrained(llama), config)
    for name, e in eigens.items():
        np.testing.assert_array_equal(again[name].V_WC, e.V_WC)
    (tmp_path / "cache.safetensors").unlink()
    from_cov = peftjax.preprocess_corda(models.from_pretrained(llama), config)
    for name, e in eigens.items():
        np.testing.assert_allclose(np.abs(from_cov[name].S_WC), np.abs(e.S_WC), rtol=1e-6)
    ours = peftjax.get_peft_model(model, config)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "corda_eigens")  # used up
    ours.save_pretrained(tmp_path / "init")
    trained = train_and_convert_for_peft(ours, llama, tmp_path / "init", tmp_path / "as_lora")
    ours.merge_adapter()  # merged: the same model
    np.testing.assert_allclose(logits(ours), trained, atol=1e-5)
    assert np.abs(trained - logits(models.from_pretrained(llama))).max() > 1e-3


def train_and_convert_for_peft(ours, llama, initial, out) -> np.ndarray:
    """Trains ``ours`` (a decomposing init on the tiny Llama) three steps and saves it to ``out`` as a
    plain LoRA for the original model (``initial``: the adapter saved before training), which PEFT
    applies to the original Llama with the trained logits; returns them."""
    _tiny.train(ours, _tiny.batch(IDS), steps=3, dropout=False)
    trained = logits(ours)
    ours.save_pretrained(out, path_initial_model_for_weight_conversion=initial)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert (saved["r"], saved["init_lora_weights"]) == (2 * ours.peft_config["default"].r, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_tiny.arch("llama").torch_class.from_pretrained(llama), out).eval()
    np.testing.assert_allclose(torch_logits(theirs, input_ids=IDS), trained, atol=1e-4)
    return trained


# -------------------------------------------------------------------------------------- Astra


def run_batches(torch_model, batches):
    """PEFT's Astra ``run_model``: each batch as one call, padding and all (its hook reads every position)."""
    def run():
        for b in batches:
            torch_model(input_ids=torch.as_tensor(b["input_ids"]), attention_mask=torch.as_tensor(b["attention_mask"]))
    return run


@pytest.mark.parametrize(("family", "targets"), [("llama", TARGETS), ("gpt2", ["c_attn", "mlp.c_proj"])])
def test_astra_factors_and_residual_equal_peft(family, targets, llama, gpt2, tmp_path):
    """PEFT 0.22's ``preprocess_astra`` and ``astra_init`` on the same batches: each layer's
    eigenvectors (up to sign), ``B A`` and the residual base are PEFT's, and the adapted model is the
    base model; PEFT's Astra adapter, moved and saved by PEFT as a LoRA of the original model, loads
    here with PEFT's logits."""
    from peft.tuners.lora.astra import preprocess_astra
    from peft.tuners.lora.config import AstraConfig

    path = llama if family == "llama" else gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = _tiny.arch(family).torch_class.from_pretrained(path).eval()
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="astra",
                                 astra_config=AstraConfig())
        preprocess_astra(torch_model, config, run_model=run_batches(torch_model, BATCHES))
        theirs = peft.get_peft_model(torch_model, config)
    model = models.from_pretrained(path)
    original = {n: np.asarray(m.kernel.get_value()).T for n, m in named_modules(model).items()
                if hasattr(m, "kernel")}
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="astra",
                                astra_config=peftjax.AstraConfig())
    eigens = peftjax.preprocess_astra(model, config, BATCHES)
    ours = peftjax.get_peft_model(model, config)
    ours_f = lora_factors(ours)
    assert len(ours_f) == 2 * len(targets) and set(eigens) == set(ours_f)
    theirs_f = torch_factors(theirs, ours_f)
    for name, (a, b, w) in ours_f.items():
        ta, tb, tw = theirs_f[name]
        sign = np.sign(np.sum(b * tb, axis=0))  # each eigenvector's sign is the LAPACK's choice
        np.testing.assert_allclose(b * sign[None], tb, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(a * sign[:, None], ta, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(b @ a, tb @ ta, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(w, tw, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(w + 2.0 * b @ a, original[name], atol=1e-5, err_msg=name)  # s = 8 / 4
        assert np.abs(w - original[name]).max() > 1e-3  # the base was rewritten
    np.testing.assert_allclose(logits(ours), logits(models.from_pretrained(path)), atol=1e-5)
    if family != "llama":
        return
    assert_peft_moved_as_lora_loads_here(theirs, ours_f, path, tmp_path)


def test_astra_caches_converts_to_a_lora_peft_applies_and_refuses_by_name(llama, tmp_path):
    """The covariance and eigen files stand in for the data; the trained adapter saves as a LoRA
    of the original model that PEFT applies with the trained logits; what Astra cannot take is
    named before the model changes."""
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="astra",
                                astra_config={"cache_file": str(tmp_path / "cache.safetensors"),
                                              "covariance_file": str(tmp_path / "cov.safetensors")})
    model = models.from_pretrained(llama)
    eigens = peftjax.preprocess_astra(model, config, BATCHES)
    again = peftjax.preprocess_astra(models.from_pretrained(llama), config)  # from the cache, without batches
    for name, e in eigens.items():
        np.testing.assert_array_equal(again[name].V, e.V)
    (tmp_path / "cache.safetensors").unlink()
    from_cov = peftjax.preprocess_astra(models.from_pretrained(llama), config)
    for name, e in eigens.items():
        np.testing.assert_allclose(np.abs(from_cov[name].V), np.abs(e.V), atol=1e-6)
    ours = peftjax.get_peft_model(model, config)
    assert not hasattr(model.model.layers[0].self_attn.q_proj, "astra_eigens")  # used up
    ours.save_pretrained(tmp_path / "init")
    trained = train_and_convert_for_peft(ours, llama, tmp_path / "init", tmp_path / "as_lora")
    ours.merge_adapter()
    np.testing.assert_allclose(logits(ours), trained, atol=1e-5)

    fresh = models.from_pretrained(llama)
    plain = peftjax.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="astra", astra_config={})
    with pytest.raises(ValueError, match=r"down_proj: init_lora_weights='astra' needs the layer's eigens; run "
                                         r"peftjax.preprocess_astra"):
        peftjax.get_peft_model(fresh, plain)
    with pytest.raises(ValueError, match="`batches` must be given"):
        peftjax.preprocess_astra(fresh, plain)
    with pytest.raises(ValueError, match=r"v_proj: Astra requires `r` <= out_features but got r=20 for a layer "
                                         r"with 16 outputs"):
        peftjax.preprocess_astra(fresh, dataclasses.replace(plain, r=20), BATCHES)
    with pytest.raises(ValueError, match="`target_parameters` is not supported with Astra"):
        peftjax.LoraConfig(init_lora_weights="astra", target_parameters=["experts.down_proj"], astra_config={})
    with pytest.raises(ValueError, match="preprocess_astra needs a LoraConfig with init_lora_weights='astra'"):
        peftjax.preprocess_astra(fresh, peftjax.LoraConfig(target_modules=TARGETS), BATCHES)
    assert not any(hasattr(m, "astra_eigens") or hasattr(m, "lora_A") for m in named_modules(fresh).values())


# ------------------------------------------------------------------------------- config, refusals


def test_configs_round_trip_as_peft_writes_them(tmp_path):
    from peft.tuners.lora.config import CordaConfig, EvaConfig, LoraGAConfig

    for init, field, ours, theirs in (
        ("eva", "eva_config", peftjax.EvaConfig(rho=1.5, whiten=True), EvaConfig(rho=1.5, whiten=True)),
        ("corda", "corda_config", peftjax.CordaConfig(corda_method="kpm"), CordaConfig(corda_method="kpm")),
        ("lora_ga", "lora_ga_config", peftjax.LoraGAConfig(direction="ArBr", stable_gamma=4),
         LoraGAConfig(direction="ArBr", stable_gamma=4)),
    ):
        config = peftjax.LoraConfig(r=4, init_lora_weights=init, **{field: ours})
        config.save_pretrained(tmp_path / init)
        mine = json.loads((tmp_path / init / "adapter_config.json").read_text())[field]
        assert mine == peft.LoraConfig(r=4, init_lora_weights=init, **{field: theirs}).to_dict()[field]
        assert peft.LoraConfig.from_pretrained(tmp_path / init).to_dict()[field] == mine
        loaded = peftjax.PeftConfig.from_pretrained(tmp_path / init)
        assert (loaded.init_lora_weights, getattr(loaded, field)) == (init, getattr(config, field))
    with pytest.warns(UserWarning, match="Using default EVA config"):
        assert peftjax.LoraConfig(init_lora_weights="eva").eva_config == peftjax.EvaConfig().to_dict()
    with pytest.raises(ValueError, match=r"`eva_config` has unknown keys \['beta'\]"):
        peftjax.LoraConfig(init_lora_weights="eva", eva_config={"beta": 1})
    with pytest.raises(ValueError, match="`rho` must be >= 1.0"):
        peftjax.EvaConfig(rho=0.5)
    with pytest.raises(ValueError, match="corda_method"):
        peftjax.CordaConfig(corda_method="svd")
    with pytest.raises(ValueError, match="lora_ga_config.direction"):
        peftjax.LoraGAConfig(direction="BA")
    with pytest.raises(ValueError, match=r"`lora_ga_config` has unknown keys \['gamma'\]"):
        peftjax.LoraConfig(init_lora_weights="lora_ga", lora_ga_config={"gamma": 1})


def test_refusals_name_what_is_missing(llama):
    model = models.from_pretrained(llama)  # every refusal below leaves it as it was
    eva = peftjax.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="eva", eva_config={})
    plain = peftjax.get_peft_model(models.from_pretrained(llama), peftjax.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="can only be used with `init_lora_weights='eva'`"):
        peftjax.initialize_lora_eva_weights(plain, BATCHES)
    plain.delete_adapter("default")
    plain.add_adapter("eva", eva)
    with pytest.raises(ValueError, match="pass `batches`"):
        peftjax.initialize_lora_eva_weights(plain, adapter_name="eva")
    with pytest.raises(TypeError, match="not an iterator"):
        peftjax.initialize_lora_eva_weights(plain, iter(BATCHES), adapter_name="eva")
    with pytest.raises(ValueError, match="dataloader is empty"):
        peftjax.initialize_lora_eva_weights(plain, [], adapter_name="eva")
    for init, extra in (("eva", {"eva_config": {}}), ("corda", {"corda_config": {}})):
        with pytest.raises(NotImplementedError, match=f"embed_tokens: init_lora_weights='{init}' is not supported on "
                                                      "embeddings"):
            peftjax.get_peft_model(model, peftjax.LoraConfig(target_modules=["embed_tokens"], init_lora_weights=init,
                                                             **extra))
    import jax
    from flax import linen as nn

    from peftjax import linen

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(x)

    dense, x = Mlp(), np.ones((2, 4), np.float32)
    params = dense.init(jax.random.key(0), x)["params"]
    with pytest.raises(NotImplementedError, match="init_lora_weights='eva' is supported on NNX models .* not "
                                                  "through peftjax.linen"):
        linen.inject(dense, params, dataclasses.replace(eva, target_modules=("out",)), sample_args=(x,),
                     key=jax.random.key(1))
    corda = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="corda", corda_config={})
    with pytest.raises(ValueError, match=r"down_proj: init_lora_weights='corda' needs the layer's eigens; run "
                                         r"peftjax.preprocess_corda"):
        peftjax.get_peft_model(model, corda)
    with pytest.raises(ValueError, match="`batches` must be given"):
        peftjax.preprocess_corda(model, corda)
    assert not any(hasattr(m, "lora_A") or hasattr(m, "corda_eigens") for m in named_modules(model).values())
    peftjax.preprocess_corda(model, corda, BATCHES)
    with pytest.raises(ValueError, match=r"expected \(32, 2\)"):  # eigens for r=4, injected at r=2
        peftjax.get_peft_model(model, dataclasses.replace(corda, r=2))


# -------------------------------------------------------------------------------------- LoRA-GA


def peft_loraga(path, family, targets, r=8, **settings):
    """PEFT's ``preprocess_loraga`` (one backward pass per batch) then ``get_peft_model``:
    ``(peft model, {module: PEFT's averaged gradient [out, in]})`` (GPT-2's ``Conv1D`` keeps its
    weight's ``[in, out]``; transposed here)."""
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = _tiny.arch(family).torch_class.from_pretrained(path)
        config = peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                                 lora_ga_config=LoraGAConfig(**settings))

        def train_step():
            for b in torch_batches(BATCHES):
                torch_model(**b).loss.backward()

        preprocess_loraga(torch_model, config, train_step)
        from transformers.pytorch_utils import Conv1D

        grads = {n: m._peft_loraga_grad.numpy().T if isinstance(m, Conv1D) else m._peft_loraga_grad.numpy()
                 for n, m in torch_model.named_modules() if hasattr(m, "_peft_loraga_grad")}  # as [out, in]
        return peft.get_peft_model(torch_model, config).eval(), grads


# r = 8 makes the randomized SVD (4r wide) span every layer's smaller side, so both frameworks'
# triplets are exact up to sign; "weight_svd" scales by a 4-wide randomized SVD of the weight
@pytest.mark.parametrize(("family", "direction", "scale", "atol"), [
    ("llama", "ArB2r", "stable", 1e-4), ("llama", "A2rBr", "gd_scale", 1e-4), ("gpt2", "ArBr", "weight_svd", 2e-2)])
def test_loraga_gradients_factors_and_residual_equal_peft(family, direction, scale, atol, llama, gpt2):
    path = llama if family == "llama" else gpt2
    targets = TARGETS if family == "llama" else ["c_attn", "mlp.c_proj"]
    theirs, their_grads = peft_loraga(path, family, targets, direction=direction, scale=scale)
    model = models.from_pretrained(path)
    original = {n: np.asarray(m.kernel.get_value()).T for n, m in named_modules(model).items()
                if hasattr(m, "kernel")}
    config = peftjax.LoraConfig(r=8, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                                lora_ga_config=peftjax.LoraGAConfig(direction=direction, scale=scale))
    grads = peftjax.preprocess_loraga(model, config, BATCHES)
    assert grads.keys() == their_grads.keys() and len(grads) == 2 * len(targets)
    for name, g in grads.items():
        np.testing.assert_allclose(g, their_grads[name], atol=1e-6 * np.abs(g).max(), rtol=0, err_msg=name)
    ours = peftjax.get_peft_model(model, config)
    assert not any(hasattr(m, "loraga_grad") for m in named_modules(model).values())  # used up
    ours_f = lora_factors(ours)
    theirs_f = torch_factors(theirs, ours_f)
    for name, (a, b, w) in ours_f.items():
        ta, tb, tw = theirs_f[name]
        sign_a = np.sign(np.sum(a * ta, axis=1))  # a triplet's sign is the randomized SVD's draw
        sign_b = np.sign(np.sum(b * tb, axis=0))
        np.testing.assert_allclose(a * sign_a[:, None], ta, atol=atol * np.abs(ta).max(), rtol=0, err_msg=name)
        np.testing.assert_allclose(b * sign_b[None], tb, atol=atol * np.abs(tb).max(), rtol=0, err_msg=name)
        np.testing.assert_allclose(w + b @ a, original[name], atol=1e-5, err_msg=name)  # s = 8 / 8
    base = logits(models.from_pretrained(path))
    np.testing.assert_allclose(logits(ours), base, atol=1e-5)  # the base keeps W - s B A


def test_loraga_random_direction_pairs_each_vector_with_its_own_triplet(llama):
    """``"random"`` draws which ``r`` of the ``2r`` triplets both factors take (from the init key here,
    torch's RNG in PEFT): with ``scale="unit"``, ``G A^T = B``, each of ``A``'s rows the right
    singular vector of ``B``'s column, and a different key draws another set."""
    def factors(key):
        model = models.from_pretrained(llama)
        config = peftjax.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="lora_ga",
                                    lora_ga_config={"direction": "random", "scale": "unit"})
        grads = peftjax.preprocess_loraga(model, config, BATCHES)
        return grads, lora_factors(peftjax.get_peft_model(model, config, key=key))

    grads, ours = factors(None)
    for name, (a, b, _) in ours.items():
        np.testing.assert_allclose(grads[name] @ a.T, b, atol=1e-3 * np.abs(b).max(), rtol=0, err_msg=name)
    picked = lambda fs: [sorted(np.round(np.linalg.norm(b, axis=0), 4)) for _, b, _ in fs.values()]  # noqa: E731
    import jax

    assert any(x != y for x, y in zip(picked(ours), picked(factors(jax.random.key(7))[1])))


def test_loraga_converts_to_a_lora_both_ways_and_caches_its_gradients(llama, tmp_path):
    """PEFT's LoRA-GA adapter, moved as training would and saved by PEFT as a LoRA for the original
    model, loads here with PEFT's logits, and so does its LoRA-GA file on the residual base PEFT's
    model kept; one trained here converts and loads in PEFT likewise. The
    gradients cached in ``cache_file`` stand in for the data; PEFT's own (torch pickle) is refused."""
    theirs, _ = peft_loraga(llama, "llama", TARGETS, r=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "init")
        with torch.no_grad():
            for name, m in theirs.base_model.model.named_modules():
                if hasattr(m, "lora_A") and "default" in m.lora_A:
                    for factor in (m.lora_A["default"], m.lora_B["default"]):
                        factor.weight.add_(0.05 * torch.randn(factor.weight.shape,
                                                              generator=torch.Generator().manual_seed(1)))
        theirs.save_pretrained(tmp_path / "moved")  # a LoRA-GA file, for the residual base
        theirs.save_pretrained(tmp_path / "as_lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    expected = torch_logits(theirs.eval(), input_ids=IDS)
    here = peftjax.PeftModel.from_pretrained(models.from_pretrained(llama), tmp_path / "as_lora")
    np.testing.assert_allclose(logits(here), expected, atol=1e-4)
    assert np.abs(expected - logits(models.from_pretrained(llama))).max() > 1e-3
    with warnings.catch_warnings():  # PEFT's file as it is, on the residual base PEFT's model kept
        warnings.simplefilter("ignore")
        theirs.unload().save_pretrained(tmp_path / "residual")
    on_residual = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "residual"), tmp_path / "moved")
    assert on_residual.peft_config["default"].init_lora_weights == "lora_ga"
    np.testing.assert_allclose(logits(on_residual), expected, atol=1e-4)

    cache = tmp_path / "grads.safetensors"
    config = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                                lora_ga_config=peftjax.LoraGAConfig())
    model = models.from_pretrained(llama)
    grads = peftjax.preprocess_loraga(model, config, BATCHES, cache_file=str(cache))
    again = peftjax.preprocess_loraga(models.from_pretrained(llama), config, cache_file=str(cache))  # no data
    assert all(np.array_equal(again[n], g) for n, g in grads.items())
    torch.save({f"{n}._peft_loraga_grad": torch.from_numpy(g) for n, g in grads.items()}, tmp_path / "peft.pt")
    with pytest.raises(ValueError, match=r"cache_file='.*peft.pt' is not a safetensors file"):
        peftjax.preprocess_loraga(models.from_pretrained(llama), config, cache_file=str(tmp_path / "peft.pt"))
    ours = peftjax.get_peft_model(model, config)
    ours.save_pretrained(tmp_path / "ours_init")
    train_and_convert_for_peft(ours, llama, tmp_path / "ours_init", tmp_path / "ours_as_lora")


def test_data_driven_inits_on_scanned_layers_equal_the_unscanned_model(llama):
    """``scan_layers=True``: LoRA-GA's gradients, CorDA's eigens and EVA's components are the
    unscanned model's (the layers run as a loop for the calibration), kept stacked with the layers
    until ``get_peft_model`` uses them up, and the adapted models give the same logits. EVA's rank
    redistribution, which gives the layers different ranks, is refused there by name."""
    from flax import nnx

    loraga = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="lora_ga",
                                lora_ga_config={})
    corda = dataclasses.replace(loraga, init_lora_weights="corda", lora_ga_config=None, corda_config={})
    for config, preprocess in ((loraga, peftjax.preprocess_loraga), (corda, peftjax.preprocess_corda)):
        plain, scanned = models.from_pretrained(llama), models.from_pretrained(llama, scan_layers=True)
        ours, stacked = preprocess(plain, config, BATCHES), preprocess(scanned, config, BATCHES)
        assert stacked.keys() == ours.keys()
        for n, x in ours.items():
            for a, b in zip(np.atleast_1d(x) if isinstance(x, np.ndarray) else x, stacked[n]):
                np.testing.assert_allclose(np.abs(a), np.abs(b), atol=1e-6, err_msg=n)
        ours, theirs = peftjax.get_peft_model(plain, config), peftjax.get_peft_model(scanned, config)
        leftovers = [k for k, _ in nnx.to_flat_state(nnx.state(theirs.base_model)) if "loraga" in str(k) or
                     "corda" in str(k)]
        assert not leftovers  # used up
        np.testing.assert_allclose(logits(theirs), logits(ours), atol=1e-5)
        np.testing.assert_allclose(logits(theirs), logits(models.from_pretrained(llama)), atol=1e-5)
    eva = peftjax.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="eva", eva_config=dict(EVA, rho=1.0))
    plain = peftjax.initialize_lora_eva_weights(peftjax.get_peft_model(models.from_pretrained(llama), eva), BATCHES)
    scanned = peftjax.initialize_lora_eva_weights(
        peftjax.get_peft_model(models.from_pretrained(llama, scan_layers=True), eva), BATCHES)
    np.testing.assert_allclose(logits(scanned), logits(plain), atol=1e-5)
    uneven = peftjax.get_peft_model(models.from_pretrained(llama, scan_layers=True),
                                    dataclasses.replace(eva, eva_config=dict(EVA)))
    with pytest.raises(ValueError, match="EVA gave the layers of a scan_layers=True model different ranks"):
        peftjax.initialize_lora_eva_weights(uneven, BATCHES)


def test_loraga_estimates_with_the_model_s_dropout_only_under_a_key():
    """PEFT estimates in train mode; here the model's own dropout runs under ``key`` (the same key,
    the same gradients), and without one the estimate is deterministic."""
    import jax

    model = models.GPT2LMHeadModel.from_config(models.ModelConfig("gpt2", **_tiny.fields("gpt2")))
    assert model.config.resid_pdrop > 0
    config = peftjax.LoraConfig(r=2, target_modules=["c_attn"], init_lora_weights="lora_ga", lora_ga_config={})
    plain = [peftjax.preprocess_loraga(model, config, BATCHES) for _ in range(2)]
    keyed = [peftjax.preprocess_loraga(model, config, BATCHES, key=jax.random.key(k)) for k in (0, 0, 1)]
    for n in plain[0]:
        np.testing.assert_array_equal(plain[0][n], plain[1][n])
        np.testing.assert_array_equal(keyed[0][n], keyed[1][n])
        assert np.abs(keyed[0][n] - plain[0][n]).max() > 1e-4 and np.abs(keyed[0][n] - keyed[2][n]).max() > 1e-4


def test_loraga_refusals_and_peft_s_embedding_fallback(llama):
    """What PEFT refuses (no ``lora_ga_config``, a quantized target) and what peftjax refuses where
    PEFT would go on wrong: no gradient left by ``preprocess_loraga`` (PEFT silently falls back to
    a plain LoRA), ``2r`` past a layer's smaller side (PEFT builds factors of the wrong shape),
    Linen. An embedding among the targets takes PEFT's default embedding init."""
    model = models.from_pretrained(llama)
    config = peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
                                lora_ga_config={})
    with pytest.raises(ValueError, match="lora_ga_config=LoraGAConfig"):
        peftjax.preprocess_loraga(model, peftjax.LoraConfig(init_lora_weights="lora_ga"), BATCHES)
    with pytest.raises(ValueError, match=r"q_proj: init_lora_weights='lora_ga' needs the layer's gradient; run "
                                         r"peftjax.preprocess_loraga"):
        peftjax.get_peft_model(model, config)
    with pytest.raises(ValueError, match="`batches` is empty"):
        peftjax.preprocess_loraga(model, config, [])
    quantized = models.from_pretrained(llama, quantization_config=peftjax.QuantizationConfig(load_in_8bit=True))
    with pytest.raises(ValueError, match="LoRA-GA does not support quantized models. Found quantized module: "):
        peftjax.preprocess_loraga(quantized, config, BATCHES)
    peftjax.preprocess_loraga(model, config, BATCHES)
    with pytest.raises(ValueError, match=r"v_proj: LoRA-GA splits the top 2r singular vectors .* got r=9 for a layer "
                                         r"with weight shape \(16, 32\) \(max usable r is 8\)"):
        peftjax.get_peft_model(model, dataclasses.replace(config, r=9))
    assert all(hasattr(m, "loraga_grad") and not hasattr(m, "lora_A")  # nothing changed, nothing used up
               for n, m in named_modules(model).items() if n.endswith(("q_proj", "v_proj")))

    with_embedding = dataclasses.replace(config, target_modules=("embed_tokens", "q_proj", "v_proj"))
    peft_model = peftjax.get_peft_model(model, with_embedding)
    embed = peft_model.base_model.model.embed_tokens
    assert not np.asarray(embed.lora_A["default"].get_value()).any()  # PEFT's embedding default: A zero, B normal
    assert 0.5 < np.asarray(embed.lora_B["default"].get_value()).std() < 2.0
    from peft.tuners.lora.config import LoraGAConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny.arch("llama").torch_class.from_pretrained(llama), peft.LoraConfig(
            r=4, target_modules=["embed_tokens"], init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig()))
    assert not theirs.base_model.model.model.embed_tokens.lora_embedding_A["default"].detach().numpy().any()

    import jax
    from flax import linen as nn

    from peftjax import linen

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(x)

    x = np.ones((2, 4), np.float32)
    params = Mlp().init(jax.random.key(0), x)["params"]
    with pytest.raises(NotImplementedError, match="init_lora_weights='lora_ga' is supported on NNX models"):
        linen.inject(Mlp(), params, dataclasses.replace(config, target_modules=("out",)), sample_args=(x,),
                     key=jax.random.key(1))
