"""The ``peftjax`` command: train, merge, inspect, generate and predict.

Every failure is one line on stderr (``peftjax: error: ...``) and exit status 1, not a traceback;
``PEFTJAX_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _inspect(args) -> int:
    from peftjax.auto import saved_head_shapes, task_for_adapter
    from peftjax.config import load_config
    from peftjax.io import read_safetensors_header

    directory = _adapter_dir(args)
    config = load_config(directory)
    weights = directory / "adapter_model.safetensors"
    entries, metadata = read_safetensors_header(weights)
    heads = saved_head_shapes(directory)
    count = sum(_numel(e["shape"]) for e in entries.values())
    nbytes = sum(int(e["data_offsets"][1]) - int(e["data_offsets"][0]) for e in entries.values())
    version = config.peft_version or "unknown"
    writer = f"peftjax {metadata['peftjax']}" if "peftjax" in metadata else "HF PEFT (or another PEFT-format writer)"
    d = config.to_dict()
    targets = d.get("target_modules")
    # the rank is the first dimension of LoRA's A (AdaLoRA's ``.lora_A``, embeddings' ``lora_embedding_A``)
    # and of the LyCORIS factors' right halves
    rank_keys = ("lora_A.weight", ".lora_A", "lora_embedding_A", "hada_w1_b", "lokr_w1_b", "lokr_w2_b")
    ranks = sorted({e["shape"][0] for k, e in entries.items() if k.endswith(rank_keys)})
    info = {
        "method": d["peft_type"],
        "task_type": d.get("task_type"),
        "target_modules": targets,
        "r": d.get("r") if d["peft_type"] != "ADALORA" else None,  # AdaLoRA ignores r
        "init_r": d.get("init_r"),  # AdaLoRA
        "target_r": d.get("target_r"),
        "lora_alpha": d.get("lora_alpha"),
        "alpha": d.get("alpha"),  # LoHa, LoKr
        "ranks_in_file": ranks,
        "rank_pattern": d.get("rank_pattern") or None,
        # trainable tokens: TRAINABLE_TOKENS' own ids, or LoRA's trainable_token_indices
        "token_indices": d.get("token_indices") or d.get("trainable_token_indices"),
        "adapter_len": d.get("adapter_len"),  # adaption prompt: prompt tokens per layer, layers from the top
        "adapter_layers": d.get("adapter_layers"),
        "modules_to_save": d.get("modules_to_save"),
        "layer_replication": d.get("layer_replication"),  # LoRA on a base stacked deeper (its layers' ranges)
        "saved_head": {k.removeprefix("base_model.model."): shape for k, shape in heads.items()} or None,
        "model_task": task_for_adapter(config, heads),
        "tensors": len(entries),
        "parameters": count,
        "size_bytes": nbytes,
        "dtypes": sorted({e["dtype"] for e in entries.values()}),
        "written_by": writer,
        "peft_version": version,
        "base_model_name_or_path": d.get("base_model_name_or_path"),
    }
    if d["peft_type"] in ("OFT", "BOFT"):  # r is 0 when the block size is set: say what the file holds
        info = {**info, "blocks_in_file": _orthogonal_blocks(entries)}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            if v is not None:
                print(f"{k.ljust(width)}  {v:,}" if isinstance(v, int) and not isinstance(v, bool) else f"{k.ljust(width)}  {v}")
    return 0


def _orthogonal_blocks(entries) -> list[str]:
    """OFT/BOFT blocks per layer in the file, as ``"<factors> x <blocks> x <size>"`` strings.

    OFT's ``oft_R`` is ``[blocks, b (b - 1) / 2]`` (one block when shared); BOFT's ``boft_R`` is
    ``[factors, blocks, b, b]``.
    """
    found = set()
    for key, e in entries.items():
        shape = [int(s) for s in e["shape"]]
        if key.endswith(("oft_R.weight", "oft_embedding_R.weight")) and len(shape) == 2:
            size = round((1 + (1 + 8 * shape[1]) ** 0.5) / 2)
            found.add(f"1 x {shape[0]} x {size}")
        elif key.endswith("boft_R") and len(shape) == 4:
            found.add(f"{shape[0]} x {shape[1]} x {shape[2]}")
    return sorted(found)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _merge(args) -> int:
    peft_model = _load_with_adapter(args)
    merged = peft_model.merge_and_unload(dequantize=args.dequantize)
    merged.save_pretrained(args.output)
    print(f"merged {args.adapter} into {args.base} as {type(merged).__name__}; wrote {args.output}")
    return 0


def _load_with_adapter(args):
    """The base model as the class the adapter was trained on (its task and head), with the adapter."""
    from peftjax import models
    from peftjax.auto import AutoPeftModel

    quantized = _quantization(args)
    if not args.adapter:
        return models.from_pretrained(args.base, dtype=args.dtype, revision=args.base_revision,
                                      quantization_config=quantized)
    return AutoPeftModel.from_pretrained(_adapter_dir(args), _base_dir(args), dtype=args.dtype,
                                         strict=not args.no_strict, quantization_config=quantized)


def _quantization(args):
    """The base's ``QuantizationConfig`` the command's flags ask for; ``None``: as the base is saved."""
    from peftjax.cli._job import quantization_config

    if not hasattr(args, "load_in_4bit"):  # merge: the base as it is saved
        return None
    return quantization_config({"load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit,
                                "bnb_4bit_quant_type": args.bnb_4bit_quant_type,
                                "bnb_4bit_use_double_quant": args.bnb_4bit_use_double_quant,
                                "bf16": args.dtype == "bfloat16"})


def _add_quantization_arguments(p) -> None:
    """The train job's QLoRA flags, for the commands that run an adapter on its base."""
    p.add_argument("--load-in-4bit", action="store_true",
                   help="run on a 4-bit base, quantized as `peftjax train --load-in-4bit` (and bitsandbytes) "
                        "quantizes it: an adapter trained on one gives its training's outputs")
    p.add_argument("--load-in-8bit", action="store_true", help="run on an 8-bit base (LLM.int8())")
    p.add_argument("--bnb-4bit-quant-type", default="nf4", help="--load-in-4bit: nf4 (default) or fp4")
    p.add_argument("--bnb-4bit-use-double-quant", action="store_true",
                   help="--load-in-4bit: the blocks' scales quantized too (QLoRA's double quantization)")


def _base_dir(args) -> Path:
    """The base model's directory; a Hub repo id is fetched into (or found in) the Hub cache."""
    from peftjax.io._hub import resolve

    return resolve(args.base, revision=args.base_revision)


def _adapter_dir(args) -> Path:
    from peftjax.io._hub import resolve

    return resolve(args.adapter, revision=args.revision, kind="adapter")


def _texts(args) -> list[str]:
    texts = list(args.text or [])
    if args.file:
        texts += [line.rstrip("\n") for line in open(args.file) if line.strip()]
    if not texts:
        raise ValueError("give text with --text or --file")
    return texts


def _generate(args) -> int:
    from peftjax.io import load_tokenizer
    from peftjax.models._seq2seq_generation import is_seq2seq_lm

    model = _load_with_adapter(args)
    tokenizer = load_tokenizer(args.tokenizer or _base_dir(args))
    # an encoder-decoder's output is all new tokens (after the decoder start); a decoder continues the prompt
    seq2seq = is_seq2seq_lm(model)
    tokenizer.padding_side = "right" if seq2seq else "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = _texts(args)
    if args.system is not None and not args.chat:
        raise ValueError("--system is the system message of a --chat prompt; add --chat")
    forced = translation_languages(tokenizer, model, args.src_lang, args.tgt_lang)
    prompts, specials = prompts_for(tokenizer, texts, chat=args.chat, system=args.system)
    batch = tokenizer(prompts, return_tensors="np", padding=True, add_special_tokens=specials)
    greedy = args.temperature is not None and args.temperature <= 0
    streamer = None
    if args.stream:
        if len(texts) != 1 or (args.num_return_sequences or 1) > 1:
            raise ValueError(f"--stream prints one completion as it comes: give one --text (got {len(texts)}) and "
                             f"one sequence (--num-return-sequences {args.num_return_sequences})")
        from transformers import TextStreamer

        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=args.max_new_tokens,
                         do_sample=None if args.temperature is None else not greedy,
                         temperature=None if greedy else args.temperature, top_p=args.top_p,
                         top_k=args.top_k, pad_token_id=tokenizer.pad_token_id, seed=args.seed,
                         repetition_penalty=args.repetition_penalty, min_new_tokens=args.min_new_tokens,
                         presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                         num_beams=args.num_beams, num_return_sequences=args.num_return_sequences,
                         length_penalty=args.length_penalty, no_repeat_ngram_size=args.no_repeat_ngram_size,
                         min_p=args.min_p, typical_p=args.typical_p,
                         bad_words_ids=_bad_words(tokenizer, args.bad_words), stop_strings=args.stop,
                         tokenizer=tokenizer if args.stop else None, streamer=streamer, return_dict_in_generate=False,
                         **forced, **task_inputs(model, args.task_id, len(texts)))
    if streamer is not None:  # printed
        return 0
    per = out.shape[0] // len(texts)  # each prompt's sequences, consecutive rows (the best beam first)
    for i, text in enumerate(texts):
        new = [tokenizer.decode(row if seq2seq else row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
               for row in out[i * per:(i + 1) * per]]
        line = {"prompt": text, "completion": new[0], **({"completions": new} if per > 1 else {})}
        print(json.dumps(line, ensure_ascii=False))
    return 0


def translation_languages(tokenizer, model, source: str | None, target: str | None) -> dict:
    """A multilingual translation model's languages (NLLB-200, M2M100, mBART-50), as transformers'
    recipe sets them: ``source`` as the tokenizer's ``src_lang`` (the language token it puts on each
    text), ``target`` as the decoder's forced first token. Returns ``generate``'s keyword for the
    target (``{"forced_bos_token_id": id}``), or ``{}`` without one.

    Raises:
      ValueError: a language on a model that is not an encoder-decoder, a ``source`` on a tokenizer
        without a source language, or a code that is not a language token of the tokenizer (each
        names the flag and the value).
    """
    from peftjax.io._tokenizer import set_languages
    from peftjax.models._seq2seq_generation import is_seq2seq_lm

    if source is None and target is None:
        return {}
    flag = "--src-lang" if source is not None else "--tgt-lang"
    if not is_seq2seq_lm(model):
        raise ValueError(f"{flag} is a translation model's language; {type(_base(model)).__name__} is not an "
                         "encoder-decoder (SEQ_2_SEQ_LM)")
    token = set_languages(tokenizer, source, target)
    return {} if token is None else {"forced_bos_token_id": token}


def _bad_words(tokenizer, phrases: list[str] | None) -> list[list[int]] | None:
    """``--bad-words``' phrases as ``generate``'s ``bad_words_ids``.

    Raises:
      ValueError: a phrase the tokenizer makes no tokens of (named).
    """
    if not phrases:
        return None
    ids = tokenizer(list(phrases), add_special_tokens=False)["input_ids"]
    empty = [phrase for phrase, tokens in zip(phrases, ids) if not tokens]
    if empty:
        raise ValueError(f"--bad-words: the tokenizer makes no tokens of {empty}")
    return [list(tokens) for tokens in ids]


def prompts_for(tokenizer, texts: list[str], *, chat: bool, system: str | None = None) -> tuple[list[str], bool]:
    """The prompts a causal LM continues, and whether the tokenizer adds its special tokens: the texts
    themselves, or with ``chat`` each text as a user turn (after ``system``'s message, if given) in
    the tokenizer's chat template with the assistant's turn opened, the template writing the special
    tokens (as ``apply_chat_template(..., add_generation_prompt=True)``).

    Raises:
      ValueError: ``chat`` and the tokenizer has no chat template.
    """
    if not chat:
        return texts, True
    from peftjax.training._chat import chat_template_of

    template = chat_template_of(tokenizer)
    head = [{"role": "system", "content": system}] if system is not None else []
    return [tokenizer.apply_chat_template([*head, {"role": "user", "content": text}], chat_template=template,
                                          tokenize=False, add_generation_prompt=True) for text in texts], False


def _predict(args) -> int:
    from peftjax.cli._job import task_tokenizer
    from peftjax.models._seq2seq_generation import is_seq2seq_lm

    model = _load_with_adapter(args)
    what = ("predict needs a sequence- or token-classification, a question-answering, a multiple-choice, a masked "
            "LM or a feature-extraction model")
    if is_seq2seq_lm(model):
        raise ValueError(f"{what}; {type(_base(model)).__name__} is an encoder-decoder (SEQ_2_SEQ_LM): use generate "
                         "or serve")
    by_word = type(_base(model)).__name__.endswith("ForTokenClassification")
    by_span = type(_base(model)).__name__.endswith("ForQuestionAnswering")
    if by_span != (args.context is not None):
        raise ValueError("--context is the text a question-answering model takes its answers from (--text: the "
                         "questions)" + ("" if by_span else f"; {type(_base(model)).__name__} answers no questions"))
    by_choice = type(_base(model)).__name__.endswith("ForMultipleChoice")
    if by_choice != bool(args.choices):
        raise ValueError("--choice gives the texts a multiple-choice model picks from (two or more)" +
                         ("" if by_choice else f"; {type(_base(model)).__name__} picks no choices"))
    if by_choice and len(args.choices) < 2:
        raise ValueError(f"--choice given once ({args.choices[0]!r}): a multiple-choice model picks one of two or more")
    tokenizer = task_tokenizer(args.tokenizer or _base_dir(args), "token_cls" if by_word else "seq_cls")
    texts = _texts(args)
    routed = task_inputs(model, args.task_id, len(texts))  # checked before any tokenizing
    if by_choice:  # each text paired with every choice, as tokenize_multiple_choice pairs them
        for row in pick_choices(model, tokenizer, texts, args.choices, args.max_length):
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if (by_word or by_span) and not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"predict on a {'token classifier' if by_word else 'question-answering model'} needs a fast "
                         f"tokenizer (its offsets find the words); got {type(tokenizer).__name__}")
    if by_span:  # a long context in overlapping windows, as tokenize_question_answering cuts it
        from peftjax.cli._job import question_stride
        from peftjax.training._data import check_context_room

        stride = question_stride(args.stride, args.max_length)
        check_context_room(tokenizer, texts, args.max_length, stride, range(len(texts)),
                           f"--max-length {args.max_length} with --stride {stride}")
        batch = tokenizer(texts, [args.context] * len(texts), return_tensors="np", padding=True,
                          truncation="only_second", max_length=args.max_length, stride=stride,
                          return_overflowing_tokens=True, return_offsets_mapping=True)
        inputs = {k: v for k, v in batch.items() if k in _accepted(model)}
        logits = _logits(model, {**inputs, **task_inputs(model, args.task_id, len(batch["input_ids"]))})
        for row in answer_spans(batch, texts, [args.context] * len(texts), logits,
                                max_answer_tokens=args.max_answer_tokens):
            print(json.dumps(row, ensure_ascii=False))
        return 0
    batch = tokenizer(texts, return_tensors="np", padding=True, truncation=True, max_length=args.max_length,
                      return_offsets_mapping=by_word)
    accepted = _accepted(model)
    logits = _logits(model, {**{k: v for k, v in batch.items() if k in accepted}, **routed})
    if _is_feature_extractor(model):  # its last hidden states, pooled as the checkpoint says
        modes, normalize = sentence_pooling(_base_dir(args))
        vectors = pooled_embeddings(logits, batch["attention_mask"], modes, normalize=normalize)
        for text, vector in zip(texts, vectors):
            print(json.dumps({"text": text, "pooling": "+".join(modes), "normalized": normalize,
                              "embedding": [round(float(x), 6) for x in vector]}, ensure_ascii=False))
        return 0
    if type(_base(model)).__name__.endswith("ForMaskedLM"):
        for row in fill_masks(batch["input_ids"], texts, logits, tokenizer):
            print(json.dumps(row, ensure_ascii=False))
        return 0
    if logits.ndim != (3 if by_word else 2):
        raise ValueError(f"{what}; {type(_base(model)).__name__} is a language model: use generate")
    names = getattr(getattr(_base(model), "config", None), "id2label", None) or {}
    if args.labels:
        given = [name.strip() for name in args.labels.split(",")]
        if len(given) != logits.shape[-1] or not all(given):
            raise ValueError(f"--labels {args.labels!r}: expected {logits.shape[-1]} comma-separated names, one per "
                             f"label of the model in id order")
        names = dict(enumerate(given))
    if by_word:
        for text, words in zip(texts, label_words(batch, texts, logits, names)):
            print(json.dumps({"text": text, "words": words}, ensure_ascii=False))
    else:
        for row in label_texts(texts, logits, names):
            print(json.dumps(row, ensure_ascii=False))
    return 0


def pick_choices(model, tokenizer, texts: list[str], choices: list[str], max_length: int) -> list[dict]:
    """A multiple-choice model's pick for each text among ``choices``: ``{"text", "choice",
    "index", "scores"}``, the scores the softmax over the choices. One batch, one compiled forward."""
    import numpy as np

    pairs = tokenizer([t for t in texts for _ in choices], [c for _ in texts for c in choices], padding=True,
                      truncation=True, max_length=max_length, return_tensors="np")
    accepted = _accepted(model)
    inputs = {k: v.reshape(len(texts), len(choices), -1) for k, v in pairs.items() if k in accepted}
    probs = _softmax(_logits(model, inputs).astype(np.float64))
    return [{"text": text, "choice": choices[int(p.argmax())], "index": int(p.argmax()),
             "scores": [round(float(x), 4) for x in p]} for text, p in zip(texts, probs)]


FILL_CANDIDATES = 5  # the tokens predict prints for each mask, likeliest first (transformers' fill-mask top_k)


def fill_masks(input_ids, texts: list[str], logits, tokenizer, top: int = FILL_CANDIDATES) -> list[dict]:
    """A masked LM's fill-mask rows: for each text, each of its mask tokens' ``top`` likeliest tokens
    and their probabilities (transformers' ``fill-mask`` pipeline's ``token``, ``token_str``,
    ``score``), the masks in the order they stand.

    Raises:
      ValueError: the tokenizer has no mask token, or a text holds none.
    """
    import numpy as np

    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise ValueError(f"{type(tokenizer).__name__} has no mask token: a masked LM fills the mask tokens of --text")
    rows = []
    for text, ids, row_logits in zip(texts, np.asarray(input_ids), np.asarray(logits)):
        positions = np.flatnonzero(ids == mask_id)
        if not len(positions):
            raise ValueError(f"--text {text!r} has no {tokenizer.mask_token}: a masked LM fills the mask tokens "
                             f"of each text")
        masks = []
        for position in positions:
            probs = _softmax(row_logits[position])
            best = np.argsort(-probs, kind="stable")[:top]
            masks.append([{"token": int(t), "token_str": tokenizer.decode([int(t)]), "score": round(float(probs[t]), 6)}
                          for t in best])
        rows.append({"text": text, "masks": masks})
    return rows


def _softmax(logits):
    import numpy as np

    probs = np.exp(logits - logits.max(-1, keepdims=True))
    return probs / probs.sum(-1, keepdims=True)


# sentence-transformers' pooling modes, in the order its Pooling module concatenates them
POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens", "lasttoken")


def sentence_pooling(directory) -> tuple[tuple[str, ...], bool]:
    """How a sentence-transformers checkpoint in ``directory`` turns token states into a text's
    embedding: the pooling modes its ``modules.json``'s Pooling module turns on (see
    :data:`POOLING_MODES`), and whether a Normalize module follows. A directory without
    ``modules.json``: mean pooling, not normalised.

    Raises:
      ValueError: a pooling mode peftjax does not implement, or none (the file named).
    """
    directory = Path(directory)
    listing = directory / "modules.json"
    if not listing.is_file():
        return ("mean_tokens",), False
    modules = json.loads(listing.read_text())
    normalize = any(str(m.get("type", "")).endswith(".Normalize") for m in modules)
    pooling = next((m for m in modules if str(m.get("type", "")).endswith(".Pooling")), None)
    if pooling is None:
        return ("mean_tokens",), normalize
    path = directory / pooling.get("path", "") / "config.json"
    config = json.loads(path.read_text())
    on = [k.removeprefix("pooling_mode_") for k, v in config.items() if k.startswith("pooling_mode_") and v]
    unknown = [m for m in on if m not in POOLING_MODES]
    if unknown or not on:
        raise ValueError(f"{path}: pooling modes {unknown or 'none'} on; peftjax pools with {', '.join(POOLING_MODES)}")
    return tuple(m for m in POOLING_MODES if m in on), normalize


def pooled_embeddings(hidden, attention_mask, modes=("mean_tokens",), *, normalize: bool = False):
    """Each text's embedding from its token states ``[texts, tokens, dim]`` as sentence-transformers
    pools them: the ``modes`` (:data:`POOLING_MODES`) over the tokens ``attention_mask`` keeps,
    concatenated in that order, then L2-normalised where ``normalize``."""
    import numpy as np

    hidden = np.asarray(hidden, np.float32)
    mask = np.asarray(attention_mask, np.float32)[..., None]
    counts = np.maximum(mask.sum(1), 1e-9)
    last = mask.shape[1] - 1 - np.argmax(mask[:, ::-1, 0], axis=1)  # left or right padding
    pooled = {
        "cls_token": hidden[:, 0],
        "max_tokens": np.where(mask > 0, hidden, -1e9).max(1),
        "mean_tokens": (hidden * mask).sum(1) / counts,
        "mean_sqrt_len_tokens": (hidden * mask).sum(1) / np.sqrt(counts),
        "lasttoken": hidden[np.arange(len(hidden)), last],
    }
    out = np.concatenate([pooled[m] for m in modes], axis=-1)
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def label_texts(texts: list[str], logits, names: dict) -> list[dict]:
    """A sequence classifier's ``[texts, labels]`` logits as ``{"text", "label", "score"}`` rows:
    the likeliest label (its name in ``names`` where it has one) and its probability."""
    rows = []
    for text, p in zip(texts, _softmax(logits)):
        k = int(p.argmax())
        rows.append({"text": text, "label": names.get(k, str(k)), "score": round(float(p[k]), 4)})
    return rows


def answer_spans(batch, questions: list[str], contexts: list[str], logits, *,
                 max_answer_tokens: int = 30) -> list[dict]:
    """A question-answering model's ``[windows, tokens, 2]`` start and end logits as each question's
    answer ``{"question", "answer", "start", "end", "score"}``: of the spans of its context's tokens
    in any of its windows that end where or after they start and hold at most ``max_answer_tokens``
    tokens, the one whose start logit plus end logit is largest (within a window: whose start
    probability times end probability is, each a softmax over the window's context tokens: the
    ``score``); ``start``/``end`` are character offsets in the question's context. ``batch`` is the
    fast tokenizer's output for the ``(question, context)`` pairs with ``return_offsets_mapping``,
    one window a question or several (``return_overflowing_tokens``: its
    ``overflow_to_sample_mapping`` names each window's question)."""
    import numpy as np

    from peftjax.training._squad import best_spans

    windows = len(batch["input_ids"])
    owners = np.asarray(batch["overflow_to_sample_mapping"]) if "overflow_to_sample_mapping" in batch \
        else np.arange(windows)
    inside = [np.array([s == 1 for s in batch.sequence_ids(w)]) for w in range(windows)]
    offsets = [np.where(inside[w][:, None], np.asarray(batch["offset_mapping"][w]), -1) for w in range(windows)]
    spans = best_spans(owners, offsets, logits, len(questions), max_answer_tokens=max_answer_tokens)
    rows = []
    for row, (question, context) in enumerate(zip(questions, contexts)):
        found = spans.get(row)
        if found is None:
            raise ValueError(f"question {question!r} leaves no room for the context in --max-length "
                             f"{len(inside[0])} tokens")
        w = found.window
        start, end = (_softmax(np.where(inside[w], logits[w, :, k], -np.inf)) for k in (0, 1))
        rows.append({"question": question, "answer": context[found.first_char:found.end_char],
                     "start": found.first_char, "end": found.end_char,
                     "score": round(float(start[found.first] * end[found.last]), 4)})
    return rows


def label_words(batch, texts: list[str], logits, names: dict) -> list[list[dict]]:
    """A token classifier's ``[texts, tokens, labels]`` logits as each text's words, ``{"word",
    "start", "end", "label", "score"}``: a word takes the label of its first token, the token
    ``tokenize_token_classification`` trains it on (transformers' pipeline calls this aggregation
    "first"). ``batch`` is the fast tokenizer's output for ``texts`` with ``return_offsets_mapping``;
    ``start``/``end`` are character offsets in the text."""
    probs, rows = _softmax(logits), []
    for row, text in enumerate(texts):
        words: dict[int, dict] = {}
        for position, word in enumerate(batch.word_ids(row)):
            if word is None:
                continue
            start, end = (int(x) for x in batch["offset_mapping"][row][position])
            if word in words:
                words[word]["end"] = end
                continue
            k = int(probs[row, position].argmax())
            words[word] = {"start": start, "end": end, "label": names.get(k, str(k)),
                           "score": round(float(probs[row, position, k]), 4)}
        rows.append([{"word": text[w["start"]:w["end"]], **w} for w in words.values()])
    return rows


def _base(model):
    return getattr(model, "base_model", model)


def _is_feature_extractor(model) -> bool:
    """A backbone without a head (``BertModel``, ``LlamaModel``, ...: PEFT's FEATURE_EXTRACTION)."""
    from peftjax.models._auto import TASK_CLASS_SUFFIXES

    name = type(_base(model)).__name__
    headed = [s for task, ends in TASK_CLASS_SUFFIXES.items() if task != "FEATURE_EXTRACTION" for s in ends]
    return name.endswith("Model") and not name.endswith(tuple(headed))


def task_inputs(model, task_id: int | None, rows: int, flag: str = "--task-id") -> dict:
    """``{"task_ids": [task_id] * rows}`` for a model whose active adapter routes each row by its task
    (Poly, multitask prompt tuning); ``{}`` for any other model. ``task_id`` is checked by
    :func:`checked_task_id`."""
    import numpy as np

    config = getattr(model, "peft_config", {}).get(getattr(model, "active_adapter", None))
    task_id = checked_task_id(config, task_id, flag)
    return {} if task_id is None else {"task_ids": np.full(rows, task_id, np.int32)}


def checked_task_id(config, task_id: int | None, flag: str = "--task-id") -> int | None:
    """The task an adapter ``config`` runs texts as: ``task_id``, or 0 for an adapter of one task
    left without one; ``None`` for an adapter that does not route rows by task (or no adapter).

    Raises:
      ValueError: naming ``flag``: a task for an adapter that does not route by task, none for an
        adapter of several tasks, or one outside its tasks.
    """
    from peftjax.training._trainer import TASK_METHODS

    field = TASK_METHODS.get(str(getattr(config, "peft_type", "")))
    if field is None:
        if task_id is not None:
            raise ValueError(f"{flag} {task_id}: the model's adapter routes no rows by task (a Poly or multitask "
                             "prompt tuning adapter does)")
        return None
    tasks = getattr(config, field)
    if task_id is None and tasks != 1:
        raise ValueError(f"{flag}: the {config.peft_type} adapter has {field}={tasks}; give the texts' task, an "
                         f"integer in [0, {tasks})")
    task_id = 0 if task_id is None else task_id
    if not 0 <= task_id < tasks:
        raise ValueError(f"{flag} {task_id}: the {config.peft_type} adapter has {field}={tasks}; expected an integer "
                         f"in [0, {tasks})")
    return task_id


def _logits(model, inputs: dict):
    """``model(**inputs).logits`` as one compiled program (``forward``): called eagerly, a model
    compiles each of its operations on its own the first time (64 programs for MiniLM). A
    question-answering model's are its start and end logits ``[batch, seq, 2]``, a model without a
    head's its last hidden states; per-token outputs start at the text's own tokens, after a prompt
    adapter's virtual ones."""
    import jax
    import numpy as np
    from flax import nnx

    from peftjax.training._trainer import span_logits
    from peftjax.tuners.prompt import virtual_positions

    def logits_of(out):  # a question-answering model's start and end logits, [batch, seq, 2]; a
        if out.start_logits is not None:  # feature extractor's last hidden states
            return span_logits(out)
        return out.logits if out.logits is not None else out.last_hidden_state

    module = getattr(model, "base_model", model)
    tuner = model._active_tuner() if module is not model else None
    virtual = virtual_positions(model)  # a prompt or P-tuning adapter's: before each text's own tokens
    if not isinstance(module, nnx.Module) or (tuner is not None and tuner.forward is not None):
        logits = np.asarray(logits_of(model(**inputs)))  # a method that rewrites the inputs: as it runs
    else:
        graphdef, state = nnx.split(module)

        def forward(state, inputs):
            return logits_of(nnx.merge(graphdef, state)(**inputs))

        logits = np.asarray(jax.jit(forward)(state, inputs))
    return logits[:, virtual:] if logits.ndim == 3 else logits


def _accepted(model) -> set[str]:
    import inspect

    target = getattr(model, "base_model", model)
    return set(inspect.signature(type(target).__call__).parameters)


def _serve(args) -> int:
    from peftjax.io import load_tokenizer
    from peftjax.serving import BatchingGenerator, load_for_serving, require_server_packages, serve

    require_server_packages()  # before minutes of loading
    adapters = {}
    for item in args.adapter or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {item!r}: expected NAME=DIR (a directory or Hub repo id)")
        if name in adapters:
            raise ValueError(f"--adapter {name!r} is given twice")
        adapters[name] = str(_adapter_dir(argparse.Namespace(adapter=path, revision=None)))
    base = _base_dir(args)
    model = load_for_serving(base, adapters, dtype=args.dtype, strict=not args.no_strict,
                             quantization_config=_quantization(args))
    tokenizer = load_tokenizer(args.tokenizer or base)
    translation_languages(tokenizer, model, args.src_lang, args.tgt_lang)  # refused here by their flags
    generator = BatchingGenerator(model, tokenizer, max_batch_size=args.max_batch_size,
                                  max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                                  batch_wait_s=args.batch_wait_ms / 1000, src_lang=args.src_lang,
                                  tgt_lang=args.tgt_lang)
    serve(generator, args.host, args.port, announce=lambda line: print(line, flush=True))
    return 0


def _train(args) -> int:
    from peftjax.cli._job import run_from_cli

    return run_from_cli(args)


NO_STRICT_HELP = "load an adapter whose keys fit the model only in part (default: refuse it)"
REVISION_HELP = "branch, tag or commit of the adapter's Hub repo (default: main)"
BASE_REVISION_HELP = "branch, tag or commit of the base model's Hub repo (default: main)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftjax", description="Parameter-efficient fine-tuning for JAX/Flax.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune with LoRA (a YAML config file and/or flags)",
                       description="Fine-tune a model with an adapter. Flags override the YAML config.")
    from peftjax.cli._job import add_train_arguments

    add_train_arguments(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("merge", help="merge an adapter into its base checkpoint",
                       description="Base checkpoint + adapter -> a merged checkpoint that transformers loads.")
    p.add_argument("base", help="base model directory (config.json + model.safetensors) or Hub repo id")
    p.add_argument("adapter", help="adapter directory (adapter_config.json + adapter_model.safetensors) "
                                   "or Hub repo id")
    p.add_argument("output", help="directory for the merged checkpoint")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")
    p.add_argument("--dequantize", action="store_true",
                   help="a base saved quantized (bitsandbytes): write the merge in floating point instead of "
                        "quantizing the merged weights again (which rounds them, as PEFT warns)")
    p.add_argument("--no-strict", action="store_true", help=NO_STRICT_HELP)
    p.add_argument("--revision", help=REVISION_HELP)
    p.add_argument("--base-revision", help=BASE_REVISION_HELP)
    p.set_defaults(func=_merge)

    p = sub.add_parser("inspect", help="describe an adapter directory",
                       description="Method, targets, ranks, parameter count, size and writer of an adapter.")
    p.add_argument("adapter", help="adapter directory or Hub repo id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--revision", help=REVISION_HELP)
    p.set_defaults(func=_inspect)

    p = sub.add_parser("serve", help="serve many adapters on one base over HTTP",
                       description="An HTTP JSON server: POST /generate {\"prompt\", \"adapter\", ...}; "
                                   "requests for different adapters are generated in one mixed batch.")
    p.add_argument("base", help="base model directory or Hub repo id")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="an adapter to serve under NAME (directory or Hub repo id; repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 takes a free port (the URL is printed)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the base directory)")
    p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
    p.add_argument("--max-batch-size", type=int, default=16, help="most rows generated in one call")
    p.add_argument("--max-prompt-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=256, help="most new tokens a request may ask for")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="how long a batch waits for more requests after its first")
    p.add_argument("--src-lang", help="a multilingual translation model's source language for requests that name "
                                      "none (their src_lang field): the tokenizer's code, eng_Latn for NLLB-200")
    p.add_argument("--tgt-lang", help="its target language for requests that name none (tgt_lang): forced as the "
                                      "first new token")
    p.add_argument("--base-revision", help=BASE_REVISION_HELP)
    p.add_argument("--no-strict", action="store_true", help=NO_STRICT_HELP)
    _add_quantization_arguments(p)
    p.set_defaults(func=_serve)

    for name, func, what in (("generate", _generate, "continue prompts with a causal LM"),
                             ("predict", _predict, "classify texts or each of their words (a sequence or token "
                                                     "classifier), answer questions from a --context, pick one of "
                                                     "the --choice texts (multiple choice), or embed texts (a model "
                                                     "without a head)")):
        p = sub.add_parser(name, help=what, description=f"{what[0].upper()}{what[1:]} (base + optional adapter).")
        p.add_argument("base", help="base model directory or Hub repo id")
        p.add_argument("--adapter", help="adapter directory or Hub repo id")
        p.add_argument("--revision", help=REVISION_HELP)
        p.add_argument("--base-revision", help=BASE_REVISION_HELP)
        p.add_argument("--tokenizer", help="tokenizer directory (default: the base directory)")
        p.add_argument("--text", action="append", help="an input text (repeatable)")
        p.add_argument("--file", help="a file with one input per line")
        p.add_argument("--dtype", default=None, help="float32 (default) or bfloat16")
        p.add_argument("--no-strict", action="store_true", help=NO_STRICT_HELP)
        _add_quantization_arguments(p)
        p.add_argument("--task-id", type=int, default=None,
                       help="Poly and multitask prompt tuning adapters: the texts' task (default: 0 for an adapter "
                            "of one task; one of several needs it)")
        if name == "generate":
            p.add_argument("--max-new-tokens", type=int, default=32)
            p.add_argument("--chat", action="store_true",
                           help="each text is a user turn, put in the tokenizer's chat template with the assistant's "
                                "turn opened (a chat model, or an adapter trained with --task chat)")
            p.add_argument("--system", help="--chat: a system message before each user turn")
            p.add_argument("--temperature", type=float, default=None,
                           help="0 means greedy (default: the checkpoint's generation_config.json, greedy without "
                                "one); the stop tokens are that file's too")
            p.add_argument("--top-p", type=float, default=None)
            p.add_argument("--min-p", type=float, default=None,
                           help="sampling: drop tokens less likely than this times the likeliest (default: the "
                                "generation config's, else off)")
            p.add_argument("--typical-p", type=float, default=None,
                           help="sampling: typical sampling's probability mass (default: the generation config's, "
                                "else off)")
            p.add_argument("--top-k", type=int, default=None,
                           help="sampling: the likeliest k tokens (0: off; default: the generation config's, else "
                                "50, as transformers)")
            p.add_argument("--repetition-penalty", type=float, default=None,
                           help="divides the logits of tokens already in the text (default: the generation "
                                "config's, else off)")
            p.add_argument("--presence-penalty", type=float, default=None,
                           help="lowers the logits of tokens already generated by this (OpenAI's; default off)")
            p.add_argument("--frequency-penalty", type=float, default=None,
                           help="lowers the logits of tokens already generated by this times their count "
                                "(OpenAI's; default off)")
            p.add_argument("--min-new-tokens", type=int, default=None, help="no end of sequence before this many")
            p.add_argument("--stream", action="store_true",
                           help="print the completion as plain text while it is generated (one --text, one "
                                "sequence, no beams)")
            p.add_argument("--stop", nargs="+", metavar="STRING",
                           help="a text ends once it ends in one of these strings (kept in the completion), as "
                                "transformers' stop_strings")
            p.add_argument("--bad-words", nargs="+", metavar="PHRASE",
                           help="phrases never written: each one's tokens (as the tokenizer splits the phrase alone, "
                                "without special tokens) are not completed")
            p.add_argument("--no-repeat-ngram-size", type=int, default=None,
                           help="no n-gram of this size twice in a text, prompt included (default: the generation "
                                "config's, else off)")
            p.add_argument("--num-beams", type=int, default=None,
                           help="beam search with this many beams (greedy over the beams' summed log "
                                "probabilities; default: the generation config's, else 1, no search)")
            p.add_argument("--num-return-sequences", type=int, default=None,
                           help="sequences per prompt, best beam (or first sample) first: each line's "
                                "'completions' (default 1)")
            p.add_argument("--length-penalty", type=float, default=None,
                           help="beam search: a finished beam's score is divided by its length to this power "
                                "(default: the generation config's, else 1)")
            p.add_argument("--src-lang", help="a multilingual translation model's source language, the tokenizer's "
                                              "code (e.g. eng_Latn for NLLB-200, en for M2M100, en_XX for mBART-50)")
            p.add_argument("--tgt-lang", help="its target language: the decoder's forced first token (as "
                                              "forced_bos_token_id in transformers' recipe)")
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--max-length", type=int, default=128)
            p.add_argument("--labels", help="the labels' names in id order, comma-separated (default: the config's "
                                            "id2label; an adapter file carries no names)")
            p.add_argument("--context", help="question answering: the text the answers are taken from (each --text "
                                             "is a question)")
            p.add_argument("--choice", action="append", dest="choices",
                           help="multiple choice: a choice each --text is paired with (repeatable; the model picks "
                                "one per text)")
            p.add_argument("--max-answer-tokens", type=int, default=30,
                           help="question answering: the longest answer, in tokens")
            p.add_argument("--stride", type=int, default=None,
                           help="question answering: tokens each window of a context longer than --max-length "
                                "shares with the one before (default: a quarter of --max-length)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, TypeError, NotImplementedError, RuntimeError, KeyError, ImportError) as e:
        if os.environ.get("PEFTJAX_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"peftjax: error: {message}", file=sys.stderr)
        return 1
