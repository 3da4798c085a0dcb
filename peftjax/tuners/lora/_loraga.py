"""LoRA-GA (PEFT's ``preprocess_loraga`` and ``lora_ga_init``): LoRA factors from the SVD of a
layer's weight gradient over some data.

:func:`preprocess_loraga` averages each targeted linear layer's weight gradient over the batches
(one jitted backward pass per batch, with respect to those weights only) and leaves it on the
layer; ``get_peft_model`` with ``init_lora_weights="lora_ga"`` then takes the top ``2r`` singular
triplets of it (a randomized SVD, ``4r`` wide with 4 subspace iterations, as PEFT's
``torch.svd_lowrank``), splits them between ``A`` and ``B`` (``lora_ga_config.direction``),
scales them (``lora_ga_config.scale``) and leaves ``W - s B A`` as the base, so the adapted model
starts as the base model and its first update follows full fine-tuning's direction.

PEFT runs a callback that calls ``backward`` and divides each layer's accumulated gradient by the
number of backward passes it took; here each batch is one pass, its loss ``loss_fn(model, batch)``
(the model's own loss by default), and the mean is accumulated in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import LoraConfig, LoraGAConfig, match_modules
from peftjax.nn._dropout import dropout_key, own_loss
from peftjax.nn._scan import has_stacked_layers, unstacked
from peftjax.tuners.base import model_type, named_modules, resolve_config
from peftjax.tuners.lora._corda import corda_targets, read_tensors, tensors_exist, write_tensors


class LoraGaGrad(nnx.Variable):
    """A layer's averaged weight gradient ``[out, in]``, left by :func:`preprocess_loraga` for the
    injection to use (PEFT's ``_peft_loraga_grad``)."""


class LoraGaInit(NamedTuple):
    """What one layer's ``lora_ga`` init takes: its gradient ``[out, in]`` and the settings."""

    loraga_grad: np.ndarray
    settings: LoraGAConfig


def preprocess_loraga(
    model: nnx.Module,
    lora_config: LoraConfig,
    batches: Iterable | None = None,
    *,
    loss_fn: Callable[[nnx.Module, Any], jax.Array] = own_loss,
    cache_file: str | None = None,
    key: jax.Array | None = None,
) -> dict[str, np.ndarray]:
    """LoRA-GA's gradient estimate (PEFT's ``preprocess_loraga``): run before ``get_peft_model``.

    Each targeted linear layer's weight gradient of ``loss_fn`` is averaged over ``batches`` and
    left on the layer, where ``get_peft_model(model, lora_config)`` with
    ``init_lora_weights="lora_ga"`` finds it; it is also returned. Only those weights are
    differentiated. PEFT estimates in ``model.train()``, so its gradients carry the model's
    dropout; here dropout runs only with a ``key`` (batch ``i`` under ``fold_in(key, i)``), and
    without one the estimate is deterministic. ``cache_file`` (safetensors, keys
    ``<module>._peft_loraga_grad``, each ``[out, in]``) is read when it exists and written
    otherwise, so ``batches`` may be ``None`` when it exists. A ``scan_layers=True`` model is
    differentiated layer by layer (a loop, once) and keeps its gradients stacked with its layers.

    Args:
      model: the plain NNX model (no adapters yet).
      lora_config: the ``LoraConfig`` to inject afterwards (``init_lora_weights="lora_ga"`` and a
        ``lora_ga_config``).
      batches: an iterable of training batches (dicts with ``input_ids``, ``attention_mask``,
        ``labels``, ...), each one backward pass.
      loss_fn: ``(model, batch) -> scalar``; the model's own loss by default.
      key: drives dropout (the model's own with the default loss, and any ``peftjax`` dropout
        ``loss_fn`` applies); ``None``: no dropout.
      cache_file: where the gradients are kept between runs. PEFT writes a torch pickle there;
        peftjax reads and writes safetensors and refuses PEFT's file, saying so.

    Returns:
      ``{module path: gradient [out, in]}`` (float32, torch's orientation).

    Raises:
      ValueError: a config without ``lora_ga_config``; no linear layer targeted; a quantized
        target (named); no ``batches`` and no cache; an empty ``batches``; a non-finite gradient
        (named); a cache that lacks a target.

    Example:
      >>> config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
      ...                     lora_ga_config=LoraGAConfig())  # doctest: +SKIP
      >>> peftjax.preprocess_loraga(model, config, batches)  # doctest: +SKIP
      >>> peft_model = peftjax.get_peft_model(model, config)  # doctest: +SKIP
    """
    from peftjax.quantization import QuantizedLinear

    if not isinstance(lora_config, LoraConfig) or lora_config.lora_ga_config is None:
        raise ValueError("If you want to use LoRA-GA, please initialize the LoraConfig with "
                         "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...).")
    if has_stacked_layers(model):  # scan_layers=True: per layer (a plain loop), the gradients stacked with them
        with unstacked(model, write=True):
            return preprocess_loraga(model, lora_config, batches, loss_fn=loss_fn, cache_file=cache_file, key=key)
    config = resolve_config(model, lora_config)
    modules = named_modules(model)
    quantized = [n for n in _matched(model, config) if isinstance(modules[n], QuantizedLinear)]
    if quantized:
        raise ValueError(f"LoRA-GA does not support quantized models. Found quantized module: '{quantized[0]}'. "
                         "LoRA-GA requires full-precision gradients during preprocessing.")
    names = corda_targets(model, config)
    if not names:
        raise ValueError("No supported layers found for LoRA-GA initialization. LoRA-GA only supports nn.Linear and "
                         "Conv1D layers (nnx.Linear here). Please ensure your model contains at least one of these "
                         "layer types in target_modules.")
    if tensors_exist(cache_file):
        stored = read_tensors(cache_file, "preprocess_loraga: cache_file")
        missing = [n for n in names if f"{n}._peft_loraga_grad" not in stored]
        if missing:
            raise ValueError(f"preprocess_loraga: cache_file={cache_file!r} lacks {missing[:5]}; it was built for "
                             "other target modules")
        grads = {n: np.asarray(stored[f"{n}._peft_loraga_grad"], np.float32) for n in names}
    else:
        if batches is None:
            raise ValueError("preprocess_loraga: `batches` must be given when there is no cache_file to read")
        grads = estimate_gradients(model, names, batches, loss_fn, key)
        if cache_file is not None:
            write_tensors(cache_file, {f"{n}._peft_loraga_grad": g for n, g in grads.items()})
    for n, g in grads.items():
        if g.shape != modules[n].kernel.get_value().shape[::-1]:
            raise ValueError(f"preprocess_loraga: the gradient of {n} has shape {g.shape}, its weight "
                             f"{modules[n].kernel.get_value().shape[::-1]} ([out, in]); was cache_file built for "
                             "another model?")
        modules[n].loraga_grad = LoraGaGrad(g)
    return grads


def _matched(model, config) -> list[str]:
    return match_modules(config, [n for n in named_modules(model) if n], model_type=model_type(model))


def estimate_gradients(model: nnx.Module, names: list[str], batches: Iterable, loss_fn: Callable,
                       key: jax.Array | None = None) -> dict:
    """Each layer's mean weight gradient ``[out, in]`` over ``batches`` (one backward pass each;
    batch ``i`` under the dropout key ``fold_in(key, i)``, none without ``key``)."""
    targets = set(names)

    def is_target(path, value) -> bool:
        return path[-1] == "kernel" and ".".join(str(p) for p in path[:-1]) in targets

    graphdef, weights, rest = nnx.split(model, is_target, ...)
    grad_of = _grad_fn(graphdef, loss_fn)
    total, count = None, 0
    for batch in batches:
        g = grad_of(weights, rest, batch, None if key is None else jax.random.fold_in(key, count))
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        count += 1
    if count == 0:
        raise ValueError("preprocess_loraga: `batches` is empty; LoRA-GA needs data to estimate gradients")
    flat = {".".join(str(p) for p in path[:-1]): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(total)}
    out = {}
    for n in names:
        g = flat[n].T / count  # [out, in]
        if not np.isfinite(g).all():
            raise ValueError(f"preprocess_loraga: invalid value (nan or inf) in the gradient of {n}")
        out[n] = g
    return out


def _grad_fn(graphdef, loss_fn):
    @jax.jit
    def grad_of(weights, rest, batch, key):
        def loss(w):
            with dropout_key(key):
                return loss_fn(nnx.merge(graphdef, w, rest), batch)

        grads = jax.grad(loss)(weights)
        return jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    return grad_of


def take_grad(module: nnx.Module, path: str, settings: Any) -> LoraGaInit:
    """The gradient :func:`preprocess_loraga` left on ``module`` and the settings (the injection
    deletes it once the adapter is built, as PEFT's layer does).

    Raises:
      ValueError: none was left (PEFT falls back to the default init here and keeps the base as
        it is; a LoRA-GA adapter that silently is not one is refused instead), or ``settings`` is
        ``None`` (PEFT's message).
    """
    cache = getattr(module, "loraga_grad", None)
    if cache is None:
        raise ValueError(f"{path}: init_lora_weights='lora_ga' needs the layer's gradient; run "
                         "peftjax.preprocess_loraga(model, lora_config, batches) first. A LoRA-GA adapter saved after "
                         "training is not reloaded this way: save it with path_initial_model_for_weight_conversion "
                         "(a plain LoRA on the original model), or load it on the residual base saved from "
                         "peft_model.unload().")
    if settings is None:
        raise ValueError("lora_ga_config must be provided when init_lora_weights='lora_ga'. Please pass "
                         "lora_ga_config=LoraGAConfig(...) to LoraConfig.")
    return LoraGaInit(np.asarray(cache.get_value(), np.float32), LoraGAConfig.from_value(settings))
