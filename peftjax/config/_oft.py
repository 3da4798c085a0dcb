"""``OFTConfig`` and ``BOFTConfig``: HF PEFT 0.22.0's orthogonal fine-tuning configs, field for field."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_probability,
    to_str_tuple,
)

# PEFT 0.18.0 changed the Cayley-Neumann series; peftjax implements only the new one.
_NEUMANN_SINCE = (0, 18, 0)
# PEFT fills peft_version with its own; OFT's loader needs one (it parses it when
# use_cayley_neumann is set), so an OFT config states the PEFT release whose math it follows.
OFT_PEFT_VERSION = "0.22.0"


def _layer_indices(value: Any) -> int | tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, list | tuple):
        for i in value:
            check_int("layers_to_transform", i, minimum=0)
        return tuple(value)
    check_int("layers_to_transform", value, minimum=0)
    return value


def _check_common(config: PeftConfig, bias_only: str) -> None:
    """The targeting and bias fields OFT and BOFT share, with PEFT's own checks."""
    config._set("target_modules", to_str_tuple("target_modules", config.target_modules, sort=True))
    config._set("exclude_modules", to_str_tuple("exclude_modules", config.exclude_modules, sort=True))
    config._set("layers_to_transform", _layer_indices(config.layers_to_transform))
    config._set("layers_pattern", to_str_tuple("layers_pattern", config.layers_pattern, sort=False))
    check_bool("fan_in_fan_out", config.fan_in_fan_out)
    check_bool("init_weights", config.init_weights)
    check_choice("bias", config.bias, ("none", "all", bias_only))
    if config.layers_pattern and config.layers_to_transform is None:
        raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ")


def _version(text: str) -> tuple[int, ...]:
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", text.partition("@")[0])
    return tuple(int(g or 0) for g in found.groups()) if found else (0, 0, 0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OFTConfig(PeftConfig):
    """Orthogonal fine-tuning: ``y = base(x R)`` with ``R`` block-diagonal and orthogonal.

    Each block is the Cayley transform of a skew-symmetric matrix whose upper triangle is the
    trained vector (PEFT's ``oft_R``, ``[blocks, b (b - 1) / 2]``). Field names and defaults are
    PEFT 0.22.0's.

    Example:
        >>> cfg = OFTConfig(oft_block_size=8, target_modules=["q_proj", "v_proj"])
        >>> cfg.r, cfg.oft_block_size, cfg.use_cayley_neumann
        (0, 8, True)

    Attributes:
        r: The number of blocks per layer; exactly one of ``r`` and ``oft_block_size`` is
            non-zero (``r * oft_block_size`` is the layer's input size). Where the size does not
            divide the input, the closest divisor is used with PEFT's warning.
        oft_block_size: The block size ``b``.
        module_dropout: Multiplicative dropout while training: ``int(p * blocks)`` random blocks
            of ``R`` become the identity (PEFT's ``MultiplicativeDropoutLayer``; see
            ``peftjax.tuners.oft``). PEFT 0.22.0 builds this layer but never calls it.
        target_modules: Which modules get OFT; ``LoraConfig``'s syntax and matching. ``None``
            means PEFT's default for the model type (LoRA's). PEFT adapts ``nn.Linear`` and
            ``nn.Embedding`` (the embedding output is rotated), not GPT-2's ``Conv1D``.
        fan_in_fan_out: PEFT resets it to ``False`` for ``nn.Linear`` with a warning, as here.
        bias: ``"none"``, ``"all"`` or ``"oft_only"``: which base biases train and are saved.
        exclude_modules: Modules never targeted.
        init_weights: ``True``: zeros (``R = I``, a no-op adapter); ``False``: N(0, 0.1).
        layers_to_transform: Only adapt these layer indices (see ``LoraConfig``).
        layers_pattern: The layer list name for ``layers_to_transform``.
        modules_to_save: See :class:`PeftConfig`.
        coft: Constrained OFT: before each use the skew matrix of each layer is projected onto
            the ball of Frobenius radius ``eps / sqrt(blocks)`` (PEFT stores the projection
            back into the parameter; see ``peftjax.tuners.oft``).
        eps: The COFT radius (only with ``coft``).
        block_share: One block shared by all blocks of a layer (``oft_R`` is ``[1, n]``).
        use_cayley_neumann: The truncated series ``I + 2Q + ... + 2Q^(k-2) + Q^(k-1)`` instead
            of the exact ``(I - Q)(I + Q)^-1`` (PEFT's default ``True``).
        num_cayley_neumann_terms: ``k``, the number of series terms.
    """

    peft_type: ClassVar[str] = "OFT"

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: tuple[str, ...] | str | None = None
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=0)
        check_int("oft_block_size", self.oft_block_size, minimum=0)
        check_probability("module_dropout", self.module_dropout)
        _check_common(self, "oft_only")
        for name in ("coft", "block_share", "use_cayley_neumann"):
            check_bool(name, getattr(self, name))
        check_number("eps", self.eps)
        check_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms, minimum=1)
        if self.r == 0 and self.oft_block_size == 0:
            raise ValueError(
                f"Either `r` or `oft_block_size` must be non-zero. Currently, r = {self.r} and "
                f"oft_block_size = {self.oft_block_size}."
            )
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ValueError(
                f"You can only specify either r ({self.r}) or oft_block_size ({self.oft_block_size}), but not both "
                "simultaneously, because r x oft_block_size == in_features."
            )

    def to_dict(self) -> dict[str, Any]:
        """PEFT's field set; ``peft_version`` defaults to the PEFT release whose OFT math this is.

        PEFT's OFT loader parses ``peft_version`` when ``use_cayley_neumann`` is set (older
        releases had another series), and fails on ``null``.
        """
        out = super().to_dict()
        if out["peft_version"] is None:
            out["peft_version"] = OFT_PEFT_VERSION
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OFTConfig:
        """Reads an ``adapter_config.json`` dict, with PEFT's checks of the OFT format version.

        Raises:
            ValueError: ``oft_block_size`` is missing (an OFT adapter from before PEFT 0.14, whose
                weights are incompatible), or ``use_cayley_neumann`` is set and ``peft_version`` is
                missing or older than 0.18.0 (PEFT then warns that the series changed; peftjax
                implements only the new one, so the outputs would differ from training).
        """
        if isinstance(d, Mapping) and "oft_block_size" not in d:
            raise ValueError(
                "OFT has been updated since PEFT 0.14.0. Your trained adapter weights are incompatible "
                "with the latest version of OFT (adapter_config.json has no `oft_block_size`). Please retrain "
                "your adapter weights with newer PEFT versions."
            )
        if isinstance(d, Mapping) and d.get("use_cayley_neumann", False):
            version = d.get("peft_version") or "0.0.0"
            if _version(str(version)) < _NEUMANN_SINCE:
                raise ValueError(
                    f"adapter_config.json: use_cayley_neumann=true with peft_version={d.get('peft_version')!r}: the "
                    "Cayley-Neumann parameterization changed in PEFT 0.18.0 and peftjax implements only the new "
                    "one, so this adapter would not reproduce its training. Retrain it with PEFT >= 0.18.0."
                )
        return super().from_dict(d)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BOFTConfig(PeftConfig):
    """Butterfly OFT: ``y = (base(x R) - bias) * s + bias`` with ``R`` a product of permuted
    block-diagonal orthogonal factors and ``s`` a learned per-output scale.

    PEFT stores ``boft_R`` ``[factors, blocks, b, b]`` (made skew-symmetric, then exact Cayley)
    and ``boft_s`` ``[out, 1]``. Field names and defaults are PEFT 0.22.0's.

    Example:
        >>> cfg = BOFTConfig(boft_block_size=4, target_modules=["q_proj"])
        >>> cfg.boft_block_num, cfg.boft_n_butterfly_factor
        (0, 1)

    Attributes:
        boft_block_size: The block size ``b``; exactly one of this and ``boft_block_num`` is
            non-zero, and it must divide the layer's input size.
        boft_block_num: The number of blocks per factor.
        boft_n_butterfly_factor: The number of butterfly factors (1 is OFT with a scale).
            Note: PEFT 0.22.0 without its CUDA extension (any CPU) silently trains with 1
            whatever this says, so its CPU-made files have ``boft_R`` ``[1, ...]``; peftjax
            always follows the config (PEFT's CUDA semantics) and names that case on load.
        target_modules: Which modules get BOFT (``LoraConfig``'s matching; ``None``: PEFT's
            default for the model type). PEFT adapts ``nn.Linear`` only (not ``Conv1D``,
            not embeddings).
        exclude_modules: Modules never targeted.
        boft_dropout: Multiplicative dropout while training: in one random factor,
            ``int(p * blocks)`` random blocks become the identity (PEFT's).
        fan_in_fan_out: PEFT resets it to ``False`` for ``nn.Linear`` with a warning, as here.
        bias: ``"none"``, ``"all"`` or ``"boft_only"``.
        modules_to_save: See :class:`PeftConfig`.
        init_weights: ``True``: ``boft_R = 0`` and ``boft_s = 1`` (a no-op); ``False``:
            N(0, 0.1) and N(1, 0.1).
        layers_to_transform: Only adapt these layer indices (see ``LoraConfig``).
        layers_pattern: The layer list name for ``layers_to_transform``.
    """

    peft_type: ClassVar[str] = "BOFT"

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("boft_block_size", self.boft_block_size, minimum=0)
        check_int("boft_block_num", self.boft_block_num, minimum=0)
        check_int("boft_n_butterfly_factor", self.boft_n_butterfly_factor, minimum=1)
        check_probability("boft_dropout", self.boft_dropout)
        _check_common(self, "boft_only")
        if self.boft_block_size == 0 and self.boft_block_num == 0:
            raise ValueError(
                f"Either `boft_block_size` or `boft_block_num` must be non-zero. Currently, boft_block_size = "
                f"{self.boft_block_size} and boft_block_num = {self.boft_block_num}."
            )
        if (self.boft_block_size != 0) == (self.boft_block_num != 0):
            raise ValueError(
                f"You can only specify either boft_block_size ({self.boft_block_size}) or boft_block_num "
                f"({self.boft_block_num}), but not both simultaneously, because boft_block_size x boft_block_num "
                "== in_features."
            )
