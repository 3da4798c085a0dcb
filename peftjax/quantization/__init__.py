"""Quantized base weights in bitsandbytes' formats (QLoRA): codes, config, layers."""
