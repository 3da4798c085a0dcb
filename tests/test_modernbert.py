"""ModernBERT against PyTorch transformers (logits, losses, pooling, local and global layers, a
masked-LM checkpoint), LoRA both ways with HF PEFT, and the Trainer on a ModernBERT classifier.

Every weight is random (norms around 1), so a swapped q/k/v block, a RoPE base of the wrong layer
type, a window off by one (rows of 11 tokens against a reach of 2) or the wrong GeGLU half shows.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import lazy, randomised
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0  # right padding
CASES = {  # name -> (transformers class, config overrides)
    "encoder": ("ModernBertModel", {}),
    "cls": ("ModernBertForSequenceClassification", {}),
    "mean-biases": ("ModernBertForSequenceClassification", dict(
        classifier_pooling="mean", norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True,
        hidden_activation="gelu_new")),
    "tokens": ("ModernBertForTokenClassification", dict(num_labels=5)),
    "spans": ("ModernBertForQuestionAnswering", dict(num_labels=2)),
}


def save_random(class_name, tmp_path, **overrides):
    model = randomised(getattr(tr, class_name)(_tiny.config("modernbert", **overrides)).eval(), scale=0.2)
    model.save_pretrained(tmp_path)
    return model


def real(x):
    return x[MASK.astype(bool)] if x.ndim == 3 or (x.ndim == 2 and x.shape == MASK.shape) else x


def assert_peft_reads(model, tmp_path):
    """``model`` (a classifier on ``tmp_path / "base"``) saved, then loaded by PEFT: the same logits."""
    model.save_pretrained(tmp_path / "ours")
    mine = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(
            tr.ModernBertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "ours").eval()
        with torch.no_grad():
            theirs = back(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(mine, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_losses_equal_transformers(case, tmp_path):
    class_name, overrides = CASES[case]
    theirs = save_random(class_name, tmp_path, **overrides)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == class_name
    labels = {"ModernBertForSequenceClassification": dict(labels=np.array([0, 2])),
              "ModernBertForTokenClassification": dict(labels=np.where(MASK == 1, IDS % 5, -100)),
              "ModernBertForQuestionAnswering": dict(start_positions=np.array([1, 3]), end_positions=np.array([4, 6])),
              }.get(class_name, {})
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                     **{k: torch.tensor(v) for k, v in labels.items()})
    out = nnx.jit(lambda m, kw: m(input_ids=IDS, attention_mask=MASK, **kw))(ours, labels)
    for name in ("last_hidden_state", "logits", "start_logits", "end_logits", "loss"):
        if getattr(ref, name, None) is not None:
            np.testing.assert_allclose(real(np.asarray(getattr(out, name))), real(getattr(ref, name).numpy()),
                                       atol=1e-5, rtol=0, err_msg=name)


def test_a_masked_lm_checkpoint_loads_into_a_classifier(tmp_path):
    """The Hub's ModernBERT checkpoints are masked LMs: their encoder and ``head`` load into the
    classifier (``decoder`` ignored, ``classifier`` new), as in transformers."""
    mlm = save_random("ModernBertForMaskedLM", tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = models.from_pretrained(tmp_path, task_type="SEQ_CLS", num_labels=3)
    assert type(ours).__name__ == "ModernBertForSequenceClassification"
    np.testing.assert_array_equal(np.asarray(ours.head.dense.kernel.get_value()), mlm.head.dense.weight.detach().numpy().T)
    with torch.no_grad():
        ref = mlm.model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    np.testing.assert_allclose(real(np.asarray(ours.model(input_ids=IDS, attention_mask=MASK).last_hidden_state)),
                               real(ref), atol=1e-5, rtol=0)


def test_lora_moves_both_ways_with_peft(tmp_path):
    """LoRA on the fused Wqkv, Wo and the GeGLU Wi of a classifier (its head saved): PEFT's adapter gives
    PEFT's logits here; trained here, ours in PEFT."""
    theirs_base = save_random("ModernBertForSequenceClassification", tmp_path / "base")
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["Wqkv", "Wo", "Wi"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, peft.LoraConfig(**config))
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        theirs.save_pretrained(tmp_path / "theirs")
        with torch.no_grad():
            ref = theirs.eval()(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)

    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), peftjax.LoraConfig(
        **config, init_lora_weights="gaussian"))
    losses = _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=4).losses
    assert losses[-1] < losses[0]
    assert_peft_reads(model, tmp_path)


def test_the_trainer_fine_tunes_a_modernbert_classifier_with_its_dropout(tmp_path):
    save_random("ModernBertForSequenceClassification", tmp_path / "base", embedding_dropout=0.1,
                attention_dropout=0.1, mlp_dropout=0.1, classifier_dropout=0.1, num_labels=2)
    base = models.from_pretrained(tmp_path / "base")
    # the base model's dropout runs with a key (torch's .train()), a mask per key
    a, b = (np.asarray(base(input_ids=IDS, attention_mask=MASK, dropout_rng=jax.random.key(k)).logits) for k in (0, 1))
    assert np.abs(a - b).max() > 1e-4
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["Wqkv", "Wo"]))
    _tiny.assert_the_trainer_learns(model, tmp_path / "run")


@pytest.mark.parametrize(("overrides", "error", "named"), [
    (dict(classifier_pooling="max"), ValueError, "classifier_pooling 'max' is not supported"),
    (dict(hidden_activation="prelu"), ValueError, "hidden_activation 'prelu' is not supported"),
    (dict(layer_types=["full_attention", "chunked_attention", "sliding_attention"]), ValueError, "layer_types"),
    (dict(scan_layers=True), NotImplementedError, "scan_layers and remat are not implemented"),
])
def test_what_is_not_implemented_is_named(overrides, error, named):
    with pytest.raises(error, match=named):
        models.ModernBertForSequenceClassification.from_config(models.ModelConfig(
            "modernbert", **_tiny.fields("modernbert", **overrides)))


@pytest.mark.parametrize("named", [["head"], None], ids=["named", "added-by-get_peft_model"])
def test_a_head_less_checkpoint_s_new_head_trains_and_saves_through_modules_to_save(named, tmp_path):
    """From a ``ModernBertModel`` checkpoint the classifier's ``head`` (dense, norm) is new, as in
    transformers; ``modules_to_save=["head"]``, or ``get_peft_model`` by itself (``head.dense``,
    ``head.norm``), trains and saves it beside the classifier, and PEFT rebuilds the same
    classifier from the file."""
    save_random("ModernBertModel", tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base", task_type="SEQ_CLS", num_labels=3),
                                       peftjax.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["Wqkv"],
                                                          modules_to_save=named))
    expected = ("head", "classifier", "score", "pre_classifier") if named else (
        "classifier", "score", "pre_classifier", "head.dense", "head.norm")
    assert model.peft_config["default"].modules_to_save == expected
    _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=3)
    model.save_pretrained(tmp_path / "adapter")
    mine = np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(
            tr.ModernBertForSequenceClassification.from_pretrained(tmp_path / "base", num_labels=3),
            tmp_path / "adapter").eval()
        with torch.no_grad():
            ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(mine, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PromptEncoderConfig"])
def test_prompt_and_p_tuning_move_both_ways_with_peft(method, tmp_path):
    """Virtual tokens before a ModernBERT classifier's input (its [CLS] pooling then reads the first
    of them, in PEFT too): PEFT's adapter gives PEFT's logits here; one made here gives ours in PEFT."""
    theirs_base = save_random("ModernBertForSequenceClassification", tmp_path / "base")
    fields = dict(task_type="SEQ_CLS", num_virtual_tokens=3)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(theirs_base, getattr(peft, method)(**fields))
        theirs.save_pretrained(tmp_path / "theirs")
        with torch.no_grad():
            ref = theirs.eval()(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)

    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), getattr(peftjax, method)(**fields))
    _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=2)
    assert_peft_reads(model, tmp_path)
