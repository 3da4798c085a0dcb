"""What the tests of PEFT's layer methods share: tiny Llama/BERT/GPT-2 checkpoints, PEFT's and
peftjax's logits on a padded batch, and the both-ways interop check each method's cases run."""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import optax
from flax import nnx

import _tiny
from _torch_models import lazy, quiet  # noqa: F401  (quiet: for the method files)
import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.tuners.base import adapter_layers

torch, peft = lazy("torch"), lazy("peft")

ARCHS = {name: _tiny.arch(name) for name in ("llama", "bert", "gpt2")}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
LLAMA = ["q_proj", "v_proj", "down_proj"]  # in x out: 32 x 32, 32 x 16, 48 x 32

def torch_base(arch, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(path).eval()


def peft_frod_u_from_its_basis(model) -> None:
    """Each FRoD layer's ``U`` of a PEFT model computed from the basis it holds, by PEFT's own
    function: PEFT 0.22.0's loader replaces the bases by the file's but keeps the ``U`` of those it
    computed itself (the same only where its eigenvector signs are the file's; see test_frod.py)."""
    from peft.tuners.frod.layer import FrodLayer

    for module in model.modules():
        if isinstance(module, FrodLayer):
            for name in module.frod_lambda_l:
                u, _ = module._calculate_frod_u_and_lambda(module.frod_V[name], module.get_base_layer().weight)
                module.frod_U[name] = u


def run_torch(model):
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


_logits = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)


def run_jax(model, jit=False):
    model = getattr(model, "base_model", model)
    if jit:
        return np.asarray(_logits(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def valid(x, mask=MASK):
    return x[mask.astype(bool)] if x.ndim == 3 else x


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(valid(np.asarray(a)), valid(np.asarray(b)), atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(valid(np.asarray(a)) - valid(np.asarray(b))).max())


def train_with_trainer(model, output_dir) -> list[float]:
    args = peftjax.TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=3,
                                     learning_rate=2e-2, logging_steps=1, disable_tqdm=True, report_to="none",
                                     plot=False)
    peftjax.Trainer(model, args, {"input_ids": IDS.tolist(), "labels": IDS.tolist()}).train()
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def check_interop(spec, checkpoints, tmp_path, capsys, *, eager: bool = False) -> None:
    """A PEFT-made adapter moved off its start gives PEFT's logits here (eager and jitted);
    trained further here, it loads in PEFT with equal logits, also merged there; merged here
    equals unmerged, unmerge restores the weights, and the merged export gives the same logits in
    transformers alone. ``spec``: ``(config class, arch, fields, how it trains)`` (see CASES);
    ``eager``: the logits without ``jit`` too."""
    config_class, arch, fields, through_trainer = spec
    path, task = checkpoints[arch], ARCHS[arch].task
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch_model = peft.get_peft_model(torch_base(arch, path), getattr(peft, config_class)(task_type=task, **fields))
        trainable = torch_model.get_nb_trainable_parameters()
        torch.manual_seed(1)
        with torch.no_grad():  # most of these start as the identity: move every trained tensor
            for p in torch_model.parameters():
                if p.requires_grad:
                    p.add_(0.1 * torch.randn_like(p))
        torch_model.save_pretrained(tmp_path / "theirs")
        ref = run_torch(torch_model.eval())
    assert changed(ref, run_torch(torch_base(arch, path))) > 1e-3

    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs", is_trainable=True)
    assert model.get_nb_trainable_parameters() == trainable
    status = lambda m: {(s.name, s.module_type) for s in m.get_layer_status()}  # noqa: E731
    assert status(model) == status(torch_model)
    for jit in (False, True) if eager else (True,):  # eager once: the jitted forward is the same code
        assert_close(run_jax(model, jit=jit), ref)
    if any(fields.get(f) for f in ("miss_dropout", "module_dropout", "gralora_dropout", "hira_dropout",  # training only
                                   "randlora_dropout", "vblora_dropout", "deft_dropout", "lora_dropout",
                                   "pvera_dropout")):
        with peftjax.dropout_key(jax.random.key(0)):
            assert changed(run_jax(model), ref) > 1e-4

    if through_trainer is True:
        losses = train_with_trainer(model, tmp_path / "run")
    else:  # the functional core
        losses = _tiny.train(model, _tiny.batch(IDS, MASK, task), steps=3, optimizer=optax.adam(2e-2),
                             dropout=through_trainer != "no dropout").losses
    assert losses[-1] < losses[0]
    ours = run_jax(model, jit=True)
    assert changed(ours, ref) > 1e-3
    model.save_pretrained(tmp_path / "ours")
    configs = [json.loads((tmp_path / who / "adapter_config.json").read_text()) for who in ("ours", "theirs")]
    for config in configs:  # who wrote it and from where; PEFT writes a set's items in no fixed order
        for key in ("peft_version", "base_model_name_or_path", "revision", "auto_mapping"):
            config.pop(key, None)
        if isinstance(config.get("target_modules"), list):
            config["target_modules"] = sorted(config["target_modules"])
    assert configs[0] == configs[1]  # PEFT's fields and the values it settled (GPT-2's fan_in_fan_out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base(arch, path), tmp_path / "ours").eval()
        assert_close(ours, run_torch(theirs))
        theirs.merge_adapter()
        assert_close(ours, run_torch(theirs))
    infos = []
    for who in ("ours", "theirs"):  # the same tensors in both files (DeLoRA's frozen norms too)
        assert main(["inspect", str(tmp_path / who), "--json"]) == 0
        infos.append(json.loads(capsys.readouterr().out))
    assert infos[0]["method"] == getattr(peftjax, config_class).peft_type
    assert infos[0]["parameters"] == infos[1]["parameters"]
    if not fields.get("save_only_topk_weights"):  # which keeps each row's top k of the logits only
        assert infos[0]["parameters"] >= trainable[0]

    layers = adapter_layers(model.base_model)
    weight = lambda m: np.array((m.embedding if isinstance(m, nnx.Embed) else m.kernel).get_value())  # noqa: E731
    weights = {n: weight(m) for n, m in layers.items()}
    model.merge_adapter()
    assert_close(run_jax(model), ours)
    model.unmerge_adapter()
    for n, m in layers.items():
        np.testing.assert_allclose(weight(m), weights[n], atol=1e-5, rtol=0, err_msg=n)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert_close(run_torch(torch_base(arch, tmp_path / "merged")), ours)




def peft_steps(model, batch: dict, optimizer, steps: int = 3, extra_loss=None):
    """``steps`` of PEFT's own training loop (train mode) on ``batch`` (its ``input_ids``,
    ``attention_mask`` where given and ``labels``), ``extra_loss(model)`` added to the loss where
    given; returns the model in eval mode."""
    model.train()
    inputs = {k: torch.tensor(np.asarray(batch[k])) for k in ("input_ids", "attention_mask", "labels") if k in batch}
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**inputs).loss
        (loss if extra_loss is None else loss + extra_loss(model)).backward()
        optimizer.step()
    return model.eval()


def assert_refused_before_any_change(path, fields: dict, error, message: str, peft_refuses: bool) -> None:
    """``get_peft_model`` on the tiny Llama at ``path`` with ``LoraConfig(**fields)`` raises ``error``
    matching ``message`` and leaves the base as it was (no adapter layer, its class, its logits);
    where ``peft_refuses``, PEFT's ``get_peft_model`` raises too."""
    import pytest

    base = models.from_pretrained(path)
    cls, before = type(base), run_jax(base)
    with pytest.raises(error, match=message):
        peftjax.get_peft_model(base, peftjax.LoraConfig(**fields))
    assert not adapter_layers(base) and type(base) is cls
    np.testing.assert_array_equal(run_jax(base), before)
    if peft_refuses:
        with pytest.raises((ValueError, TypeError)), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.get_peft_model(torch_base("llama", path), peft.LoraConfig(**fields))


def assert_linen_refuses(fields: dict, message: str) -> None:
    """``peftjax.linen.inject`` of ``LoraConfig(**fields, target_modules=["proj"])`` into a one-layer
    Linen model raises ``NotImplementedError`` matching ``message``."""
    import flax.linen as nn
    import pytest

    from peftjax import linen

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, name="proj")(x)

    x = np.ones((1, 8), np.float32)
    params = Net().init(jax.random.key(0), x)["params"]
    with pytest.raises(NotImplementedError, match=message):
        linen.inject(Net(), params, peftjax.LoraConfig(**fields, target_modules=["proj"]), sample_args=(x,),
                     key=jax.random.key(0))


def tiny_bert_with_tokenizer(directory):
    """A tiny BERT checkpoint (16 wide) with the packaged MiniLM's tokenizer saved beside it, what
    ``peftjax train`` needs; returns the tokenizer."""
    from transformers import AutoTokenizer, BertModel

    from _torch_models import save_tiny
    from peftjax.data import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    save_tiny(BertModel, _tiny.config("bert", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_attention_heads=2, pad_token_id=0), directory)
    tokenizer.save_pretrained(directory)
    return tokenizer


def assert_scanned_equals_loop(path, config, directory) -> None:
    """An adapter made on the tiny Llama at ``path`` (``config``), saved to ``directory``, gives the
    same logits on the ``scan_layers=True`` model (jitted), merged there too."""
    loop = peftjax.get_peft_model(models.from_pretrained(path), config)
    loop.save_pretrained(directory)
    expected = run_jax(loop)
    scanned = peftjax.PeftModel.from_pretrained(models.from_pretrained(path, scan_layers=True), directory)
    assert_close(run_jax(scanned, jit=True), expected)
    scanned.merge_adapter()
    assert_close(run_jax(scanned), expected)
