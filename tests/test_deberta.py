"""DeBERTa (v1, ``model_type`` ``"deberta"``: deberta-base, deberta-large-mnli) against PyTorch
transformers: outputs, losses and gradients of each task's class (the fused ``in_proj`` split per
head, ``q_bias``/``v_bias``, the relative table through ``pos_proj``/``pos_q_proj`` clipped within
the rows, absolute positions and token types where configured), a masked-LM checkpoint (the Hub's
kind) read back by transformers, and LoRA on PEFT's default target (``in_proj``) both ways.

v1 shares DeBERTa-v2's layers, heads and relative scores (``test_deberta_v2.py``); every weight is
moved off its initialisation by noise, so a query and key swapped inside ``in_proj``, a bias on the
wrong projection or the table's window off by one shows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import assert_grads_match_torch, assert_peft_reads, lazy, peft_file, save_perturbed
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0  # right padding
INPUTS = dict(input_ids=IDS, attention_mask=MASK)
CASES = {  # name -> (transformers class, config overrides, labels)
    "cls": ("DebertaForSequenceClassification", {}, dict(labels=np.array([2, -1]))),
    "cls-absolute-types-p2c": ("DebertaForSequenceClassification",
                               dict(position_biased_input=True, type_vocab_size=2, pos_att_type="p2c",
                                    hidden_act="gelu_new"), dict(labels=np.array([0, 1]))),
    "tokens-c2p": ("DebertaForTokenClassification", dict(pos_att_type="c2p", num_labels=5),
                   dict(labels=np.where(MASK == 1, IDS % 5, -100))),
    "spans": ("DebertaForQuestionAnswering", dict(num_labels=2),
              dict(start_positions=np.array([1, 3]), end_positions=np.array([4, 6]))),
}


def save_random(class_name, path, **overrides):
    """A transformers model of the tiny config, every weight moved by noise, saved to ``path``."""
    return save_perturbed(getattr(tr, class_name), _tiny.config("deberta", **overrides), path)


def real(x):
    return x[MASK.astype(bool)] if x.ndim == 3 or (x.ndim == 2 and x.shape == MASK.shape) else x


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_losses_and_gradients_equal_transformers(case, tmp_path):
    class_name, overrides, labels = CASES[case]
    theirs = save_random(class_name, tmp_path, **overrides)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == class_name
    types = np.where(np.arange(11) < 5, 0, 1)[None].repeat(2, 0)
    kw = dict(token_type_ids=types) if overrides.get("type_vocab_size") else {}
    ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                 **{k: torch.tensor(v) for k, v in {**labels, **kw}.items()})
    out = nnx.jit(lambda m, kw: m(input_ids=IDS, attention_mask=MASK, **kw))(ours, {**labels, **kw})
    for name in ("logits", "start_logits", "end_logits", "loss"):
        if getattr(ref, name, None) is not None:
            np.testing.assert_allclose(real(np.asarray(getattr(out, name))), real(getattr(ref, name).detach().numpy()),
                                       atol=1e-5, rtol=0, err_msg=name)
    ref.loss.backward()  # the loss's gradient with respect to every weight, q_bias and v_bias included
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest)(input_ids=IDS, attention_mask=MASK, **labels, **kw).loss  # noqa: E731
    assert_grads_match_torch(nnx.merge(graphdef, jax.jit(jax.grad(loss))(params), rest), theirs)


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
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, modules_to_save=["pooler"])
    ref = peft_file(tr.DebertaForSequenceClassification, tmp_path / "base", peft.LoraConfig(**config),
                    tmp_path / "theirs", **INPUTS)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    np.testing.assert_allclose(np.asarray(loaded(**INPUTS).logits), ref, atol=1e-5, rtol=0)
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                   peftjax.LoraConfig(**config, init_lora_weights="gaussian"))
    assert set(model.peft_config["default"].target_modules) == {"in_proj"}
    # without dropout: the model's own (0.1) makes a 2-row batch's loss too noisy to fall in 4 steps
    losses = _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    assert_peft_reads(model, tr.DebertaForSequenceClassification, tmp_path / "base", tmp_path / "ours", **INPUTS)


def test_talking_heads_are_refused_by_name():
    with pytest.raises(ValueError, match="deberta: talking_head=True"):
        models.DebertaModel.from_config(_tiny.config("deberta", talking_head=True))
