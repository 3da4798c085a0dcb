"""Suite-wide settings and shared fixtures.

Settings: offline Hugging Face, quiet torch threads, deterministic float32 math, and a hardened
JAX config: implicit rank promotion raises (``jax_numpy_rank_promotion="raise"``). Adding a
``[out]`` bias to a ``[batch, seq, out]`` activation must be written out (``b[None, None]``, a
reshape), in the tests' references as in the code they test, so that an accidental broadcast
(a ``[seq]`` vector meeting a ``[batch, seq, out]`` array) fails instead of computing garbage.

peftjax code that still promotes ranks implicitly is listed in :data:`RANK_PROMOTION_BUGS`; a
test that reaches it carries ``@pytest.mark.allow_rank_promotion("<key>")`` and runs with
``"allow"``. When the code is fixed, delete its entry: the marked tests then fail on the
unknown key until their marks go too, and run hardened.

Fixtures: ``jit`` (every test that takes it runs eagerly and under ``jit``), ``tiny_checkpoint``
(the tiny random transformers checkpoints of ``_tiny``, saved once per session).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

import _tiny  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")

# peftjax lines that rely on implicit rank promotion (found by turning "raise" on; product bugs)
RANK_PROMOTION_BUGS = {
    "dora": "peftjax/tuners/lora/_layer.py:181-182 (_dora_extra): `y - bias` and `factor * base`, "
            "an [out] vector against [..., out]",
    "ia3": "peftjax/tuners/ia3/_layer.py:84,87 (IA3Layer.__call__): `x * scale_in`, `y * scale_out`, "
           "an [in]/[out] vector against [..., in]/[..., out]",
    "bottleneck": "peftjax/tuners/bottleneck/_layer.py:84,86 (BottleneckLayer.__call__): "
                  "`h @ down + down_bias`, `f + up_bias`",
    "prompt-encoder": "peftjax/tuners/prompt/_model.py:74,80 (_linear, _lstm_direction): "
                      "`x @ w.T + bias`, `x @ w_ih.T + b_ih + b_hh`",
}

try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # the oracle tests skip themselves without torch
    pass


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "allow_rank_promotion(bug): run with jax_numpy_rank_promotion='allow', because the test "
        "reaches peftjax code listed in conftest.RANK_PROMOTION_BUGS[bug]")


@pytest.fixture(autouse=True)
def _rank_promotion(request):
    """``"raise"`` for every test, except those marked ``allow_rank_promotion`` (a known peftjax bug)."""
    marks = list(request.node.iter_markers("allow_rank_promotion"))
    if not marks:
        yield
        return
    unknown = [m.args[0] for m in marks if m.args[0] not in RANK_PROMOTION_BUGS]
    assert not unknown, f"allow_rank_promotion{unknown}: not in conftest.RANK_PROMOTION_BUGS (fixed? drop the mark)"
    with jax.numpy_rank_promotion("allow"):
        yield


@pytest.fixture(params=[False, True], ids=["eager", "jit"])
def jit(request) -> bool:
    """Runs the test twice: the forward called eagerly, and under ``jax.jit`` / ``nnx.jit``."""
    return request.param


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(arch)``: the directory of ``arch``'s tiny random torch checkpoint (an
    ``_tiny.Arch`` or a family name), built with seed 0 and saved once per session. Read-only:
    a test that writes into a base checkpoint makes its own with ``_tiny.save``."""
    saved = {}

    def get(spec):
        spec = _tiny.arch(spec) if isinstance(spec, str) else spec
        key = repr(spec)
        if key not in saved:
            path = tmp_path_factory.mktemp(spec.family)
            _tiny.save(spec, path)
            saved[key] = path
        return saved[key]

    return get
