"""A single LoRA linear (e.g. the attention output projection o_proj) as an autograd.Function.

Y = x W^T + b + s (x A^T) B^T; gradients as derived in lora_weights.py. Saves x and x A^T.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm.autograd.lora_weights import (
    LoRAWeights,
    compute_dtype,
    flatten_weights,
    lora_backward,
    lora_forward,
    needs_of,
)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight, bias, lora_a, lora_b, scaling: float) -> Tensor:
        w = LoRAWeights(weight, bias, lora_a, lora_b, scaling)
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        y, xa = lora_forward(x2, w, dtype)
        ctx.save_for_backward(x2, xa, weight, bias, lora_a, lora_b)
        ctx.scaling, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x2, xa, *tensors = ctx.saved_tensors
        w = LoRAWeights(*tensors, ctx.scaling)
        nig = ctx.needs_input_grad
        dy = d_out.reshape(-1, d_out.shape[-1]).to(ctx.dtype)
        dx, g = lora_backward(dy, x2, xa, w, ctx.dtype, needs_of(nig, 1), need_dx=nig[0])
        if dx is not None:
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (dx, *g, None)


def lora_linear(x: Tensor, w: LoRAWeights) -> Tensor:
    """x W^T + b + s (x A^T) B^T; usage: ``y = lora_linear(x, LoRAWeights(W, None, A, B, 2.0))``."""
    return LoRALinearFunction.apply(x, *flatten_weights(w))
