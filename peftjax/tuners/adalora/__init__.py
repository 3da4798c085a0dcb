"""AdaLoRA: LoRA in SVD form whose rank budget is re-allocated by importance (``AdaLoraConfig``)."""

from peftjax.config import AdaLoraConfig
from peftjax.tuners.adalora._allocator import (
    RankAllocatorState,
    adalora_factors,
    adalora_loss,
    budget_schedule,
    init_rank_allocator,
    orthogonal_regularization,
    update_and_allocate,
)
from peftjax.tuners.adalora._layer import AdaLoraLayer, AdaLoraSpec, RankNum
from peftjax.tuners.adalora._model import adalora_state_dict, inject_adalora, load_adalora_state_dict

__all__ = [
    "AdaLoraConfig",
    "AdaLoraLayer",
    "AdaLoraSpec",
    "RankAllocatorState",
    "RankNum",
    "adalora_factors",
    "adalora_loss",
    "adalora_state_dict",
    "budget_schedule",
    "init_rank_allocator",
    "inject_adalora",
    "load_adalora_state_dict",
    "orthogonal_regularization",
    "update_and_allocate",
]
