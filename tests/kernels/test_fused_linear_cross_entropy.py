"""Fused linear cross-entropy vs the full-logits reference: loss and gradients, in chunks."""

import pytest
import torch

import fastlm.kernels.fused_linear_cross_entropy as flce_mod
from fastlm.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
    fused_linear_cross_entropy_triton,
)

TOL = dict(atol=1e-6, rtol=1e-5)  # fp32
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
# the Triton launcher (the interpreter on CPU) and the public function (its device dispatch)
BOTH_PATHS = pytest.mark.parametrize(
    "fn", [fused_linear_cross_entropy_triton, fused_linear_cross_entropy]
)
H = 24


def _inputs(device, n=11, v=100, bias=False, dtype=torch.float32, seed=0, weight_grad=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g) * 0.8
    weight = torch.randn(v, H, generator=g) * 0.5  # logits of a few units: softmax not one-hot
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = -100
    labels[n - 2] = -100
    hidden = hidden.to(device, dtype).requires_grad_()
    weight = weight.to(device, dtype).requires_grad_(weight_grad)
    b = (torch.randn(v, generator=g) * 0.3).to(device, dtype).requires_grad_() if bias else None
    return hidden, weight, labels.to(device), b


def _loss_and_grads(fn, hidden, weight, labels, bias, grad_scale=1.0, **kw):
    loss = fn(hidden, weight, labels, bias=bias, **kw)
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(loss * grad_scale, leaves)
    return loss.detach(), grads


def _check(fn, hidden, weight, labels, bias, tol=TOL, grad_scale=1.0, **kw):
    ref_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
    loss, grads = _loss_and_grads(fn, hidden, weight, labels, bias, grad_scale, **kw)
    ref_loss, ref_grads = _loss_and_grads(
        fused_linear_cross_entropy_reference, hidden, weight, labels, bias, grad_scale, **ref_kw
    )
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss, ref_loss.float(), **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


@BOTH_PATHS
@pytest.mark.parametrize(
    "n, v, bias, softcap",
    [(11, 100, False, None), (7, 37, True, None), (13, 100, True, 2.5), (9, 53, False, 30.0)],
)
def test_matches_reference(device, fn, n, v, bias, softcap):
    hidden, weight, labels, b = _inputs(device, n=n, v=v, bias=bias)
    _check(fn, hidden, weight, labels, b, softcap=softcap, chunk_size=4)


@BOTH_PATHS
def test_grad_output_not_one(device, fn):
    hidden, weight, labels, b = _inputs(device, n=9, v=37, bias=True)
    _check(fn, hidden, weight, labels, b, grad_scale=3.0, softcap=4.0, chunk_size=4)


@BOTH_PATHS
def test_custom_ignore_index_and_frozen_weight(device, fn):
    hidden, weight, labels, _ = _inputs(device, n=9, v=37, weight_grad=False)
    labels[labels == -100] = 3
    labels[0] = labels[4] = -1
    _check(fn, hidden, weight, labels, None, ignore_index=-1, chunk_size=4)
    loss = fn(hidden, weight, labels, ignore_index=-1, chunk_size=4)
    loss.backward()
    assert weight.grad is None and hidden.grad is not None


@BOTH_PATHS
def test_all_ignored_gives_zero(device, fn):
    hidden, weight, labels, b = _inputs(device, n=7, v=37, bias=True)
    labels.fill_(-100)
    loss = fn(hidden, weight, labels, bias=b, chunk_size=4)
    gh, gw, gb = torch.autograd.grad(loss, (hidden, weight, b))
    assert loss.item() == 0.0
    for g in (gh, gw, gb):
        assert torch.isfinite(g).all() and (g == 0).all()


@BOTH_PATHS
@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch_accumulation(device, fn, as_tensor):
    # Two micro-batches, each divided by the total item count, sum to the big batch's mean.
    hidden, weight, labels, b = _inputs(device, n=12, v=53, bias=True)
    total = int((labels != -100).sum())
    num_items = torch.tensor(total, device=device) if as_tensor else total
    k = 5
    loss = sum(
        fn(hidden[s], weight, labels[s], bias=b, num_items_in_batch=num_items, chunk_size=4)
        for s in (slice(0, k), slice(k, None))
    )
    grads = torch.autograd.grad(loss, (hidden, weight, b))
    ref_loss, ref_grads = _loss_and_grads(
        fused_linear_cross_entropy_reference, hidden, weight, labels, b
    )
    torch.testing.assert_close(loss.detach(), ref_loss, **TOL)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **TOL)
    # and each micro-batch alone matches the reference with the same num_items_in_batch
    _check(fn, hidden, weight, labels, b, num_items_in_batch=num_items, chunk_size=4)


def test_cpu_path_and_triton_path_agree(device):
    hidden, weight, labels, b = _inputs(device, n=13, v=100, bias=True)
    kw = dict(bias=b, softcap=3.0, chunk_size=5)
    lt, gt = _loss_and_grads(fused_linear_cross_entropy_triton, hidden, weight, labels, **kw)
    args = (labels, b, -100, None, 3.0, 5)
    loss_torch = flce_mod._flce(hidden, weight, *args, use_kernel=False)
    gc = torch.autograd.grad(loss_torch, (hidden, weight, b))
    torch.testing.assert_close(lt, loss_torch.detach(), **TOL)
    for x, y in zip(gt, gc, strict=True):
        torch.testing.assert_close(x, y, **TOL)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_never_materialises_full_logits(device, monkeypatch, use_kernel):
    seen = []
    name = "_rows_triton" if use_kernel else "_rows_torch"
    inner = getattr(flce_mod, name)

    def record(logits, *args):
        seen.append(tuple(logits.shape))
        return inner(logits, *args)

    monkeypatch.setattr(flce_mod, name, record)
    n, v = 11, 37
    hidden, weight, labels, _ = _inputs(device, n=n, v=v)
    # explicit chunk size
    loss = flce_mod._flce(hidden, weight, labels, None, -100, None, None, 4, use_kernel=use_kernel)
    loss.backward()
    # The CPU torch path drops rows without a label first (no device sync on a CPU).
    rows = n if use_kernel or device == "cuda" else int((labels != -100).sum())
    if not use_kernel and device == "cpu":
        assert rows == n - 2  # _inputs ignores two rows: they never reach a logits chunk

    def chunks(size):
        return [(min(size, rows - start), v) for start in range(0, rows, size)]

    assert seen == chunks(4)
    # default chunk size, with the byte budget shrunk to 3 rows of fp32 logits
    seen.clear()
    monkeypatch.setattr(flce_mod, "_CHUNK_BYTES", 3 * v * 4 + 7)
    ref = flce_mod._flce(hidden, weight, labels, None, -100, None, None, None, use_kernel)
    assert seen == chunks(3)
    torch.testing.assert_close(ref, loss, **TOL)


@pytest.mark.parametrize("use_kernel", [True, False])
def test_chunks_share_one_logits_buffer(device, monkeypatch, use_kernel):
    """The step's loss holds one chunk of logits, not two: every chunk is written into the
    same buffer (a fresh product per chunk is allocated while the last one is still held)."""
    storages = []
    name = "_rows_triton" if use_kernel else "_rows_torch"
    inner = getattr(flce_mod, name)

    def record(logits, *args):
        storages.append(logits.untyped_storage().data_ptr())
        return inner(logits, *args)

    monkeypatch.setattr(flce_mod, name, record)
    hidden, weight, labels, bias = _inputs(device, n=11, v=37, bias=True)
    loss = flce_mod._flce(hidden, weight, labels, bias, -100, None, None, 3, use_kernel=use_kernel)
    loss.backward()
    assert len(storages) >= 3 and len(set(storages)) == 1, storages


@pytest.mark.parametrize("chunk, n", [(3, 11), (None, 11), (64, 11)])
@pytest.mark.parametrize("need_h", [True, False])
def test_scratch_bytes_are_the_blocks_the_loss_allocates(device, monkeypatch, chunk, n, need_h):
    """What layer graphs reserve for the loss (``scratch_bytes``) is the size of its two large
    blocks: the one logits buffer (the chunk's rows, or every row if fewer, x V) and grad_hidden
    when it is needed."""
    sizes = []
    name = "_rows_triton"
    inner = getattr(flce_mod, name)

    def record(logits, *args):
        sizes.append(logits.untyped_storage().nbytes())
        return inner(logits, *args)

    monkeypatch.setattr(flce_mod, name, record)
    hidden, weight, labels, _ = _inputs(device, n=n, v=37)
    cfg = (-100, None, chunk, (need_h, True, False), True)
    denom = torch.tensor(float(n), device=device)
    _, grad_h, _, _ = flce_mod._loss_and_grads(
        hidden.detach(), weight.detach(), None, labels, denom, cfg
    )
    assert len(set(sizes)) == 1 and (grad_h is not None) == need_h, sizes
    grad_bytes = grad_h.numel() * grad_h.element_size() if need_h else 0
    assert flce_mod.scratch_bytes(hidden, weight, cfg) == sizes[0] + grad_bytes


def test_default_chunk_size():
    for v, dtype in [(128256, torch.bfloat16), (262144, torch.bfloat16), (151936, torch.float32)]:
        rows = flce_mod._default_chunk_size(v, dtype)
        nbytes = rows * v * torch.empty((), dtype=dtype).element_size()
        assert rows >= 1 and nbytes <= 256 * 2**20 and nbytes + v * 4 > 256 * 2**20 - v * 4
    assert flce_mod._default_chunk_size(2**30, torch.float32) == 1


@BOTH_PATHS
def test_no_grad_forward(device, fn):
    hidden, weight, labels, b = _inputs(device, n=9, v=53, bias=True)
    with torch.no_grad():
        loss = fn(hidden, weight, labels, bias=b, softcap=5.0, chunk_size=4)
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels, bias=b, softcap=5.0)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, ref, **TOL)


def test_autocast_compute_dtype(device):
    # Under autocast the logits come from a bf16 matmul, as in HF; compare with the reference
    # under the same autocast (bf16-level tolerance: the summation orders differ).
    inputs = _inputs(device, n=9, v=53, bias=True)  # hidden, weight, labels, bias
    with torch.autocast(device, dtype=torch.bfloat16):
        _check(fused_linear_cross_entropy, *inputs, tol=BF16_TOL, chunk_size=4)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_cuda(device, softcap):
    if device != "cuda":
        pytest.skip("bf16 tl.dot/loads are only meaningful on the GPU")
    inputs = _inputs(device, n=301, v=5003, bias=True, dtype=torch.bfloat16)
    _check(fused_linear_cross_entropy, *inputs, tol=BF16_TOL, softcap=softcap, chunk_size=64)
