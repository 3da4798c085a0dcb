"""Pure-JAX building blocks that models, tuners and training share (below ``models`` in the layering).

``dropout_key`` is public as ``peftjax.dropout_key``. ``keep_mask`` and ``fold_key`` are the
dropout masks and key folds every peftjax layer uses, for a user's own layers to draw theirs alike.
"""

from peftjax.nn._dropout import active_dropout_key, apply_dropout, dropout_key, fold_key, keep_mask
from peftjax.nn._param_reader import ParamReader

__all__ = ["ParamReader", "active_dropout_key", "apply_dropout", "dropout_key", "fold_key", "keep_mask"]
