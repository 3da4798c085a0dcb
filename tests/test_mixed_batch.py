"""Mixed batches (PEFT's ``adapter_names``): a different LoRA (or IA³) adapter for each row of one batch.

Oracles: HF PEFT's own ``adapter_names`` forward on the same adapter files, and each row run
alone with its adapter set (or the adapters disabled, for ``"__base__"``).
"""

from __future__ import annotations


import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tr = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import _tiny  # noqa: E402
from _torch_models import quiet, save_peft_adapters  # noqa: E402
import peftjax  # noqa: E402
from peftjax import models  # noqa: E402

IDS = np.random.RandomState(0).randint(1, 96, (5, 7))
ROWS = ["b", "__base__", "a", "b", "a"]
# adapters of different ranks, targets and options: one batch must serve them all
ADAPTERS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "o_proj", "down_proj"], lora_bias=True),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny Llama and two adapters HF PEFT wrote, trained-looking (non-zero ``lora_B``)."""
    root = tmp_path_factory.mktemp("mixed")
    return save_peft_adapters(root, ADAPTERS, noise=0.05)


def load_ours(files, names=("a", "b")):
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(files / "base"), files / names[0],
                                              adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(files / name, adapter_name=name)
    return model


def load_peft(files):
    base = quiet(tr.LlamaForCausalLM.from_pretrained, files / "base").eval()
    model = quiet(peft.PeftModel.from_pretrained, base, files / "a", adapter_name="a")
    quiet(model.load_adapter, files / "b", adapter_name="b")
    return model.eval()


def alone(model, ids, name):
    """One row through the model with only ``name`` active (``"__base__"``: adapters disabled)."""
    if name == "__base__":
        with model.disable_adapter():
            return np.asarray(model(input_ids=ids).logits)
    model.set_adapter(name)
    return np.asarray(model(input_ids=ids).logits)


def test_each_row_equals_its_adapter_alone_and_peft_mixed_batch(files):
    ours = load_ours(files)
    mixed = np.asarray(ours(input_ids=IDS, adapter_names=ROWS).logits)
    for i, name in enumerate(ROWS):
        np.testing.assert_allclose(mixed[i], alone(ours, IDS[i:i + 1], name)[0], atol=1e-6, rtol=0)
    with torch.no_grad():
        theirs = load_peft(files)(input_ids=torch.from_numpy(IDS), adapter_names=ROWS).logits.numpy()
    np.testing.assert_allclose(mixed, theirs, atol=1e-5, rtol=0)
    # the rows really differ by adapter: the same ids under a and b give different logits
    same = np.stack([IDS[0]] * 3)
    three = np.asarray(ours(input_ids=same, adapter_names=["a", "b", "__base__"]).logits)
    assert min(np.abs(three[i] - three[j]).max() for i, j in [(0, 1), (0, 2), (1, 2)]) > 1e-3


def test_one_compile_serves_every_assignment(files):
    ours = load_ours(files)
    traces = []

    @nnx.jit
    def logits(model, ids):
        traces.append(1)
        return model(input_ids=ids).logits

    for rows in (ROWS, ["a"] * 5, ["__base__", "b", "b", "a", "__base__"]):
        with ours.mixed_batch(rows):
            got = np.asarray(logits(ours.base_model, IDS))
        np.testing.assert_allclose(got, np.asarray(ours(input_ids=IDS, adapter_names=rows).logits), atol=1e-6)
    assert len(traces) == 1


def test_functional_core_takes_an_index_per_row(files):
    """``set_adapter_rows`` on the model, then ``split``: the indices are state, like the weights."""
    ours = load_ours(files)
    names = ("a", "b")
    peftjax.set_adapter_rows(ours.base_model, ROWS, names)
    graphdef, trainable, rest = peftjax.split(ours.base_model)
    forward = jax.jit(lambda t, r, ids: peftjax.combine(graphdef, t, r)(input_ids=ids).logits)
    got = np.asarray(forward(trainable, rest, IDS))
    peftjax.clear_adapter_rows(ours.base_model)
    np.testing.assert_allclose(got, np.asarray(ours(input_ids=IDS, adapter_names=ROWS).logits), atol=1e-6)
    assert peftjax.tuners.adapter_index(ROWS, names).tolist() == [1, 2, 0, 1, 0]


def test_generate_with_a_different_adapter_per_row(files):
    ours = load_ours(files)
    prompts = IDS[:3, :4]
    rows = ["a", "b", "__base__"]
    mixed = ours.generate(prompts, max_new_tokens=5, adapter_names=rows)
    for i, name in enumerate(rows):
        if name == "__base__":
            with ours.disable_adapter():
                single = ours.generate(prompts[i:i + 1], max_new_tokens=5)
        else:
            ours.set_adapter(name)
            single = ours.generate(prompts[i:i + 1], max_new_tokens=5)
        np.testing.assert_array_equal(mixed[i], single[0])
    theirs = load_peft(files).generate(input_ids=torch.from_numpy(prompts), adapter_names=rows, max_new_tokens=5,
                                       do_sample=False, attention_mask=torch.ones_like(torch.from_numpy(prompts)))
    np.testing.assert_array_equal(mixed, theirs.numpy())


def test_beam_search_repeats_each_row_s_adapter_as_peft(files):
    """Beam search repeats each input row once per beam, and its adapter with it (as PEFT repeats
    ``adapter_names``): each row's beams and returned sequences equal that row searched alone with
    its adapter, and PEFT's ``generate`` with the same names and beams; an adapter alone searches
    beams as PEFT's does too."""
    ours = load_ours(files)
    prompts = IDS[:3, :4]
    rows = ["a", "b", "__base__"]
    settings = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2)
    mixed = ours.generate(prompts, adapter_names=rows, **settings)
    assert mixed.shape[0] == 6
    for i, name in enumerate(rows):
        if name == "__base__":
            with ours.disable_adapter():
                single = ours.generate(prompts[i:i + 1], **settings)
        else:
            ours.set_adapter(name)
            single = ours.generate(prompts[i:i + 1], **settings)
        np.testing.assert_array_equal(mixed[2 * i:2 * i + 2, :single.shape[1]], single)
    theirs = load_peft(files)
    mask = torch.ones_like(torch.from_numpy(prompts))
    with torch.no_grad():
        expected = theirs.generate(input_ids=torch.from_numpy(prompts), attention_mask=mask, adapter_names=rows,
                                   do_sample=False, **settings)
    np.testing.assert_array_equal(mixed, expected.numpy())
    ours.set_adapter("b")
    theirs.set_adapter("b")
    with torch.no_grad():
        expected = theirs.generate(input_ids=torch.from_numpy(prompts), attention_mask=mask, do_sample=False,
                                   **settings)
    np.testing.assert_array_equal(ours.generate(prompts, **settings), expected.numpy())


def test_an_encoder_decoder_s_beams_follow_their_rows_adapters_as_peft(tmp_path):
    """T5: each input row's adapter covers its beams in the decoder and its encoding (PEFT keeps
    the unrepeated names for the encoder, which runs the same rows), as PEFT's ``generate`` with
    ``adapter_names`` and beams; the base's decoder made to write varied tokens."""
    _tiny.save("t5", tmp_path / "tiny")
    hf = quiet(tr.AutoModelForSeq2SeqLM.from_pretrained, tmp_path / "tiny")
    with torch.no_grad():
        for name, weight in hf.decoder.named_parameters():
            if "DenseReluDense" in name or "SelfAttention" in name:
                weight.mul_(5)
    hf.save_pretrained(tmp_path / "base")
    for name, targets in (("a", ["q", "v"]), ("b", ["k", "o", "wi"])):
        base = quiet(tr.AutoModelForSeq2SeqLM.from_pretrained, tmp_path / "base")
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
        quiet(peft.get_peft_model, base, config).save_pretrained(tmp_path / name)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "a",
                                             adapter_name="a")
    ours.load_adapter(tmp_path / "b", adapter_name="b")
    theirs = quiet(peft.PeftModel.from_pretrained, quiet(tr.AutoModelForSeq2SeqLM.from_pretrained, tmp_path / "base"),
                   tmp_path / "a", adapter_name="a")
    quiet(theirs.load_adapter, tmp_path / "b", adapter_name="b")
    ids = np.array([[5, 9, 11, 4, 0], [7, 8, 2, 4, 6], [12, 13, 14, 0, 0]])
    mask = (ids != 0).astype(np.int64)
    rows = ["a", "b", "__base__"]
    settings = dict(adapter_names=rows, max_new_tokens=6, num_beams=3, num_return_sequences=2, eos_token_id=[],
                    pad_token_id=2)
    with torch.no_grad():
        expected = quiet(theirs.eval().generate, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                         do_sample=False, **settings).numpy()
    mixed = ours.generate(ids, mask, **settings)
    np.testing.assert_array_equal(mixed, expected)
    assert len({tuple(r) for r in mixed[::2]}) == 3  # the three adapters' best beams differ


def test_classifier_heads_follow_their_rows(tmp_path):
    """SEQ_CLS: each adapter's ``modules_to_save`` head copy serves its own rows, as in PEFT."""
    _tiny.save("bert", tmp_path / "base")
    for name, r in (("x", 2), ("y", 4)):
        base = quiet(tr.BertForSequenceClassification.from_pretrained, tmp_path / "base")
        model = quiet(peft.get_peft_model, base, peft.LoraConfig(task_type="SEQ_CLS", r=r, init_lora_weights=False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "modules_to_save" in n:
                    p.add_(0.3 * torch.randn_like(p))
        model.save_pretrained(tmp_path / name)
    rows = ["y", "x", "__base__", "y"]
    ids = IDS[:4]
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(tmp_path / "base"), tmp_path / "x",
                                             adapter_name="x")
    ours.load_adapter(tmp_path / "y", adapter_name="y")
    mixed = np.asarray(ours(input_ids=ids, adapter_names=rows).logits)
    base = quiet(tr.BertForSequenceClassification.from_pretrained, tmp_path / "base").eval()
    theirs = quiet(peft.PeftModel.from_pretrained, base, tmp_path / "x", adapter_name="x")
    quiet(theirs.load_adapter, tmp_path / "y", adapter_name="y")
    with torch.no_grad():
        expected = theirs.eval()(input_ids=torch.from_numpy(ids), adapter_names=rows).logits.numpy()
    np.testing.assert_allclose(mixed, expected, atol=1e-5, rtol=0)
    for i, name in enumerate(rows):
        np.testing.assert_allclose(mixed[i], alone(ours, ids[i:i + 1], name)[0], atol=1e-6, rtol=0)


def test_bad_assignments_fail_before_anything_runs(files, tmp_path):
    ours = load_ours(files)
    with pytest.raises(ValueError, match=r"non-existing adapter\(s\): c \(adapters: \['a', 'b'\]\)"):
        ours(input_ids=IDS, adapter_names=["a", "c", "a", "a", "a"])
    with pytest.raises(ValueError, match="Length of `adapter_names` should be the same as the number of inputs, "
                                         "but got 2 and 5"):
        ours(input_ids=IDS, adapter_names=["a", "b"])
    with pytest.raises(TypeError, match="expected a list of str"):
        ours(input_ids=IDS, adapter_names="a")
    ours.set_adapter("a")
    ours.merge_adapter()
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when there are merged adapters"):
        ours(input_ids=IDS, adapter_names=ROWS)
    ours.unmerge_adapter()
    assert not any(hasattr(m, "adapter_rows") for m in peftjax.tuners.named_modules(ours.base_model).values())

    dora = peftjax.get_peft_model(models.from_pretrained(files / "base"), peftjax.LoraConfig(r=2, use_dora=True),
                                  adapter_name="d")
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled."):
        dora(input_ids=IDS, adapter_names=["d"] * 5)
    prefix = peftjax.get_peft_model(models.from_pretrained(files / "base"),
                                    peftjax.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(ValueError, match="Cannot pass `adapter_names` when using prompt learning."):
        prefix(input_ids=IDS, adapter_names=["default"] * 5)
    bottleneck = peftjax.get_peft_model(models.from_pretrained(files / "base"),
                                        peftjax.BottleneckConfig(target_modules=["o_proj"]))
    with pytest.raises(ValueError, match="'default' is a BOTTLENECK adapter; mixed batches take LORA, IA3, ROAD, GLORA adapters"):
        bottleneck(input_ids=IDS, adapter_names=["default"] * 5)
    with pytest.raises(NotImplementedError, match="bottleneck.* adapters cannot serve a different adapter per row"):
        peftjax.set_adapter_rows(bottleneck.base_model, ["default"] * 5, ["default"])


def test_ia3_rows_each_equal_their_adapter_alone(files):
    """IA³ vectors per row (PEFT serves mixed batches for LoRA only; the oracle is each row alone)."""
    config = dict(task_type="CAUSAL_LM", init_ia3_weights=False)
    ours = peftjax.get_peft_model(models.from_pretrained(files / "base"), peftjax.IA3Config(**config),
                                  adapter_name="x")
    # y: other targets, one of them feedforward (scales the input), so rows differ in kind too
    ours.add_adapter("y", peftjax.IA3Config(**config, target_modules=["q_proj", "up_proj"],
                                            feedforward_modules=["up_proj"]))
    rows = ["y", "x", "__base__", "x", "y"]
    mixed = np.asarray(ours(input_ids=IDS, adapter_names=rows).logits)
    for i, name in enumerate(rows):
        np.testing.assert_allclose(mixed[i], alone(ours, IDS[i:i + 1], name)[0], atol=1e-6, rtol=0)
    assert min(np.abs(mixed[1] - np.asarray(ours(input_ids=IDS[1:2], adapter_names=[n]).logits)[0]).max()
               for n in ("y", "__base__")) > 1e-3  # the adapters really change the rows


def test_scanned_layers_take_mixed_batches(files):
    """With ``scan_layers=True`` each stacked layer slices the same row indices."""
    plain = load_ours(files)
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(files / "base", scan_layers=True), files / "a",
                                              adapter_name="a")
    model.load_adapter(files / "b", adapter_name="b")
    np.testing.assert_allclose(np.asarray(model(input_ids=IDS, adapter_names=ROWS).logits),
                               np.asarray(plain(input_ids=IDS, adapter_names=ROWS).logits), atol=1e-5, rtol=0)


def test_several_active_adapters_add_as_in_peft(files):
    """``set_adapter(["a", "b"])``: both adapters' outputs add, as PEFT's ``base_model.set_adapter``."""
    ours = load_ours(files)
    ours.set_adapter(["a", "b"])
    assert ours.active_adapters == ["a", "b"]
    both = np.asarray(ours(input_ids=IDS).logits)
    theirs = load_peft(files)
    theirs.base_model.set_adapter(["a", "b"])
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(IDS)).logits.numpy()
    np.testing.assert_allclose(both, expected, atol=1e-5, rtol=0)
    ours.set_adapter("a")
    assert np.abs(np.asarray(ours(input_ids=IDS).logits) - both).max() > 1e-3
    with pytest.raises(ValueError, match="no adapter 'c'"):
        ours.set_adapter(["a", "c"])
