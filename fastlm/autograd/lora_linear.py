"""A single LoRA linear (e.g. the attention output projection o_proj) as an autograd.Function.

Y = x W^T + b + s (x A^T) B^T; gradients as derived in lora_weights.py. Saves x and x A^T, and
W, A, B as cast once to the compute dtype in forward (the backward casts no weight).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm.autograd.lora_weights import (
    NO_GRADS,
    LoRAWeights,
    cast_projections,
    compute_dtype,
    flatten_weights,
    grad_input,
    grad_params,
    lora_forward,
)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *flat) -> Tensor:
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        cast, saved, ctx.dtypes, ctx.quant_states = cast_projections(flat, dtype)
        scaling = flat[4]
        y, xa = lora_forward(x2, *cast, scaling)
        ctx.save_for_backward(x2, xa, *saved)
        ctx.scaling, ctx.dtype, ctx.x_shape, ctx.x_dtype = scaling, dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x2, xa, weight, lora_a, lora_b = ctx.saved_tensors
        nig = ctx.needs_input_grad
        needs = nig[1:5]
        dy = d_out.reshape(-1, d_out.shape[-1])
        if dy.dtype != ctx.dtype:
            dy = dy.to(ctx.dtype)
        dx = dyb = None
        if nig[0]:
            dx, dyb = grad_input(
                dy, weight, lora_a, lora_b, ctx.scaling, quant_state=ctx.quant_states[0]
            )
            dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        grads = NO_GRADS
        if any(needs):
            grads = grad_params(dy, x2, xa, dyb, lora_b, ctx.scaling, ctx.dtypes, needs)
        return (dx, *grads, None)


def lora_linear(x: Tensor, w: LoRAWeights) -> Tensor:
    """x W^T + b + s (x A^T) B^T; usage: ``y = lora_linear(x, LoRAWeights(W, None, A, B, 2.0))``."""
    return LoRALinearFunction.apply(x, *flatten_weights(w))
