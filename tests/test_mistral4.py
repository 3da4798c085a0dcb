"""Mistral 4 against PyTorch transformers and HF PEFT.

_tiny's Mistral 4 (DeepSeek-V3's latent attention with a q LoRA and interleaved RoPE on a third of
each head, YaRN with ``mscale_all_dim``, queries scaled up every 4 positions, a dense layer then 8
softmax-routed experts, top 2 within the best of 2 groups, and a shared expert): logits, loss, the
fused checkpoint layout, generation, sequence classification, LoRA both ways (PEFT converts no
targets for Mistral 4: modules by name, experts and router by ``target_parameters``) and the
refusals. The machinery it shares with DeepSeek-V3 is tested further in test_deepseek_v3.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy, padded_batch, randomised, save_tiny, torch_logits

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

VOCAB = _tiny.FAMILIES["mistral4"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)
# all-linear random LoRA (B too): float32 itself is 2.1e-5 off float64 there (PyTorch's and ours alike)
LORA_TOL = dict(atol=5e-5, rtol=1e-5)
IDS, MASK = padded_batch(VOCAB, seq=9)  # 9 positions: query scales 1, 1.35, 1.55


@pytest.fixture(scope="module")
def mistral4(tmp_path_factory):
    root = tmp_path_factory.mktemp("mistral4")
    torch_model = randomised(tr.Mistral4ForCausalLM(_tiny.config("mistral4")).eval())
    torch_model.save_pretrained(root)
    return torch_model, root, models.from_pretrained(root)


def _base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.Mistral4ForCausalLM.from_pretrained(path).eval()


def _close(ours, theirs, tol=TOL):
    valid = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], **tol)


def test_logits_loss_and_checkpoint_match_transformers(mistral4, tmp_path):
    torch_model, path, model = mistral4
    assert type(model).__name__ == "Mistral4ForCausalLM"
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["LlamaMLP", "Mistral4MoE"]
    out = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a))(model, jnp.asarray(IDS), jnp.asarray(MASK))
    _close(out.logits, torch_logits(torch_model, input_ids=IDS, attention_mask=MASK))
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - ref.loss.item()) <= 1e-5
    # the experts stay fused in the file, as transformers writes them for Mistral 4
    ref_state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ours = models.hf_state_dict(model)
    assert set(ours) == set(ref_state) and "model.layers.1.mlp.experts.gate_up_proj" in ours
    model.save_pretrained(tmp_path)
    _close(torch_logits(_base(tmp_path), input_ids=IDS, attention_mask=MASK),
           torch_logits(torch_model, input_ids=IDS, attention_mask=MASK))


def test_greedy_generation_matches_transformers(mistral4):
    torch_model, _, model = mistral4
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = save_tiny(tr.Mistral4ForSequenceClassification, _tiny.config("mistral4", num_labels=3), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "Mistral4ForSequenceClassification"
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK), labels=torch.tensor(labels))
    out = model(input_ids=IDS, attention_mask=MASK, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_lora_on_every_linear_experts_and_router_both_ways(mistral4, tmp_path):
    """PEFT 0.22.0 converts no targets for Mistral 4: all-linear reaches the attention, the dense
    layer's MLP and the shared experts, and the experts and router come through target_parameters."""
    path = mistral4[1]
    kwargs = dict(r=2, target_modules="all-linear", target_parameters=["gate_up_proj", "down_proj", "gate.weight"],
                  init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_base(path), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    base = torch_logits(_base(path), input_ids=IDS, attention_mask=MASK)
    assert np.abs(ref - base)[MASK == 1].max() > 1e-3
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    _close(model(input_ids=IDS, attention_mask=MASK).logits, ref, LORA_TOL)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**kwargs))
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    assert {"model.model.layers.0.mlp.gate_proj", "model.model.layers.1.mlp.shared_experts.down_proj",
            "model.model.layers.1.mlp.gate", "model.model.layers.1.self_attn.q_a_proj"} <= {n for n, _ in layers}
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_base(path), tmp_path / "ours").eval()
    out = ours(input_ids=IDS, attention_mask=MASK).logits
    _close(out, torch_logits(loaded, input_ids=IDS, attention_mask=MASK), LORA_TOL)
    _close(ours.merge_and_unload()(input_ids=IDS, attention_mask=MASK).logits, out, LORA_TOL)
    with pytest.raises(ValueError, match="no default target_modules for model_type 'mistral4'"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2))


def test_a_rope_without_the_query_scale_fields_is_refused_by_name():
    fields = _tiny.fields("mistral4", rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    with pytest.raises(ValueError, match=r"llama_4_scaling_beta and original_max_position_embeddings; "
                                         r"\['llama_4_scaling_beta', 'original_max_position_embeddings'\] missing"):
        models.Mistral4ForCausalLM.from_config(ModelConfig("mistral4", **fields))
