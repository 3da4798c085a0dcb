"""RoBERTa, XLM-RoBERTa and CamemBERT against PyTorch transformers and HF PEFT: tiny random checkpoints.

What differs from BERT is checked where it shows: fairseq's positions (counted over real tokens
from the padding index on, so left and right padding agree; embeddings numbered in order), the
classification head on ``<s>`` (``dense``, tanh, ``out_proj``, no pooler), transformers' keys
both ways, and PEFT's SEQ_CLS adapters, whose ``modules_to_save`` copy is that two-layer head.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy, save_tiny
from peftjax import models
from peftjax.io import read_safetensors

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

PAD = 1
FAMILIES = {"roberta": tr.RobertaForSequenceClassification, "xlm-roberta": tr.XLMRobertaForSequenceClassification,
            "camembert": tr.CamembertForSequenceClassification}
LABELS = np.array([0, 2, 1])


def _batch(padding_side: str = "right", vocab: int = 96, batch: int = 3, seq: int = 9, seed: int = 0):
    """``<s> ... </s>`` rows of decreasing length, padded with RoBERTa's padding id (1)."""
    rng = np.random.RandomState(seed)
    ids = np.full((batch, seq), PAD, np.int64)
    mask = np.zeros_like(ids)
    for row in range(batch):
        n = seq - 2 * row
        tokens = [0, *rng.randint(3, vocab, n - 2), 2]
        where = slice(0, n) if padding_side == "right" else slice(seq - n, seq)
        ids[row, where], mask[row, where] = tokens, 1
    return dict(input_ids=ids, attention_mask=mask)


def _torch(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


def _run(model, jit: bool, **inputs):
    if jit:
        return nnx.jit(lambda m, feed: m(**feed))(model, {k: jnp.asarray(v) for k, v in inputs.items()})
    return model(**inputs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``family -> (torch classifier, its directory)``."""
    out = {}
    for family, cls in FAMILIES.items():
        path = tmp_path_factory.mktemp(family)
        out[family] = save_tiny(cls, _tiny.config(family), path), path
    return out


# XLM-R and CamemBERT differ from RoBERTa in their class names only: one padding side each
@pytest.mark.parametrize("family, padding_side", [("roberta", "right"), ("roberta", "left"), ("xlm-roberta", "right"),
                                                  ("camembert", "left")])
def test_classifier_logits_and_loss_match_transformers(checkpoints, family, padding_side, jit):
    torch_model, path = checkpoints[family]
    model = models.from_pretrained(path)
    assert type(model).__name__ == FAMILIES[family].__name__
    inputs = _batch(padding_side)
    ref = _torch(torch_model, **inputs, labels=LABELS)
    out = _run(model, jit, **inputs, labels=LABELS)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    if padding_side == "left":  # fairseq's positions ignore where the padding is: the real tokens'
        # states agree (the head, as transformers', reads column 0, a padding token on the left)
        right = _batch("right")
        states = {side: np.asarray(model.roberta(**feed).last_hidden_state)[feed["attention_mask"] == 1]
                  for side, feed in (("left", inputs), ("right", right))}
        np.testing.assert_allclose(states["left"], states["right"], atol=1e-5, rtol=0)


def test_encoder_pooler_and_embeddings_input_match_transformers(checkpoints, tmp_path):
    """The bare encoder with its pooler (a checkpoint that has one), and ``inputs_embeds``, which
    transformers numbers in order from the padding index on, padding or not."""
    torch_model = save_tiny(tr.RobertaModel, _tiny.config("roberta"), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert isinstance(model, models.RobertaModel) and model.pooler is not None
    inputs = _batch()
    ref = _torch(torch_model, **inputs)
    out = model(**inputs)
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.pooler_output), ref.pooler_output.numpy(), atol=1e-5)
    embeds = np.asarray(model.embeddings.word_embeddings(jnp.asarray(inputs["input_ids"])))
    ref = _torch(torch_model, inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    out = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    np.testing.assert_allclose(np.asarray(out.last_hidden_state), ref.last_hidden_state.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="max_position_embeddings 40 leaves after the padding index 1"):
        model(input_ids=np.full((1, 39), 5))


def test_packed_rows_give_each_sequence_its_own_logits(checkpoints):
    """Several sequences a row (``Batcher(packing=True)``): each counts its positions from its own
    ``<s>`` and gets the logits transformers gives it in an ordinary padded batch."""
    from peftjax.training import Batcher

    torch_model, path = checkpoints["roberta"]
    model = models.from_pretrained(path)
    rng = np.random.default_rng(4)
    ids = [[0, *rng.integers(3, 96, n - 2).tolist(), 2] for n in (9, 3, 14, 5, 7, 2, 11)]
    cols = {"input_ids": ids, "labels": rng.integers(0, 3, len(ids))}
    (batch,) = Batcher(cols, 8, packing=True, shuffle=False, pad_token_id=PAD).batches(0)
    assert batch["input_ids"].shape[0] < len(ids)  # several sequences share a row
    # jitted only: packed rows reach a model only through the Trainer's compiled step
    out = _run(model, True, **{k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids", "segment_starts")})
    real = batch["sample_weight"] > 0
    (padded,) = Batcher(cols, 8, buckets=None, shuffle=False, pad_token_id=PAD).batches(0)
    ref = _torch(torch_model, input_ids=padded["input_ids"][real], attention_mask=padded["attention_mask"][real])
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref.logits.numpy(), atol=1e-5, rtol=0)


def test_saved_checkpoint_loads_in_transformers(checkpoints, tmp_path):
    torch_model, path = checkpoints["xlm-roberta"]
    model = models.from_pretrained(path)
    head = model.classifier.out_proj.bias  # changed, so that equal logits prove transformers read our file
    head.set_value(head.get_value() + jnp.array([0.5, -0.25, 1.0]))
    model.save_pretrained(tmp_path)
    tensors, _ = read_safetensors(tmp_path / "model.safetensors")
    assert set(tensors) == set(torch_model.state_dict())
    reloaded = tr.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(reloaded) is tr.XLMRobertaForSequenceClassification
    inputs = _batch()
    np.testing.assert_allclose(_torch(reloaded, **inputs).logits.numpy(), np.asarray(model(**inputs).logits),
                               atol=1e-5, rtol=0)


def test_a_masked_lm_checkpoint_loads_for_each_task(tmp_path):
    """The Hub's RoBERTa checkpoints are ``RobertaForMaskedLM`` (an ``lm_head``, no pooler): without
    a task, that class; as transformers' Auto classes do, the bare encoder (FEATURE_EXTRACTION) gets
    a new pooler, SEQ_CLS a new head, and the encoder's states are transformers'."""
    torch_model = save_tiny(tr.RobertaForMaskedLM, _tiny.config("roberta"), tmp_path)
    inputs = _batch()
    ref = _torch(torch_model.roberta, **inputs).last_hidden_state.numpy()
    assert type(models.from_pretrained(tmp_path)) is models.RobertaForMaskedLM
    with pytest.warns(models.NewWeightsWarning, match="pooler"):
        bare = models.from_pretrained(tmp_path, task_type="FEATURE_EXTRACTION")
    assert type(bare) is models.RobertaModel
    np.testing.assert_allclose(np.asarray(bare(**inputs).last_hidden_state), ref, atol=1e-5)
    with pytest.warns(models.NewWeightsWarning, match="classifier"):
        classifier = models.from_pretrained(tmp_path, task_type="SEQ_CLS", num_labels=3)
    assert type(classifier) is models.RobertaForSequenceClassification
    encoded = classifier.roberta(**inputs).last_hidden_state
    np.testing.assert_allclose(np.asarray(encoded), ref, atol=1e-5)


def _perturb(pm):
    """Moves every trainable torch weight (LoRA factors and the head's copy) off its start."""
    torch.manual_seed(2)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))


def test_a_peft_lora_adapter_with_its_trained_head_gives_peft_s_logits(checkpoints, tmp_path):
    torch_model, path = checkpoints["roberta"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(FAMILIES["roberta"].from_pretrained(path),
                                 peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8)).eval()
    _perturb(pm)
    pm.save_pretrained(tmp_path)
    saved, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    head = {k for k in saved if ".classifier." in k}
    assert head == {f"base_model.model.classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")}
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    inputs = _batch("left")
    ref = _torch(pm, **inputs).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(**inputs).logits), ref, atol=1e-5, rtol=0)
    assert np.abs(ref - _torch(torch_model, **inputs).logits.numpy()).max() > 1e-2


def test_a_lora_adapter_trained_here_trains_the_whole_head_and_loads_in_peft(checkpoints, tmp_path):
    """``get_peft_model`` with SEQ_CLS trains LoRA on ``query``/``value`` and a full copy of the
    two-layer ``classifier`` head (both of its linears train; the base's head stays as loaded);
    PEFT loads the file and gives the same logits."""
    torch_model, path = checkpoints["roberta"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="SEQ_CLS", r=4))
    head_weights = (32 * 32 + 32) + (32 * 3 + 3)  # a copy of dense and out_proj
    lora_weights = 2 * 2 * 4 * (32 + 32)  # query and value of two layers
    assert model.get_nb_trainable_parameters()[0] == lora_weights + head_weights
    # one label: learnable from rows whose <s> states a tiny random encoder makes nearly alike
    batch = {**_batch(), "labels": np.array([2, 2, 2])}
    losses = _tiny.train(model, batch, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    base_head = model.base_model.classifier
    copy = base_head.modules_to_save["default"]
    for layer in ("dense", "out_proj"):
        trained, loaded = getattr(copy, layer), getattr(base_head, layer)
        assert np.abs(np.asarray(trained.kernel.get_value()) - np.asarray(loaded.kernel.get_value())).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(base_head.out_proj.kernel.get_value()),
                                  torch_model.classifier.out_proj.weight.detach().numpy().T)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(FAMILIES["roberta"].from_pretrained(path), tmp_path).eval()
    inputs = _batch("left")
    np.testing.assert_allclose(np.asarray(model(**inputs).logits), _torch(theirs, **inputs).logits.numpy(),
                               atol=1e-5, rtol=0)
    # merged: the trained head stays, as PEFT's merge_and_unload keeps it
    merged = model.merge_and_unload()
    assert {type(getattr(merged.classifier, m).kernel) for m in ("dense", "out_proj")} == {nnx.Param}
    np.testing.assert_allclose(np.asarray(merged(**inputs).logits), _torch(theirs, **inputs).logits.numpy(),
                               atol=1e-5, rtol=0)


def test_the_trainer_packs_a_roberta_classifier_and_learns(checkpoints, tmp_path):
    _, path = checkpoints["roberta"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="SEQ_CLS", r=4))
    rng = np.random.default_rng(0)
    ids = [[0, *rng.integers(3, 96, n).tolist(), 2] for n in rng.integers(2, 12, 48)]
    labels = [int(row[1] % 3) for row in ids]
    args = peftjax.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=3,
                                     learning_rate=5e-3, save_steps=0, disable_tqdm=True, report_to="none", plot=False)
    trainer = peftjax.Trainer(model, args, {"input_ids": ids, "labels": labels}, pad_token_id=PAD)
    assert trainer.packs()
    before = trainer.evaluate({"input_ids": ids, "labels": labels})["eval_loss"]
    trainer.train()
    after = trainer.evaluate({"input_ids": ids, "labels": labels})["eval_loss"]
    assert after < before


@pytest.mark.parametrize("method", ["prompt", "p-tuning"])
def test_a_peft_prompt_adapter_gives_peft_s_logits(checkpoints, method, tmp_path):
    """Prompt tuning and P-tuning (PEFT's RoBERTa examples): the virtual tokens go before the
    embeddings, which transformers then numbers in order from the padding index on."""
    _, path = checkpoints["roberta"]
    config = (peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=4) if method == "prompt" else
              peft.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=4, encoder_hidden_size=12))
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(FAMILIES["roberta"].from_pretrained(path), config).eval()
    _perturb(pm)
    pm.save_pretrained(tmp_path)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    inputs = _batch()
    np.testing.assert_allclose(np.asarray(ours(**inputs).logits), _torch(pm, **inputs).logits.numpy(),
                               atol=1e-5, rtol=0)


def test_scanned_layers_give_the_unrolled_logits(checkpoints):
    _, path = checkpoints["roberta"]
    inputs = _batch()
    unrolled = np.asarray(models.from_pretrained(path)(**inputs).logits)
    scanned = np.asarray(models.from_pretrained(path, scan_layers=True)(**inputs).logits)
    np.testing.assert_allclose(scanned, unrolled, atol=1e-6, rtol=0)


def test_camembert_lora_moves_between_peft_and_peftjax_and_refuses_default_targets(checkpoints, tmp_path):
    """PEFT 0.22.0 has no default targets for ``camembert`` (its table names roberta and xlm-roberta):
    both refuse a bare config; named, a PEFT adapter gives PEFT's logits here and one made here PEFT's."""
    _, path = checkpoints["camembert"]
    cls = FAMILIES["camembert"]
    with pytest.raises(ValueError, match="target_modules"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(cls.from_pretrained(path), peft.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'camembert'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="SEQ_CLS"))
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(cls.from_pretrained(path), peft.LoraConfig(**config)).eval()
    _perturb(pm)
    pm.save_pretrained(tmp_path / "peft")
    inputs = _batch()
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert type(ours.base_model).__name__ == "CamembertForSequenceClassification"
    np.testing.assert_allclose(np.asarray(ours(**inputs).logits), _torch(pm, **inputs).logits.numpy(), atol=1e-5)
    made = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**config, init_lora_weights=False))
    made.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(cls.from_pretrained(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(_torch(theirs, **inputs).logits.numpy(), np.asarray(made(**inputs).logits), atol=1e-5)
