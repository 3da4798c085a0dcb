"""The HF PEFT tutorial (BERT + LoRA sentiment classification), step by step, in JAX with peftjax.

    python examples/tutorial_bert_lora.py                 # offline: packaged MiniLM + shipped reviews
    python examples/tutorial_bert_lora.py --smoke         # a few steps (the test suite runs this)
    python examples/tutorial_bert_lora.py --model bert-base-uncased --dataset imdb   # the tutorial's run (Hub)

Each numbered step is the tutorial's, with the PyTorch call it replaces in the comment. Subsets are
shuffled with a seed before they are cut (IMDB's splits are sorted by label). The same steps are in
``tutorial_bert_lora.ipynb``.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

import peftjax
from peftjax import data, models
from peftjax.training import Trainer, TrainingArguments, load_text_dataset

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
parser.add_argument("--dataset", default=None, help="default: peftjax's shipped reviews; 'imdb' for the Hub")
parser.add_argument("--output-dir", default=None)
parser.add_argument("--smoke", action="store_true", help="a few steps on a few rows")
args = parser.parse_args()
output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="lora-bert-"))

# 1. Load the model and data  (AutoTokenizer / load_dataset("imdb"))
model_name = args.model or data.minilm_path()
tokenizer = AutoTokenizer.from_pretrained(str(model_name))
if args.dataset:
    dataset = load_text_dataset(args.dataset)
    train_raw, test_raw = dataset["train"], dataset["test"]
else:
    train_raw, test_raw = data.load_reviews("train"), data.load_reviews("eval")
num_labels = len(set(train_raw["label"]))
train_raw = train_raw.shuffle(seed=42).select(range(64 if args.smoke else min(2000, len(train_raw))))
test_raw = test_raw.shuffle(seed=42).select(range(32 if args.smoke else min(1000, len(test_raw))))


def preprocess(example):
    return tokenizer(example["text"], truncation=True, padding="max_length", max_length=128)


encoded_train = train_raw.map(preprocess, batched=True)
encoded_test = test_raw.map(preprocess, batched=True)

# 2. The base model; its weights stay frozen  (AutoModelForSequenceClassification, requires_grad=False)
model = models.from_pretrained(model_name, task_type="SEQ_CLS", num_labels=num_labels)

# 3. Apply LoRA  (peft.LoraConfig, get_peft_model)
lora_config = peftjax.LoraConfig(
    r=8,
    lora_alpha=32,
    target_modules=["query", "value"],
    lora_dropout=0.1,
    bias="none",
    task_type="SEQ_CLS",
)
peft_model = peftjax.get_peft_model(model, lora_config)
peft_model.print_trainable_parameters()

# 4. Train and save  (transformers.TrainingArguments, Trainer)
training_args = TrainingArguments(
    output_dir=str(output_dir / "run"),
    per_device_train_batch_size=8,
    num_train_epochs=1,
    max_steps=8 if args.smoke else -1,
    learning_rate=2e-4 if args.dataset else 2e-3,  # the tutorial's 2e-4 is tuned for bert-base on IMDB
    logging_steps=2 if args.smoke else 50,
    save_steps=1000,
    eval_strategy="epoch",
    disable_tqdm=args.smoke,
)
trainer = Trainer(model=peft_model, args=training_args, train_dataset=encoded_train, eval_dataset=encoded_test)
loss_before = trainer.evaluate(encoded_train)["eval_loss"]
trainer.train()
loss_after = trainer.evaluate(encoded_train)["eval_loss"]
print(f"training-set loss {loss_before:.4f} -> {loss_after:.4f}; eval {trainer.evaluate()}")
assert loss_after < loss_before, "the loss did not fall"
peft_model.save_pretrained(output_dir / "lora-bert")

# 5. Load the adapter onto a fresh base model and predict  (PeftModel.from_pretrained)
base_model = models.from_pretrained(model_name, task_type="SEQ_CLS", num_labels=num_labels)
model = peftjax.PeftModel.from_pretrained(base_model, output_dir / "lora-bert")
inputs = tokenizer(["This movie was fantastic!", "I would not watch it again."], return_tensors="np", padding=True)
logits = np.asarray(model(**inputs).logits)
np.testing.assert_allclose(logits, np.asarray(peft_model(**inputs).logits), atol=1e-5)  # the trained adapter
names = data.LABELS if not args.dataset and num_labels == 3 else ("negative", "positive")
print("predictions:", [names[i] for i in logits.argmax(-1)])

# 6a. Merge the weights to export a full model  (merge_and_unload, save_pretrained)
merged = model.merge_and_unload()
merged.save_pretrained(output_dir / "merged_model")
np.testing.assert_allclose(np.asarray(merged(**inputs).logits), logits, atol=1e-4)
print(f"merged model: {output_dir / 'merged_model'} (loads in transformers' AutoModelForSequenceClassification)")

# 6b. Several adapters on one model  (load_adapter, set_adapter)
multi = peftjax.PeftModel.from_pretrained(
    models.from_pretrained(model_name, task_type="SEQ_CLS", num_labels=num_labels), output_dir / "lora-bert"
)
multi.load_adapter(output_dir / "lora-bert", adapter_name="sentiment")
multi.set_adapter("sentiment")
print("active adapter:", multi.active_adapter)
