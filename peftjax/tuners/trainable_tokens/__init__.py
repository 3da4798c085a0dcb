"""Trainable tokens: a few embedding rows train (``TrainableTokensConfig`` from ``peftjax.config``)."""

from peftjax.config import TrainableTokensConfig
from peftjax.tuners.trainable_tokens._layer import TokensSpec, TrainableTokensLayer
from peftjax.tuners.trainable_tokens._model import (
    add_token_adapters,
    inject_trainable_tokens,
    input_embedding_name,
    load_tokens_state_dict,
    tokens_state_dict,
)

__all__ = [
    "TokensSpec",
    "TrainableTokensConfig",
    "TrainableTokensLayer",
    "add_token_adapters",
    "inject_trainable_tokens",
    "input_embedding_name",
    "load_tokens_state_dict",
    "tokens_state_dict",
]
