"""BLOOM beyond the decoder suites' cases (``test_llama.py``'s two variants, ``test_family_methods.py``):
ALiBi's slopes for every head count as transformers computes them, a model whose head count is no
power of two, generation from left-padded prompts, and the token classifier and question
answering against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tr
from _tiny import config as tiny_config
from _torch_models import padded_batch, save_tiny, torch_logits

from peftjax import models
from peftjax.models._bloom import alibi_slopes

VOCAB = 96


def test_alibi_slopes_are_transformers_for_every_head_count():
    """To float32 rounding: torch's ``pow`` and NumPy's round a few slopes the other way (1 ulp)."""
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    for heads in range(1, 72):
        np.testing.assert_allclose(alibi_slopes(heads), _get_alibi_slopes(heads, torch.device("cpu")).numpy(),
                                   rtol=2e-7, atol=0, err_msg=str(heads))


def test_six_heads_match_transformers_and_generate_as_it_does(tmp_path):
    """Six heads: the slopes of four and every other of the next eight; left-padded rows, whose key
    positions count from their first real token."""
    theirs = save_tiny(tr.BloomForCausalLM, tiny_config("bloom", n_head=6, hidden_size=48), tmp_path)
    ours = models.from_pretrained(tmp_path)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=1e-5)
    ids, mask = padded_batch(VOCAB, batch=2, seq=6)
    with torch.no_grad():
        expected = theirs.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=8,
                                   do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
    np.testing.assert_array_equal(ours.generate(ids, mask, max_new_tokens=8, pad_token_id=0, eos_token_id=[]),
                                  expected)


@pytest.mark.parametrize("task", ["token", "question"])
def test_the_token_classifier_and_question_answering_match_transformers(task, tmp_path):
    cls = {"token": tr.BloomForTokenClassification, "question": tr.BloomForQuestionAnswering}[task]
    theirs = save_tiny(cls, tiny_config("bloom", num_labels=3, classifier_dropout=0.0), tmp_path)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == cls.__name__
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    valid = mask.astype(bool)
    if task == "token":
        labels = np.where(valid, ids % 3, -100)
        with torch.no_grad():
            ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=1e-5)
        assert abs(float(out.loss) - float(ref.loss)) < 1e-5
        return
    starts, ends = np.array([1, 2, 0]), np.array([3, 4, 2])
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     start_positions=torch.tensor(starts), end_positions=torch.tensor(ends))
    out = ours(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends)
    np.testing.assert_allclose(np.asarray(out.start_logits)[valid], ref.start_logits.numpy()[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.end_logits)[valid], ref.end_logits.numpy()[valid], atol=1e-5)
    assert abs(float(out.loss) - float(ref.loss)) < 1e-5
