"""T5 against transformers (logits, loss, greedy generate) and HF PEFT (LoRA, DoRA, IA³, prompt learning).

Two tiny T5s: v1.0 (``relu``, lm_head tied to ``shared``, decoder output scaled by d_model**-0.5)
and v1.1 (``gated-gelu``, its own lm_head, no scaling), built and saved once in PyTorch.
"""

from __future__ import annotations

import contextlib
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _compiles import compilations
from _torch_models import lazy, moved_off_start
import peftjax
from peftjax import models

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

FIELDS = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0,
              dropout_rate=0.0)
VARIANTS = {"v1.0-relu": dict(feed_forward_proj="relu"),
            "v1.1-gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}
# encoder rows padded at the end and in the middle of the batch; labels with -100
IDS = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [9, 10, 11, 12, 13, 14, 15, 1], [40, 41, 1, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).astype(np.int64)
LABELS = np.array([[20, 21, 22, 1, -100], [23, 24, 25, 26, 1], [27, 1, -100, -100, -100]])


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


_BUILT: dict = {}


def build(name, tmp_path_factory):
    """``(name, checkpoint dir, torch model)``, built once per module; weights drawn wider than T5's
    init (std 0.2) so that greedy decoding varies."""
    if name not in _BUILT:
        config = tr.T5Config(**FIELDS, **VARIANTS[name])
        torch.manual_seed(0)
        model = tr.T5ForConditionalGeneration(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "layer_norm" not in pname:
                    p.copy_(0.2 * torch.randn_like(p))
            if name.startswith("v1.1"):  # an untied head, as flan-t5 checkpoints have
                model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(96, 32))
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        _BUILT[name] = name, path, model
    return _BUILT[name]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def t5(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def flan(tmp_path_factory):
    """The v1.1 (gated-gelu, untied) model alone, for the adapter methods' tests."""
    return build("v1.1-gated-gelu", tmp_path_factory)


def torch_out(model, **kw):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in kw.items()})


def run_jax(model, jit: bool, **kw):
    model = getattr(model, "base_model", model)
    if jit:
        return nnx.jit(lambda m, kw: m(**kw))(model, kw)
    return model(**kw)


# adapters with random (non-zero) B: PyTorch's own float32 logits differ from its float64 ones by up
# to 2.1e-5 here (measured), T5's unscaled attention scores amplifying the summation order
ADAPTER_TOL = 5e-5


def assert_close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def real(logits):
    """The logits at real label positions (padded targets carry -100)."""
    return np.asarray(logits)[LABELS != -100]


# ---------------------------------------------------------------- the model


def test_logits_loss_and_encoder_match_transformers(t5):
    name, path, theirs = t5
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    model = models.from_pretrained(path)
    assert type(model) is models.T5ForConditionalGeneration
    assert model.scale_decoder_outputs == name.startswith("v1.0")
    assert (model.lm_head is None) == name.startswith("v1.0")  # tied to shared in v1.0
    assert models.model_class_for(model.config, "SEQ_2_SEQ_LM") is models.T5ForConditionalGeneration
    for jit in (False, True) if name.startswith("v1.0") else (True,):  # eager T5 is slow: one variant
        out = run_jax(model, jit, input_ids=IDS, attention_mask=MASK, labels=LABELS)
        assert_close(out.logits, ref.logits.numpy())
        assert_close(out.loss, ref.loss.numpy())
        assert_close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state.numpy())
    # the bare encoder, from the same checkpoint
    with _quiet():
        encoder = models.T5EncoderModel.from_pretrained(path)
        their_encoder = tr.T5EncoderModel.from_pretrained(path).eval()
    assert_close(run_jax(encoder, True, input_ids=IDS, attention_mask=MASK).last_hidden_state,
                 torch_out(their_encoder, input_ids=IDS, attention_mask=MASK).last_hidden_state.numpy())


def test_greedy_generate_matches_transformers_token_for_token(t5):
    name, path, theirs = t5
    model = models.from_pretrained(path)
    with torch.no_grad():
        ref = theirs.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                              max_new_tokens=7, do_sample=False).numpy()
    ours = model.generate(IDS, MASK, max_new_tokens=7)
    np.testing.assert_array_equal(ours, ref)
    assert len(np.unique(ref[:, 1:])) > 3  # the weights make a varied sequence, not one token repeated
    if name.startswith("v1.1"):  # the sampling path: top-k 1 leaves only the greedy token to draw
        with compilations() as compiled:  # a new temperature or seed reuses the compiled generate
            for temperature, seed in ((0.7, 3), (1.9, 4)):
                sampled = model.generate(IDS, MASK, max_new_tokens=7, do_sample=True, top_k=1,
                                         temperature=temperature, seed=seed)
                np.testing.assert_array_equal(sampled, ref)
        assert compiled.count("_generate") == 1, compiled


def test_relative_position_buckets_are_transformers():
    from peftjax.models._t5 import relative_position_bucket

    rel = torch.arange(-300, 301)[None, :]
    for bidirectional in (True, False):
        ref = tr.models.t5.modeling_t5.T5Attention._relative_position_bucket(
            rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
        ours = relative_position_bucket(rel.numpy(), bidirectional=bidirectional, num_buckets=32, max_distance=128)
        np.testing.assert_array_equal(np.asarray(ours), ref.numpy())


def test_config_reads_as_transformers_and_saves_back(t5, tmp_path):
    name, path, theirs = t5
    ours, ref = models.load_config(path), tr.AutoConfig.from_pretrained(path)
    for key in sorted(set(ref.to_dict()) - {"transformers_version", "_name_or_path", "architectures", "dtype"}):
        assert getattr(ours, key) == getattr(ref, key), key
    assert (ours.hidden_size, ours.num_attention_heads, ours.num_hidden_layers) == (32, 4, 2)
    # an old v1.1 config.json (tie_word_embeddings false, no scale_decoder_outputs) reads as transformers reads it
    old = models.ModelConfig("t5", **FIELDS, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    their_old = tr.T5Config(**FIELDS, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    assert (old.scale_decoder_outputs, old.tie_word_embeddings, old.dense_act_fn, old.is_gated_act) == (
        their_old.scale_decoder_outputs, their_old.tie_word_embeddings, their_old.dense_act_fn, their_old.is_gated_act)
    # saved here (with lm_head written out), transformers reloads the same model
    models.from_pretrained(path).save_pretrained(tmp_path)
    with _quiet():
        back = tr.T5ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_close(torch_out(back, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy(),
                 torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy())


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-prelu'.*'prelu'"):
        models.T5ForConditionalGeneration.from_config(models.ModelConfig("t5", **FIELDS, feed_forward_proj="gated-prelu"))
    with pytest.raises(ValueError, match="feed_forward_proj 'relu-gated'"):
        models.T5ForConditionalGeneration.from_config(models.ModelConfig("t5", **FIELDS, feed_forward_proj="relu-gated"))
    config = models.ModelConfig("t5", **FIELDS)
    config.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers=True is not supported for T5"):
        models.T5ForConditionalGeneration.from_config(config)
    model = models.T5ForConditionalGeneration.from_config(models.ModelConfig("t5", **{**FIELDS,
                                                                                     "decoder_start_token_id": None}))
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        model.shift_right(LABELS)


# ---------------------------------------------------------------- LoRA, DoRA, IA3 with HF PEFT


def _torch_base(path):
    with _quiet():
        return tr.T5ForConditionalGeneration.from_pretrained(path).eval()


def _make_peft_config(kind, lib, **kw):
    if kind == "ia3":
        return lib.IA3Config(task_type="SEQ_2_SEQ_LM", init_ia3_weights=False, **kw)
    if kind == "all-linear":  # every linear but lm_head, as PEFT expands it
        kw = {**kw, "target_modules": "all-linear"}
    return lib.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False,
                          use_dora=kind == "dora", **kw)


@pytest.mark.parametrize("kind", ["lora", "dora", "all-linear", "ia3"])
def test_peft_made_adapter_gives_transformers_logits(flan, kind, tmp_path):
    _, path, _ = flan
    with _quiet():
        their_model = peft.get_peft_model(_torch_base(path), _make_peft_config(kind, peft))
    their_model.save_pretrained(tmp_path)
    ref = torch_out(their_model, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    if kind == "all-linear":
        assert set(peftjax.tuners.lora.lora_layers(model.base_model)) == set(their_model.targeted_module_names)
    for jit in (False, True) if kind == "lora" else (True,):  # eager T5 is slow: once is enough
        out = run_jax(model, jit, input_ids=IDS, attention_mask=MASK, labels=LABELS)
        assert_close(real(out.logits), real(ref), ADAPTER_TOL)
    base = torch_out(_torch_base(path), input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()
    assert np.abs(real(ref) - real(base)).max() > 1e-3  # the adapter changes the output


@pytest.mark.parametrize("kind", ["lora", "dora", "all-linear", "ia3"])
def test_adapter_trained_here_loads_in_peft(flan, kind, tmp_path):
    _, path, _ = flan
    config = _make_peft_config(kind, peftjax)
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    with _quiet():
        their = peft.get_peft_model(_torch_base(path), _make_peft_config(kind, peft))
    assert model.get_nb_trainable_parameters() == their.get_nb_trainable_parameters()  # PEFT's t5 default targets
    if kind == "lora":  # training a SEQ_2_SEQ_LM adapter (the model's own loss); the others start random here
        batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
        losses = _tiny.train(model, batch, steps=3, optimizer=optax.adam(1e-2)).losses
        assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    ours = run_jax(model, True, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits
    with _quiet():
        loaded = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path).eval()
    theirs = torch_out(loaded, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()
    assert_close(real(ours), real(theirs), ADAPTER_TOL)
    if kind == "all-linear":
        assert {s.name for s in model.get_layer_status()} == {s.name for s in loaded.get_layer_status()}
    if kind != "lora":  # untrained: the random (init_*_weights=False) adapter must move the logits
        base = torch_out(_torch_base(path), input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()
        assert np.abs(real(ours) - real(base)).max() > 1e-3
    if kind != "lora":
        return
    # generation goes through the adapted layers too
    with torch.no_grad():
        ref = loaded.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                              max_new_tokens=5, do_sample=False).numpy()
    np.testing.assert_array_equal(model.generate(IDS, MASK, max_new_tokens=5), ref)


# ---------------------------------------------------------------- prompt learning (num_transformer_submodules=2)

PROMPT_CONFIGS = {
    "prefix": lambda lib: lib.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
    "prompt": lambda lib: lib.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
    "p-tuning": lambda lib: lib.PromptEncoderConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3,
                                                    encoder_hidden_size=16),
}


@pytest.mark.parametrize("method", sorted(PROMPT_CONFIGS))
def test_prompt_learning_both_ways_with_peft(flan, method, tmp_path):
    _, path, _ = flan
    # PEFT -> peftjax: logits and greedy generation
    torch.manual_seed(1)
    with _quiet():
        their = peft.get_peft_model(_torch_base(path), PROMPT_CONFIGS[method](peft)).eval()
        their.save_pretrained(tmp_path / "peft")
        ref = torch_out(their, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    out = run_jax(model, True, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    # random prefix keys and values: T5's unscaled scores amplify the summation order as an
    # adapter's do (1.2e-5 seen on an AVX2 host, whose matmul kernels sum in another order)
    assert_close(real(out.logits), real(ref.logits.numpy()), tol=ADAPTER_TOL)
    assert_close(out.loss, ref.loss.numpy())
    # generation: P-tuning's path is prompt tuning's (the encoder's output prepended), tested once
    tokens = model.generate(input_ids=IDS, attention_mask=MASK, max_new_tokens=5) if method != "p-tuning" else None
    if method == "prompt":
        with torch.no_grad():
            their_tokens = their.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                          max_new_tokens=5, do_sample=False).numpy()
        np.testing.assert_array_equal(tokens, their_tokens)
    if method == "prefix":
        # every generated token is PEFT's forward's argmax given the tokens before it (up to EOS) ...
        forced = torch_out(their, input_ids=IDS, attention_mask=MASK, decoder_input_ids=tokens[:, :-1]).logits
        before_eos = np.cumsum(np.cumsum(tokens[:, 1:] == 1, axis=1), axis=1) <= 1
        np.testing.assert_array_equal(np.argmax(forced.numpy(), -1)[before_eos], tokens[:, 1:][before_eos])
        # ... and PEFT 0.22's generate gives the same tokens (0.21.2's dropped the prefix on transformers 5),
        # which the base model's are not
        with torch.no_grad():
            their_tokens = their.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                          max_new_tokens=5, do_sample=False).numpy()
            with their.disable_adapter():
                base_tokens = their.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                             max_new_tokens=5, do_sample=False).numpy()
        np.testing.assert_array_equal(tokens, their_tokens)
        assert not np.array_equal(tokens, base_tokens)
    base = torch_out(_torch_base(path), input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()
    assert np.abs(real(ref.logits.numpy()) - real(base)).max() > 1e-3
    # peftjax -> PEFT: a fresh (randomly initialised) adapter made here, saved and loaded by PEFT
    ours = peftjax.get_peft_model(models.from_pretrained(path), PROMPT_CONFIGS[method](peftjax))
    ours.save_pretrained(tmp_path / "ours")
    with _quiet():
        loaded = peft.PeftModel.from_pretrained(_torch_base(path), tmp_path / "ours").eval()
    assert_close(real(run_jax(ours, True, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits),
                 real(torch_out(loaded, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()),
                 ADAPTER_TOL)


def test_remat_gives_the_same_loss_and_gradients():
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    results = []
    for remat in ("none", "full"):  # one block per stack: two compiles of the gradient, kept small
        config = models.ModelConfig("t5", **{**FIELDS, "num_layers": 1}, feed_forward_proj="gated-gelu")
        config.remat = remat
        model = peftjax.get_peft_model(models.T5ForConditionalGeneration.from_config(config),
                                       _make_peft_config("lora", peftjax))
        graphdef, adapters, base = peftjax.split(model.base_model)

        def loss(adapters, base, graphdef=graphdef):
            return nnx.merge(graphdef, adapters, base)(**batch).loss

        fn = jax.value_and_grad(loss)
        results.append(jax.jit(fn)(adapters, base))
        if remat == "full":  # the blocks really are rematerialised
            assert "remat" in str(jax.make_jaxpr(fn)(adapters, base))
    (loss0, grads0), (loss1, grads1) = results
    assert_close(loss1, loss0)
    jax.tree.map(assert_close, grads1, grads0)


def test_sequence_classification_matches_transformers(flan, tmp_path):
    _, path, _ = flan
    torch.manual_seed(0)
    with _quiet():
        theirs = tr.T5ForSequenceClassification.from_pretrained(path, num_labels=3).eval()
    theirs.save_pretrained(tmp_path)
    labels = np.array([0, 2, 1])
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=labels)
    model = models.from_pretrained(tmp_path)
    assert type(model) is models.T5ForSequenceClassification
    out = run_jax(model, True, input_ids=IDS, attention_mask=MASK, labels=labels)
    assert_close(out.logits, ref.logits.numpy())
    assert_close(out.loss, ref.loss.numpy())
    no_eos_in_row_0 = np.where((IDS == 1) & (np.arange(3) == 0)[:, None], 2, IDS)
    with pytest.raises(ValueError, match=r"same number of <eos> tokens; found \[0, 1, 1\]"):
        model(input_ids=no_eos_in_row_0)
    # the SEQ_CLS task builds this class from the conditional-generation checkpoint, with a new head
    with pytest.warns(models.NewWeightsWarning, match="classification_head"):
        assert type(models.from_pretrained(path, task_type="SEQ_CLS", num_labels=3)) is models.T5ForSequenceClassification


def test_token_classification_matches_transformers_and_moves_both_ways_with_peft(flan, tmp_path):
    """``T5ForTokenClassification`` (the encoder alone, dropout, a biased ``classifier``): transformers'
    logits and loss, built for TOKEN_CLS from the conditional-generation checkpoint, and LoRA with
    the classifier in modules_to_save read from PEFT and read by PEFT."""
    _, path, _ = flan
    torch.manual_seed(0)
    with _quiet():
        theirs = tr.T5ForTokenClassification.from_pretrained(path, num_labels=3).eval()
    theirs.save_pretrained(tmp_path / "cls")
    labels = np.where(MASK == 1, IDS % 3, -100)
    batch = dict(input_ids=IDS, attention_mask=MASK, labels=labels)
    ref = torch_out(theirs, **batch)
    model = models.from_pretrained(tmp_path / "cls")
    assert type(model) is models.T5ForTokenClassification
    out = run_jax(model, True, **batch)
    assert_close(out.logits, ref.logits.numpy())
    assert_close(out.loss, ref.loss.numpy())
    with pytest.warns(models.NewWeightsWarning, match="classifier"):
        assert type(models.from_pretrained(path, task_type="TOKEN_CLS", num_labels=3)) is models.T5ForTokenClassification
    # PEFT's adapter, moved off its start, read here
    with _quiet():
        pm = peft.get_peft_model(tr.T5ForTokenClassification.from_pretrained(tmp_path / "cls"),
                                 peft.LoraConfig(task_type="TOKEN_CLS", r=4, lora_alpha=8))
    moved_off_start(pm, seed=1)
    pm.eval().save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "cls"), tmp_path / "peft")
    assert_close(ours(input_ids=IDS, attention_mask=MASK).logits, torch_out(pm, input_ids=IDS, attention_mask=MASK)
                 .logits.numpy(), ADAPTER_TOL)
    # trained here, read by PEFT
    trained = peftjax.get_peft_model(models.from_pretrained(tmp_path / "cls"),
                                     peftjax.LoraConfig(task_type="TOKEN_CLS", r=4))
    losses = _tiny.train(trained, batch, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    trained.save_pretrained(tmp_path / "ours")
    with _quiet():
        back = peft.PeftModel.from_pretrained(tr.T5ForTokenClassification.from_pretrained(tmp_path / "cls"),
                                              tmp_path / "ours").eval()
    ref = torch_out(back, **batch)
    out = trained(**batch)
    assert_close(out.logits, ref.logits.numpy(), ADAPTER_TOL)
    assert_close(out.loss, ref.loss.numpy(), ADAPTER_TOL)


def test_question_answering_matches_transformers_and_moves_both_ways_with_peft(flan, tmp_path):
    """``T5ForQuestionAnswering`` (the encoder-decoder fed ``shift_right(input_ids)``, ``qa_outputs`` on
    the decoder's output): transformers' start and end logits and span loss, built for QUESTION_ANS
    from the conditional-generation checkpoint, and LoRA with ``qa_outputs`` in modules_to_save
    read from PEFT and read by PEFT."""
    _, path, _ = flan
    torch.manual_seed(0)
    with _quiet():
        theirs = tr.T5ForQuestionAnswering.from_pretrained(path).eval()
    theirs.save_pretrained(tmp_path / "qa")
    inputs = dict(input_ids=IDS, attention_mask=MASK)
    spans = dict(start_positions=np.array([1, 3, 8]), end_positions=np.array([2, 6, 9]))  # 8, 9: cut off
    ref = torch_out(theirs, **inputs, **spans)
    model = models.from_pretrained(tmp_path / "qa")
    assert type(model) is models.T5ForQuestionAnswering
    out = run_jax(model, True, **inputs, **spans)
    for name in ("start_logits", "end_logits", "loss"):
        assert_close(getattr(out, name), getattr(ref, name).numpy())
    with pytest.warns(models.NewWeightsWarning, match="qa_outputs"):
        assert type(models.from_pretrained(path, task_type="QUESTION_ANS")) is models.T5ForQuestionAnswering
    with _quiet():
        pm = peft.get_peft_model(tr.T5ForQuestionAnswering.from_pretrained(tmp_path / "qa"),
                                 peft.LoraConfig(task_type="QUESTION_ANS", r=4, lora_alpha=8))
    moved_off_start(pm, seed=1)
    pm.eval().save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "qa"), tmp_path / "peft")
    ref = torch_out(pm, **inputs)
    assert_close(ours(**inputs).start_logits, ref.start_logits.numpy(), ADAPTER_TOL)
    trained = peftjax.get_peft_model(models.from_pretrained(tmp_path / "qa"),
                                     peftjax.LoraConfig(task_type="QUESTION_ANS", r=4))
    losses = _tiny.train(trained, {**inputs, **spans}, steps=4, dropout=False).losses
    assert losses[-1] < losses[0]
    trained.save_pretrained(tmp_path / "ours")
    with _quiet():
        back = peft.PeftModel.from_pretrained(tr.T5ForQuestionAnswering.from_pretrained(tmp_path / "qa"),
                                              tmp_path / "ours").eval()
    ref = torch_out(back, **inputs, **spans)
    out = trained(**inputs, **spans)
    for name in ("start_logits", "end_logits", "loss"):
        assert_close(getattr(out, name), getattr(ref, name).numpy(), ADAPTER_TOL)


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_the_trainer_trains_t5_task_models_and_evaluates_as_transformers(flan, task, tmp_path):
    """The Trainer takes T5's classifiers and question answering as it takes the encoders' (the model
    derives its decoder's input; only a seq2seq LM's labels are a second sequence): its eval loss
    is transformers' on the same rows, and training lowers it."""
    _, path, _ = flan
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 9, 24)
    ids = [[int(t) for t in rng.integers(3, 90, n - 1)] + [1] for n in lengths]  # each row ends with its EOS
    if task == "SEQ_CLS":
        targets = {"labels": [row[0] % 3 for row in ids]}
    elif task == "TOKEN_CLS":
        targets = {"labels": [[t % 3 for t in row] for row in ids]}
    else:
        targets = {"start_positions": [1] * len(ids), "end_positions": [2] * len(ids)}
    data = {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], **targets}
    kwargs = {} if task == "QUESTION_ANS" else {"num_labels": 3}
    with _quiet():
        model = peftjax.get_peft_model(models.from_pretrained(path, task_type=task, **kwargs),
                                       peftjax.LoraConfig(task_type=task, r=4))
    model.base_model.save_pretrained(tmp_path / "base")
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8,
                                     num_train_epochs=3, learning_rate=1e-2, save_steps=0, disable_tqdm=True,
                                     report_to="none", plot=False, per_device_eval_batch_size=8)
    trainer = peftjax.Trainer(model, args, data, data)
    before = trainer.evaluate()["eval_loss"]
    auto = {"SEQ_CLS": tr.T5ForSequenceClassification, "TOKEN_CLS": tr.T5ForTokenClassification,
            "QUESTION_ANS": tr.T5ForQuestionAnswering}[task]
    with _quiet():
        theirs = auto.from_pretrained(tmp_path / "base").eval()
    rows = [{k: np.asarray([v[i]]) for k, v in data.items()} for i in range(len(ids))]
    if task == "TOKEN_CLS":  # the mean over every labelled token of the set
        losses = [torch_out(theirs, **r).loss.item() * len(ids[i]) for i, r in enumerate(rows)]
        ref = sum(losses) / sum(lengths)
    else:  # the mean over the rows
        ref = np.mean([torch_out(theirs, **r).loss.item() for r in rows])
    assert abs(before - ref) < 1e-5
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


def test_dropout_sits_where_transformers_train_mode_puts_it(tmp_path, monkeypatch):
    """Every dropout on both sides replaced by the same fixed scaling (x * 0.7 while training): the
    outputs agree only if the dropouts sit at the same places (embeddings, attention probabilities,
    sublayer outputs, feed-forward hidden units, the stacks' outputs)."""
    config = tr.T5Config(**{**FIELDS, "dropout_rate": 0.1}, **VARIANTS["v1.1-gated-gelu"])
    config._attn_implementation = "eager"  # its attention calls torch's dropout
    torch.manual_seed(0)
    theirs = tr.T5ForConditionalGeneration(config)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path)
    eval_logits = np.asarray(ours(input_ids=IDS, attention_mask=MASK, labels=LABELS).logits)
    scaled = lambda x, p=0.5, training=True, inplace=False: x * 0.7 if training and p > 0 else x  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "dropout", scaled)
    fixed = lambda x, rate, key: x * 0.7 if key is not None and rate else x  # noqa: E731
    for module in ("_t5", "_attention"):  # T5's modules and the attention probabilities' shared helper
        monkeypatch.setattr(f"peftjax.models.{module}.dropout", fixed)
    theirs.train()
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    out = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS, dropout_rng=jax.random.key(0))
    assert_close(np.asarray(out.logits), ref.logits.detach().numpy())
    assert abs(float(out.loss) - ref.loss.item()) < 1e-5
    assert np.abs(np.asarray(out.logits) - eval_logits).max() > 1e-2
