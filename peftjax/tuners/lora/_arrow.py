"""Arrow's layer side (PEFT's ``arrow.py``): the router's prototypes and GenKnowSub, kept up to date.

``peftjax.arrow.create_arrow_model`` loads the task adapters (``task_0``, ``task_1``, ...) and,
for GenKnowSub, general ones (``gks_0``, ...), checks that they share rank, shapes and target
modules (:func:`check_compatible`), and adds the router adapter ``arrow_router`` (a LoRA config
with ``arrow_config``) on those modules. On each layer the router keeps one prototype per task
adapter, the top right singular vector of its ``B A`` (a power iteration, as PEFT's), and routes
each token to the ``top_k`` best aligned (``tuners.lora._math.arrow_route``). GenKnowSub
subtracts the general adapters' mean ``A`` and ``B`` from every task adapter's once.

PEFT does both lazily at the router's next forward; peftjax does them when the router is built
and again whenever the ``PeftModel`` adds, loads or deletes an adapter (:func:`refresh_arrow`),
so the forward stays a pure function of the state (jit, no hidden flags). A new expert gets
GenKnowSub once, as in PEFT; the prototypes are rebuilt for all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.config import ArrowConfig
from peftjax.nn._scan import has_stacked_layers, unstacked
from peftjax.nn._torch_rng import TorchGenerator
from peftjax.tuners.base import named_modules
from peftjax.tuners.lora._layer import LoraLayer
from peftjax.tuners.lora._math import arrow_prototype


class ArrowPrototypes(nnx.Variable):
    """A router's prototypes on one layer, ``[experts, in]`` (not trained, not saved)."""


def check_compatible(model, adapter_names: list[str]) -> tuple[list[str], int]:
    """PEFT's ``check_loaded_lora_compatibility_arrow`` and ``ensure_adapters_target_linear_layers_only``:
    ``(target module names, rank)`` the adapters share."""
    layers = {n: m for n, m in named_modules(model.base_model).items() if isinstance(m, LoraLayer)}
    offenders = [(a, n, type(m).__name__) for n, m in layers.items() for a in adapter_names
                 if a in m.adapter_names() and m.lora_kind != "linear"]
    if offenders:
        lines = ["LoRA adapters must only target Linear-like layers (nnx.Linear, GPT-2's Conv1D, quantized "
                 "linears). Found:"]
        lines += [f"  - adapter '{a}' on module '{n}' of type {t}" for a, n, t in offenders]
        raise TypeError("\n".join(lines))
    reference = None
    for name in adapter_names:
        held = {n: m for n, m in layers.items() if name in m.adapter_names()}
        modules = {n.rsplit(".", 1)[-1] for n in held}
        last = held[sorted(held)[-1]] if held else None
        r = None if last is None else last.spec(name).r
        shapes = None if last is None else (tuple(last.lora_A[name].get_value().shape[::-1]),
                                            tuple(last.lora_B[name].get_value().shape[::-1]))
        if reference is None:
            reference = {"r": r, "shapes": shapes, "modules": modules}
        elif r != reference["r"]:
            raise ValueError(f"[{name}] rank mismatch: {r} != {reference['r']}")
        elif shapes != reference["shapes"]:
            raise ValueError(f"[{name}] shape mismatch: {shapes} != {reference['shapes']}")
        elif modules != reference["modules"]:
            raise ValueError(f"[{name}] target_modules mismatch:\n  this adapter -> {sorted(modules)}\n"
                             f"  reference   -> {sorted(reference['modules'])}")
    return sorted(reference["modules"]), int(reference["r"])


def refresh_arrow(peft_model) -> None:
    """Brings every Arrow router of ``peft_model`` up to date with the adapters its layers hold:
    GenKnowSub on the experts that have not had it (all of them the first time), then the
    prototypes of all. A no-op without a router. The ``PeftModel`` calls it after adding, loading
    or deleting an adapter.

    Raises:
      ValueError: a layer's experts differ in rank (they are stacked), or fewer than ``top_k``.
    """
    routers = {n: c for n, c in peft_model.peft_config.items() if getattr(c, "arrow_config", None) is not None}
    if not routers:
        return
    if has_stacked_layers(peft_model.base_model):  # scan_layers=True: layer by layer, stacked again
        with unstacked(peft_model.base_model, write=True):
            return _refresh(peft_model.base_model, routers)
    _refresh(peft_model.base_model, routers)


def _refresh(model, routers) -> None:
    for path, layer in named_modules(model).items():
        if not isinstance(layer, LoraLayer):
            continue
        for router, config in routers.items():
            if router in layer.adapter_names():
                _refresh_layer(layer, path, router, ArrowConfig.from_value(config.arrow_config))


def _refresh_layer(layer: LoraLayer, path: str, router: str, settings: ArrowConfig) -> None:
    experts = layer.arrow_expert_names()
    variants = [n for n in experts if any(getattr(layer.spec(n), v) is not None
                                          for v in ("block_diagonal", "kasa", "alora"))]
    if variants:
        raise NotImplementedError(f"{path}: an Arrow router over BD-LoRA, KaSA or aLoRA adapters {variants} "
                                  "(use_bdlora, kasa_config, alora_invocation_tokens) is not implemented")
    if not experts:
        raise ValueError(f"{path}: the Arrow router {router!r} routes over the task adapters loaded beside it "
                         "(peftjax.create_arrow_model), and this model has none; a router's file is not an adapter "
                         "of its own")
    if len(experts) < settings.top_k:
        raise ValueError(f"{path}: the Arrow router {router!r} takes top_k={settings.top_k} of {len(experts)} "
                         f"adapters ({list(experts)})")
    ranks = {layer.spec(n).r for n in experts}
    if len(ranks) > 1:
        raise ValueError(f"{path}: the Arrow router's experts have ranks {sorted(ranks)}; they must share one")
    general = [n for n in (settings.gks_adapter_names or ()) if n in layer.adapter_names()]
    if settings.use_gks and general:
        done = getattr(layer, "arrow_gks_done", False)
        fresh = [n for n in experts if not done or n not in getattr(layer, "arrow_experts", ())]
        mean_a = jnp.mean(jnp.stack([layer.lora_A[n].get_value() for n in general]), axis=0)
        mean_b = jnp.mean(jnp.stack([layer.lora_B[n].get_value() for n in general]), axis=0)
        for n in fresh:
            for store, mean in ((layer.lora_A, mean_a), (layer.lora_B, mean_b)):
                value = store[n].get_value()
                store[n].set_value((value - mean).astype(value.dtype))
        layer.arrow_gks_done = True
    n_in = layer.lora_A[experts[0]].get_value().shape[0]
    if settings.rng_seed is not None:  # PEFT: torch.Generator().manual_seed(rng_seed) for each prototype
        start = jnp.asarray(TorchGenerator(settings.rng_seed).normal((n_in,), 0.0, 1.0))
    else:
        start = jax.random.normal(jax.random.key(0), (n_in,), jnp.float32)
    prototypes = [_prototype(layer.lora_A[n].get_value(), layer.lora_B[n].get_value(), start) for n in experts]
    dtype = layer.lora_A[experts[0]].get_value().dtype
    layer.arrow_prototypes[router] = ArrowPrototypes(jnp.stack(prototypes).astype(dtype))
    layer.arrow_experts = experts


_prototype = jax.jit(arrow_prototype)
