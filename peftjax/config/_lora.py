"""``LoraConfig``: HF PEFT 0.22.0's LoRA config, field for field."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from typing import Any, ClassVar

import numpy as np

from peftjax.config._base import (
    PeftConfig,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_optional_dict,
    check_probability,
    reject_unsupported,
    to_str_tuple,
)
from peftjax.config._targeting import get_pattern_key
from peftjax.config._trainable_tokens import token_indices_by_layer

_BIAS_CHOICES = ("none", "all", "lora_only")
_SUPPORTED_INITS = ("True, False, 'gaussian', 'pissa', 'pissa_niter_<N>', 'olora', 'orthogonal', 'loftq', 'eva', "
                    "'corda', 'astra', 'mica', 'lora_ga', 'nora'")

# PEFT fields that switch on a LoRA variant or feature peftjax does not implement: any value but
# PEFT's default raises. They are fields at all so that a PEFT config round-trips unchanged.
_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "megatron_config": None,
    "use_qalora": False,
    "monteclora_config": None,
    "ensure_weight_tying": False,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(PeftConfig):
    """Low-rank adaptation: ``y = W x + (lora_alpha / r) * B A dropout(x)`` on targeted modules.

    Field names and defaults are PEFT 0.22.0's, so ``save_pretrained`` writes an
    ``adapter_config.json`` that ``peft.PeftConfig.from_pretrained`` reads back unchanged.

    Example:
        >>> cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "q_proj"],
        ...                  rank_pattern={"o_proj": 2})
        >>> cfg.target_modules
        ('q_proj', 'v_proj')
        >>> cfg.scaling_for("model.layers.0.self_attn.q_proj")
        (4, 8, 2.0)
        >>> cfg.scaling_for("model.layers.0.self_attn.o_proj")
        (2, 8, 4.0)

    Attributes:
        r: The LoRA rank (``A`` is ``[r, in]``, ``B`` is ``[out, r]``).
        target_modules: Which modules get LoRA. A list of names, each matching a module whose
            full dotted name equals it or ends with ``"." + name`` (``"mlp.c_proj"`` is fine,
            ``"proj"`` does not match ``q_proj``); or a ``str`` regex that must match the full
            name (``re.fullmatch``); or ``"all-linear"`` (see ``expand_all_linear``); or ``None``
            for the architecture's default (see ``resolve_target_modules``). A list is stored as
            a sorted, deduplicated tuple (PEFT stores a set).
        exclude_modules: Modules never targeted, with the same syntax; checked first.
        lora_alpha: The scaling numerator: ``scaling = lora_alpha / r``.
        lora_dropout: Dropout on the LoRA branch input (not on embeddings).
        fan_in_fan_out: Whether the base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``). As
            in PEFT, injection sets it (with PEFT's warning) to ``True`` on a ``Conv1D`` target and
            to ``False`` on a linear one, and the saved config has the value it settled on.
        bias: Which base-layer biases are trained and saved: ``"none"``, ``"all"`` (every bias
            in the model) or ``"lora_only"`` (those of targeted modules).
        use_rslora: Rank-stabilized scaling ``lora_alpha / sqrt(r)``.
        modules_to_save: See :class:`PeftConfig`.
        init_lora_weights: ``True`` (A Kaiming-uniform, B zero: a no-op adapter), ``False``
            (random A and B, for tests), ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"pissa"``
            (the top-``r`` SVD of the base weight), ``"pissa_niter_<N>"`` (the same from a
            randomized SVD with ``N >= 0`` subspace iterations, as ``torch.svd_lowrank``; its
            test matrix comes from the adapter's init key), ``"olora"`` (QR), ``"orthogonal"``
            (A and B from orthogonal halves of a random basis: both non-zero, ``B @ A == 0``;
            needs an even ``r``) or ``"loftq"`` (LoftQ: the base weight becomes its NF4 or int8
            quantization ``Q``, and ``B @ A`` the top-``r`` SVD of ``W - Q``; see
            ``loftq_config``), ``"eva"`` (set from data by ``initialize_lora_eva_weights``),
            ``"corda"`` (after ``preprocess_corda``), ``"astra"`` (after ``preprocess_astra``:
            ``B`` the ``r`` eigenvectors ``V`` of the layer's output covariance over data with the
            smallest eigenvalues, ``A = V^T W``, the base keeps ``W - s B A``), ``"lora_ga"``
            (after ``preprocess_loraga``: the SVD of each layer's gradient over data gives ``A``
            and ``B``, the base keeps ``W - s B A``), ``"nora"`` (NoRA: the default ``A`` with
            each input's column of ``r`` values scaled to unit norm, ``B`` zero; embeddings take
            the default) or ``"mica"`` (MiCA: ``A`` zero and ``B`` the ``r`` left singular
            vectors of the base weight with the smallest singular values, frozen: only ``A``
            trains; linear layers and embeddings, not with DoRA). PiSSA, OLoRA, LoftQ, CorDA, Astra
            and LoRA-GA rewrite the base weight. ``"gaussian"``, ``"olora"`` and ``"mica"`` may have
            any case, as in PEFT, which freezes MiCA's ``B`` only for the exact ``"mica"``
            (another case gets MiCA's factors with both training), and so does peftjax.
        layers_to_transform: Only adapt modules in these layer indices (an int or a list). The
            index is the first numbered segment of the name (or the one after
            ``layers_pattern``); a module with no index is then not adapted. Ignored for a module
            named exactly in ``target_modules``.
        layers_pattern: The name(s) of the layer list (e.g. ``"layers"``, ``"h"``) whose index
            ``layers_to_transform`` selects; needs ``layers_to_transform``.
        rank_pattern: ``{name_or_regex: r}`` overriding ``r`` per module; the first key matching
            the end of the module name wins (``get_pattern_key``).
        alpha_pattern: ``{name_or_regex: alpha}`` overriding ``lora_alpha`` per module.
        megatron_config: PEFT's Megatron parallel-layer config. Unsupported: must be ``None``.
        megatron_core: The Megatron module name; inert without ``megatron_config``.
        trainable_token_indices: Token ids whose embedding rows train beside the LoRA weights (PEFT's
            ``TrainableTokensWrapper``): a list for the input embedding, or ``{module name: ids}``
            (matched as the end of a module's name). An LM head tied to the embedding follows.
        loftq_config: LoftQ settings for ``init_lora_weights="loftq"`` (required then): a
            :class:`LoftQConfig` or its dict, ``loftq_bits`` 4 (NF4, bitsandbytes' codes, blocks of
            64) or 8 (int8 per row) and ``loftq_iter`` alternations. With another init a
            non-empty value is reset to ``{}`` with PEFT's warning.
        eva_config: EVA settings for ``init_lora_weights="eva"``: an :class:`EvaConfig` or its
            dict, stored as the dict (PEFT's defaults, with PEFT's warning, when ``None``). With
            another init PEFT warns and ignores it, and so does peftjax.
        corda_config: CorDA settings for ``init_lora_weights="corda"``: a :class:`CordaConfig`
            or its dict, stored as the dict; likewise ignored with another init.
        astra_config: Astra settings for ``init_lora_weights="astra"``: an :class:`AstraConfig`
            or its dict, stored as the dict; likewise ignored with another init.
        lora_ga_config: LoRA-GA settings for ``init_lora_weights="lora_ga"`` (required then, as
            in PEFT): a :class:`LoraGAConfig` or its dict, stored as the dict.
        use_dora: Weight-decomposed LoRA (DoRA): adds a magnitude vector per module.
        velora_config: VeLoRA (a :class:`VeloraConfig` or its dict, stored as the dict): ``lora_A``'s
            gradient from each input compressed to one value per group of features, which is all
            the backward pass keeps of it.
        alora_invocation_tokens: Activated LoRA (aLoRA; ``CAUSAL_LM``): the token ids that switch the
            adapter on. In each row the adapter applies from the start of their last occurrence to
            the end (and to every token generated after it), the positions before it run the base
            alone, so their cached keys and values are the base's. A row without them runs the base.
        use_qalora: PEFT's QA-LoRA. Unsupported: must be ``False``.
        qalora_group_size: The QA-LoRA group size; inert without ``use_qalora``.
        monteclora_config: PEFT's MonteCLoRA variant. Unsupported: must be ``None``.
        layer_replication: PEFT's layer stacking: ``[start, end)`` ranges of the base's layers
            stacked in order (``[[0, 4], [2, 5]]`` turns layers ``0..4`` into ``0 1 2 3 2 3 4``),
            the copies sharing the frozen weights and each carrying its own LoRA
            (:func:`peftjax.tuners.lora.replicate_layers`; Llama, Mistral, Qwen2, Qwen3, BERT and
            RoBERTa models). Merging such an adapter is refused, as PEFT refuses it.
        lora_bias: Adds a trainable bias to ``B`` (``lora_B.bias``); not with DoRA, and only with
            ``init_lora_weights`` ``True``/``False``.
        target_parameters: LoRA on bare parameters (PEFT's ``ParamWrapper``), e.g. Mixtral's fused
            experts ``["experts.gate_up_proj", "experts.down_proj"]`` or its router
            ``"gate.weight"``: a parameter key ``<module path>.<name>`` matches an entry it equals
            or ends with after a dot. Not with dropout, DoRA, ``lora_bias`` or ``fan_in_fan_out``.
        use_bdlora: BD-LoRA (a :class:`BdLoraConfig` or its dict, stored as the dict): on the linear
            layers its patterns name, ``lora_A`` or ``lora_B`` is block-diagonal, so that under
            tensor parallelism each device's block of the factor meets only its own shard of the layer.
        arrow_config: Arrow routing (an :class:`ArrowConfig` or its dict, stored as the dict): the
            config of the router adapter ``create_arrow_model`` adds, which routes each token over
            the model's other LoRA adapters; not with DoRA (as in PEFT).
        kasa_config: KaSA (a :class:`KasaConfig` or its dict, stored as the dict): each targeted
            linear layer's weight loses its ``r`` smallest singular components when the adapter is
            added, and the update is ``s * B diag(lora_diag) A`` with a trained ``lora_diag [r]``.
        ensure_weight_tying: PEFT's tied embedding/lm_head adapters. Unsupported: must be
            ``False``.
    """

    peft_type: ClassVar[str] = "LORA"

    r: int = 8
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    lora_alpha: int | float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    layers_to_transform: int | tuple[int, ...] | None = None
    layers_pattern: str | tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = dataclasses.field(default_factory=dict)
    alpha_pattern: dict[str, int | float] = dataclasses.field(default_factory=dict)
    megatron_config: dict | None = None
    megatron_core: str | None = "megatron.core"
    trainable_token_indices: Any = None
    loftq_config: dict = dataclasses.field(default_factory=dict)
    eva_config: dict | None = None
    corda_config: dict | None = None
    astra_config: dict | None = None
    lora_ga_config: dict | None = None
    use_dora: bool = False
    velora_config: dict | None = None
    alora_invocation_tokens: Any = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: dict | None = None
    layer_replication: Any = None
    lora_bias: bool = False
    target_parameters: Any = None
    use_bdlora: dict | None = None
    arrow_config: dict | None = None
    kasa_config: dict | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("r", self.r, minimum=1)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        self._set("exclude_modules", to_str_tuple("exclude_modules", self.exclude_modules, sort=True))
        check_number("lora_alpha", self.lora_alpha)
        check_probability("lora_dropout", self.lora_dropout)
        for name in ("fan_in_fan_out", "use_rslora", "use_dora", "lora_bias", "use_qalora", "ensure_weight_tying"):
            check_bool(name, getattr(self, name))
        check_choice("bias", self.bias, _BIAS_CHOICES)
        self._check_init()
        self._set("layers_to_transform", _layer_indices(self.layers_to_transform))
        self._set("layers_pattern", to_str_tuple("layers_pattern", self.layers_pattern, sort=False))
        self._set("rank_pattern", _pattern_dict("rank_pattern", self.rank_pattern, integer=True))
        self._set("alpha_pattern", _pattern_dict("alpha_pattern", self.alpha_pattern, integer=False))
        for name in (
            "megatron_config",
            "monteclora_config",
        ):  # fmt: skip
            self._set(name, check_optional_dict(name, getattr(self, name)))
        for name, sub in (("eva_config", EvaConfig), ("corda_config", CordaConfig), ("astra_config", AstraConfig),
                          ("lora_ga_config", LoraGAConfig), ("arrow_config", ArrowConfig),
                          ("use_bdlora", BdLoraConfig), ("kasa_config", KasaConfig),
                          ("velora_config", VeloraConfig)):
            if getattr(self, name) is not None:
                self._set(name, sub.from_value(getattr(self, name)).to_dict())
        if isinstance(self.loftq_config, LoftQConfig):
            self._set("loftq_config", self.loftq_config.to_dict())
        self._set("loftq_config", check_optional_dict("loftq_config", self.loftq_config) or {})
        self._set("trainable_token_indices",
                  token_indices_by_layer("trainable_token_indices", self.trainable_token_indices))
        if isinstance(self.target_parameters, str):  # PEFT does not take a regex here either
            raise TypeError(f"`target_parameters` must be a list of parameter names (e.g. ['experts.gate_up_proj']), "
                            f"got the str {self.target_parameters!r}.")
        self._set("target_parameters", to_str_tuple("target_parameters", self.target_parameters, sort=True))
        if self.target_parameters and self.init_lora_weights == "astra":
            raise ValueError("`target_parameters` is not supported with Astra, please use `target_modules` instead.")
        reject_unsupported(self, _UNSUPPORTED_DEFAULTS)
        self._set("layer_replication", _layer_map(self.layer_replication))

        # PEFT's own checks, in PEFT's order and with PEFT's conditions.
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
        if self.init_lora_weights == "loftq":
            if not self.loftq_config:
                raise ValueError("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.")
            self._set("loftq_config", LoftQConfig.from_value(self.loftq_config).to_dict())
        elif self.loftq_config:
            warnings.warn("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.")
            self._set("loftq_config", {})
        elif self.init_lora_weights == "eva" and self.eva_config is None:
            warnings.warn("`init_lora_weights` is 'eva' but `eva_config` is not specified. Using default EVA config.")
            self._set("eva_config", EvaConfig().to_dict())
        elif self.init_lora_weights != "eva" and self.eva_config is not None:
            warnings.warn("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.")
        elif self.init_lora_weights == "corda" and self.corda_config is None:
            warnings.warn("`init_lora_weights` is 'corda' but `corda_config` is not specified. Using default CorDA "
                          "config.")
            self._set("corda_config", CordaConfig().to_dict())
        elif self.init_lora_weights != "corda" and self.corda_config is not None:
            warnings.warn("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.")
        elif self.init_lora_weights == "astra" and self.astra_config is None:
            warnings.warn("`init_lora_weights` is 'astra' but `astra_config` is not specified. Using default Astra "
                          "config.")
            self._set("astra_config", AstraConfig().to_dict())
        elif self.init_lora_weights != "astra" and self.astra_config is not None:
            warnings.warn("`astra_config` specified but will be ignored when `init_lora_weights` is not 'astra'.")
        if self.arrow_config is not None and self.use_dora:  # PEFT's layers have no such variant
            raise ValueError("Invalid or unsupported variant combination: ('arrow_config', 'use_dora')")
        self._check_variants()
        if self.alora_invocation_tokens is not None:
            tokens = self.alora_invocation_tokens
            if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__") or not list(tokens) or any(
                    isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in tokens):
                raise ValueError(f"`alora_invocation_tokens` must be a non-empty list of token ids (ints >= 0), got "
                                 f"{tokens!r}.")
            self._set("alora_invocation_tokens", tuple(int(t) for t in tokens))
            if self.task_type != "CAUSAL_LM":  # PEFT warns, and its other task models never switch it on
                raise ValueError(f"aLoRA (alora_invocation_tokens) is supported for task_type='CAUSAL_LM' only, got "
                                 f"task_type={self.task_type!r} (PEFT's model of another task would never switch the "
                                 "adapter on)")
        if self.lora_bias:
            if self.init_lora_weights not in (True, False):
                raise ValueError(
                    "The argument lora_bias=True is only supported with init_lora_weights=True or False, got "
                    f"init_lora_weights={self.init_lora_weights!r} instead."
                )
            if self.use_dora:
                raise ValueError("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False.")

    def _check_variants(self) -> None:
        """BD-LoRA, KaSA, VeLoRA and aLoRA are each a variant of its own in PEFT's linear layers: no
        other variant goes with one (PEFT's message). BD-LoRA replaces one factor after the layer's init,
        and KaSA truncates the weight after it, so neither takes an init that computes the factors
        from the weight or data (half of it would be overwritten, or meet the truncation)."""
        variants = {"arrow_config": self.arrow_config is not None, "use_dora": self.use_dora,
                    "mica": self.init_lora_weights == "mica", "use_bdlora": self.use_bdlora is not None,
                    "kasa_config": self.kasa_config is not None, "velora_config": self.velora_config is not None,
                    "alora_invocation_tokens": self.alora_invocation_tokens is not None}
        on = sorted(name for name, used in variants.items() if used)
        if len(on) > 1:
            raise ValueError(f"Invalid or unsupported variant combination: {tuple(on)}")
        for option, what, after in (("use_bdlora", "BD-LoRA", "draws its block-diagonal factor after"),
                                    ("kasa_config", "KaSA", "truncates the base weight after")):
            if variants[option] and self.init_lora_weights not in (True, False, "gaussian"):
                raise ValueError(f"{option} ({what}) {after} the layer's init, so init_lora_weights="
                                 f"{self.init_lora_weights!r}, which computes the factors from the weight or data, is "
                                 "not supported with it; use True, False or 'gaussian'")

    def bdlora_factor(self, module_name: str) -> tuple[str, int] | None:
        """``("A" or "B", nblocks)``: which factor of module ``module_name``'s adapter is
        block-diagonal under ``use_bdlora`` (a pattern matches where it occurs in the name, as in
        PEFT), or ``None``.

        Raises:
          ValueError: the name matches both lists, or neither with ``match_strict`` (PEFT's rules).
        """
        if self.use_bdlora is None:
            return None
        bd = BdLoraConfig.from_value(self.use_bdlora)
        on_a = any(p in module_name for p in bd.target_modules_bd_a or ())
        on_b = any(p in module_name for p in bd.target_modules_bd_b or ())
        if on_a and on_b:
            raise ValueError(f"Target {module_name} matches both A and B block-diagonal patterns")
        if not (on_a or on_b):
            if bd.match_strict:
                raise ValueError(f"Target {module_name} matches neither A nor B block-diagonal patterns "
                                 f"(use_bdlora: target_modules_bd_a={list(bd.target_modules_bd_a or ())}, "
                                 f"target_modules_bd_b={list(bd.target_modules_bd_b or ())}). If this is intentional, "
                                 "set match_strict=False in BdLoraConfig.")
            return None
        return ("A" if on_a else "B", bd.nblocks)

    def _check_init(self) -> None:
        init = self.init_lora_weights
        if isinstance(init, bool):
            return
        if not isinstance(init, str):
            raise TypeError(f"`init_lora_weights` must be a bool or a str, got {init!r} ({type(init).__name__}).")
        # PEFT compares "gaussian", "olora" and "mica" case-insensitively, the others exactly.
        if init.lower() in ("gaussian", "olora", "mica") or init in ("pissa", "orthogonal", "loftq", "eva", "corda",
                                                                        "astra", "lora_ga", "nora"):
            if init == "mica" and self.use_dora:  # PEFT's layers refuse the pair (no DoRA variant of MiCA)
                raise ValueError("Invalid or unsupported variant combination: ('mica', 'use_dora'): "
                                 "init_lora_weights='mica' freezes lora_B, which DoRA has no variant for.")
            return
        if re.fullmatch(r"pissa_niter_[0-9]+", init):
            return
        if init.startswith("pissa"):  # PEFT fails at injection (int("x")); fail here, saying what fits
            raise ValueError(
                f"`init_lora_weights` must be 'pissa' (exact SVD) or 'pissa_niter_<N>' with N a non-negative "
                f"integer (randomized SVD with N subspace iterations, e.g. 'pissa_niter_16'), got {init!r}."
            )
        raise ValueError(f"`init_lora_weights` must be one of {_SUPPORTED_INITS}, got {init!r}.")

    def scaling_for(self, module_name: str) -> tuple[int, int | float, float]:
        """Returns ``(r, lora_alpha, scaling)`` for one module, after the rank/alpha patterns.

        Args:
            module_name: The module's full dotted name, e.g. ``"model.layers.0.self_attn.q_proj"``.

        Returns:
            The rank, the alpha and the scaling ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        """
        r = self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), module_name), self.r)
        alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module_name), self.lora_alpha)
        scaling = alpha / math.sqrt(r) if self.use_rslora else alpha / r
        return r, alpha, scaling


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoftQConfig:
    """LoftQ's settings (PEFT's ``LoftQConfig``), for ``LoraConfig(init_lora_weights="loftq", loftq_config=...)``.

    Attributes:
      loftq_bits: 4 (NF4 in blocks of 64, bitsandbytes' codes) or 8 (int8, absmax per output row).
      loftq_iter: alternations of quantizing ``W - B @ A`` and refitting ``B @ A`` by SVD (>= 1).
    """

    loftq_bits: int = 4
    loftq_iter: int = 1

    def __post_init__(self) -> None:
        check_choice("loftq_config.loftq_bits", self.loftq_bits, (4, 8))
        check_int("loftq_config.loftq_iter", self.loftq_iter, minimum=1)

    @classmethod
    def from_value(cls, value: Any) -> LoftQConfig:
        """A ``LoftQConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        if isinstance(value, cls):
            return value
        unknown = sorted(set(value) - {"loftq_bits", "loftq_iter"})
        if unknown:
            raise ValueError(f"`loftq_config` has unknown keys {unknown}; expected 'loftq_bits' and 'loftq_iter'.")
        return cls(**value)

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _path_fields(config, option: str, names: tuple[str, ...]) -> None:
    """Stores each of ``names`` (a path or ``None``) as a ``str``; ``TypeError`` names ``option.name``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and not isinstance(value, str):
            object.__setattr__(config, name, str(value) if hasattr(value, "__fspath__") else value)
            if not isinstance(getattr(config, name), str):
                raise TypeError(f"`{option}.{name}` must be a path (str) or None, got {value!r}.")


def _sub_config(cls, value: Any, option: str):
    """``cls`` from itself or its dict; ``ValueError`` names unknown keys, as ``LoftQConfig`` does."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"`{option}` must be a {cls.__name__}, a dict or None, got {value!r}.")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        raise ValueError(f"`{option}` has unknown keys {unknown}; expected some of {names}.")
    return cls(**value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VeloraConfig:
    """VeLoRA's settings (PEFT's ``VeloraConfig``), for ``LoraConfig(velora_config=...)``.

    VeLoRA saves memory in training: what the backward pass keeps of a layer's input for ``lora_A``'s
    gradient is each token's ``num_groups`` slices projected onto one unit vector (``[tokens,
    num_groups]`` instead of ``[tokens, in]``), and the gradient takes the input rebuilt from them
    (times ``scale``). The forward pass, the input's gradient and everything after training are
    plain LoRA's.

    Attributes:
      num_groups: the slices of each input (more: a closer gradient, more memory).
      scale: multiplies the rebuilt input (> 0).
      init_type: the projection vector: ``"batch_average"`` (the normalised mean slice of each
        step's own input, as PEFT computes it) or ``"random"`` (a fixed draw, saved with the
        adapter). PEFT's ``"batch_average_once"`` (the first step's, kept) is refused: a jitted
        step does not write the frozen state back.
    """

    num_groups: int = 64
    scale: float = 1.0
    init_type: str = "batch_average"

    def __post_init__(self) -> None:
        check_int("velora_config.num_groups", self.num_groups)
        check_number("velora_config.scale", self.scale)
        if self.num_groups <= 0:  # PEFT's messages
            raise ValueError(f"`num_groups` should be positive, got {self.num_groups}.")
        if self.scale <= 0:
            raise ValueError(f"`scale` should be positive, got {self.scale}.")
        if self.init_type not in {"batch_average_once", "batch_average", "random"}:
            raise ValueError(f"Unsupported `init_type` {self.init_type!r}. Supported values are 'batch_average_once', "
                             "'batch_average', and 'random'.")
        if self.init_type == "batch_average_once":
            raise NotImplementedError(
                "velora_config.init_type='batch_average_once' (the first training step's projection, kept) is not "
                "implemented in peftjax: a jitted step returns the adapters, not the frozen state it would write; "
                "use 'batch_average' (each step's own, PEFT's default) or 'random'")

    @classmethod
    def from_value(cls, value: Any) -> VeloraConfig:
        """A ``VeloraConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "velora_config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class KasaConfig:
    """KaSA's settings (PEFT's ``KasaConfig``), for ``LoraConfig(kasa_config=...)``: the weights of the
    paper's two regularisers, which :func:`peftjax.kasa_loss` adds up (as PEFT's
    ``LoraModel._get_kasa_loss``) for a loss function to add to the task's.

    Attributes:
      beta: the weight of ``sum(lora_diag ** 2)`` (>= 0).
      gamma: the weight of ``||B^T B - I||_F + ||A A^T - I||_F`` (PEFT's layouts; >= 0).
    """

    beta: float = 1e-4
    gamma: float = 1e-3

    def __post_init__(self) -> None:
        check_number("kasa_config.beta", self.beta)
        check_number("kasa_config.gamma", self.gamma)
        if self.beta < 0:  # PEFT's messages
            raise ValueError(f"`beta` must be non-negative, got {self.beta}.")
        if self.gamma < 0:
            raise ValueError(f"`gamma` must be non-negative, got {self.gamma}.")

    @classmethod
    def from_value(cls, value: Any) -> KasaConfig:
        """A ``KasaConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "kasa_config")

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BdLoraConfig:
    """BD-LoRA's settings (PEFT's ``BdLoraConfig``), for ``LoraConfig(use_bdlora=...)``.

    Block-diagonal LoRA: on the targets ``target_modules_bd_a`` names, ``lora_A`` is ``nblocks``
    blocks on its diagonal (block ``i`` maps the ``i``-th slice of the input to the ``i``-th slice
    of the rank); on those ``target_modules_bd_b`` names, ``lora_B`` is (the ``i``-th slice of the
    rank to the ``i``-th slice of the output). With ``nblocks`` equal to the tensor-parallel
    degree, a row-parallel layer (input split across devices: ``o_proj``, ``down_proj``) with a
    block-diagonal ``A`` and a column-parallel one (output split: ``q_proj``, ``up_proj``) with a
    block-diagonal ``B`` need no communication for the adapter beyond the base layer's own.

    Attributes:
      target_modules_bd_a: patterns; a target whose name contains one has a block-diagonal ``A``.
      target_modules_bd_b: patterns; a target whose name contains one has a block-diagonal ``B``.
      nblocks: the blocks of each block-diagonal factor (dividing its sizes: the layer's input or
        output features and the rank).
      match_strict: every target must match one of the lists (``False``: the others take plain LoRA).
    """

    target_modules_bd_a: tuple[str, ...] | None = None
    target_modules_bd_b: tuple[str, ...] | None = None
    nblocks: int = 1
    match_strict: bool = True

    def __post_init__(self) -> None:
        for name in ("target_modules_bd_a", "target_modules_bd_b"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):  # PEFT matches each pattern of a list; a str would match per letter
                    raise TypeError(f"`use_bdlora.{name}` must be a list of module name patterns, got the str "
                                    f"{value!r}.")
                object.__setattr__(self, name, to_str_tuple(f"use_bdlora.{name}", value, sort=False))
        check_int("use_bdlora.nblocks", self.nblocks, minimum=1)
        check_bool("use_bdlora.match_strict", self.match_strict)
        overlap = set(self.target_modules_bd_a or ()) & set(self.target_modules_bd_b or ())
        if overlap:  # PEFT's message
            raise ValueError("Found overlapping modules in target_modules_bd lists:"
                             f"{list(self.target_modules_bd_a)} (A) and {list(self.target_modules_bd_b)} (B).")

    @classmethod
    def from_value(cls, value: Any) -> BdLoraConfig:
        """A ``BdLoraConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "use_bdlora")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("target_modules_bd_a", "target_modules_bd_b"):  # lists, as PEFT writes them
            d[name] = None if d[name] is None else list(d[name])
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArrowConfig:
    """Arrow's settings (PEFT's ``ArrowConfig``): the router ``create_arrow_model`` adds over task LoRAs.

    Arrow routes each token to the ``top_k`` task adapters whose prototype (the top right singular
    vector of the adapter's ``B A``) it is most aligned with (``|x . p|``), weighted by a softmax
    over those ``top_k`` at ``router_temperature``; GenKnowSub (``use_gks``) first subtracts the mean
    of some general adapters' factors from every task adapter's.

    Attributes:
      top_k: the adapters each token takes (at most the number of task adapters).
      router_temperature: the softmax temperature (> 0).
      use_gks: GenKnowSub, with ``create_arrow_model``'s ``general_adapter_paths``.
      rng_seed: the seed of the power iteration's start vector, drawn as PEFT's
        ``torch.Generator().manual_seed(rng_seed)`` draws it (so prototypes equal PEFT's); ``None``:
        peftjax draws it from a fixed key (PEFT from torch's global RNG).
      task_adapter_names: set by ``create_arrow_model`` (``task_0``, ``task_1``, ...).
      gks_adapter_names: set by ``create_arrow_model`` (``gks_0``, ...).
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    rng_seed: int | None = None
    task_adapter_names: tuple[str, ...] | None = None
    gks_adapter_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        check_int("arrow_config.top_k", self.top_k)
        check_number("arrow_config.router_temperature", self.router_temperature)
        check_bool("arrow_config.use_gks", self.use_gks)
        if self.rng_seed is not None:
            check_int("arrow_config.rng_seed", self.rng_seed)
        if self.top_k <= 0:  # PEFT's messages
            raise ValueError("top_k cannot be negative.")
        if self.router_temperature <= 0:
            raise ValueError("router_temperature must be greater than 0.")
        for name in ("task_adapter_names", "gks_adapter_names"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, to_str_tuple(f"arrow_config.{name}", value, sort=False))

    @classmethod
    def from_value(cls, value: Any) -> ArrowConfig:
        """An ``ArrowConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "arrow_config")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("task_adapter_names", "gks_adapter_names"):  # lists, as PEFT writes them
            d[name] = None if d[name] is None else list(d[name])
        return d


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraGAConfig:
    """LoRA-GA's settings (PEFT's ``LoraGAConfig``), for ``LoraConfig(init_lora_weights="lora_ga", ...)``.

    LoRA with gradient approximation: from the top ``2r`` singular triplets of a layer's weight
    gradient over some data (``preprocess_loraga``), ``A`` takes ``r`` right singular vectors and
    ``B`` ``r`` left ones times their singular values, so that the first step of ``B A`` follows
    full fine-tuning's; the base keeps ``W - s B A``.

    Attributes:
      direction: which triplets go where: ``"ArB2r"`` (``A`` the first ``r``, ``B`` the next ``r``),
        ``"A2rBr"`` (the other way round), ``"ArBr"`` (``A`` the odd ones, ``B`` the even ones) or
        ``"random"`` (the same ``r`` random ones for both; drawn from the adapter's init key).
      scale: ``"stable"`` (``B`` times ``out ** 0.25 / sqrt(stable_gamma)``), ``"weight_svd"``
        (``B`` scaled so its largest singular value is the weight's), ``"gd_scale"`` (both divided
        by the LoRA scaling) or ``"unit"``.
      stable_gamma: the ``gamma`` of ``"stable"``.
    """

    direction: str = "ArB2r"
    scale: str = "stable"
    stable_gamma: int = 16

    def __post_init__(self) -> None:
        check_choice("lora_ga_config.direction", self.direction, ("ArBr", "A2rBr", "ArB2r", "random"))
        check_choice("lora_ga_config.scale", self.scale, ("stable", "weight_svd", "gd_scale", "unit"))
        check_int("lora_ga_config.stable_gamma", self.stable_gamma, minimum=1)

    @classmethod
    def from_value(cls, value: Any) -> LoraGAConfig:
        """A ``LoraGAConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "lora_ga_config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaConfig:
    """EVA's settings (PEFT's ``EvaConfig``), for ``LoraConfig(init_lora_weights="eva", eva_config=...)``.

    Explained Variance Adaptation: ``lora_A`` of each target is the top right-singular vectors
    of its inputs over calibration data (an incremental PCA run until the components settle),
    ``lora_B`` is zero, and the total rank is redistributed by explained variance.

    Attributes:
      rho: rank redistribution (``>= 1``): a layer may get up to ``round(r * rho)``; 1 keeps ``r``.
      tau: the cosine similarity of consecutive components above which they count as converged.
      use_label_mask: also leave out positions whose ``labels`` equal ``label_mask_value``.
      label_mask_value: the ignored label (-100).
      whiten: divide each component by the square root of its singular value.
      adjust_scaling_factors: scale ``lora_alpha`` with a layer's new rank (``alpha * r_new / r``)
        so that the scaling ``alpha / r`` is unchanged.
    """

    rho: float = 2.0
    tau: float = 0.99
    use_label_mask: bool = True
    label_mask_value: int = -100
    whiten: bool = False
    adjust_scaling_factors: bool = True

    def __post_init__(self) -> None:
        check_number("eva_config.rho", self.rho)
        check_number("eva_config.tau", self.tau)
        for name in ("use_label_mask", "whiten", "adjust_scaling_factors"):
            check_bool(f"eva_config.{name}", getattr(self, name))
        check_int("eva_config.label_mask_value", self.label_mask_value)
        if self.rho < 1.0:
            raise ValueError("`rho` must be >= 1.0")
        if self.tau < 0.0 or self.tau > 1.0:
            raise ValueError("`tau` must be between 0.0 and 1.0.")

    @classmethod
    def from_value(cls, value: Any) -> EvaConfig:
        """An ``EvaConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "eva_config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CordaConfig:
    """CorDA's settings (PEFT's ``CordaConfig``), for ``LoraConfig(init_lora_weights="corda", corda_config=...)``.

    Context-oriented decomposition: the SVD of ``W C`` (``C`` the covariance of the layer's
    inputs over calibration data) gives ``A``/``B``, and the base keeps ``W - s B A``.

    Attributes:
      cache_file: a safetensors file for the cropped SVD (``<module>.eigens.S_WC`` / ``U_WC`` /
        ``V_WC``): read when it exists, written otherwise. PEFT writes a torch pickle here; a
        file of PEFT's is refused with that said.
      covariance_file: a safetensors file for the covariances (``{module: C}``), likewise.
      corda_method: ``"ipm"`` keeps the largest components (instruction-previewed), ``"kpm"``
        the smallest (knowledge-preserved).
      verbose: print each layer as its SVD is taken.
      use_float16_for_covariance: keep the inputs in the model's dtype for the covariance
        instead of float32 (PEFT's meaning: no upcast); the products still accumulate in float32
        here, where PEFT's sum stays in the half dtype.
      prune_temporary_fields: PEFT drops its per-module scratch attributes; peftjax keeps none,
        so this only round-trips.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    corda_method: str = "ipm"
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        _path_fields(self, "corda_config", ("cache_file", "covariance_file"))
        check_choice("corda_config.corda_method", self.corda_method, ("ipm", "kpm"))
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            check_bool(f"corda_config.{name}", getattr(self, name))

    @classmethod
    def from_value(cls, value: Any) -> CordaConfig:
        """A ``CordaConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "corda_config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AstraConfig:
    """Astra's settings (PEFT's ``AstraConfig``), for ``LoraConfig(init_lora_weights="astra", astra_config=...)``.

    Activation-space tail-eigenvector LoRA: the eigenvectors ``V`` of the covariance of a layer's
    outputs over calibration data with the ``r`` smallest eigenvalues give ``B = V`` and
    ``A = V^T W``; the base keeps ``W - s B A``.

    Attributes:
      cache_file: a safetensors file for the cropped eigenvectors (``<module>.eigens.S`` /
        ``.V``): read when it exists, written otherwise. PEFT writes a torch pickle here; a file
        of PEFT's is refused with that said.
      covariance_file: a safetensors file for the output covariances (``{module: C}``), likewise.
      verbose: print each layer as its eigenvectors are taken.
      use_float16_for_covariance: keep the outputs in the model's dtype for the covariance instead
        of float32 (PEFT's meaning: no upcast); the products still accumulate in float32 here.
      prune_temporary_fields: PEFT drops its per-module scratch attributes; peftjax keeps none,
        so this only round-trips.
    """

    cache_file: str | None = None
    covariance_file: str | None = None
    verbose: bool = False
    use_float16_for_covariance: bool = False
    prune_temporary_fields: bool = True

    def __post_init__(self) -> None:
        _path_fields(self, "astra_config", ("cache_file", "covariance_file"))
        for name in ("verbose", "use_float16_for_covariance", "prune_temporary_fields"):
            check_bool(f"astra_config.{name}", getattr(self, name))

    @classmethod
    def from_value(cls, value: Any) -> AstraConfig:
        """An ``AstraConfig`` from itself or its dict (``ValueError`` names an unknown key)."""
        return _sub_config(cls, value, "astra_config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _layer_map(value) -> tuple[tuple[int, int], ...] | None:
    """``layer_replication`` as ``((start, end), ...)``: each a non-empty ``[start, end)`` range."""
    if value is None:
        return None
    pairs = list(value) if isinstance(value, (list, tuple)) else None
    if not pairs or not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) for x in p) for p in pairs):
        raise ValueError(f"layer_replication must be a non-empty list of [start, end) pairs of layer indices (such "
                         f"as [[0, 4], [2, 5]]), got {value!r}")
    for start, end in pairs:
        if not 0 <= start < end:
            raise ValueError(f"layer_replication: [{start}, {end}) is not a range of layers (expected 0 <= start "
                             f"< end)")
    return tuple((int(a), int(b)) for a, b in pairs)


def _layer_indices(value: Any) -> int | tuple[int, ...] | None:
    """Validates ``layers_to_transform``: an int stays an int; a list becomes a tuple."""
    if value is None:
        return None
    if isinstance(value, list | tuple):
        for i in value:
            check_int("layers_to_transform", i, minimum=0)
        return tuple(value)
    check_int("layers_to_transform", value, minimum=0)
    return value


def _pattern_dict(name: str, value: Any, *, integer: bool) -> dict:
    """Validates ``rank_pattern`` / ``alpha_pattern`` and copies it (so callers cannot alias it)."""
    d = check_optional_dict(name, value)
    if d is None:  # PEFT has {} as the default; a JSON null means the same
        return {}
    for key, v in d.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` keys must be module names or regexes (str), got {key!r}.")
        if integer:
            check_int(f"{name}[{key!r}]", v, minimum=1)
        else:
            check_number(f"{name}[{key!r}]", v)
    return d
