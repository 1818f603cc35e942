"""RMSNorm: the Triton kernels (interpreter on CPU) against the fp64 reference and HF's norms."""

import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from fastlm.kernels.rms_norm import rms_norm, rms_norm_reference, rms_norm_triton

EPS = 1e-6
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel against an fp64 ground truth


def _inputs(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3.0
    w = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    return x.to(device, dtype), w.to(device, dtype), dy.to(device, dtype)


def _fwd_bwd(fn, x, w, dy, **kw):
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = fn(x, w, EPS, **kw)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    return y, dx, dw


def _truth(x, w, dy, offset):
    return _fwd_bwd(rms_norm_reference, x.double(), w.double(), dy.double(), offset=offset)


@pytest.mark.parametrize("shape", [(3, 5, 72), (2, 3, 4, 48)])  # hidden states, q/k-norm heads
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("max_block", [8192, 32])  # 32: the chunked path (72 = 2 full + 1 partial)
def test_triton_matches_reference(device, shape, offset, max_block):
    x, w, dy = _inputs(shape, device)
    y, dx, dw = _fwd_bwd(rms_norm_triton, x, w, dy, offset=offset, _max_block=max_block)
    y_ref, dx_ref, dw_ref = _truth(x, w, dy, offset)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(dx.double(), dx_ref, **TOL)
    torch.testing.assert_close(dw.double(), dw_ref, **TOL)


def test_more_rows_than_programs(device):
    # 37 rows: on CPU each backward program covers several rows (run of 5, last one shorter).
    x, w, dy = _inputs((37, 24), device, seed=1)
    y, dx, dw = _fwd_bwd(rms_norm_triton, x, w, dy, offset=1.0)
    y_ref, dx_ref, dw_ref = _truth(x, w, dy, 1.0)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(dx.double(), dx_ref, **TOL)
    torch.testing.assert_close(dw.double(), dw_ref, **TOL)


@pytest.mark.parametrize("kind", ["transposed", "row_strided"])
def test_non_contiguous_input(device, kind):
    x, w, dy = _inputs((3, 5, 40), device, seed=2)
    if kind == "transposed":  # last dim not unit-stride: copied
        x_nc = x.transpose(0, 2).contiguous().transpose(0, 2)
    else:  # rows of a wider buffer, as a slice of a fused projection
        x_nc = torch.cat([x, torch.randn_like(x)], dim=-1)[..., :40]
    assert not x_nc.is_contiguous() and torch.equal(x_nc, x)
    y, dx, dw = _fwd_bwd(rms_norm_triton, x_nc, w, dy)
    y_ref, dx_ref, dw_ref = _truth(x, w, dy, 0.0)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(dx.double(), dx_ref, **TOL)
    torch.testing.assert_close(dw.double(), dw_ref, **TOL)


def test_frozen_weight_gives_only_dx(device):
    x, w, dy = _inputs((3, 5, 72), device, seed=3)
    x = x.requires_grad_()
    y = rms_norm_triton(x, w, EPS, 1.0)  # w.requires_grad is False
    y.backward(dy)
    _, dx_ref, _ = _truth(x.detach(), w, dy, 1.0)
    assert w.grad is None
    torch.testing.assert_close(x.grad.double(), dx_ref, **TOL)


def test_empty_rows(device):
    x = torch.zeros(0, 72, device=device, requires_grad=True)
    w = torch.ones(72, device=device, requires_grad=True)
    y = rms_norm_triton(x, w, EPS)
    y.sum().backward()
    assert y.shape == (0, 72) and x.grad.shape == (0, 72)
    assert torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("hf_cls, offset", [(LlamaRMSNorm, 0.0), (Gemma3RMSNorm, 1.0)])
def test_matches_transformers_norm(device, hf_cls, offset):
    x, w, dy = _inputs((3, 5, 72), device, seed=4)
    norm = hf_cls(72, eps=EPS).to(device)
    with torch.no_grad():
        norm.weight.copy_(w)
    xh = x.clone().requires_grad_()
    y_hf = norm(xh)
    y_hf.backward(dy)
    for fn in (rms_norm_triton, rms_norm):
        y, dx, dw = _fwd_bwd(fn, x, w, dy, offset=offset)
        torch.testing.assert_close(y, y_hf, **TOL)
        torch.testing.assert_close(dx, xh.grad, **TOL)
        torch.testing.assert_close(dw, norm.weight.grad, **TOL)


def test_public_dispatch(device):
    x, w, dy = _inputs((3, 5, 72), device, seed=5)
    y, dx, dw = _fwd_bwd(rms_norm, x, w, dy, offset=1.0)
    probe = rms_norm(x.detach().requires_grad_(), w, EPS)
    uses_kernel = type(probe.grad_fn).__name__ == "_RMSNormFunctionBackward"
    assert uses_kernel == (device == "cuda")
    y_ref, dx_ref, dw_ref = _truth(x, w, dy, 1.0)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(dx.double(), dx_ref, **TOL)
    torch.testing.assert_close(dw.double(), dw_ref, **TOL)


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_bf16_on_gpu(device, offset):
    if device != "cuda":
        pytest.skip("bf16 is checked on the GPU only")
    x, w, dy = _inputs((4, 33, 4096), device, dtype=torch.bfloat16, seed=6)
    y, dx, dw = _fwd_bwd(rms_norm_triton, x, w, dy, offset=offset)
    y_ref, dx_ref, dw_ref = _truth(x, w, dy, offset)
    assert y.dtype == dx.dtype == dw.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), y_ref, atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(dx.double(), dx_ref, atol=5e-2, rtol=2e-2)
    # dw sums 132 rows: compare relative to its scale.
    torch.testing.assert_close(
        dw.double(), dw_ref, atol=2e-2 * dw_ref.abs().max().item(), rtol=2e-2
    )


def test_large_hidden_on_gpu(device):
    if device != "cuda":
        pytest.skip("too many elements for the interpreter")
    x, w, dy = _inputs((7, 3, 12000), device, seed=7)  # > 8192: the chunked path
    y, dx, dw = _fwd_bwd(rms_norm_triton, x, w, dy, offset=0.0)
    y_ref, dx_ref, dw_ref = _truth(x, w, dy, 0.0)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    torch.testing.assert_close(dx.double(), dx_ref, **TOL)
    torch.testing.assert_close(dw.double(), dw_ref, atol=1e-4, rtol=1e-5)
