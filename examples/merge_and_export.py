"""Merge a LoRA adapter into its base and export a checkpoint that PyTorch transformers loads.

    python examples/merge_and_export.py [--smoke]

Builds a small Llama (random weights) and an adapter, merges, saves, and, when torch is installed,
reloads the export with ``transformers.AutoModelForCausalLM`` to compare logits.
"""

import argparse
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import transformers

import peftjax
from peftjax import models

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
work = Path(tempfile.mkdtemp(prefix="export-"))

config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)
models.LlamaForCausalLM.from_config(config).save_pretrained(work / "base")

model = peftjax.get_peft_model(models.from_pretrained(work / "base"),
                               peftjax.LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
ids = np.array([[1, 5, 9, 13, 17]])
adapted = np.asarray(model(input_ids=ids).logits)
model.save_pretrained(work / "adapter")

merged = model.merge_and_unload()              # adapters folded into the kernels, adapter layers gone
merged.save_pretrained(work / "merged")        # config.json + model.safetensors
print("merged == adapted:", np.abs(np.asarray(merged(input_ids=ids).logits) - adapted).max())
print("the same from the command line: peftjax merge", work / "base", work / "adapter", work / "merged-cli")

if importlib.util.find_spec("torch"):
    import torch

    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "merged").eval()
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor(ids)).logits.numpy()
    print("transformers vs peftjax, max |diff|:", float(np.abs(theirs - adapted).max()))
