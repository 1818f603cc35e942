"""Gated LoRA MLP as one autograd.Function: out = down(act(gate(x)) * up(x)).

Forward: e = gate(x), g = up(x), h = act(e) * g, out = down(h), each projection
Y = X W^T + b + s (X A^T) B^T (see lora_weights.py for its gradients).
Saved: x, e, g and the small (N, r) products X A^T, H A^T -- never h, which the fused activation
backward recomputes. Backward:
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
    LoRAWeights,
    compute_dtype,
    flatten_weights,
    lora_backward,
    lora_forward,
    needs_of,
)
from fastlm.kernels.geglu import geglu_backward, geglu_forward
from fastlm.kernels.swiglu import swiglu_backward, swiglu_forward

_ACTIVATIONS = {
    "swiglu": (swiglu_forward, swiglu_backward),
    "geglu": (geglu_forward, geglu_backward),
}


def _unflatten(flat: tuple) -> list[LoRAWeights]:
    return [LoRAWeights(*flat[i : i + 5]) for i in range(0, len(flat), 5)]


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, activation: str, *flat) -> Tensor:
        gate, up, down = _unflatten(flat)
        act_fwd, _ = _ACTIVATIONS[activation]
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        e, xa_gate = lora_forward(x2, gate, dtype)
        g, xa_up = lora_forward(x2, up, dtype)
        h = act_fwd(e, g)
        out, ha_down = lora_forward(h, down, dtype)
        del h  # not saved: recomputed in backward
        tensors = [t for i, t in enumerate(flat) if i % 5 != 4]  # all but the scalings
        ctx.save_for_backward(x2, e, g, xa_gate, xa_up, ha_down, *tensors)
        ctx.scalings = [float(s) for s in flat[4::5]]
        ctx.activation, ctx.dtype = activation, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x2, e, g, xa_gate, xa_up, ha_down, *tensors = ctx.saved_tensors
        gate, up, down = (
            LoRAWeights(*tensors[4 * i : 4 * i + 4], ctx.scalings[i]) for i in range(3)
        )
        _, act_bwd = _ACTIVATIONS[ctx.activation]
        dtype, nig = ctx.dtype, ctx.needs_input_grad
        need_gate, need_up, need_down = needs_of(nig, 2), needs_of(nig, 7), needs_of(nig, 12)
        need_x = nig[0]
        need_inner = need_x or any(need_gate) or any(need_up)
        dy = d_out.reshape(-1, d_out.shape[-1]).to(dtype)

        # dh = dOut W_d + s_d (dOut B_d) A_d; down's own grads wait for h (no input needed yet,
        # so e stands in for it).
        dh, _ = lora_backward(dy, e, None, down, dtype, (False,) * 4, need_dx=need_inner)
        if need_inner:
            # h -> dh's buffer, de -> e's, dg -> g's (matmul outputs, so contiguous unless a
            # saved-tensor hook changed them). Bump the versions of the saved e, g so a retained
            # graph cannot silently reuse them.
            inplace = dh.is_contiguous() and e.is_contiguous() and g.is_contiguous()
            h, de, dg = act_bwd(dh, e, g, inplace=inplace)
            if inplace:
                torch.autograd.graph.increment_version(e)
                torch.autograd.graph.increment_version(g)
        elif any(need_down):
            h = _ACTIVATIONS[ctx.activation][0](e, g)
        if any(need_down):
            _, grads_down = lora_backward(dy, h, ha_down, down, dtype, need_down, need_dx=False)
        else:
            grads_down = (None,) * 4

        dx = None
        grads_gate = grads_up = (None,) * 4
        if need_inner:
            dx, grads_gate = lora_backward(de, x2, xa_gate, gate, dtype, need_gate, need_dx=need_x)
            dx, grads_up = lora_backward(dg, x2, xa_up, up, dtype, need_up, dx=dx, need_dx=need_x)
        if dx is not None:
            dx = dx.reshape(ctx.x_shape).to(ctx.x_dtype)
        return (
            dx,
            None,
            *grads_gate,
            None,
            *grads_up,
            None,
            *grads_down,
            None,
        )


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
