"""PEFT methods, one folder each, on a shared base tuner.

- ``base/``: the adapter-layer interface and bookkeeping, the Variable types, the model-wide
  operations (merge, unload, ...), ``modules_to_save`` and the one PEFT state-dict walk.
- ``lora/``, ``ia3/``, ``loha/``, ``lokr/``, ``vera/``, ``fourierft/``, ``ln_tuning/``, ``bottleneck/``,
  ``trainable_tokens/``, ``prompt/``: each method's layers, injection and file layout; ``lycoris/`` is
  what LoHa and LoKr share.
- ``_registry.py`` maps a config type to its method; ``_builtin.py`` registers the built-in ones.

Adding a method is a new folder and one ``register_tuner`` line in ``_builtin.py``.
"""

from peftjax.tuners._registry import Tuner, inject_adapter_in_model, register_tuner, tuner_for
from peftjax.tuners.base import (
    FROZEN,
    TRAINABLE,
    AdapterDictLayer,
    AdapterLayer,
    AdapterParam,
    FrozenAdapterParam,
    LoraParam,
    ProjectedAdapterParam,
    TrainableParam,
    project_adapters,
    adapter_index,
    adapter_layers,
    clear_adapter_rows,
    delete_adapter,
    merge,
    named_modules,
    set_active_adapters,
    set_adapter_rows,
    set_adapter_trainable,
    set_adapters_disabled,
    unload,
    unmerge,
)
from peftjax.tuners.bottleneck import inject_bottleneck
from peftjax.tuners.fourierft import inject_fourierft
from peftjax.tuners.ia3 import inject_ia3
from peftjax.tuners.ln_tuning import inject_ln_tuning
from peftjax.tuners.loha import inject_loha
from peftjax.tuners.lokr import inject_lokr
from peftjax.tuners.lora import inject_lora
from peftjax.tuners.prompt import inject_prompt_learning
from peftjax.tuners.trainable_tokens import inject_trainable_tokens
from peftjax.tuners.vera import inject_vera

__all__ = [
    "FROZEN",
    "TRAINABLE",
    "AdapterDictLayer",
    "AdapterLayer",
    "AdapterParam",
    "FrozenAdapterParam",
    "LoraParam",
    "ProjectedAdapterParam",
    "TrainableParam",
    "project_adapters",
    "Tuner",
    "adapter_index",
    "adapter_layers",
    "clear_adapter_rows",
    "delete_adapter",
    "inject_adapter_in_model",
    "inject_bottleneck",
    "inject_fourierft",
    "inject_ia3",
    "inject_ln_tuning",
    "inject_loha",
    "inject_lokr",
    "inject_lora",
    "inject_prompt_learning",
    "inject_trainable_tokens",
    "inject_vera",
    "merge",
    "named_modules",
    "register_tuner",
    "set_active_adapters",
    "set_adapter_rows",
    "set_adapter_trainable",
    "set_adapters_disabled",
    "tuner_for",
    "unload",
    "unmerge",
]
