"""``ShadowConfig``: HF PEFT 0.22.0's ShadowPEFT config, field for field."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import PeftConfig, check_bool, check_int, check_number, check_optional_str, to_str_tuple
from peftjax.config._vera import check_layer_selection


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShadowConfig(PeftConfig):
    """ShadowPEFT: a small trainable *shadow* network beside a frozen decoder.

    A shadow backbone (the base's own decoder class, ``shadow_num_hidden_layers`` layers, freshly
    drawn) reads the input embeddings; its output is the initial shadow state ``s``. Before each
    targeted decoder block the block's input becomes ``h + shadow_alpha * up(down(dropout(h - s)))``,
    and after it the state moves toward the block's output through a gated update,
    ``s <- (1 - g) * s + g * t``, with ``t`` and ``g`` two small GELU networks of the output
    (``g`` through a sigmoid). With labels, ``auxiliary_loss_weight`` times the language-model loss
    of the initial state (through the base's output head) joins the loss.

    Attributes:
        target_modules: The decoder blocks (``None``: every one, ``model.layers.<i>``); they must be
            consecutive.
        exclude_modules: Blocks never targeted.
        r: The injection's rank.
        shadow_alpha: The injection's scale.
        shadow_dropout: Dropout on ``h - s`` while training.
        init_weights: Start ``up`` at zero (the injection adds nothing at first).
        shadow_model: ``"mirror"`` (PEFT also takes a pretrained checkpoint: not supported here).
        shadow_num_hidden_layers: The shadow backbone's layers (``None``: 1).
        shadow_hidden_size: Its width (``None``: the base's; another width adds a projection).
        shadow_num_attention_heads: Its attention heads (``None``: the base's).
        shadow_intermediate_size: Its MLP width (``None``: the base's).
        share_embeddings: Feed it the base's input embeddings (when the widths match) instead of
            its own table.
        update_hidden_size: The update networks' width (``None``: ``r``).
        auxiliary_loss_weight: The weight of the shadow state's own loss.
        layers_to_transform: Only blocks with these indices.
        layers_pattern: The name of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    peft_type: ClassVar[str] = "SHADOW"

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    r: int = 8
    shadow_alpha: float = 0.1
    shadow_dropout: float = 0.2
    init_weights: bool = True
    shadow_model: str = "mirror"
    shadow_num_hidden_layers: int | None = None
    shadow_hidden_size: int | None = None
    shadow_num_attention_heads: int | None = None
    shadow_intermediate_size: int | None = None
    share_embeddings: bool = True
    update_hidden_size: int | None = None
    auxiliary_loss_weight: float = 0.05
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_layer_selection(self)
        check_int("r", self.r, minimum=1)
        for name in ("shadow_alpha", "shadow_dropout", "auxiliary_loss_weight"):
            check_number(name, getattr(self, name))
        check_bool("init_weights", self.init_weights)
        check_optional_str("shadow_model", self.shadow_model)
        sizes = ("shadow_num_hidden_layers", "shadow_hidden_size", "shadow_num_attention_heads",
                 "shadow_intermediate_size")
        for name in sizes + ("update_hidden_size",):
            check_int(name, getattr(self, name), minimum=1, optional=True)
        check_bool("share_embeddings", self.share_embeddings)
        configured = [name for name in sizes if getattr(self, name) is not None]
        if self.shadow_model != "mirror" and configured:  # PEFT's message
            raise ValueError("Explicit `shadow_model` checkpoints define their architecture; unset these mirror-only "
                             f"overrides: {', '.join(configured)}.")
