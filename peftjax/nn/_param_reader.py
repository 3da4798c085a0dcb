"""``ParamReader``: a module that reads its bare parameters through one method, so LoRA can adapt them.

LoRA's ``target_parameters`` (PEFT's ``ParamWrapper``) changes what a module computes with a
parameter, not the module's layer type; a module opts in by reading each parameter it wants
adaptable as ``self.param_value("gate_up_proj")`` instead of ``self.gate_up_proj.get_value()``.
"""

from __future__ import annotations

import jax


class ParamReader:
    """Mixin: ``param_value(attr)`` is the value of the ``nnx.Param`` at ``attr``.

    LoRA on parameters overrides it to return ``W + s * ΔW`` (``peftjax.tuners.lora._param``).
    """

    def param_value(self, attr: str) -> jax.Array:
        return getattr(self, attr).get_value()
