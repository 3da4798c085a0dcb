"""DeepSeek-V3 against PyTorch transformers and HF PEFT.

_tiny's DeepSeek-V3 (a q LoRA, values narrower than keys, interleaved RoPE, a dense layer then a
sparse one: 8 sigmoid-routed experts in 4 groups, top 3 within the best 2, a shared expert) with a
nonzero ``e_score_correction_bias``; the other branches (``q_proj`` without a q LoRA, RoPE on
halves, YaRN with ``mscale_all_dim``, attention biases, weights not renormalised, every layer
sparse, scanned) on a second model. Logits, loss, both checkpoint layouts, generation, the
classifiers, LoRA both ways with PEFT's MoE target conversion, and the refusals.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import _tiny
from _torch_models import (
    assert_close_where,
    assert_layouts_round_trip,
    assert_long_rows_match_torch,
    jitted,
    lazy,
    moe_conversion,
    padded_batch,
    randomised,
    save_both_layouts,
    save_tiny,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

VOCAB = _tiny.FAMILIES["deepseek_v3"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)  # random 0.3-std weights: logits of ~10, float32 sums
OTHER = dict(q_lora_rank=None, rope_interleave=False, attention_bias=True, norm_topk_prob=False,
             first_k_dense_replace=0, max_position_embeddings=64,
             rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.7,
                              "original_max_position_embeddings": 16, "rope_theta": 10000.0})


def _build(root, **overrides):
    """(torch model, its checkpoint as transformers saves it (per-expert), the fused checkpoint)."""
    torch_model = randomised(tr.DeepseekV3ForCausalLM(_tiny.config("deepseek_v3", **overrides)).eval())
    with torch.no_grad():  # a buffer, not a parameter: randomised leaves it at zero
        for layer in torch_model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8))
    return (torch_model, *save_both_layouts(torch_model, root))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    torch_model, hub, fused = _build(tmp_path_factory.mktemp("deepseek_v3"))
    return torch_model, hub, fused, models.from_pretrained(hub)


def _assert_logits_and_loss(torch_model, model, jit=True):
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    out = jitted(model, input_ids=ids, attention_mask=mask) if jit else model(input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(out.logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - ref.loss.item()) <= 1e-5


def test_logits_and_loss_match_transformers_on_padded_batches(deepseek):
    torch_model, _, _, model = deepseek
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["LlamaMLP", "DeepseekV3MoE"]
    assert np.abs(np.asarray(model.model.layers[1].mlp.gate.e_score_correction_bias[...])).min() > 0
    _assert_logits_and_loss(torch_model, model)


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(deepseek, tmp_path):
    torch_model, hub, fused, model = deepseek
    keys = lambda d: set(lazy("safetensors.torch").load_file(str(d / "model.safetensors")))  # noqa: E731
    assert {"model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.gate.e_score_correction_bias",
            "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"} <= keys(hub)
    assert "model.layers.1.mlp.experts.gate_up_proj" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def test_q_proj_rope_on_halves_yarn_mscale_and_unnormalised_routing_scanned(tmp_path):
    """The other branches, every layer sparse: looped, scanned (with the dense layer, refused), and
    with ``expert_dispatch="grouped"`` (each token through its top 3 only)."""
    torch_model, hub, _ = _build(tmp_path, **OTHER)
    model = models.from_pretrained(hub)
    assert model.model.layers[0].self_attn.q_proj is not None
    _assert_logits_and_loss(torch_model, model, jit=False)
    for options in (dict(scan_layers=True, remat="full"), dict(expert_dispatch="grouped")):
        _assert_logits_and_loss(torch_model, models.from_pretrained(hub, **options))
    with pytest.raises(ValueError, match=r"scan_layers=True needs the same MLP in every layer; layers 0..0 are dense "
                                         r".*first_k_dense_replace=1"):
        models.DeepseekV3ForCausalLM.from_config(ModelConfig("deepseek_v3", **_tiny.fields("deepseek_v3"),
                                                             scan_layers=True))


def test_long_rows_in_causal_blocks_give_transformers_logits_loss_and_every_gradient(tmp_path):
    """390-token rows: attention in blocks of queries (no whole square of scores), the logits, the
    loss and the gradient of every weight (router, experts, latent projections and norms) as torch's
    (transformers' own init: the helper's tolerances are for its logits)."""
    torch.manual_seed(0)
    torch_model = tr.DeepseekV3ForCausalLM(_tiny.config("deepseek_v3")).eval()
    with torch.no_grad():  # the choice of experts by the correction bias
        torch_model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8))
    torch_model.save_pretrained(tmp_path)
    assert_long_rows_match_torch(torch_model, models.from_pretrained(tmp_path), VOCAB)


def test_greedy_generation_matches_transformers(deepseek):
    torch_model, _, _, model = deepseek
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)
    # the cache holds the latent (kv_lora_rank 12) and the rotary key (4) per token, as transformers'
    assert [(c["k"].shape, c["v"].shape) for c in model.init_cache(3, 10)] == [((3, 10, 1, 12), (3, 10, 1, 4))] * 2


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = save_tiny(tr.DeepseekV3ForSequenceClassification, _tiny.config("deepseek_v3", num_labels=3),
                            tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "DeepseekV3ForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=7)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = jitted(model, input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_unsupported_settings_are_refused_by_name(deepseek):
    fields = _tiny.fields("deepseek_v3")
    for extra, match in ((dict(topk_method="greedy"), "topk_method 'greedy' is not supported"),
                         (dict(scoring_func="softmax"), "scoring_func 'softmax' is not supported"),
                         (dict(num_key_value_heads=2), "num_key_value_heads=2 is not supported"),
                         (dict(head_dim=8), r"the RoPE turns 8 dimensions \(head_dim=8 x partial_rotary_factor=1.0\) "
                                           "but qk_rope_head_dim=4"),
                         (dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
                         (dict(topk_group=1, num_experts_per_tok=3), "num_experts_per_tok=3 must be between 1 and "
                                                                     "the 2 experts of topk_group=1"),
                         (dict(rope_parameters={"rope_type": "proportional", "rope_theta": 1.0}),
                          "rope_type 'proportional' is not supported"),
                         (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1.0, "mscale_all_dim": 1.0}),
                          "mscale_all_dim scales the attention by its factor; found no factor")):
        with pytest.raises(ValueError, match=match):
            models.DeepseekV3ForCausalLM.from_config(ModelConfig("deepseek_v3", **{**fields, **extra}))
    with pytest.raises(TypeError, match="DeepseekV3ForCausalLM does not implement peftjax's prefix attention"):
        peftjax.get_peft_model(deepseek[3], peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with warnings.catch_warnings():  # PEFT's prefix (per-head keys) does not fit transformers' latent cache either
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(deepseek[1]), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                       num_virtual_tokens=2))
        with pytest.raises(RuntimeError, match="Sizes of tensors must match"):
            theirs(input_ids=torch.tensor(IDS[:, :3]))


# ---------------------------------------------------------------- LoRA with HF PEFT

IDS, MASK = padded_batch(VOCAB, batch=2, seq=7)


def _peft_base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.DeepseekV3ForCausalLM.from_pretrained(path).eval()


def _close(ours, theirs):
    assert_close_where(ours, theirs, MASK, **TOL)


def _changed(logits, path) -> float:
    valid = MASK.astype(bool)
    return float(np.abs(np.asarray(logits)[valid] - torch_logits(_peft_base(path), input_ids=IDS,
                                                                  attention_mask=MASK)[valid]).max())


_converted = moe_conversion


def test_all_linear_lora_on_latent_attention_router_and_experts_both_ways(deepseek, tmp_path):
    """PEFT turns all-linear into LoRA on the five attention projections, the router and the fused
    experts, and keeps it on the dense layer's and the shared experts' MLPs (named as the experts
    were: PEFT 0.21.2 moved those to the experts too):
    its adapter gives its logits here; the same config made here converts, targets and saves as
    PEFT's, and PEFT loading it gives the logits it gives here."""
    path = deepseek[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(path), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                        init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert _changed(ref, path) > 1e-3
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    _close(jitted(model.base_model, input_ids=IDS, attention_mask=MASK).logits, ref)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules="all-linear", init_lora_weights=False))
    assert _converted(ours.peft_config["default"]) == _converted(theirs.peft_config["default"])
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    names = {name for name, _ in layers}
    assert {"model.model.layers.0.self_attn.kv_b_proj", "model.model.layers.1.mlp.gate",
            "model.model.layers.1.mlp.experts"} <= names
    assert {"model.model.layers.0.mlp.down_proj", "model.model.layers.1.mlp.shared_experts.down_proj"} <= names
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_peft_base(path), tmp_path / "ours").eval()
    out = ours(input_ids=IDS, attention_mask=MASK).logits
    _close(out, torch_logits(loaded, input_ids=IDS, attention_mask=MASK))
    assert _changed(out, path) > 1e-3


def test_lora_trained_here_loads_in_peft_and_merges_for_transformers(deepseek, tmp_path):
    path = deepseek[1]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, lora_alpha=4, task_type="CAUSAL_LM",
        target_modules=["q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    config = model.peft_config["default"]
    assert (set(config.target_modules), set(config.target_parameters), config.rank_pattern) == (
        {"q_b_proj", "kv_a_proj_with_mqa", "o_proj", "gate_proj", "up_proj", "down_proj"},
        {"gate_up_proj", "down_proj"}, {r".*\.gate_up_proj": 4})  # the dense and shared MLPs keep theirs
    losses = _tiny.train(model, _tiny.batch(IDS, MASK), steps=3).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    ours = model(input_ids=IDS, attention_mask=MASK).logits
    assert _changed(ours, path) > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_peft_base(path), tmp_path).eval()
    _close(ours, torch_logits(theirs, input_ids=IDS, attention_mask=MASK))
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    _close(ours, torch_logits(_peft_base(tmp_path / "merged"), input_ids=IDS, attention_mask=MASK))
    with warnings.catch_warnings():  # no default targets on either side
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(_peft_base(path), peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="needs target_modules or target_parameters"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2))
