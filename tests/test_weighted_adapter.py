"""``add_weighted_adapter``: every combination type against HF PEFT on the same adapter files.

The random DARE types draw their keep masks from torch's global RNG in PEFT and from a JAX key
here; the tests record the masks peftjax draws (``_combine.random_keep_mask``) and replay them,
in the same order and in torch's layout, as PEFT's ``torch.bernoulli``, so both sides prune the
same entries and must then agree to float32 rounding.

``svd_clamp`` clamps at a quantile of the singular vectors' entries, which depends on the signs
LAPACK happens to give each vector (torch and XLA differ on some matrices, as PEFT's CPU and CUDA
drivers may); for that case PEFT's ``torch.linalg.svd`` is given the SVD peftjax computed, so the
test checks the clamp itself.
"""

from __future__ import annotations

from unittest import mock

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _torch_models import quiet, save_peft_adapters  # noqa: E402
import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.tuners.lora import _combine  # noqa: E402

IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "down_proj"], use_rslora=True),
    "c": dict(r=6, lora_alpha=6, target_modules=["v_proj", "o_proj"]),
}
WEIGHTS = [0.7, -0.4]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("weighted")
    return save_peft_adapters(root, ADAPTERS)


def ours_with(files, names):
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(files / "base"), files / names[0],
                                              adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(files / name, adapter_name=name)
    return model


def peft_with(files, names):
    base = quiet(tr.LlamaForCausalLM.from_pretrained, files / "base").eval()
    model = quiet(peft.PeftModel.from_pretrained, base, files / names[0], adapter_name=names[0])
    for name in names[1:]:
        quiet(model.load_adapter, files / name, adapter_name=name)
    return model.eval()


def torch_logits(model):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def both(files):
    """peftjax's and PEFT's model with adapters a, b and c loaded."""
    return ours_with(files, list(ADAPTERS)), peft_with(files, list(ADAPTERS))


CASES = [
    ("linear", ["a", "b"], {}),
    ("cat", ["a", "c"], {}),
    ("svd", ["a", "c"], {}),
    ("svd", ["a", "c"], dict(svd_rank=3, svd_clamp=0.9)),
    ("ties", ["a", "b"], dict(density=0.5)),
    ("ties", ["a", "b"], dict(density=0.5, majority_sign_method="frequency")),
    ("ties_svd", ["a", "c"], dict(density=0.6)),
    ("magnitude_prune", ["a", "b"], dict(density=0.4)),
    ("magnitude_prune_svd", ["a", "c"], dict(density=0.4)),
    ("dare_linear", ["a", "b"], dict(density=0.5)),
    ("dare_ties", ["a", "b"], dict(density=0.5)),
    ("dare_linear_svd", ["a", "c"], dict(density=0.5)),
    ("dare_ties_svd", ["a", "c"], dict(density=0.5, majority_sign_method="frequency")),
]


@pytest.mark.parametrize("combination_type, names, kw", CASES,
                         ids=[f"{c}-{'-'.join(n)}{'-' + '-'.join(k) if k else ''}" for c, n, k in CASES])
def test_combination_equals_peft_and_reloads_in_peft(files, both, tmp_path, combination_type, names, kw):
    ours, theirs = both
    mix = f"mix{len(ours.peft_config)}"  # one model pair serves every case, each under its own name
    drawn, layer = {}, []  # the masks peftjax draws, by layer (the layer orders of the two differ)
    draw, combine_layer = _combine.random_keep_mask, _combine.combined_factors

    def recording_draw(*args, **kwargs):
        mask = draw(*args, **kwargs)
        drawn.setdefault(layer[-1], []).append(np.asarray(mask))
        return mask

    def recording_layer(module, *args, **kwargs):
        layer.append(module.adapter_path)
        return combine_layer(module, *args, **kwargs)

    with mock.patch.object(_combine, "random_keep_mask", recording_draw), \
            mock.patch.object(_combine, "combined_factors", recording_layer):
        ours.add_weighted_adapter(names, WEIGHTS, mix, combination_type=combination_type, **kw)
    ours.set_adapter(mix)
    got = np.asarray(ours(input_ids=IDS).logits)

    svd = combination_type.endswith("svd")
    order = [n for n, m in theirs.base_model.model.named_modules() if n in drawn]
    assert sorted(order) == sorted(drawn)
    # A [in, r] / B [r, out] are torch's transposes; the svd rules prune deltas in torch's layout
    replay = iter([m if svd else m.T for n in order for m in drawn[n]])
    svd_fn = torch.linalg.svd
    if "svd_clamp" in kw:
        def svd_fn(m, full_matrices=True, driver=None):
            return tuple(torch.from_numpy(np.asarray(x)) for x in jnp.linalg.svd(m.detach().numpy(), full_matrices=False))
    with mock.patch("torch.bernoulli", lambda probs: torch.from_numpy(next(replay)).to(probs.dtype)), \
            mock.patch("torch.linalg.svd", svd_fn):
        theirs.add_weighted_adapter(names, WEIGHTS, mix, combination_type=combination_type, **kw)
    assert next(replay, None) is None  # PEFT drew exactly as many masks as peftjax
    assert combination_type.startswith("dare") == bool(drawn)
    theirs.set_adapter(mix)
    expected = torch_logits(theirs)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    theirs.set_adapter(names[0])
    assert np.abs(got - torch_logits(theirs)).max() > 1e-4  # not just the first adapter

    ours.save_pretrained(tmp_path, selected_adapters=[mix])
    reloaded = quiet(peft.PeftModel.from_pretrained,
                     quiet(tr.LlamaForCausalLM.from_pretrained, files / "base").eval(), tmp_path / mix,
                     adapter_name=mix)
    np.testing.assert_allclose(torch_logits(reloaded.eval()), got, atol=1e-5, rtol=0)


def test_weighted_adapter_is_frozen_inactive_and_sized_as_in_peft(files):
    ours = ours_with(files, ["a", "c"])
    ours.add_weighted_adapter(["a", "c"], [1.0, 1.0], "cat", combination_type="cat")
    assert ours.active_adapters == ["a"]
    config = ours.peft_config["cat"]
    assert (config.r, config.lora_alpha) == (10, 10)
    assert set(config.target_modules) == {"q_proj", "v_proj", "o_proj"}
    q_proj = ours.base_model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.lora_A["cat"], peftjax.tuners.FrozenAdapterParam)  # PEFT freezes it too
    assert q_proj.lora_A["cat"].shape == (32, 10)


def test_bad_combinations_fail_before_anything_changes(files):
    ours = ours_with(files, ["a", "b", "c"])
    before = set(ours.peft_config)
    cases = [
        (dict(adapters=["a", "z"], weights=[1, 1]), r"Adapter z does not exist"),
        (dict(adapters=["a", "b"], weights=[1]), r"weights: expected one per adapter \(2\), got 1"),
        (dict(adapters=["a", "c"], weights=[1, 1], combination_type="linear"), "same r value"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties"), "pass density"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="mean"), "Invalid combination_type: mean"),
        (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="a"), "adapter 'a' already exists"),
        (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties", density=0.5,
              majority_sign_method="median"), "majority_sign_method"),
    ]
    for kw, message in cases:
        kw = {"adapter_name": "new", **kw}
        with pytest.raises(ValueError, match=message):
            ours.add_weighted_adapter(**kw)
        assert set(ours.peft_config) == before


# ---------------------------------------------------------------- status and safe merging


def status_fields(statuses):
    keep = ("name", "module_type", "enabled", "active_adapters", "merged_adapters", "requires_grad",
            "available_adapters", "devices")
    return sorted(tuple(str(getattr(s, k)) for k in keep) for s in statuses)


def test_layer_and_model_status_match_peft(files):
    ours, theirs = ours_with(files, ["a", "b"]), peft_with(files, ["a", "b"])
    for model in (ours, theirs):
        model.set_adapter("b")
        model.merge_adapter()  # b merged where it lives, a not: merged is regular, b only
    assert status_fields(ours.get_layer_status()) == status_fields(theirs.get_layer_status())
    mine, peft_status = ours.get_model_status(), theirs.get_model_status()
    for field in ("adapter_model_type", "peft_types", "trainable_params", "total_params", "num_adapter_layers",
                  "enabled", "active_adapters", "merged_adapters", "requires_grad", "available_adapters", "devices"):
        theirs_value = getattr(peft_status, field)
        if field == "peft_types":
            theirs_value = {k: str(v).rpartition(".")[-1] for k, v in theirs_value.items()}
        assert getattr(mine, field) == theirs_value, field
    assert mine.base_model_type == peft_status.base_model_type == "LlamaForCausalLM"
    # set_adapter makes the active adapter trainable and the others frozen, as in PEFT
    assert mine.merged_adapters == ["b"] and mine.requires_grad == {"a": False, "b": True}


def test_safe_merge_refuses_a_broken_adapter_and_keeps_the_model(files):
    ours = ours_with(files, ["a", "b"])
    before = np.asarray(ours(input_ids=IDS).logits)
    layer = ours.base_model.model.layers[1].self_attn.v_proj
    good = layer.lora_B["a"].get_value()
    layer.lora_B["a"].set_value(good.at[0, 0].set(np.nan))
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter a seems to be broken"):
        ours.merge_adapter(safe_merge=True)
    assert all(not s.merged_adapters for s in ours.get_layer_status())
    q0 = ours.base_model.model.layers[0].self_attn.q_proj  # merged before the broken layer, put back
    assert not q0.merged_adapter_names()
    with pytest.raises(ValueError, match="NaNs detected"):
        ours.merge_and_unload(safe_merge=True)
    layer.lora_B["a"].set_value(good)
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS).logits), before, atol=1e-6)
    merged = ours.merge_and_unload(safe_merge=True, adapter_names=["a"])
    np.testing.assert_allclose(np.asarray(merged(input_ids=IDS).logits), before, atol=1e-5)
