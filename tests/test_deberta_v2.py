"""DeBERTa-v2/v3 against PyTorch transformers (outputs, losses and gradients of each layout: v3's
shared keys and normalised bucketed table, v2's own position projections with absolute positions,
token types and a narrower embedding, c2p or p2c alone, the convolution; and DeBERTa v1's, whose
other tests are tests/test_deberta.py), a masked-LM checkpoint
(the Hub's kind) in a classifier, LoRA both ways with HF PEFT, and the Trainer with the model's
dropout.

Every weight is moved off its initialisation by noise, so a swapped c2p/p2c term, a bucket off by
one (rows of 11 tokens against 4 buckets up to 16: distances past 2 are log-bucketed) or a
missing scale shows.
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
from _torch_models import (assert_grads_match_torch, assert_lora_moves_both_ways, assert_peft_reads, at_tokens, lazy,
                           peft_file)
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0  # right padding
INPUTS = dict(input_ids=IDS, attention_mask=MASK)
V2 = dict(share_att_key=False, norm_rel_ebd="none", position_biased_input=True, type_vocab_size=2,
          embedding_size=24, max_relative_positions=4, position_buckets=-1, hidden_act="gelu_new")  # clipped at 4
CASES = {  # name -> (transformers class, config overrides, labels)
    # (the bare encoder's states: test_a_masked_lm_checkpoint_loads_into_a_classifier_whose_new_pooler_is_saved)
    # a label below 0 is left out of DeBERTa's loss (transformers' rule for this family)
    "v3-cls": ("DebertaV2ForSequenceClassification", {}, dict(labels=np.array([2, -1]))),
    "v2-cls": ("DebertaV2ForSequenceClassification", V2, dict(labels=np.array([0, 1]))),
    "c2p-soft-labels": ("DebertaV2ForSequenceClassification", dict(pos_att_type="c2p", pooler_hidden_act="tanh"),
                        dict(labels=np.array([[0.2, 0.5, 0.3], [1.0, 0.0, 0.0]], np.float32))),
    "p2c-conv-tokens": ("DebertaV2ForTokenClassification", dict(pos_att_type="p2c", conv_kernel_size=3, conv_groups=2,
                                                                num_labels=5),
                        dict(labels=np.where(MASK == 1, IDS % 5, -100))),
    "spans": ("DebertaV2ForQuestionAnswering", dict(num_labels=2),
              dict(start_positions=np.array([1, 3]), end_positions=np.array([4, 6]))),
    # DeBERTa v1 (tests/test_deberta.py): the fused in_proj, q_bias/v_bias, pos_proj/pos_q_proj
    "v1-cls": ("DebertaForSequenceClassification", {}, dict(labels=np.array([2, -1]))),
    "v1-cls-absolute-types-p2c": ("DebertaForSequenceClassification",
                                  dict(position_biased_input=True, type_vocab_size=2, pos_att_type="p2c",
                                       hidden_act="gelu_new"), dict(labels=np.array([0, 1]))),
    "v1-tokens-c2p": ("DebertaForTokenClassification", dict(pos_att_type="c2p", num_labels=5),
                      dict(labels=np.where(MASK == 1, IDS % 5, -100))),
    "v1-spans": ("DebertaForQuestionAnswering", dict(num_labels=2),
                 dict(start_positions=np.array([1, 3]), end_positions=np.array([4, 6]))),
}
TYPES = np.where(np.arange(11) < 5, 0, 1)[None].repeat(2, 0)  # where the config has token types


save_random = partial(_torch_models.save_random, "deberta-v2")
real = partial(at_tokens, mask=MASK)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_losses_and_gradients_equal_transformers(case, tmp_path):
    class_name, overrides, labels = CASES[case]
    family = "deberta-v2" if class_name.startswith("DebertaV2") else "deberta"
    theirs = _torch_models.save_random(family, class_name, tmp_path, **overrides)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == class_name
    if overrides.get("type_vocab_size"):
        labels = dict(labels, token_type_ids=TYPES)
    ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                 **{k: torch.tensor(v) for k, v in labels.items()})
    out = nnx.jit(lambda m, kw: m(input_ids=IDS, attention_mask=MASK, **kw))(ours, labels)
    for name in ("logits", "start_logits", "end_logits", "loss"):
        if getattr(ref, name, None) is not None:
            np.testing.assert_allclose(real(np.asarray(getattr(out, name))), real(getattr(ref, name).detach().numpy()),
                                       atol=1e-5, rtol=0, err_msg=name)
    # the loss's gradient with respect to every weight (the relative table's gathers included)
    ref.loss.backward()
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest)(input_ids=IDS, attention_mask=MASK, **labels).loss  # noqa: E731
    grads = jax.jit(jax.grad(loss))(params)
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), theirs)


@pytest.mark.parametrize("legacy", [True, False])
def test_a_masked_lm_checkpoint_loads_into_a_classifier_whose_new_pooler_is_saved(legacy, tmp_path):
    """The Hub's DeBERTa checkpoints are masked LMs (transformers' legacy ``cls`` head, or the
    ``lm_predictions`` the v3 releases hold): the encoder loads, the head is ignored, and the pooler
    and classifier are new, as in transformers; an adapter saves both."""
    mlm = save_random("DebertaV2ForMaskedLM", tmp_path, legacy=legacy)
    with pytest.warns(models.NewWeightsWarning, match="pooler.dense.weight"):
        ours = models.from_pretrained(tmp_path, task_type="SEQ_CLS", num_labels=3)
    assert type(ours).__name__ == "DebertaV2ForSequenceClassification"
    with torch.no_grad():
        ref = mlm.deberta(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).last_hidden_state.numpy()
    np.testing.assert_allclose(real(np.asarray(ours.deberta(input_ids=IDS, attention_mask=MASK).last_hidden_state)),
                               real(ref), atol=1e-5, rtol=0)
    if legacy:
        return
    # PEFT's SEQ_CLS saves `classifier` alone: the new pooler joins modules_to_save, so the file
    # carries it and PEFT, whose own pooler is drawn afresh from this checkpoint, gives our logits
    model = peftjax.get_peft_model(ours, peftjax.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))
    assert model.peft_config["default"].modules_to_save == ("classifier", "score", "pre_classifier", "pooler.dense")
    torch.manual_seed(1)
    assert_peft_reads(model, tr.DebertaV2ForSequenceClassification, tmp_path, tmp_path / "adapter",
                      base_kwargs=dict(num_labels=3), **INPUTS)


@pytest.mark.parametrize("overrides", [dict(legacy=False), dict(embedding_size=24)], ids=["v3-head", "narrow-legacy"])
def test_the_masked_lm_heads_equal_transformers_and_save_what_it_loads(overrides, tmp_path):
    """``legacy=False``: the v3 releases' ``lm_predictions.lm_head``; the legacy ``cls`` head with
    embeddings narrower than the layers (its transform ends at their width): transformers' logits
    and loss, and transformers reads the saved model back (the tied decoder not written)."""
    theirs = save_random("DebertaV2ForMaskedLM", tmp_path / "base", **overrides)
    ours = models.from_pretrained(tmp_path / "base")
    labels = np.where(MASK == 1, IDS % 7 + 3, -100)
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels))
    out = nnx.jit(lambda m: m(input_ids=IDS, attention_mask=MASK, labels=labels))(ours)
    np.testing.assert_allclose(real(np.asarray(out.logits)), real(ref.logits.numpy()), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    ours.save_pretrained(tmp_path / "saved")
    again = tr.DebertaV2ForMaskedLM.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        back = again(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(real(back), real(ref.logits.numpy()), atol=1e-6, rtol=0)


def test_lora_moves_both_ways_with_peft(tmp_path):
    """PEFT's default DeBERTa targets (query_proj, value_proj: with shared keys they also project
    the relative table, here as in PEFT) on a classifier whose pooler is trained and saved beside
    the head. PEFT's adapter gives PEFT's logits here; trained here, ours in PEFT."""
    save_random("DebertaV2ForSequenceClassification", tmp_path / "base")
    assert_lora_moves_both_ways(tr.DebertaV2ForSequenceClassification, tmp_path / "base", tmp_path,
                                dict(task_type="SEQ_CLS", r=4, lora_alpha=8, modules_to_save=["pooler"]),
                                {"query_proj", "value_proj"}, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)),
                                **INPUTS)


@pytest.mark.parametrize(("method", "fields"), [
    ("IA3Config", {}),  # PEFT's default targets: key_proj, value_proj and the feed-forward output.dense
    ("PromptTuningConfig", dict(num_virtual_tokens=3)),
    ("PromptEncoderConfig", dict(num_virtual_tokens=3)),
])
def test_peft_s_ia3_prompt_and_p_tuning_adapters_give_peft_s_logits(method, fields, tmp_path):
    """Virtual tokens before the input shift every relative distance the same way in both
    frameworks; IA³ scales the keys, values and feed-forward input as PEFT's does."""
    save_random("DebertaV2ForSequenceClassification", tmp_path / "base")
    ref = peft_file(tr.DebertaV2ForSequenceClassification, tmp_path / "base",
                    getattr(peft, method)(task_type="SEQ_CLS", **fields), tmp_path / "theirs", **INPUTS)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)


def test_scanned_and_rematerialised_layers_equal_transformers_and_save_a_peft_adapter(tmp_path):
    """``scan_layers`` and ``remat`` (the v2 convolution after the first layer included): the
    logits of transformers, the dropout masks of the plain loop for one key, and a LoRA adapter
    on the stacked layers that PEFT reads to the same logits."""
    theirs = save_random("DebertaV2ForSequenceClassification", tmp_path / "base", conv_kernel_size=3)
    model = models.from_pretrained(tmp_path / "base", scan_layers=True, remat="full")
    assert model.deberta.encoder.layer.layer.attention.self.query_proj.kernel.get_value().shape == (2, 32, 32)
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)
    plain, key = models.from_pretrained(tmp_path / "base"), jax.random.key(1)
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, attention_mask=MASK, dropout_rng=key).logits),
                               np.asarray(plain(input_ids=IDS, attention_mask=MASK, dropout_rng=key).logits),
                               atol=1e-5, rtol=0)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(task_type="SEQ_CLS", r=2, init_lora_weights=False))
    assert_peft_reads(peft_model, tr.DebertaV2ForSequenceClassification, tmp_path / "base", tmp_path / "adapter",
                      **INPUTS)


def test_the_trainer_fine_tunes_a_deberta_classifier_with_its_dropout(tmp_path):
    save_random("DebertaV2ForSequenceClassification", tmp_path / "base", hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1, pooler_dropout=0.1, num_labels=2)
    base = models.from_pretrained(tmp_path / "base")
    # the base model's dropout runs with a key (torch's .train()), a mask per key
    a, b = (np.asarray(base(input_ids=IDS, attention_mask=MASK, dropout_rng=jax.random.key(k)).logits) for k in (0, 1))
    assert np.abs(a - b).max() > 1e-4
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(task_type="SEQ_CLS", r=4, modules_to_save=["pooler"]))
    _tiny.assert_the_trainer_learns(model, tmp_path / "run")


def test_packed_rows_give_each_sequence_its_unpacked_logits(tmp_path):
    """Three sequences packed in two rows (absolute positions on, so they must restart): each
    sequence's logits and loss are those of its own unpadded row; the Trainer packs by default,
    and not with the convolution, which it names."""
    model = models.DebertaV2ForSequenceClassification.from_config(models.ModelConfig(
        "deberta-v2", **_tiny.fields("deberta-v2", position_biased_input=True)), seed=3)
    seqs = [IDS[0, :6], IDS[1, :4], IDS[1, 2:8]]
    forward = nnx.jit(lambda m, kw: m(**kw))
    alone = np.stack([np.asarray(forward(model, dict(input_ids=s[None, :6])).logits)[0] for s in seqs])
    ids = np.zeros((2, 11), np.int64)
    segments = np.zeros((2, 11), np.int64)
    ids[0, :6], segments[0, :6] = seqs[0], 1
    ids[1, :4], segments[1, :4] = seqs[1], 1
    ids[1, 4:10], segments[1, 4:10] = seqs[2], 2
    labels = np.array([0, 2, 1])
    out = forward(model, dict(input_ids=ids, attention_mask=(segments > 0).astype(np.int64), segment_ids=segments,
                              segment_starts=np.array([0, 11, 15]), labels=labels))
    np.testing.assert_allclose(np.asarray(out.logits), alone, atol=1e-5, rtol=0)
    np.testing.assert_allclose(float(out.loss), float(deberta_loss(alone, labels)), atol=1e-6)

    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", disable_tqdm=True, plot=False)
    data = _tiny.classification_data(8)
    lora = dict(task_type="SEQ_CLS", r=2)
    assert peftjax.Trainer(peftjax.get_peft_model(model, peftjax.LoraConfig(**lora)), args, data).packs()
    conv = models.DebertaV2ForSequenceClassification.from_config(models.ModelConfig(
        "deberta-v2", **_tiny.fields("deberta-v2", conv_kernel_size=3)))
    trainer = peftjax.Trainer(peftjax.get_peft_model(conv, peftjax.LoraConfig(**lora)), args, data)
    assert not trainer.packs()
    with pytest.raises(ValueError, match="with conv_kernel_size is not supported"):
        conv(input_ids=ids, segment_ids=segments, segment_starts=np.array([0, 11, 15]))


def deberta_loss(logits, labels):
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.mean(logp[np.arange(len(labels)), labels])


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(pos_att_type="p2p|c2p"), r"pos_att_type \['p2p'\] is not supported"),
    (dict(norm_rel_ebd="batch_norm"), "norm_rel_ebd 'batch_norm' is not supported"),
    (dict(hidden_act="prelu"), "hidden_act 'prelu' is not supported"),
    (dict(conv_kernel_size=3, conv_act="swishy"), "conv_act 'swishy' is not supported"),
])
def test_what_is_not_implemented_is_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        models.DebertaV2ForSequenceClassification.from_config(models.ModelConfig(
            "deberta-v2", **_tiny.fields("deberta-v2", **overrides)))


def test_prefix_tuning_is_refused_by_name():
    """transformers' DeBERTa takes no cache, so PEFT refuses a prefix too."""
    model = models.DebertaV2ForSequenceClassification.from_config(models.ModelConfig(
        "deberta-v2", **_tiny.fields("deberta-v2")))
    with pytest.raises(TypeError, match="DebertaV2ForSequenceClassification does not implement peftjax's prefix"):
        peftjax.get_peft_model(model, peftjax.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))


def test_the_v3_head_with_narrow_embeddings_is_refused():
    with pytest.raises(ValueError, match=r"legacy=False needs embedding_size \(24\) equal to hidden_size \(32\)"):
        models.DebertaV2ForMaskedLM.from_config(models.ModelConfig(
            "deberta-v2", **_tiny.fields("deberta-v2", legacy=False, embedding_size=24)))


def test_a_sequence_past_the_absolute_positions_is_refused():
    model = models.DebertaV2Model.from_config(models.ModelConfig(
        "deberta-v2", **_tiny.fields("deberta-v2", position_biased_input=True, max_position_embeddings=8)))
    with pytest.raises(ValueError, match="sequence length 11 exceeds max_position_embeddings 8"):
        model(input_ids=IDS)
