"""(IA)³ for Flax NNX: learned vectors that rescale a layer's output or its input.

A targeted ``nnx.Linear`` (GPT-2's ``Conv1D`` included) keeps its ``kernel`` and ``bias`` and gains
one vector per adapter name (``k_proj/ia3_l/default``), as in HF PEFT 0.21
(``peft/tuners/ia3/layer.py``; reference §3.3):

- an attention-type module scales its **output**, ``y = base(x) * l`` with ``l: [out]``, the bias
  included;
- a feedforward module (``feedforward_modules``) scales its **input**, ``y = base(x * l)`` with
  ``l: [in]``.

Several active adapters multiply their vectors. The vectors start at ones (a no-op adapter), or at
N(0, 1) with ``init_ia3_weights=False``, like PEFT's ``torch.randn``.

``merge`` folds ``l`` into the kernel (``[in, out]`` here): columns for an attention-type module
(and the bias), rows for a feedforward one. ``unmerge`` divides by ``l + 1e-8`` and is therefore
approximate; it warns as PEFT does.

On disk (PEFT's keys): ``base_model.model.<path>.ia3_l``, shaped ``[out, 1]`` (attention-type) or
``[1, in]`` (feedforward), for ``nn.Linear`` and ``Conv1D`` alike.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.nn._broadcast import along_last
from peftjax.tuners.base import AdapterDictLayer, AdapterParam, mixin_subclass
from peftjax.tuners.base._rows import rows_of


@dataclasses.dataclass(frozen=True)
class IA3Spec:
    """Static settings of one IA³ adapter on one layer.

    Attributes:
      is_feedforward: the input is scaled (``l: [in]``) rather than the output (``l: [out]``).
    """

    is_feedforward: bool


class IA3Layer(AdapterDictLayer):
    """Mixin marking an IA³ layer (``isinstance(m, IA3Layer)`` finds them)."""

    method_name = "IA³"
    status_module_type = "Linear"  # PEFT's IA3 layer keeps torch's repr (GPT-2's Conv1D too)
    bnb_status_prefix = "ia3."  # PEFT's own bitsandbytes layer: <prefix>Linear4bit
    weight_dicts = ("ia3_l",)
    supports_adapter_rows = True  # a different adapter per batch row (PEFT has this for LoRA only)


class IA3Linear(IA3Layer):
    """IA³ on ``nnx.Linear`` and its subclasses (GPT-2's ``Conv1D`` included)."""

    def add_ia3(self, name: str, spec: IA3Spec, key: jax.Array, init: bool = True) -> None:
        self._check_new(name)
        n_in, n_out = self.kernel.get_value().shape
        shape = (n_in,) if spec.is_feedforward else (n_out,)
        value = jnp.ones(shape, jnp.float32) if init else jax.random.normal(key, shape, jnp.float32)
        self.ia3_l[name] = AdapterParam(value)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        # PEFT: [out, 1] for attention-type modules, [1, in] for feedforward ones (Conv1D included)
        shape = (1, -1) if self.spec(name).is_feedforward else (-1, 1)
        return {"ia3_l": (self.ia3_l, lambda vec: vec.reshape(shape), jnp.ravel)}

    def _describe(self, name: str) -> str:
        kind = "feedforward, [1, in]" if self.spec(name).is_feedforward else "attention-type, [out, 1]"
        return f"IA³ {kind}"

    def _product(self, feedforward: bool):
        scale = None
        for name, spec in self._live_adapters():
            if spec.is_feedforward == feedforward:
                vec = self.ia3_l[name].get_value()
                scale = vec if scale is None else scale * vec
        return scale

    def _row_scales(self, rows, names, feedforward: bool):
        """``[batch, n]`` vectors, row ``i`` the one adapter ``names[rows[i]]`` has (ones if none)."""
        if not self._serves_rows():
            return None
        specs = dict(self.adapter_specs)
        present = [n for n in names if n in specs and specs[n].is_feedforward == feedforward]
        if not present:
            return None
        ones = jnp.ones_like(self.ia3_l[present[0]].get_value())
        stack = jnp.stack([self.ia3_l[n].get_value() if n in present else ones for n in names] + [ones])
        return stack[rows]

    def _scaled(self, v, scale, mixed: bool):
        """``v`` times ``scale`` along its last axis: one vector, or one per batch row."""
        if scale is None:
            return v
        shape = (scale.shape[0],) + (1,) * (v.ndim - 2) + scale.shape[-1:] if mixed else None
        s = scale.reshape(shape) if mixed else along_last(scale, v.ndim)
        return (v.astype(scale.dtype) * s).astype(v.dtype)  # PEFT: (x.to(l.dtype) * l).to(x.dtype)

    def __call__(self, x, *args, **kwargs):
        mixed = rows_of(self)
        if mixed is not None:  # a mixed batch: each row its own adapter's vectors
            scale_in, scale_out = self._row_scales(*mixed, True), self._row_scales(*mixed, False)
        else:
            scale_in, scale_out = self._product(True), self._product(False)
        x = self._scaled(x, scale_in, mixed is not None)
        y = self._peftjax_base.__call__(self, x, *args, **kwargs)
        return self._scaled(y, scale_out, mixed is not None)

    def merge_adapter(self, name: str) -> None:
        """Folds ``l`` into the kernel: rows (inputs) if feedforward, else columns and the bias."""
        self._rescale(name, lambda w, vec: w * vec)
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        """Divides ``l + 1e-8`` back out, as PEFT does: approximate, with PEFT's warning."""
        warnings.warn("Unmerge result can be inaccurate for (IA)^3.", stacklevel=2)
        self._rescale(name, lambda w, vec: w / (vec + 1e-8))
        self._mark_merged(name, False)

    def _rescale(self, name: str, op) -> None:
        vec = self.ia3_l[name].get_value()
        w = self.kernel.get_value()
        if self.spec(name).is_feedforward:  # PEFT leaves the bias alone: it is added after the scaled input
            self.kernel.set_value(op(w.astype(jnp.float32), vec[:, None]).astype(w.dtype))
            return
        self.kernel.set_value(op(w.astype(jnp.float32), vec[None, :]).astype(w.dtype))
        if self.bias is not None:
            b = self.bias.get_value()
            self.bias.set_value(op(b.astype(jnp.float32), vec).astype(b.dtype))


def ia3_class_for(module: nnx.Module) -> type:
    if isinstance(module, IA3Layer):
        return type(module)
    return mixin_subclass(type(module), IA3Linear, "IA3")
