"""Gemma 4 text (dense): fastlm-patched vs the unpatched Hugging Face model + PEFT (the MoE
block: test_gemma4_moe.py).

The tiny config (tests/tiny_models.py) has every kind of layer: sliding and full attention with
their own head_dim and kv heads, k = v on the full layers (no v_proj), two KV-sharing layers that
read what a sliding and a full layer stored (no k/v projections; double-wide MLPs), per-layer
input gating and a final-logit soft-cap. As for the other families (test_architectures.py):
same weights and LoRA (B ≠ 0), a padded batch, fp32, loss and every LoRA gradient within 1e-4
relative, plain, checkpointed and offloaded, under QLoRA, and 20 AdamW steps on the same curve.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.gemma4", reason="transformers without Gemma 4")

from test_architectures import (  # noqa: E402 (after the skip)
    RTOL,
    _assert_loss_and_lora_grads_match,
    _assert_same_loss_curve,
    _pair,
    assert_bf16_as_close_to_fp32_as_hf,
    assert_bf16_kernels_as_close_to_fp32_as_hf,
)
from tiny_models import relative_error, save_tiny_model, tiny_batch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.errors import UnsupportedArchitectureError  # noqa: E402
from fastlm.models import SPECS, fused_report, spec_for  # noqa: E402
from fastlm.offload import offloaded_checkpoint  # noqa: E402

GEMMA4 = "gemma4_text"
# The projections each layer of the tiny config has: layers 0 and 2 (sliding) all four, layer 1
# (full, k = v) no v_proj, layers 3 and 4 (KV-sharing) only q and o. MLPs all three.
ATTENTION = {
    0: ["q_proj", "k_proj", "v_proj", "o_proj"],
    1: ["q_proj", "k_proj", "o_proj"],
    2: ["q_proj", "k_proj", "v_proj", "o_proj"],
    3: ["q_proj", "o_proj"],
    4: ["q_proj", "o_proj"],
}
MLP = ["gate_proj", "up_proj", "down_proj"]


def _expected_rows() -> list[str]:
    rows = []
    for layer, projections in ATTENTION.items():
        rows += [f"base_model.model.model.layers.{layer}.self_attn.{p}" for p in projections]
        rows += [f"base_model.model.model.layers.{layer}.mlp.{p}" for p in MLP]
    return rows


@pytest.mark.parametrize(
    "checkpointing", [False, True, "unsloth"], ids=["plain", "checkpointed", "offloaded"]
)
def test_loss_and_lora_gradients_match_hf(tmp_path, checkpointing):
    reference, fast = _pair(tmp_path, GEMMA4, checkpointing)
    config = fast.config
    assert config.kv_sharing_modes == [None, "store", "store", "reuse", "reuse"]
    assert {config.per_layer_config[i].head_dim for i in range(5)} == {24, 40}
    report = fused_report(fast)
    assert all(row["fused"] for row in report), report
    assert [row["module"] for row in report[:-1]] == sorted(_expected_rows(), key=_layer_order)
    layers = [m for m in fast.modules() if getattr(m, "gradient_checkpointing", False)]
    decoder_layers = [m for m in layers if type(m).__name__ == "Gemma4TextDecoderLayer"]
    assert len(decoder_layers) == (5 if checkpointing else 0)
    offloaded = [m._gradient_checkpointing_func is offloaded_checkpoint for m in layers]
    assert all(offloaded) if checkpointing == "unsloth" else not any(offloaded)

    actual, expected_grads, _ = _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    assert actual.logits is None  # the fused cross-entropy (with the soft-cap) ran
    assert len(expected_grads) == 2 * len(_expected_rows())
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name


def _layer_order(name: str) -> tuple[int, int]:
    """fused_report's order: layer by layer, attention before MLP, in module order."""
    layer = int(name.split(".layers.")[1].split(".")[0])
    return layer, 0 if ".self_attn." in name else 1


def test_fused_report_says_where_k_and_v_come_from(tmp_path):
    _, fast = _pair(tmp_path, GEMMA4, checkpointing=False)
    kv = [row["kv"] for row in fused_report(fast).attention]
    assert kv[0] == kv[2] == "k_proj, v_proj"
    assert kv[1] == "k_proj; v is k_proj's output (no v_proj)"
    assert kv[3].startswith("reused: the sliding_attention K/V") and "no k_proj" in kv[3]
    assert kv[4].startswith("reused: the full_attention K/V")


def test_qlora_loss_and_lora_gradients_match_hf(tmp_path):
    pytest.importorskip("bitsandbytes")
    from test_qlora import _qlora_pair

    reference, fast = _qlora_pair(tmp_path, GEMMA4, checkpointing=True)
    packed = [n for n, p in fast.named_parameters() if getattr(p, "quant_state", None)]
    # The 30 projections and the 11 per-layer-input linears (their gate and projection in each
    # layer, the model's projection), 4-bit on both sides; those 11 run transformers' code.
    assert len(packed) == len(_expected_rows()) + 2 * 5 + 1
    assert all(row["fused"] for row in fused_report(fast)), fused_report(fast)
    actual, expected_grads, _ = _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    assert actual.logits is None
    assert all(grad.abs().sum() > 0 for grad in expected_grads.values())


def test_twenty_steps_follow_the_same_loss_curve(tmp_path):
    reference, fast = _pair(tmp_path, GEMMA4, checkpointing=True)
    _assert_same_loss_curve(reference, fast, tiny_batch(seed=1), steps=20)


def test_eval_mode_and_generation_match_hf(tmp_path):
    """Eval logits, and greedy generation with the KV cache (the KV-sharing layers read the
    stored K/V of the whole prompt while decoding one token)."""
    reference, fast = _pair(tmp_path, GEMMA4, checkpointing=False)
    batch = tiny_batch()
    reference.eval()
    fast.eval()
    with torch.no_grad():
        expected, actual = reference(**batch), fast(**batch)
    assert torch.allclose(actual.logits, expected.logits, rtol=1e-4, atol=1e-5)
    prompt = batch["input_ids"][:1, :6]
    generated = [
        m.generate(input_ids=prompt, max_new_tokens=8, do_sample=False) for m in (reference, fast)
    ]
    assert torch.equal(generated[0], generated[1])


def test_unpatch_and_adapter_round_trip(tmp_path):
    from peft import PeftModel

    _, fast = _pair(tmp_path, GEMMA4, checkpointing=False)
    fast.save_pretrained(tmp_path / "adapter")
    fast.eval()
    with torch.no_grad():
        expected = fast(**tiny_batch()).logits
    base = AutoModelForCausalLM.from_pretrained(tmp_path / GEMMA4, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert relative_error(loaded(**tiny_batch()).logits, expected) < RTOL
    FastModel.unpatch(fast)
    assert not [m for m in fast.modules() if "forward" in m.__dict__]


def test_the_weightless_v_norm_is_patched_and_exact():
    """Gemma4RMSNorm(with_scale=False) has no weight: the patched norm computes x̂ as HF does."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    from fastlm.models.patch import PatchState, _norm_forward, _set_forward

    norm = Gemma4RMSNorm(24, eps=1e-6, with_scale=False)
    x = torch.randn(2, 5, 3, 24, requires_grad=True)
    expected = norm(x)
    _set_forward(PatchState(SPECS[GEMMA4], 64), norm, _norm_forward, offset=0.0)
    actual = norm(x)
    torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)
    weights = torch.randn(24)  # not the sum of x̂², whose gradient is zero
    (grad,) = torch.autograd.grad((actual * weights).sum(), x)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_the_multimodal_config_is_refused():
    """(The MoE block, enable_moe_block, is supported: test_gemma4_moe.py.)"""
    from transformers import Gemma4Config

    with pytest.raises(UnsupportedArchitectureError, match="load the text-only Gemma4ForCausalLM"):
        spec_for(Gemma4Config())


def test_gguf_export_is_refused_with_what_is_missing(tmp_path):
    pytest.importorskip("gguf")
    from fastlm.export.gguf_writer import save_pretrained_gguf

    path = save_tiny_model(GEMMA4, tmp_path / GEMMA4)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    # tiny_models' layer order: its KV-shared layers read other layers in llama.cpp (the orders
    # llama.cpp runs are exported: tests/export/test_gguf_gemma4.py)
    with pytest.raises(NotImplementedError, match="llama.cpp's KV-shared full_attention layers"):
        save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, quantization_method="f16")
    assert not (tmp_path / "gguf").exists()


def test_merged_16bit_reloads_with_the_same_logits(tmp_path):
    from fastlm.export import save_pretrained_merged

    path = save_tiny_model(GEMMA4, tmp_path / GEMMA4)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    out = save_pretrained_merged(model, tmp_path / "merged", tokenizer, "merged_16bit")
    reloaded, info = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        assert not torch.allclose(base(**batch).logits, expected, atol=1e-3)


def test_rope_on_the_query_alone_through_the_triton_kernel():
    """A KV-sharing layer rotates q alone: the kernel (interpreted here) with q's first head as
    k, whose rotation is dropped, gives the reference's rotated q and gradient."""
    from fastlm.kernels.rope import apply_rope_reference, apply_rope_triton

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 5, 4, 40, generator=generator, requires_grad=True)
    angles = torch.randn(1, 5, 20, generator=generator)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    weights = torch.randn(2, 5, 4, 40, generator=generator)
    actual = apply_rope_triton(query, query[:, :, :1], cos, sin)[0]
    expected = apply_rope_reference(query, query, cos, sin)[0]
    torch.testing.assert_close(actual, expected)
    (grad,) = torch.autograd.grad((actual * weights).sum(), query)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), query)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real Triton kernels)")
@pytest.mark.parametrize("checkpointing", [True, "unsloth"], ids=["checkpointed", "offloaded"])
def test_gpu_fp32_matches_hf(tmp_path, checkpointing):
    """On the GPU in fp32 (real Triton kernels, flash attention for the head dims it takes):
    loss and LoRA gradients within 1e-4 of transformers + PEFT, as on the CPU."""
    reference, fast = _pair(tmp_path, GEMMA4, checkpointing, device="cuda")
    _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())


def test_bf16_is_as_close_to_fp32_as_hf(tmp_path, device):
    """bf16 under autocast against the fp32 truth over 16 batches: fastlm's mean error at most
    1.25× HF + PEFT's own (test_architectures' check)."""

    def pair(folder, dtype):
        return _pair(folder, GEMMA4, True, device=device, dtype=dtype)

    assert_bf16_as_close_to_fp32_as_hf(tmp_path, pair, device, GEMMA4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's bf16 check runs the kernels")
def test_bf16_kernels_on_the_cpu_are_as_close_to_fp32_as_hf(tmp_path, every_kernel_on_cpu):
    """The bf16 check with every fastlm kernel in Triton's interpreter (test_architectures')."""

    def pair(folder, dtype):
        return _pair(folder, GEMMA4, True, device="cpu", dtype=dtype)

    assert_bf16_kernels_as_close_to_fp32_as_hf(tmp_path, pair, GEMMA4, every_kernel_on_cpu)
