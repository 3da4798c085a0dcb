"""The Trainer turns on JAX's persistent compilation cache: a second run of a job compiles nothing."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

import _tiny
import peftjax


def _tiny_classifier():
    return peftjax.get_peft_model(
        peftjax.models.BertForSequenceClassification.from_config(
            _tiny.config("bert", vocab_size=64, intermediate_size=48, num_labels=2), seed=0),
        peftjax.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))


@pytest.fixture
def no_cache_configured():
    """This process as a user's: the cache on, no JAX cache directory (conftest's settings set
    aside), every compile cached."""
    suites, minimum = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)
        jax.config.update("jax_compilation_cache_dir", suites)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", minimum)
        compilation_cache.reset_cache()


def test_a_second_run_of_the_job_loads_its_compiled_steps(tmp_path, monkeypatch, request, no_cache_configured):
    monkeypatch.setenv("PEFTJAX_CACHE_DIR", str(tmp_path / "home-cache"))
    hits = []

    def listen(event, **_):
        hits.append(event == "/jax/compilation_cache/cache_hits")

    jax.monitoring.register_event_listener(listen)
    request.addfinalizer(lambda: jax.monitoring.unregister_event_listener(listen))
    data = {"input_ids": [[1, 5, 9, 7], [1, 8, 8], [1, 7, 30, 31, 9]] * 4, "label": [1, 0, 1] * 4}

    def run():  # the job, from scratch: a new model, a new Trainer, new jitted functions
        hits.clear()
        args = peftjax.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=2,
                                         save_steps=0, report_to="none", plot=False, disable_tqdm=True,
                                         overwrite_output_dir=True)
        trainer = peftjax.Trainer(_tiny_classifier(), args, data)
        trainer.train()
        return trainer.compilation_cache_dir, sum(hits), sorted(p.name for p in Path(trainer.compilation_cache_dir).iterdir())

    where, first_hits, first_files = run()
    assert where == jax.config.jax_compilation_cache_dir == str(tmp_path / "home-cache" / "xla")  # the default
    assert (tmp_path / "home-cache" / "xla").stat().st_mode & 0o077 == 0  # private: JAX trusts what it reads
    assert first_files and first_hits == 0
    _, second_hits, second_files = run()
    assert second_hits > 0 and second_files == first_files  # read back, nothing new compiled


@pytest.fixture
def bert():
    return _tiny_classifier()


def test_a_given_directory_or_none_and_the_users_own_setting(tmp_path, bert):
    suites = jax.config.jax_compilation_cache_dir  # conftest's: to JAX, a directory the user chose
    assert suites is not None
    data = {"input_ids": [[1, 2]], "label": [0]}

    def trainer(cache):
        return peftjax.Trainer(bert, peftjax.TrainingArguments(output_dir=str(tmp_path / "out"), compilation_cache=cache), data)

    try:
        assert trainer(True).compilation_cache_dir == suites  # the user's own directory stands
        assert trainer(False).compilation_cache_dir == suites  # ... and False does not remove it
        given = trainer(str(tmp_path / "given")).compilation_cache_dir
        assert given == jax.config.jax_compilation_cache_dir == str(tmp_path / "given")
        assert (tmp_path / "given").is_dir()
        assert trainer(False).compilation_cache_dir is None  # what peftjax turned on, False turns off
    finally:
        jax.config.update("jax_compilation_cache_dir", suites)
        compilation_cache.reset_cache()


def test_compilation_cache_settings_are_checked(tmp_path, bert):
    for bad in ("", 1, None):
        with pytest.raises(ValueError, match="compilation_cache must be True, False or a directory"):
            peftjax.TrainingArguments(output_dir=str(tmp_path), compilation_cache=bad)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = peftjax.TrainingArguments(output_dir=str(tmp_path / "out"), compilation_cache=str(blocker / "cache"))
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(OSError, match=r"compilation_cache: cannot create .*a-file/cache"):
        peftjax.Trainer(bert, args, {"input_ids": [[1, 2]], "label": [0]})
    assert jax.config.jax_compilation_cache_dir == before  # nothing changed
