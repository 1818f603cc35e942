"""K/V that one attention layer stores and later layers reuse (``ArchitectureSpec.kv_sharing``).

The storing layer writes its K, V (B, Hk, S, D) into the model's dict; each reusing layer reads
them. Gradients reach the storing layer's projections through those tensors, which autograd
follows without help -- except under checkpointing that recomputes a layer from its saved input
alone with the forward run outside autograd (fastlm's offloaded checkpointing,
``fastlm.offload.checkpoint``). There the backward recomputes the reusing layers first, and they
read K, V from a forward without a graph. So a reusing layer that runs with gradients on K, V
without a graph reads them as leaves whose gradients are summed per slot, and the storing layer,
recomputed after them, adds those sums to its K, V's gradients (``_AddGradient``): the same
gradients as without checkpointing. Elsewhere (no checkpointing, transformers' checkpointing,
inference) the K, V are passed through untouched.
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

# stored dict -> slot -> [dK, dV] summed over the reusing layers recomputed so far
_PENDING: WeakIdKeyDictionary = WeakIdKeyDictionary()


def reuse_kv(stored, slot: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The K, V a reusing layer attends with. Usage: ``key, value = reuse_kv(stored, "full")``."""
    key, value = stored[slot]
    if not torch.is_grad_enabled() or key.requires_grad or value.requires_grad:
        return key, value
    # A recompute of the reusing layer whose storing layer ran without autograd: collect dK, dV.
    grads = _PENDING.setdefault(stored, {}).setdefault(slot, [None, None])
    return _collecting_leaf(key, grads, 0), _collecting_leaf(value, grads, 1)


def store_kv(stored, slot: str, key: torch.Tensor, value: torch.Tensor):
    """Store a storing layer's K, V and return those it attends with: with the reusing layers'
    collected gradients added where a recompute collected them. Usage: see ``patch.py``."""
    pending = _PENDING.get(stored, {}).pop(slot, None)
    if pending is not None and torch.is_grad_enabled():
        key, value = (
            t if grad is None else _AddGradient.apply(t, grad)
            for t, grad in zip((key, value), pending)
        )
    stored[slot] = key, value
    return key, value


def _collecting_leaf(tensor: torch.Tensor, grads: list, index: int) -> torch.Tensor:
    leaf = tensor.detach().requires_grad_()

    def collect(grad: torch.Tensor) -> None:
        grads[index] = grad if grads[index] is None else grads[index] + grad

    leaf.register_hook(collect)
    return leaf


class _AddGradient(torch.autograd.Function):
    """y = x; dx = dy + g, with g the gradient the reusing layers gave this K or V."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ctx.extra = extra
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        extra, ctx.extra = ctx.extra, None
        return dy + extra.to(dy.dtype), None
