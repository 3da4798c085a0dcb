"""Pure-JAX building blocks that models, tuners and training share (below ``models`` in the layering).

``dropout_key`` is public as ``peftjax.dropout_key``.
"""

from peftjax.nn._dropout import active_dropout_key, apply_dropout, dropout_key
from peftjax.nn._param_reader import ParamReader

__all__ = ["ParamReader", "active_dropout_key", "apply_dropout", "dropout_key"]
