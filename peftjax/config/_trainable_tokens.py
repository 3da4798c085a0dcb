"""``TrainableTokensConfig``: HF PEFT 0.22.0's trainable-tokens config, field for field."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

from peftjax.config._base import PeftConfig, check_bool, to_str_tuple


def token_index_tuple(name: str, value: Any) -> tuple[int, ...]:
    """``value`` (a list of token ids) as a tuple of non-negative ints, in the given order.

    Raises:
        TypeError: ``value`` is not a list/tuple of ints (names ``name``).
        ValueError: an index is negative or repeated.
    """
    if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TypeError(f"`{name}` must be a list of int token indices, got {value!r}.")
    if any(v < 0 for v in value):
        raise ValueError(f"`{name}` must hold non-negative token indices, got {list(value)}.")
    if len(set(value)) != len(value):
        raise ValueError(f"`{name}` holds a token index twice: {list(value)}.")
    return tuple(value)


def token_indices_by_layer(name: str, value: Any) -> tuple[int, ...] | dict[str, tuple[int, ...]] | None:
    """``LoraConfig.trainable_token_indices`` normalized: ``None``, a tuple (the input embedding) or
    ``{module name: tuple}``."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad or not value:
            raise TypeError(f"`{name}` as a dict must map module names (str) to token index lists, got {value!r}.")
        return {k: token_index_tuple(f"{name}[{k!r}]", v) for k, v in value.items()}
    return token_index_tuple(name, value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainableTokensConfig(PeftConfig):
    """Trainable tokens: a few rows of an embedding table train, the rest stay frozen.

    The adapter holds the selected rows (``trainable_tokens_delta: [n_tokens, dim]``, despite
    PEFT's name the new values, not a difference); the forward looks them up in place of the
    table's rows. An LM head tied to the targeted input embedding uses the same rows.

    Attributes:
        token_indices: The token ids whose embeddings train.
        target_modules: The embedding layers (``nnx.Embed``), the syntax of
            ``LoraConfig.target_modules``; ``None`` means the model's input embedding (PEFT writes
            its name, e.g. ``"model.embed_tokens"``).
        init_weights: ``True``: the rows start as the table's own (a no-op adapter). ``False``:
            standard normal values (for tests).
        modules_to_save: Not a field of PEFT's config (it is not written); must stay ``None``.
    """

    peft_type: ClassVar[str] = "TRAINABLE_TOKENS"

    token_indices: tuple[int, ...] = ()
    target_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("token_indices", token_index_tuple("token_indices", self.token_indices))
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_bool("init_weights", self.init_weights)
        if self.modules_to_save is not None:
            raise ValueError("TrainableTokensConfig has no modules_to_save (PEFT's has none); train whole modules "
                             "with a LoraConfig(trainable_token_indices=..., modules_to_save=...) instead.")

    def to_dict(self) -> dict[str, Any]:
        """The fields PEFT 0.22.0 writes for the method (``modules_to_save`` is not one of them)."""
        out = super().to_dict()
        del out["modules_to_save"]
        return out
