"""The newer families under every PEFT method, both ways with HF PEFT: the cells no other file tests.

The whole matrix, family x method x direction, and the test of each cell is in the README ("Tested
both ways with HF PEFT"). This file holds the cells the families' and the methods' own files leave:

- ``peft->here``: HF PEFT makes the adapter (random, as after training), saves it; peftjax loads it
  onto its own model of the same checkpoint and gives PEFT's logits, eagerly.
- ``here->peft``: peftjax makes the adapter from the config, its parameters moved off their
  initial values through the public functional API (``split`` -> change -> ``update``), saves it;
  PEFT loads it and gives peftjax's logits under ``jit``, which differ from the base model's.

One direction eager and one jitted: a jitted forward compiles a program per case (no two cases'
models are one graph), while eager operations reuse their compiled kernels across the file's
cases; both jitted took 71 s, all eager 54 s (2026-12-06, AMD EPYC host). Most cells have the
``here->peft`` direction, so most family x method pairs run under ``jit`` here; the eager forward
of these families under each method is held to PEFT in test_lora_peft, test_ia3 and
test_prompt_learning too.

A LoRA config without ``target_modules`` checks that peftjax picks PEFT's default targets for the
family, the same modules PEFT adapts.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _tiny
from _torch_models import lazy
import peftjax
from peftjax import models

torch, peft = lazy("torch"), lazy("peft")  # the PyTorch oracle: a test that uses it skips without it

# a wider init than transformers' 0.02, so that adapters and prompts move the logits well past 1e-3
ARCHS = {family: _tiny.arch(family, initializer_range=0.2)
         for family in ("gemma2", "gemma3_text", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe", "olmo2", "olmo3",
                        "smollm3", "granite", "gemma", "gpt_oss", "seed_oss", "glm", "glm4", "glm4_moe",
                        "ernie4_5", "deepseek_v3", "mistral4", "gemma4_text", "qwen3_5_text", "llama4_text", "cohere",
                        "cohere2", "phi", "gpt_neox", "opt", "bloom", "starcoder2", "stablelm", "gptj", "falcon",
                        "gpt_bigcode", "gpt_neo", "ministral", "ministral3", "olmo", "arcee",
                        "nemotron", "helium", "granitemoe", "exaone4", "apertus", "lfm2", "granitemoeshared",
                        "granitemoehybrid", "nemotron_h", "mamba2", "bamba", "jamba",
                        "falcon_h1", "hunyuan_v1_moe",
                        "hunyuan_v1_dense", "phimoe", "zamba", "zamba2", "lfm2_moe")}
# Seed-OSS's four biased projections at 0.2 give logits whose float32 rounding reaches 1e-5
ARCHS["seed_oss"] = _tiny.arch("seed_oss", initializer_range=0.1)
# Gemma 3n at 0.2: AltUp's mixed streams under unscaled attention scores carry IA³'s moved vectors' float32
# rounding to 1.2e-4 in one logit of 1,440
ARCHS["gemma3n_text"] = _tiny.arch("gemma3n_text", initializer_range=0.1)
V = 4  # virtual tokens

# method -> (config class name, fields); the class is looked up in peft and in peftjax alike
METHODS = {
    "lora-default-targets": ("LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False)),
    "lora-all-linear": ("LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")),
    "dora-all-linear": ("LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear",
                                           use_dora=True)),
    # Mixtral: all-linear becomes LoRA on the experts' parameters, which PEFT refuses with DoRA
    "dora": ("LoraConfig", dict(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "ia3-default-targets": ("IA3Config", {}),
    # PEFT has no IA³ defaults for qwen3_moe: named, they reach the dense layer's down_proj, not the experts'
    "ia3-named": ("IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])),
    "prefix": ("PrefixTuningConfig", dict(num_virtual_tokens=V)),
    "prompt": ("PromptTuningConfig", dict(num_virtual_tokens=V)),
    "p-tuning": ("PromptEncoderConfig", dict(num_virtual_tokens=V, encoder_hidden_size=24)),
}
BOTH = ("peft->here", "here->peft")
# (family, method) -> the directions no other test covers (README's matrix names the tests that do)
CASES = {
    ("gemma2", "lora-default-targets"): BOTH,
    ("gemma2", "dora-all-linear"): ("peft->here",),  # here->peft: test_lora_peft::test_dora_all_linear_made_here...
    ("gemma2", "prefix"): ("here->peft",),  # peft->here: test_prompt_learning
    ("gemma2", "prompt"): BOTH,
    ("gemma2", "p-tuning"): BOTH,
    ("gemma3_text", "lora-default-targets"): ("here->peft",),  # peft->here: test_lora_peft[gemma3_text-default]
    ("gemma3_text", "dora-all-linear"): ("here->peft",),  # peft->here: test_lora_peft[gemma3_text-dora/-rslora]
    ("gemma3_text", "ia3-default-targets"): BOTH,
    ("gemma3_text", "prompt"): ("here->peft",),
    ("gemma3_text", "p-tuning"): ("here->peft",),
    ("qwen3", "lora-default-targets"): ("here->peft",),  # peft->here: test_lora_peft[qwen3-default]
    ("mixtral", "dora"): ("peft->here",),  # here->peft: test_lora_peft::test_mixtral_attention_lora_both_ways
    ("mixtral", "prompt"): ("here->peft",),
    ("mixtral", "p-tuning"): ("here->peft",),
    # LoRA on the router and the experts, and refusing a bare LoraConfig: test_qwen3_moe
    ("qwen3_moe", "dora"): BOTH,
    ("qwen3_moe", "ia3-named"): BOTH,
    ("qwen3_moe", "prefix"): BOTH,
    ("qwen3_moe", "prompt"): ("here->peft",),
    ("qwen3_moe", "p-tuning"): ("peft->here",),
    # PhiMoE (LoRA on attention and the experts both ways, PEFT naming no default targets: test_phimoe): a prefix
    # through LongRoPE's mscale switch, virtual tokens before SparseMixer's routing
    # Zamba2 (LoRA both ways, shared blocks included: test_zamba2): virtual tokens joining the embeddings every
    # shared block reads
    ("lfm2_moe", "prompt"): ("peft->here",),
    ("lfm2_moe", "p-tuning"): ("here->peft",),
    # Zamba (LoRA both ways on the shared block and the Mamba heads' projections: test_zamba): likewise
    ("zamba", "prompt"): ("peft->here",),
    ("zamba", "p-tuning"): ("here->peft",),
    ("zamba2", "prompt"): BOTH,
    ("zamba2", "p-tuning"): ("here->peft",),
    ("phimoe", "dora"): ("here->peft",),
    ("phimoe", "prefix"): BOTH,
    ("phimoe", "prompt"): ("peft->here",),
    ("phimoe", "p-tuning"): ("here->peft",),
    # LoRA on every linear and the experts: test_qwen_moe
    ("qwen2_moe", "dora"): BOTH,
    ("qwen2_moe", "ia3-named"): ("here->peft",),
    ("qwen2_moe", "prefix"): ("peft->here",),
    ("qwen2_moe", "p-tuning"): ("here->peft",),
    # PEFT 0.22.0 has no default targets for these (test_lora_peft: both refuse none)
    ("olmo2", "lora-all-linear"): BOTH,
    ("olmo2", "ia3-named"): BOTH,
    ("olmo2", "prefix"): ("peft->here",),
    ("olmo3", "dora-all-linear"): BOTH,
    ("olmo3", "prefix"): BOTH,
    ("olmo3", "prompt"): ("here->peft",),
    ("smollm3", "lora-all-linear"): BOTH,
    ("smollm3", "prefix"): BOTH,
    ("smollm3", "p-tuning"): ("peft->here",),
    # parallel blocks: LoRA on both branches of each; q/k norms (cohere); NoPE global layers under a prefix (cohere2)
    # PEFT's default targets for phi (LoRA: q_proj, v_proj, fc1, fc2; IA3: q_proj, v_proj, fc2); a biased LM head
    ("phi", "lora-default-targets"): BOTH,
    ("phi", "ia3-default-targets"): BOTH,
    ("phi", "prefix"): ("here->peft",),
    ("phi", "prompt"): ("peft->here",),
    # GPT-NeoX: PEFT's default targets (LoRA: the fused query_key_value; IA3: it and dense_4h_to_h), prefix
    # keys and values through its partial RoPE's cache, prompt tuning on embed_in
    ("gpt_neox", "lora-default-targets"): BOTH,
    ("gpt_neox", "ia3-default-targets"): BOTH,
    ("gpt_neox", "prefix"): BOTH,
    ("gpt_neox", "prompt"): BOTH,
    # OPT: PEFT's default targets (LoRA: q_proj, v_proj; IA3: q_proj, k_proj, fc2), a prefix's entries counted
    # before each row's real tokens in its learned positions, virtual tokens before them
    ("opt", "lora-default-targets"): BOTH,
    ("opt", "ia3-default-targets"): BOTH,
    ("opt", "prefix"): BOTH,
    ("opt", "prompt"): BOTH,
    # BLOOM: PEFT's default targets (LoRA: query_key_value; IA3: it and mlp.dense_4h_to_h), a prefix's entries
    # first in ALiBi's key positions, virtual tokens through the embeddings' LayerNorm
    ("bloom", "lora-default-targets"): BOTH,
    ("bloom", "ia3-default-targets"): BOTH,
    ("bloom", "prefix"): BOTH,
    ("bloom", "prompt"): BOTH,
    # StarCoder2: PEFT has no default targets for it (both refuse a bare LoraConfig): all-linear reaches c_fc and
    # c_proj; prefix keys and values grouped as its attention's
    ("starcoder2", "lora-all-linear"): BOTH,
    ("starcoder2", "prefix"): BOTH,
    ("starcoder2", "prompt"): BOTH,
    # StableLM: PEFT's default LoRA targets (q_proj, v_proj; PEFT has no IA3 defaults for it), prefix keys and
    # values taken as cached ones (no per-head norm, no RoPE), virtual tokens
    ("stablelm", "lora-default-targets"): BOTH,
    ("stablelm", "prefix"): BOTH,
    ("stablelm", "prompt"): BOTH,
    # GPT-J: PEFT's default targets (LoRA: q_proj, v_proj; IA3: them and fc_out), a biased LM head, pairwise RoPE
    ("gptj", "lora-default-targets"): BOTH,
    ("gptj", "ia3-default-targets"): BOTH,
    ("gptj", "prefix"): BOTH,
    ("gptj", "prompt"): BOTH,
    # Falcon-7B: PEFT's default targets (LoRA: the fused query_key_value; IA3: it and dense_4h_to_h), a prefix of one
    # key/value head (multi-query)
    ("falcon", "lora-default-targets"): BOTH,
    ("falcon", "ia3-default-targets"): BOTH,
    ("falcon", "prefix"): BOTH,
    ("falcon", "prompt"): BOTH,
    # StarCoder: PEFT's default targets (LoRA: the fused c_attn; IA3: it and mlp.c_proj), a prefix of one key/value
    # head (multi-query), learned positions for the virtual tokens' successors
    ("gpt_bigcode", "lora-default-targets"): BOTH,
    ("gpt_bigcode", "ia3-default-targets"): BOTH,
    ("gpt_bigcode", "prefix"): BOTH,
    ("gpt_bigcode", "prompt"): BOTH,
    # GPT-Neo: PEFT's default targets (LoRA: q_proj, v_proj under attn.attention; IA3: k_proj, v_proj and c_proj),
    # a prefix read by a global and a local layer
    ("gpt_neo", "lora-default-targets"): BOTH,
    ("gpt_neo", "ia3-default-targets"): BOTH,
    ("gpt_neo", "prefix"): BOTH,
    ("gpt_neo", "prompt"): BOTH,
    # Ministral (PEFT has no default targets for either): all-linear; prefix keys read by a sliding and a full
    # layer (Ministral 8B) and not scaled as the queries are (Ministral 3)
    ("ministral", "lora-all-linear"): BOTH,
    ("ministral", "prefix"): BOTH,
    ("ministral3", "lora-all-linear"): BOTH,
    ("ministral3", "prefix"): BOTH,
    ("ministral3", "prompt"): BOTH,
    # OLMo (PEFT has no default targets for it): all-linear on clamped projections; prefix keys not clamped
    ("olmo", "lora-all-linear"): BOTH,
    ("olmo", "prefix"): BOTH,
    ("olmo", "prompt"): BOTH,
    # Arcee (its gate-less MLP's up_proj and down_proj) and Helium (pairwise RoPE on the prefix's queries' keys):
    # PEFT has no default targets for either
    ("arcee", "lora-all-linear"): BOTH,
    ("arcee", "prefix"): BOTH,
    # Nemotron (PEFT has no default targets): its partial RoPE on the prefix's keys' queries, biased projections
    ("nemotron", "lora-all-linear"): BOTH,
    ("nemotron", "prefix"): BOTH,
    # Granite MoE (no PEFT defaults; LoRA on its experts: test_granitemoe.py): a prefix under its multipliers
    ("granitemoe", "prefix"): BOTH,
    ("helium", "lora-all-linear"): BOTH,
    ("helium", "prefix"): BOTH,
    # EXAONE 4.0 (no PEFT defaults): all-linear; a prefix read by a sliding RoPE layer and a global NoPE one
    ("exaone4", "lora-all-linear"): BOTH,
    ("exaone4", "prefix"): BOTH,
    ("exaone4", "prompt"): BOTH,
    # Apertus (no PEFT defaults): all-linear, its gate-less MLP's up_proj and down_proj; prefix keys not normed
    ("apertus", "lora-all-linear"): BOTH,
    ("apertus", "prefix"): BOTH,
    ("cohere", "lora-all-linear"): BOTH,
    ("cohere", "prefix"): ("peft->here",),
    ("cohere2", "dora-all-linear"): BOTH,
    ("cohere2", "prefix"): BOTH,
    ("cohere2", "prompt"): ("here->peft",),
    # the virtual tokens' embeddings scaled by embedding_multiplier too, as transformers scales them
    ("granite", "lora-all-linear"): BOTH,
    ("granite", "prompt"): BOTH,
    ("granite", "prefix"): ("here->peft",),
    # PEFT's default targets for gemma (LoRA: q_proj, v_proj; IA3: q, v, down_proj)
    ("gemma", "lora-default-targets"): BOTH,
    ("gemma", "ia3-default-targets"): BOTH,
    ("gemma", "prefix"): BOTH,
    ("gemma", "prompt"): ("here->peft",),
    # attention sinks and a sliding window under the prefix and the virtual tokens; LoRA on the
    # attention and the experts: test_gpt_oss (PEFT has no default targets for it)
    ("gpt_oss", "dora"): ("peft->here",),
    ("gpt_oss", "ia3-named"): ("here->peft",),
    ("gpt_oss", "prefix"): BOTH,
    ("gpt_oss", "prompt"): ("here->peft",),
    ("gpt_oss", "p-tuning"): ("peft->here",),
    # PEFT has no default targets for it either; its output projection's own bias flag
    ("seed_oss", "lora-all-linear"): BOTH,
    ("seed_oss", "dora-all-linear"): ("peft->here",),
    ("seed_oss", "ia3-named"): ("here->peft",),
    ("seed_oss", "prefix"): BOTH,
    ("seed_oss", "prompt"): ("here->peft",),
    # the pairwise partial RoPE under prefixes and virtual tokens; the fused MLP under LoRA
    ("glm4", "lora-all-linear"): BOTH,
    ("glm4", "dora-all-linear"): ("here->peft",),
    ("glm4", "ia3-named"): ("peft->here",),
    ("glm4", "prefix"): BOTH,
    ("glm4", "p-tuning"): ("here->peft",),
    # the q/k norms after RoPE under LoRA and a prefix (a prefix's keys are cached keys: normed, not turned)
    ("hunyuan_v1_dense", "lora-all-linear"): BOTH,
    ("hunyuan_v1_dense", "prefix"): BOTH,
    # virtual tokens through LFM2's convolutions and attention (LoRA: test_lfm2; prefix tuning refused there)
    ("lfm2", "prompt"): BOTH,
    # virtual tokens through Granite 4.0's Mamba-2 and attention layers, with its multipliers (LoRA:
    # test_granitemoehybrid; prefix tuning refused there); a prefix under Granite MoE's shared expert
    ("granitemoehybrid", "prompt"): BOTH,
    ("granitemoeshared", "prefix"): BOTH,
    # virtual tokens through Nemotron-H's Mamba-2, expert, attention and MLP layers (LoRA: test_nemotron_h)
    ("nemotron_h", "prompt"): BOTH,
    # virtual tokens through Mamba-2's layers alone (LoRA: test_mamba2)
    ("mamba2", "prompt"): BOTH,
    # virtual tokens through Bamba's Mamba-2 and half-RoPE attention layers (LoRA: test_bamba)
    ("bamba", "prompt"): BOTH,
    # and through Jamba's Mamba, attention and expert layers (LoRA: test_jamba)
    ("jamba", "prompt"): BOTH,
    # and through Falcon-H1's parallel Mamba-2 and attention, the given embeddings not scaled (LoRA: test_falcon_h1)
    ("falcon_h1", "prompt"): BOTH,
    # a prefix through Hunyuan MoE's post-RoPE q/k norms (LoRA: test_hunyuan_moe)
    ("hunyuan_v1_moe", "prefix"): BOTH,
    # GLM-4-9B's layers (glm4's without the branch norms): LoRA both ways, the prefix into PEFT
    ("glm", "lora-all-linear"): BOTH,
    ("glm", "prefix"): ("here->peft",),
    # the key/value prefix through the q/k-normed, half-rotated attention and the MoE (LoRA: test_glm4_moe)
    ("glm4_moe", "prefix"): BOTH,
    ("ernie4_5", "lora-all-linear"): BOTH,
    ("ernie4_5", "prefix"): ("peft->here",),
    # the prefix counts in the chunks and the temperature's slots, as PEFT's prefix cache does in transformers
    ("llama4_text", "prefix"): BOTH,
    ("ernie4_5", "prompt"): BOTH,
    # latent attention under virtual tokens (prefix tuning refused: test_deepseek_v3); LoRA: test_deepseek_v3
    ("deepseek_v3", "prompt"): BOTH,
    ("deepseek_v3", "p-tuning"): ("peft->here",),
    # PEFT converts no targets for Mistral 4: DoRA reaches every linear (LoRA: test_mistral4)
    ("mistral4", "dora-all-linear"): BOTH,
    ("mistral4", "prompt"): ("here->peft",),
    # LoRA (all-linear, moved less: unscaled attention scores magnify rounding): test_gemma4
    ("gemma4_text", "ia3-named"): BOTH,
    # IA³ on the values and the MLPs' outputs under AltUp's streams (LoRA all-linear: test_gemma3n)
    ("gemma3n_text", "ia3-named"): BOTH,
    # all-linear reaches the linear attention's in_proj_qkv/z/b/a and out_proj; the virtual tokens
    # run through its convolution and delta rule (PEFT has no default targets; prefix: refused)
    ("qwen3_5_text", "lora-all-linear"): BOTH,
    ("qwen3_5_text", "prompt"): ("here->peft",),
}
IDS = np.random.RandomState(0).randint(1, 96, (2, 9))  # 9 tokens (+4 virtual): past Gemma's window of 4
MASK = np.array([[1] * 9, [0] * 3 + [1] * 6])  # left padding, as a causal LM's batch has
IDS[MASK == 0] = 0


# Both frameworks' float32 rounding, which depends on the host's kernels: logits of ~4 differ by up
# to 4.4e-5 (Qwen3.5's all-linear LoRA on an Intel AVX-512/AMX host, 2026-12-05), where against
# PyTorch in float64 peftjax was 1.2e-5 off and PyTorch in float32 3.2e-5; 1.3e-5 on an AVX2 host.
# An adapter moves the logits by more than 1e-3 (``changed``), ten times the tolerance.
TOL = dict(atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def saved(tiny_checkpoint):
    """family -> its tiny checkpoint, and the base model's PyTorch logits (built once)."""
    return {family: (tiny_checkpoint(spec), run_torch(torch_base(tiny_checkpoint(spec), family)))
            for family, spec in ARCHS.items()}


def torch_base(path, family):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ARCHS[family].torch_class.from_pretrained(path).eval()


def run_torch(model):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(input_ids=torch.tensor(IDS), attention_mask=torch.tensor(MASK)).logits.numpy()


def run_jax(peft_model, jit):
    model = peft_model.base_model
    if jit:
        return np.asarray(nnx.jit(lambda m, i, a: m(input_ids=i, attention_mask=a).logits)(model, IDS, MASK))
    return np.asarray(model(input_ids=IDS, attention_mask=MASK).logits)


def real(logits):
    """The logits at the real tokens, and at the virtual ones that prompt and P-tuning put before them."""
    extra = logits.shape[1] - MASK.shape[1]
    return logits[np.concatenate([np.ones((len(MASK), extra), bool), MASK.astype(bool)], 1)]


def changed(logits, base) -> float:
    """How far the adapter moved the real tokens' logits from the base model's."""
    return float(np.abs(logits[:, -MASK.shape[1]:][MASK == 1] - base[MASK == 1]).max())


def targeted(peft_model):
    """The modules an adapter sits on, as the public ``get_layer_status`` lists them (peftjax's and PEFT's)."""
    return {status.name for status in peft_model.get_layer_status()}


def make_peft(path, family, method):
    """PEFT's adapter made from the config, every trainable parameter moved as training would."""
    name, fields = METHODS[method]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(torch_base(path, family), getattr(peft, name)(task_type="CAUSAL_LM", **fields))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def make_here(path, method):
    """peftjax's adapter made from the same config, every adapter parameter moved through the public
    functional API: split, change the adapter state, update."""
    name, fields = METHODS[method]
    model = peftjax.get_peft_model(models.from_pretrained(path), getattr(peftjax, name)(task_type="CAUSAL_LM",
                                                                                        **fields),
                                   key=jax.random.key(3))
    _, adapters, _ = peftjax.split(model.base_model)
    assert jax.tree.leaves(adapters), "the config made no adapter parameters"
    rng = np.random.RandomState(4)  # NumPy's noise: no JAX op to compile per parameter shape
    model.update(jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(x.dtype)),
                              adapters))
    return model


@pytest.mark.parametrize(("family", "method"), sorted(CASES))
def test_adapter_gives_peft_logits_both_ways(saved, family, method, tmp_path):
    path, base = saved[family]
    lora_like = not METHODS[method][0].startswith("P")  # adapters on layers (LoRA, IA³), not prompts
    if "peft->here" in CASES[family, method]:
        theirs = make_peft(path, family, method)
        theirs.save_pretrained(tmp_path / "peft")
        ref = run_torch(theirs)
        ours = peftjax.PeftModel.from_pretrained(models.from_pretrained(path), tmp_path / "peft")
        if lora_like:
            assert targeted(ours) == targeted(theirs)
        np.testing.assert_allclose(real(run_jax(ours, jit=False)), real(ref), **TOL)
        assert changed(ref, base) > 1e-3  # the adapter changes the output
    if "here->peft" in CASES[family, method]:
        ours = make_here(path, method)
        ours.save_pretrained(tmp_path / "here")
        out = run_jax(ours, jit=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = peft.PeftModel.from_pretrained(torch_base(path, family), tmp_path / "here").eval()
        if lora_like:
            assert targeted(ours) == targeted(theirs)  # PEFT's default targets, where none given
        np.testing.assert_allclose(real(out), real(run_torch(theirs)), **TOL)
        assert changed(out, base) > 1e-3
