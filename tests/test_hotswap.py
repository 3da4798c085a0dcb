"""Hot-swapping a LoRA adapter under ``nnx.jit``: new weights, no recompile, the new adapter's outputs.

Oracle: each adapter file loaded fresh (peftjax) and, for one, by HF PEFT + PyTorch.
"""

from __future__ import annotations


import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _torch_models import quiet, save_peft_adapters  # noqa: E402
import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.hotswap import hotswap_adapter, prepare_model_for_compiled_hotswap  # noqa: E402

IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
# same targets family, different ranks, alphas and target subsets
ADAPTERS = {
    "p": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "q": dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "big": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "other": dict(r=4, lora_alpha=8, target_modules=["k_proj"]),
    "rs": dict(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotswap")
    return save_peft_adapters(root, ADAPTERS)


def fresh(files, name):
    return peftjax.PeftModel.from_pretrained(models.from_pretrained(files / "base"), files / name)


def logits(model):
    return np.asarray(model(input_ids=IDS).logits)


def test_ten_swaps_compile_once_and_give_each_adapters_outputs(files):
    model = fresh(files, "p")
    traces = []

    @nnx.jit
    def forward(m, ids):
        traces.append(1)
        return m(input_ids=ids).logits

    expected = {name: logits(fresh(files, name)) for name in ("p", "q")}
    assert np.abs(expected["p"] - expected["q"]).max() > 1e-3
    for i in range(10):
        name = "q" if i % 2 == 0 else "p"
        hotswap_adapter(model, files / name, adapter_name="default")
        np.testing.assert_allclose(np.asarray(forward(model.base_model, IDS)), expected[name], atol=1e-5, rtol=0)
    assert len(traces) == 1
    assert list(model.peft_config) == ["default"]
    # the swapped-in adapter saves as a file PEFT reads back with the same outputs
    with torch.no_grad():
        theirs = quiet(peft.PeftModel.from_pretrained, quiet(tr.LlamaForCausalLM.from_pretrained, files / "base"),
                       files / "p").eval()(input_ids=torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(logits(model), theirs, atol=1e-5, rtol=0)


def test_a_larger_rank_needs_the_model_prepared_first(files):
    model = fresh(files, "p")
    before = logits(model)
    with pytest.raises(ValueError, match=r"rank 8 > 4.*prepare_model_for_compiled_hotswap\(model, target_rank=8\)"):
        hotswap_adapter(model, files / "big", adapter_name="default")
    np.testing.assert_array_equal(logits(model), before)  # nothing changed
    assert list(model.peft_config) == ["default"]

    prepare_model_for_compiled_hotswap(model, target_rank=8)
    np.testing.assert_allclose(logits(model), before, atol=1e-6, rtol=0)  # zero padding changes nothing
    traces = []

    @nnx.jit
    def forward(m, ids):
        traces.append(1)
        return m(input_ids=ids).logits

    for name in ("big", "p", "q", "big"):
        hotswap_adapter(model, files / name, adapter_name="default")
        np.testing.assert_allclose(np.asarray(forward(model.base_model, IDS)), logits(fresh(files, name)),
                                   atol=1e-5, rtol=0)
    assert len(traces) == 1


def test_incompatible_adapters_are_refused_and_nothing_changes(files):
    model = fresh(files, "p")
    before = logits(model)
    with pytest.raises(ValueError, match=r"targets layers 'default' does not: \['model.layers.0.self_attn.k_proj'"):
        hotswap_adapter(model, files / "other", adapter_name="default")
    with pytest.raises(ValueError, match="Configs are incompatible: for use_rslora, False != True"):
        hotswap_adapter(model, files / "rs", adapter_name="default")
    with pytest.raises(ValueError, match="no adapter 'nope'"):
        hotswap_adapter(model, files / "q", adapter_name="nope")
    np.testing.assert_array_equal(logits(model), before)
    assert list(model.peft_config) == ["default"]
    model.merge_adapter()
    with pytest.raises(ValueError, match="currently merged"):
        hotswap_adapter(model, files / "q", adapter_name="default")
