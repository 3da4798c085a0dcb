"""Padding-free decoder batches: several sequences end to end in one row (``segment_ids``), each
attending to itself alone with its own positions; the Trainer packs a Llama-family causal LM's
batches by default, and a decoder classifier's (each sequence read at its own last token).
Oracles: transformers' model on each sequence alone, and the Trainer's unpacked run."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from _tiny import arch, task_arch
from flax import nnx
from _tiny import save as save_tiny

import peftjax
from peftjax import models
from peftjax.training import Batcher, Trainer, TrainingArguments

LENGTHS = (7, 3, 12, 5, 9, 2)
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "qwen3_next", "granitemoe"}


def _sequences(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in LENGTHS]


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}), ("mistral", {"sliding_window": 4}), ("qwen3", {}),
    # decoders of layer kinds (their tiny configs: windows of 4): sliding and global layers (Gemma 2's
    # soft-capped logits), per-kind RoPE bases (Gemma 3, OLMo 3), layers without RoPE (SmolLM3)
    ("gemma2", {}), ("gemma3_text", {}), ("olmo3", {}), ("smollm3", {}),
    ("granite", {}),  # its embedding, attention, residual and logit multipliers
    # parallel blocks: q/k norms, a sliding RoPE layer and a global NoPE one, partial RoPE
    ("cohere", {}), ("cohere2", {}), ("phi", {}), ("gpt_neox", {}),
    # learned positions (OPT), ALiBi (BLOOM), LayerNorm decoders
    ("opt", {}), ("bloom", {}), ("starcoder2", {}), ("stablelm", {}), ("gptj", {}), ("falcon", {}), ("gpt_bigcode", {}),
    ("gpt_neo", {}), ("ministral", {}), ("ministral3", {}), ("olmo", {}), ("arcee", {}), ("nemotron", {}),
    ("helium", {}), ("exaone4", {}), ("apertus", {}),
    # mixtures of experts: each token routed as unpacked, the load-balancing loss over the same tokens
    ("mixtral", {}), ("qwen2_moe", {}), ("qwen3_moe", {}), ("gpt_oss", {}), ("olmoe", {}), ("granitemoe", {}),
    # multi-head latent attention: DeepSeek-V3's (dense then sparse layers), Mistral 4's (its
    # position-scaled queries), GLM-4.5 Lite's
    ("deepseek_v3", {}), ("mistral4", {}), ("glm4_moe_lite", {}),
    ("gemma4_text", {}),  # per-layer inputs, layers sharing keys and values
    # chunks of 4 and the NoPE layer's query scale counted from each sequence's first token
    ("llama4_text", {}),
    # Gated DeltaNet: each sequence's convolution and recurrent state from zeros (Qwen3-Next's MoE)
    ("qwen3_5_text", {}), ("qwen3_next", {}),
])
def test_each_packed_sequence_is_what_transformers_gives_it_alone(family, overrides, tmp_path):
    """Logits of each sequence in a packed batch equal transformers' model run on it alone (a
    sliding window counted within the sequence too), and the packed loss, its first tokens
    unlabelled by the Batcher, is transformers' token mean over the unpacked batch."""
    spec = arch(family, **overrides)
    hf = save_tiny(spec, tmp_path)
    model = models.from_pretrained(tmp_path)
    assert model.packs_sequences
    sequences = _sequences(spec.config().vocab_size)
    columns = {"input_ids": sequences, "labels": sequences}
    batcher = Batcher(columns, len(sequences), shuffle=False, packing=True, next_token_labels=True)
    batch = next(batcher.batches(0))
    assert batch["input_ids"].shape[0] < len(sequences)  # fewer rows than sequences: packed
    # jitted: one program per call, where running eagerly compiled every operation of 17 families
    out = nnx.jit(lambda m, b: m(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                 segment_ids=b["segment_ids"], labels=b["labels"]))(model, batch)
    logits = np.asarray(out.logits)
    flat = logits.reshape(-1, logits.shape[-1])
    for i, sequence in enumerate(sequences):
        with torch.no_grad():
            alone = hf(torch.tensor([sequence])).logits[0].numpy()
        start = int(batch["segment_starts"][i])
        np.testing.assert_allclose(flat[start:start + len(sequence)], alone, atol=2e-5, rtol=1e-4)
    width = max(LENGTHS)
    padded = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
    labels = torch.tensor([s + [-100] * (width - len(s)) for s in sequences])
    mask = (labels != -100).long()
    moe = {"output_router_logits": False} if family in MOE else {}
    with torch.no_grad():
        expected = hf(padded, attention_mask=mask, labels=labels, **moe).loss.item()
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5)
    if moe:  # the load-balancing loss of the packed batch is the unpacked batch's
        aux = nnx.jit(lambda m, kw: m(**kw, output_router_logits=True).aux_loss)
        packed_aux = aux(model, {k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids")})
        unpacked_aux = aux(model, {"input_ids": padded.numpy(), "attention_mask": mask.numpy()})
        np.testing.assert_allclose(float(packed_aux), float(unpacked_aux), rtol=1e-5)
        assert float(packed_aux) > 0


def test_batcher_unlabels_each_packed_sequence_s_first_token():
    sequences = _sequences(50)
    columns = {"input_ids": sequences, "labels": sequences}
    batch = next(Batcher(columns, len(sequences), shuffle=False, packing=True, next_token_labels=True).batches(0))
    flat_labels, flat_ids = batch["labels"].reshape(-1), batch["input_ids"].reshape(-1)
    for i, sequence in enumerate(sequences):
        start = int(batch["segment_starts"][i])
        assert flat_labels[start] == -100
        assert flat_labels[start + 1:start + len(sequence)].tolist() == sequence[1:]
        assert flat_ids[start:start + len(sequence)].tolist() == sequence
    with pytest.raises(ValueError, match=r"per-token labels that are not a causal LM's next-token targets"):
        Batcher(columns, 4, packing=True)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_tiny("llama", directory)
    return directory


def _rows() -> list[list[int]]:
    rng = np.random.default_rng(1)
    return [rng.integers(3, 90, int(n)).tolist() for n in rng.integers(2, 20, 24)]


def _trainer(directory, out, packing):
    base = models.from_pretrained(directory)
    lora = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                              task_type="CAUSAL_LM")
    model = peftjax.get_peft_model(base, lora, key=jax.random.key(0))
    data = {"input_ids": _rows(), "labels": _rows()}
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=4, learning_rate=5e-3,
                             logging_steps=1, save_steps=0, disable_tqdm=True, packing=packing, seed=3,
                             gradient_accumulation_steps=1)
    return Trainer(model, args, train_dataset=data, eval_dataset=data)


def test_the_trainer_packs_a_causal_lm_and_trains_as_unpacked(llama_dir, tmp_path):
    """By default a Llama causal LM's batches are packed: the same losses, evaluation and adapter
    as the unpacked run, and ``predict`` reads each row's own logits."""
    packed, padded = _trainer(llama_dir, tmp_path / "packed", None), _trainer(llama_dir, tmp_path / "padded", False)
    assert packed.packs() and not padded.packs()
    a, b = packed.train(), padded.train()
    np.testing.assert_allclose([r["loss"] for r in packed.log_history if "loss" in r],
                               [r["loss"] for r in padded.log_history if "loss" in r], rtol=2e-5)
    assert a.global_step == b.global_step == 4
    for key, value in packed.evaluate().items():
        np.testing.assert_allclose(value, padded.evaluate()[key], rtol=2e-5)
    mine, theirs = (peftjax.split(t.model.base_model)[1] for t in (packed, padded))
    for x, y in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-6)
    rows = {"input_ids": [[5, 6, 7], [8, 9, 10, 11, 12]]}
    np.testing.assert_allclose(packed.predict(rows), padded.predict(rows), atol=1e-6)
    packed.compute_metrics = lambda logits, labels: {"rows": logits.shape[0], "tokens": int((labels != -100).sum())}
    metrics = packed.evaluate()  # compute_metrics reads each row's logits: unpacked
    assert (metrics["eval_rows"], metrics["eval_tokens"]) == (24, sum(map(len, _rows())))


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral", "deepseek_v3", "qwen3_5_text", "qwen3_next"])
def test_a_packed_decoder_classifier_reads_each_sequence_at_its_last_token(family, tmp_path):
    """A decoder's sequence classifier on packed rows gives each sequence the logits transformers'
    classifier gives it alone (read at its last non-pad token: one sequence ends in pad tokens,
    as a tokenizer whose pad is its EOS leaves it), and the loss over the right-padded batch."""
    spec = (arch(family, "Qwen3_5TextForSequenceClassification", num_labels=3) if family == "qwen3_5_text"
            else task_arch(family, "ForSequenceClassification", num_labels=3))
    hf = save_tiny(spec, tmp_path)
    model = models.from_pretrained(tmp_path)
    assert model.packs_sequences
    sequences = _sequences(spec.config().vocab_size)
    sequences[2] = sequences[2][:-2] + [0, 0]  # pad_token_id 0 inside the sequence, at its end
    labels = [i % 3 for i in range(len(sequences))]
    batcher = Batcher({"input_ids": sequences, "labels": labels}, len(sequences), shuffle=False, packing=True,
                      pad_token_id=0)
    batch = next(batcher.batches(0))
    assert batch["input_ids"].shape[0] < len(sequences)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "segment_ids", "segment_starts", "labels")}
    out = nnx.jit(lambda m, kw: m(**kw))(model, inputs)  # one program, not one per operation
    with torch.no_grad():
        alone = np.concatenate([hf(torch.tensor([s])).logits.numpy() for s in sequences])
        width = max(LENGTHS)
        padded = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        expected = hf(padded, attention_mask=(padded != 0).long(), labels=torch.tensor(labels)).loss.item()
    np.testing.assert_allclose(np.asarray(out.logits), alone, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(float(out.loss), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="segment_ids and segment_starts come together"):
        model(input_ids=batch["input_ids"], segment_ids=batch["segment_ids"])


def test_the_trainer_packs_a_decoder_classifier_and_trains_as_unpacked(tmp_path):
    """By default a Llama classifier's batches are packed: the same losses and evaluation as the
    unpacked run's."""
    save_tiny(task_arch("llama", "ForSequenceClassification", num_labels=3), tmp_path / "base")
    rows = _rows()
    data = {"input_ids": rows, "labels": [len(r) % 3 for r in rows]}

    def trainer(out, packing):
        lora = peftjax.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
        model = peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), lora, key=jax.random.key(0))
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=3, learning_rate=5e-3,
                                 logging_steps=1, save_steps=0, disable_tqdm=True, packing=packing, seed=3)
        return Trainer(model, args, train_dataset=data, eval_dataset=data)

    packed, padded = trainer(tmp_path / "packed", None), trainer(tmp_path / "padded", False)
    assert packed.packs() and not padded.packs()
    packed.train(), padded.train()
    np.testing.assert_allclose([r["loss"] for r in packed.log_history if "loss" in r],
                               [r["loss"] for r in padded.log_history if "loss" in r], rtol=2e-5)
    for key, value in packed.evaluate().items():
        np.testing.assert_allclose(value, padded.evaluate()[key], rtol=2e-5)


def test_a_family_that_cannot_pack_is_refused_by_name(tmp_path):
    save_tiny("gpt2", tmp_path / "gpt2")
    base = models.from_pretrained(tmp_path / "gpt2")
    assert not getattr(base, "packs_sequences", False)
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(r=2, target_modules=["c_attn"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, packing=True, disable_tqdm=True)
    trainer = Trainer(model, args, train_dataset={"input_ids": [[1, 2, 3]], "labels": [[1, 2, 3]]})
    with pytest.raises(ValueError, match=r"packing=True: GPT2LMHeadModel does not run packed rows"):
        trainer.train()
    # a decoder classifier that does not pack is padded by default and refused under packing=True
    save_tiny(task_arch("gpt2", "ForSequenceClassification", num_labels=2), tmp_path / "gpt2_classifier")
    base = models.from_pretrained(tmp_path / "gpt2_classifier")
    assert not getattr(base, "packs_sequences", False)
    model = peftjax.get_peft_model(base, peftjax.LoraConfig(r=2, target_modules=["c_attn"], task_type="SEQ_CLS"))
    data = {"input_ids": [[1, 2, 3], [4, 5]], "labels": [0, 1]}
    assert not Trainer(model, TrainingArguments(output_dir=str(tmp_path / "default"), max_steps=1, disable_tqdm=True),
                       train_dataset=data).packs()
    trainer = Trainer(model, TrainingArguments(output_dir=str(tmp_path / "packed"), max_steps=1, packing=True,
                                               disable_tqdm=True), train_dataset=data)
    with pytest.raises(ValueError, match=r"packing=True: GPT2ForSequenceClassification does not take segment_ids"):
        trainer.train()
