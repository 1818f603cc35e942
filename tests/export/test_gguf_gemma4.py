"""Gemma 4 text GGUF export: llama.cpp (xllamacpp) gives transformers' next-token log-probs.

The tiny model has every Gemma 4 feature llama.cpp runs: sliding and full layers with their own
head_dim and kv heads, k = v on the full layers, two KV-shared layers (double-wide MLPs),
per-layer inputs, proportional RoPE on the full layers, the final-logit soft-cap and a
``layer_scalar`` per layer. Its layer types are tiny_models' with the first full layer moved to
index 2: llama.cpp's KV-shared layers read fixed layers (sliding n - 2, full n - 1), so
tiny_models' own order is one of the refused layouts.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_models import _GEMMA4_TEXT, llama_cpp_server, random_norms

from fastlm import FastModel
from fastlm.export.gguf_writer import gguf_tensors, merged_state, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4TextConfig"):
    pytest.skip("transformers without Gemma 4", allow_module_level=True)

from test_gguf import LORA_TARGETS, spm_tokenizer  # noqa: E402

SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = [SLIDING, SLIDING, FULL, SLIDING, FULL]  # layer 3 reads layer 1, layer 4 layer 2
VOCAB = 300  # spm_tokenizer's
PROMPTS = ["the cat in a hat sat on the mat the", "a quick brown fox", "in the", "zebra"]
PROMPTS += ["hello there then", "the the the", "quiz jam", "abc", "xyz mnop"]
# llama.cpp vs transformers on the very weights the file holds (fp32 merged, rounded to f16 or
# bf16): max |Δ log-prob| over the prompts' top-10 next tokens. f16: the tiny families' tolerance
# in test_gguf.py (measured 1.3e-3); bf16: llama.cpp rounds activations to bf16 in its bf16 dot
# products (measured 6.1e-3). Proportional RoPE written as plain RoPE gives 2.3e-2 (measured).
TOL = {"f16": 5e-3, "bf16": 1e-2}
# The server reports a step only once its text is complete UTF-8, which a lone byte token may not
# be: the sampler is kept off spm_tokenizer's 256 byte tokens (ids 4-259).
BAN_BYTE_TOKENS = [[token, False] for token in range(4, 260)]


def _save(path, **overrides):
    """tiny_models' Gemma 4 with LAYER_TYPES and VOCAB (the per-layer config follows them)."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    kwargs = copy.deepcopy(_GEMMA4_TEXT) | {"layer_types": list(LAYER_TYPES)}
    kwargs |= {"vocab_size": VOCAB, "vocab_size_per_layer_input": VOCAB} | overrides
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma4TextConfig(**kwargs))
    random_norms(model)
    with torch.no_grad():  # layer_scalar is 1 at init: make it matter
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    spm_tokenizer().save_pretrained(path)
    return path


def _lora(path):
    """The model with LoRA on every projection (B random: the merge shows), sharpened: base
    weights ×4, norms ×3, the (tied) embedding ×16. At init scale the next-token distributions
    are near uniform (top log-prob -5.2 against -5.7 for uniform); sharpened, about -3."""
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_" not in name:
                scale = 3.0 if "norm" in name else 16.0 if "embed_tokens.weight" in name else 4.0
                param.mul_(scale)
    return model.eval()


def _rounded_merge(model, dtype: torch.dtype):
    """transformers' merged model with every 2-D weight rounded to ``dtype`` (as in the file)."""
    merged = copy.deepcopy(model).merge_and_unload().eval()
    with torch.no_grad():
        for param in merged.parameters():
            if param.ndim == 2:
                param.copy_(param.to(dtype).float())
    return merged


def _gguf_refusal(config) -> None:
    from fastlm.models import SPECS

    for check in SPECS["gemma4_text"].gguf_checks:
        check(config)


def test_tiny_models_layer_order_is_refused_and_this_one_is_not():
    """tiny_models' order: the shared full layer reads layer 1 in transformers, layer 2 in
    llama.cpp (and the sliding one layer 2 vs 1): refused. LAYER_TYPES: the same layers."""
    from tiny_models import tiny_config
    from transformers import Gemma4TextConfig

    config = tiny_config("gemma4_text")
    assert config.kv_sharing_modes == [None, "store", "store", "reuse", "reuse"]
    message = r"full_attention layers read layer 2's K/V, transformers' read layer 1's"
    with pytest.raises(NotImplementedError, match=message):
        _gguf_refusal(config)
    ours = Gemma4TextConfig(**copy.deepcopy(_GEMMA4_TEXT) | {"layer_types": list(LAYER_TYPES)})
    assert ours.kv_sharing_modes == [None, "store", "store", "reuse", "reuse"]
    _gguf_refusal(ours)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rope_parameters": {SLIDING: {"rope_type": "linear", "factor": 2.0,
          "rope_theta": 1e4}, FULL: {"rope_type": "default", "rope_theta": 1e6}}},
         "RoPE types sliding='linear'"),
        ({"vocab_size_per_layer_input": 64}, "vocab_size_per_layer_input=64 != vocab_size"),
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention='all'"),
        ({"attention_bias": True}, "attention_bias=True"),
    ],
)  # fmt: skip
def test_what_llama_cpp_cannot_run_is_refused(overrides, message):
    from transformers import Gemma4TextConfig

    kwargs = copy.deepcopy(_GEMMA4_TEXT) | {"layer_types": list(LAYER_TYPES)} | overrides
    with pytest.raises(NotImplementedError, match=message):
        _gguf_refusal(Gemma4TextConfig(**kwargs))


@pytest.mark.parametrize("method", ["f16", "bf16"])
def test_tiny_gemma4_in_llama_cpp(tmp_path, method):
    pytest.importorskip("xllamacpp")
    model = _lora(_save(tmp_path / "hf"))
    config = model.get_base_model().config
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, method, name="tiny")

    # What is in the file: transformers' tensors as they are, the extra rope_freqs, the metadata.
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.GEMMA4))
    assert set(tensors) == set(expected)
    assert "blk.2.attn_v.weight" not in tensors and "blk.1.attn_v.weight" in tensors  # k = v
    assert "blk.3.attn_k.weight" not in tensors  # KV-shared
    assert tensors["blk.4.ffn_up.weight"].shape.tolist() == [72, 180]  # double-wide
    merged = dict(merged_state(model))
    torch.testing.assert_close(  # w·x̂ norms: no 1 + w
        expected["blk.0.attn_norm.weight"], merged["model.layers.0.input_layernorm.weight"]
    )
    torch.testing.assert_close(
        expected["blk.3.layer_output_scale.weight"], merged["model.layers.3.layer_scalar"]
    )
    # proportional RoPE on the full layers' 40 dims, 0.25 of them rotated: 5 of 20 frequencies
    want_freqs = torch.tensor([1.0] * 5 + [1e30] * 15)
    assert torch.equal(expected["rope_freqs.weight"], want_freqs)
    fields = reader.fields
    assert fields["gemma4.attention.key_length"].contents() == 40
    assert fields["gemma4.attention.key_length_swa"].contents() == 24
    assert fields["gemma4.attention.head_count_kv"].contents() == [2, 2, 1, 2, 1]
    assert fields["gemma4.attention.shared_kv_layers"].contents() == 2
    assert fields["gemma4.attention.sliding_window_pattern"].contents() == [
        t == SLIDING for t in LAYER_TYPES
    ]
    assert fields["gemma4.feed_forward_length"].contents() == [90, 90, 90, 180, 180]
    assert fields["gemma4.embedding_length_per_layer_input"].contents() == 10
    assert fields["gemma4.final_logit_softcapping"].contents() == pytest.approx(5.0)
    assert config.final_logit_softcapping == 5.0

    # What llama.cpp computes with it: transformers' next-token log-probs, prompt after prompt.
    hf = _rounded_merge(model, {"f16": torch.float16, "bf16": torch.bfloat16}[method])
    server = llama_cpp_server(out)
    errors = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        request = {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": 10}
        request["logit_bias"] = BAN_BYTE_TOKENS  # top_logprobs are still the raw distribution
        response = server.handle_completions(request | {"cache_prompt": False})
        assert response["usage"]["prompt_tokens"] == len(ids), response
        top = response["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        cpp = {e["id"]: e["logprob"] for e in top}
        assert len(cpp) == 10, (prompt, top)
        with torch.no_grad():
            want = hf(input_ids=torch.tensor([ids])).logits[0, -1].double().log_softmax(-1)
        errors.append(max(abs(v - float(want[i])) for i, v in cpp.items()))
        # llama.cpp's best token is transformers', or within the tolerance of it
        assert float(want[next(iter(cpp))]) > float(want.max()) - TOL[method], prompt
    assert max(errors) < TOL[method], errors
    # the distributions are far from uniform (else a wrong layout could hide in them)
    assert float(want.max()) > np.log(1 / VOCAB) + 1.5


@pytest.mark.parametrize("method", ["q8_0", "q4_k_m"])
def test_quantised_methods_are_refused_until_checked_in_llama_cpp(tmp_path, method):
    model = _lora(_save(tmp_path / "hf"))
    with pytest.raises(NotImplementedError, match="llama-quantize"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), method, name="tiny")
    assert not (tmp_path / "gguf").exists() or not any((tmp_path / "gguf").iterdir())
