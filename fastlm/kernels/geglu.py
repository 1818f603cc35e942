"""GeGLU gate (Gemma): h = gelu_tanh(e) * g, elementwise over tensors of any shape.

gelu_tanh(x) = 0.5 * x * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 * x^3)
  (HF's ``gelu_pytorch_tanh`` = ``torch.nn.functional.gelu(x, approximate="tanh")``)
gelu_tanh'(x) = 0.5 * (1 + tanh(u))
                + 0.5 * x * (1 - tanh(u)^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
Backward, given dh:  dg = dh * gelu_tanh(e),  de = dh * g * gelu_tanh'(e).
The backward also returns h, recomputed (the LoRA MLP does not keep it from the forward).

tanh is built from tl.exp (libdevice tanh is unavailable in the interpreter) as
tanh(u) = sign(u) * (1 - t) / (1 + t), t = exp(-2|u|) in (0, 1]: it never overflows, and for large
|u| it gives exactly +-1 and 1 - tanh^2 = 4t / (1 + t)^2 = 0.

Kernels compute in fp32 and store in the input dtype. ``geglu_backward(..., inplace=True)`` writes
h, de, dg into the buffers of dh, e, g (safe elementwise; for the LoRA MLP, which owns them).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastlm.kernels._dispatch import use_triton
from fastlm.kernels._gated import (
    GatedActivation,
    check_operands,
    finish_reference,
    launch_backward,
    launch_forward,
)

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_C = 0.044715


@triton.jit
def _gelu_tanh_parts(x):
    # Returns (1 + tanh(u), 1 - tanh(u)^2) for u = sqrt(2/pi) * (x + 0.044715 x^3).
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    t = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - t) / (1.0 + t)
    th = tl.where(u < 0, -th, th)
    sech2 = 4.0 * t / ((1.0 + t) * (1.0 + t))
    return 1.0 + th, sech2


@triton.jit
def _geglu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
    # int64 offsets: B * S * intermediate can exceed 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    one_plus_th, _ = _gelu_tanh_parts(e)
    h = 0.5 * e * one_plus_th * g
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(dh_ptr, e_ptr, g_ptr, h_ptr, de_ptr, dg_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # All loads happen before any store, so the outputs may alias the inputs (inplace mode).
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    one_plus_th, sech2 = _gelu_tanh_parts(e)
    gelu = 0.5 * e * one_plus_th
    # gelu'(x) = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2);
    # where sech2 underflows to 0 the second term is 0 (guards 0 * inf for huge |x|).
    slope = 0.5 * e * sech2 * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * e * e)
    dgelu = 0.5 * one_plus_th + tl.where(sech2 == 0.0, 0.0, slope)
    tl.store(h_ptr + offs, (gelu * g).to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(de_ptr + offs, (dh * g * dgelu).to(de_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, (dh * gelu).to(dg_ptr.dtype.element_ty), mask=mask)


def geglu_forward_triton(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Triton launcher for h = gelu_tanh(e) * g (also runs on CPU under TRITON_INTERPRET=1)."""
    return launch_forward("geglu", _geglu_fwd_kernel, e, g)


def geglu_backward_triton(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher returning (h, de, dg); ``inplace`` writes them into dh, e, g."""
    return launch_backward("geglu", _geglu_bwd_kernel, dh, e, g, inplace)


def geglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """h = gelu_tanh(e) * g without autograd; usage: ``h = geglu_forward(gate_out, up_out)``."""
    if use_triton(e):
        return geglu_forward_triton(e, g)
    return geglu_reference(e, g)


def geglu_backward(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, de, dg) from dh; usage: ``h, de, dg = geglu_backward(dh, e, g, inplace=True)``."""
    if use_triton(e):
        return geglu_backward_triton(dh, e, g, inplace=inplace)
    return geglu_backward_reference(dh, e, g, inplace=inplace)


def geglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Differentiable gelu_tanh(e) * g; usage: ``h = geglu(gate_proj(x), up_proj(x))``."""
    return GatedActivation.apply(e, g, geglu_forward, geglu_backward)


def geglu_reference(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch gelu_tanh(e) * g, in fp32 math, returned in e's dtype (as the kernel)."""
    return (torch.nn.functional.gelu(e.float(), approximate="tanh") * g.float()).to(e.dtype)


def geglu_backward_reference(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch (h, de, dg), same formulas, fp32 math, same ``inplace`` semantics."""
    check_operands("geglu", dh, e, g)
    dh32, e32, g32 = dh.float(), e.float(), g.float()
    th = torch.tanh(_SQRT_2_OVER_PI * (e32 + _C * e32 * e32 * e32))
    gelu = 0.5 * e32 * (1.0 + th)
    sech2 = 1.0 - th * th
    slope = 0.5 * e32 * sech2 * _SQRT_2_OVER_PI * (1.0 + 3.0 * _C * e32 * e32)
    dgelu = 0.5 * (1.0 + th) + torch.where(sech2 == 0, torch.zeros_like(slope), slope)
    return finish_reference(dh, e, g, (gelu * g32, dh32 * g32 * dgelu, dh32 * gelu), inplace)
