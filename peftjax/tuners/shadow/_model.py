"""ShadowPEFT for Flax NNX: a small trainable shadow network riding a frozen decoder, as HF PEFT 0.22.0 runs it.

* :class:`ShadowBlock` (each targeted decoder block): before the block, ``h + alpha *
  up(down(dropout(h - s)))``; after it, ``s <- (1 - g) * s + g * t`` with ``t = T(h_out)`` and
  ``g = sigmoid(G(h_out))`` (``T``, ``G``: Linear, exact GELU, Linear), all in float32.
* :class:`ShadowModel` (the causal LM): the initial state ``s = P(backbone(embeddings))`` from a
  freshly drawn copy of the base's decoder class with ``shadow_num_hidden_layers`` layers (fed the
  base's input embeddings with ``share_embeddings``; ``P`` a projection where the widths differ),
  carried through the blocks of one forward (:func:`_shadow_run`), and the auxiliary loss of ``s``
  through the base's output head added with labels.

On disk, PEFT's keys (the adapter name always written ``default``):
``base_model.model.<block>.shadow_down.default.weight``, ``.shadow_up.default.weight``,
``.shadow_update_transform.default.{0,2}.{weight,bias}``, ``.shadow_update_gate.default...``, and
the model-level ``base_model.shadow_backbone.default.<the backbone's transformers keys>`` and
``base_model.shadow_projection.default.weight``.

Not here: pretrained shadow checkpoints (``shadow_model`` a path), sequence classification,
``scan_layers``/``remat`` models (the state travels beside the layers, not through a scan), and a
KV cache: ``generate`` decodes greedily over the whole sequence.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.config import ShadowConfig
from peftjax.io._adapter import AdapterFileError
from peftjax.models._losses import causal_lm_loss
from peftjax.models._modeling import hf_state_dict
from peftjax.nn._dropout import apply_dropout
from peftjax.nn._init import torch_linear
from peftjax.tuners.base import (
    AdapterDictLayer,
    AdapterParam,
    FrozenAdapterParam,
    ModelLevelAdapter,
    layer_state_dict,
    load_layer_state_dict,
    mixin_subclass,
    named_modules,
    set_tree_params_torch,
    validate_adapter_name,
    with_base_signature,
)
from peftjax.tuners.base._generate import greedy_without_cache

_state = threading.local()
BACKBONE, PROJECTION = "base_model.shadow_backbone.default.", "base_model.shadow_projection.default.weight"
# (store, PEFT's module, parameter) of a block's update networks: nn.Sequential(Linear, GELU, Linear)
_NETS = tuple((f"shadow_{net[0]}{i}_{kind}", f"shadow_update_{net}.default.{i}.{kind}")
              for net in ("transform", "gate") for i in (0, 2) for kind in ("weight", "bias"))


@dataclasses.dataclass
class _Run:
    state: jax.Array  # the shadow state, carried from block to block


@contextlib.contextmanager
def _shadow_run(state: jax.Array):
    previous = getattr(_state, "run", None)
    _state.run = _Run(state)
    try:
        yield _state.run
    finally:
        _state.run = previous


def _same(x):
    return x


@dataclasses.dataclass(frozen=True)
class ShadowSpec:
    alpha: float
    dropout: float


class ShadowBlock(AdapterDictLayer):
    """A decoder block inside the shadow path: the injection before it, the state's update after it."""

    method_name = "Shadow"
    status_module_type = "shadow.ShadowLayer"
    weight_dicts = ("shadow_down", "shadow_up") + tuple(store for store, _ in _NETS)
    cache_dicts = ()

    def add_shadow(self, name: str, spec: ShadowSpec, d: int, r: int, u: int, key, *, init_weights: bool) -> None:
        self._check_new(name)
        keys = iter(jax.random.split(key, 6))
        down, _ = torch_linear(next(keys), d, r)  # bias-free linears: the weight's draw only
        up, _ = torch_linear(next(keys), r, d)
        arrays = {"shadow_down": down, "shadow_up": jnp.zeros_like(up) if init_weights else up}
        for net in ("t", "g"):
            (w0, b0), (w2, b2) = torch_linear(next(keys), d, u), torch_linear(next(keys), u, d)
            arrays.update({f"shadow_{net}0_weight": w0, f"shadow_{net}0_bias": b0,
                           f"shadow_{net}2_weight": w2, f"shadow_{net}2_bias": b2})
        for store, value in arrays.items():
            getattr(self, store)[name] = AdapterParam(value)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        layout = {"shadow_down.default.weight": (self.shadow_down, _same, _same),
                  "shadow_up.default.weight": (self.shadow_up, _same, _same)}
        layout.update({key: (getattr(self, store), _same, _same) for store, key in _NETS})
        return layout

    def _describe(self, name: str) -> str:
        return f"Shadow r={self.shadow_down[name].get_value().shape[0]}"

    def _net(self, net: str, name: str, x):
        w = {k: getattr(self, f"shadow_{net}{k}")[name].get_value()
             for k in ("0_weight", "0_bias", "2_weight", "2_bias")}
        h = jax.nn.gelu(x @ w["0_weight"].T + w["0_bias"][None, None], approximate=False)
        return h @ w["2_weight"].T + w["2_bias"][None, None]

    def __call__(self, x, *args, **kwargs):
        base = self._peftjax_base.__call__
        run = getattr(_state, "run", None)
        live = self._live_adapters()
        if run is None or not live:
            return base(self, x, *args, **kwargs)
        name, spec = live[0]
        delta = apply_dropout((x - run.state).astype(jnp.float32), spec.dropout, f"{self.adapter_path}/{name}")
        delta = (delta @ self.shadow_down[name].get_value().T) @ self.shadow_up[name].get_value().T
        out = base(self, x + (spec.alpha * delta).astype(x.dtype), *args, **kwargs)
        h = out[0] if isinstance(out, tuple) else out
        hf = h.astype(jnp.float32)
        gate = jax.nn.sigmoid(self._net("g", name, hf))
        run.state = ((1.0 - gate) * run.state.astype(jnp.float32) + gate * self._net("t", name, hf)).astype(
            run.state.dtype)
        return out

    def merge_adapter(self, name: str) -> None:
        raise ValueError("ShadowPEFT cannot be merged into the base weights: the adaptation is an input-dependent, "
                         "layer-space trajectory, not a static weight delta")

    def unmerge_adapter(self, name: str) -> None:
        pass


class ShadowModel(ModelLevelAdapter):
    """Mixin for a causal LM carrying a Shadow adapter: the shadow backbone and the state's run."""

    adapter_state_attrs = ("shadow_backbones", "shadow_projections", "shadow_settings", "model_active",
                           "model_disabled")
    stores = ("shadow_backbones", "shadow_projections")
    method = "ShadowPEFT"
    merge_refusal = ("ShadowPEFT cannot be merged into the base model: the adaptation is an input-dependent, "
                     "layer-space trajectory, not a static weight delta")

    def shadow_state(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None):
        """The initial shadow state ``[batch, seq, hidden]``: the projected shadow backbone's output."""
        name = self.current_adapter()
        share = dict(self.shadow_settings)[name][0]
        if inputs_embeds is None and share:
            inputs_embeds = self.model.embed_tokens(jnp.asarray(input_ids))
        backbone = self.shadow_backbones[name]
        if inputs_embeds is not None:
            h = backbone(None, attention_mask, position_ids, inputs_embeds).last_hidden_state
        else:
            h = backbone(jnp.asarray(input_ids), attention_mask, position_ids).last_hidden_state
        projection = self.shadow_projections.get(name)
        return h if projection is None else h @ projection.get_value().T.astype(h.dtype)

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, inputs_embeds=None,
                 **kwargs):
        base = self._peftjax_base.__call__
        name = self.current_adapter()
        if name is None:
            return base(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, inputs_embeds=inputs_embeds, **kwargs)
        if kwargs.get("cache") is not None or kwargs.get("prefix_kv") is not None:
            raise NotImplementedError("Shadow runs without a KV cache or prefix here (generate decodes over the whole "
                                      "sequence)")
        state = self.shadow_state(input_ids, attention_mask, position_ids, inputs_embeds)
        with _shadow_run(state):
            out = base(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       labels=labels, inputs_embeds=inputs_embeds, **kwargs)
        weight = dict(self.shadow_settings)[name][1]
        if labels is None or out.loss is None or weight <= 0:
            return out
        head = self.model.embed_tokens.attend(state) if self.lm_head is None else self.lm_head(state)
        return out.replace(loss=out.loss + weight * causal_lm_loss(head, jnp.asarray(labels)))

    def generate(self, input_ids, attention_mask=None, **kwargs):
        """Greedy decoding without a KV cache (each step runs the shadow backbone and the decoder
        over the whole sequence), as PEFT generates without its ``ShadowCache``."""
        return greedy_without_cache(self, input_ids, attention_mask, method="Shadow", **kwargs)


def _backbone_config(model, config: ShadowConfig):
    """The base's config with the shadow's sizes: ``shadow_num_hidden_layers`` layers (1 by default),
    the per-layer lists cut to them, as PEFT's mirror."""
    from peftjax.models import ModelConfig

    values = model.config.to_dict()
    values["num_hidden_layers"] = config.shadow_num_hidden_layers or 1
    for field, override in (("hidden_size", config.shadow_hidden_size),
                            ("intermediate_size", config.shadow_intermediate_size),
                            ("num_attention_heads", config.shadow_num_attention_heads)):
        if override is not None:
            values[field] = override
    n = values["num_hidden_layers"]
    if values.get("layer_types") is not None:
        types = list(values["layer_types"]) or ["full_attention"]
        values["layer_types"] = (types + [types[-1]] * n)[:n]
    if values.get("max_window_layers") is not None and values["max_window_layers"] > n:
        values["max_window_layers"] = n
    for option in ("scan_layers", "remat"):
        values.pop(option, None)
    return ModelConfig.from_dict(values)


def _as_adapter_params(module: nnx.Module, variable: type) -> None:
    """Every ``nnx.Param`` of ``module``'s tree becomes ``variable`` (trainable or frozen adapter weights)."""
    for _, node in list(nnx.iter_graph(module)):
        if isinstance(node, nnx.Module):
            for attr, value in list(vars(node).items()):
                if type(value) is nnx.Param:
                    setattr(node, attr, variable(value.get_value()))


def inject_shadow(model: nnx.Module, config: ShadowConfig, *, adapter_name: str = "default",
                  key: jax.Array | None = None) -> ShadowConfig:
    """Adds Shadow adapter ``adapter_name`` to a bundled decoder causal LM, in place.

    Returns:
      The config, ``target_modules`` filled (every decoder block) where it was unset, as PEFT does.

    Raises:
      NotImplementedError: another task than ``CAUSAL_LM``, a pretrained ``shadow_model``, a
        scanned or rematerialised model, or a second Shadow adapter.
      ValueError: targets that are not decoder blocks, or not consecutive ones.
    """
    validate_adapter_name(adapter_name)
    if config.task_type != "CAUSAL_LM":
        raise NotImplementedError(f"Shadow with task_type={config.task_type!r} is not implemented here; CAUSAL_LM is")
    if config.shadow_model != "mirror":
        raise NotImplementedError(f"shadow_model={config.shadow_model!r}: a pretrained shadow checkpoint is not "
                                  "supported here; use 'mirror'")
    if isinstance(model, ShadowModel):
        raise NotImplementedError("one Shadow adapter per model is supported (PEFT runs exactly one at a time)")
    ShadowModel.refuse_another_method(model)
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if layers is None or not hasattr(type(model), "generate"):
        raise TypeError(f"{type(model).__name__} is not a bundled decoder causal LM (model.model.layers); Shadow "
                        "needs one")
    if getattr(model.config, "scan_layers", False) or getattr(body, "remat", "none") != "none":
        raise NotImplementedError("Shadow carries its state beside the layers, which scan_layers and remat do not "
                                  "allow; load the model without them")
    blocks = [f"model.layers.{i}" for i in range(len(layers))]
    if config.target_modules is None:
        config = dataclasses.replace(config, target_modules=tuple(blocks))
    from peftjax.config._targeting import check_target_module_exists

    modules = named_modules(model)
    targets = [n for n in modules if n and check_target_module_exists(config, n)]
    odd = [n for n in targets if n not in blocks]
    if odd or not targets:
        raise ValueError(f"Shadow targets decoder blocks ({blocks[0]}, ...); target_modules={config.target_modules} "
                         f"matched {odd[:4] or 'none'}")
    index = sorted(blocks.index(n) for n in targets)
    if index != list(range(index[0], index[-1] + 1)):
        raise ValueError(f"Shadow's blocks must be consecutive (the state passes from one to the next); got layers "
                         f"{index}")
    key = jax.random.key(0) if key is None else key
    d = int(model.config.hidden_size)
    variable = FrozenAdapterParam if config.inference_mode else AdapterParam
    embed = body.embed_tokens
    backbone_config = _backbone_config(model, config)
    backbone = type(body)(backbone_config, dtype=embed.dtype, param_dtype=embed.embedding.get_value().dtype,
                          rngs=nnx.Rngs(jax.random.fold_in(key, 1 << 20)))
    width = int(backbone_config.hidden_size)
    share = bool(config.share_embeddings) and width == d
    if share:
        del backbone.embed_tokens
    _as_adapter_params(backbone, variable)
    projection = None if width == d else variable(torch_linear(jax.random.fold_in(key, 1 << 21), width, d)[0])
    spec = ShadowSpec(alpha=float(config.shadow_alpha), dropout=float(config.shadow_dropout))
    for n in sorted(targets, key=blocks.index):
        module = modules[n]
        if not isinstance(module, ShadowBlock):
            module.__class__ = mixin_subclass(type(module), ShadowBlock, "Shadow")
            module._adapter_setup(n)
        module.add_shadow(adapter_name, spec, d, config.r, config.update_hidden_size or config.r,
                          jax.random.fold_in(key, blocks.index(n)), init_weights=config.init_weights)
        if config.inference_mode:
            for store in ShadowBlock.weight_dicts:
                value = getattr(module, store)[adapter_name]
                getattr(module, store)[adapter_name] = FrozenAdapterParam(value.get_value())
    model.__class__ = with_base_signature(mixin_subclass(type(model), ShadowModel, ""), ShadowModel.__call__)
    model.shadow_backbones = nnx.Dict({adapter_name: backbone})
    model.shadow_projections = nnx.Dict({} if projection is None else {adapter_name: projection})
    # (name, (shares the embeddings, the auxiliary loss's weight)): hashable, as static graph data must be
    model.shadow_settings = ((adapter_name, (share, float(config.auxiliary_loss_weight))),)
    model.model_active, model.model_disabled = (adapter_name,), False
    return config


def shadow_state_dict(model, adapter_name: str, config, *, key_mapping=None, save_embedding_layers="auto"):
    out = layer_state_dict(model, adapter_name, config, layer_type=ShadowBlock, key_mapping=key_mapping,
                           save_embedding_layers=save_embedding_layers)
    backbone = model.shadow_backbones[adapter_name]
    out.update({BACKBONE + k: v.astype(np.float32) for k, v in hf_state_dict(backbone).items()})
    if adapter_name in model.shadow_projections:
        out[PROJECTION] = np.asarray(model.shadow_projections[adapter_name].get_value(), np.float32)
    return out


def load_shadow_state_dict(model, tensors, adapter_name: str, *, key_mapping=None, source: str = "adapter"):
    """The blocks' tensors through the layer walk; the backbone's and the projection's by their keys.

    Raises:
      AdapterFileError: a backbone or projection tensor is missing or has the wrong shape.
    """
    tensors = dict(tensors)
    backbone = model.shadow_backbones[adapter_name]
    own = {k[len(BACKBONE):]: v for k, v in tensors.items() if k.startswith(BACKBONE)}
    expected = set(hf_state_dict(backbone))
    missing = sorted(expected - set(own))
    if missing:
        raise AdapterFileError(f"{source}: the shadow backbone's {missing[:4]} are not in the file (expected under "
                               f"{BACKBONE}; shadow_num_hidden_layers and the sizes in the config shape it)")
    set_tree_params_torch(backbone, own, f"{source}: {BACKBONE.rstrip('.')}")
    for k in list(tensors):
        if k.startswith(BACKBONE) and k[len(BACKBONE):] in expected:
            del tensors[k]
    if adapter_name in model.shadow_projections:
        if PROJECTION not in tensors:
            raise AdapterFileError(f"{source}: {PROJECTION} (the shadow projection) is missing")
        var = model.shadow_projections[adapter_name]
        value = np.asarray(tensors.pop(PROJECTION))
        if value.shape != tuple(var.get_value().shape):
            raise AdapterFileError(f"{source}: {PROJECTION}: expected shape {list(var.get_value().shape)}, found "
                                   f"{list(value.shape)}")
        var.set_value(jnp.asarray(value, jnp.float32))
    return load_layer_state_dict(model, tensors, adapter_name, layer_type=ShadowBlock, key_mapping=key_mapping,
                                 source=source)

