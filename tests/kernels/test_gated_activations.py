"""SwiGLU and GeGLU: Triton launchers (interpreter on CPU) vs the reference and float64 autograd.

Both gated activations share their tests; each test runs once per op.
"""

import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels import geglu as geglu_module
from fastlm.kernels import swiglu as swiglu_module

ACTIVATIONS = {"swiglu": F.silu, "geglu": lambda x: F.gelu(x, approximate="tanh")}
MODULES = {"swiglu": swiglu_module, "geglu": geglu_module}


class _Op:
    """One gated activation: its functions by suffix, e.g. ``op.forward_triton``."""

    def __init__(self, name):
        self.name, self.activation = name, ACTIVATIONS[name]
        module = MODULES[name]
        for suffix in (
            "",
            "_backward",
            "_backward_reference",
            "_backward_triton",
            "_forward",
            "_forward_triton",
            "_reference",
        ):
            setattr(self, suffix.lstrip("_") or "op", getattr(module, name + suffix))


@pytest.fixture(params=sorted(MODULES))
def op(request):
    return _Op(request.param)


SHAPES = [(3, 37), (5, 129), (2, 3, 41)]
TOL = dict(atol=1e-6, rtol=1e-6)


def _inputs(shape, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    e = (torch.randn(shape, generator=gen) * 3).to(device, dtype)
    g = torch.randn(shape, generator=gen).to(device, dtype)
    dh = torch.randn(shape, generator=gen).to(device, dtype)
    return e, g, dh


def _truth(op, e, g, dh):
    """float64 autograd of the unfused act(e) * g."""
    e64 = e.detach().double().requires_grad_()
    g64 = g.detach().double().requires_grad_()
    h = op.activation(e64) * g64
    de, dg = torch.autograd.grad(h, (e64, g64), dh.double())
    return h.detach(), de, dg


@pytest.mark.parametrize("shape", SHAPES)
def test_forward_triton_matches_reference(op, shape, device):
    e, g, _ = _inputs(shape, device)
    h = op.forward_triton(e, g)
    assert h.shape == e.shape and h.dtype == e.dtype
    torch.testing.assert_close(h, op.reference(e, g), **TOL)
    torch.testing.assert_close(h.double(), _truth(op, e, g, e)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_triton_matches_reference_and_autograd(op, shape, device):
    e, g, dh = _inputs(shape, device)
    h, de, dg = op.backward_triton(dh, e, g)
    h_ref, de_ref, dg_ref = op.backward_reference(dh, e, g)
    for got, want in ((h, h_ref), (de, de_ref), (dg, dg_ref)):
        torch.testing.assert_close(got, want, **TOL)
    for got, want in zip((h, de, dg), _truth(op, e, g, dh)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backward", ["backward_triton", "backward_reference"])
def test_backward_inplace_writes_into_inputs(op, backward, device):
    backward = getattr(op, backward)
    e, g, dh = _inputs((5, 129), device)
    want = op.backward_reference(dh, e, g)
    ptrs = (dh.data_ptr(), e.data_ptr(), g.data_ptr())
    out = backward(dh, e, g, inplace=True)
    assert tuple(t.data_ptr() for t in out) == ptrs
    for got, w in zip(out, want):
        torch.testing.assert_close(got, w, **TOL)


def test_backward_inplace_rejects_non_contiguous(op, device):
    e, g, dh = _inputs((6, 40), device)
    with pytest.raises(ValueError):
        op.backward_triton(dh.t(), e.t(), g.t(), inplace=True)


def test_shape_mismatch_raises(op, device):
    e, g, _ = _inputs((3, 37), device)
    with pytest.raises(ValueError):
        op.forward_triton(e, g[:, :36])


def test_non_contiguous_inputs(op, device):
    e, g, dh = _inputs((37, 6), device)
    h = op.forward_triton(e.t(), g.t())
    torch.testing.assert_close(h, op.reference(e.t(), g.t()), **TOL)
    out = op.backward_triton(dh.t(), e.t(), g.t())
    for got, want in zip(out, op.backward_reference(dh.t(), e.t(), g.t())):
        torch.testing.assert_close(got, want, **TOL)


def test_public_op_dispatch_and_autograd(op, device):
    e, g, dh = _inputs((2, 3, 41), device)
    torch.testing.assert_close(op.forward(e, g), op.reference(e, g), **TOL)
    for got, want in zip(op.backward(dh, e, g), op.backward_reference(dh, e, g)):
        torch.testing.assert_close(got, want, **TOL)
    e.requires_grad_()
    g.requires_grad_()
    h = op.op(e, g)
    de, dg = torch.autograd.grad(h, (e, g), dh)
    h64, de64, dg64 = _truth(op, e, g, dh)
    torch.testing.assert_close(h.double(), h64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(de.double(), de64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dg.double(), dg64, atol=1e-5, rtol=1e-5)
    # the public op must not modify its inputs
    torch.testing.assert_close(op.reference(e.detach(), g.detach()), h.detach(), **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels tested on GPU only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_cuda(op, dtype):
    e, g, dh = _inputs((64, 1000), "cuda", dtype)
    h = op.forward_triton(e, g)
    assert h.dtype == dtype
    tol = dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h.double(), _truth(op, e, g, dh)[0], **tol)
    for got, want in zip(op.backward_triton(dh, e, g), _truth(op, e, g, dh)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)


def test_reference_matches_torch(op, device):
    e, g, _ = _inputs((5, 129), device)
    want = op.activation(e) * g
    torch.testing.assert_close(op.reference(e, g), want, **TOL)


def test_large_magnitudes_are_finite_and_exact(op, device):
    """sigmoid / tanh-from-exp saturate cleanly: no inf/nan, matches torch for |x| up to 1e4."""
    vals = [-1e4, -300.0, -50.0, -10.0, -5.0, -1e-4, 0.0, 1e-4, 5.0, 10.0, 50.0, 300.0, 1e4]
    e = torch.tensor(vals, device=device).repeat(3)
    g = torch.linspace(-2, 2, e.numel(), device=device)
    dh = torch.linspace(1, 3, e.numel(), device=device)
    h = op.forward_triton(e, g)
    out = op.backward_triton(dh, e, g)
    for t in (h, *out):
        assert torch.isfinite(t).all()
    torch.testing.assert_close(h, op.activation(e) * g, **TOL)
    for got, want in zip(out, _truth(op, e, g, dh)):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
