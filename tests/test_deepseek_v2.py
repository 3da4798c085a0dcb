"""DeepSeek-V2 against PyTorch transformers and HF PEFT.

_tiny's DeepSeek-V2 (V3's latent attention with a q LoRA and interleaved RoPE, a dense layer then a
sparse one: 8 softmax-routed experts in 4 groups, top 3 within the 2 groups of the best scores,
scaled, two shared experts); V2-Lite's branches (``q_proj`` without a q LoRA, greedy routing over
all experts, YaRN with ``mscale_all_dim``, every layer sparse) on a second model. Logits, loss,
both checkpoint layouts, generation, the classifier, LoRA both ways with PEFT's MoE target
conversion, and the refusals.
"""

from __future__ import annotations


import numpy as np
import pytest

import _tiny
from _torch_models import (
    assert_all_linear_lora_both_ways,
    assert_layouts_round_trip,
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
    save_tiny,
    torch_logits,
)

from peftjax import models
from peftjax.models import ModelConfig

torch, tr = lazy("torch"), lazy("transformers")

VOCAB = _tiny.FAMILIES["deepseek_v2"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)  # random 0.3-std weights: logits of ~10, float32 sums
# DeepSeek-V2-Lite's layout: no q LoRA, greedy routing over all experts, YaRN with mscale_all_dim
LITE = dict(q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1, num_experts_per_tok=2,
            first_k_dense_replace=0, routed_scaling_factor=1.0, max_position_embeddings=64,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                             "original_max_position_embeddings": 16, "rope_theta": 10000.0})


def _build(root, **overrides):
    """(torch model, its checkpoint as transformers saves it (per-expert), the fused checkpoint)."""
    torch_model = randomised(tr.DeepseekV2ForCausalLM(_tiny.config("deepseek_v2", **overrides)).eval())
    return (torch_model, *save_both_layouts(torch_model, root))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    torch_model, hub, fused = _build(tmp_path_factory.mktemp("deepseek_v2"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def _assert_logits_and_loss(torch_model, model, jit=True, tol=TOL):
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    out = jitted(model, input_ids=ids, attention_mask=mask) if jit else model(input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(out.logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **tol)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - ref.loss.item()) <= 1e-5


def test_logits_loss_checkpoints_and_generation_match_transformers(deepseek, tmp_path):
    """Routing by groups: logits and loss; both checkpoint layouts load and ``save_pretrained``
    writes transformers' per-expert one; greedy generation through the latent cache."""
    torch_model, hub, fused, model = deepseek
    assert type(model).__name__ == "DeepseekV2ForCausalLM"
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["LlamaMLP", "DeepseekV2MoE"]
    _assert_logits_and_loss(torch_model, model)
    keys = lambda d: set(lazy("safetensors.torch").load_file(str(d / "model.safetensors")))  # noqa: E731
    assert {"model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"} <= keys(hub)
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)


def test_v2_lite_s_greedy_routing_q_proj_and_yarn_scanned_and_grouped(tmp_path):
    """V2-Lite's layout, every layer sparse: looped, scanned, and with ``expert_dispatch="grouped"``
    (each token through its top 2 only)."""
    torch_model, hub, _ = _build(tmp_path, **LITE)
    model = models.from_pretrained(hub)
    assert model.model.layers[0].self_attn.q_proj is not None
    # YaRN's scaled rotations: up to 1.3e-5 from torch's float32 logits here (the suite's -O0 XLA), where
    # torch's own float32 run is 1.9e-5 from its float64 one and ours 1.4e-5 (measured 2026-12-07)
    tol = dict(atol=3e-5, rtol=1e-5)
    _assert_logits_and_loss(torch_model, model, jit=False, tol=tol)
    for options in (dict(scan_layers=True), dict(expert_dispatch="grouped")):
        _assert_logits_and_loss(torch_model, models.from_pretrained(hub, **options), tol=tol)


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = save_tiny(tr.DeepseekV2ForSequenceClassification, _tiny.config("deepseek_v2", num_labels=3),
                            tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "DeepseekV2ForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=7)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = jitted(model, input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_unsupported_settings_are_refused_by_name():
    fields = _tiny.fields("deepseek_v2")
    for extra, match in ((dict(topk_method="noaux_tc"), "topk_method 'noaux_tc' is not supported"),
                         (dict(scoring_func="sigmoid"), "scoring_func 'sigmoid' is not supported"),
                         (dict(moe_layer_freq=2), "moe_layer_freq=2 is not supported"),
                         (dict(num_key_value_heads=2), "num_key_value_heads=2 is not supported"),
                         (dict(n_group=3), "'group_limited_greedy': n_group=3 must divide n_routed_experts=8"),
                         (dict(topk_group=1, num_experts_per_tok=3), "num_experts_per_tok=3 must be between 1 and "
                                                                     "the 2 experts of topk_group=1"),
                         (dict(topk_method="greedy", num_experts_per_tok=None),
                          "num_experts_per_tok=None must be between 1 and n_routed_experts=8")):
        with pytest.raises(ValueError, match=match):
            models.DeepseekV2ForCausalLM.from_config(ModelConfig("deepseek_v2", **{**fields, **extra}))


def test_all_linear_lora_on_latent_attention_router_and_experts_both_ways(deepseek, tmp_path):
    """PEFT turns all-linear into LoRA on the attention projections, the router and the fused experts
    (and the dense layer's and the shared experts' MLPs, as for V3), both ways. A random LoRA on every
    linear moves the logits of ~10 further: 1.3e-5 seen."""
    names = assert_all_linear_lora_both_ways(tr.DeepseekV2ForCausalLM, deepseek[1], tmp_path, VOCAB,
                                             dict(atol=3e-5, rtol=1e-5))
    assert {"model.model.layers.0.self_attn.kv_b_proj", "model.model.layers.1.mlp.gate",
            "model.model.layers.1.mlp.experts", "model.model.layers.0.mlp.down_proj",
            "model.model.layers.1.mlp.shared_experts.up_proj"} <= names
