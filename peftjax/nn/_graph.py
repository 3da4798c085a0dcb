"""A model's sub-modules, found without visiting each of its weights.

``nnx.iter_graph`` yields every node and leaf (each variable, each static attribute) and checks
each against flax's variable types; the adapter functions ask for a model's modules on every
change (``set_adapter``, ``split``'s checks, saving), where only modules matter. ``iter_modules``
walks the same graph in the same order, stepping into graph and pytree nodes only.
"""

from __future__ import annotations

from collections.abc import Iterator

from flax import nnx


def iter_modules(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module]]:
    """``(path, module)`` for ``model`` and every module below it: ``nnx.iter_modules``'s pairs in
    its order (children before their parent, attributes by name, a shared module once, at the
    first path that reaches it)."""
    visited: set[int] = set()
    is_node: dict[type, bool] = {}  # flax's check by type (it differs for tracers: never nodes either way)
    stack: list[tuple[tuple, object, bool]] = [((), model, False)]
    while stack:
        path, node, children_done = stack.pop()
        if children_done:
            if isinstance(node, nnx.Module):
                yield path, node
            continue
        impl = nnx.graph.get_node_impl(node)
        if impl is None or id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((path, node, True))
        for key, child in reversed(impl.node_dict(node).items()):
            kind = type(child)
            if kind not in is_node:
                is_node[kind] = nnx.graph.is_node(child)
            if is_node[kind]:
                stack.append(((*path, key), child, False))
