"""Where transformers would run eager attention (Gemma 2's soft-capping), fastlm's patch routes
it through the flash-attention kernel: same loss and LoRA gradients as HF eager, and the eager
fallback (padding, CPU) computes exactly HF's eager attention."""

from __future__ import annotations

import pytest
import torch
from test_architectures import RTOL, _loss_and_lora_grads, _pair
from tiny_models import relative_error, tiny_batch

import fastlm.models.attention as attention


def _eager_pair(tmp_path, device, dtype=torch.float32):
    reference, fast = _pair(tmp_path, "gemma2", False, device=device, dtype=dtype)
    for model in (reference, fast):
        model.set_attn_implementation("eager")
    return reference, fast


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    original = attention.flash_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(attention, "flash_attention", counting)
    return calls


@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padded"])
def test_gemma2_eager_attention_matches_hf(tmp_path, device, monkeypatch, padded):
    reference, fast = _eager_pair(tmp_path, device)
    batch = tiny_batch()
    if not padded:
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    calls = _count_kernel_calls(monkeypatch)
    expected, expected_grads = _loss_and_lora_grads(reference, batch)
    assert not calls  # HF's own forward: no kernel
    actual, actual_grads = _loss_and_lora_grads(fast, batch)
    # The kernel runs on CUDA for unpadded batches; padding (and the CPU) use eager.
    assert bool(calls) == (device == "cuda" and not padded)
    assert abs(actual.loss.item() - expected.loss.item()) <= RTOL * abs(expected.loss.item())
    for name, grad in expected_grads.items():
        assert relative_error(actual_grads[name], grad) <= RTOL, name
