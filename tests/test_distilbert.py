"""DistilBERT against PyTorch transformers (hidden states, logits, losses, gradients, a masked-LM
checkpoint, where each dropout sits), LoRA and prompt tuning both ways with HF PEFT, what PEFT
refuses on it, the Trainer, dropout keys and scanned layers.

Every weight is random (the layers' norm scales around 1), so a swapped q/k/v projection, a
residual added after the wrong norm, a missing ReLU or an unmasked padded key shows; rows are
right-padded.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import _tiny
from _torch_models import assert_grads_match_torch, lazy, randomised
import peftjax
from peftjax import models
from peftjax.io import read_safetensors, write_safetensors

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(3, 96, (2, 11))
MASK = np.ones_like(IDS)
MASK[1, 8:] = 0  # right padding
IDS[MASK == 0] = 0
REAL = MASK.astype(bool)
LABELS = {  # the task class -> its labels for IDS
    "DistilBertForSequenceClassification": dict(labels=np.array([0, 2])),
    "DistilBertForTokenClassification": dict(labels=np.where(MASK == 1, IDS % 5, -100)),
    "DistilBertForQuestionAnswering": dict(start_positions=np.array([1, 3]), end_positions=np.array([4, 11])),
}
CASES = {  # name -> (transformers class, config overrides, labels)
    "encoder": ("DistilBertModel", {}, {}),
    "single-label": ("DistilBertForSequenceClassification", {}, LABELS["DistilBertForSequenceClassification"]),
    "regression": ("DistilBertForSequenceClassification", dict(num_labels=1), dict(labels=np.array([0.5, -1.5]))),
    "multi-label": ("DistilBertForSequenceClassification", dict(problem_type="multi_label_classification"),
                    dict(labels=np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))),
    # a sinusoidal checkpoint's table is read from the file (randomised here), as transformers reads it
    "relu-sinusoidal": ("DistilBertForSequenceClassification", dict(activation="relu", sinusoidal_pos_embds=True),
                        LABELS["DistilBertForSequenceClassification"]),
    "tokens": ("DistilBertForTokenClassification", dict(num_labels=5), LABELS["DistilBertForTokenClassification"]),
    # an end position past the row (11): cut off by truncation, counted in neither mean
    "spans": ("DistilBertForQuestionAnswering", dict(num_labels=2), LABELS["DistilBertForQuestionAnswering"]),
}
TARGETS = ["q_lin", "v_lin"]  # PEFT 0.22.0 has no default LoRA targets for DistilBERT
# PEFT has no hidden_size in DistilBERT's config dict to read: the prompt's shape is named
PROMPT_SHAPE = dict(token_dim=32, num_attention_heads=4)


def save_random(class_name, path, **overrides):
    model = randomised(getattr(tr, class_name)(_tiny.config("distilbert", **overrides)).eval(), scale=0.2)
    model.save_pretrained(path)
    return model


def real(x):
    """A per-token output's real positions; any other output whole."""
    return x[REAL] if x.shape[:2] == MASK.shape else x


def _torch(model, **inputs):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _moved_off_start(pm, seed: int = 0):
    """PEFT's model with every trainable tensor moved by noise (0.2 std), in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn_like(p))
    return pm.eval()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """``(path, torch model)``: a random DistilBertForSequenceClassification checkpoint, 3 labels."""
    path = tmp_path_factory.mktemp("distilbert-cls")
    return path, save_random("DistilBertForSequenceClassification", path)


# ---------------------------------------------------------------- against transformers


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_losses_equal_transformers(case, tmp_path):
    class_name, overrides, labels = CASES[case]
    theirs = save_random(class_name, tmp_path, **overrides)
    ours = models.from_pretrained(tmp_path)
    assert type(ours).__name__ == class_name
    ref = _torch(theirs, input_ids=IDS, attention_mask=MASK, **labels)
    out = nnx.jit(lambda m, kw: m(input_ids=IDS, attention_mask=MASK, **kw))(ours, labels)
    compared = [name for name in ("last_hidden_state", "logits", "start_logits", "end_logits", "loss")
                if getattr(ref, name, None) is not None]
    assert compared == (["last_hidden_state"] if not labels else
                        ["start_logits", "end_logits", "loss"] if "start_positions" in labels else ["logits", "loss"])
    for name in compared:
        np.testing.assert_allclose(real(np.asarray(getattr(out, name))), real(getattr(ref, name).numpy()),
                                   atol=1e-5, rtol=0, err_msg=name)


def test_position_ids_and_inputs_embeds_as_transformers(classifier):
    """Given positions (shifted by 3) are used as given; embeddings passed in place of ids give
    the ids' logits."""
    path, theirs = classifier
    ours = models.from_pretrained(path)
    positions = np.broadcast_to(np.arange(3, 3 + IDS.shape[1]), IDS.shape)
    ref = _torch(theirs, input_ids=IDS, attention_mask=MASK, position_ids=positions).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS, attention_mask=MASK, position_ids=positions).logits),
                               ref, atol=1e-5, rtol=0)
    embeds = ours.distilbert.embeddings.word_embeddings(IDS)
    np.testing.assert_allclose(np.asarray(ours(inputs_embeds=embeds, attention_mask=MASK).logits),
                               np.asarray(ours(input_ids=IDS, attention_mask=MASK).logits), atol=1e-6, rtol=0)


def test_every_weight_s_gradient_equals_torch_s(classifier):
    path, theirs = classifier
    ours = models.from_pretrained(path)
    labels = LABELS["DistilBertForSequenceClassification"]["labels"]
    theirs.zero_grad()
    ref = theirs(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels))
    ref.loss.backward()
    graphdef, params, rest = nnx.split(ours, nnx.Param, ...)
    loss = lambda p: nnx.merge(graphdef, p, rest)(input_ids=IDS, attention_mask=MASK, labels=labels).loss  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(value) - ref.loss.item()) <= 1e-5
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), theirs)
    theirs.zero_grad()


def test_sinusoidal_position_embeddings_start_as_transformers_s():
    config = _tiny.config("distilbert", sinusoidal_pos_embds=True, max_position_embeddings=40)
    torch.manual_seed(0)
    theirs = tr.DistilBertModel(config).embeddings.position_embeddings.weight.detach().numpy()
    ours = models.DistilBertModel.from_config(config).embeddings.position_embeddings.embedding.get_value()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-6, rtol=0)


# the Hub's distilbert-base-uncased config.json (transformers 4.10) in small: its tie_weights_ and all
HUB_CONFIG = {"activation": "gelu", "architectures": ["DistilBertForMaskedLM"], "attention_dropout": 0.1, "dim": 32,
              "dropout": 0.1, "hidden_dim": 37, "initializer_range": 0.02, "max_position_embeddings": 512,
              "model_type": "distilbert", "n_heads": 4, "n_layers": 2, "pad_token_id": 0, "qa_dropout": 0.1,
              "seq_classif_dropout": 0.2, "sinusoidal_pos_embds": False, "tie_weights_": True,
              "transformers_version": "4.10.0.dev0", "vocab_size": 96}
NEW_HEADS = {"SEQ_CLS": ["pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"],
             "TOKEN_CLS": ["classifier.weight", "classifier.bias"],
             "QUESTION_ANS": ["qa_outputs.weight", "qa_outputs.bias"]}


@pytest.fixture(scope="module")
def masked_lm(tmp_path_factory):
    """``(path, torch model)``: a random DistilBertForMaskedLM saved with the Hub's config.json, its
    file carrying the ``position_ids`` buffer as transformers 4 wrote it."""
    path = tmp_path_factory.mktemp("distilbert-mlm")
    mlm = save_random("DistilBertForMaskedLM", path)
    (path / "config.json").write_text(json.dumps(HUB_CONFIG))
    tensors, metadata = read_safetensors(path / "model.safetensors")
    positions = np.arange(HUB_CONFIG["max_position_embeddings"], dtype=np.int64)[None]
    tensors = {**tensors, "distilbert.embeddings.position_ids": positions}
    write_safetensors(path / "model.safetensors", tensors, metadata)
    return path, mlm


@pytest.mark.parametrize("task", [None, "FEATURE_EXTRACTION", *NEW_HEADS])
def test_a_masked_lm_checkpoint_loads_into_each_class(masked_lm, task):
    """The Hub's DistilBERT checkpoints are masked LMs: without a task the masked LM itself (its
    class, every weight read); for a task its ``vocab_*`` head is ignored, the encoder loads, a
    task's head is new (and named), as transformers' ``AutoModelFor...`` do."""
    path, mlm = masked_lm
    kwargs = {"SEQ_CLS": dict(num_labels=3), "QUESTION_ANS": dict(num_labels=2)}.get(task, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = models.from_pretrained(path, task_type=task, **kwargs)
    expected = {None: "DistilBertForMaskedLM", "FEATURE_EXTRACTION": "DistilBertModel",
                "SEQ_CLS": "DistilBertForSequenceClassification",
                "TOKEN_CLS": "DistilBertForTokenClassification", "QUESTION_ANS": "DistilBertForQuestionAnswering"}
    assert type(ours).__name__ == expected[task]
    new = [w.message for w in caught if issubclass(w.category, models.NewWeightsWarning)]
    assert [sorted(w.keys) for w in new] == ([sorted(NEW_HEADS[task])] if task in NEW_HEADS else [])
    # nothing else is reported: the masked-LM head is not an unexpected key
    assert [str(w.message) for w in caught if not issubclass(w.category, models.NewWeightsWarning)] == []
    encoder = ours if task == "FEATURE_EXTRACTION" else ours.distilbert
    ref = _torch(mlm.distilbert, input_ids=IDS, attention_mask=MASK).last_hidden_state.numpy()
    np.testing.assert_allclose(real(np.asarray(encoder(input_ids=IDS, attention_mask=MASK).last_hidden_state)),
                               real(ref), atol=1e-5, rtol=0)
    theirs = _quiet(tr.AutoConfig.from_pretrained, path)
    assert (ours.config.hidden_size, ours.config.num_hidden_layers, ours.config.num_attention_heads) == (
        theirs.hidden_size, theirs.num_hidden_layers, theirs.num_attention_heads)


@pytest.mark.parametrize(("overrides", "named"), [
    (dict(activation="prelu"), "activation 'prelu' is not supported"),
    (dict(n_heads=5), "dim 32 is not a multiple of n_heads 5"),
])
def test_what_is_not_computed_is_named(overrides, named):
    with pytest.raises(ValueError, match=named):
        models.DistilBertModel.from_config(models.ModelConfig("distilbert", **_tiny.fields("distilbert", **overrides)))


def test_question_answering_needs_two_labels_and_rows_fit_the_position_table():
    with pytest.raises(ValueError, match=r"DistilBertForQuestionAnswering needs num_labels=2 .* got 3"):
        models.DistilBertForQuestionAnswering.from_config(_tiny.config("distilbert"))
    model = models.DistilBertModel.from_config(_tiny.config("distilbert", max_position_embeddings=8))
    with pytest.raises(ValueError, match="sequence length 11 exceeds max_position_embeddings 8"):
        model(input_ids=IDS)


# ---------------------------------------------------------------- with HF PEFT


def _peft_reads(model, base_class, base_path, adapter_dir, **inputs):
    """``model`` (a peftjax PeftModel) saved to ``adapter_dir`` and loaded by PEFT: PEFT's outputs."""
    model.save_pretrained(adapter_dir)
    theirs = _quiet(peft.PeftModel.from_pretrained, _quiet(base_class.from_pretrained, base_path), adapter_dir).eval()
    return _torch(theirs, **inputs)


def test_lora_on_a_classifier_moves_both_ways_with_peft(classifier, tmp_path):
    """PEFT's SEQ_CLS ``modules_to_save`` (``classifier``, ``score``) matches ``pre_classifier`` too
    (a suffix): both head layers are copied, trained and saved whole, here as in PEFT."""
    path, _ = classifier
    config = dict(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=TARGETS)
    pm = _quiet(peft.get_peft_model, _quiet(tr.DistilBertForSequenceClassification.from_pretrained, path),
                peft.LoraConfig(**config))
    _moved_off_start(pm).save_pretrained(tmp_path / "theirs")
    theirs_keys = set(read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")[0])
    assert {"base_model.model.pre_classifier.weight", "base_model.model.classifier.weight"} <= theirs_keys
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs")
    ref = _torch(pm, input_ids=IDS, attention_mask=MASK).logits.numpy()
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)

    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**config,
                                                                                    init_lora_weights="gaussian"))
    head = np.asarray(model.base_model.pre_classifier.kernel.get_value())
    losses = _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=4).losses
    assert losses[-1] < losses[0]
    ours = _peft_reads(model, tr.DistilBertForSequenceClassification, path, tmp_path / "ours", input_ids=IDS,
                       attention_mask=MASK).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), ours, atol=1e-5, rtol=0)
    saved = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")[0]
    assert set(saved) == theirs_keys
    assert np.abs(saved["base_model.model.pre_classifier.weight"].T - head).max() > 1e-4  # trained, not only saved


def test_peft_s_classifier_on_the_hub_s_masked_lm_loads_without_a_new_head(masked_lm, tmp_path):
    """A PEFT SEQ_CLS adapter trained on a masked-LM checkpoint (the Hub's distilbert-base-uncased)
    carries both head layers (``pre_classifier`` and ``classifier``): ``AutoPeftModel`` builds the
    classifier from the checkpoint and the file, reports no weight as newly initialised, and gives
    PEFT's logits."""
    path, _ = masked_lm
    pm = _quiet(peft.get_peft_model, _quiet(tr.DistilBertForSequenceClassification.from_pretrained, path, num_labels=3),
                peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=TARGETS))
    _moved_off_start(pm).save_pretrained(tmp_path / "theirs")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = peftjax.AutoPeftModel.from_pretrained(tmp_path / "theirs", path)
    assert [str(w.message) for w in caught if issubclass(w.category, models.NewWeightsWarning)] == []
    assert type(ours.base_model).__name__ == "DistilBertForSequenceClassification"
    ref = _torch(pm, input_ids=IDS, attention_mask=MASK).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
def test_lora_on_the_token_and_span_heads_moves_both_ways_with_peft(task, tmp_path):
    class_name = {"TOKEN_CLS": "DistilBertForTokenClassification", "QUESTION_ANS": "DistilBertForQuestionAnswering"}
    torch_class = getattr(tr, class_name[task])
    save_random(class_name[task], tmp_path / "base", num_labels=5 if task == "TOKEN_CLS" else 2)
    outputs = ("logits",) if task == "TOKEN_CLS" else ("start_logits", "end_logits")
    config = dict(task_type=task, r=4, lora_alpha=8, target_modules=TARGETS)
    pm = _quiet(peft.get_peft_model, _quiet(torch_class.from_pretrained, tmp_path / "base"), peft.LoraConfig(**config))
    _moved_off_start(pm).save_pretrained(tmp_path / "theirs")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "theirs")
    ref, out = _torch(pm, input_ids=IDS, attention_mask=MASK), loaded(input_ids=IDS, attention_mask=MASK)
    for name in outputs:
        np.testing.assert_allclose(np.asarray(getattr(out, name))[REAL], getattr(ref, name).numpy()[REAL], atol=1e-5,
                                   rtol=0, err_msg=name)

    model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), peftjax.LoraConfig(**config))
    batch = _tiny.batch(IDS, MASK, task, labels=(1, 4))
    losses = _tiny.train(model, batch, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    theirs = _peft_reads(model, torch_class, tmp_path / "base", tmp_path / "ours", input_ids=IDS, attention_mask=MASK)
    out = model(input_ids=IDS, attention_mask=MASK)
    for name in outputs:
        np.testing.assert_allclose(np.asarray(getattr(out, name))[REAL], getattr(theirs, name).numpy()[REAL],
                                   atol=1e-5, rtol=0, err_msg=name)


def test_prompt_tuning_moves_both_ways_with_peft(classifier, tmp_path):
    """Virtual tokens before a DistilBERT classifier's input (its [CLS] read then falls on the first
    of them, in PEFT too): PEFT's adapter gives PEFT's logits here; one trained here, ours in PEFT."""
    path, _ = classifier
    fields = dict(task_type="SEQ_CLS", num_virtual_tokens=3, **PROMPT_SHAPE)
    torch.manual_seed(0)
    pm = _quiet(peft.get_peft_model, _quiet(tr.DistilBertForSequenceClassification.from_pretrained, path),
                peft.PromptTuningConfig(**fields))
    _moved_off_start(pm).save_pretrained(tmp_path / "theirs")
    ref = _torch(pm, input_ids=IDS, attention_mask=MASK).logits.numpy()
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs")
    np.testing.assert_allclose(np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits), ref, atol=1e-5, rtol=0)

    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.PromptTuningConfig(**fields))
    losses = _tiny.train(model, _tiny.batch(IDS, MASK, "SEQ_CLS", labels=(0, 2)), steps=3).losses
    assert losses[-1] < losses[0]
    theirs = _peft_reads(model, tr.DistilBertForSequenceClassification, path, tmp_path / "ours", input_ids=IDS,
                         attention_mask=MASK).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, attention_mask=MASK).logits), theirs, atol=1e-5, rtol=0)


def test_what_peft_refuses_on_distilbert_is_refused_here(classifier):
    """PEFT 0.22.0 has no default LoRA (nor IA³) targets for DistilBERT, cannot read a prompt's
    ``token_dim`` from its config, and refuses prefix tuning (transformers' DistilBERT takes no
    cache): peftjax refuses each as well, with the field or argument named."""
    path, _ = classifier
    base = lambda: _quiet(tr.DistilBertForSequenceClassification.from_pretrained, path)  # noqa: E731
    with pytest.raises(ValueError, match="target_modules"):
        _quiet(peft.get_peft_model, base(), peft.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'distilbert'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="SEQ_CLS"))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'distilbert'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.IA3Config(task_type="SEQ_CLS"))

    with pytest.raises(ValueError, match="specify `token_dim`"):
        _quiet(peft.get_peft_model, base(), peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="specify `token_dim`"):
        peftjax.get_peft_model(models.from_pretrained(path),
                               peftjax.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3))

    prefix = dict(task_type="SEQ_CLS", num_virtual_tokens=3, **PROMPT_SHAPE)
    pm = _quiet(peft.get_peft_model, base(), peft.PrefixTuningConfig(**prefix))
    with pytest.raises(ValueError, match="does not support past key values"):
        _torch(pm, input_ids=IDS, attention_mask=MASK)
    with pytest.raises(TypeError, match="DistilBertForSequenceClassification does not implement .* `prefix_kv`"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.PrefixTuningConfig(**prefix))


def test_the_trainer_fine_tunes_a_distilbert_classifier(classifier, tmp_path):
    """The Trainer's rows go unpacked to a model that takes no ``segment_ids``; LoRA learns with the
    model's own dropout on."""
    path, _ = classifier
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=TARGETS))
    _tiny.assert_the_trainer_learns(model, tmp_path / "run")


# ---------------------------------------------------------------- dropout and scanned layers

DROPOUTS = ("dropout", "attention_dropout", "seq_classif_dropout", "qa_dropout")
DROPOUT_CASES = [  # (class, the one rate set): each rate the class reads, where it reads it
    ("DistilBertModel", "dropout"), ("DistilBertModel", "attention_dropout"),
    ("DistilBertForSequenceClassification", "seq_classif_dropout"),
    ("DistilBertForTokenClassification", "dropout"),
    ("DistilBertForQuestionAnswering", "qa_dropout"),
]

OUTPUT = {"DistilBertModel": "last_hidden_state", "DistilBertForSequenceClassification": "logits",
          "DistilBertForTokenClassification": "logits", "DistilBertForQuestionAnswering": "start_logits"}


@pytest.mark.parametrize(("class_name", "rate"), DROPOUT_CASES, ids=[f"{c}-{r}" for c, r in DROPOUT_CASES])
def test_each_dropout_runs_with_a_key_only(class_name, rate):
    """With every rate 0 but ``rate``, a key changes the outputs (a mask per key, the same for the
    same key); without one the model is deterministic; with every rate 0 the key changes nothing."""
    overrides = dict(dict.fromkeys(DROPOUTS, 0.0), num_labels=2)
    cls = getattr(models, class_name)
    calm = cls.from_config(_tiny.config("distilbert", **overrides))
    model = cls.from_config(_tiny.config("distilbert", **{**overrides, rate: 0.3}))
    run = nnx.jit(lambda m, key: getattr(m(input_ids=IDS, attention_mask=MASK, dropout_rng=key), OUTPUT[class_name]))
    evaluated = np.asarray(run(model, None))
    np.testing.assert_array_equal(evaluated, np.asarray(run(model, None)))
    a, b, again = (np.asarray(run(model, jax.random.key(k))) for k in (0, 1, 0))
    assert np.abs(a - evaluated).max() > 1e-3 and np.abs(a - b).max() > 1e-3
    np.testing.assert_array_equal(a, again)
    np.testing.assert_array_equal(np.asarray(run(calm, jax.random.key(0))), np.asarray(run(calm, None)))


@pytest.mark.parametrize(("class_name", "rate"), DROPOUT_CASES, ids=[f"{c}-{r}" for c, r in DROPOUT_CASES])
def test_each_dropout_sits_where_transformers_puts_it(class_name, rate, tmp_path):
    """A rate of 1 drops everything, in torch's ``.train()`` as here with a key: the outputs are then
    deterministic and equal transformers' only if each dropout sits where transformers' does (after
    the embeddings and ``ffn.lin2``, not after ``out_lin``; on the attention probabilities; in each head)."""
    overrides = dict(dict.fromkeys(DROPOUTS, 0.0), num_labels=2, **{rate: 1.0})
    theirs = save_random(class_name, tmp_path, **overrides)
    theirs.set_attn_implementation("eager")  # torch's SDPA does not take a dropout of 1
    ours = models.from_pretrained(tmp_path)
    ref = getattr(_torch(theirs.train(), input_ids=IDS, attention_mask=MASK), OUTPUT[class_name]).numpy()
    out = getattr(ours(input_ids=IDS, attention_mask=MASK, dropout_rng=jax.random.key(0)), OUTPUT[class_name])
    assert np.abs(ref - getattr(_torch(theirs.eval(), input_ids=IDS, attention_mask=MASK),
                                OUTPUT[class_name]).numpy()).max() > 1e-3  # the rate changes torch's outputs
    np.testing.assert_allclose(real(np.asarray(out)), real(ref), atol=1e-5, rtol=0)


def _grads(model, key, labels):
    """Every weight's gradient of the loss, by checkpoint name (per layer, stacked or not)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return nnx.merge(graphdef, p, rest)(input_ids=IDS, attention_mask=MASK, labels=labels, dropout_rng=key).loss

    return models.hf_state_dict(nnx.merge(graphdef, jax.jit(jax.grad(loss))(params), rest))


def test_scanned_layers_give_the_unrolled_model_s_outputs_and_checkpoint(classifier, tmp_path):
    """``scan_layers=True`` stacks the blocks: the same logits and gradients, with and without
    dropout (each layer draws the same mask), and the same checkpoint written back."""
    path, _ = classifier
    unrolled, scanned = models.from_pretrained(path), models.from_pretrained(path, scan_layers=True)
    assert type(scanned.distilbert.transformer.layer).__name__ == "StackedLayers"
    labels = LABELS["DistilBertForSequenceClassification"]["labels"]
    run = nnx.jit(lambda m, key: m(input_ids=IDS, attention_mask=MASK, dropout_rng=key).logits)
    for key in (None, jax.random.key(3)):
        np.testing.assert_allclose(np.asarray(run(scanned, key)), np.asarray(run(unrolled, key)), atol=1e-5, rtol=0)
        ours, ref = _grads(scanned, key, labels), _grads(unrolled, key, labels)
        assert set(ours) == set(ref)
        for name, grad in ref.items():
            np.testing.assert_allclose(ours[name], grad, atol=1e-6, rtol=1e-4, err_msg=name)
    scanned.save_pretrained(tmp_path / "saved")
    saved, original = (read_safetensors(p / "model.safetensors")[0] for p in (tmp_path / "saved", path))
    assert set(saved) == set(original)
    for name, value in original.items():
        np.testing.assert_array_equal(saved[name], value, err_msg=name)
