"""IA³ against HF PEFT + PyTorch on Llama, Qwen3, Phi-3, Mixtral, BERT and GPT-2, in both directions."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.io import read_safetensors
from peftjax.tuners.ia3 import IA3Layer
from peftjax.tuners.base import adapter_layers

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

ARCHS = {name: _tiny.arch(name) for name in ("llama", "qwen3", "phi3", "gemma2", "mixtral", "bert", "roberta", "gpt2")}
# PEFT 0.22.0 has IA³ defaults for qwen3 but none for phi3: its fused attention and the MLP's output.
# Mixtral's defaults (k_proj, v_proj, w2; feedforward w2) name transformers 4's per-expert w2, which
# transformers 5 no longer has: PEFT and peftjax both adapt k_proj and v_proj only.
EXPLICIT_TARGETS = {"phi3": dict(target_modules=["qkv_proj", "down_proj"], feedforward_modules=["down_proj"])}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
pytestmark = pytest.mark.filterwarnings("ignore:.*stores its weight as .fan_in, fan_out.:UserWarning")
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tiny_checkpoint):
    spec = ARCHS[request.param]
    return request.param, tiny_checkpoint(spec), spec.torch_class, spec.task


def torch_base(arch):
    _, path, cls, _ = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path).eval()


def torch_peft(arch, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.IA3Config(task_type=arch[3], **EXPLICIT_TARGETS.get(arch[0], {}), **kw)
        return peft.get_peft_model(torch_base(arch), config)


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x):
    return x[MASK.astype(bool)] if x.ndim == 3 else x


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(np.asarray(a)), valid(np.asarray(b)), atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(valid(np.asarray(a)) - valid(np.asarray(b))).max())


# ---------------------------------------------------------------- PEFT -> peftjax


def test_peft_made_adapter_gives_same_logits(arch, tmp_path):
    torch_model = torch_peft(arch)
    torch.manual_seed(1)
    with torch.no_grad():  # the vectors start at ones and the head copies equal the original: change both
        for name, p in torch_model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))
    torch_model.save_pretrained(tmp_path)
    ref = run_torch(torch_model)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(arch[1]), tmp_path)
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)
    assert changed(ref, run_torch(torch_base(arch))) > 1e-3
    status = lambda m: sorted((s.name, s.module_type) for s in m.get_layer_status())  # noqa: E731
    assert status(model) == status(torch_model)  # "Linear" (PEFT's IA3 layer keeps torch's repr), heads too


# ---------------------------------------------------------------- peftjax trains -> PEFT, merge, export


def test_trained_adapter_loads_in_peft_and_merges(arch, tmp_path):
    name, path, cls, task = arch
    config = peftjax.IA3Config(task_type=task, **EXPLICIT_TARGETS.get(name, {}))
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    base_logits = run_jax(model)
    losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), optimizer=optax.adam(5e-2)).losses
    assert losses[-1] < losses[0]
    ours = run_jax(model)
    assert changed(ours, base_logits) > 1e-3

    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(torch_base(arch), tmp_path).eval()
    assert_close(ours, run_torch(torch_model))

    # merged == unmerged, and unmerge restores the weights
    layers = {n: m for n, m in adapter_layers(model.base_model).items()}
    kernels = {n: np.array(m.kernel.get_value()) for n, m in layers.items()}
    biases = {n: np.array(m.bias.get_value()) for n, m in layers.items() if m.bias is not None}
    model.merge_adapter()
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ours)
    with pytest.warns(UserWarning, match="inaccurate"):
        model.unmerge_adapter()
    for n, m in layers.items():
        np.testing.assert_allclose(m.kernel.get_value(), kernels[n], atol=1e-5, rtol=0)
        if n in biases:
            np.testing.assert_allclose(m.bias.get_value(), biases[n], atol=1e-5, rtol=0)
    assert_close(run_jax(model), ours)

    # merged and exported, transformers alone reproduces the logits
    merged = model.merge_and_unload()
    assert not jax.tree.leaves(nnx.state(merged, peftjax.TRAINABLE))
    merged.save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = cls.from_pretrained(tmp_path / "merged").eval()
    assert_close(run_torch(exported), ours)


# ---------------------------------------------------------------- counts, files, targets


def test_counts_files_and_targets_match_peft(arch, tmp_path, capsys):
    name, path, cls, task = arch
    torch_model = torch_peft(arch)
    config = peftjax.IA3Config(task_type=task, **EXPLICIT_TARGETS.get(name, {}))
    model = peftjax.get_peft_model(models.from_pretrained(path), config)

    assert model.get_nb_trainable_parameters() == torch_model.get_nb_trainable_parameters()
    torch_model.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs

    # the default targets, and which of them are feedforward, are PEFT's
    layers = {n: m for n, m in adapter_layers(model.base_model).items() if isinstance(m, IA3Layer)}
    assert set(layers) == set(torch_model.targeted_module_names)
    torch_modules = dict(torch_model.base_model.model.named_modules())
    for n, m in layers.items():
        assert m.spec("default").is_feedforward == torch_modules[n].is_feedforward, n

    torch_model.save_pretrained(tmp_path / "theirs")
    model.save_pretrained(tmp_path / "ours")
    theirs, _ = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")
    ours, _ = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key in ("peft_type", "task_type", "fan_in_fan_out", "init_ia3_weights", "inference_mode", "modules_to_save"):
        assert our_cfg[key] == their_cfg[key], key
    for key in ("target_modules", "feedforward_modules"):
        assert sorted(our_cfg[key]) == sorted(their_cfg[key]), key


# ---------------------------------------------------------------- layer math


def test_layer_equals_dense_reference_and_merged_path(jit):
    """Attention-type: (x@W + b) * l; feedforward: (x * l)@W + b; two adapters multiply."""
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama"))
    base = run_jax(model)
    peft_model = peftjax.get_peft_model(
        model, peftjax.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                 init_ia3_weights=False))
    peft_model.add_adapter("second", peftjax.IA3Config(target_modules=["k_proj"], feedforward_modules=[],
                                                       init_ia3_weights=False), key=jax.random.key(7))
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    k_proj, down = model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj
    assert k_proj.ia3_l["default"].shape == (16,) and down.ia3_l["default"].shape == (48,)

    x = jax.random.normal(jax.random.key(1), (3, 32))
    w, l1, l2 = k_proj.kernel.get_value(), k_proj.ia3_l["default"].get_value(), k_proj.ia3_l["second"].get_value()
    np.testing.assert_allclose(call(k_proj, x), (x @ w) * l1[None], atol=1e-5)
    k_proj.set_active_adapters(("default", "second"))
    np.testing.assert_allclose(call(k_proj, x), (x @ w) * l1[None] * l2[None], atol=1e-5)
    k_proj.set_active_adapters(("default",))

    h = jax.random.normal(jax.random.key(2), (3, 48))
    wd, ld = down.kernel.get_value(), down.ia3_l["default"].get_value()
    np.testing.assert_allclose(call(down, h), (h * ld[None]) @ wd, atol=1e-5)

    unmerged = run_jax(peft_model, jit=jit)
    peft_model.merge_adapter()
    np.testing.assert_allclose(call(k_proj, x), (x @ w) * l1[None], atol=1e-5)
    np.testing.assert_allclose(call(down, h), (h * ld[None]) @ wd, atol=1e-5)
    assert_close(run_jax(peft_model, jit=jit), unmerged)

    with pytest.warns(UserWarning, match="inaccurate"), peft_model.disable_adapter():  # unmerges first
        assert_close(run_jax(peft_model, jit=jit), base)
    assert_close(run_jax(peft_model.unload(), jit=jit), base)


def test_bias_is_scaled_for_attention_type_modules(jit):
    """PEFT scales the whole output of an attention-type module, bias included (BERT has biases)."""
    from peftjax.models import BertModel

    model = BertModel.from_config(_tiny.config("bert"))
    peftjax.get_peft_model(model, peftjax.IA3Config(target_modules=["key"], feedforward_modules=[],
                                                    init_ia3_weights=False))
    layer = model.encoder.layer[0].attention.self.key
    x = jax.random.normal(jax.random.key(0), (2, 32))
    w, b, vec = layer.kernel.get_value(), layer.bias.get_value(), layer.ia3_l["default"].get_value()
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    np.testing.assert_allclose(call(layer, x), (x @ w + b[None]) * vec[None], atol=1e-5)
    layer.merge_adapter("default")
    np.testing.assert_allclose(layer.bias.get_value(), b * vec, atol=1e-6)
    np.testing.assert_allclose(call(layer, x), (x @ w + b[None]) * vec[None], atol=1e-5)


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def llama_path(tiny_checkpoint):
    return tiny_checkpoint("llama")


def test_errors_name_the_problem(llama_path, tmp_path):
    with pytest.raises(TypeError, match=r"model\.norm \(RMSNorm\)"):
        peftjax.get_peft_model(models.from_pretrained(llama_path),
                               peftjax.IA3Config(target_modules=["norm"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="subset"):
        peftjax.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="k_proj"):  # the closest names are listed
        peftjax.get_peft_model(models.from_pretrained(llama_path),
                               peftjax.IA3Config(target_modules=["k_prj"], feedforward_modules=[]))
    # PEFT would fill feedforward_modules=["down_proj"] and save a config it then refuses to load
    with pytest.raises(ValueError, match=r"feedforward_modules is None.*\['down_proj'\].*\[\] for none"):
        peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.IA3Config(target_modules=["k_proj"]))

    model = peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=2, target_modules=["k_proj"]))
    with pytest.raises(TypeError, match="another method"):
        model.add_adapter("ia3", peftjax.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))

    peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.IA3Config()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    # down_proj's vector is [1, 48]; calling it attention-type makes the file's shape wrong for the model
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "feedforward_modules": []}))
    with pytest.raises(ValueError, match=r"down_proj\.ia3_l: expected shape \[32, 1\].*found \[1, 48\]"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), tmp_path)


def test_lora_refuses_a_layer_that_carries_ia3():
    from flax import nnx as _nnx

    model = _nnx.Module()
    model.k_proj = _nnx.Linear(8, 8, rngs=_nnx.Rngs(0))
    peftjax.get_peft_model(model, peftjax.IA3Config(target_modules=["k_proj"], feedforward_modules=[]))
    with pytest.raises(TypeError, match=r"k_proj \(Linear with a IA3Linear"):
        peftjax.tuners.inject_lora(model, peftjax.LoraConfig(target_modules=["k_proj"]))
