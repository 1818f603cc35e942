"""NF4 dequantisation: Triton kernel (interpreter on CPU) and reference against bitsandbytes.

bitsandbytes' own ``dequantize_4bit`` on the same device is the oracle and every comparison is
bit-exact (``torch.equal``): on CUDA that is bnb's CUDA kernel, on CPU its C++ kernel (or its torch
fallback for an odd last dimension).
"""

import copy

import pytest
import torch

import fastlm.kernels.nf4_dequant as nf4
from fastlm.kernels.nf4_dequant import (
    NF4_TABLE,
    dequantize_nf4,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    is_nf4_weight,
)

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (5, 70): 350 elements, not a multiple of 64 or 128; (7, 9): an odd count (half a byte unused).
SHAPES = [(96, 80), (40, 64), (5, 70), (7, 9)]
_usable: dict[str, str | None] = {}


def _no_compile():
    # bnb's CPU fallback (odd last dim) is torch.compile'd per shape: eager is the same arithmetic.
    return torch._dynamo.config.patch(disable=True)


@pytest.fixture
def bnb_device(device):
    """The device, once bitsandbytes is known to quantise and dequantise NF4 on it."""
    if device not in _usable:
        try:
            with _no_compile():
                q, qs = F.quantize_4bit(torch.ones(64, device=device), quant_type="nf4")
                F.dequantize_4bit(q, qs, quant_type="nf4")
            _usable[device] = None
        except Exception as e:  # no native library for this device, etc.
            _usable[device] = f"{type(e).__name__}: {e}"
    if _usable[device] is not None:
        pytest.skip(f"bitsandbytes cannot run NF4 on {device}: {_usable[device]}")
    return device


def _quantize(shape, device, blocksize=64, nested=True, seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.05).to(device)
    with _no_compile():
        return F.quantize_4bit(
            w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", **kw
        )


def _bnb(q, qs, dtype):
    qs = copy.copy(qs)
    qs.dtype = dtype  # bnb writes quant_state.dtype; its arithmetic is fp32 whatever the dtype
    with _no_compile():
        return F.dequantize_4bit(q, qs, quant_type="nf4")


def _over_bnb_grid(test):
    """Parametrise ``test`` over every shape × block size × nesting × output dtype."""
    test = pytest.mark.parametrize("dtype", DTYPES)(test)
    test = pytest.mark.parametrize("nested", [True, False])(test)
    test = pytest.mark.parametrize("blocksize", [64, 128])(test)
    return pytest.mark.parametrize("shape", SHAPES)(test)


def _assert_bit_identical_to_bnb(dequantize, bnb_device, shape, blocksize, nested, dtype):
    q, qs = _quantize(shape, bnb_device, blocksize, nested)
    assert qs.nested == nested and (qs.absmax.dtype == torch.uint8) == nested
    got = dequantize(q, qs, dtype)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, _bnb(q, qs, dtype))


@_over_bnb_grid
def test_triton_matches_bnb(bnb_device, shape, blocksize, nested, dtype):
    _assert_bit_identical_to_bnb(dequantize_nf4_triton, bnb_device, shape, blocksize, nested, dtype)


@_over_bnb_grid
def test_reference_matches_bnb(bnb_device, shape, blocksize, nested, dtype):
    _assert_bit_identical_to_bnb(
        dequantize_nf4_reference, bnb_device, shape, blocksize, nested, dtype
    )


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_triton_many_programs_and_blocksizes(bnb_device, blocksize):
    # block_bytes=32: one program per quant block (per 16 bytes for blocksize 32), so tails and
    # program boundaries are exercised; 4096 is wider than block_bytes (one block per program).
    q, qs = _quantize((5, 70), bnb_device, blocksize, nested=True, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_nf4_triton(q, qs, dtype, block_bytes=32)
        assert torch.equal(got, _bnb(q, qs, dtype))


def test_many_absmax_blocks(bnb_device):
    # 4096 quant blocks, 16 second-level blocks: a fused multiply-add in the nested absmax or a
    # wrong bf16 rounding would show up here. 32 programs in the interpreter.
    q, qs = _quantize((512, 512), bnb_device, 64, nested=True, seed=2)
    block_bytes = 4096 if bnb_device == "cpu" else nf4._BLOCK_BYTES
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_nf4_triton(q, qs, dtype, block_bytes=block_bytes)
        assert torch.equal(got, _bnb(q, qs, dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_ties_to_even(bnb_device, dtype):
    # Hand-made absmax whose dropped bits are exactly one half (0x8000 below bf16's mantissa,
    # 0x1000 below fp16's): NF4 codes 0 and 15 (+-1.0) give exact ties, rare with real weights.
    gen = torch.Generator().manual_seed(4)
    n_blocks, half_ulp = 40, 0x8000 if dtype == torch.bfloat16 else 0x1000
    bits = torch.randint(0x3E000000, 0x41000000, (n_blocks,), generator=gen, dtype=torch.int32)
    absmax = ((bits & ~(2 * half_ulp - 1)) | half_ulp).view(torch.float32)
    packed = torch.randint(0, 256, (n_blocks * 32, 1), generator=gen, dtype=torch.uint8)
    packed[::2] = torch.tensor([0x0F, 0xF0, 0xFF, 0x00], dtype=torch.uint8).repeat(160)[:, None]
    qs = F.QuantState(
        absmax=absmax.to(bnb_device),
        shape=torch.Size((n_blocks, 64)),
        code=F.get_4bit_type("nf4", device=bnb_device),
        blocksize=64,
        quant_type="nf4",
        dtype=dtype,
    )
    packed = packed.to(bnb_device)
    expected = _bnb(packed, qs, dtype)
    assert torch.equal(dequantize_nf4_triton(packed, qs), expected)
    assert torch.equal(dequantize_nf4_reference(packed, qs), expected)


def test_dispatch(bnb_device, monkeypatch):
    q, qs = _quantize((40, 64), bnb_device)

    def fail(*a, **k):
        raise AssertionError("wrong path")

    # CUDA tensors must take the Triton launcher, CPU tensors the reference.
    if bnb_device == "cpu":
        monkeypatch.setattr(nf4, "dequantize_nf4_triton", fail)
    else:
        monkeypatch.setattr(nf4, "dequantize_nf4_reference", fail)
    expected = _bnb(q, qs, torch.bfloat16)
    assert torch.equal(dequantize_nf4(q, qs, torch.bfloat16), expected)
    out = torch.empty(40, 64, dtype=torch.bfloat16, device=bnb_device)
    assert dequantize_nf4(q, qs, out=out) is out  # dtype taken from out
    assert torch.equal(out, expected)


def test_params4bit_defaults(bnb_device):
    # dtype defaults to quant_state.dtype; the quant_state defaults to weight.quant_state.
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    p = p.to(bnb_device)
    assert is_nf4_weight(p)
    for fn in (dequantize_nf4, dequantize_nf4_triton, dequantize_nf4_reference):
        got = fn(p)
        assert got.dtype == torch.float16
        assert torch.equal(got, _bnb(p, p.quant_state, torch.float16))


def test_non_uint8_storage(bnb_device):
    # quant_storage=bf16 (FSDP-style): the same bytes, viewed as another dtype.
    q8, qs = _quantize((40, 64), bnb_device)
    q16, qs16 = _quantize((40, 64), bnb_device, quant_storage=torch.bfloat16)
    assert q16.dtype == torch.bfloat16
    expected = _bnb(q8, qs, torch.float32)
    assert torch.equal(dequantize_nf4_triton(q16, qs16, torch.float32), expected)
    assert torch.equal(dequantize_nf4_reference(q16, qs16, torch.float32), expected)


def test_table_is_bnb_nf4():
    assert torch.equal(torch.tensor(NF4_TABLE), F.get_4bit_type("nf4", device="cpu"))


def test_is_nf4_weight():
    qs = F.QuantState(absmax=torch.ones(1), shape=(2, 64), blocksize=64, quant_type="nf4")
    t = torch.zeros(64, 1, dtype=torch.uint8)
    assert not is_nf4_weight(t)
    t.quant_state = qs
    assert is_nf4_weight(t)
    qs.quant_type = "fp4"
    assert not is_nf4_weight(t)
    assert not is_nf4_weight(None) and not is_nf4_weight(qs)


def test_bad_inputs_raise(bnb_device):
    w = torch.randn(8, 64, device=bnb_device)
    with _no_compile():
        q, qs = F.quantize_4bit(w, blocksize=64, quant_type="fp4")
    for fn in (dequantize_nf4, dequantize_nf4_triton, dequantize_nf4_reference):
        with pytest.raises(ValueError, match="nf4"):
            fn(q, qs)
    q, qs = _quantize((8, 64), bnb_device)
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        dequantize_nf4_triton(q, qs, torch.int8)
    with pytest.raises(ValueError, match="out must be"):
        dequantize_nf4(q, qs, torch.float32, out=torch.empty(8, 63, device=bnb_device))
    with pytest.raises(ValueError, match="bytes"):
        dequantize_nf4_triton(q[:100], qs)
    with pytest.raises(ValueError, match="no quant_state"):
        dequantize_nf4(torch.zeros(256, 1, dtype=torch.uint8, device=bnb_device))
