"""Flax NNX implementations of the architectures people fine-tune, loading HF checkpoints."""

from peftjax.models._auto import MODEL_CLASSES, from_pretrained, load_config, model_class_for
from peftjax.models._config import ModelConfig
from peftjax.models._bert import (
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertModel,
)
from peftjax.models._gemma import GemmaForCausalLM, GemmaForSequenceClassification, GemmaForTokenClassification
from peftjax.models._gemma2 import Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma2ForTokenClassification
from peftjax.models._gemma3 import Gemma3ForCausalLM, Gemma3TextForSequenceClassification
from peftjax.models._granite import GraniteForCausalLM
from peftjax.models._gpt2 import (
    Conv1D,
    GPT2ForQuestionAnswering,
    GPT2ForSequenceClassification,
    GPT2ForTokenClassification,
    GPT2LMHeadModel,
    GPT2Model,
)
from peftjax.models._gpt_oss import GptOssForCausalLM, GptOssForSequenceClassification, GptOssForTokenClassification
from peftjax.models._seed_oss import (
    SeedOssForCausalLM,
    SeedOssForQuestionAnswering,
    SeedOssForSequenceClassification,
    SeedOssForTokenClassification,
)
from peftjax.models._glm4 import Glm4ForCausalLM, Glm4ForSequenceClassification, Glm4ForTokenClassification
from peftjax.models._ernie4_5 import Ernie4_5ForCausalLM
from peftjax.models._llama import (
    LlamaForCausalLM,
    LlamaForQuestionAnswering,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    LlamaModel,
    MistralForCausalLM,
    MistralForQuestionAnswering,
    MistralForSequenceClassification,
    MistralForTokenClassification,
    Qwen2ForCausalLM,
    Qwen2ForQuestionAnswering,
    Qwen2ForSequenceClassification,
    Qwen2ForTokenClassification,
)
from peftjax.models._olmo import (
    Olmo2ForCausalLM,
    Olmo2ForSequenceClassification,
    Olmo3ForCausalLM,
    Olmo3ForSequenceClassification,
)
from peftjax.models._modernbert import (
    ModernBertForQuestionAnswering,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)
from peftjax.models._mixtral import (
    MixtralForCausalLM,
    MixtralForQuestionAnswering,
    MixtralForSequenceClassification,
    MixtralForTokenClassification,
)
from peftjax.models._phi3 import Phi3ForCausalLM, Phi3ForSequenceClassification, Phi3ForTokenClassification
from peftjax.models._smollm3 import (
    SmolLM3ForCausalLM,
    SmolLM3ForQuestionAnswering,
    SmolLM3ForSequenceClassification,
    SmolLM3ForTokenClassification,
)
from peftjax.models._qwen3 import (
    Qwen3ForCausalLM,
    Qwen3ForQuestionAnswering,
    Qwen3ForSequenceClassification,
    Qwen3ForTokenClassification,
)
from peftjax.models._qwen2_moe import (
    Qwen2MoeForCausalLM,
    Qwen2MoeForQuestionAnswering,
    Qwen2MoeForSequenceClassification,
    Qwen2MoeForTokenClassification,
)
from peftjax.models._qwen3_moe import (
    Qwen3MoeForCausalLM,
    Qwen3MoeForQuestionAnswering,
    Qwen3MoeForSequenceClassification,
    Qwen3MoeForTokenClassification,
)
from peftjax.models._roberta import (
    RobertaForQuestionAnswering,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    XLMRobertaForQuestionAnswering,
    XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
)
from peftjax.models._t5 import (
    MT5ForConditionalGeneration,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5ForSequenceClassification,
    T5Model,
    UMT5ForConditionalGeneration,
)
from peftjax.models._modeling import CheckpointError, NewWeightsWarning, PreTrainedModel, hf_state_dict, read_checkpoint
from peftjax.models._outputs import ModelOutput

__all__ = [
    "MODEL_CLASSES",
    "BertForQuestionAnswering",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "BertModel",
    "CheckpointError",
    "Conv1D",
    "GPT2ForQuestionAnswering",
    "GPT2ForSequenceClassification",
    "GPT2ForTokenClassification",
    "GemmaForCausalLM",
    "GemmaForSequenceClassification",
    "GemmaForTokenClassification",
    "Gemma2ForCausalLM",
    "Gemma2ForSequenceClassification",
    "Gemma2ForTokenClassification",
    "Gemma3ForCausalLM",
    "Gemma3TextForSequenceClassification",
    "GPT2LMHeadModel",
    "GraniteForCausalLM",
    "GPT2Model",
    "LlamaForCausalLM",
    "LlamaForQuestionAnswering",
    "LlamaForSequenceClassification",
    "LlamaForTokenClassification",
    "LlamaModel",
    "MistralForCausalLM",
    "MistralForQuestionAnswering",
    "MistralForSequenceClassification",
    "MistralForTokenClassification",
    "GptOssForCausalLM",
    "GptOssForSequenceClassification",
    "GptOssForTokenClassification",
    "SeedOssForCausalLM",
    "SeedOssForQuestionAnswering",
    "SeedOssForSequenceClassification",
    "SeedOssForTokenClassification",
    "Glm4ForCausalLM",
    "Glm4ForSequenceClassification",
    "Glm4ForTokenClassification",
    "Ernie4_5ForCausalLM",
    "MixtralForCausalLM",
    "MixtralForQuestionAnswering",
    "MixtralForSequenceClassification",
    "MixtralForTokenClassification",
    "ModelConfig",
    "ModernBertForQuestionAnswering",
    "ModernBertForSequenceClassification",
    "ModernBertForTokenClassification",
    "ModernBertModel",
    "ModelOutput",
    "NewWeightsWarning",
    "Olmo2ForCausalLM",
    "Olmo2ForSequenceClassification",
    "Olmo3ForCausalLM",
    "Olmo3ForSequenceClassification",
    "Phi3ForCausalLM",
    "Phi3ForSequenceClassification",
    "Phi3ForTokenClassification",
    "PreTrainedModel",
    "Qwen2ForCausalLM",
    "Qwen2ForQuestionAnswering",
    "Qwen2ForSequenceClassification",
    "Qwen2ForTokenClassification",
    "Qwen2MoeForCausalLM",
    "Qwen2MoeForQuestionAnswering",
    "Qwen2MoeForSequenceClassification",
    "Qwen2MoeForTokenClassification",
    "Qwen3ForCausalLM",
    "Qwen3ForQuestionAnswering",
    "Qwen3ForSequenceClassification",
    "Qwen3ForTokenClassification",
    "Qwen3MoeForCausalLM",
    "Qwen3MoeForQuestionAnswering",
    "Qwen3MoeForSequenceClassification",
    "Qwen3MoeForTokenClassification",
    "RobertaForQuestionAnswering",
    "RobertaForSequenceClassification",
    "RobertaForTokenClassification",
    "RobertaModel",
    "SmolLM3ForCausalLM",
    "SmolLM3ForQuestionAnswering",
    "SmolLM3ForSequenceClassification",
    "SmolLM3ForTokenClassification",
    "XLMRobertaForQuestionAnswering",
    "XLMRobertaForSequenceClassification",
    "XLMRobertaForTokenClassification",
    "XLMRobertaModel",
    "MT5ForConditionalGeneration",
    "UMT5ForConditionalGeneration",
    "T5EncoderModel",
    "T5ForConditionalGeneration",
    "T5ForSequenceClassification",
    "T5Model",
    "from_pretrained",
    "hf_state_dict",
    "load_config",
    "model_class_for",
    "read_checkpoint",
]
