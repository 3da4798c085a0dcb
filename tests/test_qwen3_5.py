"""Qwen3.5's text models (``qwen3_5_text``, ``qwen3_5_moe_text``) against transformers and HF PEFT.

The oracle is transformers' model on the same weights, with its PyTorch fallbacks of the Gated
DeltaNet kernels (``torch_chunk_gated_delta_rule``, ``torch_recurrent_gated_delta_rule``, the
causal convolution): the kernels alone, then the logits and loss of batches longer than one
delta-rule chunk (64) padded on either side (jitted, and eagerly once), greedy generation (the
recurrent state and the convolution's inputs in the cache), the classifiers, and a LoRA adapter
on the linear attention's and the full attention's projections: PEFT's loaded here with PEFT's
gradients, and peftjax's loaded by PEFT; full fine-tuning's weight gradients. The MoE model: logits, loss with the
load-balancing term, router logits, generation, both expert layouts, LoRA all-linear both ways.
Both read from a vision-language checkpoint (the Hub's releases). The dense model's LoRA
all-linear and prompt tuning with PEFT: test_family_methods.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    jitted,
    lazy,
    padded_batch,
    randomised,
    save_both_layouts,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models._config import read_config
from peftjax.nn._delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")
qwen3_5 = lazy("transformers.models.qwen3_5.modeling_qwen3_5")

VOCAB = _tiny.FAMILIES["qwen3_5_text"][2]["vocab_size"]
SEQ = 70  # past one chunk of the delta rule (64): the state crosses a chunk boundary
# Weights drawn at 0.2 std give logits of ~5; over 70 tokens transformers' own float32 logits stand
# 9e-5 from its float64 ones on this batch, ours 4e-5 from its float32 ones: rounding, not math
TOL = dict(atol=1e-4, rtol=1e-5)
LORA_TARGETS = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj", "q_proj", "v_proj"]


def _randomised(torch_model):
    """Every weight drawn anew; the norms that multiply by ``1 + weight`` centred on 0 (the gated
    one, which multiplies by its weight, on 1)."""
    randomised(torch_model, scale=0.2)
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if "norm" in name and "linear_attn.norm" not in name:
                p.sub_(1.0)
    return torch_model.eval()


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(torch causal LM, its checkpoint, ours)."""
    root = tmp_path_factory.mktemp("qwen3_5")
    torch_model = _randomised(tr.Qwen3_5ForCausalLM(_tiny.config("qwen3_5_text")))
    torch_model.save_pretrained(root)
    return torch_model, root, models.from_pretrained(root)


def _delta_rule_inputs(seed: int, b: int = 2, s: int = 70) -> tuple[np.ndarray, ...]:
    """``(q, k, v, g, beta, state)``: 2 key heads serving 4 value heads, a decay <= 0, a starting state."""
    rng = np.random.RandomState(seed)
    hk, hv, dk, dv = 2, 4, 8, 6
    q, k = rng.randn(b, s, hk, dk).astype(np.float32), rng.randn(b, s, hk, dk).astype(np.float32)
    v = rng.randn(b, s, hv, dv).astype(np.float32)
    g = -np.abs(rng.randn(b, s, hv)).astype(np.float32)
    beta = (1 / (1 + np.exp(-rng.randn(b, s, hv)))).astype(np.float32)
    return q, k, v, g, beta, rng.randn(b, hv, dk, dv).astype(np.float32)


def test_delta_rule_kernels_match_transformers():
    """Chunked (two chunks, a starting state, value heads sharing key heads) and recurrent."""
    q, k, v, g, beta, state = _delta_rule_inputs(0)
    t = [torch.tensor(x) for x in (q, k, v, g, beta, state)]
    ref_out, ref_state = qwen3_5.torch_chunk_gated_delta_rule(
        *t[:3], g=t[3], beta=t[4], initial_state=t[5], output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, final = jax.jit(chunk_gated_delta_rule)(q, k, v, g, beta, state)
    np.testing.assert_allclose(np.asarray(out), ref_out.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final), ref_state.numpy(), atol=1e-5, rtol=1e-5)
    ref_out, ref_state = qwen3_5.torch_recurrent_gated_delta_rule(
        *[x[:, :3] for x in t[:5]][:3], g=t[3][:, :3], beta=t[4][:, :3], initial_state=t[5], output_final_state=True,
        use_qk_l2norm_in_kernel=True)
    out, final = recurrent_gated_delta_rule(q[:, :3], k[:, :3], v[:, :3], g[:, :3], beta[:, :3], state)
    np.testing.assert_allclose(np.asarray(out), ref_out.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(final), ref_state.numpy(), atol=1e-5, rtol=1e-5)


def test_packed_rows_run_each_sequence_from_zeros_as_transformers_kernels_run_it_alone():
    """``segment_ids``: the chunked rule (chunks of 8 here: sequences across chunk boundaries and
    starting on one) and the causal convolution give each packed sequence what transformers'
    kernels give it alone, from a zero state (the given state reaches a row's first sequence)."""
    from peftjax.nn._delta_rule import causal_depthwise_conv

    q, k, v, g, beta, state = _delta_rule_inputs(1)
    rng = np.random.RandomState(2)
    lengths = [[3, 13, 8, 20, 1, 25], [40, 30]]  # boundaries at 16 and 24 start chunks of 8
    segments = np.stack([np.repeat(np.arange(1, len(n) + 1), n) for n in lengths])
    out, _ = jax.jit(chunk_gated_delta_rule, static_argnames="chunk_size")(q, k, v, g, beta, state, chunk_size=8,
                                                                          segment_ids=segments)
    x = rng.randn(2, 70, 12).astype(np.float32)
    weight = rng.randn(12, 1, 4).astype(np.float32)
    conv, _ = causal_depthwise_conv(jnp.asarray(x), jnp.asarray(weight), segment_ids=segments)
    for row, ns in enumerate(lengths):
        for i, (start, n) in enumerate(zip(np.cumsum([0, *ns[:-1]]), ns)):
            piece = slice(start, start + n)
            t = [torch.tensor(a[row:row + 1, piece]) for a in (q, k, v, g, beta)]
            initial = torch.tensor(state[row:row + 1]) if i == 0 else None
            alone, _ = qwen3_5.torch_chunk_gated_delta_rule(*t[:3], g=t[3], beta=t[4], initial_state=initial,
                                                           use_qk_l2norm_in_kernel=True)
            np.testing.assert_allclose(np.asarray(out)[row, piece], alone[0].numpy(), atol=1e-5, rtol=1e-5)
            alone = torch.nn.functional.conv1d(torch.tensor(x[row:row + 1, piece]).transpose(1, 2),
                                               torch.tensor(weight), padding=3, groups=12)[..., :n]
            np.testing.assert_allclose(np.asarray(conv)[row, piece], alone[0].T.numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_logits_and_loss_match_transformers_past_one_chunk(qwen, left):
    torch_model, _, model = qwen
    assert type(model).__name__ == "Qwen3_5ForCausalLM"
    assert [type(getattr(layer, "linear_attn", getattr(layer, "self_attn", None))).__name__
            for layer in model.model.layers] == ["Qwen3_5GatedDeltaNet", "Qwen3_5Attention"]
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=left)
    labels = np.where(mask == 1, ids, -100)
    # a left-padded row's first token is predicted from a padding position, whose logits (a query
    # that sees no key) no one compares: its label out
    labels[np.arange(len(ids)), mask.argmax(axis=1)] = -100
    valid = mask.astype(bool)
    out = jitted(model, input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], **TOL)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    if left:  # and the eager forward (5 s of op-by-op compilation: once)
        eager = model(input_ids=ids, attention_mask=mask)
        np.testing.assert_allclose(np.asarray(eager.logits)[valid], ref.logits.numpy()[valid], **TOL)


def test_greedy_generation_matches_transformers(qwen):
    """Left-padded prompts: the prefill fills the recurrent state and the convolution's inputs
    (padding zeroed), then each token steps the recurrent rule."""
    torch_model, _, model = qwen
    ids, mask = padded_batch(VOCAB, seq=6)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)


def test_lora_on_both_attentions_gives_peft_logits_and_gradients_both_ways(qwen, tmp_path):
    """PEFT's LoRA (moved off its start) on every projection of the linear attention and on the
    full attention's q/v: loaded here, PEFT's logits, loss and LoRA gradients; made here, moved,
    saved and loaded by PEFT: peftjax's logits."""
    torch_model, root, _ = qwen
    config = dict(r=2, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=False)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tr.Qwen3_5ForCausalLM.from_pretrained(root), peft.LoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    labels = np.where(mask == 1, ids, -100)
    valid = mask.astype(bool)
    ref = theirs(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref.loss.backward()

    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(root), tmp_path / "peft", is_trainable=True)
    graphdef, adapters, base = peftjax.split(ours.base_model)

    def loss(adapters):
        out = nnx.merge(graphdef, adapters, base)(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out.logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
    np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.detach().numpy()[valid], **TOL)
    assert abs(float(value) - ref.loss.item()) <= 1e-5
    flat = list(nnx.to_flat_state(grads))
    assert {p[3] for p, _ in flat} == {"linear_attn", "self_attn"} and len(flat) == 2 * 7
    for path, grad in flat:
        name = "base_model.model." + ".".join(str(p) for p in path) + ".weight"
        their_grad = theirs.get_parameter(name).grad.numpy().T
        assert np.isfinite(np.asarray(grad[...])).all()
        np.testing.assert_allclose(np.asarray(grad[...]), their_grad, atol=2e-5, rtol=1e-4, err_msg=name)
    base = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    assert np.abs(ref.logits.detach().numpy() - base).max() > 1e-2  # the adapter shows

    here = peftjax.get_peft_model(models.from_pretrained(root), peftjax.LoraConfig(**config), key=jax.random.key(1))
    _, made, _ = peftjax.split(here.base_model)
    rng = np.random.RandomState(2)
    here.update(jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape)
                                                   .astype(x.dtype)), made))
    here.save_pretrained(tmp_path / "here")
    loaded = peft.PeftModel.from_pretrained(tr.Qwen3_5ForCausalLM.from_pretrained(root), tmp_path / "here").eval()
    out = np.asarray(jitted(here.base_model, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(loaded, input_ids=ids, attention_mask=mask)[valid], **TOL)


@pytest.mark.parametrize("class_name", ["Qwen3_5TextForSequenceClassification", "Qwen3_5ForTokenClassification"])
def test_classifiers_match_transformers(qwen, class_name, tmp_path):
    """From the causal LM's checkpoint plus a head, both saved by transformers."""
    torch_model, _, _ = qwen
    cls = getattr(tr, class_name)
    classifier = cls(_tiny.config("qwen3_5_text", num_labels=3)).eval()
    classifier.model.load_state_dict(torch_model.model.state_dict())
    classifier.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == class_name
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    ref = torch_logits(classifier, input_ids=ids, attention_mask=mask)
    out = np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)
    if class_name.endswith("TokenClassification"):
        out, ref = out[mask == 1], ref[mask == 1]
    np.testing.assert_allclose(out, ref, **TOL)


def test_each_task_type_picks_the_family_s_class(qwen):
    """From the causal LM's checkpoint: the sequence classifier's name spells the model_type with
    underscores (``Qwen3_5TextFor...``), the token classifier's not (``Qwen3_5For...``)."""
    _, root, _ = qwen
    for task, name in (("SEQ_CLS", "Qwen3_5TextForSequenceClassification"),
                       ("TOKEN_CLS", "Qwen3_5ForTokenClassification"), ("CAUSAL_LM", "Qwen3_5ForCausalLM")):
        config = models.load_config(root, num_labels=3)
        assert models.model_class_for(config, task).__name__ == name
    with pytest.raises(ValueError, match="no bundled QUESTION_ANS model for model_type 'qwen3_5_text'"):
        models.model_class_for(models.load_config(root), "QUESTION_ANS")


def test_unsupported_settings_are_refused(qwen, tmp_path):
    _, root, model = qwen
    with pytest.raises(ValueError, match="scan_layers=True needs alike layers"):
        models.from_pretrained(root, scan_layers=True)
    with pytest.raises(ValueError, match=r"layer_types \['sliding_attention'\]"):
        models.Qwen3_5ForCausalLM(_tiny.config("qwen3_5_text", layer_types=["linear_attention", "sliding_attention"]),
                                  rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="'qwen3_5' config needs its text_config"):
        read_config({"model_type": "qwen3_5", "vision_config": {}})
    with pytest.raises(TypeError, match="prefix attention protocol"):
        peftjax.get_peft_model(model, peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


def test_config_derives_layer_types_and_partial_rope_as_transformers():
    """``full_attention_interval`` (an argument of ``Qwen3_5TextConfig``, not a field) and the
    default quarter of each head turned, without importing transformers' config."""
    from peftjax.models._rope import rope_parameters

    ours = models.ModelConfig("qwen3_5_text", num_hidden_layers=6, full_attention_interval=3)
    theirs = tr.Qwen3_5TextConfig(num_hidden_layers=6, full_attention_interval=3)
    assert ours.layer_types == theirs.layer_types == ["linear_attention", "linear_attention", "full_attention"] * 2
    assert rope_parameters(ours) == rope_parameters(theirs) and rope_parameters(ours)["partial_rotary_factor"] == 0.25
    assert not ours.has_field("full_attention_interval")


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """(torch MoE causal LM, its checkpoint (per-expert, as transformers saves it), the fused one, ours)."""
    root = tmp_path_factory.mktemp("qwen3_5_moe")
    torch_model = _randomised(tr.Qwen3_5MoeForCausalLM(_tiny.config("qwen3_5_moe_text")))
    hub, fused = save_both_layouts(torch_model, root)
    return torch_model, hub, fused, models.from_pretrained(hub)


def test_moe_logits_loss_router_and_generation_match_transformers(moe, tmp_path):
    torch_model, hub, fused, model = moe
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM" and model.model.sparse_layers == 2
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Qwen3_5MoeSparseMoeBlock"] * 2
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    labels = np.where(mask == 1, ids, -100)
    valid = mask.astype(bool)
    out = nnx.jit(lambda m, kw: m(**kw, output_router_logits=True))(
        model, {k: jnp.asarray(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()})
    t = {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    with torch.no_grad():
        ref = torch_model(**t, output_router_logits=True)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.numpy()[valid], **TOL)
    assert abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5 and abs(float(out.loss) - ref.loss.item()) <= 1e-5
    assert len(out.router_logits) == len(ref.router_logits) == 2
    for a, b in zip(out.router_logits, ref.router_logits):
        np.testing.assert_allclose(np.asarray(a)[valid.reshape(-1)], b.numpy()[valid.reshape(-1)], **TOL)
    ids, mask = padded_batch(VOCAB, seq=6)
    with torch.no_grad():
        generated = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                         max_new_tokens=5, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), generated)
    # both expert layouts load to transformers' state dict; save_pretrained writes transformers' keys
    ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for loaded in (model, models.from_pretrained(fused)):
        ours = models.hf_state_dict(loaded)
        assert set(ours) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    model.save_pretrained(tmp_path)
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert keys(tmp_path) == keys(hub) and "model.layers.0.mlp.experts.3.up_proj.weight" in keys(hub)
    reloaded = tr.Qwen3_5MoeForCausalLM.from_pretrained(tmp_path).eval()
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[mask == 1],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[mask == 1], atol=1e-6)


def test_moe_lora_all_linear_gives_peft_logits_both_ways(moe, tmp_path):
    """PEFT converts no MoE targets for this model type (transformers maps it to qwen3_5_text's
    pattern, for which PEFT has no table): ``all-linear`` reaches both attentions, the shared
    expert and its gate, here as in PEFT. At TOL, not test_family_methods' 1e-5: on its 9-token
    batch (init 0.05) one token's float32 logits from transformers stand 2.0e-5 from its float64
    ones (eager experts), ours 6.7e-6."""
    torch_model, hub, _, _ = moe
    config = dict(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    valid = mask.astype(bool)
    torch.manual_seed(0)
    theirs = peft.get_peft_model(tr.Qwen3_5MoeForCausalLM.from_pretrained(hub), peft.LoraConfig(**config)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(hub), tmp_path / "peft")
    assert {s.name for s in ours.get_layer_status()} == {s.name for s in theirs.get_layer_status()}
    assert any("shared_expert_gate" in s.name for s in ours.get_layer_status())
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(jitted(ours.base_model, input_ids=ids, attention_mask=mask).logits)[valid],
                               ref[valid], **TOL)
    assert np.abs(ref - torch_logits(torch_model, input_ids=ids, attention_mask=mask)).max() > 1e-2

    here = peftjax.get_peft_model(models.from_pretrained(hub), peftjax.LoraConfig(**config), key=jax.random.key(1))
    _, made, _ = peftjax.split(here.base_model)
    rng = np.random.RandomState(2)
    here.update(jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape)
                                                   .astype(x.dtype)), made))
    here.save_pretrained(tmp_path / "here")
    loaded = peft.PeftModel.from_pretrained(tr.Qwen3_5MoeForCausalLM.from_pretrained(hub), tmp_path / "here").eval()
    out = np.asarray(jitted(here.base_model, input_ids=ids, attention_mask=mask).logits)
    np.testing.assert_allclose(out[valid], torch_logits(loaded, input_ids=ids, attention_mask=mask)[valid], **TOL)


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_5_moe_text"])
def test_a_vision_language_checkpoint_loads_its_text_model_as_transformers_does(family, tmp_path):
    """The Hub's Qwen3.5 releases are vision-language checkpoints (``model_type`` ``qwen3_5``, the
    text model's config under ``text_config``, its weights under ``model.language_model``):
    peftjax reads the text model as transformers' ``Qwen3_5ForCausalLM.from_pretrained`` does,
    and writes it back as a text checkpoint transformers reads."""
    moe = family == "qwen3_5_moe_text"
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=32)
    config = (tr.Qwen3_5MoeConfig if moe else tr.Qwen3_5Config)(text_config=_tiny.fields(family),
                                                                 vision_config=vision)
    torch.manual_seed(0)
    full = (tr.Qwen3_5MoeForConditionalGeneration if moe else tr.Qwen3_5ForConditionalGeneration)(config)
    _randomised(full).save_pretrained(tmp_path / "vl")
    text_class = tr.Qwen3_5MoeForCausalLM if moe else tr.Qwen3_5ForCausalLM
    theirs = text_class.from_pretrained(tmp_path / "vl").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the vision tower is skipped silently, as transformers skips it
        ours = models.from_pretrained(tmp_path / "vl")
    assert type(ours).__name__ == text_class.__name__ and ours.config.model_type == family
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(jitted(ours, input_ids=ids, attention_mask=mask).logits)[valid],
                               ref[valid], **TOL)
    ours.save_pretrained(tmp_path / "text")
    back = text_class.from_pretrained(tmp_path / "text").eval()
    np.testing.assert_allclose(torch_logits(back, input_ids=ids, attention_mask=mask)[valid], ref[valid], atol=1e-6)


def test_weight_gradients_match_torch(qwen):
    """Full fine-tuning's gradients (right padding, over one chunk): the linear attention's own
    parameters (the decay's ``A_log`` and ``dt_bias``, the convolution, the gated norm) and the
    gated attention's, as torch's autograd gives them."""
    torch_model, _, model = qwen
    ids, mask = padded_batch(VOCAB, seq=SEQ, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    t = {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    torch_model(**t).loss.backward()
    grads = nnx.jit(nnx.grad(lambda m: m(input_ids=ids, attention_mask=mask, labels=labels).loss))(model)
    linear, full = grads.model.layers[0].linear_attn, grads.model.layers[1].self_attn
    for name, ours in (("0.linear_attn.A_log", linear.A_log), ("0.linear_attn.dt_bias", linear.dt_bias),
                       ("0.linear_attn.conv1d.weight", linear.conv1d.weight),
                       ("0.linear_attn.norm.weight", linear.norm.scale),
                       ("0.linear_attn.in_proj_a.weight", linear.in_proj_a.kernel),
                       ("1.self_attn.q_proj.weight", full.q_proj.kernel),
                       ("1.self_attn.q_norm.weight", full.q_norm.scale)):
        theirs = torch_model.get_parameter(f"model.layers.{name}").grad.numpy()
        value = np.asarray(ours[...])
        np.testing.assert_allclose(value.T if value.ndim == 2 else value, theirs, atol=2e-5, rtol=1e-4, err_msg=name)
    torch_model.zero_grad(set_to_none=True)
