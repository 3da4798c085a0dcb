"""Training: the functional step, the Trainer, and the data pipeline."""

from peftjax.training._adalora import AdaLoraStep, make_adalora_train_step
from peftjax.training._args import TrainingArguments, weight_decay_mask
from peftjax.training._chat import tokenize_chat
from peftjax.training._data import (
    Batcher,
    load_text_dataset,
    tokenize_causal_lm,
    tokenize_classification,
    tokenize_token_classification,
    tokenize_instructions,
    tokenize_masked_lm,
    tokenize_multiple_choice,
    tokenize_question_answering,
    tokenize_seq2seq,
)
from peftjax.training._masking import DataCollatorForLanguageModeling, mask_tokens
from peftjax.training._memory import release_host_memory
from peftjax.training._rouge import rouge_metrics, rouge_scores
from peftjax.training._squad import answer_questions, normalize_answer, squad_metrics
from peftjax.training._step import combine, make_train_step, optax_labels, split
from peftjax.training._trainer import Trainer, TrainingError, TrainOutput

__all__ = [
    "AdaLoraStep",
    "answer_questions",
    "normalize_answer",
    "squad_metrics",
    "rouge_metrics",
    "rouge_scores",
    "make_adalora_train_step",
    "Batcher",
    "DataCollatorForLanguageModeling",
    "TrainOutput",
    "Trainer",
    "TrainingArguments",
    "TrainingError",
    "combine",
    "load_text_dataset",
    "make_train_step",
    "mask_tokens",
    "optax_labels",
    "release_host_memory",
    "split",
    "tokenize_causal_lm",
    "tokenize_chat",
    "tokenize_classification",
    "tokenize_token_classification",
    "tokenize_instructions",
    "tokenize_masked_lm",
    "tokenize_multiple_choice",
    "tokenize_question_answering",
    "tokenize_seq2seq",
    "weight_decay_mask",
]
