"""GeGLU: Triton launchers (interpreter on CPU) vs the reference and float64 autograd."""

import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels.geglu import (
    geglu,
    geglu_backward,
    geglu_backward_reference,
    geglu_backward_triton,
    geglu_forward,
    geglu_forward_triton,
    geglu_reference,
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
    """float64 autograd of the unfused gelu_tanh(e) * g."""
    e64 = e.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    h = F.gelu(e64, approximate="tanh") * g64
    de, dg = torch.autograd.grad(h, (e64, g64), dh.double())
    return h.detach(), de, dg


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_triton_matches_reference(shape, device):
    e, g, _ = _inputs(shape, device)
    h = geglu_forward_triton(e, g)
    assert h.shape == e.shape and h.dtype == e.dtype
    torch.testing.assert_close(h, geglu_reference(e, g), **TOL)
    torch.testing.assert_close(h.double(), _truth(e, g, e)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_triton_matches_reference_and_autograd(shape, device):
    e, g, dh = _inputs(shape, device)
    h, de, dg = geglu_backward_triton(dh, e, g)
    h_ref, de_ref, dg_ref = geglu_backward_reference(dh, e, g)
    for got, want in ((h, h_ref), (de, de_ref), (dg, dg_ref)):
        torch.testing.assert_close(got, want, **TOL)
    for got, want in zip((h, de, dg), _truth(e, g, dh)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backward", [geglu_backward_triton, geglu_backward_reference])
def test_backward_inplace_writes_into_inputs(backward, device):
    e, g, dh = _inputs((5, 129), device)
    want = geglu_backward_reference(dh, e, g)
    ptrs = (dh.data_ptr(), e.data_ptr(), g.data_ptr())
    out = backward(dh, e, g, inplace=True)
    assert tuple(t.data_ptr() for t in out) == ptrs
    for got, w in zip(out, want):
        torch.testing.assert_close(got, w, **TOL)


def test_backward_inplace_rejects_non_contiguous(device):
    e, g, dh = _inputs((6, 40), device)
    with pytest.raises(ValueError):
        geglu_backward_triton(dh.t(), e.t(), g.t(), inplace=True)


def test_shape_mismatch_raises(device):
    e, g, _ = _inputs((3, 37), device)
    with pytest.raises(ValueError):
        geglu_forward_triton(e, g[:, :36])


def test_non_contiguous_inputs(device):
    e, g, dh = _inputs((37, 6), device)
    h = geglu_forward_triton(e.t(), g.t())
    torch.testing.assert_close(h, geglu_reference(e.t(), g.t()), **TOL)
    out = geglu_backward_triton(dh.t(), e.t(), g.t())
    for got, want in zip(out, geglu_backward_reference(dh.t(), e.t(), g.t())):
        torch.testing.assert_close(got, want, **TOL)


def test_public_op_dispatch_and_autograd(device):
    e, g, dh = _inputs((2, 3, 41), device)
    torch.testing.assert_close(geglu_forward(e, g), geglu_reference(e, g), **TOL)
    for got, want in zip(geglu_backward(dh, e, g), geglu_backward_reference(dh, e, g)):
        torch.testing.assert_close(got, want, **TOL)
    e.requires_grad_()
    g.requires_grad_()
    h = geglu(e, g)
    de, dg = torch.autograd.grad(h, (e, g), dh)
    h64, de64, dg64 = _truth(e, g, dh)
    torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(de.double(), de64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dg.double(), dg64, atol=1e-5, rtol=1e-5)
    # the public op must not modify its inputs
    torch.testing.assert_close(geglu_reference(e.detach(), g.detach()), h.detach(), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels tested on GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cuda(dtype):
    e, g, dh = _inputs((64, 1000), "cuda", dtype)
    h = geglu_forward_triton(e, g)
    assert h.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.double(), _truth(e, g, dh)[0], **tol)
    for got, want in zip(geglu_backward_triton(dh, e, g), _truth(e, g, dh)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


def test_reference_matches_torch_gelu_tanh(device):
    e, g, _ = _inputs((5, 129), device)
    want = F.gelu(e, approximate="tanh") * g
    torch.testing.assert_close(geglu_reference(e, g), want, **TOL)


def test_large_magnitudes_are_finite_and_exact(device):
    """tanh from exp must saturate cleanly: no inf/nan, matches torch for |x| up to 1e4."""
    vals = [-1e4, -300.0, -50.0, -10.0, -5.0, -1e-4, 0.0, 1e-4, 5.0, 10.0, 50.0, 300.0, 1e4]
    e = torch.tensor(vals, device=device).repeat(3)
    g = torch.linspace(-2, 2, e.numel(), device=device)
    dh = torch.linspace(1, 3, e.numel(), device=device)
    h = geglu_forward_triton(e, g)
    out = geglu_backward_triton(dh, e, g)
    for t in (h, *out):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(h, F.gelu(e, approximate="tanh") * g, **TOL)
    for got, want in zip(out, _truth(e, g, dh)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
