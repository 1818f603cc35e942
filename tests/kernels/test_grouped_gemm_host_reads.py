"""The grouped GEMM's fused path (``torch._grouped_mm``) never reads the group sizes on the host:
on CUDA such a read waits for the GPU, once per MoE layer call. The reference path reads them
once. Both give the definition's values."""

from __future__ import annotations

import pytest
import torch

from fastlm.kernels.grouped_gemm import (
    group_ends,
    group_sizes,
    grouped_mm,
    grouped_mm_reference,
    torch_grouped_mm_fits,
)


def _operands(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([5, 0, 7, 4])  # an empty group included
    x = torch.randn(int(sizes.sum()), 32, generator=generator, requires_grad=True)
    w = torch.randn(4, 32, 16, generator=generator, requires_grad=True)
    return x, w, sizes


def test_the_fused_path_never_reads_the_sizes_and_matches_the_definition():
    x, w, sizes = _operands()
    if not torch_grouped_mm_fits(x, w):
        pytest.skip("torch._grouped_mm does not take these operands in this torch")
    ends, host_sizes = group_ends(sizes)
    y = grouped_mm(x, w, ends, host_sizes, implementation="torch")
    y.square().sum().backward()
    assert not host_sizes.read  # forward and backward: no host read
    expected = grouped_mm_reference(x.detach(), w.detach(), sizes.tolist())
    assert torch.allclose(y.detach(), expected, rtol=1e-5, atol=1e-5)


def test_the_reference_path_reads_them_once():
    x, w, sizes = _operands()
    ends, host_sizes = group_ends(sizes)
    y = grouped_mm(x, w, ends, host_sizes, implementation="reference")
    y.sum().backward()
    assert host_sizes.read and list(host_sizes) == sizes.tolist() and len(host_sizes) == 4
    assert torch.equal(y.detach(), grouped_mm_reference(x.detach(), w.detach(), sizes.tolist()))


def test_group_sizes_count_like_bincount():
    ids = torch.tensor([3, 0, 3, 3, 2, 0])
    assert torch.equal(group_sizes(ids, 5), torch.bincount(ids, minlength=5))
