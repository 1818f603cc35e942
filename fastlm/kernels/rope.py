"""Rotary position embedding on q and k: ``out = x * cos + rotate_half(x) * sin``, in fp32.

Layout: q is (B, S, Hq, D), k is (B, S, Hk, D) (what ``proj(x).view(B, S, H, D)`` gives); cos and
sin are (B, S, D) or (1, S, D) as Hugging Face's rotary-embedding modules return them, in the
"rotate_half" layout where ``cos[..., :D/2] == cos[..., D/2:]``, so only the first half is read.
With halves x1, x2 and half-width c, s::

    out1 = x1 * c - x2 * s
    out2 = x2 * c + x1 * s

cos/sin get no gradient (HF builds them under ``no_grad``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels._dispatch import use_triton

# Most (heads x half-dim) elements one program rotates at a time; more heads are looped over.
_MAX_TILE = 4096


@triton.jit
def _rotate_heads(
    IN, OUT, c, s, stride_in_h, n_heads, half, head_dim,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_HALF)[None, :]
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + heads
        mask = (h < n_heads) & (dims < half)  # half-dim block may be wider than D/2 (D=48)
        in_ptr = IN + h * stride_in_h + dims
        out_ptr = OUT + h * head_dim + dims
        x1 = tl.load(in_ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_ptr + half, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr, (x1 * c - x2 * s).to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_ptr + half, (x2 * c + x1 * s).to(OUT.dtype.element_ty), mask=mask)


# One program per (b, s) row: loads the half-width cos/sin row once and rotates every q and k
# head of that row. The backward is the rotation by -theta, i.e. the same kernel with s -> -s:
#   dx1 = d1 * c + d2 * s
#   dx2 = d2 * c - d1 * s
# seq_len is a batch's length: not specialised on (see flash_attention.py).
@triton.jit(do_not_specialize=["seq_len"])
def _rope_kernel(
    Q, K, COS, SIN, QO, KO, seq_len, stride_qb, stride_qs, stride_qh, stride_kb, stride_ks,
    stride_kh, stride_cb, stride_cs, n_q_heads, n_k_heads, half,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    b = row // seq_len
    pos = row % seq_len
    dims = tl.arange(0, BLOCK_HALF)
    cs_off = b * stride_cb + pos * stride_cs + dims
    c = tl.load(COS + cs_off, mask=dims < half, other=0.0).to(tl.float32)[None, :]
    s = tl.load(SIN + cs_off, mask=dims < half, other=0.0).to(tl.float32)[None, :]
    if BACKWARD:
        s = -s
    head_dim = 2 * half
    _rotate_heads(
        Q + b * stride_qb + pos * stride_qs, QO + row * n_q_heads * head_dim, c, s,
        stride_qh, n_q_heads, half, head_dim, BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    _rotate_heads(
        K + b * stride_kb + pos * stride_ks, KO + row * n_k_heads * head_dim, c, s,
        stride_kh, n_k_heads, half, head_dim, BLOCK_HK, BLOCK_HALF,
    )  # fmt: skip


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # Any batch/seq/head strides are handled by the kernel; the head dim must be unit-stride.
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, cos, sin, backward: bool, max_tile: int):
    """Rotates q and k (or, backward, their output grads) into new contiguous tensors."""
    q, k = _unit_last(q), _unit_last(k)
    bsz, seq, n_q, dim = q.shape
    n_k = k.shape[2]
    qo = torch.empty((bsz, seq, n_q, dim), dtype=q.dtype, device=q.device)
    ko = torch.empty((bsz, seq, n_k, dim), dtype=k.dtype, device=k.device)
    if bsz * seq == 0:
        return qo, ko
    half = dim // 2
    block_half = triton.next_power_of_2(half)
    heads_per_tile = max(1, max_tile // block_half)
    block_hq = min(triton.next_power_of_2(n_q), heads_per_tile)
    block_hk = min(triton.next_power_of_2(n_k), heads_per_tile)
    num_warps = min(max(max(block_hq, block_hk) * block_half // 512, 1), 8)
    stride_cb = 0 if cos.shape[0] == 1 else cos.stride(0)  # broadcast a batch-1 cos over B
    _rope_kernel[(bsz * seq,)](
        q, k, cos, sin, qo, ko, seq, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
        k.stride(1), k.stride(2), stride_cb, cos.stride(1), n_q, n_k, half,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_HALF=block_half, BACKWARD=backward,
        num_warps=num_warps,
    )  # fmt: skip
    return qo, ko


def _check_shapes(q, k, cos, sin):
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q, k must be (B, S, H, D); got {tuple(q.shape)}, {tuple(k.shape)}")
    bsz, seq, _, dim = q.shape
    if k.shape[0] != bsz or k.shape[1] != seq or k.shape[3] != dim or dim % 2:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree, or odd head dim")
    if cos.dim() == 2:  # (S, D): treat as batch 1
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    if cos.shape != sin.shape or cos.shape[1:] != (seq, dim) or cos.shape[0] not in (1, bsz):
        raise ValueError(f"cos/sin {tuple(cos.shape)} do not fit q {tuple(q.shape)}")
    cos, sin = _unit_last(cos), _unit_last(sin)
    if cos.stride() != sin.stride():  # the kernel indexes both with one set of strides
        cos, sin = cos.contiguous(), sin.contiguous()
    return cos, sin


class _RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, max_tile):
        cos, sin = _check_shapes(q, k, cos, sin)
        ctx.save_for_backward(cos, sin)
        ctx.max_tile = max_tile
        return _launch(q, k, cos, sin, backward=False, max_tile=max_tile)

    @staticmethod
    def backward(ctx, dq_out, dk_out):
        cos, sin = ctx.saved_tensors
        dq, dk = _launch(dq_out, dk_out, cos, sin, backward=True, max_tile=ctx.max_tile)
        return dq, dk, None, None, None


def apply_rope_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    _max_tile: int = _MAX_TILE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE through the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    Usage: ``q, k = apply_rope_triton(q, k, cos, sin)``. ``_max_tile`` is for tests, to force
    the loop over head chunks.
    """
    return _RopeFunction.apply(q, k, cos, sin, _max_tile)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable RoPE on (B, S, H, D) q and k. Usage: ``q, k = apply_rope(q, k, cos, sin)``."""
    if use_triton(q):
        return apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch RoPE (fp32 inside, fp64 kept). Usage: ``apply_rope_reference(q, k, c, s)``."""
    compute = torch.promote_types(q.dtype, torch.float32)
    if cos.dim() == 2:
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    cos, sin = cos.unsqueeze(2).to(compute), sin.unsqueeze(2).to(compute)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        xf = x.to(compute)
        return (xf * cos + _rotate_half(xf) * sin).to(x.dtype).contiguous()

    return rotate(q), rotate(k)
