"""Causal-LM instruction tuning with LoRA: prompt tokens are masked out of the loss (-100).

    python examples/instruction_tuning_llama.py            # offline: a small random Llama, built here
    python examples/instruction_tuning_llama.py --smoke    # a few steps (the test suite runs this)
    python examples/instruction_tuning_llama.py --model path/to/llama --tokenizer path/to/llama

Offline there is no pretrained causal LM to download, so by default this builds a small random
Llama whose vocabulary is the packaged MiniLM tokenizer's and trains LoRA on a toy instruction set
(arithmetic answers). That shows the mechanics (masked prompts, packing-free batches, generation);
the loss falls, but a random base learns little. With ``--model`` it fine-tunes your checkpoint.
"""

import argparse
import tempfile
from pathlib import Path

import datasets
import numpy as np

import peftjax
from peftjax import data, models
from peftjax.training import Trainer, TrainingArguments, tokenize_instructions

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--model", default=None)
parser.add_argument("--tokenizer", default=None)
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()

tokenizer = peftjax.load_tokenizer(args.tokenizer or args.model or data.minilm_path())  # no torch import
if args.model:
    model = models.from_pretrained(args.model)
else:
    config = models.ModelConfig("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                pad_token_id=tokenizer.pad_token_id)
    model = models.LlamaForCausalLM.from_config(config)

rng = np.random.default_rng(0)
pairs = [(int(a), int(b)) for a, b in rng.integers(0, 10, (200, 2))]
pairs_data = datasets.Dataset.from_dict({
    "prompt": [f"what is {a} plus {b}?" for a, b in pairs],
    "response": [str(a + b) for a, b in pairs],
})
train = tokenize_instructions(pairs_data, tokenizer, max_length=32, template="question: {prompt} answer:")
print("first row, labels (prompt masked):", train[0]["labels"])

peft_model = peftjax.get_peft_model(
    model, peftjax.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
)
peft_model.print_trainable_parameters()
work = Path(tempfile.mkdtemp(prefix="instruct-"))
trainer = Trainer(
    peft_model,
    TrainingArguments(output_dir=str(work / "run"), per_device_train_batch_size=16,
                      max_steps=4 if args.smoke else 300, learning_rate=3e-3, logging_steps=2 if args.smoke else 50,
                      save_steps=0, disable_tqdm=args.smoke, plot=not args.smoke),
    train,
    pad_token_id=tokenizer.pad_token_id,
)
before = trainer.evaluate(train)["eval_loss"]
result = trainer.train()
after = trainer.evaluate(train)["eval_loss"]
print(f"trained {result.global_step} steps; training-set loss {before:.3f} -> {after:.3f}")
assert after < before, "the loss did not fall"
peft_model.save_pretrained(work / "adapter")

prompt = tokenizer(["question: what is 3 plus 4? answer:"], return_tensors="np", add_special_tokens=True)
ids = prompt["input_ids"][:, :-1]  # drop the trailing [SEP], as in training
out = peft_model.generate(ids, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
print("generated:", tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))

# the saved adapter, on a fresh copy of the base, gives the trained model's logits
if args.model:
    fresh = models.from_pretrained(args.model)
else:
    fresh = models.LlamaForCausalLM.from_config(config)
reloaded = peftjax.PeftModel.from_pretrained(fresh, work / "adapter")
np.testing.assert_allclose(np.asarray(reloaded(input_ids=ids).logits), np.asarray(peft_model(input_ids=ids).logits),
                           atol=1e-5)
print("the reloaded adapter reproduces the trained logits")
