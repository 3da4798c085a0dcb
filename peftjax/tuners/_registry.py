"""Which code handles which adapter config: one ``Tuner`` record per PEFT method.

``PeftModel`` is method-agnostic: it asks :func:`tuner_for` how to inject a config's adapter, how
to turn it into PEFT's state dict and back, and (for prompt-learning methods, which change the
inputs rather than layers) how to run the forward pass and generation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from peftjax.config import PeftConfig


@dataclasses.dataclass(frozen=True)
class Tuner:
    """How one PEFT method plugs into ``PeftModel``.

    Attributes:
      config_class: the config type this tuner handles.
      inject: ``(model, config, *, adapter_name, key) -> resolved config``; adds the adapter in place.
      state_dict: ``(model, adapter_name, config, *, key_mapping, save_embedding_layers) -> dict``
        of PEFT's on-disk keys and torch-layout arrays.
      load_state_dict: ``(model, tensors, adapter_name, *, key_mapping, source) -> (missing,
        unexpected)``; fills an injected adapter from PEFT's keys.
      forward: for methods that change the inputs (prompt learning):
        ``(peft_model, adapter_name, kwargs) -> output``; ``None`` calls the model directly.
      generate: the same for ``generate``.
    """

    config_class: type
    inject: Callable
    state_dict: Callable
    load_state_dict: Callable
    forward: Callable | None = None
    generate: Callable | None = None


_TUNERS: dict[type, Tuner] = {}


def register_tuner(tuner: Tuner) -> Tuner:
    _TUNERS[tuner.config_class] = tuner
    return tuner


def tuner_for(config: PeftConfig) -> Tuner:
    """The tuner for ``config``'s type; ``NotImplementedError`` lists the supported configs."""
    import peftjax.tuners._builtin  # noqa: F401  (registers the built-in methods)

    for cls in type(config).__mro__:
        if cls in _TUNERS:
            return _stack_aware(_TUNERS[cls])
    supported = sorted(c.__name__ for c in _TUNERS)
    raise NotImplementedError(f"{type(config).__name__} is not supported yet; supported: {supported}")


def _stack_aware(tuner: Tuner) -> Tuner:
    """The tuner run on per-layer views of stacked layers (``scan_layers=True``; see ``models._scan``).

    Injection and loading stack their results again, so every layer's adapter gets the layer
    axis; the state dict is read from the views, so files carry PEFT's per-layer keys.
    """
    from peftjax.models._scan import stack_aware

    return dataclasses.replace(
        tuner,
        inject=stack_aware(tuner.inject, write=True),
        state_dict=stack_aware(tuner.state_dict, write=False),
        load_state_dict=stack_aware(tuner.load_state_dict, write=True),
    )
