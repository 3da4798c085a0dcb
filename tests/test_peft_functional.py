"""PEFT's functional API for every method: ``inject_adapter_in_model``, ``get_peft_model_state_dict``,
``set_peft_model_state_dict``, against HF PEFT's own functions on a tiny Llama (LoRA and IA³)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tr
from flax import nnx

import peftjax

import _tiny
from _torch_models import lazy, torch_logits

from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])

METHODS = {  # (ours, theirs): the same config on both sides
    "lora": (
        lambda: peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                   init_lora_weights=False, task_type="CAUSAL_LM"),
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                init_lora_weights=False, task_type="CAUSAL_LM"),
    ),
    "ia3": (
        lambda: peftjax.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                  init_ia3_weights=False, task_type="CAUSAL_LM"),
        lambda: peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                               init_ia3_weights=False, task_type="CAUSAL_LM"),
    ),
}
BY_METHOD = sorted(METHODS)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    _tiny.save("llama", path)
    return path


def _theirs(path, method):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(path).eval(), METHODS[method][1]())
    return model.eval()


def _logits(model, jit):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def _valid(x):
    return np.asarray(x)[MASK.astype(bool)]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_state_dict_keys_and_shapes_are_peft_s(llama, method):
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(_theirs(llama, method)).items()}
    ours = peftjax.get_peft_model_state_dict(peftjax.get_peft_model(models.from_pretrained(llama),
                                                                    METHODS[method][0]()))
    assert {k: v.shape for k, v in ours.items()} == theirs
    assert all(v.dtype == np.float32 for v in ours.values())


@pytest.mark.parametrize("method", BY_METHOD)
def test_set_from_peft_s_state_dict_gives_peft_s_logits(llama, method, jit):
    torch_model = _theirs(llama, method)
    their_sd = {k: v.detach().float().numpy() for k, v in peft.get_peft_model_state_dict(torch_model).items()}
    ref = torch_logits(torch_model, input_ids=IDS, attention_mask=MASK)
    base = torch_logits(tr.LlamaForCausalLM.from_pretrained(llama).eval(), input_ids=IDS, attention_mask=MASK)
    assert np.abs(_valid(ref) - _valid(base)).max() > 1e-3  # the adapter changes the output

    ours = peftjax.get_peft_model(models.from_pretrained(llama), METHODS[method][0]())
    missing, unexpected = peftjax.set_peft_model_state_dict(ours, their_sd)
    assert (missing, unexpected) == ([], [])
    np.testing.assert_allclose(_valid(_logits(ours, jit)), _valid(ref), atol=1e-5, rtol=0)
    # and back: what we return is what we were given
    back = peftjax.get_peft_model_state_dict(ours)
    assert back.keys() == their_sd.keys()
    for k in back:
        np.testing.assert_allclose(back[k], their_sd[k], atol=1e-7, rtol=0, err_msg=k)


def test_state_dict_reads_a_train_step_s_state_without_touching_the_model(llama):
    ours = peftjax.get_peft_model(models.from_pretrained(llama), METHODS["lora"][0]())
    before = peftjax.get_peft_model_state_dict(ours)
    _, trainable, _ = peftjax.split(ours.base_model)
    bumped = jax.tree.map(lambda v: v + 1.0, trainable)
    after = peftjax.get_peft_model_state_dict(ours, bumped)
    for k in before:
        np.testing.assert_allclose(after[k], before[k] + 1.0, atol=1e-6, err_msg=k)
    assert all(np.array_equal(v, before[k]) for k, v in peftjax.get_peft_model_state_dict(ours).items())
    with pytest.raises(ValueError, match="no adapter 'other'"):
        peftjax.get_peft_model_state_dict(ours, adapter_name="other")


@pytest.mark.parametrize("method", BY_METHOD)
def test_inject_adapter_in_model_equals_get_peft_model(llama, method):
    config = METHODS[method][0]()
    plain = peftjax.inject_adapter_in_model(config, models.from_pretrained(llama))
    wrapped = peftjax.get_peft_model(models.from_pretrained(llama), config)
    np.testing.assert_array_equal(_valid(_logits(plain, False)), _valid(_logits(wrapped, False)))
    graphdef, trainable, _ = peftjax.split(plain)
    assert jax.tree.map(jnp.shape, trainable) == jax.tree.map(jnp.shape, peftjax.split(wrapped.base_model)[1])
    named = peftjax.inject_adapter_in_model(config, models.from_pretrained(llama), "other")
    assert jax.tree.leaves(peftjax.split(named)[1])  # stored under the given name
    assert all("other" in jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_flatten_with_path(peftjax.split(named)[1])[0])
