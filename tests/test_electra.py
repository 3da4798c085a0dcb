"""ELECTRA against PyTorch transformers (each task's outputs and losses, embeddings narrower than
the layers and as wide), the Hub's discriminator checkpoints as the replaced-token detector and in a
classifier, LoRA both ways with
HF PEFT, prompt tuning and P-tuning on the narrow embeddings (PEFT reads the files), packed rows,
and the Trainer with the model's dropout.
"""

from __future__ import annotations

from functools import partial


import jax
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
import _torch_models
from _torch_models import assert_lora_moves_both_ways, assert_peft_reads, at_tokens, lazy, peft_file
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0  # right padding
INPUTS = dict(input_ids=IDS, attention_mask=MASK)
CASES = {  # name -> (transformers class, config overrides, labels)
    # (the bare encoder's states: test_a_discriminator_checkpoint_loads_into_a_classifier)
    "cls": ("ElectraForSequenceClassification", {}, dict(labels=np.array([2, 0]))),
    "cls-as-wide": ("ElectraForSequenceClassification", dict(embedding_size=32), dict(labels=np.array([1, 0]))),
    "tokens": ("ElectraForTokenClassification", dict(num_labels=5), dict(labels=np.where(MASK == 1, IDS % 5, -100))),
    "spans": ("ElectraForQuestionAnswering", dict(num_labels=2),
              dict(start_positions=np.array([1, 3]), end_positions=np.array([4, 6]))),
}


save_random = partial(_torch_models.save_random, "electra")
real = partial(at_tokens, mask=MASK)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_losses_equal_transformers(case, tmp_path):
    class_name, overrides, labels = CASES[case]
    theirs = save_random(class_name, tmp_path, **overrides)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == class_name
    assert (ours.electra.embeddings_project is None) == ("embedding_size" in overrides)  # 24 wide: projected to 32
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                     **{k: torch.tensor(v) for k, v in labels.items()})
    out = nnx.jit(lambda m, kw: m(input_ids=IDS, attention_mask=MASK, **kw))(ours, labels)
    for name in ("logits", "start_logits", "end_logits", "loss"):
        if getattr(ref, name, None) is not None:
            np.testing.assert_allclose(real(np.asarray(getattr(out, name))), real(getattr(ref, name).numpy()),
                                       atol=1e-5, rtol=0, err_msg=name)


def test_a_discriminator_checkpoint_loads_into_a_classifier(tmp_path):
    """The Hub's ELECTRA checkpoints are ``ElectraForPreTraining`` (the discriminator): its head is
    ignored, the classifier new, the encoder the checkpoint's, as in transformers."""
    disc = save_random("ElectraForPreTraining", tmp_path)
    with pytest.warns(models.NewWeightsWarning, match="classifier.dense.weight") as caught:
        ours = models.from_pretrained(tmp_path, task_type="SEQ_CLS", num_labels=3)
    assert not [w for w in caught if "unexpected" in str(w.message)]  # discriminator_predictions: known, ignored
    assert type(ours).__name__ == "ElectraForSequenceClassification"
    with torch.no_grad():
        ref = disc.electra(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    np.testing.assert_allclose(real(np.asarray(ours.electra(input_ids=IDS, attention_mask=MASK).last_hidden_state)),
                               real(ref), atol=1e-5, rtol=0)


def test_the_discriminator_checkpoint_is_the_replaced_token_detector(tmp_path):
    """An ``ElectraForPreTraining`` checkpoint loads as that class, its head included: transformers'
    per-token logits, and its loss over the unpadded positions (over all of them without a mask);
    LoRA on it (no task type, as PEFT has none) moves both ways with PEFT."""
    disc = save_random("ElectraForPreTraining", tmp_path / "base")
    ours = models.from_pretrained(tmp_path / "base")
    assert type(ours).__name__ == "ElectraForPreTraining"
    replaced = (IDS % 3 == 0).astype(np.int64)
    for mask in (MASK, None):
        kw = {} if mask is None else dict(attention_mask=mask)
        with torch.no_grad():
            ref = disc(input_ids=torch.tensor(IDS), labels=torch.tensor(replaced),
                       **{k: torch.tensor(v) for k, v in kw.items()})
        out = nnx.jit(lambda m, labels, kw: m(input_ids=IDS, labels=labels, **kw))(ours, replaced, kw)
        np.testing.assert_allclose(real(np.asarray(out.logits)), real(ref.logits.numpy()), atol=1e-5, rtol=0)
        np.testing.assert_allclose(float(out.loss), float(ref.loss), atol=1e-6, rtol=0)

    config = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
    ref = peft_file(tr.ElectraForPreTraining, tmp_path / "base", peft.LoraConfig(**config), tmp_path / "theirs",
                    **INPUTS)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    np.testing.assert_allclose(real(np.asarray(loaded(**INPUTS).logits)), real(ref), atol=1e-5, rtol=0)
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                   peftjax.LoraConfig(**config, init_lora_weights="gaussian"))
    batch = dict(INPUTS, labels=replaced)
    losses = _tiny.train(model, batch, steps=4).losses
    assert losses[-1] < losses[0]
    assert_peft_reads(model, tr.ElectraForPreTraining, tmp_path / "base", tmp_path / "ours", **INPUTS)


def test_lora_moves_both_ways_with_peft(tmp_path):
    """PEFT's default ELECTRA targets (query, value) on a classifier, the GELU head saved: PEFT's
    adapter gives PEFT's logits here; trained here, ours in PEFT."""
    save_random("ElectraForSequenceClassification", tmp_path / "base")
    assert_lora_moves_both_ways(tr.ElectraForSequenceClassification, tmp_path / "base", tmp_path,
                                dict(task_type="SEQ_CLS", r=4, lora_alpha=8), {"query", "value"},
                                _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), **INPUTS)


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_virtual_tokens_take_the_narrow_embeddings_width_and_peft_reads_them(method, tmp_path):
    """ELECTRA-small's word embeddings are narrower than its layers: the virtual tokens are as wide
    as the embeddings they join (``token_dim`` 24, where PEFT's default, the hidden size, fails to
    concatenate), and PEFT reads the file to the same logits."""
    save_random("ElectraForSequenceClassification", tmp_path / "base")
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                   getattr(peftjax, method)(task_type="SEQ_CLS", num_virtual_tokens=3))
    assert model.peft_config["default"].token_dim == 24
    _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=2)
    assert_peft_reads(model, tr.ElectraForSequenceClassification, tmp_path / "base", tmp_path / "adapter", **INPUTS)


def test_the_trainer_packs_and_fine_tunes_an_electra_classifier_with_its_dropout(tmp_path):
    save_random("ElectraForSequenceClassification", tmp_path / "base", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, num_labels=2)
    base = models.from_pretrained(tmp_path / "base")
    a, b = (np.asarray(base(input_ids=IDS, attention_mask=MASK, dropout_rng=jax.random.key(k)).logits) for k in (0, 1))
    assert np.abs(a - b).max() > 1e-4
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(task_type="SEQ_CLS", r=4))
    assert _tiny.assert_the_trainer_learns(model, tmp_path / "run").packs()
