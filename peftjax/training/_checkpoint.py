"""Training checkpoints with orbax: adapters, optimizer state, data position and RNG.

A checkpoint is ``<output_dir>/checkpoint-<step>/`` holding ``state/`` (orbax: the trainable
weights and the optimizer state) and ``trainer_state.json`` (step, epoch, batch position, seed,
RNG key data). A checkpoint counts only once ``trainer_state.json`` exists, which is written last
and whole (to a temporary name, then renamed), so a run killed mid-save never resumes from a
half-written one.

Sharded arrays are saved as they lie (each process writes its own shards) and restored onto the
shardings of the ``like`` tree. On several hosts every process calls both functions with the same
path on shared storage; only process 0 clears the directory and writes ``trainer_state.json``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import jax

from peftjax.io._files import write_atomically

STATE_FILE = "trainer_state.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def save_checkpoint(directory: Path, state: dict[str, Any], info: dict[str, Any]) -> Path:
    """Writes ``state`` (a pytree of arrays) and ``info`` (JSON) to ``directory``."""
    directory = Path(directory)
    if jax.process_index() == 0:
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
    _sync("peftjax:checkpoint-dir")
    import orbax.checkpoint as ocp  # imported when first needed: it costs ~50 MiB resident

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save((directory / "state").absolute(), state)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        text = json.dumps(info, indent=2)
        write_atomically(directory / STATE_FILE, lambda tmp: Path(tmp).write_text(text))
    _sync("peftjax:checkpoint-done")
    return directory


def _sync(name: str) -> None:
    """A barrier across processes (nothing to wait for on one host)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def load_checkpoint(directory: Path, like: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores a checkpoint into the structure (and shardings) of ``like``.

    Each array comes back with the sharding of its counterpart in ``like`` (arrays, or
    ``jax.ShapeDtypeStruct``s with a ``sharding``), whatever mesh it was saved from.

    Raises:
      FileNotFoundError: ``directory`` is not a complete checkpoint.
    """
    directory = Path(directory)
    info_file = directory / STATE_FILE
    if not info_file.is_file():
        raise FileNotFoundError(f"{directory} is not a complete peftjax checkpoint (no {STATE_FILE})")
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    state = ocp.StandardCheckpointer().restore((directory / "state").absolute(), abstract)
    return state, json.loads(info_file.read_text())


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = _PATTERN.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def prune_checkpoints(output_dir: Path, keep: int | None) -> None:
    """Deletes the oldest checkpoints beyond ``keep`` (process 0 only, on several hosts)."""
    if not keep or jax.process_index() != 0:
        return
    for old in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
