"""What the generation tests share: two left-padded prompts and transformers' ``generate`` on them."""

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
