"""The weight casts of lora_mlp / lora_qkv / lora_linear under autocast (lora_weights.py).

PEFT layout: bf16 base, fp32 adapters, forward under autocast bf16. Each Function casts every
weight once in forward and saves the copies: the backward casts no weight, and every gradient
still comes back in its parameter's own dtype, close to plain autograd under the same autocast.
"""

import pytest
import torch
import torch.nn.functional as F
from lora_reference import grad_leaves, linear, rel
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm.autograd import LoRAWeights, lora_linear, lora_mlp, lora_qkv, lora_weights

HIDDEN, INTER, KV_OUT, RANK, SCALING = 24, 40, 8, 4, 2.0
X_SHAPE = (2, 7, HIDDEN)  # N = 14 rows: no activation shares a shape with a weight or adapter
OPS = ["mlp", "qkv", "linear"]
# base weight dtype, bias (its dtype, or None), whether the base trains, x's dtype
LAYOUTS = {
    "peft-bf16-base": (torch.bfloat16, torch.bfloat16, False, torch.bfloat16),
    "full-ft-bf16": (torch.bfloat16, torch.bfloat16, True, torch.bfloat16),
    "full-ft-fp32-base": (torch.float32, torch.float32, True, torch.float32),
}


def _proj(out_f, in_f, gen, device, layout):
    w_dtype, b_dtype, train_base, _ = LAYOUTS[layout]

    def p(*shape, dtype=torch.float32, grad=True):
        t = torch.randn(*shape, generator=gen) * 0.3
        return t.to(device=device, dtype=dtype).requires_grad_(grad)

    bias = None if b_dtype is None else p(out_f, dtype=b_dtype, grad=train_base)
    weight = p(out_f, in_f, dtype=w_dtype, grad=train_base)
    return LoRAWeights(weight, bias, p(RANK, in_f), p(out_f, RANK), SCALING)


def _make(op, device, layout, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if op == "mlp":
        projs = [_proj(o, i, gen, device, layout) for o, i in ((INTER, HIDDEN),) * 2]
        projs.append(_proj(HIDDEN, INTER, gen, device, layout))
    elif op == "qkv":
        projs = [_proj(o, HIDDEN, gen, device, layout) for o in (HIDDEN, KV_OUT, KV_OUT)]
    else:
        projs = [_proj(INTER, HIDDEN, gen, device, layout)]
    x_dtype = LAYOUTS[layout][3]
    x = torch.randn(*X_SHAPE, generator=gen).to(device=device, dtype=x_dtype).requires_grad_()
    return x, projs


def _fused(op, x, projs):
    if op == "mlp":
        return [lora_mlp(x, *projs)]
    if op == "qkv":
        return list(lora_qkv(x, *projs))
    return [lora_linear(x, projs[0])]


def _plain(op, x, projs):
    if op == "mlp":
        gate, up, down = projs
        return [linear(F.silu(linear(x, gate)) * linear(x, up), down)]
    return [linear(x, p) for p in projs]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("op", OPS)
def test_autocast_grads_in_param_dtype_match_plain_autograd(op, layout, device):
    x, projs = _make(op, device, layout)
    leaves = grad_leaves(x, projs)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        outs = _fused(op, x, projs)
        outs_ref = _plain(op, x, projs)
    gen = torch.Generator().manual_seed(1)
    d_outs = [torch.randn(o.shape, generator=gen).to(device, torch.bfloat16) for o in outs]
    grads = torch.autograd.grad(outs, leaves, d_outs)
    grads_ref = torch.autograd.grad(outs_ref, leaves, d_outs)
    for out, ref in zip(outs, outs_ref):
        assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
        assert rel(out, ref) <= 2e-2
    for g, g_ref, leaf in zip(grads, grads_ref, leaves):
        assert g.dtype == g_ref.dtype == leaf.dtype and g.shape == leaf.shape
        assert rel(g, g_ref) <= 2e-2, (tuple(leaf.shape), leaf.dtype, rel(g, g_ref))


_CAST_METHODS = {
    torch.Tensor.to,
    torch.Tensor.float,
    torch.Tensor.bfloat16,
    torch.Tensor.half,
    torch.Tensor.double,
    torch.Tensor.type,
    torch.Tensor.type_as,
}


class _CastCounter(TorchFunctionMode):
    """Counts casts whose source has one of ``shapes``: Python-level ``.to``/``.float``... calls
    (no-ops included) and the ``aten._to_copy`` kernels under them (see _CopyCounter)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.calls = shapes, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _CAST_METHODS and tuple(args[0].shape) in self.shapes:
            self.calls.append((func.__name__, tuple(args[0].shape), args[0].dtype))
        return func(*args, **(kwargs or {}))


class _CopyCounter(TorchDispatchMode):
    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.calls = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) in self.shapes:
            self.calls.append((tuple(args[0].shape), args[0].dtype, (kwargs or {}).get("dtype")))
        return func(*args, **(kwargs or {}))


def _weight_shapes(projs):
    # the 2-D weights and adapters (a bias's shape could be a bias gradient's legit cast)
    return {tuple(t.shape) for p in projs for t in (p.weight, p.lora_A, p.lora_B)}


CAST_LAYOUTS = ["peft-bf16-base", "full-ft-fp32-base"]


@pytest.mark.parametrize("layout", CAST_LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_forward_casts_each_weight_once(op, layout, device):
    # fp32 base weights one by one; the fp32 adapters all together, in one cast of their
    # concatenation (a 1-D buffer of all their elements)
    x, projs = _make(op, device, layout, seed=2)
    fp32_bases = [p.weight for p in projs if p.weight.dtype == torch.float32]
    adapters = [t for p in projs for t in (p.lora_A, p.lora_B)]
    assert all(t.dtype == torch.float32 for t in adapters)
    shapes = _weight_shapes(projs) | {(sum(t.numel() for t in adapters),)}
    py, copy = _CastCounter(shapes), _CopyCounter(shapes)
    with torch.autocast(device_type=device, dtype=torch.bfloat16), py, copy:
        _fused(op, x, projs)
    assert len(copy.calls) == len(fp32_bases) + 1, copy.calls  # each fp32 one once
    assert len(py.calls) == len(fp32_bases) + 1, py.calls  # and no no-op .to on the bf16 ones


@pytest.mark.parametrize("layout", CAST_LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_backward_casts_no_weight(op, layout, device):
    x, projs = _make(op, device, layout, seed=3)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        outs = _fused(op, x, projs)
    leaves = grad_leaves(x, projs)
    py, copy = _CastCounter(_weight_shapes(projs)), _CopyCounter(_weight_shapes(projs))
    with py, copy:
        grads = torch.autograd.grad(outs, leaves, [torch.ones_like(o) for o in outs])
    assert copy.calls == [], copy.calls  # aten._to_copy of a weight, adapter or their copies
    assert py.calls == [], py.calls  # not even a no-op .to
    assert [g.dtype for g in grads] == [t.dtype for t in leaves]


@pytest.mark.parametrize("op", OPS)
def test_gradient_checkpointing_gives_the_same_grads(op, device):
    # non-reentrant checkpointing drops the saved cast copies and recomputes them in a 2nd forward
    from torch.utils.checkpoint import checkpoint

    x, projs = _make(op, device, "peft-bf16-base", seed=4)
    leaves = grad_leaves(x, projs)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        outs = _fused(op, x, projs)
        outs_ckpt = checkpoint(_fused, op, x, projs, use_reentrant=False)
    d_outs = [torch.ones_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, d_outs)
    grads_ckpt = torch.autograd.grad(outs_ckpt, leaves, d_outs)
    for g, g_ckpt in zip(grads, grads_ckpt):
        assert g.dtype == g_ckpt.dtype and torch.equal(g, g_ckpt)


# --- _mm_to: fp32 gradients of half-precision matmuls -------------------------------------------


def _half_pair(device, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(9, 14, generator=gen), torch.randn(14, 6, generator=gen)
    return a.to(device, dtype), b.to(device, dtype)


def test_mm_to_fp32_result(device):
    a, b = _half_pair(device)
    got = lora_weights._mm_to(a, b, torch.float32)
    assert got.dtype == torch.float32
    if device == "cpu":  # the CPU computes in fp32
        assert torch.equal(got, torch.mm(a.float(), b.float()))
    else:  # fp32 accumulation written as fp32: no rounding to bf16 on the way
        assert torch.equal(got, torch.mm(a, b, out_dtype=torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-output GEMM is CUDA's")
def test_mm_to_keeps_the_fp32_output_gemm_after_an_input_it_cannot_take():
    # float64 inputs cannot use mm(out_dtype=fp32): they take the other path, and the bf16 call
    # after them still gets the fp32-output GEMM (no flag is switched off by a failed call).
    a, b = _half_pair("cuda", torch.float64)
    torch.testing.assert_close(lora_weights._mm_to(a, b, torch.float32), torch.mm(a, b).float())
    a, b = _half_pair("cuda")
    want = torch.mm(a, b, out_dtype=torch.float32)
    assert torch.equal(lora_weights._mm_to(a, b, torch.float32), want)
    assert not torch.equal(torch.mm(a, b).float(), want)  # the rounded path would differ


def test_torch_without_the_fp32_output_gemm_is_logged_once(monkeypatch, caplog):
    lora_weights._mm_writes_fp32.cache_clear()
    monkeypatch.setattr(torch.ops.aten.mm, "overloads", lambda: ["default", "out"])
    try:
        with caplog.at_level("WARNING", logger="fastlm"):
            assert not lora_weights._mm_writes_fp32()
            assert not lora_weights._mm_writes_fp32()
    finally:
        lora_weights._mm_writes_fp32.cache_clear()
    assert len(caplog.records) == 1 and "out_dtype" in caplog.records[0].getMessage()
    monkeypatch.undo()
    assert lora_weights._mm_writes_fp32()  # this torch (>= 2.11) has it
