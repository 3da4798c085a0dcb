"""The Trainer against its oracle: ``transformers.Trainer`` training the same PEFT adapter.

Both start from one tiny BERT checkpoint and one LoRA initialisation (peftjax's, saved and loaded
into ``peft.PeftModel``), see the same rows in one batch per epoch (so the data order does not
matter) with dropout off, and train with the same arguments: AdamW with weight decay, a linear
schedule with warmup, global-norm clipping. What each writes must then be the same adapter, and
the logged losses and learning rates the same numbers: the schedule, the clipping, which
parameters decay, the loss and the packed batches all agree with transformers'.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import models
from peftjax.io import read_safetensors

torch = lazy("torch")
peft = lazy("peft")


def _train_with_transformers(torch_model, tmp_path, data: dict, common: dict, collate):
    """The oracle's run: ``transformers.Trainer`` on ``torch_model`` with the PEFT adapter saved in
    ``tmp_path / "init"``, the same arguments: ``(its log history, the adapter it saves)``."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.PeftModel.from_pretrained(torch_model, str(tmp_path / "init"), is_trainable=True)
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "torch"), save_strategy="no",
                                              report_to="none", disable_tqdm=True, use_cpu=True, **common)
        oracle = transformers.Trainer(model=peft_model, args=args, data_collator=collate,
                                      train_dataset=datasets.Dataset.from_dict(data))
        oracle.train()
    peft_model.save_pretrained(str(tmp_path / "torch"))
    return oracle.state.log_history, read_safetensors(tmp_path / "torch" / "adapter_model.safetensors")[0]


def _logged(history, key):
    return [r[key] for r in history if key in r and "train_runtime" not in r]


def _assert_same_training(ours_log, theirs_log, ours, theirs, steps: int):
    """The same number of steps, learning rates, losses and adapter tensors (seen: 5e-7 apart)."""
    assert len(_logged(ours_log, "loss")) == len(_logged(theirs_log, "loss")) == steps
    np.testing.assert_allclose(_logged(ours_log, "learning_rate"), _logged(theirs_log, "learning_rate"), rtol=1e-6)
    np.testing.assert_allclose(_logged(ours_log, "loss"), _logged(theirs_log, "loss"), rtol=1e-4)
    assert set(ours) == set(theirs)
    for key in theirs:
        np.testing.assert_allclose(ours[key], theirs[key], atol=1e-5, rtol=0, err_msg=key)


def _collate(features):
    """transformers' side: pad each batch to its longest row with id 0 (the tiny BERT's pad)."""
    longest = max(len(f["input_ids"]) for f in features)
    ids = [f["input_ids"] + [0] * (longest - len(f["input_ids"])) for f in features]
    mask = [[1] * len(f["input_ids"]) + [0] * (longest - len(f["input_ids"])) for f in features]
    return {"input_ids": torch.tensor(ids), "attention_mask": torch.tensor(mask),
            "labels": torch.tensor([f["label"] for f in features])}


def test_the_trainer_updates_the_adapter_as_transformers_trainer_does(tmp_path):
    spec = _tiny.arch("bert", vocab_size=64, intermediate_size=48, num_labels=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)
    torch_model = _tiny.save(spec, tmp_path / "base")
    with torch.no_grad():  # a head bias away from zero, so that decaying it (transformers does not) shows
        torch_model.classifier.bias.copy_(torch.tensor([0.5, -0.5]))
    torch_model.save_pretrained(tmp_path / "base")
    lora = peftjax.LoraConfig(r=4, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), lora, key=jax.random.key(3))
    # B starts at zero: a B drawn at random makes the first steps' gradients of A non-zero too
    rng = np.random.default_rng(0)
    for _, module in nnx.iter_modules(model.base_model):
        if hasattr(module, "lora_B") and "default" in getattr(module, "lora_B", {}):
            b = module.lora_B["default"]
            b.set_value(0.1 * rng.standard_normal(b.get_value().shape).astype(np.float32))
    model.save_pretrained(tmp_path / "init")
    data = _tiny.classification_data(40, seed=1)
    common = dict(per_device_train_batch_size=40, num_train_epochs=6, learning_rate=2e-2, weight_decay=0.1,
                  warmup_steps=0.2, lr_scheduler_type="linear", max_grad_norm=0.35, logging_steps=1, seed=0)

    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "peftjax"), save_steps=0, disable_tqdm=True,
                                     plot=False, report_to="none", **common)
    trainer = peftjax.Trainer(model, args, train_dataset=data)
    trainer.train()
    assert trainer.packs()  # the default for this classifier: the rows laid end to end
    ours = read_safetensors(tmp_path / "peftjax" / "adapter_model.safetensors")[0]

    their_log, theirs = _train_with_transformers(torch_model, tmp_path, data, common, _collate)
    _assert_same_training(trainer.log_history, their_log, ours, theirs, steps=6)
    norms = _logged(their_log, "grad_norm")
    assert min(norms) < common["max_grad_norm"] < max(norms)  # clipped on some steps, not on all
    initial = read_safetensors(tmp_path / "init" / "adapter_model.safetensors")[0]
    for key in theirs:
        assert not np.allclose(theirs[key], initial[key]), key  # every tensor trained


@pytest.mark.parametrize("family, config", [
    ("gpt2", dict(method="LoraConfig", target_modules=["c_attn"], lora_bias=True, modules_to_save=["ln_f"])),
    ("llama", dict(method="LoraConfig", target_modules=["q_proj"], modules_to_save=["input_layernorm", "norm"])),
    ("bert", dict(method="LoraConfig", target_modules=["query"], modules_to_save=["LayerNorm", "classifier"])),
])
def test_weight_decay_falls_on_what_transformers_trainer_decays(family, config, tmp_path):
    """``weight_decay_mask`` against ``transformers.Trainer.get_decay_parameter_names`` on the same
    PEFT model: the same number of trainable weights decays (biases, norms by name and GPT-2's
    ``ln_*`` by type stay out) and the same number does not."""
    transformers = pytest.importorskip("transformers")
    from peftjax.training import weight_decay_mask

    config = dict(config)
    method = config.pop("method")
    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    torch_model = _tiny.save(family, tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_model, getattr(peft, method)(task_type=task, **config))
        model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                       getattr(peftjax, method)(task_type=task, **config))
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, theirs))
    trainable = [(n, p.numel()) for n, p in theirs.named_parameters() if p.requires_grad]
    expected = (sum(k for n, k in trainable if n in decayed), sum(k for n, k in trainable if n not in decayed))

    _, state, _ = peftjax.split(model.base_model)
    leaves = zip(jax.tree.leaves(weight_decay_mask(state, model.base_model)), jax.tree.leaves(state))
    counted = [0, 0]
    for decays, value in leaves:
        counted[0 if decays else 1] += value.size
    assert tuple(counted) == expected and min(expected) > 0


def _train_llama_both_ways(tmp_path, data: dict, common: dict):
    """LoRA on the tiny Llama trained from one start by peftjax's Trainer and by transformers'
    Trainer + PEFT (dropout off): ``(our log, their log, our adapter, their adapter)``."""
    torch_model = _tiny.save("llama", tmp_path / "base")
    lora = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                              init_lora_weights=False)
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), lora, key=jax.random.key(5))
    model.save_pretrained(tmp_path / "init")
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "peftjax"), save_steps=0, disable_tqdm=True,
                                     plot=False, report_to="none", **common)
    trainer = peftjax.Trainer(model, args, train_dataset=data)
    trainer.train()
    ours = read_safetensors(tmp_path / "peftjax" / "adapter_model.safetensors")[0]

    def collate(features):
        longest = max(len(f["input_ids"]) for f in features)
        pad = [longest - len(f["input_ids"]) for f in features]
        return {"input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
                "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
                "labels": torch.tensor([f["labels"] + [-100] * p for f, p in zip(features, pad)])}

    their_log, theirs = _train_with_transformers(torch_model, tmp_path, data, common, collate)
    return trainer.log_history, their_log, ours, theirs


def test_a_causal_lm_accumulates_gradients_as_transformers_trainer_does(tmp_path):
    """A language model over rows of different lengths, two micro-batches an optimizer step:
    transformers weighs every label token of the step alike (``num_items_in_batch``), not each
    micro-batch's mean alike; peftjax's adapter, losses and rates must be transformers'. Each
    optimizer step takes all rows (one per epoch), so the two frameworks' shuffles do not matter."""
    rng = np.random.default_rng(2)
    ids = [rng.integers(3, 90, int(n)).tolist() for n in (3, 12, 4, 11, 5, 10, 2, 12)]  # uneven halves
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=4,
                  learning_rate=1e-2, warmup_steps=1, lr_scheduler_type="cosine", logging_steps=1, seed=0)
    _assert_same_training(*_train_llama_both_ways(tmp_path, {"input_ids": ids, "labels": ids}, common), steps=4)


def test_an_epoch_s_leftover_batches_make_a_shorter_step_as_in_transformers(tmp_path):
    """Three batches an epoch, two accumulated a step: as in transformers, an epoch is two
    optimizer steps (two batches, then the one left), no step spans two epochs, and three epochs
    are six steps, not four and a half. The rows are equal, so the shuffles do not matter."""
    row = np.random.default_rng(4).integers(3, 90, 9).tolist()
    common = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, num_train_epochs=3,
                  learning_rate=1e-2, warmup_steps=2, lr_scheduler_type="linear", logging_steps=1, seed=0)
    _assert_same_training(*_train_llama_both_ways(tmp_path, {"input_ids": [row] * 10, "labels": [row] * 10}, common),
                          steps=6)
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "count"), **common)
    assert args.num_training_steps(10) == 6  # what AdaLoRA's total_step is told, before a run
    with pytest.raises(ValueError, match="num_rows must be a positive number of training rows, got 0"):
        args.num_training_steps(0)


def test_a_checkpoint_inside_an_accumulated_step_is_refused_by_name(tmp_path):
    """Checkpoints are written as optimizer steps end; one that stopped inside a step (written by
    an earlier version whose steps could span epochs) cannot resume its accumulation correctly:
    refused, naming the checkpoint, rather than resumed with the wrong micro-batches."""
    import json

    model = peftjax.get_peft_model(models.LlamaForCausalLM.from_config(_tiny.config("llama")),
                                   peftjax.LoraConfig(r=2, target_modules=["q_proj"]))
    row = list(range(3, 12))
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
                                     gradient_accumulation_steps=2, max_steps=2, save_steps=1, disable_tqdm=True,
                                     plot=False, report_to="none")
    peftjax.Trainer(model, args, train_dataset={"input_ids": [row] * 12, "labels": [row] * 12}).train()
    state_file = tmp_path / "run" / "checkpoint-1" / "trainer_state.json"
    info = json.loads(state_file.read_text())
    assert info["micro_step"] == 2
    state_file.write_text(json.dumps({**info, "micro_step": 1}))  # inside the first step
    with pytest.raises(peftjax.training.TrainingError, match=r"checkpoint-1 stopped inside an optimizer step"):
        peftjax.Trainer(model, args, train_dataset={"input_ids": [row] * 12, "labels": [row] * 12}).train(
            resume_from_checkpoint=str(state_file.parent))


def _cpt_data():
    """Four rows of one in-context example each (types 1-4 of PEFT's CPT template scheme)."""
    rng = np.random.default_rng(7)
    ids = [rng.integers(3, 90, n).tolist() for n in (6, 9, 5, 8)]
    types = [[1, 2, 2, 3] + [4] * (len(row) - 4) for row in ids]
    return {"input_ids": ids, "labels": ids, "input_type_mask": types}


def _cpt_run(model, tmp_path, name: str, **common):
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / name), save_steps=0, disable_tqdm=True, plot=False,
                                     report_to="none", **common)
    trainer = peftjax.Trainer(model, args, train_dataset=_cpt_data())
    trainer.train()
    return trainer.log_history, read_safetensors(tmp_path / name / "adapter_model.safetensors")[0]


def test_cpt_trains_in_the_trainer_as_in_transformers_trainer(tmp_path):
    """CPT from one template in both Trainers (each row's ``input_type_mask`` a column): the same
    losses and adapter; and two accumulated micro-batches an optimizer step give the adapter of
    one batch of all rows, each weighed by the tokens CPT scores (the template's answers too)."""
    transformers = pytest.importorskip("transformers")
    torch_model = _tiny.save("llama", tmp_path / "base")
    config = dict(task_type="CAUSAL_LM", cpt_token_ids=[11, 12, 13, 14, 15, 16], opt_weighted_loss_type="decay",
                  cpt_tokens_type_mask=[1, 2, 3, 4, 4, 4], opt_loss_decay_factor=0.5, opt_projection_epsilon=2.0)
    common = dict(num_train_epochs=3, learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, seed=0)
    ours_log, ours = _cpt_run(peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                                     peftjax.CPTConfig(**config)),
                              tmp_path, "one", per_device_train_batch_size=4, **common)

    def collate(features):
        longest = max(len(f["input_ids"]) for f in features)

        def pad(key, value):
            return torch.tensor([f[key] + [value] * (longest - len(f[key])) for f in features])

        ones = [{"mask": [1] * len(f["input_ids"])} for f in features]
        return {"input_ids": pad("input_ids", 0), "labels": pad("labels", -100),
                "input_type_mask": pad("input_type_mask", 0),
                "attention_mask": torch.tensor([o["mask"] + [0] * (longest - len(o["mask"])) for o in ones])}

    datasets = pytest.importorskip("datasets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_model = peft.get_peft_model(torch_model, peft.CPTConfig(**config))
        oracle = transformers.Trainer(
            model=theirs_model, data_collator=collate, train_dataset=datasets.Dataset.from_dict(_cpt_data()),
            args=transformers.TrainingArguments(output_dir=str(tmp_path / "torch"), save_strategy="no",
                                                report_to="none", disable_tqdm=True, use_cpu=True,
                                                remove_unused_columns=False, per_device_train_batch_size=4, **common))
        oracle.train()
    theirs_model.save_pretrained(str(tmp_path / "torch"))
    theirs = read_safetensors(tmp_path / "torch" / "adapter_model.safetensors")[0]
    _assert_same_training(ours_log, oracle.state.log_history, ours, theirs, steps=3)

    _, accumulated = _cpt_run(peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                                     peftjax.CPTConfig(**config)),
                              tmp_path, "two", per_device_train_batch_size=2, gradient_accumulation_steps=2, **common)
    np.testing.assert_allclose(accumulated["prompt_embeddings"], ours["prompt_embeddings"], atol=1e-6)
