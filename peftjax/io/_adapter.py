"""HF PEFT adapter files: ``adapter_config.json`` + ``adapter_model.safetensors``, both ways.

Keys are ``base_model.model.<module path>.<suffix>`` with torch layouts (reference §1, §7). For
the bundled models the module path is the transformers name; for a user's own model, pass
``key_mapping`` to turn its NNX paths into the names its PyTorch twin uses.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
from peftjax._version import __version__
from peftjax.io._safetensors import read_safetensors, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")

KeyMapping = Callable[[str], str] | Mapping[str, str] | None


class AdapterFileError(ValueError):
    """An adapter directory or file is missing, unreadable or does not fit the model."""


def map_name(name: str, key_mapping: KeyMapping) -> str:
    """Applies ``key_mapping`` to a module path: a callable, or ``{regex: replacement}`` applied in order."""
    if key_mapping is None:
        return name
    if callable(key_mapping):
        return key_mapping(name)
    for pattern, repl in key_mapping.items():
        name = re.sub(pattern, repl, name)
    return name


def adapter_dir(directory: str | os.PathLike, adapter_name: str) -> Path:
    """PEFT's layout: ``default`` in the directory itself, any other name in a subfolder."""
    directory = Path(directory)
    return directory if adapter_name == "default" else directory / adapter_name


def read_adapter_weights(directory: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """Reads ``adapter_model.safetensors`` (or, only with ``allow_pickle=True``, ``adapter_model.bin``).

    Raises:
      FileNotFoundError: the directory has neither file.
      AdapterFileError: the file is truncated or malformed, or only a pickle exists and
        ``allow_pickle`` is false.
    """
    directory = Path(directory)
    safe, pickled = directory / WEIGHTS_NAME, directory / PICKLE_WEIGHTS_NAME
    if safe.is_file():
        return read_safetensors(safe)[0]
    if pickled.is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{pickled} is a pickle, which can run arbitrary code when loaded; pass "
                f"allow_pickle=True if you trust it, or convert it to {WEIGHTS_NAME}"
            )
        import torch  # only for this opt-in path

        state = torch.load(pickled, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter directory not found: {directory}")
    raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")


def write_adapter(directory: str | os.PathLike, config, tensors: Mapping[str, np.ndarray]) -> None:
    """Writes the two files into ``directory`` so that a failure leaves any previous adapter intact.

    ``config`` is a ``peftjax.config.PeftConfig`` (anything whose ``save_pretrained(dir)`` writes
    ``adapter_config.json``: io sits below config and knows no config classes).

    Both files are written to a temporary directory beside the target first and then moved in.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        # PEFT reads only "format"; the second entry lets `peftjax inspect` tell who wrote the file
        write_safetensors(tmp / WEIGHTS_NAME, tensors, {"format": "pt", "peftjax": __version__})
        config.save_pretrained(tmp)
        if not directory.exists():
            os.replace(tmp, directory)
            return
        os.replace(tmp / WEIGHTS_NAME, directory / WEIGHTS_NAME)
        os.replace(tmp / CONFIG_NAME, directory / CONFIG_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
