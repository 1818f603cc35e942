"""A single LoRA linear (e.g. the attention output projection o_proj) as an autograd.Function.

Y = x W^T + b + s (x A^T) B^T; gradients as derived in lora_weights.py (a group of one). Saves x
and s·x A^T, and W, A, B as cast once to the compute dtype in forward (the backward casts none).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm.autograd.lora_weights import (
    Group,
    LoRAWeights,
    cast_projections,
    compute_dtype,
    flatten_weights,
    group_backward,
    group_forward,
    saved_group,
)


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *flat) -> Tensor:
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        (cast,) = cast_projections(flat, dtype)
        ctx.scalings = flat[4::5]
        (y,), xa, ctx.xa_scale = group_forward(x2, cast, ctx.scalings)
        ctx.save_for_backward(x2, xa, *saved_group(cast))
        ctx.dtypes, ctx.quant_states = cast.dtypes, cast.quant_states
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x2, xa, *saved = ctx.saved_tensors
        group = Group.unpack(saved, ctx.quant_states, ctx.dtypes, ctx.scalings, ctx.xa_scale)
        nig = ctx.needs_input_grad
        dy = d_out.reshape(-1, d_out.shape[-1])
        if dy.dtype != ctx.dtype:
            dy = dy.to(ctx.dtype)
        dx, (grads,) = group_backward([dy], x2, xa, group, [nig[1:5]], nig[0])
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        return (dx, *grads, None)


def lora_linear(x: Tensor, w: LoRAWeights) -> Tensor:
    """x W^T + b + s (x A^T) B^T; usage: ``y = lora_linear(x, LoRAWeights(W, None, A, B, 2.0))``."""
    return LoRALinearFunction.apply(x, *flatten_weights(w))
