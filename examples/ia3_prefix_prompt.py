"""IA³, prefix tuning, prompt tuning and P-tuning through the same API as LoRA.

    python examples/ia3_prefix_prompt.py [--smoke]

Each method wraps the packaged MiniLM for 3-class review classification with ``get_peft_model``,
trains with the same ``Trainer`` (the loss must fall), saves in HF PEFT's format, reloads (the
logits must equal the trained model's), and reports its size.
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

import peftjax
from peftjax import data, models
from peftjax.training import Trainer, TrainingArguments, tokenize_classification

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--smoke", action="store_true")
args = parser.parse_args()
work = Path(tempfile.mkdtemp(prefix="methods-"))
path = data.minilm_path()
tokenizer = peftjax.load_tokenizer(path)  # the class AutoTokenizer picks, without importing torch
train = tokenize_classification(data.load_reviews("train").shuffle(seed=0).select(range(64 if args.smoke else 600)),
                                tokenizer, max_length=48)
evaluation = tokenize_classification(data.load_reviews("eval").shuffle(seed=0).select(range(32 if args.smoke else 200)),
                                     tokenizer, max_length=48)

methods = {
    "ia3": (peftjax.IA3Config(task_type="SEQ_CLS"), 1e-2),
    "prefix": (peftjax.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10), 1e-2),
    "prompt": (peftjax.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=10), 3e-2),
    "p-tuning": (peftjax.PromptEncoderConfig(task_type="SEQ_CLS", num_virtual_tokens=10, encoder_hidden_size=64), 1e-2),
}
for name, (config, lr) in methods.items():
    base = models.from_pretrained(path, task_type="SEQ_CLS", num_labels=len(data.LABELS))
    model = peftjax.get_peft_model(base, config)
    trainable, total = model.get_nb_trainable_parameters()
    trainer = Trainer(model, TrainingArguments(output_dir=str(work / name), per_device_train_batch_size=16,
                                               max_steps=6 if args.smoke else 100, learning_rate=lr,
                                               logging_steps=50, save_steps=0, eval_strategy="no",
                                               disable_tqdm=True, plot=False), train, evaluation)
    before = trainer.evaluate(train)["eval_loss"]
    trainer.train()
    after = trainer.evaluate(train)["eval_loss"]
    assert after < before, f"{name}: the loss did not fall ({before:.4f} -> {after:.4f})"
    accuracy = trainer.evaluate()["eval_accuracy"]
    reloaded = peftjax.PeftModel.from_pretrained(
        models.from_pretrained(path, task_type="SEQ_CLS", num_labels=len(data.LABELS)), work / name)
    probe = dict(tokenizer(["A gripping, beautiful film."], return_tensors="np"))
    logits = nnx.jit(lambda m, batch: m(**batch).logits)  # one compiled forward, not one per operation
    np.testing.assert_allclose(np.asarray(logits(reloaded.base_model, probe)), np.asarray(logits(model.base_model, probe)),
                               atol=1e-5)
    size = (work / name / "adapter_model.safetensors").stat().st_size
    print(f"{name:>9}: trainable {trainable:>7,} of {total:,}  training-set loss {before:.3f} -> {after:.3f}  "
          f"eval accuracy {accuracy:.3f}  file {size / 1024:.0f} KiB  reloads with the trained logits")
