"""Flash attention, forward and backward, with Gemma 2's logit soft-capping and sliding windows.

Layout (batch, heads, seq, head_dim), as transformers' attention functions receive q/k/v. Per batch
b and query head h (GQA: query head h reads kv head h // (H_q / H_kv)):

    s_ij = scale * q_i . k_j
    t_ij = c * tanh(s_ij / c)           (soft-capping with c = softcap; t = s without it)
    kept: j <= i (causal) and i - j < window (transformers' sliding_window_overlay keeps
          kv_idx > q_idx - window: a key at distance == window is dropped)
    p_ij = softmax_j(t_ij),   o_i = sum_j p_ij v_j

The forward streams key blocks with an online softmax and saves only o and the row log-sum-exp, in
base 2 (lse2_i = log2 sum_j 2^(t_ij * log2 e)); the S x S scores never exist in memory. The
backward recomputes p = 2^(t * log2 e - lse2) block by block (see the kernels for the derivative).
Two deterministic backward kernels, no atomics: dq over query blocks (it also writes
delta_i = sum_d do_id o_id), then dk/dv over key blocks, each kv-head program summing the GQA group
of query heads in registers. tanh is built from tl.exp2 (libdevice tanh is missing in the
interpreter): tanh(x) = 1 - 2 / (exp(2x) + 1), exactly +-1 once exp over/underflows.

Which calls of a model's attention reach this kernel (and which fall back to eager, and why) is
decided in ``fastlm.models.attention``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastlm.kernels._dispatch import gpu_launch_shapes, use_triton

_LOG2E = 1.4426950408889634


@triton.jit
def _logits(qk, qk_mul, cap_log2e, SOFTCAP: tl.constexpr):
    # Returns (t * log2 e, tanh(s / c)); qk_mul = scale / c with capping, scale * log2 e without.
    if SOFTCAP:
        th = 1.0 - 2.0 / (tl.exp2(qk * (qk_mul * 2.0 * 1.4426950408889634)) + 1.0)
        return th * cap_log2e, th
    else:
        return qk * qk_mul, qk


@triton.jit
def _keep(rows, cols, seq_len, window, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    # rows / cols broadcast to the block's 2D shape (either orientation).
    keep = (rows < seq_len) & (cols < seq_len)
    if CAUSAL:
        keep = keep & (cols <= rows)
    if WINDOW:
        keep = keep & (rows - cols < window)
    return keep


@triton.jit
def _query_block(n_heads, group, BLOCK_M: tl.constexpr):
    # (start_m, bh, batch, head, kv head) of this program. Last query blocks go first: under the
    # causal mask they have the most keys to visit.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
    return start_m, bh, b, h, h // group


@triton.jit
def _key_range(start_m, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    # Key blocks a query block can see: up to the diagonal, back to the window's start.
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    lo = 0
    if WINDOW:
        lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


@triton.jit
def _fwd_kernel(
    Q, K, V, OUT, LSE, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
    n_heads, group, seq_len, window, qk_mul, cap_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    start_m, bh, b, h, hk = _query_block(n_heads, group, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :],
                mask=(rows[:, None] < seq_len) & d_ok, other=0.0)  # fmt: skip
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seq_len) & d_ok
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        t2, _ = _logits(qk, qk_mul, cap_log2e, SOFTCAP)
        t2 = tl.where(_keep(rows[:, None], cols[None, :], seq_len, window, CAUSAL, WINDOW), t2,
                      float("-inf"))  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(t2, 1))
        # A row may see no key yet (window start inside the block): keep its state at 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(t2 - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    row_ok = rows < seq_len
    o = (acc / l_i[:, None]).to(OUT.dtype.element_ty)
    o_ptr = OUT + b * sob + h * soh + rows[:, None] * som + dims[None, :]
    tl.store(o_ptr, o, mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh.to(tl.int64) * seq_len + rows, m_i + tl.log2(l_i), mask=row_ok)


# Backward, with p recomputed from lse2 (p = 0 where masked):
#   dv = p^T do;   dp = do v^T;   delta_i = rowsum(do * o)_i  (= sum_j p_ij dp_ij)
#   dt = p * (dp - delta)                     (softmax backward)
#   ds = dt * (1 - tanh^2(s / c))  (= dt * (1 - (t / c)^2); ds = dt without capping)
#   dq = scale * ds k;   dk = scale * ds^T q
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, DQ, LSE, DELTA, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sob, soh, som, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    n_heads, group, seq_len, window, qk_mul, cap_log2e, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    start_m, bh, b, h, hk = _query_block(n_heads, group, BLOCK_M)
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM
    row_ok = rows < seq_len
    q_mask = row_ok[:, None] & d_ok
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqm + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows[:, None] * sdom + dims[None, :], mask=q_mask,
                 other=0.0)  # fmt: skip
    o = tl.load(
        OUT + b * sob + h * soh + rows[:, None] * som + dims[None, :], mask=q_mask, other=0.0
    )
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * seq_len + rows, delta, mask=row_ok)
    lse2 = tl.load(LSE + bh.to(tl.int64) * seq_len + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(start_m, seq_len, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols[:, None] < seq_len) & d_ok
        k = tl.load(k_base + cols[:, None] * skn + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * svn + dims[None, :], mask=kv_mask, other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        t2, th = _logits(qk, qk_mul, cap_log2e, SOFTCAP)
        keep = _keep(rows[:, None], cols[None, :], seq_len, window, CAUSAL, WINDOW)
        p = tl.exp2(tl.where(keep, t2 - lse2[:, None], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - th * th)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(DQ + b * sdqb + h * sdqh + rows[:, None] * sdqm + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    n_heads, n_kv_heads, group, seq_len, window, qk_mul, cap_log2e, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):  # fmt: skip
    # Works on transposed score blocks (keys x queries) so that dk, dv come out of plain dots.
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1)
    b, hk = (bhk // n_kv_heads).to(tl.int64), (bhk % n_kv_heads).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM
    kv_mask = (cols[:, None] < seq_len) & d_ok
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * skn + dims[None, :], mask=kv_mask,
                other=0.0)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + cols[:, None] * svn + dims[None, :], mask=kv_mask,
                other=0.0)  # fmt: skip
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query blocks that see this key block: from the diagonal to the window's end.
    lo = 0
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M
    hi = seq_len
    if WINDOW:
        hi = tl.minimum(start_n + BLOCK_N - 1 + window, seq_len)
    for g in range(0, group):
        h = hk * group + g
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        row_base = (b * n_heads + h) * seq_len
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q_mask = (rows[:, None] < seq_len) & d_ok
            q = tl.load(q_base + rows[:, None] * sqm + dims[None, :], mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * sdom + dims[None, :], mask=q_mask, other=0.0)
            lse2 = tl.load(LSE + row_base + rows, mask=rows < seq_len, other=0.0)
            delta = tl.load(DELTA + row_base + rows, mask=rows < seq_len, other=0.0)
            qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
            t2, th = _logits(qk_t, qk_mul, cap_log2e, SOFTCAP)
            keep = _keep(rows[None, :], cols[:, None], seq_len, window, CAUSAL, WINDOW)
            p_t = tl.exp2(tl.where(keep, t2 - lse2[None, :], float("-inf")))
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - th * th)
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    tl.store(DK + b * sdkb + hk * sdkh + cols[:, None] * sdkn + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(DV + b * sdvb + hk * sdvh + cols[:, None] * sdvn + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_mask)  # fmt: skip


class Blocks(NamedTuple):
    """One kernel's launch shape."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


def _default_blocks(head_dim: int, q: torch.Tensor) -> dict[str, Blocks]:
    # No autotune (one config per head_dim). d=256 needs small tiles to fit H100 shared memory
    # and registers (a 64 x 256 fp32 accumulator is 64 KiB); fp32 inputs take twice the shared
    # memory, so their tiles are halved. The interpreter gets 16 x 16 tiles so that tiny test
    # shapes still span several blocks.
    if not gpu_launch_shapes(q):
        b = Blocks(16, 16)
        return {"fwd": b, "dq": b, "dkdv": b}
    if head_dim <= 64:
        blocks = {"fwd": Blocks(128, 64, 4, 3), "dq": Blocks(64, 64, 4, 2),
                  "dkdv": Blocks(64, 64, 4, 2)}  # fmt: skip
    elif head_dim <= 128:
        blocks = {"fwd": Blocks(128, 64, 8, 2), "dq": Blocks(64, 64, 8, 2),
                  "dkdv": Blocks(64, 64, 8, 2)}  # fmt: skip
    else:
        # Measured on an H100 (Gemma-2-2B shapes, S=4096): dk/dv is 2.4x faster with 128 query
        # rows per step and 32 keys per program than with (32, 64, 4 warps).
        blocks = {"fwd": Blocks(64, 32, 4, 2), "dq": Blocks(64, 32, 4, 2),
                  "dkdv": Blocks(128, 32, 8, 2)}  # fmt: skip
    if q.dtype == torch.float32:
        blocks = {k: Blocks(max(16, b.block_m // 2), max(16, b.block_n // 2), b.num_warps, 1)
                  for k, b in blocks.items()}  # fmt: skip
    return blocks


def _check(q, k, v, softcap, sliding_window, causal) -> None:
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"flash_attention: want q (B, Hq, S, D), k = v (B, Hkv, S, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip
    (bq, hq, sq, d), (bk, hkv, sk, dk) = q.shape, k.shape
    if bq != bk or d != dk or hq % hkv or sq != sk:
        raise ValueError(f"flash_attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}"
                         " (needs same batch, head_dim, seq; Hq a multiple of Hkv)")  # fmt: skip
    if d > 256:
        raise ValueError(f"flash_attention: head_dim {d} > 256 is not supported")
    if q.dtype != k.dtype or q.dtype != v.dtype or q.device != k.device or q.device != v.device:
        raise ValueError("flash_attention: q, k, v must share dtype and device")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"flash_attention: softcap must be > 0, got {softcap}")
    if sliding_window is not None and (sliding_window < 1 or not causal):
        raise ValueError("flash_attention: sliding_window must be >= 1 and needs causal=True")


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _consts(q, scale, softcap, sliding_window):
    seq_len, d = q.shape[2], q.shape[3]
    window = sliding_window if sliding_window is not None and sliding_window < seq_len else None
    if softcap is not None:
        qk_mul, cap_log2e = scale / softcap, softcap * _LOG2E
    else:
        qk_mul, cap_log2e = scale * _LOG2E, 0.0
    meta = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=True,
        SOFTCAP=softcap is not None, WINDOW=window is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    return window or 0, float(qk_mul), float(cap_log2e), meta


def flash_attention_forward_triton(
    q, k, v, *, scale: float, softcap=None, sliding_window=None, causal=True, blocks=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launcher: (o (B, Hq, S, D), a transposed view of a (B, S, Hq, D) buffer; lse2)."""
    _check(q, k, v, softcap, sliding_window, causal)
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    (bsz, hq, seq_len, d), hkv = q.shape, k.shape[1]
    blocks = {**_default_blocks(d, q), **(blocks or {})}
    window, qk_mul, cap_log2e, meta = _consts(q, scale, softcap, sliding_window)
    meta["CAUSAL"] = causal
    # o is stored (B, S, H, D): attention modules want that layout next, so it is free to get.
    o = torch.empty(bsz, seq_len, hq, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse2 = torch.empty(bsz, hq, seq_len, device=q.device, dtype=torch.float32)
    if o.numel():
        bl = blocks["fwd"]
        _fwd_kernel[(triton.cdiv(seq_len, bl.block_m), bsz * hq)](
            q, k, v, o, lse2, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            hq, hq // hkv, seq_len, window, qk_mul, cap_log2e, BLOCK_M=bl.block_m,
            BLOCK_N=bl.block_n, num_warps=bl.num_warps, num_stages=bl.num_stages, **meta,
        )  # fmt: skip
    return o, lse2


def flash_attention_backward_triton(
    do, q, k, v, o, lse2, *, scale: float, softcap=None, sliding_window=None, causal=True,
    blocks=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward launcher: (dq, dk, dv) from do and the forward's o and lse2."""
    _check(q, k, v, softcap, sliding_window, causal)
    q, k, v, o, do = (_last_unit(t) for t in (q, k, v, o, do.to(q.dtype)))
    (bsz, hq, seq_len, d), hkv = q.shape, k.shape[1]
    blocks = {**_default_blocks(d, q), **(blocks or {})}
    window, qk_mul, cap_log2e, meta = _consts(q, scale, softcap, sliding_window)
    meta["CAUSAL"] = causal
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if not q.numel():
        return dq, dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse2)
    bl = blocks["dq"]
    _bwd_dq_kernel[(triton.cdiv(seq_len, bl.block_m), bsz * hq)](
        q, k, v, o, do, dq, lse2, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], hq, hq // hkv, seq_len, window,
        qk_mul, cap_log2e, float(scale), BLOCK_M=bl.block_m, BLOCK_N=bl.block_n,
        num_warps=bl.num_warps, num_stages=bl.num_stages, **meta,
    )  # fmt: skip
    bl = blocks["dkdv"]
    _bwd_dkdv_kernel[(triton.cdiv(seq_len, bl.block_n), bsz * hkv)](
        q, k, v, do, dk, dv, lse2, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], hq, hkv, hq // hkv, seq_len,
        window, qk_mul, cap_log2e, float(scale), BLOCK_M=bl.block_m, BLOCK_N=bl.block_n,
        num_warps=bl.num_warps, num_stages=bl.num_stages, **meta,
    )  # fmt: skip
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, softcap, sliding_window, causal, blocks):
        o, lse2 = flash_attention_forward_triton(
            q, k, v, scale=scale, softcap=softcap, sliding_window=sliding_window, causal=causal,
            blocks=blocks,
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, o, lse2)
        ctx.args = dict(scale=scale, softcap=softcap, sliding_window=sliding_window,
                        causal=causal, blocks=blocks)  # fmt: skip
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2 = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward_triton(do, q, k, v, o, lse2, **ctx.args)
        return dq, dk, dv, None, None, None, None, None


def flash_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    softcap: float | None = None, sliding_window: int | None = None, causal: bool = True,
    blocks: dict[str, Blocks] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Differentiable Triton attention on any device Triton runs on (CPU under the interpreter)."""
    return _FlashAttention.apply(q, k, v, scale, softcap, sliding_window, causal, blocks)


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    softcap: float | None = None, sliding_window: int | None = None, causal: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Differentiable (B, H, S, D) attention; usage: ``o = flash_attention(q, k, v, scale=s)``."""
    if use_triton(q):
        return flash_attention_triton(
            q, k, v, scale=scale, softcap=softcap, sliding_window=sliding_window, causal=causal
        )
    return flash_attention_reference(
        q, k, v, scale=scale, softcap=softcap, sliding_window=sliding_window, causal=causal
    )


def keep_pattern(seq_len: int, causal: bool, window: int | None, device) -> torch.Tensor:
    """(S, S) bool, True where query i may attend to key j: ``keep_pattern(8, True, 4, "cpu")``."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    keep = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= i - j < window
    return keep


def flash_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    softcap: float | None = None, sliding_window: int | None = None, causal: bool = True,
) -> torch.Tensor:  # fmt: skip
    """Plain-PyTorch attention materialising the scores, in fp32 (float64 stays float64)."""
    _check(q, k, v, softcap, sliding_window, causal)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kk = k.to(cd).repeat_interleave(group, dim=1)
    vv = v.to(cd).repeat_interleave(group, dim=1)
    s = q.to(cd) @ kk.transpose(-1, -2) * scale
    t = softcap * torch.tanh(s / softcap) if softcap is not None else s
    keep = keep_pattern(q.shape[2], causal, sliding_window, q.device)
    p = torch.softmax(t.masked_fill(~keep, float("-inf")), dim=-1)
    return (p @ vv).to(q.dtype)
