"""The Trainer turns on JAX's persistent compilation cache: a second run of a job compiles nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

import _tiny
import peftjax

# one tiny LoRA classifier run, in a process of its own (JAX's cache settings are process-wide);
# prints the cache directory the Trainer used, the files in it and the cache hits JAX recorded
RUN = r"""
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import jax
from jax import monitoring
events = []
monitoring.register_event_listener(lambda event, **kw: events.append(event))
import _tiny, peftjax
from peftjax.models import BertForSequenceClassification
model = peftjax.get_peft_model(
    BertForSequenceClassification.from_config(_tiny.config("bert", vocab_size=64, intermediate_size=48, num_labels=2), seed=0),
    peftjax.LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query", "value"]))
data = {"input_ids": [[1, 5, 9, 7], [1, 8, 8], [1, 7, 30, 31, 9]] * 4, "label": [1, 0, 1] * 4}
cache = json.loads(sys.argv[3])
args = peftjax.TrainingArguments(output_dir=sys.argv[2], per_device_train_batch_size=4, max_steps=2, save_steps=0,
                                 logging_steps=10, report_to="none", plot=False, disable_tqdm=True,
                                 overwrite_output_dir=True, compilation_cache=cache)
trainer = peftjax.Trainer(model, args, data)
trainer.train()
where = trainer.compilation_cache_dir
print(json.dumps({"dir": where, "config": jax.config.jax_compilation_cache_dir,
                  "files": len(list(Path(where).iterdir())) if where else 0,
                  "hits": events.count("/jax/compilation_cache/cache_hits")}))
"""


def _run(tmp_path, cache, env_extra, jax_dir=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_extra)
    if jax_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(jax_dir)
    proc = subprocess.run([sys.executable, "-c", RUN, str(Path(__file__).parent), str(tmp_path / "out"), json.dumps(cache)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_second_run_of_the_job_loads_its_compiled_steps(tmp_path):
    env = {"PEFTJAX_CACHE_DIR": str(tmp_path / "home-cache")}
    first = _run(tmp_path, True, env)
    assert first["dir"] == first["config"] == str(tmp_path / "home-cache" / "xla")  # the default directory
    assert first["files"] > 0 and first["hits"] == 0
    second = _run(tmp_path, True, env)
    assert second["hits"] > 0 and second["files"] == first["files"]  # read back, nothing new compiled


@pytest.fixture
def bert():
    return peftjax.get_peft_model(
        peftjax.models.BertForSequenceClassification.from_config(
            _tiny.config("bert", vocab_size=64, intermediate_size=48, num_labels=2), seed=0),
        peftjax.LoraConfig(r=2, task_type="SEQ_CLS", target_modules=["query"]))


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
        assert (tmp_path / "given").is_dir() and (tmp_path / "given").stat().st_mode & 0o077 == 0  # private
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
