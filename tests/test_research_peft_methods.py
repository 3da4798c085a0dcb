"""BEFT, GLoRA, DEFT, PEANuT, Super-Tuning, Uni-LoRA, PVeRA, OSF, LiLy, TinyLoRA and WaveFT (PEFT 0.22.0's
newer research methods) against HF PEFT + PyTorch on Llama, BERT and GPT-2, both ways. Their identity
starts, refusals, settings checks and scanned layers are tested with the other methods'
(``test_newer_peft_methods.py``).

- BEFT: a trained output bias on the value projections (PEFT's default targets); merged into the
  layer's bias, refused (as PEFT refuses it) where the layer has none.
- GLoRA: the weight and bias scaled and shifted by low-rank, vector, constant or zero terms (the
  zero terms saved, as PEFT saves them); mixed batches, as PEFT serves them.
- DEFT: a subspace of the output replaced, ``relu`` and ``qr`` projections (the QR with torch's
  signs), the identity start taken from the weight, PaRa on GPT-2's ``Conv1D``.
- PEANuT: an update computed from the frozen weight by a small network with skip connections.
- Uni-LoRA: every factor entry of every layer read from one trained vector (one variable), at
  positions PEFT's seeded shuffle assigns in transformers' module order, which a loaded model (its
  attributes sorted by NNX) still follows: files without the positions load.
- LiLy: low-rank projections shared across layers (``A`` by blocks of layers, ``B`` by all),
  mixed by per-layer routers averaged over the batch; it does not merge, as in PEFT.
- TinyLoRA: a frozen truncated SVD around ``sum_i v_i P_i``, the vectors shared by groups of
  layers numbered in transformers' module order; files without ``P`` load (torch's normal draws
  reproduced).
- OSF: the trailing singular subspace of each weight trained, its gradients projected orthogonal
  to the frozen leading one as PEFT's hooks project them; every linear layer by default.
- Super-Tuning: trained values at the weight's largest (or smallest) entries, with and without the
  Supra LoRA; files without the positions load (they are chosen again, PEFT's own order).
- WaveFT: a few trained coefficients of the update's 2-D wavelet transform (Daubechies, symlet and
  coiflet filters), at PEFT's unsaved seeded positions; per-module and proportional counts; the
  coefficients as the update itself (``use_idwt=False``).
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _method_cases import ARCHS, IDS, LLAMA, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch, torch
from _method_cases import torch_base
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.tuners.base import adapter_layers


# case -> (config class, arch, fields, how it trains: False, the functional core with the base
# model's dropout; "no dropout": without it (GPT-2's 0.1 moves the loss more than three steps of
# these small updates do; PVeRA: no key, so its mean)); the BERT cases are classifiers on PEFT's
# default targets, the head saved
CASES = {
    "beft-bert": ("BeftConfig", "bert", dict(), False),
    "glora-llama": ("GloraConfig", "llama", dict(r=2, target_modules=LLAMA), False),
    "glora-bert-vectors": ("GloraConfig", "bert", dict(config_A_B="vector", config_C="vector", config_D_E="vector",
                                                       init_weights=False), False),
    "glora-bert-constants": ("GloraConfig", "bert", dict(r=2, config_A_B="constant", config_D_E="constant",
                                                         bias="glora_only"), False),
    "deft-llama": ("DeftConfig", "llama", dict(r=4, deft_dropout=0.1, target_modules=LLAMA), False),
    "deft-bert-qr-alpha": ("DeftConfig", "bert", dict(r=2, decomposition_method="qr", alpha=4, init_weights=False,
                                                      bias="deft_only"), False),
    "deft-gpt2-para": ("DeftConfig", "gpt2", dict(r=2, para=True), "no dropout"),
    "peanut-llama": ("PeanutConfig", "llama", dict(r=4, depth=2, act_fn="gelu", target_modules=LLAMA), False),
    "peanut-bert": ("PeanutConfig", "bert", dict(r=4, scaling=2.0, init_weights=False), False),
    "supertuning-llama": ("SupertuningConfig", "llama", dict(sparsity=0.9, target_modules=LLAMA), False),
    "supertuning-bert-supra-bottom": ("SupertuningConfig", "bert", dict(sparsity=0.8, select_top=False, r=2,
                                                                        lora_dropout=0.1), False),
    "supertuning-llama-unsaved": ("SupertuningConfig", "llama", dict(sparsity=0.95, save_precomputed_indices=False,
                                                                     target_modules=LLAMA), False),
    "unilora-llama": ("UniLoraConfig", "llama", dict(r=2, theta_d_length=64, target_modules=LLAMA), False),
    "unilora-bert-saved": ("UniLoraConfig", "bert", dict(r=2, theta_d_length=50, save_indices=True,
                                                         unilora_dropout=0.1, proj_seed=3), False),
    "unilora-gpt2": ("UniLoraConfig", "gpt2", dict(r=2, theta_d_length=128, init_weights=False), "no dropout"),
    "pvera-llama": ("PveraConfig", "llama", dict(r=4, target_modules=LLAMA), "no dropout"),  # no key: the mean
    "pvera-bert-unsaved": ("PveraConfig", "bert", dict(r=8, save_projection=False, pvera_dropout=0.1), False),
    "pvera-gpt2": ("PveraConfig", "gpt2", dict(r=4, init_weights=False), "no dropout"),
    "osf-llama": ("OSFConfig", "llama", dict(effective_rank=8, target_modules=LLAMA), False),
    "osf-bert-all-linear": ("OSFConfig", "bert", dict(effective_rank=0.5, rank_pattern={"value": 12}), False),
    "tinylora-llama-tied": ("TinyLoraConfig", "llama", dict(r=2, u=16, weight_tying=0.5, target_modules=LLAMA),
                            False),
    "tinylora-bert-unsaved": ("TinyLoraConfig", "bert", dict(r=2, u=8, save_projection=False, tinylora_dropout=0.1),
                              False),
    "tinylora-gpt2": ("TinyLoraConfig", "gpt2", dict(r=3, u=4, init_weights="uniform"), "no dropout"),
    "waveft-llama-db2": ("WaveFTConfig", "llama", dict(n_frequency=48, wavelet_family="db2", target_modules=LLAMA,
                                                       n_frequency_pattern={"down_proj": 20}), False),
    "waveft-bert-sym4-proportional": ("WaveFTConfig", "bert", dict(n_frequency=40, wavelet_family="sym4",
                                                                   proportional_parameters=True,
                                                                   bias="waveft_only"), False),
    "waveft-gpt2-coif2": ("WaveFTConfig", "gpt2", dict(n_frequency=60, wavelet_family="coif2", scaling=5.0),
                          "no dropout"),
    "waveft-llama-sparse": ("WaveFTConfig", "llama", dict(n_frequency=30, use_idwt=False, init_weights=False,
                                                          target_modules=LLAMA), False),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_with_peft_both_ways_and_merge(case, checkpoints, tmp_path, capsys):
    """Each case both ways with PEFT, merged and exported (``_method_cases.check_interop``)."""
    check_interop(CASES[case], checkpoints, tmp_path, capsys)


def test_beft_on_layers_without_a_bias_trains_and_saves_but_does_not_merge(checkpoints, tmp_path, capsys):
    """Llama's value projections have no bias: BEFT trains there (PEFT's default target) and its file
    gives PEFT's logits, scanned layers too; merging is refused, by PEFT and here (naming the layer),
    and nothing is changed by the refusal; ``peftjax merge`` says so in one line and writes nothing."""
    path = checkpoints["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.BeftConfig(init_weights=False))
    assert model.peft_config["default"].target_modules == ("v_proj",)
    before = run_jax(model)
    with pytest.raises(ValueError, match=r"self_attn\.v_proj: Base layer has no bias, cannot merge bias adapter "):
        model.merge_and_unload()
    assert_close(run_jax(model), before)
    _tiny.train(model, _tiny.batch(IDS, MASK), steps=2, optimizer=optax.adam(2e-2))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base("llama", path), tmp_path).eval()
        with pytest.raises(ValueError, match="Base layer has no bias, cannot merge bias adapter default"):
            theirs.merge_adapter()
    ours = run_jax(model, jit=True)
    assert_close(ours, run_torch(theirs))
    scanned = peftjax.PeftModel.from_pretrained(models.from_pretrained(path, scan_layers=True), tmp_path)
    assert_close(run_jax(scanned), ours)
    assert main(["merge", str(path), str(tmp_path), str(tmp_path / "merged")]) == 1  # the command: one line
    assert "v_proj: Base layer has no bias, cannot merge bias adapter default" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_a_refused_merge_leaves_every_layer_as_it_was():
    """A merge that fails part-way (BEFT reaching a layer without a bias after one with; a NaN under
    ``safe_merge``) puts back the layers it had merged, and keeps each adapter's frozen state
    (DeLoRA's weight norms), so the model runs on unchanged."""

    class Two(nnx.Module):
        def __init__(self, rngs):
            self.first = nnx.Linear(4, 4, rngs=rngs)
            self.second = nnx.Linear(4, 4, use_bias=False, rngs=rngs)

        def __call__(self, x):
            return self.second(self.first(x))

    x = np.random.RandomState(0).randn(3, 4).astype(np.float32)
    for config, poison in ((peftjax.BeftConfig(target_modules=["first", "second"], init_weights=False), None),
                           (peftjax.DeloraConfig(r=2, init_weights=False, target_modules=["first", "second"]),
                            "second")):
        model = peftjax.get_peft_model(Two(nnx.Rngs(0)), config)
        if poison:
            getattr(model.base_model, poison).delora_A["default"].set_value(np.full((2, 4), np.nan, np.float32))
        base = model.base_model
        before = {n: np.asarray(getattr(base, n).kernel.get_value()) for n in ("first", "second")}
        bias, out = np.asarray(base.first.bias.get_value()), np.asarray(base(x))
        with pytest.raises(ValueError, match="second: Base layer has no bias" if poison is None else "NaNs detected"):
            model.merge_adapter(safe_merge=True)
        for n in ("first", "second"):
            np.testing.assert_array_equal(np.asarray(getattr(base, n).kernel.get_value()), before[n])
            assert getattr(base, n).merged_adapter_names() == ()
        np.testing.assert_array_equal(np.asarray(base.first.bias.get_value()), bias)
        np.testing.assert_array_equal(np.asarray(base(x)), out, err_msg=type(config).__name__)
        if poison:
            assert "default" in base.first.delora_w_norm


# config class -> (fields, the PEFT parameter name's marker, its last part -> peftjax's variable, count)
GRADIENTS = {
    "DeloraConfig": (dict(r=4, target_modules=["q_proj", "down_proj"]), ".delora_",
                     lambda name: name.split(".")[-2], 12),
    "OSFConfig": (dict(effective_rank=8, target_modules=["q_proj", "down_proj"]), ".osf_svd_params",
                  lambda name: "osf_" + name.split(".")[-1], 12),
}


@pytest.mark.parametrize("config_class", sorted(GRADIENTS))
def test_gradients_at_the_start_are_peft_s(config_class, checkpoints, tmp_path):
    """The adapter PEFT makes (untouched) gets PEFT's gradients here, every one finite.

    DeLoRA starts with ``B = 0``, where a norm's gradient is 0/0: torch's clamp gives the clamped
    norm no gradient, and so must peftjax, or the first step is NaN. OSF projects the gradients of
    ``U_low`` and ``V_low`` orthogonal to the frozen singular subspace (PEFT's gradient hooks)."""
    fields, marker, variable, count = GRADIENTS[config_class]
    path = checkpoints["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), getattr(peft, config_class)(**fields))
    theirs.save_pretrained(tmp_path)
    labels = np.where(MASK == 1, IDS, -100)
    theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels)).loss.backward()
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path, is_trainable=True)
    graphdef, trainable, rest = peftjax.split(model.base_model)
    grads = jax.jit(jax.grad(lambda t: nnx.merge(graphdef, t, rest)(input_ids=IDS, attention_mask=MASK,
                                                                     labels=labels).loss))(trainable)
    ours = {jax.tree_util.keystr(path): np.asarray(g) for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    checked = 0
    for name, p in theirs.named_parameters():
        if p.requires_grad:  # base_model.model.model.layers.0.self_attn.q_proj.delora_B.default
            module, kind = name.split(marker)[0].removeprefix("base_model.model."), variable(name)
            key = next(k for k in ours if f"'{kind}'" in k and all(f"'{part}'" in k or f"[{part}]" in k
                                                                 for part in module.split(".")))
            scale = float(np.abs(p.grad.numpy()).max())  # float32 sums of terms up to this size
            np.testing.assert_allclose(ours[key].reshape(p.shape), p.grad.numpy(), atol=1e-6 * max(scale, 1.0),
                                       rtol=1e-4, err_msg=name)
            checked += 1
    assert checked == count and all(np.isfinite(g).all() for g in ours.values())


def test_peanut_s_activations_are_transformers_own(checkpoints):
    """Every ``act_fn`` peftjax takes (the table the bundled models' configs read too) computes what
    transformers' ``ACT2FN`` of that name computes; one with weights (``"prelu"``) is refused by
    name before the model changes."""
    from transformers.activations import ACT2FN

    from peftjax.nn._activations import ACTIVATIONS

    x = np.linspace(-12.0, 12.0, 241, dtype=np.float32)
    for name, f in ACTIVATIONS.items():
        expected = ACT2FN[name](torch.tensor(x)).numpy()
        np.testing.assert_allclose(np.asarray(f(x)), expected, atol=2e-6, rtol=1e-6, err_msg=name)
    model = models.from_pretrained(checkpoints["llama"])
    with pytest.raises(ValueError, match=r"PeanutConfig.act_fn 'prelu' is not supported; supported: \['gelu'"):
        peftjax.get_peft_model(model, peftjax.PeanutConfig(act_fn="prelu", target_modules=LLAMA))
    assert not adapter_layers(model)


def test_uni_lora_s_vector_is_one_variable_every_layer_trains(checkpoints):
    """``theta_d`` is one variable all layers hold, so a step's update of it sums every layer's
    gradient, and the trainable count is PEFT's (the vector once); a scanned model is refused."""
    path = checkpoints["llama"]
    config = peftjax.UniLoraConfig(r=2, theta_d_length=32, target_modules=LLAMA)
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    vectors = [m.unilora_theta_d["default"] for m in adapter_layers(model.base_model).values()]
    assert len(vectors) == 6 and all(v is vectors[0] for v in vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.UniLoraConfig(r=2, theta_d_length=32,
                                                                                   target_modules=LLAMA))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    before = np.asarray(vectors[0].get_value())
    _tiny.train(model, _tiny.batch(IDS, MASK), steps=1, optimizer=optax.sgd(1.0))
    assert not np.allclose(np.asarray(vectors[-1].get_value()), before)
    with pytest.raises(NotImplementedError, match="Uni-LoRA on a model built with scan_layers=True"):
        peftjax.get_peft_model(models.from_pretrained(path, scan_layers=True), config)


def test_pvera_samples_from_the_dropout_key_only(checkpoints):
    """PVeRA's noise comes from the dropout key: outside one the mean (PEFT's eval), and an adapter
    with ``sample_at_inference=True`` asks for a key by name rather than drawing none; two keys, two
    samples. A VeRA layer does not take a PVeRA adapter (one method per layer)."""
    path = checkpoints["llama"]
    config = peftjax.PveraConfig(r=4, init_weights=False, sample_at_inference=True, target_modules=LLAMA)
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    with pytest.raises(ValueError, match="sample_at_inference=True, which draws noise at every call"):
        run_jax(model)
    samples = []
    for seed in (0, 1):
        with peftjax.dropout_key(jax.random.key(seed)):
            samples.append(run_jax(model))
    assert changed(samples[0], samples[1]) > 1e-4
    vera = peftjax.get_peft_model(models.from_pretrained(path), peftjax.VeraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"q_proj \(VeraLinear\) already carry another method's adapter"):
        vera.add_adapter("p", peftjax.PveraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(TypeError, match=r"q_proj already carry another method's adapter \(PVeRA\)"):
        model.add_adapter("v", peftjax.VeraConfig(r=4, target_modules=["q_proj"]))


@pytest.mark.parametrize(("arch", "fields"), [
    ("llama", dict(r=4, stride_A=2, num_B=3, scaling=2.0, init_weights=False, target_modules=LLAMA)),
    ("bert", dict(r=2, num_B=2)),
])
def test_lily_shares_and_moves_both_ways(arch, fields, checkpoints, tmp_path):
    """LiLy: ``A`` shared by blocks of ``stride_A`` consecutive layers of a target, ``B`` by all of
    them (one variable each, as PEFT shares one module), the routers' softmax averaged over the
    batch; a PEFT-made adapter gives PEFT's logits here, one trained here gives ours in PEFT, the
    trainable count is PEFT's; merging is refused, by PEFT and here; a scanned model is refused."""
    path, task = checkpoints[arch], ARCHS[arch].task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base(arch, path), peft.LilyConfig(task_type=task, **fields))
        torch.manual_seed(1)
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path / "theirs")
        ref = run_torch(theirs.eval())
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=True)
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert_close(run_jax(model, jit=True), ref)
    if arch == "llama":  # q_proj of layers 0 and 1 share A (stride 2) and B; v_proj has its own
        layers = model.base_model.model.layers
        q0, q1, v0 = layers[0].self_attn.q_proj, layers[1].self_attn.q_proj, layers[0].self_attn.v_proj
        assert q0.lily_A["default"] is q1.lily_A["default"] and q0.lily_B["default"] is q1.lily_B["default"]
        assert v0.lily_B["default"] is not q0.lily_B["default"]
    losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), steps=3, optimizer=optax.adam(2e-2)).losses
    assert losses[-1] < losses[0]
    ours = run_jax(model, jit=True)
    assert changed(ours, ref) > 1e-3
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()
        assert_close(ours, run_torch(back))
        with pytest.raises(NotImplementedError, match="not supported for Lily"):
            back.merge_adapter()
    with pytest.raises(NotImplementedError, match="merging is not supported for LiLy"):
        model.merge_and_unload()
    assert_close(run_jax(model, jit=True), ours)  # the refusal changed nothing
    with pytest.raises(NotImplementedError, match="LiLy on a model built with scan_layers=True"):
        peftjax.get_peft_model(models.from_pretrained(path, scan_layers=True), peftjax.LilyConfig(**fields))


def test_tinylora_s_rules_are_peft_s(checkpoints):
    """Every TinyLoRA adapter on a model saves its projections or none (PEFT's rule); a projection of
    fewer than 16 values cannot be drawn again as torch draws it, so ``save_projection=False`` with
    one is refused by name (``True`` saves it); tied layers share one trained vector (one variable);
    a scanned model is refused."""
    path = checkpoints["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.TinyLoraConfig(
        r=2, u=16, weight_tying=1.0, target_modules=LLAMA))
    vectors = [m.tinylora_v["default"] for m in adapter_layers(model.base_model).values()]
    assert len(vectors) == 6 and all(v is vectors[0] for v in vectors)
    assert model.get_nb_trainable_parameters()[0] == 16
    with pytest.warns(UserWarning, match="Specified to not save projection tensors P"):
        unsaved = peftjax.TinyLoraConfig(r=2, u=16, save_projection=False, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="TinyLoRA projection tensors must be saved for all adapters or none"):
        model.add_adapter("other", unsaved)
    with pytest.warns(UserWarning):
        small = peftjax.TinyLoraConfig(r=1, u=4, save_projection=False, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"q_proj: save_projection=False needs P drawn again .* u \* r \* r = 4"):
        peftjax.get_peft_model(models.from_pretrained(path), small)
    with pytest.raises(NotImplementedError, match="TinyLoRA on a model built with scan_layers=True"):
        peftjax.get_peft_model(models.from_pretrained(path, scan_layers=True),
                               peftjax.TinyLoraConfig(r=2, target_modules=LLAMA))
