"""Sharding rules: the ``PartitionSpec`` of every weight, adapter and optimizer moment.

A leaf is named by its dotted NNX path and leaf name, e.g.
``model.layers.0.self_attn.q_proj.kernel`` or ``model.layers.0.self_attn.q_proj.lora_A.default``.
Its spec comes from, in order:

1. the user's rules: ``(regex, PartitionSpec)`` pairs, the first whose regex ``re.search``-es
   the path wins (as t5x/MaxText rule lists); adapter paths are matched too, so anchor a rule
   on the leaf (``r"q_proj\\.kernel$"``) unless it is meant for the adapters as well;
2. for an adapter factor, its weight's spec: ``A [in, r]`` takes W's input-axis spec and
   ``None`` for ``r``, ``B [r, out]`` takes ``None`` and W's output-axis spec (qwix's layout;
   for a column-parallel W no collective is added, for a row-parallel one an all-reduce of
   the small ``x @ A``). Adapters smaller than ``replicate_below`` elements are replicated;
3. the preset:

   * ``"dp"``: every weight replicated; the batch is split over ``data`` (and ``fsdp``).
   * ``"fsdp"``: each base weight of two or more dimensions is split over ``fsdp`` along the
     larger of its last two dimensions that the axis size divides (ties: the first); vectors
     (norm scales, biases) are replicated.
   * ``"tp"``: Megatron tensor parallelism over ``model``: column-parallel
     ``q/k/v/gate/up_proj`` (Phi-3 ``qkv_proj``, ``gate_up_proj``; BERT ``query/key/value``,
     ``intermediate.dense``; DeBERTa ``query_proj/key_proj/value_proj`` and its position
     projections; DistilBERT ``q_lin/k_lin/v_lin``, ``ffn.lin1``; GPT-2 ``c_attn``,
     ``c_fc``) split their output dimension (and bias), row-parallel ``o_proj``/``down_proj`` (BERT
     ``attention.output.dense``, ``output.dense``; DistilBERT ``out_lin``, ``ffn.lin2``; GPT-2
     ``c_proj``) their input dimension, the input embedding its hidden dimension (the
     lookup stays local) and ``lm_head`` the vocabulary. Fused projections (GPT-2's ``c_attn``,
     Phi-3's ``qkv_proj`` and ``gate_up_proj``) keep transformers' layout, so an even split of
     their output cuts across the q/k/v (gate/up) blocks wherever the block sizes do not line up
     with the shards; XLA's partitioner keeps the split that follows correct, at the price of
     some resharding. Qwen3's per-head ``q_norm``/``k_norm`` scales, like every norm, are replicated.
     Mixtral's fused experts (``mlp.experts.gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``)
     split their expert axis over ``model`` (expert parallelism: each device holds whole experts,
     the dense expert sum becomes an all-reduce, as after a row-parallel layer); the router
     ``mlp.gate.weight [E, H]`` is left to fsdp or replicated.
   * combinations joined by ``+``: ``"fsdp+tp"`` applies tp, then fsdp on a dimension tp
     left whole. ``"dp"`` adds nothing to either.

   Presets address a weight's last dimensions; a leading layer axis (stacked layers,
   ``scan_layers=True``: ``[L, in, out]``) is never split, and adapters ``[L, in, r]``,
   ``[L, r, out]`` follow as above.

Whatever the source, a dimension that its mesh axes' size does not divide is left whole
(replicated along those axes) rather than raising: a 2-head model on a 4-way ``model`` axis
still runs, with less sharding. Axis names the mesh lacks, a spec longer than the array, or an
unknown preset are configuration mistakes and raise ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Union

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from peftjax.sharding._mesh import FSDP, MODEL

PRESETS = ("dp", "fsdp", "tp")

# column-parallel (split the output) and row-parallel (split the input) layers of the bundled
# models: Llama/Mistral/Qwen2/Qwen3, Phi-3 (qkv_proj, gate_up_proj | o_proj, down_proj), BERT
# (query/key/value, intermediate.dense | attention.output.dense, output.dense), DistilBERT
# (q_lin/k_lin/v_lin, ffn.lin1 | out_lin, ffn.lin2), GPT-2 (c_attn, c_fc | c_proj) and DeBERTa (query_proj,
# key_proj, value_proj, pos_key_proj, pos_query_proj; its output.dense as BERT's), GPT-NeoX (query_key_value,
# whose heads' q/k/v sit together, dense_h_to_4h | attention.dense, dense_4h_to_h) and OPT (its q/k/v_proj as
# Llama's, fc1 | self_attn.out_proj, fc2); BLOOM's are GPT-NeoX's names, its output projection self_attention.dense;
# GPT-J: fc_in | attn.out_proj, fc_out; GPTBigCode (StarCoder): GPT-2's names (its c_attn the fused [q | k | v]);
# GPT-Neo: Llama's q/k/v_proj, GPT-2's c_fc | attn.attention.out_proj, c_proj; BART: OPT's, and encoder_attn.out_proj;
# MPNet: attention.attn.q/k/v, BERT's intermediate.dense | attention.attn.o, BERT's output.dense
_COLUMN = (r"(q_proj|k_proj|v_proj|qkv_proj|gate_proj|up_proj|gate_up_proj|query|key|value|intermediate\.dense|"
           r"query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj|q_lin|k_lin|v_lin|ffn\.lin1|c_attn|c_fc|"
           r"query_key_value|dense_h_to_4h|fc1|fc_in|attention\.attn\.(q|k|v))")
_ROW = (r"(o_proj|down_proj|output\.dense|out_lin|ffn\.lin2|c_proj|attention\.dense|dense_4h_to_h|self_attn\.out_proj|"
        r"fc2|self_attention\.dense|attn\.out_proj|attention\.out_proj|fc_out|encoder_attn\.out_proj|attention\.attn\.o)")
TP_RULES: tuple[tuple[str, P], ...] = (
    (rf"(^|\.){_COLUMN}\.kernel$", P(None, MODEL)),
    (rf"(^|\.){_COLUMN}\.bias$", P(MODEL)),
    (rf"(^|\.){_ROW}\.kernel$", P(MODEL, None)),
    (r"(^|\.)(embed_tokens|word_embeddings|wte|embed_in)\.embedding$", P(None, MODEL)),
    # Gemma 3n's and Gemma 4's per-layer embeddings (E4B's table: 262,144 x 35 x 256) and the projection
    # added to them: both split on the layers' features, as the word embeddings on the hidden axis
    (r"(^|\.)(embed_tokens_per_layer\.embedding|per_layer_model_projection\.kernel)$", P(None, MODEL)),
    (r"(^|\.)lm_head\.kernel$", P(None, MODEL)),
    (r"(^|\.)experts\.(gate_up_proj|down_proj)$", P(MODEL, None, None)),  # Mixtral: experts over `model`
)

# ``<layer>.<adapter dict>.<adapter name>``: the LoRA leaves that follow the layer's weight
ADAPTER_PATH = re.compile(r"^(?P<layer>.+)\.(?P<kind>lora_A|lora_B|lora_B_bias|lora_magnitude_vector)\.[^.]+$")
WEIGHT_LEAVES = ("kernel", "embedding")

Rule = tuple[str, Union[P, Sequence, None]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardingRules:
    """How to shard a model over a mesh: a preset, user rules tried first, an adapter threshold.

    Attributes:
      preset: ``"dp"``, ``"fsdp"``, ``"tp"`` or a ``+`` combination such as ``"fsdp+tp"``.
      rules: ``(regex, PartitionSpec)`` pairs tried before the preset; first match wins.
      replicate_below: adapters (LoRA leaves) with fewer elements are replicated instead of
        following their weight; 0 (the default) makes every adapter follow its weight.

    >>> rules = ShardingRules(preset="tp", rules=[(r"lm_head\\.kernel$", P())])
    >>> rules.preset, len(rules.rules)
    ('tp', 1)

    Raises:
      ValueError: an unknown preset, or rules that do not compile or are not pairs (all listed).
    """

    preset: str = "dp"
    rules: Sequence[Rule] = ()
    replicate_below: int = 0

    def __post_init__(self):
        parts = [p.strip() for p in self.preset.split("+")]
        unknown = [p for p in parts if p not in PRESETS]
        if unknown:
            raise ValueError(f"unknown sharding preset parts {unknown} in {self.preset!r}; use {' / '.join(PRESETS)} "
                             "or a '+' combination such as 'fsdp+tp'")
        problems, compiled = [], []
        for i, rule in enumerate(self.rules):
            if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
                problems.append(f"rule {i} is not a (regex, PartitionSpec) pair: {rule!r}")
                continue
            regex, spec = rule
            try:
                compiled.append((re.compile(regex), _as_spec(spec)))
            except (re.error, TypeError) as e:
                problems.append(f"rule {i} {regex!r}: {e}")
        if problems:
            raise ValueError("bad sharding rules:\n  " + "\n  ".join(problems))
        object.__setattr__(self, "rules", tuple((r.pattern, spec) for r, spec in compiled))
        object.__setattr__(self, "_parts", frozenset(parts))
        object.__setattr__(self, "_compiled", tuple(compiled))

    @property
    def tensor_parallel(self) -> bool:
        return "tp" in self._parts

    @property
    def fully_sharded(self) -> bool:
        return "fsdp" in self._parts


RulesLike = Union[ShardingRules, str, Sequence[Rule], None]


def as_rules(rules: RulesLike) -> ShardingRules:
    """``ShardingRules`` from a preset name, a list of ``(regex, spec)`` pairs, or ``None`` ("dp")."""
    if isinstance(rules, ShardingRules):
        return rules
    if rules is None:
        return ShardingRules()
    if isinstance(rules, str):
        return ShardingRules(preset=rules)
    return ShardingRules(rules=tuple(rules))


def _as_spec(spec) -> P:
    if spec is None:
        return P()
    if isinstance(spec, P):
        return spec
    if isinstance(spec, str):
        return P(spec)
    if isinstance(spec, (tuple, list)):
        return P(*spec)
    raise TypeError(f"expected a PartitionSpec, got {type(spec).__name__}")


def partition_spec(
    path: str,
    shape: Sequence[int],
    mesh: Mesh,
    rules: RulesLike = "dp",
    *,
    weight: tuple[str, Sequence[int]] | None = None,
) -> P:
    """The ``PartitionSpec`` of one leaf, already fitted to ``shape`` and ``mesh``.

    Args:
      path: the dotted NNX path with the leaf name, e.g. ``model.layers.0.mlp.up_proj.kernel``.
      shape: the leaf's shape.
      mesh: the mesh (its axis sizes decide divisibility).
      rules: a :class:`ShardingRules`, a preset name, or a list of ``(regex, spec)`` pairs.
      weight: for an adapter leaf (``...q_proj.lora_A.default``), the ``(path, shape)`` of the
        weight it adapts; :func:`state_shardings` finds it. Without it the adapter gets only the
        user rules, else replication.

    >>> from jax.sharding import AbstractMesh  # the axis sizes are all a spec needs
    >>> mesh = AbstractMesh((2, 4), ("data", "model"))
    >>> partition_spec("model.layers.0.self_attn.q_proj.kernel", (64, 64), mesh, "tp")
    P(None, 'model')
    >>> partition_spec("model.layers.0.self_attn.q_proj.lora_B.default", (8, 64), mesh, "tp",
    ...                weight=("model.layers.0.self_attn.q_proj.kernel", (64, 64)))
    P(None, 'model')
    >>> partition_spec("model.layers.0.self_attn.k_proj.kernel", (64, 6), mesh, "tp")  # 4 does not divide 6
    P(None, None)

    Raises:
      ValueError: the spec names an axis the mesh lacks, has more entries than ``shape`` has
        dimensions, or the preset needs an axis the mesh lacks.
    """
    rules = as_rules(rules)
    shape = tuple(int(d) for d in shape)
    for regex, spec in rules._compiled:
        if regex.search(path):
            return _fit(spec, shape, mesh, path)
    match = ADAPTER_PATH.match(path)
    if match and weight is not None:
        if math.prod(shape) < rules.replicate_below:
            return P()
        w_path, w_shape = weight
        w_shape = tuple(int(d) for d in w_shape)
        w_spec = tuple(partition_spec(w_path, w_shape, mesh, rules))
        w_spec = w_spec + (None,) * (len(w_shape) - len(w_spec))
        return _fit(_follow(match["kind"], shape, w_shape, w_spec), shape, mesh, path)
    return _fit(_preset_spec(path, shape, mesh, rules), shape, mesh, path)


def _follow(kind: str, shape: tuple[int, ...], w_shape: tuple[int, ...], w_spec: tuple) -> P:
    """An adapter's spec from its weight's, matching dimensions by size around the rank axis.

    ``A [*lead, in..., r]`` shares W's leading dimensions; ``B [*lead, r, out...]`` shares W's
    leading ``lead`` (stacked layers) and trailing ``out`` dimensions; a per-output vector
    ``[*lead, out]`` shares W's leading and last dimensions. ``r`` is never split. A BD-LoRA
    factor held in blocks, ``[*lead, nblocks, p, q]`` beside a 2-D ``W [*lead, in, out]``, splits its
    blocks as W splits the features they cover (``in`` for ``A``, ``out`` for ``B``).
    """
    k, m = len(shape), len(w_shape)
    if kind in ("lora_A", "lora_B") and m >= 2 and k == m + 1 and shape[:m - 2] == w_shape[:m - 2]:
        # BD-LoRA's block-diagonal factor [*lead, nblocks, p, q]: block i takes the i-th slice of W's
        # input (A) or output (B) features, so the blocks split as that axis of W does
        nb, p, q = shape[-3:]
        axis = m - 2 if kind == "lora_A" else m - 1
        if nb * (p if kind == "lora_A" else q) == w_shape[axis]:
            return P(*w_spec[: m - 2], w_spec[axis], None, None)
    if kind == "lora_A" and 2 <= k <= m + 1 and shape[:-1] == w_shape[: k - 1]:
        return P(*w_spec[: k - 1], None)
    if kind == "lora_B":
        for lead in range(k):  # the position of r: 0 for a plain layer, 1 under stacked layers
            tail = k - lead - 1
            if lead + tail <= m and shape[:lead] == w_shape[:lead] and shape[lead + 1:] == w_shape[m - tail:]:
                return P(*w_spec[:lead], None, *w_spec[m - tail:])
    if kind in ("lora_B_bias", "lora_magnitude_vector") and 1 <= k <= m:
        if shape[-1] == w_shape[-1] and shape[:-1] == w_shape[: k - 1]:
            return P(*w_spec[: k - 1], w_spec[-1])
    return P()  # a layout we do not know how to align (e.g. a Conv's B): tiny, so replicate


def _preset_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: ShardingRules) -> P:
    # presets describe a weight's own dimensions, its last ones: any leading dimension is a layer
    # axis (stacked layers, scan_layers=True) and stays whole, so each scanned slice is a plain layer
    spec: list = [None] * len(shape)
    if rules.tensor_parallel:
        _require(mesh, MODEL, rules.preset)
        for regex, tp in TP_RULES:
            if re.search(regex, path) and len(tp) <= len(shape):
                spec = [None] * (len(shape) - len(tp)) + list(tp)
                break
        spec = list(_fit(P(*spec), shape, mesh, path))  # a dim tp cannot split stays free for fsdp
    if rules.fully_sharded and len(shape) >= 2 and not ADAPTER_PATH.match(path):
        _require(mesh, FSDP, rules.preset)
        size = mesh.shape[FSDP]
        free = [d for d in range(len(shape) - 2, len(shape)) if spec[d] is None and shape[d] % size == 0]
        if free:
            spec[max(free, key=lambda d: (shape[d], -d))] = FSDP
    return P(*spec)


def _require(mesh: Mesh, axis: str, preset: str) -> None:
    if axis not in mesh.axis_names:
        raise ValueError(f"sharding preset {preset!r} needs a mesh axis named {axis!r}; the mesh has {mesh.axis_names}")


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh, path: str) -> P:
    """``spec`` padded to ``shape``'s rank, with each dimension its axes do not divide left whole."""
    entries = tuple(spec)
    if len(entries) > len(shape):
        raise ValueError(f"{path}: PartitionSpec {spec} has {len(entries)} entries for shape {shape}")
    sizes: Mapping[str, int] = mesh.shape
    out = []
    for dim, entry in zip(shape, entries + (None,) * (len(shape) - len(entries))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        missing = [a for a in axes if a not in sizes]
        if missing:
            raise ValueError(f"{path}: PartitionSpec {spec} names axes {missing} that the mesh "
                             f"{tuple(mesh.axis_names)} lacks")
        out.append(entry if axes and dim % math.prod(sizes[a] for a in axes) == 0 else None)
    return P(*out)
