"""MiSS (formerly Bone) against HF PEFT 0.21.2 + PyTorch on Llama and BERT, both ways, every variant.

The balance variant (PEFT's default, and ``init_weights=False``), mini (a narrower block repeated
along the output) and bat (a non-linear update of each ``r x r`` block of the weight); an ``r``
that does not divide the input pads the last shard, as PEFT pads it. PEFT's MiSS adapts
``nn.Linear`` only, so GPT-2's ``Conv1D`` is tested as a refusal, with the shape checks.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.tuners.base import adapter_layers

torch, peft = lazy("torch"), lazy("peft")

ARCHS = {name: _tiny.arch(name) for name in ("llama", "bert", "gpt2")}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
LLAMA = ["q_proj", "v_proj", "down_proj"]  # in x out: 32 x 32, 32 x 16, 48 x 32

# (arch, config fields); the BERT case is a classifier on PEFT's default targets (query, value)
# with its head saved and the targeted biases trained
CASES = {
    "llama-balance-padded": ("llama", dict(r=5, init_weights=False, miss_dropout=0.1, target_modules=LLAMA)),
    "llama-bat": ("llama", dict(r=8, init_weights="bat", target_modules=LLAMA)),
    "llama-mini": ("llama", dict(r=4, init_weights="mini", mini_r=8, target_modules=LLAMA)),
    "bert-balance": ("bert", dict(r=8, bias="MiSS_only", layers_to_transform=[0])),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


def torch_base(arch, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(path).eval()


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


_logits = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(_logits(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x):
    return x[MASK.astype(bool)] if x.ndim == 3 else x


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(np.asarray(a)), valid(np.asarray(b)), atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(valid(np.asarray(a)) - valid(np.asarray(b))).max())


def train_with_trainer(model, output_dir) -> list[float]:
    args = peftjax.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=3,
                                     learning_rate=2e-2, logging_steps=1, disable_tqdm=True, report_to="none",
                                     plot=False)
    peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_with_peft_both_ways_and_merge(case, checkpoints, tmp_path):
    """A PEFT-made adapter with random blocks gives PEFT's logits here; trained further here, it
    loads in PEFT with equal logits; merged equals unmerged (and PEFT's merge), unmerge restores
    the weights, and the merged export gives the same logits in transformers alone."""
    arch, fields = CASES[case]
    path, task = checkpoints[arch], ARCHS[arch].task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch, path), peft.MissConfig(task_type=task, **fields))
        trainable = torch_model.get_nb_trainable_parameters()
        torch.manual_seed(1)
        with torch.no_grad():  # most variants start at zero: randomise the blocks, biases and head
            for p in torch_model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        torch_model.save_pretrained(tmp_path / "theirs")
        ref = run_torch(torch_model.eval())
    assert changed(ref, run_torch(torch_base(arch, path))) > 1e-3

    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=True)
    assert model.get_nb_trainable_parameters() == trainable
    assert {s.name for s in model.get_layer_status()} == {s.name for s in torch_model.get_layer_status()}
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)
    if fields.get("miss_dropout"):  # the input dropout acts while training only
        with peftjax.dropout_key(jax.random.key(0)):
            assert changed(run_jax(model), ref) > 1e-4

    if case == "llama-balance-padded":  # through the Trainer (with the dropout); the others the functional core
        losses = train_with_trainer(model, tmp_path / "run")
    else:
        losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), steps=3, optimizer=optax.adam(2e-2)).losses
    assert losses[-1] < losses[0]
    ours = run_jax(model, jit=True)
    assert changed(ours, ref) > 1e-3
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()
        assert_close(ours, run_torch(theirs))
        theirs.merge_adapter()
        assert_close(ours, run_torch(theirs))

    layers = adapter_layers(model.base_model)
    weights = {n: np.array(m.kernel.get_value()) for n, m in layers.items()}
    model.merge_adapter()
    assert_close(run_jax(model), ours)
    model.unmerge_adapter()
    for n, m in layers.items():
        np.testing.assert_allclose(m.kernel.get_value(), weights[n], atol=1e-5, rtol=0, err_msg=n)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert_close(run_torch(torch_base(arch, tmp_path / "merged")), ours)


@pytest.mark.parametrize(("arch", "fields", "match"), [
    ("gpt2", dict(r=4, target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*which HF PEFT's MiSS does not"),
    ("llama", dict(r=33, target_modules=["q_proj"]), r"q_proj: `r` \(33\) must be less than or equal to in_features"),
    ("llama", dict(r=12, init_weights="bat", target_modules=["down_proj"]),
     r"down_proj: The weight matrix must be fully divisible into \[r, r\] blocks \(in_features 48, out_features 32"),
    ("llama", dict(r=4, init_weights="mini", mini_r=5, target_modules=["q_proj"]),
     "q_proj: mini_r is divided along the out_features dimension; out_features 32 is not divisible by mini_r 5"),
])
def test_what_peft_refuses_is_refused_by_name(arch, fields, match, checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((TypeError, ValueError)):
            peft.get_peft_model(torch_base(arch, checkpoints[arch]), peft.MissConfig(**fields))
    with pytest.raises((TypeError, ValueError), match=match):
        peftjax.get_peft_model(models.from_pretrained(checkpoints[arch]), peftjax.MissConfig(**fields))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"`init_weights` must be one of \[True, False, 'bat', 'mini'\], got 'pissa'"):
        peftjax.MissConfig(init_weights="pissa")
    with pytest.raises(ValueError, match=r"`miss_dropout` must be in \[0, 1\), got 1.5"):
        peftjax.MissConfig(miss_dropout=1.5)
