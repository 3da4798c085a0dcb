"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020) for Flax NNX. peftjax-only.

An adapter is a small MLP ``f(h) = up(act(down(h)))`` with ``down: d -> m`` and ``up: m -> d``,
``m = max(1, d // reduction_factor)``, applied to the output ``h`` of a sublayer's output
projection: ``h + f(h)`` with ``residual=True`` (the default), else ``f(h)``. It sits before the
block's residual sum and LayerNorm, as in the original Houlsby placement:

- ``adapter_type="houlsby"``: after the attention output projection and after the feedforward
  output projection of every block;
- ``adapter_type="pfeiffer"``: after the feedforward output projection only.

The layers for the bundled models (``BOTTLENECK_TARGET_MODULES``), after attention / after the
feedforward block:

- the decoders with a dense MLP (llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text,
  olmo2, olmo3, smollm3, granite, seed_oss, glm4, ernie4_5): ``*.self_attn.o_proj`` /
  ``*.mlp.down_proj``;
- bert, roberta, xlm-roberta, deberta-v2, electra: ``*.attention.output.dense`` / ``*.layer.<i>.output.dense``;
- distilbert: ``*.attention.out_lin`` / ``*.ffn.lin2``;
- modernbert: ``*.attn.Wo`` / ``*.mlp.Wo``;
- gpt2: ``*.attn.c_proj`` / ``*.mlp.c_proj``.

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

import jax
from flax import nnx

from peftjax.config import BottleneckConfig, add_task_modules_to_save
from peftjax.tuners.base import (
    add_saved_copy,
    find_targets,
    match_modules_to_save,
    mixin_subclass,
    model_type,
    validate_adapter_name,
)
from peftjax.tuners.bottleneck._layer import BottleneckLayer, BottleneckLinear, BottleneckSpec, bottleneck_size

# model_type -> (after-attention, after-feedforward) output layers, as regexes of the name's tail
BOTTLENECK_TARGET_MODULES: dict[str, tuple[str, str]] = {
    **{t: (r"self_attn\.o_proj", r"mlp\.down_proj")  # the decoders with a dense MLP
       for t in ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo3",
                 "smollm3", "granite", "seed_oss", "glm", "glm4", "ernie4_5", "cohere", "cohere2", "ministral",
                 "ministral3", "olmo", "arcee", "nemotron", "helium", "internlm3", "exaone4", "apertus",
                 "hunyuan_v1_dense")},
    **{t: (r"attention\.output\.dense", r"layer\.\d+\.output\.dense")
       for t in ("bert", "roberta", "xlm-roberta", "camembert", "deberta-v2", "electra")},
    "distilbert": (r"attention\.out_lin", r"ffn\.lin2"),
    "lfm2": (r"(self_attn|conv)\.out_proj", r"feed_forward\.w2"),  # each layer's mixer: attention or convolution
    "bamba": (r"(self_attn\.o_proj|mamba\.out_proj)", r"feed_forward\.down_proj"),  # attention or Mamba-2
    "modernbert": (r"attn\.Wo", r"mlp\.Wo"),
    **{t: (r"attn\.c_proj", r"mlp\.c_proj") for t in ("gpt2", "gpt_bigcode")},
    "phi": (r"self_attn\.dense", r"mlp\.fc2"),
    "mpt": (r"attn\.out_proj", r"ffn\.down_proj"),
    "gpt_neox": (r"attention\.dense", r"mlp\.dense_4h_to_h"),
    "opt": (r"self_attn\.out_proj", r"fc2"),
    "bloom": (r"self_attention\.dense", r"mlp\.dense_4h_to_h"),
    "starcoder2": (r"self_attn\.o_proj", r"mlp\.c_proj"),
    "stablelm": (r"self_attn\.o_proj", r"mlp\.down_proj"),
    "gptj": (r"attn\.out_proj", r"mlp\.fc_out"),
    "gpt_neo": (r"attn\.attention\.out_proj", r"mlp\.c_proj"),
    "falcon": (r"self_attention\.dense", r"mlp\.dense_4h_to_h"),
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



def resolve_bottleneck_config(model: nnx.Module, config: BottleneckConfig) -> BottleneckConfig:
    """Adds the task head to ``modules_to_save`` and fills ``target_modules=None`` from the model type."""
    config = add_task_modules_to_save(config)
    if config.target_modules is None:
        targets = default_target_modules(model_type(model) or "", config.adapter_type)
        config = dataclasses.replace(config, target_modules=targets)
    return config


def inject_bottleneck(
    model: nnx.Module, config: BottleneckConfig, *, adapter_name: str = "default", key: jax.Array | None = None
) -> BottleneckConfig:
    """Adds bottleneck adapter ``adapter_name`` after every sublayer output ``config`` places it on, in place.

    Args:
      model: a bundled model (the dense decoders, BERT, RoBERTa, DistilBERT, ModernBERT, GPT-2) for
        the default placement, or any NNX model with ``target_modules`` naming ``nnx.Linear`` output
        layers.
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
    modules, targets = find_targets(model, config, BottleneckLayer, "a bottleneck adapter")
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
    for name in match_modules_to_save(config, modules):
        add_saved_copy(modules[name], adapter_name)
    return config
