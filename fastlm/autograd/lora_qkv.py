"""Q, K, V LoRA projections of one input as one autograd.Function.

Q = x Wq^T + bq + sq (x Aq^T) Bq^T, and likewise K, V: a group of three in lora_weights.py, so
the three A products are one GEMM, x [Aq; Ak; Av]^T, and in backward the three dA's one GEMM and
dx's LoRA part another. x is saved once for the three, with XA (N, rq + rk + rv) and the weights
and adapters as cast to the compute dtype once in forward.
dx = dQ-part + dK-part + dV-part, accumulated in one buffer.
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


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *flat) -> tuple[Tensor, Tensor, Tensor]:
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
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        x2, xa, *saved = ctx.saved_tensors
        group = Group.unpack(saved, ctx.quant_states, ctx.dtypes, ctx.scalings, ctx.xa_scale)
        nig = ctx.needs_input_grad
        dys = []
        for d_out in (dq, dk, dv):  # None: that output was unused and contributes nothing
            dy = None if d_out is None else d_out.reshape(-1, d_out.shape[-1])
            dys.append(dy if dy is None or dy.dtype == ctx.dtype else dy.to(ctx.dtype))
        needs = [nig[1 + 5 * i : 5 + 5 * i] for i in range(3)]
        dx, grads = group_backward(dys, x2, xa, group, needs, nig[0])
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        return (dx, *grads[0], None, *grads[1], None, *grads[2], None)


def lora_qkv(
    x: Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights
) -> tuple[Tensor, Tensor, Tensor]:
    """(Q, K, V) projections of x; usage: ``Q, K, V = lora_qkv(hidden, q, k, v)``."""
    return LoRAQKVFunction.apply(x, *flatten_weights(q, k, v))
