"""lora_linear: the Function vs plain autograd of F.linear + the LoRA term in float64."""

import pytest
import torch
from lora_reference import SCALING, assert_grads_close, grad_leaves, linear, lora_proj, rel, to64

from fastlm.autograd import LoRAWeights, lora_linear

IN_F, OUT_F = 24, 40
X_SHAPE = (2, 7, IN_F)


def _make(device, seed=0, adapter=True, bias=False, train_base=False):
    gen = torch.Generator().manual_seed(seed)
    # A and B are drawn even without an adapter, so that x and d_out stay the same draws
    proj = lora_proj(OUT_F, IN_F, gen, device, bias=bias, train_base=train_base)
    if not adapter:
        proj = LoRAWeights(proj.weight, proj.bias, None, None, SCALING)
    x = torch.randn(*X_SHAPE, generator=gen).to(device).requires_grad_()
    d_out = torch.randn(*X_SHAPE[:-1], OUT_F, generator=gen).to(device)
    return x, proj, d_out


def _check(x, proj, d_out, tol=1e-5):
    out = lora_linear(x, proj)
    x64, (proj64,) = to64(x, [proj])
    out64 = linear(x64, proj64)
    assert out.shape == out64.shape and rel(out, out64) <= tol
    leaves = grad_leaves(x, [proj])
    grads = torch.autograd.grad(out, leaves, d_out.to(out.dtype))
    grads64 = torch.autograd.grad(out64, grad_leaves(x64, [proj64]), d_out.double())
    assert_grads_close(grads, grads64, leaves, tol)
    return out


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(bias=True),
        dict(adapter=False, train_base=True),
        dict(bias=True, train_base=True),
    ],
    ids=["lora", "lora-bias", "full-ft", "full-ft-lora-bias"],
)
def test_matches_unfused(kw, device):
    x, proj, d_out = _make(device, **kw)
    _check(x, proj, d_out)


def test_input_without_grad_and_frozen_b(device):
    x, proj, d_out = _make(device, seed=1)
    x.requires_grad_(False)
    proj.lora_B.requires_grad_(False)
    _check(x, proj, d_out)
    lora_linear(x, proj).backward(d_out)
    assert proj.lora_B.grad is None and proj.lora_A.grad is not None


def test_autocast_bf16_base_fp32_adapters(device):
    x, proj, d_out = _make(device, seed=2)
    proj = proj._replace(weight=proj.weight.detach().bfloat16())
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        out = _check(x, proj, d_out, tol=3e-2)
    assert out.dtype == torch.bfloat16


def test_fp32_input_with_bf16_params_returns_param_dtype_grads(device):
    # without autocast the compute dtype is x's (fp32); grads still come back in bf16
    x, proj, d_out = _make(device, seed=3, bias=True, train_base=True)
    proj = LoRAWeights(*(t.detach().bfloat16().requires_grad_() for t in proj[:4]), proj.scaling)
    _check(x, proj, d_out, tol=1e-2)
