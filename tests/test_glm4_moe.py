"""GLM-4.5's MoE (glm4_moe) and GLM-4.5 Lite (glm4_moe_lite) against PyTorch transformers and HF PEFT.

_tiny's GLM-4.5 (biased q/k/v, q/k norms, RoPE on half of each head, a dense layer then a sparse
one: 8 sigmoid-routed experts in 2 groups, top 3 within the best 1, a shared expert) and GLM-4.5
Lite (latent attention; dense, sparse, dense layers by ``mlp_layer_types``) with a nonzero
``e_score_correction_bias``, on left-padded rows: logits and loss, greedy generation, LoRA both
ways with PEFT's MoE target conversion, and the refusals.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import _tiny
from _torch_models import assert_close_where, jitted, lazy, padded_batch, randomised, torch_logits

import peftjax
from peftjax import models
from peftjax.models import ModelConfig

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")

VOCAB = _tiny.FAMILIES["glm4_moe"][2]["vocab_size"]
CLASSES = {"glm4_moe": "Glm4MoeForCausalLM", "glm4_moe_lite": "Glm4MoeLiteForCausalLM"}
# random 0.3-std weights: logits of ~10, float32 sums whose rounding depends on the host's kernels
# (1.7e-5 apart on an Intel AVX-512/AMX host)
TOL = dict(atol=5e-5, rtol=1e-5)
IDS, MASK = padded_batch(VOCAB, batch=3, seq=7)


@pytest.fixture(scope="module", params=sorted(CLASSES))
def glm(request, tmp_path_factory):
    """(torch model, its checkpoint as transformers saves it, peftjax's model of it)."""
    root = tmp_path_factory.mktemp(request.param)
    torch_model = randomised(getattr(tr, CLASSES[request.param])(_tiny.config(request.param)).eval())
    with torch.no_grad():  # a buffer, not a parameter: randomised leaves it at zero
        torch_model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(0.3 * torch.randn(8))
    torch_model.save_pretrained(root)
    return torch_model, root, models.from_pretrained(root)


def _close(ours, theirs):
    assert_close_where(ours, theirs, MASK, **TOL)


@pytest.mark.parametrize("jit", [True, False])
def test_logits_and_loss_match_transformers_on_a_padded_batch(glm, jit):
    torch_model, _, model = glm
    assert type(model).__name__ == type(torch_model).__name__
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    if torch_model.config.model_type == "glm4_moe":
        assert kinds == ["LlamaMLP", "DeepseekV3MoE"]
        attention = model.model.layers[0].self_attn
        assert attention.q_norm is not None and attention.k_proj.bias is not None and attention.o_proj.bias is None
    else:  # mlp_layer_types: dense, sparse, dense
        assert kinds == ["LlamaMLP", "DeepseekV3MoE", "LlamaMLP"]
    assert np.abs(np.asarray(model.model.layers[1].mlp.gate.e_score_correction_bias[...])).min() > 0
    out = (jitted(model, input_ids=IDS, attention_mask=MASK) if jit
           else model(input_ids=IDS, attention_mask=MASK))
    _close(out.logits, torch_logits(torch_model, input_ids=IDS, attention_mask=MASK))
    ids, mask = padded_batch(VOCAB, batch=3, seq=7, left=False)  # a left pad's logits would predict a first token
    labels = np.where(mask == 1, ids, -100)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    assert abs(float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) - ref.loss.item()) <= 1e-5


def test_greedy_generation_matches_transformers(glm):
    torch_model, _, model = glm
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=4)), ref)


def _peft_base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.AutoModelForCausalLM.from_pretrained(path).eval()


def test_all_linear_lora_on_attention_router_and_experts_both_ways(glm, tmp_path):
    """PEFT turns all-linear into LoRA on the attention, the router and the fused experts, and keeps
    it on the dense layers' and the shared experts' MLPs (named as the experts were: PEFT 0.21.2
    moved them): its adapter
    gives its logits here; the same config made here converts, targets and saves as PEFT's, and
    PEFT loading it gives the logits it gives here."""
    _, path, _ = glm
    base = torch_logits(_peft_base(path), input_ids=IDS, attention_mask=MASK)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(path), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                        init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert np.abs(ref - base)[MASK.astype(bool)].max() > 1e-3
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    _close(jitted(model.base_model, input_ids=IDS, attention_mask=MASK).logits, ref)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules="all-linear", init_lora_weights=False))
    converted = lambda c: (set(c.target_modules), set(c.target_parameters))  # noqa: E731
    assert converted(ours.peft_config["default"]) == converted(theirs.peft_config["default"])
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    names = {name for name, _ in layers}
    assert {"model.model.layers.0.self_attn.q_proj", "model.model.layers.1.mlp.gate",
            "model.model.layers.1.mlp.experts"} <= names
    assert {"model.model.layers.0.mlp.gate_proj", "model.model.layers.1.mlp.shared_experts.down_proj"} <= names
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_peft_base(path), tmp_path / "ours").eval()
    out = ours(input_ids=IDS, attention_mask=MASK).logits
    _close(out, torch_logits(loaded, input_ids=IDS, attention_mask=MASK))
    assert np.abs(np.asarray(out) - base)[MASK.astype(bool)].max() > 1e-3


def test_unsupported_settings_are_refused_by_name():
    fields = _tiny.fields("glm4_moe")
    for extra, match in ((dict(n_group=3), "n_group=3 must divide n_routed_experts=8"),
                         (dict(topk_group=3), "topk_group=3 must be between 1 and n_group=2"),
                         (dict(num_experts_per_tok=5), "num_experts_per_tok=5 must be between 1 and the 4 experts"),
                         (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
                         (dict(scan_layers=True), r"scan_layers=True needs the same MLP in every layer")):
        with pytest.raises(ValueError, match=match):
            models.Glm4MoeForCausalLM.from_config(ModelConfig("glm4_moe", **{**fields, **extra}))


def test_the_hubs_multi_token_prediction_layer_is_ignored_with_a_warning(glm, tmp_path):
    """GLM-4.5's files carry one more layer (``model.layers.{num_hidden_layers}``, with ``eh_proj``,
    ``enorm``...), which transformers' model ignores on load, as here (named in a warning)."""
    torch_model, path, _ = glm
    n = torch_model.config.num_hidden_layers
    st = lazy("safetensors.torch")
    tensors = st.load_file(str(path / "model.safetensors"))
    tensors.update({k.replace("layers.1.", f"layers.{n}."): v.clone() for k, v in tensors.items() if ".layers.1." in k})
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(32, 64)
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    st.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.warns(UserWarning, match=rf"ignored \d+ unexpected keys: \['model.layers.{n}.eh_proj.weight'"):
        model = models.from_pretrained(tmp_path)
    _close(model(input_ids=IDS, attention_mask=MASK).logits, torch_logits(torch_model, input_ids=IDS,
                                                                          attention_mask=MASK))


def test_no_qk_norm_no_biases_one_group_unnormalised_weights_match_transformers(tmp_path):
    """The other branches (GLM-4.5-Air's and GLM-4.6's settings but for the norms), non-jitted."""
    torch_model = randomised(tr.Glm4MoeForCausalLM(_tiny.config(
        "glm4_moe", use_qk_norm=False, attention_bias=False, n_group=1, topk_group=1, norm_topk_prob=False)).eval())
    torch_model.save_pretrained(tmp_path)
    model = models.from_pretrained(tmp_path)
    attention = model.model.layers[0].self_attn
    assert attention.q_norm is None and attention.q_proj.bias is None
    _close(model(input_ids=IDS, attention_mask=MASK).logits, torch_logits(torch_model, input_ids=IDS,
                                                                          attention_mask=MASK))


def test_lite_mlp_layer_types_are_checked_and_scanning_mixed_layers_is_refused():
    fields = _tiny.fields("glm4_moe_lite")
    for extra, match in ((dict(mlp_layer_types=["dense", "moe", "dense"]), "mlp_layer_types must give 'dense' or "
                                                                           "'sparse' for each of the 3 layers"),
                         (dict(scan_layers=True), r"scan_layers=True needs the same MLP in every layer; "
                                                  r"mlp_layer_types=\['dense', 'sparse', 'dense'\]")):
        with pytest.raises(ValueError, match=match):
            models.Glm4MoeLiteForCausalLM.from_config(ModelConfig("glm4_moe_lite", **{**fields, **extra}))
