"""Arrow (PEFT's ``create_arrow_model``): one ``PeftModel`` that routes each token over several task LoRAs.

The router's layer side (prototypes, GenKnowSub, the routed update) is ``peftjax.tuners.lora``'s;
this builds the model from adapter directories or Hub ids, as PEFT's function does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from flax import nnx

from peftjax.config import ArrowConfig, LoraConfig
from peftjax.peft_model import PeftModel
from peftjax.tuners.lora._arrow import check_compatible

ROUTER = "arrow_router"
TASK_PREFIX, GKS_PREFIX = "task_", "gks_"


def _source(path: str) -> tuple[str, str | None]:
    """PEFT's ``_resolve_adapter_source``: a local directory, or ``org/repo[/subfolder...]`` on the Hub."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"Local adapter path '{path}' does not contain 'adapter_config.json'.")
        return path, None
    parts = str(path).strip("/").split("/")
    if len(parts) > 2:
        return "/".join(parts[:2]), "/".join(parts[2:])
    return str(path), None


def create_arrow_model(
    base_model: nnx.Module,
    task_specific_adapter_paths: list[str],
    arrow_config: ArrowConfig,
    general_adapter_paths: list[str] | None = None,
    **adapter_kwargs: Any,
):
    """A ``PeftModel`` that routes each token over the given task LoRAs (PEFT's ``create_arrow_model``).

    Args:
      base_model: the plain model (modified in place, as ``PeftModel.from_pretrained`` does).
      task_specific_adapter_paths: LoRA adapter directories or Hub ids (``org/repo[/subfolder]``),
        loaded as ``task_0``, ``task_1``, ...
      arrow_config: the routing settings (``top_k``, ``router_temperature``, ``use_gks``, ``rng_seed``).
      general_adapter_paths: with ``use_gks``, the general adapters (``gks_0``, ...) whose mean is
        subtracted from every task adapter.
      **adapter_kwargs: passed to each ``from_pretrained`` / ``load_adapter`` (``revision``, ...).

    Returns:
      The ``PeftModel``, its ``arrow_router`` adapter active. Adapters loaded later become experts too.

    Raises:
      ValueError: no task adapter; ``use_gks`` without general adapters; adapters of different
        ranks, shapes or target modules (named); ``top_k`` above the number of task adapters.
      TypeError: an adapter on a layer other than a linear one (listed).
    """
    if not task_specific_adapter_paths:
        raise ValueError("`task_specific_adapter_paths` should contain at least one adapter path")
    arrow_config = ArrowConfig.from_value(arrow_config)
    names = [f"{TASK_PREFIX}{i}" for i in range(len(task_specific_adapter_paths))]
    gks = []
    if arrow_config.use_gks:
        if not general_adapter_paths:
            raise ValueError("You should provide general LoRA paths if you want to use GenKnowSub.")
        gks = [f"{GKS_PREFIX}{i}" for i in range(len(general_adapter_paths))]
    if arrow_config.top_k > len(names):
        raise ValueError(f"arrow_config.top_k={arrow_config.top_k} is more than the {len(names)} task adapters "
                         "given; each token takes top_k of them")

    def kwargs_for(path):
        model_id, subfolder = _source(path)
        kw = dict(adapter_kwargs)
        if subfolder is not None:
            kw.setdefault("subfolder", subfolder)
        return model_id, kw

    model_id, kw = kwargs_for(task_specific_adapter_paths[0])
    model = PeftModel.from_pretrained(base_model, model_id, adapter_name=names[0], **kw)
    for name, path in zip(names[1:] + gks, list(task_specific_adapter_paths[1:]) + list(general_adapter_paths or [])):
        model_id, kw = kwargs_for(path)
        model.load_adapter(model_id, adapter_name=name, **kw)
    targets, r = check_compatible(model, names + gks)
    arrow_config = dataclasses.replace(arrow_config, task_adapter_names=tuple(names), gks_adapter_names=tuple(gks))
    model.add_adapter(ROUTER, LoraConfig(arrow_config=arrow_config.to_dict(), target_modules=targets, r=r))
    model.set_adapter(ROUTER)
    return model
