"""AdaLoRA against HF PEFT + PyTorch: files both ways (with rank_pattern resizing), the rank allocator
step for step against PEFT's RankAllocator on the same gradients, the orthogonal regulariser, counts."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _compiles import compilations
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.io import read_safetensors
from peftjax.tuners.adalora import (
    adalora_factors,
    adalora_loss,
    init_rank_allocator,
    update_and_allocate,
)
from peftjax.tuners.base import adapter_layers
from peftjax.training._step import default_loss

torch, peft = lazy("torch"), lazy("peft")

IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
ARCHS = {"llama": _tiny.arch("llama"), "gpt2": _tiny.arch("gpt2")}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}
# a budget from 4 to 2 per layer: warm-up step 0..1, budgeting to step 6 (every 2nd step), then final
SCHEDULE = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=8, lora_alpha=3)


@pytest.fixture(scope="module")
def paths(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


def torch_base(paths, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(paths[arch]).eval()


def torch_adalora(paths, arch, **extra):
    config = peft.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS[arch], **{**SCHEDULE, **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(torch_base(paths, arch), config)


def run_torch(model, **kw):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), **kw)


_FORWARD = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)  # one cache for the module


def run_jax(model, jit=True):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(_FORWARD(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def assert_close(a, b, atol=1e-5):
    keep = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], atol=atol, rtol=0)


def changed(a, b) -> float:
    keep = MASK.astype(bool)
    return float(np.abs(np.asarray(a)[keep] - np.asarray(b)[keep]).max())


def load_in_peft(paths, arch, directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(torch_base(paths, arch), directory).eval()


def module_names(torch_model):
    return [n[len("base_model.model."):-len(".lora_A.default")] for n, _ in torch_model.named_parameters()
            if n.endswith("lora_A.default")]


# ---------------------------------------------------------------- PEFT -> peftjax


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_peft_made_adapter_gives_same_logits(arch, paths, tmp_path):
    """Random factors (PEFT inits E = 0, a no-op); on Llama a rank_pattern, so PEFT saves resized tensors."""
    torch_model = torch_adalora(paths, arch)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.5 * torch.randn_like(p))
    if arch == "llama":
        first, second = module_names(torch_model)[:2]
        torch_model.peft_config["default"].rank_pattern = {f"{first}.lora_E.default": [True, False, True, False],
                                                            f"{second}.lora_E.default": [False] * 4}
    torch_model.save_pretrained(tmp_path)
    ref = run_torch(load_in_peft(paths, arch, tmp_path)).logits.numpy()  # PEFT's reading of its own file
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(paths[arch]), tmp_path)
    for jit in (False, True) if arch == "llama" else (True,):
        assert_close(run_jax(model, jit=jit), ref)
    assert changed(ref, run_torch(torch_base(paths, arch)).logits.numpy()) > 1e-3
    if arch == "llama":
        layers = adapter_layers(model.base_model)
        assert [layers[n].lora_A["default"].shape[0] for n in (first, second)] == [2, 0]


# ---------------------------------------------------------------- the allocator, step for step


def test_rank_allocator_and_orth_loss_match_peft(paths, tmp_path):
    """Same weights and the same synthetic gradients each step: PEFT's update_and_allocate and ours mask the
    same singular values, give the same rank_pattern; and the loss with the orthogonal regulariser agrees."""
    torch_model = torch_adalora(paths, "llama")
    rng = np.random.RandomState(0)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.tensor(0.3 * rng.randn(*p.shape), dtype=torch.float32))
    torch_model.save_pretrained(tmp_path)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(paths["llama"]), tmp_path, is_trainable=True)
    config = model.peft_config["default"]

    labels = torch.tensor(np.where(MASK == 1, IDS, -100))
    their_loss = float(run_torch(torch_model, labels=labels).loss)  # PEFT's forward adds the regulariser
    batch = _tiny.batch(IDS, MASK)
    assert abs(float(adalora_loss(default_loss, config)(model.base_model, batch)) - their_loss) < 1e-5
    assert abs(float(default_loss(model.base_model, batch)) - their_loss) > 1e-3  # the term is not negligible

    _, adapters, _ = peftjax.split(model.base_model)
    params = {n: p for n, p in torch_model.named_parameters() if "lora_" in n}

    def torch_name(path, factor):
        return f"base_model.model.{path}.{factor}.default"

    state = init_rank_allocator(adapters, config)
    assert (state.init_bgt, state.target_bgt) == (4 * 6, 2 * 6)
    patterns = []
    with compilations() as masking:  # the budget changes; the masking program does not
        for step in range(SCHEDULE["total_step"]):
            # the "optimizer step" both sides take, then this step's gradients
            update = {n: 0.01 * rng.randn(*p.shape).astype(np.float32) for n, p in params.items()}
            grads = {n: rng.randn(*p.shape).astype(np.float32) for n, p in params.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(torch.tensor(update[n]))
                    p.grad = torch.tensor(grads[n])
            ours = adalora_factors(adapters)
            adapters = _replace_factors(adapters, {p: {f: jnp.asarray(params[torch_name(p, f)].detach().numpy())
                                                       for f in fs} for p, fs in ours.items()})
            g_tree = _replace_factors(adapters, {p: {f: jnp.asarray(grads[torch_name(p, f)]) for f in fs}
                                                 for p, fs in ours.items()})
            torch_model.base_model.update_and_allocate(step)
            adapters, state, config = update_and_allocate(state, adapters, g_tree, step, config)
            for path, factors in adalora_factors(adapters).items():
                np.testing.assert_array_equal(np.asarray(factors["lora_E"]),
                                              params[torch_name(path, "lora_E")].detach().numpy())
            their_pattern = torch_model.peft_config["default"].rank_pattern
            theirs = {k.replace(".default", ""): v for k, v in (their_pattern or {}).items()}
            assert (config.rank_pattern or {}) == theirs, step
            patterns.append(config.rank_pattern)
    assert masking.count("_keep_masks") == 1, masking  # budgets 18, 12 and 12 (k 6, 12, 12): one program
    kept = [sum(m) for m in config.rank_pattern.values()]
    assert sum(kept) == 12 and min(kept) < 4  # the final budget, and not a uniform cut by construction
    assert patterns[1] is None and patterns[2] is not None  # warm-up, then the first allocation


def _replace_factors(tree, values):
    from peftjax.tuners.adalora._allocator import _factor_of

    def put(path, leaf):
        found = _factor_of(path, "default")
        return leaf if found is None else values[found[0]][found[1]]

    return jax.tree_util.tree_map_with_path(put, tree)


# ---------------------------------------------------------------- peftjax trains -> PEFT


@pytest.mark.parametrize("arch,trainer", [("llama", False), ("gpt2", True)])
def test_trained_adapter_loads_in_peft_and_merges(arch, trainer, paths, tmp_path):
    """Trained to the final budget with dropout: on Llama through make_adalora_train_step +
    update_and_allocate, on GPT-2 (Conv1D) by the Trainer, which runs the allocator itself."""
    model = peftjax.get_peft_model(models.from_pretrained(paths[arch]),
                                   peftjax.AdaLoraConfig(task_type="CAUSAL_LM", target_modules=TARGETS[arch],
                                                         lora_dropout=0.1, **SCHEDULE))
    config = model.peft_config["default"]
    base_logits = run_jax(model)
    # dropout is training-only: a key changes the output, no key leaves it alone
    layer = next(iter(adapter_layers(model.base_model).values()))
    layer.lora_E["default"].set_value(jnp.full((4, 1), 30.0))
    x = jnp.asarray(np.random.RandomState(1).randn(3, layer.kernel.get_value().shape[0]), jnp.float32)
    with peftjax.dropout_key(jax.random.key(0)):
        trained_out = layer(x)
    bias = 0 if layer.bias is None else layer.bias.get_value()[None, :]
    dense = x @ layer.kernel.get_value() + bias + x @ layer.delta_weight("default")  # PEFT's formula, no dropout
    np.testing.assert_allclose(layer(x), dense, atol=1e-5, rtol=0)
    assert float(jnp.abs(trained_out - dense).max()) > 1e-3
    layer.lora_E["default"].set_value(jnp.zeros((4, 1)))

    if trainer:
        args = peftjax.TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=2,
                                         max_steps=SCHEDULE["total_step"], learning_rate=5e-2, disable_tqdm=True,
                                         plot=False, report_to="none", save_steps=0, logging_steps=1)
        peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
        config = model.peft_config["default"]
    else:
        graphdef, adapters, base = peftjax.split(model.base_model)
        optimizer = optax.adam(5e-2)
        opt_state = optimizer.init(adapters)
        step = peftjax.make_adalora_train_step(graphdef, optimizer, config)
        alloc = init_rank_allocator(adapters, config)
        batch = _tiny.batch(IDS, MASK)
        losses = []
        for i in range(SCHEDULE["total_step"]):
            adapters, opt_state, loss, grads = step(adapters, opt_state, base, batch, jax.random.key(i))
            adapters, alloc, config = update_and_allocate(alloc, adapters, grads, i, config)
            losses.append(float(loss))
        assert losses[-1] < losses[0]
        model.update(adapters)
        model.peft_config["default"] = config
    assert sum(sum(m) for m in config.rank_pattern.values()) == 12
    ours = run_jax(model)
    assert changed(ours, base_logits) > 1e-3

    model.save_pretrained(tmp_path)
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    for name, mask in config.rank_pattern.items():  # only the kept rows are in the file, as PEFT writes them
        assert tensors[f"base_model.model.{name}"].shape == (sum(mask), 1)
    assert not any("ranknum" in k for k in tensors)
    assert_close(run_torch(load_in_peft(paths, arch, tmp_path)).logits.numpy(), ours)
    if trainer:  # the rest is the same code on both architectures
        return
    again = peftjax.PeftModel.from_pretrained(models.from_pretrained(paths[arch]), tmp_path)
    assert_close(run_jax(again), ours)

    # merged == unmerged, and unmerge restores the kernels
    layers = adapter_layers(model.base_model)
    kernels = {n: np.array(m.kernel.get_value()) for n, m in layers.items()}
    model.merge_adapter()
    assert_close(run_jax(model, jit=True), ours)
    model.unmerge_adapter()
    for n, k in kernels.items():
        np.testing.assert_allclose(layers[n].kernel.get_value(), k, atol=1e-6, rtol=0)
    merged = model.merge_and_unload()
    assert not jax.tree.leaves(nnx.state(merged, peftjax.TRAINABLE))
    assert_close(run_jax(merged), ours)


# ---------------------------------------------------------------- counts, files, configs, inspect, errors


def test_counts_files_configs_and_inspect_match_peft(paths, tmp_path, capsys):
    """PEFT's default targets (its AdaLoRA table), parameter counts (ranknum in "all"), file keys and config."""
    from peftjax.cli import main

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(paths, "gpt2"),
                                          peft.AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, init_r=6))
    model = peftjax.get_peft_model(models.from_pretrained(paths["gpt2"]),
                                   peftjax.AdaLoraConfig(task_type="CAUSAL_LM", total_step=5, init_r=6))
    assert set(adapter_layers(model.base_model)) == set(torch_model.targeted_module_names)
    torch_model.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs
    status = {s.name: s.module_type for s in model.get_layer_status()}
    assert status == {s.name: s.module_type for s in torch_model.get_layer_status()}  # "adalora.SVDLinear"

    torch_model.save_pretrained(tmp_path / "theirs")
    model.save_pretrained(tmp_path / "ours")
    theirs, _ = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")
    ours, _ = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key, value in their_cfg.items():
        if key not in ("peft_version", "auto_mapping", "base_model_name_or_path"):
            assert our_cfg[key] == value, key
    # each reads the other's file into an equal config
    def fields(config):
        return {k: v for k, v in config.to_dict().items() if k not in ("peft_version", "base_model_name_or_path")}

    loaded = peftjax.PeftConfig.from_pretrained(tmp_path / "theirs")
    assert type(loaded) is peftjax.AdaLoraConfig
    assert fields(loaded) == fields(peftjax.PeftConfig.from_pretrained(tmp_path / "ours"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert type(peft.PeftConfig.from_pretrained(tmp_path / "ours")).__name__ == "AdaLoraConfig"

    assert main(["inspect", str(tmp_path / "theirs"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "ADALORA" and info["ranks_in_file"] == [6] and info["init_r"] == 6
    assert info["parameters"] == torch_model.get_nb_trainable_parameters()[0]


def test_errors_name_the_problem(paths):
    for bad, word in [(dict(use_rslora=True), "use_rslora"), (dict(init_lora_weights="gaussian"), "init_lora_weights"),
                      (dict(use_dora=True), "DoRA"), (dict(total_step=None), "total_step"),
                      (dict(total_step=4, tinit=3, tfinal=1), "budgeting phase"), (dict(beta1=1.0), "beta1"),
                      (dict(rank_pattern={"q.lora_E": [1, 0]}), "rank_pattern")]:
        with pytest.raises((ValueError, TypeError, NotImplementedError), match=word):
            peftjax.AdaLoraConfig(**{"total_step": 10, **bad})
    model = models.from_pretrained(paths["llama"])
    with pytest.raises(TypeError, match="embed_tokens"):
        peftjax.get_peft_model(model, peftjax.AdaLoraConfig(total_step=10, target_modules=["embed_tokens"]))
    model = peftjax.get_peft_model(model, peftjax.AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="only 1 trainable adapter"):
        model.add_adapter("second", peftjax.AdaLoraConfig(total_step=10, target_modules=["q_proj"]))
    model.add_adapter("frozen", peftjax.AdaLoraConfig(total_step=10, target_modules=["q_proj"], inference_mode=True))
    # a plain step would train the SVD factors without the allocator or the regulariser: refused
    graphdef, trainable, rest = peftjax.split(model.base_model)
    tx = optax.adamw(1e-3)
    step = peftjax.make_train_step(graphdef, tx)
    batch = {"input_ids": jnp.asarray(IDS), "attention_mask": jnp.asarray(MASK), "labels": jnp.asarray(IDS)}
    with pytest.raises(ValueError, match=r"q_proj.*AdaLoRA.*make_adalora_train_step"):
        step(trainable, tx.init(trainable), rest, batch, None)
