"""PiSSA / OLoRA / LoftQ to plain LoRA on save: PEFT's ``path_initial_model_for_weight_conversion``.

A decomposing init trains against a rewritten base (``W_res``, or LoftQ's ``Q``) that nobody else
has. With the adapter's initial factors ``A0, B0`` (saved before training) the trained delta on
the *original* weight is ``s * (B A - B0 A0) = s * [B | -B0] [A ; A0]``: a LoRA of rank ``2r``
with ``lora_alpha`` doubled (rsLoRA: times sqrt 2) so the scaling is unchanged. That adapter
loads on the untouched base model, here and in HF PEFT.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from peftjax.config import LoraConfig
from peftjax.io._adapter import read_adapter_weights


def convert_to_plain_lora(
    config: LoraConfig, tensors: Mapping[str, np.ndarray], initial_dir: str | os.PathLike
) -> tuple[LoraConfig, dict[str, np.ndarray]]:
    """The rank-``2r`` LoRA equal to the trained decomposed one on the original base weights.

    Args:
      config: the trained adapter's config.
      tensors: its PEFT state dict (torch layout: ``lora_A [r, in]``, ``lora_B [out, r]``).
      initial_dir: where the same adapter was saved right after ``get_peft_model``, before training.
        Its ``adapter_config.json`` is rewritten with ``init_lora_weights=True``, as PEFT does, so
        that loading it never decomposes the base again.

    Returns:
      ``(config, tensors)`` to save: ranks and alphas doubled, ``init_lora_weights=True``.

    Raises:
      ValueError: a config the conversion cannot express (DoRA, ``lora_bias``, rsLoRA with rank or
        alpha patterns), or an initial adapter whose keys or shapes differ (named).
    """
    if not isinstance(config, LoraConfig):
        raise ValueError(f"path_initial_model_for_weight_conversion converts LoRA adapters; this one is "
                         f"{config.peft_type}")
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError("Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported "
                         "when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`.")
    init = config.init_lora_weights
    if init is False or init == "loftq":
        # the conversion assumes base = W - s * B0 @ A0: true for PiSSA/OLoRA, and B0 @ A0 = 0 for the
        # no-op inits; LoftQ's base is a quantization and False starts from a non-zero delta
        raise ValueError(f"path_initial_model_for_weight_conversion: init_lora_weights={init!r} does not leave the "
                         "base at W - s * B0 @ A0, so the rank-2r LoRA would not equal the trained adapter; it "
                         "converts PiSSA and OLoRA adapters (and no-op inits: True, 'gaussian', 'orthogonal')")
    if config.use_dora or config.lora_bias:
        raise ValueError("path_initial_model_for_weight_conversion: DoRA's magnitude and lora_bias are relative to "
                         "the rewritten base and have no rank-2r LoRA equivalent on the original one")
    initial_dir = Path(initial_dir)
    initial = read_adapter_weights(initial_dir)
    # PEFT overwrites the initial adapter's config so that loading it keeps the base as it is
    dataclasses.replace(config, init_lora_weights=True, inference_mode=True).save_pretrained(initial_dir)
    factors = [k for k in tensors if ".lora_A." in k or ".lora_B." in k]
    missing = sorted(k for k in factors if k not in initial)
    if missing:
        raise ValueError(f"{initial_dir}: the initial adapter lacks {missing[:5]} (of {len(missing)}); it must be the "
                         "same adapter saved before training")
    bad = [f"{k}: {initial[k].shape} vs {tensors[k].shape}" for k in factors if initial[k].shape != tensors[k].shape]
    if bad:
        raise ValueError(f"{initial_dir}: initial factors' shapes differ from the trained ones: {bad[:5]}")
    out = dict(tensors)
    for k in factors:
        trained, start = np.asarray(tensors[k]), np.asarray(initial[k]).astype(np.asarray(tensors[k]).dtype)
        out[k] = np.concatenate([trained, start], axis=0) if ".lora_A." in k else np.concatenate([trained, -start],
                                                                                                  axis=1)
    factor = math.sqrt(2) if config.use_rslora else 2
    converted = dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        loftq_config={},
    )
    return converted, out
