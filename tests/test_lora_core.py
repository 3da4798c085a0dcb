"""The functional LoRA core on NNX models: dropout, optax freezing, key mapping, PiSSA/OLoRA init."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
import peftjax
from _torch_models import lazy
from peftjax import tuners
from peftjax.io import read_safetensors

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it


class UserMLP(nnx.Module):
    """A user's own NNX model whose names differ from its PyTorch twin's."""

    def __init__(self, rngs: nnx.Rngs):
        self.emb = nnx.Embed(20, 8, rngs=rngs)
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, ids):
        return self.fc2(jax.nn.relu(self.fc1(self.emb(ids))))


IDS = np.array([[1, 5, 7], [3, 3, 19]])


def call(jit: bool):
    """``module(x)``, eagerly or under ``nnx.jit``."""
    return nnx.jit(lambda m, x: m(x)) if jit else (lambda m, x: m(x))


def twin_from(model: UserMLP):
    """The model's PyTorch twin, under other names, with the same weights."""

    class TorchTwin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(20, 8)
            self.dense1 = torch.nn.Linear(8, 16)
            self.dense2 = torch.nn.Linear(16, 4)

        def forward(self, ids):
            return self.dense2(torch.relu(self.dense1(self.embed(ids))))

    twin = TorchTwin()
    with torch.no_grad():
        twin.embed.weight.copy_(torch.tensor(np.asarray(model.emb.embedding.get_value())))
        for src, dst in ((model.fc1, twin.dense1), (model.fc2, twin.dense2)):
            dst.weight.copy_(torch.tensor(np.asarray(src.kernel.get_value()).T))
            dst.bias.copy_(torch.tensor(np.asarray(src.bias.get_value())))
    return twin.eval()


def test_user_model_round_trips_through_peft_with_key_mapping(tmp_path, jit):
    model = UserMLP(nnx.Rngs(0))
    twin = twin_from(model)
    mapping = {r"^fc(\d)$": r"dense\1", r"^emb$": "embed"}
    config = peftjax.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2", "emb"], init_lora_weights=False)
    peft_model = peftjax.get_peft_model(model, config, key_mapping=mapping)
    peft_model.save_pretrained(tmp_path)
    # PEFT sees the twin's names in the file
    import json

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    saved["target_modules"] = ["dense1", "dense2", "embed"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(twin, tmp_path)
    with torch.no_grad():
        ref = theirs(torch.tensor(IDS)).numpy()
    ours = np.asarray(call(jit)(peft_model.base_model, IDS))
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert np.abs(ours - np.asarray(UserMLP(nnx.Rngs(0))(IDS))).max() > 1e-3


def test_dropout_needs_an_explicit_key(jit):
    model = UserMLP(nnx.Rngs(0))
    tuners.inject_lora(model, peftjax.LoraConfig(r=4, lora_dropout=0.5, init_lora_weights=False,
                                                target_modules=["fc1"]))

    def run(m, key):
        with peftjax.dropout_key(key):
            return m(IDS)

    call = nnx.jit(run) if jit else run
    a, b = call(model, jax.random.key(1)), call(model, jax.random.key(2))
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(call(model, jax.random.key(1))), np.asarray(a))
    plain = np.asarray(model(IDS))
    np.testing.assert_array_equal(np.asarray(model(IDS)), plain)  # no key: dropout is the identity


def test_multi_transform_labels_freeze_the_base():
    model = UserMLP(nnx.Rngs(0))
    tuners.inject_lora(model, peftjax.LoraConfig(r=4, target_modules=["fc1", "fc2"], bias="lora_only"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    labels = peftjax.optax_labels(params)
    leaves = jax.tree.leaves(labels)
    assert leaves.count("trainable") == 2 * 2 + 2  # A and B on two layers, plus their two biases
    tx = optax.multi_transform({"trainable": optax.adam(1e-2), "frozen": optax.set_to_zero()}, labels)
    opt_state = tx.init(params)
    moments = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "shape") and x.ndim > 0]
    n_trainable = sum(int(np.prod(x.shape)) for x, l in zip(jax.tree.leaves(params), leaves) if l == "trainable")
    assert sum(int(np.prod(x.shape)) for x in moments) == 2 * n_trainable  # mu and nu, nothing for the base

    def loss(p):
        return jnp.mean(nnx.merge(graphdef, p, rest)(IDS) ** 2)

    before = jax.tree.map(np.array, params)
    grad = jax.jit(jax.grad(loss))  # as a training step runs it (eager forwards: the tests of each layer)
    for _ in range(3):
        grads = grad(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    for old, new, label in zip(jax.tree.leaves(before), jax.tree.leaves(params), leaves):
        assert np.array_equal(old, np.asarray(new)) == (label == "frozen")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_match_peft(init):
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10)
    wrapper = torch.nn.Sequential()
    wrapper.add_module("proj", linear)
    original = linear.weight.detach().numpy().copy()
    theirs = peft.get_peft_model(wrapper, peft.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"],
                                                          init_lora_weights=init))
    layer = theirs.base_model.model.proj
    their_delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach().numpy() * 2.0
    their_residual = layer.base_layer.weight.detach().numpy()

    model = nnx.Module()
    model.proj = nnx.Linear(12, 10, rngs=nnx.Rngs(0))
    model.proj.kernel.set_value(jnp.asarray(original.T))
    tuners.inject_lora(model, peftjax.LoraConfig(r=3, lora_alpha=6, target_modules=["proj"], init_lora_weights=init))
    ours_delta = np.asarray(model.proj.delta_weight("default")).T
    np.testing.assert_allclose(np.asarray(model.proj.kernel.get_value()).T, their_residual, atol=1e-5)
    np.testing.assert_allclose(ours_delta, their_delta, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.proj.kernel.get_value()).T + ours_delta, original, atol=1e-5)


def test_gaussian_init_statistics():
    model = nnx.Module()
    model.proj = nnx.Linear(256, 256, rngs=nnx.Rngs(0))
    tuners.inject_lora(model, peftjax.LoraConfig(r=8, target_modules=["proj"], init_lora_weights="gaussian"))
    a = np.asarray(model.proj.lora_A["default"].get_value())
    assert abs(a.std() - 1 / 8) < 0.01
    assert not np.asarray(model.proj.lora_B["default"].get_value()).any()


def test_generate_with_an_adapter_differs_from_base():
    from peftjax.models import LlamaForCausalLM

    model = LlamaForCausalLM.from_config(_tiny.config("llama", vocab_size=64, num_hidden_layers=1, pad_token_id=None))
    prompt = np.array([[3, 4, 5, 6]])
    base = model.generate(prompt, max_new_tokens=6)
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, lora_alpha=64, init_lora_weights=False,
                                                                   target_modules="all-linear"))
    adapted = peft_model.generate(prompt, max_new_tokens=6)
    merged = peft_model.merge_and_unload().generate(prompt, max_new_tokens=6)
    np.testing.assert_array_equal(adapted, merged)
    assert not np.array_equal(adapted, base)


def test_inference_adapter_is_frozen(tmp_path):
    model = UserMLP(nnx.Rngs(0))
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=["fc1"]))
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * 8 + 2 * 16
    peft_model.save_pretrained(tmp_path)
    frozen = peftjax.PeftModel.from_pretrained(UserMLP(nnx.Rngs(0)), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = peftjax.PeftModel.from_pretrained(UserMLP(nnx.Rngs(0)), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == 2 * 8 + 2 * 16


def test_a_refused_layer_leaves_the_model_untouched():
    model = UserMLP(nnx.Rngs(0))
    before = jax.tree.map(np.asarray, nnx.state(model))
    with pytest.raises(NotImplementedError, match="emb"):
        tuners.inject_lora(model, peftjax.LoraConfig(r=2, target_modules=["fc1", "emb"], lora_bias=True))
    assert type(model.fc1) is nnx.Linear and not hasattr(model.fc1, "lora_A")
    after = jax.tree.map(np.asarray, nnx.state(model))
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))


def test_train_step_compiles_ahead_and_frees_the_compiler_heap_once(monkeypatch):
    """``make_train_step``'s first call compiles, returns the compiler's freed heap to the system
    (``release_host_memory``) and only then runs; later calls neither compile nor release again."""
    from peftjax.training import _step

    released = []
    monkeypatch.setattr(_step, "release_host_memory", lambda **kw: released.append(kw) or True)
    model = UserMLP(nnx.Rngs(0))
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    graphdef, trainable, rest = peftjax.split(peft_model.base_model)
    tx = optax.adam(1e-2)
    opt_state = tx.init(trainable)
    step = peftjax.make_train_step(graphdef, tx, lambda m, b: jnp.mean(m(b["ids"]) ** 2))
    batch = {"ids": jnp.asarray(IDS)}
    losses = []
    for _ in range(3):
        trainable, opt_state, loss = step(trainable, opt_state, rest, batch, None)
        losses.append(float(loss))
    assert released == [{"generation": 1}] and step._cache_size() == 1  # what the compilation left
    assert losses[2] < losses[0]


class Head(nnx.Module):
    """A task head that is a module of its own: two linears (as RoBERTa's classifier is)."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense = nnx.Linear(16, 16, rngs=rngs)
        self.out = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.dense(x)))


class HeadedMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.head = Head(rngs)

    def __call__(self, x):
        return self.head(jax.nn.relu(self.fc1(x)))


X = np.linspace(-1.0, 1.0, 16, dtype=np.float32).reshape(2, 8)


def headed_twin(model: HeadedMLP):
    """The model in PyTorch, same names and weights."""

    class TorchHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense, self.out = torch.nn.Linear(16, 16), torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.dense(x)))

    class TorchTwin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.head = torch.nn.Linear(8, 16), TorchHead()

        def forward(self, x):
            return self.head(torch.relu(self.fc1(x)))

    twin = TorchTwin()
    with torch.no_grad():
        for src, dst in ((model.fc1, twin.fc1), (model.head.dense, twin.head.dense), (model.head.out, twin.head.out)):
            dst.weight.copy_(torch.tensor(np.asarray(src.kernel.get_value()).T))
            dst.bias.copy_(torch.tensor(np.asarray(src.bias.get_value())))
    return twin.eval()


def test_a_head_made_of_modules_trains_whole_and_moves_both_ways_with_peft(tmp_path):
    """``modules_to_save`` naming a module that holds layers (not a single linear): every weight
    of its copy trains, the file carries them under PEFT's nested keys, PEFT gives the same
    outputs from it and the other way round, and ``merge_and_unload`` keeps the trained head."""
    config = peftjax.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"], init_lora_weights=False)
    peft_model = peftjax.get_peft_model(HeadedMLP(nnx.Rngs(0)), config)
    assert peft_model.get_nb_trainable_parameters()[0] == 2 * 8 + 2 * 16 + (16 * 16 + 16) + (16 * 3 + 3)
    _, trainable, _ = peftjax.split(peft_model.base_model)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    assert {f"head.modules_to_save.default.{m}.{w}" for m in ("dense", "out") for w in ("kernel", "bias")} <= paths
    # a trained head: move every weight of the copy, and check the model follows it
    copy = peft_model.base_model.head.modules_to_save["default"]
    before = np.asarray(peft_model(X))
    for layer in (copy.dense, copy.out):
        layer.kernel.set_value(layer.kernel.get_value() + 0.3)
    ours = np.asarray(peft_model(X))
    assert np.abs(ours - before).max() > 1e-2
    peft_model.save_pretrained(tmp_path)
    saved, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert saved["base_model.model.head.dense.weight"].shape == (16, 16)
    assert saved["base_model.model.head.out.weight"].shape == (3, 16)  # torch's [out, in]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(headed_twin(HeadedMLP(nnx.Rngs(0))), tmp_path)
    with torch.no_grad():
        np.testing.assert_allclose(theirs(torch.tensor(X)).numpy(), ours, atol=1e-5)
    reloaded = peftjax.PeftModel.from_pretrained(HeadedMLP(nnx.Rngs(0)), tmp_path)
    np.testing.assert_allclose(np.asarray(reloaded(X)), ours, atol=1e-6)
    merged = peft_model.merge_and_unload()
    assert type(merged.head.out.kernel) is nnx.Param
    np.testing.assert_allclose(np.asarray(merged(X)), ours, atol=1e-5)
    # PEFT's own adapter, its head's copy trained, read here
    pm = peft.get_peft_model(headed_twin(HeadedMLP(nnx.Rngs(0))),
                             peft.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"],
                                             init_lora_weights=False))
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(0.2)
        ref = pm(torch.tensor(X)).numpy()
    pm.save_pretrained(tmp_path / "peft")
    mine = peftjax.PeftModel.from_pretrained(HeadedMLP(nnx.Rngs(0)), tmp_path / "peft")
    np.testing.assert_allclose(np.asarray(mine(X)), ref, atol=1e-5)


def test_a_module_to_save_with_a_weight_no_file_can_name_is_refused():
    class Scaled(nnx.Module):
        def __init__(self, rngs):
            self.dense = nnx.Linear(16, 3, rngs=rngs)
            self.scale = nnx.Param(jnp.ones(3))

        def __call__(self, x):
            return self.dense(x) * self.scale[None]

    model = HeadedMLP(nnx.Rngs(0))
    model.head = Scaled(nnx.Rngs(1))
    with pytest.raises(ValueError, match=r"modules_to_save: head holds weights without a transformers name "
                                         r"\(Scaled\.scale\)"):
        peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, target_modules=["fc1"], modules_to_save=["head"]))
    assert type(model.fc1) is nnx.Linear and type(model.head) is Scaled  # refused before anything changed


def test_layer_status_names_peft_s_layer_classes(tiny_checkpoint):
    """``get_layer_status``'s ``module_type`` is PEFT's layer class, not the Flax one's name:
    ``lora.Linear`` on GPT-2's ``Conv1D``, ``lora.Embedding`` on an ``nnx.Embed``, ``lora.Conv2d``."""
    from peftjax import models

    status = lambda m: {(s.name, s.module_type) for s in m.get_layer_status()}  # noqa: E731
    path, targets = tiny_checkpoint("gpt2"), ["c_attn", "wte"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_tiny.arch("gpt2").torch_class.from_pretrained(path),
                                     peft.LoraConfig(r=2, target_modules=targets))
        ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(r=2, target_modules=targets))
    assert status(ours) == status(theirs) and {t for _, t in status(ours)} == {"lora.Linear", "lora.Embedding"}

    class Net(nnx.Module):
        def __init__(self):
            self.conv = nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0))

    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(3, 4, 3))
    theirs = peft.get_peft_model(net, peft.LoraConfig(r=2, target_modules=["conv"]))
    ours = peftjax.get_peft_model(Net(), peftjax.LoraConfig(r=2, target_modules=["conv"]))
    assert status(ours) == status(theirs) == {("model.conv", "lora.Conv2d")}
