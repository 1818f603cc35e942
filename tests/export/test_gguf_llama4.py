"""GGUF export of Llama 4 text (llama.cpp's llama4) in llama.cpp (xllamacpp), LoRA merged into
attention, the dense MLPs, the shared experts and the routed experts.

The tiny model is tiny_models' llama4_text (routers ×30, experts ×10) made what llama.cpp's
llama4 runs (``LLAMA_CPP``): the NoPE layer last of the four (its every-4th pattern), chunks of
8192 tokens and the temperature constants llama.cpp hard-codes (so neither the chunks nor the
temperature act on these short prompts: llama.cpp reads no key for them), and every row a
multiple of 32 so that q8_0 quantises every matrix (hidden 64, head_dim 16, experts
and shared experts of width 32, dense MLPs of 64). MoE blocks in layers 1 and 3, Llama 3 RoPE
scaling (the rope_freqs tensor), the L2 q/k norm on the RoPE layers. Base weights sharpened so
that the next-token distributions are far from uniform (``_tiny_llama4``).

llama.cpp's next-token log-probs over test_gguf_moe's prompts are compared with transformers' on
PEFT's merged weights, rounded as the file stores them (``_as_stored``), and its greedy tokens
with transformers' (test_gguf_moe's helpers). The file's tensors and metadata are read back;
what llama.cpp would run otherwise is refused with nothing written, and two refusals are shown
to be needed (bypassed, llama.cpp misses transformers by far); two layout mistakes are shown to
be caught.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import llama_cpp_server, save_tiny_model, tiny_config

from fastlm import FastModel
from fastlm.export.gguf_writer import gguf_tensors, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers.models.llama4", reason="transformers without Llama 4")

from test_gguf import spm_tokenizer  # noqa: E402
from test_gguf_moe import (  # noqa: E402
    PROMPTS,
    TOL,
    VOCAB,
    _complete,
    _next_logprobs,
    _peft_merged,
    _transformers_model,
    assert_like_transformers,
    merged_like_peft,
    q8_0_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = "llama4_text"
CHUNKED, FULL = "chunked_attention", "full_attention"
# tiny_models' llama4_text as llama.cpp's llama4 runs it, rows of 32. tiny_config sets these on
# the built config, so layer_types (derived from no_rope_layers at build) is given too.
LLAMA_CPP = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=32,  # the experts' and the shared experts' width
    intermediate_size_mlp=64,  # the dense layers' (0 and 2)
    no_rope_layers=[1, 1, 1, 0],
    layer_types=[CHUNKED, CHUNKED, CHUNKED, FULL],
    attention_chunk_size=8192,
    floor_scale=8192,
    attn_scale=0.1,
)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERTS = ("feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj")
# max |Δ log-prob| over PROMPTS of llama.cpp's top-10 next tokens against transformers on the
# weights the file holds, and on the fp32 merged weights, within test_gguf_moe's TOL (tight,
# loose) per file type. Measured (stored / fp32): f16 3.7e-3 / 5.7e-3, bf16 1.6e-2 / 2.5e-2,
# q8_0 6.6e-2 / 0.12 (llama.cpp also rounds each product's activations to the weights' type);
# the greedy runs follow transformers' for 12 of 12 steps in all three (GREEDY_STEPS asks 8/6/6).


def _tiny_llama4(tmp_path, **overrides):
    """tiny_models' llama4_text with LLAMA_CPP (+ ``overrides``), LoRA with B ≠ 0 on attention,
    the MLPs and the experts, sharpened: matrices ×2 but the routers and experts (llama4_extras
    made them ×30 and ×10 already; ×2 more put f16's rounding of the activations at 5.8e-3), the
    LM head ×6, norms ×3; byte tokens' LM-head rows zeroed (out of reach: the comparisons are
    about the prompts' word tokens, whose top log-prob is then -1.5 to -2.6 against -3.7 for
    uniform; every expert gets tokens)."""
    kwargs = LLAMA_CPP | {"vocab_size": VOCAB} | overrides
    path = save_tiny_model(FAMILY, tmp_path / "hf", **kwargs)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=TARGETS)
    assert sorted(model.peft_config["default"].target_parameters) == sorted(EXPERTS)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_" not in name and "norm" in name:
                param.mul_(3.0)
            elif "lora_" not in name and param.ndim >= 2 and "feed_forward.experts" not in name:
                param.mul_(6.0 if "lm_head" in name else 1.0 if "router" in name else 2.0)
        model.get_base_model().lm_head.weight[4:260] = 0
    return model.eval()


def _as_stored(name: str, tensor: torch.Tensor, method: str) -> torch.Tensor:
    """``tensor`` rounded as the file stores it: F32 (1-D, the routers), else f16 / bf16, or
    q8_0 in 32-weight blocks along each row of llama.cpp's (out, in) matrix (the experts are
    (E, in, out) in transformers: blocks along their dim 1)."""
    if tensor.ndim < 2 or name.endswith("router.weight"):
        return tensor
    if method == "bf16":
        return tensor.to(torch.bfloat16).float()
    if method == "f16":
        return tensor.to(torch.float16).float()
    rows = tensor.transpose(1, 2) if name.endswith(EXPERTS) else tensor
    decoded = q8_0_rows(rows)
    return decoded.transpose(1, 2) if name.endswith(EXPERTS) else decoded


def _exported(tmp_path, model, method: str):
    """(GGUF path, transformers on the stored weights, transformers on the fp32 merged ones)."""
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), method, name="t")
    merged = _peft_merged(model)
    stored = {k: _as_stored(k, v, method) for k, v in merged.items()}
    config = model.get_base_model().config
    return out, _transformers_model(config, stored), _transformers_model(config, merged)


def _worst_error(server, tokenizer, reference) -> float:
    """max over PROMPTS of |Δ log-prob| of llama.cpp's top-10 next tokens against ``reference``."""
    errors = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        (step,) = _complete(server, ids, 1, n_probs=10)
        want = _next_logprobs(reference, ids)
        errors.append(max(abs(e["logprob"] - float(want[e["id"]])) for e in step["top_logprobs"]))
    return max(errors)


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0"])
def test_tiny_llama4_in_llama_cpp(tmp_path, method):
    """llama.cpp's next-token log-probs within TOL of transformers' over PROMPTS, and its greedy
    run follows transformers' for GREEDY_STEPS of 12 steps."""
    pytest.importorskip("xllamacpp")
    model = _tiny_llama4(tmp_path)
    tokenizer = spm_tokenizer()
    out, stored_model, fp32_model = _exported(tmp_path, model, method)
    server = llama_cpp_server(out)

    assert_like_transformers(server, tokenizer, stored_model, fp32_model, method, "llama4")


def test_tensors_and_metadata(tmp_path):
    """What the file holds, from the merged transformers parameters: q/k rows as they are (no
    Llama permutation), the experts' (E, out, in) gate / up / down stacks, the shared expert and
    the dense MLP, the F32 router, rope_freqs; the llama4 metadata."""
    model = _tiny_llama4(tmp_path)
    config = model.get_base_model().config
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "q8_0", name="t")
    merged = merged_like_peft(model)

    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.LLAMA4))
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(tensors) == set(expected)
    layer1, width = "model.layers.1.feed_forward.", 32
    gate_up, down = merged[layer1 + "experts.gate_up_proj"], merged[layer1 + "experts.down_proj"]
    want = {  # (E, H, 2I) gate then up along the outputs, (E, I, H): transposed per expert
        "blk.1.ffn_gate_exps.weight": gate_up[:, :, :width].transpose(1, 2),
        "blk.1.ffn_up_exps.weight": gate_up[:, :, width:].transpose(1, 2),
        "blk.1.ffn_down_exps.weight": down.transpose(1, 2),
        "blk.1.ffn_gate_shexp.weight": merged[layer1 + "shared_expert.gate_proj.weight"],
        "blk.1.ffn_down_shexp.weight": merged[layer1 + "shared_expert.down_proj.weight"],
        "blk.0.ffn_up.weight": merged["model.layers.0.feed_forward.up_proj.weight"],
        "blk.0.attn_q.weight": merged["model.layers.0.self_attn.q_proj.weight"],
        "blk.0.attn_k.weight": merged["model.layers.0.self_attn.k_proj.weight"],
    }
    for gguf_name, tensor in want.items():
        torch.testing.assert_close(expected[gguf_name], tensor)
        assert tensors[gguf_name].tensor_type == gguf.GGMLQuantizationType.Q8_0, gguf_name
        assert list(tensors[gguf_name].shape) == list(reversed(tensor.shape))  # ne: in first
    assert list(tensors["blk.0.ffn_up.weight"].shape) == [64, 64]  # intermediate_size_mlp
    assert "blk.0.ffn_gate_inp.weight" not in tensors  # layer 0 is dense
    router = tensors["blk.1.ffn_gate_inp.weight"]  # F32 in every file type
    assert router.tensor_type == gguf.GGMLQuantizationType.F32
    want_router = merged[layer1 + "router.weight"]
    np.testing.assert_array_equal(np.array(router.data).reshape(5, 64), want_router.numpy())
    assert tensors["rope_freqs.weight"].tensor_type == gguf.GGMLQuantizationType.F32

    fields = gguf.GGUFReader(out).fields
    want_fields = {
        "expert_count": 5,
        "expert_used_count": 2,
        "expert_feed_forward_length": 32,
        "feed_forward_length": 64,
        "interleave_moe_layer_step": 2,
        "attention.sliding_window": 8192,
        "attention.key_length": 16,
        "rope.dimension_count": 16,
        "rope.freq_base": 500000.0,
        "context_length": config.max_position_embeddings,
    }
    for key, value in want_fields.items():
        assert fields[f"llama4.{key}"].contents() == pytest.approx(value), key


def test_k_quants_are_refused(tmp_path):
    """llama-quantize's k-quant types for expert stacks are not reproduced: refused, with
    nothing written."""
    model = _tiny_llama4(tmp_path)
    with pytest.raises(NotImplementedError, match="Write f16 and run llama-quantize"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), ["f16", "q4_k_m"])
    assert not (tmp_path / "gguf").exists()


def _refusal(config) -> None:
    from fastlm.models import SPECS

    for check in SPECS[FAMILY].gguf_checks:
        check(config)


_YARN = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 4.0}
REFUSED = [
    ({"no_rope_layers": [1, 1, 0, 1], "layer_types": [CHUNKED, CHUNKED, FULL, CHUNKED]},
     r"no_rope_layers=\[1, 1, 0, 1\]"),  # tiny_models' own: NoPE at layer 2
    ({"layer_types": [CHUNKED] * 4}, "full-attention layers at every 4th"),
    ({"moe_layers": [3]}, r"moe_layers=\[3\]"),
    ({"attention_chunk_size": 4}, "attention_chunk_size=4"),
    ({"floor_scale": 3}, "'floor_scale': 3"),
    ({"attn_temperature_tuning": False}, "'attn_temperature_tuning': False"),
    ({"use_qk_norm": False}, "use_qk_norm=False and 5 experts"),
    ({"num_local_experts": 128}, "use_qk_norm=True and 128 experts"),
    ({"attention_bias": True}, "attention_bias=True"),
    ({"rope_parameters": _YARN}, "RoPE type 'yarn'"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "match"), REFUSED)
def test_what_llama_cpp_runs_otherwise_is_refused(overrides, match):
    """Refused before any tensor is written, each naming what llama.cpp does instead."""
    with pytest.raises(NotImplementedError, match=match):
        _refusal(tiny_config(FAMILY, **(LLAMA_CPP | overrides)))


def test_the_tested_config_and_maverick_s_are_not_refused():
    _refusal(tiny_config(FAMILY, **LLAMA_CPP))
    maverick = {"num_local_experts": 128, "use_qk_norm": False, "rope_parameters": {
        "rope_type": "default", "rope_theta": 500000.0}}  # fmt: skip
    _refusal(tiny_config(FAMILY, **(LLAMA_CPP | maverick)))


@pytest.mark.parametrize(
    "overrides", [{"attention_chunk_size": 4}, {"use_qk_norm": False}], ids=["chunk", "qk_norm"]
)
def test_the_refusals_are_needed(tmp_path, monkeypatch, overrides):
    """With the checks bypassed, a file written for a model llama.cpp runs otherwise misses
    transformers by far: llama.cpp attends across the 4-token chunks (it reads no chunk size),
    and normalises q and k whatever use_qk_norm says."""
    pytest.importorskip("xllamacpp")
    from fastlm.models import SPECS

    monkeypatch.setitem(SPECS, FAMILY, dataclasses.replace(SPECS[FAMILY], gguf_checks=()))
    model = _tiny_llama4(tmp_path, **overrides)
    out, stored_model, _ = _exported(tmp_path, model, "f16")
    worst = _worst_error(llama_cpp_server(out), spm_tokenizer(), stored_model)
    print(f"llama4 f16 with {overrides}: max |Δ log-prob| {worst:.2e}")
    assert worst > 10 * TOL["f16"][0], worst


def _gate_up_swapped(monkeypatch) -> None:
    from fastlm.export import gguf_moe

    split = gguf_moe._gate_and_up
    monkeypatch.setattr(gguf_moe, "_gate_and_up", lambda t, inter: split(t, inter)[::-1])


def _llama_rope_rows(monkeypatch) -> None:
    """q/k rows permuted as for Llama 1-3 (transformers' Llama 4 is already interleaved)."""
    from fastlm.export import gguf_writer
    from fastlm.export.gguf_dense import LLAMA

    layout = dataclasses.replace(gguf_writer.LAYOUTS["LLAMA4"], tensor=LLAMA.tensor)
    monkeypatch.setitem(gguf_writer.LAYOUTS, "LLAMA4", layout)


@pytest.mark.parametrize("mistake", [_gate_up_swapped, _llama_rope_rows], ids=lambda f: f.__name__)
def test_a_layout_mistake_is_caught(tmp_path, monkeypatch, mistake):
    """The f16 bound has the power to see a layout mistake of the same shapes (llama.cpp loads
    the file): the experts' gate and up swapped, or Llama's q/k row permutation."""
    pytest.importorskip("xllamacpp")
    mistake(monkeypatch)
    model = _tiny_llama4(tmp_path)
    out, stored_model, _ = _exported(tmp_path, model, "f16")
    worst = _worst_error(llama_cpp_server(out), spm_tokenizer(), stored_model)
    print(f"llama4 f16, {mistake.__name__}: max |Δ log-prob| {worst:.2e}")
    assert worst > 10 * TOL["f16"][0], worst
