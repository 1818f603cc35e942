"""Qwen3.5 text GGUF export: llama.cpp (xllamacpp) gives transformers' next-token log-probs.

The tiny model is tiny_models' Qwen3.5 (linear, full, linear attention; 2 key heads and 4 value
heads in the Gated DeltaNet layers, so that the value-head reorder matters; RoPE on 6 of 24
dims) with the linear-attention value heads as wide as the key heads (llama.cpp's qwen35 needs
that; the narrower heads of tiny_models are among the refused configs), LoRA on every linear
layer merged, and its weights sharpened ×4 so that the next-token distributions are far from
uniform and a layout mistake moves them (×8, as test_gguf sharpens, makes this hybrid so
sensitive that f16 rounding of the weights alone moves transformers' log-probs by 0.04).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import llama_cpp_server, save_tiny_model, tiny_config

from fastlm import FastModel
from fastlm.export.gguf_writer import gguf_tensors, merged_state, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Qwen3_5TextConfig"):
    pytest.skip("transformers without Qwen3.5", allow_module_level=True)

from test_gguf import (  # noqa: E402
    LORA_TARGETS,
    _aligned_steps,
    _hf_greedy,
    _is_byte_token,
    spm_tokenizer,
)

LINEAR_TARGETS = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
VOCAB = 300  # spm_tokenizer's
EQUAL_HEADS = {"linear_value_head_dim": 12}  # = linear_key_head_dim
PROMPTS = ["the cat in a hat sat on the mat the", "a quick brown fox", "in the", "zebra"]
PROMPTS += ["hello there then", "the the the", "quiz jam", "abc", "xyz mnop"]
# max |Δ log-prob| of llama.cpp's top-5 next tokens against the fp32 transformers model over
# PROMPTS (measured: f16 0.0019, bf16 0.016, q8_0 0.0087). f16: the tiny families' check in
# test_gguf.py; q8_0: test_gguf's q8_0 Llama check, and bf16 (8-bit mantissas) the same.
SHARPEN = 4.0
TOL = {"f16": 5e-3, "bf16": 0.05, "q8_0": 0.05}


def _tiny_qwen3_5(tmp_path, **overrides):
    """Tiny Qwen3.5 + LoRA on every linear layer (B random, so that the merge shows), sharpened,
    byte tokens out of reach."""
    path = save_tiny_model("qwen3_5_text", tmp_path / "hf", vocab_size=VOCAB, **overrides)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    targets = LORA_TARGETS + LINEAR_TARGETS
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=targets)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    model = _sharpen(model.eval(), SHARPEN)
    with torch.no_grad():  # byte tokens never win: llama.cpp reports a complete UTF-8 piece only
        model.get_base_model().lm_head.weight[4:260] = 0
    return model


def _sharpen(model, factor: float):
    """Base weights (not norms, LoRA, A_log or dt_bias) ×factor: at init scale the next-token
    distributions are near uniform and a layout mistake hardly moves them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name and name.endswith("weight") and "norm" not in name:
                param.mul_(factor)
    return model


def _top_logprobs(server, ids: list[int]) -> dict[int, float]:
    """llama.cpp's top-5 next-token log-probs after ``ids`` (byte tokens left out: the server
    reports only complete UTF-8 pieces)."""
    request = {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": 5}
    response = server.handle_completions(request | {"cache_prompt": False})
    assert response["usage"]["prompt_tokens"] == len(ids)
    top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert all(e["logprob"] is not None for e in top), top  # non-finite logits come back null
    return {e["id"]: e["logprob"] for e in top if not _is_byte_token(e["id"])}


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0"])
def test_tiny_qwen3_5_in_llama_cpp(tmp_path, method):
    """Every prompt's next-token log-probs within TOL of transformers', and 8+ greedy steps."""
    pytest.importorskip("xllamacpp")
    model = _tiny_qwen3_5(tmp_path, **EQUAL_HEADS)
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, method)
    hf = copy.deepcopy(model).merge_and_unload().eval()
    server = llama_cpp_server(out)
    errors = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        cpp = _top_logprobs(server, ids)
        with torch.no_grad():
            ref = hf(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
        errors.append(max(abs(v - float(ref[i])) for i, v in cpp.items()))
        best = next(iter(cpp))  # llama.cpp's greedy token: transformers' own, or a near tie
        assert float(ref[best]) > float(ref.max()) - TOL[method], prompt
    assert max(errors) < TOL[method], errors

    if method == "f16":  # greedy decoding follows transformers (state carried across steps)
        ids = tokenizer(PROMPTS[0]).input_ids
        hf_ids, hf_logp = _hf_greedy(hf, ids, 12)
        response = server.handle_completions(
            {"prompt": ids, "n_predict": 12, "temperature": 0, "n_probs": 1, "ignore_eos": True}
        )
        content = response["choices"][0]["logprobs"]["content"]
        assert max(_aligned_steps(content, hf_ids, hf_logp, tol=TOL[method])) >= 8


@pytest.mark.parametrize("method", ["f16", "q8_0"])
def test_tiny_qwen3_5_tensors_and_metadata(tmp_path, method):
    """Names, types, layout and metadata as llama.cpp's qwen35 reads them."""
    model = _tiny_qwen3_5(tmp_path, **EQUAL_HEADS)
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), method)
    config = model.get_base_model().config
    merged = dict(merged_state(model))
    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.QWEN35))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    assert {"blk.0.ssm_a", "blk.0.ssm_dt.bias", "blk.0.ssm_conv1d.weight"} <= set(tensors)
    assert "blk.1.attn_q.weight" in tensors and "blk.1.ssm_a" not in tensors
    for name, want in expected.items():
        tensor = tensors[name]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        if want.ndim == 1 or name.endswith("ssm_conv1d.weight"):  # ggml_ssm_conv reads F32
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, name
        elif method == "q8_0":
            assert tensor.tensor_type.name == ("Q8_0" if want.shape[-1] % 32 == 0 else "F16")
        tol = 1e-2 if method == "q8_0" else 1e-3
        np.testing.assert_allclose(got, want.numpy(), rtol=tol, atol=tol * np.abs(want).max())

    # The layout, from the HF tensors (value heads: HF groups 2 per key head, llama.cpp tiles).
    tiled = [0, 2, 1, 3]  # llama.cpp's value head p is HF's value head tiled[p]
    a_log = merged["model.layers.0.linear_attn.A_log"]
    torch.testing.assert_close(expected["blk.0.ssm_a"], -torch.exp(a_log)[tiled])
    dt_bias = merged["model.layers.0.linear_attn.dt_bias"]
    torch.testing.assert_close(expected["blk.0.ssm_dt.bias"], dt_bias[tiled])
    z = merged["model.layers.0.linear_attn.in_proj_z.weight"].unflatten(0, (4, 12))
    torch.testing.assert_close(expected["blk.0.attn_gate.weight"], z[tiled].flatten(0, 1))
    out_proj = merged["model.layers.0.linear_attn.out_proj.weight"].unflatten(1, (4, 12))
    torch.testing.assert_close(expected["blk.0.ssm_out.weight"], out_proj[:, tiled].flatten(1))
    qkv = merged["model.layers.0.linear_attn.in_proj_qkv.weight"]
    torch.testing.assert_close(expected["blk.0.attn_qkv.weight"][:48], qkv[:48])  # q, k as is
    conv = merged["model.layers.0.linear_attn.conv1d.weight"]
    assert expected["blk.0.ssm_conv1d.weight"].shape == (96, 4) and conv.shape == (96, 1, 4)
    # the gated norm is w·x̂ in HF (no offset); every other Qwen3.5 norm is (1 + w)·x̂
    norm = merged["model.layers.0.linear_attn.norm.weight"]
    torch.testing.assert_close(expected["blk.0.ssm_norm.weight"], norm)
    for hf_name, gguf_name in [
        ("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
        ("model.layers.1.post_attention_layernorm.weight", "blk.1.post_attention_norm.weight"),
        ("model.layers.1.self_attn.q_norm.weight", "blk.1.attn_q_norm.weight"),
        ("model.norm.weight", "output_norm.weight"),
    ]:
        torch.testing.assert_close(expected[gguf_name], merged[hf_name] + 1)
    q_proj = merged["model.layers.1.self_attn.q_proj.weight"]  # per head [query | gate]: as is
    torch.testing.assert_close(expected["blk.1.attn_q.weight"], q_proj)

    fields = reader.fields
    want_fields = {
        "general.architecture": "qwen35",
        "qwen35.block_count": 3,
        "qwen35.attention.head_count": 4,
        "qwen35.attention.head_count_kv": 2,
        "qwen35.attention.key_length": 24,
        "qwen35.rope.dimension_count": 6,  # 0.25 · 24
        "qwen35.full_attention_interval": 2,  # layer 1 of 3
        "qwen35.ssm.conv_kernel": 4,
        "qwen35.ssm.state_size": 12,
        "qwen35.ssm.group_count": 2,
        "qwen35.ssm.time_step_rank": 4,
        "qwen35.ssm.inner_size": 48,
    }
    for key, value in want_fields.items():
        assert fields[key].contents() == value, key
    assert fields["qwen35.rope.dimension_sections"].contents() == [1, 1, 1, 0]
    assert fields["qwen35.rope.freq_base"].contents() == config.rope_parameters["rope_theta"]


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({}, "linear_key_head_dim == linear_value_head_dim"),  # tiny_models' 12 and 10
        (
            dict(
                EQUAL_HEADS, layer_types=["full_attention", "linear_attention", "linear_attention"]
            ),
            "the only pattern",
        ),
        (dict(EQUAL_HEADS, attention_bias=True), "attention_bias=True"),
        (
            dict(EQUAL_HEADS, rope_parameters={"rope_type": "linear", "factor": 2.0}),
            "RoPE type 'linear'",
        ),
    ],
)
def test_configs_llama_cpp_runs_otherwise_are_refused(overrides, match):
    """Refused before any tensor is written: llama.cpp would not load them, or run them
    differently from transformers."""
    from fastlm.models import SPECS

    config = tiny_config("qwen3_5_text", **overrides)
    with pytest.raises(NotImplementedError, match=match):
        for check in SPECS["qwen3_5_text"].gguf_checks:
            check(config)


def test_published_layer_pattern_is_one_interval():
    from fastlm.models import SPECS
    from fastlm.models.qwen3_5 import full_attention_interval

    config = tiny_config("qwen3_5_text", **EQUAL_HEADS)
    config.layer_types = (["linear_attention"] * 3 + ["full_attention"]) * 2
    assert full_attention_interval(config) == 4
    for check in SPECS["qwen3_5_text"].gguf_checks:
        check(config)


@pytest.mark.parametrize("method", ["q4_k_m", "q6_k"])
def test_k_quants_are_refused(tmp_path, method):
    """llama-quantize's types for the linear-attention tensors are not reproduced: refused, with
    nothing written."""
    path = save_tiny_model("qwen3_5_text", tmp_path / "hf", vocab_size=VOCAB, **EQUAL_HEADS)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    with pytest.raises(NotImplementedError, match="llama-quantize"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), ["f16", method])
    assert not (tmp_path / "gguf").exists()
