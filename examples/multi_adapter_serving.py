"""Many adapters on one base: train one LoRA adapter per task, then answer a mixed batch in one call.

    python examples/multi_adapter_serving.py            # offline: a small random Llama, built here
    python examples/multi_adapter_serving.py --smoke    # a few steps (the test suite runs this)
    python examples/multi_adapter_serving.py --model path/to/llama --tokenizer path/to/llama

Three tasks share one input format, ``numbers: 3 4 answer:``, and differ in what the answer is: the
sum, the product, the larger number. Each gets its own LoRA adapter, trained on its own copy of
the frozen base and saved in PEFT's format. Then one base model loads all three, and a single
``generate`` call answers a batch whose rows each name their adapter (``"__base__"``: none): the
mixed-batch path that ``peftjax serve`` runs behind HTTP. The script checks each row against its
adapter run alone, and (after full training) that each adapter answers its own task.

Offline there is no pretrained causal LM, so by default this builds a small random Llama whose
vocabulary is the packaged MiniLM tokenizer's; with ``--model`` it fine-tunes your checkpoint.
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

TASKS = {"plus": lambda a, b: a + b, "times": lambda a, b: a * b, "larger": max}
TEMPLATE = "numbers: {prompt} answer:"

tokenizer = peftjax.load_tokenizer(args.tokenizer or args.model or data.minilm_path())  # no torch import
work = Path(tempfile.mkdtemp(prefix="many-adapters-"))
base_dir = Path(args.model) if args.model else work / "base"
if not args.model:  # a random base, saved once so every adapter trains on the same weights
    config = models.ModelConfig("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                pad_token_id=tokenizer.pad_token_id)
    models.LlamaForCausalLM.from_config(config).save_pretrained(base_dir)

rng = np.random.default_rng(0)
pairs = [(int(a), int(b)) for a, b in rng.integers(0, 10, (48 if args.smoke else 300, 2))]

# ---------------------------------------------------------------- one adapter per task
for name, answer in TASKS.items():
    rows = datasets.Dataset.from_dict({"prompt": [f"{a} {b}" for a, b in pairs],
                                       "response": [str(answer(a, b)) for a, b in pairs]})
    train = tokenize_instructions(rows, tokenizer, max_length=16, template=TEMPLATE)
    peft_model = peftjax.get_peft_model(
        models.from_pretrained(base_dir),
        peftjax.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer = Trainer(
        peft_model,
        TrainingArguments(output_dir=str(work / "runs" / name), per_device_train_batch_size=16,
                          max_steps=3 if args.smoke else 400, learning_rate=3e-3, logging_steps=100,
                          save_steps=0, disable_tqdm=True, plot=False),
        train,
        pad_token_id=tokenizer.pad_token_id,
    )
    before = trainer.evaluate(train)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(train)["eval_loss"]
    print(f"{name}: training-set loss {before:.3f} -> {after:.3f}")
    assert after < before, f"{name}: the loss did not fall"
    peft_model.save_pretrained(work / "adapters" / name)

# ---------------------------------------------------------------- one base, every adapter, one call
model = peftjax.PeftModel.from_pretrained(models.from_pretrained(base_dir), work / "adapters" / "plus",
                                          adapter_name="plus")
for name in ("times", "larger"):
    model.load_adapter(work / "adapters" / name, adapter_name=name)

questions = [(3, 4), (2, 5), (6, 1), (3, 4), (7, 2)]
adapter_names = ["plus", "times", "larger", "times", "__base__"]
tokenizer.padding_side = "left"
batch = tokenizer([TEMPLATE.format(prompt=f"{a} {b}") for a, b in questions], return_tensors="np", padding=True)
ids = batch["input_ids"][:, :-1]  # drop the trailing [SEP], as tokenize_instructions does
mask = batch["attention_mask"][:, :-1]
out = model.generate(ids, mask, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id,
                     adapter_names=adapter_names)
answers = [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out]
for (a, b), name, text in zip(questions, adapter_names, answers):
    print(f"{name:>9}: numbers {a} {b} -> {text!r}")

# each row is what its adapter alone generates for that prompt
for i, name in enumerate(adapter_names):
    single = batch["input_ids"][i:i + 1, :-1][:, mask[i] == 1]
    if name == "__base__":
        with model.disable_adapter():
            alone = model.generate(single, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    else:
        model.set_adapter(name)
        alone = model.generate(single, max_new_tokens=3, pad_token_id=tokenizer.pad_token_id)
    got = out[i, ids.shape[1]:ids.shape[1] + alone.shape[1] - single.shape[1]]
    assert got.tolist() == alone[0, single.shape[1]:].tolist(), (name, got, alone)
print("every row equals its adapter run alone")

if not args.smoke and not args.model:  # trained long enough, each adapter answers its own task
    wanted = [str(TASKS[n](a, b)) for (a, b), n in zip(questions, adapter_names) if n != "__base__"]
    right = sum(w == t.split(" ")[0] for w, t in zip(wanted, answers))
    print(f"{right} of {len(wanted)} answers are their task's")
    assert right >= len(wanted) - 1, (wanted, answers)
