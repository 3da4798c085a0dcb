"""BLOOM beyond the decoder suites' cases (``test_llama.py``'s two variants, ``test_family_methods.py``):
ALiBi's slopes for every head count as transformers computes them, a model whose head count is no
power of two, and generation from left-padded prompts (the token classifier and question
answering: ``test_token_classification.py``, ``test_question_answering.py``)."""

from __future__ import annotations

import numpy as np
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
