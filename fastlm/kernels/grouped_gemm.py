"""Grouped GEMM: the rows of ``x`` come sorted by group, and group g's rows are multiplied by w[g].

    x (S, K), w (G, K, N), ends (G,): group g owns rows ends[g-1] <= i < ends[g] (ends[-1] = S)
    y[i] = x[i] @ w[g(i)]                                                          y (S, N)

This is what a mixture-of-experts layer runs per projection once its (token, expert) pairs are
sorted by expert: one GEMM over all routed tokens instead of one small GEMM per expert in a
Python loop. Backward (``GroupedMatmul``), per group g with X_g, dY_g its rows:
    dX_g = dY_g W_g^T          dW_g = X_g^T dY_g        (dW_g = 0 for a group without rows)

Two implementations of the same three products:
- ``torch._grouped_mm`` (one launch per product) where it runs: CUDA in bf16, or CPU, and only
  when every operand's row stride and base address are 16-byte aligned (its kernels refuse
  others; with rank-4 LoRA in bf16 an adapter product is not). Its own autograd is not used: on
  CPU in torch 2.13 it fails on an expanded gradient (``Invalid strides/sizes``), so the backward
  below calls the forward op for dX and its 2-D x 2-D form (groups along K) for dW.
- the reference: one ``torch.mm`` per non-empty group into slices of one output (the group sizes
  read on the host once per call: ``HostSizes``, which the fused path never reads, so it never
  waits for the GPU). Exact in fp32; what CPU tests and odd sizes run.
No Triton kernel yet: the two above are exact, and a Triton grouped GEMM that beats cuBLAS's /
CUTLASS's grouped kernels is a project of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_ALIGN = 16  # bytes: torch._grouped_mm needs 16-byte aligned strides and base pointers


def _aligned(t: Tensor) -> bool:
    """A 2-D or 3-D operand torch._grouped_mm takes: one unit stride in the last two dims, the
    other stride and the base address multiples of 16 bytes."""
    inner = t.stride()[-2:]
    if 1 not in inner:
        return False
    other = inner[0] if inner[1] == 1 else inner[1]
    size = t.element_size()
    return (other * size) % _ALIGN == 0 and t.data_ptr() % _ALIGN == 0


def torch_grouped_mm_fits(*operands: Tensor) -> bool:
    """True when ``torch._grouped_mm`` runs these operands: CUDA in bf16 or CPU, aligned.

    Usage: ``torch_grouped_mm_fits(x, w)``."""
    first = operands[0]
    if not hasattr(torch, "_grouped_mm"):
        return False
    if first.is_cuda and any(t.dtype != torch.bfloat16 for t in operands):
        return False
    if first.device.type not in ("cuda", "cpu"):
        return False
    return all(_aligned(t) for t in operands)


def _grouped_product(
    x: Tensor, w: Tensor, ends: Tensor, sizes: Sequence[int], fused: bool
) -> Tensor:
    """y (S, N) = x (S, K) @ w[g] per group; ``fused``: torch._grouped_mm, else the reference."""
    if fused:
        return torch._grouped_mm(x, w, offs=ends)
    y = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for group, size in enumerate(sizes):
        if size:
            torch.mm(x[start : start + size], w[group], out=y[start : start + size])
        start += size
    if start < x.shape[0]:  # rows past the last group belong to none: zero, as in backward
        y[start:].zero_()
    return y


def _grouped_weight_grad(
    x: Tensor, dy: Tensor, ends: Tensor, sizes: Sequence[int], fused: bool
) -> Tensor:
    """dW (G, K, N): dW_g = X_g^T dY_g, zero for an empty group."""
    if fused:  # the 2-D x 2-D form: groups along the reduced dimension
        return torch._grouped_mm(x.t(), dy, offs=ends)
    dw = x.new_zeros(len(sizes), x.shape[1], dy.shape[1])
    start = 0
    for group, size in enumerate(sizes):
        if size:
            torch.mm(x[start : start + size].t(), dy[start : start + size], out=dw[group])
        start += size
    return dw


class GroupedMatmul(torch.autograd.Function):
    """y = x @ w[group of the row]. Saves x and w (views, no copies); the group ends as a tensor
    and as host ints."""

    @staticmethod
    def forward(
        ctx, x: Tensor, w: Tensor, ends: Tensor, sizes: Sequence[int], fused: bool
    ) -> Tensor:
        ctx.save_for_backward(x, w, ends)
        ctx.sizes, ctx.fused = sizes, fused
        return _grouped_product(x, w, ends, sizes, fused)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, w, ends = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        dy = dy.contiguous()  # an expanded or sliced gradient: one layout for both products
        fused = ctx.fused and torch_grouped_mm_fits(dy, w)
        dx = dw = None
        if need_x:  # dX_g = dY_g W_g^T
            dx = _grouped_product(dy, w.transpose(-2, -1), ends, ctx.sizes, fused)
        if need_w:  # dW_g = X_g^T dY_g
            dw = _grouped_weight_grad(x, dy, ends, ctx.sizes, fused and _aligned(x.t()))
        return dx, dw, None, None, None


class HostSizes(Sequence):
    """Rows per group as host ints, read from the device the first time a value is needed.

    ``torch._grouped_mm`` takes the group ends on the device, so the fused path only asks for
    the number of groups and never waits for the GPU; the reference path (one ``torch.mm`` per
    group) reads the values, once. A read on CUDA is a synchronisation: the host stops queueing
    kernels ahead, once per MoE layer call, which a launch-bound step cannot afford.
    """

    # Reads made so far, process-wide: a CUDA graph cannot capture one, so the layer graphs
    # count them across a layer's first (eager) call and leave a layer that reads eager.
    reads = 0

    def __init__(self, sizes: Tensor):
        self._sizes = sizes
        self._values: list[int] | None = None

    def __len__(self) -> int:
        return self._sizes.numel()

    def __getitem__(self, index):
        return self.values()[index]

    def values(self) -> list[int]:
        """The sizes as a list (the one host read)."""
        if self._values is None:
            self._values = self._sizes.tolist()
            HostSizes.reads += 1
        return self._values

    @property
    def read(self) -> bool:
        """Whether the values have been read from the device."""
        return self._values is not None


def group_sizes(groups: Tensor, count: int) -> Tensor:
    """Rows per group (``count`` groups) of the group ids ``groups``: a scatter-add, where
    ``torch.bincount`` would read the largest id on the host (a wait for the GPU on CUDA).

    Usage: ``sizes = group_sizes(expert_ids, E)``."""
    ones = torch.ones_like(groups, dtype=torch.int64)
    return torch.zeros(count, dtype=torch.int64, device=groups.device).scatter_add_(0, groups, ones)


def group_ends(sizes: Tensor) -> tuple[Tensor, HostSizes]:
    """(ends as int32 on the device, sizes as host ints read only if a path needs them) from
    rows per group.

    Usage: ``ends, host_sizes = group_ends(group_sizes(expert_ids, E))``."""
    return torch.cumsum(sizes, 0, dtype=torch.int32), HostSizes(sizes)


def grouped_mm(
    x: Tensor, w: Tensor, ends: Tensor, sizes: Sequence[int], implementation: str | None = None
) -> Tensor:
    """Differentiable y = x @ w[g] over row groups (x sorted by group; ``group_ends`` gives
    ``ends`` and ``sizes``). ``implementation``: "torch" or "reference" to force one (tests),
    None picks torch._grouped_mm where it fits.

    Usage: ``y = grouped_mm(x_sorted, expert_weights.transpose(1, 2), ends, sizes)``.
    """
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1] or len(sizes) != w.shape[0]:
        raise ValueError(
            f"grouped_mm: x (S, K) and w (G, K, N) with one size per group, got x "
            f"{tuple(x.shape)}, w {tuple(w.shape)}, {len(sizes)} sizes"
        )
    if implementation not in (None, "torch", "reference"):
        raise ValueError(f"grouped_mm: implementation {implementation!r}")
    fits = torch_grouped_mm_fits(x, w)
    if implementation == "torch" and not fits:
        raise ValueError("grouped_mm: torch._grouped_mm does not take these operands")
    fused = fits if implementation is None else implementation == "torch"
    return GroupedMatmul.apply(x, w, ends, sizes, fused)


def grouped_mm_reference(x: Tensor, w: Tensor, sizes: list[int]) -> Tensor:
    """The definition, one expert at a time with autograd: ``cat(x_g @ w[g])``."""
    pieces, start = [], 0
    for group, size in enumerate(sizes):
        pieces.append(x[start : start + size] @ w[group])
        start += size
    return torch.cat(pieces)
