"""``generate``'s other logits processors and sampling filters, against transformers' ``generate``
on the same checkpoint: banned, biased, suppressed and forced tokens and the decaying length
penalty (greedy, over beams, for a decoder and for T5, as arguments and from
``generation_config.json``), and min-p, typical, epsilon and eta sampling (every token drawn is one
transformers' warpers keep, from the PyTorch model's logits; a new value reuses the compiled loop)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers as tr
from _compiles import compilations
from _generate import IDS, MASK, OpenAIPenalties, hf_generate
from _tiny import arch
from _tiny import save as save_tiny

from peftjax import models

N = IDS.shape[1]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama checkpoint, both frameworks' models of it, and what it greedily writes unhindered."""
    path = tmp_path_factory.mktemp("llama")
    save_tiny("llama", path)
    model = models.from_pretrained(path)
    return path, model, tr.AutoModelForCausalLM.from_pretrained(path).eval(), model.generate(
        IDS, MASK, max_new_tokens=10, eos_token_id=[])


BEAMED = ("bad_words_ids", "sequence_bias", "forced_eos_token_id", "exponential_decay_length_penalty",
          "encoder_no_repeat_ngram_size")  # the rules also run over beams (those that read the sequence or the step)


def _rules(free: np.ndarray) -> list[dict]:
    """Token rules that each change what the tiny model writes: built from the tokens it writes."""
    a, b, c = (int(t) for t in free[0, N:N + 3])
    d, e = int(free[1, N]), int(free[1, N + 1])
    return [
        dict(suppress_tokens=[a, d]),
        dict(begin_suppress_tokens=[a, d]),
        dict(bad_words_ids=[[a], [d, e]]),  # one token always, one after another
        dict(bad_words_ids=[[b, c]], sequence_bias={(d,): -4.0}),
        dict(bad_words_ids=[[b], [e]], eos_token_id=[e]),  # a stop token is no bad word (transformers drops it)
        dict(sequence_bias={(a,): -3.0, (a, b): -8.0, (e,): 2.5}),
        dict(sequence_bias=[[[7], 6.0], [[7, 5, d], 9.0]]),  # the list form; a match against the prompt
        dict(forced_eos_token_id=[c, 4]),
        dict(exponential_decay_length_penalty=(2, 1.6), eos_token_id=[b, e]),
        dict(suppress_tokens=[a], bad_words_ids=[[d]], repetition_penalty=1.5, no_repeat_ngram_size=2),
        dict(encoder_no_repeat_ngram_size=1), dict(encoder_no_repeat_ngram_size=2, no_repeat_ngram_size=3),
        # a held-off EOS made finite, then boosted by the length penalty: transformers' order, quirk and all
        dict(remove_invalid_values=True, min_new_tokens=6, exponential_decay_length_penalty=(1, 2.0),
             eos_token_id=[b]),
    ]


def test_token_rules_decode_as_transformers(llama):
    """Each token rule, alone and with the other processors, greedy (and over beams, where a rule
    reads each beam's own sequence or step), token for token as transformers' ``generate`` with the
    same settings on left-padded prompts; each changes what the model writes."""
    _, model, hf, free = llama
    for rule in _rules(free):
        changed = []
        beams = [dict(num_beams=3, num_return_sequences=2)] if set(rule) & set(BEAMED) else []
        for extra in (dict(), *beams):
            # transformers' beams need a pad id other than 0 where no EOS is given
            settings = dict(max_new_tokens=10, pad_token_id=2, **{"eos_token_id": [], **rule}, **extra)
            ours = model.generate(IDS, MASK, **settings)
            np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, do_sample=False, **settings),
                                          err_msg=str(settings))
            plain = model.generate(IDS, MASK, **{**settings, **{k: None for k in rule if k != "eos_token_id"}})
            changed.append(ours.shape != plain.shape or (ours != plain).any())
        assert any(changed), rule
    # a bias just past the gap between the two likeliest first tokens turns the choice, no less
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(IDS[:1])).logits[0, -1].numpy()
    second, first = np.argsort(logits)[-2:]
    outputs = []
    with compilations() as compiled:  # a one-token bias is a value of the compiled loop: a new one compiles nothing
        for scale in (1.2, 0.8):
            bias = {(int(second),): float(scale * (logits[first] - logits[second]))}
            outputs.append((bias, model.generate(IDS, MASK, max_new_tokens=3, eos_token_id=[], sequence_bias=bias)))
    assert compiled.count("_generate") == 1, compiled
    for (bias, ours), chosen in zip(outputs, (second, first)):
        np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, max_new_tokens=3, eos_token_id=[],
                                                        pad_token_id=2, do_sample=False, sequence_bias=bias))
        assert ours[0, N] == chosen, bias


@pytest.mark.parametrize("settings", [dict(presence_penalty=-0.5, frequency_penalty=1.2),
                                      dict(presence_penalty=1.5, num_beams=3, num_return_sequences=2),
                                      dict(presence_penalty=0.8, frequency_penalty=0.6, do_sample=True, top_k=1)])
def test_presence_and_frequency_penalties_are_openai_s(llama, settings):
    """``presence_penalty`` and ``frequency_penalty`` (peftjax's, as OpenAI's API and vLLM define them:
    over the new tokens only), greedy, over beams and sampled (top-k 1: the sampled path, whose only
    draw is the greedy token), token for token as transformers' greedy ``generate`` with the rule
    as a processor of the test's own; each changes what the tiny model writes, and other values
    reuse the compiled loop."""
    _, model, hf, free = llama
    ours = model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[], pad_token_id=2, **settings)
    penalties = {k: v for k, v in settings.items() if k.endswith("_penalty")}
    rest = {k: v for k, v in settings.items() if k not in penalties}
    processor = OpenAIPenalties(N, penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0))
    greedy = {k: v for k, v in rest.items() if k not in ("do_sample", "top_k")}
    ref = hf_generate(hf, IDS, MASK, max_new_tokens=10, eos_token_id=[], pad_token_id=2, do_sample=False,
                      logits_processor=tr.LogitsProcessorList([processor]), **greedy)
    np.testing.assert_array_equal(ours, ref)
    plain = model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[], pad_token_id=2, **rest)
    assert (ours != plain).any()
    if "num_beams" not in settings and penalties.get("frequency_penalty", 0) > 0:  # fewer repeats than unhindered
        repeats = lambda rows: sum(len(r) - len(set(r)) for r in rows[:, N:].tolist())  # noqa: E731
        assert repeats(ours) < repeats(free)
    with compilations() as compiled:  # other values: values of the compiled loop, not a new program
        for scale in (1.0, 0.5):
            model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[], pad_token_id=2,
                           **{**settings, **{k: v * scale for k, v in penalties.items()}})
    assert compiled.count("_generate") + compiled.count("_beam_generate") == 1, compiled


def test_the_prompt_s_repetition_penalty_decodes_as_transformers(llama):
    """``encoder_repetition_penalty`` (transformers' "hallucination penalty") on a decoder: the
    prompt's tokens, padding and all, favoured above 1 and shunned below, as transformers'
    ``generate``; with several rows per input, where transformers penalises only the
    batch's first rows, it is refused, naming why."""
    _, model, hf, free = llama
    for penalty in (3.0, 0.3):
        settings = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=0, encoder_repetition_penalty=penalty)
        ours = model.generate(IDS, MASK, **settings)
        np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, do_sample=False, **settings))
    copied = model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[], encoder_repetition_penalty=3.0)[:, N:]
    assert np.isin(copied, IDS).mean() > np.isin(free[:, N:], IDS).mean()  # above 1 it copies the prompt
    for extra in (dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)):
        with pytest.raises(NotImplementedError, match="encoder_repetition_penalty with 2 rows per input"):
            model.generate(IDS, MASK, max_new_tokens=2, encoder_repetition_penalty=2.0, **extra)


def test_a_forced_first_token_applies_where_the_sequence_is_one_token_long(llama):
    """``forced_bos_token_id`` forces the first new token after a one-token prompt (and then
    ``begin_suppress_tokens`` moves to the second), and does nothing after a longer prompt, as
    transformers' processors count the sequence's length."""
    _, model, hf, free = llama
    first = IDS[:, -1:]
    suppressed = int(model.generate(first, max_new_tokens=3, eos_token_id=[])[0, 2])
    for extra in (dict(forced_bos_token_id=17), dict(forced_bos_token_id=17, begin_suppress_tokens=[suppressed]),
                  dict(forced_bos_token_id=17, num_beams=2)):
        settings = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=2, **extra)
        ours = model.generate(first, **settings)
        np.testing.assert_array_equal(ours, hf_generate(hf, first, np.ones_like(first), do_sample=False, **settings),
                                      err_msg=str(extra))
        assert (ours[:, 1] == 17).all()
    longer = model.generate(IDS, MASK, max_new_tokens=10, eos_token_id=[], forced_bos_token_id=17)
    np.testing.assert_array_equal(longer, free)


def test_an_encoder_decoder_s_token_rules_count_its_start_token(tmp_path):
    """T5: the forced first token follows the start token (the decoder's sequence is one token
    long), the suppressed first tokens then apply to the second, a bad word's prefix and a biased
    sequence match the decoder's tokens, the encoder's n-grams and repetition penalty read its
    input ids (padding and all), greedy and over beams, as transformers' ``generate``; without
    input ids those are refused. The presence and frequency penalties count the decoder's new
    tokens, as a processor of the test's own counts them in transformers' ``generate``."""
    save_tiny("t5", tmp_path)
    model, hf = models.from_pretrained(tmp_path), tr.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    ids, mask = IDS[:, ::-1].copy(), MASK[:, ::-1].copy()  # T5 pads on the right
    # inputs that hold, after the start token, the token the decoder writes first (which moves with
    # the input): the encoder's rules then bite at the first step
    written, start = [], model.config.decoder_start_token_id
    while (w := int(model.generate(ids, mask, max_new_tokens=1, eos_token_id=[])[0, 1])) not in written:
        written.append(w)
        ids[:] = np.resize([t for w in written for t in (start, w)], ids.shape[1])
    free = model.generate(ids, mask, max_new_tokens=8, eos_token_id=[])
    a = int(free[0, 1])
    assert a in written
    for extra in (dict(forced_bos_token_id=11), dict(forced_bos_token_id=11, begin_suppress_tokens=[a]),
                  dict(begin_suppress_tokens=[a]), dict(bad_words_ids=[[0, a]], suppress_tokens=[5]),
                  dict(sequence_bias={(a, a): -6.0}, forced_eos_token_id=3),
                  dict(forced_bos_token_id=11, suppress_tokens=[a], num_beams=3),
                  dict(encoder_no_repeat_ngram_size=1), dict(encoder_no_repeat_ngram_size=2),
                  dict(encoder_no_repeat_ngram_size=2, num_beams=3),
                  dict(encoder_repetition_penalty=0.25)):
        settings = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=2, **extra)
        ours = model.generate(ids, mask, **settings)
        np.testing.assert_array_equal(ours, hf_generate(hf, ids, mask, do_sample=False, **settings), err_msg=str(extra))
        assert ours.shape != free.shape or (ours != free).any(), extra
    for extra in (dict(presence_penalty=40.0, frequency_penalty=0.5), dict(frequency_penalty=30.0, num_beams=3)):
        # peftjax's penalties count the decoder's tokens after its start token (large: the tiny T5's logits
        # are far apart), as the test's own processor counts them
        penalties = {k: extra.pop(k) for k in list(extra) if k.endswith("_penalty")}
        processor = OpenAIPenalties(1, penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0))
        settings = dict(max_new_tokens=8, eos_token_id=[], pad_token_id=2, **extra)
        ours = model.generate(ids, mask, **settings, **penalties)
        ref = hf_generate(hf, ids, mask, do_sample=False, logits_processor=tr.LogitsProcessorList([processor]),
                          **settings)
        np.testing.assert_array_equal(ours, ref, err_msg=str(penalties))
        assert (ours != model.generate(ids, mask, **settings)).any(), penalties
    with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds alone"):
        model.generate(inputs_embeds=np.zeros((1, 3, model.config.d_model), np.float32), max_new_tokens=2,
                       encoder_no_repeat_ngram_size=2)


def test_a_generation_config_s_token_rules_apply_unasked(llama, tmp_path):
    """A checkpoint whose ``generation_config.json`` suppresses, bans and forces tokens (Whisper's
    suppresses dozens) generates as transformers' ``generate`` called with no settings; an
    argument overrides the file's value."""
    _, _, _, free = llama
    base = tmp_path / "base"
    save_tiny("llama", base)
    settings = json.loads((base / "generation_config.json").read_text())
    a, d = int(free[0, N]), int(free[1, N])
    (base / "generation_config.json").write_text(json.dumps(
        {**settings, "suppress_tokens": [a], "begin_suppress_tokens": [d], "bad_words_ids": [[int(free[0, N + 1])]],
         "forced_eos_token_id": 4, "eos_token_id": [], "pad_token_id": 0}))
    model, hf = models.from_pretrained(base), tr.AutoModelForCausalLM.from_pretrained(base).eval()
    ours = model.generate(IDS, MASK, max_new_tokens=10)
    np.testing.assert_array_equal(ours, hf_generate(hf, IDS, MASK, max_new_tokens=10))
    assert a not in ours[:, N:] and (ours[:, -1] == 4).all()
    overridden = model.generate(IDS, MASK, max_new_tokens=10, suppress_tokens=[d])
    np.testing.assert_array_equal(overridden, hf_generate(hf, IDS, MASK, max_new_tokens=10, suppress_tokens=[d]))
    assert (overridden != ours).any()


def _kept_by_transformers(logits: np.ndarray, *, temperature=1.0, top_k=0, top_p=None, min_p=None,
                          typical_p=None, epsilon_cutoff=None, eta_cutoff=None, top_h=None) -> np.ndarray:
    """The probability of each token after transformers' sampling warpers, in the order its
    ``generate`` runs them (0: filtered out)."""
    from transformers.generation import logits_process as lp

    warpers = [lp.TemperatureLogitsWarper(temperature)]
    warpers += [lp.TopHLogitsWarper(top_h)] if top_h is not None else []
    warpers += [lp.TopKLogitsWarper(top_k)] if top_k else []
    warpers += [lp.TopPLogitsWarper(top_p)] if top_p is not None else []
    warpers += [lp.MinPLogitsWarper(min_p)] if min_p is not None else []
    warpers += [lp.TypicalLogitsWarper(typical_p)] if typical_p is not None else []
    warpers += [lp.EpsilonLogitsWarper(epsilon_cutoff)] if epsilon_cutoff is not None else []
    warpers += [lp.EtaLogitsWarper(eta_cutoff)] if eta_cutoff is not None else []
    scores = torch.tensor(logits)[None]
    for warper in warpers:
        scores = warper(None, scores)
    return torch.softmax(scores[0], dim=-1).numpy()


SAMPLING = [dict(min_p=0.2), dict(min_p=0.1, temperature=1.5), dict(typical_p=0.5), dict(typical_p=0.9, top_k=20),
            dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.2, temperature=0.8), dict(min_p=0.1, top_p=0.9),
            dict(typical_p=0.7, epsilon_cutoff=0.01, temperature=1.4), dict(top_h=0.6), dict(top_h=0.9, top_k=10),
            dict(top_h=0.8, min_p=0.05, temperature=0.7)]


def test_sampling_filters_keep_what_transformers_warpers_keep(tmp_path):
    """min-p, typical, epsilon, eta and top-H sampling, alone and with temperature, top-k and top-p:
    each of 1,024 draws of the first new token is one transformers' warpers keep from the PyTorch
    model's logits, every token they leave at least 1% likely is drawn (a 1% token goes unseen
    in 1,024 draws once in 30,000), and the filter cuts while leaving a choice. Their values are
    arguments of one compiled loop: a new value (or an added warper's value) compiles nothing new.
    The vocabulary (160) is wider than the 100 likeliest tokens top-H reads, as transformers': at a
    temperature that flattens the logits it keeps dozens of them, none past the 100th."""
    save_tiny(arch("llama", vocab_size=160), tmp_path / "tiny")
    hf = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").eval()
    with torch.no_grad():  # the tiny model's next token is near uniform; the filters need some shape
        hf.lm_head.weight.mul_(10)
    hf.save_pretrained(tmp_path / "sharp")
    model = models.from_pretrained(tmp_path / "sharp")
    prompt = IDS[:1]
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(prompt)).logits[0, -1].numpy()
    rows = np.repeat(prompt, 1024, axis=0)
    for i, setting in enumerate(SAMPLING):
        drawn = set(model.generate(rows, max_new_tokens=1, do_sample=True, seed=i, **{"top_k": 0, **setting})[:, -1]
                    .tolist())
        probs = _kept_by_transformers(logits, **{"top_k": 0, **setting})
        kept, likely = set(np.flatnonzero(probs).tolist()), set(np.flatnonzero(probs > 0.01).tolist())
        assert 1 < len(kept) < 160, (setting, len(kept))
        assert likely <= drawn <= kept and len(drawn) > 1, (setting, sorted(drawn - kept), sorted(likely - drawn))
    flat = dict(top_h=0.9, temperature=50.0, top_k=0)
    drawn = set(model.generate(rows, max_new_tokens=1, do_sample=True, seed=0, **flat)[:, -1].tolist())
    kept = set(np.flatnonzero(_kept_by_transformers(logits, **flat)).tolist())
    assert 40 < len(kept) <= 100 and 40 < len(drawn) and drawn <= kept, (len(kept), len(drawn), sorted(drawn - kept))
    with compilations() as compiled:
        for value in (0.3, 0.15):
            model.generate(rows[:2], max_new_tokens=2, do_sample=True, min_p=value, top_k=0)
    assert compiled.count("_generate") == 1, compiled
    greedy = model.generate(IDS, MASK, max_new_tokens=4)
    np.testing.assert_array_equal(model.generate(IDS, MASK, max_new_tokens=4, min_p=0.5, typical_p=0.2), greedy)


@pytest.mark.parametrize(("settings", "message"), [
    (dict(suppress_tokens=[3, 96]), r"suppress_tokens must be token ids in \[0, 96\)"),
    (dict(bad_words_ids=[3, 4]), "bad_words_ids must be a non-empty list of non-empty lists"),
    (dict(bad_words_ids=[[3], [-1]]), r"bad_words_ids must be token ids in \[0, 96\)"),
    (dict(sequence_bias={3: 1.0}), "sequence_bias must be a non-empty list of non-empty lists"),
    (dict(sequence_bias=[[[3], "up"]]), "sequence_bias must map token-id sequences to biases"),
    (dict(forced_bos_token_id=[3]), r"forced_bos_token_id must be a token id in \[0, 96\)"),
    (dict(forced_eos_token_id=200), r"forced_eos_token_id must be token ids in \[0, 96\)"),
    (dict(exponential_decay_length_penalty=(2,)), "exponential_decay_length_penalty must be"),
    (dict(encoder_repetition_penalty=0), r"encoder_repetition_penalty must be > 0"),
    (dict(encoder_no_repeat_ngram_size=1.5), r"encoder_no_repeat_ngram_size must be an integer >= 0"),
    (dict(min_p=1.5, do_sample=True), r"min_p must be a number in \[0, 1\]"),
    (dict(typical_p=0.0, do_sample=True), r"typical_p must be a number in \(0, 1\]"),
    (dict(eta_cutoff=1.0, do_sample=True), r"eta_cutoff must be a number in \[0, 1\)"),
    (dict(top_h=0.0, do_sample=True), r"top_h must be a number in \(0, 1\]"),
    (dict(presence_penalty="high"), "presence_penalty must be a finite number"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
])
def test_bad_processor_settings_are_refused_by_name(llama, settings, message):
    _, model, _, _ = llama
    with pytest.raises(ValueError, match=message):
        model.generate(IDS, MASK, max_new_tokens=2, **settings)


STORY = ["the cat sat on the mat, and then the dog sat on the log.", "one two three four five six seven",
         "Paris is the capital of France; Rome is the capital of Italy."]


@pytest.fixture(scope="module")
def worded(tmp_path_factory):
    """A tiny Llama and T5 over a byte-level BPE vocabulary (as GPT-2's, Llama 3's and Qwen's), both
    frameworks' models, and the tokenizer."""
    from _tokenizers import byte_level_bpe

    root = tmp_path_factory.mktemp("worded")
    byte_level_bpe(root / "tokenizer", "PreTrainedTokenizerFast", STORY * 4)
    tokenizer = tr.AutoTokenizer.from_pretrained(str(root / "tokenizer"))
    out = {"tokenizer": tokenizer}
    for family, auto in (("llama", tr.AutoModelForCausalLM), ("t5", tr.AutoModelForSeq2SeqLM)):
        save_tiny(arch(family, vocab_size=len(tokenizer)), root / family)
        out[family] = (models.from_pretrained(root / family), auto.from_pretrained(root / family).eval())
    return out


def _stops_from(tokenizer, rows: np.ndarray, start: int) -> list[str]:
    """Stop strings cut from what the rows write unhindered: in each row's new text, the first three
    printable ASCII characters in a row past its first two characters (so rows end at different
    steps, some mid-token)."""
    stops = set()
    for row in rows:
        text = tokenizer.decode(row[start:])
        for i in range(2, len(text) - 2):
            if all(c.isascii() and c.isprintable() for c in text[i:i + 3]):
                stops.add(text[i:i + 3])
                break
    return sorted(stops)


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_stop_strings_end_rows_as_transformers(worded, family):
    """``stop_strings`` with the tokenizer: each row ends with the token that completes one of the
    strings in its text (prompt included for a decoder, the decoder's text for T5), greedy, token
    for token as transformers' ``generate``; sampled rows end exactly where transformers'
    ``StopStringCriteria`` first fires on them; over beams, as transformers' beam search ends a
    continuation. Without the tokenizer: refused."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    tokenizer = worded["tokenizer"]
    model, hf = worded[family]
    ids, mask = (IDS, MASK) if family == "llama" else (IDS[:, ::-1].copy(), MASK[:, ::-1].copy())
    start = ids.shape[1] if family == "llama" else 1
    settings = dict(max_new_tokens=12, eos_token_id=[], pad_token_id=2)
    free = model.generate(ids, mask, **settings)
    stops = _stops_from(tokenizer, free, start)
    assert stops
    ours = model.generate(ids, mask, **settings, stop_strings=stops, tokenizer=tokenizer)
    np.testing.assert_array_equal(ours, hf_generate(hf, ids, mask, do_sample=False, **settings, stop_strings=stops,
                                                    tokenizer=tokenizer))
    assert ours.shape[1] < free.shape[1] or (ours[:, -1] == 2).any()  # rows stopped early
    criteria = StopStringCriteria(tokenizer, stops)

    def fires(row) -> list[bool]:  # after each new token
        return [bool(criteria(torch.tensor(row[None, :k]), None)[0]) for k in range(start + 1, len(row) + 1)]

    k = next(i for i, row in enumerate(ours) if any(fires(row)))  # a prompt whose greedy text stops
    rows = np.repeat(ids[k:k + 1], 16, axis=0)
    sampled = model.generate(rows, np.repeat(mask[k:k + 1], 16, axis=0), **settings, do_sample=True,
                             temperature=0.01, stop_strings=stops, tokenizer=tokenizer, seed=1)
    ended = 0
    for row in sampled:
        fired = fires(row)
        end = fired.index(True) + start + 1 if True in fired else len(row)
        assert (row[end:] == 2).all(), (row, end)  # the pad after the token that completed a string
        ended += True in fired
    assert ended, "no sampled row met a stop string"
    # over beams every continuation kept is checked, and one that completes a string ends as at an EOS
    beams = dict(settings, num_beams=3, num_return_sequences=2)
    ours = model.generate(ids, mask, **beams, stop_strings=stops, tokenizer=tokenizer)
    np.testing.assert_array_equal(ours, hf_generate(hf, ids, mask, do_sample=False, **beams, stop_strings=stops,
                                                    tokenizer=tokenizer))
    plain = model.generate(ids, mask, **beams)
    assert ours.shape != plain.shape or (ours != plain).any()
    with pytest.raises(ValueError, match="stop_strings need the tokenizer"):
        model.generate(ids, mask, **settings, stop_strings=stops)


def test_stop_strings_per_row_end_each_row_at_its_own_as_transformers(worded):
    """A list of lists gives each row its own stop strings (or none): each row ends as
    transformers' ``generate`` ends it with those strings alone, in one compiled loop that other
    strings of the same sizes reuse. ``stop_strings_in_prompt=False``: a string that begins in the
    prompt ends nothing, where transformers' (the default) stops at the token that completes it."""
    tokenizer = worded["tokenizer"]
    model, hf = worded["llama"]
    ids = np.concatenate([IDS, np.where(IDS == 9, 10, IDS), np.where(IDS == 7, 8, IDS)])
    mask = np.concatenate([MASK] * 3)
    start, settings = ids.shape[1], dict(max_new_tokens=12, eos_token_id=[], pad_token_id=2)
    free = model.generate(ids, mask, **settings)
    own = [_stops_from(tokenizer, free[i:i + 1], start) for i in range(len(ids))]
    assert all(own)
    per_row = [own[0], None, [*own[2], "never here"], [], own[4], own[5][::-1]]

    def theirs(strings) -> np.ndarray:  # a row's tokens after its prompt, to the end of the longest
        if not strings:
            return free
        return hf_generate(hf, ids, mask, do_sample=False, **settings, stop_strings=strings, tokenizer=tokenizer)

    with compilations() as compiled:
        ours = model.generate(ids, mask, **settings, stop_strings=per_row, tokenizer=tokenizer)
        # each row's strings reversed: other strings of the same count and sizes, the same loop
        reversed_rows = [[s[::-1] for s in row] if row else row for row in per_row]
        model.generate(ids, mask, **settings, stop_strings=reversed_rows, tokenizer=tokenizer)
    assert compiled.count("_generate") == 1, compiled
    stopped = 0
    for i, strings in enumerate(per_row):
        want = theirs(strings)[i, start:]
        got = ours[i, start:]
        n = min(len(want), len(got))
        np.testing.assert_array_equal(got[:n], want[:n], err_msg=f"row {i}")
        assert (got[n:] == 2).all() and (want[n:] == 2).all(), i  # past its end: padding
        stopped += bool(strings) and (want == 2).any()
    assert stopped >= 3
    # over beams too: each prompt's beams end at its own strings, as transformers' with those alone
    beams = dict(settings, num_beams=3, num_return_sequences=2)
    ours = model.generate(ids, mask, **beams, stop_strings=per_row, tokenizer=tokenizer)
    for i, strings in enumerate(per_row):
        want = hf_generate(hf, ids, mask, do_sample=False, **beams, **(
            {"stop_strings": strings, "tokenizer": tokenizer} if strings else {}))
        for got, expected in zip(ours[2 * i:2 * i + 2, start:], want[2 * i:2 * i + 2, start:]):
            n = min(len(got), len(expected))
            np.testing.assert_array_equal(got[:n], expected[:n], err_msg=f"row {i}")
            assert (got[n:] == 2).all() and (expected[n:] == 2).all(), i

    # a string across the prompt's end and the first new token's text
    row = np.concatenate([ids[0][mask[0] == 1], free[0, start:start + 1]])
    prompt_text, text = tokenizer.decode(ids[0][mask[0] == 1]), tokenizer.decode(row)
    assert text.startswith(prompt_text) and len(text) > len(prompt_text)
    across = text[len(prompt_text) - 2:len(prompt_text) + 1]
    assert across not in tokenizer.decode(free[0, start:])
    single = dict(settings, stop_strings=[across], tokenizer=tokenizer)
    with_prompt = model.generate(ids[:1], mask[:1], **single)
    np.testing.assert_array_equal(with_prompt, hf_generate(hf, ids[:1], mask[:1], do_sample=False, **single))
    assert with_prompt.shape[1] == start + 1
    np.testing.assert_array_equal(model.generate(ids[:1], mask[:1], **single, stop_strings_in_prompt=False), free[:1])
    with pytest.raises(ValueError, match="stop_strings per row: 2 lists for 6 rows"):
        model.generate(ids, mask, **settings, stop_strings=[["a"], None], tokenizer=tokenizer)


@pytest.mark.parametrize("vocabulary", ["wordpiece", "byte-fallback"])
def test_stop_strings_match_other_vocabularies_as_transformers(vocabulary, tmp_path):
    """A WordPiece vocabulary (MiniLM's: ``##`` continuations, matched in characters) and a
    byte-fallback one (Llama 2's kind: ``▁`` spaces and ``<0xAB>`` byte tokens, matched in UTF-8
    bytes): rows end where transformers' ``generate`` ends them with the same stop strings."""
    from _tiny import arch
    from _tokenizers import byte_fallback_bpe

    from peftjax import data

    if vocabulary == "wordpiece":
        tokenizer, ids = tr.AutoTokenizer.from_pretrained(str(data.minilm_path())), IDS + 1000
    else:
        byte_fallback_bpe(tmp_path / "tokenizer", [*STORY, "héllo wörld, café crème brûlée"] * 4)
        tokenizer, ids = tr.AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer")), IDS
    save_tiny(arch("llama", vocab_size=len(tokenizer)), tmp_path / "model")
    model = models.from_pretrained(tmp_path / "model")
    hf = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    settings = dict(max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    free = model.generate(ids, MASK, **settings)
    stops = _stops_from(tokenizer, free, N) + (["é"] if vocabulary == "byte-fallback" else [])  # bytes of a letter
    ours = model.generate(ids, MASK, **settings, stop_strings=stops, tokenizer=tokenizer)
    np.testing.assert_array_equal(ours, hf_generate(hf, ids, MASK, do_sample=False, **settings,
                                                    stop_strings=stops, tokenizer=tokenizer))
    assert ours.shape[1] < free.shape[1] or (ours[:, -1] == 0).any()
    if vocabulary == "byte-fallback":  # biased to write "é" as its two byte tokens, which then stops it
        c3, a9 = tokenizer.convert_tokens_to_ids(["<0xC3>", "<0xA9>"])
        biased = dict(settings, sequence_bias={(c3,): 30.0, (c3, a9): 60.0})
        ours = model.generate(ids, MASK, **biased, stop_strings=["é"], tokenizer=tokenizer)
        np.testing.assert_array_equal(ours, hf_generate(hf, ids, MASK, do_sample=False, **biased,
                                                        stop_strings=["é"], tokenizer=tokenizer))
        np.testing.assert_array_equal(ours[:, N:], [[c3, a9]] * 2)
    if vocabulary == "wordpiece":  # an uncased WordPiece has no token that ends "é" (its accents are stripped)
        with pytest.raises(ValueError, match=r"stop_strings \['é'\]: no token of the vocabulary can end them"):
            model.generate(ids, MASK, **settings, stop_strings=["é", stops[0]], tokenizer=tokenizer)
