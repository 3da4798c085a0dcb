"""Putting TinyLoRA into an NNX model: each target's SVD and projections, the groups' trained
vectors, PEFT's file layout."""

from __future__ import annotations


import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import TinyLoraConfig
from peftjax.nn._torch_rng import TorchGenerator
from peftjax.tuners.base import (
    AdapterParam,
    adapter_layers,
    inject_each_layer,
    modules_in_definition_order,
    with_model_tensors,
)
from peftjax.tuners.tinylora._layer import TinyLoraLayer, TinyLoraSpec, tinylora_class_for

V_KEY = "base_model.tinylora_v"  # PEFT: ``base_model.tinylora_v.<adapter>.<group>`` in memory


def tinylora_group(index: int, count: int, weight_tying: float) -> int:
    """PEFT's group of the ``index``-th of ``count`` targeted layers: ``round(count (1 - tying))``
    groups of ``count // groups`` consecutive layers, the last taking the rest."""
    groups = max(1, round(count * (1.0 - weight_tying)))
    size = max(1, count // groups)
    return min(index // size, groups - 1)


def inject_tinylora(
    model: nnx.Module, config: TinyLoraConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> TinyLoraConfig:
    """Adds TinyLoRA adapter ``adapter_name`` to every layer ``config`` targets, in place.

    The targets are numbered in the order the model assigned its modules (transformers' order for
    the bundled models, as PEFT numbers them): the number seeds a layer's ``P``
    (``projection_seed + index``, torch's draws reproduced) and picks its vector's group.

    Args:
      model: any NNX module; targets must be ``nnx.Linear`` (GPT-2's ``Conv1D`` too; PEFT's
        TinyLoRA on embeddings is not implemented here).
      config: the TinyLoRA settings; ``target_modules=None`` uses PEFT's default for the model type.
      adapter_name: the name the tensors are stored under.
      key: draws ``v`` for ``init_weights="uniform"`` or ``False``.

    Returns:
      The resolved config (targets filled in, task heads added, ``fan_in_fan_out`` as PEFT sets it).

    Raises:
      ValueError: nothing matches ``target_modules``; ``u r r`` is under 16 with
        ``save_projection=False`` (torch's draw of so few values is not reproduced); another
        TinyLoRA adapter on the model differs in ``save_projection`` (PEFT's rule); the adapter
        already exists.
      TypeError: a target is not a supported layer (embeddings included).
      NotImplementedError: the model stacks its layers (``scan_layers=True``: the vectors are
        shared across layers).

    >>> import peftjax  # doctest: +SKIP
    >>> inject_tinylora(model, peftjax.TinyLoraConfig(r=2, u=16, target_modules=["q_proj"]))  # doctest: +SKIP
    """
    if getattr(getattr(model, "config", None), "scan_layers", False):
        raise NotImplementedError(
            "TinyLoRA on a model built with scan_layers=True is not implemented (its vectors are shared across "
            "layers); load the model with scan_layers=False")
    for layer in adapter_layers(model, TinyLoraLayer).values():
        kept = {layer.spec(n).save_projection for n in layer.adapter_names()} | {config.save_projection}
        if len(kept) > 1:
            raise ValueError("TinyLoRA projection tensors must be saved for all adapters or none, but got multiple "
                             f"different values: {sorted(kept)}")
    key = jax.random.key(0) if key is None else key
    names: list[str] = []

    def prepare(config, name, module):
        n_in, n_out = module.kernel.get_value().shape
        r = min(config.r, n_in, n_out)
        if not config.save_projection and config.u * r * r < 16:
            raise ValueError(f"{name}: save_projection=False needs P drawn again as torch draws it, which peftjax "
                             f"reproduces for 16 values or more; u * r * r = {config.u * r * r}")
        names.append(name)
        return r

    vectors: dict[str, AdapterParam] = {}
    index: dict[str, int] = {}

    def vector(group: str) -> AdapterParam:
        if group not in vectors:
            k = jax.random.fold_in(key, 2**20 + int(group))  # the layers' keys are folded with 0 .. n - 1
            if config.init_weights is True:
                v = jnp.zeros((config.u,), jnp.float32)
            elif config.init_weights == "uniform":
                v = jax.random.uniform(k, (config.u,), jnp.float32, -config.init_v_bound, config.init_v_bound)
            else:
                v = jax.random.normal(k, (config.u,), jnp.float32)
            vectors[group] = AdapterParam(v)
        return vectors[group]

    def add(module, r, layer_key):
        if not index:  # every target is prepared by now: number them in the model's module order
            targets = set(names)
            index.update({n: i for i, n in enumerate(m for m in modules_in_definition_order(model) if m in targets)})
        i = index[module.adapter_path]
        group = str(tinylora_group(i, len(index), config.weight_tying))
        weight = module.kernel.get_value().astype(jnp.float32).T  # torch's [out, in]
        u, s, vt = jnp.linalg.svd(weight, full_matrices=False)
        root = jnp.sqrt(s[:r])
        if config.u * r * r >= 16:  # PEFT's own draw (torch's generator, reproduced)
            p = TorchGenerator(config.projection_seed + i).normal((config.u, r, r), 0.0, 1.0 / r**0.5)
        else:  # saved with the adapter (save_projection=True), so any draw moves with it
            p = jax.random.normal(layer_key, (config.u, r, r), jnp.float32) / r**0.5
        spec = TinyLoraSpec(r=r, group=group, dropout=float(config.tinylora_dropout),
                            save_projection=config.save_projection)
        module.add_tinylora(adapter_name, spec, vector(group), root[:, None] * vt[:r], u[:, :r] * root[None, :], p)

    return inject_each_layer(model, config, adapter_name=adapter_name, key=key, layer_type=TinyLoraLayer,
                             method="TinyLoRA", class_for=tinylora_class_for, prepare=prepare, add=add, conv1d=True)


def _vectors(model: nnx.Module, adapter_name: str) -> dict:
    return {f"{V_KEY}.{layer.spec(adapter_name).group}": (
        layer.tinylora_v[adapter_name], f"the trained vector of group {layer.spec(adapter_name).group}", "[u]")
        for layer in adapter_layers(model, TinyLoraLayer, adapter_name).values()}


# PEFT's on-disk dict: every layer's SVD factors (and projections), each group's vector once
tinylora_state_dict, load_tinylora_state_dict = with_model_tensors(TinyLoraLayer, _vectors)
