"""OFT and BOFT against HF PEFT 0.22.0 + PyTorch on Llama and BERT, in both directions.

PEFT's OFT and BOFT adapt ``nn.Linear`` (OFT also ``nn.Embedding``) but not GPT-2's ``Conv1D``,
so GPT-2 is tested as a refusal. BOFT with more than one butterfly factor needs PEFT's CUDA
extension; the PEFT oracle for it runs PEFT's CUDA code path on the CPU by standing in
``torch.block_diag`` for the extension's batched block-diagonal (which is all that kernel computes).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import warnings

import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.tuners.base import adapter_layers

torch, peft = lazy("torch"), lazy("peft")

ARCHS = {name: _tiny.arch(name) for name in ("llama", "bert")}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
TARGETS = {"llama": ["q_proj", "down_proj"], "bert": ["query", "attention.output.dense"]}

# (method, arch, config fields, blocks per layer in the file): each case covers some of the options
CASES = {
    "oft-llama": ("OFT", "llama", dict(oft_block_size=8, module_dropout=0.5, num_cayley_neumann_terms=3,
                                       target_modules=TARGETS["llama"] + ["embed_tokens"]),
                  ["1 x 4 x 8", "1 x 6 x 8"]),
    "oft-bert": ("OFT", "bert", dict(r=4, oft_block_size=0, block_share=True, use_cayley_neumann=False, coft=True,
                                     eps=5e-2, bias="oft_only", layers_to_transform=[1]), ["1 x 1 x 8"]),
    "boft-llama": ("BOFT", "llama", dict(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.5),
                   ["2 x 12 x 4", "2 x 8 x 4"]),
    "boft-bert": ("BOFT", "bert", dict(boft_block_size=0, boft_block_num=4, bias="boft_only", layers_to_transform=0),
                  ["1 x 4 x 8"]),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


def torch_base(arch, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(path).eval()


def configs(method, arch, **fields):
    """The same settings as a peftjax and a PEFT config."""
    fields = {"target_modules": TARGETS[arch], "task_type": ARCHS[arch].task, **fields}
    name = "OFTConfig" if method == "OFT" else "BOFTConfig"
    return getattr(peftjax, name)(**fields), getattr(peft, name)(**fields)


@contextlib.contextmanager
def peft_butterfly():
    """PEFT's BOFT as with its CUDA extension: ``boft_n_butterfly_factor`` > 1 is honoured."""
    import peft.tuners.boft.layer as boft_layer

    class BlockDiag:
        @staticmethod
        def apply(x):  # fbd_cuda's forward: one block-diagonal matrix per factor
            return torch.stack([torch.block_diag(*torch.unbind(f)) for f in x])

    saved = boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag
    boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag = (lambda: True), BlockDiag
    try:
        yield
    finally:
        boft_layer.get_fbd_cuda, boft_layer.FastBlockDiag = saved


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


_logits = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)  # one function: traces are cached


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(_logits(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x):
    return x[MASK.astype(bool)] if x.ndim == 3 else x


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(np.asarray(a)), valid(np.asarray(b)), atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(valid(np.asarray(a)) - valid(np.asarray(b))).max())


# ---------------------------------------------------------------- PEFT -> peftjax -> trained -> PEFT


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_with_peft_both_ways_and_merge(case, checkpoints, tmp_path, capsys):
    """A PEFT-made adapter with random weights gives PEFT's logits here; trained further here, it
    loads in PEFT with equal logits; merged equals unmerged; merged and exported, transformers
    alone gives the same logits."""
    method, arch, fields, blocks = CASES[case]
    path, task = checkpoints[arch], ARCHS[arch].task
    _, peft_config = configs(method, arch, **fields)
    butterfly = peft_butterfly if fields.get("boft_n_butterfly_factor", 1) > 1 else contextlib.nullcontext
    with warnings.catch_warnings(), butterfly():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch, path), peft_config)
        trainable = torch_model.get_nb_trainable_parameters()
        torch.manual_seed(1)
        with torch.no_grad():  # every method here starts as a no-op: randomize the adapter, biases and head
            for name, p in torch_model.named_parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
        torch_model.save_pretrained(tmp_path / "theirs")
        ref = run_torch(torch_model.eval())
    base_logits = run_torch(torch_base(arch, path))
    assert changed(ref, base_logits) > 1e-3

    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=True)
    assert model.get_nb_trainable_parameters() == trainable
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)

    if case == "boft-llama":  # through the Trainer; the other cases through the functional core
        losses = train_with_trainer(model, tmp_path / "run")
    else:
        losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), steps=3, optimizer=optax.adam(2e-2)).losses
    assert losses[-1] < losses[0]
    ours = run_jax(model, jit=True)
    assert changed(ours, ref) > 1e-3
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings(), butterfly():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()
        assert_close(ours, run_torch(torch_model))

    infos = []
    for who in ("ours", "theirs"):
        assert main(["inspect", str(tmp_path / who), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert infos[0]["method"] == method and infos[0]["blocks_in_file"] == blocks
    assert infos[0]["parameters"] == infos[1]["parameters"] and infos[0]["blocks_in_file"] == infos[1]["blocks_in_file"]

    # merged == unmerged, and unmerge restores the weights
    layers = adapter_layers(model.base_model)
    weights = {n: np.array(getattr(m, "embedding", getattr(m, "kernel", None)).get_value()) for n, m in layers.items()}
    model.merge_adapter()
    assert_close(run_jax(model), ours)
    model.unmerge_adapter()
    for n, m in layers.items():
        restored = getattr(m, "embedding", getattr(m, "kernel", None)).get_value()
        np.testing.assert_allclose(restored, weights[n], atol=1e-5, rtol=0)

    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert_close(run_torch(torch_base(arch, tmp_path / "merged")), ours)


def test_two_active_oft_adapters_rotate_and_merge_as_peft(checkpoints, tmp_path):
    """Two OFT adapters active at once rotate the input ``x R1 R2``; merged, the kernel becomes
    ``R1 R2 W`` (PEFT 0.22 merges them last to first; 0.21.2 merged ``R2 R1 W``, another model):
    PEFT's two adapters give PEFT's logits here, unmerged and merged."""
    path = checkpoints["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), configs("OFT", "llama", oft_block_size=8, r=0)[1])
        theirs.add_adapter("other", configs("OFT", "llama", oft_block_size=4, r=0)[1])
        with torch.no_grad():
            for name, p in theirs.named_parameters():
                if "oft_R" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        theirs.save_pretrained(tmp_path)
        theirs.base_model.set_adapter(["default", "other"])
        both = run_torch(theirs)
        theirs.merge_adapter()
        merged = run_torch(theirs)
    assert_close(merged, both)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    ours.load_adapter(tmp_path / "other", "other")
    single = run_jax(ours)
    ours.set_adapter(["default", "other"])
    assert_close(run_jax(ours), both)
    assert changed(run_jax(ours), single) > 1e-3  # the second adapter counts
    assert changed(run_jax(ours), run_torch(torch_base("llama", path))) > 1e-3
    ours.merge_adapter()
    assert_close(run_jax(ours), merged)
    ours.unmerge_adapter()
    assert_close(run_jax(ours), both)


def train_with_trainer(model, output_dir) -> list[float]:
    from peftjax.training import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=3,
                             learning_rate=2e-2, logging_steps=1, disable_tqdm=True, report_to="none", plot=False)
    Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# ---------------------------------------------------------------- multiplicative dropout, by its definition


def _cayley(q):  # numpy, exact: (I - Q)(I + Q)^-1
    eye = np.eye(q.shape[-1])
    return (eye - q) @ np.linalg.inv(eye + q)


def _block_diag(blocks):
    n = sum(b.shape[0] for b in blocks)
    out, at = np.zeros((n, n)), 0
    for b in blocks:
        out[at:at + len(b), at:at + len(b)] = b
        at += len(b)
    return out


def _toy(config):
    model = nnx.Module()
    model.proj = nnx.Linear(16, 5, rngs=nnx.Rngs(0))
    return peftjax.inject_adapter_in_model(config, model)


@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_dropout_replaces_blocks_by_identity_in_training_only(method):
    """Training output is one of the outputs with exactly int(p * blocks) blocks set to I (BOFT: in
    one factor); evaluation, without a key, ignores the dropout."""
    if method == "OFT":
        config = peftjax.OFTConfig(oft_block_size=4, module_dropout=0.5, use_cayley_neumann=False,
                                   init_weights=False, target_modules=["proj"])
    else:
        config = peftjax.BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=2, boft_dropout=0.5,
                                    init_weights=False, target_modules=["proj"])
    model = _toy(config)
    x = np.random.RandomState(0).randn(3, 16).astype(np.float32)
    w = np.asarray(model.proj.kernel.get_value(), np.float64)
    b = np.asarray(model.proj.bias.get_value(), np.float64)

    if method == "OFT":
        vec = np.asarray(model.proj.oft_R["default"].get_value(), np.float64)
        rows, cols = np.triu_indices(4, 1)
        blocks = []
        for v in vec:
            u = np.zeros((4, 4))
            u[rows, cols] = v
            blocks.append(_cayley(u - u.T))

        def outputs(dropped):
            return x @ _block_diag([np.eye(4) if i in dropped else r for i, r in enumerate(blocks)]) @ w + b

        candidates = [outputs(set(c)) for c in itertools.combinations(range(4), 2)]
        full = outputs(set())
    else:
        from peft.tuners.boft.layer import BOFTLayer  # the permutation oracle

        raw = np.asarray(model.proj.boft_R["default"].get_value(), np.float64)  # [2, 8, 2, 2]
        s = np.asarray(model.proj.boft_s["default"].get_value(), np.float64)[:, 0]
        perms = [BOFTLayer.block_butterfly_perm(None, 16, 8 // 2**i, 1, 1).numpy() for i in range(2)]

        def outputs(factor, dropped):
            m = np.eye(16)
            for i in range(2):
                blocks = [np.eye(2) if (i == factor and j in dropped) else _cayley(0.5 * (a - a.T))
                          for j, a in enumerate(raw[i])]
                p = np.eye(16)[perms[i]]
                m = p @ _block_diag(blocks) @ p.T @ m
            return (x @ m @ w) * s + b

        candidates = [outputs(f, set(c)) for f in range(2) for c in itertools.combinations(range(8), 4)]
        full = outputs(None, set())

    def forward(m, v, key):  # the key is an argument, so the jitted function does not bake it in
        with peftjax.dropout_key(key):
            return m.proj(v)

    run = nnx.jit(forward)
    for fn in (forward, run):
        np.testing.assert_allclose(fn(model, x, None), full, atol=1e-5)  # eval: no key, no dropout
        seen = []
        for seed in range(2):
            out = np.asarray(fn(model, x, jax_key(seed)), np.float64)
            distances = [np.abs(out - c).max() for c in candidates]
            assert min(distances) < 1e-5, min(distances)
            seen.append(int(np.argmin(distances)))
        np.testing.assert_allclose(fn(model, x, None), full, atol=1e-5)
        assert len(set(seen)) > 1  # the key chooses the blocks


def jax_key(seed):
    import jax

    return jax.random.key(seed)


# ---------------------------------------------------------------- configs and refusals


@pytest.mark.parametrize("method", ["OFT", "BOFT"])
def test_config_round_trips_with_peft(method, tmp_path):
    ours, theirs = configs(method, "llama", **({"coft": True} if method == "OFT" else {"boft_dropout": 0.1}))
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    written = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    expected = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    assert sorted(written) == sorted(expected)
    loaded = peft.PeftConfig.from_pretrained(tmp_path / "ours")
    assert type(loaded).__name__ == type(ours).__name__
    assert {**loaded.to_dict(), "inference_mode": False} == theirs.to_dict()  # ours saves inference_mode=true
    assert peftjax.PeftConfig.from_pretrained(tmp_path / "theirs") == ours.__class__.from_dict(
        {**written, "peft_version": expected["peft_version"], "inference_mode": False})


def test_bad_configs_and_targets_are_named(checkpoints, tiny_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="either r .4. or oft_block_size .32."):
        peftjax.OFTConfig(r=4)
    with pytest.raises(ValueError, match="boft_block_size .* or boft_block_num"):
        peftjax.BOFTConfig(boft_block_num=4)
    with pytest.raises(ValueError, match="`bias` must be one of"):
        peftjax.OFTConfig(bias="lora_only")
    with pytest.raises(ValueError, match="no `oft_block_size`"):
        peftjax.PeftConfig.from_dict({"peft_type": "OFT", "r": 8})
    with pytest.raises(ValueError, match="peft_version='0.17.0'"):
        peftjax.PeftConfig.from_dict({"peft_type": "OFT", "oft_block_size": 8, "r": 0, "use_cayley_neumann": True,
                                      "peft_version": "0.17.0"})
    gpt2 = models.from_pretrained(tiny_checkpoint("gpt2"))
    for config in (peftjax.OFTConfig(oft_block_size=8, target_modules=["c_attn"]),
                   peftjax.BOFTConfig(target_modules=["c_attn"])):
        with pytest.raises(TypeError, match="h.0.attn.c_attn is transformers' Conv1D"):
            peftjax.get_peft_model(gpt2, config)
    llama = models.from_pretrained(checkpoints["llama"])
    for config in (peftjax.OFTConfig(oft_block_size=8), peftjax.BOFTConfig()):  # PEFT's defaults: LoRA's
        resolved = peftjax.get_peft_model(models.from_pretrained(checkpoints["llama"]), config).peft_config["default"]
        assert resolved.target_modules == ("q_proj", "v_proj")
    with pytest.raises(TypeError, match="model.embed_tokens .* is not supported; supported: nnx.Linear"):
        peftjax.get_peft_model(llama, peftjax.BOFTConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj: in_features \(48\) must be divisible by "
                                         r"boft_block_size \(32\)"):
        peftjax.get_peft_model(llama, peftjax.BOFTConfig(boft_block_size=32, target_modules=["down_proj"]))
    with warnings.catch_warnings():  # PEFT on a CPU trains one butterfly factor whatever the config says
        warnings.simplefilter("ignore")
        cpu_made = peft.get_peft_model(torch_base("llama", checkpoints["llama"]),
                                       peft.BOFTConfig(boft_n_butterfly_factor=2, target_modules=["q_proj"]))
        cpu_made.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"q_proj.boft_R: expected shape \[2, 8, 4, 4\] .*CUDA extension.*"
                                         r"found \[1, 8, 4, 4\]"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(checkpoints["llama"]), tmp_path)
    with pytest.warns(UserWarning, match=r"Adjusted `oft_block_size` to \(4\)"):  # PEFT's nearest divisor of 48
        model = peftjax.get_peft_model(llama, peftjax.OFTConfig(oft_block_size=5, target_modules=["down_proj"]))
    assert model.base_model.model.layers[0].mlp.down_proj.oft_R["default"].shape == (12, 6)
