"""LoRA on a user's own Linen model: the intercepted forward equals the merged weights equals a
hand-written reference; adapters stack and slice under ``nn.scan``; only adapters train."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax.core import FrozenDict

from peftjax.config import LoraConfig
from peftjax import dropout_key
from peftjax.linen import (
    combine,
    discover_layers,
    inject,
    intercept,
    merge_and_unload,
    split,
    trainable_labels,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


class Zoo(nn.Module):
    """One of each supported layer, and a LayerNorm; returns every layer's output."""

    @nn.compact
    def __call__(self, ids):
        e = nn.Embed(16, 6, name="embed")(ids)  # [b, t, 6]
        h = nn.Dense(8, name="dense")(e)  # [b, t, 8]
        g = nn.DenseGeneral((4, 8), name="general")(h)  # [b, t, 4, 8]
        k = nn.Einsum((4, 8, 5), "btfc,fce->bte", name="einsum")(g)  # [b, t, 5]
        n = nn.LayerNorm(name="norm")(k)
        c = nn.Conv(3, (3,), name="conv")(n)  # [b, t, 3]
        return {"embed": e, "dense": h, "general": g, "einsum": k, "conv": c}


class Block(nn.Module):
    """A transformer-ish block, written for ``nn.scan``: ``(carry, x) -> (carry, y)``."""

    @nn.compact
    def __call__(self, x, _):
        q = nn.Dense(16, name="q_proj")(x)
        v = nn.Dense(16, name="v_proj")(x)
        att = jax.nn.softmax(q @ jnp.swapaxes(x, -1, -2) / 4.0) @ v
        return nn.LayerNorm(name="ln")(x + nn.Dense(16, name="o_proj")(att)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="inp")(x)
        layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        x, _ = layers(name="layers")(x, None)
        return nn.Dense(2, name="head")(x)


class Wrap(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(8, name="proj")(x)


IDS = jnp.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 15]])
ZOO_TARGETS = ["embed", "dense", "general", "einsum", "conv"]


def forward(model, spec, jit):
    def f(params, *args):
        with intercept(spec):
            return model.apply({"params": params}, *args)

    return jax.jit(f) if jit else f


def maybe_jit(f, jit):
    return jax.jit(f) if jit else f


@pytest.fixture(scope="module")
def zoo_params():
    return jax.jit(Zoo().init)(jax.random.key(0), IDS)["params"]


@pytest.fixture(scope="module")
def zoo(zoo_params):
    model, params = Zoo(), zoo_params
    config = LoraConfig(r=4, lora_alpha=8, target_modules=ZOO_TARGETS, init_lora_weights=False)
    lora_params, spec = inject(model, params, config, sample_args=(IDS,), key=jax.random.key(1))
    return model, params, lora_params, spec


def test_discover_layers_names_kinds_and_shapes():
    layers = discover_layers(Zoo(), IDS)
    assert {n: (i.kind, i.kernel_shape) for n, i in layers.items()} == {
        "embed": ("embed", (16, 6)),
        "dense": ("dense", (6, 8)),
        "general": ("dense_general", (8, 4, 8)),
        "einsum": ("einsum", (4, 8, 5)),
        "norm": ("unsupported", None),
        "conv": ("conv", (3, 5, 3)),
    }
    assert layers["einsum"].in_shape == (4, 8) and layers["einsum"].out_shape == (5,)
    assert dict(layers["einsum"].details)["einsum_str"] == "btfc,fce->bte"
    assert dict(layers["conv"].details)["padding"] == "SAME"
    stack = discover_layers(Stack(), jnp.ones((2, 5, 4)))
    assert list(stack) == ["inp", "layers.q_proj", "layers.v_proj", "layers.o_proj", "layers.ln", "layers", "head"]
    assert stack["layers.q_proj"].stacked == (3,) and stack["layers.q_proj"].kernel_shape == (16, 16)
    assert stack["layers.q_proj"].path == ("layers", "q_proj")


def test_inject_layouts_and_purity(zoo):
    model, params, lora_params, spec = zoo
    assert split(params).trainable == {}  # the input tree is untouched
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), split(lora_params).trainable)
    f32 = jnp.float32
    assert shapes == {
        "embed": {"lora_A": {"default": ((16, 4), f32)}, "lora_B": {"default": ((4, 6), f32)}},
        "dense": {"lora_A": {"default": ((6, 4), f32)}, "lora_B": {"default": ((4, 8), f32)}},
        "general": {"lora_A": {"default": ((8, 4), f32)}, "lora_B": {"default": ((4, 32), f32)}},
        "einsum": {"lora_A": {"default": ((32, 4), f32)}, "lora_B": {"default": ((4, 5), f32)}},
        "conv": {"lora_A": {"default": ((3, 5, 4), f32)}, "lora_B": {"default": ((4, 3), f32)}},
    }
    assert [layer.name for layer in spec.layers] == ZOO_TARGETS
    assert spec.layer("dense").adapter["default"].scaling == 2.0
    assert hash(spec) == hash(spec)  # static, usable as a jit static argument


def test_default_init_is_a_no_op(zoo_params, jit):
    model, params = Zoo(), zoo_params
    config = LoraConfig(r=4, target_modules=ZOO_TARGETS)
    lora_params, spec = inject(model, params, config, sample_args=(IDS,), key=jax.random.key(1))
    adapters = split(lora_params).trainable
    assert not adapters["dense"]["lora_B"]["default"].any()
    assert not adapters["embed"]["lora_A"]["default"].any()  # PEFT: embedding A = 0, B ~ N(0, 1)
    assert adapters["embed"]["lora_B"]["default"].any()
    bound = 1 / np.sqrt(6)  # kaiming_uniform(a=sqrt(5)) on fan_in = 6
    assert 0 < np.abs(adapters["dense"]["lora_A"]["default"]).max() <= bound
    out = forward(model, spec, jit)(lora_params, IDS)
    base = maybe_jit(lambda p, x: model.apply({"params": p}, x), jit)(params, IDS)
    for name in ZOO_TARGETS:
        if jit:  # XLA may fuse the adapted layer's float32 math differently from the plain one's
            np.testing.assert_allclose(out[name], base[name], rtol=0, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(out[name], base[name])


def test_intercepted_equals_merged_and_dense_reference(zoo, jit):
    model, params, lora_params, spec = zoo
    out = forward(model, spec, jit)(lora_params, IDS)
    base = maybe_jit(lambda p, x: model.apply({"params": p}, x), jit)(params, IDS)
    merged = maybe_jit(lambda p, x: model.apply({"params": merge_and_unload(p, spec)}, x), jit)(lora_params, IDS)
    for name in ZOO_TARGETS:
        assert not np.allclose(out[name], base[name], atol=1e-3), name  # the adapter matters
        np.testing.assert_allclose(out[name], merged[name], **TOL, err_msg=name)

    s = 2.0  # lora_alpha / r
    p = lora_params
    a, b = p["dense"]["lora_A"]["default"], p["dense"]["lora_B"]["default"]
    x = out["embed"]  # the (adapted) input the Dense layer saw
    np.testing.assert_allclose(out["dense"], x @ p["dense"]["kernel"] + p["dense"]["bias"][None, None] + s * (x @ a) @ b, **TOL)

    a, b = p["embed"]["lora_A"]["default"], p["embed"]["lora_B"]["default"]
    np.testing.assert_allclose(out["embed"], p["embed"]["embedding"][IDS] + s * a[IDS] @ b, **TOL)

    a, b = p["general"]["lora_A"]["default"], p["general"]["lora_B"]["default"]
    x = out["dense"]
    flat = x @ p["general"]["kernel"].reshape(8, 32) + p["general"]["bias"].reshape(1, 1, 32) + s * (x @ a) @ b
    np.testing.assert_allclose(out["general"], flat.reshape(2, 5, 4, 8), **TOL)


def test_scan_stacks_and_slices_adapters(jit):
    model = Stack()
    x = jax.random.normal(jax.random.key(2), (2, 5, 4))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lora_params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
    adapters = split(lora_params).trainable
    assert jax.tree.map(jnp.shape, adapters) == {
        "layers": {
            "q_proj": {"lora_A": {"default": (3, 16, 2)}, "lora_B": {"default": (3, 2, 16)}},
            "v_proj": {"lora_A": {"default": (3, 16, 2)}, "lora_B": {"default": (3, 2, 16)}},
        }
    }
    a = adapters["layers"]["q_proj"]["lora_A"]["default"]
    assert not np.allclose(a[0], a[1])  # each scanned layer gets its own init

    f = forward(model, spec, jit)
    out = f(lora_params, x)
    base = model.apply({"params": params}, x)
    merged = maybe_jit(lambda p, x: model.apply({"params": merge_and_unload(p, spec)}, x), jit)(lora_params, x)
    assert not np.allclose(out, base, atol=1e-3)
    np.testing.assert_allclose(out, merged, **TOL)
    assert jax.tree.map(jnp.shape, merge_and_unload(lora_params, spec)) == jax.tree.map(jnp.shape, params)

    # Only layer 1's B changes: the output moves, and the merged path follows it.
    target = "['layers']['v_proj']['lora_B']['default']"
    bumped = jax.tree_util.tree_map_with_path(
        lambda path, v: v.at[1].add(0.5) if jax.tree_util.keystr(path) == target else v, lora_params
    )
    out_bumped = f(bumped, x)
    assert not np.allclose(out_bumped, out, atol=1e-4)
    np.testing.assert_allclose(out_bumped, model.apply({"params": merge_and_unload(bumped, spec)}, x), **TOL)


def _regression_setup():
    model = Stack()
    x = jax.random.normal(jax.random.key(2), (4, 5, 4))
    target = jax.random.normal(jax.random.key(3), (4, 5, 2))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "head"])
    lora_params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))

    def loss_fn(params):
        with intercept(spec):
            return jnp.mean((model.apply({"params": params}, x) - target) ** 2)

    return lora_params, loss_fn


def test_training_adapters_only_lowers_the_loss():
    params, loss_fn = _regression_setup()
    adapters, base = split(params)
    tx = optax.adam(1e-2)
    state = tx.init(adapters)

    @jax.jit
    def step(adapters, state, base):
        loss, grads = jax.value_and_grad(lambda a: loss_fn(combine(a, base)))(adapters)
        updates, state = tx.update(grads, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    losses = []
    for _ in range(15):
        adapters, state, loss = step(adapters, state, base)
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0]


def test_multi_transform_freezes_base_and_keeps_no_frozen_state():
    params, loss_fn = _regression_setup()
    labels = trainable_labels(params)
    assert labels["layers"]["q_proj"] == {"kernel": "frozen", "bias": "frozen", "lora_A": {"default": "trainable"},
                                          "lora_B": {"default": "trainable"}}  # fmt: skip
    tx = optax.multi_transform({"trainable": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    new, state_after = params, state
    for _ in range(5):
        new, state_after, loss = step(new, state_after)
    jax.tree.map(np.testing.assert_array_equal, split(new).rest, split(params).rest)
    assert not all(jax.tree.leaves(jax.tree.map(np.array_equal, split(new).trainable, split(params).trainable)))

    assert jax.tree.leaves(state_after.inner_states["frozen"]) == []  # set_to_zero: no state at all
    adapter_shapes = sorted(a.shape for a in jax.tree.leaves(split(params).trainable))
    for moment in ("mu", "nu"):  # adam's moments exist for the adapter leaves only
        tree = optax.tree_utils.tree_get(state_after, moment)
        assert sorted(a.shape for a in jax.tree.leaves(tree)) == adapter_shapes


def test_dropout_follows_the_key(jit):
    wrapper = Wrap()
    x = jax.random.normal(jax.random.key(2), (16, 6))
    params = wrapper.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.5, init_lora_weights=False)
    lora_params, spec = inject(wrapper, params, config, sample_args=(x,), key=jax.random.key(1))

    def f(params, key):
        with dropout_key(key), intercept(spec):
            return wrapper.apply({"params": params}, x)

    g = maybe_jit(f, jit)
    k1, k2 = jax.random.key(7), jax.random.key(8)
    assert not np.allclose(g(lora_params, k1), g(lora_params, k2))
    np.testing.assert_array_equal(g(lora_params, k1), g(lora_params, k1))
    deterministic = forward(wrapper, spec, jit)(lora_params, x)
    np.testing.assert_array_equal(deterministic, forward(wrapper, spec, jit)(lora_params, x))
    np.testing.assert_allclose(deterministic, wrapper.apply({"params": merge_and_unload(lora_params, spec)}, x), **TOL)


def test_dora_matches_peft_formula_and_merge(jit):
    wrapper = Wrap()
    x = jax.random.normal(jax.random.key(2), (3, 6))
    params = wrapper.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False, use_dora=True)
    lora_params, spec = inject(wrapper, params, config, sample_args=(x,), key=jax.random.key(1))
    p = lora_params["proj"]
    w, bias, a, b = p["kernel"], p["bias"], p["lora_A"]["default"], p["lora_B"]["default"]
    np.testing.assert_allclose(p["lora_magnitude_vector"]["default"], np.linalg.norm(w + 2.0 * a @ b, axis=0), **TOL)
    lora_params = jax.tree_util.tree_map_with_path(  # a trained magnitude, so DoRA matters
        lambda path, v: v * 1.5 if "magnitude" in jax.tree_util.keystr(path) else v, lora_params
    )
    m = lora_params["proj"]["lora_magnitude_vector"]["default"]
    out = forward(wrapper, spec, jit)(lora_params, x)
    factor = (m / np.linalg.norm(w + 2.0 * a @ b, axis=0))[None]
    expected = x @ w + bias[None] + (factor - 1) * (x @ w) + factor * 2.0 * ((x @ a) @ b)
    np.testing.assert_allclose(out, expected, **TOL)
    np.testing.assert_allclose(out, wrapper.apply({"params": merge_and_unload(lora_params, spec)}, x), **TOL)


def test_dora_and_lora_bias_on_every_linear_kind(zoo_params, jit):
    model, params = Zoo(), zoo_params
    targets = ["dense", "general", "einsum", "conv"]
    for extra in ({"use_dora": True}, {"lora_bias": True}):
        config = LoraConfig(r=2, target_modules=targets, init_lora_weights=False, **extra)
        lora_params, spec = inject(model, params, config, sample_args=(IDS,), key=jax.random.key(1))
        lora_params = jax.tree_util.tree_map_with_path(  # trained values, so both matter
            lambda path, v: v * 1.5 + 0.1 if "lora_magnitude" in str(path) or "lora_B_bias" in str(path) else v,
            lora_params,
        )
        out = forward(model, spec, jit)(lora_params, IDS)
        merged = model.apply({"params": merge_and_unload(lora_params, spec)}, IDS)
        for name in targets:
            np.testing.assert_allclose(out[name], merged[name], **TOL, err_msg=f"{extra} {name}")


def test_second_adapter_and_subclass_calling_super(jit):
    class MyDense(nn.Dense):
        def __call__(self, x):
            return super().__call__(x) * 1.0

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return MyDense(4, name="proj")(x)

    model, x = Net(), jax.random.normal(jax.random.key(2), (3, 5))
    params = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False)
    p1, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
    p2, spec2 = inject(model, p1, config, sample_args=(x,), key=jax.random.key(2), adapter_name="other", spec=spec)
    assert spec2.active == ("default",) and spec2.adapter_names == ("default", "other")
    one = forward(model, spec2, jit)(p2, x)
    np.testing.assert_allclose(one, model.apply({"params": merge_and_unload(p2, spec2)}, x), **TOL)  # added once
    other = forward(model, spec2.with_active("other"), jit)(p2, x)
    assert not np.allclose(one, other)
    both = forward(model, spec2.with_active("default", "other"), jit)(p2, x)
    np.testing.assert_allclose(both, model.apply({"params": merge_and_unload(p2, spec2, ["default", "other"])}, x), **TOL)
    with pytest.raises(ValueError, match="already exists"):
        inject(model, p2, config, sample_args=(x,), key=jax.random.key(2), adapter_name="other", spec=spec2)


def test_split_combine_and_labels_keep_structure():
    params = FrozenDict({"q": {"kernel": jnp.ones((2, 3)), "lora_A": {"default": jnp.ones((2, 1))}}, "o": {"w": 1.0}})
    adapters, base = split(params)
    assert isinstance(base, FrozenDict) and "lora_A" not in base["q"] and list(adapters) == ["q"]
    assert jax.tree.structure(combine(adapters, base)) == jax.tree.structure(params)
    labels = trainable_labels(params)
    assert jax.tree.structure(labels) == jax.tree.structure(params)
    assert labels["q"]["lora_A"]["default"] == "trainable" and labels["o"]["w"] == "frozen"
    with pytest.raises(ValueError, match="params/q/lora_A"):
        combine(adapters, params)


def test_errors_name_the_problem(zoo_params):
    model, params = Zoo(), zoo_params
    with pytest.raises(ValueError, match=r"closest to 'dens': dense"):
        inject(model, params, LoraConfig(target_modules=["dens"]), sample_args=(IDS,), key=jax.random.key(1))
    with pytest.raises(TypeError, match=r"norm \(LayerNorm\)"):
        inject(model, params, LoraConfig(target_modules=["norm", "dense"]), sample_args=(IDS,), key=jax.random.key(1))
    bad = jax.tree.map(lambda a: a, params) | {"dense": {"kernel": jnp.ones((7, 8)), "bias": jnp.ones(8)}}
    with pytest.raises(ValueError, match=r"params/dense/kernel: expected shape \[6, 8\], found \[7, 8\]"):
        inject(model, bad, LoraConfig(target_modules=["dense"]), sample_args=(IDS,), key=jax.random.key(1))
    _, spec = inject(model, params, LoraConfig(target_modules=["dense"]), sample_args=(IDS,), key=jax.random.key(1))
    with pytest.raises(ValueError, match="params have no lora_A/default"):
        forward(model, spec, False)(params, IDS)


def test_pissa_and_olora_rewrite_the_base_and_keep_the_output(jit):
    model = Stack()
    x = jax.random.normal(jax.random.key(2), (2, 5, 4))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    base_out = model.apply({"params": params}, x)
    for init in ("pissa", "olora"):
        config = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
        lora_params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
        kernel = lora_params["layers"]["q_proj"]["kernel"]
        assert kernel.shape == (3, 16, 16) and not np.allclose(kernel, params["layers"]["q_proj"]["kernel"])
        assert lora_params["layers"]["q_proj"]["lora_B"]["default"].any()
        np.testing.assert_allclose(forward(model, spec, jit)(lora_params, x), base_out, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(model.apply({"params": merge_and_unload(lora_params, spec)}, x), base_out, rtol=1e-4, atol=1e-4)


class Head(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="proj")(x)  # inside a clone of the head its path is ("proj",)


class Tower(nn.Module):
    @nn.compact
    def __call__(self, x):
        return Head(name="head")(nn.relu(nn.Dense(6, name="proj")(x)))


def test_modules_to_save_runs_its_copy_and_merge_keeps_it(jit):
    model, x = Tower(), jax.random.normal(jax.random.key(2), (3, 5))
    params = model.init(jax.random.key(0), x)["params"]
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], modules_to_save=["head"], init_lora_weights=False)
    lora_params, spec = inject(model, params, config, sample_args=(x,), key=jax.random.key(1))
    assert [layer.name for layer in spec.layers] == ["proj"]  # head.proj is inside a saved module
    assert [(s.name, s.adapters) for s in spec.saved] == [("head", ("default",))]
    adapters = split(lora_params, spec).trainable
    copy_shapes = {"proj": {"bias": (2,), "kernel": (6, 2)}}
    assert jax.tree.map(jnp.shape, adapters["head"]) == {"modules_to_save": {"default": copy_shapes}}
    assert trainable_labels(lora_params, spec)["head"]["proj"]["kernel"] == "frozen"
    lora_params = jax.tree_util.tree_map_with_path(  # a trained copy
        lambda path, v: v + 0.5 if "modules_to_save" in jax.tree_util.keystr(path) else v, lora_params
    )
    out = forward(model, spec, jit)(lora_params, x)
    p, copy = lora_params["proj"], lora_params["head"]["modules_to_save"]["default"]["proj"]
    h = jax.nn.relu(x @ p["kernel"] + p["bias"][None] + 2.0 * (x @ p["lora_A"]["default"]) @ p["lora_B"]["default"])
    np.testing.assert_allclose(out, h @ copy["kernel"] + copy["bias"][None], **TOL)
    merged = merge_and_unload(lora_params, spec)
    assert jax.tree.map(jnp.shape, merged) == jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(model.apply({"params": merged}, x), out, **TOL)
    no_adapter = forward(model, spec.with_active(), jit)(lora_params, x)
    np.testing.assert_allclose(no_adapter, model.apply({"params": params}, x), **TOL)  # originals untouched

    p2, spec2 = inject(model, lora_params, config, sample_args=(x,), key=jax.random.key(3), adapter_name="b",
                       spec=spec)  # fmt: skip
    with pytest.raises(ValueError, match="each have a modules_to_save copy of head"):
        forward(model, spec2.with_active("default", "b"), False)(p2, x)
    with pytest.raises(ValueError, match="each have a modules_to_save copy of head"):
        merge_and_unload(p2, spec2, ["default", "b"])


def test_bias_modes_make_biases_trainable():
    model = Stack()
    x = jax.random.normal(jax.random.key(2), (2, 5, 4))
    params = jax.jit(model.init)(jax.random.key(0), x)["params"]
    kwargs = {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": False}
    only, spec = inject(model, params, LoraConfig(bias="lora_only", **kwargs), sample_args=(x,), key=jax.random.key(1))
    labels = trainable_labels(only, spec)
    assert labels["layers"]["q_proj"]["bias"] == "trainable" and labels["layers"]["q_proj"]["kernel"] == "frozen"
    assert labels["layers"]["ln"]["bias"] == "frozen" and labels["inp"]["bias"] == "frozen"
    assert trainable_labels(only)["layers"]["q_proj"]["bias"] == "frozen"  # without the spec: structure only

    every, spec = inject(model, params, LoraConfig(bias="all", **kwargs), sample_args=(x,), key=jax.random.key(1))
    trainable, base = split(every, spec)
    assert "bias" not in base["layers"]["ln"] and "bias" not in base["head"]
    assert jax.tree.map(jnp.shape, trainable["layers"]["ln"]) == {"bias": (3, 16)}
    assert jax.tree.structure(combine(trainable, base)) == jax.tree.structure(every)
    labels = trainable_labels(every, spec)  # the same leaves split puts on the trainable side
    pairs = zip(jax.tree.leaves(every), jax.tree.leaves(labels), strict=True)
    assert sorted(a.shape for a in jax.tree.leaves(trainable)) == sorted(v.shape for v, t in pairs if t == "trainable")
    with pytest.raises(ValueError, match="only one adapter may train them"):
        inject(model, every, LoraConfig(bias="all", **kwargs), sample_args=(x,), key=jax.random.key(1),
               adapter_name="other", spec=spec)  # fmt: skip


def test_split_order_and_names_match_nnx_and_merge_points_to_merge_and_unload():
    import peftjax
    from peftjax import linen as pl

    model = Wrap()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    lora_params, spec = inject(model, params, LoraConfig(r=2, target_modules=["proj"]), sample_args=(x,),
                               key=jax.random.key(1))
    parts = split(lora_params, spec)
    assert type(parts)._fields == ("trainable", "rest")  # peftjax.split: (graphdef, trainable, rest)
    trainable, rest = parts
    assert jax.tree.leaves(trainable) and all("lora_" in jax.tree_util.keystr(p)
                                              for p, _ in jax.tree_util.tree_flatten_with_path(trainable)[0])
    assert jax.tree.structure(combine(trainable, rest)) == jax.tree.structure(lora_params)
    with pytest.raises(TypeError, match="merge_and_unload"):
        pl.merge(lora_params, spec)
    assert pl.merge is not peftjax.merge
