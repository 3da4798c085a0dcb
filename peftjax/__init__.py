"""peftjax: parameter-efficient fine-tuning for JAX and Flax, file-compatible with Hugging Face PEFT.

The public surface. HF PEFT's names (``LoraConfig``, ``get_peft_model``, ``PeftModel``) sit beside
the functional core for JAX users (``split``, ``combine``, ``make_train_step``, ``optax_labels``,
``inject_lora``, ``merge``, ``unmerge``, ``dropout_key``, ``set_adapter_rows`` for a different
adapter per batch row), and PEFT's functional API for every
method (``inject_adapter_in_model``, ``get_peft_model_state_dict``, ``set_peft_model_state_dict``).
Sharded training over device meshes lives in the ``peftjax.sharding`` subpackage (``make_mesh``,
``shard_model``, ``load_sharded``).
"""

from peftjax._version import __version__ as __version__
from peftjax.config import (
    AdaLoraConfig,
    AdaptionPromptConfig,
    BOFTConfig,
    BottleneckConfig,
    CordaConfig,
    EvaConfig,
    FourierFTConfig,
    HRAConfig,
    MissConfig,
    RoadConfig,
    IA3Config,
    LoftQConfig,
    LNTuningConfig,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    OFTConfig,
    PeftConfig,
    PeftType,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    TaskType,
    TrainableTokensConfig,
    VeraConfig,
)
from peftjax import sharding
from peftjax.io import load_tokenizer
from peftjax.peft_model import (
    AdapterKeyError,
    DonatedAdapterError,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from peftjax.auto import AutoPeftModel
from peftjax.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap
from peftjax.training import (
    Trainer,
    TrainingArguments,
    combine,
    make_adalora_train_step,
    make_train_step,
    optax_labels,
    release_host_memory,
    split,
)
from peftjax.nn import dropout_key
from peftjax.quantization import QuantizationConfig, prepare_model_for_kbit_training
from peftjax.tuners import (
    FROZEN,
    TRAINABLE,
    AdapterParam,
    LoraParam,
    TrainableParam,
    clear_adapter_rows,
    inject_adapter_in_model,
    inject_lora,
    merge,
    set_adapter_rows,
    unload,
    unmerge,
)
from peftjax.tuners.prompt import virtual_positions
from peftjax.tuners.lora import (
    convert_to_lora,
    get_eva_state_dict,
    initialize_lora_eva_weights,
    preprocess_corda,
    save_as_lora,
)

__all__ = [
    "prepare_model_for_kbit_training",
    "AdapterKeyError",
    "AdapterParam",
    "AutoPeftModel",
    "DonatedAdapterError",
    "FROZEN",
    "TRAINABLE",
    "AdaLoraConfig",
    "AdaptionPromptConfig",
    "BOFTConfig",
    "BottleneckConfig",
    "CordaConfig",
    "EvaConfig",
    "FourierFTConfig",
    "HRAConfig",
    "MissConfig",
    "RoadConfig",
    "IA3Config",
    "LoftQConfig",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "OFTConfig",
    "QuantizationConfig",
    "LoraParam",
    "PeftConfig",
    "PeftModel",
    "PeftType",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptTuningConfig",
    "TaskType",
    "TrainableTokensConfig",
    "VeraConfig",
    "Trainer",
    "TrainableParam",
    "TrainingArguments",
    "clear_adapter_rows",
    "combine",
    "convert_to_lora",
    "dropout_key",
    "get_eva_state_dict",
    "get_peft_model",
    "initialize_lora_eva_weights",
    "preprocess_corda",
    "save_as_lora",
    "get_peft_model_state_dict",
    "hotswap_adapter",
    "inject_adapter_in_model",
    "inject_lora",
    "make_adalora_train_step",
    "make_train_step",
    "merge",
    "optax_labels",
    "prepare_model_for_compiled_hotswap",
    "release_host_memory",
    "load_tokenizer",
    "set_adapter_rows",
    "set_peft_model_state_dict",
    "sharding",
    "split",
    "unload",
    "unmerge",
    "virtual_positions",
]
