"""EVA (PEFT's ``get_eva_state_dict`` / ``initialize_lora_eva_weights``): ``lora_A`` from activations.

Explained Variance Adaptation fits an incremental PCA to each target's inputs over calibration
batches, until the top components stop moving (cosine similarity ``>= tau`` between consecutive
batches), then gives each layer ``lora_A`` = its top right-singular vectors, redistributing the
total rank by explained variance (a layer gets at most ``round(r * rho)``), with ``lora_B`` zero.

The algorithm is PEFT 0.22.0's step for step, so the ranks and components match it: the
incremental PCA (scikit-learn's, as PEFT ports it: float64 statistics, the first batch's SVD in
float32 and the later ones in float64), its randomized SVD (``torch.svd_lowrank`` with ``q = 2k``,
4 subspace iterations, the test matrix drawn as torch draws it after ``manual_seed(42)``), the
sign rule (``svd_flip`` on the components), the check for layers that see the same input (one
PCA serves them), the loop over the batches (repeated until every layer converges) and the rank
budget. The forward passes are jitted (``_capture``); the PCA runs on the host in NumPy.

Where peftjax departs: with ``whiten=True`` and layers sharing an input PEFT divides the shared
components in place once per layer; here each layer's components are whitened once.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import numpy as np
from flax import nnx

from peftjax.config import EvaConfig, LoraConfig, get_pattern_key, match_modules
from peftjax.nn._scan import has_stacked_layers, unstacked
from peftjax.tuners.base import model_type, named_modules, resolve_config
from peftjax.tuners.lora._capture import encoder_decoder, forward_fn_dict, make_capture, refuse_decoder_layers

LOWRANK_SEED = 42  # PEFT's IncrementalPCA(lowrank=True, lowrank_seed=42)
LOWRANK_NITER = 4
MIN_TARGET_MODULES_FOR_OPTIMIZATION = 20  # PEFT's constant: longer target lists are condensed to suffixes


# ------------------------------------------------------------------------------ torch's randn


def torch_randn(seed: int, shape: tuple[int, int], dtype) -> np.ndarray:
    """``torch.manual_seed(seed); torch.randn(*shape, dtype=dtype)`` on the CPU (``numel >= 16``).

    torch fills the tensor with uniforms (float32: 24 bits of one 32-bit draw; float64: 53 bits
    of two) from its MT19937, NumPy's ``RandomState`` stream, then Box-Muller in blocks of 16
    (the first 8 values are radii times cosines, the next 8 times sines; a ragged tail redoes the
    last 16 with fresh uniforms). float32 agrees with torch to an ulp (torch's vectorised log).
    """
    n = math.prod(shape)
    if n < 16:
        raise ValueError(f"torch draws tensors under 16 values differently; got shape {shape}")
    state = np.random.RandomState(seed & 0xFFFFFFFF)
    wide = np.dtype(dtype) == np.float64

    def uniform(k):
        if wide:
            u = state.randint(0, 2**32, size=2 * k, dtype=np.uint32).astype(np.uint64)
            bits = ((u[0::2] << np.uint64(32)) | u[1::2]) & np.uint64((1 << 53) - 1)
            return bits.astype(np.float64) * 2.0**-53
        u = state.randint(0, 2**32, size=k, dtype=np.uint32)
        return ((u & np.uint32((1 << 24) - 1)).astype(np.float64) * 2.0**-24).astype(np.float32).astype(np.float64)

    def box_muller(block):
        radius = np.sqrt(-2.0 * np.log(1.0 - block[:8]))
        theta = 2.0 * np.pi * block[8:16]
        return np.concatenate([radius * np.cos(theta), radius * np.sin(theta)])

    data = uniform(n)
    out = data.copy()
    for i in range(0, n - 15, 16):
        out[i:i + 16] = box_muller(data[i:i + 16])
    if n % 16:
        out[n - 16:] = box_muller(uniform(16))
    return out.astype(np.float64 if wide else np.float32).reshape(shape)


def _svd_lowrank(x: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``torch.svd_lowrank(x, q, niter=4)`` under ``manual_seed(42)``: ``(U, S, Vh)``."""
    m, n = x.shape
    a = x.T if m < n else x
    r = torch_randn(LOWRANK_SEED, (a.shape[1], q), x.dtype)
    basis = np.linalg.qr(a @ r)[0]
    for _ in range(LOWRANK_NITER):
        basis = np.linalg.qr(a.T @ basis)[0]
        basis = np.linalg.qr(a @ basis)[0]
    u, s, vh = np.linalg.svd(basis.T @ a, full_matrices=False)
    u = basis @ u
    if m < n:
        return vh.T, s, u.T
    return u, s, vh


class IncrementalPCA:
    """PEFT's ``IncrementalPCA(n_components, copy=True, lowrank=True, lowrank_seed=42)``, in NumPy.

    Attributes (after a ``partial_fit``): ``components_ [k, d]``, ``singular_values_ [k]``,
    ``explained_variance_ratio_ [k]``, ``mean_``, ``var_``, ``n_samples_seen_``.
    """

    def __init__(self, n_components: int):
        self.n_components = n_components
        self.q = 2 * n_components
        self.n_samples_seen_ = 0
        self.mean_ = self.var_ = None
        self.components_ = None

    def partial_fit(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float32)
        n, d = x.shape
        if self.n_components > d:
            raise ValueError(f"n_components={self.n_components} invalid for n_features={d}, need more rows than "
                             "columns for IncrementalPCA processing.")
        first = self.components_ is None
        seen, total = self.n_samples_seen_, self.n_samples_seen_ + n
        last_sum = np.zeros(d) if self.mean_ is None else self.mean_ * seen
        new_sum = x.sum(axis=0, dtype=np.float64)
        mean = (last_sum + new_sum) / total
        temp = x - new_sum / n
        correction = np.square(temp.sum(axis=0))
        new_var = np.square(temp).sum(axis=0) - correction / n
        if self.var_ is None:
            var = new_var / total
        else:
            ratio = seen / n
            var = (self.var_ * seen + new_var + ratio / total * np.square(last_sum / ratio - new_sum)) / total
        if first:
            x = (x - mean).astype(np.float32)
        else:
            batch_mean = x.mean(axis=0)
            x = x - batch_mean
            correction = math.sqrt(seen / total * n) * (self.mean_ - batch_mean)
            x = np.vstack([self.singular_values_[:, None] * self.components_, x, correction[None]])
        u, s, vt = _svd_lowrank(x, self.q)
        signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])  # svd_flip on V's rows
        vt = vt * signs[:, None]
        k = self.n_components
        self.n_samples_seen_ = total
        self.components_ = vt[:k]
        self.singular_values_ = s[:k]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (np.square(s) / np.sum(var * total))[:k]


class _Layer:
    """One PCA and its convergence flags (PEFT's ``SVDHook``)."""

    def __init__(self, name: str, n_components: int, tau: float):
        self.name, self.tau = name, tau
        self.pca = IncrementalPCA(n_components)
        self.converged = np.zeros(n_components, bool)

    def update(self, states: np.ndarray) -> None:
        if states.shape[0] < self.pca.n_components:  # PEFT skips such a batch for this layer
            return
        previous = None if self.pca.components_ is None else self.pca.components_.copy()
        self.pca.partial_fit(states)
        if previous is None:
            return
        now = self.pca.components_
        norms = np.maximum(np.linalg.norm(now, axis=1) * np.linalg.norm(previous, axis=1), 1e-8)
        self.converged = np.sum(now * previous, axis=1) / norms >= self.tau


# ------------------------------------------------------------------------------ the inputs


def _token_mask(batch, eva: EvaConfig) -> np.ndarray | None:
    """PEFT's ``prepare_model_inputs_fn_language_modeling``: attention mask, and labels != ignored.

    Only per-token labels mask (a classifier's one label per row has no tokens to leave out; PEFT
    would broadcast it over the mask), and not an encoder-decoder's (the caller turns
    ``use_label_mask`` off there)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    mask = np.asarray(batch.get("attention_mask", np.ones_like(np.asarray(batch["input_ids"])))).astype(bool)
    labels = np.asarray(batch["labels"]) if eva.use_label_mask and "labels" in batch else None
    if labels is not None and labels.shape == mask.shape:
        mask = mask & (labels != eva.label_mask_value)
    return mask


def _states(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The rows of one layer input the PCA sees: masked tokens, flattened to ``[n, d]`` (a
    multiple-choice batch's ``[rows, choices, tokens]`` mask fits its layers' ``[rows * choices,
    tokens]`` inputs, as PEFT's flattened mask does)."""
    if mask is not None and mask.size == math.prod(x.shape[:-1]):
        return x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
    return x.reshape(-1, x.shape[-1])


def _identity(x, batch):
    return x


# ------------------------------------------------------------------------------ the algorithm


def _eva_targets(model: nnx.Module, config: LoraConfig) -> list[str]:
    from peftjax.tuners.lora._layer import LoraLayer

    modules = named_modules(model)
    if any(isinstance(m, LoraLayer) for m in modules.values()):  # a PeftModel's base: its LoRA layers
        return [n for n, m in modules.items() if isinstance(m, LoraLayer) and isinstance(m, nnx.Linear)]
    config = resolve_config(model, config)
    names = match_modules(config, [n for n in modules if n], model_type=model_type(model))
    return [n for n in names if isinstance(modules[n], nnx.Linear)]


def _rank_distribution(layers, layer_map, equal_map, budget, max_components):
    """PEFT's ``_get_rank_distribution``: the ``budget`` largest explained-variance ratios, by layer."""
    keys, values = [], []
    for name, owner in layer_map.items():
        ratios = layers[owner].pca.explained_variance_ratio_[: max_components[owner]]
        keys += [name] * len(ratios)
        values += list(ratios)
    idx = np.argsort(-np.asarray(values), kind="stable")
    counts = Counter(keys[i] for i in idx[:budget])
    counts = {k: counts.get(k, 0) for k in layer_map}
    for name, owner in equal_map.items():  # the layer that owns the PCA gets the larger rank
        if counts[owner] < counts[name]:
            counts[owner], counts[name] = counts[name], counts[owner]
    return counts


def get_eva_state_dict(
    model,
    batches: Iterable,
    peft_config: LoraConfig | None = None,
    *,
    forward_fn: Callable = forward_fn_dict,
    adapter_name: str = "default",
) -> dict[str, np.ndarray]:
    """EVA's components per layer (PEFT's ``get_eva_state_dict``): ``{module path: A [rank, in]}``.

    Args:
      model: a ``PeftModel`` (its LoRA layers are measured with the adapters disabled) or a plain
        NNX model with ``peft_config``'s targets.
      batches: a re-iterable (a list, a data loader) of model inputs, e.g. dicts with
        ``input_ids``, ``attention_mask`` and optionally ``labels``; positions the mask (and,
        with ``use_label_mask``, per-token labels) leave out are not used, a multiple-choice
        batch's ``[rows, choices, tokens]`` too. It is cycled until every layer has converged.
      peft_config: the ``LoraConfig`` (``init_lora_weights="eva"``); a ``PeftModel``'s own by default.
      forward_fn: ``(model, batch) -> anything``; the default is ``model(**batch)``.
      adapter_name: the ``PeftModel``'s adapter whose config to use.

    Returns:
      ``{path: components}`` in torch's ``lora_A`` layout; a layer whose share of the rank budget
      is 0 maps to a ``[0, in]`` array.

    Raises:
      ValueError: no batches, or no config with ``eva_config``.
      TypeError: ``batches`` is a one-shot iterator.
    """
    if _is_peft_model(model):
        peft_config = peft_config or model.peft_config[adapter_name]
        with model.disable_adapter(), unstacked(model.base_model, write=False):  # scan_layers: a loop here
            return _eva_state_dict(model.base_model, batches, peft_config, forward_fn)
    if peft_config is None:
        raise ValueError("peft_config is required if model is not a PeftModel")
    with unstacked(model, write=False):
        return _eva_state_dict(model, batches, peft_config, forward_fn)


def _eva_state_dict(model, batches, config: LoraConfig, forward_fn) -> dict[str, np.ndarray]:
    if not isinstance(config, LoraConfig) or config.eva_config is None:
        raise ValueError("EVA needs a LoraConfig with init_lora_weights='eva' (and so an eva_config)")
    if iter(batches) is batches:
        raise TypeError("EVA goes through `batches` several times: pass a list or a re-iterable data loader, not "
                        "an iterator")
    first = next(iter(batches), None)
    if first is None:
        raise ValueError("dataloader is empty: EVA needs calibration batches")
    eva = EvaConfig.from_value(config.eva_config)
    rho = eva.rho
    if rho > 1000:  # PEFT's cap for unusually high rho
        rho = min(rho, max(max(np.shape(x)) for x in _leaves(model)) // config.r)
    names = _eva_targets(model, config)
    if not names:
        raise ValueError("EVA: the config targets no nnx.Linear layer")
    refuse_decoder_layers(model, names, "EVA")
    if encoder_decoder(model):  # its labels are the decoder's tokens, not the encoder's
        eva = dataclasses.replace(eva, use_label_mask=False)

    # one batch through every target: the call order (torch's module order) and which inputs are equal
    capture = make_capture(model, names, _identity, forward_fn)
    mask = _token_mask(first, eva)
    seen = {n: _states(calls[0], mask) for n, calls in capture(first).items()}
    names = [n for n in capture.order if n in seen]
    max_components, budget = {}, 0
    for n in names:
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), n), config.r)
        max_components[n] = round(r * rho)
        budget += r
    groups: dict[bytes, list[str]] = {}
    for n in names:
        groups.setdefault(seen[n].tobytes() + str(seen[n].shape).encode(), []).append(n)
    equal_map = {other: group[0] for group in groups.values() if len(group) > 1 for other in group[1:]}
    for group in groups.values():
        top = max(max_components[n] for n in group)
        for n in group:
            max_components[n] = top
    layers = {n: _Layer(n, max_components[n], eva.tau) for n in names if n not in equal_map}
    layer_map = {**{n: n for n in layers}, **equal_map}
    del seen

    active = {n: True for n in layers}
    done = {n: False for n in layers}
    rank_dist = dict(max_components)
    # every PCA's layer is captured on every pass (one compilation); converged ones are not updated
    capture = make_capture(model, tuple(layers), _identity, forward_fn)
    for batch in itertools.cycle(batches):
        for n, layer in layers.items():
            converged = bool(np.all(layer.converged[: rank_dist[n]]))
            if not done[n] and converged and active[n]:
                active[n], done[n] = False, True
                continue
            if done[n] and not converged:
                active[n], done[n] = True, False
        if all(done.values()):
            break
        mask = _token_mask(batch, eva)
        for n, calls in capture(batch).items():
            if not active[n]:
                continue
            for x in calls:
                layers[n].update(_states(x, mask))
        if any(layer.pca.components_ is None for layer in layers.values()):
            continue
        rank_dist = _rank_distribution(layers, layer_map, equal_map, budget, max_components)

    out = {}
    for n, rank in rank_dist.items():
        layer = layers[layer_map[n]]
        if not np.all(layer.converged[:rank]):
            raise ValueError(f"Layer {n} has not converged but was assigned rank {rank}.")
        u = layer.pca.components_[:rank].copy()
        if eva.whiten:
            u = u / np.sqrt(layer.pca.singular_values_[:rank])[:, None]
        out[n] = u
    return out


def _is_peft_model(model) -> bool:
    """A ``PeftModel`` (recognised as PEFT does, by its ``peft_config``; tuners sit below it)."""
    return hasattr(model, "peft_config") and hasattr(model, "base_model") and hasattr(model, "disable_adapter")


def _leaves(model):
    import jax

    return jax.tree.leaves(nnx.state(model))


def initialize_lora_eva_weights(
    peft_model,
    batches: Iterable | None = None,
    eva_state_dict: Mapping[str, np.ndarray] | None = None,
    *,
    forward_fn: Callable = forward_fn_dict,
    adapter_name: str = "default",
):
    """Sets a ``PeftModel``'s ``init_lora_weights="eva"`` adapter from data (PEFT's function).

    Each layer's ``lora_A`` becomes its EVA components and ``lora_B`` stays zero, so the model's
    output is unchanged. A layer whose rank changed is re-created at the new rank (its
    ``lora_alpha`` scaled by ``new / old`` with ``adjust_scaling_factors``); one given rank 0 loses
    the adapter. The adapter's config then records PEFT's way: ``rank_pattern`` / ``alpha_pattern``
    for the layers that differ from ``r`` / ``lora_alpha``, and ``target_modules`` as the adapted
    layers' full names (condensed to suffixes from 20 layers on).

    Args:
      peft_model: the ``PeftModel`` from ``get_peft_model(model, LoraConfig(init_lora_weights="eva"))``.
      batches: calibration batches (see :func:`get_eva_state_dict`); not needed with ``eva_state_dict``.
      eva_state_dict: components computed before (``get_eva_state_dict``).
      forward_fn: ``(model, batch) -> anything``; the default is ``model(**batch)``.
      adapter_name: the adapter to initialize.

    Returns:
      ``peft_model``, changed in place.

    Raises:
      ValueError: not a ``PeftModel``, several active adapters, another init, neither ``batches``
        nor ``eva_state_dict``, or components whose width does not fit their layer.

    Example:
      >>> config = peftjax.LoraConfig(r=8, init_lora_weights="eva", eva_config=peftjax.EvaConfig(rho=2.0))  # doctest: +SKIP
      >>> peft_model = peftjax.initialize_lora_eva_weights(peftjax.get_peft_model(model, config), batches)  # doctest: +SKIP
    """
    if not _is_peft_model(peft_model):
        raise ValueError("model must be a PeftModel")
    if len(peft_model.active_adapters) > 1:
        raise ValueError("`initialize_lora_eva_weights` currently only works with a single active adapter")
    if adapter_name not in peft_model.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; adapters: {sorted(peft_model.peft_config)}")
    config = peft_model.peft_config[adapter_name]
    if getattr(config, "init_lora_weights", None) != "eva":
        raise ValueError("`initialize_lora_eva_weights` can only be used with `init_lora_weights='eva'`")
    if eva_state_dict is None:
        if batches is None:
            raise ValueError("dataloader is required if eva_state_dict is not provided: pass `batches`")
        eva_state_dict = get_eva_state_dict(peft_model, batches, forward_fn=forward_fn, adapter_name=adapter_name)
    if has_stacked_layers(peft_model.base_model):  # the layers are stacked again: one rank per target
        ranks: dict[str, set[int]] = {}
        for n, w in eva_state_dict.items():
            ranks.setdefault(re.sub(r"\.\d+\.", ".*.", n, count=1), set()).add(int(np.shape(w)[0]))
        uneven = {k: sorted(v) for k, v in ranks.items() if len(v) > 1}
        if uneven:
            raise ValueError(f"EVA gave the layers of a scan_layers=True model different ranks for one target "
                             f"({dict(list(uneven.items())[:3])}), which cannot be stacked: use eva_config rho=1 "
                             "(no redistribution) or load the model with scan_layers=False")
    with unstacked(peft_model.base_model, write=True):  # scan_layers=True: per layer, stacked again
        _set_components(peft_model, adapter_name, config, eva_state_dict)
    return peft_model


def _set_components(peft_model, adapter_name: str, config, eva_state_dict) -> None:
    """Each layer's ``lora_A`` from its components (its rank and alpha changed with their count, the
    adapter dropped where there are none), and the config's targets and patterns to match."""
    from peftjax.tuners.lora._layer import LoraLayer

    eva = EvaConfig.from_value(config.eva_config)
    modules = named_modules(peft_model.base_model)
    lora = {n: m for n, m in modules.items() if isinstance(m, LoraLayer) and adapter_name in m.adapter_names()}
    unknown = sorted(set(eva_state_dict) - set(lora))
    if unknown:
        raise ValueError(f"eva_state_dict names {unknown[:5]}, which carry no adapter {adapter_name!r}")
    for n, w in eva_state_dict.items():
        if np.shape(w)[1:] != (lora[n].kernel.get_value().shape[0],):
            raise ValueError(f"eva_state_dict[{n!r}] has shape {np.shape(w)}, expected [rank, "
                             f"{lora[n].kernel.get_value().shape[0]}]")
    missing = sorted(set(lora) - set(eva_state_dict))
    if missing:
        raise ValueError(f"eva_state_dict has no components for {missing[:5]}; EVA initializes every targeted layer")
    targets, rank_pattern, alpha_pattern = [], {}, {}
    for n, module in lora.items():
        spec = module.spec(adapter_name)
        r, alpha = config.scaling_for(n)[:2]
        w = np.asarray(eva_state_dict[n], np.float32)
        new_rank = w.shape[0]
        if new_rank == 0:
            module.delete_adapter(adapter_name)
            if not module.adapter_names():
                module.remove_adapter_state()
                module.__class__ = module._peftjax_base
            continue
        if new_rank != r and eva.adjust_scaling_factors:
            alpha = alpha * new_rank / r
        if new_rank != spec.r:
            new_spec = dataclasses.replace(spec, r=new_rank, alpha=alpha,
                                           scaling=alpha / math.sqrt(new_rank) if config.use_rslora else alpha / new_rank)
            module.delete_adapter(adapter_name)
            module.add_lora(adapter_name, new_spec, _key(n), "eva")
            module.set_active_adapters(tuple(peft_model.active_adapters))
        module.lora_A[adapter_name].set_value(np.ascontiguousarray(w.T).astype(
            module.lora_A[adapter_name].get_value().dtype))
        targets.append(n)
        if new_rank != config.r:
            rank_pattern[n] = new_rank
        if alpha != config.lora_alpha:
            alpha_pattern[n] = alpha
    others = [n for n in modules if n and n not in targets]
    if len(targets) >= MIN_TARGET_MODULES_FOR_OPTIMIZATION:
        targets = find_minimal_target_modules(targets, others)
    peft_model.peft_config[adapter_name] = dataclasses.replace(
        config, target_modules=sorted(targets), rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    from peftjax.tuners.base import set_adapter_trainable

    set_adapter_trainable(peft_model.base_model, adapter_name, adapter_name in peft_model.active_adapters
                          and not config.inference_mode)


def _key(name: str):
    import zlib

    import jax

    return jax.random.key(zlib.crc32(name.encode()))


def find_minimal_target_modules(targets: list[str], others: list[str]) -> list[str]:
    """PEFT's ``_find_minimal_target_modules``: the fewest suffixes that pick ``targets`` and no other name."""
    def suffixes(s):
        parts = s.split(".")
        return [".".join(parts[i:]) for i in range(len(parts))][::-1]

    other_suffixes = {x for item in others for x in suffixes(item)}
    required: set[str] = set()
    for item, options in sorted({t: suffixes(t) for t in targets}.items(), key=lambda kv: kv[1]):
        for suffix in options:
            if suffix in required or suffix in other_suffixes:
                continue
            if not any(item.endswith("." + req) for req in required):
                required.add(suffix)
                break
    return sorted(required) if required else sorted(targets)
