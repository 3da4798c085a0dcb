"""mT5 and UMT5 against transformers: logits, greedy generation, PEFT's default targets.

mT5 is T5 v1.1 whose decoder output is never scaled (its config.json still says
``tie_word_embeddings: true``); UMT5 gives every block's self-attention its own relative position
bias. One tiny model of each, built once in PyTorch with weights wider than the init (std 0.2) so
that greedy decoding varies.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flax import nnx

from _torch_models import lazy
import peftjax
from peftjax import models

torch, peft, tr = lazy("torch"), lazy("peft"), lazy("transformers")

FIELDS = dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, dropout_rate=0.0)
IDS = np.array([[5, 6, 7, 8, 9, 1, 0, 0], [9, 10, 11, 12, 13, 14, 15, 1], [40, 41, 1, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).astype(np.int64)
LABELS = np.array([[20, 21, 22, 1, -100], [23, 24, 25, 26, 1], [27, 1, -100, -100, -100]])
# (config class, model class, config fields): mT5 with its own lm_head (as google/mt5-*), UMT5 tied
# (so its decoder output is scaled, the rule mT5 must not follow)
KINDS = {"mt5": ("MT5Config", "MT5ForConditionalGeneration", {}),
         "umt5": ("UMT5Config", "UMT5ForConditionalGeneration", {"feed_forward_proj": "relu"})}


@pytest.fixture(scope="module", params=sorted(KINDS))
def built(request, tmp_path_factory):
    config_cls, model_cls, extra = KINDS[request.param]
    torch.manual_seed(0)
    model = getattr(tr, model_cls)(getattr(tr, config_cls)(**FIELDS, **extra)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" not in name:
                p.copy_(0.2 * torch.randn_like(p))
        if request.param == "mt5":
            model.lm_head.weight = torch.nn.Parameter(0.2 * torch.randn(96, 32))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, path, model


def test_logits_and_greedy_generation_match_transformers(built):
    kind, path, theirs = built
    model = models.from_pretrained(path)
    assert type(model).__name__ == KINDS[kind][1]
    assert models.model_class_for(model.config, "SEQ_2_SEQ_LM") is type(model)
    own_bias = [b.layer[0].SelfAttention.relative_attention_bias is not None for b in model.encoder.block]
    assert own_bias == ([True, True] if kind == "umt5" else [True, False])
    assert model.scale_decoder_outputs == (kind == "umt5")
    with torch.no_grad():
        ref = theirs(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                     labels=torch.as_tensor(LABELS))
        generated = theirs.generate(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                                    max_new_tokens=7, do_sample=False).numpy()
    out = nnx.jit(lambda m, kw: m(**kw))(model, dict(input_ids=IDS, attention_mask=MASK, labels=LABELS))
    np.testing.assert_allclose(np.asarray(out.logits), ref.logits.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(ref.loss), atol=1e-5, rtol=1e-5)
    ours = model.generate(IDS, MASK, max_new_tokens=7)
    np.testing.assert_array_equal(ours, generated)
    assert len(np.unique(generated[:, 1:])) > 3  # a varied sequence, not one token repeated


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS"])
def test_task_models_match_transformers(built, task, tmp_path):
    """mT5's and UMT5's sequence classifier (the encoder-decoder, a head at the last EOS), token
    classifier (the encoder alone) and question answering (``qa_outputs`` on the decoder fed
    ``shift_right(input_ids)``): transformers' outputs and loss; each built for its task from the
    conditional-generation checkpoint."""
    kind, path, _ = built
    name = {"mt5": "MT5", "umt5": "UMT5"}[kind] + {"SEQ_CLS": "ForSequenceClassification",
                                                   "TOKEN_CLS": "ForTokenClassification",
                                                   "QUESTION_ANS": "ForQuestionAnswering"}[task]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(tr, name).from_pretrained(path, **({} if task == "QUESTION_ANS" else {"num_labels": 3}))
    theirs.eval().save_pretrained(tmp_path)
    targets = {"SEQ_CLS": {"labels": np.array([0, 2, 1])},
               "TOKEN_CLS": {"labels": np.where(MASK == 1, IDS % 3, -100)},
               "QUESTION_ANS": {"start_positions": np.array([1, 3, 8]), "end_positions": np.array([2, 6, 9])}}[task]
    with torch.no_grad():
        ref = theirs(input_ids=torch.as_tensor(IDS), attention_mask=torch.as_tensor(MASK),
                     **{k: torch.as_tensor(v) for k, v in targets.items()})
    model = models.from_pretrained(tmp_path)
    assert type(model).__name__ == name
    assert models.model_class_for(models.load_config(path), task) is type(model)
    out = nnx.jit(lambda m, kw: m(**kw))(model, dict(input_ids=IDS, attention_mask=MASK, **targets))
    outputs = ("start_logits", "end_logits", "loss") if task == "QUESTION_ANS" else ("logits", "loss")
    for field in outputs:
        np.testing.assert_allclose(np.asarray(getattr(out, field)), getattr(ref, field).numpy(), atol=1e-5, rtol=1e-5)


def test_peft_default_targets(built):
    kind, path, theirs = built
    model = models.from_pretrained(path)
    if kind == "umt5":  # PEFT 0.22.0 has no umt5 defaults: both ask for target_modules
        with pytest.raises(ValueError, match="umt5"):
            peftjax.get_peft_model(model, peftjax.LoraConfig(task_type="SEQ_2_SEQ_LM"))
        with pytest.raises(ValueError, match="target_modules"):
            peft.get_peft_model(theirs, peft.LoraConfig(task_type="SEQ_2_SEQ_LM"))
        return
    ours = peftjax.get_peft_model(model, peftjax.LoraConfig(task_type="SEQ_2_SEQ_LM"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        their = peft.get_peft_model(theirs, peft.LoraConfig(task_type="SEQ_2_SEQ_LM"))
    assert set(peftjax.tuners.lora.lora_layers(ours.base_model)) == set(their.targeted_module_names)
    assert ours.get_nb_trainable_parameters() == their.get_nb_trainable_parameters()


def test_configs_read_as_transformers_reads_them(built):
    kind, path, theirs = built
    skip = {"transformers_version", "_name_or_path", "architectures", "dtype"}
    pairs = [(models.ModelConfig(kind), getattr(tr, KINDS[kind][0])()), (models.load_config(path), theirs.config)]
    for ours, ref in pairs:
        for key in sorted(set(ref.to_dict()) - skip):
            assert getattr(ours, key) == getattr(ref, key), (kind, key)
    with pytest.raises(ValueError, match="scan_layers=True is not supported for (mT5|UMT5)"):
        models.from_pretrained(path, scan_layers=True)
