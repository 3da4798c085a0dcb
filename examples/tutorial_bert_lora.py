"""The HF PEFT tutorial (BERT + LoRA sentiment classification), step by step, in JAX with peftjax.

    python examples/tutorial_bert_lora.py                 # offline: packaged MiniLM + shipped data
    python examples/tutorial_bert_lora.py --smoke         # a few steps (the test suite runs this)
    python examples/tutorial_bert_lora.py --model bert-base-uncased --dataset imdb   # the tutorial's run (Hub)

Each numbered step is the tutorial's, with the PyTorch call it replaces in the comment.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

import peftjax
from peftjax import models
from peftjax.training import Trainer, TrainingArguments, load_text_dataset
from peftjax.training._run import packaged_minilm, resolve_model_path, shipped_data

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
parser.add_argument("--dataset", default=None, help="default: peftjax's shipped sentiment data; 'imdb' for the Hub")
parser.add_argument("--output-dir", default=None)
parser.add_argument("--smoke", action="store_true", help="a few steps on a few rows")
args = parser.parse_args()
output_dir = Path(args.output_dir or tempfile.mkdtemp(prefix="lora-bert-"))

# 1. Load the model and data  (AutoTokenizer / load_dataset("imdb"))
model_path = resolve_model_path(args.model) if args.model else packaged_minilm()
tokenizer = AutoTokenizer.from_pretrained(str(model_path))
if args.dataset:
    dataset = load_text_dataset(args.dataset)
    train_raw, test_raw = dataset["train"], dataset["test"]
else:
    train_raw = load_text_dataset(shipped_data("train"), split="train")
    test_raw = load_text_dataset(shipped_data("eval"), split="train")
train_raw = train_raw.select(range(64 if args.smoke else min(2000, len(train_raw))))
test_raw = test_raw.select(range(32 if args.smoke else min(1000, len(test_raw))))


def preprocess(example):
    return tokenizer(example["text"], truncation=True, padding="max_length", max_length=128)


encoded_train = train_raw.map(preprocess, batched=True)
encoded_test = test_raw.map(preprocess, batched=True)

# 2. The base model; its weights stay frozen  (AutoModelForSequenceClassification, requires_grad=False)
model = models.BertForSequenceClassification.from_pretrained(model_path, num_labels=2)

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
    output_dir=str(output_dir),
    per_device_train_batch_size=8,
    num_train_epochs=1,
    max_steps=4 if args.smoke else -1,
    learning_rate=2e-4 if args.dataset else 1e-3,  # the tutorial's 2e-4 is tuned for bert-base on IMDB
    logging_steps=2 if args.smoke else 50,
    save_steps=1000,
    eval_strategy="epoch",
    disable_tqdm=args.smoke,
)
trainer = Trainer(model=peft_model, args=training_args, train_dataset=encoded_train, eval_dataset=encoded_test)
trainer.train()
peft_model.save_pretrained(output_dir / "lora-bert")

# 5. Load the adapter onto a fresh base model and predict  (PeftModel.from_pretrained)
base_model = models.BertForSequenceClassification.from_pretrained(model_path, num_labels=2)
model = peftjax.PeftModel.from_pretrained(base_model, output_dir / "lora-bert")
inputs = tokenizer("This movie was fantastic!", return_tensors="np")
pred = int(np.asarray(model(**inputs).logits).argmax())
print("Positive" if pred else "Negative")

# 6a. Merge the weights to export a full model  (merge_and_unload, save_pretrained)
merged = model.merge_and_unload()
merged.save_pretrained(output_dir / "merged_model")
print(f"merged model: {output_dir / 'merged_model'} (loads in transformers)")

# 6b. Several adapters on one model  (load_adapter, set_adapter)
multi = peftjax.PeftModel.from_pretrained(
    models.BertForSequenceClassification.from_pretrained(model_path, num_labels=2), output_dir / "lora-bert"
)
multi.load_adapter(output_dir / "lora-bert", adapter_name="sentiment")
multi.set_adapter("sentiment")
print("active adapter:", multi.active_adapter)
