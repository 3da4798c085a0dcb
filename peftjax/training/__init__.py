"""Training: jitted train steps that update only the adapters."""

from peftjax.training._step import combine, make_train_step, optax_labels, split

__all__ = ["combine", "make_train_step", "optax_labels", "split"]
