"""lora_qkv / lora_group: the fused Function vs plain autograd of unfused projections in float64."""

import pytest
import torch
from lora_reference import assert_grads_close, grad_leaves, linear, lora_proj, rel, to64

from fastlm.autograd import lora_group, lora_qkv

HIDDEN, Q_OUT, KV_OUT = 24, 24, 8
X_SHAPE = (2, 7, HIDDEN)


def _make(device, seed=0, adapters=(True, True, True), bias=True, **kw):
    gen = torch.Generator().manual_seed(seed)
    projs = [
        lora_proj(out_f, HIDDEN, gen, device, adapter=a, bias=bias, **kw)
        for out_f, a in zip((Q_OUT, KV_OUT, KV_OUT), adapters)
    ]
    x = torch.randn(*X_SHAPE, generator=gen).to(device).requires_grad_()
    d_outs = [
        torch.randn(*X_SHAPE[:-1], p.weight.shape[0], generator=gen).to(device) for p in projs
    ]
    return x, projs, d_outs


def _check(x, projs, d_outs, use=(0, 1, 2)):
    outs = lora_qkv(x, *projs) if len(projs) == 3 else lora_group(x, *projs)
    x64, projs64 = to64(x, projs)
    outs64 = [linear(x64, p) for p in projs64]
    for o, o64 in zip(outs, outs64):
        assert o.shape == o64.shape and rel(o, o64) <= 1e-5
    leaves, leaves64 = grad_leaves(x, projs), grad_leaves(x64, projs64)
    loss = sum((outs[i] * d_outs[i]).sum() for i in use)
    loss64 = sum((outs64[i] * d_outs[i].double()).sum() for i in use)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads64 = torch.autograd.grad(loss64, leaves64, allow_unused=True)
    assert_grads_close(grads, grads64, leaves, 1e-5)


def test_biased_qkv_with_adapters(device):
    x, projs, d_outs = _make(device)
    _check(x, projs, d_outs)


def test_k_without_adapter(device):
    x, projs, d_outs = _make(device, seed=1, adapters=(True, False, True))
    _check(x, projs, d_outs)


def test_unbiased_full_finetuning(device):
    x, projs, d_outs = _make(device, seed=2, bias=False, train_base=True, adapters=(False,) * 3)
    _check(x, projs, d_outs)


def test_biased_full_finetuning_with_adapters(device):
    x, projs, d_outs = _make(device, seed=3, train_base=True)
    _check(x, projs, d_outs)


def test_unused_output(device):
    # K does not reach the loss: its grad arrives as None and its adapter gets no gradient
    x, projs, d_outs = _make(device, seed=4)
    _check(x, projs, d_outs, use=(0, 2))
    q, k, v = lora_qkv(x, *projs)
    (q.sum() + v.sum()).backward()
    assert projs[1].lora_A.grad is None and projs[1].lora_B.grad is None
    assert projs[0].lora_A.grad is not None and x.grad is not None


def test_x_saved_once(device):
    x, projs, _ = _make(device, seed=5)
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lora_qkv(x, *projs)
    assert sum(t.shape[-1] == HIDDEN and t.numel() == x.numel() for t in packed) == 1


def test_mismatched_adapter_raises(device):
    x, projs, _ = _make(device)
    bad = projs[0]._replace(lora_B=None)
    with pytest.raises(ValueError):
        lora_qkv(x, bad, projs[1], projs[2])


def test_per_projection_ranks_and_scalings(device):
    # PEFT rank/alpha patterns: the fused A product and dA GEMM span ranks 4, 2, 6 and the three
    # scalings differ (the B products and dB's then carry their own)
    gen = torch.Generator().manual_seed(6)
    projs = []
    for out_f, rank, scaling in zip((Q_OUT, KV_OUT, KV_OUT), (4, 2, 6), (2.0, 0.5, 1.0)):
        p = lora_proj(out_f, HIDDEN, gen, device)
        a = (torch.randn(rank, HIDDEN, generator=gen) * 0.3).to(device).requires_grad_()
        b = (torch.randn(out_f, rank, generator=gen) * 0.3).to(device).requires_grad_()
        projs.append(p._replace(lora_A=a, lora_B=b, scaling=scaling))
    x = torch.randn(*X_SHAPE, generator=gen).to(device).requires_grad_()
    d_outs = [
        torch.randn(*X_SHAPE[:-1], p.weight.shape[0], generator=gen).to(device) for p in projs
    ]
    _check(x, projs, d_outs)


def test_a_group_of_four_like_gated_deltanet(device):
    # Gated DeltaNet's in_proj_qkv, in_proj_z, in_proj_b, in_proj_a (tiny b and a outputs): one
    # Function for four, a projection without adapter, and an output (b) unused by the loss
    gen = torch.Generator().manual_seed(7)
    outs = (3 * KV_OUT + 5, 2 * KV_OUT, 3, 3)
    projs = [
        lora_proj(out_f, HIDDEN, gen, device, adapter=a)
        for out_f, a in zip(outs, (True, True, False, True))
    ]
    x = torch.randn(*X_SHAPE, generator=gen).to(device).requires_grad_()
    d_outs = [torch.randn(*X_SHAPE[:-1], n, generator=gen).to(device) for n in outs]
    _check(x, projs, d_outs, use=(0, 1, 2, 3))
    _check(x, projs, d_outs, use=(0, 1, 3))
