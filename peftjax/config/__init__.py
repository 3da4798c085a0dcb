"""Adapter configs (HF PEFT 0.22.0 field for field) and module targeting.

Pure Python: nothing here needs JAX. ``adapter_config.json`` files written here load in HF PEFT,
and files PEFT writes load here.
"""

from peftjax.config._base import (
    CONFIG_NAME,
    PeftConfig,
    PeftType,
    TaskType,
    config_class,
    config_from_dict,
    load_config,
)
from peftjax.config._adalora import AdaLoraConfig
from peftjax.config._adaption_prompt import AdaptionPromptConfig
from peftjax.config._beft import BeftConfig
from peftjax.config._c3a import C3AConfig
from peftjax.config._deft import DeftConfig
from peftjax.config._delora import DeloraConfig
from peftjax.config._fourierft import FourierFTConfig
from peftjax.config._waveft import WaveFTConfig
from peftjax.config._xlora import XLoraConfig
from peftjax.config._shadow import ShadowConfig
from peftjax.config._glora import GloraConfig
from peftjax.config._gralora import GraloraConfig
from peftjax.config._hira import HiraConfig
from peftjax.config._hra import HRAConfig
from peftjax.config._miss import MissConfig
from peftjax.config._randlora import RandLoraConfig
from peftjax.config._road import RoadConfig
from peftjax.config._vblora import VBLoRAConfig
from peftjax.config._shira import ShiraConfig
from peftjax.config._paca import PacaConfig
from peftjax.config._ln_tuning import LNTuningConfig
from peftjax.config._lora import (
    ArrowConfig,
    BdLoraConfig,
    KasaConfig,
    VeloraConfig,
    AstraConfig,
    CordaConfig,
    EvaConfig,
    LoftQConfig,
    LoraConfig,
    LoraGAConfig,
)
from peftjax.config._lycoris import LoHaConfig, LoKrConfig, LycorisConfig
from peftjax.config._oft import BOFTConfig, OFTConfig
from peftjax.config._lily import LilyConfig
from peftjax.config._osf import OSFConfig
from peftjax.config._peanut import PeanutConfig
from peftjax.config._poly import PolyConfig
from peftjax.config._supertuning import SupertuningConfig
from peftjax.config._tinylora import TinyLoraConfig
from peftjax.config._frod import FrodConfig
from peftjax.config._unilora import UniLoraConfig
from peftjax.config._other import (
    BottleneckConfig,
    IA3Config,
    CartridgeConfig,
    CPTConfig,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    MultitaskPromptTuningConfig,
    MultitaskPromptTuningInit,
    PromptTuningConfig,
    PromptTuningInit,
    prepare_prompt_learning_config,
)
from peftjax.config._trainable_tokens import TrainableTokensConfig
from peftjax.config._vera import PveraConfig, VeraConfig
from peftjax.config._targeting import (
    TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING,
    add_new_head_modules,
    add_task_modules_to_save,
    is_module_to_save,
    with_suffix_matched_modules_to_save,
    check_target_module_exists,
    expand_all_linear,
    get_pattern_key,
    is_all_linear,
    is_feedforward_module,
    match_modules,
    resolve_target_modules,
)

__all__ = [
    "AdaLoraConfig",
    "AdaptionPromptConfig",
    "CONFIG_NAME",
    "TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_FOURIERFT_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LNTUNING_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING",
    "TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING",
    "BOFTConfig",
    "BottleneckConfig",
    "AstraConfig",
    "CordaConfig",
    "EvaConfig",
    "LoraGAConfig",
    "ArrowConfig",
    "BdLoraConfig",
    "KasaConfig",
    "VeloraConfig",
    "C3AConfig",
    "DeloraConfig",
    "GraloraConfig",
    "HiraConfig",
    "ShiraConfig",
    "PacaConfig",
    "BeftConfig",
    "DeftConfig",
    "GloraConfig",
    "PeanutConfig",
    "SupertuningConfig",
    "UniLoraConfig",
    "PveraConfig",
    "OSFConfig",
    "LilyConfig",
    "TinyLoraConfig",
    "FrodConfig",
    "RandLoraConfig",
    "VBLoRAConfig",
    "FourierFTConfig",
    "WaveFTConfig",
    "XLoraConfig",
    "ShadowConfig",
    "HRAConfig",
    "MissConfig",
    "RoadConfig",
    "IA3Config",
    "LoftQConfig",
    "LNTuningConfig",
    "LoHaConfig",
    "LoKrConfig",
    "LoraConfig",
    "LycorisConfig",
    "OFTConfig",
    "PeftConfig",
    "PeftType",
    "CartridgeConfig",
    "CPTConfig",
    "PrefixTuningConfig",
    "PromptEncoderConfig",
    "PromptEncoderReparameterizationType",
    "PromptLearningConfig",
    "MultitaskPromptTuningConfig",
    "PolyConfig",
    "MultitaskPromptTuningInit",
    "PromptTuningConfig",
    "PromptTuningInit",
    "TaskType",
    "TrainableTokensConfig",
    "VeraConfig",
    "add_new_head_modules",
    "add_task_modules_to_save",
    "is_module_to_save",
    "with_suffix_matched_modules_to_save",
    "check_target_module_exists",
    "config_class",
    "config_from_dict",
    "expand_all_linear",
    "get_pattern_key",
    "is_all_linear",
    "is_feedforward_module",
    "load_config",
    "match_modules",
    "prepare_prompt_learning_config",
    "resolve_target_modules",
]
