"""One process of a two-process ("two host") Trainer run on CPU: 2 x 4 devices, one 2x4 mesh.

    python tests/scripts/multihost_trainer.py PROCESS_ID PORT OUTPUT_DIR

Run twice, with process ids 0 and 1 and the same port and directory (shared storage). Each
process joins ``jax.distributed`` (gloo collectives between the processes), builds the same
model, data and ``Trainer(mesh=..., sharding="tp")``, trains 3 steps with a checkpoint at step 2
into ``OUTPUT_DIR/run``, then resumes a fresh Trainer from that checkpoint into
``OUTPUT_DIR/resumed``; it also evaluates and predicts. Prints one JSON line; ``tests/test_sharding.py`` asserts on it and on
the files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["XLA_FLAGS"] = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "device_count" not in f)  # the device count is set below

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(process_id: int, port: int, out: Path) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    sys.path.insert(0, str(Path(__file__).parent))
    from sharding_checks import lora_model, trainer_arguments, trainer_data

    from peftjax import sharding as shd
    from peftjax.training import Trainer

    mesh = shd.make_mesh({"data": 2, "model": 4})
    # 4 rows per device x 2 data-parallel devices: the one-device reference's 8 rows
    trainer = Trainer(lora_model(), trainer_arguments(out / "run", per_device=4), trainer_data(), mesh=mesh,
                      sharding="tp")
    trainer.train()
    q = trainer.model.base_model.model.layers[0].self_attn.q_proj
    evaluation = trainer.evaluate(trainer_data())  # replicated outputs: every process reads them
    predictions = trainer.predict(trainer_data())
    resumed = Trainer(lora_model(), trainer_arguments(out / "resumed", per_device=4), trainer_data(), mesh=mesh,
                      sharding="tp")
    resumed.train(resume_from_checkpoint=str(out / "run" / "checkpoint-2"))
    print(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "losses": [r["loss"] for r in trainer.log_history if "loss" in r],
        "eval_loss": evaluation["eval_loss"], "predict_shape": list(predictions.shape),
        "B_spec": str(q.lora_B["default"].get_value().sharding.spec),
        "B_fully_addressable": q.lora_B["default"].get_value().is_fully_addressable,
        "kernel_local_shards": sorted({tuple(s.data.shape) for s in q.kernel.get_value().addressable_shards}),
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
