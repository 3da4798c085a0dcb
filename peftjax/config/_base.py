"""The shared base of every peftjax adapter config, and reading/writing ``adapter_config.json``.

Configs are frozen, keyword-only dataclasses whose field names and defaults are HF PEFT 0.22.0's,
so ``to_dict`` writes the same field set PEFT writes and ``from_dict`` reads what PEFT writes.
The JSON file format is described in ``shared/reference/peft-format.md`` section 2.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, TypeVar

from peftjax.io._adapter import CONFIG_NAME
from peftjax.io._hub import resolve


_C = TypeVar("_C", bound="PeftConfig")


class TaskType(enum.StrEnum):
    """HF PEFT's task types; ``task_type`` picks the PEFT model wrapper (and its head handling)."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


class PeftType(enum.StrEnum):
    """HF PEFT 0.22.0's method names (the ``peft_type`` of ``adapter_config.json``).

    peftjax implements only some of them; :func:`config_from_dict` says which. ``BOTTLENECK`` is
    peftjax-only: HF PEFT cannot load it.
    """

    PROMPT_TUNING = "PROMPT_TUNING"
    MULTITASK_PROMPT_TUNING = "MULTITASK_PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    LORA = "LORA"
    ADALORA = "ADALORA"
    ADAMSS = "ADAMSS"
    BOFT = "BOFT"
    ADAPTION_PROMPT = "ADAPTION_PROMPT"
    IA3 = "IA3"
    BEFT = "BEFT"
    LILY = "LILY"
    LOHA = "LOHA"
    LOKR = "LOKR"
    OFT = "OFT"
    POLY = "POLY"
    LN_TUNING = "LN_TUNING"
    VERA = "VERA"
    FROD = "FROD"
    PVERA = "PVERA"
    FOURIERFT = "FOURIERFT"
    GLORA = "GLORA"
    XLORA = "XLORA"
    HRA = "HRA"
    VBLORA = "VBLORA"
    UNILORA = "UNILORA"
    CPT = "CPT"
    MISS = "MISS"
    RANDLORA = "RANDLORA"
    ROAD = "ROAD"
    TRAINABLE_TOKENS = "TRAINABLE_TOKENS"
    HIRA = "HIRA"
    SHIRA = "SHIRA"
    C3A = "C3A"
    WAVEFT = "WAVEFT"
    OSF = "OSF"
    DELORA = "DELORA"
    GRALORA = "GRALORA"
    CARTRIDGE = "CARTRIDGE"
    TINYLORA = "TINYLORA"
    PSOFT = "PSOFT"
    PEANUT = "PEANUT"
    SHADOW = "SHADOW"
    SUPERTUNING = "SUPERTUNING"
    DEFT = "DEFT"
    PACA = "PACA"
    BOTTLENECK = "BOTTLENECK"  # peftjax-only


# Dicts written in their own order: the first key matching a module wins (PEFT 0.22's set).
ORDERED_CONFIG_KEYS = frozenset({"rank_pattern", "alpha_pattern", "paca_indices_pattern"})


def _sorted_keys(value: Any) -> Any:
    """``value`` with every dict's keys sorted, as ``json.dumps(sort_keys=True)`` sorts them, except
    the dicts under :data:`ORDERED_CONFIG_KEYS`, kept in their order."""
    if isinstance(value, dict):
        return {k: v if k in ORDERED_CONFIG_KEYS else _sorted_keys(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [_sorted_keys(v) for v in value]
    return value


# peft_type -> config class, filled by PeftConfig.__init_subclass__.
_REGISTRY: dict[str, type[PeftConfig]] = {}


# --------------------------------------------------------------------------------------------------
# Small validators shared by the config modules. Each names the argument, what it expects and what
# it found.


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_bool(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r} ({_type_name(value)}).")


def check_int(name: str, value: Any, *, minimum: int | None = None, optional: bool = False) -> None:
    """Raises ``TypeError``/``ValueError`` unless ``value`` is an int (not bool) ``>= minimum``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {value!r} ({_type_name(value)}).")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")


def check_number(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is an int or float (not bool)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"`{name}` must be a number, got {value!r} ({_type_name(value)}).")


def check_probability(name: str, value: Any) -> None:
    """Raises unless ``value`` is a number in ``[0, 1)`` (a dropout rate)."""
    check_number(name, value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`{name}` must be in [0, 1), got {value}.")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}, got {value!r}.")


def check_optional_str(name: str, value: Any) -> None:
    """Raises ``TypeError`` unless ``value`` is ``None`` or a ``str``."""
    if value is not None and not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str or None, got {value!r} ({_type_name(value)}).")


def check_optional_dict(name: str, value: Any) -> dict | None:
    """Returns a shallow copy of a dict (so the caller's dict is not aliased), or ``None``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a dict or None, got {value!r} ({_type_name(value)}).")
    return dict(value)


def to_str_tuple(name: str, value: Any, *, sort: bool) -> str | tuple[str, ...] | None:
    """Normalizes a module-name list option to a hashable value.

    ``None`` and a ``str`` (a regex, or a single name) are kept as given; a list, tuple or set
    becomes a deduplicated tuple: sorted when order carries no meaning (PEFT stores such options
    as a ``set``), else in first-seen order.
    """
    if value is None or isinstance(value, str):
        return value
    if not isinstance(value, list | tuple | set | frozenset):
        raise TypeError(
            f"`{name}` must be a str, a list of str or None, got {value!r} ({_type_name(value)})."
        )
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"`{name}` must contain only str, found {bad!r}.")
    unique = dict.fromkeys(value)
    return tuple(sorted(unique)) if sort else tuple(unique)


def reject_unsupported(config: PeftConfig, names_and_defaults: Mapping[str, Any]) -> None:
    """Raises ``NotImplementedError`` for a PEFT field peftjax keeps only so that it round-trips.

    Args:
        config: The config being validated.
        names_and_defaults: Field name -> PEFT's default; any other value is unsupported.
    """
    for name, default in names_and_defaults.items():
        value = getattr(config, name)
        if value != default:
            raise NotImplementedError(
                f"{type(config).__name__}.{name}={value!r} is not supported by peftjax (only the "
                f"PEFT default {default!r} is); the field exists so that PEFT configs round-trip."
            )


def _jsonable(value: Any) -> Any:
    """Turns a field value into plain JSON types: tuples and sets become lists, enums strings."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(_jsonable(v) for v in value)
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeftConfig:
    """The fields every adapter config shares, and ``adapter_config.json`` reading and writing.

    Subclasses set the class constant ``peft_type``, which ``to_dict`` writes and ``from_dict``
    checks. Instances are immutable; derive variants with ``dataclasses.replace``, which re-runs
    validation. ``PeftConfig.from_dict`` / ``PeftConfig.from_pretrained`` dispatch on the
    ``peft_type`` found, like PEFT's ``PeftConfig.from_pretrained``.

    Attributes:
        task_type: The task (a :class:`TaskType` value such as ``"CAUSAL_LM"``) or ``None``.
            HF PEFT uses it to pick the model wrapper; ``"SEQ_CLS"`` also adds the classifier head
            to ``modules_to_save`` (see ``add_task_modules_to_save``).
        auto_mapping: PEFT's hint for rebuilding a custom base model class,
            ``{"base_model_class": ..., "parent_library": ...}``; written by PEFT only when
            ``task_type`` is ``None``. Carried through, unused by peftjax.
        peft_version: The library version that wrote the file. PEFT fills in its own version when
            this is ``None``; peftjax keeps whatever was read and writes ``None`` by default,
            since claiming a PEFT version would be untrue and PEFT parses nothing from it for the
            methods peftjax writes.
        base_model_name_or_path: The Hub id or path of the base model, or ``None``.
        revision: The base model revision, or ``None``.
        inference_mode: Whether the adapter is frozen. ``save_pretrained`` always writes ``true``,
            as PEFT does.
        modules_to_save: Names of extra modules trained in full and saved whole (e.g. a
            classifier head), matched as dotted suffixes; first-seen order kept, duplicates
            dropped. Adapters never target these modules.
    """

    peft_type: ClassVar[str | None] = None

    task_type: str | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    modules_to_save: tuple[str, ...] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Dict-valued fields (rank_pattern, ...) make the dataclass-generated field hash fail; an
        # explicit __hash__ in the class namespace stops @dataclass from generating one.
        cls.__hash__ = PeftConfig.__hash__  # type: ignore[method-assign]
        peft_type = cls.__dict__.get("peft_type")
        if peft_type is not None:
            _REGISTRY[str(peft_type)] = cls

    def __post_init__(self) -> None:
        if self.task_type is not None:
            if not isinstance(self.task_type, str) or self.task_type not in list(TaskType):
                raise ValueError(
                    f"`task_type` must be one of {[t.value for t in TaskType]} or None, "
                    f"got {self.task_type!r}."
                )
            self._set("task_type", str(TaskType(self.task_type)))
        self._set("auto_mapping", check_optional_dict("auto_mapping", self.auto_mapping))
        check_optional_str("peft_version", self.peft_version)
        check_optional_str("base_model_name_or_path", self.base_model_name_or_path)
        check_optional_str("revision", self.revision)
        check_bool("inference_mode", self.inference_mode)
        if isinstance(self.modules_to_save, str):
            raise TypeError(
                f"`modules_to_save` must be a list of module names, not a str ({self.modules_to_save!r})."
            )
        self._set("modules_to_save", to_str_tuple("modules_to_save", self.modules_to_save, sort=False))
        # PEFT 0.22 refuses this pair for every method (0.21.2 for some): a regex selects whole names
        if isinstance(getattr(self, "target_modules", None), str) and getattr(self, "layers_to_transform", None) \
                is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")

    def _set(self, name: str, value: Any) -> None:
        """Assigns a normalized value during ``__post_init__`` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        return hash((type(self), json.dumps(self.to_dict(), sort_keys=True)))

    @property
    def is_prompt_learning(self) -> bool:
        """Whether this is a prompt-learning method (prefix, prompt or P-tuning)."""
        return False

    # ----------------------------------------------------------------------------------------------
    # dict / JSON

    def to_dict(self) -> dict[str, Any]:
        """Returns every field as plain JSON types, plus ``peft_type``.

        The field set is exactly what PEFT 0.22.0 writes for the method (``runtime_config`` is
        never written, as in PEFT). Tuples and sets become lists.
        """
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls: type[_C], d: Mapping[str, Any]) -> _C:
        """Builds a config from a dict such as a parsed ``adapter_config.json``.

        Unknown keys (fields of a newer PEFT) are ignored with a warning naming them, which is
        PEFT's own forward-compatibility behaviour; ``runtime_config`` is dropped silently.
        Called on ``PeftConfig`` itself, it dispatches on ``d["peft_type"]``.

        Args:
            d: The field values. ``peft_type`` may be omitted when called on a concrete class.

        Returns:
            The config.

        Raises:
            ValueError: ``peft_type`` does not match this class, or is unknown.
            NotImplementedError: A PEFT method, or a field value, peftjax does not implement.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a dict, got {_type_name(d)}.")
        if cls.peft_type is None:
            if "peft_type" not in d:
                raise ValueError(f"{cls.__name__}.from_dict needs a `peft_type` key to pick a config class.")
            return config_from_dict(d)  # type: ignore[return-value]
        kwargs = dict(d)
        kwargs.pop("runtime_config", None)
        found = kwargs.pop("peft_type", cls.peft_type)
        if found != cls.peft_type:
            raise ValueError(
                f"{cls.__name__} has peft_type {cls.peft_type!r}, but the dict has peft_type {found!r}; "
                "use peftjax.config.config_from_dict to pick the class from the dict."
            )
        names = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            warnings.warn(
                f"Unexpected keyword arguments {unknown} for class {cls.__name__}, these are ignored. "
                "The config was probably written by a newer PEFT version.",
                stacklevel=2,
            )
            for key in unknown:
                del kwargs[key]
        return cls(**kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Writes ``adapter_config.json`` into ``save_directory`` (created if missing).

        The file is ``to_dict()`` as ``json.dumps(..., indent=2)`` writes it with every object's
        keys sorted except those of ``rank_pattern``, ``alpha_pattern`` and
        ``paca_indices_pattern``, whose order decides which key wins when several match a module
        (PEFT 0.22's layout; older PEFT sorted those too, so a reloaded pattern could pick another
        key), with ``inference_mode`` set to ``true``.

        Returns:
            The path of the written file.
        """
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_pretrained expects a directory, but {save_directory!r} is a file.")
        os.makedirs(save_directory, exist_ok=True)
        out = self.to_dict()
        out["inference_mode"] = True
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(_sorted_keys(out), indent=2))
        return path

    @classmethod
    def from_pretrained(
        cls: type[_C],
        directory: str | os.PathLike,
        *,
        revision: str | None = None,
        subfolder: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> _C:
        """Reads ``directory/adapter_config.json`` (see :meth:`from_json_file`).

        ``directory`` may be a Hub repo id (``"org/adapter"``): only its ``adapter_config.json`` is
        fetched, at ``revision`` and in ``subfolder``, as PEFT's ``from_pretrained`` does.
        """
        directory = resolve(directory, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir,
                            allow_patterns=[CONFIG_NAME], kind="adapter")
        return cls.from_json_file(os.path.join(os.fspath(directory), CONFIG_NAME))

    @classmethod
    def from_json_file(cls: type[_C], path: str | os.PathLike) -> _C:
        """Reads a config from a JSON file written by PEFT or peftjax.

        Args:
            path: The ``adapter_config.json`` path.

        Returns:
            The config; its class is picked by the file's ``peft_type`` when called on
            ``PeftConfig``.

        Raises:
            FileNotFoundError: The file does not exist.
            ValueError: The file is not valid JSON, is not a JSON object, has no ``peft_type``, or
                has a ``peft_type`` that does not match ``cls``. The message names the file.
        """
        d = read_json_config(path)
        if cls.peft_type is not None and d["peft_type"] != cls.peft_type:
            raise ValueError(
                f"{os.fspath(path)}: peft_type is {d['peft_type']!r}, but {cls.__name__} expects "
                f"{cls.peft_type!r}; use peftjax.config.load_config to pick the class from the file."
            )
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError, NotImplementedError) as e:
            # Same exception type, but the message names the file the bad value came from.
            raise type(e)(f"{os.fspath(path)}: {e}") from e


def read_json_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parses an ``adapter_config.json`` into a dict, checking only what every config needs.

    Raises:
        FileNotFoundError: The file does not exist.
        ValueError: Not valid (or truncated) JSON, not a JSON object, or no ``peft_type``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter config not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a valid JSON adapter config ({e}).") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: an adapter config must be a JSON object, found a JSON {_type_name(d)}.")
    if "peft_type" not in d:
        raise ValueError(
            f"{path}: the key `peft_type` is required in an adapter config (e.g. \"LORA\") but is missing."
        )
    return d


def _registry() -> dict[str, type[PeftConfig]]:
    # The config classes register on definition; importing the package defines them all.
    import peftjax.config  # noqa: F401

    return _REGISTRY


def config_class(peft_type: str) -> type[PeftConfig]:
    """The config class of a PEFT method name (``"LORA"``, ``"LOHA"``, ...: the ``peft_type`` of
    ``adapter_config.json``), as PEFT's ``PEFT_TYPE_TO_CONFIG_MAPPING`` maps it.

    Raises:
        ValueError: ``peft_type`` is not a PEFT method.
        NotImplementedError: A PEFT method peftjax does not implement.
    """
    registry = _registry()
    cls = registry.get(peft_type) if isinstance(peft_type, str) else None
    if cls is None:
        supported = sorted(registry)
        if isinstance(peft_type, str) and peft_type in list(PeftType):
            raise NotImplementedError(
                f"peft_type {peft_type!r} is a PEFT method peftjax does not implement; supported: {supported}."
            )
        raise ValueError(f"unknown peft_type {peft_type!r}; supported: {supported}.")
    return cls


def config_from_dict(d: Mapping[str, Any]) -> PeftConfig:
    """Builds the config class named by ``d["peft_type"]`` from a dict.

    Raises:
        ValueError: No ``peft_type``, or one that is not a PEFT method.
        NotImplementedError: A PEFT method peftjax does not implement.
    """
    if not isinstance(d, Mapping):
        raise TypeError(f"config_from_dict expects a dict, got {_type_name(d)}.")
    if "peft_type" not in d:
        raise ValueError("the key `peft_type` is required in an adapter config (e.g. \"LORA\") but is missing.")
    return config_class(d["peft_type"]).from_dict(d)


def load_config(
    directory: str | os.PathLike,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> PeftConfig:
    """Reads ``directory/adapter_config.json`` into the config class its ``peft_type`` names.

    ``directory`` may be a Hub repo id, as in :meth:`PeftConfig.from_pretrained`.
    """
    return PeftConfig.from_pretrained(directory, revision=revision, subfolder=subfolder, token=token,
                                      cache_dir=cache_dir)
