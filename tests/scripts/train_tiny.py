"""A tiny causal-LM LoRA run for the kill-and-resume test: ``train_tiny.py OUT [--resume] [--slow S]``.

``--slow`` makes each batch take S seconds longer (by wrapping the batcher here, in the test's own
script) so that the test can kill the process between two checkpoints.
"""

import sys
import time

import numpy as np
import peftjax
from peftjax.models import LlamaForCausalLM, ModelConfig
from peftjax.training import _trainer
from peftjax.training._args import TrainingArguments
from peftjax.training._data import Batcher

out = sys.argv[1]
resume = "--resume" in sys.argv
slow = float(sys.argv[sys.argv.index("--slow") + 1]) if "--slow" in sys.argv else 0.0

if slow:
    class SlowBatcher(Batcher):
        def batches(self, epoch, start=0):
            for batch in super().batches(epoch, start):
                time.sleep(slow)
                yield batch

    _trainer.Batcher = SlowBatcher

config = ModelConfig("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
model = LlamaForCausalLM.from_config(config, seed=0)
peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                              target_modules=["q_proj", "v_proj", "down_proj"]))
rng = np.random.default_rng(0)
ids = rng.integers(1, 64, (40, 16)).tolist()
data = {"input_ids": ids, "labels": ids}
args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=24, learning_rate=1e-2,
                         logging_steps=2, save_steps=4, gradient_accumulation_steps=2, warmup_steps=3,
                         disable_tqdm=True, plot=False, report_to="none", seed=7,
                         resume_from_checkpoint=True if resume else None)
_trainer.Trainer(peft_model, args, data).train()
print("finished", flush=True)
