"""RMSNorm: ``y = x / sqrt(mean(x**2, -1) + eps) * (offset + w)``, computed in fp32.

``offset=0`` is Llama's ``w * x_hat``; ``offset=1`` is Gemma's ``(1 + w) * x_hat``. ``x`` has any
leading shape and is normalised over its last dimension; the output has ``x``'s dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastlm.kernels._dispatch import use_triton

# Largest row kept whole in registers; longer rows are processed in chunks of this size.
_MAX_BLOCK = 8192


@triton.jit
def _rms_norm_fwd_kernel(
    X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset,
    BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    y_row = Y + row * stride_y
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        # The whole row stays in registers: x is read once.
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, (x * rstd * (offset + w)).to(Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            acc += x * x
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / n_cols + eps)
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = x * rstd * (offset + w)
            tl.store(y_row + start + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


# Backward, per row, with n = n_cols, r = rstd, x_hat = x * r and g = dy * (offset + w):
#   dx = r * (g - x_hat * mean(g * x_hat))      (mean over the n columns)
#   dw = sum over rows of dy * x_hat
# Each program takes a contiguous run of rows and writes its own fp32 partial dw row into
# DW_PARTIAL[pid]; the host sums those, so no atomics are needed.
# n_rows and rows_per_prog follow the batch's tokens: not specialised on (see flash_attention.py).
@triton.jit(do_not_specialize=["n_rows", "rows_per_prog"])
def _rms_norm_bwd_kernel(
    DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
    rows_per_prog, BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, COMPUTE_DW: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    # int64 rows (the loop variable inherits it) so that row * stride cannot overflow.
    row_start = pid.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    cols = tl.arange(0, BLOCK)
    dw_row = DW_PARTIAL + pid.to(tl.int64) * n_cols
    if ONE_BLOCK:
        mask = cols < n_cols
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
        dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for row in range(row_start, row_end):
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            x_hat = x * rstd
            g = dy * (offset + w)
            c = tl.sum(g * x_hat, axis=0) / n_cols
            dx = (g - x_hat * c) * rstd
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw_acc += dy * x_hat
        if COMPUTE_DW:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        for row in range(row_start, row_end):
            dy_row = DY + row * stride_dy
            x_row = X + row * stride_x
            dx_row = DX + row * stride_dx
            rstd = tl.load(RSTD + row)
            # First pass: mean(g * x_hat); second pass: dx and the running dw.
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                acc += dy * (offset + w) * x * rstd
            c = tl.sum(acc, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                dy = tl.load(dy_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                x = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
                w = tl.load(W + start + cols, mask=mask, other=0.0).to(tl.float32)
                x_hat = x * rstd
                dx = (dy * (offset + w) - x_hat * c) * rstd
                tl.store(dx_row + start + cols, dx.to(DX.dtype.element_ty), mask=mask)
                if COMPUTE_DW:
                    # Only this program touches its partial row, so read-modify-write is safe.
                    part = tl.load(dw_row + start + cols, mask=mask, other=0.0)
                    tl.store(dw_row + start + cols, part + dy * x_hat, mask=mask)


def _block_config(n_cols: int, max_block: int) -> tuple[int, bool, int]:
    block = min(triton.next_power_of_2(n_cols), max_block)
    num_warps = min(max(block // 256, 1), 16)
    return block, n_cols <= block, num_warps


def _as_rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    # Row-strided views are fine for the kernels; only the last dim must be unit-stride.
    t2d = t.reshape(-1, n_cols)
    return t2d if t2d.stride(1) == 1 else t2d.contiguous()


def _num_bwd_programs(n_rows: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_rows, 4 * sms))
    return max(1, min(n_rows, 8))  # interpreter: every program costs milliseconds


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, offset, max_block):
        n_cols = x.shape[-1]
        if weight.shape != (n_cols,):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({n_cols},)")
        x2d, weight = _as_rows(x, n_cols), weight.contiguous()
        n_rows = x2d.shape[0]
        y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        block, one_block, num_warps = _block_config(n_cols, max_block)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](
                x2d, weight, y, rstd, x2d.stride(0), y.stride(0), n_cols, eps, offset,
                BLOCK=block, ONE_BLOCK=one_block, num_warps=num_warps,
            )  # fmt: skip
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.offset, ctx.max_block, ctx.x_shape = offset, max_block, x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x2d.shape
        compute_dw = ctx.needs_input_grad[1]
        if n_rows == 0:
            dw = torch.zeros_like(weight) if compute_dw else None
            return dy.new_empty(ctx.x_shape), dw, None, None, None
        dy2d = _as_rows(dy, n_cols)
        dx = torch.empty((n_rows, n_cols), dtype=x2d.dtype, device=x2d.device)
        n_progs = _num_bwd_programs(n_rows, x2d.device)
        rows_per_prog = triton.cdiv(n_rows, n_progs)
        n_progs = triton.cdiv(n_rows, rows_per_prog)
        block, one_block, num_warps = _block_config(n_cols, ctx.max_block)
        # Zeroed only where the kernel reads it: the chunked path accumulates into it. The
        # one-block path stores each program's row once, and without dw the kernel never touches
        # the (1, n) dummy: no fill kernel for those (one launch fewer per norm backward).
        alloc = torch.zeros if compute_dw and not one_block else torch.empty
        dw_partial = alloc(
            (n_progs if compute_dw else 1, n_cols), dtype=torch.float32, device=x2d.device
        )
        _rms_norm_bwd_kernel[(n_progs,)](
            dy2d, x2d, weight, rstd, dx, dw_partial, dy2d.stride(0), x2d.stride(0),
            dx.stride(0), n_rows, n_cols, ctx.offset, rows_per_prog,
            BLOCK=block, ONE_BLOCK=one_block, COMPUTE_DW=compute_dw, num_warps=num_warps,
        )  # fmt: skip
        dw = dw_partial.sum(0).to(weight.dtype) if compute_dw else None
        return dx.view(ctx.x_shape), dw, None, None, None


def rms_norm_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    offset: float = 0.0,
    _max_block: int = _MAX_BLOCK,
) -> torch.Tensor:
    """RMSNorm through the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).

    Usage: ``y = rms_norm_triton(x, norm.weight, norm.eps, offset=1.0)``.
    ``_max_block`` is for tests, to force the chunked path on short rows.
    """
    return _RMSNormFunction.apply(x, weight, float(eps), float(offset), _max_block)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """Differentiable RMSNorm over the last dim, Triton on CUDA. Usage: ``rms_norm(h, w, 1e-6)``."""
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, offset)
    return rms_norm_reference(x, weight, eps, offset)


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0
) -> torch.Tensor:
    """Plain-PyTorch RMSNorm (fp32 inside, fp64 kept). Usage: ``rms_norm_reference(h, w, 1e-6)``."""
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (offset + weight.to(compute))).to(x.dtype)
