"""What the generation tests share: two left-padded prompts, transformers' ``generate`` on them, an
oracle of the presence and frequency penalties, and a streamer that records what it is given."""

from __future__ import annotations

import warnings

import numpy as np
import torch

IDS = np.array([[1, 5, 9, 12, 7, 5], [0, 0, 3, 7, 11, 3]])
MASK = np.array([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])


def hf_generate(model, ids, mask, **settings) -> np.ndarray:
    """transformers' ``generate`` of ``model`` (PyTorch) on ``ids`` and ``mask``, as a NumPy array."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), **settings).numpy()


class OpenAIPenalties:
    """The test's own oracle, a transformers logits processor in PyTorch: OpenAI's presence and
    frequency penalties over the tokens after the prompt."""

    def __init__(self, prompt: int, presence: float = 0.0, frequency: float = 0.0):
        self.prompt, self.presence, self.frequency = prompt, presence, frequency

    def __call__(self, input_ids, scores):
        new = input_ids[:, self.prompt:]
        counts = torch.zeros_like(scores).scatter_add_(1, new, torch.ones(new.shape, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class Recorder:
    """A streamer (transformers' ``put`` / ``end``) that keeps what it is given."""

    def __init__(self):
        self.puts: list[np.ndarray] = []
        self.ends = 0

    def put(self, value):
        assert self.ends == 0, "put after end()"
        self.puts.append(np.array(value.numpy() if hasattr(value, "numpy") else value))  # torch's or NumPy's

    def end(self):
        self.ends += 1

    def assert_same(self, other: Recorder):
        """The same puts, in the same shapes, and one ``end()`` each."""
        assert (self.ends, other.ends) == (1, 1)
        assert [p.shape for p in self.puts] == [p.shape for p in other.puts]
        for a, b in zip(self.puts, other.puts):
            np.testing.assert_array_equal(a, b)
