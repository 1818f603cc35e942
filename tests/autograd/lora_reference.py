"""Shared set-up of the LoRA Function tests: random projections, and plain autograd in float64."""

import torch
import torch.nn.functional as F

from fastlm.autograd import LoRAWeights

RANK, SCALING = 4, 2.0


def lora_proj(out_f, in_f, gen, device, adapter=True, bias=False, train_base=False):
    """A projection with entries N(0, 0.3²) from ``gen``: weight, bias, then the adapter's A, B
    (trainable; the base only with ``train_base``)."""

    def p(*shape):
        return (torch.randn(*shape, generator=gen) * 0.3).to(device).requires_grad_()

    w = p(out_f, in_f).detach().requires_grad_(train_base)
    b = p(out_f).detach().requires_grad_(train_base) if bias else None
    if not adapter:
        return LoRAWeights(w, b, None, None, SCALING)
    return LoRAWeights(w, b, p(RANK, in_f), p(out_f, RANK), SCALING)


def linear(x, w: LoRAWeights):
    """The unfused projection: x Wᵀ + b + s · (x Aᵀ) Bᵀ."""
    y = F.linear(x, w.weight, w.bias)
    if w.lora_A is not None:
        y = y + w.scaling * F.linear(F.linear(x, w.lora_A), w.lora_B)
    return y


def grad_leaves(x, projs):
    """x and every tensor of ``projs`` that needs a gradient, in order."""
    out = [x] + [t for p in projs for t in (p.weight, p.bias, p.lora_A, p.lora_B)]
    return [t for t in out if t is not None and t.requires_grad]


def to64(x, projs):
    """float64 leaf copies of x and ``projs`` (same requires_grad), for the ground truth."""

    def c(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

    return c(x), [LoRAWeights(*(c(t) for t in p[:4]), p.scaling) for p in projs]


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64."""
    b = b.double()
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_grads_close(grads, grads64, leaves, tol):
    """Each gradient in its leaf's shape and dtype, within ``tol`` (relative) of the float64 one;
    where the float64 one is None (an unused output's inputs), none or zeros."""
    for g, g64, leaf in zip(grads, grads64, leaves):
        if g64 is None:
            assert g is None or not g.any()
            continue
        assert g.shape == leaf.shape and g.dtype == leaf.dtype
        assert rel(g, g64) <= tol, (tuple(leaf.shape), rel(g, g64))
