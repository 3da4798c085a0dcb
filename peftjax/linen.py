"""LoRA, LoHa, LoKr, VeRA, FourierFT, AdaLoRA and IA³ for your own Flax Linen model, as pure
functions on its ``params``, with HF PEFT files.

The workflow (``model`` any ``nn.Module``, ``x`` a sample input):

    params, spec = inject(model, params, LoraConfig(r=8, target_modules=["query", "value"]),
                          sample_args=(x,), key=key)     # adapters added next to the kernels
    trainable, rest = split(params, spec)                # train ``trainable``; ``rest`` stays frozen
    def forward(trainable, rest, x):                     # jit this: interception acts while tracing
        with intercept(spec):
            return model.apply({"params": combine(trainable, rest)}, x)
    save_adapter("out", combine(trainable, rest), spec, config)  # peft.PeftModel.from_pretrained reads it

``load_adapter("out", model, params, sample_args=(x,))`` reads PEFT's files (or ours) back and
returns ``(params, spec)``; ``merge_and_unload(params, spec)`` folds the adapters in and drops them;
``trainable_labels(params, spec)`` labels the same leaves ``split`` puts on the trainable side, for
``optax.multi_transform``. PEFT file keys use torch module names: the Linen params path, with the
indices of scanned layers put after the scan's name, through ``key_mapping`` (by default
:data:`LINEN_KEY_MAPPING`, ``dense_0`` -> ``dense.0``); see :func:`save_adapter`.

The config picks the method. ``LoraConfig`` (DoRA, ``lora_bias``, ``modules_to_save``, mixed
batches...) has its own low-rank forward and a :class:`LinenLoraSpec`. ``LoHaConfig``,
``LoKrConfig``, ``VeraConfig``, ``FourierFTConfig`` and ``AdaLoraConfig`` are weight deltas: their
weights sit beside the kernel under PEFT's attribute names and layouts (``hada_w1_a/<adapter>``,
``lokr_w2``, ``vera_lambda_b``, ``fourierft_spectrum``, ``lora_A``/``lora_E``/``lora_B``), the
intercepted layer adds ``dropout(x) @ ΔW`` with ``ΔW`` from the method's own function (the one its NNX
layer uses), and the spec is a :class:`LinenDeltaSpec`. They adapt ``nn.Dense``, ``nn.DenseGeneral``
and ``nn.Einsum`` (``torch.nn.Linear`` twins). ``IA3Config`` shares that path: ``ia3_l`` (PEFT's
``[1, in]`` / ``[out, 1]``) scales a feedforward layer's input or another layer's output (and, merged,
the kernel's rows, or its columns and the bias), on ``nn.Dense`` and ``nn.DenseGeneral``; ``rank_dropout`` / ``module_dropout`` (LoHa, LoKr) and
``vera_dropout`` / ``lora_dropout`` apply inside ``peftjax.dropout_key(key)``, as PEFT applies them
in ``train()``. They refuse, by name, ``modules_to_save``, ``bias`` other than ``"none"``,
``fan_in_fan_out``, ``layers_to_transform`` and mixed batches; VeRA's shared projections are
regenerated from ``projection_prng_key`` (a file with other projections is refused), and AdaLoRA's
rank allocator does not run on Linen (the forward, merge and files are PEFT's). OFT, BOFT and the
other methods raise ``TypeError`` (use the NNX path).

Example:
    >>> import jax, jax.numpy as jnp
    >>> import flax.linen as nn
    >>> from peftjax.config import LoraConfig
    >>> from peftjax.linen import inject, intercept, split
    >>> class Mlp(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))
    >>> model, x = Mlp(), jnp.ones((2, 4))
    >>> params = model.init(jax.random.key(0), x)["params"]
    >>> params, spec = inject(model, params, LoraConfig(r=2, target_modules=["hidden"]),
    ...                       sample_args=(x,), key=jax.random.key(1))
    >>> jax.tree.map(jnp.shape, split(params, spec).trainable)
    {'hidden': {'lora_A': {'default': (4, 2)}, 'lora_B': {'default': (2, 8)}}}
    >>> with intercept(spec):
    ...     model.apply({"params": params}, x).shape
    (2, 3)
"""

from peftjax.tuners.linen._api import inject, intercept, load_adapter, merge_and_unload, save_adapter
from peftjax.tuners.linen._delta import LinenDeltaLayer, LinenDeltaSpec
from peftjax.tuners.lora._linen import (
    LINEN_KEY_MAPPING,
    LayerInfo,
    LinenLayerSpec,
    LinenLoraSpec,
    LinenSavedSpec,
    SplitParams,
    combine,
    discover_layers,
    merge,
    split,
    trainable_labels,
)

__all__ = [
    "LINEN_KEY_MAPPING",
    "LayerInfo",
    "LinenDeltaLayer",
    "LinenDeltaSpec",
    "LinenLayerSpec",
    "LinenLoraSpec",
    "LinenSavedSpec",
    "SplitParams",
    "combine",
    "discover_layers",
    "inject",
    "intercept",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "save_adapter",
    "split",
    "trainable_labels",
]
