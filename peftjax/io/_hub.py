"""Hugging Face Hub names: ``"org/name"`` wherever a model or adapter directory is accepted.

``resolve`` turns a repo id into the local directory of its snapshot through
``huggingface_hub.snapshot_download``, so the Hub's cache, ``HF_HOME`` / ``HF_HUB_CACHE``,
``HF_HUB_OFFLINE`` and the login token work as they do for transformers and PEFT. A local
directory is returned as it is. ``upload`` is the other way: a saved folder to a Hub repo.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

# What a model or an adapter needs, as snapshot_download's allow_patterns (fnmatch)
MODEL_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja")
ADAPTER_PATTERNS = ("adapter_config.json", "adapter_model.safetensors")
PICKLE_PATTERN = "adapter_model.bin"

# The Hub's repo id: "name" or "org/name" of word characters, "-" and "."
_REPO_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def is_repo_id(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` is to be looked up on the Hub rather than on disk.

    ``"name"`` or ``"org/name"`` that is not an existing path; anything starting with ``.``, ``/``
    or ``~`` is local. A ``Path`` is read as its string, as transformers does.
    """
    name = os.fspath(name_or_path)
    if not isinstance(name, str) or name.startswith((".", "/", "~")):
        return False
    return _REPO_ID.fullmatch(name) is not None and not os.path.exists(name)


def resolve(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    allow_patterns: Sequence[str] | str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    kind: Literal["model", "adapter"] = "model",
    allow_pickle: bool = False,
) -> Path:
    """The local directory of a model or adapter given as a directory or a Hub repo id.

    Args:
      name_or_path: a local directory (returned as is, whether it exists or not, so the caller's
        own "not found" message names it), or a repo id such as ``"meta-llama/Llama-3.2-1B"``.
      revision: a branch, tag or commit hash of the repo (default ``"main"``).
      subfolder: a folder inside the directory or repo, appended to the result.
      allow_patterns: the files to fetch (fnmatch patterns, relative to ``subfolder``); the default
        is what ``kind`` needs: a model's ``*.json``, ``*.safetensors`` and tokenizer files, an
        adapter's ``adapter_config.json`` and ``adapter_model.safetensors``.
      token: a Hub token for private or gated repos (default: the login token).
      cache_dir: the Hub cache (default: ``HF_HUB_CACHE``, ``$HF_HOME/hub``).
      kind: ``"model"`` or ``"adapter"``, which picks the default ``allow_patterns``.
      allow_pickle: for an adapter repo without ``adapter_model.safetensors``, also fetch
        ``adapter_model.bin``.

    Returns:
      The directory, e.g. ``<cache>/models--org--name/snapshots/<commit>/<subfolder>``.

    Raises:
      FileNotFoundError: the repo cannot be had: offline and not cached, not found, revision not
        found, gated. The message names the repo, the revision and the reason.

    >>> resolve("org/tiny-adapter", kind="adapter")  # doctest: +SKIP
    PosixPath('/root/.cache/huggingface/hub/models--org--tiny-adapter/snapshots/3f1c.../')
    """
    if kind not in ("model", "adapter"):
        raise ValueError(f"kind must be 'model' or 'adapter', got {kind!r}")
    subfolder = str(subfolder or "").strip("/")
    if not is_repo_id(name_or_path):
        path = Path(name_or_path).expanduser()
        return path / subfolder if subfolder else path
    repo_id = os.fspath(name_or_path)
    if allow_patterns is None:
        patterns = list(MODEL_PATTERNS if kind == "model" else ADAPTER_PATTERNS)
    else:
        patterns = [allow_patterns] if isinstance(allow_patterns, str) else list(allow_patterns)
    prefix = f"{subfolder}/" if subfolder else ""
    fetch = dict(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir)
    path = _snapshot([prefix + p for p in patterns], **fetch)
    path = path / subfolder if subfolder else path
    if kind == "adapter" and allow_pickle and allow_patterns is None and not (path / ADAPTER_PATTERNS[1]).is_file():
        # only a pickle in the repo (older PEFT): fetched only when the caller allows reading it
        _snapshot([prefix + PICKLE_PATTERN], **fetch)
    if not path.is_dir():
        where = f"subfolder {subfolder!r}" if subfolder else "the repo"
        raise FileNotFoundError(f"{_describe(repo_id, revision)}: {where} has no files matching {patterns}")
    return path


def _describe(repo_id: str, revision: str | None) -> str:
    return f"Hub repo {repo_id!r} (revision {revision or 'main'!r})"


def _snapshot(patterns: list[str], *, repo_id: str, revision, token, cache_dir) -> Path:
    """``snapshot_download``, with each of the Hub's failures turned into one clear FileNotFoundError."""
    from huggingface_hub import constants, errors, snapshot_download

    try:
        return Path(
            snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir, token=token)
        )
    except errors.HFValidationError as e:
        reason = f"not a valid repo id ({_first_line(e)})"
    except errors.GatedRepoError:
        reason = (f"the repo is gated: ask for access at https://huggingface.co/{repo_id}, then log in "
                  "(`hf auth login`) or pass token=")
    except errors.RepositoryNotFoundError:
        reason = "repository not found on the Hub (a private one needs `hf auth login` or token=)"
    except errors.RevisionNotFoundError:
        reason = f"revision {revision!r} not found in the repository"
    except errors.IncompleteSnapshotError as e:
        reason = _first_line(e)
    except errors.LocalEntryNotFoundError:
        cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
        if constants.HF_HUB_OFFLINE:
            reason = f"offline (HF_HUB_OFFLINE=1) and not in the cache at {cache}"
        else:
            reason = f"the Hub cannot be reached and it is not in the cache at {cache}"
    except (errors.HfHubHTTPError, OSError) as e:
        reason = _first_line(e)
    raise FileNotFoundError(f"{repo_id!r} is not a local directory, and {_describe(repo_id, revision)} "
                            f"cannot be fetched: {reason}") from None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def model_card(base_model: str | None, *, tags: Sequence[str] = ()) -> str:
    """A short README.md with the front matter PEFT writes (``library_name: peft``, ``base_model``).

    ``base_model`` is written only when it is a repo id: the Hub refuses a local path there.
    """
    lines = ["---", "library_name: peft"]
    if base_model and _REPO_ID.fullmatch(base_model) and not base_model.startswith((".", "~")):
        lines.append(f"base_model: {base_model}")
    if tags:
        lines += ["tags:", *(f"- {t}" for t in tags)]
    lines += ["---", "", "# Adapter", ""]
    lines.append("A PEFT adapter written by peftjax; it loads with `peft.PeftModel.from_pretrained` and "
                 "`peftjax.PeftModel.from_pretrained`" + (f" on top of `{base_model}`." if base_model else "."))
    return "\n".join(lines) + "\n"


def upload(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload adapter",
    revision: str | None = None,
    create_pr: bool = False,
):
    """Creates ``repo_id`` if needed (and the branch ``revision``) and uploads ``folder`` as one commit.

    Returns:
      The ``huggingface_hub.CommitInfo`` of the commit.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    if revision is not None and not revision.startswith("refs/pr/"):  # upload_folder needs the branch
        api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
    return api.upload_folder(repo_id=repo_id, folder_path=os.fspath(folder), commit_message=commit_message,
                             revision=revision, create_pr=create_pr, token=token)
