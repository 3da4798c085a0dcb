"""The order a model assigned its sub-modules in, which NNX's graph walks do not keep.

``nnx.iter_graph`` visits attributes sorted by name, and a module rebuilt by ``nnx.merge`` (every
model built under ``nnx.eval_shape``) holds them sorted too. torch's ``model.modules()`` follows
registration order, and a method whose state depends on the layers' order (Uni-LoRA's index
assignment) must follow it as PEFT does.
"""

from __future__ import annotations

from flax import nnx


def modules_in_assignment_order(model: nnx.Module) -> list[str]:
    """Every sub-module's dotted path, parents first, children in the order they were assigned
    (``vars`` order: right for a module as its constructor built it, not for one ``nnx.merge``
    rebuilt)."""
    out: list[str] = []

    def walk(node: nnx.Module, path: str) -> None:
        out.append(path)
        for key, value in vars(node).items():
            if isinstance(value, nnx.Module):
                walk(value, f"{path}.{key}" if path else key)

    walk(model, "")
    return out
