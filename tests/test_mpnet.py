"""MPNet against PyTorch transformers (each task's outputs and losses, with its relative position
bias over rows long enough for the log buckets, left and right padding, stacked layers), LoRA and
prompt tuning both ways with HF PEFT, prefix tuning refused, packed rows and the Trainer with the
model's dropout.
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
from _torch_models import assert_lora_moves_both_ways, assert_peft_reads, at_tokens, lazy
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")

IDS = np.random.RandomState(0).randint(3, 96, (3, 40))
IDS[:, 0] = 0  # <s>
MASK = np.ones_like(IDS)
MASK[1, 30:] = 0  # right padding
MASK[2, :12] = 0  # left padding: positions count real tokens; the bias counts columns, as transformers'
IDS = np.where(MASK == 1, IDS, 1)  # MPNet's pad id
INPUTS = dict(input_ids=IDS, attention_mask=MASK)
CASES = {  # name -> (transformers class, config overrides, labels)
    "model": ("MPNetModel", {}, {}),
    "cls": ("MPNetForSequenceClassification", {}, dict(labels=np.array([2, 0, 1]))),
    # positions still count after index 1, as transformers' MPNet counts them whatever the pad id
    "cls-pad-0": ("MPNetForSequenceClassification", dict(pad_token_id=0), dict(labels=np.array([1, 0, 1]))),
    "tokens": ("MPNetForTokenClassification", dict(num_labels=5), dict(labels=np.where(MASK == 1, IDS % 5, -100))),
    "spans": ("MPNetForQuestionAnswering", dict(num_labels=2),
              dict(start_positions=np.array([1, 3, 20]), end_positions=np.array([4, 6, 25]))),
    "masked": ("MPNetForMaskedLM", {}, dict(labels=np.where((IDS % 4 == 0) & (MASK == 1), IDS, -100))),
    "choices": ("MPNetForMultipleChoice", {}, dict(labels=np.array([1]))),
}

save_random = partial(_torch_models.save_random, "mpnet")
real = partial(at_tokens, mask=MASK)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_and_losses_equal_transformers(case, tmp_path):
    class_name, overrides, labels = CASES[case]
    theirs = save_random(class_name, tmp_path, **overrides)
    inputs = INPUTS if case != "choices" else {k: v[None] for k, v in INPUTS.items()}  # 3 choices of one question
    keep = real if case != "choices" else (lambda x: x)
    with torch.no_grad():
        ref = theirs(**{k: torch.tensor(v) for k, v in {**inputs, **labels}.items()})
    scans = (False, True) if case == "cls" else (False,)  # stacked layers scan as the loop runs them
    for scan in scans:
        ours = models.from_pretrained(tmp_path, scan_layers=scan)
        assert type(ours).__name__ == class_name
        out = nnx.jit(lambda m, kw: m(**inputs, **kw))(ours, labels)
        for name in ("last_hidden_state", "pooler_output", "logits", "start_logits", "end_logits", "loss"):
            if getattr(ref, name, None) is not None:
                np.testing.assert_allclose(keep(np.asarray(getattr(out, name))), keep(getattr(ref, name).numpy()),
                                           atol=1e-5, rtol=0, err_msg=f"{name}, scan_layers={scan}")
    if case == "cls":  # the bias matters: without it the logits move
        ours.mpnet.encoder.relative_attention_bias.embedding.set_value(
            0 * ours.mpnet.encoder.relative_attention_bias.embedding.get_value())
        assert np.abs(np.asarray(ours(**inputs).logits) - ref.logits.numpy()).max() > 1e-3
    if case == "masked":  # saved here, transformers reads the same model (the tied decoder and its bias)
        models.from_pretrained(tmp_path).save_pretrained(tmp_path / "back")
        with torch.no_grad():
            back = tr.MPNetForMaskedLM.from_pretrained(tmp_path / "back").eval()(**{k: torch.tensor(v)
                                                                                   for k, v in inputs.items()})
        np.testing.assert_allclose(real(back.logits.numpy()), real(ref.logits.numpy()), atol=1e-5, rtol=0)


def test_lora_and_prompt_tuning_move_both_ways_with_peft_and_a_prefix_is_refused(tmp_path):
    """PEFT has no default MPNet targets: LoRA on ``q``, ``v`` (the head saved) both ways; prompt
    tuning (the virtual tokens before the embeddings, positions after them) read by PEFT; prefix
    tuning refused by name (transformers' MPNet takes no cache: PEFT's prefix would be ignored)."""
    save_random("MPNetForSequenceClassification", tmp_path / "base")
    batch = _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2, 1))
    assert_lora_moves_both_ways(tr.MPNetForSequenceClassification, tmp_path / "base", tmp_path,
                                dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q", "v"]), {"q", "v"},
                                batch, **INPUTS)
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                                   peftjax.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    _tiny.train(model, batch, steps=2)
    assert_peft_reads(model, tr.MPNetForSequenceClassification, tmp_path / "base", tmp_path / "prompt", **INPUTS)
    with pytest.raises(ValueError, match="MPNetModel takes no prefix_kv: transformers' MPNet has no cache"):
        peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                               peftjax.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))(**INPUTS)


def test_the_trainer_packs_and_fine_tunes_an_mpnet_classifier_with_its_dropout(tmp_path, monkeypatch):
    """Every dropout on both sides replaced by the same fixed scaling: transformers' train-mode
    logits; then LoRA trained by the Trainer on packed rows."""
    theirs = save_random("MPNetForSequenceClassification", tmp_path / "base", hidden_dropout_prob=0.1,
                         attention_probs_dropout_prob=0.1, num_labels=2)
    base = models.from_pretrained(tmp_path / "base")
    scaled = lambda x, p=0.5, training=True, inplace=False: x * 0.7 if training and p > 0 else x  # noqa: E731
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "dropout", scaled)
        fixed = lambda x, rate, key: x * 0.7 if key is not None and rate else x  # noqa: E731
        for module in ("_mpnet", "_bert", "_roberta", "_attention"):  # MPNet's, the ones it reuses, the attention's
            patch.setattr(f"peftjax.models.{module}.dropout", fixed)
        theirs.config._attn_implementation = "eager"
        theirs.train()
        ref = theirs(**{k: torch.tensor(v) for k, v in INPUTS.items()}).logits.detach().numpy()
        out = np.asarray(base(**INPUTS, dropout_rng=jax.random.key(0)).logits)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
    assert np.abs(out - np.asarray(base(**INPUTS).logits)).max() > 1e-3
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q", "v"]))
    assert _tiny.assert_the_trainer_learns(model, tmp_path / "run").packs()
