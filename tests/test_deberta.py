"""DeBERTa (v1, ``model_type`` ``"deberta"``: deberta-base, deberta-large-mnli) against PyTorch
transformers: a masked-LM checkpoint (the Hub's kind) read back by transformers and into a
classifier, LoRA on PEFT's default target (``in_proj``) both ways, and what is refused. The outputs,
losses and gradients of each task's class (the fused ``in_proj`` split per head, ``q_bias``/``v_bias``,
the relative table through ``pos_proj``/``pos_q_proj``, absolute positions and token types) are
among tests/test_deberta_v2.py's cases: v1 shares v2's layers, heads and relative scores.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import transformers as tr

import _tiny
import _torch_models
from _torch_models import assert_lora_moves_both_ways, at_tokens, lazy
from peftjax import models

torch = lazy("torch")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0  # right padding
INPUTS = dict(input_ids=IDS, attention_mask=MASK)
save_random = partial(_torch_models.save_random, "deberta")
real = partial(at_tokens, mask=MASK)


def test_a_masked_lm_checkpoint_gives_transformers_logits_and_saves_what_it_loads(tmp_path):
    """The Hub's DeBERTa checkpoints are masked LMs (the legacy ``cls`` head): transformers' logits
    and loss, transformers reads the saved model back, and the checkpoint loads into a classifier
    (encoder kept, pooler and classifier new)."""
    theirs = save_random("DebertaForMaskedLM", tmp_path / "base")
    ours = models.from_pretrained(tmp_path / "base")
    assert type(ours).__name__ == "DebertaForMaskedLM"
    labels = np.where(MASK == 1, IDS % 7 + 3, -100)
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels))
    out = ours(input_ids=IDS, attention_mask=MASK, labels=labels)
    np.testing.assert_allclose(real(np.asarray(out.logits)), real(ref.logits.numpy()), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    ours.save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        back = tr.DebertaForMaskedLM.from_pretrained(tmp_path / "saved").eval()(
            input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(real(back), real(ref.logits.numpy()), atol=1e-6, rtol=0)
    with pytest.warns(models.NewWeightsWarning, match="pooler.dense.weight"):
        classifier = models.from_pretrained(tmp_path / "base", task_type="SEQ_CLS", num_labels=3)
    assert type(classifier).__name__ == "DebertaForSequenceClassification"


def test_lora_on_in_proj_moves_both_ways_with_peft(tmp_path):
    """PEFT's default DeBERTa target, the fused ``in_proj``, on a classifier whose pooler is saved
    beside the head: PEFT's adapter gives PEFT's logits here; trained here, ours in PEFT."""
    save_random("DebertaForSequenceClassification", tmp_path / "base")
    # without dropout: the model's own (0.1) makes a 2-row batch's loss too noisy to fall in 4 steps
    assert_lora_moves_both_ways(tr.DebertaForSequenceClassification, tmp_path / "base", tmp_path,
                                dict(task_type="SEQ_CLS", r=4, lora_alpha=8, modules_to_save=["pooler"]), {"in_proj"},
                                _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), dropout=False, **INPUTS)


def test_talking_heads_are_refused_by_name():
    with pytest.raises(ValueError, match="deberta: talking_head=True"):
        models.DebertaModel.from_config(_tiny.config("deberta", talking_head=True))
