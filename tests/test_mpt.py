"""MPT against PyTorch transformers and HF PEFT: ALiBi with MPT's slopes (6 heads: the
interleaved ones), clipped q/k/v, the bias-free LayerNorms; logits, loss, generation, scanned
layers' gradients, packed rows, the heads, PEFT's default LoRA targets and prefix tuning both
ways, and the attn_config options transformers would ignore refused."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_grads_match_torch,
    assert_lora_moves_both_ways,
    assert_packed_rows_as_alone,
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_perturbed,
    torch_logits,
)

import peftjax
from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

VOCAB = _tiny.FAMILIES["mpt"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def mpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mpt")
    torch_model = randomised(tr.MptForCausalLM(_tiny.config("mpt")).eval())
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


def test_logits_and_loss_match_transformers(mpt):
    torch_model, _, model = mpt
    assert type(model).__name__ == "MptForCausalLM"
    for left in (True, False):
        ids, mask = padded_batch(VOCAB, seq=9, left=left)
        valid = mask.astype(bool)
        labels = np.where(mask == 1, ids, -100)
        with torch.no_grad():
            ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                              labels=torch.tensor(labels))
        for out in (model(input_ids=ids, attention_mask=mask, labels=labels),
                    jitted(model, input_ids=ids, attention_mask=mask, labels=labels)):
            np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], **TOL)
            if not left:  # transformers' loss reads the shifted labels as they lie (right padding)
                assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_greedy_generation_and_packed_rows_match_transformers(mpt):
    torch_model, _, model = mpt
    ids, mask = padded_batch(VOCAB, seq=6)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)
    assert_packed_rows_as_alone(model, torch_model, TOL)


def test_scanned_and_rematerialised_layers_give_transformers_gradients(mpt):
    torch_model, path, _ = mpt
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    torch_inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    torch_model(**torch_inputs).loss.backward()
    for scan in (False, True):
        model = models.from_pretrained(path, scan_layers=scan, remat="full" if scan else "none")
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            return nnx.merge(graphdef, p, rest)(input_ids=ids, attention_mask=mask, labels=labels).loss

        assert_grads_match_torch(nnx.merge(graphdef, jax.jit(jax.grad(loss))(params), rest), torch_model)
    torch_model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("head", ["MptForSequenceClassification", "MptForTokenClassification",
                                  "MptForQuestionAnswering"])
def test_the_heads_match_transformers(head, tmp_path):
    extra = dict(num_labels=2) if head == "MptForQuestionAnswering" else dict(num_labels=3)
    torch_model = save_perturbed(getattr(tr, head), _tiny.config("mpt", **extra), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == head
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    if head == "MptForQuestionAnswering":
        inputs = dict(input_ids=ids, attention_mask=mask, start_positions=np.array([1, 2, 0]),
                      end_positions=np.array([3, 4, 2]))
    elif head == "MptForTokenClassification":
        inputs = dict(input_ids=ids, attention_mask=mask, labels=np.where(mask == 1, ids % 3, -100))
    else:
        inputs = dict(input_ids=ids, attention_mask=mask, labels=np.array([0, 2, 1]))
    with torch.no_grad():
        ref = torch_model(**{k: torch.tensor(v) for k, v in inputs.items()})
    out = jitted(model, **inputs)
    for name in ("logits", "start_logits", "end_logits", "loss"):
        if getattr(ref, name, None) is not None:
            np.testing.assert_allclose(np.asarray(getattr(out, name)), getattr(ref, name).numpy(), err_msg=name, **TOL)


def test_peft_default_lora_targets_and_prefix_tuning_move_both_ways(mpt, tmp_path):
    _, path, _ = mpt
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    batch = _tiny.batch(ids, mask) | {"labels": np.where(mask == 1, ids, -100)}
    assert_lora_moves_both_ways(tr.MptForCausalLM, path, tmp_path, dict(r=4, lora_alpha=8, task_type="CAUSAL_LM"),
                                {"Wqkv"}, batch, input_ids=ids, attention_mask=mask)
    # PEFT reads the sizes from the config's dict, whose names are MPT's (n_heads): pass them, as PEFT asks
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, num_layers=2, token_dim=48,
                                     num_attention_heads=6)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tr.MptForCausalLM.from_pretrained(path), config).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(0, 0.3)
    theirs.save_pretrained(tmp_path / "prefix")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "prefix")
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(theirs, input_ids=ids, attention_mask=mask)[valid], **TOL)
    # made here without the sizes (read from the config's aliases), written into the file for PEFT
    made = peftjax.get_peft_model(models.from_pretrained(path),
                                  peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    made.save_pretrained(tmp_path / "made")
    back = peft.PeftModel.from_pretrained(tr.MptForCausalLM.from_pretrained(path), tmp_path / "made").eval()
    np.testing.assert_allclose(torch_logits(back, input_ids=ids, attention_mask=mask)[valid],
                               np.asarray(made(input_ids=ids, attention_mask=mask).logits)[valid], **TOL)


def test_attn_config_options_transformers_ignores_are_refused_by_name(mpt):
    _, path, _ = mpt
    for option, value in (("qk_ln", True), ("alibi", False), ("prefix_lm", True), ("alibi_bias_max", 16),
                          ("attn_type", "multiquery_attention")):
        with pytest.raises(ValueError, match=rf"mpt: attn_config \{{'{option}': .*is not supported"):
            models.from_pretrained(path, attn_config={"clip_qkv": 0.6, option: value})
