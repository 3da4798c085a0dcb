"""Sharded LoRA training: the rules (in process), and training on a simulated 8-device mesh.

The rule tests use ``jax.sharding.AbstractMesh``, which needs no devices. The mesh tests need 8
devices, which must be requested before JAX starts: they run ``tests/scripts/sharding_checks.py``
in two subprocesses side by side (``XLA_FLAGS=--xla_force_host_platform_device_count=8``), then
the two-process run below, and assert on the JSON they print. What each preset is held to:

* every mesh (1x8 and 2x4 "tp", 8x1 "dp", 8 "fsdp", 2x4 "fsdp+tp"), on a batch of 8 x 12 tokens
  (not 8 x 16: 128 tokens would give activations the shapes of weights): the losses of 3 Adam steps
  and the adapters after them equal the single-device run to 1e-5; each device holds exactly its
  shard of the q_proj kernel (64x64) and of the embedding (128x64); the optimizer moments have
  their adapter's sharding.
* "tp" and "dp": the compiled step has no all-gather whose result has the full shape of a base
  weight (any 2-D base kernel or embedding, either orientation): tensor parallelism never
  rebuilds a weight.
* "fsdp": it does all-gather base weights (that is how FSDP computes), so the test asserts that
  the 64x64 attention kernels are gathered. (XLA may leave others split and move activations.)
* "fsdp+tp": numerics and shard shapes only; its all-gathers are reported, not asserted.

Beside them, a real two-process run (``tests/scripts/multihost_trainer.py``: two CPU processes of
4 devices joined by ``jax.distributed`` with gloo collectives) trains with the ``Trainer`` on one
2x4 mesh and must match the one-device ``Trainer``: losses, the adapter file (written by process
0 only), and a resume from its orbax checkpoint (each process saves and restores its shards).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import _tiny
import peftjax
from peftjax import sharding as shd
from peftjax.io import read_safetensors
from peftjax.models import LlamaForCausalLM

SCRIPT = Path(__file__).parent / "scripts" / "sharding_checks.py"
MULTIHOST = Path(__file__).parent / "scripts" / "multihost_trainer.py"
Q = "model.layers.0.self_attn.q_proj"
O = "model.layers.0.self_attn.o_proj"
TP = AbstractMesh((2, 4), ("data", "model"))
FSDP_TP = AbstractMesh((2, 4), ("fsdp", "model"))


# ------------------------------------------------------------------ rules, without devices


@pytest.mark.parametrize(
    ("path", "shape", "mesh", "rules", "expected"),
    [
        # Megatron tp: column-parallel out dim, row-parallel in dim, embedding hidden, lm_head vocab
        (f"{Q}.kernel", (64, 64), TP, "tp", P(None, "model")),
        (f"{Q}.bias", (64,), TP, "tp", P("model")),
        ("model.layers.1.mlp.up_proj.kernel", (64, 128), TP, "tp", P(None, "model")),
        (f"{O}.kernel", (64, 64), TP, "tp", P("model", None)),
        ("model.layers.0.mlp.down_proj.kernel", (128, 64), TP, "tp", P("model", None)),
        ("model.embed_tokens.embedding", (128, 64), TP, "tp", P(None, "model")),
        ("lm_head.kernel", (64, 128), TP, "tp", P(None, "model")),
        ("model.norm.scale", (64,), TP, "tp", P(None)),
        # BART's cross-attention output and MPNet's attention (column q/k/v, row o)
        ("model.decoder.layers.0.encoder_attn.out_proj.kernel", (64, 64), TP, "tp", P("model", None)),
        ("mpnet.encoder.layer.0.attention.attn.q.kernel", (64, 64), TP, "tp", P(None, "model")),
        ("mpnet.encoder.layer.0.attention.attn.o.kernel", (64, 64), TP, "tp", P("model", None)),
        # a dimension the axis does not divide stays whole: 6 outputs on a 4-way axis
        ("model.layers.0.self_attn.k_proj.kernel", (64, 6), TP, "tp", P(None, None)),
        # dp replicates everything
        (f"{Q}.kernel", (64, 64), TP, "dp", P(None, None)),
        # fsdp: largest divisible dim (ties: the first); vectors stay replicated
        ("model.layers.0.mlp.gate_proj.kernel", (64, 128), FSDP_TP, "fsdp", P(None, "fsdp")),
        (f"{Q}.kernel", (64, 64), FSDP_TP, "fsdp", P("fsdp", None)),
        (f"{Q}.kernel", (63, 66), FSDP_TP, "fsdp", P(None, "fsdp")),  # 63 is odd: the next largest
        (f"{Q}.kernel", (7, 9), FSDP_TP, "fsdp", P(None, None)),
        ("model.norm.scale", (64,), FSDP_TP, "fsdp", P(None)),
        # fsdp+tp: tp first, fsdp on a dim tp left whole
        (f"{Q}.kernel", (64, 64), FSDP_TP, "fsdp+tp", P("fsdp", "model")),
        (f"{O}.kernel", (64, 64), FSDP_TP, "fsdp+tp", P("model", "fsdp")),
        # tp cannot split 6, so fsdp takes the largest dim
        ("model.layers.0.self_attn.k_proj.kernel", (64, 6), FSDP_TP, "fsdp+tp", P("fsdp", None)),
        # stacked layers (scan_layers=True): the leading layer axis is never split
        ("model.layers.layer.self_attn.q_proj.kernel", (2, 64, 64), TP, "tp", P(None, None, "model")),
        ("model.layers.layer.self_attn.q_proj.bias", (2, 64), TP, "tp", P(None, "model")),
        ("model.layers.layer.mlp.down_proj.kernel", (2, 128, 64), FSDP_TP, "fsdp+tp", P(None, "model", "fsdp")),
        ("model.layers.layer.mlp.up_proj.kernel", (8, 64, 128), FSDP_TP, "fsdp", P(None, None, "fsdp")),
    ],
)
def test_preset_specs(path, shape, mesh, rules, expected):
    assert shd.partition_spec(path, shape, mesh, rules) == expected


@pytest.mark.parametrize(
    ("adapter", "shape", "weight", "w_shape", "rules", "expected"),
    [
        # A [in, r] takes W's input axis; B [r, out] W's output axis; r is never split
        (f"{Q}.lora_A.default", (64, 8), f"{Q}.kernel", (64, 64), "tp", P(None, None)),
        (f"{Q}.lora_B.default", (8, 64), f"{Q}.kernel", (64, 64), "tp", P(None, "model")),
        (f"{O}.lora_A.default", (64, 8), f"{O}.kernel", (64, 64), "tp", P("model", None)),
        (f"{O}.lora_B.default", (8, 64), f"{O}.kernel", (64, 64), "tp", P(None, None)),
        (f"{Q}.lora_magnitude_vector.default", (64,), f"{Q}.kernel", (64, 64), "tp", P("model")),
        (f"{Q}.lora_B_bias.default", (64,), f"{Q}.kernel", (64, 64), "tp", P("model")),
        ("model.embed_tokens.lora_A.default", (128, 8), "model.embed_tokens.embedding", (128, 64), "tp",
         P(None, None)),
        ("model.embed_tokens.lora_B.default", (8, 64), "model.embed_tokens.embedding", (128, 64), "tp",
         P(None, "model")),
        (f"{Q}.lora_A.default", (64, 8), f"{Q}.kernel", (64, 64), "fsdp+tp", P("fsdp", None)),
        (f"{O}.lora_B.other", (8, 64), f"{O}.kernel", (64, 64), "fsdp+tp", P(None, "fsdp")),
        # stacked layers: A [L, in, r], B [L, r, out], vectors [L, out]
        ("m.layers.layer.o_proj.lora_A.default", (2, 64, 8), "m.layers.layer.o_proj.kernel", (2, 64, 64), "tp",
         P(None, "model", None)),
        ("m.layers.layer.q_proj.lora_B.default", (2, 8, 64), "m.layers.layer.q_proj.kernel", (2, 64, 64), "tp",
         P(None, None, "model")),
        ("m.layers.layer.q_proj.lora_magnitude_vector.default", (2, 64), "m.layers.layer.q_proj.kernel", (2, 64, 64),
         "tp", P(None, "model")),
        # a layout that does not line up with W (a Conv's B) is replicated
        (f"{Q}.lora_B.default", (1, 8, 64), f"{Q}.kernel", (3, 64, 64), "tp", P(None, None, None)),
        # below the threshold: replicated
        (f"{Q}.lora_B.default", (8, 64), f"{Q}.kernel", (64, 64),
         shd.ShardingRules(preset="tp", replicate_below=1024), P()),
    ],
)
def test_adapters_follow_their_weight(adapter, shape, weight, w_shape, rules, expected):
    mesh = FSDP_TP if "fsdp" in str(rules) else TP
    assert shd.partition_spec(adapter, shape, mesh, rules, weight=(weight, w_shape)) == expected


def test_user_rules_come_first_and_adapters_follow_them():
    rules = shd.ShardingRules(preset="tp", rules=[
        (r"q_proj\.lora_B\.", P()),             # pins the adapter itself
        (r"q_proj\.kernel$", P("model", None)),  # overrides the preset
        (r"q_proj\.kernel$", P(None, None)),     # never reached: first match wins
        (r"v_proj\.kernel$", [None, "model"]),   # a list is a spec too; 6 outputs do not divide by 4
    ])
    weight = (f"{Q}.kernel", (64, 64))
    assert shd.partition_spec(f"{Q}.kernel", (64, 64), TP, rules) == P("model", None)
    assert shd.partition_spec(f"{Q}.lora_A.default", (64, 8), TP, rules, weight=weight) == P("model", None)
    assert shd.partition_spec(f"{Q}.lora_B.default", (8, 64), TP, rules, weight=weight) == P(None, None)
    assert shd.partition_spec("model.layers.0.self_attn.v_proj.kernel", (64, 6), TP, rules) == P(None, None)
    assert shd.partition_spec(f"{O}.kernel", (64, 64), TP, rules) == P("model", None)  # the preset still applies
    # a bare list of rules: unmatched leaves are replicated ("dp")
    assert shd.partition_spec(f"{O}.kernel", (64, 64), TP, [(r"q_proj", P("data"))]) == P(None, None)
    assert shd.as_rules([(r"q_proj", P("data"))]) == shd.ShardingRules(rules=[(r"q_proj", P("data"))])


def test_rule_mistakes_fail_early():
    with pytest.raises(ValueError, match=r"'zero3'.*dp / fsdp / tp"):
        shd.ShardingRules(preset="tp+zero3")
    with pytest.raises(ValueError, match=r"rule 0 '\('(.|\n)*rule 1 is not a \(regex, PartitionSpec\) pair"):
        shd.ShardingRules(rules=[("(", P()), ("x",)])  # both problems reported at once
    with pytest.raises(ValueError, match="needs a mesh axis named 'model'"):
        shd.partition_spec(f"{Q}.kernel", (64, 64), AbstractMesh((8,), ("data",)), "tp")
    with pytest.raises(ValueError, match="needs a mesh axis named 'fsdp'"):
        shd.partition_spec(f"{Q}.kernel", (64, 64), TP, "fsdp")
    with pytest.raises(ValueError, match=r"q_proj\.kernel: PartitionSpec .* names axes \['tensor'\]"):
        shd.partition_spec(f"{Q}.kernel", (64, 64), TP, [(r"q_proj", P("tensor"))])
    with pytest.raises(ValueError, match=r"q_proj\.kernel: PartitionSpec .* 3 entries for shape \(64, 64\)"):
        shd.partition_spec(f"{Q}.kernel", (64, 64), TP, [(r"q_proj", P(None, None, "model"))])


def test_make_mesh_checks_the_device_count():
    n = jax.device_count()
    assert dict(shd.make_mesh({"data": -1}).shape) == {"data": n}
    with pytest.raises(ValueError, match=rf"needs {8 * n} devices; there are {n}"):
        shd.make_mesh({"data": 8 * n})
    with pytest.raises(ValueError, match="must be positive"):
        shd.make_mesh({"data": 0})


# ------------------------------------------------------------------ whole states, one device


def tiny_lora_model():
    config = _tiny.config("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                          pad_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM.from_config(config, seed=0)
    return peftjax.get_peft_model(model, peftjax.LoraConfig(r=8, target_modules=["q_proj", "o_proj"]))


def spec_of(shardings, dotted: str):
    node = shardings
    for part in dotted.split("."):
        node = node[int(part) if part.isdigit() else part]
    return node.get_value().spec


def test_state_and_optimizer_shardings():
    mesh = shd.make_mesh({"data": 1, "model": 1})  # axis sizes 1: every preset spec survives
    pm = tiny_lora_model()
    graphdef, trainable, rest = peftjax.split(pm.base_model)
    t_sh = shd.state_shardings(trainable, mesh, "tp", weights=rest)
    assert jax.tree.structure(t_sh) == jax.tree.structure(trainable)
    assert spec_of(t_sh, f"{Q}.lora_B.default") == P(None, "model")
    assert spec_of(t_sh, f"{O}.lora_A.default") == P("model", None)
    # without the weights, an adapter cannot follow one: replicated
    assert spec_of(shd.state_shardings(trainable, mesh, "tp"), f"{Q}.lora_B.default") == P(None, None)
    assert spec_of(shd.state_shardings(rest, mesh, "tp"), f"{Q}.kernel") == P(None, "model")
    # the moments of Adam (also inside MultiSteps) follow their adapter; counts are replicated
    n_b = sum(1 for s in jax.tree.leaves(t_sh) if s.spec == P(None, "model"))
    accumulating = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), 2)
    for tx, copies in ((optax.adam(1e-3), 2), (accumulating, 3)):  # mu, nu (and accumulated grads)
        abstract = jax.eval_shape(tx.init, trainable)
        o_sh = shd.opt_state_shardings(abstract, trainable, t_sh, mesh)
        assert jax.tree.structure(o_sh) == jax.tree.structure(abstract)
        assert [s.spec for s in jax.tree.leaves(o_sh)].count(P(None, "model")) == copies * n_b
        assert all(s.spec == P() for s, x in zip(jax.tree.leaves(o_sh), jax.tree.leaves(abstract)) if x.ndim == 0)
        opt_state = jax.jit(tx.init, out_shardings=o_sh)(trainable)
        assert [x.sharding for x in jax.tree.leaves(opt_state)] == jax.tree.leaves(o_sh)


def test_shard_model_in_place_keeps_the_outputs():
    pm = tiny_lora_model()
    ids = np.arange(12, dtype=np.int32).reshape(2, 6)
    before = np.asarray(pm(input_ids=ids).logits)
    shardings = shd.shard_model(pm.base_model, shd.make_mesh({"fsdp": 1, "model": -1}), "fsdp+tp")
    kernel = pm.base_model.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.sharding.spec == P("fsdp", "model") == spec_of(shardings, f"{Q}.kernel")
    np.testing.assert_allclose(np.asarray(pm(input_ids=ids).logits), before, atol=1e-6)


# ------------------------------------------------------------------ 8 simulated devices


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    """The JSON of the check script's two halves (side by side), then of a two-process Trainer run."""
    tmp = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    port = _free_port()

    def run(args: list[str]) -> dict:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, f"{args} failed:\n{proc.stderr[-4000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # two processes at a time (this machine may have two cores, and other tests run beside these)
    with ThreadPoolExecutor(2) as pool:
        # halves of about equal time (each section is 10-25 s standalone; "families" is the longest)
        steps, rest = pool.map(run, [[str(SCRIPT), "steps", "load", "orbax", "save", "bdlora", "--tmp", str(tmp / "a")],
                                     [str(SCRIPT), "families", "trainer", "--tmp", str(tmp / "b")]])
        processes = list(pool.map(run, [[str(MULTIHOST), str(i), str(port), str(tmp / "multihost")] for i in (0, 1)]))
    return {**steps, **rest, "processes": processes, "tmp": tmp}


def test_sharded_steps_equal_one_device(report):
    assert report["devices"] == 8
    runs = {(tuple(r["mesh"].items()), r["rules"]): r for r in report["steps"]}
    assert len(runs) == 5
    for (mesh, rules), r in runs.items():
        where = f"{dict(mesh)} {rules}"
        assert r["loss_diff"] <= 1e-5, where
        # float32 rounding only: the sharded reductions sum in another order, and Adam's m / sqrt(v)
        # magnifies it where a gradient is near zero (1.08e-5 seen with one init; a wrong sharding
        # is off by 1e-3 and more)
        assert r["adapter_diff"] <= 3e-5, where
        assert r["mu_matches_lora_B"], where
        model, fsdp = dict(mesh).get("model", 1), dict(mesh).get("fsdp", 1)
        split = {"tp": (1, model), "dp": (1, 1), "fsdp": (fsdp, 1), "fsdp+tp": (fsdp, model)}[rules]
        assert r["q_shards"] == [[64 // split[0], 64 // split[1]]], where  # [in, out], every device alike
        embed = {"tp": [128, 64 // model], "dp": [128, 64], "fsdp": [128 // fsdp, 64],
                 "fsdp+tp": [128 // fsdp, 64 // model]}[rules]
        assert r["embed_shards"] == [embed], where
    assert runs[((("data", 2), ("model", 4)), "tp")]["lora_B_spec"] == "P(None, 'model')"
    assert runs[((("fsdp", 2), ("model", 4)), "fsdp+tp")]["lora_A_spec"] == "P('fsdp', None)"


def test_qwen3_phi3_gemma3_gemma3n_olmo2_and_mixtral_train_sharded_as_on_one_device(report):
    """Phi-3's fused qkv_proj [64, 128] and gate_up_proj [64, 256] split 4 ways on their outputs (and 2
    ways on their inputs under fsdp); Qwen3's head norms and Gemma 3's post-norms whole; OLMo 2's norm
    over the whole q_proj output whole while q_proj splits; Mixtral's 4 experts one per device on the
    model axis (fsdp halves each expert's larger dimension), its router split by fsdp only; 3 LoRA
    steps as on one device (Mixtral's loss with its load-balancing term; Gemma 3n's AltUp streams, LAuReL
    and per-layer embeddings)."""
    runs = {r["family"]: r for r in report["families"]}
    assert sorted(runs) == ["gemma3_text", "gemma3n_text", "mixtral", "olmo2", "phi3", "qwen3"]
    for name, r in runs.items():
        assert r["loss_diff"] <= 1e-5 and r["adapter_diff"] <= 1e-5, name
    assert runs["phi3"]["shards"] == {"self_attn.qkv_proj.kernel": [[32, 32]], "mlp.gate_up_proj.kernel": [[32, 64]]}
    assert runs["qwen3"]["shards"] == {"self_attn.q_norm.scale": [[16]], "mlp.up_proj.kernel": [[32, 32]]}
    assert runs["gemma3_text"]["shards"] == {"post_feedforward_layernorm.scale": [[64]],
                                             "mlp.gate_proj.kernel": [[32, 32]]}
    assert runs["olmo2"]["shards"] == {"self_attn.q_norm.scale": [[64]], "self_attn.q_proj.kernel": [[32, 16]]}
    # Gemma 3n: LAuReL's and AltUp's small weights split by fsdp only; the per-layer embeddings' table
    # [128, 2 x 16] and projection [64, 2 x 16] split 4 ways on their features (fsdp halves the other side)
    assert runs["gemma3n_text"]["shards"] == {
        "mlp.gate_proj.kernel": [[32, 32]], "laurel.linear_left.kernel": [[32, 8]],
        "altup.prediction_coefs.kernel": [[2, 2]], "model.embed_tokens_per_layer.embedding": [[64, 8]],
        "model.per_layer_model_projection.kernel": [[32, 8]]}
    assert runs["mixtral"]["shards"] == {"mlp.experts.gate_up_proj": [[1, 128, 64]],
                                         "mlp.experts.down_proj": [[1, 64, 64]], "mlp.gate.weight": [[4, 32]]}


def test_bdlora_blocks_sit_one_per_device_and_train_as_on_one_device(report):
    """BD-LoRA with ``nblocks`` = the model axis (4): q_proj's block-diagonal ``B [4, 2, 16]`` and
    o_proj's block-diagonal ``A [4, 16, 2]`` hold one block per device, beside the layer's own shard
    of the same features; the other factor follows the layer as plain LoRA's does; 3 steps as on one
    device, no base weight gathered."""
    r = report["bdlora"]
    assert r["loss_diff"] <= 1e-5 and r["adapter_diff"] <= 3e-5, r
    assert r["shards"] == {"self_attn.q_proj.lora_B.default": [[1, 2, 16]],
                           "self_attn.o_proj.lora_A.default": [[1, 16, 2]],
                           "self_attn.q_proj.lora_A.default": [[64, 8]]}
    assert r["base_weight_all_gathers"] == []


def test_tensor_parallel_never_gathers_a_base_weight(report):
    for r in report["steps"]:
        if r["rules"] in ("tp", "dp"):
            assert r["base_weight_all_gathers"] == [], (r["mesh"], r["all_gathers"])
        if r["rules"] == "tp":
            assert r["all_gathers"], "a 'model' axis of size > 1 should all-gather activations"
        if r["rules"] == "fsdp":  # FSDP rebuilds weights before using them (XLA may keep some split)
            assert (64, 64) in {tuple(g) for g in r["base_weight_all_gathers"]}, r["all_gathers"]


def test_sharded_loading_reads_only_shards(report):
    load = report["load"]
    assert load["q_spec"] == "P('fsdp', 'model')"
    assert load["q_shards"] == [[32, 16]] and load["embed_shards"] == [[64, 16]]
    assert load["full_reads_2d"] == 0  # no device ever received a whole matrix
    assert load["reads_of_64x64"] == [[16, 32], [32, 16]]  # o_proj (row-parallel) and q_proj
    assert load["same_keys"] and load["max_diff"] == 0.0


def test_saving_a_sharded_adapter_writes_the_same_files(report):
    assert report["save"]["lora_B_spec"] == "P(None, 'model')"
    assert report["save"]["files"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert report["save"]["identical"]


def test_orbax_checkpoints_keep_shardings(report):
    orbax = report["orbax"]
    assert orbax["some_sharded"] and orbax["same_shardings"] and orbax["same_values"]
    assert orbax["shape_dtype_struct_keeps_sharding"]
    assert orbax["restored_onto_one_device"] and orbax["one_device_values"]


def test_two_processes_train_like_one_device(report):
    """Two processes of 4 CPU devices each, one 2x4 mesh, the Trainer in each: as one device."""
    first, second = report["processes"]
    assert [p["process_index"] for p in (first, second)] == [0, 1]
    assert first["devices"] == 8 and first["local_devices"] == 4 and first["process_count"] == 2
    # 4 rows per device x 2 data-parallel devices = the one-device run's 8 rows a step
    reference = report["trainer"]["losses"]
    assert first["losses"] == second["losses"]
    np.testing.assert_allclose(first["losses"], reference, atol=1e-5)
    # evaluation and prediction: replicated results, the same on both processes and as one device's
    assert first["eval_loss"] == second["eval_loss"]
    np.testing.assert_allclose(first["eval_loss"], report["trainer"]["eval_loss"], atol=1e-5)
    assert first["predict_shape"] == second["predict_shape"] == report["trainer"]["predict_shape"]
    assert first["B_spec"] == "P(None, 'model')" and not first["B_fully_addressable"]
    assert first["kernel_local_shards"] == [[64, 16]]
    # the adapter files: written once (process 0), gathered across the processes, equal to one device's
    out = report["tmp"] / "multihost"
    single = read_safetensors(report["trainer"]["adapter"])[0]
    for run in ("run", "resumed"):  # resumed from checkpoint-2: the same end point
        files = read_safetensors(out / run / "adapter_model.safetensors")[0]
        assert sorted(files) == sorted(single)
        for key, value in single.items():
            np.testing.assert_allclose(files[key], value, atol=1e-5, err_msg=f"{run}: {key}")
    assert len((out / "run" / "metrics.jsonl").read_text().splitlines()) == 3  # one writer, not two
    checkpoint = out / "run" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize(
    "path, shape, expected",
    [
        ("bert.encoder.layer.0.attention.self.query.kernel", (32, 32), P(None, "model")),
        ("bert.encoder.layer.0.attention.output.dense.kernel", (32, 32), P("model", None)),
        ("bert.encoder.layer.0.intermediate.dense.kernel", (32, 64), P(None, "model")),
        ("bert.encoder.layer.0.output.dense.kernel", (64, 32), P("model", None)),
        ("bert.embeddings.word_embeddings.embedding", (96, 32), P(None, "model")),
        ("bert.pooler.dense.kernel", (32, 32), P(None, None)),  # replicated
        ("distilbert.transformer.layer.0.attention.q_lin.kernel", (32, 32), P(None, "model")),
        ("distilbert.transformer.layer.0.attention.v_lin.bias", (32,), P("model")),
        ("distilbert.transformer.layer.0.attention.out_lin.kernel", (32, 32), P("model", None)),
        ("distilbert.transformer.layer.0.ffn.lin1.kernel", (32, 64), P(None, "model")),
        ("distilbert.transformer.layer.0.ffn.lin2.kernel", (64, 32), P("model", None)),
        ("pre_classifier.kernel", (32, 32), P(None, None)),  # the classifier head: replicated
        # DeBERTa: its projections (the relative table's too) as BERT's; the shared table replicated
        ("deberta.encoder.layer.0.attention.self.query_proj.kernel", (32, 32), P(None, "model")),
        ("deberta.encoder.layer.0.attention.self.value_proj.bias", (32,), P("model")),
        ("deberta.encoder.layer.0.attention.self.pos_key_proj.kernel", (32, 32), P(None, "model")),
        ("deberta.encoder.layer.0.attention.output.dense.kernel", (32, 32), P("model", None)),
        ("deberta.encoder.layer.0.output.dense.kernel", (64, 32), P("model", None)),
        ("deberta.encoder.rel_embeddings.embedding", (8, 32), P(None, None)),
        ("transformer.h.0.attn.c_attn.kernel", (32, 96), P(None, "model")),
        ("transformer.h.0.attn.c_proj.kernel", (32, 32), P("model", None)),
        ("transformer.h.0.mlp.c_fc.kernel", (32, 128), P(None, "model")),
        ("transformer.h.0.mlp.c_proj.kernel", (128, 32), P("model", None)),
        ("transformer.wte.embedding", (96, 32), P(None, "model")),
        # Phi-3's fused projections are column-parallel; Qwen3's per-head norms are replicated
        ("model.layers.0.self_attn.qkv_proj.kernel", (32, 64), P(None, "model")),
        ("model.layers.0.mlp.gate_up_proj.kernel", (32, 96), P(None, "model")),
        ("model.layers.layer.self_attn.qkv_proj.kernel", (2, 32, 64), P(None, None, "model")),
        ("model.layers.0.self_attn.q_norm.scale", (8,), P(None)),
        ("model.layers.0.self_attn.k_norm.scale", (8,), P(None)),
        # Mixtral: the experts' axis over `model` (also under stacked layers); the router replicated
        ("model.layers.0.mlp.experts.gate_up_proj", (4, 48, 32), P("model", None, None)),
        ("model.layers.layer.mlp.experts.down_proj", (2, 4, 32, 24), P(None, "model", None, None)),
        ("model.layers.0.mlp.gate.weight", (4, 32), P(None, None)),
        # Gemma 3n's and Gemma 4's per-layer embeddings: the table and the projection added to it split on
        # the layers' features (E4B's table holds 262,144 x 35 x 256 entries); LAuReL's and AltUp's replicated
        ("model.embed_tokens_per_layer.embedding", (96, 64), P(None, "model")),
        ("model.per_layer_model_projection.kernel", (32, 64), P(None, "model")),
        ("model.layers.0.laurel.linear_left.kernel", (32, 8), P(None, None)),
        ("model.layers.0.altup.prediction_coefs.kernel", (4, 16), P(None, None)),
        # GPT-NeoX: the fused query_key_value (each head's q, k, v together) and dense_h_to_4h column-parallel,
        # attention.dense and dense_4h_to_h row-parallel, embed_in over the hidden axis
        ("gpt_neox.layers.0.attention.query_key_value.kernel", (32, 96), P(None, "model")),
        ("gpt_neox.layers.0.attention.query_key_value.bias", (96,), P("model")),
        ("gpt_neox.layers.0.attention.dense.kernel", (32, 32), P("model", None)),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h.kernel", (32, 128), P(None, "model")),
        ("gpt_neox.layers.0.mlp.dense_4h_to_h.kernel", (128, 32), P("model", None)),
        ("gpt_neox.embed_in.embedding", (96, 32), P(None, "model")),
        # OPT: fc1 column-parallel, self_attn.out_proj and fc2 row-parallel
        ("model.decoder.layers.0.fc1.kernel", (32, 128), P(None, "model")),
        ("model.decoder.layers.0.fc2.kernel", (128, 32), P("model", None)),
        ("model.decoder.layers.0.self_attn.out_proj.kernel", (32, 32), P("model", None)),
        ("model.decoder.embed_tokens.embedding", (96, 32), P(None, "model")),
        # BLOOM: GPT-NeoX's fused projection, its output projection under self_attention
        ("transformer.h.0.self_attention.query_key_value.kernel", (32, 96), P(None, "model")),
        ("transformer.h.0.self_attention.dense.kernel", (32, 32), P("model", None)),
        ("transformer.word_embeddings.embedding", (96, 32), P(None, "model")),
        # GPT-J: fc_in column-parallel, attn.out_proj and fc_out row-parallel
        ("transformer.h.0.mlp.fc_in.kernel", (32, 128), P(None, "model")),
        ("transformer.h.0.mlp.fc_out.kernel", (128, 32), P("model", None)),
        ("transformer.h.0.attn.out_proj.kernel", (32, 32), P("model", None)),
        # GPTBigCode: GPT-2's names, its c_attn the fused [q | k | v] of multi-query attention
        ("transformer.h.0.attn.c_attn.kernel", (32, 48), P(None, "model")),
        ("transformer.h.0.mlp.c_proj.kernel", (128, 32), P("model", None)),
        # GPT-Neo: the attention's out_proj one module further down
        ("transformer.h.0.attn.attention.q_proj.kernel", (32, 32), P(None, "model")),
        ("transformer.h.0.attn.attention.out_proj.kernel", (32, 32), P("model", None)),
    ],
)
def test_tensor_parallel_covers_every_family(path, shape, expected):
    assert shd.partition_spec(path, shape, TP, "tp") == expected
