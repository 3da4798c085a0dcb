"""Registers peftjax's built-in PEFT methods with the tuner registry (imported lazily).

A method is a folder under ``peftjax/tuners/`` and one line here.
"""

from peftjax.tuners._registry import Tuner, register_tuner
from peftjax.tuners.adalora import AdaLoraConfig, adalora_state_dict, inject_adalora, load_adalora_state_dict
from peftjax.tuners.adaption_prompt import AdaptionPromptConfig, AdaptionPromptLayer, inject_adaption_prompt
from peftjax.tuners.beft import BeftConfig, BeftLayer, inject_beft
from peftjax.tuners.boft import BOFTConfig, BOFTLayer, inject_boft
from peftjax.tuners.bottleneck import BottleneckConfig, BottleneckLayer, inject_bottleneck
from peftjax.tuners.c3a import C3AConfig, C3ALayer, inject_c3a
from peftjax.tuners.deft import DeftConfig, DeftLayer, inject_deft
from peftjax.tuners.delora import DeloraConfig, DeloraLayer, inject_delora
from peftjax.tuners.glora import GloraConfig, GloraLayer, inject_glora
from peftjax.tuners.frod import FrodConfig, frod_state_dict, inject_frod, load_frod_state_dict
from peftjax.tuners.fourierft import FourierFTConfig, FourierFTLayer, inject_fourierft
from peftjax.tuners.waveft import WaveFTConfig, WaveFTLayer, inject_waveft
from peftjax.tuners.xlora import XLoraConfig, inject_xlora, load_xlora_state_dict, xlora_state_dict
from peftjax.tuners.shadow import ShadowConfig, inject_shadow, load_shadow_state_dict, shadow_state_dict
from peftjax.tuners.gralora import GraloraConfig, GraloraLayer, inject_gralora
from peftjax.tuners.hira import HiraConfig, HiraLayer, inject_hira
from peftjax.tuners.hra import HRAConfig, HRALayer, inject_hra
from peftjax.tuners.miss import MissConfig, MissLayer, inject_miss
from peftjax.tuners.randlora import RandLoraConfig, inject_randlora, load_randlora_state_dict, randlora_state_dict
from peftjax.tuners.road import RoadConfig, RoadLayer, inject_road
from peftjax.tuners.shira import ShiraConfig, ShiraLayer, inject_shira
from peftjax.tuners.paca import PacaConfig, PacaLayer, inject_paca
from peftjax.tuners.ia3 import IA3Config, IA3Layer, inject_ia3
from peftjax.tuners.ln_tuning import LNTuningConfig, LNTuningLayer, inject_ln_tuning
from peftjax.tuners.loha import LoHaConfig, LoHaLinear, inject_loha
from peftjax.tuners.lokr import LoKrConfig, LoKrLinear, inject_lokr
from peftjax.tuners.lora import LoraConfig, LoraLayer, inject_lora
from peftjax.tuners.oft import OFTConfig, OFTLayer, inject_oft
from peftjax.tuners.lily import LilyConfig, LilyLayer, inject_lily
from peftjax.tuners.osf import OSFConfig, OSFLayer, inject_osf
from peftjax.tuners.peanut import PeanutConfig, PeanutLayer, inject_peanut
from peftjax.tuners.poly import PolyConfig, PolyLayer, inject_poly
from peftjax.tuners.prompt import (
    PROMPT_LEARNING_CONFIGS,
    inject_prompt_learning,
    load_prompt_state_dict,
    prompt_state_dict,
)
from peftjax.tuners.supertuning import SupertuningConfig, SupertuningLayer, inject_supertuning
from peftjax.tuners.tinylora import TinyLoraConfig, inject_tinylora, load_tinylora_state_dict, tinylora_state_dict
from peftjax.tuners.trainable_tokens import (
    TrainableTokensConfig,
    TrainableTokensLayer,
    inject_trainable_tokens,
    load_tokens_state_dict,
    tokens_state_dict,
)
from peftjax.tuners.unilora import UniLoraConfig, inject_unilora, load_unilora_state_dict, unilora_state_dict
from peftjax.tuners.vblora import VBLoRAConfig, inject_vblora, load_vblora_state_dict, vblora_state_dict
from peftjax.tuners.vera import (
    PveraConfig,
    VeraConfig,
    inject_pvera,
    inject_vera,
    load_vera_state_dict,
    vera_state_dict,
)

register_tuner(Tuner(AdaLoraConfig, inject=inject_adalora, state_dict=adalora_state_dict,
                     load_state_dict=load_adalora_state_dict))
# LoRA's trainable_token_indices puts trainable-tokens layers beside the LoRA layers
register_tuner(Tuner.for_layers(LoraConfig, inject=inject_lora, layer_type=(LoraLayer, TrainableTokensLayer)))
register_tuner(Tuner.for_layers(IA3Config, inject=inject_ia3, layer_type=IA3Layer))
register_tuner(Tuner(VeraConfig, inject=inject_vera, state_dict=vera_state_dict, load_state_dict=load_vera_state_dict))
register_tuner(Tuner(PveraConfig, inject=inject_pvera, state_dict=vera_state_dict,
                     load_state_dict=load_vera_state_dict))
register_tuner(Tuner.for_layers(FourierFTConfig, inject=inject_fourierft, layer_type=FourierFTLayer))
register_tuner(Tuner.for_layers(WaveFTConfig, inject=inject_waveft, layer_type=WaveFTLayer))
register_tuner(Tuner(XLoraConfig, inject=inject_xlora, state_dict=xlora_state_dict,
                     load_state_dict=load_xlora_state_dict))
register_tuner(Tuner(ShadowConfig, inject=inject_shadow, state_dict=shadow_state_dict,
                     load_state_dict=load_shadow_state_dict))
register_tuner(Tuner.for_layers(LNTuningConfig, inject=inject_ln_tuning, layer_type=LNTuningLayer))
register_tuner(Tuner.for_layers(LoHaConfig, inject=inject_loha, layer_type=LoHaLinear))
register_tuner(Tuner.for_layers(LoKrConfig, inject=inject_lokr, layer_type=LoKrLinear))
register_tuner(Tuner.for_layers(OFTConfig, inject=inject_oft, layer_type=OFTLayer))
register_tuner(Tuner.for_layers(BOFTConfig, inject=inject_boft, layer_type=BOFTLayer))
register_tuner(Tuner.for_layers(HRAConfig, inject=inject_hra, layer_type=HRALayer))
register_tuner(Tuner.for_layers(MissConfig, inject=inject_miss, layer_type=MissLayer))
register_tuner(Tuner.for_layers(RoadConfig, inject=inject_road, layer_type=RoadLayer))
register_tuner(Tuner.for_layers(DeloraConfig, inject=inject_delora, layer_type=DeloraLayer))
register_tuner(Tuner.for_layers(C3AConfig, inject=inject_c3a, layer_type=C3ALayer))
register_tuner(Tuner.for_layers(GraloraConfig, inject=inject_gralora, layer_type=GraloraLayer))
register_tuner(Tuner.for_layers(ShiraConfig, inject=inject_shira, layer_type=ShiraLayer))
register_tuner(Tuner.for_layers(PacaConfig, inject=inject_paca, layer_type=PacaLayer))
register_tuner(Tuner.for_layers(HiraConfig, inject=inject_hira, layer_type=HiraLayer))
register_tuner(Tuner.for_layers(BeftConfig, inject=inject_beft, layer_type=BeftLayer))
register_tuner(Tuner.for_layers(GloraConfig, inject=inject_glora, layer_type=GloraLayer))
register_tuner(Tuner.for_layers(DeftConfig, inject=inject_deft, layer_type=DeftLayer))
register_tuner(Tuner.for_layers(PeanutConfig, inject=inject_peanut, layer_type=PeanutLayer))
register_tuner(Tuner.for_layers(SupertuningConfig, inject=inject_supertuning, layer_type=SupertuningLayer))
register_tuner(Tuner.for_layers(LilyConfig, inject=inject_lily, layer_type=LilyLayer))
register_tuner(Tuner.for_layers(OSFConfig, inject=inject_osf, layer_type=OSFLayer))
register_tuner(Tuner.for_layers(PolyConfig, inject=inject_poly, layer_type=PolyLayer))
register_tuner(Tuner(RandLoraConfig, inject=inject_randlora, state_dict=randlora_state_dict,
                     load_state_dict=load_randlora_state_dict))
register_tuner(Tuner(FrodConfig, inject=inject_frod, state_dict=frod_state_dict, load_state_dict=load_frod_state_dict))
register_tuner(Tuner(VBLoRAConfig, inject=inject_vblora, state_dict=vblora_state_dict,
                     load_state_dict=load_vblora_state_dict))
register_tuner(Tuner(UniLoraConfig, inject=inject_unilora, state_dict=unilora_state_dict,
                     load_state_dict=load_unilora_state_dict))
register_tuner(Tuner(TinyLoraConfig, inject=inject_tinylora, state_dict=tinylora_state_dict,
                     load_state_dict=load_tinylora_state_dict))
register_tuner(Tuner(TrainableTokensConfig, inject=inject_trainable_tokens, state_dict=tokens_state_dict,
                     load_state_dict=load_tokens_state_dict))
register_tuner(Tuner.for_layers(AdaptionPromptConfig, inject=inject_adaption_prompt, layer_type=AdaptionPromptLayer))
register_tuner(Tuner.for_layers(BottleneckConfig, inject=inject_bottleneck, layer_type=BottleneckLayer))
for _config_class in PROMPT_LEARNING_CONFIGS:
    register_tuner(Tuner(_config_class, inject=inject_prompt_learning, state_dict=prompt_state_dict,
                         load_state_dict=load_prompt_state_dict))
