"""Astra (PEFT 0.22's ``preprocess_astra`` and ``astra_init``): LoRA from the eigenvectors of a
layer's output covariance.

For each targeted linear layer ``W [out, in]`` PEFT's hook takes every call's output over the
calibration data, flattened to ``[tokens, out]`` (padded positions included: PEFT's hook sees the
whole batch), divides it by ``|max(y)|`` and adds ``y^T y``; the sum divided by the number of calls
is the covariance ``C [out, out]``. Its eigenvectors ``V`` with the ``r`` largest eigenvalues (the
last ``r`` of ``eigh``'s ascending order) give ``B = V`` and ``A = V^T W``, and the base keeps
``W - s B A``, so the adapted model starts as the base model (as with PiSSA and CorDA). An
eigenvector's sign is the routine's choice: ``B A = V V^T W`` and the residual do not depend on it,
and training follows the same path with a column of ``B`` and its row of ``A`` both flipped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import AstraConfig, LoraConfig
from peftjax.nn._scan import has_stacked_layers, unstacked
from peftjax.tuners.base import named_modules, resolve_config
from peftjax.tuners.lora._capture import forward_fn_dict, make_capture, refuse_decoder_layers
from peftjax.tuners.lora._corda import calibrated, corda_targets, mean_covariances

_HI = jax.lax.Precision.HIGHEST


class AstraEigens(NamedTuple):
    """One layer's eigens (PEFT's ``AstraEigens``), torch orientation.

    Attributes:
      S: ``[out]`` every eigenvalue of the output covariance, ascending.
      V: ``[out, r]`` the eigenvectors of the ``r`` largest.
    """

    S: np.ndarray
    V: np.ndarray


class AstraCache(nnx.Variable):
    """A layer's :class:`AstraEigens`, left by :func:`preprocess_astra` for the injection to use."""


@functools.lru_cache(maxsize=None)  # one reducer per setting, so that the jitted capture is reused
def _call_covariance(fp16: bool):
    """The traced reducer: ``(y^T y, 1)`` of one call's output ``y [tokens, out]`` over ``|max y|``
    (PEFT counts calls)."""

    def reduce(y, batch):
        del batch  # PEFT's hook reads every position of the call
        if not fp16:
            y = y.astype(jnp.float32)
        y = y.reshape(-1, y.shape[-1])
        y = y / jnp.abs(jnp.max(y)).astype(y.dtype)
        return jnp.einsum("td,te->de", y, y, precision=_HI, preferred_element_type=jnp.float32), 1  # one sample

    return reduce


def output_covariances(model: nnx.Module, names: list[str], batches: Iterable, *, fp16: bool = False,
                       forward_fn: Callable = forward_fn_dict) -> dict[str, np.ndarray]:
    """Each layer's mean per-call output covariance over ``batches`` (PEFT's ``calib_cov_distribution``).

    Raises:
      ValueError: ``batches`` is empty, or a layer's covariance is not finite (named).
    """
    capture = make_capture(model, names, _call_covariance(fp16), forward_fn, outputs=True)
    return mean_covariances(capture, names, batches, "Astra", "output", "call")


def eigens_for_layer(cov: np.ndarray, r: int, out_features: int, path: str) -> AstraEigens:
    """PEFT's ``collect_eigens_for_layer`` then ``crop_astra_eigens`` for one layer."""
    if r > out_features:
        raise ValueError(f"{path}: Astra requires `r` <= out_features but got r={r} for a layer with "
                         f"{out_features} outputs (max usable r is {out_features}).")
    s, v = (np.asarray(t) for t in jnp.linalg.eigh(jnp.asarray(cov, jnp.float32)))
    return AstraEigens(s.copy(), v[:, out_features - r:].copy())


def preprocess_astra(
    model: nnx.Module,
    lora_config: LoraConfig,
    batches: Iterable | None = None,
    *,
    forward_fn: Callable = forward_fn_dict,
) -> dict[str, AstraEigens]:
    """Astra's calibration (PEFT's ``preprocess_astra``): run before ``get_peft_model``.

    Collects each targeted linear layer's output covariance over ``batches`` (one jitted forward
    per batch; each batch counts as one call, padded positions included, as PEFT's hook counts
    them), takes its eigenvectors and keeps those of the ``r`` largest eigenvalues per layer
    (``rank_pattern`` applies). As in PEFT the result is left on the model's layers, where
    ``get_peft_model(model, lora_config)`` with ``init_lora_weights="astra"`` finds it, and it is
    also returned. ``astra_config.covariance_file`` / ``cache_file`` (safetensors) are read when
    they exist and written otherwise, so ``batches`` may be ``None`` when one exists. A
    ``scan_layers=True`` model runs its layers as a loop for the calibration and keeps the eigens
    stacked with its layers.

    Args:
      model: the plain NNX model (no adapters yet).
      lora_config: the ``LoraConfig`` to inject afterwards (``init_lora_weights="astra"``).
      batches: a re-iterable of model inputs, e.g. dicts with ``input_ids`` and ``attention_mask``.
      forward_fn: ``(model, batch) -> anything``; the default is ``model(**batch)``.

    Returns:
      ``{module path: AstraEigens}`` in torch orientation.

    Raises:
      ValueError: no ``batches`` and no file to read; a config without ``astra_config``; a
        non-finite covariance; ``r`` above a layer's outputs; a file that is not peftjax's.

    Example:
      >>> config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="astra",
      ...                     astra_config=AstraConfig())  # doctest: +SKIP
      >>> peftjax.preprocess_astra(model, config, batches)  # doctest: +SKIP
      >>> peft_model = peftjax.get_peft_model(model, config)  # doctest: +SKIP
    """
    if not isinstance(lora_config, LoraConfig) or lora_config.astra_config is None:
        raise ValueError("preprocess_astra needs a LoraConfig with init_lora_weights='astra' (and so an "
                         "astra_config)")
    settings = AstraConfig.from_value(lora_config.astra_config)
    if has_stacked_layers(model):  # scan_layers=True: the outputs captured per layer (a loop), eigens stacked
        with unstacked(model, write=True):
            return preprocess_astra(model, lora_config, batches, forward_fn=forward_fn)
    config = resolve_config(model, lora_config)
    names = corda_targets(model, config)
    if not names:
        raise ValueError("preprocess_astra: target_modules matched no linear layer")
    refuse_decoder_layers(model, names, "Astra")
    modules = named_modules(model)

    def eigens_for(n, cov):
        return eigens_for_layer(cov, config.scaling_for(n)[0], modules[n].kernel.get_value().shape[1], n)

    eigens = calibrated(names, settings, "astra_config", AstraEigens, batches, eigens_for, "Astra", lambda b: (
        output_covariances(model, names, b, fp16=settings.use_float16_for_covariance, forward_fn=forward_fn)))
    for n, e in eigens.items():
        modules[n].astra_eigens = AstraCache(e)
    return eigens


def take_astra_eigens(module: nnx.Module, path: str) -> AstraEigens:
    """The eigens :func:`preprocess_astra` left on ``module`` (``ValueError`` naming ``path`` if none)."""
    cache = getattr(module, "astra_eigens", None)
    if cache is None:
        raise ValueError(f"{path}: init_lora_weights='astra' needs the layer's eigens; run "
                         "peftjax.preprocess_astra(model, lora_config, batches) first. An Astra adapter saved after "
                         "training is not reloaded this way: save it with path_initial_model_for_weight_conversion "
                         "(a plain LoRA on the original model), or load it with init_lora_weights=True on the "
                         "residual base saved from peft_model.unload().")
    return AstraEigens(*(np.asarray(t) for t in cache.get_value()))


def check_astra_eigens(eigens: AstraEigens, module: nnx.Module, r: int, path: str) -> None:
    """PEFT's sanity checks: the eigens fit the layer and its rank (``ValueError`` naming ``path``)."""
    out_features = module.kernel.get_value().shape[1]
    if not np.isfinite(eigens.V).all():
        raise ValueError(f"{path}: invalid value (nan or inf) in the Astra eigenvectors")
    if r > out_features:
        raise ValueError(f"{path}: Astra requires `r` <= out_features but got r={r} for a layer with "
                         f"{out_features} outputs (max usable r is {out_features}).")
    if eigens.V.shape != (out_features, r):
        raise ValueError(f"{path}: the Astra eigenvectors have shape {eigens.V.shape}, expected {(out_features, r)}; "
                         "run preprocess_astra with the same model and LoRA config (rank) as get_peft_model")


def astra_factors(w2: jax.Array, eigens: AstraEigens, scaling: float):
    """PEFT's ``astra_init`` for ``W = w2.T``: ``(A [in, r], B [r, out], residual [in, out])``, Flax layout.

    ``A`` and ``B`` are rounded to the weight's dtype, as PEFT stores them; the residual is computed
    from the float32 factors, as there.
    """
    w = w2.astype(jnp.float32).T  # [out, in]
    v = jnp.asarray(eigens.V, jnp.float32)  # [out, r]
    a = jnp.matmul(v.T, w, precision=_HI)  # [r, in]
    residual = w - scaling * jnp.matmul(v, a, precision=_HI)
    a, b = (t.astype(w2.dtype).astype(jnp.float32) for t in (a, v))
    return a.T, b.T, residual.T
