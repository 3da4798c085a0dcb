"""The benchmark scripts still run: tiny configurations of each, and the GPU script's dry run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *argv: str, timeout: int = 600) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the scripts time compilation: never from the suite's compilation cache (conftest)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


def test_gpu_script_dry_run_counts_a_1b_model():
    pytest.importorskip("torch")
    last = _run("gpu_llama1b.py", "--dry-run")
    fields = dict(f.split("=") for f in last.split())
    assert 1.0e9 < int(fields["dry_run_params"]) < 1.2e9
    assert abs(float(fields["small_xla_gflop"]) / float(fields["small_formula_gflop"]) - 1) < 0.05


def test_speed_vs_peft_runs_on_a_tiny_model():
    pytest.importorskip("peft")
    last = _run("speed_vs_peft.py", "--hidden", "32", "--layers", "2", "--heads", "4", "--intermediate", "48",
                "--vocab", "128", "--batch", "2", "--seq", "16", "--rank", "4", "--warmup", "1", "--steps", "2",
                "--trials", "1", "--matmul-size", "256")
    fields = dict(f.split("=") for f in last.split())
    assert set(fields) == {"ratio_time", "ratio_mem", "ratio_first_step", "peftjax_step_s", "peft_step_s",
                           "floor_fraction"}
    assert all(float(v) > 0 for v in fields.values())


def test_depth_runs_on_a_tiny_model():
    last = _run("depth.py", "--depths", "1", "2", "--ranks", "4", "--seqs", "16", "--fixed-layers", "2",
                "--hidden", "32", "--intermediate", "48", "--vocab", "128", "--seq", "16", "--steps", "1")
    assert last.startswith("layers=2 ")


def test_multi_adapter_runs_on_a_tiny_model():
    pytest.importorskip("peft")
    last = _run("multi_adapter.py", "--hidden", "32", "--layers", "2", "--heads", "4", "--intermediate", "48",
                "--vocab", "128", "--batch", "4", "--seq", "8", "--adapters", "1", "4", "--repeats", "2",
                "--trials", "1", "--matmul-size", "256")
    fields = dict(f.split("=") for f in last.split())
    assert set(fields) == {"mixed_ratio", "vs_peft", "swap_ms", "compile_ms", "jax_f32_gflops", "torch_f32_gflops"}
    assert all(float(v) > 0 for v in fields.values())
