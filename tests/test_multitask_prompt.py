"""Multitask prompt tuning (MPT) against HF PEFT + PyTorch, in both directions.

One shared prompt modulated per task (``prompt * (prefix_task_cols[t] @ prefix_task_rows[t])``),
each row's task given by ``task_ids``. PEFT 0.21.2's ``generate`` with an MPT adapter did not
always equal greedy decoding by its own forward (seen on the tiny Llama below, on rows whose task is
not the same as the others'; 0.22's does); the oracle for generation is greedy decoding with PEFT's
forward.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import _tiny
from _task_rows import ARCHS, IDS, MASK, TASKS, checkpoints, mask_for, run_torch, torch_base
from _torch_models import lazy

import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

V = 4
FIELDS = dict(num_virtual_tokens=V, num_tasks=3, num_ranks=2)


@pytest.fixture(scope="module")
def saved(tiny_checkpoint):
    return checkpoints(tiny_checkpoint, ("llama", "bert"))


def real(logits, arch):
    """A causal LM's logits at the virtual tokens and the real ones; a classifier's as they are."""
    if arch != "llama":
        return logits
    return logits[np.concatenate([np.ones((len(IDS), V), bool), mask_for(arch).astype(bool)], 1)]


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_adapters_move_both_ways_with_peft_s_logits(arch, saved, tmp_path):
    """A PEFT-made MPT adapter (moved off its init) gives PEFT's logits for each row's task here;
    trained further here through the functional core with task ids in the batch, saved, it gives
    peftjax's logits in PEFT (a classifier's head saved with it)."""
    path, task = saved[arch], ARCHS[arch].task
    config = dict(task_type=task, **FIELDS)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base(arch, path), peft.MultitaskPromptTuningConfig(**config))
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path / "theirs")
    ref = run_torch(theirs.eval(), arch)
    assert np.abs(ref - run_torch(theirs, arch, TASKS[::-1].copy())).max() > 1e-3  # the task matters

    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=False)
    out = np.asarray(jax.jit(lambda i, m, t: ours(input_ids=i, attention_mask=m, task_ids=t).logits)(
        IDS, mask_for(arch), TASKS))
    np.testing.assert_allclose(real(out, arch), real(ref, arch), atol=1e-5, rtol=0)

    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.MultitaskPromptTuningConfig(**config))
    assert model.get_nb_trainable_parameters()[0] == theirs.get_nb_trainable_parameters()[0]
    batch = {**_tiny.batch(IDS, mask_for(arch), task, labels=(0, 2, 1)), "task_ids": TASKS}
    losses = _tiny.train(model, batch, steps=4).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    assert sorted(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == sorted(
        load_file(tmp_path / "theirs" / "adapter_model.safetensors"))
    mine = np.asarray(model(input_ids=IDS, attention_mask=mask_for(arch), task_ids=TASKS).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()
    np.testing.assert_allclose(real(mine, arch), real(run_torch(loaded, arch), arch), atol=1e-5, rtol=0)


def test_generation_is_greedy_decoding_by_peft_s_forward(saved, tmp_path):
    path = saved["llama"]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path),
                                     peft.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **FIELDS))
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.5 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path)
    theirs.eval()
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    new = 4
    out = np.asarray(ours.generate(IDS, MASK, max_new_tokens=new, pad_token_id=0, eos_token_id=None,
                                   task_ids=TASKS))
    ids, mask = IDS.copy(), MASK.copy()
    for _ in range(new):
        with torch.no_grad():
            logits = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                            task_ids=torch.tensor(TASKS)).logits.numpy()[:, -1]
        ids = np.concatenate([ids, logits.argmax(-1)[:, None]], 1)
        mask = np.concatenate([mask, np.ones((len(ids), 1), mask.dtype)], 1)
    np.testing.assert_array_equal(out[:, -new:], ids[:, -new:])


@pytest.mark.parametrize("init", ["AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED"])
def test_a_target_run_starts_from_a_source_run_as_in_peft(init, saved, tmp_path):
    """PEFT's MPT recipe: train on several source tasks, then start one target task from that
    file's prompt and the mean (or one) of its task factors, or the prompt alone."""
    path = saved["llama"]
    source = peftjax.get_peft_model(models.from_pretrained(path),
                                    peftjax.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **FIELDS))
    source.save_pretrained(tmp_path / "source")
    file = str(tmp_path / "source" / "adapter_model.safetensors")
    target = dict(task_type="CAUSAL_LM", num_virtual_tokens=V, num_ranks=2, prompt_tuning_init=init,
                  prompt_tuning_init_state_dict_path=file, prompt_tuning_init_task=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.MultitaskPromptTuningConfig(**target))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.MultitaskPromptTuningConfig(**target))
    ours.save_pretrained(tmp_path / "ours")
    a, b = (load_file(tmp_path / who / "adapter_model.safetensors") for who in ("ours", "theirs"))
    for name in ("prompt_embeddings",) if init == "ONLY_SOURCE_SHARED" else sorted(a):
        np.testing.assert_allclose(a[name], b[name], atol=1e-7, rtol=0, err_msg=name)


def test_task_ids_and_source_files_are_checked(saved, tmp_path):
    path = saved["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **FIELDS))
    with pytest.raises(ValueError, match="task_ids cannot be None: .* 3 tasks"):
        model(input_ids=IDS)
    with pytest.raises(ValueError, match=r"task_ids: expected values in \[0, 3\) \(num_tasks\), got \[0, 3, 1\]"):
        model(input_ids=IDS, task_ids=[0, 3, 1])
    with pytest.raises(ValueError, match="one task id per row \\(3\\) or one for all, got 2"):
        model(input_ids=IDS, task_ids=[0, 1])
    traced = jax.jit(lambda t: model(input_ids=IDS, task_ids=t).logits)(np.array([0, 5, 1]))
    assert np.isnan(np.asarray(traced)[1]).all() and not np.isnan(np.asarray(traced)[[0, 2]]).any()
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", disable_tqdm=True, plot=False)
    with pytest.raises(peftjax.training.TrainingError, match="train_dataset has no task_ids column, which "
                                                    r"MULTITASK_PROMPT_TUNING adapter 'default' \(3 tasks\) needs"):
        peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
    single = peftjax.get_peft_model(models.from_pretrained(path), peftjax.MultitaskPromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=V))
    np.testing.assert_array_equal(np.asarray(single(input_ids=IDS).logits),  # one task: every row is task 0
                                  np.asarray(single(input_ids=IDS, task_ids=[0, 0, 0]).logits))

    save_file({"prompt_embeddings": np.zeros((V, 32), np.float32)}, str(tmp_path / "shared.safetensors"))
    for fields, message in [
        (dict(prompt_tuning_init="EXACT_SOURCE_TASK"), "prompt_tuning_init_state_dict_path needs to be specified"),
        (dict(prompt_tuning_init="AVERAGE_SOURCE_TASKS", prompt_tuning_init_state_dict_path="x.bin"),
         "expected a .safetensors file"),
        (dict(prompt_tuning_init="AVERAGE_SOURCE_TASKS",
              prompt_tuning_init_state_dict_path=str(tmp_path / "shared.safetensors")),
         r"no \['prefix_task_cols', 'prefix_task_rows'\] for prompt_tuning_init='AVERAGE_SOURCE_TASKS'"),
        (dict(prompt_tuning_init="ONLY_SOURCE_SHARED", num_virtual_tokens=V + 1,
              prompt_tuning_init_state_dict_path=str(tmp_path / "shared.safetensors")),
         r"prompt_embeddings has shape \[4, 32\]; this config .* needs \[5, 32\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            peftjax.get_peft_model(models.from_pretrained(path), peftjax.MultitaskPromptTuningConfig(
                **{"task_type": "CAUSAL_LM", "num_virtual_tokens": V, **fields}))


def test_the_trainer_passes_each_row_s_task(saved, tmp_path):
    """A dataset's task_ids column reaches the prompt: the Trainer trains a three-task adapter, and
    PEFT gives the trained adapter's logits for each row's task."""
    path = saved["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.MultitaskPromptTuningConfig(task_type="CAUSAL_LM", **FIELDS))
    rng = np.random.default_rng(0)
    data = {"input_ids": [rng.integers(3, 96, 6).tolist() for _ in range(12)], "task_ids": [i % 3 for i in range(12)]}
    data["labels"] = data["input_ids"]
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=6, max_steps=3,
                                     learning_rate=1e-2, report_to="none", disable_tqdm=True, plot=False)
    peftjax.Trainer(model, args, data).train()
    model.save_pretrained(tmp_path / "adapter")
    mine = np.asarray(model(input_ids=IDS, attention_mask=MASK, task_ids=TASKS).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_base("llama", path), tmp_path / "adapter").eval()
    np.testing.assert_allclose(real(mine, "llama"), real(run_torch(loaded, "llama"), "llama"), atol=1e-5, rtol=0)
