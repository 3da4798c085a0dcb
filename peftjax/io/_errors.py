"""Errors of checkpoint files shared by the layers that read them (models, quantized weights)."""


class CheckpointError(ValueError):
    """A checkpoint's weights do not fit the model: missing keys or wrong shapes.

    Public as ``peftjax.models.CheckpointError``; defined here so that ``peftjax.quantization``
    (a layer below models) can raise its subclass for a bitsandbytes quant state.
    """
