"""Bottleneck adapters (Houlsby / Pfeiffer) on Llama and BERT: placement, identity init, training, files."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
import peftjax
from peftjax import models
from peftjax.io import read_safetensors
from peftjax.tuners.bottleneck import BottleneckLayer
from peftjax.tuners.base import adapter_layers

ARCHS = {name: _tiny.arch(name) for name in ("llama", "bert")}
# the sublayer output layers of block i, after attention and after the feedforward block
PLACES = {
    "llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
    "bert": ("bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"),
}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tiny_checkpoint):
    path = tiny_checkpoint(ARCHS[request.param])
    base = run(models.from_pretrained(path))
    return request.param, path, ARCHS[request.param].task, base


def run(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x):
    return x[MASK.astype(bool)] if x.ndim == 3 else x


def assert_same(a, b, jit=False):
    """Bit-identical eagerly; under jit XLA may fuse the same float32 math differently."""
    if jit:
        np.testing.assert_allclose(valid(a), valid(b), atol=1e-6, rtol=0)
    else:
        np.testing.assert_array_equal(valid(a), valid(b))


def changed(a, b) -> float:
    return float(np.abs(valid(a) - valid(b)).max())


@pytest.mark.parametrize("adapter_type", ["houlsby", "pfeiffer"])
def test_train_save_load_unload(arch, adapter_type, tmp_path):
    name, path, task, base = arch
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.BottleneckConfig(adapter_type=adapter_type, task_type=task))

    # placement: Houlsby after attention and feedforward outputs, Pfeiffer after feedforward only
    attention, feedforward = PLACES[name]
    wanted = {feedforward.format(i=i) for i in range(2)}
    if adapter_type == "houlsby":
        wanted |= {attention.format(i=i) for i in range(2)}
    layers = {n: m for n, m in adapter_layers(model.base_model).items() if isinstance(m, BottleneckLayer)}
    assert set(layers) == wanted

    # identity at init (up = 0)
    for jit in (False, True):
        assert_same(run(model, jit=jit), base, jit)

    losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), optimizer=optax.adam(1e-2)).losses
    assert losses[-1] < losses[0]
    trained = run(model)
    assert changed(trained, base) > 1e-4
    some = next(iter(layers.values()))
    assert np.abs(some.adapter_up["default"].get_value()).max() > 0  # the adapter itself trained

    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "BOTTLENECK" and cfg["adapter_type"] == adapter_type
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    d, m = 32, 2  # hidden 32 // reduction_factor 16
    expected = {}
    for layer in wanted:
        p = f"base_model.model.{layer}"
        expected.update({f"{p}.adapter_down.weight": (m, d), f"{p}.adapter_down.bias": (m,),
                         f"{p}.adapter_up.weight": (d, m), f"{p}.adapter_up.bias": (d,)})
    if task == "SEQ_CLS":
        expected.update({"base_model.model.classifier.weight": (3, 32), "base_model.model.classifier.bias": (3,)})
    assert {k: v.shape for k, v in tensors.items()} == expected

    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    for jit in (False, True):
        assert_same(run(loaded, jit=jit), trained, jit)

    with pytest.raises(NotImplementedError, match="cannot be merged"):
        loaded.merge_adapter()
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        loaded.merge_and_unload()
    for jit in (False, True):
        with loaded.disable_adapter():
            assert_same(run(loaded, jit=jit), base, jit)
    bare = loaded.unload()
    assert not adapter_layers(bare)
    assert_same(run(bare), base)


@pytest.mark.parametrize("residual", [True, False])
def test_layer_equals_dense_reference(jit, residual):
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama"))
    peftjax.get_peft_model(model, peftjax.BottleneckConfig(target_modules=["o_proj"], non_linearity="gelu",
                                                           reduction_factor=4, residual=residual))
    layer = model.model.layers[0].self_attn.o_proj
    keys = jax.random.split(jax.random.key(3), 3)
    layer.adapter_up["default"].set_value(jax.random.normal(keys[0], (8, 32)))
    layer.adapter_up_bias["default"].set_value(jax.random.normal(keys[1], (32,)))
    x = jax.random.normal(keys[2], (3, 32))
    h = x @ layer.kernel.get_value()
    wd, bd = layer.adapter_down["default"].get_value(), layer.adapter_down_bias["default"].get_value()
    wu, bu = layer.adapter_up["default"].get_value(), layer.adapter_up_bias["default"].get_value()
    f = jax.nn.gelu(h @ wd + bd[None], approximate=False) @ wu + bu[None]
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    np.testing.assert_allclose(call(layer, x), h + f if residual else f, atol=1e-5)


def test_explicit_targets_and_errors(tmp_path):
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama"))
    peft_model = peftjax.get_peft_model(model, peftjax.BottleneckConfig(target_modules=["up_proj"],
                                                                        adapter_type="pfeiffer"))
    assert set(adapter_layers(model)) == {"model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"}
    assert model.model.layers[0].mlp.up_proj.adapter_down["default"].shape == (48, 3)  # 48 // 16
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == ["up_proj"]

    with pytest.raises(TypeError, match=r"model\.norm \(RMSNorm\)"):
        peftjax.get_peft_model(LlamaForCausalLM.from_config(_tiny.config("llama")),
                               peftjax.BottleneckConfig(target_modules=["norm"]))

    class Tiny(nnx.Module):
        def __init__(self):
            self.fc = nnx.Linear(4, 4, rngs=nnx.Rngs(0))

    with pytest.raises(ValueError, match="no default bottleneck placement"):
        peftjax.get_peft_model(Tiny(), peftjax.BottleneckConfig())

    peft_model.save_pretrained(tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "adapter_config.json").read_text())
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps({**cfg, "reduction_factor": 8}))
    with pytest.raises(ValueError, match=r"up_proj\.adapter_down\.weight: expected shape \[6, 48\].*found \[3, 48\]"):
        peftjax.PeftModel.from_pretrained(LlamaForCausalLM.from_config(_tiny.config("llama")), tmp_path / "bad")


DEFAULT_PLACED = {  # family -> the tails of the two layers per block the default (houlsby) adapts
    **{f: ("self_attn.o_proj", "mlp.down_proj") for f in ("qwen3", "phi3", "gemma", "gemma2", "olmo2", "smollm3",
                                                          "granite", "seed_oss", "glm", "glm4", "ernie4_5", "cohere",
                                                          "cohere2")},
    "roberta": ("attention.output.dense", "output.dense"),
    "camembert": ("attention.output.dense", "output.dense"),
    "deberta-v2": ("attention.output.dense", "output.dense"),
    "electra": ("attention.output.dense", "output.dense"),
    "distilbert": ("attention.out_lin", "ffn.lin2"),
    "modernbert": ("attn.Wo", "mlp.Wo"),
    "phi": ("self_attn.dense", "mlp.fc2"),
    "mpt": ("attn.out_proj", "ffn.down_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
    "opt": ("self_attn.out_proj", "fc2"),
    "bloom": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "starcoder2": ("self_attn.o_proj", "mlp.c_proj"),
    "stablelm": ("self_attn.o_proj", "mlp.down_proj"),
    "gptj": ("attn.out_proj", "mlp.fc_out"),
    "falcon": ("self_attention.dense", "mlp.dense_4h_to_h"),
    "gpt_bigcode": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neo": ("attn.attention.out_proj", "mlp.c_proj"),
    "ministral3": ("self_attn.o_proj", "mlp.down_proj"),
    "olmo": ("self_attn.o_proj", "mlp.down_proj"),
    "arcee": ("self_attn.o_proj", "mlp.down_proj"),
    "nemotron": ("self_attn.o_proj", "mlp.down_proj"),
    "helium": ("self_attn.o_proj", "mlp.down_proj"),
    "exaone4": ("self_attn.o_proj", "mlp.down_proj"),
    "apertus": ("self_attn.o_proj", "mlp.down_proj"),
    "hunyuan_v1_dense": ("self_attn.o_proj", "mlp.down_proj"),
    "lfm2": ("out_proj", "feed_forward.w2"),  # its convolutions' and its attention's output projections
    "bamba": (("mamba.out_proj", "self_attn.o_proj"), "feed_forward.down_proj"),  # a Mamba-2 layer or attention
}


@pytest.mark.parametrize("family", sorted(DEFAULT_PLACED))
def test_every_bundled_family_has_a_default_placement(family):
    """``BottleneckConfig()`` on each family's tiny model: an adapter after each block's attention
    output and feedforward output projections (two a block), the model unchanged at the start
    (``up`` is zero), and changed once ``up`` moves."""
    spec = _tiny.arch(family)
    model = getattr(models, spec.class_name).from_config(spec.config())
    before = run(model)
    peft_model = peftjax.get_peft_model(model, peftjax.BottleneckConfig())
    layers = adapter_layers(peft_model.base_model, BottleneckLayer)
    blocks = spec.config().num_hidden_layers
    attention, feedforward = DEFAULT_PLACED[family]
    assert len(layers) == 2 * blocks
    assert sum(n.endswith(attention) for n in layers) == blocks
    assert sum(n.endswith(feedforward) and not n.endswith(attention) for n in layers) == blocks
    assert_same(run(peft_model), before)
    rng = np.random.default_rng(0)
    for layer in layers.values():  # noise, not a constant: a post-LayerNorm encoder removes a constant shift
        for weights in (layer.adapter_down["default"], layer.adapter_up["default"]):
            weights.set_value(rng.standard_normal(weights.get_value().shape).astype(np.float32))
    assert changed(run(peft_model), before) > 1e-2 * np.abs(before).max()
