"""Several adapters on one model: load, switch, disable, delete (PEFT's multi-adapter API).

    python examples/multiple_adapters.py [--smoke]

Two LoRA adapters are trained on the packaged MiniLM for opposite labelings of the shipped
sentiment data ("sentiment" and "contrarian"), saved, then loaded side by side onto one base model.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

import peftjax
from peftjax import models
from peftjax.training import Trainer, TrainingArguments, load_text_dataset, tokenize_classification
from peftjax.training._run import packaged_minilm, shipped_data

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
work = Path(tempfile.mkdtemp(prefix="adapters-"))
path = packaged_minilm()
tokenizer = AutoTokenizer.from_pretrained(str(path))
raw = load_text_dataset(shipped_data("train"), split="train").select(range(64 if args.smoke else 400))
data = tokenize_classification(raw, tokenizer, max_length=48)
flipped = data.map(lambda row: {"labels": 1 - row["labels"]})


def base():
    return models.BertForSequenceClassification.from_pretrained(path, num_labels=2)


for name, rows in (("sentiment", data), ("contrarian", flipped)):
    model = peftjax.get_peft_model(base(), peftjax.LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS"))
    Trainer(model, TrainingArguments(output_dir=str(work / name), per_device_train_batch_size=16,
                                     max_steps=3 if args.smoke else 60, learning_rate=2e-3, save_steps=0,
                                     logging_steps=10, disable_tqdm=True, plot=False), rows).train()

# one base model, two adapters
model = peftjax.PeftModel.from_pretrained(base(), work / "sentiment", adapter_name="sentiment")
model.load_adapter(work / "contrarian", adapter_name="contrarian")
text = tokenizer(["A wonderful, moving film. I loved it."], return_tensors="np")


def positive_probability():
    logits = np.asarray(model(**text).logits)[0]
    return float(np.exp(logits[1]) / np.exp(logits).sum())


for name in ("sentiment", "contrarian"):
    model.set_adapter(name)
    print(f"{name:>10}: P(positive) = {positive_probability():.3f}")
with model.disable_adapter():
    print(f"{'no adapter':>10}: P(positive) = {positive_probability():.3f}")
model.delete_adapter("contrarian")
print("adapters left:", list(model.peft_config))
