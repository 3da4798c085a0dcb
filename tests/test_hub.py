"""Hub repo ids (``"org/name"``) wherever a directory is accepted, all offline from a Hub cache.

The cache is laid out as ``huggingface_hub`` writes it: ``models--org--name/refs/<branch>`` holds
a commit hash, ``snapshots/<commit>/<file>`` are symlinks into ``blobs/<sha256>``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import transformers as tr

import _tiny
from _torch_models import lazy

import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.io._hub import is_repo_id, resolve

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(1, 96, (2, 6))


def put_in_cache(cache: Path, repo_id: str, source: Path, *, ref: str = "main") -> Path:
    """Stores ``source``'s files as the snapshot that ``refs/<ref>`` of ``repo_id`` points at."""
    commit = hashlib.sha1(f"{repo_id}@{ref}".encode()).hexdigest()
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


def logits(model) -> np.ndarray:
    return np.asarray(model(input_ids=IDS).logits)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The local directories: a tiny Llama, a PEFT-written adapter (main and v2), two adapters in one folder."""
    root = tmp_path_factory.mktemp("local")
    base = _tiny.save("llama", root / "tiny-llama")
    for name, seed in (("adapter-main", 1), ("adapter-v2", 2)):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(root / "tiny-llama"), peft.LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        theirs.save_pretrained(root / name)
    del base
    two = peftjax.get_peft_model(models.from_pretrained(root / "tiny-llama"),
                                 peftjax.LoraConfig(r=2, init_lora_weights=False))
    two.add_adapter("other", peftjax.LoraConfig(r=3, init_lora_weights=False, target_modules=["o_proj"]))
    two.save_pretrained(root / "two")  # default at the top, "other" in other/
    return root


@pytest.fixture(scope="module")
def cache(local, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hub")
    put_in_cache(cache, "org/tiny-llama", local / "tiny-llama")
    put_in_cache(cache, "org/tiny-adapter", local / "adapter-main")
    put_in_cache(cache, "org/tiny-adapter", local / "adapter-v2", ref="v2")
    put_in_cache(cache, "org/two-adapters", local / "two")
    return cache


@pytest.fixture
def offline(cache, monkeypatch):
    """Points huggingface_hub at the cache, offline (it reads both settings when imported)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_what_counts_as_a_repo_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "here").mkdir(parents=True)
    assert is_repo_id("org/name") and is_repo_id("gpt2") and is_repo_id(Path("org/name"))
    assert not is_repo_id("org/here")  # an existing path wins
    assert not any(map(is_repo_id, ["./org/name", "/abs/dir", "~/models/x", "a/b/c", "a b"]))
    assert resolve(tmp_path, subfolder="sub") == tmp_path / "sub"
    assert resolve(tmp_path / "missing") == tmp_path / "missing"  # the caller says "not found" with its path


def test_model_from_a_repo_id_equals_the_local_load(local, offline):
    model = models.from_pretrained("org/tiny-llama")
    np.testing.assert_array_equal(logits(model), logits(models.from_pretrained(local / "tiny-llama")))
    assert model.config._name_or_path == "org/tiny-llama"  # what adapter_config.json will name
    assert type(models.LlamaForCausalLM.from_pretrained("org/tiny-llama")) is models.LlamaForCausalLM
    assert models.load_config("org/tiny-llama").hidden_size == 32


def test_adapter_from_a_repo_id_equals_the_local_load(local, offline):
    base = logits(models.from_pretrained(local / "tiny-llama"))
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained("org/tiny-llama"), "org/tiny-adapter")
    mine = peftjax.PeftModel.from_pretrained(models.from_pretrained(local / "tiny-llama"), local / "adapter-main")
    np.testing.assert_array_equal(logits(ours), logits(mine))
    assert np.abs(logits(ours) - base).max() > 1e-3  # the adapter changes the output
    assert peftjax.config.load_config("org/tiny-adapter") == peftjax.config.load_config(local / "adapter-main")


def test_revision_picks_the_other_snapshot(local, offline):
    v2 = peftjax.PeftModel.from_pretrained(models.from_pretrained("org/tiny-llama"), "org/tiny-adapter",
                                           revision="v2")
    expected = peftjax.PeftModel.from_pretrained(models.from_pretrained(local / "tiny-llama"), local / "adapter-v2")
    np.testing.assert_array_equal(logits(v2), logits(expected))
    main_ = peftjax.PeftModel.from_pretrained(models.from_pretrained("org/tiny-llama"), "org/tiny-adapter")
    assert np.abs(logits(v2) - logits(main_)).max() > 1e-3
    # load_adapter takes the same names
    main_.load_adapter("org/tiny-adapter", "v2", revision="v2")
    main_.set_adapter("v2")
    np.testing.assert_array_equal(logits(main_), logits(expected))


def test_subfolder(local, offline):
    expected = peftjax.PeftModel.from_pretrained(models.from_pretrained(local / "tiny-llama"), local / "two" / "other",
                                                 "other")
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained("org/tiny-llama"), "org/two-adapters",
                                              subfolder="other")
    np.testing.assert_array_equal(logits(model), logits(expected))
    assert model.peft_config["default"].r == 3
    model.load_adapter("org/two-adapters", "top")  # the repo's own default adapter
    assert model.peft_config["top"].r == 2
    assert peftjax.config.load_config("org/two-adapters", subfolder="other").target_modules == ("o_proj",)
    with pytest.raises(FileNotFoundError, match=r"org/two-adapters.*subfolder 'nope'"):
        peftjax.config.load_config("org/two-adapters", subfolder="nope")


def test_not_in_the_cache_says_so(offline):
    with pytest.raises(FileNotFoundError) as info:
        models.from_pretrained("org/missing-model")
    message = str(info.value)
    assert "'org/missing-model'" in message and "revision 'main'" in message
    assert f"offline (HF_HUB_OFFLINE=1) and not in the cache at {offline}" in message
    model = models.from_pretrained("org/tiny-llama")
    with pytest.raises(FileNotFoundError, match=r"'org/tiny-adapter'.*revision 'v9'.*offline.*not in the cache"):
        peftjax.PeftModel.from_pretrained(model, "org/tiny-adapter", revision="v9")
    with pytest.raises(FileNotFoundError, match=r"not a valid repo id"):
        models.from_pretrained("org--bad/name")


def test_cli_inspect_and_merge_from_the_cache(local, offline, tmp_path, capsys):
    assert main(["inspect", "org/tiny-adapter", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA" and info["r"] == 4 and info["written_by"].startswith("HF PEFT")
    assert main(["inspect", "org/tiny-adapter", "--revision", "v2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == info["parameters"]

    assert main(["merge", "org/tiny-llama", "org/tiny-adapter", str(tmp_path / "merged")]) == 0
    expected = peftjax.PeftModel.from_pretrained(models.from_pretrained(local / "tiny-llama"), local / "adapter-main")
    np.testing.assert_allclose(logits(models.from_pretrained(tmp_path / "merged")), logits(expected), atol=1e-5)

    assert main(["inspect", "org/missing-adapter"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftjax: error:") and "org/missing-adapter" in err and "offline" in err


def test_push_to_hub_uploads_what_loads_back(local, offline, tmp_path, monkeypatch):
    calls, uploaded = [], tmp_path / "uploaded"

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        shutil.copytree(kwargs["folder_path"], uploaded)  # the temporary folder is gone afterwards
        return "commit-info"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", create_branch)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)

    model = peftjax.get_peft_model(models.from_pretrained("org/tiny-llama"),
                                   peftjax.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    result = model.push_to_hub("me/pushed", private=True, commit_message="first adapter", revision="dev")
    assert result == "commit-info"
    assert [c[:2] for c in calls] == [("create_repo", "me/pushed"), ("create_branch", "me/pushed"),
                                      ("upload_folder", "me/pushed")]
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][2]["branch"] == "dev"
    upload = calls[2][2]
    assert upload["commit_message"] == "first adapter" and upload["revision"] == "dev" and not upload["create_pr"]

    assert {p.name for p in uploaded.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    card = (uploaded / "README.md").read_text()
    assert "library_name: peft" in card and "base_model: org/tiny-llama" in card
    assert json.loads((uploaded / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/tiny-llama"
    back = peftjax.PeftModel.from_pretrained(models.from_pretrained(local / "tiny-llama"), uploaded)
    np.testing.assert_array_equal(logits(back), logits(model))
