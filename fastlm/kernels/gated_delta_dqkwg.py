"""The gated delta rule's chunk-local backward for q, k, w and the gate ("dqkwg"), in PyTorch.

Why fastlm has its own: flash-linear-attention (fla) 0.5.2 trains the chunked gated delta rule
with Triton kernels, but on Hopper with Triton 3.4 to 3.7.0 one backward kernel of it computes
wrong dk and dg (fla issue #640: a transpose of a matmul accumulator is miscompiled) and fla then
refuses to run. Every other kernel of that backward is right, so ``gated_delta_rule.py`` keeps
fla's and swaps in this one. Batched PyTorch rather than a Triton kernel: exact by construction
(no transposed accumulator to miscompile), fp32 throughout, and the chunk-local matmuls are
large enough that cuBLAS runs them well.

Layout (fla's): q, k (B, T, H, K); v, dv, do (B, T, HV, V); w (B, T, HV, K); g (B, T, HV) fp32;
h, dh (B, NT, HV, K, V), one state per chunk of ``chunk_size`` positions (with ``cu_seqlens``:
B = 1, the sequences laid end to end, chunks never crossing a sequence's end, NT their total).
Value head i reads key head i // (HV / H) (grouped value heads); dq and dk are summed over a key
head's group. ``g`` is fla's gate after its chunk-local cumulative sum, in base 2: G_t, with the
decay from the chunk's start to position t being e_t = 2^G_t.

What one chunk computed, per value head, for its L ≤ chunk_size positions (rows t, j), state
S = h[chunk] entering it, l its last position, s = ``scale``::

    ṽ = u − w·S                                       (``v``: fla's v_new)
    o_t = s·e_t·q_t·S + s·Σ_{j≤t} (e_t / e_j)(q_t·k_j)·ṽ_j
    S' = e_l·S + Σ_j (e_l / e_j)·k_jᵀ·ṽ_j             (the state handed to the next chunk)

Given dO = ``do``, dṽ = ``dv`` (all of ṽ's gradient, the later chunks' share included) and
D = ∂L/∂S' = ``dh[chunk]``, the chain rule through those three lines gives::

    dA_tj = s·(dO_t·ṽ_j)·e_t / e_j   for j ≤ t, else 0        (L × L)
    dq    = s·e ⊙ (dO·Sᵀ) + dA·k                    (o's two terms)
    dk    = (e_l / e) ⊙ (ṽ·Dᵀ) + dAᵀ·q              (S' and o's intra term; call the first dk_S)
    dw    = −dṽ·Sᵀ                                  (from ṽ = u − w·S)
    dγ_t  = q_t·dq_t − k_t·dk_t + [t = l]·(e_l·⟨S, D⟩ + Σ_j k_j·dk_S,j)

dγ is the gradient for γ = G·ln 2, the natural-log cumulative gate (e = exp γ): every factor
e_a / e_b of the lines above gives +(its term) to dγ_a and −(its term) to dγ_b; o's first term
and S's decay e_l give the rest. fla turns dγ into the per-position gate's gradient by a reverse
cumulative sum inside each chunk. How ṽ depends on S, and S on the earlier chunks, is already in
dṽ and D (fla's other backward kernels); ṽ's dependence on k, β and the gate through u and w is
the WY backward's, after this one.
"""

from __future__ import annotations

import torch

# Chunks handled per batched step: bounds the fp32 copies (~4096 positions' worth of tensors).
_POSITIONS_PER_STEP = 4096


def gated_delta_dqkwg(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    dv: torch.Tensor,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk (B, T, H, K), dw (B, T, HV, K) in k's dtype, dγ (B, T, HV) fp32, as above.

    Usage: ``dq, dk, dw, dg = gated_delta_dqkwg(q, k, v_new, g, h, dv, do, dh, K**-0.5)``.
    (fla's call also passes w, which dw = −dṽ·Sᵀ does not need.)
    """
    _check_shapes(q, k, v, g, h, dv, do, dh)
    batch, seq, heads, _ = q.shape
    n, value_heads = batch * seq, v.shape[2]
    positions, last = _chunk_positions(batch, seq, cu_seqlens, chunk_size, q.device)
    group = (heads, value_heads // heads)  # value head i = (i // G, i % G)
    states, state_grads = (x.reshape(positions.shape[0], *group, *x.shape[-2:]) for x in (h, dh))
    # One row more than the tokens: the padding positions of partial chunks write there.
    dq = q.new_zeros(n + 1, heads, q.shape[-1])
    dk = k.new_zeros(n + 1, heads, k.shape[-1])
    dw = k.new_zeros(n + 1, value_heads, k.shape[-1])
    dg = torch.zeros(n + 1, value_heads, dtype=torch.float32, device=q.device)
    step = max(1, _POSITIONS_PER_STEP // chunk_size)
    for first in range(0, positions.shape[0], step):
        chunks = slice(first, first + step)
        rows = positions[chunks]  # (c, L) token rows, n on padding

        def take(x, grouped=False, rows=rows):  # (B, T, heads, ...) -> (c, L, heads, ...) fp32
            taken = _gather(x.reshape(n, *x.shape[2:]), rows, n)
            return taken.unflatten(2, group) if grouped else taken

        grads = _chunk_grads(
            take(q), take(k), take(v, True), take(g, True), take(dv, True), take(do, True),
            states[chunks].float(), state_grads[chunks].float(), rows < n, last[chunks], scale,
        )  # fmt: skip
        for out, grad in zip((dq, dk, dw, dg), grads):
            out.index_copy_(0, rows.flatten(), grad.reshape(-1, *out.shape[1:]).to(out.dtype))
    return tuple(x[:n].unflatten(0, (batch, seq)) for x in (dq, dk, dw, dg))


def _chunk_grads(q, k, v, g, dv, do, h, dh, valid, last, scale):
    """The formulas of the module docstring for c chunks at once, fp32, padding rows zero.

    q, k (c, L, H, K); v, dv, do (c, L, H, G, V); g (c, L, H, G); h, dh (c, H, G, K, V);
    valid (c, L) bool; last (c,) the last valid row. Returns dq, dk (c, L, H, K) summed over
    the group, dw (c, L, H, G, K), dγ (c, L, H, G).
    """
    chunks, length = valid.shape
    g_last = g[torch.arange(chunks, device=g.device), last]  # (c, H, G)
    to_end = torch.where(valid[..., None, None], torch.exp2(g_last[:, None] - g), 0.0)  # e_l/e
    gt = g.permute(0, 2, 3, 1)  # (c, H, G, L)
    causal = torch.ones(length, length, dtype=torch.bool, device=g.device).tril()
    kept = causal & valid[:, :, None] & valid[:, None, :]  # (c, t, j)
    ratio = torch.exp2(
        (gt[..., :, None] - gt[..., None, :]).masked_fill(~kept[:, None, None], -torch.inf)
    )
    d_a = torch.einsum("cthgv,cjhgv->chgtj", do, v) * ratio * scale  # dA_tj
    dq = torch.einsum("cthgv,chgkv->cthgk", do, h) * (scale * torch.exp2(g))[..., None]
    dq = dq + torch.einsum("chgtj,cjhk->cthgk", d_a, k)
    dk_state = torch.einsum("cjhgv,chgkv->cjhgk", v, dh) * to_end[..., None]  # dk_S
    dk = dk_state + torch.einsum("chgtj,cthk->cjhgk", d_a, q)
    dw = -torch.einsum("cthgv,chgkv->cthgk", dv, h)
    dg = torch.einsum("cthgk,cthk->cthg", dq, q) - torch.einsum("cthgk,cthk->cthg", dk, k)
    at_end = torch.exp2(g_last) * (h * dh).sum((-2, -1))  # e_l·⟨S, D⟩, (c, H, G)
    at_end = at_end + torch.einsum("cjhgk,cjhk->chg", dk_state, k)
    dg[torch.arange(chunks, device=g.device), last] += at_end
    return dq.sum(3), dk.sum(3), dw, dg


def _gather(x: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """x[rows] in fp32 with the padding rows (== n) zero. x (n, ...); rows (c, L)."""
    taken = x[rows.clamp(max=n - 1)].float()
    pad = (rows == n).view(*rows.shape, *[1] * (taken.dim() - 2))
    return taken.masked_fill_(pad, 0.0)


def _chunk_positions(batch, seq, cu_seqlens, chunk_size, device):
    """Token rows of every chunk, (NT, L) with n = B·T on padding, and each chunk's last row
    index (NT,), in fla's chunk order (sequence by sequence). With cu_seqlens: one host read."""
    offsets = torch.arange(chunk_size, device=device)
    if cu_seqlens is None:
        starts = torch.arange(0, seq, chunk_size, device=device)
        starts = (torch.arange(batch, device=device)[:, None] * seq + starts).flatten()
        ends = (starts // seq + 1) * seq
    else:
        bounds = cu_seqlens.tolist()
        pairs = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) for s in range(s, e, chunk_size)]
        starts, ends = torch.tensor(pairs, dtype=torch.long, device=device).reshape(-1, 2).unbind(1)
    rows = starts[:, None] + offsets
    rows = torch.where(rows < ends[:, None], rows, batch * seq)
    last = (ends - starts).clamp(max=chunk_size) - 1
    return rows, last


def _check_shapes(q, k, v, g, h, dv, do, dh):
    batch, seq, heads, dim_k = q.shape
    value_heads, dim_v = v.shape[2], v.shape[3]
    expected = {
        "k": (k.shape, q.shape),
        "v": (v.shape[:2], (batch, seq)),
        "g": (g.shape, (batch, seq, value_heads)),
        "dv": (dv.shape, v.shape),
        "do": (do.shape, v.shape),
        "h": (h.shape[2:], (value_heads, dim_k, dim_v)),
        "dh": (dh.shape, h.shape),
    }
    wrong = [f"{name} {tuple(got)} (want {tuple(want)})" for name, (got, want) in expected.items()
             if tuple(got) != tuple(want)]  # fmt: skip
    if wrong or value_heads % heads:
        raise ValueError(
            f"gated_delta_dqkwg with q {tuple(q.shape)}: {', '.join(wrong) or 'HV % H != 0'}; "
            "fla's layout is q, k (B, T, H, K), v (B, T, HV, V), h (B, NT, HV, K, V)"
        )


def gated_delta_dqkwg_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    h: torch.Tensor,
    dv: torch.Tensor,
    do: torch.Tensor,
    dh: torch.Tensor,
    scale: float,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same four gradients in fp64, one chunk and head at a time. Slow: for tests.

    Usage: ``dq, dk, dw, dg = gated_delta_dqkwg_reference(q, k, v_new, g, h, dv, do, dh, s)``.
    """
    q, k, v, g, h, dv, do, dh = (x.double() for x in (q, k, v, g, h, dv, do, dh))
    batch, seq, heads, _ = q.shape
    value_heads = v.shape[2]
    dq, dk = torch.zeros_like(q), torch.zeros_like(k)
    dw, dg = q.new_zeros(batch, seq, value_heads, q.shape[-1]), torch.zeros_like(g)
    if cu_seqlens is None:
        sequences = [(b, 0, seq) for b in range(batch)]
    else:
        bounds = cu_seqlens.tolist()
        sequences = [(0, s, e) for s, e in zip(bounds[:-1], bounds[1:])]
    chunk = {b: 0 for b, _, _ in sequences}  # h[b]'s chunks run sequence by sequence
    for b, start, end in sequences:
        for t0 in range(start, end, chunk_size):
            t, c = slice(t0, min(t0 + chunk_size, end)), chunk[b]
            chunk[b] += 1
            for i in range(value_heads):
                j = i // (value_heads // heads)  # the key head of value head i
                grads = _one_chunk(
                    q[b, t, j], k[b, t, j], v[b, t, i], g[b, t, i], dv[b, t, i], do[b, t, i],
                    h[b, c, i], dh[b, c, i], scale,
                )  # fmt: skip
                dq[b, t, j] += grads[0]
                dk[b, t, j] += grads[1]
                dw[b, t, i], dg[b, t, i] = grads[2], grads[3]
    return dq, dk, dw, dg


def _one_chunk(q, k, v, g, dv, do, state, state_grad, scale):
    """The docstring's lines for one chunk and value head: q, k (L, K); v, dv, do (L, V);
    g (L,); state S and state_grad D (K, V)."""
    e = torch.exp2(g)
    causal = torch.ones(len(g), len(g), dtype=torch.bool, device=g.device).tril()
    d_a = torch.where(causal, scale * (do @ v.T) * e[:, None] / e[None, :], 0.0)
    dq = scale * e[:, None] * (do @ state.T) + d_a @ k
    dk_state = (e[-1] / e)[:, None] * (v @ state_grad.T)
    dk = dk_state + d_a.T @ q
    dw = -dv @ state.T
    dg = (dq * q).sum(1) - (dk * k).sum(1)
    dg[-1] += e[-1] * (state * state_grad).sum() + (dk_state * k).sum()
    return dq, dk, dw, dg
