"""Triton's bf16 as the kernels' CPU tests need it to be the GPU's: fp32 -> bf16 conversion rounds
to nearest even, as torch's does, and ``tl.dot`` of bf16 operands is their product in fp32. A GPU
does both; on a CPU host the interpreter does them as tests/conftest.py makes it (by itself it
truncates, and multiplies bf16 bit patterns as integers)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl


@triton.jit
def _store_bf16_kernel(x_ptr, stored_ptr, cast_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    tl.store(stored_ptr + offsets, x, mask=mask)  # the store converts
    tl.store(cast_ptr + offsets, x.to(tl.bfloat16), mask=mask)  # an explicit cast


@pytest.fixture
def values(device) -> torch.Tensor:
    """Normal samples, and the cases a truncation or a wrong tie rule gets wrong: halfway
    between two bf16 values (ties to even, both ways), just above and below a halfway point,
    a carry into the exponent, and values past bf16's largest (to infinity)."""
    gen = torch.Generator().manual_seed(0)
    halfway = [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, 1 + 2**-8 - 2**-20]
    specials = [*halfway, -halfway[0], 2 - 2**-9, 3.3961e38, 3.4e38, 1e-40, 0.0, -0.0]
    x = torch.cat([torch.randn(4096, generator=gen), torch.tensor(specials)])
    return x.to(device)


def test_fp32_to_bf16_rounds_to_nearest_even(values):
    stored, cast = (torch.empty(values.shape, dtype=torch.bfloat16, device=values.device)
                    for _ in range(2))  # fmt: skip
    _store_bf16_kernel[(triton.cdiv(values.numel(), 1024),)](
        values, stored, cast, values.numel(), BLOCK=1024
    )
    expected = values.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(stored.view(torch.int16), expected)
    assert torch.equal(cast.view(torch.int16), expected)


@triton.jit
def _dot_kernel(a_ptr, b_ptr, out_ptr, M: tl.constexpr, K: tl.constexpr, N: tl.constexpr):
    rows, inner, cols = tl.arange(0, M), tl.arange(0, K), tl.arange(0, N)
    a = tl.load(a_ptr + rows[:, None] * K + inner[None, :])
    b = tl.load(b_ptr + inner[:, None] * N + cols[None, :])
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], tl.dot(a, b))


def test_dot_of_bf16_operands_is_their_product(device):
    """bf16 × bf16 products are exact in fp32, so the dot is torch's fp32 matmul of the same
    values up to summation order."""
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(shape, generator=gen).to(device, torch.bfloat16)
            for shape in ((16, 32), (32, 16)))  # fmt: skip
    out = torch.empty(16, 16, device=device)
    _dot_kernel[(1,)](a, b, out, M=16, K=32, N=16)
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
