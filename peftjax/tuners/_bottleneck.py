"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) for Flax NNX. peftjax-only.

An adapter is a small MLP ``f(h) = up(act(down(h)))`` with ``down: d -> m`` and ``up: m -> d``,
``m = max(1, d // reduction_factor)``, applied to the output ``h`` of a sublayer's output
projection: ``h + f(h)`` with ``residual=True`` (the default), else ``f(h)``. It sits before the
block's residual sum and LayerNorm, as in the original Houlsby placement:

- ``adapter_type="houlsby"``: after the attention output projection and after the feedforward
  output projection of every block;
- ``adapter_type="pfeiffer"``: after the feedforward output projection only.

The layers for the bundled models (``BOTTLENECK_TARGET_MODULES``):

==========  ==============================  =======================================
model type  after attention                 after the feedforward block
==========  ==============================  =======================================
llama,      ``*.self_attn.o_proj``          ``*.mlp.down_proj``
mistral,
qwen2
bert        ``*.attention.output.dense``    ``*.layer.<i>.output.dense``
gpt2        ``*.attn.c_proj``               ``*.mlp.c_proj``
==========  ==============================  =======================================

``BottleneckConfig.target_modules=None`` resolves to a regex over these names (written into the
saved config); an explicit ``target_modules`` (``LoraConfig``'s matching) names the output layers
directly and overrides ``adapter_type``'s placement.

Init (``init_weights="bert"``): ``down`` ~ N(0, 0.02), zero biases, and ``up = 0``, so every adapter
starts as the exact identity (with ``residual=True``) and the gradient still reaches ``up``.

The adapter is non-linear, so it cannot be folded into the base weights: ``merge_adapter`` and
``merge_and_unload`` raise ``NotImplementedError``; ``unload`` removes the adapters.

On disk (``adapter_config.json`` with ``"peft_type": "BOTTLENECK"`` + ``adapter_model.safetensors``;
HF PEFT cannot read these), torch layouts, ``P = base_model.model.<module path>``:

- ``P.adapter_down.weight`` ``[m, d]``, ``P.adapter_down.bias`` ``[m]``
- ``P.adapter_up.weight`` ``[d, m]``, ``P.adapter_up.bias`` ``[d]``

plus ``modules_to_save`` copies under their plain names, as for LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import BottleneckConfig, add_task_modules_to_save, match_modules
from peftjax.io._adapter import KeyMapping
from peftjax.io._layer_format import layer_state_dict, load_layer_state_dict
from peftjax.tuners._ia3 import AdapterDictLayer, check_adaptable
from peftjax.tuners._lora import (
    _match_modules_to_save,
    _model_type,
    add_saved_copy,
    named_modules,
    validate_adapter_name,
)
from peftjax.tuners._lora_nnx import mixin_subclass
from peftjax.tuners._variables import LoraParam

# model_type -> (after-attention, after-feedforward) output layers, as regexes of the name's tail
BOTTLENECK_TARGET_MODULES: dict[str, tuple[str, str]] = {
    "llama": (r"self_attn\.o_proj", r"mlp\.down_proj"),
    "mistral": (r"self_attn\.o_proj", r"mlp\.down_proj"),
    "qwen2": (r"self_attn\.o_proj", r"mlp\.down_proj"),
    "bert": (r"attention\.output\.dense", r"layer\.\d+\.output\.dense"),
    "gpt2": (r"attn\.c_proj", r"mlp\.c_proj"),
}

ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch's nn.GELU()
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}


def default_target_modules(model_type: str, adapter_type: str) -> str:
    """The ``target_modules`` regex for a bundled model type and ``"houlsby"`` / ``"pfeiffer"``.

    >>> default_target_modules("llama", "pfeiffer")
    '.*\\\\.(mlp\\\\.down_proj)'
    """
    if model_type not in BOTTLENECK_TARGET_MODULES:
        raise ValueError(
            f"no default bottleneck placement for model_type {model_type!r}; set `target_modules` to the "
            f"sublayer output layers. Model types with a default: {sorted(BOTTLENECK_TARGET_MODULES)}."
        )
    attention, feedforward = BOTTLENECK_TARGET_MODULES[model_type]
    tails = (attention, feedforward) if adapter_type == "houlsby" else (feedforward,)
    return rf".*\.({'|'.join(tails)})"


def bottleneck_size(features: int, reduction_factor: float) -> int:
    """``m = max(1, d // reduction_factor)``, as adapter-transformers sizes it."""
    return max(1, int(features // reduction_factor))


@dataclasses.dataclass(frozen=True)
class BottleneckSpec:
    """Static settings of one bottleneck adapter on one layer.

    Attributes:
      size: the bottleneck width ``m``.
      non_linearity: a key of ``ACTIVATIONS``.
      residual: output ``h + f(h)`` (else ``f(h)``).
    """

    size: int
    non_linearity: str
    residual: bool


def _same(x):
    return x


class BottleneckLayer(AdapterDictLayer):
    """Mixin marking a layer that carries bottleneck adapters on its output."""

    method_name = "bottleneck"
    weight_dicts = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")


class BottleneckLinear(BottleneckLayer):
    """Bottleneck adapters on the output of an ``nnx.Linear`` (GPT-2's ``Conv1D`` included).

    Kernels are Flax's ``[in, out]``: ``adapter_down`` is ``[d, m]``, ``adapter_up`` is ``[m, d]``.
    """

    def add_bottleneck(self, name: str, spec: BottleneckSpec, key: jax.Array) -> None:
        self._check_new(name)
        d = self.kernel.get_value().shape[1]
        self.adapter_down[name] = LoraParam(0.02 * jax.random.normal(key, (d, spec.size), jnp.float32))
        self.adapter_down_bias[name] = LoraParam(jnp.zeros((spec.size,), jnp.float32))
        self.adapter_up[name] = LoraParam(jnp.zeros((spec.size, d), jnp.float32))
        self.adapter_up_bias[name] = LoraParam(jnp.zeros((d,), jnp.float32))
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        t = jnp.transpose
        return {
            "adapter_down.weight": (self.adapter_down, t, t),
            "adapter_down.bias": (self.adapter_down_bias, _same, _same),
            "adapter_up.weight": (self.adapter_up, t, t),
            "adapter_up.bias": (self.adapter_up_bias, _same, _same),
        }

    def _describe(self, name: str) -> str:
        return f"bottleneck size {self.spec(name).size}"

    def __call__(self, x, *args, **kwargs):
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        for name, spec in self._live_adapters():
            h = y.astype(jnp.float32)
            down = h @ self.adapter_down[name].get_value() + self.adapter_down_bias[name].get_value()
            f = ACTIVATIONS[spec.non_linearity](down) @ self.adapter_up[name].get_value()
            f = f + self.adapter_up_bias[name].get_value()
            y = (h + f if spec.residual else f).astype(y.dtype)
        return y

    def merge_adapter(self, name: str) -> None:
        raise NotImplementedError(
            f"{self.adapter_path}: bottleneck adapters are non-linear (up(act(down(h)))) and cannot be merged into "
            "the base weights; keep the adapter layers for inference, or use unload() to drop them"
        )

    def unmerge_adapter(self, name: str) -> None:
        raise NotImplementedError(f"{self.adapter_path}: bottleneck adapters are never merged")


def resolve_bottleneck_config(model: nnx.Module, config: BottleneckConfig) -> BottleneckConfig:
    """Adds the task head to ``modules_to_save`` and fills ``target_modules=None`` from the model type."""
    config = add_task_modules_to_save(config)
    if config.target_modules is None:
        targets = default_target_modules(_model_type(model) or "", config.adapter_type)
        config = dataclasses.replace(config, target_modules=targets)
    return config


def inject_bottleneck(
    model: nnx.Module, config: BottleneckConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> BottleneckConfig:
    """Adds bottleneck adapter ``adapter_name`` after every sublayer output ``config`` places it on, in place.

    Args:
      model: a bundled model (Llama / Mistral / Qwen2, BERT, GPT-2) for the default placement, or
        any NNX model with ``target_modules`` naming ``nnx.Linear`` output layers.
      config: the adapter settings; see the module docstring for the placement.
      adapter_name: the name under which the weights are stored (``o_proj/adapter_down/<name>``).
      key: the init key (a fixed default keeps ``get_peft_model`` deterministic).

    Returns:
      The resolved config (``target_modules`` filled in, task heads added).

    Raises:
      ValueError: no default for the model type, or nothing matches ``target_modules``.
      TypeError: a target is not a linear layer, or already carries another method's adapter.
      NotImplementedError: a target is an ``nnx.Conv`` / ``LinearGeneral`` / ``Einsum``.

    >>> import peftjax  # doctest: +SKIP
    >>> peft_model = peftjax.get_peft_model(model, peftjax.BottleneckConfig(adapter_type="pfeiffer"))  # doctest: +SKIP
    >>> model.model.layers[0].mlp.down_proj.adapter_down["default"].shape  # hidden 32, factor 16  # doctest: +SKIP
    (32, 2)
    """
    validate_adapter_name(adapter_name)
    config = resolve_bottleneck_config(model, config)
    key = jax.random.key(0) if key is None else key
    modules = named_modules(model)
    targets = match_modules(config, [n for n in modules if n], model_type=_model_type(model))
    check_adaptable(modules, targets, BottleneckLayer, "a bottleneck adapter")
    for i, name in enumerate(targets):
        module = modules[name]
        if not isinstance(module, BottleneckLayer):
            module.__class__ = mixin_subclass(type(module), BottleneckLinear, "Bottleneck")
        module._adapter_setup(name)
        d = module.kernel.get_value().shape[1]
        spec = BottleneckSpec(
            size=bottleneck_size(d, config.reduction_factor),
            non_linearity=config.non_linearity,
            residual=config.residual,
        )
        module.add_bottleneck(adapter_name, spec, jax.random.fold_in(key, i))
    for name in _match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config


def bottleneck_state_dict(
    model: nnx.Module,
    adapter_name: str,
    config: BottleneckConfig,
    *,
    key_mapping: KeyMapping = None,
    save_embedding_layers: bool | str = "auto",
) -> dict[str, np.ndarray]:
    """The adapter's ``adapter_down`` / ``adapter_up`` weights and biases in torch layouts (module docstring)."""
    del config, save_embedding_layers  # bottleneck adapters never target embeddings
    return layer_state_dict(model, adapter_name, layer_type=BottleneckLayer, key_mapping=key_mapping)


def load_bottleneck_state_dict(
    model: nnx.Module,
    tensors: Mapping[str, np.ndarray],
    adapter_name: str,
    *,
    key_mapping: KeyMapping = None,
    source: str = "adapter",
) -> tuple[list[str], list[str]]:
    """Sets bottleneck adapter ``adapter_name`` (already injected) from saved keys; returns (missing, unexpected)."""
    return load_layer_state_dict(
        model, tensors, adapter_name, layer_type=BottleneckLayer, key_mapping=key_mapping, source=source
    )

