"""Hot-swapping a LoRA adapter's weights without recompiling (PEFT's ``peft.utils.hotswap``).

A jitted function of an NNX model is compiled for the model's structure and shapes; the values
of its weights are arguments. :func:`hotswap_adapter` therefore writes a new adapter file's
weights into the existing adapter's arrays, same shapes, and changes nothing static:

- a smaller rank is zero-padded (zero columns of ``A`` and rows of ``B`` add nothing);
- a different scaling (``lora_alpha``, ``alpha_pattern``) is folded into ``B`` (and ``lora_B``'s
  bias), so ``s_old * A @ (B * s_new / s_old)`` equals the new ``s_new * A @ B``; the saved files
  of the swapped adapter then hold that ``B`` with the old alpha, the same function of the input;
- a layer the new adapter does not target gets zeros, as in PEFT.

A larger rank than the model holds cannot fit without a recompile:
:func:`prepare_model_for_compiled_hotswap` pads every adapter to ``target_rank`` first (before
the first compile), as PEFT asks.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
from flax import nnx

from peftjax.peft_model import PeftModel
from peftjax.tuners import base as tuner_base
from peftjax.tuners.lora import LoraLayer
from peftjax.tuners.lora._math import unit_norm

# as PEFT's ``CONFIG_KEYS_TO_CHECK``; lora_bias too, which changes the weights a layer holds
CONFIG_KEYS_TO_CHECK = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "lora_bias")
_SWAP = "__hotswap__"


def _params(module):
    return sorted(nnx.to_flat_state(nnx.state(module, nnx.Variable)), key=lambda kv: kv[0])


def _pad(value, rank: int, axis: int):
    widths = [(0, 0)] * value.ndim
    widths[axis] = (0, rank - value.shape[axis])
    return jnp.pad(value, widths)


def _refuse_parameters(layers) -> None:
    from peftjax.tuners.lora._param import LoraParamLayer

    params = [m.adapter_path for m in layers if isinstance(m, LoraParamLayer)]
    if params:
        raise NotImplementedError(f"hot-swapping LoRA on parameters (target_parameters: {params[:3]}) is not "
                                  "implemented")
    for variant, option, held in (("BD-LoRA", "use_bdlora", lambda s: s.block_diagonal is not None),
                                  ("KaSA", "kasa_config", lambda s: s.kasa is not None)):
        found = [f"{m.adapter_path} ({n})" for m in layers if not isinstance(m, LoraParamLayer)
                 for n, s in m.adapter_specs if held(s)]
        if found:  # padding the rank would break BD-LoRA's blocks apart; KaSA's diagonal is not padded
            raise NotImplementedError(f"hot-swapping {variant} adapters ({option}: {found[:3]}) is not implemented")


def prepare_model_for_compiled_hotswap(model: PeftModel, *, target_rank: int | None = None) -> None:
    """Pads every LoRA adapter of ``model`` to rank ``target_rank`` (zeros; the outputs are unchanged).

    Call it before compiling a function of the model; later swaps of adapters up to that rank
    then never recompile. Scalings need no preparation here (a swap folds them into ``B``).

    Raises:
      ValueError: the model has no LoRA layer, or an adapter's rank exceeds ``target_rank``.
    """
    layers = [m for m in tuner_base.named_modules(model.base_model).values() if isinstance(m, LoraLayer)]
    if not layers:
        raise ValueError("prepare_model_for_compiled_hotswap: the model has no LoRA layer")
    _refuse_parameters(layers)
    if target_rank is None:
        return
    for layer in layers:
        for name, spec in layer.adapter_specs:
            if spec.r > target_rank:
                raise ValueError(
                    f"{layer.adapter_path}: adapter {name!r} has rank {spec.r} > target_rank={target_rank}"
                )
    for layer in layers:
        specs = []
        for name, spec in layer.adapter_specs:
            layer.lora_A[name].set_value(_pad(layer.lora_A[name].get_value(), target_rank, -1))
            layer.lora_B[name].set_value(_pad(layer.lora_B[name].get_value(), target_rank, 0))
            # r is the rank the arrays hold; the scaling, alpha / r of the adapter as trained, stays
            specs.append((name, type(spec)(**{**spec.__dict__, "r": target_rank})))
        layer.adapter_specs = tuple(specs)


def hotswap_adapter(model: PeftModel, model_name_or_path: str | os.PathLike, adapter_name: str, **kwargs) -> None:
    """Replaces adapter ``adapter_name``'s weights with those saved at ``model_name_or_path``.

    The name, the shapes and everything static stay, so a function of the model compiled
    before the swap runs the new adapter without recompiling. ``kwargs`` are those of
    :meth:`PeftModel.load_adapter` (``revision``, ``subfolder``, ...).

    Raises:
      ValueError: the adapter is unknown or merged, the configs differ in a key PEFT checks
        (``use_rslora``, ``lora_dropout``, ``alpha_pattern``, ``use_dora``) or in ``lora_bias``,
        the new adapter targets a layer the old one does not, or a rank exceeds what the model
        holds (call :func:`prepare_model_for_compiled_hotswap` with a larger ``target_rank``).
        The model is unchanged when any of these is raised.
    """
    if adapter_name not in model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r} to hot-swap; adapters: {sorted(model.peft_config)}")
    old = model.peft_config[adapter_name]
    if old.peft_type != "LORA":
        raise ValueError(f"Hotswapping only supports LORA but {old.peft_type} was passed.")
    layers = [m for m in tuner_base.named_modules(model.base_model).values()
              if isinstance(m, LoraLayer) and adapter_name in m.adapter_names()]
    _refuse_parameters(layers)
    if any(adapter_name in m.adapter_merged for m in layers):
        raise ValueError(
            f"Cannot hot-swap adapter '{adapter_name}' because it is currently merged into the base weights; "
            "unmerge it first (peft_model.unmerge_adapter())"
        )
    model.load_adapter(model_name_or_path, _SWAP, **kwargs)  # parses and checks the files
    try:
        new = model.peft_config[_SWAP]
        if new.peft_type != old.peft_type:
            raise ValueError(f"Incompatible PEFT types found: {old.peft_type} and {new.peft_type}")
        for key in CONFIG_KEYS_TO_CHECK:
            if getattr(old, key, None) != getattr(new, key, None):
                raise ValueError(
                    f"Configs are incompatible: for {key}, {getattr(old, key, None)} != {getattr(new, key, None)}"
                )
        targeted = [m for m in tuner_base.named_modules(model.base_model).values()
                    if isinstance(m, LoraLayer) and _SWAP in m.adapter_names()]
        extra = [m.adapter_path for m in targeted if adapter_name not in m.adapter_names()]
        if extra:
            raise ValueError(
                f"Hot swapping the adapter did not succeed: {model_name_or_path} targets layers {adapter_name!r} "
                f"does not: {extra[:5]}"
            )
        for layer in targeted:
            held, incoming = layer.spec(adapter_name), layer.spec(_SWAP)
            if incoming.r > held.r:
                raise ValueError(
                    f"{layer.adapter_path}: the new adapter has rank {incoming.r} > {held.r}, the rank the model "
                    f"holds; call prepare_model_for_compiled_hotswap(model, target_rank={incoming.r}) before "
                    "compiling"
                )
        saved = [m for m in tuner_base.named_modules(model.base_model).values()
                 if isinstance(m, tuner_base.SavedModule) and _SWAP in m.modules_to_save]
        for module in saved:
            if adapter_name not in module.modules_to_save:
                raise ValueError(f"the new adapter saves a copy of a module that {adapter_name!r} does not")
        # checked: from here on nothing raises
        for layer in layers:
            held = layer.spec(adapter_name)
            if _SWAP not in layer.adapter_names():  # not targeted by the new adapter: adds nothing
                for store in (layer.lora_A, layer.lora_B, layer.lora_B_bias):
                    if adapter_name in store:
                        store[adapter_name].set_value(jnp.zeros_like(store[adapter_name].get_value()))
                if adapter_name in layer.lora_magnitude_vector:  # DoRA's factor m / ||W|| must be 1
                    weight = layer._to_2d(getattr(layer, layer.weight_attr).get_value())
                    layer.lora_magnitude_vector[adapter_name].set_value(unit_norm(weight))
                continue
            ratio = layer.spec(_SWAP).scaling / held.scaling
            updates = {
                "lora_A": _pad(layer.lora_A[_SWAP].get_value(), held.r, -1),
                "lora_B": _pad(layer.lora_B[_SWAP].get_value(), held.r, 0) * ratio,
            }
            if adapter_name in layer.lora_B_bias:
                updates["lora_B_bias"] = layer.lora_B_bias[_SWAP].get_value() * ratio
            if adapter_name in layer.lora_magnitude_vector:
                updates["lora_magnitude_vector"] = layer.lora_magnitude_vector[_SWAP].get_value()
            for attr, value in updates.items():
                current = getattr(layer, attr)[adapter_name]
                current.set_value(value.astype(current.get_value().dtype))
        for module in saved:  # modules_to_save copies: the trained heads of the new adapter
            for (_, held), (_, incoming) in zip(_params(module.modules_to_save[adapter_name]),
                                                _params(module.modules_to_save[_SWAP])):
                held.set_value(incoming.get_value().astype(held.get_value().dtype))
    finally:
        model.delete_adapter(_SWAP)
