"""peftjax.config against HF PEFT 0.22.0 as the oracle: fields, files, targeting, scaling."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import json
import math
import warnings

import pytest
import transformers

import _tiny
from _torch_models import lazy

import peftjax.config as pc

# the PyTorch oracle, imported on first use: a test that needs it skips without torch, the rest run
peft, torch = lazy("peft"), lazy("torch")
peft_ia3_model = lazy("peft.tuners.ia3.model")
peft_tuners_utils = lazy("peft.tuners.tuners_utils")
peft_constants = lazy("peft.utils.constants")
peft_other = lazy("peft.utils.other")
pytorch_utils = lazy("transformers.pytorch_utils")

# --------------------------------------------------------------------------------------------------
# helpers


def _norm(value):
    """Makes PEFT's and peftjax's dict values comparable: enums -> str, sets/lists -> sorted lists."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset | list | tuple):
        items = [_norm(v) for v in value]
        return sorted(items, key=repr)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _norm_dict(d: dict, drop=("peft_version", "runtime_config")) -> dict:
    return {k: _norm(v) for k, v in d.items() if k not in drop}


def _peft_quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# _tiny's models as these tests built them: PEFT matches their module names, and the prompt
# learning test reads the Llama's dimensions
_LLAMA = _tiny.arch("llama", vocab_size=256, hidden_size=64, intermediate_size=128, pad_token_id=None,
                    tie_word_embeddings=False)
_GPT2 = _tiny.arch("gpt2", vocab_size=256, n_embd=64, n_positions=1024)
_BERT_CLS = _tiny.arch("bert", vocab_size=256, num_attention_heads=2, intermediate_size=64, num_labels=2)


def _torch_model(spec):
    torch.manual_seed(0)
    return spec.torch_class(spec.config())


def _tiny_llama():
    return _torch_model(_LLAMA)


def _tiny_gpt2():
    return _torch_model(_GPT2)


def _tiny_bert_cls():
    return _torch_model(_BERT_CLS)


# --------------------------------------------------------------------------------------------------
# check_target_module_exists / is_feedforward_module / get_pattern_key: PEFT as the oracle

KEYS = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.0.self_attn.qq_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.2.mlp.experts.3.down_proj",
    "model.layers.1.mlp.experts.0.up_proj",
    "model.language_model.layers.0.self_attn.q_proj",
    "model.embed_tokens",
    "lm_head",
    "q_proj",
    "layers.1.mlp.up_proj",
    "h.0.mlp.c_proj",
    "transformer.h.0.attn.c_attn",
    "transformer.h.1.attn.c_proj",
    "transformer.h.1.mlp.c_proj",
    "bert.encoder.layer.0.attention.self.query",
    "bert.encoder.layer.1.attention.self.value",
    "bert.encoder.layer.1.attention.output.dense",
    "bert.encoder.layer.1.output.dense",
    "classifier",
    "classifier.dense",
    "score",
    "encoder.block.0.layer.0.SelfAttention.q",
    "decoder.block.1.layer.1.EncDecAttention.v",
]

TARGETS = [
    ["q_proj"],
    ["q_proj", "v_proj"],
    ["proj"],
    ["c_proj"],
    ["mlp.c_proj"],
    ["down_proj", "up_proj"],
    ["model.layers.0.self_attn.q_proj"],
    ["query", "value", "output.dense"],
    ["q", "v"],
    ["lm_head", "embed_tokens", "classifier"],
    r".*\.(q|v)_proj",
    "q_proj",
    r".*layers\.0\..*",
    r".*language_model\..*\.(q_proj|v_proj)",
    r"(lm_head|score)",
]
EXCLUDES = [None, ["layers.0.self_attn.q_proj"], r".*layers\.1\..*", ["c_proj", "lm_head"]]
MODULES_TO_SAVE = [None, ["classifier"], ["mlp"], ["score", "lm_head"]]
LAYER_SPECS = [
    (None, None),
    (0, None),
    ([0, 1], None),
    ([1], None),
    ([], None),
    ([2], None),
    ([0], "layers"),
    ([0, 1], ["h", "layers"]),
    (1, "layer"),
    ([0, 1], "block"),
    (None, "layers"),  # invalid: a pattern without indices
]


def test_check_target_module_exists_matches_peft_on_a_grid():
    mismatches, checked = [], 0
    for target, exclude, mts, (layers, pattern) in itertools.product(TARGETS, EXCLUDES, MODULES_TO_SAVE, LAYER_SPECS):
        kwargs = dict(
            target_modules=target,
            exclude_modules=exclude,
            modules_to_save=mts,
            layers_to_transform=layers,
            layers_pattern=pattern,
        )
        try:
            theirs = _peft_quiet(peft.LoraConfig, **kwargs)
        except ValueError:
            with pytest.raises(ValueError):
                pc.LoraConfig(**kwargs)
            continue
        ours = pc.LoraConfig(**kwargs)
        for key in KEYS:
            expected = bool(peft_tuners_utils.check_target_module_exists(theirs, key))
            if pc.check_target_module_exists(ours, key) != expected:
                mismatches.append((kwargs, key, expected))
            checked += 1
    assert checked > 20_000
    assert not mismatches, mismatches[:10]


def test_check_target_module_exists_ia3_matches_peft():
    for target, exclude in itertools.product(TARGETS, EXCLUDES):
        theirs = _peft_quiet(peft.IA3Config, target_modules=target, exclude_modules=exclude, feedforward_modules=[])
        ours = pc.IA3Config(target_modules=target, exclude_modules=exclude, feedforward_modules=[])
        for key in KEYS:
            assert pc.check_target_module_exists(ours, key) == bool(peft_tuners_utils.check_target_module_exists(theirs, key))


@pytest.mark.parametrize(
    "feedforward, extra_targets",
    [
        (["down_proj"], ["q_proj"]),
        (["proj"], []),  # no dot boundary: "proj" is feedforward for q_proj too
        (["mlp.c_proj"], ["c_attn"]),
        (["output.dense", "value"], []),
        (r".*down_proj", []),
        ("down_proj", []),
        ([], ["q_proj"]),
    ],
)
def test_is_feedforward_module_matches_peft(feedforward, extra_targets):
    target = feedforward + extra_targets if isinstance(feedforward, list) else ["q_proj"]
    theirs = peft.IA3Config(target_modules=target, feedforward_modules=feedforward)
    ours = pc.IA3Config(target_modules=target, feedforward_modules=feedforward)
    for key in KEYS:
        assert pc.is_feedforward_module(ours, key) == peft_ia3_model.IA3Model._check_target_module_feedforward(theirs, key), key


@pytest.mark.parametrize(
    "patterns",
    [
        [],
        ["o_proj"],
        ["proj"],
        [".*_proj"],
        ["q_proj", "model.layers.0.self_attn.q_proj"],
        ["model.layers.0.self_attn.q_proj", "q_proj"],
        [r"layers\.0\..*", "down_proj"],
        ["self_attn"],
        ["mlp.c_proj", "c_proj"],
        ["query|value"],
    ],
)
def test_get_pattern_key_matches_peft(patterns):
    for key in KEYS:
        assert pc.get_pattern_key(patterns, key) == peft_other.get_pattern_key(patterns, key)


def test_target_module_errors():
    with pytest.raises(ValueError, match="resolve_target_modules"):
        pc.check_target_module_exists(pc.LoraConfig(), "model.layers.0.self_attn.q_proj")
    with pytest.raises(ValueError, match="expand_all_linear"):
        pc.check_target_module_exists(pc.LoraConfig(target_modules="ALL-LINEAR"), "lm_head")
    with pytest.raises(TypeError, match="PromptTuningConfig"):
        pc.check_target_module_exists(pc.PromptTuningConfig(num_virtual_tokens=2), "lm_head")
    with pytest.raises(ValueError, match="feedforward_modules"):
        pc.is_feedforward_module(pc.IA3Config(target_modules=["q_proj"]), "q_proj")


# --------------------------------------------------------------------------------------------------
# field sets and defaults

_DEFAULT_PAIRS = [  # (ours, the name of PEFT's class, fields)
    (pc.LoraConfig, "LoraConfig", {}),
    (pc.IA3Config, "IA3Config", {}),
    (pc.LoHaConfig, "LoHaConfig", {}),
    (pc.LoKrConfig, "LoKrConfig", {}),
    (pc.AdaLoraConfig, "AdaLoraConfig", {"total_step": 10}),
    (pc.PrefixTuningConfig, "PrefixTuningConfig", {"num_virtual_tokens": 5}),
    (pc.PromptTuningConfig, "PromptTuningConfig", {"num_virtual_tokens": 5}),
    (pc.PromptEncoderConfig, "PromptEncoderConfig", {"num_virtual_tokens": 5}),
    (pc.MultitaskPromptTuningConfig, "MultitaskPromptTuningConfig", {"num_virtual_tokens": 5}),
    (pc.HRAConfig, "HRAConfig", {}),
    (pc.MissConfig, "MissConfig", {}),
    (pc.RoadConfig, "RoadConfig", {}),
    (pc.DeloraConfig, "DeloraConfig", {}),
    (pc.C3AConfig, "C3AConfig", {}),
    (pc.GraloraConfig, "GraloraConfig", {}),
    (pc.ShiraConfig, "ShiraConfig", {}),
    (pc.PacaConfig, "PacaConfig", {}),
    (pc.HiraConfig, "HiraConfig", {}),
    (pc.PolyConfig, "PolyConfig", {}),
    (pc.RandLoraConfig, "RandLoraConfig", {}),
    (pc.VBLoRAConfig, "VBLoRAConfig", {}),
]


@pytest.mark.parametrize("ours_cls, peft_cls, kwargs", _DEFAULT_PAIRS,
                         ids=lambda x: x if isinstance(x, str) else getattr(x, "__name__", ""))
def test_field_set_and_defaults_equal_peft(ours_cls, peft_cls, kwargs):
    theirs = getattr(peft, peft_cls)(**kwargs).to_dict()
    theirs.pop("runtime_config", None)
    ours = ours_cls(**kwargs).to_dict()
    assert set(ours) == set(theirs)
    # PEFT fills peft_version with its own version; peftjax leaves it None (documented).
    assert theirs["peft_version"] == peft.__version__ and ours["peft_version"] is None
    assert _norm_dict(ours) == _norm_dict(theirs)
    json.dumps(ours)  # plain JSON types only


def test_written_file_has_peft_field_set(tmp_path):
    peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "peft")
    pc.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]).save_pretrained(tmp_path / "ours")
    theirs = json.loads((tmp_path / "peft" / pc.CONFIG_NAME).read_text())
    text = (tmp_path / "ours" / pc.CONFIG_NAME).read_text()
    ours = json.loads(text)
    assert set(ours) == set(theirs)
    assert text == json.dumps(ours, indent=2, sort_keys=True)
    # PeftModel.save_pretrained (not PeftConfig's) sets inference_mode; peftjax always writes true.
    assert ours["inference_mode"] is True
    assert _norm_dict(ours) == _norm_dict(theirs | {"inference_mode": True})


def test_default_target_mappings_equal_peft():
    """Every architecture-default table peftjax keeps is PEFT's, key for key (the methods that use
    LoRA's table in PEFT use it here too, through ``resolve_target_modules``)."""
    tables = [name for name in dir(pc) if name.startswith("TRANSFORMERS_MODELS_TO_")]
    assert len(tables) == 10
    for name in tables:
        assert getattr(pc, name) == getattr(peft_constants, name), name
    for method in ("DEFT", "GLORA", "PEANUT", "HIRA", "ROAD", "DELORA", "GRALORA", "PACA"):
        assert getattr(peft_constants, f"TRANSFORMERS_MODELS_TO_{method}_TARGET_MODULES_MAPPING") == (
            pc.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), method


def test_enums_equal_peft():
    assert [t.value for t in pc.TaskType] == [t.value for t in peft.TaskType]
    assert {t.value for t in pc.PeftType} - {"BOTTLENECK"} == {t.value for t in peft.PeftType}


# --------------------------------------------------------------------------------------------------
# round trips through adapter_config.json, both directions

_ROUND_TRIP = [
    lambda m: m.LoraConfig(
        task_type="CAUSAL_LM",
        r=4,
        lora_alpha=16,
        target_modules=["v_proj", "q_proj", "o_proj", "down_proj"],
        exclude_modules=["layers.1.self_attn.o_proj"],
        lora_dropout=0.1,
        bias="lora_only",
        use_rslora=True,
        use_dora=True,
        modules_to_save=["lm_head"],
        init_lora_weights="gaussian",
        layers_to_transform=[0, 1],
        layers_pattern="layers",
        rank_pattern={"o_proj": 2},
        alpha_pattern={"down_proj": 32},
        base_model_name_or_path="tiny-llama",
        revision="main",
    ),
    lambda m: m.LoraConfig(task_type="SEQ_CLS", target_modules=r".*\.(query|value)", lora_bias=True),
    lambda m: m.LoraConfig(init_lora_weights="pissa_niter_4", exclude_modules=r".*\.0\..*", target_modules=["c_attn"]),
    lambda m: m.IA3Config(
        task_type="CAUSAL_LM",
        target_modules=["k_proj", "v_proj", "down_proj"],
        feedforward_modules=["down_proj"],
        init_ia3_weights=False,
    ),
    lambda m: m.IA3Config(target_modules=r".*\.(c_attn|mlp\.c_proj)", feedforward_modules=r".*mlp\.c_proj"),
    lambda m: m.LoHaConfig(task_type="SEQ_CLS", r=4, alpha=2, rank_dropout=0.1, module_dropout=0.2,
                           target_modules=["query", "value"], init_weights=False, rank_pattern={"value": 2},
                           alpha_pattern={"query": 3}, layers_to_transform=[1], layers_pattern="layer"),
    lambda m: m.LoKrConfig(r=2, alpha=4, decompose_both=True, decompose_factor=4, rank_dropout_scale=True,
                           init_weights="lycoris", target_modules=r".*\.q_proj", exclude_modules=["lm_head"]),
    lambda m: m.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=5,
        token_dim=32,
        num_transformer_submodules=1,
        num_attention_heads=2,
        num_layers=2,
        encoder_hidden_size=16,
        prefix_projection=True,
        init_weights="zero",
    ),
    lambda m: m.PromptTuningConfig(
        task_type="SEQ_2_SEQ_LM",
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Classify this:",
        tokenizer_name_or_path="gpt2",
        tokenizer_kwargs={"use_fast": True},
    ),
    lambda m: m.PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB"),
    lambda m: m.PromptEncoderConfig(
        num_virtual_tokens=4, encoder_reparameterization_type="LSTM", encoder_hidden_size=8, encoder_dropout=0.1
    ),
    lambda m: m.HRAConfig(r=6, apply_GS=True, target_modules=["q_proj"], bias="hra_only", layers_to_transform=[0]),
    lambda m: m.MissConfig(r=16, init_weights="mini", mini_r=4, miss_dropout=0.1, target_modules=r".*\.v_proj"),
    lambda m: m.RoadConfig(task_type="SEQ_CLS", variant="road_4", group_size=32, init_weights=False),
    lambda m: m.DeloraConfig(r=4, delora_lambda=3.0, rank_pattern={"o_proj": 2}, lambda_pattern={"q_proj": 5.0},
                             target_modules=["q_proj", "o_proj"], module_dropout=0.1),
    lambda m: m.C3AConfig(block_size=16, block_size_pattern={"v_proj": 8}, init_weights="gaussian", bias="c3a_only",
                          target_modules=["q_proj", "v_proj"]),
    lambda m: m.GraloraConfig(r=8, gralora_k=4, hybrid_r=2, alpha=16, gralora_dropout=0.1, fan_in_fan_out=True,
                              layers_to_transform=[1], layers_pattern="layers", target_modules=["c_attn"]),
    lambda m: m.ShiraConfig(r=4, random_seed=3, init_weights=False, target_modules=["q_proj"]),
    lambda m: m.PacaConfig(r=4, paca_alpha=16, random_seed=3, init_weights=False, target_modules=["q_proj"],
                           paca_indices_pattern={"v_proj": [3, 1], r"layers\.0\..*": [0]}),
    lambda m: m.HiraConfig(r=4, hira_dropout=0.1, init_weights="gaussian", rank_pattern={"v_proj": 2},
                           exclude_modules=["k_proj"], target_modules=["q_proj", "v_proj", "embed_tokens"]),
    lambda m: m.RandLoraConfig(r=4, projection_prng_key=9, sparse=True, randlora_dropout=0.1, randlora_alpha=32,
                               bias="randlora_only", init_weights=False, target_modules=["q_proj", "v_proj"]),
    lambda m: m.VBLoRAConfig(r=2, num_vectors=32, vector_length=16, topk=3, save_only_topk_weights=True,
                             vblora_dropout=0.1, init_logits_std=0.5, exclude_modules=["k_proj"]),
]


def test_every_method_refuses_layers_to_transform_with_a_regex_as_peft_0_22_does():
    """PEFT 0.22 refuses ``layers_to_transform`` with a ``str`` ``target_modules`` for every method
    (0.21.2 only for some: LoHa, LoKr, OFT, BOFT took it), and so does every peftjax config."""
    checked = 0
    for peft_type in pc.PeftType:
        try:
            cls = pc.config_class(peft_type)
        except NotImplementedError:
            continue
        fields = {f.name for f in dataclasses.fields(cls)}
        if not {"layers_to_transform", "target_modules"} <= fields:
            continue
        extra = {"OFT": dict(oft_block_size=8, r=0)}.get(str(peft_type), {})
        for make in (cls, getattr(peft, cls.__name__)):
            with pytest.raises(ValueError, match="`layers_to_transform` cannot be used when `target_modules` is a str"):
                _peft_quiet(make, target_modules=r".*\.q_proj", layers_to_transform=[0], **extra)
        checked += 1
    assert checked >= 20


def test_patterns_are_written_in_their_order_so_the_same_key_wins_after_a_reload(tmp_path):
    """The first pattern key matching a module wins, so ``rank_pattern``, ``alpha_pattern`` and
    ``paca_indices_pattern`` are written in their order (PEFT 0.22; older PEFT sorted them, so a
    reloaded config could give a layer another rank); every other object's keys are sorted."""
    name = "model.layers.0.self_attn.q_proj"
    config = pc.LoraConfig(r=8, target_modules=["q_proj"], rank_pattern={r"layers\.0\..*": 2, "q_proj": 4},
                           alpha_pattern={"q_proj": 3, r"layers\.0\..*": 5}, init_lora_weights="eva",
                           eva_config={"tau": 0.9, "rho": 1.5})
    config.save_pretrained(tmp_path)
    text = (tmp_path / pc.CONFIG_NAME).read_text()
    assert text.index('"layers') < text.index('"q_proj": 4') and text.index('"q_proj": 3') < text.index('"layers')
    written = json.loads(text)
    assert list(written) == sorted(written) and list(written["eva_config"]) == sorted(written["eva_config"])
    for loaded in (pc.load_config(tmp_path), _peft_quiet(peft.PeftConfig.from_pretrained, str(tmp_path))):
        assert list(loaded.rank_pattern) == [r"layers\.0\..*", "q_proj"]
    assert pc.load_config(tmp_path).scaling_for(name) == config.scaling_for(name) == (2, 3, 1.5)
    theirs = tmp_path / "theirs"
    _peft_quiet(lambda: peft.LoraConfig(r=8, target_modules=["q_proj"],
                                        rank_pattern={r"layers\.0\..*": 2, "q_proj": 4}).save_pretrained(str(theirs)))
    assert (theirs / pc.CONFIG_NAME).read_text().index('"layers') < (theirs / pc.CONFIG_NAME).read_text().index(
        '"q_proj": 4')


@pytest.mark.parametrize("make", _ROUND_TRIP)
def test_peftjax_file_loads_in_peft(make, tmp_path):
    ours = make(pc)
    ours.save_pretrained(tmp_path)
    theirs = _peft_quiet(peft.PeftConfig.from_pretrained, str(tmp_path))
    assert type(theirs).__name__ == type(ours).__name__
    expected = ours.to_dict() | {"inference_mode": True}
    assert _norm_dict(theirs.to_dict()) == _norm_dict(expected)


@pytest.mark.parametrize("make", _ROUND_TRIP)
def test_peft_file_loads_in_peftjax(make, tmp_path):
    theirs = _peft_quiet(make, peft)
    theirs.save_pretrained(str(tmp_path))
    written = json.loads((tmp_path / pc.CONFIG_NAME).read_text())
    ours = pc.load_config(tmp_path)
    assert type(ours).__name__ == type(theirs).__name__
    assert ours.peft_version == peft.__version__  # kept as read
    assert _norm_dict(ours.to_dict(), drop=()) == _norm_dict(written, drop=())
    # and the class-specific loader agrees with the dispatching one
    assert type(ours).from_pretrained(tmp_path) == ours
    assert pc.PeftConfig.from_pretrained(tmp_path) == ours


def test_unknown_field_warns_and_is_ignored(tmp_path):
    d = pc.LoraConfig(r=4, target_modules=["q_proj"]).to_dict() | {"some_future_field": 1, "runtime_config": {}}
    (tmp_path / pc.CONFIG_NAME).write_text(json.dumps(d))
    with pytest.warns(UserWarning, match=r"some_future_field.*LoraConfig"):
        cfg = pc.load_config(tmp_path)
    assert cfg == pc.LoraConfig(r=4, target_modules=["q_proj"])
    # runtime_config alone is dropped silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pc.LoraConfig.from_dict({"peft_type": "LORA", "runtime_config": {"ephemeral_gpu_offload": False}})


def test_minimal_file_uses_defaults(tmp_path):
    (tmp_path / pc.CONFIG_NAME).write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    )
    cfg = pc.load_config(tmp_path)
    assert cfg == pc.LoraConfig(r=4, lora_alpha=8, target_modules=("q_proj", "v_proj"))


@pytest.mark.parametrize(
    "content, exc, pattern",
    [
        (None, FileNotFoundError, "not found"),
        ("not json at all", ValueError, "not a valid JSON"),
        ('{"peft_type": "LORA", "r": ', ValueError, "not a valid JSON"),
        ('["peft_type", "LORA"]', ValueError, "JSON object"),
        ('{"r": 4}', ValueError, "`peft_type` is required"),
        ('{"peft_type": "FOO"}', ValueError, "unknown peft_type 'FOO'.*LORA"),
        ('{"peft_type": "PSOFT"}', NotImplementedError, "PSOFT.*supported"),
        ('{"peft_type": "LORA", "bias": "some"}', ValueError, "bias"),
    ],
)
def test_bad_config_files_raise_naming_the_path(tmp_path, content, exc, pattern):
    path = tmp_path / pc.CONFIG_NAME
    if content is not None:
        path.write_text(content)
    with pytest.raises(exc, match=pattern) as info:
        pc.load_config(tmp_path)
    assert str(path) in str(info.value)


def test_class_mismatch_names_both(tmp_path):
    pc.IA3Config(target_modules=["k_proj"], feedforward_modules=[]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'IA3'.*LoraConfig expects 'LORA'"):
        pc.LoraConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LoraConfig has peft_type 'LORA'.*'IA3'"):
        pc.LoraConfig.from_dict({"peft_type": "IA3"})
    with pytest.raises(ValueError, match="is a file"):
        pc.LoraConfig().save_pretrained(tmp_path / pc.CONFIG_NAME)


def test_bottleneck_round_trip(tmp_path):
    cfg = pc.BottleneckConfig(adapter_type="pfeiffer", reduction_factor=8, non_linearity="gelu", residual=False)
    cfg.save_pretrained(tmp_path)
    assert json.loads((tmp_path / pc.CONFIG_NAME).read_text())["peft_type"] == "BOTTLENECK"
    assert pc.load_config(tmp_path) == dataclasses.replace(cfg, inference_mode=True)
    for bad in ({"adapter_type": "lora"}, {"non_linearity": "swish"}, {"reduction_factor": 0}, {"init_weights": "x"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            pc.BottleneckConfig(**bad)


# --------------------------------------------------------------------------------------------------
# validation: PEFT's ValueErrors reproduced, unsupported options refused

_PEFT_VALUE_ERRORS = [
    ("LoraConfig", {"target_modules": ".*q_proj", "layers_to_transform": [0]}),
    ("LoraConfig", {"target_modules": ".*q_proj", "layers_pattern": "layers"}),
    ("LoraConfig", {"target_modules": ["q_proj"], "layers_pattern": "layers"}),
    ("LoraConfig", {"lora_bias": True, "use_dora": True}),
    ("LoraConfig", {"lora_bias": True, "init_lora_weights": "gaussian"}),
    ("LoraConfig", {"task_type": "CLASSIFY"}),
    ("IA3Config", {"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}),
    ("PromptTuningConfig", {"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "x"}),
    ("PromptTuningConfig", {"num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "gpt2"}),
    ("PromptTuningConfig", {"num_virtual_tokens": 2, "tokenizer_kwargs": {"use_fast": True}}),
]


@pytest.mark.parametrize("cls_name, kwargs", _PEFT_VALUE_ERRORS)
def test_peft_validation_errors_reproduced(cls_name, kwargs):
    with pytest.raises(ValueError):
        _peft_quiet(getattr(peft, cls_name), **kwargs)
    with pytest.raises(ValueError):
        getattr(pc, cls_name)(**kwargs)


@pytest.mark.parametrize(
    "cls, kwargs, exc, pattern",
    [
        (pc.LoraConfig, {"bias": "some"}, ValueError, "bias"),
        (pc.LoraConfig, {"r": 0}, ValueError, "`r`"),
        (pc.LoraConfig, {"r": 2.0}, TypeError, "`r`"),
        (pc.LoraConfig, {"lora_dropout": 1.0}, ValueError, "lora_dropout"),
        (pc.LoraConfig, {"init_lora_weights": "kaiming"}, ValueError, "kaiming"),
        (pc.LoraConfig, {"init_lora_weights": 1}, TypeError, "init_lora_weights"),
        (pc.LoraConfig, {"target_modules": ["q_proj", 3]}, TypeError, "target_modules"),
        (pc.LoraConfig, {"modules_to_save": "classifier"}, TypeError, "modules_to_save"),
        (pc.LoraConfig, {"rank_pattern": {"o_proj": 0}}, ValueError, "rank_pattern"),
        (pc.LoraConfig, {"use_dora": "yes"}, TypeError, "use_dora"),
        (pc.PrefixTuningConfig, {}, ValueError, "num_virtual_tokens"),
        (pc.PrefixTuningConfig, {"num_virtual_tokens": 2, "init_weights": "ones"}, ValueError, "init_weights"),
        (pc.PromptTuningConfig, {"num_virtual_tokens": 2, "prompt_tuning_init": "ZEROS"}, ValueError, "ZEROS"),
        (
            pc.PromptEncoderConfig,
            {"num_virtual_tokens": 2, "encoder_reparameterization_type": "GRU"},
            ValueError,
            "GRU",
        ),
    ],
)
def test_peftjax_validation(cls, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        cls(**kwargs)


@pytest.mark.parametrize(
    "field, value",
    [
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("use_qalora", True),
        ("monteclora_config", {}),
        ("ensure_weight_tying", True),
    ],
)
def test_unsupported_fields_raise_naming_the_field(field, value):
    with pytest.raises(NotImplementedError, match=field):
        pc.LoraConfig(**{field: value})


def test_inert_companion_fields_behave_like_peft():
    # Only read by an init or a feature peftjax refuses anyway; PEFT itself accepts them.
    pc.LoraConfig(megatron_core="other.core", qalora_group_size=32, lora_ga_config={"scale": "unit"})
    with pytest.warns(UserWarning, match="loftq_config"):
        cfg = pc.LoraConfig(loftq_config={"loftq_bits": 4})
    assert cfg.loftq_config == {} == _peft_quiet(peft.LoraConfig, loftq_config={"loftq_bits": 4}).loftq_config
    with pytest.warns(UserWarning, match="eva_config"):
        assert pc.LoraConfig(eva_config={"rho": 2.0}).eva_config == pc.EvaConfig(rho=2.0).to_dict()


def test_frozen_hashable_and_replace():
    rank_pattern = {"o_proj": 2}
    cfg = pc.LoraConfig(target_modules=["v_proj", "q_proj", "q_proj"], rank_pattern=rank_pattern)
    rank_pattern["o_proj"] = 7  # the config holds its own copy
    assert cfg.rank_pattern == {"o_proj": 2}
    assert cfg.target_modules == ("q_proj", "v_proj")
    assert hash(cfg) == hash(pc.LoraConfig(target_modules=("q_proj", "v_proj"), rank_pattern={"o_proj": 2}))
    assert {cfg, pc.LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"o_proj": 2})} == {cfg}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4  # type: ignore[misc]
    assert dataclasses.replace(cfg, r=16).r == 16
    with pytest.raises(ValueError, match="bias"):
        dataclasses.replace(cfg, bias="wrong")  # replace re-validates
    assert cfg.peft_type == "LORA" and not cfg.is_prompt_learning
    assert pc.PrefixTuningConfig(num_virtual_tokens=1).is_prompt_learning
    assert pc.LoraConfig(modules_to_save=["score", "classifier", "score"]).modules_to_save == ("score", "classifier")
    assert pc.LoraConfig(task_type=peft.TaskType.CAUSAL_LM).to_dict()["task_type"] == "CAUSAL_LM"


# --------------------------------------------------------------------------------------------------
# scaling


def test_scaling_rslora_and_patterns():
    cfg = pc.LoraConfig(r=4, lora_alpha=8, use_rslora=True, rank_pattern={"o_proj": 2}, alpha_pattern={"down_proj": 32})
    assert cfg.scaling_for("model.layers.0.self_attn.q_proj") == (4, 8, 4.0)
    assert cfg.scaling_for("model.layers.0.self_attn.o_proj") == (2, 8, 8 / math.sqrt(2))
    assert cfg.scaling_for("model.layers.0.mlp.down_proj") == (4, 32, 16.0)
    assert pc.LoraConfig(r=4, lora_alpha=8).scaling_for("x.q_proj") == (4, 8, 2.0)


def test_scaling_equals_peft_layers():
    targets = ["q_proj", "o_proj", "down_proj", "up_proj"]
    kwargs = dict(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=targets,
        rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.up_proj": 6},
        alpha_pattern={"down_proj": 32},
    )
    model = _peft_quiet(peft.get_peft_model, _tiny_llama(), peft.LoraConfig(**kwargs))
    ours = pc.LoraConfig(**kwargs)
    seen = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            r, _, scaling = ours.scaling_for(name)
            assert (r, scaling) == (module.r["default"], module.scaling["default"]), name
            seen += 1
    assert seen == 8


# --------------------------------------------------------------------------------------------------
# prompt-learning shapes


def test_prepare_prompt_learning_config_gqa_prefix():
    mc = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    cfg = pc.prepare_prompt_learning_config(pc.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10), mc)
    assert (cfg.token_dim, cfg.num_attention_heads, cfg.num_layers) == (32, 2, 2)
    assert (cfg.encoder_hidden_size, cfg.num_transformer_submodules) == (32, 1)

    # peft, through get_peft_model on the same tiny model
    model = _peft_quiet(
        peft.get_peft_model, _tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    )
    theirs = model.peft_config["default"]
    for field in ("token_dim", "num_attention_heads", "num_layers", "num_transformer_submodules"):
        assert getattr(cfg, field) == getattr(theirs, field), field
    assert cfg.encoder_hidden_size == theirs.encoder_hidden_size


_MODEL_CONFIGS = {
    "llama_gqa": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    ),
    "llama_head_dim": lambda: transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32
    ),
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4),
    "t5": lambda: transformers.T5Config(d_model=32, num_layers=2, num_heads=4, d_kv=8),
    "bert_dict": lambda: transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2).to_dict(),
}


@pytest.mark.parametrize("model_name", sorted(_MODEL_CONFIGS))
@pytest.mark.parametrize("method", ["PrefixTuningConfig", "PromptTuningConfig", "PromptEncoderConfig"])
@pytest.mark.parametrize("preset", [{}, {"token_dim": 48, "num_attention_heads": 3}])
def test_prepare_prompt_learning_config_equals_peft(model_name, method, preset):
    kwargs = {"num_virtual_tokens": 3, "task_type": "SEQ_2_SEQ_LM" if model_name == "t5" else "CAUSAL_LM", **preset}
    theirs = peft_other._prepare_prompt_learning_config(getattr(peft, method)(**kwargs), _MODEL_CONFIGS[model_name]())
    ours = pc.prepare_prompt_learning_config(getattr(pc, method)(**kwargs), _MODEL_CONFIGS[model_name]())
    fields = {"token_dim", "num_attention_heads", "num_layers", "encoder_hidden_size"}
    # PEFT sets encoder_hidden_size on every config object, but only some have it as a (saved) field.
    for field in fields & {f.name for f in dataclasses.fields(theirs)}:
        assert getattr(ours, field) == getattr(theirs, field), field
    # PEFT fills this one in PeftModel; the rule is submodules = 2 for SEQ_2_SEQ_LM, else 1
    assert ours.num_transformer_submodules == (2 if model_name == "t5" else 1)


def test_prepare_prompt_learning_config_errors():
    with pytest.raises(ValueError, match="num_layers"):
        pc.prepare_prompt_learning_config(pc.PromptTuningConfig(num_virtual_tokens=2), {"hidden_size": 4})
    with pytest.raises(TypeError, match="LoraConfig"):
        pc.prepare_prompt_learning_config(pc.LoraConfig(), {})


# --------------------------------------------------------------------------------------------------
# module matching on real model names: PEFT's targeted modules as the oracle


def _names(model) -> list[str]:
    return [name for name, _ in model.named_modules()]


@pytest.mark.parametrize(
    "make_model, model_type, kwargs",
    [
        (_tiny_llama, "llama", {}),
        (_tiny_llama, "llama", {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1]}),
        (_tiny_llama, "llama", {"target_modules": r".*layers\.0\..*_proj", "exclude_modules": r".*\.o_proj"}),
        (_tiny_llama, "llama", {"target_modules": ["model.layers.1.mlp.up_proj", "gate_proj"]}),
        (_tiny_gpt2, "gpt2", {}),
        (_tiny_gpt2, "gpt2", {"target_modules": ["c_proj"], "exclude_modules": ["attn.c_proj"]}),
        (_tiny_gpt2, "gpt2", {"target_modules": ["c_attn", "c_fc"], "layers_to_transform": 0, "layers_pattern": "h"}),
        (_tiny_bert_cls, "bert", {"task_type": "SEQ_CLS"}),
        (_tiny_bert_cls, "bert", {"task_type": "SEQ_CLS", "target_modules": ["dense"]}),
    ],
)
def test_match_modules_lora_equals_peft(make_model, model_type, kwargs):
    model = make_model()
    names = _names(model)
    peft_model = _peft_quiet(peft.get_peft_model, model, peft.LoraConfig(**kwargs))
    ours = pc.add_task_modules_to_save(pc.LoraConfig(**kwargs))
    assert sorted(pc.match_modules(ours, names, model_type=model_type)) == sorted(peft_model.targeted_module_names)
    theirs_mts = peft_model.peft_config["default"].modules_to_save
    assert (list(ours.modules_to_save) if ours.modules_to_save else None) == theirs_mts


@pytest.mark.parametrize(
    "make_model, model_type", [(_tiny_llama, "llama"), (_tiny_gpt2, "gpt2"), (_tiny_bert_cls, "bert")]
)
def test_match_modules_ia3_equals_peft(make_model, model_type):
    model = make_model()
    names = _names(model)
    peft_model = _peft_quiet(peft.get_peft_model, model, peft.IA3Config())
    ours = pc.resolve_target_modules(pc.IA3Config(), model_type)
    targeted = pc.match_modules(ours, names)
    assert sorted(targeted) == sorted(peft_model.targeted_module_names)
    for name in targeted:
        layer = peft_model.base_model.model.get_submodule(name)
        assert pc.is_feedforward_module(ours, name) == layer.is_feedforward, name


def test_resolve_target_modules():
    cfg = pc.resolve_target_modules(pc.LoraConfig(r=4), "llama")
    assert cfg.target_modules == ("q_proj", "v_proj") and cfg.r == 4
    assert pc.resolve_target_modules(pc.LoraConfig(), "gemma4").target_modules == (
        r".*language_model\..*\.(q_proj|v_proj)"
    )
    given = pc.LoraConfig(target_modules=["x"])
    assert pc.resolve_target_modules(given, "no-such-model") is given
    with pytest.raises(ValueError, match=r"'no-such-model'.*llama"):
        pc.resolve_target_modules(pc.LoraConfig(), "no-such-model")
    ia3 = pc.resolve_target_modules(pc.IA3Config(), "gpt2")
    assert (ia3.target_modules, ia3.feedforward_modules) == (("c_attn", "mlp.c_proj"), ("mlp.c_proj",))
    with pytest.raises(TypeError, match="PrefixTuningConfig"):
        pc.resolve_target_modules(pc.PrefixTuningConfig(num_virtual_tokens=1), "llama")


def test_match_modules_error_lists_closest_names():
    names = _names(_tiny_llama())
    with pytest.raises(ValueError) as info:
        pc.match_modules(pc.LoraConfig(target_modules=["qproj", "mlp.up_prj"]), names)
    message = str(info.value)
    assert message.startswith("target_modules ['mlp.up_prj', 'qproj'] matched none of the 32 module names")
    assert "closest to 'qproj': q_proj" in message
    assert "closest to 'mlp.up_prj': up_proj" in message
    assert "leaf module names in the model: act_fn, down_proj, embed_tokens" in message

    q_names = [n for n in names if n.endswith("q_proj")]
    with pytest.raises(ValueError, match="All modules were excluded"):
        pc.match_modules(pc.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), q_names)
    with pytest.raises(ValueError, match="2 matched names were excluded and the other 30 did not match"):
        pc.match_modules(pc.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"]), names)
    with pytest.raises(ValueError, match=r"layers_to_transform=\[5\]"):
        pc.match_modules(pc.LoraConfig(target_modules=["q_proj"], layers_to_transform=[5]), names)
    with pytest.raises(ValueError, match="resolve_target_modules"):
        pc.match_modules(pc.LoraConfig(), names)


def test_match_modules_warns_when_exclude_excludes_nothing():
    names = _names(_tiny_llama())
    with pytest.warns(UserWarning, match="no modules were excluded"):
        targeted = pc.match_modules(pc.LoraConfig(target_modules=["q_proj"], exclude_modules=["k_prj"]), names)
    assert targeted == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


# --------------------------------------------------------------------------------------------------
# all-linear and task heads


def _linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | pytorch_utils.Conv1D)]


def _output_embedding_name(model) -> str | None:
    out = model.get_output_embeddings()
    return None if out is None else next(n for n, m in model.named_modules() if m is out)


@pytest.mark.parametrize(
    "make_model, task_type",
    [(_tiny_llama, "CAUSAL_LM"), (_tiny_gpt2, "CAUSAL_LM"), (_tiny_bert_cls, "SEQ_CLS"), (_tiny_bert_cls, None)],
)
def test_expand_all_linear_equals_peft(make_model, task_type):
    model = make_model()
    theirs = peft_tuners_utils._maybe_include_all_linear_layers(peft.LoraConfig(target_modules="all-linear", task_type=task_type), model)
    ours = pc.expand_all_linear(_linear_names(model), _output_embedding_name(model), task_type)
    assert ours == sorted(theirs.target_modules)
    assert pc.is_all_linear("All-Linear") and not pc.is_all_linear(["all-linear"])


@pytest.mark.parametrize(
    "task_type, given, expected",
    [
        ("SEQ_CLS", None, ("classifier", "score", "pre_classifier")),
        ("SEQ_CLS", ["lm_head"], ("lm_head", "classifier", "score", "pre_classifier")),
        ("TOKEN_CLS", None, ("classifier", "score", "pre_classifier")),
        ("QUESTION_ANS", ["pooler"], ("pooler", "qa_outputs")),
        ("CAUSAL_LM", None, None),
    ],
)
def test_add_task_modules_to_save(task_type, given, expected):
    cfg = pc.add_task_modules_to_save(pc.LoraConfig(task_type=task_type, modules_to_save=given))
    assert cfg.modules_to_save == expected
    assert pc.add_task_modules_to_save(cfg) == cfg  # idempotent


@pytest.mark.parametrize(
    "task_type, given, new, expected",
    [
        # DeBERTa from a masked-LM checkpoint: the pooler joins PEFT's heads, by its full name
        ("SEQ_CLS", None, ["classifier.weight", "pooler.dense.weight", "pooler.dense.bias"],
         ("classifier", "score", "pre_classifier", "pooler.dense")),
        # a listed module (PEFT's segment match) covers what it holds: nothing added
        ("SEQ_CLS", ["pooler"], ["bert.pooler.dense.weight", "classifier.bias"],
         ("pooler", "classifier", "score", "pre_classifier")),
        ("QUESTION_ANS", None, ["qa_outputs.weight"], ("qa_outputs",)),
        # no head task, or nothing new: the config as given
        ("CAUSAL_LM", None, ["lm_head.weight"], None),
        ("TOKEN_CLS", ["x"], [], ("x",)),
    ],
)
def test_add_new_head_modules(task_type, given, new, expected):
    cfg = pc.add_new_head_modules(pc.LoraConfig(task_type=task_type, modules_to_save=given), new)
    assert cfg.modules_to_save == expected
    assert pc.add_new_head_modules(cfg, new) == cfg  # idempotent
