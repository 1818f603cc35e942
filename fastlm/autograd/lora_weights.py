"""One (possibly LoRA-adapted) linear projection, and the shared forward/backward matmuls.

For Y = X W^T + b + s * (X A^T) B^T, with X (N, in), W (out, in), A (r, in), B (out, r):
    dX = dY W + s * (dY B) A
    dA = s * (dY B)^T X
    dB = s * dY^T (X A^T)
    dW = dY^T X            (only when W requires grad: full fine-tuning)
    db = sum_rows dY
Matmuls run in the compute dtype (the autocast dtype when autocast is on, else X's dtype); each
gradient is returned in its parameter's own dtype (PEFT keeps adapters in fp32 over a bf16 base).

Per-call cost matters here (7 projections per layer, forward run twice under gradient
checkpointing, and the CPU must keep up with the GPU), so the Functions cast every weight to the
compute dtype once in forward (no call at all when it already has that dtype), save those copies,
and the backward casts no weight: each fp32 -> bf16 adapter cast is a kernel launch on the GPU.

A 4-bit base (QLoRA: a bitsandbytes NF4 ``Params4bit`` with its ``quant_state``) is dequantised
to the compute dtype in forward, and the *packed* weight is what gets saved: the backward
dequantises it again for dX, so no full-precision copy lives between forward and backward.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.kernels.nf4_dequant import dequantize_nf4

logger = logging.getLogger("fastlm")


class LoRAWeights(NamedTuple):
    """A projection: base weight/bias and an optional LoRA adapter (A, B, scaling)."""

    weight: Tensor  # base weight (out, in); frozen for LoRA, may require grad (full fine-tuning)
    bias: Tensor | None = None  # base bias (out,) (Qwen2 q/k/v carry one)
    lora_A: Tensor | None = None  # (r, in) - None: this projection has no adapter
    lora_B: Tensor | None = None  # (out, r)
    scaling: float = 1.0  # lora_alpha / r (or rsLoRA's)


NO_GRADS = (None, None, None, None)  # (dW, db, dA, dB) of a projection that needs none


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def flatten_weights(*projections: LoRAWeights) -> list:
    """Five autograd.Function arguments per projection: weight, bias, lora_A, lora_B, scaling."""
    out: list = []
    for p in projections:
        if (p.lora_A is None) != (p.lora_B is None):
            raise ValueError("LoRAWeights: lora_A and lora_B must both be set or both be None")
        out += (p.weight, p.bias, p.lora_A, p.lora_B, float(p.scaling))
    return out


def quant_state_of(weight: Tensor):
    """The bitsandbytes 4-bit ``quant_state`` of a packed base weight, or None for a dense one."""
    return getattr(weight, "quant_state", None)


def dense_weight(weight: Tensor, quant_state, dtype: torch.dtype) -> Tensor:
    """``weight`` in ``dtype``: dequantised when 4-bit packed, cast (only if needed) otherwise."""
    if quant_state is not None:
        return dequantize_nf4(weight, quant_state, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def cast_projections(flat: tuple, dtype: torch.dtype) -> tuple[list, list, list, list]:
    """Cast the flattened projections' tensors to ``dtype``, each once.

    Returns (cast: weight, bias, lora_A, lora_B per projection, for the forward matmuls;
    saved: weight, lora_A, lora_B per projection, for save_for_backward -- the backward needs no
    bias, and a 4-bit weight is saved packed; dtypes: the original dtypes of weight, bias,
    lora_A, lora_B per projection, None for an absent tensor, so that each gradient comes back in
    its parameter's own dtype; quant_states: per projection, the 4-bit weight's quant_state or
    None, for ``grad_input`` to dequantise the saved packed weight again).
    """
    cast: list = []
    dtypes: list = []
    quant_states: list = []
    saved: list = []
    for i in range(0, len(flat), 5):
        weight, bias, lora_a, lora_b = flat[i : i + 4]
        quant_state = quant_state_of(weight)
        quant_states.append(quant_state)
        dense = dense_weight(weight, quant_state, dtype)
        cast.append(dense)
        dtypes.append(weight.dtype)
        saved.append(weight if quant_state is not None else dense)
        for t in (bias, lora_a, lora_b):
            if t is None:
                dtypes.append(None)
                cast.append(None)
            else:
                dtypes.append(t.dtype)
                cast.append(t if t.dtype == dtype else t.to(dtype))
        saved += cast[-2:]
    return cast, saved, dtypes, quant_states


def lora_forward(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
) -> tuple[Tensor, Tensor | None]:
    """(Y, X A^T) for 2-D x, all tensors already in one dtype; X A^T is None without an adapter."""
    y = F.linear(x, weight, bias)  # addmm(b, x, W^T), or mm without a bias
    if lora_a is None:
        return y, None
    xa = F.linear(x, lora_a)
    # The scaling rides on the GEMM's alpha: no extra pass over the (N, out) output.
    y.addmm_(xa, lora_b.t(), alpha=scaling)
    return y, xa


_HALF = (torch.float16, torch.bfloat16)


def _mm_to(a: Tensor, b: Tensor, out_dtype: torch.dtype) -> Tensor:
    """a @ b returned in ``out_dtype``; fp32 parameters get an fp32-accumulated, fp32 result."""
    if a.dtype == out_dtype:
        return torch.mm(a, b)
    if out_dtype != torch.float32:
        return torch.mm(a, b).to(out_dtype)
    if a.is_cuda:
        if a.dtype in _HALF and b.dtype == a.dtype and _mm_writes_fp32():
            return torch.mm(a, b, out_dtype=torch.float32)
        # The GEMM still accumulates in fp32; only its output is rounded (what PEFT+autocast gets).
        return torch.mm(a, b).float()
    return torch.mm(a.float(), b.float())


@functools.cache
def _mm_writes_fp32() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=torch.float32)`` for fp16/bf16 CUDA
    inputs (the ATen overload ``mm.dtype``, torch >= 2.8). Decided once, from the operator table;
    without it the slower path is logged once."""
    if "dtype" in torch.ops.aten.mm.overloads():
        return True
    logger.warning(
        "fastlm: torch %s has no mm(out_dtype=torch.float32): fp32 LoRA gradients of fp16/bf16 "
        "matmuls are rounded to 16 bits first (as PEFT under autocast gets them)",
        torch.__version__,
    )
    return False


def grad_input(
    dy: Tensor,
    weight: Tensor,
    lora_a: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
    dx: Tensor | None = None,
    quant_state=None,
) -> tuple[Tensor, Tensor | None]:
    """(dX, dY B) of one projection; weight and the adapter in dy's dtype (the saved copies).

    dX = dY W + s * (dY B) A, accumulated in place into ``dx`` when given (several projections
    share one input). dY B (N, r) is returned so that grad_params need not compute it again.
    With a ``quant_state`` the weight is the packed 4-bit one, dequantised here for this matmul.
    """
    if quant_state is not None:
        weight = dense_weight(weight, quant_state, dy.dtype)
    if dx is None:
        dx = torch.mm(dy, weight)
    else:
        dx.addmm_(dy, weight)
    if lora_a is None:
        return dx, None
    dyb = torch.mm(dy, lora_b)
    dx.addmm_(dyb, lora_a, alpha=scaling)
    return dx, dyb


def grad_params(
    dy: Tensor,
    x: Tensor,
    xa: Tensor | None,
    dyb: Tensor | None,
    lora_b: Tensor | None,
    scaling: float,
    dtypes: list,
    needs: tuple[bool, ...],
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """(dW, db, dA, dB) of one projection, each in its parameter's dtype (None if not needed).

    dy (N, out) and the saved x (N, in), xa = X A^T (N, r) and lora_b are in the compute dtype;
    dyb = dY B from grad_input, or None to compute it here. ``dtypes`` and ``needs`` hold the
    original dtypes and needs_input_grad of (weight, bias, lora_A, lora_B).
    """
    need_w, need_b, need_a, need_lb = needs
    d_weight = d_bias = d_a = d_b = None
    if need_w:  # dW = dY^T X
        d_weight = _mm_to(dy.t(), x, dtypes[0])
    if need_b:  # db = sum over rows of dY, summed in fp32
        d_bias = dy.sum(0, dtype=torch.float32)
        if dtypes[1] != torch.float32:
            d_bias = d_bias.to(dtypes[1])
    if need_a:  # dA = s * (dY B)^T X
        if dyb is None:
            dyb = torch.mm(dy, lora_b)
        d_a = _mm_to(dyb.t(), x, dtypes[2]).mul_(scaling)
    if need_lb:  # dB = s * dY^T (X A^T)
        d_b = _mm_to(dy.t(), xa, dtypes[3]).mul_(scaling)
    return d_weight, d_bias, d_a, d_b
