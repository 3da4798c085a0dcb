"""Which code handles which adapter config: one ``Tuner`` record per PEFT method.

``PeftModel`` is method-agnostic: it asks :func:`tuner_for` how to inject a config's adapter, how
to turn it into PEFT's state dict and back, and (for prompt-learning methods, which change the
inputs rather than layers) how to run the forward pass and generation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax

from peftjax.config import PeftConfig
from peftjax.nn._keys import seed_key


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

    @classmethod
    def for_layers(cls, config_class: type, *, inject: Callable, layer_type: type) -> Tuner:
        """A layer method's tuner: its file layout is its layers' ``peft_layout``, walked by the base tuner."""
        from peftjax.tuners.base import layer_state_dict, load_layer_state_dict

        return cls(
            config_class,
            inject=inject,
            state_dict=functools.partial(layer_state_dict, layer_type=layer_type),
            load_state_dict=functools.partial(load_layer_state_dict, layer_type=layer_type),
        )


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
    """The tuner run on per-layer views of stacked layers (``scan_layers=True``; see ``nn._scan``).

    Injection and loading stack their results again, so every layer's adapter gets the layer
    axis; the state dict is read from the views, so files carry PEFT's per-layer keys.
    """
    from peftjax.nn._scan import stack_aware

    return dataclasses.replace(
        tuner,
        inject=_checked(stack_aware(tuner.inject, write=True)),
        state_dict=stack_aware(tuner.state_dict, write=False),
        load_state_dict=stack_aware(tuner.load_state_dict, write=True),
    )


def _checked(inject: Callable) -> Callable:
    """``inject`` after the checks every method shares, made before the model changes: a refused
    ``modules_to_save`` entry leaves the model as it was."""

    @functools.wraps(inject)
    def run(model, config, **kwargs):
        from peftjax.nn._scan import has_stacked_layers
        from peftjax.tuners.base import check_modules_to_save

        check_modules_to_save(model, config)
        if getattr(config, "layer_replication", None) and has_stacked_layers(model):  # before the layers unstack
            raise ValueError("layer_replication needs the layers as a list: load the model with scan_layers=False")
        return inject(model, config, **kwargs)

    return run


def inject_adapter_in_model(
    peft_config: PeftConfig, model, adapter_name: str = "default", *, key: jax.Array | None = None
):
    """Adds ``peft_config``'s adapter to a plain NNX ``model`` in place, for any method; PEFT's function.

    Unlike :func:`peftjax.get_peft_model`, no ``PeftModel`` wraps the result: the model's own
    call runs the adapter, and ``peftjax.split`` / ``peftjax.make_train_step`` train it.

    Args:
      peft_config: a ``LoraConfig``, ``IA3Config``, ``VeraConfig``, ``FourierFTConfig``, ``LNTuningConfig``,
        ``TrainableTokensConfig``, ``BottleneckConfig``, ``AdaptionPromptConfig`` or prompt-learning config.
      model: the NNX model.
      adapter_name: the name the weights are stored under.
      key: the init key; by default the one ``get_peft_model`` uses, so both give the same adapter.

    Returns:
      ``model``, now carrying the adapter (frozen if ``peft_config.inference_mode``).

    Raises:
      NotImplementedError: the config's method is not supported (lists the supported ones).

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import peftjax
      >>> model = nnx.Module()
      >>> model.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> model = peftjax.inject_adapter_in_model(peftjax.LoraConfig(r=2, target_modules=["proj"]), model)
      >>> model.proj.lora_A["default"].shape, model.proj(jnp.ones((5, 4))).shape
      ((4, 2), (5, 3))
    """
    from peftjax.tuners.base import set_adapter_trainable, validate_adapter_name

    validate_adapter_name(adapter_name)
    key = default_key(adapter_name) if key is None else key
    tuner_for(peft_config).inject(model, peft_config, adapter_name=adapter_name, key=key)
    if peft_config.inference_mode:
        set_adapter_trainable(model, adapter_name, False)
    return model


def default_key(adapter_name: str):
    """The init key when none is given: fixed, so injection is deterministic, and distinct per adapter
    name (the threefry key of seed ``n``, ``n`` the sum of the name's bytes; made without compiling)."""
    return seed_key(sum(adapter_name.encode()))
