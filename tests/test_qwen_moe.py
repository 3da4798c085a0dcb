"""Qwen3-MoE and Qwen2-MoE against PyTorch transformers and HF PEFT.

Qwen3-MoE: logits with sparse and dense layers mixed, the load-balancing loss over the sparse
layers only, generation in a sliding window, scanned layers with gradients, classification, both
checkpoint layouts, and LoRA on the router and the fused experts both ways (PEFT converts the
expert targets as it does Mixtral's). Qwen2-MoE, which shares all of that but its attention and a
gated shared expert: logits, loss and layouts, and LoRA both ways, converted as Qwen3-MoE's by PEFT
0.22 (0.21.2 converted none for it).
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import (
    assert_close_where,
    assert_layouts_round_trip,
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
from peftjax.models import CheckpointError

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_torch = lazy("safetensors.torch")

# _tiny's Qwen3-MoE (layer 0 sparse, layer 1 dense, renormalised top 2 of 4) with a window shorter
# than the batch in every layer; the other routing: every layer sparse, top k not renormalised
EXTRA = dict(use_sliding_window=True, sliding_window=6)
ALL_SPARSE = dict(mlp_only_layers=[], norm_topk_prob=False)
VOCAB = _tiny.FAMILIES["qwen3_moe"][2]["vocab_size"]
TOL = dict(atol=1e-5, rtol=1e-5)  # random 0.3-std weights: logits of ~10, float32 sums
WIDE = dict(atol=5e-5, rtol=1e-5)  # with a random LoRA on every linear and the experts


def _build(root, **overrides):
    """(torch model, its checkpoint as transformers saves it (per-expert), the fused checkpoint)."""
    torch_model = randomised(tr.Qwen3MoeForCausalLM(_tiny.config("qwen3_moe", **overrides)).eval())
    return (torch_model, *save_both_layouts(torch_model, root))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    torch_model, hub, fused = _build(tmp_path_factory.mktemp("qwen3_moe"), **EXTRA)
    return torch_model, hub, fused, models.from_pretrained(hub)


@pytest.fixture(scope="module")
def all_sparse(tmp_path_factory):
    torch_model, hub, _ = _build(tmp_path_factory.mktemp("qwen3_moe_sparse"), **ALL_SPARSE)
    return torch_model, hub


def test_logits_match_transformers_on_a_padded_batch(qwen):
    """Jitted (the eager forward runs the same code: Mixtral's and Qwen3's files test it eagerly)."""
    torch_model, _, _, model = qwen
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Qwen3MoeSparseMoeBlock", "LlamaMLP"]
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    out = jitted(model, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(out.logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)


def test_both_checkpoint_layouts_load_and_save_writes_what_transformers_writes(qwen, tmp_path):
    torch_model, hub, fused, model = qwen
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert {"model.layers.0.mlp.experts.3.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"} <= keys(hub)
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys(fused)
    assert_layouts_round_trip(torch_model, hub, fused, model, tmp_path, VOCAB)


def _loss_case(torch_model, model, jit):
    """The loss with and without the router terms, against transformers on a right-padded batch."""
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    t = {k: torch.tensor(v) for k, v in dict(input_ids=ids, attention_mask=mask, labels=labels).items()}
    with torch.no_grad():
        ref = torch_model(**t, output_router_logits=True)
        plain = torch_model(**t).loss.item()
    assert ref.loss.item() - plain > 1e-4  # the aux term is visible at this tolerance
    inputs = dict(input_ids=ids, attention_mask=mask, labels=labels)
    out = model(**inputs)
    assert out.aux_loss is None and abs(float(out.loss) - plain) <= 1e-5
    run = (lambda m, kw: m(**kw, output_router_logits=True))
    out = nnx.jit(run)(model, inputs) if jit else run(model, inputs)
    assert abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    # one [batch * seq, experts] array per sparse layer, as transformers records its routers
    assert len(out.router_logits) == len(ref.router_logits) == model.model.sparse_layers
    real = mask.reshape(-1).astype(bool)
    for a, b in zip(out.router_logits, ref.router_logits):
        np.testing.assert_allclose(np.asarray(a)[real], b.numpy()[real], atol=1e-5, rtol=0)


def test_load_balancing_loss_covers_the_sparse_layers_as_transformers_does(qwen):
    torch_model, _, _, model = qwen
    _loss_case(torch_model, model, jit=True)


def test_unrenormalised_routing_in_every_layer_matches_transformers(all_sparse):
    torch_model, hub = all_sparse
    model = models.from_pretrained(hub)
    assert model.model.sparse_layers == 2
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)
    _loss_case(torch_model, model, jit=False)


def test_greedy_generation_in_the_window_matches_transformers(qwen):
    torch_model, _, _, model = qwen
    ids, mask = padded_batch(VOCAB, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)


def test_scanned_layers_match_transformers_with_gradients_and_need_alike_layers(all_sparse, qwen):
    torch_model, hub = all_sparse
    scanned = models.from_pretrained(hub, scan_layers=True, remat="full", output_router_logits=True)
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels),
                      output_router_logits=True)
    ref.loss.backward()

    def loss(m):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        return out.loss, out

    grads, out = nnx.jit(nnx.grad(loss, has_aux=True))(scanned)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5 and abs(float(out.aux_loss) - ref.aux_loss.item()) <= 1e-5
    mlp, attn = grads.model.layers.layer.mlp, grads.model.layers.layer.self_attn
    for ours, name in ((mlp.gate.weight, "mlp.gate.weight"), (mlp.experts.gate_up_proj, "mlp.experts.gate_up_proj"),
                       (mlp.experts.down_proj, "mlp.experts.down_proj"),
                       (attn.q_norm.scale, "self_attn.q_norm.weight")):
        for i in range(2):
            theirs = torch_model.get_parameter(f"model.layers.{i}.{name}").grad.numpy()
            np.testing.assert_allclose(np.asarray(ours[...])[i], theirs, atol=1e-5, rtol=1e-4, err_msg=f"{i} {name}")
    torch_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match=r"scan_layers=True needs the same MLP in every layer; layers \[1\] are "
                                         r"dense .*mlp_only_layers=\[1\]"):
        models.from_pretrained(qwen[1], scan_layers=True)


def test_sequence_classification_matches_transformers(tmp_path):
    torch_model = save_tiny(tr.Qwen3MoeForSequenceClassification, _tiny.config("qwen3_moe", num_labels=3), tmp_path)
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == "Qwen3MoeForSequenceClassification"
    ids, mask = padded_batch(VOCAB, seq=7)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = jitted(model, input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=0)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def test_a_checkpoint_missing_an_expert_is_refused_by_name(qwen, tmp_path):
    _, hub, _, _ = qwen
    state = safetensors_torch.load_file(str(hub / "model.safetensors"))
    del state["model.layers.0.mlp.experts.2.up_proj.weight"]
    (tmp_path / "bad").mkdir()
    safetensors_torch.save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((hub / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"(?s)Qwen3-MoE checkpoint in the per-expert layout must hold gate_proj, "
                                              r"down_proj, up_proj .*missing expert keys "
                                              r"\['model.layers.0.mlp.experts.2.up_proj.weight'\]"):
        models.from_pretrained(tmp_path / "bad")


# ---------------------------------------------------------------- LoRA with HF PEFT

IDS, MASK = padded_batch(VOCAB, batch=2, seq=7)


def _peft_base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.Qwen3MoeForCausalLM.from_pretrained(path).eval()


def _close(ours, theirs):
    assert_close_where(ours, theirs, MASK, **TOL)


def _changed(logits, path) -> float:
    valid = MASK.astype(bool)
    return float(np.abs(np.asarray(logits)[valid] - torch_logits(_peft_base(path), input_ids=IDS,
                                                                  attention_mask=MASK)[valid]).max())


_converted = moe_conversion


def test_all_linear_lora_on_router_and_experts_both_ways(qwen, tmp_path):
    """PEFT turns all-linear into LoRA on the router and the fused experts, and keeps it on the dense
    layer's MLP (whose linears share the experts' names; PEFT 0.21.2 moved them): its adapter gives the same
    logits here, jitted and merged; the same config made here converts, targets and saves as
    PEFT's, and PEFT loading it gives the logits it gives here."""
    path = qwen[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_peft_base(path), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                        init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert _changed(ref, path) > 1e-3
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    _close(jitted(model.base_model, input_ids=IDS, attention_mask=MASK).logits, ref)
    _close(model.merge_and_unload()(input_ids=IDS, attention_mask=MASK).logits, ref)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules="all-linear", init_lora_weights=False))
    assert _converted(ours.peft_config["default"]) == _converted(theirs.peft_config["default"])
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    assert {"model.model.layers.1.mlp.gate_proj", "model.model.layers.0.mlp.experts"} <= {n for n, _ in layers}
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_peft_base(path), tmp_path / "ours").eval()
    out = ours(input_ids=IDS, attention_mask=MASK).logits
    _close(out, torch_logits(loaded, input_ids=IDS, attention_mask=MASK))
    assert _changed(out, path) > 1e-3


def test_lora_on_experts_trained_here_loads_in_peft_and_merges_for_transformers(qwen, tmp_path):
    path = qwen[1]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    config = model.peft_config["default"]
    assert (set(config.target_modules), set(config.target_parameters), config.rank_pattern) == (
        {"q_proj", "gate_proj", "up_proj", "down_proj"}, {"gate_up_proj", "down_proj"}, {r".*\.gate_up_proj": 4})
    with warnings.catch_warnings():  # the dense layer's MLP keeps its targets, as PEFT 0.22 converts them
        warnings.simplefilter("ignore")
        converted = peft.get_peft_model(_peft_base(path), peft.LoraConfig(
            r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]))
    assert _converted(config) == _converted(converted.peft_config["default"])
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


def test_lora_in_transformers4_per_expert_layout_is_fused_as_peft_fuses_it(qwen, tmp_path):
    """An adapter of transformers 4's Qwen3-MoE (a LoRA per expert's gate/up/down_proj, on the
    router and on the dense layer's MLP, all linears there): PEFT 0.22.0 fuses it on load, and so
    does peftjax, to the same logits."""
    path = qwen[1]
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=2, lora_alpha=8, target_modules=["q_proj", "gate", "gate_proj", "up_proj", "down_proj"])))
    rs = np.random.RandomState(0)
    tensors, pre = {}, "base_model.model.model.layers"
    shapes = {"1.self_attn.q_proj": (32, 32), "0.self_attn.q_proj": (32, 32), "0.mlp.gate": (4, 32),
              "1.mlp.gate_proj": (40, 32), "1.mlp.up_proj": (40, 32), "1.mlp.down_proj": (32, 40)}
    shapes.update({f"0.mlp.experts.{e}.{w}": (o, i) for e in range(4)
                   for w, (o, i) in (("gate_proj", (24, 32)), ("up_proj", (24, 32)), ("down_proj", (32, 24)))})
    for name, (o, i) in shapes.items():
        tensors[f"{pre}.{name}.lora_A.weight"] = rs.normal(0, 0.3, (2, i)).astype(np.float32)
        tensors[f"{pre}.{name}.lora_B.weight"] = rs.normal(0, 0.3, (o, 2)).astype(np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(_peft_base(path), tmp_path).eval()
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    assert _changed(ref, path) > 1e-3
    _close(peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)(
        input_ids=IDS, attention_mask=MASK).logits, ref)
    del tensors[f"{pre}.0.mlp.experts.1.down_proj.lora_A.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts.N.down_proj.lora_A.weight: expected experts 0..3, "
                                         r"found \[0, 2, 3\]"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)


def test_bare_configs_and_half_a_fused_pair_are_refused_as_peft_refuses_them(qwen):
    path = qwen[1]
    for kwargs, match in ((dict(target_modules=None), "needs target_modules or target_parameters"),
                          (dict(target_modules=["q_proj", "gate_proj"]),
                           "gate_proj without also targeting up_proj because they are fused")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(ValueError, match="target_modules|fused"):
                peft.get_peft_model(_peft_base(path), peft.LoraConfig(r=2, **kwargs))
        with pytest.raises(ValueError, match=match):
            peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2, **kwargs))
    with warnings.catch_warnings():  # PEFT has no IA³ default targets for qwen3_moe either
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(_peft_base(path), peft.IA3Config())
    with pytest.raises(ValueError, match="no default target_modules for model_type 'qwen3_moe' \\(IA3\\)"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.IA3Config())



# ---------------------------------------------------------------- Qwen2-MoE

Q2_EXTRA = dict(use_sliding_window=True, sliding_window=4, max_window_layers=2)  # layer 0 slides, layer 1 dense


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen2_moe")
    torch_model = randomised(tr.Qwen2MoeForCausalLM(_tiny.config("qwen2_moe", **Q2_EXTRA)).eval())
    torch_model.save_pretrained(root / "hub")
    return torch_model, root / "hub", models.from_pretrained(root / "hub")


def test_qwen2_moe_logits_loss_and_layouts_match_transformers(qwen2, tmp_path):
    torch_model, hub, model = qwen2
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    assert [type(layer.mlp).__name__ for layer in model.model.layers] == ["Qwen2MoeSparseMoeBlock", "LlamaMLP"]
    ids, mask = padded_batch(VOCAB, seq=9)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(jitted(model, input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid], **TOL)
    _loss_case(torch_model, model, jit=True)
    ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    ours = models.hf_state_dict(model)
    assert set(ours) == set(ref) and "model.layers.0.mlp.shared_expert_gate.weight" in ours
    model.save_pretrained(tmp_path)
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    assert keys(tmp_path) == keys(hub)


def test_qwen2_moe_lora_on_every_linear_and_the_experts_both_ways(qwen2, tmp_path):
    """PEFT 0.22 converts qwen2_moe's targets as Qwen3-MoE's (0.21.2 converted none): all-linear
    reaches the attention, the shared expert and its gate, the dense layer's MLP and the router,
    and the experts with the doubled rank of the fused gate/up; a random LoRA on every linear and
    the experts moves the logits of ~10 further (2.8e-5 seen)."""
    path = qwen2[1]
    kwargs = dict(r=2, target_modules="all-linear", target_parameters=["gate_up_proj", "down_proj"],
                  init_lora_weights=False)
    base = lambda: tr.Qwen2MoeForCausalLM.from_pretrained(path).eval()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), peft.LoraConfig(**kwargs))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=IDS, attention_mask=MASK)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(model.base_model, input_ids=IDS, attention_mask=MASK).logits, ref, MASK, **WIDE)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**kwargs))
    assert _converted(ours.peft_config["default"]) == _converted(theirs.peft_config["default"])
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    assert {"model.model.layers.0.mlp.shared_expert_gate", "model.model.layers.1.mlp.gate_proj"} <= {
        name for name, _ in layers}
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    out = ours(input_ids=IDS, attention_mask=MASK).logits
    assert_close_where(out, torch_logits(loaded, input_ids=IDS, attention_mask=MASK), MASK, **WIDE)
    assert_close_where(ours.merge_and_unload()(input_ids=IDS, attention_mask=MASK).logits, out, MASK, **WIDE)
    with warnings.catch_warnings():  # no default targets on either side
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(base(), peft.LoraConfig(r=2))
    with pytest.raises(ValueError, match="LoRA on model_type 'qwen2_moe' needs target_modules or target_param"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2))


def test_grouped_expert_dispatch_gives_transformers_logits_loss_and_gradients(all_sparse):
    """``expert_dispatch="grouped"``: each token through its top k only (sorted assignments,
    ``jax.lax.ragged_dot``), the same logits, loss and expert gradients as transformers, with the
    dense run's; a LoRA on the experts trains through it."""
    torch_model, hub = all_sparse
    model = models.from_pretrained(hub, expert_dispatch="grouped")
    ids, mask = padded_batch(VOCAB, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref.loss.backward()
    grads, out = nnx.jit(nnx.grad(lambda m: (lambda o: (o.loss, o))(m(input_ids=ids, attention_mask=mask,
                                                                        labels=labels)), has_aux=True))(model)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[valid], ref.logits.detach().numpy()[valid], **TOL)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5
    for i in range(2):
        for name in ("gate_up_proj", "down_proj"):
            theirs = torch_model.get_parameter(f"model.layers.{i}.mlp.experts.{name}").grad.numpy()
            ours = getattr(grads.model.layers[i].mlp.experts, name)[...]
            np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-5, rtol=1e-4, err_msg=f"{i} {name}")
    torch_model.zero_grad(set_to_none=True)

    lora = peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_parameters=["gate_up_proj", "down_proj"],
                                                            target_modules=["q_proj"], init_lora_weights=False))
    dense = peftjax.get_peft_model(models.from_pretrained(hub), lora.peft_config["default"])
    dense.update(peftjax.split(lora.base_model)[1])
    np.testing.assert_allclose(np.asarray(lora(input_ids=ids, attention_mask=mask).logits)[valid],
                               np.asarray(dense(input_ids=ids, attention_mask=mask).logits)[valid], **TOL)
    losses = _tiny.train(lora, _tiny.batch(ids, mask), steps=3).losses
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match=r"expert_dispatch='sparse' is not an option; choose one of \['dense', "):
        models.from_pretrained(hub, expert_dispatch="sparse")
