"""Which modules an adapter targets: HF PEFT 0.22.0's name matching, as pure functions on names.

Module names are the dotted names of the **torch transformers** model (``named_modules()``), e.g.
``model.layers.0.self_attn.q_proj``, with no ``base_model.model.`` prefix; they are what PEFT
matches and what its adapter files are keyed by. The rules are in
``shared/reference/peft-format.md`` section 3.1; the tests check them against PEFT itself.

The default target mappings are copied, as data, from ``peft/utils/constants.py`` (0.22.0).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import difflib
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peftjax.config._base import PeftConfig

INCLUDE_LINEAR_LAYERS_SHORTHAND = "all-linear"
SEQ_CLS_HEAD_NAMES = ("score", "classifier")  # PEFT's order: "score" is looked up first

# fmt: off
TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}

TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gptj": ["q_proj", "v_proj", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "gpt_neo": ["q_proj", "v_proj", "c_proj"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "gpt_bigcode": ["c_attn", "mlp.c_proj"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "llama4": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "mixtral": ["k_proj", "v_proj", "w2"],
    "bert": ["key", "value", "output.dense"],
    "deberta-v2": ["key_proj", "value_proj", "output.dense"],
    "deberta": ["in_proj", "output.dense"],
    "RefinedWebModel": ["query_key_value", "dense_4h_to_h"],
    "RefinedWeb": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "gemma3_text": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}

TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gptj": ["fc_out"],
    "gpt_neox": ["dense_4h_to_h"],
    "gpt_neo": ["c_proj"],
    "bart": ["fc2"],
    "gpt_bigcode": ["mlp.c_proj"],
    "llama": ["down_proj"],
    "llama4": ["down_proj"],
    "mistral": ["down_proj"],
    "mixtral": ["w2"],
    "bert": ["output.dense"],
    "deberta-v2": ["output.dense"],
    "deberta": ["output.dense"],
    "RefinedWeb": ["dense_4h_to_h"],
    "RefinedWebModel": ["dense_4h_to_h"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "gemma3_text": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}
# fmt: on

# copied from peft/utils/constants.py (0.22.0): VeRA, PVeRA, FRoD and FourierFT are LoRA's mapping with small
# changes
TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "phi": ["q_proj", "v_proj"]}
TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "phi": ["q_proj", "v_proj"], "dinov2": ["query", "value"]}
TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    **TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, "vit": ["query", "value"]}
TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    **TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, "gpt_bigcode": ["mlp.c_proj"], "gpt2": ["mlp.c_proj"]}
# WaveFT's is FourierFT's without three model types
TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    k: v for k, v in TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING.items()
    if k not in ("rwkv", "rwkv7", "btlm")}
# copied from peft/utils/constants.py (0.22.0): AdaLoRA's own table
TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# copied from peft/utils/constants.py (0.22.0): VB-LoRA's own table
TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING: dict[str, list[str] | str] = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"],
    "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "gpt_bigcode": ["c_attn"], "deberta": ["in_proj"], "gemma": ["q_proj", "v_proj"], "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"], "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}

# copied from peft/utils/constants.py (0.22.0): BEFT's own table (the value projections)
TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "t5": ["v"], "mt5": ["v"], "roberta": ["value"], "opt": ["v_proj"], "gptj": ["v_proj"], "gpt_neo": ["v_proj"],
    "bart": ["v_proj"], "llama": ["v_proj"], "llama4": ["v_proj"], "mistral": ["v_proj"], "mixtral": ["v_proj"],
    "bert": ["value"], "deberta-v2": ["value_proj"], "phi": ["v_proj"], "gemma": ["v_proj"], "gemma2": ["v_proj"],
    "gemma3_text": ["v_proj"], "qwen2": ["v_proj"], "qwen3": ["v_proj"],
}

TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING: dict[str, list[str]] = {
    "llama": ["input_layernorm", "post_attention_layernorm", "norm"],
    "bloom": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "llava": ["multi_modal_projector", "input_layernorm", "post_attention_layernorm", "norm", "embed_tokens",
              "lm_head"],
    "t5": ["layer_norm", "final_layer_norm"],
    "mt5": ["layer_norm", "final_layer_norm"],
    "bart": ["self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm"],
    "gpt2": ["ln_1", "ln_2", "ln_f"],
    "blip-2": ["layernorm", "LayerNorm", "final_layer_norm", "self_attn_layer_norm"],
    "gptj": ["ln_1", "ln_f"],
    "falcon": ["input_layernorm", "post_attention_layernorm", "ln_f"],
    "mistral": ["input_layernorm", "post_attention_layernorm", "norm"],
    "phi": ["input_layernorm", "final_layernorm"],
    "gemma": ["input_layernorm", "post_attention_layernorm", "norm"],
    "gemma2": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm", "norm"],
    "gemma3_text": ["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                    "post_feedforward_layernorm", "norm"],
    "qwen2": ["post_attention_layernorm"],
    "qwen3": ["post_attention_layernorm"],
}

# task_type -> the head modules PEFT's task wrappers add to modules_to_save, in PEFT's order.
_TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score", "pre_classifier"),
    "TOKEN_CLS": ("classifier", "score", "pre_classifier"),
    "QUESTION_ANS": ("qa_outputs",),
}

_EXCLUDED, _MATCHED, _UNMATCHED = "excluded", "matched", "unmatched"


# transformers 5 fused these MoE models' per-expert linears into 3-D parameters and made the router a
# module of its own. PEFT 0.22 turns LoRA targets naming them as transformers 4 did (and "all-linear",
# which covered them) into `target_parameters` on the fused weights, with doubled rank and alpha for
# the fused w1/w3 (peft/utils/transformers_weight_conversion.py, `_convert_peft_config_moe`); a `None`
# target_modules comes out of that conversion empty, and PEFT then refuses the config unless it has
# target_parameters of its own.
MOE_CONVERTED_TARGETS: dict[str, dict[str, str]] = {
    "mixtral": {"gate": "gate.weight", "w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj"},
    # PEFT's "qwen2_moe" pattern (transformers' conversion mapping sends qwen3_moe to it); the names are
    # also a dense layer's or a shared expert's MLP's, which stay targets (PEFT 0.21.2 moved them too)
    "qwen3_moe": {"gate": "gate.weight", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj",
                  "down_proj": "down_proj"},
}
# transformers sends these to the same pattern; qwen2_moe from PEFT 0.22 on (0.21.2 converted nothing there)
_QWEN2_MOE_CONVERTED = ("deepseek_v2", "deepseek_v3", "ernie4_5_moe", "glm4_moe", "glm4_moe_lite", "hunyuan_v1_moe",
                        "olmoe", "flex_olmo", "qwen2_moe", "qwen3_next")
MOE_CONVERTED_TARGETS.update(dict.fromkeys(_QWEN2_MOE_CONVERTED, MOE_CONVERTED_TARGETS["qwen3_moe"]))
_MOE_FUSED: dict[str, dict[str, tuple[str, ...]]] = {"mixtral": {"gate_up_proj": ("w1", "w3")},
                                                     "qwen3_moe": {"gate_up_proj": ("gate_proj", "up_proj")}}
_MOE_FUSED.update(dict.fromkeys(_QWEN2_MOE_CONVERTED, _MOE_FUSED["qwen3_moe"]))


def convert_moe_lora_targets(
    config: PeftConfig,
    model_type: str,
    module_names: Iterable[str],
    param_keys: Iterable[str],
    linear_names: Iterable[str],
    linear_modules: Iterable[str],
) -> PeftConfig:
    """PEFT 0.22's conversion of a LoRA config's transformers-4 MoE targets (a no-op elsewhere).

    Args:
        config: The adapter config, before its defaults are filled.
        model_type: The transformers ``model_type``.
        module_names: The model's dotted module names (to probe a regex ``target_modules``).
        param_keys: The model's parameter keys in torch names (``model.layers.0.mlp.experts.gate_up_proj``).
        linear_names: What ``"all-linear"`` expands to on this model (module names).
        linear_modules: The modules that are torch ``nn.Linear`` layers there (module names).

    Returns:
        The config with router/expert targets moved to ``target_parameters`` (``"gate"`` ->
        ``"gate.weight"``, ``"w1"``/``"w3"`` -> ``"gate_up_proj"`` with ``rank_pattern`` and
        ``alpha_pattern`` doubled there, ``"w2"`` -> ``"down_proj"``; a prefix stays:
        ``"mlp.gate"`` -> ``"mlp.gate.weight"``), as PEFT saves it. A target whose modules are
        all linear layers (a dense layer's or a shared expert's ``down_proj``) stays a target, and
        becomes a parameter target as well where a fused parameter of that name exists.

    Raises:
        ValueError: ``target_modules`` is ``None`` without ``target_parameters`` (PEFT refuses that
            too), or names only one of ``w1``/``w3``, which are fused.
    """
    mapping = MOE_CONVERTED_TARGETS.get(model_type)
    if mapping is None or getattr(config, "peft_type", None) != "LORA":
        return config
    target = config.target_modules
    if target is None and not config.target_parameters:
        raise ValueError(f"LoRA on model_type {model_type!r} needs target_modules or target_parameters: PEFT 0.22 "
                         "(with transformers 5) empties the default while converting its MoE targets and refuses the "
                         "config; e.g. target_modules=['q_proj', 'k_proj', 'v_proj', 'o_proj'] or 'all-linear'")
    module_names, param_keys, linear = list(module_names), list(param_keys), set(linear_modules)
    if isinstance(target, str):
        if is_all_linear(target):
            resolved = {n.rsplit(".", 1)[-1] for n in linear_names} | set(mapping)
        else:
            resolved = {k.rsplit(".", 1)[-1] for k in module_names + param_keys if k and re.fullmatch(target, k)}
            containers: dict[str, set[str]] = {}
            for key in param_keys:
                container, _, leaf = key.rpartition(".")
                containers.setdefault(leaf, set()).add(container)
            for old, new in mapping.items():  # the fused experts: probe the transformers-4 names
                if any(re.fullmatch(target, f"{c}.{old}") for c in containers.get(new, ())):
                    resolved.add(old)
        if not resolved:
            return config  # nothing matched: left for the standard not-found error
        target = resolved
    parameters = set(config.target_parameters or ())
    remaining, present = set(), {new: set() for new in _MOE_FUSED[model_type]}
    fused_params = [k for k in param_keys if k.rpartition(".")[0] not in linear]  # only target_parameters reach them
    for t in target or ():
        hit = next(((old, new) for old, new in mapping.items() if t == old or t.endswith("." + old)), None)
        if hit is None:
            remaining.add(t)
            continue
        old, new = hit
        renamed = new.join(t.rsplit(old, 1))  # the last occurrence: "mlp.gate" -> "mlp.gate.weight"
        matching = [n for n in module_names if n and (n == t or n.endswith("." + t))]
        if matching and all(n in linear for n in matching):
            remaining.add(t)
            if not any(k == renamed or k.endswith("." + renamed) for k in fused_params):
                continue
        parameters.add(renamed)
        present.setdefault(new, set()).add(old)
    rank, alpha = dict(config.rank_pattern), dict(config.alpha_pattern)
    for new, olds in _MOE_FUSED[model_type].items():
        found = present.get(new, set())
        if 0 < len(found) < len(olds):
            raise ValueError(f"Cannot convert PEFT target(s) {', '.join(sorted(found))} without also targeting "
                             f"{', '.join(sorted(set(olds) - found))} because they are fused into {new}.")
        if len(found) == len(olds) > 1:  # fused: the rank and alpha add up, alpha / r is kept
            rank[rf".*\.{re.escape(new)}"] = config.r * len(olds)
            alpha[rf".*\.{re.escape(new)}"] = config.lora_alpha * len(olds)
    return dataclasses.replace(config, target_modules=tuple(sorted(remaining)),
                               target_parameters=tuple(sorted(parameters)), rank_pattern=rank, alpha_pattern=alpha)


def is_all_linear(target_modules: Any) -> bool:
    """Whether ``target_modules`` is PEFT's ``"all-linear"`` shorthand (case-insensitive, as in PEFT)."""
    return isinstance(target_modules, str) and target_modules.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND


def get_pattern_key(pattern_keys: Iterable[str], key: str) -> str:
    """Returns the first of ``pattern_keys`` that matches the end of module name ``key``.

    A pattern (a name or regex) matches when ``re.match(rf"(.*\\.)?({pattern})$", key)`` does, so
    ``"o_proj"`` matches ``model.layers.0.self_attn.o_proj`` but not ``...self_attn.no_proj``. As in
    PEFT, ``key`` itself is returned when nothing matches, so ``pattern.get(result, default)``
    gives the default.

    Example:
        >>> get_pattern_key(["o_proj", r"layers\\.0\\..*"], "model.layers.0.self_attn.o_proj")
        'o_proj'
    """
    for pattern in pattern_keys:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def _target_modules_of(config: PeftConfig) -> Any:
    if not hasattr(config, "target_modules"):
        raise TypeError(f"{type(config).__name__} has no `target_modules`; it does not target modules by name.")
    target = config.target_modules
    if target is None:
        raise ValueError(
            f"{type(config).__name__}.target_modules is None (the architecture default); call "
            "resolve_target_modules(config, model_type) first."
        )
    if is_all_linear(target):
        raise ValueError(
            f"target_modules={target!r} must be expanded to module names first: "
            "expand_all_linear(linear_module_names, ...) lists them."
        )
    return target


def _target_status(config: PeftConfig, key: str) -> str:
    """PEFT's ``check_target_module_exists``, keeping "excluded" apart from "unmatched"."""
    exclude = getattr(config, "exclude_modules", None)
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return _EXCLUDED
        elif key in exclude or any(key.endswith(f".{x}") for x in exclude):
            return _EXCLUDED

    # An adapter inside a fully trained (modules_to_save) module would conflict with it.
    modules_to_save = getattr(config, "modules_to_save", None)
    if modules_to_save and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in modules_to_save):
        return _EXCLUDED

    target = _target_modules_of(config)
    if isinstance(target, str):
        return _MATCHED if re.fullmatch(target, key) else _UNMATCHED
    if key in target:  # a full name listed exactly bypasses the layer filter, as in PEFT
        return _MATCHED
    if not any(key.endswith(f".{t}") for t in target):
        return _UNMATCHED

    layer_indexes = getattr(config, "layers_to_transform", None)
    if layer_indexes is None or (isinstance(layer_indexes, list | tuple) and len(layer_indexes) == 0):
        return _MATCHED
    layers_pattern = getattr(config, "layers_pattern", None)
    match = None
    if layers_pattern is None or len(layers_pattern) == 0:
        # Lazy .*? takes the first numbered segment (the layer), not a nested one (a MoE expert).
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:  # no layer index in the name: not targeted
        return _UNMATCHED
    index = int(match.group("idx"))
    wanted = index == layer_indexes if isinstance(layer_indexes, int) else index in layer_indexes
    return _MATCHED if wanted else _UNMATCHED


def check_target_module_exists(config: PeftConfig, key: str) -> bool:
    """Whether the module named ``key`` gets an adapter: HF PEFT 0.22.0's rule, exactly.

    In order: ``exclude_modules`` (a str is ``re.fullmatch``-ed; a list matches a full name or a
    dotted suffix) and ``modules_to_save`` exclude first; a str ``target_modules`` must
    ``re.fullmatch`` the whole name; a list matches a full name exactly, or a dotted suffix
    (``"proj"`` does not match ``q_proj``). Only for a suffix match, ``layers_to_transform`` then
    filters on the layer index in the name; a name with no index is not targeted.

    Args:
        config: A config with ``target_modules`` (``LoraConfig``, ``IA3Config``, ...), already
            resolved (not ``None`` nor ``"all-linear"``).
        key: The module's full dotted name, e.g. ``"model.layers.0.self_attn.q_proj"``.

    Returns:
        Whether the module is targeted.

    Raises:
        TypeError: The config has no ``target_modules`` (a prompt-learning config).
        ValueError: ``target_modules`` is ``None`` or ``"all-linear"``.

    Example:
        >>> from peftjax.config import LoraConfig
        >>> cfg = LoraConfig(target_modules=["q_proj", "mlp.c_proj"], layers_to_transform=[0])
        >>> [check_target_module_exists(cfg, k) for k in
        ...  ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "transformer.h.0.mlp.c_proj"]]
        [True, False, True]
    """
    return _target_status(config, key) == _MATCHED


def is_feedforward_module(config: PeftConfig, key: str) -> bool:
    """Whether IA3 treats module ``key`` as feedforward (scales its input, not its output).

    PEFT's rule, which differs from ``target_modules`` matching: a str ``feedforward_modules`` is
    ``re.fullmatch``-ed; a list entry matches when ``key.endswith(entry)``, **with no dot
    boundary** (so ``"proj"`` would match ``down_proj``).
    """
    feedforward = getattr(config, "feedforward_modules", None)
    if feedforward is None:
        raise ValueError(
            f"{type(config).__name__}.feedforward_modules is None; call resolve_target_modules(config, model_type) "
            "first or set it."
        )
    if isinstance(feedforward, str):
        return bool(re.fullmatch(feedforward, key))
    return any(key.endswith(t) for t in feedforward)


def _default(mapping: dict[str, Any], model_type: str, field: str, kind: str) -> Any:
    if model_type not in mapping:
        raise ValueError(
            f"no default {field} for model_type {model_type!r} ({kind}); set `{field}` explicitly. "
            f"Model types with a default: {sorted(mapping)}."
        )
    value = mapping[model_type]
    return value if isinstance(value, str) else tuple(sorted(set(value)))


# the methods whose only per-architecture default is target_modules
_SIMPLE_DEFAULTS = {
    "VERA": (TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, "VeRA"),
    "FOURIERFT": (TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING, "FourierFT"),
    "WAVEFT": (TRANSFORMERS_MODELS_TO_WAVEFT_TARGET_MODULES_MAPPING, "WaveFT"),
    "LN_TUNING": (TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING, "LN tuning"),
    "ADALORA": (TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING, "AdaLoRA"),
    # PEFT 0.22.0's C3A table is FourierFT's, SHiRA's VeRA's (LoRA's with the same small changes)
    "C3A": (TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING, "C3A"),
    "SHIRA": (TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING, "SHiRA"),
    "VBLORA": (TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING, "VB-LoRA"),
    "BEFT": (TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING, "BEFT"),
    "PVERA": (TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING, "PVeRA"),
    "FROD": (TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING, "FRoD"),
}


def resolve_target_modules(config: PeftConfig, model_type: str) -> PeftConfig:
    """Fills ``target_modules`` that is ``None`` with the architecture default, as PEFT does.

    LoRA (and LoHa, LoKr) use ``TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``; IA3 its target
    and feedforward mappings, each filled independently when ``None``; VeRA, FourierFT and LN tuning
    their own target mappings. A config whose modules are
    already set is returned unchanged, as is a ``BottleneckConfig`` (whose ``None`` means "the
    transformer blocks", resolved by its tuner).

    Args:
        config: The adapter config.
        model_type: The transformers ``config.model_type``, e.g. ``"llama"``.

    Returns:
        The config, with defaults filled in (a new instance if anything changed).

    Raises:
        ValueError: A default is needed but ``model_type`` has none; the message lists those
            that do.
        TypeError: The config does not target modules by name (prompt learning).
    """
    peft_type = getattr(config, "peft_type", None)
    changes: dict[str, Any] = {}
    if peft_type in ("LORA", "LOHA", "LOKR", "OFT", "BOFT", "HRA", "MISS", "ROAD", "DELORA", "GRALORA", "HIRA",
                     "RANDLORA", "POLY", "GLORA", "DEFT", "PEANUT", "SUPERTUNING", "UNILORA",
                     "LILY", "TINYLORA", "PACA"):
        if config.target_modules is None:
            changes["target_modules"] = _default(
                TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, model_type, "target_modules",
                {"LORA": "LoRA", "LOHA": "LoHa", "LOKR": "LoKr"}.get(peft_type, peft_type),
            )
    elif peft_type == "IA3":
        if config.target_modules is None:
            changes["target_modules"] = _default(
                TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, model_type, "target_modules", "IA3"
            )
        if config.feedforward_modules is None:
            changes["feedforward_modules"] = _default(
                TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING, model_type, "feedforward_modules", "IA3"
            )
    elif peft_type == "OSF":  # PEFT's OSF takes every linear layer by default
        if config.target_modules is None:
            changes["target_modules"] = INCLUDE_LINEAR_LAYERS_SHORTHAND
    elif peft_type in _SIMPLE_DEFAULTS:
        if config.target_modules is None:
            mapping, kind = _SIMPLE_DEFAULTS[peft_type]
            changes["target_modules"] = _default(mapping, model_type, "target_modules", kind)
    elif not hasattr(config, "target_modules"):
        raise TypeError(f"{type(config).__name__} has no `target_modules` to resolve.")
    return dataclasses.replace(config, **changes) if changes else config


def expand_all_linear(
    linear_module_names: Iterable[str],
    output_embedding_name: str | None = None,
    task_type: str | None = None,
) -> list[str]:
    """Expands ``target_modules="all-linear"`` into module names, as PEFT does before saving.

    PEFT takes every ``nn.Linear`` / ``Conv1D`` except the output embedding (``lm_head``); for a
    ``SEQ_CLS`` model without one, it drops the top-level ``score`` (or else ``classifier``) head
    instead. PEFT writes the expanded full names into ``adapter_config.json``.

    Args:
        linear_module_names: Full dotted names of the model's linear layers.
        output_embedding_name: The name of the output embedding (``get_output_embeddings()``),
            or ``None`` when the model has none.
        task_type: The config's ``task_type``.

    Returns:
        The sorted module names to target.

    Example:
        >>> expand_all_linear(["model.layers.0.mlp.up_proj", "lm_head"], output_embedding_name="lm_head")
        ['model.layers.0.mlp.up_proj']
    """
    names = set(linear_module_names)
    if output_embedding_name is not None:
        names.discard(output_embedding_name)
    elif task_type == "SEQ_CLS":
        for head in SEQ_CLS_HEAD_NAMES:
            if head in names:
                names.discard(head)
                break
    return sorted(names)


def add_task_modules_to_save(config: PeftConfig) -> PeftConfig:
    """Adds the task head to ``modules_to_save``, as PEFT's task model wrappers do.

    ``SEQ_CLS`` and ``TOKEN_CLS`` add ``["classifier", "score", "pre_classifier"]`` (PEFT 0.22:
    DistilBERT's ``pre_classifier`` is drawn afresh too), ``QUESTION_ANS`` adds
    ``["qa_outputs"]``, appended after any modules already listed (PEFT's order); a name already
    present is not repeated (as in PEFT 0.22; older PEFT appended again on every load).

    Returns:
        The config, or a new one with the heads added.
    """
    heads = _TASK_MODULES_TO_SAVE.get(config.task_type or "")
    if not heads:
        return config
    current = tuple(config.modules_to_save or ())
    updated = current + tuple(h for h in heads if h not in current)
    return config if updated == config.modules_to_save else dataclasses.replace(config, modules_to_save=updated)


def add_new_head_modules(config: PeftConfig, new_weights: Iterable[str], *, head: bool = False) -> PeftConfig:
    """Adds to ``modules_to_save`` the modules of a task head that the base checkpoint lacked.

    ``new_weights``: the torch keys a model's loading drew afresh (``model.newly_initialised``).
    For ``SEQ_CLS``, ``TOKEN_CLS`` and ``QUESTION_ANS`` each module holding one, unless a listed
    module (or one PEFT's segment match takes) covers it already, is appended by its full name
    (DeBERTa's ``pooler.dense`` beside ``classifier``). PEFT adds only ``classifier`` and
    ``score``: an adapter without the new pooler would reload onto another random one there, so
    the file carries it, and PEFT reads it back through the same ``modules_to_save``. ``head=True``
    does the same for a model with a head whose adapters have no task type (multiple choice: PEFT
    has none for it, so its ``classifier`` is saved only when listed).

    >>> from peftjax.config import LoraConfig
    >>> config = add_new_head_modules(LoraConfig(task_type="SEQ_CLS", modules_to_save=["classifier"]),
    ...                               ["pooler.dense.weight", "pooler.dense.bias", "classifier.weight"])
    >>> config.modules_to_save
    ('classifier', 'score', 'pre_classifier', 'pooler.dense')
    """
    new_weights = [k for k in new_weights if "." in k]
    task_head = config.task_type in _TASK_MODULES_TO_SAVE or (head and config.task_type is None)
    if not task_head or not hasattr(config, "modules_to_save") or not new_weights:
        return config
    config = add_task_modules_to_save(config)  # PEFT's heads first, in PEFT's order
    current = tuple(config.modules_to_save or ())

    def covered(module: str) -> bool:
        parts = module.split(".")
        return any(is_module_to_save(".".join(parts[:i]), current) for i in range(1, len(parts) + 1))

    added = tuple(m for m in dict.fromkeys(k.rsplit(".", 1)[0] for k in new_weights) if not covered(m))
    return dataclasses.replace(config, modules_to_save=current + added) if added else config


def is_module_to_save(name: str, modules_to_save: Iterable[str] | None) -> bool:
    """Whether the module ``name`` is one ``modules_to_save`` lists, as PEFT 0.22 matches it
    (``utils.other._set_trainable``): the name equals an entry or ends with ``"." + entry``, so
    ``"norm"`` takes ``model.norm`` but not ``input_layernorm`` (PEFT before 0.22 took any plain
    string suffix; see :func:`with_suffix_matched_modules_to_save` for its files).

    >>> is_module_to_save("model.norm", ["norm"]), is_module_to_save("model.layers.0.input_layernorm", ["norm"])
    (True, False)
    """
    return bool(name) and any(name == m or name.endswith(f".{m}") for m in modules_to_save or ())


def with_suffix_matched_modules_to_save(config: PeftConfig, names: Iterable[str], file_modules: Iterable[str],
                                        ) -> PeftConfig:
    """``config`` with the modules an older PEFT's ``modules_to_save`` took added by full name.

    PEFT before 0.22 took every module whose name ended with an entry as a plain string
    (``["norm"]`` took each layer's ``input_layernorm`` too) and saved their copies. For a file
    holding such copies (``file_modules``: the module paths its keys name), each module of
    ``names`` that the old rule took, the new rule does not and the file holds is appended by its
    full name, so the adapter loads as it was trained; a file without them is left as PEFT 0.22
    reads it.

    >>> from peftjax.config import LoraConfig
    >>> config = LoraConfig(modules_to_save=["norm"])
    >>> with_suffix_matched_modules_to_save(config, ["model.norm", "model.layers.0.input_layernorm"],
    ...                                     ["model.layers.0.input_layernorm"]).modules_to_save
    ('norm', 'model.layers.0.input_layernorm')
    """
    listed = tuple(getattr(config, "modules_to_save", None) or ())
    held = set(file_modules)
    extra = [n for n in names if n in held and not is_module_to_save(n, listed)
             and any(n.endswith(m) for m in listed)]
    return dataclasses.replace(config, modules_to_save=listed + tuple(extra)) if extra else config


def _closest(query: str, candidates: Sequence[str], n: int = 3) -> list[str]:
    return difflib.get_close_matches(query, candidates, n=n, cutoff=0.5)


def _no_match_message(config: PeftConfig, names: Sequence[str], excluded: Sequence[str], head: str) -> str:
    target = config.target_modules
    last_segments = sorted({n.rsplit(".", 1)[-1] for n in names})
    lines = [head]
    for t in [target] if isinstance(target, str) else target:
        close = _closest(t.rsplit(".", 1)[-1], last_segments) + _closest(t, names)
        if close:
            lines.append(f"  closest to {t!r}: {', '.join(dict.fromkeys(close))}")
        else:
            lines.append(f"  nothing close to {t!r}")
    # Names of modules without children (the layers one can target), e.g. q_proj, lm_head.
    parents = {n.rsplit(".", 1)[0] for n in names if "." in n}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names if n not in parents})
    shown = leaves[:10]
    more = f" (and {len(leaves) - len(shown)} more)" if len(leaves) > len(shown) else ""
    lines.append(f"  leaf module names in the model: {', '.join(shown)}{more}")
    if excluded:
        lines.append(f"  excluded by exclude_modules/modules_to_save: {', '.join(excluded[:10])}")
    for field in ("layers_to_transform", "layers_pattern"):
        value = getattr(config, field, None)
        if value is not None:
            lines.append(f"  note: {field}={_show(value)}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    """Shows a normalized option as the user wrote it: tuples as lists."""
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


# how module paths read while an adapter is targeted (module_names_as): the names a key mapping gives them
_NAME_VIEW: contextvars.ContextVar[Callable[[str], str] | None] = contextvars.ContextVar("peftjax_name_view",
                                                                                        default=None)


@contextlib.contextmanager
def module_names_as(name: Callable[[str], str] | None):
    """Inside the block, :func:`match_modules` matches each module path both as it is and as
    ``name`` renames it (a model read from a vision-language checkpoint:
    ``model.layers.0.self_attn.q_proj`` also as ``model.language_model.layers.0.self_attn.q_proj``,
    so PEFT's regexes for that class target the same layers; a user model's ``key_mapping``: its own
    names and its files'), excluded if either is, and returns the paths. ``None`` changes nothing."""
    token = _NAME_VIEW.set(name)
    try:
        yield
    finally:
        _NAME_VIEW.reset(token)


# LoRA and its like take no adapter on these modules of these model types. PEFT 0.22.0 refuses
# ``out_proj`` and ``conv1d`` of its Mamba-based types: their fused kernels read those weights
# directly. transformers' Mamba, Falcon-Mamba and Jamba multiply by ``dt_proj.weight`` itself, so PEFT's
# LoRA on ``dt_proj`` changes nothing there: refused here rather than computed as PEFT does not.
_PEFT_REFUSES = "as PEFT refuses them (its fused kernels read their weights directly)"
_DT_PROJ = "as transformers multiplies by dt_proj.weight past any adapter (PEFT's LoRA there changes nothing)"
_MAMBA_INCOMPATIBLE = {"out_proj": _PEFT_REFUSES, "conv1d": _PEFT_REFUSES}
_NO_ADAPTER = {"falcon_h1": _MAMBA_INCOMPATIBLE, "mamba2": _MAMBA_INCOMPATIBLE, "nemotron_h": _MAMBA_INCOMPATIBLE,
               "mamba": {**_MAMBA_INCOMPATIBLE, "dt_proj": _DT_PROJ},
               "falcon_mamba": {**_MAMBA_INCOMPATIBLE, "dt_proj": _DT_PROJ}, "jamba": {"dt_proj": _DT_PROJ}}
_LORA_LIKE = frozenset({"LORA", "ADALORA", "XLORA", "RANDLORA"})


def _check_mamba_targets(config: PeftConfig, targeted: Sequence[str], model_type: str | None) -> None:
    refused = _NO_ADAPTER.get(model_type)
    if refused is None or str(getattr(config, "peft_type", "")) not in _LORA_LIKE:
        return
    bad = [name for name in targeted if name.rsplit(".", 1)[-1] in refused]
    if bad:
        leaves = sorted({name.rsplit(".", 1)[-1] for name in bad})
        raise ValueError(
            f"{config.peft_type} on {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}: modules named {leaves} of a "
            f"Mamba-based model (model_type={model_type!r}) take no adapter, "
            f"{'; '.join(dict.fromkeys(refused[leaf] for leaf in leaves))}; remove them from target_modules "
            f"(target_modules={_show(config.target_modules)})")


def match_modules(config: PeftConfig, module_names: Iterable[str], *, model_type: str | None = None) -> list[str]:
    """Returns the module names ``config`` targets, in the given order, failing loudly on none.

    Args:
        config: A config with ``target_modules``. ``None`` is resolved from ``model_type``.
        module_names: The model's full dotted module names (the root's empty name is skipped).
        model_type: The transformers ``model_type``, needed only when ``target_modules`` is
            ``None``.

    Returns:
        The targeted names.

    Raises:
        ValueError: Nothing is targeted. The message says whether everything was excluded or
            nothing matched, and lists, per target entry, the closest module names and up to 10
            leaf names present in the model.

    Warns:
        UserWarning: ``exclude_modules`` was given but excluded nothing (PEFT warns the same).

    Example:
        >>> from peftjax.config import LoraConfig
        >>> names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
        >>> match_modules(LoraConfig(target_modules=["q_proj"]), names)
        ['model.layers.0.self_attn.q_proj']
    """
    view = _NAME_VIEW.get()
    if view is not None:  # a module is targeted under its own path or the name the view gives it
        names = [n for n in module_names if n]
        seen = {n: view(n) for n in names}
        with module_names_as(None):
            hit = set(match_modules(config, list(dict.fromkeys([*names, *seen.values()])), model_type=model_type))
        if getattr(config, "target_modules", None) is None and model_type is not None:
            config = resolve_target_modules(config, model_type)
        return [n for n in names if (n in hit or seen[n] in hit)
                and _EXCLUDED not in (_target_status(config, n), _target_status(config, seen[n]))]
    if getattr(config, "target_modules", None) is None and model_type is not None:
        config = resolve_target_modules(config, model_type)
    _target_modules_of(config)  # fail on None / "all-linear" before looking at any name
    names = [n for n in module_names if n]
    targeted, excluded, unmatched = [], [], []
    for name in names:
        status = _target_status(config, name)
        {_MATCHED: targeted, _EXCLUDED: excluded, _UNMATCHED: unmatched}[status].append(name)

    target = config.target_modules
    if not targeted:
        if excluded and not unmatched:
            head = (
                f"All modules were excluded by exclude_modules={_show(getattr(config, 'exclude_modules', None))} / "
                f"modules_to_save={_show(config.modules_to_save)}; check these and target_modules={_show(target)}."
            )
        elif not excluded:
            head = f"target_modules {_show(target)} matched none of the {len(names)} module names."
        else:
            head = (
                f"No modules were targeted by target_modules {_show(target)}: {len(excluded)} matched names were "
                f"excluded and the other {len(unmatched)} did not match."
            )
        raise ValueError(_no_match_message(config, names, excluded, head))
    _check_mamba_targets(config, targeted, model_type)
    if getattr(config, "exclude_modules", None) and not excluded:
        warnings.warn(
            f"You have passed exclude_modules={_show(config.exclude_modules)} but no modules were excluded. "
            "Please check that exclude_modules was set correctly.",
            stacklevel=2,
        )
    return targeted
