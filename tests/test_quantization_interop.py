"""QLoRA files that move between peftjax and transformers + bitsandbytes + PEFT (CPU, ``device_map="cpu"``).

Oracle: the same tiny Llama (hidden 64, intermediate 128: 64 divides every row, see
test_quantization_codes) loaded by transformers with ``BitsAndBytesConfig``, with PEFT on top.

- 4-bit (NF4 + double quant, compute dtype float32): logits equal within 1e-4 both ways. bitsandbytes'
  ``Linear4bit.forward`` switches, on CPUs with AVX512-BF16, to a bfloat16 kernel in eval without
  grad (``support_avx512bf16_for_cpu``); :func:`bnb_model` turns that off so the oracle is float32.
- int8 (LLM.int8()): the weights are equal code for code, but bitsandbytes' matmul casts the float32
  activations to float16 and quantizes each row to int8 (``MatMul8bitLt``, ``int8_vectorwise_quant``
  of the input) while peftjax multiplies the float activations by the dequantized weight, so the
  logits agree only within that activation rounding: a few 1e-3 on logits of magnitude ~0.5.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import models
from peftjax.quantization import Linear4bit, Linear8bitLt, QuantizationConfig, dequantize_model, quantized_linears

torch = lazy("torch")
peft = lazy("peft")
bnb = lazy("bitsandbytes")

LLAMA = _tiny.arch("llama", hidden_size=64, intermediate_size=128)
IDS = np.array([[1, 5, 9, 14, 3, 7], [2, 8, 11, 4, 6, 10]])
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

NF4_DQ = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
INT8 = dict(load_in_8bit=True)
# the 4-bit tolerance the issue asks; int8's: bitsandbytes' int8 activations (module docstring)
TOL = {"nf4": 1e-4, "int8": 2e-2}
KINDS = {"nf4": NF4_DQ, "int8": INT8}


def ours(kind: str) -> QuantizationConfig:
    return QuantizationConfig(**KINDS[kind], bnb_4bit_compute_dtype="float32")


def bnb_config(kind: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**KINDS[kind], bnb_4bit_compute_dtype=torch.float32)


def lora_b_drawn(peft_model):
    """PEFT's model with its ``lora_B`` drawn from N(0, 0.1) (it starts at zero): the adapter shows."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return peft_model


def layer_status(model) -> list[tuple]:
    """Each adapter layer's name, PEFT's class name and quantization backend, PEFT's model or ours."""
    return sorted((s.name, s.module_type, s.quantization_backend) for s in model.get_layer_status())


def float32_oracle(model):
    """Keeps bitsandbytes' 4-bit layers on their float32 path (see the module docstring)."""
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return model


def bnb_model(path, kind: str | None = None):
    """transformers' model of ``path``: quantized with ``kind``, or as the checkpoint says (None)."""
    from transformers import AutoModelForCausalLM

    kw = {} if kind is None else {"quantization_config": bnb_config(kind)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32, **kw)
    return float32_oracle(model.eval())


def torch_logits(model) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MatMul8bitLt's notice about casting to float16
        return model(input_ids=torch.tensor(IDS)).logits.float().numpy()


def jax_logits(model) -> np.ndarray:
    if isinstance(model, peftjax.PeftModel):
        model = model.base_model
    return np.asarray(model(input_ids=jnp.asarray(IDS)).logits)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama64")
    _tiny.save(LLAMA, path)
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_equals_transformers_bitsandbytes(ckpt, kind):
    model = models.from_pretrained(ckpt, quantization_config=ours(kind))
    expected = torch_logits(bnb_model(ckpt, kind))
    np.testing.assert_allclose(jax_logits(model), expected, atol=TOL[kind], rtol=0)
    if kind == "nf4":  # much tighter in fact: the same weights, the same float32 math
        np.testing.assert_allclose(jax_logits(model), expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_peft_qlora_adapter_loads_here(ckpt, tmp_path, kind):
    """(a) PEFT's LoRA adapter, made on transformers' quantized model, gives PEFT's logits here."""
    torch.manual_seed(0)
    base = bnb_model(ckpt, kind)
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL_LINEAR,
                                                           task_type="CAUSAL_LM"))
    lora_b_drawn(peft_model)
    peft_model = float32_oracle(peft_model.eval())
    expected = torch_logits(peft_model)
    peft_model.save_pretrained(tmp_path)

    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(ckpt, quantization_config=ours(kind)), tmp_path)
    layers = quantized_linears(loaded.base_model)
    assert len(layers) == 14 and all(isinstance(m, Linear4bit if kind == "nf4" else Linear8bitLt)
                                     for m in layers.values())
    got = jax_logits(loaded)
    np.testing.assert_allclose(got, expected, atol=TOL[kind], rtol=0)
    assert layer_status(loaded) == layer_status(peft_model)  # lora.Linear4bit / lora.Linear8bitLt
    # every weight counted, a quantized one by its entries: the float model's count plus the adapter's
    assert loaded.get_nb_trainable_parameters()[1] == peft_model.get_nb_trainable_parameters()[1]
    # the adapter changed the output by far more than the tolerance
    assert np.abs(expected - torch_logits(bnb_model(ckpt, kind))).max() > 20 * TOL[kind]


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_trained_here_loads_in_peft_on_bitsandbytes(ckpt, tmp_path, kind):
    """(b) LoRA trained here on the quantized base (the public split/make_train_step loop) gives the
    same logits in ``peft.PeftModel.from_pretrained`` on transformers' quantized model."""
    base = peftjax.prepare_model_for_kbit_training(models.from_pretrained(ckpt, quantization_config=ours(kind)))
    peft_model = peftjax.get_peft_model(base, peftjax.LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                                                 target_modules=ALL_LINEAR, lora_dropout=0.0))
    trained = _tiny.train(peft_model, _tiny.batch(IDS), steps=5, dropout=False)
    assert trained.losses[-1] < trained.losses[0]
    peft_model.save_pretrained(tmp_path)
    ours_logits = jax_logits(peft_model)

    torch_base = bnb_model(ckpt, kind)
    before = torch_logits(torch_base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(torch_base, tmp_path)
    theirs = torch_logits(float32_oracle(loaded.eval()))
    np.testing.assert_allclose(ours_logits, theirs, atol=TOL[kind], rtol=0)
    assert np.abs(theirs - before).max() > 20 * TOL[kind]  # the trained adapter shows


# ---------------------------------------------------------------- checkpoints saved quantized


@pytest.fixture(scope="module")
def bnb_saved(ckpt, tmp_path_factory):
    """``bnb_saved(kind)``: transformers' ``save_pretrained`` of the bitsandbytes-loaded model."""
    saved = {}

    def get(kind):
        if kind not in saved:
            saved[kind] = tmp_path_factory.mktemp(f"bnb_{kind}")
            bnb_model(ckpt, kind).save_pretrained(saved[kind])
        return saved[kind]

    return get


def _tensors(path):
    from peftjax.io import SafetensorsFile

    return dict(SafetensorsFile(path / "model.safetensors"))


def test_transformers_writes_the_layout_we_read(bnb_saved):
    """The keys and dtypes ``peftjax.quantization._checkpoint`` documents are transformers' own."""
    import json

    four, eight = _tensors(bnb_saved("nf4")), _tensors(bnb_saved("int8"))
    q = "model.layers.0.self_attn.q_proj"
    assert {k[len(q) + 1:]: (v.dtype.name, v.shape) for k, v in four.items() if k.startswith(q + ".")} == {
        "weight": ("uint8", (64 * 64 // 2, 1)), "weight.absmax": ("uint8", (64,)), "weight.quant_map": ("float32", (16,)),
        "weight.nested_absmax": ("float32", (1,)), "weight.nested_quant_map": ("float32", (256,)),
        "weight.quant_state.bitsandbytes__nf4": ("uint8", four[f"{q}.weight.quant_state.bitsandbytes__nf4"].shape)}
    assert {k[len(q) + 1:]: (v.dtype.name, v.shape) for k, v in eight.items() if k.startswith(q + ".")} == {
        "weight": ("int8", (64, 64)), "SCB": ("float32", (64,)), "weight_format": ("uint8", ())}
    for kind in KINDS:
        config = json.loads((bnb_saved(kind) / "config.json").read_text())["quantization_config"]
        assert QuantizationConfig.from_dict(config) == ours(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_saved_quantized_by_transformers_loads_from_its_tensors(ckpt, bnb_saved, kind):
    path = bnb_saved(kind)
    model = models.from_pretrained(path)  # no quantization_config: config.json's
    layers = quantized_linears(model)
    assert len(layers) == 14 and all(isinstance(m, Linear4bit if kind == "nf4" else Linear8bitLt)
                                     for m in layers.values())
    stored = _tensors(path)
    for name, m in layers.items():  # the file's very tensors, not a requantization of a dequantization
        assert np.array_equal(np.asarray(m.weight.get_value()), stored[f"{name}.weight"])
        scales = m.absmax if kind == "nf4" else m.SCB
        assert np.array_equal(np.asarray(scales.get_value()), stored[f"{name}.{'weight.absmax' if kind == 'nf4' else 'SCB'}"])
    got = jax_logits(model)
    # as transformers on the same file
    np.testing.assert_allclose(got, torch_logits(bnb_model(path)), atol=TOL[kind], rtol=0)
    # as quantizing the float checkpoint here: every code and scale is bitsandbytes' (NF4, its nested
    # absmax codes and int8 alike), so the tensors are the file's and the logits equal
    here = models.from_pretrained(ckpt, quantization_config=ours(kind))
    for name, m in quantized_linears(here).items():
        assert np.array_equal(np.asarray(m.weight.get_value()), stored[f"{name}.weight"]), name
        scales = m.absmax if kind == "nf4" else m.SCB
        assert np.array_equal(np.asarray(scales.get_value()), stored[f"{name}.{'weight.absmax' if kind == 'nf4' else 'SCB'}"])
    np.testing.assert_array_equal(got, jax_logits(here))
    # an explicit config of the same format is accepted; the compute dtype is the caller's
    model = models.from_pretrained(path, quantization_config=QuantizationConfig(**KINDS[kind],
                                                                                bnb_4bit_compute_dtype="bfloat16"))
    assert all(m.compute_dtype == jnp.bfloat16 for m in quantized_linears(model).values())


def _copy_without(src, dst, drop=(), edit=None):
    import shutil

    from peftjax.io import write_safetensors

    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {k: v for k, v in _tensors(src).items() if k not in drop}
    if edit:
        edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors, {"format": "pt"})
    return dst


def test_quant_state_missing_a_tensor_names_module_and_key(bnb_saved, tmp_path):
    from peftjax.models import CheckpointError

    q = "model.layers.1.mlp.up_proj"
    for i, key in enumerate([f"{q}.weight.nested_absmax", f"{q}.weight.absmax", f"{q}.weight.quant_map",
                             f"{q}.weight.quant_state.bitsandbytes__nf4"]):
        path = _copy_without(bnb_saved("nf4"), tmp_path / str(i), drop=[key])
        with pytest.raises(CheckpointError, match=rf"{q} \(a 4-bit bitsandbytes linear\).*"
                                                  rf"{key.rsplit('.', 1)[1] if 'quant_state' in key else key}"):
            models.from_pretrained(path)
    path = _copy_without(bnb_saved("int8"), tmp_path / "int8", drop=[f"{q}.SCB"])
    with pytest.raises(CheckpointError, match=rf"{q} \(an int8 bitsandbytes linear\): its quant state lacks \['{q}.SCB'\]"):
        models.from_pretrained(path)

    def bad_map(t):
        t[f"{q}.weight.quant_map"] = t[f"{q}.weight.quant_map"][::-1].copy()

    path = _copy_without(bnb_saved("nf4"), tmp_path / "map", edit=bad_map)
    with pytest.raises(CheckpointError, match=rf"{q}.weight.quant_map is not bitsandbytes' nf4 code"):
        models.from_pretrained(path)

    def bad_shape(t):
        t[f"{q}.weight.absmax"] = t[f"{q}.weight.absmax"][:-1].copy()

    path = _copy_without(bnb_saved("nf4"), tmp_path / "shape", edit=bad_shape)
    with pytest.raises(CheckpointError, match=rf"{q}.weight.absmax: expected uint8 \(128,\), found uint8 \(127,\)"):
        models.from_pretrained(path)


def test_a_config_of_another_format_than_the_file_is_refused(bnb_saved):
    from peftjax.models import CheckpointError

    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.down_proj is stored 4-bit, but the "
                                              r"quantization_config asks int8"):
        models.from_pretrained(bnb_saved("nf4"), quantization_config=ours("int8"))
    with pytest.raises(CheckpointError, match=r"down_proj is stored nf4 with double quantization, but the "
                                              r"quantization_config asks fp4 with it"):
        models.from_pretrained(bnb_saved("nf4"), quantization_config=QuantizationConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True))


# ---------------------------------------------------------------- saving quantized


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_writes_bitsandbytes_layout_that_transformers_loads(ckpt, bnb_saved, tmp_path, kind):
    import json

    # 1. a checkpoint transformers saved, loaded here and saved again: the same tensors, byte for byte
    models.from_pretrained(bnb_saved(kind)).save_pretrained(tmp_path / "again")
    theirs, again = _tensors(bnb_saved(kind)), _tensors(tmp_path / "again")
    assert sorted(again) == sorted(theirs)
    for k in theirs:
        assert again[k].dtype == theirs[k].dtype and again[k].shape == theirs[k].shape, k
        assert again[k].tobytes() == theirs[k].tobytes(), k

    # 2. quantized here from the float checkpoint: transformers' keys, dtypes and config; its logits there
    model = models.from_pretrained(ckpt, quantization_config=ours(kind))
    model.save_pretrained(tmp_path / "here")
    here = _tensors(tmp_path / "here")
    assert {k: (v.dtype, v.shape) for k, v in here.items()} == {k: (v.dtype, v.shape) for k, v in theirs.items()}
    written = json.loads((tmp_path / "here" / "config.json").read_text())["quantization_config"]
    assert written == json.loads((bnb_saved(kind) / "config.json").read_text())["quantization_config"]
    np.testing.assert_allclose(torch_logits(bnb_model(tmp_path / "here")), jax_logits(model), atol=TOL[kind], rtol=0)
    # and here again, from the file's own tensors
    np.testing.assert_array_equal(jax_logits(models.from_pretrained(tmp_path / "here")), jax_logits(model))


@pytest.mark.parametrize("dequantize", [False, True], ids=["requantize", "dequantize"])
def test_cli_merge_on_a_base_saved_quantized(bnb_saved, tmp_path, dequantize):
    """``peftjax merge`` of an adapter into transformers' NF4 checkpoint: transformers loads the result."""
    import json

    from peftjax.cli import main

    base = bnb_saved("nf4")
    peft_model = peftjax.get_peft_model(models.from_pretrained(base), peftjax.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=ALL_LINEAR, init_lora_weights="gaussian"))
    for layer in quantized_linears(peft_model.base_model).values():
        layer.lora_B["default"].set_value(jnp.full(layer.lora_B["default"].get_value().shape, 0.05))
    peft_model.save_pretrained(tmp_path / "adapter")
    unmerged = jax_logits(peft_model)
    args = ["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(args + (["--dequantize"] if dequantize else [])) == 0
    rounding = [w for w in caught if "rounding errors" in str(w.message)]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    theirs = torch_logits(bnb_model(tmp_path / "merged"))
    ours_merged = jax_logits(models.from_pretrained(tmp_path / "merged"))
    np.testing.assert_allclose(theirs, ours_merged, atol=1e-4, rtol=0)  # the same file, both sides
    if dequantize:  # a float checkpoint with the adapter's logits
        assert "quantization_config" not in config and not rounding
        np.testing.assert_allclose(theirs, unmerged, atol=1e-4, rtol=0)
    else:  # bitsandbytes' layout again; the merged weights rounded to NF4, as PEFT warns
        assert config["quantization_config"]["load_in_4bit"] and rounding
        with pytest.warns(UserWarning, match="rounding errors"):
            in_process = jax_logits(peft_model.merge_and_unload())
        np.testing.assert_allclose(ours_merged, in_process, atol=1e-6, rtol=0)
        assert np.abs(theirs - unmerged).max() > 1e-3  # the second rounding shows


# ---------------------------------------------------------------- GPT-2: Conv1D quantized as transformers does

# n_embd 64: every [out, in] row a multiple of 64 (bitsandbytes' 2-D CPU dequantization, test_quantization_codes)
GPT2 = _tiny.arch("gpt2", n_embd=64)
CONV1D = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2_64")
    _tiny.save(GPT2, path)
    return path


def _bnb_state(module, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(codes, scales) of a bitsandbytes layer of transformers' model."""
    w = module.weight
    return (w.data.numpy(), w.quant_state.absmax.numpy()) if kind == "nf4" else (w.data.numpy(), w.SCB.numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_conv1d_quantizes_as_transformers_does(gpt2_ckpt, tmp_path, kind):
    """transformers quantizes GPT-2's ``Conv1D`` through its transposed ``[out, in]`` weight: the same
    codes and scales here, the same logits, and its saved quantized file loads here as those tensors."""
    model = models.from_pretrained(gpt2_ckpt, quantization_config=ours(kind))
    layers = quantized_linears(model)
    assert sorted(layers) == sorted(f"transformer.h.{i}.{m}.{c}" for i in range(2)
                                    for m, cs in (("attn", ("c_attn", "c_proj")), ("mlp", ("c_fc", "c_proj")))
                                    for c in cs)
    theirs = bnb_model(gpt2_ckpt, kind)
    modules = dict(theirs.named_modules())
    for name, m in layers.items():
        codes, scales = _bnb_state(modules[name], kind)
        assert (m.out_features, m.in_features) == (modules[name].out_features, modules[name].in_features), name
        assert np.array_equal(np.asarray(m.weight.get_value()), codes), name
        assert np.array_equal(np.asarray((m.absmax if kind == "nf4" else m.SCB).get_value()), scales), name
    expected = torch_logits(theirs)
    np.testing.assert_allclose(jax_logits(model), expected, atol=TOL[kind] if kind == "int8" else 2e-6, rtol=0)
    if kind == "nf4":  # the quantization mattered: the float GPT-2 differs by far more (int8's logits
        # tolerance covers bitsandbytes' activation rounding and so also int8's weight rounding; its codes are the check)
        assert np.abs(jax_logits(models.from_pretrained(gpt2_ckpt)) - expected).max() > 1000 * 2e-6
    # transformers' quantized file (weights already [out, in]) loads here as the same tensors
    theirs.save_pretrained(tmp_path)
    loaded = quantized_linears(models.from_pretrained(tmp_path))
    for name, m in layers.items():
        assert np.array_equal(np.asarray(loaded[name].weight.get_value()), np.asarray(m.weight.get_value())), name


def test_peft_lora_on_quantized_gpt2_loads_here(gpt2_ckpt, tmp_path):
    """PEFT's LoRA on transformers' NF4 GPT-2 (its Conv1D now bitsandbytes linears) gives PEFT's logits
    here; ``fan_in_fan_out=True`` stays in the config, as PEFT's bitsandbytes dispatch leaves it."""
    torch.manual_seed(0)
    config = dict(r=4, lora_alpha=8, target_modules=CONV1D, fan_in_fan_out=True, task_type="CAUSAL_LM")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = peft.get_peft_model(bnb_model(gpt2_ckpt, "nf4"), peft.LoraConfig(**config))
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]  # none on bitsandbytes layers
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    lora_b_drawn(peft_model)
    expected = torch_logits(float32_oracle(peft_model.eval()))
    peft_model.save_pretrained(tmp_path / "peft")

    base = models.from_pretrained(gpt2_ckpt, quantization_config=ours("nf4"))
    plain = jax_logits(base)
    loaded = peftjax.PeftModel.from_pretrained(base, tmp_path / "peft")
    np.testing.assert_allclose(jax_logits(loaded), expected, atol=TOL["nf4"], rtol=0)
    assert np.abs(expected - plain).max() > 20 * TOL["nf4"]  # the adapter shows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and none here
        here = peftjax.get_peft_model(models.from_pretrained(gpt2_ckpt, quantization_config=ours("nf4")),
                                      peftjax.LoraConfig(**config))
    assert here.peft_config["default"].fan_in_fan_out is True


# PEFT's int8 notebook (OPT in 8 bits, LoRA on PEFT's default q_proj and v_proj), small: the decoder's linears,
# the tied head not. (Falcon is not here: transformers 5 converts exact nn.Linear modules only, so its FalconLinear
# layers stay float under a BitsAndBytesConfig, where peftjax quantizes them as asked.)
# family -> (its tiny config's changes, how many linears transformers quantizes): PEFT's int8 notebook's OPT, and
# StarCoder as the "personal copilot" QLoRA guides fine-tune it (its fused c_attn, PEFT's default target)
NOTEBOOKS = {"opt": (dict(hidden_size=64, ffn_dim=128), 2 * 6),
             "gpt_bigcode": (dict(n_embd=64, n_inner=128, initializer_range=0.05), 2 * 4)}


@pytest.mark.parametrize("family", sorted(NOTEBOOKS))
@pytest.mark.parametrize("kind", KINDS)
def test_peft_s_notebook_models_move_both_ways(tmp_path, kind, family):
    """PEFT's adapter (its default targets) on transformers' quantized model gives PEFT's logits here,
    and one made here gives its logits in PEFT; every linear of the decoder is quantized, the tied
    head is not."""
    overrides, quantized = NOTEBOOKS[family]
    _tiny.save(_tiny.arch(family, **overrides), tmp_path / family)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(bnb_model(tmp_path / family, kind), peft.LoraConfig(r=4, lora_alpha=8,
                                                                                    task_type="CAUSAL_LM"))
    lora_b_drawn(theirs)
    expected = torch_logits(float32_oracle(theirs.eval()))
    theirs.save_pretrained(tmp_path / "peft")
    base = models.from_pretrained(tmp_path / family, quantization_config=ours(kind))
    assert len(quantized_linears(base)) == quantized and base.lm_head is None
    plain = jax_logits(base)
    loaded = peftjax.PeftModel.from_pretrained(base, tmp_path / "peft")
    np.testing.assert_allclose(jax_logits(loaded), expected, atol=TOL[kind], rtol=0)
    assert np.abs(expected - plain).max() > 20 * TOL[kind]

    here = peftjax.get_peft_model(models.from_pretrained(tmp_path / family, quantization_config=ours(kind)),
                                  peftjax.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, task_type="CAUSAL_LM"))
    here.save_pretrained(tmp_path / "ours")
    mine = jax_logits(here)
    back = float32_oracle(peft.PeftModel.from_pretrained(bnb_model(tmp_path / family, kind), tmp_path / "ours").eval())
    np.testing.assert_allclose(torch_logits(back), mine, atol=TOL[kind], rtol=0)


# ---------------------------------------------------------------- PEFT's other methods on bitsandbytes layers

# the methods PEFT 0.22.0 runs on bitsandbytes layers besides LoRA, each made with its trained tensors off
# their start so that it shows in the logits
BNB_METHODS = {
    # with their own bitsandbytes layers (peft/tuners/*/bnb.py)
    "ia3": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])),
    "adalora": ("AdaLoraConfig", dict(r=4, total_step=10, target_modules=["q_proj", "v_proj", "down_proj"])),
    "hira": ("HiraConfig", dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    "road": ("RoadConfig", dict(group_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "randlora": ("RandLoraConfig", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "pvera": ("PveraConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    # through its generic backends (peft/utils/quantization_utils.py): the dequantized weight, "bnb 4bit" in
    # the layer status
    "oft": ("OFTConfig", dict(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "boft": ("BOFTConfig", dict(boft_block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "miss": ("MissConfig", dict(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "miss_bat": ("MissConfig", dict(r=8, init_weights="bat", target_modules=["q_proj", "v_proj", "o_proj"])),
    "shira": ("ShiraConfig", dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    "paca": ("PacaConfig", dict(r=4, paca_alpha=8, random_seed=0, target_modules=["q_proj", "v_proj", "down_proj"])),
    "vera": ("VeraConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    # with no quantized path, their forward never reading the weight: bitsandbytes' layers are torch.nn.Linear
    "beft": ("BeftConfig", dict(target_modules=["v_proj", "down_proj"])),
    "fourierft": ("FourierFTConfig", dict(n_frequency=100, target_modules=["q_proj", "v_proj", "down_proj"])),
    "waveft": ("WaveFTConfig", dict(n_frequency=100, target_modules=["q_proj", "v_proj", "down_proj"])),
    "c3a": ("C3AConfig", dict(block_size=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "gralora": ("GraloraConfig", dict(r=8, gralora_k=2, hybrid_r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    "vblora": ("VBLoRAConfig", dict(r=4, num_vectors=16, vector_length=8,
                                    target_modules=["q_proj", "v_proj", "down_proj"])),
    "lily": ("LilyConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
}


def peft_adapter_on_bnb(ckpt, path, method: str, kind: str = "nf4"):
    """PEFT's ``method`` adapter on transformers' ``kind`` (nf4, int8) model, its trained tensors moved
    off their start and saved to ``path``; returns the PEFT model (eval, float32 oracle)."""
    name, fields = BNB_METHODS[method]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(bnb_model(ckpt, kind), getattr(peft, name)(task_type="CAUSAL_LM", **fields))
        with torch.no_grad():
            for p in theirs.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        theirs.save_pretrained(path)
    return float32_oracle(theirs.eval())


# every method on NF4; on int8, one with its own bitsandbytes layers in PEFT and three through its backends
OTHER_CASES = [(m, "nf4") for m in sorted(BNB_METHODS)] + [(m, "int8") for m in ("hira", "oft", "paca", "vera")]


@pytest.mark.parametrize("method,kind", OTHER_CASES, ids=[f"{m}-{k}" for m, k in OTHER_CASES])
def test_peft_s_other_quantized_methods_move_both_ways(ckpt, tmp_path, method, kind):
    """An adapter of each method PEFT runs on bitsandbytes layers, made by PEFT on transformers' NF4
    (or int8) model, gives PEFT's logits (and its layer status) on that base here; trained here (the
    public functional core), it gives ours in PEFT on the bitsandbytes model."""
    theirs = peft_adapter_on_bnb(ckpt, tmp_path / "theirs", method, kind)
    expected = torch_logits(theirs)
    assert np.abs(expected - torch_logits(bnb_model(ckpt, kind))).max() > 20 * TOL["nf4"]  # the adapter shows

    base = models.from_pretrained(ckpt, quantization_config=ours(kind))
    loaded = peftjax.PeftModel.from_pretrained(base, tmp_path / "theirs", is_trainable=True)
    layer = Linear4bit if kind == "nf4" else Linear8bitLt
    assert all(isinstance(m, layer) for m in quantized_linears(loaded.base_model).values())
    np.testing.assert_allclose(jax_logits(loaded), expected, atol=TOL[kind], rtol=0)
    theirs_status = layer_status(theirs)
    if method == "road":  # PEFT 0.22.0's road.bnb.Linear4bit.__repr__ says "oft."
        theirs_status = [(n, t.replace("oft.", "road."), b) for n, t, b in theirs_status]
    assert layer_status(loaded) == theirs_status
    assert loaded.get_model_status().quantization_backend == theirs.get_model_status().quantization_backend

    if method == "adalora":  # its rank allocator trains in make_adalora_train_step / the Trainer: moved instead
        _, trainable, _ = peftjax.split(loaded.base_model)
        loaded.update(jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), trainable))
    else:
        trained = _tiny.train(loaded, _tiny.batch(IDS), steps=3, dropout=False)
        assert trained.losses[-1] < trained.losses[0]
    loaded.save_pretrained(tmp_path / "ours")
    mine = jax_logits(loaded)
    assert np.abs(mine - expected).max() > 20 * TOL["nf4"]  # trained
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(bnb_model(ckpt, kind), tmp_path / "ours")
    np.testing.assert_allclose(mine, torch_logits(float32_oracle(back.eval())), atol=TOL[kind], rtol=0)


@pytest.mark.parametrize("method", ["oft", "boft", "miss", "miss_bat", "shira", "paca", "vera"])
def test_merging_the_weight_reading_methods_into_a_quantized_base(ckpt, tmp_path, method):
    """Merged into the NF4 weights, requantized: PEFT's ``merge_and_unload`` on bitsandbytes gives the
    same logits. Merged into the dequantized weights: the unmerged adapter's logits."""
    theirs = peft_adapter_on_bnb(ckpt, tmp_path, method)
    unmerged = torch_logits(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = float32_oracle(theirs.merge_and_unload())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    peft_merged = torch_logits(merged)

    def loaded():
        return peftjax.PeftModel.from_pretrained(models.from_pretrained(ckpt, quantization_config=ours("nf4")),
                                                 tmp_path)

    with pytest.warns(UserWarning, match="Merge lora module to 4-bit linear"):
        requantized = loaded().merge_and_unload()
    assert isinstance(requantized.model.layers[0].self_attn.q_proj, Linear4bit)
    np.testing.assert_allclose(jax_logits(requantized), peft_merged, atol=TOL["nf4"], rtol=0)
    dequantized = loaded().merge_and_unload(dequantize=True)
    assert not quantized_linears(dequantized)
    np.testing.assert_allclose(jax_logits(dequantized), unmerged, atol=TOL["nf4"], rtol=0)


# the layer methods PEFT 0.22.0 cannot run on bitsandbytes layers: its layers read the packed weight as a float
# one (LoHa, LoKr, DeLoRA, HRA, DEFT, PEANuT, Super-Tuning, TinyLoRA, FRoD fail), refuse it (GLoRA), or leave
# the logits unchanged (Uni-LoRA); OSF; and peftjax's bottleneck adapters
DEQUANTIZED_ONLY = {
    "loha": ("LoHaConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "lokr": ("LoKrConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "delora": ("DeloraConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "hra": ("HRAConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "glora": ("GloraConfig", dict(r=2, target_modules=["q_proj", "v_proj", "down_proj"])),
    "deft": ("DeftConfig", dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "peanut": ("PeanutConfig", dict(r=4, depth=2, act_fn="gelu", target_modules=["q_proj", "v_proj", "down_proj"])),
    "supertuning": ("SupertuningConfig", dict(sparsity=0.9, target_modules=["q_proj", "v_proj", "down_proj"])),
    "tinylora": ("TinyLoraConfig", dict(r=2, u=16, target_modules=["q_proj", "v_proj", "down_proj"])),
    "frod": ("FrodConfig", dict(sparse_rate=0.05, target_modules=["q_proj", "v_proj", "down_proj"])),
    "osf": ("OSFConfig", dict(effective_rank=8, target_modules=["q_proj", "v_proj", "down_proj"])),
    "unilora": ("UniLoraConfig", dict(r=2, theta_d_length=64, target_modules=["q_proj", "v_proj", "down_proj"])),
    "bottleneck": ("BottleneckConfig", dict(target_modules=["down_proj"])),
}


@pytest.mark.parametrize("method", sorted(DEQUANTIZED_ONLY))
def test_every_layer_method_runs_on_a_quantized_base_as_on_its_dequantized_weights(ckpt, tmp_path, method):
    """Every layer method adapts a quantized linear through its dequantized kernel, those PEFT cannot
    run on bitsandbytes layers too. Oracle, the dense reference: the adapter trained on the NF4 base
    gives, loaded on the dequantized float base, the same logits; merged into the dequantized
    weights, the unmerged ones."""
    name, fields = DEQUANTIZED_ONLY[method]
    adapted = peftjax.get_peft_model(models.from_pretrained(ckpt, quantization_config=ours("nf4")),
                                     getattr(peftjax, name)(task_type="CAUSAL_LM", **fields))
    _, trainable, _ = peftjax.split(adapted.base_model)
    adapted.update(jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape, x.dtype)
                                if jnp.issubdtype(x.dtype, jnp.floating) else x, trainable))
    trained = _tiny.train(adapted, _tiny.batch(IDS), steps=3, dropout=False)
    assert trained.losses[-1] < trained.losses[0]
    adapted.save_pretrained(tmp_path)
    logits = jax_logits(adapted)

    dense = dequantize_model(models.from_pretrained(ckpt, quantization_config=ours("nf4")))
    assert not quantized_linears(dense)
    assert np.abs(logits - jax_logits(dense)).max() > 20 * TOL["nf4"]
    on_dense = peftjax.PeftModel.from_pretrained(dense, tmp_path)
    np.testing.assert_allclose(jax_logits(on_dense), logits, atol=1e-6, rtol=0)
    if method != "bottleneck":  # non-linear: not mergeable anywhere
        np.testing.assert_allclose(jax_logits(adapted.merge_and_unload(dequantize=True)), logits, atol=1e-5, rtol=0)


def test_a_new_head_stays_float_through_save_and_transformers(tmp_path):
    """A classifier built on a masked LM's checkpoint: its new pooler and classifier stay in float on
    the NF4 base (the adapter trains and saves them), and ``save_pretrained`` names them in
    ``llm_int8_skip_modules``, so that a reload, here or in transformers, keeps them so."""
    from transformers import AutoModelForSequenceClassification, BertForMaskedLM

    from _torch_models import save_tiny

    save_tiny(BertForMaskedLM, _tiny.config("bert", hidden_size=64, intermediate_size=128, num_attention_heads=2,
                                            vocab_size=96), tmp_path / "mlm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the new head's notice
        model = models.from_pretrained(tmp_path / "mlm", task_type="SEQ_CLS", num_labels=3,
                                       quantization_config=ours("nf4"))
    layers = quantized_linears(model)
    assert layers and not any(n.startswith(("bert.pooler", "classifier")) for n in layers)
    logits = np.asarray(model(input_ids=jnp.asarray(IDS)).logits)
    model.save_pretrained(tmp_path / "saved")
    skipped = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"][
        "llm_int8_skip_modules"]
    assert set(skipped) == {"bert.pooler.dense", "classifier"}

    again = models.from_pretrained(tmp_path / "saved")
    assert set(quantized_linears(again)) == set(layers)
    np.testing.assert_array_equal(np.asarray(again(input_ids=jnp.asarray(IDS)).logits), logits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved", device_map="cpu",
                                                                    dtype=torch.float32)
    theirs = float32_oracle(theirs.eval())
    assert not isinstance(theirs.bert.pooler.dense, bnb.nn.Linear4bit)
    assert isinstance(theirs.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    np.testing.assert_allclose(torch_logits(theirs), logits, atol=TOL["nf4"], rtol=0)
