"""Putting LoHa into an NNX model (the shared LyCORIS targeting; the math is in ``_layer.py``)."""

from __future__ import annotations

import jax
from flax import nnx

from peftjax.config import LoHaConfig
from peftjax.tuners.loha._layer import LoHaLinear
from peftjax.tuners.lycoris import inject_lycoris


def inject_loha(
    model: nnx.Module, config: LoHaConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> LoHaConfig:
    """Adds LoHa adapter ``adapter_name`` to every ``nnx.Linear`` that ``config`` targets, in place.

    Args:
      model: any NNX module; the targets must be ``nnx.Linear`` layers whose torch twin is
        ``nn.Linear`` (HF PEFT refuses GPT-2's ``Conv1D`` and embeddings for LoHa; so does this).
      config: the LoHa settings; ``target_modules=None`` is PEFT's default for the model type
        (LoRA's table); ``rank_pattern`` / ``alpha_pattern`` set ``r`` / ``alpha`` per module.
      adapter_name: the name under which the factors are stored (``hada_w1_a/<name>``, ...).
      key: the init key (a fixed default keeps it deterministic).

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest names are listed).
      TypeError: a target is not an adaptable linear layer, or carries another method's adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_loha(model, peftjax.LoHaConfig(r=2, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> model.model.layers[0].self_attn.q_proj.hada_w1_a["default"].shape  # doctest: +SKIP
    (32, 2)
    """
    return inject_lycoris(model, config, adapter_name=adapter_name, key=key, layer_class=LoHaLinear,
                          prefix="LoHa", add="add_loha")
