"""GPT-OSS against PyTorch transformers and HF PEFT.

Logits on a padded batch (attention sinks, a sliding layer and a full one, YaRN, biased clamped
experts with interleaved gate/up columns), the loss with the load-balancing term and its
gradients, the grouped expert dispatch, greedy generation, classification, MXFP4 experts
dequantized as transformers dequantizes them, and LoRA on the attention, the router and the
experts (``target_parameters``, which PEFT applies input-major to the experts) both ways.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import jitted, lazy, padded_batch, randomised, torch_logits

import peftjax
from peftjax import models
from peftjax.models._gpt_oss import dequantize_mxfp4
from peftjax.models._llama import sliding_windows

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_numpy = lazy("safetensors.numpy")

VOCAB = _tiny.FAMILIES["gpt_oss"][2]["vocab_size"]
TOL = dict(atol=2e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def oss(tmp_path_factory):
    """(torch model with every weight drawn anew, sinks and biases included, its checkpoint, ours)."""
    root = tmp_path_factory.mktemp("gpt_oss")
    torch_model = randomised(tr.GptOssForCausalLM(_tiny.config("gpt_oss", output_router_logits=True)).eval())
    torch_model.save_pretrained(root)
    return torch_model, root, models.from_pretrained(root)


def test_logits_loss_and_gradients_match_transformers(oss):
    """Jitted, on a padded batch longer than the window: logits, the loss with the router's
    load-balancing term, and the gradients of the sinks, the router and the experts; the grouped
    dispatch gives the same."""
    torch_model, root, model = oss
    assert type(model).__name__ == "GptOssForCausalLM"
    assert sliding_windows(model.config) == [3, None]
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    valid = mask.astype(bool)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref.loss.backward()
    for dispatch in ("dense", "grouped"):
        ours = model if dispatch == "dense" else models.from_pretrained(root, expert_dispatch=dispatch)
        grads, out = nnx.jit(nnx.grad(lambda m: (lambda o: (o.loss, o))(
            m(input_ids=ids, attention_mask=mask, labels=labels)), has_aux=True))(ours)
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.detach().numpy()[valid], **TOL)
        assert abs(float(out.loss) - ref.loss.item()) <= 2e-5 and abs(float(out.aux_loss) - ref.aux_loss.item()) < 1e-5
        for i in range(2):
            layer = grads.model.layers[i]
            for name, ours_grad in (("self_attn.sinks", layer.self_attn.sinks), ("mlp.router.weight",
                                    layer.mlp.router.weight), ("mlp.experts.gate_up_proj",
                                    layer.mlp.experts.gate_up_proj), ("mlp.experts.down_proj_bias",
                                    layer.mlp.experts.down_proj_bias)):
                theirs = torch_model.get_parameter(f"model.layers.{i}.{name}").grad.numpy()
                np.testing.assert_allclose(np.asarray(ours_grad[...]), theirs, atol=2e-5, rtol=1e-4,
                                           err_msg=f"{dispatch} {i} {name}")
    torch_model.zero_grad(set_to_none=True)


def test_scanned_sliding_and_full_layers_match_transformers_with_gradients(oss):
    """``scan_layers=True`` (with remat): the sliding and the full layer stacked, each reading its
    window's mask by index; the loss, its router term and the stacked gradients are transformers'."""
    torch_model, root, _ = oss
    scanned = models.from_pretrained(root, scan_layers=True, remat="full")
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref.loss.backward()
    grads, out = nnx.jit(nnx.grad(lambda m: (lambda o: (o.loss, o))(
        m(input_ids=ids, attention_mask=mask, labels=labels)), has_aux=True))(scanned)
    assert abs(float(out.loss) - ref.loss.item()) <= 2e-5 and abs(float(out.aux_loss) - ref.aux_loss.item()) < 1e-5
    layer = grads.model.layers.layer
    for ours, name in ((layer.self_attn.sinks, "self_attn.sinks"), (layer.mlp.router.weight, "mlp.router.weight"),
                       (layer.mlp.experts.down_proj, "mlp.experts.down_proj")):
        for i in range(2):
            theirs = torch_model.get_parameter(f"model.layers.{i}.{name}").grad.numpy()
            np.testing.assert_allclose(np.asarray(ours[...])[i], theirs, atol=2e-5, rtol=1e-4, err_msg=f"{i} {name}")
    torch_model.zero_grad(set_to_none=True)


def test_left_padded_logits_and_greedy_generation_match_transformers(oss):
    torch_model, _, model = oss
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0, output_router_logits=False).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = randomised(tr.GptOssForSequenceClassification(_tiny.config("gpt_oss", num_labels=3)).eval())
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "GptOssForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=7, left=False)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits),
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask), **TOL)


def test_mxfp4_experts_load_as_transformers_dequantizes_them(oss, tmp_path):
    """A checkpoint whose experts are MXFP4 blocks and scales (OpenAI's published layout) loads as
    transformers' dequantization reads it; a block without its scales is refused by name."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (4, 6, 2, 16), dtype=np.uint8)
    scales = rng.integers(120, 132, (4, 6, 2), dtype=np.uint8)
    ref = convert_moe_packed_tensors(torch.tensor(blocks), torch.tensor(scales), dtype=torch.float32).numpy()
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), ref)

    torch_model, root, model = oss
    state = safetensors_numpy.load_file(str(root / "model.safetensors"))
    packed = {}
    for key in [k for k in state if k.endswith("experts.gate_up_proj")]:  # the 32 inputs make one MXFP4 group
        e, n_in, n_out = state[key].shape  # [experts, in, out] -> codes of [experts, out, in / 32, 16]
        packed[f"{key}_blocks"] = rng.integers(0, 256, (e, n_out, n_in // 32, 16), dtype=np.uint8)
        packed[f"{key}_scales"] = rng.integers(118, 126, (e, n_out, n_in // 32), dtype=np.uint8)
        state[key] = dequantize_mxfp4(packed[f"{key}_blocks"], packed[f"{key}_scales"])
    quantized = {k: v for k, v in state.items() if not k.endswith("experts.gate_up_proj")}
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text((root / "config.json").read_text())
    safetensors_numpy.save_file({**quantized, **packed}, str(tmp_path / "q" / "model.safetensors"))
    ours = models.from_pretrained(tmp_path / "q")
    for i in range(2):
        got = np.asarray(ours.model.layers[i].mlp.experts.gate_up_proj[...])
        np.testing.assert_array_equal(got, state[f"model.layers.{i}.mlp.experts.gate_up_proj"])
    del packed[next(k for k in packed if k.endswith("_scales"))]
    safetensors_numpy.save_file({**quantized, **packed}, str(tmp_path / "q" / "model.safetensors"))
    with pytest.raises(peftjax.models.CheckpointError, match=r"experts\.gate_up_proj_blocks has no .*_scales"):
        models.from_pretrained(tmp_path / "q")


def _peft_base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.GptOssForCausalLM.from_pretrained(path).eval()


def test_lora_on_attention_and_experts_both_ways(oss, tmp_path):
    """PEFT's LoRA on the attention and on the experts' 3-D parameters (input-major here): its
    file gives its logits here, merged too; trained here, the file loads in PEFT with the same
    logits and the merged model is transformers' own."""
    torch_model, path, _ = oss
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    valid = mask.astype(bool)
    fields = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"],
                  target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"],
                  init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(path), peft.LoraConfig(task_type="CAUSAL_LM", **fields))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft", is_trainable=True)
    np.testing.assert_allclose(np.asarray(jitted(model.base_model, input_ids=ids, attention_mask=mask).logits)[valid],
                               ref[valid], **TOL)
    assert {(s.name, s.module_type) for s in model.get_layer_status()} == {
        (s.name, s.module_type) for s in theirs.get_layer_status()}

    losses = _tiny.train(model, _tiny.batch(ids, mask), steps=3, dropout=False).losses
    assert losses[-1] < losses[0]
    ours = np.asarray(model(input_ids=ids, attention_mask=mask).logits)
    assert np.abs(ours - ref)[valid].max() > 1e-3
    model.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_peft_base(path), tmp_path / "ours").eval()
    np.testing.assert_allclose(ours[valid], torch_logits(loaded, input_ids=ids, attention_mask=mask)[valid], **TOL)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(ours[valid], torch_logits(_peft_base(tmp_path / "merged"), input_ids=ids,
                                                         attention_mask=mask)[valid], **TOL)
