"""Fused LM head + cross-entropy that never materialises the full N x V logits.

Per row i (hidden already shifted, so row i predicts label y_i), with D the denominator:

    z_i  = h_i @ W.T (+ b)             in the compute dtype, then upcast to fp32
    s_i  = c * tanh(z_i / c)           optional soft-capping (Gemma 2), else s_i = z_i
    l_i  = logsumexp(s_i) - s_i[y_i]   (0 when y_i == ignore_index)
    loss = sum_i l_i / D               D = num_items_in_batch, else max(#non-ignored rows, 1)

    dloss/dz_ij = (softmax(s_i)_j - [j == y_i]) * (1 - tanh^2(z_ij / c)) / D   (0 for ignored rows)

Rows are processed in chunks: one matmul gives a chunk's logits, a row kernel makes an online
max / log-sum-exp pass over vocab blocks and a second pass that overwrites the logits with
dloss/dz, and two more matmuls turn that into grad_hidden (dz @ W) and grad_weight (dz.T @ h).
The gradient is therefore computed during the forward; backward only scales it by grad_output.
The denominator stays on the device (read by the kernel through a pointer): no host sync.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastlm.kernels._dispatch import gpu_launch_shapes, use_triton

_CHUNK_BYTES = 256 * 1024 * 1024  # budget for one chunk's logits, in the compute dtype


@triton.jit
def _tanh(x):
    # libdevice tanh is missing in the interpreter, so build it from exp. Working on |x| keeps
    # e = exp(-2|x|) in (0, 1] (no overflow); near 0 a Taylor series avoids the cancellation in
    # 1 - e that would cost relative precision (error of the series < 3e-11 for |x| < 0.1).
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    a2 = a * a
    small = a * (1.0 + a2 * (-0.3333333333333333 + a2 * (0.13333333333333333 + a2 * -0.05396825)))
    t = tl.where(a < 0.1, small, big)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _flce_row_kernel(
    logits_ptr,  # (rows, V) chunk logits; overwritten with dloss/dlogits when COMPUTE_GRAD
    stride_row,
    labels_ptr,  # (rows,) int64
    loss_ptr,  # (rows,) fp32 per-row loss (unscaled)
    denom_ptr,  # () fp32 denominator D
    V,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    label = tl.load(labels_ptr + row)
    valid = label != ignore_index

    # Pass 1: online max / sum of exp over the vocab blocks.
    m = float("-inf")
    d = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        s = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            s = softcap * _tanh(s / softcap)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        m = m_new
    lse = m + tl.log(d)

    # Target logit, read before pass 2 overwrites the row.
    s_y = tl.load(row_ptr + tl.where(valid, label, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        s_y = softcap * _tanh(s_y / softcap)
    tl.store(loss_ptr + row, tl.where(valid, lse - s_y, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: dloss/dz = (softmax(s) - onehot(y)) * ds/dz * scale, ds/dz = 1 - tanh^2(z/c).
        scale = tl.where(valid, 1.0 / tl.load(denom_ptr), 0.0)
        for start in range(0, V, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < V
            z = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                g = tl.exp(softcap * t - lse)
                g = tl.where(cols == label, g - 1.0, g) * (1.0 - t * t)
            else:
                g = tl.exp(z - lse)
                g = tl.where(cols == label, g - 1.0, g)
            tl.store(row_ptr + cols, (g * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def _rows_triton(logits, labels, loss_rows, denom, ignore_index, softcap, compute_grad):
    """Row kernel on one chunk: per-row loss into ``loss_rows``, dloss/dlogits into ``logits``."""
    rows, V = logits.shape
    assert logits.stride(1) == 1 and labels.is_contiguous() and loss_rows.is_contiguous()
    # Big blocks on GPU (V is 128k-262k); small ones in the interpreter so tests loop over blocks.
    block_v = min(4096 if gpu_launch_shapes(logits) else 64, triton.next_power_of_2(V))
    num_warps = 16 if block_v >= 4096 else (8 if block_v >= 1024 else 4)
    _flce_row_kernel[(rows,)](
        logits,
        logits.stride(0),
        labels,
        loss_rows,
        denom,
        V,
        ignore_index,
        1.0 if softcap is None else float(softcap),
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_GRAD=compute_grad,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )


def _rows_torch(logits, labels, loss_rows, denom, ignore_index, softcap, compute_grad):
    """The row kernel's work in plain torch (CPU path), on one chunk only."""
    z = logits.float()
    if softcap is not None:
        t = torch.tanh(z / softcap)
        s = softcap * t
    else:
        s = z
    lse = torch.logsumexp(s, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0).unsqueeze(1)
    loss_rows.copy_(torch.where(valid, lse - s.gather(1, safe).squeeze(1), 0.0))
    if compute_grad:
        g = torch.exp(s - lse.unsqueeze(1))
        g.scatter_add_(1, safe, torch.full_like(lse, -1.0).unsqueeze(1))
        if softcap is not None:
            g.mul_(1.0 - t * t)
        g.mul_((valid.float() / denom).unsqueeze(1))
        logits.copy_(g)


def _default_chunk_size(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk so that one chunk's logits take at most ~256 MiB (at least one row)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return max(1, _CHUNK_BYTES // (vocab * itemsize))


def scratch_bytes(hidden: Tensor, weight: Tensor, cfg: tuple) -> int:
    """Bytes of the loss's two large blocks for these inputs, ``_loss_and_grads``'s logits
    buffer (a chunk of rows x the vocabulary) and grad_hidden (when it is needed), in the
    compute dtype; what a CUDA-graph pool must hold free for the loss to be captured in it.

    Usage: ``scratch_bytes(hidden, weight, cfg)`` with the runner's arguments.
    """
    chunk = cfg[2] or _default_chunk_size(weight.shape[0], hidden.dtype)
    logits = min(chunk, hidden.shape[0]) * weight.shape[0] * hidden.element_size()
    return logits + (hidden.numel() * hidden.element_size() if cfg[3][0] else 0)


def _loss_and_grads(hidden, weight, bias, labels, denom, cfg):
    """Chunked forward: returns the loss and the (unscaled by grad_output) input gradients."""
    ignore_index, softcap, chunk_size, needs, use_kernel = cfg
    if not use_kernel and not hidden.is_cuda:
        # On the CPU a boolean index costs no device sync: skip the rows that carry no loss (the
        # prompt and padding of instruction data, often most of a batch). Their gradient is 0.
        keep = (labels != ignore_index).nonzero().squeeze(1)
        if keep.numel() < labels.numel():
            loss, grad_h, grad_w, grad_b = _loss_and_grads(
                hidden[keep], weight, bias, labels[keep], denom, cfg
            )
            if grad_h is not None:
                grad_h = torch.zeros_like(hidden).index_copy_(0, keep, grad_h)
            return loss, grad_h, grad_w, grad_b
    N, _ = hidden.shape
    V = weight.shape[0]
    need_h, need_w, need_b = needs
    grad = need_h or need_w or need_b
    rows_fn = _rows_triton if use_kernel else _rows_torch
    chunk = chunk_size or _default_chunk_size(V, hidden.dtype)
    # One buffer serves every chunk's logits: a fresh product per chunk would be allocated while
    # the previous chunk's was still held, two chunks' worth at the step's loss (512 MiB at
    # Qwen3's vocabulary). Allocated first: in a CUDA-graph pool the largest block then takes the
    # free block reserved for it (scratch_bytes) before a smaller one splits it.
    buffer = torch.empty((min(chunk, N), V), dtype=hidden.dtype, device=hidden.device)
    loss_rows = torch.empty(N, dtype=torch.float32, device=hidden.device)
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = (
        torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    )
    grad_b = torch.zeros(V, dtype=torch.float32, device=hidden.device) if need_b else None
    for start in range(0, N, chunk):
        end = min(start + chunk, N)
        h = hidden[start:end]
        logits = buffer[: end - start]
        if bias is None:
            torch.mm(h, weight.t(), out=logits)
        else:
            torch.addmm(bias, h, weight.t(), out=logits)
        rows_fn(logits, labels[start:end], loss_rows[start:end], denom, ignore_index, softcap, grad)
        if need_h:
            torch.mm(logits, weight, out=grad_h[start:end])
        if need_w:
            if logits.dtype == torch.float32:
                grad_w.addmm_(logits.t(), h)
            else:  # per-chunk product in the compute dtype, accumulated across chunks in fp32
                grad_w.add_(logits.t() @ h)
        if need_b:
            grad_b.add_(logits.sum(0, dtype=torch.float32))
    return loss_rows.sum() / denom, grad_h, grad_w, grad_b


def _call(compute, *args):
    return compute(*args)


# Who runs the chunked loss: ``runner(_loss_and_grads, hidden, weight, bias, labels, denom,
# cfg)`` returns its result. fastlm.offload's layer graphs install one (with offloaded
# checkpointing) that replays it as a CUDA graph in their memory pool; by default, a plain call.
_RUNNER = [_call]


def set_loss_runner(runner: Callable | None) -> Callable:
    """Install who runs the loss's computation (None: a plain call); returns the previous one.

    Usage: ``previous = set_loss_runner(my_runner)``, later ``set_loss_runner(previous)``.
    """
    previous, _RUNNER[0] = _RUNNER[0], runner or _call
    return previous


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, denom, cfg):
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are already chosen
            run = _RUNNER[0]
            loss, gh, gw, gb = run(_loss_and_grads, hidden, weight, bias, labels, denom, cfg)
        ctx.save_for_backward(gh, gw, gb)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        # The loss is a scalar, so d(out)/d(input) = grad_out * (gradient stored by the forward).
        gh, gw, gb = ctx.saved_tensors
        gh = None if gh is None else gh * grad_out
        gw = None if gw is None else (gw * grad_out).to(ctx.weight_dtype)
        gb = None if gb is None else (gb * grad_out).to(ctx.bias_dtype)
        return gh, gw, gb, None, None, None


def _denominator(labels, ignore_index, num_items_in_batch, device) -> Tensor:
    """D as a device fp32 scalar: num_items_in_batch, else the non-ignored count clamped to >= 1."""
    if num_items_in_batch is None:
        return (labels != ignore_index).sum().clamp_min(1).to(torch.float32)
    return torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=device).reshape(())


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype


def _flce(
    hidden, weight, labels, bias, ignore_index, num_items_in_batch, softcap, chunk_size, use_kernel
) -> Tensor:
    H = hidden.shape[-1]
    hidden = hidden.reshape(-1, H)
    labels = labels.reshape(-1).contiguous()
    if weight.dim() != 2 or weight.shape[1] != H or labels.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
            f"labels {tuple(labels.shape)}"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    dtype = _compute_dtype(hidden)
    denom = _denominator(labels, ignore_index, num_items_in_batch, hidden.device)
    bias = None if bias is None else bias.to(dtype)
    cfg = (ignore_index, softcap, chunk_size, needs, use_kernel)
    hidden = hidden.to(dtype).contiguous()
    return _FusedLinearCrossEntropy.apply(hidden, weight.to(dtype), bias, labels, denom, cfg)


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """Chunked LM head + cross-entropy, fp32 scalar: ``fused_linear_cross_entropy(h, W, y)``."""
    opts = (ignore_index, num_items_in_batch, softcap, chunk_size)
    return _flce(hidden, weight, labels, bias, *opts, use_kernel=use_triton(hidden))


def fused_linear_cross_entropy_triton(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The op forced onto the Triton kernel: ``fused_linear_cross_entropy_triton(h, W, y)``."""
    opts = (ignore_index, num_items_in_batch, softcap, chunk_size)
    return _flce(hidden, weight, labels, bias, *opts, use_kernel=True)


def fused_linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    num_items_in_batch: int | Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Full-logits HF-style loss: ``fused_linear_cross_entropy_reference(h, W, y)``."""
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.reshape(-1)
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(labels.shape[0], -1), labels, ignore_index=ignore_index, reduction="sum"
    )
    return loss / _denominator(labels, ignore_index, num_items_in_batch, loss.device)
