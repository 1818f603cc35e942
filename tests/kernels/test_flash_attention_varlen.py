"""Packed (variable-length) flash attention: the Triton launchers (interpreter on CPU) against
float64 autograd of the per-sequence reference, and leak tests: changing one sequence changes
nothing, not one bit, of the others' outputs and gradients.

Triton runs fp32 on CPU (the interpreter's bf16 dot is wrong); on CUDA the same tests run, plus the
real launch shapes (head_dim 64/128/256) in fp32 and bf16. The fixed-length kernels' own tests:
tests/kernels/test_flash_attention.py.
"""

import itertools

import pytest
import torch

from fastlm.kernels import flash_attention as fa

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (real launch shapes, bf16)")

# (q heads, kv heads, sequence lengths, head_dim, softcap, sliding window, causal). Lengths of 1,
# of 0, and none a multiple of the interpreter's 16 x 16 tiles except 16 itself.
CASES = [
    pytest.param((4, 2, (37, 1, 16, 5, 50), 16, 2.0, 5, True), id="gqa-cap-window5"),
    pytest.param((2, 2, (17, 33, 1), 32, None, None, True), id="mha-causal-d32"),
    pytest.param((2, 1, (40, 3, 1, 19), 24, 1.5, None, False), id="noncausal-cap-d24"),
    pytest.param((4, 2, (1, 45, 20, 7), 16, None, 20, True), id="gqa-window20"),
    pytest.param((3, 1, (0, 33, 0, 2), 32, 2.0, None, True), id="group3-cap-empty-seqs"),
]
TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel vs float64 truth, as for the fixed-length kernels


def _cu(lengths, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)


def _inputs(case, device, dtype=torch.float32, q_gain=1.5, seed=0):
    """(q, k, v, upstream gradient g) as (T, H, D) tokens, cu_seqlens, max_seqlen."""
    hq, hkv, lengths, d = case[:4]
    total = sum(lengths)
    gen = torch.Generator().manual_seed(seed)
    shapes = ((total, hq, d), (total, hkv, d), (total, hkv, d), (total, hq, d))
    q, k, v, g = (torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes)
    tensors = [t.to(device, dtype) for t in (q * q_gain, k, v, g)]
    return tensors, _cu(lengths, device), max(lengths)


def _kw(case):
    return dict(scale=case[3] ** -0.5, softcap=case[4], sliding_window=case[5], causal=case[6])


def _truth(q, k, v, g, cu, max_len, **kw):
    """float64 output and (dq, dk, dv) by autograd through the per-sequence reference."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = fa.flash_attention_varlen_reference(*leaves, cu, max_len, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, g.double())


def _run(q, k, v, g, cu, max_len, fn=fa.flash_attention_varlen_triton, **kw):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves, cu, max_len, **kw)
    return out.detach(), torch.autograd.grad(out, leaves, g)


def _assert_matches_truth(case, device, **run_kw):
    (q, k, v, g), cu, max_len = _inputs(case, device)
    out, grads = _run(q, k, v, g, cu, run_kw.pop("max_len", max_len), **run_kw, **_kw(case))
    want_out, want_grads = _truth(q, k, v, g, cu, max_len, **_kw(case))
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), want_out, **TOL)
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape and got.dtype == q.dtype
        torch.testing.assert_close(got.double(), want, **TOL)
    return grads


@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_match_float64(case, device):
    _assert_matches_truth(case, device)


@pytest.mark.parametrize("case", CASES[:3])
def test_lse_is_each_sequences_own(case, device):
    # lse2 (1, Hq, T): the base-2 log-sum-exp of each query's scores over its own sequence only.
    (q, k, v, _), cu, max_len = _inputs(case, device)
    rows = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    _, lse2 = fa.flash_attention_forward_triton(*rows, cu_seqlens=cu, max_seqlen=max_len,
                                                **_kw(case))  # fmt: skip
    scale, cap, window, causal = _kw(case).values()
    bounds = cu.tolist()
    for a, e in zip(bounds, bounds[1:]):
        qs, ks = rows[0][..., a:e, :].double(), rows[1][..., a:e, :].double()
        s = qs @ ks.repeat_interleave(q.shape[1] // k.shape[1], 1).mT * scale
        t = cap * torch.tanh(s / cap) if cap else s
        keep = fa.keep_pattern(e - a, causal, window, device)
        want = torch.logsumexp(t.masked_fill(~keep, float("-inf")), -1) / torch.log(
            torch.tensor(2.0, dtype=torch.float64)
        )
        torch.testing.assert_close(lse2[..., a:e].double(), want, **TOL)


def test_each_sequence_gets_the_fixed_length_kernels_result(device):
    # A packed program works in positions local to its sequence with the fixed-length tiles, so
    # each sequence gets what the fixed-length kernel gives it alone: the same bits in the
    # interpreter (on a GPU, compiled code may differ in the last bits).
    case = CASES[0].values[0]
    (q, k, v, g), cu, max_len = _inputs(case, device)
    out, grads = _run(q, k, v, g, cu, max_len, **_kw(case))
    bounds = cu.tolist()
    for a, e in zip(bounds, bounds[1:]):
        rows = [t[a:e].unsqueeze(0).transpose(1, 2) for t in (q, k, v, g)]
        one, one_grads = _run(*rows[:3], rows[3], None, None, fn=_fixed, **_kw(case))
        for got, want in zip((out, *grads), (one, *one_grads)):
            want = want[0].transpose(0, 1)
            if device == "cpu":
                assert torch.equal(got[a:e], want)
            else:
                torch.testing.assert_close(got[a:e], want, **TOL)


def _fixed(q, k, v, _cu, _max_len, **kw):
    return fa.flash_attention_triton(q, k, v, **kw)


def test_max_seqlen_above_the_longest_sequence(device):
    # Callers may pass a padded maximum: the extra query and key blocks return at once.
    _assert_matches_truth(CASES[1].values[0], device, max_len=100)


def test_uneven_blocks_and_determinism(device):
    # Query and key tiles of different sizes in every kernel, as in the fixed-length test.
    case = (4, 2, (45, 3, 29, 1), 16, 2.0, 9, True)
    blocks = {"fwd": fa.Blocks(32, 16), "dq": fa.Blocks(16, 32), "dkdv": fa.Blocks(32, 16)}
    grads = _assert_matches_truth(case, device, blocks=blocks)
    (q, k, v, g), cu, max_len = _inputs(case, device)
    _, again = _run(q, k, v, g, cu, max_len, blocks=blocks, **_kw(case))
    for a, b in zip(grads, again):  # no atomics: bit-identical
        assert torch.equal(a, b)


# --- Attention sinks (gpt-oss) ------------------------------------------------------------------

# GQA with sliding and full attention as gpt-oss has them; sequences of length 0 and 1 (a query
# that sees only itself and the sink), a soft-capped and a bidirectional case.
SINK_CASES = [
    pytest.param((4, 2, (37, 1, 16, 5, 50), 16, None, 5, True), id="gqa-window5"),
    pytest.param((4, 2, (1, 45, 20, 7), 16, None, None, True), id="gqa-causal"),
    pytest.param((6, 2, (0, 33, 0, 2, 19), 32, None, 20, True), id="group3-window20-empty"),
    pytest.param((2, 1, (40, 3, 1, 19), 24, 1.5, None, False), id="bidirectional-cap"),
]


def _sinks(n_heads, device, seed=1):
    """~N(0, 1.5) logits, the last head's 4.0 (the sink takes most of the softmax)."""
    gen = torch.Generator().manual_seed(seed)
    sinks = torch.randn(n_heads, generator=gen, dtype=torch.float64) * 1.5
    sinks[-1] = 4.0
    return sinks.to(device, torch.float32)


@pytest.mark.parametrize("case", SINK_CASES)
def test_sinks_forward_lse_and_backward_match_float64(case, device):
    # Output, lse2 (each sequence's own keys and the sink) and (dq, dk, dv, dsinks): dsinks sums
    # every sequence's queries, and nothing else.
    (q, k, v, g), cu, max_len = _inputs(case, device)
    sinks = _sinks(case[0], device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out = fa.flash_attention_varlen_triton(*leaves[:3], cu, max_len, sinks=leaves[3],
                                           **_kw(case))  # fmt: skip
    grads = torch.autograd.grad(out, leaves, g)
    truth = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    want = fa.flash_attention_varlen_reference(*truth[:3], cu, max_len, sinks=truth[3],
                                               **_kw(case))  # fmt: skip
    want_grads = torch.autograd.grad(want, truth, g.double())
    torch.testing.assert_close(out.double(), want.detach(), **TOL)
    for got, expected in zip(grads, want_grads, strict=True):
        assert got.shape == expected.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, **TOL)
    rows = [t.unsqueeze(0).transpose(1, 2) for t in (q, k, v)]
    _, lse2 = fa.flash_attention_forward_triton(*rows, cu_seqlens=cu, max_seqlen=max_len,
                                                sinks=sinks, **_kw(case))  # fmt: skip
    scale, cap, window, causal = _kw(case).values()
    bounds = cu.tolist()
    for a, e in zip(bounds, bounds[1:]):
        qs, ks = rows[0][..., a:e, :].double(), rows[1][..., a:e, :].double()
        s = qs @ ks.repeat_interleave(q.shape[1] // k.shape[1], 1).mT * scale
        t = cap * torch.tanh(s / cap) if cap else s
        t = t.masked_fill(~fa.keep_pattern(e - a, causal, window, device), float("-inf"))
        t = torch.cat([t, sinks.double().view(1, -1, 1, 1).expand(*t.shape[:3], 1)], -1)
        expected = torch.logsumexp(t, -1) / torch.log(torch.tensor(2.0, dtype=torch.float64))
        torch.testing.assert_close(lse2[..., a:e].double(), expected, **TOL)


def test_sinks_each_sequence_gets_the_fixed_length_kernels_result(device):
    # Packed with sinks, each sequence's output and dq, dk, dv are what the fixed-length kernel
    # gives it alone (the same bits in the interpreter), and dsinks is the sum of theirs.
    case = SINK_CASES[0].values[0]
    (q, k, v, g), cu, max_len = _inputs(case, device)
    sinks = _sinks(case[0], device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out = fa.flash_attention_varlen_triton(*leaves[:3], cu, max_len, sinks=leaves[3],
                                           **_kw(case))  # fmt: skip
    grads = torch.autograd.grad(out, leaves, g)
    bounds, dsinks = cu.tolist(), torch.zeros_like(sinks)
    for a, e in zip(bounds, bounds[1:]):
        one = [t[a:e].unsqueeze(0).transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
        one.append(sinks.detach().requires_grad_())
        o = fa.flash_attention_triton(*one[:3], sinks=one[3], **_kw(case))
        one_grads = torch.autograd.grad(o, one, g[a:e].unsqueeze(0).transpose(1, 2))
        dsinks += one_grads[3]
        for got, want in zip((out, *grads[:3]), (o, *one_grads[:3])):
            want = want[0].transpose(0, 1)
            if device == "cpu":
                assert torch.equal(got[a:e], want)
            else:
                torch.testing.assert_close(got[a:e], want, **TOL)
    torch.testing.assert_close(grads[3], dsinks, atol=1e-6, rtol=1e-6)


def test_sinks_leave_other_sequences_alone(device):
    # Redrawing one sequence changes neither another sequence's outputs nor its gradients.
    case = LEAK_CASES[0].values[0]
    (q, k, v, g), cu, max_len = _inputs(case, device)
    sinks = _sinks(case[0], device)
    a, e = cu[2].item(), cu[3].item()
    before = _run(q, k, v, g, cu, max_len, sinks=sinks, **_kw(case))
    after = _run(*_resampled((q, k, v, g), a, e, "noise", seed=1), cu, max_len, sinks=sinks,
                 **_kw(case))  # fmt: skip
    others = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    others[a:e] = False
    for x, y in zip((before[0], *before[1]), (after[0], *after[1])):
        assert torch.equal(x[others], y[others])
        assert not torch.equal(x[a:e], y[a:e])


def test_sinks_public_function_dispatch(device, monkeypatch):
    case = SINK_CASES[0].values[0]
    (q, k, v, _), cu, max_len = _inputs(case, device)
    sinks = _sinks(case[0], device)
    out = fa.flash_attention_varlen(q, k, v, cu, max_len, sinks=sinks, **_kw(case))
    if device == "cpu":  # CPU tensors run the reference
        want = fa.flash_attention_varlen_reference(q, k, v, cu, max_len, sinks=sinks, **_kw(case))
        assert torch.equal(out, want)
    monkeypatch.setattr(fa, "use_triton", lambda t: True)
    got = fa.flash_attention_varlen(q, k, v, cu, max_len, sinks=sinks, **_kw(case))
    torch.testing.assert_close(got, out, **TOL)


# --- No attention across a sequence boundary ----------------------------------------------------

LEAK_CASES = [
    pytest.param((4, 2, (23, 1, 40, 9, 17), 16, 2.0, 12, True), id="causal-gqa-window-cap"),
    pytest.param((2, 1, (23, 1, 40, 9, 17), 32, None, None, False), id="bidirectional-gqa"),
]


def _resampled(tensors, a, e, how, seed):
    gen = torch.Generator().manual_seed(seed)
    out = [t.clone() for t in tensors]
    for t in out:
        noise = torch.randn(t[a:e].shape, generator=gen).to(t)
        t[a:e] = float("nan") if how == "nan" else noise * 3
    return out


@pytest.mark.parametrize("changed", [0, 2, 4], ids=["first", "middle", "last"])
@pytest.mark.parametrize("case", LEAK_CASES)
def test_changing_one_sequence_changes_nothing_else(case, changed, device):
    # q, k, v and the upstream gradient of one sequence are redrawn: every other token's output
    # and dq, dk, dv must keep every bit (the kernels never load another sequence's tokens),
    # and the redrawn sequence's own results must change (the check can fail).
    (q, k, v, g), cu, max_len = _inputs(case, device)
    a, e = cu[changed].item(), cu[changed + 1].item()
    before = _run(q, k, v, g, cu, max_len, **_kw(case))
    after = _run(*_resampled((q, k, v, g), a, e, "noise", seed=1), cu, max_len, **_kw(case))
    others = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    others[a:e] = False
    for x, y in zip((before[0], *before[1]), (after[0], *after[1])):
        assert torch.equal(x[others], y[others])
        assert not torch.equal(x[a:e], y[a:e])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("poisoned", [0, 2, 4], ids=["first", "middle", "last"])
@pytest.mark.parametrize("case", LEAK_CASES)
def test_a_nan_sequence_stays_in_its_sequence(case, poisoned, device):
    # Stricter than redrawing: one NaN token read by another sequence's program would spread
    # through any product with it, masked or not (0 * NaN = NaN).
    (q, k, v, g), cu, max_len = _inputs(case, device)
    a, e = cu[poisoned].item(), cu[poisoned + 1].item()
    out, grads = _run(*_resampled((q, k, v, g), a, e, "nan", seed=1), cu, max_len, **_kw(case))
    want_out, want_grads = _run(q, k, v, g, cu, max_len, **_kw(case))
    for got, want in zip((out, *grads), (want_out, *want_grads)):
        assert got[a:e].isnan().all()
        assert torch.equal(torch.cat([got[:a], got[e:]]), torch.cat([want[:a], want[e:]]))


# --- The public functions and their checks -------------------------------------------------------


def test_public_function_dispatch(device, monkeypatch):
    case = CASES[0].values[0]
    (q, k, v, _), cu, max_len = _inputs(case, device)
    out = fa.flash_attention_varlen(q, k, v, cu, max_len, **_kw(case))
    if device == "cpu":  # CPU tensors run the reference
        want = fa.flash_attention_varlen_reference(q, k, v, cu, max_len, **_kw(case))
        assert torch.equal(out, want)
    calls = []
    monkeypatch.setattr(fa, "use_triton", lambda t: True)
    monkeypatch.setattr(
        fa, "flash_attention_varlen_triton", lambda *a, **kw: calls.append(1) or out
    )
    fa.flash_attention_varlen(q, k, v, cu, max_len, **_kw(case))
    assert calls == [1]


@pytest.mark.parametrize(
    "cu, max_len, match",
    [
        ([0, 3, 8], 5, "rise from 0"),  # ends short of the 10 tokens
        ([1, 4, 10], 6, "rise from 0"),
        ([0, 6, 4, 10], 6, "rise from 0"),
        ([0, 3, 10], 5, "longer than max_seqlen"),
    ],
)
def test_bad_cu_seqlens_raise(cu, max_len, match):
    q = torch.zeros(10, 2, 16)
    cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(ValueError, match=match):
        fa.flash_attention_varlen_reference(q, q, q, cu, max_len, scale=1.0)


def test_bad_inputs_raise():
    q, cu = torch.zeros(10, 4, 16), torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="int32"):
        fa.flash_attention_varlen_triton(q, q, q, cu.long(), 6, scale=1.0)
    with pytest.raises(ValueError, match=r"\(T, Hq, D\)"):
        fa.flash_attention_varlen_triton(q[None], q[None], q[None], cu, 6, scale=1.0)
    with pytest.raises(ValueError, match="multiple"):
        fa.flash_attention_varlen_triton(q, q[:, :3], q[:, :3], cu, 6, scale=1.0)
    with pytest.raises(ValueError, match="causal"):
        fa.flash_attention_varlen_triton(q, q, q, cu, 6, scale=1.0, sliding_window=3, causal=False)
    with pytest.raises(ValueError, match="max_seqlen"):
        fa.flash_attention_varlen_triton(q, q, q, cu, -1, scale=1.0)
    many = torch.arange(70_000, dtype=torch.int32)  # 69,999 sequences: past CUDA's grid limit
    with pytest.raises(ValueError, match="split the batch"):
        fa.flash_attention_varlen_triton(q, q, q, many, 1, scale=1.0)
    rows = torch.zeros(2, 4, 5, 16)  # packed sequences live in one row
    with pytest.raises(ValueError, match="one row"):
        fa.flash_attention_forward_triton(rows, rows, rows, scale=1.0, cu_seqlens=cu, max_seqlen=6)


# --- CUDA only: real launch shapes, bf16 ---------------------------------------------------------

GPU_CASES = [
    (8, 4, (300, 1, 129, 64), 64, 50.0, 128, True),
    (8, 4, (1000, 17, 513), 128, None, None, True),
    (8, 4, (777, 1, 200, 256), 256, 50.0, 200, True),
    (4, 4, (200, 3, 100), 256, 30.0, None, False),
]


@cuda_only
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c[3]}")
def test_cuda_fp32_real_blocks(case, device):
    (q, k, v, g), cu, max_len = _inputs(case, device, q_gain=4.0)
    out, grads = _run(q, k, v, g, cu, max_len, **_kw(case))
    want_out, want_grads = _truth(q, k, v, g, cu, max_len, **_kw(case))
    torch.testing.assert_close(out.double(), want_out, atol=1e-4, rtol=1e-4)
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-4, rtol=1e-3)


@cuda_only
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"d{c[3]}")
def test_cuda_bf16_as_accurate_as_the_fixed_length_kernel(case, device):
    # bf16 error (vs float64 truth) of the packed launch within a small factor of the error of
    # the fixed-length kernel run on each sequence alone (its own test bounds that one).
    (q, k, v, g), cu, max_len = _inputs(case, device, dtype=torch.bfloat16, q_gain=4.0)
    out, grads = _run(q, k, v, g, cu, max_len, **_kw(case))
    want_out, want_grads = _truth(q, k, v, g, cu, max_len, **_kw(case))
    bounds = cu.tolist()
    for a, e in zip(bounds, bounds[1:]):
        rows = [t[a:e].unsqueeze(0).transpose(1, 2) for t in (q, k, v, g)]
        one, one_grads = _run(*rows[:3], rows[3], None, None, fn=_fixed, **_kw(case))
        for got, base, want in zip((out, *grads), (one, *one_grads), (want_out, *want_grads)):
            err = (got[a:e].double() - want[a:e]).abs().max().item()
            base_err = (base[0].transpose(0, 1).double() - want[a:e]).abs().max().item()
            assert err <= 2 * base_err + 1e-3, (a, e, err, base_err)


@cuda_only
@pytest.mark.parametrize("window", [128, None], ids=["sliding128", "full"])
def test_cuda_sinks_fp32_real_blocks(window, device):
    # gpt-oss's attention (head_dim 64, GQA, no soft-cap) packed, at the real launch shapes.
    case = (16, 2, (300, 1, 129, 513), 64, None, window, True)
    (q, k, v, g), cu, max_len = _inputs(case, device, q_gain=4.0)
    sinks = _sinks(case[0], device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v, sinks)]
    out = fa.flash_attention_varlen_triton(*leaves[:3], cu, max_len, sinks=leaves[3],
                                           **_kw(case))  # fmt: skip
    grads = torch.autograd.grad(out, leaves, g)
    truth = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    want = fa.flash_attention_varlen_reference(*truth[:3], cu, max_len, sinks=truth[3],
                                               **_kw(case))  # fmt: skip
    want_grads = torch.autograd.grad(want, truth, g.double())
    torch.testing.assert_close(out.double(), want.detach(), atol=1e-4, rtol=1e-4)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-3)


def _compiled_variants(kernel) -> int:
    # Triton's per-device caches: (compiled kernels, keys, target, backend, binder) each.
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@cuda_only
def test_token_counts_compile_no_new_variants(device):
    """A packed row's length follows the batch: a count that turns a multiple of 16 (or 1) must
    reuse the compiled kernels, not compile a variant mid-training (do_not_specialize)."""
    kernels = (fa._fwd_kernel, fa._bwd_dq_kernel, fa._bwd_dkdv_kernel)
    case = (4, 2, (37, 20), 64, None, None, True)
    (q, k, v, g), cu, max_len = _inputs(case, device, dtype=torch.bfloat16)
    _run(q, k, v, g, cu, max_len, **_kw(case))  # total 57: compiles once
    before = [_compiled_variants(kernel) for kernel in kernels]
    for lengths in ((40, 24), (1,), (47, 33, 16)):  # totals 64, 1, 96
        (q, k, v, g), cu, max_len = _inputs((*case[:2], lengths, *case[3:]), device, torch.bfloat16)
        _run(q, k, v, g, cu, max_len, **_kw(case))
    assert [_compiled_variants(kernel) for kernel in kernels] == before
