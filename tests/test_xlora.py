"""X-LoRA against HF PEFT 0.22.0 + PyTorch on a tiny Llama: two LoRA adapters (different targets,
ranks and dropout) mixed per token and layer by PEFT's classifier, both ways.

PEFT 0.22 writes the whole classifier and its file loads here; PEFT 0.21.2's files (its
adapter-name filter dropped the keys containing ``.0.``: the classifier's first layer) are refused
by name. A classifier trained here is written whole, and PEFT reads it back.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from flax import nnx

import _tiny
from _generate import OpenAIPenalties, Recorder
from _torch_models import lazy, padded_batch, torch_logits

import peftjax
from peftjax import models
from peftjax.cli import main
from peftjax.io._adapter import AdapterFileError

torch, tr, peft = lazy("torch"), lazy("transformers"), lazy("peft")
safetensors_numpy = lazy("safetensors.numpy")

ARCH = _tiny.arch("llama", initializer_range=0.2)
LORAS = [dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
         dict(r=4, lora_alpha=8, target_modules=["k_proj", "o_proj", "v_proj"], lora_dropout=0.1)]
VARIANTS = {
    "one-layer": dict(xlora_depth=1),
    "deep-layerwise-topk": dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True, top_k_lora=1,
                                enable_softmax=False, enable_softmax_topk=True, global_scaling_weight=1.5,
                                xlora_dropout_p=0.1),
}


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """The base checkpoint and the directories of two LoRA adapters PEFT made (moved off their start)."""
    base = tiny_checkpoint(ARCH)
    root = tmp_path_factory.mktemp("xlora")
    paths = {}
    for i, fields in enumerate(LORAS):
        torch.manual_seed(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lora = peft.get_peft_model(_torch_base(base), peft.LoraConfig(init_lora_weights=False, **fields))
        lora.save_pretrained(root / str(i))
        paths[str(i)] = str(root / str(i))
    return base, paths


def _torch_base(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tr.LlamaForCausalLM.from_pretrained(path, use_cache=False).eval()


def _peft_xlora(base, paths, variant):
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(_torch_base(base), peft.XLoraConfig(
            task_type="CAUSAL_LM", hidden_size=32, adapters=paths, **VARIANTS[variant]))
    with torch.no_grad():  # a classifier that prefers adapters unevenly, token by token
        for name, p in theirs.named_parameters():
            if "internal_xlora_classifier" in name:
                p.copy_(torch.randn_like(p))
    return theirs.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_s_xlora_file_gives_its_logits_here_and_a_0_21_one_is_refused_by_name(setup, variant, tmp_path):
    base, paths = setup
    theirs = _peft_xlora(base, paths, variant)
    ids, mask = padded_batch(96, seq=9)
    valid = mask.astype(bool)
    ref = torch_logits(theirs, input_ids=ids, attention_mask=mask)
    theirs.save_pretrained(tmp_path)  # PEFT 0.22 writes the whole classifier (0.21.2 dropped its first layer)
    saved = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(base), tmp_path)
    for jit in (False, True):
        out = (nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model.base_model, ids, mask) if jit
               else model(input_ids=ids, attention_mask=mask).logits)
        np.testing.assert_allclose(np.asarray(out)[valid], ref[valid], atol=2e-5, rtol=1e-5)
    theirs_scalings = theirs.get_latest_scalings().detach().numpy()  # the last forward's: ref's
    np.testing.assert_allclose(np.asarray(model.xlora_scalings(input_ids=ids, attention_mask=mask))[valid],
                               theirs_scalings[valid], atol=1e-4, rtol=1e-5)  # unnormalised up to 15
    first = {k: v for k, v in saved.items() if ".layers.0." not in k}  # what PEFT 0.21.2 wrote
    safetensors_numpy.save_file(first, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(AdapterFileError, match=r"classifier's \['base_model.internal_xlora_classifier.layers.0.bias'"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(base), tmp_path)
    plain = torch_logits(_torch_base(base), input_ids=ids, attention_mask=mask)
    assert np.abs(ref - plain)[valid].max() > 1e-2  # the adapters count
    with model.disable_adapter():
        np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid], plain[valid],
                                   atol=2e-5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(input_ids=torch.tensor(ids[:, :6]), attention_mask=torch.tensor(mask[:, :6]),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0).numpy()
    greedy = model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0)
    np.testing.assert_array_equal(greedy, expected)
    streamed, theirs_streamed = Recorder(), Recorder()  # the uncached loop streams as PEFT's generate
    model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0, streamer=streamed)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.generate(input_ids=torch.tensor(ids[:, :6]), attention_mask=torch.tensor(mask[:, :6]),
                        max_new_tokens=4, do_sample=False, pad_token_id=0, streamer=theirs_streamed)
    streamed.assert_same(theirs_streamed)
    # settings left off (what peftjax generate passes) are no requests the uncached loop refuses
    np.testing.assert_array_equal(model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0,
                                                 stop_strings=None, return_dict_in_generate=False), greedy)
    # the repetition penalty (from each row's first real token) and min_new_tokens, in the uncached loop
    stop = int(greedy[0, 6])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(input_ids=torch.tensor(ids[:, :6]), attention_mask=torch.tensor(mask[:, :6]),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=stop,
                                   repetition_penalty=3.0, min_new_tokens=2).numpy()
    constrained = model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0, eos_token_id=stop,
                                 repetition_penalty=3.0, min_new_tokens=2)
    np.testing.assert_array_equal(constrained, expected)
    assert constrained.shape != greedy.shape or (constrained != greedy).any()
    with torch.no_grad(), warnings.catch_warnings():  # n-gram blocking in the uncached loop too
        warnings.simplefilter("ignore")
        expected = theirs.generate(input_ids=torch.tensor(ids[:, :6]), attention_mask=torch.tensor(mask[:, :6]),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=stop,
                                   no_repeat_ngram_size=1).numpy()
    blocked = model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0, eos_token_id=stop,
                             no_repeat_ngram_size=1)
    np.testing.assert_array_equal(blocked, expected)
    assert blocked.shape != greedy.shape or (blocked != greedy).any()
    rules = dict(suppress_tokens=[int(greedy[1, 6])], bad_words_ids=[[int(greedy[0, 6]), int(greedy[0, 7])]],
                 forced_eos_token_id=stop, sequence_bias={(int(greedy[1, 7]),): 4.0})  # the token rules, uncached
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(input_ids=torch.tensor(ids[:, :6]), attention_mask=torch.tensor(mask[:, :6]),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=[], **rules).numpy()
    ruled = model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0, eos_token_id=[], **rules)
    np.testing.assert_array_equal(ruled, expected)
    assert (ruled[:, -1] == stop).all() and (ruled[:, 6:] != greedy[:, 6:]).any()
    # OpenAI's presence and frequency penalties in the uncached loop, against the tests' own processor
    penalties = dict(presence_penalty=2.0, frequency_penalty=1.5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = theirs.generate(input_ids=torch.tensor(ids[:, :6]), attention_mask=torch.tensor(mask[:, :6]),
                                   max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=[],
                                   logits_processor=tr.LogitsProcessorList([OpenAIPenalties(6, 2.0, 1.5)])).numpy()
    penalised = model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0, eos_token_id=[], **penalties)
    np.testing.assert_array_equal(penalised, expected)
    assert (penalised != model.generate(ids[:, :6], mask[:, :6], max_new_tokens=4, pad_token_id=0,
                                        eos_token_id=[])).any()


def test_a_classifier_trained_here_loads_in_peft(setup, tmp_path, capsys):
    """Only the classifier trains (PEFT's count of trainable parameters; the LoRA adapters stay as
    loaded); its file, with every layer, gives PEFT the logits it gives here."""
    base, paths = setup
    variant = VARIANTS["one-layer"]  # (top-1 weights are 0 or 1: no gradient reaches the classifier)
    theirs = _peft_xlora(base, paths, "one-layer")
    model = peftjax.get_peft_model(models.from_pretrained(base), peftjax.XLoraConfig(
        task_type="CAUSAL_LM", adapters=paths, **variant))
    assert model.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert model.peft_config["default"].hidden_size == 32
    ids, mask = padded_batch(96, seq=9, left=False)
    lora_before = np.asarray(model.base_model.model.layers[0].self_attn.q_proj.lora_A["0"].get_value())
    losses = _tiny.train(model, _tiny.batch(ids, mask), steps=3, dropout=False).losses
    assert losses[-1] < losses[0]
    np.testing.assert_array_equal(model.base_model.model.layers[0].self_attn.q_proj.lora_A["0"].get_value(),
                                  lora_before)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "XLORA" and saved["adapters"] == paths and "modules_to_save" not in saved
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["method"] == "XLORA" and info["parameters"] == model.get_nb_trainable_parameters()[0]
    assert main(["merge", str(base), str(tmp_path), str(tmp_path / "merged")]) == 1
    assert "cannot be merged" in capsys.readouterr().err and not (tmp_path / "merged").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(_torch_base(base), tmp_path).eval()
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(model(input_ids=ids, attention_mask=mask).logits)[valid],
                               torch_logits(loaded, input_ids=ids, attention_mask=mask)[valid], atol=2e-5, rtol=1e-5)


def test_bad_x_lora_settings_are_named(setup):
    base, paths = setup
    with pytest.raises(ValueError, match=r"must name the LoRA adapters by their positions, \['0', '1'\]"):
        peftjax.XLoraConfig(adapters={"a": paths["0"], "b": paths["1"]})
    with pytest.raises(ValueError, match="hidden_size=64, but the model's hidden size is 32"):
        peftjax.get_peft_model(models.from_pretrained(base), peftjax.XLoraConfig(adapters=paths, hidden_size=64))
    model = peftjax.get_peft_model(models.from_pretrained(base), peftjax.XLoraConfig(adapters=paths))
    with pytest.raises(ValueError, match="X-LoRA: its weights change with every token, so it cannot be merged"):
        model.merge_adapter()
    # Shadow beside X-LoRA would share its active state (model_active): refused, the model left as it was
    with pytest.raises(NotImplementedError, match=r"carries X-LoRA adapters \['default'\]; a ShadowPEFT adapter "
                                                   r"cannot join them"):
        model.add_adapter("shadow", peftjax.ShadowConfig(task_type="CAUSAL_LM", r=4))
    assert model.base_model.active_adapter_names() == ("default",)
    with pytest.raises(NotImplementedError, match=r"decodes greedily; \['do_sample=True'\]"):
        model.generate(np.ones((1, 3), np.int32), do_sample=True)
    with pytest.raises(NotImplementedError, match=r"decodes greedily; \['num_beams'\]"):
        model.generate(np.ones((1, 3), np.int32), num_beams=2)
    # beams the checkpoint's generation config asks for are refused too, not decoded greedily
    model.base_model.generation_config = models.GenerationDefaults({"num_beams": 4})
    with pytest.raises(NotImplementedError, match="generation config asks for num_beams=4"):
        model.generate(np.ones((1, 3), np.int32), max_new_tokens=2)
    assert model.generate(np.ones((1, 3), np.int32), max_new_tokens=2, num_beams=1).shape == (1, 5)
