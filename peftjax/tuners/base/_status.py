"""PEFT's ``get_layer_status`` / ``get_model_status``: where the adapters are and what state they are in."""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import jax
from flax import nnx

from peftjax.tuners.base._layer import AdapterLayer, original_class
from peftjax.tuners.base._model import named_modules
from peftjax.tuners.base._modules_to_save import SavedModule
from peftjax.tuners.base._variables import AdapterParam, TrainableParam

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapter layer (or ``modules_to_save`` wrapper), with PEFT's fields."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model, with PEFT's fields; ``"irregular"`` where the layers disagree."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None | Irregular = None


def _agree(values) -> bool | Irregular:
    values = list(values)
    if all(v is True for v in values):
        return True
    if all(v is False for v in values):
        return False
    return "irregular"


def _by_adapter(variables: dict[str, list[nnx.Variable]]):
    requires_grad = {n: _agree(isinstance(v, AdapterParam | TrainableParam) for v in vs) for n, vs in variables.items()}
    devices = {n: sorted({d.platform for v in vs for x in jax.tree.leaves(v.get_value()) for d in x.devices()})
               for n, vs in variables.items()}
    return requires_grad, devices


def _module_type(layer: nnx.Module) -> str:
    """PEFT's repr of the layer: ``"<method>.<class>"``, or a method's own (``status_module_type``).

    On a bitsandbytes-quantized linear, a method with its own bitsandbytes layers in PEFT names them
    (``bnb_status_prefix``: ``"lora."`` gives ``"lora.Linear4bit"``); the others wrap it in their
    float layer, whose name they keep (``"oft.Linear"``).
    """
    from peftjax.quantization import QuantizedLinear

    quantized = isinstance(layer, QuantizedLinear)
    if quantized and getattr(layer, "bnb_status_prefix", None):
        return layer.bnb_status_prefix + original_class(layer).__name__
    if getattr(layer, "status_module_type", None):
        return layer.status_module_type
    base = "Linear" if quantized else original_class(layer).__name__
    return f"{getattr(layer, 'method_name', 'adapter').lower()}.{base}"


def _quantization_backend(layer: nnx.Module) -> str | None:
    """PEFT's name of the quantization backend a layer goes through (``"bnb 4bit"``, ``"bnb 8bit"``).

    PEFT 0.22.0 names it only for the methods that reach bitsandbytes' weights through its generic
    backends (``reports_quantization_backend``: OFT, BOFT, MiSS, SHiRA, PaCA, VeRA); its LoRA, IA3,
    AdaLoRA and the others with their own bitsandbytes layers report ``None``, and so does peftjax.
    """
    from peftjax.quantization import Linear4bit, Linear8bitLt

    if not getattr(layer, "reports_quantization_backend", False):
        return None
    if isinstance(layer, Linear4bit):
        return "bnb 4bit"
    return "bnb 8bit" if isinstance(layer, Linear8bitLt) else None


def get_layer_status(model: nnx.Module) -> list[TunerLayerStatus]:
    """The status of each adapter layer and ``modules_to_save`` wrapper, named as PEFT names them
    (``model.`` + the module path, PEFT's ``LoraModel.model`` prefix).

    Raises:
      ValueError: the model has no adapter layer (PEFT's message).
    """
    out = []
    for path, m in named_modules(model).items():
        if isinstance(m, AdapterLayer):
            variables = collections.defaultdict(list)
            for store in m.adapter_variable_dicts():
                for name, var in store.items():
                    variables[name].append(var)
        elif isinstance(m, SavedModule):
            variables = {n: [v for _, v in nnx.to_flat_state(nnx.state(c, nnx.Variable))]
                         for n, c in m.modules_to_save.items()}
        else:
            continue
        requires_grad, devices = _by_adapter(dict(variables))
        if isinstance(m, SavedModule):
            kind, enabled = "ModulesToSaveWrapper", not m.saved_disabled
            active, merged, available = list(m.saved_active), [], sorted(m.modules_to_save)
        else:
            kind = _module_type(m)
            enabled = not getattr(m, "adapter_disabled", False)
            active, merged = list(m.active_adapter_names()), list(m.merged_adapter_names())
            available = sorted(m.adapter_names())
        # PEFT nests one wrapper per adapted parameter (LoRA's target_parameters): one entry each
        for suffix in getattr(m, "status_suffixes", lambda: ("",))():
            out.append(TunerLayerStatus(name=f"model.{path}{suffix}", module_type=kind, enabled=enabled,
                                        active_adapters=active, merged_adapters=merged, requires_grad=requires_grad,
                                        available_adapters=available, devices=devices,
                                        quantization_backend=_quantization_backend(m)))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you "
                         "have PEFT adapters injected in the model.")
    return out


def get_model_status(model: nnx.Module, *, base_model_type: str, adapter_model_type: str,
                     peft_types: dict[str, str], trainable_params: int, total_params: int,
                     layers: list[TunerLayerStatus] | None = None) -> TunerModelStatus:
    """Folds :func:`get_layer_status` (or ``layers``) into one status, as PEFT's ``get_model_status`` does."""
    layers = get_layer_status(model) if layers is None else layers
    enabled = {s.enabled for s in layers}
    active = {tuple(s.active_adapters) for s in layers}
    merged_somewhere = set().union(*(s.merged_adapters for s in layers))
    merged: list[str] | Irregular = sorted(merged_somewhere)
    if any((set(s.available_adapters) - set(s.merged_adapters)) & merged_somewhere for s in layers):
        merged = "irregular"
    backends = {s.quantization_backend for s in layers}
    grads, devices = collections.defaultdict(list), collections.defaultdict(set)
    for s in layers:
        for name, value in s.requires_grad.items():
            grads[name].append(value)
        for name, value in s.devices.items():
            devices[name].update(value)
    return TunerModelStatus(
        base_model_type=base_model_type,
        adapter_model_type=adapter_model_type,
        peft_types=peft_types,
        trainable_params=trainable_params,
        total_params=total_params,
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else ("irregular" if active else []),
        merged_adapters=merged,
        requires_grad={n: _agree(v) for n, v in grads.items()},
        available_adapters=sorted(set().union(*(s.available_adapters for s in layers))),
        devices={n: sorted(v) for n, v in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular",
    )
