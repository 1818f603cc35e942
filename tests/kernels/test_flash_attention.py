"""Flash attention: Triton launchers (interpreter on CPU) vs float64 autograd of the reference.
The transformers hook that runs this kernel or eager attention: tests/models/test_attention.py.

Triton runs fp32 on CPU (the interpreter's bf16 dot is wrong); on CUDA the same tests run, plus bf16
against the error of materialised bf16 attention and the real launch shapes (head_dim 64/128/256).
"""

import pytest
import torch

from fastlm.kernels import flash_attention as fa

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (real launch shapes, bf16)")

# (batch, q heads, kv heads, seq, head_dim, softcap, sliding window, causal)
CASES = [
    pytest.param((1, 4, 2, 37, 16, 2.0, 5, True), id="gqa-cap-window5"),
    pytest.param((2, 2, 2, 17, 32, None, None, True), id="mha-causal-seq17"),
    pytest.param((1, 2, 1, 40, 24, 1.5, None, False), id="noncausal-cap-d24"),
    pytest.param((1, 4, 2, 40, 16, None, 20, True), id="gqa-window20"),
    pytest.param((1, 3, 1, 33, 32, 2.0, None, True), id="group3-cap"),
]
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel vs float64 truth


def _inputs(case, device, dtype=torch.float32, q_gain=1.5, seed=0):
    b, hq, hkv, s, d = case[:5]
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64) * q_gain
    k = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, s, d, generator=gen, dtype=torch.float64)
    g = torch.randn(b, hq, s, d, generator=gen, dtype=torch.float64)
    return [t.to(device, dtype) for t in (q, k, v, g)]


def _kw(case):
    return dict(scale=case[4] ** -0.5, softcap=case[5], sliding_window=case[6], causal=case[7])


def _truth(q, k, v, g, **kw):
    """float64 output and (dq, dk, dv) by autograd through the plain-PyTorch reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = fa.flash_attention_reference(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, g.double())


def _run(q, k, v, g, fn=fa.flash_attention_triton, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, g)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_float64(case, device):
    q, k, v, g = _inputs(case, device)
    o, lse2 = fa.flash_attention_forward_triton(q, k, v, **_kw(case))
    assert o.shape == q.shape and o.dtype == q.dtype
    torch.testing.assert_close(o.double(), _truth(q, k, v, g, **_kw(case))[0], **TOL)
    # lse2 is the base-2 log-sum-exp of the (capped, masked) logits.
    s = (
        q.double()
        @ k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).mT
        * _kw(case)["scale"]
    )
    t = case[5] * torch.tanh(s / case[5]) if case[5] else s
    keep = fa.keep_pattern(q.shape[2], case[7], case[6], device)
    want = torch.logsumexp(t.masked_fill(~keep, float("-inf")), -1) / torch.log(torch.tensor(2.0))
    torch.testing.assert_close(lse2.double(), want.double(), **TOL)


@pytest.mark.parametrize("case", CASES)
def test_backward_matches_float64(case, device):
    q, k, v, g = _inputs(case, device)
    _, grads = _run(q, k, v, g, **_kw(case))
    for got, want in zip(grads, _truth(q, k, v, g, **_kw(case))[1]):
        assert got.dtype == q.dtype
        torch.testing.assert_close(got.double(), want, **TOL)


def test_uneven_blocks_and_determinism(device):
    # Query and key tiles of different sizes: the window's first key block and the dk/dv kernel's
    # query range are rounded to different block sizes.
    case = (1, 4, 2, 45, 16, 2.0, 9, True)
    blocks = {"fwd": fa.Blocks(32, 16), "dq": fa.Blocks(16, 32), "dkdv": fa.Blocks(32, 16)}
    q, k, v, g = _inputs(case, device)
    out, grads = _run(q, k, v, g, blocks=blocks, **_kw(case))
    want_out, want_grads = _truth(q, k, v, g, **_kw(case))
    torch.testing.assert_close(out.double(), want_out, **TOL)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, **TOL)
    _, again = _run(q, k, v, g, blocks=blocks, **_kw(case))
    for a, b in zip(grads, again):  # no atomics: bit-identical
        assert torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # interpreter
def test_saturated_softcap_is_finite_and_exact(device):
    # Logits of hundreds against a cap of 2: tanh saturates to +-1 (exp2 overflows), 1 - th^2 -> 0.
    case = (1, 2, 1, 23, 16, 2.0, None, True)
    q, k, v, g = _inputs(case, device, q_gain=60.0)
    out, grads = _run(q, k, v, g, **_kw(case))
    want_out, want_grads = _truth(q, k, v, g, **_kw(case))
    assert all(torch.isfinite(t).all() for t in (out, *grads))
    torch.testing.assert_close(out.double(), want_out, **TOL)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_window_of_one_attends_only_to_itself(device):
    # Each query keeps only its own key: o = v (of its kv head), the softmax has no gradient, so
    # dq = dk = 0 and dv sums do over the GQA group.
    case = (1, 4, 2, 19, 16, 2.0, 1, True)
    q, k, v, g = _inputs(case, device)
    out, (dq, dk, dv) = _run(q, k, v, g, **_kw(case))
    torch.testing.assert_close(out, v.repeat_interleave(2, 1), atol=1e-6, rtol=1e-6)
    assert dq.abs().max() < 1e-6 and dk.abs().max() < 1e-6
    torch.testing.assert_close(dv, g.view(1, 2, 2, 19, 16).sum(2), atol=1e-6, rtol=1e-6)


def test_window_convention_matches_transformers():
    # transformers keeps kv_idx > q_idx - window: distance window - 1 kept, distance window dropped.
    from transformers.masking_utils import sliding_window_causal_mask_function

    seq, window = 13, 4
    i = torch.arange(seq)[:, None]
    j = torch.arange(seq)[None, :]
    want = sliding_window_causal_mask_function(window)(0, 0, i, j)
    assert torch.equal(fa.keep_pattern(seq, True, window, "cpu"), want.expand(seq, seq))
    assert want[window - 1, 0] and not want[window, 0]


def test_public_function_dispatch(device, monkeypatch):
    case = CASES[0].values[0]
    q, k, v, _ = _inputs(case, device)
    out = fa.flash_attention(q, k, v, **_kw(case))
    if device == "cpu":  # CPU tensors run the reference
        assert torch.equal(out, fa.flash_attention_reference(q, k, v, **_kw(case)))
    calls = []
    monkeypatch.setattr(fa, "use_triton", lambda t: True)
    monkeypatch.setattr(fa, "flash_attention_triton", lambda *a, **kw: calls.append(1) or out)
    fa.flash_attention(q, k, v, **_kw(case))
    assert calls == [1]


def test_bad_inputs_raise():
    q = torch.zeros(1, 4, 8, 16)
    k = torch.zeros(1, 3, 8, 16)
    with pytest.raises(ValueError, match="multiple"):
        fa.flash_attention_reference(q, k, k, scale=1.0)
    k = torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match="causal"):
        fa.flash_attention_reference(q, k, k, scale=1.0, sliding_window=3, causal=False)
    with pytest.raises(ValueError, match="softcap"):
        fa.flash_attention_reference(q, k, k, scale=1.0, softcap=0.0)
    with pytest.raises(ValueError, match="256"):
        fa.flash_attention_reference(torch.zeros(1, 1, 8, 512), *[torch.zeros(1, 1, 8, 512)] * 2,
                                     scale=1.0)  # fmt: skip


# --- Attention sinks (gpt-oss): one learned logit per query head, a softmax column with no value --

# gpt-oss's attention: GQA, no soft-cap, sliding layers and full ones. Plus soft-cap and
# bidirectional cases: the sink is taken as given there too (neither scaled nor capped).
SINK_CASES = [
    pytest.param((2, 4, 2, 37, 16, None, None, True), id="gqa-causal"),
    pytest.param((1, 4, 2, 40, 16, None, 5, True), id="gqa-window5"),
    pytest.param((1, 6, 2, 33, 32, None, 20, True), id="group3-window20"),
    pytest.param((2, 2, 2, 17, 24, None, None, True), id="mha-d24"),
    pytest.param((1, 4, 2, 37, 16, 2.0, 5, True), id="cap-window5"),
    pytest.param((1, 2, 1, 40, 16, None, None, False), id="bidirectional"),
]


def _sinks(n_heads, device, dtype=torch.float32, seed=1):
    """~N(0, 1.5) logits, the last head's large (the sink takes most of the softmax on rows of
    small scores) and, from 3 heads, the first very negative (the sink is almost no term)."""
    gen = torch.Generator().manual_seed(seed)
    sinks = torch.randn(n_heads, generator=gen, dtype=torch.float64) * 1.5
    sinks[-1] = 4.0
    if n_heads >= 3:
        sinks[0] = -30.0
    return sinks.to(device, dtype)


def _truth_with_sinks(q, k, v, sinks, g, **kw):
    """float64 output and (dq, dk, dv, dsinks) by autograd through the reference's sink column."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    out = fa.flash_attention_reference(*leaves[:3], sinks=leaves[3], **kw)
    return out.detach(), torch.autograd.grad(out, leaves, g.double())


def _run_with_sinks(q, k, v, sinks, g, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out = fa.flash_attention_triton(*leaves[:3], sinks=leaves[3], **kw)
    return out.detach(), torch.autograd.grad(out, leaves, g)


def _lse2_with_sinks(q, k, sinks, case, device):
    """float64 base-2 log-sum-exp over each row's kept logits and its head's sink."""
    s = q.double() @ k.double().repeat_interleave(q.shape[1] // k.shape[1], 1).mT * case[4] ** -0.5
    t = case[5] * torch.tanh(s / case[5]) if case[5] else s
    t = t.masked_fill(~fa.keep_pattern(q.shape[2], case[7], case[6], device), float("-inf"))
    column = sinks.double().view(1, -1, 1, 1).expand(*t.shape[:3], 1)
    return torch.logsumexp(torch.cat([t, column], -1), -1) / torch.log(torch.tensor(2.0))


@pytest.mark.parametrize("case", SINK_CASES)
def test_sinks_forward_and_lse_match_float64(case, device):
    q, k, v, g = _inputs(case, device)
    sinks = _sinks(case[1], device)
    o, lse2 = fa.flash_attention_forward_triton(q, k, v, sinks=sinks, **_kw(case))
    want = _truth_with_sinks(q, k, v, sinks, g, **_kw(case))[0]
    torch.testing.assert_close(o.double(), want, **TOL)
    torch.testing.assert_close(lse2.double(), _lse2_with_sinks(q, k, sinks, case, device), **TOL)
    # The sinks matter here: without them both differ.
    assert (o.double() - _truth(q, k, v, g, **_kw(case))[0]).abs().max() > 1e-2


@pytest.mark.parametrize("case", SINK_CASES)
def test_sinks_backward_matches_float64(case, device):
    q, k, v, g = _inputs(case, device)
    sinks = _sinks(case[1], device)
    _, grads = _run_with_sinks(q, k, v, sinks, g, **_kw(case))
    _, want_grads = _truth_with_sinks(q, k, v, sinks, g, **_kw(case))
    for got, want in zip(grads, want_grads, strict=True):
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, **TOL)
    assert want_grads[3].abs().max() > 1e-2  # a sinks' gradient that a wrong one cannot meet


def test_sinks_of_minus_infinity_are_no_sinks(device):
    # The kernel's sink branch with a sink of -inf is the sink-less kernel, bit for bit, and the
    # sinks' gradient is 0 (not NaN).
    case = SINK_CASES[1].values[0]
    q, k, v, g = _inputs(case, device)
    none = torch.full((case[1],), float("-inf"), device=device)
    out, grads = _run_with_sinks(q, k, v, none, g, **_kw(case))
    want_out, want_grads = _run(q, k, v, g, **_kw(case))
    assert torch.equal(out, want_out)
    for got, want in zip(grads[:3], want_grads, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(grads[3], torch.zeros_like(grads[3]))


def test_sinks_uneven_blocks_determinism_and_dtype(device):
    # Other tiles, the same results bit for bit on a second run; sinks stored in bf16 (a bf16
    # model's parameter) run in fp32 and get their gradient back in bf16.
    case = (1, 4, 2, 45, 16, None, 9, True)
    blocks = {"fwd": fa.Blocks(32, 16), "dq": fa.Blocks(16, 32), "dkdv": fa.Blocks(32, 16)}
    q, k, v, g = _inputs(case, device)
    sinks = _sinks(4, device)
    out, grads = _run_with_sinks(q, k, v, sinks, g, blocks=blocks, **_kw(case))
    want_out, want_grads = _truth_with_sinks(q, k, v, sinks, g, **_kw(case))
    torch.testing.assert_close(out.double(), want_out, **TOL)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, **TOL)
    _, again = _run_with_sinks(q, k, v, sinks, g, blocks=blocks, **_kw(case))
    for a, b in zip(grads, again, strict=True):
        assert torch.equal(a, b)
    half = sinks.bfloat16().requires_grad_()
    out = fa.flash_attention_triton(q, k, v, sinks=half, **_kw(case))
    (dsinks,) = torch.autograd.grad(out, half, g)
    assert dsinks.dtype == torch.bfloat16
    want = _truth_with_sinks(q, k, v, half.detach().float(), g, **_kw(case))[1][3]
    torch.testing.assert_close(dsinks.double(), want, atol=0.0, rtol=1e-2)  # bf16 rounding


def test_sinks_public_function_dispatch(device, monkeypatch):
    case = SINK_CASES[1].values[0]
    q, k, v, _ = _inputs(case, device)
    sinks = _sinks(case[1], device)
    out = fa.flash_attention(q, k, v, sinks=sinks, **_kw(case))
    if device == "cpu":  # CPU tensors run the reference
        assert torch.equal(out, fa.flash_attention_reference(q, k, v, sinks=sinks, **_kw(case)))
    monkeypatch.setattr(fa, "use_triton", lambda t: True)
    torch.testing.assert_close(fa.flash_attention(q, k, v, sinks=sinks, **_kw(case)), out, **TOL)


def test_bad_sinks_raise():
    q, k = torch.zeros(1, 4, 8, 16), torch.zeros(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"one logit per query head, \(4,\)"):
        fa.flash_attention_reference(q, k, k, scale=1.0, sinks=torch.zeros(2))
    with pytest.raises(ValueError, match="fp32 sinks"):
        fa.flash_attention_forward_triton(q, k, k, scale=1.0, sinks=torch.zeros(4).double())


# --- CUDA only: real launch shapes, bf16 ---------------------------------------------------------

GPU_CASES = [
    (2, 8, 4, 300, 64, 50.0, 128, True),
    (1, 8, 4, 1000, 128, 50.0, None, True),
    (1, 8, 4, 777, 256, 50.0, 200, True),
    (2, 8, 4, 513, 256, None, None, True),
    (1, 4, 4, 200, 256, 30.0, None, False),
]


@cuda_only
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"s{c[3]}-d{c[4]}")
def test_cuda_fp32_real_blocks(case, device):
    q, k, v, g = _inputs(case, device, q_gain=4.0)
    out, grads = _run(q, k, v, g, **_kw(case))
    want_out, want_grads = _truth(q, k, v, g, **_kw(case))
    torch.testing.assert_close(out.double(), want_out, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-3)


@cuda_only
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"s{c[3]}-d{c[4]}")
def test_cuda_bf16_as_accurate_as_materialised(case, device):
    # bf16 kernel error (vs float64 truth) within a small factor of the error of materialised
    # attention run in bf16 the way eager does (bf16 scores and probabilities).
    q, k, v, g = _inputs(case, device, dtype=torch.bfloat16, q_gain=4.0)
    kw = _kw(case)
    out, grads = _run(q, k, v, g, **kw)
    want_out, want_grads = _truth(q, k, v, g, **kw)

    def bf16_eager(q, k, v):
        grp = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(grp, 1).mT * kw["scale"]
        if kw["softcap"]:
            s = kw["softcap"] * torch.tanh(s / kw["softcap"])
        keep = fa.keep_pattern(q.shape[2], kw["causal"], kw["sliding_window"], q.device)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1, dtype=torch.float32)
        return p.to(q.dtype) @ v.repeat_interleave(grp, 1)

    base_out, base_grads = _run(q, k, v, g, fn=bf16_eager)
    for got, base, want in zip((out, *grads), (base_out, *base_grads), (want_out, *want_grads)):
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-3, (err, base_err)


# gpt-oss's attention (head_dim 64, 64 query heads over 8 kv heads here scaled to 16 over 2;
# sliding layers of window 128, full layers; no soft-cap), real launch shapes.
GPU_SINK_CASES = [(2, 16, 2, 300, 64, None, 128, True), (1, 16, 2, 1000, 64, None, None, True)]


@cuda_only
@pytest.mark.parametrize("case", GPU_SINK_CASES, ids=lambda c: f"s{c[3]}-w{c[6]}")
def test_cuda_sinks_fp32_real_blocks(case, device):
    q, k, v, g = _inputs(case, device, q_gain=4.0)
    sinks = _sinks(case[1], device)
    out, grads = _run_with_sinks(q, k, v, sinks, g, **_kw(case))
    want_out, want_grads = _truth_with_sinks(q, k, v, sinks, g, **_kw(case))
    torch.testing.assert_close(out.double(), want_out, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-3)


@cuda_only
@pytest.mark.parametrize("case", GPU_SINK_CASES, ids=lambda c: f"s{c[3]}-w{c[6]}")
def test_cuda_sinks_bf16_as_accurate_as_gpt_oss_eager(case, device):
    # bf16 kernel error (vs float64 truth) within a small factor of the error of gpt-oss's eager
    # attention run in bf16 (bf16 scores, sinks and probabilities), sinks' gradient included.
    q, k, v, g = _inputs(case, device, dtype=torch.bfloat16, q_gain=4.0)
    sinks = _sinks(case[1], device, dtype=torch.bfloat16)
    kw = _kw(case)
    out, grads = _run_with_sinks(q, k, v, sinks, g, **kw)
    want_out, want_grads = _truth_with_sinks(q, k, v, sinks, g, **kw)

    def bf16_eager(q, k, v, sinks, **_):
        grp = q.shape[1] // k.shape[1]
        s = q @ k.repeat_interleave(grp, 1).mT * kw["scale"]
        keep = fa.keep_pattern(q.shape[2], kw["causal"], kw["sliding_window"], q.device)
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        column = sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)
        p = torch.softmax(torch.cat([s, column], -1), -1)[..., :-1]
        return p @ v.repeat_interleave(grp, 1)

    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    base_out = bf16_eager(*leaves)
    base_grads = torch.autograd.grad(base_out, leaves, g)
    for got, base, want in zip((out, *grads), (base_out, *base_grads), (want_out, *want_grads)):
        err = (got.double() - want).abs().max().item()
        base_err = (base.double() - want).abs().max().item()
        assert err <= 2 * base_err + 1e-3, (err, base_err)
