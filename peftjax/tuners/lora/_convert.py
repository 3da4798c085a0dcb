"""PiSSA / OLoRA / CorDA / Astra / LoRA-GA to plain LoRA on save: PEFT's ``path_initial_model_for_weight_conversion``.

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
                         "converts PiSSA, OLoRA, CorDA, Astra and LoRA-GA adapters (and no-op inits: True, 'gaussian', "
                         "'orthogonal')")
    if config.use_dora or config.lora_bias:
        raise ValueError("path_initial_model_for_weight_conversion: DoRA's magnitude and lora_bias are relative to "
                         "the rewritten base and have no rank-2r LoRA equivalent on the original one")
    initial_dir = Path(initial_dir)
    initial = read_adapter_weights(initial_dir)
    # PEFT overwrites the initial adapter's config so that loading it keeps the base as it is
    # (the eva/corda/astra settings go too: they would only be warned about and ignored with init True)
    dataclasses.replace(config, init_lora_weights=True, inference_mode=True, eva_config=None,
                        corda_config=None, astra_config=None).save_pretrained(initial_dir)
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
        eva_config=None, corda_config=None, astra_config=None,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: 2 * v for k, v in config.alpha_pattern.items()},
        loftq_config={},
    )
    return converted, out


# ------------------------------------------------------------------ any additive method -> LoRA

PEFT_PREFIX = "base_model.model."


def _delta_out_in(layer, name: str) -> np.ndarray:
    """``ΔW`` of adapter ``name`` on ``layer`` in torch's ``[out, in]`` orientation (float32), or
    ``None`` where the layer's method is not a weight delta a LoRA can carry."""
    from peftjax.tuners.base import AdditiveLayer
    from peftjax.tuners.fourierft import FourierFTLayer
    from peftjax.tuners.lora import LoraLayer
    from peftjax.tuners.lycoris import LycorisLayer
    from peftjax.tuners.miss import MissLayer
    from peftjax.tuners.shira import ShiraLayer
    from peftjax.tuners.supertuning import SupertuningLayer

    if isinstance(layer, LoraLayer):
        if layer.lora_kind != "linear" or layer.spec(name).use_dora:
            return None  # embeddings/convolutions, and DoRA (not a fixed delta): PEFT converts neither
        return np.asarray(layer.delta_weight(name), np.float32).T  # kernel layout [in, out]
    if isinstance(layer, ShiraLayer | SupertuningLayer):  # sparse updates: PEFT converts neither
        return None
    if isinstance(layer, AdditiveLayer):  # AdaLoRA, VeRA, DeLoRA, C3A, GraLoRA, RandLoRA, VB-LoRA
        return np.asarray(layer.kernel_delta(name), np.float32).T
    if isinstance(layer, (LycorisLayer, FourierFTLayer, MissLayer)):
        return np.asarray(layer.delta_weight(name), np.float32)  # already [out, in]
    if _merges_to_a_delta(layer):  # OFT, BOFT, DEFT: W' - W from the merged weight, as PEFT 0.22 takes it
        return _merged_minus_base(layer, name)
    return None


def _merges_to_a_delta(layer) -> bool:
    """Whether ``layer``'s adapter merges into its linear kernel alone (OFT's, BOFT's, DEFT's
    multiplicative updates), so that ``W' - W`` is the update a LoRA carries."""
    from peftjax.tuners.boft import BOFTLayer
    from peftjax.tuners.deft import DeftLayer
    from peftjax.tuners.oft import OFTLayer

    return isinstance(layer, BOFTLayer | DeftLayer) or (isinstance(layer, OFTLayer) and layer.oft_kind != "embed")


def _merged_minus_base(layer, name: str) -> np.ndarray:
    """``W' - W`` of adapter ``name`` in ``[out, in]``, float32: the layer merged, read and put back
    as it was (its weights restored, nothing marked merged).

    Raises:
      ValueError: an adapter is merged into the layer (the delta would depend on it), as PEFT 0.22.
    """
    from peftjax.tuners.base._model import _param_values, _restore

    if layer.merged_adapter_names():
        raise ValueError(f"convert_to_lora: {layer.adapter_path} has merged adapters "
                         f"{list(layer.merged_adapter_names())}; unmerge them first")
    before = [(layer, _param_values(layer), layer.merged_adapter_names())]
    base = np.asarray(layer.kernel.get_value(), np.float32)
    try:
        layer.merge_adapter(name)
        merged = np.asarray(layer.kernel.get_value(), np.float32)
    finally:
        _restore(before)
    return (merged - base).T


def _rank_for(singular: np.ndarray, rank: int | float) -> int:
    """``rank`` itself, or (a float in (0, 1]) the fewest singular values holding that share of the energy."""
    if isinstance(rank, int):
        return rank
    energy = np.cumsum(singular.astype(np.float64) ** 2)
    return int(np.searchsorted(energy, rank * energy[-1])) + 1


def convert_to_lora(peft_model, rank: int | float, adapter_name: str = "default") -> tuple[LoraConfig, dict, dict]:
    """Any additive adapter (LoRA, AdaLoRA, LoHa, LoKr, VeRA, FourierFT, MiSS, DeLoRA, C3A, GraLoRA,
    RandLoRA, VB-LoRA) as a plain LoRA, by truncated SVD of each ``ΔW``.

    PEFT's ``convert_to_lora``: the scaling is folded into the factors (``lora_alpha == r``), so
    the file loads as an ordinary LoRA here and in PEFT, where it serves mixed batches, hot-swaps
    and runs on the fastest path. ``modules_to_save`` copies are carried over unchanged. MiSS's
    balance and mini updates have rank ``r`` at most, and PEFT writes their exact factors at that
    rank whatever ``rank`` says; here they go through the SVD like the others, exact from
    ``rank >= r`` on (the same product, other factors).

    Args:
      peft_model: a ``PeftModel`` holding adapter ``adapter_name``.
      rank: the LoRA rank of every layer (an ``int``), or a float in ``(0, 1]``: per layer, the fewest
        singular values whose squares hold that share of ``||ΔW||²`` (ranks then go to ``rank_pattern``).
      adapter_name: the adapter to convert.

    Returns:
      ``(config, tensors, errors)``: the ``LoraConfig`` and PEFT state dict to save, and per layer the
      relative reconstruction error ``||ΔW - B A|| / ||ΔW||`` (Frobenius).

    Raises:
      TypeError: a layer whose method is not a weight delta (IA³, OFT, LN tuning, bottleneck, DoRA,
        LoRA on embeddings; every such module named), or no adapter layer at all.
      ValueError: a bad ``rank``, or one larger than a layer allows.

    >>> config, tensors, errors = peftjax.convert_to_lora(loha_model, rank=8)  # doctest: +SKIP
    """
    from peftjax.tuners.base import AdapterLayer, SavedModule, named_modules
    from peftjax.models._modeling import hf_state_dict

    if isinstance(rank, bool) or not isinstance(rank, int | float):
        raise TypeError(f"convert_to_lora: rank must be an int or a float threshold, got {rank!r}")
    if isinstance(rank, float) and not 0 < rank <= 1:
        raise ValueError(f"convert_to_lora: a float rank is an energy threshold in (0, 1], got {rank}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"convert_to_lora: rank must be at least 1, got {rank}")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"convert_to_lora: no adapter {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}")
    source = peft_model.peft_config[adapter_name]
    if source.is_prompt_learning:
        raise TypeError(f"convert_to_lora: {source.peft_type} changes the inputs, not weights; it has no LoRA form")
    modules = named_modules(peft_model.base_model)
    layers = {n: m for n, m in modules.items()
              if isinstance(m, AdapterLayer) and not isinstance(m, SavedModule) and adapter_name in m.adapter_names()}
    deltas, refused = {}, []
    for name, layer in layers.items():
        delta = _delta_out_in(layer, adapter_name)
        if delta is None:
            refused.append(f"{name} ({type(layer).__name__})")
        else:
            deltas[name] = delta
    if refused:
        raise TypeError(f"convert_to_lora: these layers' updates are not a weight delta a LoRA can carry: "
                        f"{', '.join(refused[:10])}")
    if not deltas:
        raise TypeError(f"convert_to_lora: adapter {adapter_name!r} has no layer to convert")
    tensors, errors, ranks = {}, {}, {}
    for name, delta in deltas.items():
        u, s, vh = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
        k = _rank_for(s, rank)
        if k > s.shape[0]:
            raise ValueError(f"convert_to_lora: rank {k} is larger than {name}'s ΔW {list(delta.shape)} allows "
                             f"({s.shape[0]})")
        b, a = (u[:, :k] * s[:k]).astype(np.float32), vh[:k].astype(np.float32)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = b
        norm = np.linalg.norm(delta)
        errors[name] = float(np.linalg.norm(delta - b @ a) / norm) if norm else 0.0
        ranks[name] = k
    # modules_to_save copies travel as they are
    for name, module in modules.items():  # saved as the plain module's keys, as PEFT saves them
        if isinstance(module, SavedModule) and adapter_name in module.adapter_names():
            for key, value in hf_state_dict(module.modules_to_save[adapter_name]).items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = value
    fixed = isinstance(rank, int)
    r = rank if fixed else max(ranks.values())
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(deltas),
        rank_pattern={} if fixed else {n: k for n, k in ranks.items() if k != r},
        alpha_pattern={} if fixed else {n: k for n, k in ranks.items() if k != r},
        modules_to_save=list(source.modules_to_save) if source.modules_to_save else None,
        task_type=source.task_type, base_model_name_or_path=source.base_model_name_or_path,
        inference_mode=True,
    )
    return config, tensors, errors


def save_as_lora(path: str | os.PathLike, peft_model, rank: int | float, adapter_name: str = "default") -> dict:
    """:func:`convert_to_lora` written to ``path`` as PEFT's two files; returns the per-layer
    relative reconstruction errors."""
    from peftjax.io._adapter import write_adapter

    config, tensors, errors = convert_to_lora(peft_model, rank, adapter_name)
    write_adapter(path, config, tensors)
    return errors
