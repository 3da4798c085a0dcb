"""Llama 4's text model against PyTorch transformers (float32, eager attention) and HF PEFT.

_tiny's Llama 4 text model exercises every branch in two layers: layer 0 a RoPE layer (pairwise
rotation, llama3 scaling, the weightless q/k norm) attending in chunks of 4 with a dense MLP,
layer 1 a NoPE layer over everything whose queries the temperature scales every 2 slots, with 4
sigmoid-routed experts (top 2) and a shared expert. The batches are longer than a chunk and
left-padded (the chunks start at each row's first token).
"""

from __future__ import annotations

import json
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

import _tiny
from _torch_models import lazy, padded_batch, randomised, torch_logits

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

VOCAB = _tiny.FAMILIES["llama4_text"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)
IDS, MASK = padded_batch(VOCAB, seq=11)  # three chunks of 4; temperatures 1 .. 1 + 0.5 log 7
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.Llama4ForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama4")
    config = _tiny.config("llama4_text")
    config._attn_implementation = "eager"
    torch_model = randomised(tr.Llama4ForCausalLM(config).eval())
    torch_model.save_pretrained(root)
    return torch_model, root, models.from_pretrained(root)


def _close(ours, theirs, tol=TOL):
    valid = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], **tol)


def test_logits_loss_and_checkpoint_match_transformers(llama4):
    torch_model, _, model = llama4
    assert type(model).__name__ == "Llama4ForCausalLM"
    assert [type(layer.feed_forward).__name__ for layer in model.model.layers] == ["LlamaMLP", "Llama4TextMoe"]
    out = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a))(model, jnp.asarray(IDS), jnp.asarray(MASK))
    _close(out.logits, torch_logits(torch_model, input_ids=IDS, attention_mask=MASK))
    ids, mask = padded_batch(VOCAB, seq=11, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - ref.loss.item()) <= 1e-5
    ref_state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ours = models.hf_state_dict(model)
    assert set(ours) == set(ref_state) and ours["model.layers.1.feed_forward.experts.gate_up_proj"].shape == (4, 32, 24)


def test_greedy_generation_matches_transformers(llama4):
    """Five prompt tokens and six new ones: the cached steps cross chunk boundaries."""
    torch_model, _, model = llama4
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)


def test_vision_language_checkpoint_reads_its_text_model(llama4, tmp_path):
    """A Llama4ForConditionalGeneration file: language_model.model.* / language_model.lm_head.* are
    the text model's, the vision model and projector are skipped, as transformers'
    Llama4ForCausalLM.from_pretrained reads it."""
    _, path, model = llama4
    state = {("language_model." + k): np.ascontiguousarray(v) for k, v in models.hf_state_dict(model).items()}
    state["vision_model.patch_embedding.linear.weight"] = np.zeros((4, 4), np.float32)
    state["multi_modal_projector.linear_1.weight"] = np.zeros((32, 4), np.float32)
    save_file(state, str(tmp_path / "model.safetensors"))
    text = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama4", "text_config": text,
                                                      "architectures": ["Llama4ForConditionalGeneration"]}))
    loaded = models.Llama4ForCausalLM.from_pretrained(tmp_path)
    out = np.asarray(loaded(input_ids=IDS, attention_mask=MASK).logits)
    np.testing.assert_array_equal(out, np.asarray(model(input_ids=IDS, attention_mask=MASK).logits))
    _close(out, torch_logits(_base(tmp_path), input_ids=IDS, attention_mask=MASK))
    # its adapters name the modules as transformers' vision-language class does (PEFT's keys there)
    saved = peftjax.get_peft_model_state_dict(peftjax.get_peft_model(loaded, peftjax.LoraConfig(
        r=2, target_modules=["q_proj", "lm_head"])))
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8, vision_output_dim=16, projector_input_dim=16, projector_output_dim=16)
    vlm = tr.Llama4ForConditionalGeneration(tr.Llama4Config(text_config=text, vision_config=vision))
    names = {n for n, _ in vlm.named_modules()}
    modules = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in saved if ".lora_" in k}
    assert modules and modules <= names, sorted(modules - names)


def test_lora_both_ways_with_peft(llama4, tmp_path):
    """PEFT has no default targets for llama4_text: the linears by name (the attention, the dense
    MLP, the shared expert) and the fused experts by target_parameters."""
    path = llama4[1]
    kwargs = dict(r=2, target_modules=TARGETS, init_lora_weights=False,
                  target_parameters=["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_base(path), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert np.abs(ref - torch_logits(_base(path), input_ids=IDS, attention_mask=MASK))[MASK == 1].max() > 1e-3
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    _close(model(input_ids=IDS, attention_mask=MASK).logits, ref)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**kwargs))
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_base(path), tmp_path / "ours").eval()
    _close(ours(input_ids=IDS, attention_mask=MASK).logits, torch_logits(loaded, input_ids=IDS, attention_mask=MASK))
    with pytest.raises(ValueError, match="no default target_modules for model_type 'llama4_text'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2))


def test_unsupported_options_are_refused_by_name():
    fields = _tiny.fields("llama4_text", layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match=r"layer_types \['sliding_attention'\] are not supported"):
        models.Llama4ForCausalLM.from_config(ModelConfig("llama4_text", **fields))
    fields = _tiny.fields("llama4_text", attention_chunk_size=None, layer_types=["chunked_attention"] * 2)
    with pytest.raises(ValueError, match="chunked_attention layers need attention_chunk_size"):
        models.Llama4ForCausalLM.from_config(ModelConfig("llama4_text", **fields))
    with pytest.raises(ValueError, match="expert_dispatch='grouped' is not supported"):
        models.Llama4ForCausalLM.from_config(ModelConfig("llama4_text", **_tiny.fields("llama4_text"),
                                                         expert_dispatch="grouped"))
    with pytest.raises(ValueError, match="scan_layers=True needs layers alike"):
        models.Llama4ForCausalLM.from_config(ModelConfig("llama4_text", **_tiny.fields("llama4_text"),
                                                         scan_layers=True))
