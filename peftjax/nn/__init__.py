"""Pure-JAX building blocks that models, tuners and training share (below ``models`` in the layering).

``dropout_key`` is public as ``peftjax.dropout_key``.
"""

from peftjax.nn._dropout import active_dropout_key, apply_dropout, dropout_key

__all__ = ["active_dropout_key", "apply_dropout", "dropout_key"]
