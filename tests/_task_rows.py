"""The rows, tasks and tiny models the per-row-task methods' tests share (Poly, multitask prompt
tuning): a Llama causal LM (left padding) and a BERT classifier (right padding), three rows of
three different tasks, and PEFT's forward on them."""

from __future__ import annotations

import warnings

import numpy as np

import _tiny
from _torch_models import lazy

torch = lazy("torch")

ARCHS = {"llama": _tiny.arch("llama", initializer_range=0.2),
         "bert": _tiny.arch("bert", "BertForSequenceClassification", num_labels=3),
         "gpt2": _tiny.arch("gpt2")}
IDS = np.random.RandomState(0).randint(3, 96, (3, 7))
MASK = np.array([[1] * 7, [0] * 2 + [1] * 5, [1] * 7])
TASKS = np.array([2, 0, 1])


def checkpoints(tiny_checkpoint, names=("llama", "bert")) -> dict:
    """``{arch: its tiny checkpoint directory}``."""
    return {name: tiny_checkpoint(ARCHS[name]) for name in names}


def torch_base(arch, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(path).eval()


def mask_for(arch):
    return MASK if arch == "llama" else MASK[:, ::-1].copy()  # BERT: right padding


def run_torch(model, arch, task_ids=TASKS):
    """``model``'s logits (a PEFT model) on the shared rows, each row with its task."""
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(mask_for(arch)),
                     task_ids=torch.tensor(task_ids)).logits.numpy()
