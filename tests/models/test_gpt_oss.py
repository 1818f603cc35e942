"""gpt-oss pieces the shared MoE comparisons (``test_moe.py``, its ``gpt_oss`` cases) do not
isolate: attention with sinks runs fastlm's flash kernel (its fixed-length and padded launches,
the sinks trainable) and matches transformers' eager attention, the clamped SwiGLU and the
router's scoring are transformers' own, and an experts module stored otherwise than the spec
says runs transformers' code with the reason, not misread.

The tiny model is ``tiny_models``'s gpt_oss (non-zero sinks and biases, limit crossed).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import on_device, relative_error, save_tiny_model, tiny_batch, tiny_config
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.models import attention, fused_report
from fastlm.models.gpt_oss import GPT_OSS
from fastlm.models.moe import clamped_swiglu, router_forward

pytest.importorskip("transformers.models.gpt_oss")
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    init_lora_weights=False,
)


def _pair(tmp_path, device="cpu"):
    """(transformers + PEFT with eager experts, fastlm), same weights and LoRA (B != 0), both on
    ``device``."""
    path = save_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager", device_map=device
    )
    reference = get_peft_model(reference, LoraConfig(**LORA))
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map=device)
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=False, **LORA)
    fast.load_state_dict(reference.state_dict())
    return reference.train(), fast.train()


def _train_sinks(*models) -> None:
    """Make every attention layer's sinks trainable (PEFT freezes them with the base weights)."""
    for model in models:
        for name, param in model.named_parameters():
            if name.endswith("self_attn.sinks"):
                param.requires_grad_(True)


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _assert_match(reference, fast, batch, n_grads: int = 36) -> dict:
    """Loss and every gradient as HF's (relative error <= RTOL); returns the max errors."""
    expected, expected_grads = _loss_and_grads(reference, batch)
    actual, actual_grads = _loss_and_grads(fast, batch)
    errors = {"loss": abs(actual - expected) / expected}
    assert errors["loss"] <= RTOL
    assert expected_grads.keys() == actual_grads.keys() and len(expected_grads) == n_grads
    for name, grad in expected_grads.items():
        errors[name] = relative_error(actual_grads[name], grad)
        assert errors[name] <= RTOL, name
    return errors


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padded"])
def test_attention_with_sinks_runs_the_flash_kernel(tmp_path, kernel_on_cpu, padded, device):
    """With the kernel forced (on the GPU, or in the interpreter without one), every layer
    (sliding window 4, full, sliding) runs it with the sinks: the fixed-length launch, or the
    padded launch for the padding on the causal and window patterns. The loss, every LoRA
    gradient and the sinks' gradients (trainable in both models) are HF eager's; the report says
    which launch ran. The sinks matter on this batch: without them the loss differs."""
    reference, fast = _pair(tmp_path, device)
    _train_sinks(reference, fast)
    layers = [m for m in fast.modules() if type(m).__name__ == "GptOssAttention"]
    assert len(layers) == 3 and all(layer.sinks.abs().min() > 1e-2 for layer in layers)
    rows = fused_report(fast).attention
    assert {(r["attention"], r["reason"], r["called"]) for r in rows} == {
        (attention.FLASH, "not called yet", False)
    }
    batch = tiny_batch()
    if not padded:
        batch["attention_mask"].fill_(1)
        batch["labels"] = batch["input_ids"]
    batch = on_device(batch, device)
    errors = _assert_match(reference, fast, batch, n_grads=36 + len(layers))
    assert {name for name in errors if name.endswith("sinks")} == {
        f"base_model.model.model.layers.{i}.self_attn.sinks" for i in range(len(layers))
    }
    launch = "varlen" if padded else 1
    assert kernel_on_cpu == [launch] * len(layers)
    path = (attention.FLASH_VARLEN, attention.PADDED) if padded else (attention.FLASH, "")
    rows = fused_report(fast).attention
    assert {(r["attention"], r["reason"], r["called"]) for r in rows} == {(*path, True)}
    with torch.no_grad():
        with_sinks = fast(**batch).loss
        for layer in layers:
            layer.sinks.fill_(-1e4)  # no sink: softmax over the keys alone
        without_sinks = fast(**batch).loss
    assert abs(with_sinks - without_sinks) > 1e-3


def test_attention_with_sinks_on_the_cpu_runs_eager_and_says_why(tmp_path):
    """Without the kernel (CPU tensors), transformers' eager attention reads the sinks itself:
    the loss and gradients are HF's, and the reason is the device, not the sinks."""
    reference, fast = _pair(tmp_path)
    _train_sinks(reference, fast)
    _assert_match(reference, fast, tiny_batch(), n_grads=39)
    rows = fused_report(fast).attention
    reason = "cpu tensors (the kernel runs on CUDA)"
    assert {(r["attention"], r["reason"], r["called"]) for r in rows} == {("eager", reason, True)}


def test_experts_stored_otherwise_than_the_spec_says_run_transformers_and_say_why(tmp_path):
    """An experts module whose layout flag disagrees with the spec (here: gate/up said to be
    concatenated) is not read as the spec says: it runs transformers' (and PEFT's) forward, the
    report says why, and the loss is still HF's."""
    reference, fast = _pair(tmp_path)
    experts = fast.base_model.model.model.layers[1].mlp.experts.get_base_layer()
    experts.is_concatenated = True  # transformers' own eager forward interleaves regardless
    rows = [r for r in fused_report(fast) if "layers.1.mlp.experts" in r["module"]]
    assert len(rows) == 2 and not any(r["fused"] for r in rows)
    assert {r["reason"] for r in rows} == {"gate/up concatenated, unlike the spec"}
    _assert_match(reference, fast, tiny_batch())


def test_clamped_swiglu_is_transformers_gate_bit_for_bit():
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    experts = GptOssExperts(tiny_config("gpt_oss"))  # alpha 1.702, limit 1.0
    generator = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(33, 48, generator=generator) * 1.5).requires_grad_()
    assert ((gate_up > experts.limit).any() and (gate_up < -experts.limit).any()
            and (gate_up.abs() < experts.limit).any())  # fmt: skip
    expected = experts._apply_gate(gate_up)
    actual = clamped_swiglu(gate_up[:, ::2], gate_up[:, 1::2], experts.alpha, experts.limit)
    assert torch.equal(actual, expected)
    dy = torch.randn(expected.shape, generator=generator)
    grads = [torch.autograd.grad(y, gate_up, dy)[0] for y in (expected, actual)]
    assert torch.equal(grads[0], grads[1])


def test_router_takes_the_top_logits_then_softmaxes_them():
    """fastlm's router forward from the spec ("topk_softmax", with the router's bias) returns
    transformers' (logits, scores, experts), scores summing to 1 without renormalising."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    router = GptOssTopKRouter(tiny_config("gpt_oss"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.normal_(generator=generator)
        router.bias.normal_(generator=generator)
    x = torch.randn(17, 40, generator=generator)
    expected = router(x)
    actual = router_forward(router, x, moe=GPT_OSS.moe)
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)
