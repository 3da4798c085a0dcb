"""Qwen3-Next (``qwen3_next``) against transformers and HF PEFT.

The oracle is transformers' model on the same weights (float32, eager attention, its PyTorch
fallbacks of the Gated DeltaNet kernels), from the suite's tiny config: a linear attention layer
(the fused ``in_proj_qkvz`` / ``in_proj_ba``, 2 key heads serving 4 value heads), a gated full
attention layer, a linear one; sparse MLPs (experts, shared expert) in the first two, a dense one
in the last (``mlp_only_layers``). Logits, loss with the load-balancing term and router logits
over a right-padded batch past one delta-rule chunk; greedy generation from left-padded prompts;
both expert layouts; LoRA ``all-linear`` both ways with PEFT (which converts the MoE targets
for this model type), and no targets refused as PEFT refuses them; the three task classes. What
Qwen3-Next shares with Qwen3.5 (the kernels, left-padded logits, gradients, refusals):
test_qwen3_5.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import jitted, lazy, padded_batch, randomised, save_in_memory_layout, torch_logits

import peftjax
from peftjax import models

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["qwen3_next"][2]["vocab_size"]
SEQ = 70  # past one chunk of the delta rule (64)
# weights at 0.2 std, 70 tokens; float32 rounding of logits of ~5. Measured on the AMD AVX2 host
# kind (2026-12-07; XLA's kernels there sum in another order than on AVX-512, where 1e-4 held):
# ours 1.3e-4 from transformers' float32 logits, 6.9e-5 from its float64 ones (eager experts),
# transformers' float32 ones 3.3e-5 from its float64 ones; a wrong gate or mask is 1e-2 and more
TOL = dict(atol=2e-4, rtol=1e-5)
# the LoRA runs (all-linear, experts and router included, moved 0.3 off their start; measured on
# here->peft): transformers' float32 logits stand 7.2e-5 from its float64 ones, ours 1.4e-4 (both
# worst on the same tokens; its float64 run keeps the delta rule in float32), 1.9e-4 from its
# float32 ones with its default grouped_mm experts on the AVX-512 host, 3.9e-4 on the AVX2 one
LORA_TOL = dict(atol=6e-4, rtol=1e-5)
EAGER = dict(attn_implementation="eager")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(torch causal LM, its checkpoint (per-expert, as transformers saves it), ours)."""
    root = tmp_path_factory.mktemp("qwen3_next")
    torch_model = randomised(tr.Qwen3NextForCausalLM(_tiny.config("qwen3_next", **EAGER)), scale=0.2)
    with torch.no_grad():  # the norms that multiply by ``1 + weight`` centred on 0 (the gated one stays on 1)
        for name, p in torch_model.named_parameters():
            if "norm" in name and "linear_attn.norm" not in name:
                p.sub_(1.0)
    torch_model.eval().save_pretrained(root)
    return torch_model, root, models.from_pretrained(root)


def test_logits_loss_router_logits_and_generation_match_transformers(qwen):
    torch_model, _, model = qwen
    assert type(model).__name__ == "Qwen3NextForCausalLM" and model.model.sparse_layers == 2
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Qwen2MoeSparseMoeBlock"] * 2 + ["LlamaMLP"]
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    labels = np.where(mask == 1, ids, -100)
    valid = mask.astype(bool)
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    out = nnx.jit(lambda m, kw: m(**kw, output_router_logits=True))(
        model, {k: jnp.asarray(v) for k, v in inputs.items()})
    with torch.no_grad():
        ref = torch_model(**{k: torch.tensor(v) for k, v in inputs.items()}, output_router_logits=True)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], **TOL)
    assert abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5 and abs(float(out.loss) - ref.loss.item()) <= 1e-5
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for a, b in zip(out.router_logits, ref.router_logits):
        np.testing.assert_allclose(np.asarray(a)[valid.reshape(-1)], b.numpy()[valid.reshape(-1)], **TOL)
    # left-padded prompts: the prefill's padding zeroed, then the recurrent rule a token at a time
    ids, mask = padded_batch(VOCAB, seq=6)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=4)), ref)


def test_both_expert_layouts_load_and_save_pretrained_writes_transformers_keys(qwen, tmp_path):
    """The Hub's per-expert files (transformers' ``save_pretrained``) and transformers 5's fused
    in-memory layout load to transformers' state dict, dense layer and all; ours saves the former."""
    torch_model, root, model = qwen
    save_in_memory_layout(torch_model, tmp_path / "fused")
    ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for loaded in (model, models.from_pretrained(tmp_path / "fused")):
        ours = models.hf_state_dict(loaded)
        assert set(ours) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    model.save_pretrained(tmp_path / "ours")
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert keys(tmp_path / "ours") == keys(root) and "model.layers.0.mlp.experts.3.up_proj.weight" in keys(root)


def test_lora_all_linear_gives_peft_logits_both_ways(qwen, tmp_path):
    """``all-linear``: the fused projections, ``out_proj``, the full attention, the shared expert's
    gate, and (PEFT's conversion for ``qwen3_next``) the router and the experts' parameters."""
    torch_model, root, _ = qwen
    config = dict(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    valid = mask.astype(bool)
    torch.manual_seed(0)
    base = tr.Qwen3NextForCausalLM.from_pretrained(root, **EAGER)
    theirs = peft.get_peft_model(base, peft.LoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(root), tmp_path / "peft")
    names = {s.name for s in ours.get_layer_status()}
    assert names == {s.name for s in theirs.get_layer_status()}
    assert any(n.endswith("in_proj_qkvz") for n in names) and any(n.endswith("in_proj_ba") for n in names)
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(jitted(ours.base_model, input_ids=ids, attention_mask=mask).logits)[valid],
                               ref[valid], **LORA_TOL)
    assert np.abs(ref - torch_logits(torch_model, input_ids=ids, attention_mask=mask)).max() > 1e-2

    here = peftjax.get_peft_model(models.from_pretrained(root), peftjax.LoraConfig(**config), key=jax.random.key(1))
    _, made, _ = peftjax.split(here.base_model)
    rng = np.random.RandomState(2)
    here.update(jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape)
                                                   .astype(x.dtype)), made))
    here.save_pretrained(tmp_path / "here")
    base = tr.Qwen3NextForCausalLM.from_pretrained(root, **EAGER)
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "here").eval()
    out = np.asarray(jitted(here.base_model, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(loaded, input_ids=ids, attention_mask=mask)[valid], **LORA_TOL)


@pytest.mark.parametrize("class_name", ["Qwen3NextForSequenceClassification", "Qwen3NextForTokenClassification",
                                        "Qwen3NextForQuestionAnswering"])
def test_task_classes_match_transformers(qwen, class_name, tmp_path):
    """The causal LM's decoder plus a head, saved by transformers (question answering keeps its
    decoder under ``transformer``): logits and loss, right-padded rows."""
    torch_model, _, _ = qwen
    task = getattr(tr, class_name)(_tiny.config("qwen3_next", num_labels=3, **EAGER)).eval()
    getattr(task, task.base_model_prefix).load_state_dict(torch_model.model.state_dict())
    task.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == class_name
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    valid = mask == 1
    rng = np.random.RandomState(1)
    if class_name.endswith("QuestionAnswering"):
        names, targets = ("start_logits", "end_logits"), dict(start_positions=rng.randint(0, 60, 3),
                                                              end_positions=rng.randint(0, 60, 3))
    elif class_name.endswith("TokenClassification"):
        names, targets = ("logits",), dict(labels=np.where(valid, rng.randint(0, 3, ids.shape), -100))
    else:
        names, targets = ("logits",), dict(labels=rng.randint(0, 3, 3))
    inputs = dict(input_ids=ids, attention_mask=mask, **targets)
    out = jitted(model, **inputs)
    with torch.no_grad():
        ref = task(**{k: torch.tensor(v) for k, v in inputs.items()})
    for name in names:
        ours, theirs = np.asarray(getattr(out, name)), getattr(ref, name).numpy()
        if ours.ndim > 1 and ours.shape[1] == SEQ:  # per token: the real ones
            ours, theirs = ours[valid], theirs[valid]
        np.testing.assert_allclose(ours, theirs, **TOL)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_lora_without_targets_is_refused_as_peft_refuses_it(qwen):
    """PEFT has no default targets for ``qwen3_next``, and its MoE conversion leaves a config
    without ``target_modules`` nothing: both refuse it."""
    _, root, model = qwen
    with pytest.raises(ValueError):
        peft.get_peft_model(tr.Qwen3NextForCausalLM.from_pretrained(root, **EAGER), peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="target_modules"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2), key=jax.random.key(0))
