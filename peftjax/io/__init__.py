"""File formats shared by models and adapters."""

from peftjax.io._tokenizer import load_tokenizer
from peftjax.io._safetensors import (
    SafetensorsError,
    SafetensorsFile,
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)

__all__ = ["SafetensorsError", "SafetensorsFile", "load_tokenizer", "read_safetensors", "read_safetensors_header",
           "write_safetensors"]
