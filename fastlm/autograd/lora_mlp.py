"""Gated LoRA MLP as one autograd.Function: out = down(act(gate(x)) * up(x)).

Forward: e = gate(x), g = up(x), h = act(e) * g, out = down(h), each projection
Y = X W^T + b + s (X A^T) B^T. gate and up read the same x: one group in lora_weights.py (their
two A products one GEMM, and in backward their dA's one GEMM and dx's LoRA part another); down
is a group of one over h. All six adapters are cast in one cat and one cast.
Memory: a 4-bit model's dense weights are made per group and dropped after it -- gate's and up's
before down's (in forward and backward), one at a time in dx -- so the step holds one group's
copies at its peak (the forward recompute of an MLP under checkpointing), not all three's.
Saved: x, e, g, the small products c·X [A_g; A_u]^T (N, r_g + r_u) and s·H A_d^T, and the
weights and adapters as cast once to the compute dtype in forward -- never h, which the fused
activation backward recomputes.
Backward:
    dh, S_d     = down-backward(dOut)                 (dOut W_d + S_d A_d, S_d = s_d dOut B_d)
    h, de, dg   = act_backward(dh, e, g)              (in place in the buffers of dh, e, g)
    down grads  from dOut, the recomputed h and S_d
    dx          = gate/up-backward(de, dg)            (one buffer, see group_backward)
Because the activation backward overwrites the saved e and g, a second backward through the same
graph (retain_graph=True) is refused by autograd's version check instead of giving wrong grads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastlm.autograd.lora_weights import (
    NO_GRADS,
    Group,
    LoRAWeights,
    cast_projections,
    compute_dtype,
    flatten_weights,
    group_backward,
    group_forward,
    group_grad_input,
    group_grad_params,
    saved_group,
    with_dense_weights,
)
from fastlm.kernels.geglu import geglu_backward, geglu_forward
from fastlm.kernels.swiglu import swiglu_backward, swiglu_forward

_ACTIVATIONS = {
    "swiglu": (swiglu_forward, swiglu_backward),
    "geglu": (geglu_forward, geglu_backward),
}
_GATE_UP, _DOWN = 2, 1  # the two groups: (gate, up) over x, (down) over h
_N_SAVED = 1 + 3 * _GATE_UP  # saved_group of gate/up: a_cat, then W, A, B per projection


class LoRAMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, activation: str, *flat) -> Tensor:
        act_fwd, _ = _ACTIVATIONS[activation]
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        # down's dense weight is made once gate's and up's are gone (see the module doc)
        gate_up, down = cast_projections(flat, dtype, groups=(_GATE_UP, _DOWN), later=(1,))
        scalings = flat[4::5]
        (e, g), xa_gu, xa_scale_gu = group_forward(x2, gate_up, scalings[:2])
        # their dense copies go before h and down's copy are made: the peak is e, g, h, W_down
        gate_up = gate_up._replace(weights=[])
        h = act_fwd(e, g)
        (out,), ha_down, xa_scale_d = group_forward(
            h, with_dense_weights(down, dtype), scalings[2:]
        )
        del h  # not saved: recomputed in backward
        ctx.save_for_backward(x2, e, g, xa_gu, ha_down, *saved_group(gate_up), *saved_group(down))
        ctx.groups = [
            (gate_up.quant_states, gate_up.dtypes, scalings[:2], xa_scale_gu),
            (down.quant_states, down.dtypes, scalings[2:], xa_scale_d),
        ]
        ctx.activation, ctx.dtype = activation, dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, d_out: Tensor):
        x2, e, g, xa_gu, ha_down, *saved = ctx.saved_tensors
        gate_up = Group.unpack(saved[:_N_SAVED], *ctx.groups[0])
        down = Group.unpack(saved[_N_SAVED:], *ctx.groups[1])
        nig = ctx.needs_input_grad
        need_gate, need_up, need_down = nig[2:6], nig[7:11], nig[12:16]
        need_x = nig[0]
        need_inner = need_x or any(need_gate) or any(need_up)
        need_any_down = any(need_down)
        dy = d_out.reshape(-1, d_out.shape[-1])
        if dy.dtype != ctx.dtype:
            dy = dy.to(ctx.dtype)

        s_down = None  # s_d dOut B_d, shared by dh and dA_d
        if need_inner:
            # dh = dOut W_d + s_d (dOut B_d) A_d
            dh, s_down = group_grad_input([dy], down)
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
            (grads_down,) = group_grad_params([dy], h, ha_down, down, [need_down], s_down)

        dx = None
        grads_gate = grads_up = NO_GRADS
        if need_inner:  # dx = gate-backward(de) + up-backward(dg), in one buffer
            dx, (grads_gate, grads_up) = group_backward(
                [de, dg], x2, xa_gu, gate_up, [need_gate, need_up], need_x
            )
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
