"""ALBERT against PyTorch transformers and HF PEFT: factorised embeddings, shared layers run in
transformers' step -> group order (4 steps over 2 groups of 2 layers), every head, gradients
through the shared layers (rematerialised too), the checkpoint both ways and LoRA both ways."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import assert_grads_match_torch, jitted, lazy, padded_batch, save_perturbed, torch_logits

import peftjax
from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

VOCAB = _tiny.FAMILIES["albert"][2]["vocab_size"]
# transformers' ALBERT drops nothing by default; the tiny config drops, so dropout's absence in eval shows
DROPOUT = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def _torch(model, **inputs):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    path = tmp_path_factory.mktemp("albert")
    return save_perturbed(tr.AlbertForSequenceClassification, _tiny.config("albert", **DROPOUT), path), path


def test_classifier_logits_and_loss_match_transformers(classifier, jit):
    torch_model, path = classifier
    model = models.from_pretrained(path)
    assert type(model).__name__ == "AlbertForSequenceClassification"
    labels = np.array([0, 2, 1])
    for left in (False, True):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        ref = _torch(torch_model, input_ids=ids, attention_mask=mask, labels=labels)
        inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
        out = jitted(model, **inputs) if jit else model(**inputs)
        np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
        assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_encoder_pooler_and_embeddings_input_match_transformers(classifier):
    torch_model, path = classifier
    model = models.AlbertModel.from_pretrained(path)
    ids, mask = padded_batch(VOCAB, seq=9)
    types = (np.arange(9)[None] >= 5).astype(np.int64).repeat(3, 0)
    ref = _torch(torch_model.albert, input_ids=ids, attention_mask=mask, token_type_ids=types)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state)[valid], ref.last_hidden_state.numpy()[valid],
                               atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    embeds = np.asarray(model.embeddings.word_embeddings(jnp.asarray(ids)))  # embedding_size wide
    assert embeds.shape[-1] == 16
    given = model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=types)
    np.testing.assert_allclose(np.asarray(given.last_hidden_state), np.asarray(out.last_hidden_state), atol=1e-6)


@pytest.mark.parametrize("head", ["AlbertForTokenClassification", "AlbertForQuestionAnswering",
                                  "AlbertForMultipleChoice"])
def test_the_other_heads_match_transformers(head, tmp_path):
    extra = dict(num_labels=2) if head == "AlbertForQuestionAnswering" else {}
    torch_model = save_perturbed(getattr(tr, head), _tiny.config("albert", **DROPOUT, **extra), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == head
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    if head == "AlbertForMultipleChoice":  # [batch, choices, seq]
        inputs = dict(input_ids=np.stack([ids, ids[::-1]], 1), attention_mask=np.stack([mask, mask[::-1]], 1),
                      labels=np.array([0, 1, 1]))
    elif head == "AlbertForQuestionAnswering":
        inputs = dict(input_ids=ids, attention_mask=mask, start_positions=np.array([1, 2, 0]),
                      end_positions=np.array([3, 4, 2]))
    else:
        inputs = dict(input_ids=ids, attention_mask=mask, labels=np.where(mask == 1, ids % 3, -100))
    ref, out = _torch(torch_model, **inputs), jitted(model, **inputs)
    for name in ("logits", "start_logits", "end_logits", "loss"):
        if getattr(ref, name, None) is not None:
            np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(ref, name).numpy(), atol=1e-5,
                                       rtol=0, err_msg=name)


def test_gradients_through_the_shared_layers_match_transformers_rematerialised_too(classifier):
    """Each shared layer's gradient sums over the steps that run it, as torch's autograd sums them."""
    torch_model, path = classifier
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.array([0, 2, 1])
    torch_model.zero_grad()
    torch_inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    torch_model(**torch_inputs).loss.backward()

    for remat in ("none", "full"):
        graphdef, params, rest = nnx.split(models.from_pretrained(path, remat=remat), nnx.Param, ...)
        def loss(p, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, p, rest)(input_ids=ids, attention_mask=mask, labels=labels).loss

        assert_grads_match_torch(nnx.merge(graphdef, jax.jit(jax.grad(loss))(params), rest), torch_model)
    torch_model.zero_grad(set_to_none=True)


def test_dropout_runs_only_under_a_key_and_packed_rows_classify_as_alone(classifier):
    _, path = classifier
    model = models.from_pretrained(path)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    plain = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    dropped = np.asarray(model(input_ids=ids, attention_mask=mask, dropout_rng=jax.random.key(0)).logits)
    again = np.asarray(model(input_ids=ids, attention_mask=mask, dropout_rng=jax.random.key(0)).logits)
    np.testing.assert_array_equal(dropped, again)
    assert np.abs(dropped - plain).max() > 1e-3
    # two sequences packed in one row, each classified as if alone
    first, second = ids[0, :9], ids[1, :7]
    packed = model(input_ids=np.concatenate([first, second])[None], segment_ids=np.array([[1] * 9 + [2] * 7]),
                   segment_starts=np.array([0, 9]))
    np.testing.assert_allclose(np.asarray(packed.logits), plain[:2], atol=1e-5, rtol=0)


def test_saved_checkpoints_load_in_transformers_the_masked_lm_and_a_task_from_it(classifier, tmp_path):
    torch_model, path = classifier
    model = models.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    reloaded = tr.AlbertForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    np.testing.assert_array_equal(torch_logits(reloaded, input_ids=ids, attention_mask=mask),
                                  torch_logits(torch_model, input_ids=ids, attention_mask=mask))
    # albert-base-v2 ships as AlbertForMaskedLM: the masked LM (its decoder tied to the embeddings, its
    # bias to predictions.bias), written back as transformers writes it; a task class ignores the head
    mlm = save_perturbed(tr.AlbertForMaskedLM, _tiny.config("albert"), tmp_path / "mlm")
    lm = models.from_pretrained(tmp_path / "mlm")
    assert type(lm).__name__ == "AlbertForMaskedLM"
    labels = np.where(mask == 1, ids, -100)
    ref = _torch(mlm, input_ids=ids, attention_mask=mask, labels=labels)
    out = lm(input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    lm.save_pretrained(tmp_path / "mlm_saved")
    np.testing.assert_array_equal(
        torch_logits(tr.AlbertForMaskedLM.from_pretrained(tmp_path / "mlm_saved").eval(), input_ids=ids,
                     attention_mask=mask), torch_logits(mlm, input_ids=ids, attention_mask=mask))
    task = models.from_pretrained(tmp_path / "mlm", task_type="SEQ_CLS", num_labels=3)
    assert type(task).__name__ == "AlbertForSequenceClassification" and "classifier.weight" in task.newly_initialised


def test_lora_moves_between_peft_and_peftjax_and_a_bare_config_is_refused(classifier, tmp_path):
    """PEFT 0.22.0 has no default targets for ALBERT: both refuse a bare config; named, the shared
    layers' LoRA (one adapter for every step) and the trained classifier go both ways."""
    torch_model, path = classifier
    with pytest.raises(ValueError, match="target_modules"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(tr.AlbertForSequenceClassification.from_pretrained(path),
                            peft.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'albert'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="SEQ_CLS"))
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value", "ffn"],
                  init_lora_weights=False)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tr.AlbertForSequenceClassification.from_pretrained(path), peft.LoraConfig(**config))
    pm.eval().save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits),
                               torch_logits(pm, input_ids=ids, attention_mask=mask), atol=1e-5)
    made = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**config))
    # one adapter per shared layer (2 groups x 2 layers), whatever the number of steps
    assert sum(k.endswith("lora_A.weight") for k in peftjax.get_peft_model_state_dict(made)) == 4 * 3
    _tiny.train(made, {"input_ids": ids, "attention_mask": mask, "labels": np.array([0, 2, 1])}, steps=2)
    made.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.AlbertForSequenceClassification.from_pretrained(path),
                                                tmp_path / "ours").eval()
    np.testing.assert_allclose(torch_logits(theirs, input_ids=ids, attention_mask=mask),
                               np.asarray(made(input_ids=ids, attention_mask=mask).logits), atol=1e-5)
    merged = made.merge_and_unload()
    np.testing.assert_allclose(np.asarray(merged(input_ids=ids, attention_mask=mask).logits),
                               torch_logits(theirs, input_ids=ids, attention_mask=mask), atol=1e-5)


def test_what_it_does_not_run_is_refused_by_name(classifier):
    _, path = classifier
    with pytest.raises(ValueError, match="scan_layers=True is not supported"):
        models.from_pretrained(path, scan_layers=True)
    with pytest.raises(ValueError, match="num_hidden_groups=5 must be between 1 and num_hidden_layers=4"):
        models.from_pretrained(path, num_hidden_groups=5)
    model = models.from_pretrained(path)
    prefix = [(jnp.zeros((1, 2, 4, 8)),) * 2] * 4
    with pytest.raises(ValueError, match="prefix tuning .* is not supported"):
        model(input_ids=[[2, 5, 7]], prefix_kv=prefix)


def test_prompt_tuning_takes_the_embedding_width_and_loads_in_peft(classifier, tmp_path):
    """ALBERT's word embeddings are ``embedding_size`` wide: PEFT's default ``token_dim`` (the hidden
    size) fails to concatenate there, so peftjax's default is the embeddings' width, which the file
    records and PEFT then uses."""
    _, path = classifier
    config = peftjax.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4)
    made = peftjax.get_peft_model(models.from_pretrained(path), config)
    assert made.peft_config["default"].token_dim == 16
    made.save_pretrained(tmp_path)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    plain = np.asarray(models.from_pretrained(path)(input_ids=ids, attention_mask=mask).logits)
    assert np.abs(np.asarray(made(input_ids=ids, attention_mask=mask).logits) - plain).max() > 1e-3  # random prompt
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.AlbertForSequenceClassification.from_pretrained(path), tmp_path)
    np.testing.assert_allclose(torch_logits(theirs.eval(), input_ids=ids, attention_mask=mask),
                               np.asarray(made(input_ids=ids, attention_mask=mask).logits), atol=1e-5)
