"""Gemma 4 text with its mixture-of-experts block (26B-A4B style) in llama.cpp's gemma4: the
exported file's next-token log-probs (xllamacpp) against transformers'.

Every layer runs a dense GeGLU MLP and, beside it, a router over E GeGLU experts reading the
residual stream (tiny_models' GEMMA4_TEXT_MOE: 5 experts, 2 per token, router ``scale`` and
``per_expert_scale`` drawn off 1 by gemma4_moe_extras). The 26B-A4B-style model below has no
per-layer inputs and no KV sharing, and every row a multiple of 32 (hidden 64, MLP 64, experts
32), so that q8_0 quantises every matrix; it keeps tiny_models' sliding and full layers with their
own head_dim, k = v on the full layers, proportional RoPE, the soft-cap and ``layer_scalar``.
A second model adds tiny_models' per-layer inputs and KV sharing to it (f16; q8_0 is refused
with per-layer inputs). LoRA (B ≠ 0) on attention, the dense MLP and both expert parameters;
weights sharpened so that the next-token distributions are far from uniform. The reference is
plain transformers (eager experts) on PEFT's merged weights rounded as the file stores them
(``_as_stored``), and on the fp32 merged weights.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from tiny_models import _GEMMA4_TEXT_MOE, gemma4_moe_extras, llama_cpp_server, random_norms

from fastlm import FastModel
from fastlm.export import gguf_writer
from fastlm.export.gguf_writer import gguf_tensors, save_pretrained_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Gemma4TextConfig"):
    pytest.skip("transformers without Gemma 4", allow_module_level=True)

from test_gguf import LORA_TARGETS, spm_tokenizer  # noqa: E402
from test_gguf_moe import (  # noqa: E402
    PROMPTS,
    _complete,
    _errors,
    _next_logprobs,
    _peft_merged,
    _transformers_model,
    merged_like_peft,
    q8_0_rows,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SLIDING, FULL = "sliding_attention", "full_attention"
VOCAB = 300  # spm_tokenizer's
EXPERTS, TOP_K, EXPERT_WIDTH, HIDDEN = 5, 2, 32, 64
# 26B-A4B style: no per-layer inputs, no KV sharing; rows of 32.
MOE_26B = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    moe_intermediate_size=EXPERT_WIDTH,
    hidden_size_per_layer_input=0,
    num_kv_shared_layers=0,
)
# tiny_models' per-layer inputs (width 10) and KV sharing, in test_gguf_gemma4's layer order
# (llama.cpp's KV-shared layers read fixed layers; tiny_models' own order is refused).
WITH_PER_LAYER_INPUTS = dict(
    MOE_26B,
    hidden_size_per_layer_input=10,
    num_kv_shared_layers=2,
    layer_types=[SLIDING, SLIDING, FULL, SLIDING, FULL],
)
# max |Δ log-prob| of llama.cpp's top-10 next tokens against transformers on the weights the file
# holds (first bound) and on the fp32 merged weights (second), over test_gguf_moe's PROMPTS.
# Measured (stored / fp32): 26B-style f16 3.5e-3 / 4.8e-3, bf16 1.9e-2 / 2.9e-2, q8_0 7.2e-2 /
# 0.13; with per-layer inputs and KV sharing, f16 3.3e-3 / 6.1e-3. The bounds are
# test_gguf_moe's for the other MoE arches (f16's is test_gguf.py's for the tiny families);
# test_gguf_moe says why bf16 and q8_0 are wider (llama.cpp rounds each product's activations
# to the weights' type). A file with every weight F32 (nothing rounded in the file; llama.cpp's
# f16 KV cache and GELU table remain) is off by 2.7e-3, the same model without the MoE block
# by 2.9e-3: the MoE block's layout adds nothing measurable. Layout mistakes move the log-probs
# by 0.6-2 (test_a_layout_mistake_is_caught).
TOL = {"f16": (5e-3, 0.02), "bf16": (0.03, 0.05), "q8_0": (0.12, 0.2)}
# Routing near ties: a token whose TOP_K-th and next expert are within llama.cpp's roundings of
# a tie may take the other expert there, and the log-probs after it then move by far more than
# TOL (measured: a gap of 5e-4 between the two log-probs, met in a greedy continuation of
# PROMPTS[0], flipped in the f16 file and moved that step by 0.29). The last tokens of PROMPTS
# keep at least this gap in every layer (measured: 4.6e-3 and more).
MIN_TIE_GAP = 2e-3
# The factor on every matrix (attention, MLP, experts, router) that makes the next-token
# distributions far from uniform.
SHARPEN = 3.0


def _save(path, overrides: dict):
    """tiny_models' Gemma 4 MoE with ``overrides`` (the per-layer config follows the layer
    types): random norms, ``layer_scalar`` off 1, gemma4_moe_extras' router."""
    from transformers import AutoModelForCausalLM, Gemma4TextConfig

    kwargs = copy.deepcopy(_GEMMA4_TEXT_MOE) | {"vocab_size": VOCAB}
    kwargs |= {"vocab_size_per_layer_input": VOCAB} | copy.deepcopy(overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma4TextConfig(**kwargs))
    random_norms(model)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.layer_scalar.uniform_(0.5, 1.5)
    gemma4_moe_extras(model, starved=EXPERTS - 1)
    model.save_pretrained(path)
    spm_tokenizer().save_pretrained(path)
    return path


def _tiny_moe(tmp_path, overrides: dict = MOE_26B):
    """The model with LoRA (B ≠ 0) on attention, the dense MLP and the experts (fastlm adds the
    experts' two parameters for the MLP names), sharpened: matrices, routers and experts
    ×SHARPEN,
    norms ×3, the (tied) embedding ×16 but for its column 0, which gemma4_moe_extras set to 0.3
    to starve an expert (×16 it would dominate the residual stream and flatten every
    distribution). Sharpened, the top word token's log-prob is -1.1 to -1.9 on PROMPTS (-3.7
    uniform over the 40 word tokens)."""
    path = _save(tmp_path / "hf", overrides)
    model, _ = FastModel.from_pretrained(str(path), dtype=torch.float32, device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=LORA_TARGETS)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_" not in name and "norm" in name:
                param.mul_(3.0)
            elif "lora_" not in name and param.ndim >= 2:
                param.mul_(16.0 if "embed_tokens" in name else SHARPEN)
        model.get_base_model().model.embed_tokens.weight[:, 0] = 0.3
    return model.eval()


def _as_stored(name: str, tensor: torch.Tensor, method: str) -> torch.Tensor:
    """``tensor`` rounded as the file stores it: F32 (vectors, the router), else f16 / bf16, or
    q8_0 in 32-weight blocks along each row (Gemma 4's experts are (E, out, in) already; f16
    where a row is not a multiple of 32)."""
    if tensor.ndim < 2 or name.endswith("router.proj.weight"):
        return tensor
    if method == "bf16":
        return tensor.to(torch.bfloat16).float()
    if method == "f16":
        return tensor.to(torch.float16).float()
    return q8_0_rows(tensor)


def _references(model, method: str):
    """transformers on the stored weights and on the fp32 merged weights."""
    config = model.get_base_model().config
    merged = _peft_merged(model)
    stored = {k: _as_stored(k, v, method) for k, v in merged.items()}
    return _transformers_model(config, stored), _transformers_model(config, merged)


def _tie_gap(model, ids: list[int]) -> float:
    """How near the last token's routing is to a tie: the smallest gap, over the layers, between
    the log-probs of its TOP_K-th and (TOP_K + 1)-th experts."""
    probs = []
    hooks = [
        layer.router.register_forward_hook(lambda m, i, out: probs.append(out[0][-1]))
        for layer in model.model.layers
    ]
    _next_logprobs(model, ids)
    for hook in hooks:
        hook.remove()
    return min(float(p.topk(TOP_K + 1).values.log().diff()[-1].neg()) for p in probs)


def _check_in_llama_cpp(tmp_path, model, method: str, label: str) -> None:
    """llama.cpp's next-token log-probs within TOL of transformers' over PROMPTS."""
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, method, name="tiny")
    stored_model, fp32_model = _references(model, method)
    tight, loose = TOL[method]
    errors, errors_fp32 = _errors(llama_cpp_server(out), tokenizer, stored_model, fp32_model, tight)
    gap = min(_tie_gap(stored_model, tokenizer(prompt).input_ids) for prompt in PROMPTS)
    print(f"{label} {method}: max |Δ log-prob| {max(errors):.2e} (stored weights), "
          f"{max(errors_fp32):.2e} (fp32); routing gap {gap:.1e}")  # fmt: skip
    assert gap > MIN_TIE_GAP, gap
    assert max(errors) < tight, errors
    assert max(errors_fp32) < loose, errors_fp32


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0"])
def test_tiny_gemma4_moe_in_llama_cpp(tmp_path, method):
    pytest.importorskip("xllamacpp")
    _check_in_llama_cpp(tmp_path, _tiny_moe(tmp_path), method, "26B-style")


def test_with_per_layer_inputs_and_kv_sharing_in_llama_cpp(tmp_path):
    """The MoE block beside the E-variants' per-layer inputs and KV-shared (double-wide) layers."""
    pytest.importorskip("xllamacpp")
    model = _tiny_moe(tmp_path, WITH_PER_LAYER_INPUTS)
    _check_in_llama_cpp(tmp_path, model, "f16", "per-layer inputs")


def test_expert_stacks_scales_and_metadata(tmp_path):
    """What llama.cpp reads for the MoE block, from the merged transformers parameters: the
    fused (E, 2I, H) gate-then-up stack and the (E, H, I) down stack (q8_0), the router, its
    scale and the per-expert scale (F32), the branch's norms, the expert metadata."""
    model = _tiny_moe(tmp_path)
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), "q8_0", name="t")
    merged = merged_like_peft(model)
    base = {n: p for n, p in model.get_base_model().named_parameters() if "lora_" not in n}
    layer = "model.layers.1."
    assert not torch.allclose(  # the experts' LoRA is in the file's weights
        merged[layer + "experts.down_proj"], base[layer + "experts.base_layer.base_layer.down_proj"]
    )

    expected = dict(gguf_tensors(model, gguf.MODEL_ARCH.GEMMA4))
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(expected)
    stacks = {
        "ffn_gate_up_exps": merged[layer + "experts.gate_up_proj"],  # rows: I gate, then I up
        "ffn_down_exps": merged[layer + "experts.down_proj"],
    }
    assert stacks["ffn_gate_up_exps"].shape == (EXPERTS, 2 * EXPERT_WIDTH, HIDDEN)
    for gguf_name, want in stacks.items():
        torch.testing.assert_close(expected[f"blk.1.{gguf_name}.weight"], want)
        tensor = tensors[f"blk.1.{gguf_name}.weight"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0, gguf_name
        assert list(tensor.shape) == list(reversed(want.shape))  # ne = [in, out, E]
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape)
        np.testing.assert_allclose(got, want.numpy(), atol=0.01 * float(want.abs().max()))
    f32 = {
        "ffn_gate_inp.weight": merged[layer + "router.proj.weight"],  # (E, H)
        "ffn_gate_inp.scale": merged[layer + "router.scale"],  # (H,)
        "ffn_down_exps.scale": merged[layer + "router.per_expert_scale"],  # (E,)
        "pre_ffw_norm_2.weight": merged[layer + "pre_feedforward_layernorm_2.weight"],
        "post_ffw_norm_1.weight": merged[layer + "post_feedforward_layernorm_1.weight"],
        "post_ffw_norm_2.weight": merged[layer + "post_feedforward_layernorm_2.weight"],
    }
    for gguf_name, want in f32.items():
        tensor = tensors[f"blk.1.{gguf_name}"]
        assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, gguf_name
        np.testing.assert_array_equal(np.array(tensor.data).reshape(want.shape), want.numpy())
    assert not torch.allclose(f32["ffn_down_exps.scale"], torch.ones(EXPERTS))

    fields = reader.fields
    assert fields["gemma4.expert_count"].contents() == EXPERTS
    assert fields["gemma4.expert_used_count"].contents() == TOP_K
    assert fields["gemma4.expert_feed_forward_length"].contents() == EXPERT_WIDTH
    assert fields["gemma4.feed_forward_length"].contents() == [64] * 5  # the dense MLPs
    assert fields["gemma4.embedding_length_per_layer_input"].contents() == 0


def _drop(gguf_suffix: str):
    """gguf_tensors without the tensors whose GGUF name ends with ``gguf_suffix``."""
    tensors = gguf_writer.gguf_tensors
    return lambda model, arch: (t for t in tensors(model, arch) if not t[0].endswith(gguf_suffix))


def _gate_and_up_swapped(monkeypatch) -> None:
    from fastlm.export import gguf_moe

    split = gguf_moe._gate_and_up
    monkeypatch.setattr(
        gguf_moe, "_gate_and_up", lambda t, interleaved: split(t, interleaved)[::-1]
    )


def _router_scale_as_ones(monkeypatch) -> None:
    """The router's scale written as ones (llama.cpp needs the tensor, so it is not left out)."""
    gemma4 = gguf_writer.LAYOUTS["GEMMA4"]

    def tensor(config, norm_offset, hf_name, value):
        name, value = gemma4.tensor(config, norm_offset, hf_name, value)
        return name, torch.ones_like(value) if name.endswith("router.proj.scale") else value

    layout = dataclasses.replace(gemma4, tensor=tensor)
    monkeypatch.setitem(gguf_writer.LAYOUTS, "GEMMA4", layout)


MISTAKES = {
    "gate and up swapped": _gate_and_up_swapped,
    "per-expert scale left out": lambda mp: mp.setattr(
        gguf_writer, "gguf_tensors", _drop("ffn_down_exps.scale")
    ),
    "router scale as ones": _router_scale_as_ones,
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_layout_mistake_is_caught(tmp_path, monkeypatch, mistake):
    """The f16 bound has the power to see a mistake in the MoE block's layout: each of these
    files loads in llama.cpp (same names and shapes, or an optional tensor left out) and its
    log-probs miss transformers' by far more than the bound."""
    pytest.importorskip("xllamacpp")
    MISTAKES[mistake](monkeypatch)
    model = _tiny_moe(tmp_path)
    tokenizer = spm_tokenizer()
    (out,) = save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, "f16", name="tiny")
    stored_model, _ = _references(model, "f16")
    server = llama_cpp_server(out)
    errors = []
    for prompt in ["the cat in a hat sat on the mat the", "a quick brown fox", "zebra"]:
        ids = tokenizer(prompt).input_ids
        (step,) = _complete(server, ids, 1, n_probs=10)
        want = _next_logprobs(stored_model, ids)
        errors.append(max(abs(e["logprob"] - float(want[e["id"]])) for e in step["top_logprobs"]))
    print(f"f16, {mistake}: max |Δ log-prob| {max(errors):.2e}")
    assert max(errors) > 10 * TOL["f16"][0], errors


def _refusal(config) -> None:
    from fastlm.models import SPECS

    for check in SPECS["gemma4_text"].gguf_checks:
        check(config)


def test_the_tested_configs_are_not_refused():
    from transformers import Gemma4TextConfig

    for overrides in (MOE_26B, WITH_PER_LAYER_INPUTS):
        _refusal(Gemma4TextConfig(**copy.deepcopy(_GEMMA4_TEXT_MOE) | overrides))


def test_another_gelu_is_refused():
    """llama.cpp's gemma4 runs the tanh GELU in the MLP and the experts, whatever the config."""
    from transformers import Gemma4TextConfig

    kwargs = copy.deepcopy(_GEMMA4_TEXT_MOE) | MOE_26B | {"hidden_activation": "gelu"}
    with pytest.raises(NotImplementedError, match="hidden_activation='gelu'"):
        _refusal(Gemma4TextConfig(**kwargs))


@pytest.mark.parametrize(
    ("overrides", "method"),
    [(WITH_PER_LAYER_INPUTS, "q8_0"), (MOE_26B, "q4_k_m"), (MOE_26B, "q6_k")],
)
def test_what_is_not_llama_quantize_s_is_refused(tmp_path, overrides, method):
    """q8_0 with per-layer inputs (llama-quantize leaves per_layer_model_proj unquantised) and
    the k-quants: refused, with nothing written."""
    model = _tiny_moe(tmp_path, overrides)
    with pytest.raises(NotImplementedError, match="Write f16 and run llama-quantize"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), ["f16", method])
    assert not (tmp_path / "gguf").exists()
