"""The facts each family's spec carries besides patching: GGUF arch, export refusals, embeddings.

The refusals run on tiny transformers configs (no weights); the norm convention and the GGUF arch
names are checked against transformers' own RMSNorm classes and the installed ``gguf`` package.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from tiny_models import tiny_config
from torch import nn

from fastlm.models import SPECS, PromptStyle, embedding_pooling

# What fastlm's GGUF writer wrote before the arch lived in the specs: model_type -> MODEL_ARCH.
_GGUF_ARCH_BEFORE = {
    "llama": "LLAMA",
    "mistral": "LLAMA",
    "gemma": "GEMMA",
    "gemma2": "GEMMA2",
    "gemma3_text": "GEMMA3",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "qwen3_moe": "QWEN3MOE",  # experts split per projection: tests/export/test_gguf_moe.py
    "gemma4_text": "GEMMA4",
    "qwen3_5_text": "QWEN35",
    "qwen3_5_moe_text": "QWEN35MOE",
    "gpt_oss": "GPT_OSS",
    "embedding_gemma2_text": None,  # llama.cpp has no arch for it: GGUF export refuses it
    "llama4_text": "LLAMA4",  # experts split per projection: tests/export/test_gguf_llama4.py
    "mistral4": "MISTRAL4",  # MLA's kv_b split, experts per projection: test_gguf_mistral4.py
}
_LINEAR_ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


def test_every_spec_names_a_gguf_arch_the_gguf_package_knows():
    gguf = pytest.importorskip("gguf")
    for spec in SPECS.values():
        assert spec.gguf_arch is None or spec.gguf_arch in gguf.MODEL_ARCH.__members__
    assert {t: spec.gguf_arch for t, spec in SPECS.items()} == _GGUF_ARCH_BEFORE


def test_norm_offset_gives_the_gguf_norm_convention_of_before():
    """llama.cpp scales by w alone: exactly the Gemma arches stored 1 + w before (Qwen3.5's
    norms are 1 + w too, but for its linear-attention gated norm: test_gguf_qwen3_5.py)."""
    shifted = {
        spec.gguf_arch for spec in SPECS.values() if spec.norm_offset == 1.0 and spec.gguf_arch
    }
    assert shifted == {"GEMMA", "GEMMA2", "GEMMA3", "QWEN35", "QWEN35MOE"}
    assert all(spec.norm_offset in (0.0, 1.0) for spec in SPECS.values())


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_norm_offset_matches_the_transformers_rmsnorm(model_type):
    """With w = 0, HF's norm gives (offset + 0)·x̂: zero for Llama-style, x̂ for Gemma-style."""
    spec = SPECS[model_type]
    folder = model_type.removesuffix("_text")
    modeling = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
    norm = getattr(modeling, spec.norm_class)(8, eps=1e-6)
    nn.init.zeros_(norm.weight)
    x = torch.randn(3, 8)
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), spec.norm_offset * x_hat)


def _gguf_refusal(config) -> None:
    """Run the family's GGUF checks as the writer does, before any tensor is written."""
    for check in SPECS[config.model_type].gguf_checks:
        check(config)


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_tiny_configs_are_exported_unless_refused_for_their_window(model_type):
    if SPECS[model_type].gguf_arch is None:  # never exported: see the unknown-family test
        return
    config = tiny_config(model_type)
    if model_type == "mistral":  # sliding_window 4 < 256 positions
        with pytest.raises(NotImplementedError, match="sliding_window=4"):
            _gguf_refusal(config)
        config.sliding_window = None
    if model_type == "gemma4_text":  # KV-shared layers read other layers than in llama.cpp
        with pytest.raises(NotImplementedError, match="llama.cpp's KV-shared full_attention"):
            _gguf_refusal(config)
        return  # a layer order llama.cpp runs is exported: tests/export/test_gguf_gemma4.py
    if model_type in ("qwen3_5_text", "qwen3_5_moe_text"):  # qwen35(moe): equal head dims
        with pytest.raises(NotImplementedError, match="linear_key_head_dim == linear_value"):
            _gguf_refusal(config)
        config.linear_value_head_dim = config.linear_key_head_dim
    if model_type == "qwen3_moe":  # llama.cpp's qwen3moe: a MoE block in every layer
        with pytest.raises(NotImplementedError, match=r"mlp_only_layers=\[1\]"):
            _gguf_refusal(config)
        config.mlp_only_layers = []
    if model_type == "llama4_text":  # llama.cpp's llama4: NoPE at every 4th layer, not layer 2
        with pytest.raises(NotImplementedError, match=r"no_rope_layers=\[1, 1, 0, 1\]"):
            _gguf_refusal(config)
        return  # a config llama.cpp runs is exported: tests/export/test_gguf_llama4.py
    if model_type == "gpt_oss":  # llama.cpp hard-codes swiglu_limit 7
        with pytest.raises(NotImplementedError, match="swiglu_limit"):
            _gguf_refusal(config)
        config.swiglu_limit = 7.0
    _gguf_refusal(config)


@pytest.mark.parametrize("model_type", ["mistral", "gemma", "qwen2", "qwen3", "gemma2"])
def test_a_scaled_rope_is_refused_where_only_rope_theta_is_written(model_type):
    overrides = {"sliding_window": None} if model_type == "mistral" else {}
    config = tiny_config(model_type, rope_parameters=dict(_LINEAR_ROPE), **overrides)
    name = "Gemma 2" if model_type == "gemma2" else model_type
    with pytest.raises(NotImplementedError, match=f"{name} RoPE type 'linear'"):
        _gguf_refusal(config)


def test_llama3_rope_scaling_is_exported():
    """Llama's scaled RoPE is written (as llama.cpp's rope_freqs): no refusal."""
    config = tiny_config("llama")
    assert config.rope_parameters["rope_type"] == "llama3"
    _gguf_refusal(config)


def test_gemma3_scaled_rope_on_full_layers_is_refused():
    rope = {
        "full_attention": dict(_LINEAR_ROPE, rope_theta=1_000_000.0),
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    with pytest.raises(NotImplementedError, match="Gemma 3 RoPE scaling"):
        _gguf_refusal(tiny_config("gemma3_text", rope_parameters=rope))


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3"])
def test_qwen_use_sliding_window_is_refused(model_type):
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        _gguf_refusal(tiny_config(model_type, use_sliding_window=True))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"layer_types": ["full_attention"] * 3}, "layer_types"),
        ({"query_pre_attn_scalar": 12}, "query_pre_attn_scalar=12"),
        ({"attn_logit_softcapping": None}, "without attn_logit_softcapping"),
        ({"final_logit_softcapping": None}, "without final_logit_softcapping"),
    ],
)
def test_gemma2_settings_llama_cpp_hard_codes_are_refused(overrides, message):
    with pytest.raises(NotImplementedError, match=message):
        _gguf_refusal(tiny_config("gemma2", **overrides))


def test_gguf_export_of_an_unknown_family_names_the_supported_ones(tmp_path):
    pytest.importorskip("gguf")
    from types import SimpleNamespace

    from fastlm.export.gguf_writer import save_pretrained_gguf

    model = nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="gpt2")
    with pytest.raises(ValueError, match=r"supports \['gemma', .*'qwen3_moe'\], not 'gpt2'"):
        save_pretrained_gguf(model, tmp_path / "out", tokenizer=None, quantization_method="f16")
    assert not (tmp_path / "out").exists()
    model.config = SimpleNamespace(model_type="embedding_gemma2_text")  # a spec, no llama.cpp arch
    with pytest.raises(ValueError, match=r"'qwen3_moe'\], not 'embedding_gemma2_text'"):
        save_pretrained_gguf(model, tmp_path / "out", tokenizer=None, quantization_method="f16")


def test_embedding_defaults_of_the_decoder_families():
    assert embedding_pooling("qwen3") == "lasttoken"
    assert embedding_pooling("gemma3_text") == "mean"
    assert embedding_pooling("embedding_gemma2_text") == "mean"
    assert embedding_pooling("llama") == "mean"
    assert embedding_pooling("no-such-family") == "mean"
    styles = {t: spec.prompt_style for t, spec in SPECS.items() if spec.prompt_style}
    assert set(styles) == {"qwen3", "gemma3_text"}
    assert all(isinstance(style, PromptStyle) for style in styles.values())
    assert styles["qwen3"].query_prompt("find code") == "Instruct: find code\nQuery:"
    assert styles["gemma3_text"].query_prompt() == "task: search result | query: "
    assert styles["gemma3_text"].document_prompt == "title: none | text: "
    bidirectional = {t for t, spec in SPECS.items() if spec.bidirectional_attention_attr}
    assert bidirectional == {"gemma3_text"}
