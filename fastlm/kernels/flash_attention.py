"""Flash attention, forward and backward, with Gemma 2's logit soft-capping, sliding windows and
gpt-oss's attention sinks.

Layout (batch, heads, seq, head_dim), as transformers' attention functions receive q/k/v. Per batch
b and query head h (GQA: query head h reads kv head h // (H_q / H_kv)):

    s_ij = scale * q_i . k_j
    t_ij = c * tanh(s_ij / c)           (soft-capping with c = softcap; t = s without it)
    kept: j <= i (causal) and i - j < window (transformers' sliding_window_overlay keeps
          kv_idx > q_idx - window: a key at distance == window is dropped)
    p_ij = exp(t_ij) / (exp(sink_h) + sum_j' exp(t_ij')),   o_i = sum_j p_ij v_j

sink_h (optional, ``sinks`` (H_q,), fp32 in the kernels): one learned logit per query head, a
softmax column with no value vector (gpt-oss's eager attention concatenates it to the masked
scores and drops it after the softmax), taken as given: not scaled, not capped. It only enlarges
the denominator; without sinks the term is absent (a sink of -inf).

The forward streams key blocks with an online softmax and saves only o and the row log-sum-exp, in
base 2 (lse2_i = log2 (2^(sink_h log2 e) + sum_j 2^(t_ij * log2 e)), the sink's term only with
sinks); the S x S scores never exist in memory. The backward recomputes p = 2^(t * log2 e - lse2)
block by block (see the kernels for the derivative, the sinks' included).
Two deterministic backward kernels, no atomics: dq over query blocks (it also writes
delta_i = sum_d do_id o_id), then dk/dv over key blocks, each kv-head program summing the GQA group
of query heads in registers. tanh is built from tl.exp2 (libdevice tanh is missing in the
interpreter): tanh(x) = 1 - 2 / (exp(2x) + 1), exactly +-1 once exp over/underflows.

Packed (variable-length) sequences: ``flash_attention_varlen`` takes q (T, H_q, D) and k, v
(T, H_kv, D), n sequences laid end to end in one row of T tokens, sequence s at [a_s, a_s+1) with
a = cu_seqlens (int32, (n + 1,), a_0 = 0, a_n = T), as flash-attn's varlen API and transformers'
cu_seq_lens take. Query i of sequence s keeps key j only when a_s <= j < a_s+1, and the causal and
window tests above apply to the positions i - a_s, j - a_s inside the sequence. The same kernels
run it with VARLEN=True: each program adds its sequence's first token a_s to its row pointers and
then works in positions local to the sequence, exactly as a fixed-length program on a row of
length a_s+1 - a_s; its loads are bounded to [0, length), so no token of another sequence is ever
read. The grid is (blocks of the longest sequence, heads, sequences) and a program past its
shorter sequence's end returns at once: a flat list of (sequence, block) pairs would waste no
programs, but building it needs cu_seqlens on the host, a synchronisation per call.

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
_MAX_GRID_YZ = 65535  # CUDA's limit on a grid's second and third axes


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
    # rows / cols: positions in the sequence, broadcast to the block's 2D shape (either way).
    keep = (rows < seq_len) & (cols < seq_len)
    if CAUSAL:
        keep = keep & (cols <= rows)
    if WINDOW:
        keep = keep & (rows - cols < window)
    return keep


@triton.jit
def _query_block(n_heads, group, BLOCK_M: tl.constexpr, VARLEN: tl.constexpr):
    # (start_m, bh, batch, head, kv head) of this program. Last query blocks go first: under the
    # causal mask they have the most keys to visit. Packed: grid axis 1 is the head and the one
    # row of tokens is batch 0 (axis 2 is the sequence, see _sequence).
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    if VARLEN:
        h = tl.program_id(1)
        return start_m, h, 0, h.to(tl.int64), h.to(tl.int64) // group
    else:
        bh = tl.program_id(1)
        b, h = (bh // n_heads).to(tl.int64), (bh % n_heads).to(tl.int64)
        return start_m, bh, b, h, h // group


@triton.jit
def _sequence(row_len, CU_SEQLENS, VARLEN: tl.constexpr):
    # (first token, length) of this program's sequence in its row of row_len tokens. Positions
    # below are relative to the first token, so the masks and key ranges are the fixed-length
    # ones with seq_len = the sequence's length. The first token is int64: it scales the token
    # stride, and a packed row may hold more than 2^31 elements.
    if VARLEN:
        seq = tl.program_id(2)
        start = tl.load(CU_SEQLENS + seq)
        return start.to(tl.int64), tl.load(CU_SEQLENS + seq + 1) - start
    else:
        return 0, row_len


@triton.jit
def _key_range(start_m, seq_len, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr):  # fmt: skip
    # Key blocks a query block can see: up to the diagonal, back to the window's start, never
    # below 0 (in a packed row, the tokens before position 0 are another sequence's).
    hi = seq_len
    if CAUSAL:
        hi = tl.minimum(start_m + BLOCK_M, seq_len)
    lo = 0
    if WINDOW:
        lo = tl.maximum(start_m - window + 1, 0) // BLOCK_N * BLOCK_N
    return lo, hi


# Sizes that follow the data (a batch's lengths) are not specialised on: Triton compiles a
# variant per int argument divisible by 16 or equal to 1, and real batches would hit a
# new compile at an unpredictable step.
@triton.jit(do_not_specialize=["row_len"])
def _fwd_kernel(
    Q, K, V, OUT, LSE, CU_SEQLENS, SINK_LOGITS, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sob, soh, som, n_heads, group, row_len, window, qk_mul, cap_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr, SINKS: tl.constexpr,
):  # fmt: skip
    start_m, bh, b, h, hk = _query_block(n_heads, group, BLOCK_M, VARLEN)
    tok0, seq_len = _sequence(row_len, CU_SEQLENS, VARLEN)
    if VARLEN:  # noqa: SIM102 (a static branch: fixed-length launches compile without the test)
        if start_m >= seq_len:
            return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM
    q = tl.load(Q + b * sqb + h * sqh + tok0 * sqm + rows[:, None] * sqm + dims[None, :],
                mask=(rows[:, None] < seq_len) & d_ok, other=0.0)  # fmt: skip
    k_base = K + b * skb + hk * skh + tok0 * skn
    v_base = V + b * svb + hk * svh + tok0 * svn
    if SINKS:
        # The sink is a key seen before the first block, with no value: its logit (as given: not
        # scaled, not capped) is the running max so far, it adds 2^(sink2 - m) = 1 to the
        # denominator and nothing to acc; the loop rescales that 1 like any earlier key's term.
        # A sink of -inf is no sink (0, not 2^(-inf + inf) = NaN).
        m_i = tl.zeros([BLOCK_M], tl.float32) + tl.load(SINK_LOGITS + h) * 1.4426950408889634
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
    else:
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
    o_ptr = OUT + b * sob + h * soh + tok0 * som + rows[:, None] * som + dims[None, :]
    tl.store(o_ptr, o, mask=row_ok[:, None] & d_ok)
    tl.store(LSE + bh.to(tl.int64) * row_len + tok0 + rows, m_i + tl.log2(l_i), mask=row_ok)


# Backward, with p recomputed from lse2 (p = 0 where masked):
#   dv = p^T do;   dp = do v^T;   delta_i = rowsum(do * o)_i  (= sum_j p_ij dp_ij)
#   dt = p * (dp - delta)                     (softmax backward)
#   ds = dt * (1 - tanh^2(s / c))  (= dt * (1 - (t / c)^2); ds = dt without capping)
#   dq = scale * ds k;   dk = scale * ds^T q
# With sinks, row i's softmax runs over n + 1 columns, the keys' t_i1..t_in and the sink's
# sigma = sink_h, which has no value vector (v_sink = 0):
#   lse_i = log(e^sigma + sum_j e^t_ij),  p_ij = e^(t_ij - lse_i),  p_sink,i = e^(sigma - lse_i)
#   dp_sink,i = do_i . v_sink = 0, and the softmax backward over the n + 1 columns is
#   dt_ij = p_ij (dp_ij - sum_k p_ik dp_ik), k over the keys and the sink: the sink's term is
#   p_sink,i * 0, so the sum is the keys' alone, delta_i = do_i . o_i, as without sinks.
# So dq, dk, dv are the formulas above with p recomputed from the sink-inclusive lse2 the forward
# saved: these kernels never read the sinks. The sink's own column gives
#   dsigma_i = p_sink,i (dp_sink,i - delta_i) = -p_sink,i delta_i
#   dsink_h  = -sum over batch b and queries i of 2^(sink_h log2 e - lse2_bhi) delta_bhi
# which needs only lse2 and delta (the dq kernel writes it): one pass over (B, Hq, S) floats in
# PyTorch (_sink_gradient), against the kernels' S x S work. Every row is a real token (padding
# is unpadded into a packed launch before it gets here), so the sum is over real queries only.
@triton.jit(do_not_specialize=["row_len"])
def _bwd_dq_kernel(
    Q, K, V, OUT, DO, DQ, LSE, DELTA, CU_SEQLENS, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sob, soh, som, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
    n_heads, group, row_len, window, qk_mul, cap_log2e, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    start_m, bh, b, h, hk = _query_block(n_heads, group, BLOCK_M, VARLEN)
    tok0, seq_len = _sequence(row_len, CU_SEQLENS, VARLEN)
    if VARLEN:  # noqa: SIM102 (a static branch: fixed-length launches compile without the test)
        if start_m >= seq_len:
            return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM
    row_ok = rows < seq_len
    q_mask = row_ok[:, None] & d_ok
    q = tl.load(Q + b * sqb + h * sqh + tok0 * sqm + rows[:, None] * sqm + dims[None, :],
                mask=q_mask, other=0.0)  # fmt: skip
    do = tl.load(DO + b * sdob + h * sdoh + tok0 * sdom + rows[:, None] * sdom + dims[None, :],
                 mask=q_mask, other=0.0)  # fmt: skip
    o = tl.load(OUT + b * sob + h * soh + tok0 * som + rows[:, None] * som + dims[None, :],
                mask=q_mask, other=0.0)  # fmt: skip
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row_base = bh.to(tl.int64) * row_len + tok0
    tl.store(DELTA + row_base + rows, delta, mask=row_ok)
    lse2 = tl.load(LSE + row_base + rows, mask=row_ok, other=0.0)
    k_base = K + b * skb + hk * skh + tok0 * skn
    v_base = V + b * svb + hk * svh + tok0 * svn
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
    tl.store(DQ + b * sdqb + h * sdqh + tok0 * sdqm + rows[:, None] * sdqm + dims[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)  # fmt: skip


@triton.jit(do_not_specialize=["row_len"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_SEQLENS, sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
    sdob, sdoh, sdom, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    n_heads, n_kv_heads, group, row_len, window, qk_mul, cap_log2e, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    VARLEN: tl.constexpr,
):  # fmt: skip
    # Works on transposed score blocks (keys x queries) so that dk, dv come out of plain dots.
    # Grid (key blocks, batch x kv heads); packed: (key blocks of the longest sequence, kv heads,
    # sequences), as the query-block kernels.
    start_n = tl.program_id(0) * BLOCK_N
    if VARLEN:
        b, hk = 0, tl.program_id(1).to(tl.int64)
    else:
        bhk = tl.program_id(1)
        b, hk = (bhk // n_kv_heads).to(tl.int64), (bhk % n_kv_heads).to(tl.int64)
    tok0, seq_len = _sequence(row_len, CU_SEQLENS, VARLEN)
    if VARLEN:  # noqa: SIM102 (a static branch: fixed-length launches compile without the test)
        if start_n >= seq_len:
            return
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    d_ok = dims[None, :] < HEAD_DIM
    kv_mask = (cols[:, None] < seq_len) & d_ok
    k = tl.load(K + b * skb + hk * skh + tok0 * skn + cols[:, None] * skn + dims[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * svb + hk * svh + tok0 * svn + cols[:, None] * svn + dims[None, :],
                mask=kv_mask, other=0.0)  # fmt: skip
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
        q_base = Q + b * sqb + h * sqh + tok0 * sqm
        do_base = DO + b * sdob + h * sdoh + tok0 * sdom
        row_base = (b * n_heads + h) * row_len + tok0
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
    tl.store(DK + b * sdkb + hk * sdkh + tok0 * sdkn + cols[:, None] * sdkn + dims[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)  # fmt: skip
    tl.store(DV + b * sdvb + hk * sdvh + tok0 * sdvn + cols[:, None] * sdvn + dims[None, :],
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


def _check(q, k, v, softcap, sliding_window, causal, sinks=None, fp32_sinks=False) -> None:
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
    if sinks is not None:
        if sinks.shape != (hq,) or sinks.device != q.device:
            raise ValueError(f"flash_attention: sinks must be one logit per query head, ({hq},) on "
                             f"{q.device}; got {tuple(sinks.shape)} on {sinks.device}")  # fmt: skip
        if fp32_sinks and sinks.dtype != torch.float32:  # the differentiable functions cast them
            raise ValueError(f"flash_attention: the launchers take fp32 sinks, got {sinks.dtype}")


def _check_packed(q, cu_seqlens, max_seqlen) -> None:
    # q: the (1, Hq, T, D) row view. The values of cu_seqlens are not checked here: that needs a
    # host copy, a synchronisation per call; the reference checks them.
    if q.shape[0] != 1:
        raise ValueError(f"flash_attention: packed sequences need one row, got batch {q.shape[0]}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or not cu_seqlens.numel():
        raise ValueError("flash_attention: cu_seqlens must be a 1-D int32 tensor (n_seqs + 1,), "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")  # fmt: skip
    if cu_seqlens.numel() - 1 > _MAX_GRID_YZ:  # the sequences are the grid's third axis
        raise ValueError(f"flash_attention: at most {_MAX_GRID_YZ} packed sequences per call, got "
                         f"{cu_seqlens.numel() - 1}; split the batch")  # fmt: skip
    if cu_seqlens.device != q.device:
        raise ValueError(f"flash_attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if max_seqlen is None or max_seqlen < 0:
        raise ValueError(f"flash_attention: max_seqlen must be an int >= 0, got {max_seqlen}")


def _last_unit(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _consts(q, scale, softcap, sliding_window, causal, cu_seqlens, max_seqlen):
    # A window as long as the longest sequence drops no key: it is switched off.
    longest, d = (q.shape[2] if cu_seqlens is None else max_seqlen), q.shape[3]
    window = sliding_window if sliding_window is not None and sliding_window < longest else None
    if softcap is not None:
        qk_mul, cap_log2e = scale / softcap, softcap * _LOG2E
    else:
        qk_mul, cap_log2e = scale * _LOG2E, 0.0
    meta = dict(
        HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal,
        SOFTCAP=softcap is not None, WINDOW=window is not None,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32", VARLEN=cu_seqlens is not None,
    )  # fmt: skip
    return window or 0, float(qk_mul), float(cap_log2e), meta


def _grid(seq_len, block, heads, bsz, cu_seqlens, max_seqlen) -> tuple[int, ...]:
    # Fixed length: (blocks, batch x heads). Packed: (blocks of the longest sequence, heads,
    # sequences), the shape that needs no host copy of cu_seqlens; a program past its shorter
    # sequence's end returns at once.
    if cu_seqlens is None:
        return (triton.cdiv(seq_len, block), bsz * heads)
    return (triton.cdiv(max_seqlen, block), heads, cu_seqlens.numel() - 1)


def flash_attention_forward_triton(
    q, k, v, *, scale: float, softcap=None, sliding_window=None, causal=True, blocks=None,
    cu_seqlens=None, max_seqlen=None, sinks=None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Forward launcher: (o (B, Hq, S, D), a transposed view of a (B, S, Hq, D) buffer; lse2).

    With ``cu_seqlens`` (int32, (n + 1,)) and ``max_seqlen``, q/k/v are one row (1, H, T, D) of
    packed sequences (see the module docstring) and lse2 is (1, Hq, T). ``sinks``: fp32 (Hq,)
    logits, one softmax column per query head with no value; lse2 then includes them.
    """
    _check(q, k, v, softcap, sliding_window, causal, sinks, fp32_sinks=True)
    if cu_seqlens is not None:
        _check_packed(q, cu_seqlens, max_seqlen)
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    (bsz, hq, seq_len, d), hkv = q.shape, k.shape[1]
    blocks = {**_default_blocks(d, q), **(blocks or {})}
    window, qk_mul, cap_log2e, meta = _consts(
        q, scale, softcap, sliding_window, causal, cu_seqlens, max_seqlen
    )
    # o is stored (B, S, H, D): attention modules want that layout next, so it is free to get.
    o = torch.empty(bsz, seq_len, hq, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse2 = torch.empty(bsz, hq, seq_len, device=q.device, dtype=torch.float32)
    bl = blocks["fwd"]
    grid = _grid(seq_len, bl.block_m, hq, bsz, cu_seqlens, max_seqlen)
    if o.numel() and min(grid):
        _fwd_kernel[grid](
            q, k, v, o, lse2, cu_seqlens, sinks, *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *o.stride()[:3], hq, hq // hkv, seq_len, window, qk_mul, cap_log2e,
            BLOCK_M=bl.block_m, BLOCK_N=bl.block_n, num_warps=bl.num_warps,
            num_stages=bl.num_stages, SINKS=sinks is not None, **meta,
        )  # fmt: skip
    return o, lse2


def flash_attention_backward_triton(
    do, q, k, v, o, lse2, *, scale: float, softcap=None, sliding_window=None, causal=True,
    blocks=None, cu_seqlens=None, max_seqlen=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Backward launcher: (dq, dk, dv) from do and the forward's o and lse2 (packed as there).

    With sinks too: they are in lse2 (see the derivation above the kernels); their own gradient
    is ``_FlashAttention``'s, from lse2 and the delta this launch computes.
    """
    return _backward(do, q, k, v, o, lse2, scale=scale, softcap=softcap,
                     sliding_window=sliding_window, causal=causal, blocks=blocks,
                     cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)[:3]  # fmt: skip


def _backward(do, q, k, v, o, lse2, *, scale, softcap, sliding_window, causal, blocks, cu_seqlens,
              max_seqlen) -> tuple[torch.Tensor, ...]:  # fmt: skip
    # (dq, dk, dv, delta (B, Hq, S) fp32: rowsum(do * o), which the sink gradient reuses).
    _check(q, k, v, softcap, sliding_window, causal)
    if cu_seqlens is not None:
        _check_packed(q, cu_seqlens, max_seqlen)
    q, k, v, o, do = (_last_unit(t) for t in (q, k, v, o, do.to(q.dtype)))
    (bsz, hq, seq_len, d), hkv = q.shape, k.shape[1]
    blocks = {**_default_blocks(d, q), **(blocks or {})}
    window, qk_mul, cap_log2e, meta = _consts(
        q, scale, softcap, sliding_window, causal, cu_seqlens, max_seqlen
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bl = blocks["dq"]
    grid = _grid(seq_len, bl.block_m, hq, bsz, cu_seqlens, max_seqlen)
    if not q.numel() or not min(grid):
        return dq.zero_(), dk.zero_(), dv.zero_(), torch.zeros_like(lse2)
    delta = torch.empty_like(lse2)
    _bwd_dq_kernel[grid](
        q, k, v, o, do, dq, lse2, delta, cu_seqlens, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3], hq, hq // hkv,
        seq_len, window, qk_mul, cap_log2e, float(scale), BLOCK_M=bl.block_m,
        BLOCK_N=bl.block_n, num_warps=bl.num_warps, num_stages=bl.num_stages, **meta,
    )  # fmt: skip
    bl = blocks["dkdv"]
    _bwd_dkdv_kernel[_grid(seq_len, bl.block_n, hkv, bsz, cu_seqlens, max_seqlen)](
        q, k, v, do, dk, dv, lse2, delta, cu_seqlens, *q.stride()[:3], *k.stride()[:3],
        *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3], hq, hkv,
        hq // hkv, seq_len, window, qk_mul, cap_log2e, float(scale), BLOCK_M=bl.block_m,
        BLOCK_N=bl.block_n, num_warps=bl.num_warps, num_stages=bl.num_stages, **meta,
    )  # fmt: skip
    return dq, dk, dv, delta


def _sink_gradient(sinks: torch.Tensor, lse2: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """dsink_h = -sum over batch and queries of p_sink * delta, p_sink = 2^(sink_h log2 e - lse2):
    (Hq,) fp32 from fp32 sinks (Hq,) and the (B, Hq, S) lse2 and delta (derivation above)."""
    p_sink = torch.exp2(sinks.view(1, -1, 1) * _LOG2E - lse2)
    return -(p_sink * delta).sum((0, 2))


class _FlashAttention(torch.autograd.Function):
    # Saves q, k, v, o, lse2 (and cu_seqlens when packed, sinks when given); the backward
    # recomputes p from them. Sinks of any float dtype run in fp32; their gradient goes back in
    # their dtype: dsink = -sum p_sink * delta (_sink_gradient).
    @staticmethod
    def forward(ctx, q, k, v, sinks, scale, softcap, sliding_window, causal, blocks, cu_seqlens,
                max_seqlen):  # fmt: skip
        args = dict(scale=scale, softcap=softcap, sliding_window=sliding_window, causal=causal,
                    blocks=blocks, max_seqlen=max_seqlen)  # fmt: skip
        sinks32 = None if sinks is None else sinks.detach().float().contiguous()
        o, lse2 = flash_attention_forward_triton(
            q, k, v, cu_seqlens=cu_seqlens, sinks=sinks32, **args
        )
        ctx.save_for_backward(q, k, v, o, lse2, cu_seqlens, sinks32)
        ctx.args, ctx.sinks_dtype = args, None if sinks is None else sinks.dtype
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse2, cu_seqlens, sinks32 = ctx.saved_tensors
        dq, dk, dv, delta = _backward(do, q, k, v, o, lse2, cu_seqlens=cu_seqlens, **ctx.args)
        dsinks = None
        if sinks32 is not None and ctx.needs_input_grad[3]:
            dsinks = _sink_gradient(sinks32, lse2, delta).to(ctx.sinks_dtype)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None


def flash_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    softcap: float | None = None, sliding_window: int | None = None, causal: bool = True,
    blocks: dict[str, Blocks] | None = None, sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Differentiable Triton attention on any device Triton runs on (CPU under the interpreter);
    ``sinks`` (Hq,) differentiable too. Usage: ``flash_attention_triton(q, k, v, scale=s)``."""
    packed = (None, None)  # cu_seqlens, max_seqlen: see flash_attention_varlen_triton
    return _FlashAttention.apply(q, k, v, sinks, scale, softcap, sliding_window, causal, blocks,
                                 *packed)  # fmt: skip


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
    softcap: float | None = None, sliding_window: int | None = None, causal: bool = True,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Differentiable (B, H, S, D) attention, ``sinks``: gpt-oss's (Hq,) learned logits or None.

    Usage: ``o = flash_attention(q, k, v, scale=s)``; ``flash_attention(..., sinks=attn.sinks)``.
    """
    fn = flash_attention_triton if use_triton(q) else flash_attention_reference
    return fn(q, k, v, scale=scale, softcap=softcap, sliding_window=sliding_window, causal=causal,
              sinks=sinks)  # fmt: skip


def _as_row(t: torch.Tensor) -> torch.Tensor:
    # (T, H, D) packed tokens -> the (1, H, T, D) view the kernels index: no copy.
    return t.unsqueeze(0).transpose(1, 2)


def _check_tokens(q, k, v) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"flash_attention_varlen: want q (T, Hq, D), k = v (T, Hkv, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")  # fmt: skip


def flash_attention_varlen_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    *, scale: float, softcap: float | None = None, sliding_window: int | None = None,
    causal: bool = True, blocks: dict[str, Blocks] | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Differentiable packed attention through the Triton kernels; (T, Hq, D) out.

    cu_seqlens must rise from 0 to T and max_seqlen be at least the longest sequence: the kernels
    trust both (checking them would copy cu_seqlens to the host, a synchronisation per call).
    Usage: ``o = flash_attention_varlen_triton(q, k, v, cu_seqlens, max_len, scale=d**-0.5)``.
    """
    _check_tokens(q, k, v)
    rows = (_as_row(q), _as_row(k), _as_row(v))
    o = _FlashAttention.apply(*rows, sinks, scale, softcap, sliding_window, causal, blocks,
                              cu_seqlens, int(max_seqlen))  # fmt: skip
    return o[0].transpose(0, 1)


def flash_attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    *, scale: float, softcap: float | None = None, sliding_window: int | None = None,
    causal: bool = True, sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Differentiable attention over sequences packed in (T, H, D) tokens, none seeing another;
    ``sinks`` (Hq,) as for ``flash_attention``.

    Usage: ``o = flash_attention_varlen(q, k, v, cu_seqlens, max_seqlen, scale=d**-0.5)``.
    """
    fn = flash_attention_varlen_triton if use_triton(q) else flash_attention_varlen_reference
    return fn(q, k, v, cu_seqlens, max_seqlen, scale=scale, softcap=softcap,
              sliding_window=sliding_window, causal=causal, sinks=sinks)  # fmt: skip


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
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Plain-PyTorch attention materialising the scores, in fp32 (float64 stays float64); the
    sinks, if any, as gpt-oss's eager attention has them: a column concatenated to the masked
    scores before the softmax and dropped after. Usage: ``flash_attention_reference(q, k, v,
    scale=s, sinks=attn.sinks)``."""
    _check(q, k, v, softcap, sliding_window, causal, sinks)
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = q.shape[1] // k.shape[1]
    kk = k.to(cd).repeat_interleave(group, dim=1)
    vv = v.to(cd).repeat_interleave(group, dim=1)
    s = q.to(cd) @ kk.transpose(-1, -2) * scale
    t = softcap * torch.tanh(s / softcap) if softcap is not None else s
    keep = keep_pattern(q.shape[2], causal, sliding_window, q.device)
    t = t.masked_fill(~keep, float("-inf"))
    if sinks is None:
        p = torch.softmax(t, dim=-1)
    else:
        column = sinks.to(cd).view(1, -1, 1, 1).expand(*t.shape[:3], 1)
        p = torch.softmax(torch.cat([t, column], dim=-1), dim=-1)[..., :-1]
    return (p @ vv).to(q.dtype)


def _sequence_bounds(cu_seqlens: torch.Tensor, n_tokens: int, max_seqlen: int) -> list:
    # The reference copies cu_seqlens to the host anyway, so it checks the values the kernels trust.
    cu = cu_seqlens.tolist()
    bounds = list(zip(cu, cu[1:]))
    if cu[0] != 0 or cu[-1] != n_tokens or any(e < a for a, e in bounds):
        raise ValueError(f"flash_attention_varlen: cu_seqlens must rise from 0 to the number of "
                         f"tokens {n_tokens}, got {cu}")  # fmt: skip
    if any(e - a > max_seqlen for a, e in bounds):
        raise ValueError(f"flash_attention_varlen: a sequence is longer than max_seqlen "
                         f"{max_seqlen}; pass the longest length (cu_seqlens {cu})")  # fmt: skip
    return bounds


def flash_attention_varlen_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    *, scale: float, softcap: float | None = None, sliding_window: int | None = None,
    causal: bool = True, sinks: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Each packed sequence through ``flash_attention_reference`` on its own; (T, Hq, D) out.

    Usage: ``flash_attention_varlen_reference(q, k, v, cu_seqlens, max_seqlen, scale=s)``.
    """
    _check_tokens(q, k, v)
    _check(_as_row(q), _as_row(k), _as_row(v), softcap, sliding_window, causal, sinks)
    _check_packed(_as_row(q), cu_seqlens, max_seqlen)
    kw = dict(scale=scale, softcap=softcap, sliding_window=sliding_window, causal=causal,
              sinks=sinks)  # fmt: skip
    outs = [
        flash_attention_reference(_as_row(q[a:e]), _as_row(k[a:e]), _as_row(v[a:e]), **kw)[0]
        for a, e in _sequence_bounds(cu_seqlens, q.shape[0], max_seqlen)
    ]
    return torch.cat([o.transpose(0, 1) for o in outs]) if outs else q.new_empty(q.shape)
