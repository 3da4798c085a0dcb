"""Quantized base weights in bitsandbytes' formats (QLoRA): the codes, the config, the layers.

``models.from_pretrained(path, quantization_config=QuantizationConfig(load_in_4bit=True, ...))``
stores the linears as :class:`Linear4bit` / :class:`Linear8bitLt`; adapters then train on top.
"""

from peftjax.quantization._bnb import (
    Quant4,
    dequantize_4bit,
    int8_dequantize,
    int8_vectorwise_quant,
    quantize_4bit,
)
from peftjax.quantization._config import QuantizationConfig
from peftjax.quantization._linear import Linear4bit, Linear8bitLt, QuantizedLinear, QuantizedWeight
from peftjax.quantization._model import (
    dequantize_model,
    prepare_model_for_kbit_training,
    quantize_model,
    quantized_bytes,
    quantized_linears,
)

__all__ = [
    "Linear4bit",
    "Linear8bitLt",
    "Quant4",
    "QuantizationConfig",
    "QuantizedLinear",
    "QuantizedWeight",
    "dequantize_4bit",
    "dequantize_model",
    "int8_dequantize",
    "int8_vectorwise_quant",
    "prepare_model_for_kbit_training",
    "quantize_4bit",
    "quantize_model",
    "quantized_bytes",
    "quantized_linears",
]
