"""LoRA-adapted linear projections sharing one input, and their forward/backward matmuls.

For Y = X W^T + b + s * (X A^T) B^T, with X (N, in), W (out, in), A (r, in), B (out, r):
    dX = dY W + s * (dY B) A
    dA = s * (dY B)^T X
    dB = s * dY^T (X A^T)
    dW = dY^T X            (only when W requires grad: full fine-tuning)
    db = sum_rows dY
Matmuls run in the compute dtype (the autocast dtype when autocast is on, else X's dtype); each
gradient is returned in its parameter's own dtype (PEFT keeps adapters in fp32 over a bf16 base).

Per-call cost matters here (7 projections per layer, forward run twice under gradient
checkpointing, and at small shapes the CPU's launches, not the GPU, pace the step), so the work is
done per *group* of projections that read the same input (q/k/v; gate/up; o; down), in as few
kernel launches as the algebra allows:
- the adapters are cast to the compute dtype once in forward, all of a group's in one cat and one
  cast (``cast_projections``), and those copies saved: the backward casts no weight;
- the group's A products are one GEMM, X [A_q; A_k; A_v]^T, and in backward the dA's are one GEMM
  and dX's LoRA part another (``group_forward``, ``group_backward``);
- each B product is added into its base GEMM's output in place (addmm_), and the scaling s rides
  on a GEMM's alpha everywhere: no separate multiply, and no gradient rounded twice.
``benchmarks/launch_count.py`` counts what this saves per layer.

A 4-bit base (QLoRA: a bitsandbytes NF4 ``Params4bit`` with its ``quant_state``) is dequantised
to the compute dtype in forward, and the *packed* weight is what gets saved: the backward
dequantises it again for dX, so no full-precision copy lives between forward and backward.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastlm.kernels.nf4_dequant import dequantize_nf4, dequantize_nf4_many

logger = logging.getLogger("fastlm")


class LoRAWeights(NamedTuple):
    """A projection: base weight/bias and an optional LoRA adapter (A, B, scaling)."""

    weight: Tensor  # base weight (out, in); frozen for LoRA, may require grad (full fine-tuning)
    bias: Tensor | None = None  # base bias (out,) (Qwen2 q/k/v carry one)
    lora_A: Tensor | None = None  # (r, in) - None: this projection has no adapter
    lora_B: Tensor | None = None  # (out, r)
    scaling: float = 1.0  # lora_alpha / r (or rsLoRA's)


NO_GRADS = (None, None, None, None)  # (dW, db, dA, dB) of a projection that needs none


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def flatten_weights(*projections: LoRAWeights) -> list:
    """Five autograd.Function arguments per projection: weight, bias, lora_A, lora_B, scaling."""
    out: list = []
    for p in projections:
        if (p.lora_A is None) != (p.lora_B is None):
            raise ValueError("LoRAWeights: lora_A and lora_B must both be set or both be None")
        out += (p.weight, p.bias, p.lora_A, p.lora_B, float(p.scaling))
    return out


def quant_state_of(weight: Tensor):
    """The bitsandbytes 4-bit ``quant_state`` of a packed base weight, or None for a dense one."""
    return getattr(weight, "quant_state", None)


def dense_weight(weight: Tensor, quant_state, dtype: torch.dtype) -> Tensor:
    """``weight`` in ``dtype``: dequantised when 4-bit packed, cast (only if needed) otherwise."""
    if quant_state is not None:
        return dequantize_nf4(weight, quant_state, dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _dense_weights(weights: list, quant_states: list, dtype: torch.dtype) -> list:
    """``dense_weight`` of each; the 4-bit ones dequantised together (one launch on the GPU)."""
    packed = [i for i, qs in enumerate(quant_states) if qs is not None]
    dense = [
        w if qs is not None else dense_weight(w, None, dtype)
        for w, qs in zip(weights, quant_states)
    ]
    if packed:
        unpacked = dequantize_nf4_many(
            [weights[i] for i in packed], [quant_states[i] for i in packed], dtype
        )
        for i, w in zip(packed, unpacked):
            dense[i] = w
    return dense


class Cast(NamedTuple):
    """A group of projections of one input, in the compute dtype (see ``cast_projections``)."""

    weights: list  # dense W per projection (a 4-bit one dequantised)
    biases: list
    lora_a: list  # A per projection, None without an adapter
    lora_b: list
    a_cat: Tensor | None  # [A_i; A_j; ...] of the projections with an adapter, stacked by rows
    saved_weights: list  # W per projection as the backward takes it: a 4-bit one still packed
    dtypes: list  # original dtypes of (weight, bias, lora_A, lora_B) per projection, None: absent
    quant_states: list  # per projection: the 4-bit weight's quant_state, or None


def cast_projections(
    flat: tuple, dtype: torch.dtype, groups: tuple[int, ...] = (), later: tuple[int, ...] = ()
) -> list[Cast]:
    """The flattened projections' tensors in ``dtype``, each cast once, in as few launches as the
    dtypes allow; one ``Cast`` per group (``groups``: how many projections each has, in order;
    default one group of all). The groups whose indices are in ``later`` get no dense weights
    yet (``weights`` empty): ``with_dense_weights`` makes them when the group runs, so that a
    function running its groups one after another holds one group's dense copies at a time.

    Base weights are cast (or dequantised) one by one. The adapters are laid out in one buffer,
    A's first (so that a group's ``a_cat``, its A's stacked by rows, is a view of it), then B's:
    one ``torch.cat`` in their own dtype and one cast of the whole buffer, instead of one cast
    per A and B (CUDA's cat runs one kernel only when every input has the output's dtype, hence
    the separate cast). Without a cast, each group's A's alone are concatenated, for its fused A
    product. The values are those of per-tensor casts (each element rounded the same way).
    """
    weights, biases, lora_a, lora_b = (list(flat[i::5]) for i in range(4))
    quant_states = [quant_state_of(w) for w in weights]
    groups = groups or (len(weights),)
    # A 4-bit weight of a later group is dequantised when its group runs (with_dense_weights).
    later_4bit = {i for i in _projections_of(groups, later) if quant_states[i] is not None}
    now = [i for i in range(len(weights)) if i not in later_4bit]
    dense: list = list(weights)
    made = _dense_weights([weights[i] for i in now], [quant_states[i] for i in now], dtype)
    for i, w in zip(now, made):
        dense[i] = w
    saved = [w if qs is not None else d for w, qs, d in zip(weights, quant_states, dense)]
    dtypes = []
    for weight, bias, a, b in zip(weights, biases, lora_a, lora_b):
        dtypes += [t if t is None else t.dtype for t in (weight, bias, a, b)]
    biases = [b if b is None or b.dtype == dtype else b.to(dtype) for b in biases]
    lora_a, lora_b, a_cats = _cast_adapters(lora_a, lora_b, dtype, groups)
    casts, start = [], 0
    for size, a_cat in zip(groups, a_cats):
        part = slice(start, start + size)
        casts.append(
            Cast(
                [] if len(casts) in later else dense[part],
                biases[part],
                lora_a[part],
                lora_b[part],
                a_cat,
                saved[part],
                dtypes[4 * start : 4 * (start + size)],
                quant_states[part],
            )  # fmt: skip
        )
        start += size
    return casts


def _projections_of(groups: tuple[int, ...], chosen: tuple[int, ...]) -> list[int]:
    """Indices of the projections in the chosen groups (``groups``: sizes, in order)."""
    starts = [sum(groups[:g]) for g in range(len(groups))]
    return [i for g in chosen for i in range(starts[g], starts[g] + groups[g])]


def with_dense_weights(cast: Cast, dtype: torch.dtype) -> Cast:
    """``cast`` with its dense weights, for a group ``cast_projections`` left for ``later``."""
    return cast._replace(weights=_dense_weights(cast.saved_weights, cast.quant_states, dtype))


def _cast_adapters(lora_a: list, lora_b: list, dtype: torch.dtype, groups: tuple[int, ...]):
    """(A's, B's, a_cat per group) in ``dtype``: one cat + one cast when a cast is needed."""
    have = [i for i, a in enumerate(lora_a) if a is not None]
    tensors = [lora_a[i] for i in have] + [lora_b[i] for i in have]
    needs_cast = any(t.dtype != dtype for t in tensors)
    if needs_cast and len({t.dtype for t in tensors}) == 1:
        buffer = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        views, offset = [], 0
        for t in tensors:
            views.append(buffer[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
    else:  # already in dtype, or mixed adapter dtypes (unusual): one by one
        buffer, views = None, [t if t.dtype == dtype else t.to(dtype) for t in tensors]
    lora_a, lora_b = [None] * len(lora_a), [None] * len(lora_b)
    for j, i in enumerate(have):
        lora_a[i], lora_b[i] = views[j], views[len(have) + j]
    a_cats, start, offset = [], 0, 0  # offset: where the group's first A starts in the buffer
    for size in groups:
        a_group = [a for a in lora_a[start : start + size] if a is not None]
        numel = sum(a.numel() for a in a_group)
        a_cat = None
        if len(a_group) > 1 and buffer is not None:  # stacked there already: a view
            a_cat = buffer[offset : offset + numel].view(-1, a_group[0].shape[1])
        elif len(a_group) > 1:
            a_cat = torch.cat(a_group)
        a_cats.append(a_cat)
        offset += numel
        start += size
    return lora_a, lora_b, a_cats


def _mm(a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """alpha · a @ b in one GEMM (alpha in its epilogue: one rounding, no extra pass)."""
    if alpha == 1.0:
        return torch.mm(a, b)
    out = torch.empty(a.shape[0], b.shape[1], dtype=a.dtype, device=a.device)
    return out.addmm_(a, b, beta=0, alpha=alpha)  # beta=0: the empty buffer is never read


def _adapter_columns(lora_a: list) -> list:
    """Per projection, its columns of X·a_catᵀ (slice), None without an adapter."""
    columns, start = [], 0
    for a in lora_a:
        if a is None:
            columns.append(None)
            continue
        columns.append(slice(start, start + a.shape[0]))
        start += a.shape[0]
    return columns


def group_forward(x: Tensor, cast: Cast, scalings: tuple) -> tuple[list, Tensor | None, float]:
    """(Y_i per projection, XA, xa_scale) for 2-D x sharing one input.

        Y_i = X W_iᵀ + b_i + s_i (X A_iᵀ) B_iᵀ
        XA  = c · X [A_i; A_j; ...]ᵀ   one GEMM for every A product, (N, Σr)

    with c = s when every adapter of the group has the same scaling s (then Y_i adds XA_i B_iᵀ
    with alpha 1, and the saved XA already carries s for dB), else c = 1 (alpha s_i). XA is None
    when no projection has an adapter.
    """
    ys = [F.linear(x, w, b) for w, b in zip(cast.weights, cast.biases)]  # addmm(b, x, Wᵀ) / mm
    have = [i for i, a in enumerate(cast.lora_a) if a is not None]
    if not have:
        return ys, None, 1.0
    xa_scale = scalings[have[0]] if len({scalings[i] for i in have}) == 1 else 1.0
    a_all = cast.a_cat if cast.a_cat is not None else cast.lora_a[have[0]]
    xa = _mm(x, a_all.t(), xa_scale)
    for i, cols in enumerate(_adapter_columns(cast.lora_a)):
        if cols is not None:  # in place into the base GEMM's output, scaling as GEMM alpha
            ys[i].addmm_(xa[:, cols], cast.lora_b[i].t(), alpha=scalings[i] / xa_scale)
    return ys, xa, xa_scale


def saved_group(cast: Cast) -> list:
    """What a Function saves of a group for ``group_backward`` (``Group.unpack`` reads it back)."""
    return [cast.a_cat, *cast.saved_weights, *cast.lora_a, *cast.lora_b]


class Group(NamedTuple):
    """A group of projections as its backward sees it: saved tensors and per-projection facts."""

    weights: list  # W per projection in the compute dtype, or packed 4-bit
    lora_a: list
    lora_b: list
    a_cat: Tensor | None
    quant_states: list
    dtypes: list  # original dtypes of (weight, bias, lora_A, lora_B) per projection
    scalings: tuple
    xa_scale: float  # the c that XA was computed with (see group_forward)

    @staticmethod
    def unpack(saved: list, quant_states, dtypes, scalings, xa_scale) -> Group:
        """The inverse of ``saved_group``; usage: ``Group.unpack(ctx.saved_tensors[2:], ...)``."""
        n = len(quant_states)
        a_cat, rest = saved[0], saved[1:]
        return Group(
            list(rest[:n]), list(rest[n : 2 * n]), list(rest[2 * n : 3 * n]), a_cat,
            quant_states, dtypes, scalings, xa_scale,
        )  # fmt: skip


_HALF = (torch.float16, torch.bfloat16)


def _mm_to(a: Tensor, b: Tensor, out_dtype: torch.dtype, alpha: float = 1.0) -> Tensor:
    """alpha · a @ b returned in ``out_dtype``; fp32 parameters get an fp32-accumulated, fp32
    result."""
    if a.dtype == out_dtype:
        return _mm(a, b, alpha)
    if out_dtype != torch.float32:
        return _mm(a, b, alpha).to(out_dtype)
    if not a.is_cuda:
        return _mm(a.float(), b.float(), alpha)
    if a.dtype in _HALF and b.dtype == a.dtype and _mm_writes_fp32():
        out = torch.mm(a, b, out_dtype=torch.float32)
    else:  # the GEMM still accumulates in fp32; only its output is rounded (PEFT+autocast's)
        out = torch.mm(a, b).float()
    return out if alpha == 1.0 else out.mul_(alpha)


@functools.cache
def _mm_writes_fp32() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=torch.float32)`` for fp16/bf16 CUDA
    inputs (the ATen overload ``mm.dtype``, torch >= 2.8). Decided once, from the operator table;
    without it the slower path is logged once."""
    if "dtype" in torch.ops.aten.mm.overloads():
        return True
    logger.warning(
        "fastlm: torch %s has no mm(out_dtype=torch.float32): fp32 LoRA gradients of fp16/bf16 "
        "matmuls are rounded to 16 bits first (as PEFT under autocast gets them)",
        torch.__version__,
    )
    return False


def group_backward(
    dys: list, x: Tensor, xa: Tensor | None, group: Group, needs: list, need_x: bool
) -> tuple[Tensor | None, list]:
    """(dX, [(dW, db, dA, dB) per projection]) of a group sharing the input x.

    dys: dY_i (N, out_i) in the compute dtype, None for an unused output (no contribution);
    x (N, in) and XA = c·X[A_i; ...]ᵀ as saved by group_forward; needs: needs_input_grad of
    (weight, bias, lora_A, lora_B) per projection. With S_i = s_i dY_i B_i (N, r_i):

        dX   = Σ_i dY_i W_i + [S_1 | S_2 | ...] [A_1; A_2; ...]    one GEMM for the LoRA part
        dA_i = S_iᵀ X              all at once: [S_1 | ...]ᵀ X = [dA_1; dA_2; ...]
        dB_i = (s_i / c) dY_iᵀ XA_i   (alpha 1 when c = s_i)
        dW_i = dY_iᵀ X,   db_i = Σ_rows dY_i

    S_i carries s_i through its GEMM's alpha, so no gradient gets a separate scaling pass and
    each is rounded once. The S_i are written side by side into one buffer when every projection
    with an adapter has a dY (else, one projection at a time). dX accumulates in place (addmm_,
    beta = 1: in bf16 each GEMM's sum is rounded once, as before).
    """
    dx = lora_s = None
    if need_x:
        dx, lora_s = group_grad_input(dys, group)
    return dx, group_grad_params(dys, x, xa, group, needs, lora_s)


class LoRAS(NamedTuple):
    """S_i = s_i dY_i B_i of a group: ``all`` = [S_1 | S_2 | ...] when fused, else None."""

    all: Tensor | None
    each: dict  # projection index -> S_i (N, r_i); a column slice of ``all`` when fused


def _lora_s(dys: list, group: Group) -> LoRAS:
    columns = _adapter_columns(group.lora_a)
    have = [i for i, cols in enumerate(columns) if cols is not None and dys[i] is not None]
    if group.a_cat is not None and len(have) == sum(c is not None for c in columns):
        dy = dys[have[0]]
        s_all = dy.new_empty(dy.shape[0], group.a_cat.shape[0])
        for i in have:  # beta=0: the empty buffer is never read
            s_all[:, columns[i]].addmm_(dys[i], group.lora_b[i], beta=0, alpha=group.scalings[i])
        return LoRAS(s_all, {i: s_all[:, columns[i]] for i in have})
    return LoRAS(None, {i: _mm(dys[i], group.lora_b[i], group.scalings[i]) for i in have})


def group_grad_input(dys: list, group: Group) -> tuple[Tensor | None, LoRAS]:
    """dX = Σ_i dY_i W_i + [S_1 | ...] [A_1; ...] (see group_backward), and the S_i, which the
    dA's reuse. A packed 4-bit W is dequantised here again for its GEMM."""
    dx = None
    for i, dy in enumerate(dys):
        if dy is None:
            continue
        # The dense copy is a temporary: held by no name, it is freed before the next one is
        # made (one projection's copy at a time, not two).
        if dx is None:
            dx = torch.mm(dy, dense_weight(group.weights[i], group.quant_states[i], dy.dtype))
        else:
            dx.addmm_(dy, dense_weight(group.weights[i], group.quant_states[i], dy.dtype))
    lora_s = _lora_s(dys, group)
    if lora_s.all is not None:
        dx.addmm_(lora_s.all, group.a_cat)
    else:
        for i, s_i in lora_s.each.items():
            dx.addmm_(s_i, group.lora_a[i])
    return dx, lora_s


def group_grad_params(
    dys: list, x: Tensor, xa: Tensor | None, group: Group, needs: list, lora_s: LoRAS | None
) -> list:
    """[(dW, db, dA, dB) per projection] (see group_backward), each in its parameter's dtype,
    None where not needed; ``lora_s`` from group_grad_input, or None to compute it here."""
    dtypes, columns = group.dtypes, _adapter_columns(group.lora_a)
    grads = [[None, None, None, None] for _ in dys]
    wants_a = [
        i for i, dy in enumerate(dys) if dy is not None and columns[i] is not None and needs[i][2]
    ]
    if wants_a:
        if lora_s is None:
            lora_s = _lora_s(dys, group)
        a_dtypes = {dtypes[4 * i + 2] for i in lora_s.each}
        if lora_s.all is not None and len(wants_a) == len(lora_s.each) and len(a_dtypes) == 1:
            d_a = _mm_to(lora_s.all.t(), x, a_dtypes.pop())  # [dA_1; dA_2; ...]
            for i in wants_a:
                grads[i][2] = d_a[columns[i]]
        else:
            for i in wants_a:
                grads[i][2] = _mm_to(lora_s.each[i].t(), x, dtypes[4 * i + 2])
    for i, dy in enumerate(dys):
        if dy is None:
            continue
        need_w, need_b, _, need_lb = needs[i]
        if need_w:  # dW = dY^T X
            grads[i][0] = _mm_to(dy.t(), x, dtypes[4 * i])
        if need_b:  # db = sum over rows of dY, summed in fp32
            d_bias = dy.sum(0, dtype=torch.float32)
            bias_dtype = dtypes[4 * i + 1]
            grads[i][1] = d_bias if bias_dtype == torch.float32 else d_bias.to(bias_dtype)
        if need_lb and columns[i] is not None:  # dB = (s_i / c) dY^T XA_i
            alpha = group.scalings[i] / group.xa_scale
            grads[i][3] = _mm_to(dy.t(), xa[:, columns[i]], dtypes[4 * i + 3], alpha)
    return [tuple(g) for g in grads]
