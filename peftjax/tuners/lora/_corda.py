"""CorDA (PEFT's ``preprocess_corda`` and ``corda_init``): LoRA factors from the SVD of ``W C``.

``C`` is the covariance of a layer's inputs over calibration data. For ``W [out, in]`` PEFT
damps ``C`` until it inverts (``C + d * mean(diag C) * I``, ``d`` doubling from 0.01 while
``||C C^-1 - I|| >= 0.05``), takes ``U S Vh = svd(W C)`` and ``V = (Vh C^-1)^T``, and keeps the
``r`` largest triplets (``"ipm"``) or the ``r`` smallest (``"kpm"``). The adapter is then
``A = sqrt(S / s) V^T``, ``B = U sqrt(S / s)`` and the base keeps ``W - s B A``, so the adapted
model starts as the base model (as with PiSSA).

PEFT's hook sees one sample per call (``input.squeeze(0)``: it takes batches of one row), scales
it by ``1 / |max(x)|`` and adds ``x^T x``; the sum is divided by the number of samples. Here a
batch of several rows counts each row as one such sample, with the positions its
``attention_mask`` leaves out dropped, which is PEFT's result on the rows fed one at a time.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import CordaConfig, LoraConfig, match_modules
from peftjax.tuners.base import model_type, named_modules, resolve_config
from peftjax.nn._scan import has_stacked_layers, unstacked
from peftjax.tuners.lora._capture import forward_fn_dict, make_capture, refuse_decoder_layers

_HI = jax.lax.Precision.HIGHEST


class CordaEigens(NamedTuple):
    """One layer's cropped SVD (PEFT's ``CordaEigens``), torch orientation.

    Attributes:
      S_WC: ``[r]`` singular values of ``W C``.
      U_WC: ``[out, r]`` left singular vectors.
      V_WC: ``[in, r]`` right singular vectors times ``C^-1``.
    """

    S_WC: np.ndarray
    U_WC: np.ndarray
    V_WC: np.ndarray


class CordaCache(nnx.Variable):
    """A layer's :class:`CordaEigens`, left by :func:`preprocess_corda` for the injection to use."""


def corda_targets(model: nnx.Module, config: LoraConfig) -> list[str]:
    """The module paths ``config`` targets that are plain linear layers (PEFT: ``nn.Linear``/``Conv1D``)."""
    from peftjax.tuners.lora._layer import LoraLayer, lora_class_for

    config = resolve_config(model, config)
    modules = named_modules(model)
    names = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    out = []
    for n in names:
        cls = lora_class_for(modules[n])
        if cls is not None and cls.lora_kind == "linear" and not isinstance(modules[n], LoraLayer) and \
                isinstance(modules[n], nnx.Linear):
            out.append(n)
    return out


@functools.lru_cache(maxsize=None)  # one reducer per setting, so that the jitted capture is reused
def _row_covariance(fp16: bool):
    """The traced reducer: ``(sum over rows of (x_b / |max x_b|)^T (x_b / |max x_b|), rows)``."""

    def reduce(x, batch):
        if not fp16:
            x = x.astype(jnp.float32)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, d]
        mask = _mask(batch, x.shape[:2])
        peak = jnp.max(jnp.where(mask[..., None], x, -jnp.inf), axis=(1, 2))
        x = jnp.where(mask[..., None], x / jnp.abs(peak)[:, None, None].astype(x.dtype), 0)
        cov = jnp.einsum("btd,bte->de", x, x, precision=_HI, preferred_element_type=jnp.float32)
        return cov, jnp.sum(jnp.any(mask, axis=1))

    return reduce


def _mask(batch, shape):
    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
    if mask is None or math.prod(mask.shape) != math.prod(shape):  # a multiple-choice batch's: flattened
        return jnp.ones(shape, bool)
    return jnp.asarray(mask).reshape(shape) != 0


def covariances(model: nnx.Module, names: list[str], batches: Iterable, *, fp16: bool = False,
                forward_fn: Callable = forward_fn_dict) -> dict[str, np.ndarray]:
    """Each layer's mean per-sample input covariance over ``batches`` (PEFT's ``calib_cov_distribution``).

    Raises:
      ValueError: ``batches`` is empty, or a layer's inputs or covariance are not finite (named).
    """
    capture = make_capture(model, names, _row_covariance(fp16), forward_fn)
    return mean_covariances(capture, names, batches, "CorDA", "input", "non-padded position")


def mean_covariances(capture: Callable, names: list[str], batches: Iterable, method: str, side: str,
                     unit: str) -> dict[str, np.ndarray]:
    """Each layer's summed covariance over ``batches`` divided by its samples: ``capture`` (a
    :func:`make_capture` whose reducer returns ``(covariance, samples)`` per call) run on each batch.
    ``method``, ``side`` (``"input"``/``"output"``) and ``unit`` (what a sample is) name the errors.

    Raises:
      ValueError: ``batches`` is empty, a layer saw no sample, or its covariance is not finite (named).
    """
    prefix = f"preprocess_{method.lower()}"
    total = {n: 0.0 for n in names}
    count = {n: 0 for n in names}
    seen = False
    for batch in batches:
        seen = True
        for name, calls in capture(batch).items():
            for cov, samples in calls:
                total[name] = total[name] + cov
                count[name] += int(samples)
    if not seen:
        raise ValueError(f"{prefix}: `batches` is empty; {method} needs calibration data")
    out = {}
    for name in names:
        if count[name] == 0:
            raise ValueError(f"{prefix}: {name} was never called on a {unit} of `batches`")
        cov = np.asarray(total[name], np.float32) / count[name]
        if not np.isfinite(cov).all():
            raise ValueError(f"{prefix}: invalid value (nan or inf) in the {side} covariance of {name}, "
                             f"please check your {side} data.")
        out[name] = cov
    return out


@jax.jit
def _damped_inverse(cov, damp):
    fixed = cov + jnp.eye(cov.shape[0], dtype=cov.dtype) * jnp.mean(jnp.diag(cov)) * damp
    inv = jnp.linalg.inv(fixed)
    return fixed, inv, jnp.linalg.norm(jnp.matmul(fixed, inv, precision=_HI) - jnp.eye(cov.shape[0]))


@jax.jit
def _svd_wc(w, fixed, inv):
    u, s, vh = jnp.linalg.svd(jnp.matmul(w, fixed, precision=_HI), full_matrices=False)
    return u, s, jnp.matmul(vh, inv, precision=_HI).T


def eigens_for_layer(w_out_in: np.ndarray, cov: np.ndarray, r: int, method: str) -> CordaEigens:
    """PEFT's ``collect_eigens_for_layer`` then ``crop_corda_eigens`` for one ``W [out, in]``."""
    w = jnp.asarray(w_out_in, jnp.float32)
    cov = jnp.asarray(cov, jnp.float32)
    damp = 0.01
    while True:
        fixed, inv, err = _damped_inverse(cov, damp)
        if float(err) < 0.05:
            break
        damp *= 2
    u, s, v = (np.asarray(t) for t in _svd_wc(w, fixed, inv))
    keep = slice(None, r) if method == "ipm" else slice(-r, None)
    return CordaEigens(s[keep].copy(), u[:, keep].copy(), v[:, keep].copy())


def read_tensors(path: str, option: str) -> dict[str, np.ndarray]:
    """A safetensors file a data-driven init cached (CorDA's, LoRA-GA's); ``option`` names it in errors.

    Raises:
      ValueError: the file is not safetensors (PEFT's own caches are torch pickles).
    """
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 - a torch pickle of PEFT's, or anything else
        raise ValueError(f"{option}={path!r} is not a safetensors file ({e}); peftjax writes and reads "
                         "safetensors here (PEFT's own files are torch pickles: rebuild it with peftjax)") from e


def write_tensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def tensors_exist(path: str | None) -> bool:
    return path is not None and os.path.exists(path) and os.path.getsize(path) > 0


def calibrated(names: list[str], settings, option: str, eigens_type: type, batches: Iterable | None,
               eigens_for: Callable[[str, np.ndarray], tuple], method: str,
               covariances_of: Callable[[list], dict[str, np.ndarray]]) -> dict[str, tuple]:
    """Each layer's eigens for a covariance-based init (CorDA's, Astra's), with PEFT's two files:
    read from ``settings.cache_file`` when it exists; else from the covariances, read from
    ``settings.covariance_file`` when it exists or computed from ``batches`` (and written there),
    turned into eigens by ``eigens_for(name, covariance)`` and written to the cache file.

    Raises:
      ValueError: a file lacks a layer, or ``batches`` is ``None`` with neither file built.
    """
    fields = eigens_type._fields
    if tensors_exist(settings.cache_file):
        cache = read_tensors(settings.cache_file, f"{option}.cache_file")
        try:
            return {n: eigens_type(*(cache[f"{n}.eigens.{k}"] for k in fields)) for n in names}
        except KeyError as e:
            raise ValueError(f"{option}.cache_file={settings.cache_file!r} lacks {e.args[0]!r}; it was built "
                             "for other target modules") from None
    if tensors_exist(settings.covariance_file):
        stored = read_tensors(settings.covariance_file, f"{option}.covariance_file")
        missing = [n for n in names if n not in stored]
        if missing:
            raise ValueError(f"{option}.covariance_file={settings.covariance_file!r} lacks {missing[:5]}")
        covs = {n: stored[n] for n in names}
    else:
        if batches is None:
            raise ValueError(f"preprocess_{method.lower()}: `batches` must be given when the covariance file and "
                             "cache file aren't built.")
        covs = covariances_of(list(batches) if iter(batches) is batches else batches)
        if settings.covariance_file is not None:
            write_tensors(settings.covariance_file, covs)
    eigens = {}
    for n in names:
        if settings.verbose:
            print(f"{method}: collecting eigens of {n}")
        eigens[n] = eigens_for(n, covs[n])
    if settings.cache_file is not None:
        write_tensors(settings.cache_file,
                      {f"{n}.eigens.{k}": getattr(e, k) for n, e in eigens.items() for k in fields})
    return eigens


def preprocess_corda(
    model: nnx.Module,
    lora_config: LoraConfig,
    batches: Iterable | None = None,
    *,
    forward_fn: Callable = forward_fn_dict,
) -> dict[str, CordaEigens]:
    """CorDA's calibration (PEFT's ``preprocess_corda``): run before ``get_peft_model``.

    Collects each targeted linear layer's input covariance over ``batches`` (one jitted forward
    per batch), takes the SVD of ``W C`` and keeps ``r`` triplets per layer (``rank_pattern``
    applies). As in PEFT the result is left on the model's layers, where
    ``get_peft_model(model, lora_config)`` with ``init_lora_weights="corda"`` finds it, and it is
    also returned. ``corda_config.covariance_file`` / ``cache_file`` (safetensors) are read when
    they exist and written otherwise, so ``batches`` may be ``None`` when one exists. A
    ``scan_layers=True`` model runs its layers as a loop for the calibration and keeps the eigens
    stacked with its layers.

    Args:
      model: the plain NNX model (no adapters yet).
      lora_config: the ``LoraConfig`` to inject afterwards (``init_lora_weights="corda"``).
      batches: a re-iterable of model inputs, e.g. dicts with ``input_ids`` and
        ``attention_mask``; each row is one calibration sample (PEFT runs one row per call).
      forward_fn: ``(model, batch) -> anything``; the default is ``model(**batch)``.

    Returns:
      ``{module path: CordaEigens}`` in torch orientation.

    Raises:
      ValueError: no ``batches`` and no file to read; a config without ``corda_config``; a
        non-finite covariance; a file that is not peftjax's.

    Example:
      >>> config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="corda",
      ...                     corda_config=CordaConfig(corda_method="kpm"))  # doctest: +SKIP
      >>> peftjax.preprocess_corda(model, config, batches)  # doctest: +SKIP
      >>> peft_model = peftjax.get_peft_model(model, config)  # doctest: +SKIP
    """
    if not isinstance(lora_config, LoraConfig) or lora_config.corda_config is None:
        raise ValueError("preprocess_corda needs a LoraConfig with init_lora_weights='corda' (and so a "
                         "corda_config)")
    settings = CordaConfig.from_value(lora_config.corda_config)
    if has_stacked_layers(model):  # scan_layers=True: the inputs captured per layer (a loop), eigens stacked
        with unstacked(model, write=True):
            return preprocess_corda(model, lora_config, batches, forward_fn=forward_fn)
    config = resolve_config(model, lora_config)
    names = corda_targets(model, config)
    if not names:
        raise ValueError("preprocess_corda: target_modules matched no linear layer")
    refuse_decoder_layers(model, names, "CorDA")
    modules = named_modules(model)

    def eigens_for(n, cov):
        w = np.asarray(modules[n].kernel.get_value(), np.float32).T  # [out, in]
        return eigens_for_layer(w, cov, config.scaling_for(n)[0], settings.corda_method)

    eigens = calibrated(names, settings, "corda_config", CordaEigens, batches, eigens_for, "CorDA", lambda b: (
        covariances(model, names, b, fp16=settings.use_float16_for_covariance, forward_fn=forward_fn)))
    for n, e in eigens.items():
        modules[n].corda_eigens = CordaCache(e)
    return eigens


def take_eigens(module: nnx.Module, path: str) -> CordaEigens:
    """The eigens :func:`preprocess_corda` left on ``module`` (``ValueError`` naming ``path`` if none)."""
    cache = getattr(module, "corda_eigens", None)
    if cache is None:
        raise ValueError(f"{path}: init_lora_weights='corda' needs the layer's eigens; run "
                         "peftjax.preprocess_corda(model, lora_config, batches) first. A CorDA adapter saved after "
                         "training is not reloaded this way: save it with path_initial_model_for_weight_conversion "
                         "(a plain LoRA on the original model), or load it with init_lora_weights=True on the "
                         "residual base saved from peft_model.unload().")
    return CordaEigens(*(np.asarray(t) for t in cache.get_value()))


def check_eigens(eigens: CordaEigens, module: nnx.Module, r: int, path: str) -> None:
    """PEFT's sanity check: the eigens fit the layer and its rank (``ValueError`` naming ``path``)."""
    n_in, n_out = module.kernel.get_value().shape
    found = (eigens.U_WC.shape, eigens.S_WC.shape, eigens.V_WC.shape)
    if found != ((n_out, r), (r,), (n_in, r)):
        raise ValueError(f"{path}: the CorDA eigens have shapes U {found[0]}, S {found[1]}, V {found[2]}, expected "
                         f"{(n_out, r)}, {(r,)}, {(n_in, r)}; run preprocess_corda with the same model and LoRA config "
                         "(rank) as get_peft_model")
    if not all(np.isfinite(t).all() for t in eigens):
        raise ValueError(f"{path}: invalid value (nan or inf) in the CorDA eigens")


def corda_factors(w2: jax.Array, eigens: CordaEigens, scaling: float):
    """PEFT's ``corda_init`` for ``W = w2.T``: ``(A [in, r], B [r, out], residual [in, out])``, Flax layout."""
    s = jnp.asarray(eigens.S_WC, jnp.float32) / scaling
    a = jnp.asarray(eigens.V_WC, jnp.float32).T * jnp.sqrt(s)[:, None]  # [r, in]
    b = jnp.asarray(eigens.U_WC, jnp.float32) * jnp.sqrt(s)[None, :]  # [out, r]
    residual = w2.astype(jnp.float32).T - scaling * jnp.matmul(b, a, precision=_HI)
    return a.T, b.T, residual.T
