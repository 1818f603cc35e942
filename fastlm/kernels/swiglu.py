"""SwiGLU gate: h = silu(e) * g, elementwise over tensors of any shape.

Forward, with sigma = sigmoid(e):   h = e * sigma * g
Backward, given dh:                 dg = dh * silu(e) = dh * e * sigma
                                    de = dh * g * sigma * (1 + e * (1 - sigma))
(d/de silu(e) = sigma + e * sigma * (1 - sigma).) The backward also returns h, recomputed, because
the LoRA MLP needs it for the down projection's gradients and does not keep it from the forward.

Kernels compute in fp32 and store in the input dtype. ``swiglu_backward(..., inplace=True)`` writes
h, de, dg into the buffers of dh, e, g: each element is read and written by the same program, so
this is safe, and it saves three (tokens, intermediate) buffers in the LoRA MLP backward, which
owns those tensors. Never use it on tensors someone else still needs.
"""

from __future__ import annotations

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


@triton.jit
def _swiglu_fwd_kernel(e_ptr, g_ptr, h_ptr, n, BLOCK: tl.constexpr):
    # int64 offsets: B * S * intermediate can exceed 2**31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = e * tl.sigmoid(e) * g
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, e_ptr, g_ptr, h_ptr, de_ptr, dg_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    # All loads happen before any store, so the outputs may alias the inputs (inplace mode).
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(e)
    silu = e * sig
    h = silu * g
    dg = dh * silu
    # de = dh * g * silu'(e), silu'(e) = sigma * (1 + e * (1 - sigma))
    de = dh * g * sig * (1.0 + e * (1.0 - sig))
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(de_ptr + offs, de.to(de_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)


def swiglu_forward_triton(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Triton launcher for h = silu(e) * g (also runs on CPU under TRITON_INTERPRET=1)."""
    return launch_forward("swiglu", _swiglu_fwd_kernel, e, g)


def swiglu_backward_triton(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton launcher returning (h, de, dg); ``inplace`` writes them into dh, e, g."""
    return launch_backward("swiglu", _swiglu_bwd_kernel, dh, e, g, inplace)


def swiglu_forward(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """h = silu(e) * g without autograd; usage: ``h = swiglu_forward(gate_out, up_out)``."""
    if use_triton(e):
        return swiglu_forward_triton(e, g)
    return swiglu_reference(e, g)


def swiglu_backward(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, de, dg) from dh; usage: ``h, de, dg = swiglu_backward(dh, e, g, inplace=True)``."""
    if use_triton(e):
        return swiglu_backward_triton(dh, e, g, inplace=inplace)
    return swiglu_backward_reference(dh, e, g, inplace=inplace)


def swiglu(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Differentiable silu(e) * g; usage: ``h = swiglu(gate_proj(x), up_proj(x))``."""
    return GatedActivation.apply(e, g, swiglu_forward, swiglu_backward)


def swiglu_reference(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch silu(e) * g, computed in fp32 and returned in e's dtype (as the kernel)."""
    return (torch.nn.functional.silu(e.float()) * g.float()).to(e.dtype)


def swiglu_backward_reference(
    dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch (h, de, dg), same formulas, fp32 math, same ``inplace`` semantics."""
    check_operands("swiglu", dh, e, g)
    dh32, e32, g32 = dh.float(), e.float(), g.float()
    sig = torch.sigmoid(e32)
    silu = e32 * sig
    h = silu * g32
    dg = dh32 * silu
    de = dh32 * g32 * sig * (1.0 + e32 * (1.0 - sig))
    return finish_reference(dh, e, g, (h, de, dg), inplace)
