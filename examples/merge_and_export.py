"""Train a LoRA adapter with the functional core, then merge it and export a checkpoint transformers loads.

    python examples/merge_and_export.py [--smoke]

Builds a small Llama (random weights), trains an adapter for a few steps with ``peftjax.split`` /
``make_train_step`` (the loss must fall), writes it back with ``peft_model.update``, saves and
reloads it (same logits), merges, saves, and, when torch is installed, reloads the export with
``transformers.AutoModelForCausalLM`` to compare logits.
"""

import argparse
import importlib.util
import tempfile
from pathlib import Path

import jax
import numpy as np
import optax
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
                               peftjax.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
ids = np.random.default_rng(0).integers(1, 128, (4, 24))
batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": ids}
graphdef, adapters, base = peftjax.split(model.base_model)
optimizer = optax.adamw(3e-3)
opt_state = optimizer.init(adapters)
step = peftjax.make_train_step(graphdef, optimizer)
losses = []
for i in range(10 if args.smoke else 100):
    adapters, opt_state, loss = step(adapters, opt_state, base, batch, jax.random.key(i))
    losses.append(float(loss))
print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
assert losses[-1] < losses[0], "the loss did not fall"
model.update(adapters)                         # the trained adapters back into the model

adapted = np.asarray(model(input_ids=ids).logits)
model.save_pretrained(work / "adapter")
reloaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(work / "base"), work / "adapter")
np.testing.assert_allclose(np.asarray(reloaded(input_ids=ids).logits), adapted, atol=1e-5)

merged = model.merge_and_unload()              # adapters folded into the kernels, adapter layers gone
merged.save_pretrained(work / "merged")        # config.json + model.safetensors
print("merged vs adapted, max |diff|:", np.abs(np.asarray(merged(input_ids=ids).logits) - adapted).max())
print("the same from the command line: peftjax merge", work / "base", work / "adapter", work / "merged-cli")

if importlib.util.find_spec("torch"):
    import torch

    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "merged").eval()
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor(ids)).logits.numpy()
    print("transformers vs peftjax, max |diff|:", float(np.abs(theirs - adapted).max()))
    np.testing.assert_allclose(theirs, adapted, atol=1e-4)
