"""gpt-oss pieces the shared MoE comparisons (``test_moe.py``, its ``gpt_oss`` cases) do not
isolate: attention sinks keep every call off fastlm's flash kernel (even where the kernel could
run), the clamped SwiGLU and the router's scoring are transformers' own, and an experts module
stored otherwise than the spec says runs transformers' code with the reason, not misread.

The tiny model is ``tiny_models``'s gpt_oss (non-zero sinks and biases, limit crossed).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import relative_error, save_tiny_model, tiny_batch, tiny_config
from transformers import AutoModelForCausalLM

from fastlm import FastModel
from fastlm.kernels import flash_attention as fa
from fastlm.models import attention, fused_report
from fastlm.models.gpt_oss import GPT_OSS
from fastlm.models.moe import clamped_swiglu, router_forward

pytest.importorskip("transformers.models.gpt_oss")
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4
SINKS = ("eager", "attention sinks (s_aux): the kernel has none")
LORA = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    init_lora_weights=False,
)


@pytest.fixture
def kernel_on_cpu(monkeypatch) -> list:
    """fastlm's flash kernel allowed on CPU tensors (the interpreter), as on a GPU; returns the
    list each launch appends to."""
    monkeypatch.setattr(attention, "use_triton", lambda t: True)
    monkeypatch.setattr(fa, "use_triton", lambda t: True)
    calls = []
    for name in ("flash_attention_triton", "flash_attention_varlen_triton"):
        launch = getattr(fa, name)

        def recorded(*args, _launch=launch, _name=name, **kwargs):
            calls.append(_name)
            return _launch(*args, **kwargs)

        monkeypatch.setattr(fa, name, recorded)
    return calls


def _pair(tmp_path):
    """(transformers + PEFT with eager experts, fastlm), same weights and LoRA (B != 0)."""
    path = save_tiny_model("gpt_oss", tmp_path / "gpt_oss")
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, experts_implementation="eager"
    )
    reference = get_peft_model(reference, LoraConfig(**LORA))
    fast, _ = FastModel.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    fast = FastModel.get_peft_model(fast, use_gradient_checkpointing=False, **LORA)
    fast.load_state_dict(reference.state_dict())
    return reference.train(), fast.train()


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _assert_match(reference, fast, batch) -> None:
    expected, expected_grads = _loss_and_grads(reference, batch)
    actual, actual_grads = _loss_and_grads(fast, batch)
    assert abs(actual - expected) <= RTOL * expected
    assert expected_grads.keys() == actual_grads.keys() and len(expected_grads) == 36
    for name, grad in expected_grads.items():
        assert relative_error(actual_grads[name], grad) <= RTOL, name


def test_sinks_keep_every_call_off_the_flash_kernel(tmp_path, kernel_on_cpu):
    """With the kernel allowed (the padded batch is padding on the causal and window patterns,
    which a sink-less model would run as the kernel's padded launch), each layer runs
    transformers' eager attention, which reads the sinks, and says why: the loss and every LoRA
    gradient are HF's, and no kernel was launched. The sinks matter on this batch."""
    reference, fast = _pair(tmp_path)
    layers = [m for m in fast.modules() if type(m).__name__ == "GptOssAttention"]
    assert len(layers) == 3 and all(layer.sinks.abs().min() > 1e-2 for layer in layers)
    expected = {(*SINKS, False)}
    assert {(r["attention"], r["reason"].removeprefix("not called yet; "), r["called"])
            for r in fused_report(fast).attention} == expected  # fmt: skip
    batch = tiny_batch()
    _assert_match(reference, fast, batch)
    assert kernel_on_cpu == []
    rows = fused_report(fast).attention
    assert {(r["attention"], r["reason"], r["called"]) for r in rows} == {(*SINKS, True)}
    with torch.no_grad():
        with_sinks = reference(**batch).loss
        for layer in layers:
            layer.sinks.fill_(-1e4)  # no sink: softmax over the keys alone
        without_sinks = fast(**batch).loss
    assert abs(with_sinks - without_sinks) > 1e-3


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
