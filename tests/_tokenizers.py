"""Small tokenizers trained here (no Hub): byte-level BPE as GPT-2 and RoBERTa have it."""

from __future__ import annotations

# RoBERTa's special tokens in its order: <s> 0, <pad> 1, </s> 2, <unk> 3, <mask> 4
ROBERTA_SPECIALS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
                    "mask_token": "<mask>"}


def byte_level_bpe(directory, cls_name: str, texts: list[str], *, roberta_specials: bool = False,
                   extra_specials: tuple[str, ...] = ()):
    """A byte-level BPE trained on ``texts`` (pre-tokenizer without a prefix space, as GPT-2's and
    RoBERTa's are saved), written to ``directory`` as transformers' ``cls_name``. Its special
    tokens are GPT-2's ``<|endoftext|>``, or RoBERTa's five with ``roberta_specials``, then
    ``extra_specials`` (a chat model's turn markers)."""
    import transformers as tr
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = dict(ROBERTA_SPECIALS) if roberta_specials else {
        "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[*dict.fromkeys(specials.values()), *extra_specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    extra = {"extra_special_tokens": list(extra_specials)} if extra_specials else {}
    getattr(tr, cls_name)(tokenizer_object=tok, **specials, **extra).save_pretrained(directory)
    return directory


def byte_fallback_bpe(directory, texts: list[str]):
    """A SentencePiece-style BPE with byte fallback, as Llama 2's and Mistral's: ``▁`` for spaces,
    the 256 ``<0xAB>`` byte tokens for what the merges do not cover, written to ``directory`` as a
    ``PreTrainedTokenizerFast`` with ``<s>``, ``</s>`` and ``<unk>``."""
    import transformers as tr
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>",
                                                                                        *byte_tokens]))
    tr.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                               eos_token="</s>").save_pretrained(directory)
    return directory
