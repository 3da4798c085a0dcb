"""Putting LoKr into an NNX model (the shared LyCORIS targeting; the math is in ``_layer.py``)."""

from __future__ import annotations

import jax
from flax import nnx

from peftjax.config import LoKrConfig
from peftjax.tuners.lokr._layer import LoKrLinear
from peftjax.tuners.lycoris import inject_lycoris


def inject_lokr(
    model: nnx.Module, config: LoKrConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> LoKrConfig:
    """Adds LoKr adapter ``adapter_name`` to every ``nnx.Linear`` that ``config`` targets, in place.

    Args:
      model: any NNX module; the targets must be ``nnx.Linear`` layers whose torch twin is
        ``nn.Linear`` (HF PEFT refuses GPT-2's ``Conv1D`` and embeddings for LoKr; so does this).
      config: the LoKr settings; ``target_modules=None`` is PEFT's default for the model type
        (LoRA's table); ``rank_pattern`` / ``alpha_pattern`` set ``r`` / ``alpha`` per module.
      adapter_name: the name under which the factors are stored (``lokr_w1/<name>``, ...).
      key: the init key (a fixed default keeps it deterministic).

    Returns:
      The resolved config.

    Raises:
      ValueError: nothing matches ``target_modules`` (the closest names are listed).
      TypeError: a target is not an adaptable linear layer, or carries another method's adapter.

    >>> import peftjax  # doctest: +SKIP
    >>> inject_lokr(model, peftjax.LoKrConfig(r=2, target_modules=["q_proj"]))  # doctest: +SKIP
    >>> q = model.model.layers[0].self_attn.q_proj  # 32 -> 32: factors [4, 4] and [8, 8]  # doctest: +SKIP
    >>> q.lokr_w1["default"].shape, q.lokr_w2_a["default"].shape  # doctest: +SKIP
    ((4, 4), (8, 2))
    """
    return inject_lycoris(model, config, adapter_name=adapter_name, key=key, layer_class=LoKrLinear,
                          prefix="LoKr", add="add_lokr")
