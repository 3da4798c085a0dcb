"""The configs besides LoRA: IA3, the prompt-learning methods, and peftjax's bottleneck adapters.

Field names and defaults are HF PEFT 0.22.0's (``BottleneckConfig`` is peftjax-only).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, ClassVar

from peftjax.config._base import (
    PeftConfig,
    TaskType,
    check_bool,
    check_choice,
    check_int,
    check_number,
    check_optional_dict,
    check_optional_str,
    check_probability,
    to_str_tuple,
)


class PromptTuningInit(enum.StrEnum):
    """How prompt tuning initializes its virtual tokens (PEFT's values)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class MultitaskPromptTuningInit(enum.StrEnum):
    """How multitask prompt tuning initializes (PEFT's values; ``SAMPLE_VOCAB`` works there too)."""

    TEXT = "TEXT"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"
    AVERAGE_SOURCE_TASKS = "AVERAGE_SOURCE_TASKS"
    EXACT_SOURCE_TASK = "EXACT_SOURCE_TASK"
    ONLY_SOURCE_SHARED = "ONLY_SOURCE_SHARED"


class PromptEncoderReparameterizationType(enum.StrEnum):
    """The P-tuning prompt encoder head (PEFT's values)."""

    MLP = "MLP"
    LSTM = "LSTM"


def _enum_value(name: str, value: Any, enum_cls: type[enum.StrEnum]) -> str:
    """Validates a str-or-enum option and returns the plain string (what JSON holds)."""
    check_choice(name, value, [e.value for e in enum_cls])
    return enum_cls(value).value


@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(PeftConfig):
    """(IA)³: learned vectors that rescale activations of the targeted modules.

    Attention-type modules have their output scaled (``y = W x * l``), feedforward modules their
    input (``y = W (x * l)``).

    Attributes:
        target_modules: Which modules get a vector; the same syntax and matching as
            ``LoraConfig.target_modules`` (a list is stored as a sorted tuple). ``None`` means
            the architecture default (``resolve_target_modules``).
        exclude_modules: Modules never targeted, same syntax; checked first.
        feedforward_modules: Which targeted modules are feedforward (input-scaled). A str is a
            ``re.fullmatch`` regex; a list entry matches when the name ends with it, with no dot
            boundary (PEFT's rule). When both this and ``target_modules`` are lists, this must be
            a subset of ``target_modules``. ``None`` means the architecture default.
        fan_in_fan_out: Whether the base weight is stored ``[in, out]`` (GPT-2 ``Conv1D``).
        modules_to_save: See :class:`PeftConfig`.
        init_ia3_weights: ``True`` initializes the vectors to ones (a no-op adapter); ``False``
            to random values (discouraged; for tests).
    """

    peft_type: ClassVar[str] = "IA3"

    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    feedforward_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("target_modules", "exclude_modules", "feedforward_modules"):
            self._set(name, to_str_tuple(name, getattr(self, name), sort=True))
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        check_bool("init_ia3_weights", self.init_ia3_weights)
        if isinstance(self.feedforward_modules, tuple) and isinstance(self.target_modules, tuple):
            missing = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if missing:
                raise ValueError(
                    "`feedforward_modules` should be a subset of `target_modules`; "
                    f"{missing} are not in target_modules={list(self.target_modules)}."
                )


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLearningConfig(PeftConfig):
    """The fields shared by prefix tuning, prompt tuning and P-tuning.

    The model-shape fields may be left ``None`` and filled from the transformers model config
    with :func:`prepare_prompt_learning_config`, as PEFT's ``get_peft_model`` does.

    Attributes:
        num_virtual_tokens: The number of virtual tokens ``V``. Required.
        token_dim: The hidden size of the base model (for prefix tuning on a GQA model,
            ``head_dim * num_key_value_heads``).
        num_transformer_submodules: 1, or 2 for encoder-decoder (``SEQ_2_SEQ_LM``) models.
        num_attention_heads: The attention heads (for prefix tuning on a GQA model, the KV heads).
        num_layers: The number of transformer layers.
        modules_to_save: See :class:`PeftConfig`.
    """

    # whether the adapter writes per-layer key/value prefixes (prefix tuning, Cartridge) rather than
    # input embeddings
    kv_prefix: ClassVar[bool] = False

    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_virtual_tokens is None:
            raise ValueError(f"{type(self).__name__} needs `num_virtual_tokens` (an int >= 1); it is None.")
        check_int("num_virtual_tokens", self.num_virtual_tokens, minimum=1)
        for name in ("token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers"):
            check_int(name, getattr(self, name), minimum=1, optional=True)

    @property
    def is_prompt_learning(self) -> bool:
        """Always ``True`` for prompt-learning configs."""
        return True


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning: learned per-layer key/value prefixes, saved as ``[V, num_layers * 2 * token_dim]``.

    Attributes:
        init_weights: ``None`` for random initialization, or ``"zero"`` to make the prefix a
            no-op at start.
        encoder_hidden_size: The hidden size of the projection MLP; ``None`` means ``token_dim``.
        prefix_projection: Whether to reparameterize the prefix through an MLP while training
            (only the MLP output is saved).
    """

    peft_type: ClassVar[str] = "PREFIX_TUNING"
    kv_prefix: ClassVar[bool] = True

    init_weights: str | None = None
    encoder_hidden_size: int | None = None
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_weights is not None:
            check_choice("init_weights", self.init_weights, ["zero"])
        check_int("encoder_hidden_size", self.encoder_hidden_size, minimum=1, optional=True)
        check_bool("prefix_projection", self.prefix_projection)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CartridgeConfig(PromptLearningConfig):
    """Cartridge: a trained key/value cache prefix, ``[V, num_layers * 2 * token_dim]`` (prefix
    tuning's layout, trained directly, with no projection).

    The first ``num_frozen_tokens`` virtual tokens are kept frozen (the paper's attention sink).
    Start it from the cache of a prefill on a text with ``peftjax.initialize_kv_prefix_from_text``,
    and join adapters with ``peftjax.compose_cartridge_adapters``, as in PEFT.

    Attributes:
        num_frozen_tokens: Leading virtual tokens never trained (``0 <= n <= num_virtual_tokens``).
    """

    peft_type: ClassVar[str] = "CARTRIDGE"
    kv_prefix: ClassVar[bool] = True

    num_frozen_tokens: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("num_frozen_tokens", self.num_frozen_tokens)
        if self.num_frozen_tokens < 0:
            raise ValueError(f"`num_frozen_tokens` must be >= 0, got {self.num_frozen_tokens}.")
        if self.num_frozen_tokens > self.num_virtual_tokens:
            raise ValueError(f"`num_frozen_tokens` must be <= `num_virtual_tokens`, got num_frozen_tokens="
                             f"{self.num_frozen_tokens} and num_virtual_tokens={self.num_virtual_tokens}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning: ``V`` learned input embeddings prepended to the token embeddings.

    Attributes:
        prompt_tuning_init: ``"RANDOM"``, ``"SAMPLE_VOCAB"`` (rows of the vocabulary embedding)
            or ``"TEXT"`` (the embeddings of ``prompt_tuning_init_text``). Stored as the string.
        prompt_tuning_init_text: The text for ``"TEXT"`` init (required with it).
        tokenizer_name_or_path: The tokenizer for ``"TEXT"`` init (required with it).
        tokenizer_kwargs: Extra ``AutoTokenizer.from_pretrained`` arguments; only with ``"TEXT"``.
    """

    peft_type: ClassVar[str] = "PROMPT_TUNING"
    init_choices: ClassVar[type[enum.StrEnum]] = PromptTuningInit

    prompt_tuning_init: str = PromptTuningInit.RANDOM.value
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set("prompt_tuning_init", _enum_value("prompt_tuning_init", self.prompt_tuning_init, self.init_choices))
        check_optional_str("prompt_tuning_init_text", self.prompt_tuning_init_text)
        check_optional_str("tokenizer_name_or_path", self.tokenizer_name_or_path)
        self._set("tokenizer_kwargs", check_optional_dict("tokenizer_kwargs", self.tokenizer_kwargs))
        text = self.prompt_tuning_init == PromptTuningInit.TEXT
        if text and not self.tokenizer_name_or_path:
            raise ValueError(
                f"When prompt_tuning_init='TEXT', tokenizer_name_or_path can't be {self.tokenizer_name_or_path!r}."
            )
        if text and self.prompt_tuning_init_text is None:
            raise ValueError("When prompt_tuning_init='TEXT', prompt_tuning_init_text can't be None.")
        if self.tokenizer_kwargs and not text:
            raise ValueError(
                f"tokenizer_kwargs only valid when using prompt_tuning_init='TEXT', got {self.prompt_tuning_init!r}."
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MultitaskPromptTuningConfig(PromptTuningConfig):
    """Multitask prompt tuning (MPT): one shared prompt, modulated per task by a rank-``num_ranks``
    matrix, ``prompt * (prefix_task_cols[t] @ prefix_task_rows[t])`` for the row's ``task_ids``.

    Attributes:
        prompt_tuning_init: prompt tuning's inits, or from a source run's file
            (``prompt_tuning_init_state_dict_path``): ``"AVERAGE_SOURCE_TASKS"`` (the shared prompt
            and the mean of the task matrices), ``"EXACT_SOURCE_TASK"`` (task
            ``prompt_tuning_init_task``'s) or ``"ONLY_SOURCE_SHARED"`` (the shared prompt only).
        prompt_tuning_init_state_dict_path: The source adapter's ``.safetensors`` file.
        prompt_tuning_init_task: The source task for ``"EXACT_SOURCE_TASK"``.
        num_ranks: The rank of each task's matrix.
        num_tasks: How many tasks (``task_ids`` are in ``[0, num_tasks)``).
    """

    peft_type: ClassVar[str] = "MULTITASK_PROMPT_TUNING"
    init_choices: ClassVar[type[enum.StrEnum]] = MultitaskPromptTuningInit

    prompt_tuning_init_state_dict_path: str | None = None
    prompt_tuning_init_task: int | None = 0
    num_ranks: int | None = 1
    num_tasks: int | None = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        check_optional_str("prompt_tuning_init_state_dict_path", self.prompt_tuning_init_state_dict_path)
        for name in ("num_ranks", "num_tasks"):
            check_int(name, getattr(self, name), minimum=1)
        check_int("prompt_tuning_init_task", self.prompt_tuning_init_task, minimum=0, optional=True)
        source = self.prompt_tuning_init in ("AVERAGE_SOURCE_TASKS", "EXACT_SOURCE_TASK", "ONLY_SOURCE_SHARED")
        if source and self.prompt_tuning_init_state_dict_path is None:
            raise ValueError(f"prompt_tuning_init_state_dict_path needs to be specified with "
                             f"{self.prompt_tuning_init} init method")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptEncoderConfig(PromptLearningConfig):
    """P-tuning: virtual-token embeddings passed through an MLP or LSTM head while training.

    Attributes:
        encoder_reparameterization_type: ``"MLP"`` or ``"LSTM"``. Stored as the string.
        encoder_hidden_size: The head's hidden size; ``None`` means ``token_dim``.
        encoder_num_layers: LSTM layers (ignored by the MLP head).
        encoder_dropout: Dropout in the head.
    """

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = PromptEncoderReparameterizationType.MLP.value
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._set(
            "encoder_reparameterization_type",
            _enum_value(
                "encoder_reparameterization_type",
                self.encoder_reparameterization_type,
                PromptEncoderReparameterizationType,
            ),
        )
        check_int("encoder_hidden_size", self.encoder_hidden_size, minimum=1, optional=True)
        check_int("encoder_num_layers", self.encoder_num_layers, minimum=1)
        check_probability("encoder_dropout", self.encoder_dropout)


def _int_list(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise TypeError(f"`{name}` must be a list of ints, got {value!r}.")
    return tuple(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CPTConfig(PromptLearningConfig):
    """Context-aware prompt tuning (CPT): the embeddings of an in-context template (examples with
    their answers) prepended to the input, each token's embedding trained within a small ball
    around its start, the answers scored by the loss. Causal LMs only, as in PEFT.

    The virtual tokens are ``cpt_token_ids`` (``num_virtual_tokens`` is their count). Each token's
    type in ``cpt_tokens_type_mask`` says what it is, in groups of four per example ``k``: ``4k +
    1`` the input template, ``4k + 2`` the input, ``4k + 3`` the output template, ``4k + 4`` the
    answer (0: none of these). Template and input tokens train, within ``opt_projection_format_epsilon``
    (templates) or ``opt_projection_epsilon`` (inputs) times ``sqrt(token_dim / 2048)`` of their
    start; answer tokens stay frozen and are scored as labels, as are a batch's tokens whose
    ``input_type_mask`` (offset by the template's largest type rounded up to a multiple of 4) is a
    multiple of 4.

    Attributes:
        cpt_token_ids: The template's token ids (default ``[0]``).
        cpt_mask: PEFT's per-token mask (default all 1; kept for the file, unused by PEFT too).
        cpt_tokens_type_mask: Each template token's type (default all 1).
        opt_weighted_loss_type: ``"none"``: the mean loss over the scored tokens; ``"decay"``: the
            tokens of each example ``opt_loss_decay_factor`` times those of the next one.
        opt_loss_decay_factor: The decay between consecutive examples' answers.
        opt_projection_epsilon: The input tokens' radius (before the ``sqrt(token_dim / 2048)``).
        opt_projection_format_epsilon: The template tokens' radius (likewise).
        tokenizer_name_or_path: Kept for PEFT's files (unused).
    """

    peft_type: ClassVar[str] = "CPT"

    cpt_token_ids: tuple[int, ...] | None = None
    cpt_mask: tuple[int, ...] | None = None
    cpt_tokens_type_mask: tuple[int, ...] | None = None
    opt_weighted_loss_type: str = "none"
    opt_loss_decay_factor: float = 1.0
    opt_projection_epsilon: float = 0.1
    opt_projection_format_epsilon: float = 0.1
    tokenizer_name_or_path: str | None = None

    def __post_init__(self) -> None:
        if self.task_type != TaskType.CAUSAL_LM:  # PEFT's message
            raise ValueError(f"{type(self).__name__} only supports task_type = {TaskType.CAUSAL_LM.value}.")
        ids = _int_list("cpt_token_ids", [0] if self.cpt_token_ids is None else self.cpt_token_ids)
        self._set("cpt_token_ids", ids)
        for name in ("cpt_mask", "cpt_tokens_type_mask"):
            value = getattr(self, name)
            self._set(name, _int_list(name, [1] * len(ids) if value is None else value))
        if not len(ids) == len(self.cpt_mask) == len(self.cpt_tokens_type_mask):
            raise ValueError("cpt_token_ids, cpt_mask and cpt_tokens_type_mask must have the same length.")
        if self.num_virtual_tokens not in (None, len(ids)):
            raise ValueError(f"`num_virtual_tokens` is the length of cpt_token_ids ({len(ids)}) for CPT, "
                             f"got {self.num_virtual_tokens}; leave it unset")
        self._set("num_virtual_tokens", len(ids))
        if self.num_transformer_submodules is None:
            self._set("num_transformer_submodules", 1)
        super().__post_init__()
        check_choice("opt_weighted_loss_type", self.opt_weighted_loss_type, ["none", "decay"])
        for name in ("opt_loss_decay_factor", "opt_projection_epsilon", "opt_projection_format_epsilon"):
            check_number(name, getattr(self, name))
        check_optional_str("tokenizer_name_or_path", self.tokenizer_name_or_path)


_NON_LINEARITIES = ("relu", "gelu", "gelu_new", "silu", "tanh")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020). peftjax-only.

    Each adapter is ``x + up(act(down(x)))`` with ``down: d -> d / reduction_factor``. HF PEFT has
    no such method, so these files load only in peftjax.

    Attributes:
        adapter_type: ``"houlsby"`` (adapters after attention and after the feedforward block)
            or ``"pfeiffer"`` (after the feedforward block only).
        reduction_factor: ``hidden_size / bottleneck_size``.
        non_linearity: The activation: ``"relu"``, ``"gelu"``, ``"gelu_new"``, ``"silu"`` or
            ``"tanh"``.
        residual: Whether the adapter adds its input back (``x + f(x)``).
        target_modules: The sublayer output layers (``nnx.Linear``) whose outputs get an adapter,
            with ``LoraConfig`` name matching; when given, it overrides ``adapter_type``'s
            placement. ``None`` means the placement of ``adapter_type`` for the model type
            (e.g. Llama ``self_attn.o_proj`` and ``mlp.down_proj``; see
            ``peftjax/tuners/bottleneck/_model.py``), written into the saved config as a regex.
        modules_to_save: See :class:`PeftConfig`.
        init_weights: ``"bert"``: the down-projection ~ N(0, 0.02), zero biases and a zero
            up-projection, so each adapter starts as the identity.
    """

    peft_type: ClassVar[str] = "BOTTLENECK"

    adapter_type: str = "houlsby"
    reduction_factor: int | float = 16
    non_linearity: str = "relu"
    residual: bool = True
    target_modules: tuple[str, ...] | str | None = None
    init_weights: str = "bert"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("adapter_type", self.adapter_type, ("houlsby", "pfeiffer"))
        check_number("reduction_factor", self.reduction_factor)
        if self.reduction_factor <= 0:
            raise ValueError(f"`reduction_factor` must be > 0, got {self.reduction_factor}.")
        check_choice("non_linearity", self.non_linearity, _NON_LINEARITIES)
        check_bool("residual", self.residual)
        self._set("target_modules", to_str_tuple("target_modules", self.target_modules, sort=True))
        check_choice("init_weights", self.init_weights, ("bert",))


def prepare_prompt_learning_config(config: PromptLearningConfig, model_config: Any) -> PromptLearningConfig:
    """Fills a prompt-learning config's model-shape fields from a transformers model config.

    PEFT's ``_prepare_prompt_learning_config`` plus the ``num_transformer_submodules`` default
    of ``PeftModel``, rule for rule: fields already set are kept, except that prefix tuning on a
    model config with ``num_key_value_heads`` (GQA) always gets ``token_dim = head_dim *
    num_key_value_heads`` and ``num_attention_heads = num_key_value_heads``, with ``head_dim`` from
    the config or ``token_dim // num_attention_heads``. ``encoder_hidden_size`` defaults to
    ``token_dim``.

    Args:
        config: The prompt-learning config.
        model_config: A transformers ``PretrainedConfig`` or its ``to_dict()``; for a
            vision-language config, its ``text_config`` is used.

    Returns:
        A new config with the fields filled.

    Raises:
        ValueError: A field is unset and the model config does not give it.

    Example:
        >>> from transformers import LlamaConfig
        >>> mc = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
        >>> cfg = prepare_prompt_learning_config(PrefixTuningConfig(num_virtual_tokens=10), mc)
        >>> cfg.token_dim, cfg.num_attention_heads, cfg.num_layers, cfg.encoder_hidden_size
        (32, 2, 2, 32)
    """
    if not isinstance(config, PromptLearningConfig):
        raise TypeError(
            f"prepare_prompt_learning_config expects a prompt-learning config, got {type(config).__name__}."
        )
    orig = model_config
    if hasattr(model_config, "to_dict"):
        mc = model_config.to_dict()
    elif isinstance(model_config, Mapping):
        mc = dict(model_config)
    else:
        raise TypeError(
            f"`model_config` must be a transformers PretrainedConfig or a dict, got {type(model_config).__name__}."
        )
    if "text_config" in mc:  # a vision-language model: the language model's shape
        mc = mc["text_config"]

    num_layers = config.num_layers
    if num_layers is None:
        # transformers >= 5 keeps num_hidden_layers as an attribute only, not in to_dict().
        if hasattr(orig, "num_hidden_layers"):
            num_layers = orig.num_hidden_layers
        else:
            num_layers = _first_key(mc, ("num_hidden_layers", "num_layers", "n_layer"), "num_layers")
    token_dim = config.token_dim
    if token_dim is None and not config.kv_prefix and mc.get("embedding_size"):
        # virtual tokens join the word embeddings, which ELECTRA-small makes narrower than the layers
        # (PEFT takes hidden_size here and fails to concatenate; a file with this token_dim loads there)
        token_dim = mc["embedding_size"]
    if token_dim is None:
        token_dim = _first_key(mc, ("hidden_size", "n_embd", "d_model"), "token_dim")
    num_heads = config.num_attention_heads
    if num_heads is None and isinstance(getattr(orig, "num_attention_heads", None), int):
        # an attribute-map alias (MPT's n_heads), which to_dict() does not list and PEFT then asks for
        num_heads = orig.num_attention_heads
    if num_heads is None:
        num_heads = _first_key(
            mc, ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads"), "num_attention_heads"
        )

    # Prefix tuning writes keys/values, which have the KV heads' shape under GQA (PEFT #1901).
    if config.kv_prefix and "num_key_value_heads" in mc:
        if mc.get("global_head_dim") is not None:
            head_dim = mc["global_head_dim"]
            num_kv = mc.get("num_global_key_value_heads") or mc["num_key_value_heads"]
        elif mc.get("per_layer_config") is not None:
            # Heterogeneous layers: provision for the largest KV footprint, as PEFT does.
            head_dim = mc.get("head_dim", token_dim // num_heads)
            num_kv = base_kv = mc["num_key_value_heads"]
            base_head_dim = head_dim
            for layer_cfg in mc["per_layer_config"].values():
                layer_head_dim = layer_cfg.get("head_dim", base_head_dim)
                if layer_head_dim > head_dim:
                    head_dim = layer_head_dim
                    num_kv = layer_cfg.get("num_key_value_heads", base_kv)
        elif mc.get("head_dim") is not None:
            head_dim, num_kv = mc["head_dim"], mc["num_key_value_heads"]
        else:
            head_dim, num_kv = token_dim // num_heads, mc["num_key_value_heads"]
        token_dim, num_heads = head_dim * num_kv, num_kv

    changes: dict[str, Any] = {"num_layers": num_layers, "token_dim": token_dim, "num_attention_heads": num_heads}
    if config.num_transformer_submodules is None:
        changes["num_transformer_submodules"] = 2 if config.task_type == TaskType.SEQ_2_SEQ_LM else 1
    if hasattr(config, "encoder_hidden_size") and config.encoder_hidden_size is None:
        changes["encoder_hidden_size"] = token_dim
    return dataclasses.replace(config, **changes)


def _first_key(mc: Mapping[str, Any], keys: tuple[str, ...], field: str) -> Any:
    for key in keys:
        if key in mc:
            return mc[key]
    raise ValueError(f"Please specify `{field}` in the config: the model config has none of {list(keys)}.")
