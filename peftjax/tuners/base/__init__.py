"""The base tuner and base adapter layer that every PEFT method builds on.

- ``_variables.py``: the Variable types (``AdapterParam``, ``LoraParam``, ``ProjectedAdapterParam``, ``TRAINABLE``, ``FROZEN``).
- ``_layer.py``: the adapter-layer interface, its per-name bookkeeping, the class swap.
- ``_modules_to_save.py``: the trainable full copies of ``modules_to_save`` layers.
- ``_model.py``: the model-wide operations (walk, activate, disable, merge, unload, delete).
- ``_state_dict.py``: the one PEFT state-dict walk for layer methods.
- ``_status.py``: PEFT's ``get_layer_status`` / ``get_model_status``.
- ``_linear_options.py``: PEFT's ``fan_in_fan_out`` rule and ``bias`` option for linear methods.
- ``_rows.py``: mixed batches, a different adapter per row (PEFT's ``adapter_names``).
- ``_from_file.py``: whether an adapter being added is filled from a file right after.
- ``_task_ids.py``: each row's task, for the methods that route by it.
"""

from peftjax.tuners.base._layer import (
    AdapterDictLayer,
    AdapterLayer,
    AdditiveLayer,
    LowRankFactorsLayer,
    ModelLevelAdapter,
    CallValue,
    ModelMixin,
    PreMergeWeight,
    WeightReadingLayer,
    check_adaptable,
    layer_bias,
    mixin_subclass,
    original_class,
    with_base_signature,
)
from peftjax.tuners.base._model import (
    adapter_layers,
    check_modules_to_save,
    delete_adapter,
    find_targets,
    match_modules_to_save,
    merge,
    model_type,
    modules_in_definition_order,
    named_modules,
    resolve_config,
    set_active_adapters,
    set_adapter_trainable,
    set_adapters_disabled,
    stores_in_out,
    unload,
    unmerge,
    validate_adapter_name,
)
from peftjax.tuners.base._linear_options import mark_biases, settle_fan_in_fan_out
from peftjax.tuners.base._task_ids import outside_tasks, task_id_rows, task_rows
from peftjax.tuners.base._inject import check_linear_targets, inject_each_layer
from peftjax.tuners.base._from_file import adapter_from_file, adding_from_file
from peftjax.tuners.base._modules_to_save import SavedModule, add_saved_copy
from peftjax.tuners.base._status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from peftjax.tuners.base._rows import BASE, AdapterRows, adapter_index, clear_adapter_rows, set_adapter_rows
from peftjax.tuners.base._state_dict import (
    layer_state_dict,
    load_layer_state_dict,
    load_model_tensor,
    with_model_tensors,
    module_params_torch,
    saves_embeddings,
    set_module_params_torch,
    set_tree_params_torch,
)
from peftjax.tuners.base._variables import (
    FROZEN,
    TRAINABLE,
    AdapterParam,
    FrozenAdapterParam,
    LoraParam,
    ProjectedAdapterParam,
    TrainableParam,
    project_adapters,
)

__all__ = [
    "TunerLayerStatus",
    "TunerModelStatus",
    "get_layer_status",
    "get_model_status",
    "BASE",
    "AdapterRows",
    "adapter_index",
    "clear_adapter_rows",
    "set_adapter_rows",
    "FROZEN",
    "TRAINABLE",
    "AdapterDictLayer",
    "ModelLevelAdapter",
    "AdapterLayer",
    "AdditiveLayer",
    "LowRankFactorsLayer",
    "layer_bias",
    "CallValue",
    "ModelMixin",
    "PreMergeWeight",
    "WeightReadingLayer",
    "outside_tasks",
    "task_id_rows",
    "task_rows",
    "AdapterParam",
    "FrozenAdapterParam",
    "ProjectedAdapterParam",
    "project_adapters",
    "LoraParam",
    "SavedModule",
    "TrainableParam",
    "adapter_from_file",
    "adding_from_file",
    "add_saved_copy",
    "adapter_layers",
    "check_adaptable",
    "check_modules_to_save",
    "delete_adapter",
    "layer_state_dict",
    "load_layer_state_dict",
    "load_model_tensor",
    "with_model_tensors",
    "check_linear_targets",
    "find_targets",
    "inject_each_layer",
    "mark_biases",
    "match_modules_to_save",
    "merge",
    "mixin_subclass",
    "model_type",
    "modules_in_definition_order",
    "module_params_torch",
    "named_modules",
    "original_class",
    "with_base_signature",
    "resolve_config",
    "saves_embeddings",
    "set_active_adapters",
    "set_adapter_trainable",
    "set_adapters_disabled",
    "set_module_params_torch",
    "set_tree_params_torch",
    "settle_fan_in_fan_out",
    "stores_in_out",
    "unload",
    "unmerge",
    "validate_adapter_name",
]
