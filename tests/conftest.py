"""Suite-wide settings and shared fixtures.

Settings: offline Hugging Face, quiet torch threads, deterministic float32 math, and a hardened
JAX config: implicit rank promotion raises (``jax_numpy_rank_promotion="raise"``). Adding a
``[out]`` bias to a ``[batch, seq, out]`` activation must be written out (``b[None, None]``, a
reshape), in the tests' references as in the code they test, so that an accidental broadcast
(a ``[seq]`` vector meeting a ``[batch, seq, out]`` array) fails instead of computing garbage.

Compilation: XLA:CPU generates code at LLVM -O0 (``SUITE_XLA_FLAGS``) with its older per-op
emitters where jaxlib still has them, because the suite spends more time compiling than running;
the main job's run is the exception (``test_cli``): it compiles as a user's process does.

peftjax itself broadcasts explicitly (``peftjax.nn._broadcast.along_last``), so every test runs
hardened.

Scheduling: ``make test`` runs ``pytest -n 2 --dist loadfile``; each file goes whole to one worker,
and a worker takes the next file when it is nearly done. ``LONGEST_FIRST`` hands out the files
that take longest first (xdist's own order, by number of tests, left them to the end), so both
workers finish together on short files.

Compilation cache: off (``JAX_ENABLE_COMPILATION_CACHE=false``, which the workers and every
subprocess a test starts inherit), but for the tests of the cache itself, which turn it on. The
first pytest process (the xdist controller) still points ``JAX_COMPILATION_CACHE_DIR`` at a fresh
temporary directory, removed when it ends, so that a ``Trainer`` (which turns on a cache of its
own where JAX has none) never writes to the user's home. The suite used to share one cache per
run (programs of 0.2 s and more), meant for the steps several jobs compile alike; counted on the
2-core Intel host (2026-12-06, the whole suite, a JAX event listener and a timer in every process)
it wrote 925 executables in 35 s and read 137, whose recorded compile times were 5 s *less* than
reading them took (XLA at -O0 compiles these small programs about as fast as the cache reads
them), beside the cache keys every compile computed (py-spy: 15 s).

Also measured on that host and not taken: XLA's matmuls on one thread per process
(``--xla_cpu_multi_thread_eigen=false``, so that the two workers do not contend for two cores),
with and without synchronous CPU dispatch (``JAX_CPU_ENABLE_ASYNC_DISPATCH=false``), on
tests/test_llama.py + test_lora_peft.py, two rounds each: 121-122 s (user 205-206 s) and 117-128 s
(user 200-216 s) against 124-128 s (user 209-215 s), inside the spread of identical runs there
(92-131 s); and LLVM -O1 instead of -O0 for the examples' subprocesses, which run the real MiniLM
more than they compile: 67-70 s against 58-62 s for examples/ia3_prefix_prompt.py --smoke. Three
workers instead of two (``-n 3``, 2026-12-02, the whole suite once each, same host and hour): 21:16
against 19:56 (the two cores were already busy 1.8 of 2 on average). On a slower AVX2 host
(2026-12-02, whole suite 27:19, test durations summing to 3,196 s): tests/test_llama.py alone
spends about half its time in XLA's compiler and a quarter in JAX's tracing and lowering
(py-spy); and XLA's CPU flags on a tiny train step
(``parallel_codegen_split_count=1``, ``use_xnnpack=false``, region-analysis copy insertion off,
the concurrency-optimized scheduler off, the older runtime) all compiled it in 0.53-0.72 s
against 0.51-0.70 s without.

Garbage collection: each worker freezes what it holds once collection ends (``gc.freeze()``: the
imported torch, transformers, PEFT and JAX, about 620,000 objects), so that later full collections
pass over only what the tests create. A step's first call collected every generation then
(``release_host_memory``, as a user's process did), and on that heap one ``gc.collect()`` took
0.36 s; py-spy put 11% of tests/test_llama.py + test_prompt_learning.py in it. Measured 2026-12-03
on the 2-core AVX-512 host, the two files in one process: 186 s (CPU 200 s) without, 156 s (CPU
170 s) with. What is frozen is never collected: module-level objects, which live for the whole run
anyway. With the freeze, py-spy still put 11.5% of a whole suite's samples in those collections
(2026-12-05, Intel host); a step's first call now collects the young generations only
(``release_host_memory(generation=1)``, see ``peftjax.training._step.CompiledFirst``). Python's own
full collections remained: at its default thresholds (700, 10, 10) one runs after every 100 young
collections, about every 70,000 objects allocated, and tracing allocates millions. Counted with
``gc.callbacks`` (2026-12-07, AMD EPYC host), tests/test_family_methods.py alone ran 34 of them,
7.8 s of its 62 s. After the freeze each worker collects its young generation every 20,000 objects
and everything every 100 of its middle collections (``GC_THRESHOLDS``): more of what tracing
leaves dies young, before anything promotes it, and a full collection comes about every 20 million
objects. In one hour, tests/test_family_methods.py alone: 62 -> 54 s, its collections 8.9 -> 3.0 s,
the same peak memory. The whole suite on that host: 17:13 (30:47 of CPU) at the defaults, 15:30
(27:38) at (20,000, 10, 10), 14:51 (26:24) at (20,000, 10, 100), where each worker's collections
took 23-26 s in all, 6-9 s of them full ones (the larger worker's peak 4.0 GiB); the host's JAX
matmul peak rose from 333 to 417 GFLOP/s over those two hours, so part of that is the host.

MLIR contexts: JAX lowers every function (each eager operation's first call included) into a
fresh MLIR context, whose creation loads every dialect; py-spy put 10% of a whole suite run's
samples there (2026-12-05, Intel host). Each thread here reuses its context for 200 lowerings
(``_reuse_mlir_contexts``): the same modules, so the same HLO and executables; a context is
replaced after 200 so that what it interns (constants, types) does not grow for the whole run.
tests/test_newer_peft_methods.py alone: 83 -> 74 s of CPU. Where JAX no longer has
``make_ir_context`` the suite runs as before.

Where the time goes (2026-12-06, AMD EPYC host, the whole suite 19:09 with a timer around
``jax._src.compiler.compile_or_get_cached`` in each worker): 3,002 tests took 2,247 s in the two
workers, 860 s of it compiling (1,115 forwards the tests jit, 406 ``generate`` loops, 330 train
steps, thousands of eager operations); py-spy puts tracing and lowering at about a third of what
remains. Compile time is spread over the tests (in test_serve, test_generation*, test_trainer and
test_bart, no test compiled for more than 10 s). Measured and not taken:
``jax_include_full_tracebacks_in_locations=false`` (test_family_methods 63.7 s either way); a
module-level jitted forward shared by the cases of a file (no two cases' models are one graph: every
case compiled again); building models without ``nnx.eval_shape`` (16 ms a tiny Llama, two thirds of
it flax's attribute checks, not the initialisers). Taken: one direction of test_family_methods eager
(see its docstring), test_cli's expected outputs of 25 families and tasks of distinct shapes from
one jitted forward each (the test compiled 1,689 programs, most single operations: 37.6 -> 24.2 s),
gradients and per-row forwards of distinct shapes jitted (test_multiple_choice 13.2 -> 8.2 s, the
research methods' start gradients 6.8 -> 4.2 s, the token classifier's rows 9.2 -> 5.7 s), and a
module walk that skips the weights (``peftjax.nn._graph.iter_modules``). Eager operations are the
cheaper where cases share shapes (a kernel compiled once serves them all), one jitted forward where
each case brings new ones.

Fixtures: ``jit`` (every test that takes it runs eagerly and under ``jit``), ``tiny_checkpoint``
(the tiny random transformers checkpoints of ``_tiny``, saved once per session).
"""

import gc
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# bitsandbytes' CPU backend wraps its 4-bit dequantization in torch.compile (static shapes), so the
# oracle's first dequantization of each weight shape ran Inductor: 7.9 s for one 33x17 weight.
# Without TorchDynamo the same ops run eagerly (a table lookup times the block's absmax: the same
# values). The quantization files from a cold Inductor cache, as CI's: 68 -> 50 s. Nothing here
# tests torch.compile.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
# The suite compiles far more than it runs: XLA's CPU backend generates code with LLVM at -O0 and
# without its expensive passes (the same HLO programs, the same float semantics; slower machine
# code). Measured on tests/test_lora_peft.py alone: 82 s -> 64 s (-O0) -> 59 s (both). Subprocesses
# inherit it, except the main job's run, which executes more than it compiles and runs with the
# flags a user has (``PEFTJAX_SHIPPED_XLA_FLAGS``).
# XLA's older per-op code emitters (``--xla_cpu_use_fusion_emitters=false``, where this jaxlib has
# the flag) compile a small kernel in half the time of its MLIR fusion emitters (a tiny elementwise
# program 35 -> 17 ms; tests/test_bert.py + test_gpt2.py 76 -> 51 s, their 718 compilations 44 ->
# 22 s, on an AVX2 host where the suite took 25 min): the same HLO, another code generator.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LEGACY_EMITTERS = "xla_cpu_use_fusion_emitters"


def _jaxlib_has_flag(name: str) -> bool:
    """Whether jaxlib's XLA defines the flag ``name`` (an unknown flag in XLA_FLAGS aborts the
    process): its name is a string in the library's data."""
    import glob
    import mmap

    import jaxlib

    for lib in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "*.so")):
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(name.encode() + b"\x00") != -1:
                return True
    return False


os.environ.setdefault("PEFTJAX_SHIPPED_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # the first process
    flags = SUITE_XLA_FLAGS
    if LEGACY_EMITTERS not in os.environ.get("XLA_FLAGS", "") and _jaxlib_has_flag(LEGACY_EMITTERS):
        flags += f" --{LEGACY_EMITTERS}=false"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

import _tiny  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_numpy_rank_promotion", "raise")


def _reuse_mlir_contexts(lowerings: int = 200) -> None:
    """Each thread lowers into one MLIR context for ``lowerings`` lowerings, then a fresh one (see
    the module's docstring: MLIR contexts); nothing where JAX has no ``make_ir_context``."""
    import threading

    from jax._src.interpreters import mlir

    make = getattr(mlir, "make_ir_context", None)
    if make is None:
        return
    local = threading.local()

    def reused():
        count = getattr(local, "count", 0)
        if count % lowerings == 0:
            local.context = make()
        local.count = count + 1
        return local.context

    mlir.make_ir_context = reused


_reuse_mlir_contexts()


try:
    import torch  # noqa: E402

    torch.set_num_threads(1)
except ImportError:  # the oracle tests skip themselves without torch
    pass


# The files that take longest (subprocess runs of whole jobs, examples and benchmarks), longest
# first; every other file follows in collection order.
LONGEST_FIRST = [  # by the seconds their tests took (a whole run's test durations, 2026-12-06, AMD EPYC host;
    # this session's new tests estimated), the largest first; the rest follow in collection order
    "test_cli.py",  # 176
    "test_llama.py",  # 147
    "test_benchmarks.py",  # 93
    "test_examples.py",  # 87
    "test_family_methods.py",  # 71
    "test_serve.py",  # 71
    "test_trainer.py",  # 66
    "test_newer_peft_methods.py",  # 59
    "test_prompt_learning.py",  # 55
    "test_bart.py",  # 52
    "test_generation.py",  # 45
    "test_generation_processors.py",  # 45
    "test_research_peft_methods.py",  # 43
    "test_sharding.py",  # 35
    "test_lora_peft.py",  # 34
    "test_readme.py",  # 29
    "test_t5.py",  # 27
    "test_token_classification.py",  # 23
    "test_docstrings.py",  # 22
    "test_question_answering.py",  # 21
    "test_lora_inits_data.py",  # 20
    "test_causal_packing.py",  # 20
    "test_scan.py",  # 20
    "test_t5_trainer.py",  # 18
    "test_masked_lm.py",  # 18
    "test_quantization.py",  # 18
    "test_mixed_batch.py",  # 18
    "test_quantization_interop.py",  # 17
    "test_deberta_v2.py",  # 16
    "test_multiple_choice.py",  # 15
    "test_ia3.py",  # 15
    "test_distilbert.py",  # 14
    "test_gemma4.py",  # 13
    "test_lora_linen.py",  # 12
    "test_gemma.py",  # 12
    "test_bottleneck.py",  # 12
    "test_bert.py",  # 12
    "test_xlora.py",  # 11
    "test_layer_replication.py",  # 11
    "test_poly.py",  # 10
    "test_lora_pissa.py",  # 10
    "test_qwen_moe.py",  # 10
    "test_oft.py",  # 9
    "test_lycoris.py",  # 9
    "test_deepseek_v3.py",  # 9
    "test_modernbert.py",  # 9
    "test_qwen3_5.py",  # 9
    "test_electra.py",  # 8
    "test_vera_fourierft_ln_tuning.py",  # 8
    "test_adalora.py",  # 8
]


def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # the first process: a cache for this run
        config._peftjax_jax_cache = tempfile.mkdtemp(prefix="peftjax-test-jax-cache-")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = config._peftjax_jax_cache
        os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
        os.environ.setdefault("JAX_ENABLE_COMPILATION_CACHE", "false")
    jax.config.update("jax_enable_compilation_cache", os.environ.get("JAX_ENABLE_COMPILATION_CACHE") != "false")
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")))
    # keep the order below: xdist would otherwise sort files by their number of tests
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    cache = getattr(config, "_peftjax_jax_cache", None)
    if cache:
        shutil.rmtree(cache, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a file, as written


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


GC_THRESHOLDS = (20_000, 10, 100)  # see the module's docstring: garbage collection


def pytest_collection_finish(session):
    gc.collect()
    gc.freeze()  # see the module's docstring: garbage collection
    gc.set_threshold(*GC_THRESHOLDS)
