"""Checkpoints that hold a mixture of experts one expert at a time, read and written as transformers
5 holds them fused, for families whose experts sit where Mixtral's layout (``_mixtral``) does not
look: Nemotron-H's ungated ``mixer.experts`` and Jamba's ``feed_forward.experts``.

``fused`` maps each fused tensor's name to the per-expert linears stacked into it, concatenated
along their output rows in that order: Jamba's ``{"gate_up_proj": ("gate_proj", "up_proj"),
"down_proj": ("down_proj",)}``; Nemotron-H's ``{"up_proj": ("up_proj",), "down_proj":
("down_proj",)}``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from peftjax.models._modeling import CheckpointError


class PerExpertFile(Mapping):
    """``tensors`` (a checkpoint, each key renamed by ``rename``) with every layer's per-expert
    ``{block}.experts.N.{linear}.weight`` read as the fused ``{block}.experts.{name}`` (a view: a
    fused tensor is assembled when it is looked up; a checkpoint already fused passes through).

    Raises:
      CheckpointError: a layer's experts not numbered 0..N-1, lacking one of the linears, or held
        both ways (``source`` names the file).
    """

    def __init__(self, tensors: Mapping, source: str, block: str, fused: Mapping[str, tuple[str, ...]],
                 rename: Callable[[str], str] = lambda key: key):
        self.tensors = tensors
        linears = sorted({w for ws in fused.values() for w in ws})
        pattern = re.compile(rf"^(?P<pre>.*\.{re.escape(block)}\.experts)\.(?P<e>\d+)\.(?P<w>{'|'.join(linears)})"
                             rf"\.weight$")
        self.names: dict[str, str | list[list[str]]] = {}  # our key -> the checkpoint's key, or keys per expert
        found: dict[str, dict[str, dict[int, str]]] = {}
        for key in tensors:
            ours = rename(key)
            m = pattern.match(ours)
            if m:
                found.setdefault(m["pre"], {}).setdefault(m["w"], {})[int(m["e"])] = key
            else:
                self.names[ours] = key
        for pre, by_linear in sorted(found.items()):
            experts = sorted(set().union(*by_linear.values()))
            complete = all(sorted(by_linear.get(w, {})) == experts for w in linears)
            both = [f"{pre}.{name}" for name in fused if f"{pre}.{name}" in self.names]
            if experts != list(range(len(experts))) or not complete or both:
                raise CheckpointError(
                    f"{source}: {pre}: the per-expert layout needs {', '.join(linears)} of experts 0..N-1 and no "
                    f"fused tensor beside them; found {({w: sorted(v) for w, v in by_linear.items()})}"
                    f"{f' and {both}' if both else ''}")
            for name, parts in fused.items():
                self.names[f"{pre}.{name}"] = [[by_linear[w][e] for w in parts] for e in experts]

    def __getitem__(self, key: str):
        source = self.names[key]
        if isinstance(source, str):
            return self.tensors[source]
        return np.stack([np.concatenate([np.asarray(self.tensors[k]) for k in keys], axis=0) for keys in source])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def per_expert_layout(state: Mapping[str, np.ndarray], block: str, fused: Mapping[str, tuple[str, ...]],
                      rename: Callable[[str], str] = lambda key: key) -> dict[str, np.ndarray]:
    """``state`` (transformers 5's fused layout) written one expert at a time, each key renamed by
    ``rename``: :class:`PerExpertFile`'s inverse (a fused tensor's rows split evenly among its linears)."""
    pattern = re.compile(rf"^(?P<pre>.*\.{re.escape(block)}\.experts)\.(?P<name>{'|'.join(map(re.escape, fused))})$")
    out = {}
    for key, value in state.items():
        key = rename(key)
        m = pattern.match(key)
        if not m:
            out[key] = value
            continue
        parts = fused[m["name"]]
        for e, w in enumerate(np.asarray(value)):
            for linear, rows in zip(parts, np.split(w, len(parts), axis=0), strict=True):
                out[f"{m['pre']}.{e}.{linear}.weight"] = rows
    return out
