"""The PyTorch oracle: tiny random transformers models, built in PyTorch and saved, and lazy imports.

A test file that mixes oracle tests with pure-JAX ones imports torch and peft with :func:`lazy`
(``torch = lazy("torch")``), never with a module-level ``pytest.importorskip``: the first use of
``torch.<anything>`` in a test skips that test where torch is not installed, and the file's
pure-JAX tests still run.
"""

from __future__ import annotations


import numpy as np
import pytest


class lazy:  # noqa: N801 - stands in for a module
    """A module imported on first attribute access; the test that touches it skips without it."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        # pytest's collection and inspect probe module globals for dunders (__wrapped__, __test__,
        # __bases__, ...): those must not import, or skip the whole file; __version__ is a real use
        if attr.startswith("__") and attr not in ("__version__", "__file__"):
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def jitted(model, **inputs):
    """``model(**inputs)`` as one compiled call (``nnx.jit``), the inputs as JAX arrays."""
    import jax.numpy as jnp
    from flax import nnx

    return nnx.jit(lambda m, kw: m(**kw))(model, {k: jnp.asarray(v) for k, v in inputs.items()})


def save_tiny(model_cls, config, directory, seed: int = 0, **save_kwargs):
    """Builds ``model_cls(config)`` with a fixed seed in eval mode and saves it to ``directory``."""
    torch = pytest.importorskip("torch")

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.save_pretrained(directory, **save_kwargs)
    return model


def randomised(model, scale: float = 0.3, seed: int = 0):
    """Every weight of ``model`` drawn anew, norms around 1 and the rest around 0 (``scale`` std):
    a swapped expert, gate/up half or layer shows at once. Returns the model."""
    torch = pytest.importorskip("torch")

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn_like(p))
    return model


def save_perturbed(model_cls, config, directory, scale: float = 0.2):
    """``model_cls(config)`` with every weight moved off its initialisation by noise (``scale``
    std, seed 0: norms stay near 1), in eval mode, saved to ``directory``. Returns the model."""
    torch = pytest.importorskip("torch")

    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def save_random(family: str, class_name: str, directory, **overrides):
    """transformers' ``class_name`` of ``family``'s tiny config (``_tiny``, with ``overrides``), every
    weight moved by noise (:func:`save_perturbed`), saved to ``directory``. Returns the model."""
    import _tiny
    import transformers

    return save_perturbed(getattr(transformers, class_name), _tiny.config(family, **overrides), directory)


def at_tokens(x, mask):
    """``x`` at the real (unmasked) tokens where it has a token axis (``[batch, seq, ...]`` or
    ``[batch, seq]`` like ``mask``), else ``x`` as it is."""
    mask = np.asarray(mask)
    return x[mask.astype(bool)] if x.ndim == 3 or (x.ndim == 2 and x.shape == mask.shape) else x


def moved_off_start(peft_model, seed: int, scale: float = 0.3):
    """PEFT's model with every trainable tensor (its adapters, the copies of the modules it saves)
    moved by noise (``scale`` std), in eval mode: what a trained adapter holds, so that a file read
    in the other framework shows every tensor's place. Returns the model."""
    torch = pytest.importorskip("torch")

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return peft_model.eval()


def peft_file(torch_class, base, config, out, **inputs) -> np.ndarray:
    """PEFT's adapter of ``config`` on ``torch_class`` read from ``base``, moved off its start
    (:func:`moved_off_start`) and saved to ``out``; returns its logits on ``inputs``."""
    peft = pytest.importorskip("peft")

    theirs = moved_off_start(quiet(peft.get_peft_model, quiet(torch_class.from_pretrained, base), config), 0, 0.1)
    theirs.save_pretrained(out)
    return torch_logits(theirs, **inputs)


def assert_peft_reads(model, torch_class, base, adapter, *, base_kwargs=None, **inputs) -> None:
    """``model`` (a peftjax ``PeftModel``) saved to ``adapter`` and loaded by PEFT on
    ``torch_class`` read from ``base`` (with ``base_kwargs``): the same logits on ``inputs``."""
    peft = pytest.importorskip("peft")

    model.save_pretrained(adapter)
    back = quiet(peft.PeftModel.from_pretrained, quiet(torch_class.from_pretrained, base, **(base_kwargs or {})),
                 adapter)
    np.testing.assert_allclose(np.asarray(model(**inputs).logits), torch_logits(back.eval(), **inputs),
                               atol=1e-5, rtol=0)


def assert_lora_moves_both_ways(torch_class, base, work, config: dict, targets: set, batch, *, dropout: bool = True,
                                **inputs) -> None:
    """PEFT's LoRA of ``config`` (fields of both frameworks' ``LoraConfig``, default targets
    ``targets``) both ways on ``torch_class`` read from ``base``: PEFT's adapter (moved off its
    start) gives PEFT's logits on ``inputs`` here; one trained here from the gaussian init (4 steps
    on ``batch``, the model's dropout with ``dropout``, its loss falling) gives ours in PEFT.
    ``work``: a directory for both adapters."""
    import _tiny

    import peftjax
    from peftjax import models

    peft = pytest.importorskip("peft")
    ref = peft_file(torch_class, base, peft.LoraConfig(**config), work / "theirs", **inputs)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(base), work / "theirs")
    np.testing.assert_allclose(np.asarray(loaded(**inputs).logits), ref, atol=1e-5, rtol=0)
    model = peftjax.get_peft_model(models.from_pretrained(base),
                                   peftjax.LoraConfig(**config, init_lora_weights="gaussian"))
    assert set(model.peft_config["default"].target_modules) == targets
    losses = _tiny.train(model, batch, steps=4, dropout=dropout).losses
    assert losses[-1] < losses[0]
    assert_peft_reads(model, torch_class, base, work / "ours", **inputs)


def save_in_memory_layout(torch_model, directory) -> None:
    """``torch_model``'s in-memory state dict (transformers 5's, e.g. a mixture of experts' fused
    weights) and config written as a checkpoint, not the layout ``save_pretrained`` converts to."""
    safetensors_torch = pytest.importorskip("safetensors.torch")

    directory.mkdir(parents=True, exist_ok=True)
    torch_model.config.save_pretrained(directory)
    state = {k: v.contiguous() for k, v in torch_model.state_dict().items()}
    safetensors_torch.save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def save_both_layouts(torch_model, root) -> tuple:
    """``(hub, fused)``: ``torch_model`` saved under ``root`` as transformers saves it (a mixture of
    experts' per-expert files) and in its in-memory layout (:func:`save_in_memory_layout`)."""
    torch_model.save_pretrained(root / "hub")
    save_in_memory_layout(torch_model, root / "fused")
    return root / "hub", root / "fused"


def assert_layouts_round_trip(torch_model, hub, fused, model, out, vocab: int) -> None:
    """A mixture of experts saved both ways (``hub``: ``save_pretrained``'s per-expert files;
    ``fused``: transformers 5's in-memory state dict) loads, from either, to transformers' own
    state dict (``model`` is the one loaded from ``hub``); ``save_pretrained`` into ``out`` writes the
    keys transformers writes, and transformers reloading it gives the same logits."""
    from peftjax import models

    safetensors_torch = pytest.importorskip("safetensors.torch")
    keys = lambda d: set(safetensors_torch.load_file(str(d / "model.safetensors")))  # noqa: E731
    ref = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    for loaded in (model, models.from_pretrained(fused)):
        ours = models.hf_state_dict(loaded)
        assert set(ours) == set(ref)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)
    model.save_pretrained(out)
    assert keys(out) == keys(hub)
    ids, mask = padded_batch(vocab, seq=9)
    valid = mask.astype(bool)
    reloaded = type(torch_model).from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, input_ids=ids, attention_mask=mask)[valid],
                                  torch_logits(torch_model, input_ids=ids, attention_mask=mask)[valid])


def assert_transformers_reloads(torch_model, model, directory) -> None:
    """``model`` (peftjax's, loaded from ``torch_model``'s checkpoint) saved to ``directory`` loads in
    transformers as ``torch_model``'s class with exactly ``torch_model``'s state dict."""
    import torch

    model.save_pretrained(directory)
    reloaded = type(torch_model).from_pretrained(directory).eval()
    theirs, ours = torch_model.state_dict(), reloaded.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def torch_logits(model, **inputs) -> np.ndarray:
    torch = pytest.importorskip("torch")

    with torch.no_grad():
        out = model(**{k: torch.as_tensor(np.asarray(v)) for k, v in inputs.items()})
    return out.logits.float().numpy()


def peft_prompt_forward(pm, input_ids, attention_mask, token_type_ids=None):
    """PEFT's forward for a prompt-tuning or P-tuning adapter on a BERT-style head, with the
    ``token_type_ids`` that ``PeftModelForQuestionAnswering`` (PEFT 0.22.0) drops passed on, as
    its ``PeftModelForTokenClassification`` passes them: the virtual tokens' embeddings before the
    words', ``V`` ones before the mask and ``V`` zeros before the token types (torch tensors)."""
    torch = pytest.importorskip("torch")

    batch, v = input_ids.shape[0], pm.active_peft_config.num_virtual_tokens
    embeds = torch.cat([pm.get_prompt(batch_size=batch), pm.word_embeddings(input_ids)], 1)
    mask = torch.cat([torch.ones(batch, v, dtype=attention_mask.dtype), attention_mask], 1)
    if token_type_ids is not None:
        token_type_ids = torch.cat([torch.zeros(batch, v, dtype=token_type_ids.dtype), token_type_ids], 1)
    return pm.base_model(inputs_embeds=embeds, attention_mask=mask, token_type_ids=token_type_ids)


def padded_batch(vocab: int, batch: int = 3, seq: int = 9, seed: int = 0, left: bool = True):
    """Random ids with a few padded positions on the left (or right) of some rows."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, (batch, seq)).astype(np.int64)
    mask = np.ones_like(ids)
    for row in range(1, batch):
        n = 2 * row
        if left:
            mask[row, :n] = 0
        else:
            mask[row, seq - n :] = 0
    ids[mask == 0] = 0
    return ids, mask


def quiet(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with warnings silenced (transformers' and PEFT's load-time notices)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def save_peft_adapters(root, adapters: dict, *, family: str = "llama", noise: float = 0.0, seed: int = 0):
    """Saves the tiny ``family`` model to ``root/base`` and one HF PEFT LoRA adapter per entry of
    ``adapters`` (``{name: LoraConfig kwargs}``, ``init_lora_weights=False``) to ``root/<name>``;
    ``noise`` adds that much Gaussian noise to every trainable weight, as training would."""
    import _tiny
    import peft
    import torch

    torch.manual_seed(seed)
    spec = _tiny.arch(family)
    _tiny.save(spec, root / "base")
    for name, kw in adapters.items():
        base = quiet(spec.torch_class.from_pretrained, root / "base")
        model = quiet(peft.get_peft_model, base,
                      peft.LoraConfig(task_type=spec.task, init_lora_weights=False, **kw))
        if noise:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.add_(noise * torch.randn_like(p))
        model.save_pretrained(root / name)
    return root


# Three blocks of 130 queries in peftjax's causal attention (``peftjax/models/_attention.py``), where
# the suite's 9-token rows are one block: each block's scores stop at its last query's key.
LONG_ROWS = 390


def assert_long_rows_match_torch(torch_model, model, vocab: int) -> None:
    """Rows of ``LONG_ROWS`` tokens through ``model`` (peftjax) and ``torch_model`` (its transformers
    twin): the jitted forward never forms a ``LONG_ROWS`` square of scores; its logits (left padding,
    so some query rows see no key) equal torch's on the real tokens; the loss (right padding) and the
    gradient of every weight equal those of torch's backward pass."""
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward = jax.jit(lambda p, i, a: nnx.merge(graphdef, p, rest)(input_ids=i, attention_mask=a).logits)
    ids, mask = padded_batch(vocab, batch=2, seq=LONG_ROWS)
    square = f"{LONG_ROWS}x{LONG_ROWS}xf32"
    assert square not in forward.lower(params, ids, mask).as_text(), "the whole square of scores was formed"
    valid = mask.astype(bool)
    ref = torch_logits(torch_model, input_ids=ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(forward(params, ids, mask))[valid], ref[valid], atol=1e-5, rtol=0)

    ids, mask = padded_batch(vocab, batch=2, seq=LONG_ROWS, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    ref.loss.backward()

    def loss(p):
        return nnx.merge(graphdef, p, rest)(input_ids=ids, attention_mask=mask, labels=labels).loss

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert abs(float(value) - ref.loss.item()) <= 1e-5
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), torch_model)


def assert_matches_float64_torch(torch_model, exact, path, model, vocab: int, tolerance: dict,
                                 grads_of: set[str], *, stacked: bool = True) -> None:
    """A recurrent decoder (``model``, loaded from ``path``) against transformers' ``torch_model``
    and its float64 twin ``exact`` (whose logits are the oracle where float32 rounding through a
    scan exceeds 1e-5): left- and right-padded logits, eager and jitted; the loss and every
    weight's gradient (those in ``grads_of`` among them) of the model loaded rematerialised, its
    layers stacked under ``scan_layers=True`` (unless ``stacked=False``: layers that differ);
    greedy generation token for token."""
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx

    from peftjax import models

    for left in (True, False):
        ids, mask = padded_batch(vocab, seq=9, left=left)
        valid = mask.astype(bool)
        ref = torch_logits(exact, input_ids=ids, attention_mask=mask)
        for out in (model(input_ids=ids, attention_mask=mask), jitted(model, input_ids=ids, attention_mask=mask)):
            np.testing.assert_allclose(np.asarray(out.logits)[valid], ref[valid], **tolerance)
    labels = np.where(mask == 1, ids, -100)
    exact.zero_grad()
    loss = exact(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels)).loss
    loss.backward()
    scanned = models.from_pretrained(path, scan_layers=stacked, remat="full")
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    value, grads = jax.jit(jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest)(
        input_ids=ids, attention_mask=mask, labels=labels).loss))(params)
    assert abs(float(value) - loss.item()) <= 1e-5
    ours = models.hf_state_dict(nnx.merge(graphdef, grads, rest))
    theirs = {name: p.grad.numpy() for name, p in exact.named_parameters() if p.grad is not None}
    assert grads_of <= set(theirs) <= set(ours), (sorted(grads_of - set(theirs)), sorted(set(theirs) - set(ours)))
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, atol=5e-5, rtol=1e-4, err_msg=name)
    exact.zero_grad(set_to_none=True)

    ids, mask = padded_batch(vocab, seq=5)
    with torch.no_grad():
        gen = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=6)), gen)


def assert_packed_rows_as_alone(model, exact, tolerance: dict) -> None:
    """Two sequences packed in one row (``segment_ids``), the second starting mid-chunk: each gets
    the logits ``exact`` (transformers) gives it alone."""
    first, second = np.arange(3, 9)[None], np.arange(20, 27)[None]
    out = np.asarray(jitted(model, input_ids=np.concatenate([first, second], axis=1),
                            segment_ids=np.array([[1] * 6 + [2] * 7])).logits)
    np.testing.assert_allclose(out[0, :6], torch_logits(exact, input_ids=first)[0], **tolerance)
    np.testing.assert_allclose(out[0, 6:], torch_logits(exact, input_ids=second)[0], **tolerance)


def assert_classifier_matches_torch(torch_class, config, directory, vocab: int, tolerance: dict) -> None:
    """A sequence classifier of ``torch_class`` (weights drawn at 0.15) saved by transformers loads here
    as the same class and gives its logits and loss on a padded batch."""
    import torch

    from peftjax import models

    torch_model = randomised(torch_class(config).eval(), scale=0.15)
    torch_model.save_pretrained(directory)
    model = models.from_pretrained(directory)
    assert type(model).__name__ == torch_class.__name__
    ids, mask = padded_batch(vocab, seq=7)
    labels = np.array([0, 2, 1])
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    out = jitted(model, input_ids=ids, attention_mask=mask, labels=labels)
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), **tolerance)
    assert abs(float(out.loss) - ref.loss.item()) <= 1e-5


def assert_grads_match_torch(grads_model, torch_model, atol: float = 1e-6) -> None:
    """Every weight's gradient in ``torch_model`` (after its ``backward``) equals the one in
    ``grads_model`` (a peftjax model whose parameters hold gradients), matched by checkpoint name,
    to ``atol`` and a relative 1e-4."""
    from peftjax import models

    ours = models.hf_state_dict(grads_model)
    theirs = {name: p.grad.numpy() for name, p in torch_model.named_parameters() if p.grad is not None}
    assert theirs and set(theirs) <= set(ours), sorted(set(theirs) - set(ours))
    for name, grad in theirs.items():
        np.testing.assert_allclose(ours[name], grad, atol=atol, rtol=1e-4, err_msg=name)


def assert_long_prompts_generate_as_torch(torch_model, model, vocab: int, new: int = 4) -> None:
    """Generation from ``LONG_ROWS``-token prompts (left padding, so some prefill rows see no key).

    - ``logits_to_keep=1`` gives transformers' ``logits_to_keep=1`` logits, and its jitted forward
      holds no ``[batch, LONG_ROWS, vocab]`` logits.
    - The prefill as ``generate`` runs it (a cache written from slot 0, the last position's logits)
      forms no whole square of scores and gives the cache-free forward's last logits.
    - Greedy generation equals transformers' ``generate`` token for token.
    """
    torch = pytest.importorskip("torch")
    import jax
    import jax.numpy as jnp
    from flax import nnx

    ids, mask = padded_batch(vocab, batch=2, seq=LONG_ROWS)
    graphdef, state = nnx.split(model)
    last = jax.jit(lambda st, i, a: nnx.merge(graphdef, st)(input_ids=i, attention_mask=a, logits_to_keep=1).logits)
    assert f"2x{LONG_ROWS}x{vocab}xf32" not in last.lower(state, ids, mask).as_text(), "every position's logits"
    ours = np.asarray(last(state, ids, mask))
    assert ours.shape == (2, 1, vocab)
    with torch.no_grad():
        ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), logits_to_keep=1).logits
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5, rtol=0)

    total = LONG_ROWS + new

    @jax.jit
    def prefill(st, i, a):
        m = nnx.merge(graphdef, st)
        key_mask = jnp.zeros((2, total), jnp.int32).at[:, :LONG_ROWS].set(a)
        return m(input_ids=i, attention_mask=key_mask, cache=m.init_cache(2, total), cache_index=0,
                 logits_to_keep=1).logits

    text = prefill.lower(state, ids, mask).as_text()
    assert f"{LONG_ROWS}x{total}xf32" not in text, "the prefill formed the whole square of scores"
    assert f"2x{LONG_ROWS}x{vocab}xf32" not in text, "the prefill computed every position's logits"
    np.testing.assert_allclose(np.asarray(prefill(state, ids, mask)), ours, atol=1e-5, rtol=0)

    with torch.no_grad():
        expected = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                        max_new_tokens=new, do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=new, pad_token_id=0), expected)


def assert_close_where(ours, theirs, mask, **tolerance) -> None:
    """``ours`` equals ``theirs`` on the real tokens (``mask`` 1); padding's values are free."""
    valid = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], np.asarray(theirs)[valid], **tolerance)


def assert_moe_generates_and_scans_as_torch(torch_model, hub, model, vocab: int, grad_atol: float = 1e-6) -> None:
    """A mixture of experts (``model``, loaded from ``hub``, transformers' ``torch_model``): greedy
    generation token for token, then the model loaded with its layers stacked and rematerialised
    gives the loss (the router terms in) and every weight's gradient of torch's backward pass
    (to ``grad_atol``)."""
    torch = pytest.importorskip("torch")
    import jax
    from flax import nnx

    from peftjax import models

    ids, mask = padded_batch(vocab, seq=5)
    with torch.no_grad():
        ref = torch_model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=5,
                                   do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(np.asarray(model.generate(ids, mask, max_new_tokens=5)), ref)
    scanned = models.from_pretrained(hub, scan_layers=True, remat="full", output_router_logits=True)
    ids, mask = padded_batch(vocab, seq=9, left=False)
    labels = np.where(mask == 1, ids, -100)
    torch_model.zero_grad()
    out_ref = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          labels=torch.tensor(labels), output_router_logits=True)
    out_ref.loss.backward()
    graphdef, params, rest = nnx.split(scanned, nnx.Param, ...)
    value, grads = jax.jit(jax.value_and_grad(
        lambda p: nnx.merge(graphdef, p, rest)(input_ids=ids, attention_mask=mask, labels=labels).loss))(params)
    assert abs(float(value) - out_ref.loss.item()) <= 1e-5
    assert_grads_match_torch(nnx.merge(graphdef, grads, rest), torch_model, grad_atol)
    torch_model.zero_grad(set_to_none=True)


def assert_moe_lora_both_ways(torch_class, hub, tmp_path, config: dict, vocab: int, tolerance: dict) -> None:
    """LoRA made here (``config``: peftjax's ``LoraConfig`` fields) on a mixture of experts' ``hub``
    checkpoint trains, loads in PEFT with the same logits and merges for transformers'
    ``torch_class``; PEFT's all-linear adapter gives its logits here."""
    import warnings

    from flax import nnx

    import _tiny
    import peftjax
    from peftjax import models

    peft = pytest.importorskip("peft")
    ids, mask = padded_batch(vocab, batch=2, seq=7)

    def base():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch_class.from_pretrained(hub).eval()

    model = peftjax.get_peft_model(models.from_pretrained(hub), peftjax.LoraConfig(**config))
    losses = _tiny.train(model, _tiny.batch(ids, mask), steps=3).losses
    assert losses[-1] < losses[0]
    model.save_pretrained(tmp_path / "ours")
    ours = model(input_ids=ids, attention_mask=mask).logits
    plain = torch_logits(base(), input_ids=ids, attention_mask=mask)
    assert np.abs(np.asarray(ours)[mask.astype(bool)] - plain[mask.astype(bool)]).max() > 1e-3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert_close_where(ours, torch_logits(theirs, input_ids=ids, attention_mask=mask), mask, **tolerance)
    model.merge_and_unload().save_pretrained(tmp_path / "merged")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = torch_class.from_pretrained(tmp_path / "merged").eval()
    assert_close_where(ours, torch_logits(merged, input_ids=ids, attention_mask=mask), mask, **tolerance)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        made = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    made.save_pretrained(tmp_path / "peft")
    ref = torch_logits(made, input_ids=ids, attention_mask=mask)
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(hub), tmp_path / "peft")
    jitted = nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)
    assert_close_where(jitted(loaded.base_model, ids, mask), ref, mask, **tolerance)


def moe_conversion(config) -> tuple:
    """What PEFT's MoE target conversion made of a LoRA config: its target modules and parameters,
    rank and alpha patterns (compared between PEFT's and peftjax's)."""
    return (set(config.target_modules), set(config.target_parameters), dict(config.rank_pattern),
            dict(config.alpha_pattern))



def assert_all_linear_lora_both_ways(torch_class, path, tmp_path, vocab: int, tolerance: dict) -> set[str]:
    """PEFT's all-linear LoRA (random ``B``) on the checkpoint at ``path``: its adapter gives its
    logits here; the same config made here converts (a mixture of experts' targets), targets and
    saves as PEFT's, and PEFT loading it gives the logits it gives here. Returns the adapted layers'
    names."""
    import warnings

    import peftjax
    from peftjax import models

    peft = pytest.importorskip("peft")
    ids, mask = padded_batch(vocab, batch=2, seq=7)

    def base():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch_class.from_pretrained(path).eval()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base(), peft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "peft")
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    assert np.abs(ref - torch_logits(base(), input_ids=ids, attention_mask=mask))[mask.astype(bool)].max() > 1e-3
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    assert_close_where(jitted(loaded.base_model, input_ids=ids, attention_mask=mask).logits, ref, mask, **tolerance)

    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(
        r=2, target_modules="all-linear", init_lora_weights=False))
    ours_config, theirs_config = ours.peft_config["default"], theirs.peft_config["default"]
    if theirs_config.target_parameters:  # PEFT's MoE conversion
        assert moe_conversion(ours_config) == moe_conversion(theirs_config)
    layers = {(s.name, s.module_type) for s in theirs.get_layer_status()}
    assert {(s.name, s.module_type) for s in ours.get_layer_status()} == layers
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(base(), tmp_path / "ours").eval()
    assert_close_where(ours(input_ids=ids, attention_mask=mask).logits,
                       torch_logits(in_peft, input_ids=ids, attention_mask=mask), mask, **tolerance)
    return {name for name, _ in layers}
