"""Falcon beyond the decoder suites' cases (``test_llama.py``'s three layouts, ``test_family_methods.py``):
falcon-rw's ALiBi over six heads and 300 tokens, where transformers' bfloat16 slopes and products
round away from float32's."""

from __future__ import annotations

import numpy as np
import transformers as tr
from _tiny import config as tiny_config
from _torch_models import save_tiny, torch_logits

from peftjax import models


def test_alibi_rounds_as_transformers_falcon_over_long_rows(tmp_path):
    theirs = save_tiny(tr.FalconForCausalLM, tiny_config("falcon", alibi=True, multi_query=False, parallel_attn=False,
                                                         num_attention_heads=6, hidden_size=48), tmp_path)
    ours = models.from_pretrained(tmp_path)
    ids = np.random.RandomState(0).randint(1, 96, (2, 300))
    mask = np.ones_like(ids)
    mask[1, :40] = 0  # left padding: key positions count from the first real token
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=2e-5)
