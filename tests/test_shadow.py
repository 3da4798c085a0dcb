"""ShadowPEFT against HF PEFT 0.22.0 + PyTorch on a tiny Llama, both ways.

A shadow backbone (one Llama layer, the base's embeddings shared, or a narrower one with its own
table and a projection) gives the initial state; every decoder block (or a consecutive run of
them) takes the injection and updates the state. PEFT's adapter, moved off its start, gives its
logits and loss (with the auxiliary term) here, and greedy generation; trained here, the file
gives PEFT the same logits.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy, padded_batch, torch_logits

import peftjax
from peftjax import models
from peftjax.cli import main

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

ARCH = _tiny.arch("llama", initializer_range=0.2)
VARIANTS = {
    "mirror-shared": dict(r=4, shadow_dropout=0.0),
    # a narrower backbone of two layers, its own embeddings, a projection; the last block only
    "narrow-own-embeddings": dict(r=2, shadow_hidden_size=16, shadow_num_attention_heads=2,
                                  shadow_intermediate_size=24, shadow_num_hidden_layers=2, update_hidden_size=6,
                                  target_modules=["model.layers.1"], auxiliary_loss_weight=0.3),
}


def _torch_base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.LlamaForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_s_shadow_gives_its_logits_loss_and_generation_here(tiny_checkpoint, variant, tmp_path):
    base = tiny_checkpoint(ARCH)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_torch_base(base), peft.ShadowConfig(task_type="CAUSAL_LM", **VARIANTS[variant]))
    with torch.no_grad():  # the up projection starts at zero: move every trained tensor
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    theirs.eval()
    theirs.save_pretrained(tmp_path)
    ids, mask = padded_batch(96, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    valid = mask.astype(bool)
    with torch.no_grad():
        ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(base), tmp_path)
    assert model.get_nb_trainable_parameters()[1] == theirs.get_nb_trainable_parameters()[1]
    out = nnx.jit(lambda m, i, a, y: m(input_ids=i, attention_mask=a, labels=y))(model.base_model, ids, mask, labels)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], atol=2e-5, rtol=1e-5)
    assert abs(float(out.loss) - ref.loss.item()) < 2e-5
    plain = torch_logits(_torch_base(base), input_ids=ids, attention_mask=mask)
    assert np.abs(ref.logits.numpy() - plain)[valid].max() > 1e-2
    prompt, prompt_mask = padded_batch(96, seq=5)
    expected = _peft_greedy(theirs, prompt, prompt_mask, 4, eos=2)
    np.testing.assert_array_equal(model.generate(prompt, prompt_mask, max_new_tokens=4, pad_token_id=0), expected)


def _peft_greedy(pm, ids, mask, steps: int, eos: int):
    """Greedy decoding by PEFT's forward on the whole sequence, positions as transformers' generate
    gives them. (PEFT 0.21.2's cached generate looked for its ShadowCache under ``past_key_values``,
    which transformers 5 renamed ``cache``, so its tokens differed from its own forward's; 0.22's
    agree with its forward, so either oracle works.)"""
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    done = torch.zeros(len(ids), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            token = pm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
            token = torch.where(done, 0, token)
            done |= token == eos
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
            if done.all():
                break
    return ids.numpy()


def test_a_shadow_trained_here_loads_in_peft(tiny_checkpoint, tmp_path, capsys):
    base = tiny_checkpoint(ARCH)
    model = peftjax.get_peft_model(models.from_pretrained(base), peftjax.ShadowConfig(
        task_type="CAUSAL_LM", r=4, shadow_dropout=0.1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fresh = peft.get_peft_model(_torch_base(base), peft.ShadowConfig(task_type="CAUSAL_LM", r=4))
    assert model.get_nb_trainable_parameters() == fresh.get_nb_trainable_parameters()
    assert set(model.peft_config["default"].target_modules) == {"model.layers.0", "model.layers.1"}
    from peftjax.models import hf_state_dict  # the base's checkpoint: its own weights only

    assert set(hf_state_dict(model.base_model)) == set(hf_state_dict(models.from_pretrained(base)))
    ids, mask = padded_batch(96, seq=9, left=False)
    losses = _tiny.train(model, _tiny.batch(ids, mask), steps=4).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_torch_base(base), tmp_path).eval()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(loaded, input_ids=ids, attention_mask=mask)[valid], atol=2e-5, rtol=1e-5)
    assert main(["merge", str(base), str(tmp_path), str(tmp_path / "merged")]) == 1
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_what_shadow_does_not_do_here_is_named(tiny_checkpoint):
    base = tiny_checkpoint(ARCH)
    with pytest.raises(ValueError, match="must be consecutive .* layers \\[0, 2\\]"):
        peftjax.get_peft_model(models.from_pretrained(tiny_checkpoint(_tiny.arch("llama", num_hidden_layers=3))),
                               peftjax.ShadowConfig(task_type="CAUSAL_LM", target_modules=["layers.0", "layers.2"]))
    with pytest.raises(NotImplementedError, match="scan_layers and remat"):
        peftjax.get_peft_model(models.from_pretrained(base, scan_layers=True),
                               peftjax.ShadowConfig(task_type="CAUSAL_LM"))
    with pytest.raises(NotImplementedError, match="a pretrained shadow checkpoint is not supported"):
        peftjax.get_peft_model(models.from_pretrained(base), peftjax.ShadowConfig(task_type="CAUSAL_LM",
                                                                                  shadow_model="org/shadow"))
    with pytest.raises(ValueError, match="unset these mirror-only overrides: shadow_num_hidden_layers"):
        peftjax.ShadowConfig(shadow_model="org/shadow", shadow_num_hidden_layers=2)
