"""What SwiGLU and GeGLU share: operand checks, the elementwise launch, and the autograd wrapper.

Each op's file keeps its own Triton kernels (the formulas differ) and plain-PyTorch reference;
everything around the kernels is the same for both and lives here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

BLOCK = 1024

Backward = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def check_operands(op: str, *tensors: torch.Tensor) -> None:
    """All operands must share shape, dtype and device (the kernels index them alike)."""
    first = tensors[0]
    for t in tensors[1:]:
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(
                f"{op}: tensors must share shape/dtype/device, got {tuple(first.shape)} "
                f"{first.dtype} {first.device} and {tuple(t.shape)} {t.dtype} {t.device}"
            )


def launch_forward(op: str, kernel, e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Runs ``kernel(e, g, h, n, BLOCK)`` over every element and returns h."""
    check_operands(op, e, g)
    e, g = e.contiguous(), g.contiguous()
    h = torch.empty_like(e)
    n = e.numel()
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](e, g, h, n, BLOCK=BLOCK)
    return h


def launch_backward(
    op: str, kernel, dh: torch.Tensor, e: torch.Tensor, g: torch.Tensor, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Runs ``kernel(dh, e, g, h, de, dg, n, BLOCK)``; ``inplace`` reuses dh, e, g as outputs."""
    check_operands(op, dh, e, g)
    if inplace:
        if not (dh.is_contiguous() and e.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"{op}_backward(inplace=True) needs contiguous dh, e, g")
        h, de, dg = dh, e, g
    else:
        dh, e, g = dh.contiguous(), e.contiguous(), g.contiguous()
        h, de, dg = torch.empty_like(e), torch.empty_like(e), torch.empty_like(e)
    n = e.numel()
    if n:
        kernel[(triton.cdiv(n, BLOCK),)](dh, e, g, h, de, dg, n, BLOCK=BLOCK)
    return h, de, dg


def finish_reference(
    dh: torch.Tensor,
    e: torch.Tensor,
    g: torch.Tensor,
    results: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    inplace: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hands back fp32 (h, de, dg) as the kernels do: in e's dtype, or in dh, e, g if inplace."""
    h, de, dg = results
    if inplace:
        return dh.copy_(h), e.copy_(de), g.copy_(dg)
    return h.to(e.dtype), de.to(e.dtype), dg.to(e.dtype)


class GatedActivation(torch.autograd.Function):
    """act(e) * g by the op's own functions: ``GatedActivation.apply(e, g, fwd, bwd)``."""

    @staticmethod
    def forward(ctx, e: torch.Tensor, g: torch.Tensor, forward: Callable, backward: Backward):
        ctx.save_for_backward(e, g)
        ctx.backward_fn = backward
        return forward(e, g)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        e, g = ctx.saved_tensors
        # Not in place: e, g belong to the caller and dh to autograd.
        _, de, dg = ctx.backward_fn(dh.to(e.dtype), e, g, inplace=False)
        return de, dg, None, None
