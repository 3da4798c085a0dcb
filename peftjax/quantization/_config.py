"""``QuantizationConfig``: transformers' ``BitsAndBytesConfig`` fields, for ``models.from_pretrained``."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from peftjax.quantization._bnb import QUANT_TYPES

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _dtype_name(dtype: Any) -> str | None:
    """``torch.bfloat16``, ``"bfloat16"``, ``jnp.bfloat16`` -> ``"bfloat16"``; ``None`` stays."""
    if dtype is None:
        return None
    name = str(dtype).removeprefix("torch.")
    try:
        name = jnp.dtype(name).name
    except TypeError:
        try:
            name = jnp.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in COMPUTE_DTYPES:
        raise ValueError(f"bnb_4bit_compute_dtype {dtype!r} is not supported; expected one of {list(COMPUTE_DTYPES)}")
    return name


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizationConfig:
    """How a model's linear weights are stored: bitsandbytes' int8 or 4-bit formats.

    The fields and defaults are transformers' ``BitsAndBytesConfig`` (so ``from_dict`` of its
    ``to_dict()`` works). Embeddings, norms, ``lm_head`` and the modules named in
    ``llm_int8_skip_modules`` stay in floating point, as transformers leaves them.

    Attributes:
      load_in_8bit: LLM.int8() weights: ``int8 [out, in]`` plus per-row absmax (``SCB``).
      load_in_4bit: 4-bit weights in blocks of 64 (``bnb_4bit_quant_type``).
      llm_int8_threshold: LLM.int8()'s outlier threshold. peftjax never quantizes activations: every
        input column is multiplied at the compute dtype by the dequantized weight, which is what
        bitsandbytes does for its outlier columns; so any threshold is accepted and the result is
        bitsandbytes' up to its int8 rounding of the other activations (a few 1e-3 relative).
      llm_int8_skip_modules: module names (or dotted-path suffixes) kept in floating point; default
        (``None``) ``["lm_head"]``, plus classifier heads (``score``, ``classifier``).
      bnb_4bit_quant_type: ``"nf4"`` or ``"fp4"`` (transformers' default).
      bnb_4bit_use_double_quant: quantize the absmax values too (8 bits in blocks of 256).
      bnb_4bit_compute_dtype: the dtype of the matmul with the dequantized weight (``None``: the
        model's dtype). ``torch.bfloat16``, ``"bfloat16"`` and ``jnp.bfloat16`` all work.
      bnb_4bit_quant_storage: only ``"uint8"`` (bitsandbytes' default) is supported.

    >>> QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").bits
    4
    """

    load_in_8bit: bool = False
    load_in_4bit: bool = False
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: tuple[str, ...] | None = None
    llm_int8_enable_fp32_cpu_offload: bool = False
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_compute_dtype: Any = None
    bnb_4bit_quant_storage: Any = "uint8"

    def __post_init__(self):
        if self.load_in_8bit == self.load_in_4bit:
            raise ValueError("QuantizationConfig: set exactly one of load_in_8bit and load_in_4bit")
        if self.bnb_4bit_quant_type not in QUANT_TYPES:
            raise ValueError(f"bnb_4bit_quant_type {self.bnb_4bit_quant_type!r} is not supported; "
                             f"expected one of {list(QUANT_TYPES)}")
        object.__setattr__(self, "bnb_4bit_compute_dtype", _dtype_name(self.bnb_4bit_compute_dtype))
        if str(self.bnb_4bit_quant_storage).removeprefix("torch.") != "uint8":
            raise ValueError(f"bnb_4bit_quant_storage {self.bnb_4bit_quant_storage!r} is not supported; only uint8")
        if self.llm_int8_has_fp16_weight:
            raise ValueError("llm_int8_has_fp16_weight=True (int8 training of the base) is not supported")
        if self.llm_int8_skip_modules is not None:
            if isinstance(self.llm_int8_skip_modules, str):
                raise TypeError("llm_int8_skip_modules must be a list of module names, not a string")
            object.__setattr__(self, "llm_int8_skip_modules", tuple(self.llm_int8_skip_modules))

    @property
    def bits(self) -> int:
        return 8 if self.load_in_8bit else 4

    @property
    def quant_method(self) -> str:
        return "bitsandbytes"

    def skip_modules(self) -> tuple[str, ...]:
        if self.llm_int8_skip_modules is not None:
            return self.llm_int8_skip_modules
        return ("lm_head", "score", "classifier")

    def to_dict(self) -> dict[str, Any]:
        """transformers' ``BitsAndBytesConfig.to_dict()`` keys (``quantization_config`` in config.json)."""
        out = dataclasses.asdict(self)
        out["llm_int8_skip_modules"] = None if self.llm_int8_skip_modules is None else list(self.llm_int8_skip_modules)
        out["bnb_4bit_compute_dtype"] = self.bnb_4bit_compute_dtype or "float32"
        out["quant_method"] = "bitsandbytes"
        out["_load_in_4bit"], out["_load_in_8bit"] = self.load_in_4bit, self.load_in_8bit
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantizationConfig":
        """From ``to_dict()`` here or transformers' (unknown keys, such as ``quant_method``, are dropped)."""
        d = dict(d)
        if d.get("quant_method", "bitsandbytes") != "bitsandbytes":
            raise ValueError(f"quant_method {d['quant_method']!r} is not supported; only 'bitsandbytes'")
        d.setdefault("load_in_4bit", d.get("_load_in_4bit", False))
        d.setdefault("load_in_8bit", d.get("_load_in_8bit", False))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_any(cls, config) -> "QuantizationConfig":
        """A ``QuantizationConfig``, a dict, or a transformers ``BitsAndBytesConfig``."""
        if isinstance(config, cls):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if hasattr(config, "to_dict") and type(config).__name__ == "BitsAndBytesConfig":
            return cls.from_dict(config.to_dict())
        raise TypeError(f"quantization_config must be a QuantizationConfig, a dict or a BitsAndBytesConfig; "
                        f"found {type(config).__name__}")
