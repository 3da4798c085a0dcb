"""LoRA against HF PEFT + PyTorch on every bundled architecture, in both directions."""

from __future__ import annotations

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models
from peftjax.io import read_safetensors

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

ARCHS = {name: _tiny.arch(name) for name in ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma3_text", "bert", "gpt2")}
# PEFT 0.22.0 has no default target_modules for phi3 (both PEFT and peftjax refuse the bare config):
# its tests name the fused projections, the layers that are Phi-3's own
EXPLICIT_TARGETS = {"phi3": dict(target_modules=["qkv_proj", "gate_up_proj"])}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request, tiny_checkpoint):
    spec = ARCHS[request.param]
    return request.param, tiny_checkpoint(spec), spec.torch_class, spec.task


def torch_base(arch):
    _, path, cls, _ = arch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_pretrained(path).eval()


def run_torch(model, ids=IDS, mask=MASK):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()


def run_jax(model, ids=IDS, mask=MASK, jit=False):
    model = getattr(model, "base_model", model)  # jit the NNX model inside a PeftModel
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, ids, mask))
    return np.asarray(model(input_ids=ids, attention_mask=MASK if mask is MASK else mask).logits)


def valid(x):
    return x[MASK.astype(bool)] if x.ndim == 3 else x


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(np.asarray(a)), valid(np.asarray(b)), atol=atol, rtol=0)


def perturb_saved_modules(model):
    """PEFT's modules_to_save copies start equal to the original: change them, as training would."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "modules_to_save" in name:
                p.add_(0.3 * torch.randn_like(p))


# ---------------------------------------------------------------- (a) PEFT -> peftjax


@pytest.mark.parametrize("variant", ["default", "rslora-patterns", "dora", "bias-all"])
def test_peft_made_adapter_gives_same_logits(arch, variant, tmp_path):
    name, path, cls, task = arch
    kw = dict(r=4, lora_alpha=8, task_type=task, init_lora_weights=False, **EXPLICIT_TARGETS.get(name, {}))
    if variant == "rslora-patterns":
        kw.update(use_rslora=True, target_modules="all-linear", rank_pattern={"0\\..*": 2}, alpha_pattern={"1\\..*": 16})
        kw["rank_pattern"] = {_first_linear(name): 2}
    if variant == "dora":
        kw.update(use_dora=True)
    if variant == "bias-all":
        kw.update(bias="all")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch), peft.LoraConfig(**kw))
    perturb_saved_modules(torch_model)
    if variant == "bias-all":
        with torch.no_grad():
            for n, p in torch_model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.1)
    torch_model.save_pretrained(tmp_path)
    ref = run_torch(torch_model)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    # bias="all" shifts every bias by 0.1: GPT-2's float32 logits then differ by up to ~1.3e-5 at
    # magnitude ~0.4 from summation order alone (measured, run alone; 1e-5 holds for the rest)
    atol = 2e-5 if variant == "bias-all" else 1e-5
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref, atol=atol)
    base = run_torch(torch_base(arch))
    assert np.abs(valid(ref) - valid(base)).max() > 1e-3  # the adapter really changes the output


def test_modules_to_save_names_match_as_peft_matches_them(tmp_path):
    """PEFT 0.22 takes a module into ``modules_to_save`` when its name is an entry or ends with
    ``"." + entry``: ``["norm"]`` copies ``model.norm`` and not the layers' ``input_layernorm``.
    peftjax copies the same modules, so PEFT's adapter loads with PEFT's logits and peftjax's own
    file holds PEFT's keys. A file of an older PEFT, whose plain suffix match also saved every
    ``*_layernorm`` under ``["norm"]``, loads with those copies (PEFT 0.22 drops them)."""
    path = tmp_path / "base"
    _tiny.save("llama", path)
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["norm"], task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(_tiny.arch("llama").torch_class.from_pretrained(path).eval(),
                                          peft.LoraConfig(**cfg))
    perturb_saved_modules(torch_model)
    torch_model.save_pretrained(tmp_path / "theirs")
    theirs = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")[0]
    assert "base_model.model.model.norm.weight" in theirs and not any("layernorm" in k for k in theirs)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs")
    assert_close(run_jax(model), run_torch(torch_model))
    peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**cfg)).save_pretrained(tmp_path / "ours")
    assert set(read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")[0]) == set(theirs)

    # the older layout: the norms' copies in the file, the config saying ["norm"] only
    wide = {**cfg, "modules_to_save": ["norm", "input_layernorm", "post_attention_layernorm"]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(_tiny.arch("llama").torch_class.from_pretrained(path).eval(),
                                          peft.LoraConfig(**wide))
    perturb_saved_modules(torch_model)
    torch_model.save_pretrained(tmp_path / "old")
    written = json.loads((tmp_path / "old" / "adapter_config.json").read_text())
    (tmp_path / "old" / "adapter_config.json").write_text(json.dumps({**written, "modules_to_save": ["norm"]}))
    old = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "old")
    assert_close(run_jax(old), run_torch(torch_model))
    assert old.peft_config["default"].modules_to_save == (
        "norm", *(f"model.layers.{i}.{n}" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")))
    old.save_pretrained(tmp_path / "resaved")  # names PEFT 0.22 matches: the same model there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(_tiny.arch("llama").torch_class.from_pretrained(path).eval(),
                                               tmp_path / "resaved")
    assert_close(run_jax(old), run_torch(again))


def _first_linear(name):
    return {"bert": "query", "gpt2": "c_attn", "phi3": "qkv_proj"}.get(name, "q_proj")


def test_trainable_parameter_counts_match_peft(arch, capsys):
    name, path, cls, task = arch
    cfg = dict(r=4, lora_alpha=8, task_type=task, **EXPLICIT_TARGETS.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch), peft.LoraConfig(**cfg))
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**cfg))
    assert model.get_nb_trainable_parameters() == torch_model.get_nb_trainable_parameters()
    torch_model.print_trainable_parameters()
    model.print_trainable_parameters()
    theirs, ours = capsys.readouterr().out.strip().splitlines()
    assert ours == theirs


# ---------------------------------------------------------------- (b) peftjax trains -> PEFT


def test_trained_adapter_loads_in_peft_with_same_logits(arch, tmp_path):
    name, path, cls, task = arch
    model = peftjax.get_peft_model(
        models.from_pretrained(path),
        peftjax.LoraConfig(r=4, lora_alpha=8, task_type=task, lora_dropout=0.1, target_modules="all-linear"),
    )
    base_before = jax.tree.map(np.array, nnx.state(model.base_model, peftjax.FROZEN))
    losses, trainable, opt_state, _ = _tiny.train(model, _tiny.batch(IDS, MASK, task), optimizer=optax.adam(1e-2))
    assert losses[-1] < losses[0]
    # (f) the optimizer holds state for adapter leaves only, and the base is bit-identical
    n_trainable = len(jax.tree.leaves(trainable))
    adam_state = opt_state[0]
    assert len(jax.tree.leaves(adam_state.mu)) == n_trainable
    assert jax.tree.structure(adam_state.mu) == jax.tree.structure(trainable)
    after = jax.tree.map(np.array, nnx.state(model.base_model, peftjax.FROZEN))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), base_before, after))

    model.save_pretrained(tmp_path)
    ours = run_jax(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(torch_base(arch), tmp_path).eval()
    assert_close(ours, run_torch(torch_model))
    assert np.abs(valid(ours) - valid(run_torch(torch_base(arch)))).max() > 1e-3

    # (c) merged and exported, transformers alone reproduces the logits
    merged = model.merge_and_unload()
    assert not jax.tree.leaves(nnx.state(merged, peftjax.TRAINABLE))
    merged.save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = cls.from_pretrained(tmp_path / "merged").eval()
    assert_close(run_torch(exported), ours)


# ---------------------------------------------------------------- files and config


def test_saved_files_are_what_peft_writes(arch, tmp_path):
    from peftjax.io import read_safetensors

    name, path, cls, task = arch
    cfg = dict(r=4, lora_alpha=8, task_type=task, **EXPLICIT_TARGETS.get(name, {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch), peft.LoraConfig(**cfg))
    torch_model.save_pretrained(tmp_path / "theirs")
    peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**cfg)).save_pretrained(tmp_path / "ours")
    theirs, theirs_meta = read_safetensors(tmp_path / "theirs" / "adapter_model.safetensors")
    ours, ours_meta = read_safetensors(tmp_path / "ours" / "adapter_model.safetensors")
    assert theirs_meta == {"format": "pt"} and ours_meta["format"] == "pt"
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    their_cfg = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    our_cfg = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(our_cfg) == set(their_cfg)
    for key in ("r", "lora_alpha", "bias", "fan_in_fan_out", "task_type", "inference_mode", "peft_type"):
        assert our_cfg[key] == their_cfg[key], key
    assert sorted(our_cfg["target_modules"]) == sorted(their_cfg["target_modules"])
    assert our_cfg["modules_to_save"] == their_cfg["modules_to_save"]


# ---------------------------------------------------------------- (d) x@A@B == merged == dense


def test_xab_path_equals_merged_path_equals_dense_reference(jit):
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama"))
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                   target_modules=["q_proj", "down_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    x = jax.random.normal(jax.random.key(1), (3, 32))
    w, a, b = layer.kernel.get_value(), layer.lora_A["default"].get_value(), layer.lora_B["default"].get_value()
    dense = x @ (w + 2.0 * a @ b)
    call = nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))
    np.testing.assert_allclose(call(layer, x), dense, atol=1e-5)
    unmerged = run_jax(peft_model, jit=jit)
    peft_model.merge_adapter()
    np.testing.assert_allclose(call(layer, x), dense, atol=1e-5)
    assert_close(run_jax(peft_model, jit=jit), unmerged)
    peft_model.unmerge_adapter()
    np.testing.assert_allclose(layer.kernel.get_value(), w, atol=1e-6)


def test_train_step_never_builds_the_merged_weight():
    """The jaxpr of a LoRA forward has no [in, out]-shaped A@B product."""
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama"))
    peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    graphdef, trainable, rest = peftjax.split(layer)
    jaxpr = jax.make_jaxpr(
        jax.grad(lambda t, x: peftjax.combine(graphdef, t, rest)(x).sum())
    )(trainable, jnp.ones((2, 32)))
    shapes = {tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars}
    assert (32, 32) not in shapes  # a merged (in, out) weight or its gradient would appear here


# ---------------------------------------------------------------- adapters API


def test_multiple_adapters_switch_disable_delete(tiny_checkpoint, tmp_path):
    path, task = tiny_checkpoint("llama"), ARCHS["llama"].task
    base_logits = run_jax(models.from_pretrained(path))
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.LoraConfig(r=4, init_lora_weights=False, task_type=task))
    model.add_adapter("other", peftjax.LoraConfig(r=2, init_lora_weights=False, target_modules=["o_proj"]))
    first = run_jax(model)
    model.set_adapter("other")
    second = run_jax(model)
    assert np.abs(first - second).max() > 1e-3
    with model.disable_adapter():
        assert_close(run_jax(model), base_logits)
    model.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "adapter_config.json").is_file()
    assert (tmp_path / "saved" / "other" / "adapter_model.safetensors").is_file()
    reloaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "saved")
    reloaded.load_adapter(tmp_path / "saved" / "other", adapter_name="other")
    assert_close(run_jax(reloaded), first)
    reloaded.set_adapter("other")
    assert_close(run_jax(reloaded), second)
    reloaded.delete_adapter("other")
    assert list(reloaded.peft_config) == ["default"]
    assert_close(reloaded.unload()(input_ids=IDS, attention_mask=MASK).logits, base_logits)


@pytest.mark.parametrize(
    "targets",
    [
        dict(target_modules=r".*\.layers\.0\.self_attn\.(q|k)_proj"),
        dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
        dict(target_modules=["embed_tokens", "lm_head", "q_proj"]),
        dict(target_modules=["q_proj", "v_proj"], bias="lora_only"),
        dict(target_modules="all-linear", use_dora=True, use_rslora=True, alpha_pattern={"down_proj": 16}),
    ],
    ids=["regex", "layers_to_transform", "embed-lm_head", "bias-lora_only", "all-linear-dora"],
)
def test_variants_round_trip_through_peft(targets, tiny_checkpoint, tmp_path):
    path, cls = tiny_checkpoint("llama"), ARCHS["llama"].torch_class
    model = peftjax.get_peft_model(models.from_pretrained(path),
                                   peftjax.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **targets))
    if targets.get("bias") == "lora_only":
        q = model.base_model.model.layers[0].self_attn.q_proj
        assert isinstance(q.bias, peftjax.TrainableParam) or q.bias is None
    model.save_pretrained(tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(cls.from_pretrained(path).eval(), tmp_path / "adapter")
    theirs_targets = set(torch_model.targeted_module_names)
    ours_targets = {n for n, m in peftjax.tuners.lora.lora_layers(model.base_model).items()}
    assert ours_targets == theirs_targets
    theirs = run_torch(torch_model)
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), theirs)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2"])
def test_dora_all_linear_made_here_loads_in_peft(family, tiny_checkpoint, tmp_path):
    """The families' own layers (Qwen3's norms between projections, Phi-3's fused ones, Gemma 2's
    post-norms and soft-caps) under DoRA."""
    spec = ARCHS.get(family) or _tiny.arch(family)
    path, cls = tiny_checkpoint(spec), spec.torch_class
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear", use_dora=True))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(cls.from_pretrained(path).eval(), tmp_path)
    assert {n for n in peftjax.tuners.lora.lora_layers(model.base_model)} == set(torch_model.targeted_module_names)
    theirs = run_torch(torch_model)
    assert_close(run_jax(model), theirs)
    assert np.abs(valid(theirs) - valid(run_torch(cls.from_pretrained(path).eval()))).max() > 1e-3


def test_lora_on_gemma_embeddings_is_scaled_as_peft_scales_it(tiny_checkpoint, tmp_path):
    """Gemma's lookup multiplies by sqrt(hidden): PEFT multiplies the adapter's rows by it too."""
    spec = _tiny.arch("gemma2")
    path = tiny_checkpoint(spec)
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["embed_tokens"]))
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.PeftModel.from_pretrained(spec.torch_class.from_pretrained(path).eval(), tmp_path)
    theirs = run_torch(torch_model)
    assert_close(run_jax(model), theirs)
    assert np.abs(valid(theirs) - valid(run_torch(spec.torch_class.from_pretrained(path).eval()))).max() > 1e-3


def test_mixtral_attention_lora_both_ways(tiny_checkpoint, tmp_path):
    """q/k/v/o made by PEFT -> here; q/v with DoRA made here -> PEFT, and merged -> transformers (which reads
    the per-expert experts that save_pretrained writes). Training runs in test_sharding."""
    spec = _tiny.arch("mixtral")
    path, cls = tiny_checkpoint(spec), spec.torch_class
    base = lambda: torch_base(("mixtral", path, cls, "CAUSAL_LM"))  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert set(peftjax.tuners.lora.lora_layers(model.base_model)) == set(theirs.targeted_module_names)
    ref = run_torch(theirs)
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)
    assert np.abs(valid(ref) - valid(run_torch(base()))).max() > 1e-3

    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"], init_lora_weights=False,
        use_dora=True))
    model.save_pretrained(tmp_path / "ours")
    ours = run_jax(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert_close(ours, run_torch(theirs))
    assert np.abs(valid(ours) - valid(run_torch(base()))).max() > 1e-3
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(run_torch(cls.from_pretrained(tmp_path / "merged").eval()), ours)


def _mixtral(tiny_checkpoint):
    spec = _tiny.arch("mixtral")
    path = tiny_checkpoint(spec)
    return path, spec.torch_class, lambda: torch_base(("mixtral", path, spec.torch_class, "CAUSAL_LM"))


def _converted(config):
    """The fields PEFT's MoE conversion rewrites, comparable across PEFT and peftjax."""
    return (set(config.target_modules), set(config.target_parameters), dict(config.rank_pattern),
            dict(config.alpha_pattern))


def test_mixtral_all_linear_lora_on_router_and_experts_from_peft(tiny_checkpoint, tmp_path):
    """PEFT 0.22.0 turns all-linear on Mixtral into target_parameters on the router and the fused
    experts (rank and alpha doubled on gate_up_proj): its adapter gives the same logits here,
    jitted or not, and merged; the same config made here converts and saves as PEFT's does, and
    gives PEFT's logits there."""
    path, cls, base = _mixtral(tiny_checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules="all-linear",
                                                             init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    ref = run_torch(theirs)
    for jit in (False, True):
        assert_close(run_jax(model, jit=jit), ref)
    assert np.abs(valid(ref) - valid(run_torch(base()))).max() > 1e-3
    assert_close(run_jax(model.merge_and_unload()), ref)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules="all-linear", init_lora_weights=False))
    assert _converted(ours.peft_config["default"]) == _converted(theirs.peft_config["default"])
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}  # experts and experts.base_layer
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    ours.save_pretrained(tmp_path / "ours")
    from safetensors.numpy import load_file

    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in peft_file.items()}
    with warnings.catch_warnings():  # ... and PEFT, loading it, gives the logits it gives here
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    out = run_jax(ours)
    assert_close(out, run_torch(loaded))
    assert np.abs(valid(out) - valid(run_torch(base()))).max() > 1e-3


def test_mixtral_lora_on_experts_trained_here_loads_in_peft(tiny_checkpoint, tmp_path):
    """Trained here (the w1/w3 names converted, down_proj named as a parameter): PEFT and, merged,
    transformers alone give the same logits, and the training changed them."""
    path, cls, base = _mixtral(tiny_checkpoint)
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, lora_alpha=4, task_type="CAUSAL_LM", target_modules=["q_proj", "w1", "w3"],
        target_parameters=["experts.down_proj"]))
    config = model.peft_config["default"]
    assert (set(config.target_parameters), config.rank_pattern) == ({"experts.down_proj", "gate_up_proj"},
                                                                     {r".*\.gate_up_proj": 4})
    losses = _tiny.train(model, _tiny.batch(IDS, MASK), steps=3).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path)
    ours = run_jax(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    assert sorted(theirs.peft_config["default"].target_parameters) == ["experts.down_proj", "gate_up_proj"]
    assert_close(ours, run_torch(theirs))
    assert np.abs(valid(ours) - valid(run_torch(base()))).max() > 1e-3
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_close(run_torch(cls.from_pretrained(tmp_path / "merged").eval()), ours)


def test_mixtral_lora_in_transformers4_per_expert_layout_is_fused_as_peft_fuses_it(tiny_checkpoint, tmp_path):
    """An adapter of transformers 4's Mixtral (one LoRA per expert's w1/w2/w3, router under
    block_sparse_moe): PEFT 0.22.0 fuses it on load, and so does peftjax, to the same logits."""
    path, cls, base = _mixtral(tiny_checkpoint)
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=2, lora_alpha=8, target_modules=["q_proj", "gate", "w1", "w2", "w3"])))
    rs = np.random.RandomState(0)
    tensors, pre = {}, "base_model.model.model.layers"
    for layer in range(2):
        shapes = {"self_attn.q_proj": (32, 32), "block_sparse_moe.gate": (4, 32)}
        shapes.update({f"block_sparse_moe.experts.{e}.{w}": (o, i) for e in range(4)
                       for w, (o, i) in (("w1", (24, 32)), ("w3", (24, 32)), ("w2", (32, 24)))})
        for name, (o, i) in shapes.items():
            tensors[f"{pre}.{layer}.{name}.lora_A.weight"] = rs.normal(0, 0.3, (2, i)).astype(np.float32)
            tensors[f"{pre}.{layer}.{name}.lora_B.weight"] = rs.normal(0, 0.3, (o, 2)).astype(np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path).eval()
    ref = run_torch(theirs)
    assert_close(run_jax(peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)), ref)
    assert np.abs(valid(ref) - valid(run_torch(base()))).max() > 1e-3
    tensors[f"{pre}.0.block_sparse_moe.experts.3.w1.lora_magnitude_vector"] = np.ones(24, np.float32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(NotImplementedError, match="per-expert layout.*fuses only LoRA's lora_A/lora_B"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path, strict=False)
    del tensors[f"{pre}.0.block_sparse_moe.experts.3.w1.lora_B.weight"]
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"experts.N.w1.lora_B.weight: expected experts 0..3, found \[0, 1, 2\]"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)


def test_mixtral_lora_target_conversion_and_refusals_follow_peft(tiny_checkpoint):
    path, cls, base = _mixtral(tiny_checkpoint)
    regex = r".*\.(q_proj|w1|w3)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=regex))
        for bad in (None, ["q_proj", "w1"]):  # PEFT refuses these too
            with pytest.raises(ValueError, match="target_modules|fused"):
                peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules=bad))
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2, target_modules=regex))
    assert _converted(ours.peft_config["default"]) == _converted(theirs.peft_config["default"])
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers  # the experts: ParamWrapper

    experts = dict(target_modules=["q_proj"], target_parameters=["experts.gate_up_proj"])
    for kwargs, error, match in (
        (dict(target_modules=None), ValueError, "needs target_modules or target_parameters"),
        (dict(target_modules=["q_proj", "w1"]), ValueError, "w1 without also targeting w3 because they are fused"),
        (dict(experts, lora_dropout=0.1), ValueError, "ParamWrapper does not work with lora_dropout"),
        (dict(experts, use_dora=True), ValueError, "ParamWrapper does not work with use_dora"),
        (dict(experts, init_lora_weights="pissa"), NotImplementedError, "'pissa' with target_parameters"),
        (dict(target_parameters=["no_such.weight"], target_modules=None), ValueError, "matched no parameter"),
        (dict(target_parameters=["q_proj.weight"], target_modules=None), TypeError, "q_proj .*reads its parameters"),
    ):
        with pytest.raises(error, match=match):
            peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2, **kwargs))
    with pytest.raises(TypeError, match="list of parameter names"):
        peftjax.LoraConfig(target_parameters="experts.gate_up_proj")
    with pytest.raises(ValueError, match="all adapters must target the same set of parameters"):
        ours.add_adapter("other", peftjax.LoraConfig(r=2, target_parameters=["gate_up_proj", "down_proj"]))
    ours.add_adapter("other", peftjax.LoraConfig(r=2, target_modules=regex))
    with pytest.raises(NotImplementedError, match="mlp.experts.*different adapter per row"):
        ours(input_ids=IDS, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="add_weighted_adapter does not support targeting nn.Parameter"):
        ours.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(NotImplementedError, match="hot-swapping LoRA on parameters"):
        peftjax.prepare_model_for_compiled_hotswap(ours, target_rank=8)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("family", ["phi3", "olmo2", "olmo3", "smollm3", "granite", "cohere", "cohere2", "phimoe",
                                    "vaultgemma"])
def test_families_without_default_targets_are_refused_as_peft_refuses_them(family, tiny_checkpoint):
    path, cls = tiny_checkpoint(family), _tiny.arch(family).torch_class
    with pytest.raises(ValueError, match="target_modules"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(cls.from_pretrained(path), peft.LoraConfig(task_type="CAUSAL_LM"))
    for config in (peftjax.LoraConfig(task_type="CAUSAL_LM"), peftjax.IA3Config(task_type="CAUSAL_LM")):
        with pytest.raises(ValueError, match=f"no default target_modules for model_type '{family}'.*'qwen3'"):
            peftjax.get_peft_model(models.from_pretrained(path), config)


@pytest.fixture(scope="module")
def llama_path(tiny_checkpoint):
    return tiny_checkpoint("llama")


def test_targets_matching_nothing_list_close_names(llama_path):
    with pytest.raises(ValueError, match="q_proj"):
        peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(target_modules=["q_prj"]))


def test_unsupported_layer_type_names_path_and_class(llama_path):
    with pytest.raises(TypeError, match=r"model\.norm \(RMSNorm\)"):
        peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(target_modules=["norm"]))


def test_bad_adapter_files(llama_path, tmp_path):
    model = peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=4))
    good = tmp_path / "good"
    model.save_pretrained(good)
    cfg = json.loads((good / "adapter_config.json").read_text())

    wrong_r = tmp_path / "wrong_r"
    wrong_r.mkdir()
    (wrong_r / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    (wrong_r / "adapter_config.json").write_text(json.dumps({**cfg, "r": 2}))
    with pytest.raises(ValueError, match=r"lora_A\.weight: expected shape \[2, 32\].*found \[4, 32\]"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), wrong_r)

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), tmp_path / "nowhere")

    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad_json"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), bad_json)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text(json.dumps(cfg))
    data = (good / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), truncated)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), no_weights)
    (no_weights / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="allow_pickle"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), no_weights)


def test_non_float_weights_rejected(llama_path, tmp_path):
    from peftjax.io import read_safetensors, write_safetensors

    model = peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors[key] = tensors[key].astype(np.int32)
    write_safetensors(tmp_path / "adapter_model.safetensors", tensors, {"format": "pt"})
    with pytest.raises(ValueError, match=f"{key}.*int32"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), tmp_path)


@pytest.mark.parametrize("bad", ["a/b", "..", "x\\y", ""])
def test_adapter_name_with_path_separator_is_refused(llama_path, bad):
    with pytest.raises(ValueError, match="adapter name"):
        peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=4), adapter_name=bad)


def test_failed_save_keeps_previous_adapter(llama_path, tmp_path, monkeypatch):
    import peftjax.io._adapter as adapter_io

    model = peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def exploding(path, tensors, metadata=None):
        open(path, "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "write_safetensors", exploding)
    new = peftjax.get_peft_model(models.from_pretrained(llama_path),
                                 peftjax.LoraConfig(r=4, init_lora_weights=False))
    with pytest.raises(OSError, match="disk full"):
        new.save_pretrained(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_unknown_config_field_warns_and_loads(llama_path, tmp_path):
    model = peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=4, init_lora_weights=False))
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "some_future_field": 1}))
    with pytest.warns(UserWarning, match="some_future_field"):
        loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), tmp_path)
    assert_close(run_jax(loaded), run_jax(model))


def test_missing_adapter_keys_are_refused_or_with_strict_false_warned(llama_path, tmp_path):
    from peftjax.io import read_safetensors, write_safetensors

    model = peftjax.get_peft_model(models.from_pretrained(llama_path), peftjax.LoraConfig(r=4))
    model.save_pretrained(tmp_path)
    tensors, meta = read_safetensors(tmp_path / "adapter_model.safetensors")
    gone = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    write_safetensors(tmp_path / "adapter_model.safetensors",
                      {k: np.array(v) for k, v in tensors.items() if k != gone}, meta)
    with pytest.raises(peftjax.AdapterKeyError, match=r"1 adapter weights of the model are not in the file"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), tmp_path)
    with pytest.warns(UserWarning, match="missing adapter keys") as caught:
        peftjax.PeftModel.from_pretrained(models.from_pretrained(llama_path), tmp_path, strict=False)
    assert [gone] == [k for w in caught for k in [gone] if f"'{gone}'" in str(w.message)]