"""The LyCORIS configs, ``LoHaConfig`` and ``LoKrConfig``: HF PEFT 0.22.0's, field for field.

Both derive from PEFT's ``LycorisConfig`` (``rank_pattern``, ``alpha_pattern``), which
:class:`LycorisConfig` mirrors; the layers are in ``peftjax.tuners.loha`` / ``peftjax.tuners.lokr``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_int,
    check_number,
    check_probability,
    to_str_tuple,
)
from peftjax.config._lora import _layer_indices, _pattern_dict
from peftjax.config._targeting import get_pattern_key


@dataclasses.dataclass(frozen=True, kw_only=True)
class LycorisConfig(PeftConfig):
    """The fields LoHa and LoKr share (PEFT's ``LycorisConfig`` and the fields both subclasses have).

    Attributes:
        rank_pattern: ``{name_or_regex: r}`` overriding ``r`` per module; the first key matching
            the end of the module name wins (``get_pattern_key``).
        alpha_pattern: ``{name_or_regex: alpha}`` overriding ``alpha`` per module.
        r: The rank of the low-rank factors.
        alpha: The scaling numerator: the update is scaled by ``alpha / r``.
        rank_dropout: While training, each output row of the weight update is dropped with this
            probability (see the method's layer for the rescaling).
        module_dropout: While training, the whole adapter of a layer is skipped for a step with
            this probability.
        use_effective_conv2d: PEFT's CP decomposition for convolution kernels larger than 1.
            peftjax's bundled models have no convolutions: only ``False`` is supported.
        target_modules: Which modules get the adapter; the same syntax and matching as
            ``LoraConfig.target_modules`` (``None``: PEFT's LoRA default for the architecture).
            PEFT adapts ``torch.nn.Linear`` (and convolutions) only, so transformers' ``Conv1D``
            (GPT-2) and embeddings are refused, as PEFT refuses them.
        exclude_modules: Modules never targeted, same syntax; checked first.
        init_weights: The initialization (see the method's config).
        layers_to_transform: Only adapt modules in these layer indices (an int or a list).
        layers_pattern: The name(s) of the layer list ``layers_to_transform`` indexes.
        modules_to_save: See :class:`PeftConfig`.
    """

    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = dataclasses.field(default_factory=dict)
    r: int = 8
    alpha: int | float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("rank_pattern", _pattern_dict("rank_pattern", self.rank_pattern, integer=True))
        self._set("alpha_pattern", _pattern_dict("alpha_pattern", self.alpha_pattern, integer=False))
        check_int("r", self.r, minimum=1)
        check_number("alpha", self.alpha)
        check_probability("rank_dropout", self.rank_dropout)
        check_probability("module_dropout", self.module_dropout)
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        if self.use_effective_conv2d:
            raise NotImplementedError(
                f"{type(self).__name__}.use_effective_conv2d=True is not supported by peftjax: it only changes "
                "convolution layers (kernel > 1), which peftjax's models do not have; leave it False."
            )
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        self._set("exclude_modules", to_str_tuple("exclude_modules", self.exclude_modules, sort=True))
        self._set("layers_to_transform", _layer_indices(self.layers_to_transform))
        self._set("layers_pattern", to_str_tuple("layers_pattern", self.layers_pattern, sort=False))
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")

    def rank_and_alpha(self, module_name: str) -> tuple[int, int | float]:
        """``(r, alpha)`` for one module, after ``rank_pattern`` / ``alpha_pattern``.

        Args:
            module_name: The module's full dotted name, e.g. ``"model.layers.0.self_attn.q_proj"``.
        """
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), module_name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module_name), self.alpha)
        return r, alpha


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoHaConfig(LycorisConfig):
    """LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) * alpha / r``, a Hadamard product of two rank-``r`` products.

    See :class:`LycorisConfig` for the shared fields.

    Example:
        >>> cfg = LoHaConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2})
        >>> cfg.rank_and_alpha("model.layers.0.self_attn.v_proj")
        (2, 8)
        >>> cfg.to_dict()["peft_type"]
        'LOHA'

    Attributes:
        init_weights: ``True`` (PEFT's default: ``w1a``, ``w1b``, ``w2a`` Kaiming-uniform,
            ``w2b`` zero, so the adapter starts as a no-op) or ``False`` (all four
            Kaiming-uniform; for tests).
        rank_dropout: While training, each output row of ``ΔW`` is kept with probability
            ``1 - rank_dropout`` and the kept rows are divided by the fraction kept (PEFT's
            ``drop /= drop.mean()``).
    """

    peft_type: ClassVar[str] = "LOHA"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("init_weights", self.init_weights)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoKrConfig(LycorisConfig):
    """LoKr: ``ΔW = kron(w1, w2) * alpha / r``, each factor full or a rank-``r`` product.

    The out and in sizes are split by :func:`peftjax.tuners.lokr.factorization` into
    ``out = a * b`` and ``in = c * d``: ``w1`` is ``[a, c]``, ``w2`` is ``[b, d]``. ``w2`` is
    stored as ``lokr_w2_a @ lokr_w2_b`` when ``r < max(b, d) / 2``, else whole (``lokr_w2``);
    ``w1`` likewise, but only with ``decompose_both``. See :class:`LycorisConfig` for the shared
    fields.

    Example:
        >>> cfg = LoKrConfig(r=2, decompose_both=True, decompose_factor=4, target_modules=["q_proj"])
        >>> cfg.to_dict()["peft_type"], cfg.decompose_factor
        ('LOKR', 4)

    Attributes:
        decompose_both: Also factor the left Kronecker matrix ``w1`` (when the rank is small
            enough, as for ``w2``).
        decompose_factor: The factor PEFT's ``factorization`` aims for when splitting a
            dimension (``-1``: as close to the square root as possible).
        rank_dropout_scale: Divide the kept rows by the fraction kept under ``rank_dropout``
            (PEFT's default does not).
        init_weights: ``True`` (PEFT's default: ``w1`` (or ``w1_a``) zero, the rest
            Kaiming-uniform: a no-op adapter), ``False`` (all Kaiming-uniform; for tests) or
            ``"lycoris"`` (the LyCORIS repository's: ``w2`` (or ``w2_b``) zero, the rest
            Kaiming-uniform).
    """

    peft_type: ClassVar[str] = "LOKR"

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("decompose_both", self.decompose_both)
        check_int("decompose_factor", self.decompose_factor)  # any int, as in PEFT (see factorization)
        check_bool("rank_dropout_scale", self.rank_dropout_scale)
        if not isinstance(self.init_weights, bool) and self.init_weights != "lycoris":
            raise ValueError(f"`init_weights` must be True, False or 'lycoris', got {self.init_weights!r}.")

