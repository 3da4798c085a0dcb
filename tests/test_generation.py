"""``generate`` decodes as transformers' ``generate`` does with the same settings: the repetition
penalty and minimum length (as arguments and from ``generation_config.json``), top-k 50 when
sampling without one, and a refusal, naming the setting, of what the checkpoint's generation config
asks for and peftjax does not implement."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import transformers as tr
from _tiny import save as save_tiny

from peftjax import models

IDS = np.array([[1, 5, 9, 12, 7, 5], [0, 0, 3, 7, 11, 3]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def hf_generate(model, ids, mask, **settings) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **settings).numpy()


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


@pytest.mark.parametrize(("setting", "sampled_only"), [
    (dict(num_beams=4), False), (dict(no_repeat_ngram_size=3), False),  # any decoding
    (dict(typical_p=0.9), True), (dict(min_p=0.1), True),  # sampling only
])
def test_a_generation_config_asking_for_unimplemented_decoding_is_refused_by_name(llama, tmp_path, setting,
                                                                                   sampled_only):
    """Beam search, n-gram blocking and the sampling filters peftjax lacks are refused, naming the
    setting and how to drop it, rather than decoding otherwise than transformers; a sampling-only
    setting does not stop greedy decoding; dropping the setting with ``replace`` decodes."""
    base = tmp_path / "base"
    save_tiny("llama", base)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, **setting}))
    model = models.from_pretrained(base)
    (name, value), = setting.items()
    with pytest.raises(ValueError, match=rf"generation_config.json sets {name}={value}.*replace\({name}=None\)"):
        model.generate(IDS, MASK, max_new_tokens=2, do_sample=True)
    if sampled_only:
        assert model.generate(IDS, MASK, max_new_tokens=2).shape == (2, 8)
    model.generation_config = model.generation_config.replace(**{name: None})
    assert model.generate(IDS, MASK, max_new_tokens=2, do_sample=True).shape == (2, 8)
