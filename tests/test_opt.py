"""OPT beyond the decoder suites' cases (``test_llama.py``'s two layouts, ``test_family_methods.py``):
the Hub's files (saved from ``OPTModel``: ``decoder.*`` keys, the head tied), question answering
against transformers, and the positions OPT counts from each row's real tokens in a plain forward."""

from __future__ import annotations

import numpy as np
import torch
import transformers as tr
from _tiny import config as tiny_config
from _torch_models import padded_batch, save_tiny, torch_logits
from safetensors.numpy import load_file, save_file

from peftjax import models

VOCAB = 96


def test_a_hub_file_of_the_bare_decoder_loads_as_the_causal_lm(tmp_path):
    """facebook/opt-125m's weights are ``OPTModel``'s (``decoder.*``, no ``model.`` and no head: the
    head is the tied embeddings); transformers' ``OPTForCausalLM`` reads them, and so does peftjax."""
    save_tiny(tr.OPTForCausalLM, tiny_config("opt"), tmp_path / "full")
    weights = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied
    bare = tmp_path / "bare"
    bare.mkdir()
    save_file({k[len("model."):]: v for k, v in weights.items()}, str(bare / "model.safetensors"))
    (bare / "config.json").write_text((tmp_path / "full" / "config.json").read_text())
    theirs = tr.OPTForCausalLM.from_pretrained(bare).eval()
    ours = models.from_pretrained(bare)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], atol=1e-5)


def test_question_answering_matches_transformers(tmp_path):
    theirs = save_tiny(tr.OPTForQuestionAnswering, tiny_config("opt", word_embed_proj_dim=16), tmp_path)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == "OPTForQuestionAnswering"
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    valid = mask.astype(bool)
    starts, ends = np.array([1, 2, 0]), np.array([3, 4, 2])
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     start_positions=torch.tensor(starts), end_positions=torch.tensor(ends))
    out = ours(input_ids=ids, attention_mask=mask, start_positions=starts, end_positions=ends)
    np.testing.assert_allclose(np.asarray(out.start_logits)[valid], ref.start_logits.numpy()[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.end_logits)[valid], ref.end_logits.numpy()[valid], atol=1e-5)
    assert abs(float(out.loss) - float(ref.loss)) < 1e-5


def test_a_left_padded_row_is_positioned_from_its_first_real_token(tmp_path):
    """OPT counts positions over the real tokens in every forward (transformers' OPT does, where its
    Llama counts slots): a left-padded row's logits are those of the row alone, unpadded."""
    save_tiny(tr.OPTForCausalLM, tiny_config("opt"), tmp_path)
    model = models.from_pretrained(tmp_path)
    ids = np.array([[0, 0, 0, 5, 9, 12, 7]])
    mask = (ids != 0).astype(np.int32)
    padded = np.asarray(model(input_ids=ids, attention_mask=mask).logits)[0, 3:]
    alone = np.asarray(model(input_ids=ids[:, 3:]).logits)[0]
    np.testing.assert_allclose(padded, alone, atol=1e-5)
    shifted = np.asarray(model(input_ids=ids, attention_mask=mask, position_ids=np.arange(7)[None]).logits)[0, 3:]
    assert np.abs(shifted - alone).max() > 1e-3  # positions by slot would differ
