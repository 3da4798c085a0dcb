"""Sharded LoRA training on a simulated 8-device CPU mesh, checked against one device.

Run by ``tests/test_sharding.py`` in a subprocess (the device count must be set before JAX
starts, and the rest of the suite runs on one device). Prints one JSON object; the test
asserts on it, so this script only measures and never asserts.

    python tests/scripts/sharding_checks.py [section ...] [--tmp DIR]   # sections: steps families load orbax save trainer

``trainer`` is the one-device reference for ``multihost_trainer.py``: it leaves its adapter in
``DIR/trainer/single`` (give ``--tmp`` to keep it). This module's helpers are imported by that
script, so the device count is only forced when this file runs as a script.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import peftjax  # noqa: E402
from peftjax import sharding as shd  # noqa: E402
from peftjax.models import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3nForCausalLM,
    LlamaForCausalLM,
    MixtralForCausalLM,
    ModelConfig,
    Olmo2ForCausalLM,
    Phi3ForCausalLM,
    Qwen3ForCausalLM,
    from_pretrained,
)
from peftjax.training._checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

CONFIG = ModelConfig("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
LORA = dict(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)  # B != 0: a real adapter
STEPS = 3
# (mesh, preset): 1x8, 2x4 and 8x1 meshes; every preset
MESHES = [
    ({"data": 1, "model": 8}, "tp"),
    ({"data": 2, "model": 4}, "tp"),
    ({"data": 8, "model": 1}, "dp"),
    ({"fsdp": 8}, "fsdp"),
    ({"fsdp": 2, "model": 4}, "fsdp+tp"),
]
Q = "model.layers.0.self_attn.q_proj.kernel"
EMBED = "model.embed_tokens.embedding"


def lora_model(base=None, **lora):
    base = base if base is not None else LlamaForCausalLM.from_config(CONFIG, seed=0)
    return peftjax.get_peft_model(base, peftjax.LoraConfig(**{**LORA, **lora}))


def make_batch():
    # 8 x 12, not 8 x 16: 8 * 16 = 128 tokens would give a [tokens, hidden] activation the shape of
    # the [vocab, hidden] embedding (and [tokens, 128] that of the MLP kernels), and the HLO check
    # tells a gathered weight from a gathered activation by its shape only
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (8, 12)).astype(np.int32)
    return {"input_ids": ids, "labels": ids}


def variables(model) -> dict[str, jax.Array]:
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}


def base_weight_shapes(model) -> set[tuple[int, ...]]:
    shapes = {tuple(v.shape) for k, v in variables(model).items() if v.ndim == 2 and ".lora_" not in k}
    return shapes | {s[::-1] for s in shapes}


def all_gathers(hlo: str) -> list[list[int]]:
    found = re.findall(r"= \w+\[([\d,]*)\][^ ]* all-gather(?:-start)?\(", hlo)
    return [[int(d) for d in f.split(",") if d] for f in found]


def shard_shapes(x: jax.Array) -> list[list[int]]:
    return sorted({tuple(s.data.shape) for s in x.addressable_shards})


_TRAINED: dict = {}


def trained_tp():
    """The 2x4 "tp" run of :func:`check_steps`, reused by the save and orbax checks."""
    if "tp" not in _TRAINED:
        _TRAINED["tp"] = train(shd.make_mesh({"data": 2, "model": 4}), "tp")
    return _TRAINED["tp"]


def train(mesh=None, rules=None, *, lower=False, base=None, lora=None):
    """3 steps of the functional step; returns losses, adapters, the model and the compiled HLO."""
    pm = lora_model(base() if base is not None else None, **(lora or {}))
    if mesh is not None:
        shd.shard_model(pm.base_model, mesh, rules)
    graphdef, trainable, rest = peftjax.split(pm.base_model)
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)
    step = peftjax.make_train_step(graphdef, tx, mesh=mesh, rules=rules)
    batch, hlo = make_batch(), None
    if lower:  # run the very executable whose HLO is inspected (and compile once, not twice)
        compiled = step.lower(trainable, opt_state, rest, batch, None).compile()
        hlo, step = compiled.as_text(), compiled
    losses = []
    for _ in range(STEPS):
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        losses.append(float(loss))
    nnx.update(pm.base_model, trainable)
    return losses, trainable, opt_state, pm, hlo


def max_diff(a, b) -> float:
    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b))
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in pairs)


def check_steps(out: dict, tmp: Path) -> None:
    ref_losses, ref_adapters, _, ref_model, _ = train()
    forbidden = base_weight_shapes(ref_model.base_model)
    out["base_weight_shapes"] = sorted(forbidden)
    out["steps"] = []
    for shape, rules in MESHES:
        mesh = shd.make_mesh(shape)
        result = train(mesh, rules, lower=True)
        losses, adapters, opt_state, pm, hlo = result
        if shape == {"data": 2, "model": 4} and rules == "tp":
            _TRAINED["tp"] = result
        v = variables(pm.base_model)
        gathers = all_gathers(hlo)
        mu = opt_state[0].mu["model"]["layers"][0]["self_attn"]["q_proj"]["lora_B"]["default"].get_value()
        out["steps"].append({
            "mesh": shape, "rules": rules,
            "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
            "adapter_diff": max_diff(adapters, ref_adapters),
            "q_shards": shard_shapes(v[Q]), "embed_shards": shard_shapes(v[EMBED]),
            "lora_B_spec": str(v[Q.replace("kernel", "lora_B.default")].sharding.spec),
            "lora_A_spec": str(v[Q.replace("kernel", "lora_A.default")].sharding.spec),
            "mu_matches_lora_B": mu.sharding == v[Q.replace("kernel", "lora_B.default")].sharding,
            "all_gathers": gathers,
            "base_weight_all_gathers": sorted({tuple(g) for g in gathers if tuple(g) in forbidden}),
        })


def check_load(out: dict, tmp: Path) -> None:
    LlamaForCausalLM.from_config(CONFIG, seed=3).save_pretrained(tmp / "base")
    mesh = shd.make_mesh({"fsdp": 2, "model": 4})
    reads: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    original = jax.make_array_from_callback

    def spy(shape, sharding, callback, *args, **kwargs):
        def recorded(index):
            piece = callback(index)
            reads.append((tuple(shape), tuple(np.shape(piece))))
            return piece

        return original(shape, sharding, recorded, *args, **kwargs)

    jax.make_array_from_callback = spy
    try:
        model = shd.load_sharded(tmp / "base", mesh, "fsdp+tp")
    finally:
        jax.make_array_from_callback = original
    sharded, plain = variables(model), variables(from_pretrained(tmp / "base"))
    out["load"] = {
        "q_shards": shard_shapes(sharded[Q]), "embed_shards": shard_shapes(sharded[EMBED]),
        "q_spec": str(sharded[Q].sharding.spec),
        "max_diff": max(float(np.max(np.abs(np.asarray(sharded[k]) - np.asarray(plain[k])))) for k in plain),
        "same_keys": sorted(sharded) == sorted(plain),
        "reads": len(reads),
        # every read of a 2-D weight is one device's shard, never the whole matrix
        "full_reads_2d": sum(1 for full, piece in reads if piece == full and len(full) == 2),
        "reads_of_64x64": sorted({piece for full, piece in reads if full == (64, 64)}),  # q_proj and o_proj
    }


def check_save(out: dict, tmp: Path) -> None:
    pm = trained_tp()[3]
    spec = str(pm.base_model.model.layers[0].self_attn.q_proj.lora_B["default"].get_value().sharding.spec)
    pm.save_pretrained(tmp / "sharded")
    gathered = jax.tree.map(lambda x: jax.device_put(x, jax.devices()[0]), nnx.state(pm.base_model))
    nnx.update(pm.base_model, gathered)
    pm.save_pretrained(tmp / "single")
    files = sorted(p.name for p in (tmp / "sharded").iterdir())
    out["save"] = {
        "files": files,
        "identical": all((tmp / "sharded" / f).read_bytes() == (tmp / "single" / f).read_bytes() for f in files),
        "lora_B_spec": spec,
    }


def check_orbax(out: dict, tmp: Path) -> None:
    import orbax.checkpoint as ocp

    _, trainable, opt_state, _, _ = trained_tp()
    state = {"trainable": trainable, "opt_state": opt_state}
    save_checkpoint(tmp / "ckpt", state, {"global_step": STEPS})
    restored, info = load_checkpoint(tmp / "ckpt", state)
    pairs = list(zip(jax.tree.leaves(state), jax.tree.leaves(restored)))
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    # onto other shardings: everything on one device
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_one = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)
    single, _ = load_checkpoint(tmp / "ckpt", on_one)
    out["orbax"] = {
        "same_shardings": all(a.sharding == b.sharding for a, b in pairs),
        "some_sharded": any(not a.sharding.is_fully_replicated for a, _ in pairs),
        "same_values": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in pairs) == 0.0,
        "shape_dtype_struct_keeps_sharding": all(
            s.sharding == a.sharding for s, a in zip(jax.tree.leaves(abstract), jax.tree.leaves(state))),
        "restored_onto_one_device": all(x.sharding == one for x in jax.tree.leaves(single)),
        "one_device_values": max_diff(single, state) == 0.0,
        "info": info,
    }


def trainer_data() -> dict:
    rng = np.random.default_rng(1)
    rows = [rng.integers(1, CONFIG.vocab_size, int(rng.integers(6, 16))).tolist() for _ in range(32)]
    return {"input_ids": rows, "labels": rows}


def trainer_arguments(output_dir: Path, per_device: int):
    from peftjax.training import TrainingArguments

    return TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=per_device, max_steps=3,
                             learning_rate=1e-3, logging_steps=1, save_steps=2, seed=0, disable_tqdm=True,
                             report_to="none", plot=False)


def check_trainer(out: dict, tmp: Path) -> None:
    """The Trainer on one device with 8 rows a step: the reference for the two-process mesh run."""
    from peftjax.training import Trainer

    trainer = Trainer(lora_model(), trainer_arguments(tmp / "single", per_device=8), trainer_data())
    trainer.train()
    out["trainer"] = {"losses": [r["loss"] for r in trainer.log_history if "loss" in r],
                      "adapter": str(tmp / "single" / "adapter_model.safetensors"),
                      "eval_loss": trainer.evaluate(trainer_data())["eval_loss"],
                      "predict_shape": list(trainer.predict(trainer_data()).shape)}


# the other families' own weights: Qwen3's per-head norms, Phi-3's fused projections (on the 4-way
# axis qkv_proj's 128 outputs split into q | q | k | v and gate_up_proj's 256 into gate | gate | up | up),
# Mixtral's experts (one of 4 per device on the 4-way axis; its loss includes the load-balancing loss)
FAMILIES = {
    "qwen3": (Qwen3ForCausalLM, ModelConfig("qwen3", vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            head_dim=16)),
    "phi3": (Phi3ForCausalLM, ModelConfig("phi3", vocab_size=128, hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                          pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # Gemma 3: sliding and global layers, each with its RoPE, q/k norms and post-norms
    "gemma3_text": (Gemma3ForCausalLM, ModelConfig(
        "gemma3_text", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"])),
    # OLMo 2: q/k norms over the whole (column-split) projections, norms after each branch
    "olmo2": (Olmo2ForCausalLM, ModelConfig("olmo2", vocab_size=128, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
    # Gemma 3n: two AltUp streams, LAuReL, a sparse MLP, and the per-layer embeddings' table and projection split
    # on their features over the 4-way axis
    "gemma3n_text": (Gemma3nForCausalLM, ModelConfig(
        "gemma3n_text", vocab_size=128, vocab_size_per_layer_input=128, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], num_kv_shared_layers=0, hidden_size_per_layer_input=16,
        altup_num_inputs=2, laurel_rank=8, activation_sparsity_pattern=[0.95, 0.0])),
    "mixtral": (MixtralForCausalLM, ModelConfig("mixtral", vocab_size=128, hidden_size=64, intermediate_size=128,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                num_local_experts=4, num_experts_per_tok=2,
                                                output_router_logits=True, router_aux_loss_coef=0.1)),
}
FUSED = {"qwen3": ("self_attn.q_norm.scale", "mlp.up_proj.kernel"),
         "phi3": ("self_attn.qkv_proj.kernel", "mlp.gate_up_proj.kernel"),
         "gemma3_text": ("post_feedforward_layernorm.scale", "mlp.gate_proj.kernel"),
         "mixtral": ("mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"),
         "olmo2": ("self_attn.q_norm.scale", "self_attn.q_proj.kernel"),
         "gemma3n_text": ("mlp.gate_proj.kernel", "laurel.linear_left.kernel", "altup.prediction_coefs.kernel",
                          "model.embed_tokens_per_layer.embedding", "model.per_layer_model_projection.kernel")}
# attention only here: LoRA on Mixtral's router and experts (target_parameters) is tested in test_lora_peft
TARGETS = {"mixtral": dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
           "gemma3n_text": dict(target_modules=["q_proj", "v_proj", "laurel.linear_left"])}


def check_families(out: dict, tmp: Path) -> None:
    out["families"] = []
    for name, (cls, config) in FAMILIES.items():
        def base(cls=cls, config=config):
            return cls.from_config(config, seed=0)

        ref_losses, ref_adapters, _, _, _ = train(base=base, lora=TARGETS.get(name))
        for shape, rules in (({"fsdp": 2, "model": 4}, "fsdp+tp"),):  # tp on the 4-way axis, fsdp beside it
            losses, adapters, _, pm, _ = train(shd.make_mesh(shape), rules, base=base, lora=TARGETS.get(name))
            v = variables(pm.base_model)
            out["families"].append({
                "family": name, "mesh": shape, "rules": rules,
                "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "adapter_diff": max_diff(adapters, ref_adapters),
                "shards": {w: shard_shapes(v[w if w.startswith("model.") else f"model.layers.0.{w}"])
                           for w in FUSED[name]},
            })


BDLORA = dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              use_bdlora=dict(target_modules_bd_a=["o_proj", "down_proj"],
                              target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], nblocks=4))


def check_bdlora(out: dict, tmp: Path) -> None:
    """BD-LoRA with one block per device of the 4-way model axis, against one device."""
    ref_losses, ref_adapters, _, ref_model, _ = train(lora=BDLORA)
    forbidden = base_weight_shapes(ref_model.base_model)
    losses, adapters, _, pm, hlo = train(shd.make_mesh({"data": 2, "model": 4}), "tp", lower=True, lora=BDLORA)
    v = variables(pm.base_model)
    layer = "model.layers.0."
    out["bdlora"] = {
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
        "adapter_diff": max_diff(adapters, ref_adapters),
        "shards": {k: shard_shapes(v[layer + k]) for k in ("self_attn.q_proj.lora_B.default",
                                                           "self_attn.o_proj.lora_A.default",
                                                           "self_attn.q_proj.lora_A.default")},
        "base_weight_all_gathers": sorted({tuple(g) for g in all_gathers(hlo) if tuple(g) in forbidden}),
    }


# "save" moves the shared tp run's adapters to one device, so it runs after "orbax"
CHECKS = {"steps": check_steps, "families": check_families, "load": check_load, "orbax": check_orbax,
          "save": check_save, "trainer": check_trainer, "bdlora": check_bdlora}
SECTIONS = list(CHECKS)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sections", nargs="*", help=f"any of {SECTIONS} (default: all)")
    parser.add_argument("--tmp", type=Path, default=None, help="keep the files here (default: a temporary directory)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    out: dict = {"devices": jax.device_count()}
    with tempfile.TemporaryDirectory() as d:
        tmp = args.tmp or Path(d)
        for name in args.sections or SECTIONS:
            CHECKS[name](out, tmp / name)
    print(json.dumps(out, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


if __name__ == "__main__":
    main()
