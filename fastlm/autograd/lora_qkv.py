"""LoRA projections of one input as one autograd.Function: q/k/v, or any group sharing an input.

Y_i = x W_iᵀ + b_i + s_i (x A_iᵀ) B_iᵀ for i = 1..n (q, k, v; Gated DeltaNet's four input
projections qkv, z, b, a): a group in lora_weights.py, so the n A products are one GEMM,
x [A_1; ...; A_n]ᵀ, and in backward the n dA's one GEMM and dx's LoRA part another. x is saved
once for the group, with XA (N, Σ r_i) and the weights and adapters as cast to the compute dtype
once in forward. dx = Σ_i dY_i-part, accumulated in one buffer.
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


class LoRAGroupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *flat) -> tuple[Tensor, ...]:
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        (cast,) = cast_projections(flat, dtype)
        ctx.scalings = flat[4::5]
        ys, xa, ctx.xa_scale = group_forward(x2, cast, ctx.scalings)
        ctx.save_for_backward(x2, xa, *saved_group(cast))
        ctx.dtypes, ctx.quant_states = cast.dtypes, cast.quant_states
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: skip its matmuls
        lead = x.shape[:-1]
        return tuple(y.reshape(*lead, y.shape[-1]) for y in ys)

    @staticmethod
    def backward(ctx, *d_outs: Tensor | None):
        x2, xa, *saved = ctx.saved_tensors
        group = Group.unpack(saved, ctx.quant_states, ctx.dtypes, ctx.scalings, ctx.xa_scale)
        nig = ctx.needs_input_grad
        dys = []
        for d_out in d_outs:  # None: that output was unused and contributes nothing
            dy = None if d_out is None else d_out.reshape(-1, d_out.shape[-1])
            dys.append(dy if dy is None or dy.dtype == ctx.dtype else dy.to(ctx.dtype))
        needs = [nig[1 + 5 * i : 5 + 5 * i] for i in range(len(d_outs))]
        dx, grads = group_backward(dys, x2, xa, group, needs, nig[0])
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        return (dx, *(g for projection in grads for g in (*projection, None)))


def lora_group(x: Tensor, *projections: LoRAWeights) -> tuple[Tensor, ...]:
    """The projections of one input x, in one Function; usage:
    ``qkv, z, b, a = lora_group(hidden, w_qkv, w_z, w_b, w_a)``."""
    return LoRAGroupFunction.apply(x, *flatten_weights(*projections))


def lora_qkv(
    x: Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights
) -> tuple[Tensor, Tensor, Tensor]:
    """(Q, K, V) projections of x; usage: ``Q, K, V = lora_qkv(hidden, q, k, v)``."""
    return lora_group(x, q, k, v)
