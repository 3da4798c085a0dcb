"""Poly (Polytropon) and multi-head routing against HF PEFT + PyTorch, in both directions.

Each targeted linear layer mixes ``n_skills`` LoRA pairs by its row's task (``task_ids``); the
eval-mode forward (sigmoid routing) is PEFT's to 1e-5, and training samples the routing (a relaxed
Bernoulli) under the dropout key.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _compiles import compilations
from _task_rows import ARCHS, IDS, MASK, TASKS, checkpoints, mask_for, run_torch, torch_base
from _torch_models import lazy
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

LLAMA = ["q_proj", "v_proj", "down_proj"]
# (arch, fields): Llama with multi-head routing (2 splits); BERT's classifier on PEFT's default targets
CASES = {"llama-mhr": ("llama", dict(r=4, n_tasks=3, n_skills=2, n_splits=2, target_modules=LLAMA)),
         "bert": ("bert", dict(r=2, n_tasks=3, n_skills=3))}


@pytest.fixture(scope="module")
def saved(tiny_checkpoint):
    return checkpoints(tiny_checkpoint, ("llama", "bert", "gpt2"))


def valid(logits, arch):
    return logits[mask_for(arch).astype(bool)] if logits.ndim == 3 else logits


def peft_made(arch, path, fields, directory):
    """PEFT's Poly adapter, every trained tensor moved off its start, saved to ``directory``."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch_base(arch, path), peft.PolyConfig(task_type=ARCHS[arch].task, **fields))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("case", sorted(CASES))
def test_adapters_move_both_ways_with_peft_s_logits(case, saved, tmp_path):
    """A PEFT-made adapter gives PEFT's logits for each row's task here (eager and jitted); trained
    here through the functional core (task ids in the batch), saved, it gives ours in PEFT; the
    layers are the ones PEFT adapts."""
    arch, fields = CASES[case]
    path = saved[arch]
    theirs = peft_made(arch, path, fields, tmp_path / "theirs")
    ref = run_torch(theirs, arch)
    assert np.abs(ref - run_torch(theirs, arch, TASKS[::-1].copy())).max() > 1e-3  # the task matters

    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=True)
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == {
        (s.name, s.module_type) for s in theirs.get_layer_status()}
    eager = np.asarray(ours(input_ids=IDS, attention_mask=mask_for(arch), task_ids=TASKS).logits)
    jitted = np.asarray(nnx.jit(lambda m, t: m(input_ids=IDS, attention_mask=mask_for(arch), task_ids=t).logits)(
        ours.base_model, TASKS))
    for out in (eager, jitted):
        np.testing.assert_allclose(valid(out, arch), valid(ref, arch), atol=1e-5, rtol=0)

    batch = {**_tiny.batch(IDS, mask_for(arch), ARCHS[arch].task, labels=(0, 2, 1)), "task_ids": TASKS}
    # without the dropout key (the sampled routing and BERT's dropout move a 4-step loss more than training)
    losses = _tiny.train(ours, batch, steps=4, optimizer=optax.adam(1e-2), dropout=False).losses
    assert losses[-1] < losses[0]
    mine = np.asarray(ours(input_ids=IDS, attention_mask=mask_for(arch), task_ids=TASKS).logits)
    assert np.abs(mine - eager).max() > 1e-4
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()
    np.testing.assert_allclose(valid(mine, arch), valid(run_torch(loaded, arch), arch), atol=1e-5, rtol=0)


def test_generation_equals_peft_s_and_task_ids_are_data_of_one_compiled_loop(saved, tmp_path):
    path = saved["llama"]
    fields = CASES["llama-mhr"][1]
    theirs = peft_made("llama", path, fields, tmp_path)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    with compilations() as compiled:
        for tasks in (TASKS, np.array([1, 1, 0])):
            out = np.asarray(ours.generate(IDS, MASK, max_new_tokens=4, pad_token_id=0, task_ids=tasks))
            with torch.no_grad():
                ref = theirs.generate(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                                      task_ids=torch.tensor(tasks), max_new_tokens=4, do_sample=False,
                                      pad_token_id=0).numpy()
            np.testing.assert_array_equal(out[:, -4:], ref[:, -4:])
    generate_programs = [name for name in compiled if "_generate" in name]
    assert len(generate_programs) == 1, generate_programs
    # beam search repeats each row's task id with the row, once per beam: each row's beams are its
    # search alone under its own task (PEFT's hook would give the beams the unrepeated ids)
    beams = dict(max_new_tokens=4, pad_token_id=0, num_beams=3, num_return_sequences=2)
    searched = np.asarray(ours.generate(IDS, MASK, task_ids=TASKS, **beams))
    for i, task in enumerate(TASKS):
        alone = np.asarray(ours.generate(IDS[i:i + 1], MASK[i:i + 1], task_ids=[task], **beams))
        np.testing.assert_array_equal(searched[2 * i:2 * i + 2, :alone.shape[1]], alone)
    other = np.asarray(ours.generate(IDS, MASK, task_ids=TASKS[::-1].copy(), **beams))
    assert other.shape != searched.shape or (other != searched).any()  # the task ids reached the beams


def test_training_samples_the_routing_and_scanned_layers_equal_the_loop(saved, tmp_path):
    path = saved["llama"]
    config = peftjax.PolyConfig(r=4, n_tasks=3, n_skills=2, target_modules=LLAMA, init_weights=False)
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    forward = lambda m: np.asarray(m(input_ids=IDS, attention_mask=MASK, task_ids=TASKS).logits)  # noqa: E731
    eval_mode = forward(model)
    with peftjax.dropout_key(jax.random.key(0)):
        first, again = forward(model), forward(model)
    with peftjax.dropout_key(jax.random.key(1)):
        other = forward(model)
    np.testing.assert_allclose(first, again, atol=1e-5, rtol=0)  # a function of the key
    assert np.abs(first - eval_mode).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    model.save_pretrained(tmp_path)
    scanned = peftjax.PeftModel.from_pretrained(models.from_pretrained(path, scan_layers=True), tmp_path)
    jitted = nnx.jit(lambda m, t: m(input_ids=IDS, attention_mask=MASK, task_ids=t).logits)
    np.testing.assert_allclose(np.asarray(jitted(scanned.base_model, TASKS)), eval_mode, atol=1e-5, rtol=0)


def test_task_ids_layers_and_options_are_checked(saved, tmp_path):
    model = peftjax.get_peft_model(models.from_pretrained(saved["llama"]),
                                   peftjax.PolyConfig(r=2, n_tasks=3, target_modules=LLAMA))
    with pytest.raises(ValueError, match="task_ids should not be None: this Poly adapter has n_tasks=3"):
        model(input_ids=IDS)
    with pytest.raises(ValueError, match=r"Only 3 tasks available. Found task id = 3 \(task_ids \[0, 3, 1\]\)"):
        model(input_ids=IDS, task_ids=[0, 3, 1])
    with pytest.raises(ValueError, match=r"Only 3 tasks available"):
        model.generate(IDS, MASK, max_new_tokens=2, task_ids=[5, 0, 0])
    with pytest.raises(ValueError, match=r"expected one task id per row \(3\), got 2"):
        model(input_ids=IDS, task_ids=[0, 1])
    with pytest.raises(NotImplementedError, match="update depends on each row's task"):
        model.merge_adapter()
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", disable_tqdm=True, plot=False)
    with pytest.raises(peftjax.training.TrainingError, match="train_dataset has no task_ids column, which POLY adapter "
                                                    r"'default' \(3 tasks\) needs"):
        peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
    with pytest.raises(peftjax.training.TrainingError, match=r"train_dataset: task_ids row 1 is 7; POLY adapter 'default' "
                                                    r"takes integers in \[0, 3\)"):
        peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist(), "task_ids": [0, 7, 1]}).train()
    base = model.unload()
    assert type(base) is models.LlamaForCausalLM
    with pytest.raises(TypeError, match="task_ids"):
        base(input_ids=IDS, task_ids=TASKS)

    single = peftjax.get_peft_model(models.from_pretrained(saved["llama"]), peftjax.PolyConfig(
        r=2, target_modules=LLAMA, init_weights=False))
    np.testing.assert_allclose(np.asarray(single(input_ids=IDS).logits),  # one task: every row is task 0
                               np.asarray(single(input_ids=IDS, task_ids=[0, 0, 0]).logits), atol=1e-5, rtol=0)
    with pytest.raises(TypeError, match="Conv1D"):
        peftjax.get_peft_model(models.from_pretrained(saved["gpt2"]), peftjax.PolyConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="q_proj: n_splits=3 does not divide the layer's input size 32"):
        peftjax.get_peft_model(models.from_pretrained(saved["llama"]), peftjax.PolyConfig(
            n_splits=3, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="poly_type"):
        peftjax.PolyConfig(poly_type="mhr")


def test_the_trainer_trains_each_row_on_its_task(saved, tmp_path):
    """A dataset's task_ids column reaches the layers: trained by the Trainer on three tasks whose
    targets differ, the adapter's logits per task move apart, and PEFT reproduces them."""
    path = saved["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.PolyConfig(
        task_type="CAUSAL_LM", r=2, n_tasks=3, n_skills=2, target_modules=LLAMA))
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 96, 6).tolist() for _ in range(24)]
    tasks = [i % 3 for i in range(24)]
    data = {"input_ids": [[10 + 20 * t] + r for r, t in zip(rows, tasks)], "task_ids": tasks}
    data["labels"] = data["input_ids"]
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, max_steps=6,
                                     learning_rate=2e-2, logging_steps=1, report_to="none", disable_tqdm=True,
                                     plot=False)
    trainer = peftjax.Trainer(model, args, data)
    trainer.train()
    assert "task_ids" in trainer.model_inputs and not trainer.packs()
    model.save_pretrained(tmp_path / "adapter")
    mine = np.asarray(model(input_ids=IDS, attention_mask=MASK, task_ids=TASKS).logits)
    theirs = peft.PeftModel.from_pretrained(torch_base("llama", path), tmp_path / "adapter").eval()
    np.testing.assert_allclose(valid(mine, "llama"), valid(run_torch(theirs, "llama"), "llama"), atol=1e-5, rtol=0)
    again = np.asarray(model(input_ids=IDS, attention_mask=MASK, task_ids=np.array([0, 0, 0])).logits)
    assert np.abs(again - mine).max() > 1e-4  # the tasks were trained apart
