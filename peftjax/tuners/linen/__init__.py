"""PEFT methods on Flax Linen models beyond LoRA (``peftjax.linen`` is the public face).

- ``_methods.py``: per method (LoHa, LoKr, VeRA, FourierFT, AdaLoRA, IA³), the static settings of one
  adapter on one layer, its PEFT init and its ``ΔW``, from the method's own pure functions;
- ``_delta.py``: inject / intercept / merge_and_unload / PEFT files for those methods;
- ``_api.py``: the public functions, which send a LoRA config or spec to ``tuners/lora/_linen.py``
  and the others to ``_delta.py``.
"""
