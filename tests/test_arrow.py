"""Arrow (``create_arrow_model``: per-token routing over task LoRAs, with GenKnowSub) against HF PEFT
0.22.0's own ``create_arrow_model`` on the same tiny Llama and the same saved adapters.

With ``rng_seed`` both frameworks start each prototype's power iteration from the same vector
(torch's seeded generator, which peftjax draws without torch), so the logits are equal to float
rounding; PEFT builds its prototypes and subtracts the general adapters at the first forward,
peftjax when the router is built and whenever an adapter comes or goes, which gives the same
numbers.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy, save_peft_adapters
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """The tiny Llama at ``root/base``, four task LoRAs ``t0``..``t3``, two general ones ``g0``, ``g1``, a
    rank-2 one and one on the embedding, all moved off their start as training would."""
    pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=TARGETS)
    specs = {f"t{i}": lora for i in range(4)} | {f"g{i}": lora for i in range(2)}
    specs |= {"rank2": dict(lora, r=2), "embedding": dict(lora, target_modules=TARGETS + ["embed_tokens"])}
    return save_peft_adapters(tmp_path_factory.mktemp("arrow"), specs, noise=0.1)


def both(root, config: dict, tasks=("t0", "t1", "t2"), general=None):
    """PEFT's and peftjax's Arrow models over the same adapter directories."""
    from peft.tuners.lora.arrow import create_arrow_model

    paths = [str(root / t) for t in tasks]
    general = None if general is None else [str(root / g) for g in general]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = create_arrow_model(_tiny.arch("llama").torch_class.from_pretrained(root / "base"), paths,
                                    peft.ArrowConfig(**config), general_adapter_paths=general)
    ours = peftjax.create_arrow_model(models.from_pretrained(root / "base"), paths, peftjax.ArrowConfig(**config),
                                      general_adapter_paths=general)
    return theirs, ours


def run_torch(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(ids)).logits.numpy()


_logits = nnx.jit(lambda m, ids: m(input_ids=ids).logits)


@pytest.mark.parametrize("gks", [False, True], ids=["arrow", "arrow+genknowsub"])
def test_arrow_routes_each_token_as_peft_and_takes_a_new_expert(adapters, gks):
    """Three task adapters, top 2 per token at temperature 0.5 (with GenKnowSub: minus the mean of two
    general ones): PEFT's logits, jitted here; then a fourth adapter loaded into each model becomes
    an expert (GenKnowSub applied to it alone) with PEFT's logits again."""
    config = dict(top_k=2, router_temperature=0.5, rng_seed=3, use_gks=gks)
    theirs, ours = both(adapters, config, general=("g0", "g1") if gks else None)
    expected = run_torch(theirs)
    np.testing.assert_allclose(np.asarray(_logits(ours.base_model, IDS)), expected, atol=1e-5, rtol=0)
    plain = np.asarray(models.from_pretrained(adapters / "base")(input_ids=IDS).logits)
    assert np.abs(expected - plain).max() > 1e-2  # the routed adapters move the logits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.load_adapter(str(adapters / "t3"), adapter_name="new")
        theirs.set_adapter("arrow_router")
    ours.load_adapter(adapters / "t3", adapter_name="new")
    ours.set_adapter("arrow_router")
    again = run_torch(theirs)
    np.testing.assert_allclose(np.asarray(_logits(ours.base_model, IDS)), again, atol=1e-5, rtol=0)
    assert np.abs(again - expected).max() > 1e-3


def test_arrow_generates_as_peft_and_its_router_config_is_peft_s(adapters, tmp_path):
    """Greedy generation through the router gives PEFT's tokens, and a ``scan_layers=True`` model
    its logits; deleting an expert rebuilds the router over the rest (the same logits as a router
    built over those); the router's file config is the one PEFT writes."""
    config = dict(top_k=2, rng_seed=0)
    theirs, ours = both(adapters, config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(input_ids=torch.as_tensor(IDS[:1]), max_new_tokens=5, do_sample=False).numpy()
    np.testing.assert_array_equal(np.asarray(ours.generate(input_ids=IDS[:1], max_new_tokens=5)), expected)
    scanned = peftjax.create_arrow_model(models.from_pretrained(adapters / "base", scan_layers=True),
                                         [str(adapters / t) for t in ("t0", "t1", "t2")], peftjax.ArrowConfig(**config))
    np.testing.assert_allclose(np.asarray(scanned(input_ids=IDS).logits), run_torch(theirs), atol=1e-5, rtol=0)

    ours.save_pretrained(tmp_path / "ours", selected_adapters=["arrow_router"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "theirs", selected_adapters=["arrow_router"])
    read = lambda who: json.loads((tmp_path / who / "arrow_router" / "adapter_config.json").read_text())  # noqa: E731
    assert read("ours")["arrow_config"] == read("theirs")["arrow_config"]
    assert read("ours")["arrow_config"]["task_adapter_names"] == ["task_0", "task_1", "task_2"]

    with pytest.raises(ValueError, match="routes over the task adapters loaded beside it .* has none"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(adapters / "base"), tmp_path / "ours" / "arrow_router")
    ours.delete_adapter("task_1")
    _, fewer = both(adapters, config, tasks=("t0", "t2"))
    np.testing.assert_allclose(np.asarray(ours(input_ids=IDS).logits), np.asarray(fewer(input_ids=IDS).logits),
                               atol=1e-6, rtol=0)


def test_arrow_refusals_are_peft_s_and_name_what_is_wrong(adapters):
    """Adapters of another rank or on an embedding, GenKnowSub without general adapters, ``top_k``
    above the task adapters, merging the router, DoRA with it, one router per row of a batch, a
    router through Linen (whose interceptor would apply the router's own factors as a LoRA)."""
    paths = lambda *names: [str(adapters / n) for n in names]  # noqa: E731
    base = lambda: models.from_pretrained(adapters / "base")  # noqa: E731
    with pytest.raises(ValueError, match=r"\[task_1\] rank mismatch: 2 != 4"):
        peftjax.create_arrow_model(base(), paths("t0", "rank2"), peftjax.ArrowConfig(top_k=1))
    with pytest.raises(TypeError, match="adapter 'task_0' on module 'model.embed_tokens'"):
        peftjax.create_arrow_model(base(), paths("embedding"), peftjax.ArrowConfig(top_k=1))
    with pytest.raises(ValueError, match="provide general LoRA paths"):
        peftjax.create_arrow_model(base(), paths("t0"), peftjax.ArrowConfig(top_k=1, use_gks=True))
    with pytest.raises(ValueError, match="top_k=3 is more than the 2 task adapters"):
        peftjax.create_arrow_model(base(), paths("t0", "t1"), peftjax.ArrowConfig(top_k=3))
    with pytest.raises(ValueError, match="top_k cannot be negative"):
        peftjax.ArrowConfig(top_k=0)
    with pytest.raises(ValueError, match=r"\('arrow_config', 'use_dora'\)"):
        peftjax.LoraConfig(arrow_config=peftjax.ArrowConfig(), use_dora=True)
    import jax
    from flax import linen as nn

    from peftjax import linen

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="out")(x)

    x = np.ones((2, 4), np.float32)
    with pytest.raises(NotImplementedError, match="an Arrow router .* not through peftjax.linen"):
        linen.inject(Mlp(), Mlp().init(jax.random.key(0), x)["params"],
                     peftjax.LoraConfig(target_modules=["out"], arrow_config=peftjax.ArrowConfig(top_k=1)),
                     sample_args=(x,), key=jax.random.key(1))
    router = lambda **kw: peftjax.LoraConfig(arrow_config=peftjax.ArrowConfig(top_k=1), **kw)  # noqa: E731
    with pytest.raises(TypeError, match="embed_tokens: an Arrow router .* routes linear layers only"):
        peftjax.get_peft_model(base(), router(target_modules=["embed_tokens"]))
    mixtral = models.MixtralForCausalLM.from_config(models.ModelConfig("mixtral", **_tiny.fields("mixtral")))
    with pytest.raises(ValueError, match=r"ParamWrapper does not work with an Arrow router \(arrow_config\)"):
        peftjax.get_peft_model(mixtral, router(target_parameters=["experts.gate_up_proj"]))
    model = peftjax.create_arrow_model(base(), paths("t0", "t1"), peftjax.ArrowConfig(top_k=1, rng_seed=0))
    with pytest.raises(RuntimeError, match="Cannot merge an active Arrow router adapter"):
        model.merge_adapter()
    with pytest.raises(NotImplementedError, match="`adapter_names` rows with an Arrow router"):
        model(input_ids=IDS, adapter_names=["arrow_router", "task_0"])
