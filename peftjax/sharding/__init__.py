"""Sharded LoRA training over device meshes, on one host or many.

    mesh = make_mesh({"data": 2, "model": 4})
    model = load_sharded("path/to/llama", mesh, "tp")        # each weight read onto its shards
    peft_model = peftjax.get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
    shard_model(peft_model.base_model, mesh, "tp")           # the new adapters follow their weights
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    opt_state = optimizer.init(trainable)
    step = peftjax.make_train_step(graphdef, optimizer, mesh=mesh, rules="tp")
    trainable, opt_state, loss = step(trainable, opt_state, rest, batch, key)

or ``Trainer(peft_model, args, data, mesh=mesh, sharding="tp")``. See ``docs/multi_host.md``.

Both trace the step inside :func:`partitioned`, which keeps LoRA's layers from concatenating a
sharded kernel (their one-device joint matmul); a step jitted with shardings of one's own should
trace its forward inside it too.
"""

from peftjax.nn._partitioned import partitioned
from peftjax.sharding._jit import ShardedStep
from peftjax.sharding._load import load_sharded
from peftjax.sharding._mesh import (
    DATA,
    FSDP,
    MODEL,
    batch_sharding,
    data_axes,
    data_parallel_size,
    make_mesh,
    replicated,
    shard_batch,
)
from peftjax.sharding._place import opt_state_shardings, shard_model, state_shardings
from peftjax.sharding._rules import PRESETS, ShardingRules, as_rules, partition_spec

__all__ = [
    "DATA",
    "FSDP",
    "MODEL",
    "PRESETS",
    "ShardedStep",
    "ShardingRules",
    "as_rules",
    "batch_sharding",
    "data_axes",
    "data_parallel_size",
    "load_sharded",
    "make_mesh",
    "opt_state_shardings",
    "partition_spec",
    "partitioned",
    "replicated",
    "shard_batch",
    "shard_model",
    "state_shardings",
]
