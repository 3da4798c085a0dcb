"""Several adapters on one model: load, switch, disable, delete (PEFT's multi-adapter API).

    python examples/multiple_adapters.py [--smoke]

Two LoRA adapters are trained on the packaged MiniLM for opposite labelings of the shipped reviews
("sentiment", and "contrarian", which swaps negative and positive), saved, then loaded side by side
onto one base model.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import peftjax
from peftjax import data, models
from peftjax.training import Trainer, TrainingArguments, tokenize_classification

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
work = Path(tempfile.mkdtemp(prefix="adapters-"))
path = data.minilm_path()
tokenizer = peftjax.load_tokenizer(path)  # the class AutoTokenizer picks, without importing torch
raw = data.load_reviews("train").shuffle(seed=0).select(range(64 if args.smoke else 600))
rows = tokenize_classification(raw, tokenizer, max_length=48)
flipped = rows.map(lambda row: {"labels": 2 - row["labels"]})  # negative <-> positive
probe = tokenizer(["A wonderful, moving film. I loved it."], return_tensors="np")


def base():
    return models.from_pretrained(path, task_type="SEQ_CLS", num_labels=len(data.LABELS))


trained = {}
for name, labelled in (("sentiment", rows), ("contrarian", flipped)):
    model = peftjax.get_peft_model(base(), peftjax.LoraConfig(r=8, lora_alpha=32, target_modules=["query", "value"],
                                                               task_type="SEQ_CLS"))
    trainer = Trainer(model, TrainingArguments(output_dir=str(work / name), per_device_train_batch_size=16,
                                               max_steps=6 if args.smoke else 120, learning_rate=3e-3, save_steps=0,
                                               logging_steps=10, disable_tqdm=True, plot=False), labelled)
    before = trainer.evaluate(labelled)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(labelled)["eval_loss"]
    print(f"{name}: training-set loss {before:.4f} -> {after:.4f}")
    assert after < before, f"{name}: the loss did not fall"
    trained[name] = np.asarray(model(**probe).logits)

# one base model, two adapters
model = peftjax.PeftModel.from_pretrained(base(), work / "sentiment", adapter_name="sentiment")
model.load_adapter(work / "contrarian", adapter_name="contrarian")


def probabilities():
    logits = np.asarray(model(**probe).logits)[0]
    return np.exp(logits) / np.exp(logits).sum()


for name in ("sentiment", "contrarian"):
    model.set_adapter(name)
    np.testing.assert_allclose(np.asarray(model(**probe).logits), trained[name], atol=1e-5)  # as trained
    print(f"{name:>10}: P(negative, neutral, positive) = {np.round(probabilities(), 3)}")
with model.disable_adapter():
    print(f"{'no adapter':>10}: P(negative, neutral, positive) = {np.round(probabilities(), 3)}")
model.delete_adapter("contrarian")
print("adapters left:", list(model.peft_config))
