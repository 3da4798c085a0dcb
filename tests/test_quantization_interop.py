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

import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import models
from peftjax.quantization import Linear4bit, Linear8bitLt, QuantizationConfig, quantized_linears

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
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    peft_model = float32_oracle(peft_model.eval())
    expected = torch_logits(peft_model)
    peft_model.save_pretrained(tmp_path)

    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(ckpt, quantization_config=ours(kind)), tmp_path)
    layers = quantized_linears(loaded.base_model)
    assert len(layers) == 14 and all(isinstance(m, Linear4bit if kind == "nf4" else Linear8bitLt)
                                     for m in layers.values())
    got = jax_logits(loaded)
    np.testing.assert_allclose(got, expected, atol=TOL[kind], rtol=0)
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
