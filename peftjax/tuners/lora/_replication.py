"""PEFT's ``layer_replication``: a deeper model from the base's own layers, the copies sharing its
frozen weights, each copy given its own LoRA.

``[[0, 4], [2, 5]]`` turns layers ``0 1 2 3 4`` into ``0 1 2 3 2 3 4`` (mergekit's pass-through
ranges). A copy is a new module graph whose every variable *is* the original's (one
``nnx.Variable`` reached by two paths), so the base's memory is unchanged, ``nnx.state`` and the
parameter counts hold each weight once, as torch's ``named_parameters`` does, and LoRA (injected
after, per path) gives each copy its own adapter, saved under the copy's index as PEFT saves it.
The layers are found where PEFT looks for them (``model.model...layers``, ``bert.encoder.layer``).
"""

from __future__ import annotations

import copy

from flax import nnx

from peftjax.models._modeling import ConfigRef

# the families whose layers are all alike (no layer reads its index, a window or a kind by it);
# PEFT 0.22.0 documents Llama-, BERT- and Falcon-like models
REPLICABLE = ("llama", "mistral", "qwen2", "qwen3", "bert", "roberta", "xlm-roberta")


def replicate_layers(model: nnx.Module, layer_map) -> int:
    """Replaces ``model``'s layer list by the ranges ``layer_map`` names, in place; returns the new count.

    The model's config becomes a copy whose ``num_hidden_layers`` is the new count (a cache is made
    for every layer), as PEFT sets it, and the model remembers the map (``replicated_layers``), so
    that merging an adapter into the shared weights is refused.

    Raises:
      ValueError: no layer list where PEFT looks; a range past the last layer; a family whose layers
        differ (named), stacked layers (``scan_layers=True``), or a model replicated already.
    """
    from peftjax.nn._scan import has_stacked_layers

    if has_stacked_layers(model):
        raise ValueError("layer_replication needs the layers as a list: load the model with scan_layers=False")
    owner, attribute = _layer_list(model)
    config = getattr(model, "config", None)
    family = getattr(config, "model_type", None)
    if family not in REPLICABLE:
        raise ValueError(f"layer_replication is implemented for {', '.join(REPLICABLE)} models (their layers are "
                         f"all alike), not model_type {family!r}")
    if getattr(config, "use_sliding_window", False):
        raise ValueError("layer_replication on a model with use_sliding_window (its layers' windows differ by "
                         "index) is not implemented")
    if getattr(model, "replicated_layers", None) is not None:
        raise ValueError(f"the model's layers are replicated already ({list(model.replicated_layers)}); "
                         "layer_replication applies once, with the first adapter")
    layers = getattr(owner, attribute)
    n = len(layers)
    for start, end in layer_map:
        if end > n:
            raise ValueError(f"layer_replication: [{start}, {end}) reaches past the model's {n} layers")
    new, placed = [], set()
    for i in (i for start, end in layer_map for i in range(start, end)):  # the original first, copies after
        new.append(_clone_sharing_variables(layers[i]) if i in placed else layers[i])
        placed.add(i)
    setattr(owner, attribute, nnx.List(new))
    if hasattr(config, "num_hidden_layers"):
        edited = copy.deepcopy(config.hf_config)
        edited.num_hidden_layers = len(new)
        set_config(model, edited)
    model.replicated_layers = tuple(tuple(p) for p in layer_map)
    return len(new)


def set_config(model: nnx.Module, config) -> None:
    """Points every module of ``model`` that shares its config at ``config`` instead (a model's
    config is read-only; the one it had stays as it was, for whatever else holds it)."""
    old, ref = model.config.hf_config, ConfigRef(config)
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "config", None), ConfigRef) \
                and node.config.hf_config is old:
            node.config = ref


def _layer_list(model: nnx.Module) -> tuple[nnx.Module, str]:
    """``(module, attribute)`` holding the layers, where PEFT's ``replicate_layers`` looks."""
    node = model
    while hasattr(node, "model") and isinstance(node.model, nnx.Module):
        node = node.model
    if isinstance(getattr(node, "bert", None), nnx.Module):
        node = node.bert
    for path in (("layers",), ("encoder", "layer"), ("h",)):
        owner = node
        for name in path[:-1]:
            owner = getattr(owner, name, None)
        if owner is not None and isinstance(getattr(owner, path[-1], None), nnx.List):
            return owner, path[-1]
    raise ValueError(f"layer_replication: could not locate the layers of {type(model).__name__} (PEFT looks for "
                     "model.layers, bert.encoder.layer or h)")


def _clone_sharing_variables(layer: nnx.Module) -> nnx.Module:
    """A new module graph like ``layer`` whose variables are ``layer``'s own objects."""
    clone = nnx.merge(*nnx.split(layer))
    nodes = {tuple(path): node for path, node in nnx.iter_graph(clone)}
    for path, var in nnx.iter_graph(layer):
        if isinstance(var, nnx.Variable):
            parent, key = nodes[tuple(path)[:-1]], path[-1]
            if isinstance(key, int):
                parent[key] = var
            else:
                setattr(parent, key, var)
    return clone
