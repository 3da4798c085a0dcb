"""Granite 4.0 (granitemoehybrid) and Granite MoE with a shared expert (granitemoeshared) against
PyTorch transformers and HF PEFT.

_tiny's Granite 4.0: a Mamba-2 layer, an attention layer, another Mamba-2 layer (named as the Hub
names them), 4 experts top 2 plus the shared expert, every multiplier away from 1, no RoPE, Mamba-2
chunks of 4 tokens so that a 9-token row spans three, 2 groups for 4 heads, biased projections.
transformers runs its PyTorch fallbacks of the Mamba-2 kernels here, the oracle for the scan.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_packed_rows_as_alone,
    assert_all_linear_lora_both_ways,
    jitted,
    lazy,
    padded_batch,
    randomised,
    torch_logits,
)

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr = lazy("torch"), lazy("transformers")
safetensors_torch = lazy("safetensors.torch")

VOCAB = _tiny.FAMILIES["granitemoehybrid"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)


def _pair(tmp_path_factory, family: str, **overrides):
    """(torch model, its checkpoint, ours loaded from it)."""
    torch_class = getattr(tr, _tiny.FAMILIES[family][1])
    torch_model = randomised(torch_class(_tiny.config(family, **overrides)).eval())
    path = tmp_path_factory.mktemp(family)
    torch_model.save_pretrained(path)
    return torch_model, path, models.from_pretrained(path)


@pytest.fixture(scope="module")
def granite4(tmp_path_factory):
    return _pair(tmp_path_factory, "granitemoehybrid")


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_logits_loss_and_router_loss_match_transformers(granite4, left):
    torch_model, _, model = granite4
    assert [layer.layer_type for layer in model.model.layers] == ["linear_attention", "full_attention",
                                                                  "linear_attention"]
    ids, mask = padded_batch(VOCAB, seq=9, left=left)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    if left:  # a pad's prediction of the first token would count: a pad's logits are nobody's
        return
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             labels=torch.tensor(labels), output_router_logits=True)
    inputs = {k: jnp.asarray(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    ours = nnx.jit(lambda m, kw: m(**kw, output_router_logits=True))(model, inputs)
    assert abs(float(ours.aux_loss) - theirs.aux_loss.item()) <= 1e-5
    assert abs(float(ours.loss) - theirs.loss.item()) <= 1e-5
    assert len(ours.router_logits) == 3


def test_generation_packed_rows_and_the_checkpoint_match_transformers(granite4, tmp_path):
    """Greedy generation from left-padded prompts (the Mamba-2 layers' convolution inputs and scan
    state cached, the attention's keys); two sequences packed in one row, the second starting
    inside a chunk, each get the logits transformers gives it alone; ``save_pretrained`` writes the
    Hub's expert names, which transformers loads to the same logits."""
    torch_model, path, model = granite4
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), ref)
    assert [sorted(c) for c in model.init_cache(2, 8)] == [["conv", "ssm"], ["k", "v"], ["conv", "ssm"]]

    assert_packed_rows_as_alone(model, torch_model, TOL)

    model.save_pretrained(tmp_path)
    keys = set(safetensors_torch.load_file(str(tmp_path / "model.safetensors")))
    assert {"model.layers.0.block_sparse_moe.input_linear.weight", "model.layers.0.mamba.A_log",
            "model.layers.0.mamba.conv1d.bias", "model.layers.1.shared_mlp.output_linear.weight"} <= keys
    assert keys == set(safetensors_torch.load_file(str(path / "model.safetensors")))
    reloaded = tr.GraniteMoeHybridForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch(VOCAB, seq=7)
    valid = mask.astype(bool)
    np.testing.assert_allclose(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], atol=0, rtol=0)


def test_every_weight_s_gradient_matches_torch(granite4):
    """Full fine-tuning's gradients (right padding, the router loss in): the Mamba-2 layers' own
    parameters (``A_log``, ``D``, ``dt_bias``, the convolution, the gated norm) through the chunked
    scan, the attention's, the experts' and the shared expert's, against torch's autograd in
    float64 (float32 torch itself is up to 1.2e-5 from it here, peftjax up to 2.1e-5: the scan's
    rounding, three chunks deep)."""
    torch_model, _, model = granite4
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    exact = copy.deepcopy(torch_model).double()
    exact.set_experts_implementation("eager")  # torch's grouped GEMM has no float64
    exact(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
          output_router_logits=True).loss.backward()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(
        input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True).loss))(params)
    ours = models.hf_state_dict(nnx.merge(graphdef, grads, rest))
    theirs = {name: p.grad.numpy() for name, p in exact.named_parameters() if p.grad is not None}
    assert {"model.layers.0.mamba.A_log", "model.layers.2.mamba.norm.weight", "model.layers.0.mamba.dt_bias",
            "model.layers.1.block_sparse_moe.experts.gate_up_proj"} <= set(theirs) <= set(ours)
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, atol=5e-5, rtol=1e-4, err_msg=name)


def test_all_linear_lora_gives_peft_logits_both_ways(granite4, tmp_path):
    """PEFT's all-linear on Granite 4.0: the Mamba-2 layers' ``in_proj``/``out_proj``, the
    attention's projections and the shared expert, both ways; not the convolution, nor the router
    and the experts (PEFT 0.22.0 converts no Granite targets to ``target_parameters``: LoRA on the
    experts is Granite MoE's, ``test_granitemoe.py``)."""
    names = assert_all_linear_lora_both_ways(tr.GraniteMoeHybridForCausalLM, granite4[1], tmp_path, VOCAB, TOL)
    assert {"model.model.layers.0.mamba.in_proj", "model.model.layers.2.mamba.out_proj",
            "model.model.layers.1.self_attn.o_proj", "model.model.layers.1.shared_mlp.input_linear"} <= names
    assert not any(n.endswith("conv1d") for n in names)


@pytest.mark.parametrize("variant", [
    dict(num_local_experts=0, position_embedding_type="rope", mamba_n_groups=1, mamba_proj_bias=False),
    # use_cache off: transformers' cache of Mamba-2 layers alone fails (get_mask_sizes wants an attention layer)
    dict(layer_types=["mamba"] * 3, time_step_limit=(0.05, 0.4), mamba_conv_bias=False, mamba_chunk_size=256,
         use_cache=False),
], ids=["dense-with-rope", "all-mamba-clamped-steps"])
def test_the_dense_release_rope_and_clamped_steps_match_transformers(tmp_path_factory, variant):
    """granite-4.0-h-micro's layout (no experts: the shared expert alone) with RoPE; and a decoder
    of Mamba-2 layers only with the time steps clamped (one chunk longer than the row) and no
    convolution bias, which also scans (its layers alike)."""
    torch_model, path, model = _pair(tmp_path_factory, "granitemoehybrid", **variant)
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
                               ref[valid], **TOL)
    if "time_step_limit" in variant:
        scanned = models.from_pretrained(path, scan_layers=True, remat="full")
        np.testing.assert_allclose(np.asarray(jitted(scanned, input_ids=ids, attention_mask=mask).logits)[valid],
                                   ref[valid], **TOL)
    else:
        assert not hasattr(model.model.layers[0], "block_sparse_moe")
        assert model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss is None


def test_the_config_reads_the_hub_s_names_and_refuses_what_it_cannot_run(granite4, tmp_path):
    """The Hub's ``mamba``/``attention`` layer names, ``mamba_d_head: "auto"`` and the tagged
    infinity of ``time_step_limit`` read as transformers reads them, and written back so; prefix
    tuning is refused (the Mamba-2 layers have no keys), so are scanning mixed layers and heads
    that do not tile the Mamba-2 width."""
    hub = dict(_tiny.fields("granitemoehybrid"), mamba_d_head="auto", layer_types=["attention", "mamba", "mamba"],
               time_step_limit=[0.0, {"__float__": "Infinity"}])
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"model_type": "granitemoehybrid", **hub}))
    ours, theirs = models.load_config(tmp_path), tr.GraniteMoeHybridConfig.from_pretrained(tmp_path)
    for name in ("layer_types", "mamba_d_head", "time_step_limit", "num_key_value_heads"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.layers_block_type == theirs.layers_block_type
    file.write_text(ours.to_json_string())
    assert tr.GraniteMoeHybridConfig.from_pretrained(tmp_path).time_step_limit == (0.0, float("inf"))
    assert '"Infinity"' in file.read_text()

    fields = _tiny.fields("granitemoehybrid")
    with pytest.raises(ValueError, match=r"scan_layers=True needs alike layers; granitemoehybrid's layer_types mix "
                                         r"\['full_attention', 'linear_attention'\]"):
        models.GraniteMoeHybridForCausalLM.from_config(ModelConfig("granitemoehybrid", **fields, scan_layers=True))
    with pytest.raises(ValueError, match=r"mamba_n_heads \(4\) x mamba_d_head \(8\) must be mamba_expand x "
                                         r"hidden_size \(64\)"):
        models.GraniteMoeHybridForCausalLM.from_config(ModelConfig("granitemoehybrid", **{**fields, "mamba_d_head": 8}))
    with pytest.raises(TypeError, match="GraniteMoeHybridForCausalLM does not implement peftjax's prefix attention "
                                        "protocol"):
        peftjax.get_peft_model(granite4[2], peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return _pair(tmp_path_factory, "granitemoeshared")


def test_granite_moe_shared_matches_transformers(shared, tmp_path):
    """Granite MoE with a shared expert: logits (jitted and not), the loss with the router's,
    greedy generation, the Hub's names written back, and transformers' model without the shared
    expert (``shared_intermediate_size`` 0) read as it is."""
    torch_model, path, model = shared
    assert type(model).__name__ == "GraniteMoeSharedForCausalLM"
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
        np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **TOL)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             labels=torch.tensor(labels), output_router_logits=True).loss.item()
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels, output_router_logits=True).loss)
               - theirs) <= 1e-5
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        gen = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), gen)
    model.save_pretrained(tmp_path)
    assert set(safetensors_torch.load_file(str(tmp_path / "model.safetensors"))) == set(
        safetensors_torch.load_file(str(path / "model.safetensors")))

    torch_model = randomised(tr.GraniteMoeSharedForCausalLM(_tiny.config("granitemoeshared",
                                                                         shared_intermediate_size=0)).eval())
    torch_model.save_pretrained(tmp_path / "none")
    ours = models.from_pretrained(tmp_path / "none")
    assert ours.model.layers[0].shared_mlp is None
    np.testing.assert_allclose(np.asarray(jitted(ours, input_ids=ids, attention_mask=mask).logits)[mask == 1],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[mask == 1], **TOL)


def test_granite_moe_shared_lora_on_the_shared_expert_both_ways(shared, tmp_path):
    """PEFT's all-linear on Granite MoE with a shared expert reaches the shared expert's two layers."""
    names = assert_all_linear_lora_both_ways(tr.GraniteMoeSharedForCausalLM, shared[1], tmp_path, VOCAB, TOL)
    assert {"model.model.layers.0.shared_mlp.input_linear", "model.model.layers.1.shared_mlp.output_linear"} <= names
