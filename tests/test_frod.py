"""FRoD against HF PEFT 0.22.0 + PyTorch on Llama, BERT and GPT-2: files both ways, the identity
start, each kind's basis and positions, PEFT's U rule, dropout, merging, refusals.

A kind's basis comes from an eigendecomposition whose eigenvector signs are LAPACK's, so peftjax's
own basis for a weight need not be PEFT's; the file carries it, and peftjax computes each layer's
``U`` from the file's basis. PEFT 0.22.0 keeps the ``U`` of the basis it computed itself when it
loads a file, so a file made here means the same to PEFT only after PEFT's ``U`` is computed from the
loaded basis (what ``test_a_file_made_here_is_peft_s_model_with_u_from_its_basis`` does, by PEFT's
own function); files PEFT writes load here as PEFT runs them.
"""

from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import _tiny
from _method_cases import ARCHS, IDS, LLAMA, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch
from _method_cases import peft_frod_u_from_its_basis, torch_base
import peftjax
from peftjax import models
from peftjax.tuners.base import adapter_layers
from peftjax.tuners.frod import FrodLayer, frod_kind, frod_layer_index

# case -> (config class, arch, fields, how it trains; see _method_cases.check_interop)
CASES = {
    "frod-llama": ("FrodConfig", "llama", dict(target_modules=LLAMA, sparse_rate=0.05), False),
    "frod-bert-dropout": ("FrodConfig", "bert", dict(frod_dropout=0.1, bias="frod_only"), False),
    "frod-gpt2": ("FrodConfig", "gpt2", dict(sparse_rate=0.02, init_weights=False), "no dropout"),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_with_peft_both_ways_and_merge(case, checkpoints, tmp_path, capsys):
    """PEFT's file (its bases) loads here with PEFT's logits, trains, loads back in PEFT with equal
    logits, merged too; merged here equals unmerged and the export gives the same logits."""
    check_interop(CASES[case], checkpoints, tmp_path, capsys, eager=case == "frod-llama")


def test_kinds_and_block_numbers_are_peft_s():
    """The kind and block number of a path, as PEFT's ``_category_from_key`` and
    ``_layer_index_from_key`` give them, on the paths of five architectures."""
    from peft.tuners.frod.model import _category_from_key, _layer_index_from_key

    paths = ["model.layers.3.self_attn.q_proj", "model.layers.11.mlp.down_proj", "transformer.h.2.attn.c_attn",
             "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.4.output.dense",
             "bert.encoder.layer.1.attention.self.query", "classifier.dense", "score", "lm_head",
             "model.decoder.layers.x.fc1", "encoder.block.5.layer.1.DenseReluDense.wi"]
    for fallback, path in enumerate(paths):
        assert frod_kind(path) == _category_from_key(path), path
        assert frod_layer_index(path, fallback) == _layer_index_from_key(path, fallback), path


def _peft_model(arch, path, fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(torch_base(arch, path), peft.FrodConfig(progressbar=False, **fields))


def _defining_property(stacked: np.ndarray, v: np.ndarray, weights: list[np.ndarray], alpha: float) -> None:
    """``v`` is a kind's basis as PEFT defines it, whatever eigenvectors LAPACK picked: with
    ``stacked = Q R``, ``E = R^-T v`` is orthogonal and diagonalises ``mean_l (Q_l^T Q_l + alpha I)^-1``
    (its eigenvalues ascending); with fewer rows than columns ``v`` is orthogonal and ``stacked v``'s
    column norms are the singular values, descending (float64 here)."""
    stacked, v = stacked.astype(np.float64), v.astype(np.float64)
    if stacked.shape[0] < stacked.shape[1]:
        np.testing.assert_allclose(v.T @ v, np.eye(len(v)), atol=1e-5)
        singular = np.linalg.svd(stacked, compute_uv=False)
        norms = np.linalg.norm(stacked @ v, axis=0)
        np.testing.assert_allclose(norms[:len(singular)], singular, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(norms[len(singular):], 0, atol=1e-5)
        return
    q, r = np.linalg.qr(stacked)
    blocks = np.split(q, np.cumsum([len(w) for w in weights])[:-1])
    t = sum(np.linalg.inv(b.T @ b + alpha * np.eye(len(v))) for b in blocks) / len(blocks)
    e = np.linalg.solve(r.T, v)
    np.testing.assert_allclose(e.T @ e, np.eye(len(v)), atol=1e-4)
    diagonal = e.T @ t @ e
    scale = np.abs(diagonal).max()
    np.testing.assert_allclose(diagonal / scale, np.diag(np.linalg.eigvalsh(t)) / scale, atol=1e-4)


def test_each_kind_s_basis_is_what_peft_defines(checkpoints):
    """Each kind's basis meets PEFT's definition (:func:`_defining_property`; the eigenvectors
    themselves are LAPACK's choice, and on these weights many eigenvalues are equal, so not even
    their directions are fixed); PEFT's own basis meets it too, and both give the same ``V V^T``.
    Each layer starts as the base (``U diag(lambda) V^T = W``, PEFT's logits) with ``lambda`` the
    column norms PEFT starts from where the bases agree; a kind's positions are off the diagonal,
    distinct and as many as PEFT's. Both decompositions: a QR of two stacked layers, and an SVD
    where one layer (``layers_to_transform``) has fewer rows than columns."""
    path = checkpoints["llama"]
    for fields in (dict(target_modules=LLAMA, sparse_rate=0.05), dict(target_modules=["v_proj"], layers_to_transform=[1])):
        ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.FrodConfig(**fields))
        theirs = _peft_model("llama", path, fields)
        assert_close(run_jax(ours), run_torch(theirs))
        layers = adapter_layers(ours.base_model, FrodLayer)
        for kind in {layer.spec("default").kind for layer in layers.values()}:
            kind_layers = [layer for name, layer in sorted(layers.items(), key=lambda item: frod_layer_index(item[0], 0))
                           if layer.spec("default").kind == kind]
            weights = [layer.torch_weight() for layer in kind_layers]
            v_ours = np.asarray(kind_layers[0].frod_V["default"].get_value())
            v_theirs = theirs.base_model.frod_V[kind]["default"].numpy()
            for v in (v_ours, v_theirs):
                _defining_property(np.concatenate(weights), v, weights, 1e-3)
            np.testing.assert_allclose(v_ours @ v_ours.T, v_theirs @ v_theirs.T, atol=1e-4)
            for layer in kind_layers:
                assert layer.frod_V["default"] is kind_layers[0].frod_V["default"]  # one variable per kind
                lam = np.asarray(layer.frod_lambda_l["default"].get_value())
                u = np.asarray(layer.frod_U["default"].get_value())
                np.testing.assert_allclose(u @ np.diag(lam) @ v_ours.T, layer.torch_weight(), atol=1e-5)
                np.testing.assert_allclose(np.linalg.norm(u, axis=0), 1.0, atol=1e-5)
            rows, cols = np.asarray(kind_layers[0].frod_s_indices["default"].get_value())
            assert (rows != cols).all() and len(set(zip(rows, cols))) == len(rows)
            assert len(rows) == theirs.base_model.frod_s_indices[kind]["default"].shape[1]


def test_a_file_made_here_is_peft_s_model_with_u_from_its_basis(checkpoints, tmp_path):
    """A FRoD adapter made and trained here (its own bases) saves PEFT's file; PEFT loads it and,
    with each layer's ``U`` computed from the loaded basis by PEFT's own function (which its loader
    leaves out), gives the same logits, merged too. peftjax loads the file back the same."""
    path = checkpoints["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.FrodConfig(target_modules=LLAMA,
                                                                                     sparse_rate=0.05))
    losses = _tiny.train(model, _tiny.batch(IDS, MASK), steps=3, optimizer=optax.adam(2e-2)).losses
    assert losses[-1] < losses[0]
    ours = run_jax(model)
    assert changed(ours, run_torch(torch_base("llama", path))) > 1e-3
    model.save_pretrained(tmp_path)
    assert_close(run_jax(peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)), ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(torch_base("llama", path), tmp_path).eval()
    peft_frod_u_from_its_basis(theirs)
    assert_close(run_torch(theirs), ours)
    theirs.merge_adapter()
    assert_close(run_torch(theirs), ours)


def test_dropout_drops_the_update_only_as_peft_does(checkpoints):
    """PEFT adds ``(W' - W) dropout(x)`` to the base output while dropout is active: at the identity
    start dropout changes nothing (dropping the input of the whole product would change it); off
    the start the dropped update moves the output away from both the base and the undropped one."""
    path = checkpoints["llama"]
    base = run_jax(models.from_pretrained(path))
    start = peftjax.get_peft_model(models.from_pretrained(path), peftjax.FrodConfig(target_modules=LLAMA,
                                                                                     frod_dropout=0.5))
    with peftjax.dropout_key(jax.random.key(0)):
        assert_close(run_jax(start), base)
    moved = peftjax.get_peft_model(models.from_pretrained(path), peftjax.FrodConfig(
        target_modules=LLAMA, frod_dropout=0.5, init_weights=False), key=jax.random.key(1))
    plain = run_jax(moved)
    with peftjax.dropout_key(jax.random.key(0)):
        dropped = run_jax(moved)
    assert min(changed(plain, base), changed(dropped, plain), changed(dropped, base)) > 1e-3


def test_what_is_not_implemented_or_malformed_is_named(checkpoints, tmp_path):
    """``save_projection=False`` (PEFT's file has no bases: refused by name, also from PEFT's file),
    a scanned model, a kind whose layers differ in width, and a file missing a kind's basis or
    with positions outside ``S``."""
    path = checkpoints["llama"]
    with pytest.raises(NotImplementedError, match=r"FrodConfig\(save_projection=False\) is not implemented"):
        peftjax.FrodConfig(save_projection=False)
    _peft_model("llama", path, dict(target_modules=["q_proj"], save_projection=False)).save_pretrained(tmp_path / "u")
    with pytest.raises(NotImplementedError, match="save_projection=False"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "u")
    with pytest.raises(NotImplementedError, match="FRoD on a model built with scan_layers=True"):
        peftjax.get_peft_model(models.from_pretrained(path, scan_layers=True), peftjax.FrodConfig(target_modules=LLAMA))

    class Block(nnx.Module):
        def __init__(self, n_in, rngs):
            self.proj = nnx.Linear(n_in, 8, rngs=rngs)

    class Blocks(nnx.Module):  # a user's model whose "proj" layers differ in width
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(8, rngs), Block(16, rngs)])

    with pytest.raises(ValueError, match=r"kind 'proj', whose input widths differ \(\[8, 16\]\)"):
        peftjax.get_peft_model(Blocks(nnx.Rngs(0)), peftjax.FrodConfig(target_modules=["proj"]))
    _peft_model("llama", path, dict(target_modules=["q_proj"])).save_pretrained(tmp_path / "t")
    from safetensors.numpy import load_file, save_file

    tensors = load_file(tmp_path / "t" / "adapter_model.safetensors")
    for change, match in ((lambda t: t.pop("base_model.frod_V.self_attn_q_proj"),
                           r"were not present \(\['base_model.frod_V.self_attn_q_proj'\]\)"),
                          (lambda t: t.__setitem__("base_model.frod_s_indices.self_attn_q_proj",
                                                   t["base_model.frod_s_indices.self_attn_q_proj"] + 40),
                           r"frod_s_indices.self_attn_q_proj / .*: expected integer positions inside a \[32, 32\] S")):
        broken = dict(tensors)
        change(broken)
        save_file(broken, tmp_path / "t" / "adapter_model.safetensors")
        with pytest.raises(ValueError, match=match):
            peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "t")
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["peft_type"] == "FROD"
