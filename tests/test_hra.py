"""HRA (Householder reflection adaptation) against HF PEFT 0.21.2 + PyTorch on Llama and BERT, both ways.

PEFT's HRA adapts ``nn.Linear`` (and ``Conv2d``) but not GPT-2's ``Conv1D``, so GPT-2 is tested as
a refusal. The oracle forms ``H`` and the new weight at every call; peftjax reflects the input
instead, so equal logits check the algebra, the order of the reflections and Gram-Schmidt.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.tuners.base import adapter_layers

torch, peft = lazy("torch"), lazy("peft")

ARCHS = {name: _tiny.arch(name) for name in ("llama", "bert", "gpt2")}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])

# (arch, config fields): the chain of reflections on three kinds of layer; Gram-Schmidt on PEFT's
# default targets of a classifier (query, value), with its head saved and the targeted biases trained
CASES = {
    "llama": ("llama", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "bert-gs": ("bert", dict(r=2, apply_GS=True, bias="hra_only", layers_to_transform=[1])),
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


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_with_peft_both_ways_and_merge(case, checkpoints, tmp_path, capsys):
    """A PEFT-made adapter with random vectors gives PEFT's logits here; trained further here, it
    loads in PEFT with equal logits; merged equals unmerged, unmerge restores the weights, and the
    merged export gives the same logits in transformers alone."""
    arch, fields = CASES[case]
    path, task = checkpoints[arch], ARCHS[arch].task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch, path), peft.HRAConfig(task_type=task, **fields))
        trainable = torch_model.get_nb_trainable_parameters()
        torch.manual_seed(1)
        with torch.no_grad():  # HRA starts as the identity: randomise the vectors, biases and head
            for p in torch_model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        torch_model.save_pretrained(tmp_path / "theirs")
        ref = run_torch(torch_model.eval())
    assert changed(ref, run_torch(torch_base(arch, path))) > 1e-3

    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=True)
    assert model.get_nb_trainable_parameters() == trainable
    assert {s.name for s in model.get_layer_status()} == {s.name for s in torch_model.get_layer_status()}
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)

    if arch == "llama":  # through the Trainer; BERT's through the functional core
        losses = train_with_trainer(model, tmp_path / "run")
    else:
        losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), steps=3, optimizer=optax.adam(2e-2)).losses
    assert losses[-1] < losses[0]
    ours = run_jax(model, jit=True)
    assert changed(ours, ref) > 1e-3
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(ours, run_torch(peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()))
    assert main(["inspect", str(tmp_path / "ours"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "HRA" and info["parameters"] == trainable[0]

    layers = adapter_layers(model.base_model)
    weights = {n: np.array(m.kernel.get_value()) for n, m in layers.items()}
    model.merge_adapter()
    assert_close(run_jax(model), ours)
    model.unmerge_adapter()
    for n, m in layers.items():
        np.testing.assert_allclose(m.kernel.get_value(), weights[n], atol=1e-5, rtol=0, err_msg=n)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert_close(run_torch(torch_base(arch, tmp_path / "merged")), ours)


def train_with_trainer(model, output_dir) -> list[float]:
    args = peftjax.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=3,
                                     learning_rate=2e-2, logging_steps=1, disable_tqdm=True, report_to="none",
                                     plot=False)
    peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_an_even_r_starts_as_the_identity_and_an_odd_r_warns_and_does_not(checkpoints):
    path = checkpoints["llama"]
    base = run_torch(torch_base("llama", path))
    even = peftjax.get_peft_model(models.from_pretrained(path), peftjax.HRAConfig(r=4, target_modules=["q_proj"]))
    assert_close(run_jax(even), base)
    fields = dict(r=3, target_modules=["q_proj"])
    for make in (lambda: peftjax.get_peft_model(models.from_pretrained(path), peftjax.HRAConfig(**fields)),
                 lambda: peft.get_peft_model(torch_base("llama", path), peft.HRAConfig(**fields))):
        with pytest.warns(UserWarning, match="symmetric initialization can NOT be performed when r is odd"):
            odd = make()
        out = run_jax(odd) if isinstance(odd, peftjax.PeftModel) else run_torch(odd)
        assert changed(out, base) > 1e-4


def test_gpt2_conv1d_and_bad_settings_are_refused_as_peft_refuses_them(checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError):
            peft.get_peft_model(torch_base("gpt2", checkpoints["gpt2"]), peft.HRAConfig(target_modules=["c_attn"]))
    with pytest.raises(TypeError, match="c_attn is transformers' Conv1D .*which HF PEFT's HRA does not support"):
        peftjax.get_peft_model(models.from_pretrained(checkpoints["gpt2"]),
                               peftjax.HRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="`r` must be >= 1, got 0"):
        peftjax.HRAConfig(r=0)
    with pytest.raises(ValueError, match="bias"):
        peftjax.HRAConfig(bias="lora_only")
