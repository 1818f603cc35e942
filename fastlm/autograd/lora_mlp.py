"""Gated LoRA MLP as one autograd.Function: out = down(act(gate(x)) * up(x)).

Forward: e = gate(x), g = up(x), h = act(e) * g, out = down(h), each projection
Y = X W^T + b + s (X A^T) B^T (see lora_weights.py for its gradients).
Saved: x, e, g, the small (N, r) products X A^T, H A^T, and the weights and adapters as cast
once to the compute dtype in forward -- never h, which the fused activation backward recomputes.
Backward:
    dh          = down-backward(dOut)                 (dOut W_d + s (dOut B_d) A_d)
    h, de, dg   = act_backward(dh, e, g)              (in place in the buffers of dh, e, g)
    down grads  from dOut and the recomputed h
    dx          = gate-backward(de) + up-backward(dg)
Because the activation backward overwrites the saved e and g, a second backward through the same
graph (retain_graph=True) is refused by autograd's version check instead of giving wrong grads.
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
from fastlm.kernels.geglu import geglu_backward, geglu_forward
from fastlm.kernels.swiglu import swiglu_backward, swiglu_forward

_ACTIVATIONS = {
    "swiglu": (swiglu_forward, swiglu_backward),
    "geglu": (geglu_forward, geglu_backward),
}


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, activation: str, *flat) -> Tensor:
        act_fwd, _ = _ACTIVATIONS[activation]
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        cast, saved, ctx.dtypes, ctx.quant_states = cast_projections(flat, dtype)
        scalings = flat[4::5]
        e, xa_gate = lora_forward(x2, *cast[0:4], scalings[0])
        g, xa_up = lora_forward(x2, *cast[4:8], scalings[1])
        h = act_fwd(e, g)
        out, ha_down = lora_forward(h, *cast[8:12], scalings[2])
        del h  # not saved: recomputed in backward
        ctx.save_for_backward(x2, e, g, xa_gate, xa_up, ha_down, *saved)
        ctx.scalings, ctx.activation, ctx.dtype = scalings, activation, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x2, e, g, xa_gate, xa_up, ha_down, w_g, a_g, b_g, w_u, a_u, b_u, w_d, a_d, b_d = (
            ctx.saved_tensors
        )
        s_g, s_u, s_d = ctx.scalings
        q_g, q_u, q_d = ctx.quant_states
        dtypes, nig = ctx.dtypes, ctx.needs_input_grad
        need_gate, need_up, need_down = nig[2:6], nig[7:11], nig[12:16]
        need_x = nig[0]
        need_inner = need_x or any(need_gate) or any(need_up)
        need_any_down = any(need_down)
        dy = d_out.reshape(-1, d_out.shape[-1])
        if dy.dtype != ctx.dtype:
            dy = dy.to(ctx.dtype)

        dyb_d = None  # dOut B_d, shared by dh and dA_d
        if need_inner:
            # dh = dOut W_d + s_d (dOut B_d) A_d
            dh, dyb_d = grad_input(dy, w_d, a_d, b_d, s_d, quant_state=q_d)
            # h -> dh's buffer, de -> e's, dg -> g's (matmul outputs, so contiguous unless a
            # saved-tensor hook changed them). Bump the versions of the saved e, g so a retained
            # graph cannot silently reuse them.
            inplace = dh.is_contiguous() and e.is_contiguous() and g.is_contiguous()
            h, de, dg = _ACTIVATIONS[ctx.activation][1](dh, e, g, inplace=inplace)
            if inplace:
                torch.autograd.graph.increment_version(e)
                torch.autograd.graph.increment_version(g)
        elif need_any_down:
            h = _ACTIVATIONS[ctx.activation][0](e, g)
        grads_down = NO_GRADS
        if need_any_down:
            grads_down = grad_params(dy, h, ha_down, dyb_d, b_d, s_d, dtypes[8:12], need_down)

        dx = None
        grads_gate = grads_up = NO_GRADS
        if need_inner:
            dyb_g = dyb_u = None
            if need_x:  # dx = gate-backward(de) + up-backward(dg), in one buffer
                dx, dyb_g = grad_input(de, w_g, a_g, b_g, s_g, quant_state=q_g)
                dx, dyb_u = grad_input(dg, w_u, a_u, b_u, s_u, dx, quant_state=q_u)
            if any(need_gate):
                grads_gate = grad_params(de, x2, xa_gate, dyb_g, b_g, s_g, dtypes[0:4], need_gate)
            if any(need_up):
                grads_up = grad_params(dg, x2, xa_up, dyb_u, b_u, s_u, dtypes[4:8], need_up)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        return (dx, None, *grads_gate, None, *grads_up, None, *grads_down, None)


def lora_mlp(
    x: Tensor,
    gate: LoRAWeights,
    up: LoRAWeights,
    down: LoRAWeights,
    activation: str = "swiglu",
) -> Tensor:
    """down(act(gate(x)) * up(x)), act "swiglu" (Llama/Qwen) or "geglu" (Gemma).

    Usage: ``out = lora_mlp(hidden, LoRAWeights(wg, None, Ag, Bg, 2.0), up, down, "swiglu")``.
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"lora_mlp: activation must be one of {sorted(_ACTIVATIONS)}")
    return LoRAMLPFunction.apply(x, activation, *flatten_weights(gate, up, down))
