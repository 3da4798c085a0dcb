"""GPT-2 against PyTorch transformers: logits, loss, generation, Conv1D weights, dropout, I/O."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import lazy, padded_batch, save_tiny, torch_logits

from peftjax import models

torch = lazy("torch")  # the PyTorch oracle: a test that uses it skips without it

# _tiny's GPT-2, twice as wide, with a larger vocabulary and more positions, and a larger init than
# GPT-2's 0.02 so that greedy decoding does not just repeat one token
TINY = dict(vocab_size=128, n_embd=64, n_positions=64, initializer_range=0.2)
VARIANTS = {
    "gpt2": {},
    # the non-default attention flags (the upcast path exists only in torch's eager attention)
    "gpt2-flags": dict(
        scale_attn_by_inverse_layer_idx=True,
        reorder_and_upcast_attn=True,
        activation_function="gelu",
        n_inner=96,
        attn_implementation="eager",
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = save_tiny(tr.GPT2LMHeadModel, _tiny.config("gpt2", **TINY, **VARIANTS[request.param]), path)
    return torch_model, models.from_pretrained(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    torch_model = save_tiny(tr.GPT2LMHeadModel, _tiny.config("gpt2", **TINY), path)
    return torch_model, models.from_pretrained(path), path


def _forward(model, jit, **inputs):
    inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    if not jit:
        return model(**inputs)
    return nnx.jit(lambda m, kw: m(**kw))(model, inputs)


def _positions_from_mask(mask):
    """What generate passes: real tokens count from 0, pads get 1."""
    return np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)


@pytest.mark.parametrize("positions", ["arange", "from_mask"])
def test_logits_match_torch_on_left_padded_batch(variant, positions, jit):
    torch_model, model = variant
    assert type(model) is models.GPT2LMHeadModel
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if positions == "from_mask":
        inputs["position_ids"] = _positions_from_mask(mask)
    ref = torch_logits(torch_model, **inputs)
    out = np.asarray(_forward(model, jit, **inputs).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)


def test_position_ids_change_left_padded_rows(gpt2):
    # guards the test above: the two position schemes must not agree by accident
    _, model, _ = gpt2
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    a = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    b = np.asarray(model(input_ids=ids, attention_mask=mask, position_ids=_positions_from_mask(mask)).logits)
    np.testing.assert_array_equal(a[0], b[0])  # row 0 has no padding
    assert np.abs(a[1:] - b[1:])[mask[1:].astype(bool)].max() > 1e-2


def test_token_type_ids_match_torch(gpt2, jit):
    torch_model, model, _ = gpt2
    ids, mask = padded_batch(TINY["vocab_size"], seq=7, left=False)
    types = (np.arange(7)[None, :] >= 3).astype(np.int64).repeat(3, axis=0)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = np.asarray(_forward(model, jit, input_ids=ids, attention_mask=mask, token_type_ids=types).logits)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref[valid], atol=1e-5, rtol=0)


def test_loss_matches_torch(variant, jit):
    torch_model, model = variant
    # right padding: with left padding the first real label is predicted from a fully masked
    # query row, whose output no implementation defines the same way
    ids, mask = padded_batch(TINY["vocab_size"], seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    labels[0, 4] = -100
    with torch.no_grad():
        ref = torch_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)
        ).loss.item()
    out = _forward(model, jit, input_ids=ids, attention_mask=mask, labels=labels).loss
    assert abs(float(out) - ref) <= 1e-5


def test_greedy_generation_matches_hf_generate(variant):
    torch_model, model = variant
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=6)
    ours = model.generate(ids, mask, max_new_tokens=8, pad_token_id=0)
    with torch.no_grad():
        ref = torch_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ours[:, 6:].ravel().tolist())) > 2  # a real continuation, not one repeated token


def test_sampling_is_seeded_and_top_k_1_is_greedy(gpt2):
    _, model, _ = gpt2
    ids, mask = padded_batch(TINY["vocab_size"], batch=2, seq=6)
    kw = dict(max_new_tokens=5, do_sample=True, temperature=0.7, top_p=0.9, pad_token_id=0)
    a = model.generate(ids, mask, seed=3, **kw)
    np.testing.assert_array_equal(a, model.generate(ids, mask, seed=3, **kw))
    greedy = model.generate(ids, mask, max_new_tokens=5, pad_token_id=0)
    top1 = model.generate(ids, mask, max_new_tokens=5, do_sample=True, top_k=1, seed=7, pad_token_id=0)
    np.testing.assert_array_equal(top1, greedy)


def test_saved_checkpoint_loads_in_transformers(gpt2, tmp_path):
    torch_model, model, _ = gpt2
    model.save_pretrained(tmp_path)
    saved = models.read_checkpoint(tmp_path)
    assert "lm_head.weight" not in saved  # tied: transformers restores it from wte
    for name, ref in torch_model.state_dict().items():
        if name != "lm_head.weight":
            assert saved[name].shape == tuple(ref.shape), name
    assert saved["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)  # Conv1D: (in, out)
    np.testing.assert_array_equal(
        saved["transformer.h.1.mlp.c_fc.weight"], torch_model.transformer.h[1].mlp.c_fc.weight.detach().numpy()
    )
    reloaded = tr.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(TINY["vocab_size"], seq=7)
    valid = mask.astype(bool)
    ours = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    ref = torch_logits(reloaded, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=1e-5)


def test_conv1d_is_a_linear_layer_with_torch_layout(gpt2):
    _, model, _ = gpt2
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, models.Conv1D) and isinstance(c_attn, nnx.Linear)
    assert (c_attn.in_features, c_attn.out_features) == (64, 192)
    assert jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) == []  # only parameters, no RNG state


def test_bare_model_loads_lm_checkpoint(gpt2):
    torch_model, _, path = gpt2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head-less model drops nothing it should warn about
        bare = models.GPT2Model.from_pretrained(path)
    ids, mask = padded_batch(TINY["vocab_size"], seq=6)
    with torch.no_grad():
        ref = torch_model.transformer(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = np.asarray(bare(input_ids=ids, attention_mask=mask).last_hidden_state)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[valid], ref.last_hidden_state.numpy()[valid], atol=1e-5)


def test_sequence_classification_matches_torch(tmp_path):
    config = _tiny.config("gpt2", **TINY, num_labels=3, pad_token_id=0)
    torch_model = save_tiny(tr.GPT2ForSequenceClassification, config, tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model) is models.GPT2ForSequenceClassification
    ids, mask = padded_batch(TINY["vocab_size"], seq=8, left=False)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


# ---------------------------------------------------------------- dropout


@pytest.fixture(scope="module")
def dropout_model():
    config = _tiny.config("gpt2", **TINY, resid_pdrop=0.2, embd_pdrop=0.2, attn_pdrop=0.2)
    return models.GPT2LMHeadModel.from_config(config)


def test_dropout_only_with_a_key(dropout_model):
    ids = np.arange(1, 9)[None, :]
    plain = np.asarray(dropout_model(input_ids=ids).logits)
    np.testing.assert_array_equal(plain, np.asarray(dropout_model(input_ids=ids).logits))
    a = np.asarray(dropout_model(input_ids=ids, dropout_rng=jax.random.key(0)).logits)
    b = np.asarray(_forward(dropout_model, True, input_ids=ids, dropout_rng=jax.random.key(0)).logits)
    c = np.asarray(dropout_model(input_ids=ids, dropout_rng=jax.random.key(1)).logits)
    np.testing.assert_allclose(a, b, atol=1e-5)  # the same key drops the same units, jitted or not
    assert np.abs(a - plain).max() > 1e-3 and np.abs(a - c).max() > 1e-3


def test_dropout_training_step_has_gradients(dropout_model):
    ids = np.arange(1, 9)[None, :]

    def loss(m, key):
        return m(input_ids=ids, labels=ids, dropout_rng=key).loss

    grads = nnx.jit(nnx.grad(loss))(dropout_model, jax.random.key(0))
    c_attn = grads["transformer"]["h"][0]["attn"]["c_attn"]["kernel"].get_value()
    assert c_attn.shape == (64, 192) and np.isfinite(c_attn).all() and np.abs(c_attn).max() > 0


# ---------------------------------------------------------------- bad input


def _rewrite(src, dst, edit):
    from safetensors.torch import load_file, save_file

    dst.mkdir(exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_misshaped_c_attn_weight_names_key_and_shapes(gpt2, tmp_path):
    _, _, path = gpt2
    key = "transformer.h.0.attn.c_attn.weight"

    def reshape(sd):
        sd[key] = sd[key][:, :96].clone()

    expected = r"h\.0\.attn\.c_attn\.weight: expected shape \(64, 192\), found \(64, 96\)"
    with pytest.raises(models.CheckpointError, match=expected):
        models.from_pretrained(_rewrite(path, tmp_path / "bad", reshape))


def test_old_checkpoint_buffers_are_ignored_but_c_attn_bias_is_a_weight(gpt2, tmp_path):
    _, model, path = gpt2

    def old(sd):
        sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
        sd["transformer.h.1.attn.masked_bias"] = torch.tensor(-1e4)
        sd["lm_head.weight"] = sd["transformer.wte.weight"].clone()

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = models.from_pretrained(_rewrite(path, tmp_path / "old", old))
    np.testing.assert_array_equal(
        np.asarray(loaded(input_ids=[[1, 2, 3]]).logits), np.asarray(model(input_ids=[[1, 2, 3]]).logits)
    )
    missing = _rewrite(path, tmp_path / "missing", lambda sd: sd.pop("transformer.h.0.attn.c_attn.bias"))
    with pytest.raises(models.CheckpointError, match=r"h\.0\.attn\.c_attn\.bias"):
        models.from_pretrained(missing)


@pytest.mark.parametrize(
    "override, message",
    [
        (dict(activation_function="prelu"), "activation_function 'prelu'"),
        (dict(add_cross_attention=True), "add_cross_attention"),
        (dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ],
)
def test_unsupported_configs_fail_early(override, message):
    with pytest.raises(ValueError, match=message):
        models.GPT2LMHeadModel.from_config(_tiny.config("gpt2", **TINY, **override))


def test_logits_to_keep_matches_transformers(gpt2, jit):
    """The last n positions' logits (``generate``'s prefill keeps 1), or those at given indices."""
    torch_model, model, _ = gpt2
    ids, mask = padded_batch(TINY["vocab_size"], seq=9)
    for keep in (3, [8, 4, 6]):  # real tokens in every row (up to 4 pads on the left)
        with torch.no_grad():
            ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              logits_to_keep=keep if isinstance(keep, int) else torch.tensor(keep)).logits.numpy()
        call = lambda m, i, a: m(input_ids=i, attention_mask=a, logits_to_keep=keep).logits  # noqa: E731
        out = (nnx.jit(call) if jit else call)(model, ids, mask)
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-5, rtol=0)
