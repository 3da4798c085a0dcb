"""Host memory: checkpoints read one tensor at a time, freed heap and one-off executables
returned, heavy modules imported only when needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import _tiny
from peftjax import models
from peftjax.io import SafetensorsError, SafetensorsFile, read_safetensors, write_safetensors

TENSORS = {
    "a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
    "b.bias": np.linspace(-1, 1, 5).astype(ml_dtypes.bfloat16),
    "c.ids": np.array([[1, -2], [3, 4]], np.int64),
    "d.scalar": np.array(2.5, np.float16),
}


@pytest.fixture()
def file(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, TENSORS, {"format": "pt"})
    return path


def test_reads_each_tensor_as_an_owned_aligned_writable_array(file):
    tensors = SafetensorsFile(file)
    assert sorted(tensors) == sorted(TENSORS) and len(tensors) == 4 and "a.weight" in tensors
    assert tensors.metadata == {"format": "pt"}
    assert tensors.shape("a.weight") == (3, 4)
    mapped, _ = read_safetensors(file)
    for name, expected in TENSORS.items():
        got = tensors[name]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(got, mapped[name])
        assert got.flags.writeable and got.ctypes.data % 64 == 0
        assert got.base is not None and not isinstance(got.base, np.memmap)
    first, again = tensors["a.weight"], tensors["a.weight"]
    first[0, 0] = 99.0  # a fresh copy per lookup: nothing shared with the file or other lookups
    assert again[0, 0] == 0.0 and tensors["a.weight"][0, 0] == 0.0


def test_a_mapped_file_is_written_back_to_its_own_path(file):
    """Read (memory-mapped), change one tensor, write to the same path: the other tensors are read
    from the old file while the new one is written (writing in place would truncate the mapped
    file under them: SIGBUS); the directory holds only the new file."""
    tensors, metadata = read_safetensors(file)
    changed = {**tensors, "a.weight": tensors["a.weight"] + 1}
    write_safetensors(file, changed, metadata)
    again, meta = read_safetensors(file)
    assert meta == {"format": "pt"}
    np.testing.assert_array_equal(again["a.weight"], TENSORS["a.weight"] + 1)
    for name in ("b.bias", "c.ids", "d.scalar"):
        np.testing.assert_array_equal(again[name], TENSORS[name])
    assert [p.name for p in file.parent.iterdir()] == [file.name]
    with pytest.raises(TypeError, match="'bad' has dtype object"):  # refused: the file is left as it was
        write_safetensors(file, {**changed, "bad": np.array([None])})
    assert sorted(read_safetensors(file)[0]) == sorted(TENSORS)


def test_several_files_and_a_key_in_two_of_them(tmp_path):
    write_safetensors(tmp_path / "1.safetensors", {"x": np.ones(2, np.float32)})
    write_safetensors(tmp_path / "2.safetensors", {"y": np.zeros(3, np.float32)})
    both = SafetensorsFile(tmp_path / "1.safetensors", tmp_path / "2.safetensors")
    assert sorted(both) == ["x", "y"] and both["y"].shape == (3,)
    write_safetensors(tmp_path / "3.safetensors", {"x": np.ones(2, np.float32)})
    with pytest.raises(SafetensorsError, match=r"3\.safetensors.*'x'.*1\.safetensors"):
        SafetensorsFile(tmp_path / "1.safetensors", tmp_path / "3.safetensors")


def test_a_truncated_file_is_refused_when_opened(file):
    data = file.read_bytes()
    file.write_bytes(data[:-10])
    with pytest.raises(SafetensorsError, match=rf"{file.name}: truncated; tensor"):
        SafetensorsFile(file)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        SafetensorsFile(file.parent / "nope.safetensors")


def _tiny_checkpoint(path: Path, scan: bool = False) -> None:
    config = _tiny.config("llama", vocab_size=64, pad_token_id=None, tie_word_embeddings=False)
    models.LlamaForCausalLM.from_config(config, seed=3).save_pretrained(path)


def _mapped(path: Path) -> bool:
    return str(path) in Path("/proc/self/maps").read_text()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_loading_leaves_no_mapping_of_the_checkpoint(tmp_path, scan):
    _tiny_checkpoint(tmp_path)
    weights = tmp_path / "model.safetensors"
    reference, _ = read_safetensors(weights)
    assert _mapped(weights)  # the memory-mapped reader does map it ...
    expected = np.asarray(reference["model.layers.1.mlp.down_proj.weight"]).T.copy()
    del reference
    model = models.from_pretrained(tmp_path, scan_layers=scan)
    assert not _mapped(weights)  # ... the checkpoint loader does not keep it
    down = model.model.layers.layer.mlp.down_proj.kernel.get_value()[1] if scan else (
        model.model.layers[1].mlp.down_proj.kernel.get_value())
    np.testing.assert_array_equal(np.asarray(down), expected)


RELEASE = """
import sys, jax, jax.numpy as jnp, numpy as np, peftjax
f = jax.jit(lambda x: x * 2 + 1)
f(jnp.ones(3))
sizes = [f._cache_size()]
trimmed = peftjax.release_host_memory()
young = peftjax.release_host_memory(generation=1)
sizes.append(f._cache_size())  # without clear_compiled, compiled functions stay
peftjax.release_host_memory(clear_compiled=True)
sizes.append(f._cache_size())
again = f(jnp.ones(3)).tolist()  # compiles again
print(sizes, trimmed == young == sys.platform.startswith("linux"), again)
"""


def test_release_host_memory_trims_and_clears_compiled_functions():
    """In a fresh process: clearing every executable of a worker that has run most of the suite
    takes 20 s, and the worker's next tests would compile again what they share."""
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[1, 1, 0] True [3.0, 3.0, 3.0]"


def test_importing_peftjax_leaves_orbax_and_torch_out():
    code = ("import sys, peftjax; heavy = {'orbax', 'tensorstore', 'torch', 'transformers', 'matplotlib'}; "
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
