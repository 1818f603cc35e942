"""Qwen3.5 text (dense): fastlm-patched vs the unpatched Hugging Face model + PEFT.

The tiny config (tests/tiny_models.py) has both layer types: two Gated DeltaNet linear-attention
layers (grouped value heads, conv kernel 4) around a full-attention layer with the gated q_proj,
q/k norm and RoPE on a quarter of each head. LoRA on all twelve projections (the seven of every
family, the four DeltaNet input projections and out_proj). As for the other families: same
weights and LoRA (B ≠ 0), a padded batch, fp32, loss and every LoRA gradient within 1e-4
relative, plain, checkpointed and offloaded, under QLoRA, and 20 AdamW steps on the same curve.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers.models.qwen3_5", reason="transformers without Qwen3.5")

from test_architectures import (  # noqa: E402 (after the skip)
    RTOL,
    TF32_RTOL,
    _assert_loss_and_lora_grads_match,
    _assert_same_loss_curve,
    _loss_and_lora_grads,
    assert_bf16_as_close_to_fp32_as_hf,  # noqa: E402
    assert_bf16_kernels_as_close_to_fp32_as_hf,
)
from test_architectures import _pair as _architectures_pair  # noqa: E402
from tiny_models import (  # noqa: E402
    relative_error,
    save_tiny_model,
    tiny_batch,
    tiny_config,
)
from transformers import AutoModelForCausalLM  # noqa: E402

from fastlm import FastModel  # noqa: E402
from fastlm.errors import UnsupportedArchitectureError  # noqa: E402
from fastlm.models import fused_report, spec_for  # noqa: E402
from fastlm.models.linear_attention import FLA  # noqa: E402
from fastlm.offload import offloaded_checkpoint  # noqa: E402

QWEN3_5 = "qwen3_5_text"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
LINEAR = ["in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
TARGETS = ATTENTION + LINEAR + MLP
KINDS = {0: ("linear_attn", LINEAR), 1: ("self_attn", ATTENTION), 2: ("linear_attn", LINEAR)}


def _expected_rows() -> list[str]:
    rows = []
    for layer, (mixer, projections) in KINDS.items():
        rows += [f"base_model.model.model.layers.{layer}.{mixer}.{p}" for p in projections]
        rows += [f"base_model.model.model.layers.{layer}.mlp.{p}" for p in MLP]
    return rows


def _pair(tmp_path, checkpointing, load_in_4bit=False, **placement):
    """HF + PEFT and fastlm on the same tiny checkpoint, LoRA (B ≠ 0) on the twelve projections;
    4-bit: the reference's layers computed from the NF4 format (tests/nf4_format.py).
    ``placement``: ``device`` and ``dtype``, as test_architectures' pair takes them."""
    reference, fast = _architectures_pair(
        tmp_path,
        QWEN3_5,
        checkpointing,
        load_in_4bit=load_in_4bit,
        target_modules=TARGETS,
        **placement,
    )
    if load_in_4bit:
        from nf4_format import run_4bit_layers_from_format

        run_4bit_layers_from_format(reference)
    return reference, fast


@pytest.mark.parametrize(
    "checkpointing", [False, True, "unsloth"], ids=["plain", "checkpointed", "offloaded"]
)
def test_loss_and_lora_gradients_match_hf(tmp_path, checkpointing):
    reference, fast = _pair(tmp_path, checkpointing)
    assert fast.config.layer_types == ["linear_attention", "full_attention", "linear_attention"]
    report = fused_report(fast)
    assert all(row["fused"] and row["lora"] for row in report[:-1]), report
    assert [row["module"] for row in report[:-1]] == _expected_rows()
    layers = [m for m in fast.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len([m for m in layers if type(m).__name__ == "Qwen3_5DecoderLayer"]) == (
        3 if checkpointing else 0
    )
    offloaded = [m._gradient_checkpointing_func is offloaded_checkpoint for m in layers]
    assert all(offloaded) if checkpointing == "unsloth" else not any(offloaded)

    actual, expected_grads, _ = _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    assert actual.logits is None  # the fused cross-entropy ran
    assert len(expected_grads) == 2 * len(_expected_rows())
    for name, grad in expected_grads.items():
        assert grad.abs().sum() > 0, name


def test_fused_report_says_which_path_each_token_mixer_takes(tmp_path):
    _, fast = _pair(tmp_path, checkpointing=False)
    before = fused_report(fast).attention
    assert [row["called"] for row in before] == [False] * 3
    fast(**tiny_batch()).loss.backward()
    rows = fused_report(fast).attention
    assert [row["module"].rsplit(".", 1)[-1] for row in rows] == [
        "linear_attn",
        "self_attn",
        "linear_attn",
    ]
    linear, full = rows[0], rows[1]
    assert linear["called"] and linear["attention"] == "torch-reference"
    assert linear["reason"] == "cpu tensors (fla's kernels run on CUDA)"
    assert linear["kv"].startswith("none: linear attention")
    assert full["called"] and full["attention"] == "sdpa" and full["kv"] == "k_proj, v_proj"


def test_qlora_loss_and_lora_gradients_match_hf(tmp_path):
    pytest.importorskip("bitsandbytes")
    reference, fast = _pair(tmp_path, checkpointing=True, load_in_4bit=True)
    packed = {n: p for n, p in fast.named_parameters() if getattr(p, "quant_state", None)}
    expected = {n: p for n, p in reference.named_parameters() if getattr(p, "quant_state", None)}
    assert len(packed) == len(_expected_rows())
    assert all(torch.equal(packed[n], p) for n, p in expected.items())
    assert all(row["fused"] for row in fused_report(fast)), fused_report(fast)
    actual, expected_grads, _ = _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    assert actual.logits is None
    assert all(grad.abs().sum() > 0 for grad in expected_grads.values())


def test_twenty_steps_follow_the_same_loss_curve(tmp_path):
    reference, fast = _pair(tmp_path, checkpointing=True)
    _assert_same_loss_curve(reference, fast, tiny_batch(seed=1), steps=20)


def test_eval_mode_and_generation_match_hf(tmp_path):
    """Eval logits, and greedy generation with the cache: the linear layers' conv and recurrent
    states through the patched forward (prefill, then one token at a time)."""
    reference, fast = _pair(tmp_path, checkpointing=False)
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

    _, fast = _pair(tmp_path, checkpointing=False)
    fast.save_pretrained(tmp_path / "adapter")
    fast.eval()
    with torch.no_grad():
        expected = fast(**tiny_batch()).logits
    base = AutoModelForCausalLM.from_pretrained(tmp_path / QWEN3_5, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert relative_error(loaded(**tiny_batch()).logits, expected) < RTOL
    FastModel.unpatch(fast)
    assert not [m for m in fast.modules() if "forward" in m.__dict__]


def test_partial_rope_through_the_triton_kernel(device):
    """Partial rotary: the kernel (interpreted on a CPU host, compiled on a GPU) on the first 6
    of 24 dims, the rest passed through, gives transformers' apply_rotary_pos_emb and its
    gradients."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import apply_rotary_pos_emb

    from fastlm.kernels import rope
    from fastlm.models import patch

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 5, 4, 24, generator=generator).to(device).requires_grad_()
    key = torch.randn(2, 5, 2, 24, generator=generator).to(device).requires_grad_()
    angles = torch.randn(1, 5, 3, generator=generator).to(device)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    expected = [t.transpose(1, 2) for t in apply_rotary_pos_emb(
        query.transpose(1, 2), key.transpose(1, 2), cos, sin
    )]  # fmt: skip
    original = patch.apply_rope
    patch.apply_rope = rope.apply_rope_triton
    try:
        actual = patch._rope(query, key, cos, sin)
    finally:
        patch.apply_rope = original
    weights = [torch.randn(t.shape, generator=generator).to(device) for t in expected]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)
    grads = torch.autograd.grad(sum((a * w).sum() for a, w in zip(actual, weights)), (query, key))
    expected_grads = torch.autograd.grad(
        sum((e * w).sum() for e, w in zip(expected, weights)), (query, key)
    )
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)


def test_multimodal_config_is_refused_with_the_text_model_named():
    from transformers import Qwen3_5Config

    with pytest.raises(UnsupportedArchitectureError, match="load the text-only Qwen3_5ForCausalLM"):
        spec_for(Qwen3_5Config())
    assert spec_for(tiny_config(QWEN3_5)).family == "Qwen3.5 (text)"


def test_gguf_export_refuses_what_llama_cpp_would_not_load(tmp_path):
    """tiny_models' linear value heads (10) are narrower than its key heads (12); llama.cpp's
    qwen35 needs them equal. The export itself is tested in tests/export/test_gguf_qwen3_5.py."""
    pytest.importorskip("gguf")
    from fastlm.export.gguf_writer import save_pretrained_gguf

    path = save_tiny_model(QWEN3_5, tmp_path / QWEN3_5)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    with pytest.raises(NotImplementedError, match="linear_key_head_dim == linear_value_head_dim"):
        save_pretrained_gguf(model, tmp_path / "gguf", tokenizer, quantization_method="f16")
    assert not (tmp_path / "gguf").exists()


def test_merged_16bit_reloads_with_the_same_logits(tmp_path):
    from fastlm.export import save_pretrained_merged

    path = save_tiny_model(QWEN3_5, tmp_path / QWEN3_5)
    model, tokenizer = FastModel.from_pretrained(str(path), device_map="cpu")
    model = FastModel.get_peft_model(
        model, r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False
    )
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real Triton kernels)")
@pytest.mark.parametrize("checkpointing", [True, "unsloth"], ids=["checkpointed", "offloaded"])
def test_gpu_fp32_matches_hf(tmp_path, checkpointing):
    """On the GPU in fp32: fastlm's kernels (and the linear-attention library where installed)
    against transformers' own path, loss and LoRA gradients within 1e-4 as on the CPU -- except
    where fla's kernels run the linear-attention layers: their fp32 products are TF32 on the
    tensor cores (Triton's default precision for fp32 ``tl.dot``, 10-bit mantissas), which put
    out_proj's LoRA gradient 2.55e-3 from the fp32 truth on an H100; there the bound is 1e-2,
    and the bf16 check below holds them to 1.25x transformers' own error."""
    reference, fast = _pair(tmp_path, checkpointing, device="cuda")
    expected, expected_grads = _loss_and_lora_grads(reference, tiny_batch())
    actual, actual_grads = _loss_and_lora_grads(fast, tiny_batch())
    paths = {row["attention"] for row in fused_report(fast).attention if row["called"]}
    rtol = TF32_RTOL if FLA in paths else RTOL
    assert abs(actual.loss.item() - expected.loss.item()) <= rtol * abs(expected.loss.item())
    for name, grad in expected_grads.items():
        assert relative_error(actual_grads[name], grad) <= rtol, (name, sorted(paths))


def test_bf16_is_as_close_to_fp32_as_hf(tmp_path, device):
    """bf16 under autocast against the fp32 truth over 16 batches: fastlm's mean error at most
    1.25× HF + PEFT's own (test_architectures' check)."""

    def pair(folder, dtype):
        return _pair(folder, True, device=device, dtype=dtype)

    assert_bf16_as_close_to_fp32_as_hf(tmp_path, pair, device, QWEN3_5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU's bf16 check runs the kernels")
def test_bf16_kernels_on_the_cpu_are_as_close_to_fp32_as_hf(tmp_path, every_kernel_on_cpu):
    """The bf16 check with every fastlm kernel in Triton's interpreter (test_architectures'): the
    full-attention layer's flash kernel, partial RoPE, the norms and the loss; the linear-attention
    layers' mixing is transformers' (fla runs on CUDA only)."""

    def pair(folder, dtype):
        return _pair(folder, True, device="cpu", dtype=dtype)

    assert_bf16_kernels_as_close_to_fp32_as_hf(tmp_path, pair, QWEN3_5, every_kernel_on_cpu)


def test_a_refusing_fla_sends_the_layers_to_the_pytorch_functions(tmp_path, monkeypatch):
    """fla installed but refusing the device (fla 0.5.2 refuses Hopper with Triton 3.4–3.7.0):
    transformers' PyTorch functions run, as on the CPU, with fla's reason in fused_report. The
    probe (a tiny forward and backward) runs once per device, on a thread of its own."""
    import threading

    from fastlm.models import linear_attention

    probes = []

    def refuse(device, outcome):
        probes.append(threading.get_ident())
        outcome.append("fla's delta rule cannot train here: made up for the test")

    monkeypatch.setattr(linear_attention, "use_triton", lambda tensor: True)
    monkeypatch.setattr(linear_attention, "has_fla", lambda: True)
    monkeypatch.setattr(linear_attention, "_probe_fla", refuse)
    monkeypatch.setattr(linear_attention, "_REFUSALS", {})
    reference, fast = _pair(tmp_path, checkpointing=True)
    _assert_loss_and_lora_grads_match(reference, fast, tiny_batch())
    linear = [row for row in fused_report(fast).attention if row["module"].endswith("linear_attn")]
    assert linear and all(row["attention"] == "torch-reference" for row in linear)
    assert all(row["reason"] == "fla's delta rule cannot train here: made up for the test"
               for row in linear)  # fmt: skip
    assert len(probes) == 1 and probes[0] != threading.get_ident()


def test_the_fla_probe_reports_what_stops_it():
    from fastlm.models import linear_attention

    outcome = []
    linear_attention._probe_fla(torch.device("cpu"), outcome)  # no fla, or no GPU: either way
    assert len(outcome) == 1 and outcome[0].startswith("fla's delta rule cannot train here: ")


HOPPER_REFUSAL = (
    "fla's delta rule cannot train here: Triton >= 3.4.0 and < 3.7.1 on Hopper GPUs produces "
    "incorrect results for gated chunk_bwd_dqkwg (see #640). Please upgrade Triton to >= 3.7.1 "
    "or install tilelang: `pip install tilelang`"
)  # fla 0.5.2's refusal, as fla_refusal words it


def _refusing(monkeypatch, refusal: str, hopper_failure: str) -> list:
    """linear_attention as on a CUDA machine whose fla refuses with ``refusal`` and whose Hopper
    delta rule probe ends with ``hopper_failure``; returns the list of Hopper probes run."""
    from fastlm.models import linear_attention

    hopper_probes = []

    def hopper_probe(device, outcome):
        hopper_probes.append(device)
        outcome.append(hopper_failure)

    monkeypatch.setattr(linear_attention, "use_triton", lambda tensor: True)
    monkeypatch.setattr(linear_attention, "has_fla", lambda: True)
    monkeypatch.setattr(linear_attention, "_probe_fla", lambda d, outcome: outcome.append(refusal))
    monkeypatch.setattr(linear_attention, "_probe_hopper_rule", hopper_probe)
    monkeypatch.setattr(linear_attention, "_REFUSALS", {})
    monkeypatch.setattr(linear_attention, "_HOPPER_REFUSALS", {})
    return hopper_probes


def test_fla_refusing_its_dqkwg_runs_fla_with_fastlms_backward(monkeypatch):
    """fla 0.5.2's Hopper refusal names the one kernel fastlm replaces: where the Hopper delta
    rule's probe trains, the fla path runs with it, and says so; packed sequences still go to
    transformers' PyTorch functions (transformers would pick fla's refusing rule)."""
    from fastlm.kernels.gated_delta_rule import chunk_gated_delta_rule_hopper
    from fastlm.models import linear_attention as la

    probes = _refusing(monkeypatch, HOPPER_REFUSAL, "")
    x = torch.zeros(1)
    assert la._choose(x, None, 0, {}) == la.LinearPath(la.FLA, la.HOPPER_NOTE)
    assert la._fla_delta_rule(x.device) is chunk_gated_delta_rule_hopper
    packed = la._choose(x, None, 0, {"cu_seq_lens_q": torch.tensor([0, 1])})
    assert packed == la.LinearPath(la.REFERENCE, f"packed sequences; {HOPPER_REFUSAL}")
    assert len(probes) == 1  # once per device


def test_a_failing_hopper_rule_or_another_refusal_keeps_the_pytorch_functions(monkeypatch):
    from fastlm.models import linear_attention as la

    failure = "fastlm's Hopper delta rule cannot train here: made up for the test"
    _refusing(monkeypatch, HOPPER_REFUSAL, failure)
    path = la._choose(torch.zeros(1), None, 0, {})
    assert path == la.LinearPath(la.REFERENCE, f"{HOPPER_REFUSAL}; {failure}")

    probes = _refusing(monkeypatch, "fla's delta rule cannot train here: another bug", "")
    path = la._choose(torch.zeros(1), None, 0, {})
    assert path == la.LinearPath(la.REFERENCE, "fla's delta rule cannot train here: another bug")
    assert probes == []  # a refusal of something else is not the Hopper rule's to cure


def test_the_hopper_rule_probe_reports_what_stops_it():
    from fastlm.models import linear_attention

    outcome = []
    linear_attention._probe_hopper_rule(torch.device("cpu"), outcome)  # no fla, or no GPU
    assert len(outcome) == 1
    assert outcome[0].startswith("fastlm's Hopper delta rule cannot train here: ")


def test_fla_gets_one_int64_bounds_tensor_per_batch():
    """Every linear-attention layer of a forward hands fla the same int64 bounds tensor (fla
    keeps its chunk indices for that object only); content written in place is cast anew."""
    from fastlm.models.linear_attention import _long_bounds

    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    first = _long_bounds(cu)
    assert first.dtype == torch.long and first.tolist() == [0, 3, 7]
    assert _long_bounds(cu) is first
    cu[2] = 8
    assert _long_bounds(cu).tolist() == [0, 3, 8]
    already = torch.tensor([0, 5])
    assert _long_bounds(already) is already
