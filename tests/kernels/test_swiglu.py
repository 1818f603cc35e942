"""SwiGLU: Triton launchers (interpreter on CPU) vs the reference and float64 autograd."""

import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels.swiglu import (
    swiglu,
    swiglu_backward,
    swiglu_backward_reference,
    swiglu_backward_triton,
    swiglu_forward,
    swiglu_forward_triton,
    swiglu_reference,
)

SHAPES = [(3, 37), (5, 129), (2, 3, 41)]
TOL = dict(atol=1e-6, rtol=1e-6)


def _inputs(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    g = torch.randn(shape, generator=gen).to(device, dtype)
    dh = torch.randn(shape, generator=gen).to(device, dtype)
    return e, g, dh


def _truth(e, g, dh):
    """float64 autograd of the unfused silu(e) * g."""
    e64 = e.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    h = F.silu(e64) * g64
    de, dg = torch.autograd.grad(h, (e64, g64), dh.double())
    return h.detach(), de, dg


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_triton_matches_reference(shape, device):
    e, g, _ = _inputs(shape, device)
    h = swiglu_forward_triton(e, g)
    assert h.shape == e.shape and h.dtype == e.dtype
    torch.testing.assert_close(h, swiglu_reference(e, g), **TOL)
    torch.testing.assert_close(h.double(), _truth(e, g, e)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_triton_matches_reference_and_autograd(shape, device):
    e, g, dh = _inputs(shape, device)
    h, de, dg = swiglu_backward_triton(dh, e, g)
    h_ref, de_ref, dg_ref = swiglu_backward_reference(dh, e, g)
    for got, want in ((h, h_ref), (de, de_ref), (dg, dg_ref)):
        torch.testing.assert_close(got, want, **TOL)
    for got, want in zip((h, de, dg), _truth(e, g, dh)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backward", [swiglu_backward_triton, swiglu_backward_reference])
def test_backward_inplace_writes_into_inputs(backward, device):
    e, g, dh = _inputs((5, 129), device)
    want = swiglu_backward_reference(dh, e, g)
    ptrs = (dh.data_ptr(), e.data_ptr(), g.data_ptr())
    out = backward(dh, e, g, inplace=True)
    assert tuple(t.data_ptr() for t in out) == ptrs
    for got, w in zip(out, want):
        torch.testing.assert_close(got, w, **TOL)


def test_backward_inplace_rejects_non_contiguous(device):
    e, g, dh = _inputs((6, 40), device)
    with pytest.raises(ValueError):
        swiglu_backward_triton(dh.t(), e.t(), g.t(), inplace=True)


def test_shape_mismatch_raises(device):
    e, g, _ = _inputs((3, 37), device)
    with pytest.raises(ValueError):
        swiglu_forward_triton(e, g[:, :36])


def test_non_contiguous_inputs(device):
    e, g, dh = _inputs((37, 6), device)
    h = swiglu_forward_triton(e.t(), g.t())
    torch.testing.assert_close(h, swiglu_reference(e.t(), g.t()), **TOL)
    out = swiglu_backward_triton(dh.t(), e.t(), g.t())
    for got, want in zip(out, swiglu_backward_reference(dh.t(), e.t(), g.t())):
        torch.testing.assert_close(got, want, **TOL)


def test_public_op_dispatch_and_autograd(device):
    e, g, dh = _inputs((2, 3, 41), device)
    torch.testing.assert_close(swiglu_forward(e, g), swiglu_reference(e, g), **TOL)
    for got, want in zip(swiglu_backward(dh, e, g), swiglu_backward_reference(dh, e, g)):
        torch.testing.assert_close(got, want, **TOL)
    e.requires_grad_()
    g.requires_grad_()
    h = swiglu(e, g)
    de, dg = torch.autograd.grad(h, (e, g), dh)
    h64, de64, dg64 = _truth(e, g, dh)
    torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(de.double(), de64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dg.double(), dg64, atol=1e-5, rtol=1e-5)
    # the public op must not modify its inputs
    torch.testing.assert_close(swiglu_reference(e.detach(), g.detach()), h.detach(), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels tested on GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cuda(dtype):
    e, g, dh = _inputs((64, 1000), "cuda", dtype)
    h = swiglu_forward_triton(e, g)
    assert h.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.double(), _truth(e, g, dh)[0], **tol)
    for got, want in zip(swiglu_backward_triton(dh, e, g), _truth(e, g, dh)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
