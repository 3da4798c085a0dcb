"""``generate(..., output_scores=True, output_logits=True, return_dict_in_generate=True)`` returns what
transformers' returns: the sequences, each step's processed scores (the logits processors, and the
sampling filters when sampling) and raw logits, for a decoder and an encoder-decoder;
``compute_transition_scores`` reads them as transformers' does."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import transformers as tr
from _generate import IDS, MASK
from _tiny import save as save_tiny

from peftjax import models


def hf_dict(model, ids, mask, **settings):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), return_dict_in_generate=True,
                              output_scores=True, output_logits=True, **settings)


def assert_steps_equal(ours, theirs, atol=1e-5):
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        b = b.numpy()
        assert a.shape == b.shape and a.dtype == np.float32
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b))  # what the processors ruled out
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], atol=atol, rtol=1e-5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_tiny("llama", path)
    return models.from_pretrained(path), tr.AutoModelForCausalLM.from_pretrained(path).eval()


def test_a_decoder_returns_transformers_scores_and_logits(llama):
    """Greedy with the repetition penalty, a minimum length and a bad word: the scores are the
    processed logits (a penalised token lower, EOS and the bad word -inf), the logits the raw ones;
    a row that ends (EOS) scores on, as in transformers."""
    ours, theirs = llama
    free = ours.generate(IDS, MASK, max_new_tokens=6, eos_token_id=[])
    settings = dict(max_new_tokens=6, eos_token_id=int(free[1, 8]), pad_token_id=0, repetition_penalty=1.5,
                    min_new_tokens=2, bad_words_ids=[[int(free[0, 7])]])
    out = ours.generate(IDS, MASK, output_scores=True, output_logits=True, return_dict_in_generate=True, **settings)
    expected = hf_dict(theirs, IDS, MASK, do_sample=False, **settings)
    np.testing.assert_array_equal(out.sequences, expected.sequences.numpy())
    assert out.keys() == ["sequences", "scores", "logits"] and out["sequences"] is out.sequences
    assert_steps_equal(out.scores, expected.scores)
    assert_steps_equal(out.logits, expected.logits)
    assert any(np.isneginf(s).any() for s in out.scores) and not any(np.isneginf(x).any() for x in out.logits)
    # compute_transition_scores: transformers' on the same scores
    for normalize in (False, True):
        np.testing.assert_allclose(
            ours.compute_transition_scores(out.sequences, out.scores, normalize_logits=normalize),
            theirs.compute_transition_scores(expected.sequences, expected.scores, normalize_logits=normalize).numpy(),
            atol=1e-5)


def test_sampled_scores_are_the_filtered_logits_the_tokens_were_drawn_from(llama):
    """Sampling with a temperature, top-k and top-p: the first step's scores (before any draw) are
    transformers'; every drawn token has a finite score, and the rows repeat for several samples."""
    ours, theirs = llama
    settings = dict(max_new_tokens=4, do_sample=True, temperature=0.7, top_k=5, top_p=0.9, eos_token_id=[])
    out = ours.generate(IDS, MASK, output_scores=True, return_dict_in_generate=True, num_return_sequences=2, seed=3,
                        **settings)
    assert out.logits is None and len(out.scores) == 4 and out.scores[0].shape == (4, 96)
    expected = hf_dict(theirs, np.repeat(IDS, 2, axis=0), np.repeat(MASK, 2, axis=0),
                       **{**settings, "eos_token_id": None})
    assert_steps_equal(out.scores[:1], expected.scores[:1])
    assert 1 <= np.isfinite(out.scores[0]).sum(axis=-1).max() <= 5
    chosen = ours.compute_transition_scores(out.sequences, out.scores)
    assert chosen.shape == (4, 4) and np.isfinite(chosen).all()


def test_an_encoder_decoder_returns_transformers_scores_and_logits(tmp_path):
    save_tiny("t5", tmp_path)
    ours, theirs = models.from_pretrained(tmp_path), tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids, mask = IDS[:, ::-1].copy(), MASK[:, ::-1].copy()
    settings = dict(max_new_tokens=5, eos_token_id=[], no_repeat_ngram_size=1)
    out = ours.generate(ids, mask, output_scores=True, output_logits=True, return_dict_in_generate=True, **settings)
    expected = hf_dict(theirs, ids, mask, do_sample=False, **{**settings, "eos_token_id": None})
    np.testing.assert_array_equal(out.sequences, expected.sequences.numpy())
    assert_steps_equal(out.scores, expected.scores)
    assert_steps_equal(out.logits, expected.logits)


def test_the_generation_config_s_settings_apply_and_scores_need_a_dict(llama, tmp_path):
    """``output_scores`` without ``return_dict_in_generate`` returns the array, as transformers'; a
    checkpoint whose ``generation_config.json`` asks for both gets the dict unasked; beams refuse."""
    ours, _ = llama
    plain = ours.generate(IDS, MASK, max_new_tokens=3)
    np.testing.assert_array_equal(ours.generate(IDS, MASK, max_new_tokens=3, output_scores=True), plain)
    ours.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"return_dict_in_generate": True,
                                                                 "output_scores": True}))
    configured = models.from_pretrained(tmp_path)
    out = configured.generate(IDS, MASK, max_new_tokens=3)
    np.testing.assert_array_equal(out.sequences, plain)
    assert len(out.scores) == plain.shape[1] - IDS.shape[1] and out.logits is None
    assert configured.generate(IDS, MASK, max_new_tokens=3, return_dict_in_generate=False).shape == plain.shape
    with pytest.raises(NotImplementedError, match=r"\['output_scores', 'return_dict_in_generate'\] with beam search"):
        configured.generate(IDS, MASK, max_new_tokens=3, num_beams=2)


def test_logprobs_are_the_raw_logits_log_softmax_at_the_chosen_and_likeliest_tokens(llama):
    """``output_logprobs=K``: the chosen token's log probability and the K likeliest tokens' (ids and
    log probabilities), under the raw logits, from transformers' logits of the same steps;
    ``output_logprobs=0``: the chosen one's only."""
    ours, theirs = llama
    settings = dict(max_new_tokens=5, eos_token_id=[], repetition_penalty=1.5)  # the scores differ from logits
    out = ours.generate(IDS, MASK, return_dict_in_generate=True, output_logprobs=3, **settings)
    expected = hf_dict(theirs, IDS, MASK, do_sample=False, **{**settings, "eos_token_id": None})
    np.testing.assert_array_equal(out.sequences, expected.sequences.numpy())
    log_probs = torch.log_softmax(torch.stack(expected.logits, dim=1).float(), dim=-1).numpy()  # [rows, steps, vocab]
    chosen = out.sequences[:, IDS.shape[1]:]
    assert out.logprobs.shape == chosen.shape and out.top_ids.shape == (*chosen.shape, 3)
    np.testing.assert_allclose(out.logprobs, np.take_along_axis(log_probs, chosen[..., None], -1)[..., 0], atol=1e-5)
    likeliest = np.argsort(-log_probs, axis=-1)[..., :3]
    np.testing.assert_array_equal(out.top_ids, likeliest)
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(log_probs, likeliest, -1), atol=1e-5)
    assert out.scores is None and out.logits is None
    only = ours.generate(IDS, MASK, return_dict_in_generate=True, output_logprobs=0, **settings)
    np.testing.assert_array_equal(only.logprobs, out.logprobs)
    assert only.top_ids is None and only.keys() == ["sequences", "logprobs"]
    with pytest.raises(ValueError, match="output_logprobs must be an integer >= 0"):
        ours.generate(IDS, MASK, return_dict_in_generate=True, output_logprobs=-1, **settings)
