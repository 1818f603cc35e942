"""Q, K, V LoRA projections of one input as one autograd.Function.

Q = x Wq^T + bq + sq (x Aq^T) Bq^T, and likewise K, V (see lora_weights.py for the gradients).
x is saved once for the three; dx = dQ-part + dK-part + dV-part, accumulated in one buffer.
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


class LoRAQKVFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, *flat) -> tuple[Tensor, Tensor, Tensor]:
        projections = [LoRAWeights(*flat[i : i + 5]) for i in range(0, 15, 5)]
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        outs, xas = [], []
        for p in projections:
            y, xa = lora_forward(x2, p, dtype)
            outs.append(y.reshape(*x.shape[:-1], y.shape[-1]))
            xas.append(xa)
        tensors = [t for i, t in enumerate(flat) if i % 5 != 4]  # all but the scalings
        ctx.save_for_backward(x2, *xas, *tensors)
        ctx.scalings = [float(s) for s in flat[4::5]]
        ctx.dtype, ctx.x_shape, ctx.x_dtype = dtype, x.shape, x.dtype
        ctx.set_materialize_grads(False)  # an unused output's grad stays None: skip its matmuls
        return tuple(outs)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        x2, *rest = ctx.saved_tensors
        xas, tensors = rest[:3], rest[3:]
        nig, dtype = ctx.needs_input_grad, ctx.dtype
        dx, grads = None, []
        for i, d_out in enumerate((dq, dk, dv)):
            w = LoRAWeights(*tensors[4 * i : 4 * i + 4], ctx.scalings[i])
            needs = needs_of(nig, 1 + 5 * i)
            if d_out is None:  # output unused: contributes nothing
                grads.extend((None,) * 4 + (None,))
                continue
            dy = d_out.reshape(-1, d_out.shape[-1]).to(dtype)
            dx, g = lora_backward(dy, x2, xas[i], w, dtype, needs, dx=dx, need_dx=nig[0])
            grads.extend((*g, None))
        if dx is not None:
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (dx, *grads)


def lora_qkv(
    x: Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights
) -> tuple[Tensor, Tensor, Tensor]:
    """(Q, K, V) projections of x; usage: ``Q, K, V = lora_qkv(hidden, q, k, v)``."""
    return LoRAQKVFunction.apply(x, *flatten_weights(q, k, v))
