"""LFM2 against PyTorch transformers and HF PEFT.

_tiny's LFM2: a gated short convolution layer, an attention layer (per-head q/k norms), another
convolution, biases on the convolutions (``conv_bias``), the SwiGLU's width adjusted as
transformers adjusts it. Logits and loss on left- and right-padded batches, generation through both
kinds of cache, packed rows, the checkpoint both ways, LoRA both ways, and the refusals.
"""

from __future__ import annotations


import numpy as np
import pytest

import _tiny
from _torch_models import assert_all_linear_lora_both_ways, jitted, lazy, padded_batch, randomised, torch_logits

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr = lazy("torch"), lazy("transformers")

VOCAB = _tiny.FAMILIES["lfm2"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory):
    """(torch model, its checkpoint, ours loaded from it)."""
    torch_model = randomised(tr.Lfm2ForCausalLM(_tiny.config("lfm2")).eval())
    path = tmp_path_factory.mktemp("lfm2")
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_logits_and_loss_match_transformers(lfm2, left):
    torch_model, _, model = lfm2
    assert [layer.layer_type for layer in model.model.layers] == ["conv", "full_attention", "conv"]
    assert model.model.layers[0].feed_forward.w1.kernel.shape == (32, 32)  # 40 -> 26 -> 32
    ids, mask = padded_batch(VOCAB, seq=9, left=left)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    if left:  # a pad's prediction of the first token would count: a pad's logits are nobody's
        return
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        loss = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                           labels=torch.tensor(labels)).loss.item()
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - loss) <= 1e-5


def test_generation_packed_rows_and_the_checkpoint_match_transformers(lfm2, tmp_path):
    """Greedy generation from left-padded prompts (the convolution's last inputs and the attention's
    keys cached); two sequences packed in one row each get the logits transformers gives it alone;
    ``save_pretrained`` writes what transformers loads."""
    torch_model, _, model = lfm2
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)
    assert [sorted(c) for c in model.init_cache(2, 8)] == [["conv"], ["k", "v"], ["conv"]]

    first, second = np.arange(3, 9)[None], np.arange(20, 25)[None]
    packed = np.concatenate([first, second], axis=1)
    segments = np.array([[1] * 6 + [2] * 5])
    out = np.asarray(jitted(model, input_ids=packed, segment_ids=segments).logits)
    np.testing.assert_allclose(out[0, :6], torch_logits(torch_model, input_ids=first)[0], **TOL)
    np.testing.assert_allclose(out[0, 6:], torch_logits(torch_model, input_ids=second)[0], **TOL)

    model.save_pretrained(tmp_path)
    reloaded = tr.Lfm2ForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(VOCAB, seq=7)
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], atol=0, rtol=0)


def test_the_config_reads_the_hub_s_names_and_refuses_what_it_cannot_run(lfm2):
    """The Hub's ``tie_embedding``, ``block_ff_dim`` and ``full_attn_idxs`` read as transformers reads
    them; prefix tuning is refused (the convolutions have no keys), so is scanning mixed layers."""
    hub = dict(_tiny.fields("lfm2"), tie_embedding=False, block_ff_dim=64, full_attn_idxs=[0, 2])
    hub.pop("intermediate_size")
    ours, theirs = ModelConfig("lfm2", **hub), tr.Lfm2Config(**hub)
    for name in ("tie_word_embeddings", "intermediate_size", "layer_types"):
        assert getattr(ours, name) == getattr(theirs, name), name
    with pytest.raises(ValueError, match=r"scan_layers=True needs alike layers; lfm2's layer_types mix "
                                         r"\['conv', 'full_attention'\]"):
        models.Lfm2ForCausalLM.from_config(ModelConfig("lfm2", **_tiny.fields("lfm2"), scan_layers=True))
    with pytest.raises(ValueError, match="layer_types has 2 entries for num_hidden_layers=3"):
        models.Lfm2ForCausalLM.from_config(ModelConfig("lfm2", **{**_tiny.fields("lfm2"),
                                                                  "layer_types": ["conv", "conv"]}))
    with pytest.raises(TypeError, match="Lfm2ForCausalLM does not implement peftjax's prefix attention protocol"):
        peftjax.get_peft_model(lfm2[2], peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_all_linear_lora_gives_peft_logits_both_ways(lfm2, tmp_path):
    """PEFT's all-linear on LFM2: the convolutions' and attentions' projections and the SwiGLUs, not
    the depthwise convolution itself, both ways."""
    names = assert_all_linear_lora_both_ways(tr.Lfm2ForCausalLM, lfm2[1], tmp_path, VOCAB, TOL)
    assert {"model.model.layers.0.conv.in_proj", "model.model.layers.1.self_attn.out_proj",
            "model.model.layers.2.feed_forward.w3"} <= names and not any(n.endswith("conv.conv") for n in names)
