"""BART, mBART, Marian, Pegasus and M2M100 (NLLB-200) against transformers (logits, loss,
generation, the task heads, dropout) and HF PEFT (LoRA, prefix, prompt tuning both ways).

Tiny models built and saved once in PyTorch: BART (post-norm, tied head, ``final_logits_bias``),
mBART (pre-norm with each stack's final ``layer_norm``, scaled embeddings, the decoder's input
wrapped from each row's last real token), Marian (BART's post-norm layers with sinusoidal positions,
no ``layernorm_embedding``, swish; transformers saves no position table), Pegasus (mBART's pre-norm
layers with sinusoidal positions, which its checkpoints hold) and M2M100 (mBART's layers, fairseq's
weightless positions counting each row's real tokens, no ``final_logits_bias``).
"""

from __future__ import annotations

import contextlib
import json

import jax
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy, moved_off_start, quiet
import peftjax
from peftjax import models

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

FIELDS = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
              decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=64,
              dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
KINDS = {"bart": ("BartConfig", "BartForConditionalGeneration", {}),
         "mbart": ("MBartConfig", "MBartForConditionalGeneration", dict(scale_embedding=True,
                                                                         activation_function="relu")),
         "marian": ("MarianConfig", "MarianMTModel", dict(scale_embedding=True, activation_function="swish")),
         "pegasus": ("PegasusConfig", "PegasusForConditionalGeneration", dict(scale_embedding=True)),
         "m2m_100": ("M2M100Config", "M2M100ForConditionalGeneration", dict(activation_function="gelu"))}
SINUSOIDAL = ("marian", "pegasus")  # a table in the checkpoint's weights
OWN_POSITIONS = (*SINUSOIDAL, "m2m_100")  # the bare model takes decoder_input_ids; given embeddings differ
PREFIX = {"bart": "Bart", "mbart": "MBart", "marian": "Marian", "pegasus": "Pegasus", "m2m_100": "M2M100"}
# encoder rows padded at the end (BART's tokenizer pads right); each ends with its EOS (2)
IDS = np.array([[0, 5, 6, 7, 8, 9, 2, 1], [0, 10, 11, 12, 13, 14, 15, 2], [0, 40, 41, 2, 1, 1, 1, 1]])
MASK = (IDS != 1).astype(np.int64)
# mBART's targets end with their language token (90, 91): its decoder's input starts with it
LABELS = np.array([[20, 21, 22, 2, 90, -100], [23, 24, 25, 26, 2, 91], [27, 2, 90, -100, -100, -100]])
TOL = 5e-5  # random adapters and prefixes: torch's float32 sums in another order


_BUILT: dict = {}


def build(kind, tmp_path_factory):
    """``(kind, checkpoint dir, torch model)``, built once per module; every weight drawn wide (std
    0.2, LayerNorms around 1, a nonzero ``final_logits_bias``) so that greedy decoding varies."""
    if kind not in _BUILT:
        config_name, model_name, extra = KINDS[kind]
        torch.manual_seed(0)
        model = getattr(tr, model_name)(getattr(tr, config_name)(**FIELDS, **extra)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "embed_positions" in name and kind in SINUSOIDAL:  # a fixed table, not a weight to draw
                    continue
                p.copy_((1 if "norm" in name and name.endswith("weight") else 0) + 0.2 * torch.randn_like(p))
            if hasattr(model, "final_logits_bias"):  # M2M100's head has none
                model.final_logits_bias.copy_(0.1 * torch.randn_like(model.final_logits_bias))
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        _BUILT[kind] = kind, path, model
    return _BUILT[kind]


@pytest.fixture(scope="module", params=sorted(KINDS))
def bart(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


def torch_out(model, **kw):
    with torch.no_grad():
        return model(**{k: torch.as_tensor(v) for k, v in kw.items()})


def run_jax(model, **kw):
    model = getattr(model, "base_model", model)
    return nnx.jit(lambda m, kw: m(**kw))(model, kw)


def close(a, b, tol=1e-5):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=tol, rtol=tol)


def real(logits):
    return np.asarray(logits)[LABELS != -100]


def their_base(kind, path, cls="ForConditionalGeneration", **kw):
    name = "MarianMTModel" if (kind, cls) == ("marian", "ForConditionalGeneration") else PREFIX[kind] + cls
    return quiet(getattr(tr, name).from_pretrained, path, **kw).eval()


# ---------------------------------------------------------------- the model


def test_logits_loss_encoder_and_the_saved_checkpoint_are_transformers(bart, tmp_path):
    kind, path, theirs = bart
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    model = models.from_pretrained(path)
    assert type(model).__name__ == type(theirs).__name__
    assert models.model_class_for(model.config, "SEQ_2_SEQ_LM") is type(model)
    out = run_jax(model, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    close(out.logits, ref.logits.numpy())
    close(out.loss, ref.loss.numpy())
    close(out.encoder_last_hidden_state, ref.encoder_last_hidden_state.numpy())
    eager = model(input_ids=IDS, attention_mask=MASK, labels=LABELS)
    close(eager.logits, ref.logits.numpy())
    # BART's bare encoder-decoder shifts input_ids into its decoder, as transformers' does (Marian's
    # and Pegasus's take decoder_input_ids, as transformers')
    their_bare = their_base(kind, path, "Model")
    ours_bare = getattr(models, type(their_bare).__name__).from_pretrained(path)
    bare = dict(input_ids=IDS, attention_mask=MASK, **({"decoder_input_ids": IDS[:, :5]} if kind in OWN_POSITIONS
                                                        else {}))
    close(run_jax(ours_bare, **bare).last_hidden_state, torch_out(their_bare, **bare).last_hidden_state.numpy())
    if kind == "m2m_100":  # each token's position counts the real tokens before it: padded on the left too
        left = np.array([[1, 1, 0, 40, 41, 2], [0, 5, 6, 7, 8, 2]])
        padded = dict(input_ids=left, attention_mask=(left != 1).astype(np.int64), decoder_input_ids=IDS[:2, :5])
        close(run_jax(model, **padded).logits, torch_out(theirs, **padded).logits.numpy())
    if kind in OWN_POSITIONS:
        with pytest.raises(ValueError, match="pass exactly one of decoder_input_ids and decoder_inputs_embeds"):
            ours_bare(input_ids=IDS, attention_mask=MASK)
        # given embeddings (the table's rows): the encoder takes them as they are, the decoder scales them
        with torch.no_grad():
            given = {"inputs_embeds": theirs.get_input_embeddings()(torch.as_tensor(IDS)).numpy(),
                     "decoder_inputs_embeds": theirs.get_input_embeddings()(torch.as_tensor(IDS[:, :5])).numpy()}
        close(run_jax(model, attention_mask=MASK, **given).logits,
              torch_out(theirs, attention_mask=MASK, **given).logits.numpy())
    # saved here, transformers reloads the same model (the bias and all)
    model.save_pretrained(tmp_path)
    back = their_base(kind, tmp_path)
    close(torch_out(back, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy(), ref.logits.numpy())
    # the config reads as transformers reads it
    ours, their_config = models.load_config(path), tr.AutoConfig.from_pretrained(path)
    for key in sorted(set(their_config.to_dict()) - {"transformers_version", "_name_or_path", "architectures",
                                                     "dtype"}):
        assert getattr(ours, key) == getattr(their_config, key), key
    assert (ours.hidden_size, ours.num_attention_heads, ours.num_hidden_layers) == (32, 4, 2)
    # PEFT's parameter count (final_logits_bias is a buffer: not counted, not trained)
    config = dict(r=4) if kind == "bart" else dict(r=4, target_modules=["q_proj", "v_proj"])  # PEFT: BART's only
    their_peft = quiet(peft.get_peft_model, their_base(kind, path), peft.LoraConfig(task_type="SEQ_2_SEQ_LM", **config))
    assert (peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(task_type="SEQ_2_SEQ_LM", **config))
            .get_nb_trainable_parameters() == their_peft.get_nb_trainable_parameters())
    # a vocabulary grown as transformers grows it: the old tokens' logits kept, the new ones' bias 0
    if kind == "m2m_100":  # no final_logits_bias
        return
    resized = their_base(kind, path)  # a copy: the module's model stays as built
    resized.resize_token_embeddings(100)
    grown = models.from_pretrained(path)
    grown.resize_token_embeddings(100)
    assert grown.final_logits_bias.get_value().shape == (1, 100)
    np.testing.assert_array_equal(np.asarray(grown.final_logits_bias.get_value())[0, 96:], 0)
    np.testing.assert_array_equal(resized.final_logits_bias[0, 96:].numpy(), 0)
    out = run_jax(grown, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    assert out.logits.shape[-1] == 100
    close(np.asarray(out.logits)[..., :96], ref.logits.numpy())


# Pegasus's greedy decoding through its adapters: test_adapters_move_both_ways_with_peft
@pytest.mark.parametrize("bart", ["bart", "mbart", "marian", "m2m_100"], indirect=True)
def test_generation_greedy_and_beams_is_transformers_token_for_token(bart):
    """Beam search and greedy decoding from the checkpoint's generation config (BART's ``forced_eos_token_id``
    among it), and the mBART decoder started from a language token."""
    kind, path, theirs = bart
    model = models.from_pretrained(path)
    # tied tiny models repeat a token: no_repeat_ngram_size makes the greedy sequence vary
    for kw in (dict(max_new_tokens=6, num_beams=3), dict(max_new_tokens=7, no_repeat_ngram_size=1)):
        with torch.no_grad():
            ref = theirs.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                  do_sample=False, **kw).numpy()
        np.testing.assert_array_equal(model.generate(IDS, MASK, **kw), ref)
    assert len(np.unique(ref[:, 1:])) > 3  # the weights make a varied sequence
    if kind in ("mbart", "m2m_100"):  # a translation's target language: the start token and a forced first token
        with torch.no_grad():
            ref = theirs.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                  do_sample=False, max_new_tokens=5, decoder_start_token_id=2,
                                  forced_bos_token_id=50).numpy()
        np.testing.assert_array_equal(
            model.generate(IDS, MASK, max_new_tokens=5, decoder_start_token_id=2, forced_bos_token_id=50), ref)


def nllb(path):
    """``(torch model, tokenizer)``: a tiny NLLB-200 checkpoint saved in ``path`` (M2M100 layers, NLLB's
    tokenizer over 57 letter pieces and its 202 language tokens)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = ["<s>", "<pad>", "</s>", "<unk>", *(f"\u2581{c}" for c in letters), *letters, "\u2581"]
    tokenizer = tr.NllbTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], src_lang="eng_Latn")
    return translation_checkpoint(path, tokenizer, "m2m_100", len(pieces), len(tokenizer),
                                  ["eng_Latn", "fra_Latn", "deu_Latn"])


def translation_checkpoint(path, tokenizer, kind: str, pieces: int, size: int, languages: list[str], seed: int = 1):
    """``(torch model, tokenizer)``: a tiny ``kind`` model of ``size`` tokens for ``tokenizer`` (whose
    tokens from ``pieces`` on are its languages and other special tokens), saved in ``path`` with it.
    The tied head writes text: the end's and the special tokens' rows are small, but for the
    ``languages`` given."""
    config_name, model_name, extra = KINDS[kind]
    torch.manual_seed(seed)
    theirs = getattr(tr, model_name)(getattr(tr, config_name)(**{**FIELDS, "vocab_size": size}, **extra)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_((1 if "norm" in name and name.endswith("weight") else 0) + 0.2 * torch.randn_like(p))
        given = tokenizer.convert_tokens_to_ids(languages)
        theirs.model.shared.weight[[2, *(i for i in range(pieces, size) if i not in given)]] *= 0.1
    theirs.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return theirs, tokenizer


def sentencepiece_pieces(path) -> list[str]:
    """The pieces of a small SentencePiece model trained on letters and a few phrases, written to
    ``path`` (its ``<unk>``, ``<s>``, ``</s>`` first)."""
    import io

    spm = pytest.importorskip("sentencepiece")
    corpus = ["hello world", "the quick brown fox", "a longer text to translate", "good morning to you"] * 5
    corpus += ["abcdefghijklmnopqrstuvwxyz", " ".join("abcdefghijklmnopqrstuvwxyz")]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=60,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2)
    path.write_bytes(model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [processor.id_to_piece(i) for i in range(processor.get_piece_size())]


def m2m100(path):
    """``(torch model, tokenizer)``: a tiny M2M100 checkpoint with M2M100's own tokenizer (SentencePiece
    pieces, fairseq's ``vocab.json``, the language tokens ``__fr__`` for the codes ``fr``)."""
    path.mkdir(parents=True, exist_ok=True)
    pieces = sentencepiece_pieces(path / "spm.model")
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    (path / "vocab.json").write_text(json.dumps(vocab))
    tokenizer = tr.M2M100Tokenizer(str(path / "vocab.json"), str(path / "spm.model"), src_lang="en")
    size = max(tokenizer.lang_token_to_id.values()) + 1 + tokenizer.num_madeup_words
    return translation_checkpoint(path, tokenizer, "m2m_100", len(vocab), size, ["__en__", "__fr__", "__de__"],
                                  seed=0)  # a seed whose model reads its source


def mbart50(path):
    """``(torch model, tokenizer)``: a tiny mBART checkpoint with mBART-50's tokenizer (SentencePiece
    pieces, the language tokens ``fr_XX``)."""
    path.mkdir(parents=True, exist_ok=True)
    pieces = sentencepiece_pieces(path / "spm.model")[3:]  # its own <s>, <pad>, </s>, <unk> first
    tokenizer = tr.MBart50Tokenizer(vocab=[(p, 0.0) for p in pieces], src_lang="en_XX")
    return translation_checkpoint(path, tokenizer, "mbart", 4 + len(pieces), len(tokenizer),
                                  ["en_XX", "fr_XX", "de_DE"])


def test_generate_on_the_command_line_translates_between_nllb_languages(tmp_path, capsys):
    """``peftjax generate --src-lang --tgt-lang`` on an NLLB-200 checkpoint: the source language's
    token on each text, the target's forced first, as transformers' recipe generates
    (``tokenizer.src_lang``, ``forced_bos_token_id``)."""
    from peftjax.cli import main

    theirs, tokenizer = nllb(tmp_path)
    texts = ["hello world", "a longer text to translate"]

    def transformers_translation(source, target=None):
        tokenizer.src_lang = source
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        forced = {} if target is None else {"forced_bos_token_id": tokenizer.convert_tokens_to_ids(target)}
        with torch.no_grad():
            out = theirs.generate(**batch, max_new_tokens=6, no_repeat_ngram_size=1, do_sample=False, **forced)
        return [tokenizer.decode(row, skip_special_tokens=True) for row in out]

    want = transformers_translation("fra_Latn", "deu_Latn")
    # the languages change the translation (else this test could not see them)
    assert want != transformers_translation("eng_Latn", "deu_Latn") and want != transformers_translation("fra_Latn")
    command = ["generate", str(tmp_path), "--max-new-tokens", "6", "--no-repeat-ngram-size", "1",
               "--text", texts[0], "--text", texts[1]]
    assert main([*command, "--src-lang", "fra_Latn", "--tgt-lang", "deu_Latn"]) == 0
    assert [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()] == want

    assert main([*command, "--tgt-lang", "Deutsch"]) == 1
    assert "--tgt-lang 'Deutsch' is not a language token of NllbTokenizer" in capsys.readouterr().err
    assert main([*command, "--src-lang", "hello"]) == 1
    assert "--src-lang 'hello' is not a language token" in capsys.readouterr().err


@pytest.mark.parametrize("kind, codes", [("m2m100", ("fr", "de", "en")), ("mbart50", ("fr_XX", "de_DE", "en_XX"))])
def test_generate_on_the_command_line_takes_m2m100_s_and_mbart_50_s_language_codes(kind, codes, tmp_path, capsys):
    """``peftjax generate --src-lang --tgt-lang`` with M2M100's own tokenizer (SentencePiece; the code
    ``fr`` is the token ``__fr__``: ``get_lang_id``) and mBART-50's (``fr_XX``), as transformers'
    recipe translates; NLLB's code is not M2M100's."""
    from peftjax.cli import main

    theirs, tokenizer = {"m2m100": m2m100, "mbart50": mbart50}[kind](tmp_path)
    source, target, other = codes
    texts = ["hello world", "the quick brown fox"]

    def transformers_translation(source, target):
        tokenizer.src_lang = source
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        forced = (tokenizer.get_lang_id if kind == "m2m100" else tokenizer.convert_tokens_to_ids)(target)
        with torch.no_grad():
            out = theirs.generate(**batch, max_new_tokens=6, no_repeat_ngram_size=1, do_sample=False,
                                  forced_bos_token_id=forced)
        return [tokenizer.decode(row, skip_special_tokens=True) for row in out]

    want = transformers_translation(source, target)
    # the languages change the translation (else this test could not see them)
    assert want != transformers_translation(other, target) and want != transformers_translation(source, other)
    command = ["generate", str(tmp_path), "--max-new-tokens", "6", "--no-repeat-ngram-size", "1",
               "--text", texts[0], "--text", texts[1]]
    assert main([*command, "--src-lang", source, "--tgt-lang", target]) == 0
    assert [json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()] == want
    assert main([*command, "--tgt-lang", "deu_Latn"]) == 1
    assert f"--tgt-lang 'deu_Latn' is not a language token of {type(tokenizer).__name__}" in capsys.readouterr().err


def test_train_on_the_command_line_learns_a_translation_between_nllb_languages(tmp_path, capsys):
    """``peftjax train --task seq2seq --src-lang --tgt-lang``: sources and targets tokenized with their
    languages' tokens (the loss before training is transformers' on them), the eval rows generated
    with the target language forced first (PEFT's generation with the trained adapter); another
    target language over the same data files is tokenized anew, not read from the first run's cache."""
    from peftjax.cli import main

    theirs, tokenizer = nllb(tmp_path / "base")
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefgh"), 3)) for _ in range(12)]
    rows = [{"source": f"{a} {b}", "target": f"{b} {a}"} for a, b in rng.choice(words, (12, 2))]
    for name, part in (("train.jsonl", rows[:8]), ("eval.jsonl", rows[8:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))

    def job(target, out, steps):
        assert main(["train", "--task", "seq2seq", "--model", str(tmp_path / "base"), "--dataset",
                     str(tmp_path / "train.jsonl"), "--eval-dataset", str(tmp_path / "eval.jsonl"), "--src-lang",
                     "fra_Latn", "--tgt-lang", target, "--target-modules", "q_proj,v_proj", "--max-steps", steps,
                     "--learning-rate", "0.05", "--per-device-train-batch-size", "4", "--max-length", "16",
                     "--max-target-length", "6", "--lora-dropout", "0", "--output-dir", str(tmp_path / out),
                     "--disable-tqdm", "--save-steps", "0", "--predict", rows[8]["source"]]) == 0
        capsys.readouterr()
        return json.loads((tmp_path / out / "summary.json").read_text())

    def transformers_loss(target):
        tokenizer.src_lang, tokenizer.tgt_lang = "fra_Latn", target
        batch = tokenizer([r["source"] for r in rows[8:]], return_tensors="pt", padding=True)
        batch["labels"] = tokenizer(text_target=[r["target"] for r in rows[8:]], return_tensors="pt", padding=True,
                                    truncation=True, max_length=6)["input_ids"]  # --max-target-length
        assert (batch["labels"][:, 0] == tokenizer.convert_tokens_to_ids(target)).all()
        batch["labels"][batch["labels"] == tokenizer.pad_token_id] = -100
        with torch.no_grad():
            return theirs(**batch).loss.item()

    summary = job("deu_Latn", "deu", "3")
    assert abs(summary["before"]["eval_loss"] - transformers_loss("deu_Latn")) < 1e-5
    trained = quiet(peft.PeftModel.from_pretrained, theirs, tmp_path / "deu").eval()
    tokenizer.src_lang = "fra_Latn"
    sources = tokenizer([r["source"] for r in rows[8:]], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = trained.generate(**sources, max_new_tokens=6, do_sample=False,
                               forced_bos_token_id=tokenizer.convert_tokens_to_ids("deu_Latn"))
    assert (out[:, 1] == tokenizer.convert_tokens_to_ids("deu_Latn")).all()
    assert summary["eval_generations"] == tokenizer.batch_decode(out, skip_special_tokens=True)
    trained.unload()

    again = job("fra_Latn", "fra", "1")  # the same files, another target language
    assert abs(again["before"]["eval_loss"] - transformers_loss("fra_Latn")) < 1e-5
    assert abs(again["before"]["eval_loss"] - summary["before"]["eval_loss"]) > 1e-3

    assert main(["train", "--task", "causal_lm", "--model", str(tmp_path / "base"), "--tgt-lang", "deu_Latn",
                 "--output-dir", str(tmp_path / "lm")]) == 1
    assert "--tgt-lang is a translation job's language: --task seq2seq" in capsys.readouterr().err


def test_serve_translates_each_request_between_its_own_nllb_languages(tmp_path, capsys, monkeypatch):
    """``peftjax serve --src-lang --tgt-lang`` on NLLB-200 with a LoRA adapter: a request without
    languages is translated between the server's, one with ``src_lang``/``tgt_lang`` (``/generate``'s
    fields, or an OpenAI client's ``extra_body``) between its own, each as PEFT's generation with
    transformers' recipe; the tokenizer's language is the request's alone; a bad code is a 400."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from starlette.testclient import TestClient

    from peftjax import serving
    from peftjax.cli import main

    theirs, tokenizer = nllb(tmp_path / "base")
    # a small scale, so that the source language still shows through the adapter
    config = peftjax.LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                task_type="SEQ_2_SEQ_LM")
    peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"), config, key=jax.random.key(0)).save_pretrained(
        tmp_path / "a")
    served = {}
    monkeypatch.setattr(serving, "serve", lambda generator, *args, **kwargs: served.setdefault("it", generator))
    command = ["serve", str(tmp_path / "base"), "--adapter", f"a={tmp_path / 'a'}", "--port", "0"]
    assert main([*command, "--src-lang", "fra_Latn", "--tgt-lang", "deu_Latn"]) == 0
    generator = served["it"]
    trained = quiet(peft.PeftModel.from_pretrained, theirs, tmp_path / "a").eval()
    text = "the quick brown fox"

    def transformers_translation(source, target, adapter=True, ngram=1):
        tokenizer.src_lang = source
        batch = tokenizer([text], return_tensors="pt")
        forced = tokenizer.convert_tokens_to_ids(target)
        with torch.no_grad(), (trained.disable_adapter() if not adapter else contextlib.nullcontext()):
            out = trained.generate(**batch, max_new_tokens=6, no_repeat_ngram_size=ngram, do_sample=False,
                                   forced_bos_token_id=forced)
        return tokenizer.decode(out[0], skip_special_tokens=True)

    asks = [({}, ("fra_Latn", "deu_Latn")),
            ({"src_lang": "eng_Latn", "tgt_lang": "fra_Latn"}, ("eng_Latn", "fra_Latn")),
            ({"src_lang": "eng_Latn"}, ("eng_Latn", "deu_Latn")), ({"adapter": None}, ("fra_Latn", "deu_Latn"))]
    wants = [transformers_translation(*languages, adapter="adapter" not in fields) for fields, languages in asks]
    assert len(set(wants)) == len(wants), wants  # each language and the adapter change the translation
    with TestClient(serving.make_app(generator)) as http:
        assert http.get("/adapters").json()["src_lang"] == "fra_Latn"
        for (fields, _), want in zip(asks, wants):
            body = {"prompt": text, "adapter": "a", "max_new_tokens": 6, "no_repeat_ngram_size": 1, **fields}
            answer = http.post("/generate", json=body)
            assert answer.status_code == 200 and answer.json()["completion"] == want, (fields, answer.text)
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http)
        done = client.completions.create(model="a", prompt=text, max_tokens=6, temperature=0,
                                         extra_body={"src_lang": "eng_Latn", "tgt_lang": "fra_Latn"})
        assert done.choices[0].text == transformers_translation("eng_Latn", "fra_Latn", ngram=None)
        for body, message in (({"tgt_lang": "Deutsch"}, "'tgt_lang' 'Deutsch' is not a language token of Nllb"),
                              ({"src_lang": 3}, "'src_lang' must be a language code (a string), got 3")):
            answer = http.post("/generate", json={"prompt": text, **body})
            assert answer.status_code == 400 and message in answer.json()["error"], answer.text
    assert generator.tokenizer.src_lang == "fra_Latn"  # the server's, after requests of another
    trained.unload()

    assert main([*command, "--tgt-lang", "Deutsch"]) == 1
    assert "--tgt-lang 'Deutsch' is not a language token of NllbTokenizer" in capsys.readouterr().err


@pytest.mark.parametrize("bart", ["bart", "mbart"], indirect=True)  # transformers has no Marian, Pegasus heads
def test_sequence_classification_and_question_answering_are_transformers(bart, tmp_path):
    kind, path, _ = bart
    torch.manual_seed(0)
    theirs = their_base(kind, path, "ForSequenceClassification")
    theirs.save_pretrained(tmp_path / "cls")
    labels = np.array([0, 1, 1])  # mBART's configs default to 2 labels, BART's to 3
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=labels)
    model = models.from_pretrained(tmp_path / "cls")
    assert type(model).__name__ == type(theirs).__name__
    out = run_jax(model, input_ids=IDS, attention_mask=MASK, labels=labels)
    close(out.logits, ref.logits.numpy())
    close(out.loss, ref.loss.numpy())
    with pytest.raises(ValueError, match=r"same number of <eos> tokens; found \[2, 1, 1\]"):
        model(input_ids=np.where((np.arange(8) == 1) & (np.arange(3) == 0)[:, None], 2, IDS))
    with pytest.warns(models.NewWeightsWarning, match="classification_head"):
        assert type(models.from_pretrained(path, task_type="SEQ_CLS")) is type(model)
    theirs = their_base(kind, path, "ForQuestionAnswering")
    theirs.save_pretrained(tmp_path / "qa")
    spans = dict(start_positions=np.array([1, 3, 8]), end_positions=np.array([2, 6, 9]))  # 8, 9: cut off
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, **spans)
    out = run_jax(models.from_pretrained(tmp_path / "qa"), input_ids=IDS, attention_mask=MASK, **spans)
    for name in ("start_logits", "end_logits", "loss"):
        close(getattr(out, name), getattr(ref, name).numpy())


# Marian's layers are BART's; Pegasus has the sinusoidal stacks' dropout (no layernorm_embedding before it)
@pytest.mark.parametrize("bart", ["bart", "mbart", "pegasus"], indirect=True)
def test_dropout_and_layerdrop_sit_where_transformers_train_mode_puts_them(bart, tmp_path, monkeypatch):
    """Every dropout on both sides replaced by the same fixed scaling (x * 0.7 while training): the
    outputs agree only if the dropouts sit at the same places; LayerDrop 1.0 skips every layer on
    both sides."""
    kind, _, _ = bart
    config_name, model_name, extra = KINDS[kind]
    rates = dict(dropout=0.1, attention_dropout=0.2, activation_dropout=0.3)
    torch.manual_seed(0)
    config = getattr(tr, config_name)(**{**FIELDS, **rates}, **extra)
    config._attn_implementation = "eager"  # its attention calls torch's dropout
    theirs = getattr(tr, model_name)(config)
    theirs.save_pretrained(tmp_path)
    ours = models.from_pretrained(tmp_path)
    eval_logits = np.asarray(ours(input_ids=IDS, attention_mask=MASK, labels=LABELS).logits)
    scaled = lambda x, p=0.5, training=True, inplace=False: x * 0.7 if training and p > 0 else x  # noqa: E731
    monkeypatch.setattr(torch.nn.functional, "dropout", scaled)
    fixed = lambda x, rate, key: x * 0.7 if key is not None and rate else x  # noqa: E731
    for module in ("_bart", "_attention"):  # BART's modules and the attention probabilities' shared helper
        monkeypatch.setattr(f"peftjax.models.{module}.dropout", fixed)
    theirs.train()
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    out = ours(input_ids=IDS, attention_mask=MASK, labels=LABELS, dropout_rng=jax.random.key(0))
    close(out.logits, ref.logits.detach().numpy())
    assert np.abs(np.asarray(out.logits) - eval_logits).max() > 1e-3
    monkeypatch.undo()
    config = getattr(tr, config_name)(**FIELDS, encoder_layerdrop=1.0, decoder_layerdrop=1.0, **extra)
    theirs = getattr(tr, model_name)(config)
    theirs.save_pretrained(tmp_path / "layerdrop")
    ours = models.from_pretrained(tmp_path / "layerdrop")
    theirs.train()
    ref = torch_out(theirs, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    close(ours(input_ids=IDS, attention_mask=MASK, labels=LABELS, dropout_rng=jax.random.key(0)).logits,
          ref.logits.detach().numpy())


def test_bad_configs_and_inputs_are_named():
    config = models.ModelConfig("bart", **{**FIELDS, "decoder_attention_heads": 5})
    with pytest.raises(ValueError, match=r"d_model \(32\) must be divisible by decoder_attention_heads \(5\)"):
        models.BartForConditionalGeneration.from_config(config)
    config = models.ModelConfig("bart", **FIELDS)
    config.scan_layers = True
    with pytest.raises(ValueError, match="scan_layers=True is not implemented for BART"):
        models.BartForConditionalGeneration.from_config(config)
    for kind in ("mbart", "marian", "pegasus", "m2m_100"):
        model = models.model_class_for(models.ModelConfig(kind, **FIELDS), "SEQ_2_SEQ_LM").from_config(
            models.ModelConfig(kind, **FIELDS))
        with pytest.raises(ValueError, match=f"no default target_modules for model_type '{kind}'"):  # as PEFT
            peftjax.get_peft_model(model, peftjax.LoraConfig(task_type="SEQ_2_SEQ_LM"))
    for field, value, message in (
            ("share_encoder_decoder_embeddings", False, "share_encoder_decoder_embeddings=False"),
            ("decoder_vocab_size", 80, r"decoder_vocab_size \(80\) other than vocab_size \(96\)")):
        with pytest.raises(ValueError, match=f"Marian: {message}"):
            models.MarianMTModel.from_config(models.ModelConfig("marian", **FIELDS, **{field: value}))
    model = models.BartForQuestionAnswering.from_config(models.ModelConfig("bart", **FIELDS))
    with pytest.raises(ValueError, match="shifts input_ids right"):
        model(inputs_embeds=np.zeros((1, 3, 32), np.float32))
    model = models.BartForSequenceClassification.from_config(models.ModelConfig("bart", **FIELDS))
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=np.zeros((1, 3, 32), np.float32))


def test_remat_gives_the_same_loss_and_gradients():
    """Each layer under ``jax.checkpoint`` (both stacks): the loss and the adapters' gradients of the
    plain run, and the layers really rematerialised."""
    batch = {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}
    results = []
    for remat in ("none", "full"):
        config = models.ModelConfig("bart", **{**FIELDS, "encoder_layers": 1, "decoder_layers": 1})
        config.remat = remat
        model = peftjax.get_peft_model(models.BartForConditionalGeneration.from_config(config),
                                       peftjax.LoraConfig(task_type="SEQ_2_SEQ_LM", r=2, init_lora_weights=False))
        graphdef, adapters, base = peftjax.split(model.base_model)

        def loss(adapters, base, graphdef=graphdef):
            return nnx.merge(graphdef, adapters, base)(**batch).loss

        fn = jax.value_and_grad(loss)
        results.append(jax.jit(fn)(adapters, base))
        assert ("remat" in str(jax.make_jaxpr(fn)(adapters, base))) == (remat == "full")
    (loss0, grads0), (loss1, grads1) = results
    close(loss1, loss0)
    jax.tree.map(close, grads1, grads0)


# ---------------------------------------------------------------- HF PEFT both ways

METHODS = {
    "lora": lambda lib, kind: lib.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, lora_alpha=8, init_lora_weights=False,
                                             # PEFT has default targets for BART, none for the others
                                             target_modules=None if kind == "bart" else ["q_proj", "v_proj"]),
    "all-linear": lambda lib, kind: lib.LoraConfig(task_type="SEQ_2_SEQ_LM", r=4, target_modules="all-linear",
                                             init_lora_weights=False),
    "prefix": lambda lib, kind: lib.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
    "prompt": lambda lib, kind: lib.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3),
}


# all-linear once: the layers it adds are the same in every kind. Marian, Pegasus and M2M100 share
# BART's module names, so LoRA's keys once (Marian); the input paths each differs in once: Pegasus's
# prompt (its stack scales ids' embeddings, not given ones), M2M100's prefix (it shifts the weightless
# positions, as BART's learned ones)
ADAPTER_CASES = [(kind, method) for kind in ("bart", "mbart") for method in sorted(METHODS)
                 if (kind, method) != ("mbart", "all-linear")] + [
    ("marian", "lora"), ("pegasus", "prompt"), ("m2m_100", "prefix")]


@pytest.mark.parametrize("bart,method", ADAPTER_CASES, indirect=["bart"], ids=[f"{k}-{m}" for k, m in ADAPTER_CASES])
def test_adapters_move_both_ways_with_peft(bart, method, tmp_path):
    """PEFT's adapter (its default ``q_proj``/``v_proj`` targets, all-linear, a prefix in the decoder's
    self-attention cache that shifts its positions, virtual tokens before the encoder's input) gives
    PEFT's logits here; one made and trained here gives ours in PEFT."""
    kind, path, _ = bart
    torch.manual_seed(1)
    their = quiet(peft.get_peft_model, their_base(kind, path), METHODS[method](peft, kind)).eval()
    if method.endswith("lora") or method == "all-linear":
        moved_off_start(their, seed=1)
    their.save_pretrained(tmp_path / "peft")
    ref = torch_out(their, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
    if method == "all-linear":
        assert set(peftjax.tuners.lora.lora_layers(model.base_model)) == set(their.targeted_module_names)
    out = run_jax(model, input_ids=IDS, attention_mask=MASK, labels=LABELS)
    close(real(out.logits), real(ref.logits.numpy()), TOL)
    close(out.loss, ref.loss.numpy(), TOL)
    base = torch_out(their_base(kind, path), input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()
    assert np.abs(real(ref.logits.numpy()) - real(base)).max() > 1e-3  # the adapter changes the output
    if method in ("lora", "prompt"):  # generation through the adapter
        with torch.no_grad():
            tokens = their.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                    max_new_tokens=5, do_sample=False).numpy()
        np.testing.assert_array_equal(model.generate(IDS, MASK, max_new_tokens=5), tokens)
    ours = peftjax.get_peft_model(models.from_pretrained(path), METHODS[method](peftjax, kind))
    losses = _tiny.train(ours, {"input_ids": IDS, "attention_mask": MASK, "labels": LABELS}, steps=3,
                         dropout=False).losses
    assert losses[-1] < losses[0]
    ours.save_pretrained(tmp_path / "ours")
    if kind == "marian":  # the commands' class: MarianMTModel, not ...ForConditionalGeneration, from a bare base
        their_base(kind, path, "Model").save_pretrained(tmp_path / "bare")
        assert type(peftjax.AutoPeftModel.from_pretrained(tmp_path / "ours", tmp_path / "bare").base_model) is \
            models.MarianMTModel
    loaded = quiet(peft.PeftModel.from_pretrained, their_base(kind, path), tmp_path / "ours").eval()
    close(real(run_jax(ours, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits),
          real(torch_out(loaded, input_ids=IDS, attention_mask=MASK, labels=LABELS).logits.numpy()), TOL)
