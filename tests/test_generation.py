"""``generate`` decodes as transformers' ``generate`` does with the same settings: the repetition
penalty and minimum length (as arguments and from ``generation_config.json``), top-k 50 when
sampling without one, beam search (its length penalty, early stopping and returned sequences),
several samples per prompt, and a refusal, naming the setting, of what the checkpoint's generation
config asks for and peftjax does not implement."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tr
from _generate import IDS, MASK, hf_generate
from _tiny import save as save_tiny

from peftjax import models


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama checkpoint, its transformers model, and what each greedily writes without limits."""
    path = tmp_path_factory.mktemp("llama")
    save_tiny("llama", path)
    hf = tr.AutoModelForCausalLM.from_pretrained(path).eval()
    free = models.from_pretrained(path).generate(IDS, MASK, max_new_tokens=10, eos_token_id=[])
    return path, hf, free


def test_repetition_penalty_and_min_new_tokens_decode_as_transformers(llama):
    """Greedy decoding with a repetition penalty (the prompt counted from its first real token: the
    left padding is not a repetition) and no EOS before ``min_new_tokens``, token for token as
    transformers' ``generate`` on the same checkpoint; the penalty changes what a tiny model writes."""
    path, hf, free = llama
    model = models.from_pretrained(path)
    stop = int(free[1, 7])  # a token row 1 writes at its second step: EOS, which min_new_tokens holds off
    settings = dict(max_new_tokens=10, eos_token_id=stop, pad_token_id=0)
    for extra in (dict(repetition_penalty=1.8), dict(repetition_penalty=0.6), dict(min_new_tokens=5),
                  dict(repetition_penalty=1.8, min_new_tokens=5)):
        ours = model.generate(IDS, MASK, **settings, **extra)
        np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, do_sample=False, **settings, **extra),
                                      err_msg=str(extra))
        plain = model.generate(IDS, MASK, **settings)
        assert ours.shape != plain.shape or (ours != plain).any(), extra  # the setting changed the decoding
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        model.generate(IDS, MASK, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="min_new_tokens must be an integer >= 0"):
        model.generate(IDS, MASK, min_new_tokens=-1)


def test_a_generation_config_s_penalty_and_minimum_length_apply_unasked(llama, tmp_path):
    """A checkpoint whose ``generation_config.json`` sets a repetition penalty and ``min_length``
    (Qwen2.5 Instruct's sets ``repetition_penalty: 1.05``) generates as transformers' ``generate``
    called with no settings; an argument overrides the file's value (the file's ``min_length``
    still holds, as there: ``min_new_tokens`` is another limit)."""
    path, _, free = llama
    base = tmp_path / "base"
    save_tiny("llama", base)
    stop = int(free[0, 7])
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps(
        {**settings, "repetition_penalty": 1.6, "min_length": 10, "eos_token_id": stop, "pad_token_id": 0}))
    model, hf = models.from_pretrained(base), tr.AutoModelForCausalLM.from_pretrained(base).eval()
    ours = model.generate(IDS, MASK, max_new_tokens=10)
    np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, max_new_tokens=10))
    assert stop not in ours[:, 6:10]  # min_length 10 counts the 6 prompt tokens: no EOS in the first 4
    unpenalized = model.generate(IDS, MASK, max_new_tokens=10, repetition_penalty=1.0)
    np.testing.assert_array_equal(unpenalized, hf_generate(hf, IDS, MASK, max_new_tokens=10, repetition_penalty=1.0))
    assert unpenalized.shape != ours.shape or (unpenalized != ours).any()


def test_sampling_without_top_k_keeps_transformers_default_fifty(llama):
    """Sampling with no ``top_k`` anywhere draws from the 50 likeliest tokens, as transformers'
    ``generate`` does (its ``GenerationConfig`` default); ``top_k=0`` turns the filter off. At
    temperature 8 over a 96-token vocabulary, 1,024 draws without the filter reach past the 50th."""
    path, hf, _ = llama
    model = models.from_pretrained(path)
    prompt = IDS[:1]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(prompt)).logits[0, -1].numpy()
    top50 = set(np.argsort(logits)[::-1][:50].tolist())
    rows = np.repeat(prompt, 1024, axis=0)
    ours = set(model.generate(rows, max_new_tokens=1, do_sample=True, temperature=8.0, seed=3)[:, -1].tolist())
    torch.manual_seed(0)
    theirs = set(hf_generate(hf, rows, np.ones_like(rows), max_new_tokens=1, do_sample=True, temperature=8.0,
                             pad_token_id=0)[:, -1].tolist())
    assert ours <= top50 and theirs <= top50, (sorted(ours - top50), sorted(theirs - top50))
    assert len(ours) > 40 and len(theirs) > 40
    unfiltered = set(model.generate(rows, max_new_tokens=1, do_sample=True, temperature=8.0, top_k=0,
                                    seed=3)[:, -1].tolist())
    assert unfiltered - top50


def test_the_penalty_counts_the_decoder_s_tokens_of_an_encoder_decoder(tmp_path):
    """T5: the repetition penalty over the decoder's tokens (the start token among them) and
    ``min_new_tokens``, token for token as transformers' ``generate``."""
    save_tiny("t5", tmp_path)
    model, hf = models.from_pretrained(tmp_path), tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids, mask = IDS[:, ::-1].copy(), MASK[:, ::-1].copy()  # T5 pads on the right
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    penalized = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[], repetition_penalty=2.0)
    # EOS: the tiny model's first token, which min_new_tokens holds off, or one only the penalty reaches
    for extra, stop in ((dict(min_new_tokens=4), int(free[0, 1])), (dict(repetition_penalty=2.0), int(penalized[0, 3])),
                        (dict(repetition_penalty=2.0, min_new_tokens=4), int(free[0, 1]))):
        settings = dict(max_new_tokens=8, eos_token_id=stop, **extra)
        ours = model.generate(ids, mask, **settings)
        np.testing.assert_array_equal(ours, hf_generate(hf, ids, mask, do_sample=False, **settings), err_msg=str(extra))
        plain = model.generate(ids, mask, max_new_tokens=8, eos_token_id=stop)
        assert ours.shape != plain.shape or (ours != plain).any(), extra


@pytest.mark.parametrize("setting", [dict(num_beam_groups=2), dict(penalty_alpha=0.6), dict(guidance_scale=1.5),
                                     dict(max_time=5.0), dict(token_healing=True)])
def test_a_generation_config_asking_for_unimplemented_decoding_is_refused_by_name(llama, tmp_path, setting):
    """Diverse beam groups, contrastive search (both loaded from the Hub by transformers 5),
    classifier-free guidance, a time limit and token healing are refused, greedy or sampled, naming
    the setting and how to drop it, rather than decoding otherwise than transformers; dropping it
    with ``replace`` decodes."""
    base = tmp_path / "base"
    save_tiny("llama", base)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, **setting}))
    model = models.from_pretrained(base)
    (name, value), = setting.items()
    for do_sample in (True, False):
        with pytest.raises(ValueError, match=rf"generation_config.json sets {name}={value}.*replace\({name}=None\)"):
            model.generate(IDS, MASK, max_new_tokens=2, do_sample=do_sample)
    model.generation_config = model.generation_config.replace(**{name: None})
    assert model.generate(IDS, MASK, max_new_tokens=2, do_sample=True).shape == (2, 8)


BEAM_SETTINGS = [dict(num_beams=4), dict(num_beams=4, num_return_sequences=3), dict(num_beams=3, length_penalty=2.0),
                 dict(num_beams=3, early_stopping=True), dict(num_beams=3, early_stopping="never", length_penalty=0.5),
                 dict(num_beams=3, early_stopping="never", length_penalty=-1.0),
                 dict(num_beams=2, repetition_penalty=1.8, min_new_tokens=4)]


def _beam_stops(free: np.ndarray, prompt: int) -> list[list[int]]:
    """EOS choices that end beams at different steps: tokens the free run writes early."""
    return [[int(free[0, prompt + 1])], [int(free[1, prompt + 2]), int(free[0, prompt + 4])]]


def test_beam_search_decodes_as_transformers(llama):
    """Beam search on left-padded prompts, token for token as transformers' ``generate`` with the
    same settings: beams ending at EOS at different steps (one EOS id and two), the returned
    sequences best first, the length penalty (favouring length, and not), early stopping in each
    of its three modes, the repetition penalty and minimum length over the beams' log
    probabilities. A pad id of 0 fills a short beam with its first EOS id, as transformers' does."""
    path, hf, free = llama
    model = models.from_pretrained(path)
    greedy = model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[])
    filled = False
    for eos in _beam_stops(free, IDS.shape[1]):
        for pad in (0, 2):
            for extra in BEAM_SETTINGS:
                settings = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=pad, **extra)
                ours = model.generate(IDS, MASK, **settings)
                np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, do_sample=False, **settings),
                                              err_msg=str(settings))
                n = extra.get("num_return_sequences", 1)
                assert ours.shape[0] == IDS.shape[0] * n
                np.testing.assert_array_equal(ours[::n, :IDS.shape[1]], IDS)
                fill = pad or eos[0]
                filled |= bool((ours[:, -1] == fill).any() and (ours[:, -1] != fill).any())
    assert filled  # some beams ended before others: the EOS path ran
    beams = model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[], num_beams=4)
    assert (beams != greedy).any()  # the search found another sequence than greedy's
    np.testing.assert_array_equal(beams, hf_generate(hf, IDS, MASK, max_new_tokens=10, eos_token_id=[],
                                                     pad_token_id=2, num_beams=4, do_sample=False))


def test_an_encoder_decoder_searches_beams_as_transformers(tmp_path):
    """T5: the input encoded once and repeated per beam, the beams decoded from the start token,
    the scores' lengths counted after it, as transformers' ``generate``."""
    save_tiny("t5", tmp_path / "tiny")
    hf = tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "tiny").eval()
    with torch.no_grad():  # the tiny decoder repeats one token; stronger weights make it write varied ones
        for name, weight in hf.decoder.named_parameters():
            if "DenseReluDense" in name or "SelfAttention" in name:
                weight.mul_(5)
    hf.save_pretrained(tmp_path / "varied")
    model = models.from_pretrained(tmp_path / "varied")
    ids, mask = IDS[:, ::-1].copy(), MASK[:, ::-1].copy()  # T5 pads on the right
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    assert len(set(free[:, 1:].ravel().tolist())) > 6
    ended = False
    for eos in ([int(free[0, 2])], [int(free[1, 3]), int(free[0, 5])]):
        for extra in BEAM_SETTINGS:
            settings = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0, **extra)
            ours = model.generate(ids, mask, **settings)
            np.testing.assert_array_equal(ours, hf_generate(hf, ids, mask, do_sample=False, **settings),
                                          err_msg=str(settings))
            ended |= bool(np.isin(ours[:, 1:], eos).any())
    assert ended


def test_a_generation_config_s_beams_apply_unasked(llama, tmp_path):
    """A checkpoint whose ``generation_config.json`` asks for beams (BART's and Marian's do) searches
    them when ``generate`` is called with no settings, as transformers'; an argument overrides it."""
    path, _, free = llama
    base = tmp_path / "base"
    save_tiny("llama", base)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps(
        {**settings, "num_beams": 3, "num_return_sequences": 2, "length_penalty": 1.5, "early_stopping": True,
         "eos_token_id": int(free[0, 7]), "pad_token_id": 0}))
    model, hf = models.from_pretrained(base), tr.AutoModelForCausalLM.from_pretrained(base).eval()
    ours = model.generate(IDS, MASK, max_new_tokens=10)
    assert ours.shape[0] == 4
    np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, max_new_tokens=10))
    greedy = model.generate(IDS, MASK, max_new_tokens=10, num_beams=1, num_return_sequences=1)
    np.testing.assert_array_equal(greedy, hf_generate(hf, IDS, MASK, max_new_tokens=10, num_beams=1,
                                                      num_return_sequences=1))


def test_a_generation_config_s_renormalized_scores_steer_the_beams(tmp_path):
    """``renormalize_logits`` (transformers' ``LogitNormalization``): each beam's log probabilities
    normalised again after the processors; with a penalty below 1 on a sharper tiny model that picks
    other beams, as transformers' ``generate`` does."""
    save_tiny("llama", tmp_path / "tiny")
    hf = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(4)
    hf.save_pretrained(tmp_path / "sharp")
    model = models.from_pretrained(tmp_path / "sharp")
    settings = dict(max_new_tokens=10, num_beams=3, repetition_penalty=0.3, eos_token_id=[], pad_token_id=2)
    plain = model.generate(IDS, MASK, **settings)
    model.generation_config = model.generation_config.replace(renormalize_logits=True)
    renormalized = model.generate(IDS, MASK, **settings)
    np.testing.assert_array_equal(renormalized, hf_generate(hf, IDS, MASK, do_sample=False, renormalize_logits=True,
                                                            **settings))
    assert (renormalized != plain).any()


@pytest.fixture(scope="module")
def sharp(tmp_path_factory):
    """A tiny Llama whose next-token distribution is peaked (its head scaled up), both frameworks'."""
    path = tmp_path_factory.mktemp("sharp")
    save_tiny("llama", path / "tiny")
    hf = tr.AutoModelForCausalLM.from_pretrained(path / "tiny").eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(4)
    hf.save_pretrained(path / "sharp")
    return models.from_pretrained(path / "sharp"), hf


def test_beam_sampling_at_a_low_temperature_is_beam_search(sharp):
    """Beam sampling (``num_beams`` with ``do_sample``), whose draws concentrate on the best
    continuations as the temperature falls: at 0.01 it returns beam search's sequences, as
    transformers' beam sampling and beam search do on the same checkpoint (ends at EOS, the
    length penalty, several sequences)."""
    model, hf = sharp
    for extra in (dict(num_beams=3, num_return_sequences=2), dict(num_beams=4, length_penalty=2.0, top_k=20)):
        settings = dict(max_new_tokens=10, eos_token_id=[3], pad_token_id=2, **extra)
        searched = hf_generate(hf, IDS, MASK, do_sample=False, **settings)
        torch.manual_seed(0)
        np.testing.assert_array_equal(hf_generate(hf, IDS, MASK, do_sample=True, temperature=0.01, **settings),
                                      searched)
        for seed in (0, 1):
            np.testing.assert_array_equal(model.generate(IDS, MASK, do_sample=True, temperature=0.01, seed=seed,
                                                         **settings), searched, err_msg=str(extra))


def _histogram(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens, minlength=96) / len(tokens)


def test_beam_sampling_draws_continuations_as_transformers_draws_them(sharp):
    """Beam sampling at temperature 1.5 draws ``2 * num_beams`` continuations without replacement
    and keeps the best: over 1,024 prompts, the first and second returned tokens follow
    transformers' distribution (total variation under 0.15, where two of peftjax's seeds differ
    by about 0.05 and plain sampling's first tokens by 0.5); the seed fixes the draw."""
    model, hf = sharp
    rows = np.repeat(IDS[:1], 1024, axis=0)
    settings = dict(max_new_tokens=1, eos_token_id=[], pad_token_id=2, num_beams=2, num_return_sequences=2,
                    do_sample=True, temperature=1.5)
    ours = model.generate(rows, **settings, seed=0)[:, -1]
    torch.manual_seed(0)
    theirs = hf_generate(hf, rows, np.ones_like(rows), **settings)[:, -1]
    for k in (0, 1):  # the best returned continuation, then the second
        distance = 0.5 * np.abs(_histogram(ours[k::2]) - _histogram(theirs[k::2])).sum()
        assert distance < 0.15, (k, distance)
    plain = model.generate(rows, max_new_tokens=1, do_sample=True, temperature=1.5, seed=0)[:, -1]
    assert 0.5 * np.abs(_histogram(ours[::2]) - _histogram(plain)).sum() > 0.3
    np.testing.assert_array_equal(model.generate(rows[:4], **settings, seed=0), model.generate(rows[:4], **settings,
                                                                                               seed=0))


def test_samples_per_prompt_are_consecutive_rows(llama):
    """``num_return_sequences`` with sampling: that many independent samples of each prompt, in
    consecutive rows, as transformers returns them."""
    path, _, _ = llama
    model = models.from_pretrained(path)
    out = model.generate(IDS, MASK, max_new_tokens=6, do_sample=True, temperature=3.0, num_return_sequences=4,
                         eos_token_id=[], seed=1)
    assert out.shape == (8, 12)
    np.testing.assert_array_equal(out[:, :6], np.repeat(IDS, 4, axis=0))
    assert len({tuple(row) for row in out[:4, 6:]}) > 1 and len({tuple(row) for row in out[4:, 6:]}) > 1
    one = model.generate(IDS[1:], MASK[1:], max_new_tokens=6, do_sample=True, temperature=3.0, eos_token_id=[],
                         seed=1)
    assert one.shape == (1, 12)


@pytest.mark.parametrize(("settings", "error", "message"), [
    (dict(num_beams=2, num_return_sequences=3), ValueError, r"num_return_sequences \(3\) must be at most num_beams"),
    (dict(num_return_sequences=2), ValueError, "greedy decoding returns one sequence per input"),
    (dict(num_beams=0), ValueError, "num_beams must be an integer >= 1"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping must be True, False or 'never'"),
])
def test_bad_beam_settings_are_refused(llama, settings, error, message):
    path, _, _ = llama
    with pytest.raises(error, match=message):
        models.from_pretrained(path).generate(IDS, MASK, max_new_tokens=2, **settings)


@pytest.mark.parametrize("family", ["gpt2", "gemma4_text", "qwen3_5_text", "deepseek_v3"])
def test_beam_search_reorders_every_kind_of_cache(family, tmp_path):
    """Each beam step reorders the cache's rows: GPT-2's own cache, Gemma 4's (layers sharing
    another's keys hold none), Qwen3.5's linear-attention state and convolution window, and
    DeepSeek-V3's latent cache; token for token as transformers' ``generate`` with beams."""
    save_tiny(family, tmp_path)
    model, hf = models.from_pretrained(tmp_path), tr.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    free = model.generate(IDS, MASK, max_new_tokens=8, eos_token_id=[])
    for eos in ([int(free[0, 7])], [int(free[1, 8])]):
        settings = dict(max_new_tokens=8, eos_token_id=eos, pad_token_id=0, num_beams=3, num_return_sequences=2)
        np.testing.assert_array_equal(model.generate(IDS, MASK, **settings),
                                      hf_generate(hf, IDS, MASK, do_sample=False, **settings), err_msg=str(eos))


def test_repeated_ngrams_are_blocked_as_transformers_blocks_them(llama, tmp_path):
    """``no_repeat_ngram_size``: no token that would repeat an n-gram of the row (its prompt, left
    padding and all, as transformers' ``input_ids``), greedy, with beams (each beam's own sequence)
    and with the other processors, token for token as transformers' ``generate``; from the
    generation config too; the tiny model repeats itself without it."""
    path, hf, free = llama
    model = models.from_pretrained(path)
    assert len({tuple(free[0, i:i + 3]) for i in range(free.shape[1] - 2)}) < free.shape[1] - 2  # a repeat
    stop = int(free[1, 8])
    for extra in (dict(no_repeat_ngram_size=3), dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1),
                  dict(no_repeat_ngram_size=2, num_beams=3, num_return_sequences=2),
                  dict(no_repeat_ngram_size=3, repetition_penalty=1.5, min_new_tokens=3)):
        settings = dict(max_new_tokens=10, eos_token_id=stop, pad_token_id=0, **extra)
        ours = model.generate(IDS, MASK, **settings)
        np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, do_sample=False, **settings),
                                      err_msg=str(extra))
        n = extra["no_repeat_ngram_size"]
        for row in ours:
            new = row[IDS.shape[1]:]
            row = row[:IDS.shape[1] + (list(new).index(stop) + 1 if stop in new else len(new))]  # to its EOS
            grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
            assert len(grams) == len(set(grams)) or n == 1, (extra, row)
    base = tmp_path / "base"
    save_tiny("llama", base)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, "no_repeat_ngram_size": 2, "pad_token_id": 0}))
    from_file, hf_file = models.from_pretrained(base), tr.AutoModelForCausalLM.from_pretrained(base).eval()
    np.testing.assert_array_equal(from_file.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[]),
                                  hf_generate(hf_file, IDS, MASK, max_new_tokens=10, eos_token_id=[]))
    with pytest.raises(ValueError, match="no_repeat_ngram_size must be an integer >= 0"):
        model.generate(IDS, MASK, no_repeat_ngram_size=-2)


def test_an_encoder_decoder_blocks_the_decoder_s_repeated_ngrams(tmp_path):
    """T5: n-grams over the decoder's tokens (the start token among them), greedy and with beams,
    as transformers' ``generate``."""
    save_tiny("t5", tmp_path)
    model, hf = models.from_pretrained(tmp_path), tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids, mask = IDS[:, ::-1].copy(), MASK[:, ::-1].copy()
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    for extra in (dict(no_repeat_ngram_size=2), dict(no_repeat_ngram_size=1, num_beams=2)):
        settings = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=2, **extra)  # transformers' beams need a pad
        ours = model.generate(ids, mask, **settings)
        np.testing.assert_array_equal(ours, hf_generate(hf, ids, mask, do_sample=False, **settings), err_msg=str(extra))
        assert (ours != free).any()  # the tiny decoder repeats one token; blocked, it writes others
