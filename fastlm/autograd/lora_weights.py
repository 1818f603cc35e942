"""One (possibly LoRA-adapted) linear projection, and the shared forward/backward matmuls.

For Y = X W^T + b + s * (X A^T) B^T, with X (N, in), W (out, in), A (r, in), B (out, r):
    dX = dY W + s * (dY B) A
    dA = s * (dY B)^T X
    dB = s * dY^T (X A^T)
    dW = dY^T X            (only when W requires grad: full fine-tuning)
    db = sum_rows dY
Matmuls run in the compute dtype (the autocast dtype when autocast is on, else X's dtype); each
gradient is returned in its parameter's own dtype (PEFT keeps adapters in fp32 over a bf16 base).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class LoRAWeights(NamedTuple):
    """A projection: base weight/bias and an optional LoRA adapter (A, B, scaling)."""

    weight: Tensor  # base weight (out, in); frozen for LoRA, may require grad (full fine-tuning)
    bias: Tensor | None = None  # base bias (out,) (Qwen2 q/k/v carry one)
    lora_A: Tensor | None = None  # (r, in) - None: this projection has no adapter
    lora_B: Tensor | None = None  # (out, r)
    scaling: float = 1.0  # lora_alpha / r (or rsLoRA's)


class LoRAGrads(NamedTuple):
    """Parameter gradients of one projection (None where not requested)."""

    weight: Tensor | None
    bias: Tensor | None
    lora_A: Tensor | None
    lora_B: Tensor | None


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def flatten_weights(*projections: LoRAWeights) -> list:
    """Five autograd.Function arguments per projection: weight, bias, lora_A, lora_B, scaling."""
    out: list = []
    for p in projections:
        if (p.lora_A is None) != (p.lora_B is None):
            raise ValueError("LoRAWeights: lora_A and lora_B must both be set or both be None")
        out.extend((p.weight, p.bias, p.lora_A, p.lora_B, float(p.scaling)))
    return out


def lora_forward(x: Tensor, w: LoRAWeights, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """(Y, X A^T) for 2-D x already in ``dtype``; X A^T is None without an adapter."""
    weight = w.weight.to(dtype)
    if w.bias is not None:
        y = torch.addmm(w.bias.to(dtype), x, weight.t())
    else:
        y = x @ weight.t()
    if w.lora_A is None:
        return y, None
    xa = x @ w.lora_A.to(dtype).t()
    # The scaling rides on the GEMM's alpha: no extra pass over the (N, out) output.
    y.addmm_(xa, w.lora_B.to(dtype).t(), alpha=w.scaling)
    return y, xa


# Whether torch.mm(..., out_dtype=torch.float32) works for half inputs on CUDA (torch >= 2.8).
_MM_OUT_DTYPE_OK = True


def _mm_to(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b returned in ``out_dtype``; fp32 parameters get an fp32-accumulated, fp32 result."""
    global _MM_OUT_DTYPE_OK
    if a.dtype == out_dtype or out_dtype != torch.float32:
        return (a @ b).to(out_dtype)
    if a.is_cuda and _MM_OUT_DTYPE_OK:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError):  # this torch build lacks mm.dtype: use the fallback
            _MM_OUT_DTYPE_OK = False
    if a.is_cuda:
        # The GEMM still accumulates in fp32; only its output is rounded (what PEFT+autocast gets).
        return (a @ b).float()
    return a.float() @ b.float()


def lora_backward(
    dy: Tensor,
    x: Tensor,
    xa: Tensor | None,
    w: LoRAWeights,
    dtype: torch.dtype,
    needs: tuple[bool, bool, bool, bool],
    dx: Tensor | None = None,
    need_dx: bool = True,
) -> tuple[Tensor | None, LoRAGrads]:
    """Gradients of one projection from dy (N, out) and the saved x (N, in), xa = X A^T.

    ``needs`` = needs_input_grad for (weight, bias, lora_A, lora_B). When ``dx`` is given the dX
    contribution is accumulated into it in place (several projections share one input); with
    ``need_dx`` False dX is not computed. Returns (dX in ``dtype`` or None, LoRAGrads).
    """
    need_w, need_b, need_a, need_b_lora = needs
    has_lora = w.lora_A is not None
    dyb = None
    if has_lora and (need_dx or need_a):
        dyb = dy @ w.lora_B.to(dtype)  # dY B: (N, r)

    if need_dx:
        weight = w.weight.to(dtype)
        # dX = dY W + s * (dY B) A
        if dx is None:
            dx = dy @ weight
        else:
            dx.addmm_(dy, weight)
        if has_lora:
            dx.addmm_(dyb, w.lora_A.to(dtype), alpha=w.scaling)

    d_weight = d_bias = d_a = d_b = None
    if need_w:  # dW = dY^T X
        d_weight = _mm_to(dy.t(), x, w.weight.dtype)
    if need_b and w.bias is not None:  # db = sum over rows of dY, summed in fp32
        d_bias = dy.sum(0, dtype=torch.float32).to(w.bias.dtype)
    if has_lora and need_a:  # dA = s * (dY B)^T X
        d_a = _mm_to(dyb.t(), x, w.lora_A.dtype).mul_(w.scaling)
    if has_lora and need_b_lora:  # dB = s * dY^T (X A^T)
        if xa is None:
            xa = x @ w.lora_A.to(dtype).t()
        d_b = _mm_to(dy.t(), xa, w.lora_B.dtype).mul_(w.scaling)
    return dx, LoRAGrads(d_weight, d_bias, d_a, d_b)


def needs_of(needs_input_grad: tuple[bool, ...], start: int) -> tuple[bool, bool, bool, bool]:
    """needs_input_grad of (weight, bias, lora_A, lora_B) for the projection at ``start``."""
    return tuple(needs_input_grad[start : start + 4])  # type: ignore[return-value]
