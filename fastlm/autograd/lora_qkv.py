"""Q, K, V LoRA projections of one input as one autograd.Function.

Q = x Wq^T + bq + sq (x Aq^T) Bq^T, and likewise K, V (see lora_weights.py for the gradients).
x is saved once for the three; dx = dQ-part + dK-part + dV-part, accumulated in one buffer.
The weights and adapters are cast to the compute dtype once in forward and those copies saved.
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


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *flat) -> tuple[Tensor, Tensor, Tensor]:
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        cast, saved, ctx.dtypes, ctx.quant_states = cast_projections(flat, dtype)
        scalings = flat[4::5]
        lead = x.shape[:-1]
        outs, xas = [], []
        for i in range(3):
            y, xa = lora_forward(x2, *cast[4 * i : 4 * i + 4], scalings[i])
            outs.append(y.reshape(*lead, y.shape[-1]))
            xas.append(xa)
        ctx.save_for_backward(x2, *xas, *saved)
        ctx.scalings, ctx.dtype, ctx.x_shape, ctx.x_dtype = scalings, dtype, x.shape, x.dtype
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: skip its matmuls
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        x2, *rest = ctx.saved_tensors
        nig, dtype, dtypes, scalings = ctx.needs_input_grad, ctx.dtype, ctx.dtypes, ctx.scalings
        need_x = nig[0]
        dx, grads = None, []
        for i, d_out in enumerate((dq, dk, dv)):
            if d_out is None:  # output unused: contributes nothing
                grads += (*NO_GRADS, None)
                continue
            weight, lora_a, lora_b = rest[3 + 3 * i : 6 + 3 * i]
            dy = d_out.reshape(-1, d_out.shape[-1])
            if dy.dtype != dtype:
                dy = dy.to(dtype)
            dyb = None
            if need_x:
                dx, dyb = grad_input(
                    dy, weight, lora_a, lora_b, scalings[i], dx, ctx.quant_states[i]
                )
            needs = nig[1 + 5 * i : 5 + 5 * i]
            if any(needs):
                dtypes_i = dtypes[4 * i : 4 * i + 4]
                grads += grad_params(dy, x2, rest[i], dyb, lora_b, scalings[i], dtypes_i, needs)
            else:
                grads += NO_GRADS
            grads.append(None)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        return (dx, *grads)


def lora_qkv(
    x: Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights
) -> tuple[Tensor, Tensor, Tensor]:
    """(Q, K, V) projections of x; usage: ``Q, K, V = lora_qkv(hidden, q, k, v)``."""
    return LoRAQKVFunction.apply(x, *flatten_weights(q, k, v))
