"""HRA, MiSS (formerly Bone), RoAd, DeLoRA, C3A, GraLoRA, SHiRA, HiRA, RandLoRA and VB-LoRA against HF
PEFT 0.22.0 + PyTorch on Llama, BERT and GPT-2, both ways (``test_research_peft_methods.py``: PEFT's
newer research methods), and the checks all of them share: the identity starts, PEFT's refusals
and settings checks, scanned layers.

- HRA: a chain of Householder reflections on a layer's input (``W H``); PEFT 0.22 applies ``H^T``
  in its compact WY form, peftjax reflects the input one vector at a time, so equal logits check
  the algebra, the order of the reflections and Gram-Schmidt.
- MiSS: balance (PEFT's default, and ``init_weights=False``), mini and bat; an ``r`` that does not
  divide the input pads the last shard, as PEFT pads it.
- RoAd: output pairs rotated and scaled, its three variants; merging folds the rotation into the
  bias too, which the BERT case (biased linears) checks through the merged export.
- DeLoRA: a low-rank update normalised per rank and scaled by a trained bound and the base
  weight's column norms (saved with the adapter); per-module rank and bound patterns.
- C3A: block-circulant updates; PEFT runs complex FFTs, peftjax real ones, and merges the matrix
  of circulant blocks; per-module block sizes.
- GraLoRA: a LoRA of k x k blocks, with and without the hybrid plain LoRA; on GPT-2's ``Conv1D``
  too (PEFT's ``fan_in_fan_out`` flip and file).
- SHiRA: sparse updates at positions the file carries; a mask PEFT made with a user's mask
  function loads with its positions.
- HiRA: the frozen weight modulated by a low-rank matrix, on linear layers, GPT-2's ``Conv1D`` and
  an embedding; merging keeps the pre-merge weight, as PEFT does.
- RandLoRA: full-rank updates from shared random bases, dense, sparse and very sparse; with
  ``save_projection=False`` the bases are regenerated from the key on both sides (peftjax draws
  PEFT's own), so the files carry only the per-layer scales.
- VB-LoRA: factors mixed from one trained vector bank all layers share (one variable: its gradient
  sums theirs); files with only each row's top-k indices and weights load both ways.

PEFT adapts ``nn.Linear`` only with the others, so GPT-2's ``Conv1D`` is tested as a refusal,
beside PEFT's shape checks.
"""


from __future__ import annotations

import json
import warnings

import jax
import numpy as np
import optax
import pytest

import _tiny
from _method_cases import ARCHS, IDS, LLAMA, MASK, assert_close, changed, check_interop, peft, run_jax, run_torch, torch
from _method_cases import torch_base, valid
import peftjax
from peftjax import models
from peftjax.tuners.base import adapter_layers


# case -> (config class, arch, fields, trained through the Trainer (one case: the Trainer does not
# depend on the method), else the functional core ("no dropout": without the base model's, for
# HiRA and VB-LoRA on GPT-2, whose 0.1 dropout moves the loss more than three steps of their small
# updates do: HiRA's scaled by the 0.02-sized weights, VB-LoRA's by its 0.02-sized bank)); the BERT
# cases are classifiers on PEFT's default targets (query, value), the head saved; HRA's with the
# targeted biases trained
CASES = {
    "hra-llama": ("HRAConfig", "llama", dict(r=4, target_modules=LLAMA), False),
    "hra-bert-gs": ("HRAConfig", "bert", dict(r=2, apply_GS=True, bias="hra_only", layers_to_transform=[1]), False),
    "miss-llama-balance-padded": ("MissConfig", "llama", dict(r=5, init_weights=False, miss_dropout=0.1,
                                                              target_modules=LLAMA), True),
    "miss-llama-bat": ("MissConfig", "llama", dict(r=8, init_weights="bat", target_modules=LLAMA), False),
    "miss-llama-mini": ("MissConfig", "llama", dict(r=4, init_weights="mini", mini_r=8, target_modules=LLAMA), False),
    "road-llama-1": ("RoadConfig", "llama", dict(group_size=8, target_modules=LLAMA), False),
    "road-llama-4": ("RoadConfig", "llama", dict(variant="road_4", group_size=16, target_modules=LLAMA), False),
    "road-bert-2": ("RoadConfig", "bert", dict(variant="road_2", group_size=8), False),
    "delora-llama": ("DeloraConfig", "llama", dict(r=4, module_dropout=0.1, rank_pattern={"down_proj": 2},
                                                   lambda_pattern={"v_proj": 3.0}, target_modules=LLAMA), False),
    "delora-bert": ("DeloraConfig", "bert", dict(r=2, init_weights=False, bias="delora_only"), False),
    "c3a-llama": ("C3AConfig", "llama", dict(block_size=8, block_size_pattern={"down_proj": 16},
                                             target_modules=LLAMA), False),
    "c3a-bert": ("C3AConfig", "bert", dict(block_size=4, init_weights="kaiming_uniform", bias="c3a_only"), False),
    "gralora-llama-hybrid": ("GraloraConfig", "llama", dict(r=4, hybrid_r=2, gralora_dropout=0.1,
                                                            target_modules=LLAMA), False),
    "gralora-gpt2": ("GraloraConfig", "gpt2", dict(r=4, gralora_k=4, alpha=8), False),
    "shira-llama": ("ShiraConfig", "llama", dict(r=2, target_modules=LLAMA), False),
    "shira-bert": ("ShiraConfig", "bert", dict(r=1), False),
    "paca-llama": ("PacaConfig", "llama", dict(r=4, random_seed=3, target_modules=LLAMA,
                                               paca_indices_pattern={"layers.1.self_attn.q_proj": [5, 1, 2]}), False),
    "paca-bert": ("PacaConfig", "bert", dict(r=2, paca_alpha=16), False),
    "hira-llama": ("HiraConfig", "llama", dict(r=2, hira_dropout=0.1, target_modules=LLAMA), False),
    "hira-bert-embedding": ("HiraConfig", "bert", dict(r=2, target_modules=["query", "value", "word_embeddings"]),
                            False),
    "hira-gpt2": ("HiraConfig", "gpt2", dict(r=2, init_weights="gaussian"), "no dropout"),
    "randlora-llama": ("RandLoraConfig", "llama", dict(r=8, randlora_dropout=0.1, projection_prng_key=5,
                                                       target_modules=LLAMA), False),
    "randlora-bert-sparse-unsaved": ("RandLoraConfig", "bert", dict(r=8, sparse=True, save_projection=False), False),
    "randlora-gpt2-very-sparse": ("RandLoraConfig", "gpt2", dict(r=8, very_sparse=True, randlora_alpha=16), False),
    "vblora-llama": ("VBLoRAConfig", "llama", dict(r=2, num_vectors=16, vector_length=8, vblora_dropout=0.1,
                                                   target_modules=LLAMA), False),
    "vblora-bert-topk": ("VBLoRAConfig", "bert", dict(r=2, num_vectors=12, vector_length=4, topk=3,
                                                      save_only_topk_weights=True), False),
    "vblora-gpt2": ("VBLoRAConfig", "gpt2", dict(r=4, num_vectors=8, vector_length=8, init_logits_std=1.0),
                    "no dropout"),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(spec) for name, spec in ARCHS.items()}


@pytest.mark.parametrize("case", sorted(CASES))
def test_interop_with_peft_both_ways_and_merge(case, checkpoints, tmp_path, capsys):
    """Each case both ways with PEFT, merged and exported (``_method_cases.check_interop``)."""
    check_interop(CASES[case], checkpoints, tmp_path, capsys, eager=case == "hra-llama")


def test_the_identity_starts_and_hra_s_odd_r_warning_are_peft_s(checkpoints):
    """HRA with an even ``r``, MiSS, RoAd, DeLoRA, C3A's zero start, GraLoRA, SHiRA, HiRA, RandLoRA, BEFT,
    GLoRA, DEFT (its ``R`` taken from the weight), PEANuT, Super-Tuning and WaveFT start as the identity; HRA
    with an odd ``r`` cannot, and says so as PEFT does."""
    path = checkpoints["llama"]
    base = run_torch(torch_base("llama", path))
    for config in (peftjax.HRAConfig(r=4, target_modules=["q_proj"]), peftjax.MissConfig(r=4, target_modules=LLAMA),
                   peftjax.RoadConfig(group_size=8, target_modules=LLAMA),
                   peftjax.DeloraConfig(r=4, target_modules=LLAMA), peftjax.C3AConfig(block_size=8, init_weights=True,
                                                                                  target_modules=LLAMA),
                   peftjax.GraloraConfig(r=4, hybrid_r=2, target_modules=LLAMA),
                   peftjax.ShiraConfig(r=2, target_modules=LLAMA),
                   peftjax.HiraConfig(r=2, target_modules=LLAMA + ["embed_tokens"]),
                   peftjax.RandLoraConfig(r=8, target_modules=LLAMA), peftjax.BeftConfig(),
                   peftjax.GloraConfig(r=2, target_modules=LLAMA), peftjax.DeftConfig(r=4, target_modules=LLAMA),
                   peftjax.DeftConfig(r=4, alpha=8, decomposition_method="qr", target_modules=LLAMA),
                   peftjax.PeanutConfig(r=4, depth=1, target_modules=LLAMA),
                   peftjax.SupertuningConfig(sparsity=0.9, r=2, target_modules=LLAMA),
                   peftjax.WaveFTConfig(n_frequency=16, wavelet_family="sym3", target_modules=LLAMA)):
        assert_close(run_jax(peftjax.get_peft_model(models.from_pretrained(path), config)), base)
    fields = dict(r=3, target_modules=["q_proj"])
    for make in (lambda: peftjax.get_peft_model(models.from_pretrained(path), peftjax.HRAConfig(**fields)),
                 lambda: peft.get_peft_model(torch_base("llama", path), peft.HRAConfig(**fields))):
        with pytest.warns(UserWarning, match="symmetric initialization can NOT be performed when r is odd"):
            odd = make()
        out = run_jax(odd) if isinstance(odd, peftjax.PeftModel) else run_torch(odd)
        assert changed(out, base) > 1e-4


@pytest.mark.parametrize(("config_class", "arch", "fields", "match"), [
    ("HRAConfig", "gpt2", dict(target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's HRA does not"),
    ("MissConfig", "gpt2", dict(r=4, target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's MiSS"),
    ("MissConfig", "llama", dict(r=33, target_modules=["q_proj"]),
     r"q_proj: `r` \(33\) must be less than or equal to in_features"),
    ("MissConfig", "llama", dict(r=12, init_weights="bat", target_modules=["down_proj"]),
     r"down_proj: The weight matrix must be fully divisible into \[r, r\] blocks \(in_features 48, out_features 32"),
    ("MissConfig", "llama", dict(r=4, init_weights="mini", mini_r=5, target_modules=["q_proj"]),
     "q_proj: mini_r is divided along the out_features dimension; out_features 32 is not divisible by mini_r 5"),
    ("RoadConfig", "gpt2", dict(group_size=8, target_modules=["c_attn"]), "c_attn is transformers' Conv1D"),
    ("RoadConfig", "llama", dict(group_size=12, target_modules=["q_proj"]),
     r"q_proj: The out_features of the base layer \(32\) must be divisible by group_size \(12\)"),
    ("C3AConfig", "gpt2", dict(block_size=8, target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's C3A"),
    ("C3AConfig", "llama", dict(block_size=12, target_modules=["q_proj"]),
     "q_proj: The block size should be a factor of the input size. However, the input size is 32 and the block"),
    ("C3AConfig", "llama", dict(block_size=16, block_size_pattern={"v_proj": 32}, target_modules=["v_proj"]),
     "v_proj: The block size should be a factor of the output size. However, the output size is 16"),
    ("GraloraConfig", "llama", dict(r=6, gralora_k=3, target_modules=["q_proj"]),
     "q_proj: in_features should be divisible by gralora_k, but got 32 and 3"),
    ("ShiraConfig", "gpt2", dict(r=1, target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's SHiRA"),
    ("VBLoRAConfig", "llama", dict(vector_length=12, target_modules=["q_proj"]),
     "q_proj: `in_features` 32 must be divisible by `vector_length` 12"),
    ("BeftConfig", "gpt2", dict(target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's BEFT"),
    ("GloraConfig", "gpt2", dict(target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's GLoRA"),
    ("PeanutConfig", "gpt2", dict(target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's PEANuT"),
    ("SupertuningConfig", "gpt2", dict(target_modules=["c_attn"]), "c_attn is transformers' Conv1D .*PEFT's Super-"),
    ("SupertuningConfig", "llama", dict(sparsity=0.9995, target_modules=["v_proj"]),
     "sparsity=0.9995 leaves no trainable entries for a weight with 512 elements"),
    ("WaveFTConfig", "llama", dict(n_frequency=513, target_modules=["v_proj"]),
     r"v_proj: `n_frequency` should be less than or equal to the product of the input and output dimensions but "
     r"the value passed is 513 and the product is 512"),
    ("ShiraConfig", "llama", dict(r=16, target_modules=["v_proj"]),
     "v_proj: The set rank 16 results in more shira params than the total number of params in the base layer 512"),
])
def test_what_peft_refuses_is_refused_by_name(config_class, arch, fields, match, checkpoints):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises((TypeError, ValueError, NotImplementedError)):
            peft.get_peft_model(torch_base(arch, checkpoints[arch]), getattr(peft, config_class)(**fields))
    with pytest.raises((TypeError, ValueError), match=match):
        peftjax.get_peft_model(models.from_pretrained(checkpoints[arch]), getattr(peftjax, config_class)(**fields))


def test_bad_settings_are_named():
    for make, match in (
        (lambda: peftjax.HRAConfig(r=0), "`r` must be >= 1, got 0"),
        (lambda: peftjax.HRAConfig(bias="lora_only"), "bias"),
        (lambda: peftjax.MissConfig(init_weights="pissa"), r"`init_weights` must be one of \[True, False, 'bat', "),
        (lambda: peftjax.MissConfig(miss_dropout=1.5), r"`miss_dropout` must be in \[0, 1\), got 1.5"),
        (lambda: peftjax.RoadConfig(variant="road_3"), "variant"),
        (lambda: peftjax.RoadConfig(group_size=7), "group_size must be divisible by 2"),
        (lambda: peftjax.C3AConfig(init_weights="orthogonal"), r"`init_weights` must be one of \[True, False, 'gau"),
        (lambda: peftjax.C3AConfig(bias="lora_only"), "bias"),
        (lambda: peftjax.GraloraConfig(r=5), "r should be divisible by gralora_k, but got 5 and 2"),
        (lambda: peftjax.GraloraConfig(hybrid_r=-1), "`hybrid_r` must be >= 0, got -1"),
        (lambda: peftjax.ShiraConfig(r=0), "`r` must be >= 1, got 0"),
        (lambda: peftjax.HiraConfig(init_weights="orthogonal"), r"`init_weights` must be one of \[True, False, 'gau"),
        (lambda: peftjax.HiraConfig(hira_dropout=1.0), r"`hira_dropout` must be in \[0, 1\)"),
        (lambda: peftjax.VBLoRAConfig(topk=0), "`topk` must be >= 1, got 0"),
        (lambda: peftjax.VBLoRAConfig(num_vectors=2, topk=3), r"`topk` \(3\) must not exceed `num_vectors` \(2\)"),
        (lambda: peftjax.GloraConfig(config_C="constant"), r"`config_C` must be one of \['lora', 'none', 'vector'\]"),
        (lambda: peftjax.GloraConfig(config_D_E="lora"), r"`config_D_E` must be one of \['constant', 'none', 'v"),
        (lambda: peftjax.DeftConfig(decomposition_method="svd"), "Unknown decomposition_method 'svd', must be one"),
        (lambda: peftjax.DeftConfig(deft_dropout=1.0), r"`deft_dropout` must be in \[0, 1\)"),
        (lambda: peftjax.PeanutConfig(depth=-1), "`depth` must be >= 0, got -1"),
        (lambda: peftjax.PeanutConfig(r=0), "`r` must be >= 1, got 0"),
        (lambda: peftjax.SupertuningConfig(sparsity=1.0), r"sparsity must be in \[0.0, 1.0\), got 1.0"),
        (lambda: peftjax.SupertuningConfig(lora_alpha=4), "lora_alpha is set but r is None"),
        (lambda: peftjax.SupertuningConfig(r=0), "r must be a positive integer or None, got 0"),
        (lambda: peftjax.UniLoraConfig(theta_d_length=0), "`theta_d_length` should be a positive integer, got 0"),
        (lambda: peftjax.UniLoraConfig(bias="lora_only"), "bias"),
        (lambda: peftjax.OSFConfig(effective_rank=-1), "`effective_rank` must be >= 0, got -1"),
        (lambda: peftjax.TinyLoraConfig(weight_tying=1.5), "`weight_tying` should be a float between 0.0 and 1.0"),
        (lambda: peftjax.TinyLoraConfig(init_weights="gaussian"), r"`init_weights` must be one of \[True, False, 'u"),
        (lambda: peftjax.WaveFTConfig(wavelet_family="coif4"), "'coif4' is not supported: PEFT 0.22.0 accepts the "
                                                               "name but its filter table for coif4 is not PyWav"),
        (lambda: peftjax.WaveFTConfig(wavelet_family="db12"), "'db12' is not supported: .*no filters for it"),
        (lambda: peftjax.WaveFTConfig(wavelet_family="haar"), r"`wavelet_family` must be one of \['db1', 'db2'"),
        (lambda: peftjax.WaveFTConfig(n_frequency=0), "`n_frequency` must be >= 1, got 0"),
    ):
        with pytest.raises(ValueError, match=match):
            make()


MIXED = {  # method -> (arch, the two adapters' configs): PEFT 0.22.0's methods with a mixed-batch forward
    "RoadConfig": ("llama", dict(group_size=8, init_weights=False, target_modules=LLAMA),
                   dict(variant="road_2", group_size=4, init_weights=False, target_modules=["q_proj"])),
    "GloraConfig": ("bert", dict(r=2, init_weights=False), dict(config_A_B="vector", config_C="vector",
                                                                config_D_E="vector", init_weights=False,
                                                                target_modules=["query", "dense"])),
}


@pytest.mark.parametrize("config_class", sorted(MIXED))
def test_a_mixed_batch_is_served_as_peft_does(config_class, checkpoints, tmp_path):
    """``adapter_names``: each row updated by its own RoAd or GLoRA adapter (``"__base__"``: by none),
    the logits PEFT's mixed batch gives for the same two PEFT-made adapters; other methods refuse."""
    arch, one, two = MIXED[config_class]
    path = checkpoints[arch]
    names = ["one", "__base__", "two"]
    ids, mask = np.concatenate([IDS, IDS[:1]]), np.concatenate([MASK, MASK[:1]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base(arch, path), getattr(peft, config_class)(**one), "one")
        theirs.add_adapter("two", getattr(peft, config_class)(**two))
        theirs.save_pretrained(tmp_path)
        with torch.no_grad():
            expected = theirs.eval()(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                                     adapter_names=names).logits.numpy()
    model = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "one", adapter_name="one")
    model.load_adapter(tmp_path / "two", adapter_name="two")
    ours = np.asarray(model(input_ids=ids, attention_mask=mask, adapter_names=names).logits)
    np.testing.assert_allclose(valid(ours, mask), valid(expected, mask), atol=1e-5, rtol=0)
    plain = np.asarray(model(input_ids=ids, attention_mask=mask).logits)  # every row through "one"
    assert np.abs(valid(ours, mask) - valid(plain, mask)).max() > 1e-4
    model.add_adapter("hra", peftjax.HRAConfig(r=2, target_modules=["k_proj" if arch == "llama" else "key"]))
    with pytest.raises(ValueError, match="'hra' is a HRA adapter; mixed batches take LORA, IA3, ROAD, GLORA adapters"):
        model(input_ids=IDS, attention_mask=MASK, adapter_names=["hra", "one"])


def test_a_shira_mask_from_a_users_mask_function_moves_with_its_file(checkpoints, tmp_path):
    """PEFT users may make SHiRA masks with their own function (``config.mask_fn``); its positions
    are in the file, so such an adapter loads here, gives PEFT's logits and saves back with the same
    ``mask_type``. peftjax cannot run that function, so a new adapter of that type is refused by
    name. The random masks are PEFT's own, with and without ``random_seed``."""
    path = checkpoints["llama"]

    def first_positions(base_layer, r, **_):  # a structured mask: the first r (in + out) entries
        mask = torch.zeros_like(base_layer.weight)
        mask.view(-1)[: r * sum(base_layer.weight.shape)] = 1
        return mask

    fields = dict(r=1, mask_type="first", target_modules=["q_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = peft.ShiraConfig(**fields)
        config.mask_fn = first_positions
        theirs = peft.get_peft_model(torch_base("llama", path), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "theirs")
    assert_close(run_jax(ours, jit=True), run_torch(theirs.eval()))
    ours.save_pretrained(tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "adapter_config.json").read_text())["mask_type"] == "first"
    from safetensors.numpy import load_file

    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert {str(v.dtype) for k, v in saved.items() if k.endswith("shira_indices")} == {"int32"}  # as PEFT saves
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = peft.PeftModel.from_pretrained(torch_base("llama", path), tmp_path / "ours").eval()
    assert_close(run_torch(again), run_jax(ours, jit=True))
    with pytest.raises(NotImplementedError, match=r"ShiraConfig\(mask_type='first'\): peftjax makes 'random' masks"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.ShiraConfig(**fields))

    for seed in ({}, {"random_seed": 7}):  # the same config: the same positions in every layer
        fields = dict(r=1, target_modules=["q_proj", "down_proj"], **seed)
        ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.ShiraConfig(**fields)).base_model.model
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.get_peft_model(torch_base("llama", path), peft.ShiraConfig(**fields)).base_model.model.model
        for i in (0, 1):
            for mine, their in ((ours.layers[i].self_attn.q_proj, theirs.layers[i].self_attn.q_proj),
                                (ours.layers[i].mlp.down_proj, theirs.layers[i].mlp.down_proj)):
                np.testing.assert_array_equal(mine.shira_indices["default"].get_value(),
                                              their.shira_indices["default"].numpy())


def test_hira_s_rank_pattern_is_what_peft_makes_of_it(checkpoints, tmp_path):
    """PEFT 0.22.0's HiRA makes every layer at ``r`` whatever ``rank_pattern`` says: its files load
    here at those ranks with PEFT's logits; a new adapter with a pattern is refused by name, since
    one made at the pattern's ranks would not load in PEFT."""
    path = checkpoints["llama"]
    fields = dict(r=2, rank_pattern={"down_proj": 1}, target_modules=["q_proj", "down_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.HiraConfig(init_weights=False, **fields))
    theirs.save_pretrained(tmp_path)
    ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)
    assert_close(run_jax(ours, jit=True), run_torch(theirs.eval()))
    with pytest.raises(NotImplementedError, match=r"HiraConfig\(rank_pattern=\{'down_proj': 1\}\): PEFT 0.22.0's HiRA"):
        peftjax.get_peft_model(models.from_pretrained(path), peftjax.HiraConfig(**fields))


SCANNED = {  # every method here on a model whose layers are stacked and scanned
    "HRAConfig": dict(r=2, init_weights=False), "MissConfig": dict(r=4, init_weights=False),
    "GloraConfig": dict(r=2, init_weights=False),
    "DeftConfig": dict(r=4, init_weights=False), "PeanutConfig": dict(r=4, depth=1, init_weights=False),
    "SupertuningConfig": dict(sparsity=0.9, r=2, init_weights=False), "OSFConfig": dict(init_weights=False),
    "RoadConfig": dict(group_size=8, init_weights=False),
    "DeloraConfig": dict(r=2, init_weights=False), "C3AConfig": dict(block_size=8),
    "GraloraConfig": dict(r=4, hybrid_r=2, init_weights=False), "ShiraConfig": dict(r=1, init_weights=False),
    "PacaConfig": dict(r=4, random_seed=1, init_weights=False),
    "HiraConfig": dict(r=2, init_weights=False), "WaveFTConfig": dict(n_frequency=24, init_weights=False),
}


@pytest.mark.parametrize("config_class", sorted(SCANNED))
def test_under_scan_layers_each_method_is_the_plain_model_s(config_class, checkpoints, tmp_path):
    """``scan_layers=True``: the same key gives the same adapter as on the plain model (the same
    logits), merging and unmerging keep them, and the scanned model's file loads into the plain one."""
    path = checkpoints["llama"]
    config = getattr(peftjax, config_class)(target_modules=LLAMA, **SCANNED[config_class])
    plain, scanned = (peftjax.get_peft_model(models.from_pretrained(path, scan_layers=scan), config,
                                             key=jax.random.key(3)) for scan in (False, True))
    ours = run_jax(scanned)
    assert changed(ours, run_jax(models.from_pretrained(path))) > 1e-4  # a real update
    assert_close(ours, run_jax(plain))
    scanned.merge_adapter()
    assert_close(run_jax(scanned), ours)
    scanned.unmerge_adapter()
    scanned.save_pretrained(tmp_path)
    assert_close(run_jax(peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path)), ours)


def test_randlora_adapters_share_peft_s_rules(checkpoints):
    """As in PEFT, every RandLoRA adapter on a model has one ``projection_prng_key`` and one
    ``save_projection``; a scanned model is refused by name (its bases are shared, not stacked)."""
    path = checkpoints["llama"]
    model = peftjax.get_peft_model(models.from_pretrained(path), peftjax.RandLoraConfig(r=8, target_modules=LLAMA))
    with pytest.raises(ValueError, match="RandLora PRNG initialisation key must be the same for all adapters"):
        model.add_adapter("other", peftjax.RandLoraConfig(r=8, projection_prng_key=1, target_modules=LLAMA))
    with pytest.warns(UserWarning, match="Specified to not save basis_A and basis_B"):
        unsaved = peftjax.RandLoraConfig(r=8, save_projection=False, target_modules=LLAMA)
    with pytest.raises(ValueError, match="RandLora projection weights must be saved for all adapters or none"):
        model.add_adapter("other", unsaved)
    model.add_adapter("other", peftjax.RandLoraConfig(r=4, target_modules=["q_proj"]))  # its own, smaller bases
    assert model.base_model.model.layers[0].self_attn.q_proj.randlora_B["other"].get_value().shape == (32, 8, 4)
    with pytest.raises(NotImplementedError, match="RandLoRA on a model built with scan_layers=True"):
        peftjax.get_peft_model(models.from_pretrained(path, scan_layers=True),
                               peftjax.RandLoraConfig(r=8, target_modules=LLAMA))


def test_paca_selects_peft_s_columns_and_refuses_what_peft_refuses(checkpoints, tmp_path):
    """With ``random_seed`` each layer's columns are PEFT's (``torch.randperm`` seeded by the seed
    plus the layer name's CRC-32), a ``paca_indices_pattern`` entry's are its own, sorted, with the
    config's ``r`` in the scaling; the file holds PEFT's keys and dtypes. Bad settings are refused
    as PEFT refuses them, by name."""
    from safetensors.numpy import load_file

    path = checkpoints["llama"]
    fields = dict(r=4, paca_alpha=8, random_seed=11, target_modules=LLAMA,
                  paca_indices_pattern={"layers.0.mlp.down_proj": [40, 3, 17]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path), peft.PacaConfig(**fields))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.PacaConfig(**fields))
    ours.save_pretrained(tmp_path / "ours")
    mine, peft_file = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert set(mine) == set(peft_file)
    for k, v in peft_file.items():
        assert mine[k].dtype == v.dtype and mine[k].shape == v.shape, k
        if k.endswith("paca_indices"):
            np.testing.assert_array_equal(mine[k], v, err_msg=k)
    assert mine["base_model.model.model.layers.0.mlp.down_proj.paca_indices"].tolist() == [3, 17, 40]
    assert len({tuple(v) for k, v in mine.items() if k.endswith("paca_indices")}) > 4  # each layer its own
    saved = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert saved["paca_indices_pattern"] == {"layers.0.mlp.down_proj": [40, 3, 17]}
    layer = ours.base_model.model.layers[0].mlp.down_proj
    assert layer.spec("default").scaling == 2.0 and layer.paca_delta["default"].get_value().shape == (32, 3)

    for bad, match in ((dict(paca_indices_pattern={"q_proj": [1, 1]}), "must be unique"),
                       (dict(paca_indices_pattern={"q_proj": []}), "must not contain an empty list"),
                       (dict(paca_indices_pattern={"q_proj": [-1]}), "must not be negative"),
                       (dict(paca_indices_pattern={"q_proj": [1.0]}), "must be a list of int")):
        with pytest.raises(ValueError, match=match):
            peftjax.PacaConfig(target_modules=LLAMA, **bad)
    model = models.from_pretrained(path)
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj: `r` \(64\) cannot be larger than in_features "
                                         r"\(48\)"):
        peftjax.get_peft_model(model, peftjax.PacaConfig(r=64, target_modules=["down_proj"]))
    with pytest.raises(ValueError, match=r"layers.0.self_attn.q_proj: The indices in `paca_indices_pattern` must be "
                                         r"smaller than in_features \(32\)"):
        peftjax.get_peft_model(model, peftjax.PacaConfig(target_modules=["q_proj"],
                                                         paca_indices_pattern={"q_proj": [2, 32]}))
    assert not adapter_layers(model)  # refused before any change


def test_randlora_files_with_the_bases_once_or_under_every_layer_load_alike(checkpoints, tmp_path):
    """PEFT 0.22 writes RandLoRA's shared bases once, as ``base_model.randlora_A``/``_B``, and so
    does peftjax; PEFT before 0.22 also wrote a copy under every layer. Both files load with PEFT's
    logits; a layer's copy that differs from the model's is refused."""
    from safetensors.numpy import load_file, save_file

    path = checkpoints["llama"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(torch_base("llama", path),
                                     peft.RandLoraConfig(r=8, target_modules=LLAMA, init_weights=False))
        theirs.save_pretrained(tmp_path / "new")
    expected = run_torch(theirs)
    tensors = load_file(tmp_path / "new" / "adapter_model.safetensors")
    assert sorted(k for k in tensors if k.endswith(("randlora_A", "randlora_B"))) == [
        "base_model.randlora_A", "base_model.randlora_B"]
    ours = peftjax.get_peft_model(models.from_pretrained(path), peftjax.RandLoraConfig(r=8, target_modules=LLAMA))
    ours.save_pretrained(tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "adapter_model.safetensors")) == set(tensors)
    layers = [k.removesuffix(".randlora_lambda") for k in tensors if k.endswith(".randlora_lambda")]
    old = dict(tensors)
    for basis in ("randlora_A", "randlora_B"):
        old.update({f"{layer}.{basis}": tensors[f"base_model.{basis}"] for layer in layers})
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text((tmp_path / "new" / "adapter_config.json").read_text())
    for name, content in (("new", tensors), ("old", old)):
        save_file(content, tmp_path / name / "adapter_model.safetensors")
        loaded = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / name)
        assert_close(run_jax(loaded), expected)
    old[f"{layers[0]}.randlora_A"] = old[f"{layers[0]}.randlora_A"] + 1
    save_file(old, tmp_path / "old" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="differs from the bases saved under the layers"):
        peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "old")


@pytest.mark.parametrize("kind", ["dense", "sparse", "very_sparse"])
def test_randlora_bases_are_the_ones_peft_draws(kind):
    """The bases PEFT regenerates from ``projection_prng_key`` (its torch draws: bfloat16 Kaiming with
    torch's rounding, or float32 ternary), value for value, for shapes either way round."""
    import math

    from peft.tuners.randlora.model import RandLoraModel

    from peftjax.tuners.randlora import randlora_bases

    flags = {k: True for k in (kind,) if k != "dense"}
    for r, out_max, in_max, seed in [(8, 32, 48, 0), (4, 96, 32, 3), (32, 64, 64, 11)]:
        stub = RandLoraModel.__new__(RandLoraModel)  # PEFT's own drawing code, without a model
        torch.nn.Module.__init__(stub)
        stub._find_dim = lambda config, dims=(out_max, in_max): dims
        config = peft.RandLoraConfig(r=r, projection_prng_key=seed, **flags)
        if kind == "dense":
            stub._init_randlora_A_randlora_B(config, "a")
        else:
            sparsity = math.sqrt(min(out_max, in_max)) if kind == "very_sparse" else 3
            stub._init_randlora_A_randlora_B_sparse(config, "a", sparsity=sparsity)
        ours = randlora_bases(r, out_max, in_max, seed, **flags)
        for mine, theirs in zip(ours, (stub.randlora_A["a"], stub.randlora_B["a"])):
            np.testing.assert_array_equal(mine, theirs.float().numpy())


def test_vblora_s_bank_is_one_variable_every_layer_trains(checkpoints):
    """The vector bank is one variable all layers hold (not a copy each), before and after
    switching the adapter frozen and trainable again, so a step's update of it is the sum of every
    layer's gradient; a scanned model is refused by name."""
    path = checkpoints["llama"]
    config = peftjax.VBLoRAConfig(r=2, num_vectors=16, vector_length=8, target_modules=LLAMA)
    model = peftjax.get_peft_model(models.from_pretrained(path), config)
    banks = lambda: [m.vblora_vector_bank["default"] for m in adapter_layers(model.base_model).values()]  # noqa: E731
    model.set_adapter("default", inference_mode=True)
    model.set_adapter("default")
    assert len(banks()) == 6 and all(b is banks()[0] for b in banks())
    _, trainable, _ = peftjax.split(model.base_model)
    leaves = jax.tree_util.tree_leaves_with_path(trainable)
    assert sum("vblora_vector_bank" in jax.tree_util.keystr(p) for p, _ in leaves) == 1
    assert model.get_nb_trainable_parameters()[0] == 16 * 8 + sum(x.size for p, x in leaves if "logits" in
                                                                  jax.tree_util.keystr(p))
    before = np.asarray(banks()[0].get_value())
    _tiny.train(model, _tiny.batch(IDS, MASK), steps=1, optimizer=optax.sgd(1.0))
    assert not np.allclose(np.asarray(banks()[-1].get_value()), before) and all(b is banks()[0] for b in banks())
    with pytest.raises(NotImplementedError, match="VB-LoRA on a model built with scan_layers=True"):
        peftjax.get_peft_model(models.from_pretrained(path, scan_layers=True), config)
