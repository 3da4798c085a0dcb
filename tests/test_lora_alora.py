"""Activated LoRA (aLoRA, ``LoraConfig(task_type="CAUSAL_LM", alora_invocation_tokens=[...])``)
against HF PEFT 0.22.0.

The adapter applies from the start of the last occurrence of its invocation tokens to the end of
each row, and to every generated token after them; before them (and in rows without them) the
model is the base. The oracles: PEFT's ``PeftModelForCausalLM`` forward and ``generate`` on the
same file (padded prompts too), PEFT's training loop from it, PEFT's loading of a file trained
here, the base model's logits before the invocation, and PEFT's refusals.
"""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest

from _method_cases import quiet
from _method_cases import ARCHS, assert_linen_refuses, peft, peft_steps, torch, torch_base
import _tiny
import peftjax
from peftjax import models

INVOKE = [7, 8]
# the tokens start at 2 (row 0), twice in row 1 (the last counts), not at all in row 2, and
# right at the end of row 3
IDS = np.array([[3, 4, 7, 8, 9, 10, 11, 12],
                [5, 7, 8, 6, 7, 8, 12, 13],
                [1, 2, 3, 4, 5, 6, 9, 10],
                [1, 2, 3, 4, 5, 6, 7, 8]])
STARTS = [2, 4, None, 6]
# lora_bias: B's bias too counts from the invocation on, as PEFT's masked lora_B output
FIELDS = dict(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
              alora_invocation_tokens=INVOKE, lora_bias=True)


def assert_close(a, b, atol=1e-5):
    np.testing.assert_allclose(a, b, atol=atol, rtol=0)


def changed(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.fixture(scope="module")
def files(tiny_checkpoint, tmp_path_factory):
    """The tiny Llama and a PEFT-made aLoRA adapter moved off its start."""
    path = tiny_checkpoint(ARCHS["llama"])
    out = tmp_path_factory.mktemp("alora")
    theirs = quiet(peft.get_peft_model, torch_base("llama", path), peft.LoraConfig(**FIELDS))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    theirs.save_pretrained(out)
    return path, out


def peft_model(files, directory=None, trainable=False):
    path, adapter = files
    return quiet(peft.PeftModel.from_pretrained, torch_base("llama", path), directory or adapter,
                 is_trainable=trainable)


def logits(model, ids=IDS, mask=None, jit=False):
    kwargs = {"input_ids": ids} if mask is None else {"input_ids": ids, "attention_mask": mask}
    if jit:
        import flax.nnx as nnx

        return np.asarray(nnx.jit(lambda m, k: m(**k).logits)(model.base_model, kwargs))
    return np.asarray(model(**kwargs).logits)


def test_each_row_is_adapted_from_its_last_invocation_on_as_in_peft(files):
    """PEFT's logits, eager and jitted; the positions before each row's invocation (every position of
    a row without it) are the base model's, those from it on are not."""
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0]), files[1])
    with torch.no_grad():
        expected = peft_model(files).eval()(input_ids=torch.tensor(IDS)).logits.numpy()
        base = torch_base("llama", files[0])(input_ids=torch.tensor(IDS)).logits.numpy()
    assert_close(logits(ours), expected)
    assert_close(logits(ours, jit=True), expected)
    for row, start in enumerate(STARTS):
        before = slice(0, IDS.shape[1] if start is None else start)
        np.testing.assert_allclose(logits(ours)[row, before], base[row, before], atol=1e-5, err_msg=row)
        if start is not None:
            assert changed(logits(ours)[row, start:], base[row, start:]) > 1e-3, row


def test_generation_keeps_the_adapter_on_after_the_invocation_as_peft_s(files):
    """Greedy generation from left-padded prompts of different lengths: PEFT's tokens and each step's
    logits (the adapter on for every new token of a row whose prompt holds the invocation, off for
    one without it)."""
    prompts = np.array([[0, 0, 3, 4, 7, 8], [5, 7, 8, 6, 9, 10], [0, 1, 2, 3, 4, 5]])
    mask = (prompts != 0).astype(np.int64)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0]), files[1])
    out = ours.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, output_logits=True,
                        return_dict_in_generate=True)
    tokens = np.asarray(out.sequences)
    with torch.no_grad():
        theirs = peft_model(files).eval().generate(input_ids=torch.tensor(prompts), attention_mask=torch.tensor(mask),
                                                   max_new_tokens=6, do_sample=False, pad_token_id=0,
                                                   output_logits=True, return_dict_in_generate=True)
    expected = theirs.sequences.numpy()
    for step, (mine, peft_logits) in enumerate(zip(out.logits, theirs.logits)):  # every step's logits too
        np.testing.assert_allclose(np.asarray(mine), peft_logits.numpy(), atol=1e-4, rtol=0, err_msg=step)
    with torch.no_grad():
        base = torch_base("llama", files[0]).generate(input_ids=torch.tensor(prompts),
                                                      attention_mask=torch.tensor(mask), max_new_tokens=6,
                                                      do_sample=False, pad_token_id=0).numpy()
    np.testing.assert_array_equal(tokens, expected)
    np.testing.assert_array_equal(tokens[2], base[2])  # no invocation: the base's continuation
    assert (tokens[:2] != base[:2]).any()


def test_training_from_a_peft_file_follows_peft_s_loop_and_goes_back(files, tmp_path):
    """Three Adam steps from the same file in both frameworks (the functional core here: its jitted
    step finds the invocation in the batch's ids) end at the same logits; the file trained here loads
    in PEFT with them."""
    batch = _tiny.batch(IDS)
    theirs = peft_model(files, trainable=True)
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    peft_steps(theirs, batch, optimizer)
    with torch.no_grad():
        expected = theirs(input_ids=torch.tensor(IDS)).logits.numpy()
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0]), files[1], is_trainable=True)
    start = logits(ours)
    _tiny.train(ours, batch, steps=3, optimizer=optax.adam(2e-2), dropout=False)
    assert_close(logits(ours), expected, atol=2e-5)
    assert changed(logits(ours), start) > 1e-3
    ours.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["alora_invocation_tokens"] == INVOKE
    with torch.no_grad():
        back = peft_model(files, tmp_path).eval()(input_ids=torch.tensor(IDS)).logits.numpy()
    assert_close(back, expected, atol=2e-5)


def test_a_quantized_base_takes_the_adapter_as_its_dequantized_weights_do(files):
    """On an 8-bit base (PEFT's bitsandbytes layers run aLoRA too): the logits of the same adapter on
    the base's dequantized weights."""
    from peftjax.quantization import dequantize_model

    int8 = peftjax.QuantizationConfig(load_in_8bit=True)
    quantized = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0], quantization_config=int8), files[1])
    reference = peftjax.PeftModel.from_pretrained(
        dequantize_model(models.from_pretrained(files[0], quantization_config=int8)), files[1])
    assert_close(logits(quantized), logits(reference), atol=1e-4)


def test_merging_beams_mixed_rows_and_embeddings_only_are_refused(files):
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0]), files[1])
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        ours.merge_and_unload()
    with pytest.raises(NotImplementedError, match="aLoRA does not support merging"):
        peft_model(files).merge_and_unload()
    with pytest.raises(ValueError, match="Beam search not yet supported for aLoRA"):
        ours.generate(input_ids=IDS[:1], max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="finds its invocation tokens in input_ids"):
        ours(inputs_embeds=np.zeros((1, 3, 32), np.float32))
    ours.load_adapter(files[1], adapter_name="other")
    with pytest.raises(NotImplementedError, match="`adapter_names` rows with an aLoRA adapter"):
        ours(input_ids=IDS[:2], adapter_names=["default", "other"])
    unloaded = ours.unload()
    assert type(unloaded) is models.LlamaForCausalLM  # the class the adapter swapped, restored


REFUSED = {  # (fields, error, message, PEFT refuses it too)
    "task": (dict(task_type="SEQ_CLS"), ValueError, r"aLoRA \(alora_invocation_tokens\) is supported for "
             r"task_type='CAUSAL_LM' only", False),
    "embedding": (dict(target_modules=["q_proj", "embed_tokens"]), ValueError,
                  r"embed_tokens: Invalid or unsupported variant combination: \('alora_invocation_tokens',\)", True),
    "dora": (dict(use_dora=True), ValueError,
             r"Invalid or unsupported variant combination: \('alora_invocation_tokens', 'use_dora'\)", True),
    "empty": (dict(alora_invocation_tokens=[]), ValueError, r"must be a non-empty list of token ids", False),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_alora_cannot_adapt_is_refused_by_name_before_any_change(case, files):
    fields, error, message, peft_refuses = REFUSED[case]
    fields = {**FIELDS, **fields}
    base = models.from_pretrained(files[0])
    with pytest.raises(error, match=message):
        peftjax.get_peft_model(base, peftjax.LoraConfig(**fields))
    assert not peftjax.tuners.base.adapter_layers(base) and type(base) is models.LlamaForCausalLM
    if peft_refuses:
        with pytest.raises((ValueError, TypeError)):
            quiet(peft.get_peft_model, torch_base("llama", files[0]), peft.LoraConfig(**fields))


def test_a_model_that_does_not_generate_is_refused(tiny_checkpoint):
    bert = models.from_pretrained(tiny_checkpoint(ARCHS["bert"]))
    with pytest.raises(TypeError, match="aLoRA .* is for causal LMs"):
        peftjax.get_peft_model(bert, peftjax.LoraConfig(**{**FIELDS, "target_modules": ["query"]}))
    assert not peftjax.tuners.base.adapter_layers(bert)


def test_linen_refuses_alora():
    fields = {k: v for k, v in FIELDS.items() if k != "target_modules"}
    assert_linen_refuses(fields, r"proj: aLoRA \(LoraConfig.alora_invocation_tokens\) is supported")


def test_the_trainer_does_not_pack_aloras_rows_and_a_packed_call_is_refused(files, tmp_path):
    """A packed row would hold several sequences, each with its own invocation: the ``Trainer``
    leaves the rows whole (``packing=True`` is refused naming aLoRA), and a call with ``segment_ids``
    is refused; a scanned model finds the invocation as the layer loop does."""
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0]), files[1], is_trainable=True)
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1, report_to="none",
                disable_tqdm=True, plot=False)
    data = {"input_ids": IDS.tolist(), "labels": IDS.tolist()}
    assert not peftjax.Trainer(ours, peftjax.TrainingArguments(**args), data).packs()
    with pytest.raises(ValueError, match="packing=True: an aLoRA adapter switches on at its invocation tokens"):
        peftjax.Trainer(ours, peftjax.TrainingArguments(**args, packing=True), data).packs()
    with pytest.raises(ValueError, match=r"packed rows \(segment_ids\) hold several sequences"):
        ours(input_ids=IDS, segment_ids=np.ones_like(IDS))
    scanned = peftjax.PeftModel.from_pretrained(models.from_pretrained(files[0], scan_layers=True), files[1])
    assert_close(logits(scanned, jit=True), logits(ours))
