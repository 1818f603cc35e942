"""NF4 dequantisation: Triton kernel (interpreter on CPU) and reference against the NF4 format.

The oracle is the format's definition (``tests/nf4_format.py``: code book × per-block absmax,
nested absmax = code2[q]·absmax2 + offset, computed exactly in fp64 and rounded where the format
stores fp32), and every comparison with it is bit-exact (``torch.equal``), odd shapes included:
blocks that span rows, a last block cut short, an odd element count (half a byte unused).

bitsandbytes makes the bytes (``quantize_4bit``, itself checked against the format below). Its
``dequantize_4bit`` is compared too, but only where it is right: on CUDA, and on the CPU for
rows that are a whole number of blocks. bitsandbytes 0.50.2's CPU kernel is wrong otherwise
(e.g. (16, 80) with blocks of 64: off by up to ~1.4 on N(0, 1) weights), for row lengths that
depend on the host's kernel, so it cannot be the reference there.
"""

import copy

import pytest
import torch
from nf4_format import NF4, nf4_code_book_from_definition, nf4_dequantize

import fastlm.kernels.nf4_dequant as nf4
from fastlm.kernels.nf4_dequant import (
    NF4_TABLE,
    dequantize_nf4,
    dequantize_nf4_group,
    dequantize_nf4_many,
    dequantize_nf4_reference,
    dequantize_nf4_triton,
    is_nf4_weight,
)

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (96, 80): rows of 80, blocks span rows; (40, 64): rows a whole block of 64 (half of 128);
# (5, 70): 350 elements, a last block cut short; (7, 9): an odd count (half a byte unused).
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


def _weights(shape, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 0.05).to(device)


def _quantize(shape, device, blocksize=64, nested=True, seed=0, **kw):
    with _no_compile():
        return F.quantize_4bit(
            _weights(shape, device, seed),
            blocksize=blocksize,
            compress_statistics=nested,
            quant_type="nf4",
            **kw,
        )


def _bnb(q, qs, dtype):
    qs = copy.copy(qs)
    qs.dtype = dtype  # bnb writes quant_state.dtype; its arithmetic is fp32 whatever the dtype
    with _no_compile():
        return F.dequantize_4bit(q, qs, quant_type="nf4")


def _over_grid(test):
    """Parametrise ``test`` over every shape × block size × nesting × output dtype."""
    test = pytest.mark.parametrize("dtype", DTYPES)(test)
    test = pytest.mark.parametrize("nested", [True, False])(test)
    test = pytest.mark.parametrize("blocksize", [64, 128])(test)
    return pytest.mark.parametrize("shape", SHAPES)(test)


def _assert_bit_identical_to_format(dequantize, bnb_device, shape, blocksize, nested, dtype):
    q, qs = _quantize(shape, bnb_device, blocksize, nested)
    assert qs.nested == nested and (qs.absmax.dtype == torch.uint8) == nested
    got = dequantize(q, qs, dtype)
    assert got.dtype == dtype and got.shape == torch.Size(shape)
    assert torch.equal(got, nf4_dequantize(q, qs, dtype))


@_over_grid
def test_triton_matches_format(bnb_device, shape, blocksize, nested, dtype):
    _assert_bit_identical_to_format(
        dequantize_nf4_triton, bnb_device, shape, blocksize, nested, dtype
    )


@_over_grid
def test_reference_matches_format(bnb_device, shape, blocksize, nested, dtype):
    _assert_bit_identical_to_format(
        dequantize_nf4_reference, bnb_device, shape, blocksize, nested, dtype
    )


def _hand_made_state(shape, absmax, blocksize, nested):
    """A QuantState with given per-block absmax; nested: encoded as q=1 for every block on a
    made-up code2 (``code2[1] = 0.5``), absmax2 = 2·(absmax - offset)."""
    qs = F.QuantState(
        absmax=absmax, shape=torch.Size(shape), blocksize=blocksize, quant_type="nf4",
        code=F.get_4bit_type("nf4", device="cpu"),  # unread by the kernels; .to() needs one
    )  # fmt: skip
    qs.dtype = torch.float32
    if nested:
        offset = 0.25
        code2 = torch.linspace(-1, 1, 256)
        code2[1] = 0.5
        qs.state2 = F.QuantState(absmax=2 * (absmax - offset), code=code2, blocksize=1)
        qs.absmax = torch.ones(absmax.numel(), dtype=torch.uint8)
        qs.offset = torch.tensor(offset)
        qs.nested = True
    return qs


@pytest.mark.parametrize("nested", [False, True])
def test_hand_made_bytes(nested):
    # 0xF0 in every byte: even elements take code 15 (+1), odd ones code 0 (-1). Rows of 50 and
    # blocks of 64, so block 1 starts inside row 1 (column 14): w_i = ±absmax[i // 64].
    shape, blocksize = (3, 50), 64
    absmax = torch.tensor([1.0, 2.0, 4.0])
    qs = _hand_made_state(shape, absmax, blocksize, nested)
    packed = torch.full((75, 1), 0xF0, dtype=torch.uint8)
    i = torch.arange(150)
    expected = torch.where(i % 2 == 0, 1.0, -1.0) * absmax[i // blocksize]
    expected = expected.reshape(shape)
    assert torch.equal(nf4_dequantize(packed, qs), expected)  # the reference reads the format
    # The kernel for real where there is a GPU, in the interpreter otherwise.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    on_device = copy.deepcopy(qs)
    on_device.to(device)  # in place (QuantState.to returns None)
    assert torch.equal(dequantize_nf4_triton(packed.to(device), on_device).cpu(), expected)
    assert torch.equal(dequantize_nf4_reference(packed, qs), expected)


def test_quantiser_bytes_follow_the_format(bnb_device):
    # The bytes these tests dequantise come from bnb's quantiser: per block, absmax = max |w| and
    # every element gets the NF4 value nearest to w / absmax (a different pick is allowed only
    # when two values are equally near to within fp32 rounding of w / absmax).
    table = torch.tensor(NF4, dtype=torch.float64)
    for shape, blocksize in [((96, 80), 64), ((5, 70), 128), ((7, 9), 64)]:
        w = _weights(shape, bnb_device, seed=5)
        q, qs = _quantize(shape, bnb_device, blocksize, nested=False, seed=5)
        flat = w.cpu().reshape(-1).double()
        n = flat.numel()
        i = torch.arange(n)
        padded = torch.nn.functional.pad(flat.abs(), (0, -n % blocksize))
        absmax = padded.view(-1, blocksize).amax(1)
        assert torch.equal(qs.absmax.cpu().double(), absmax)
        byte = q.cpu().reshape(-1).long()[i // 2]
        nibble = torch.where(i % 2 == 0, byte >> 4, byte & 15)
        distance = (flat / absmax[i // blocksize])[:, None].sub(table).abs()
        chosen, nearest = distance[i, nibble], distance.min(1).values
        assert (chosen - nearest).max() <= 1e-6, shape


def _bnb_is_right(device, shape, blocksize) -> bool:
    # bitsandbytes' CPU kernel is right when every row starts a block (see the module doc).
    return device != "cpu" or shape[-1] % blocksize == 0


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_bnb_dequantize_agrees_where_it_is_right(bnb_device, shape, blocksize, nested):
    if not _bnb_is_right(bnb_device, shape, blocksize):
        pytest.skip("bitsandbytes' CPU dequantize_4bit is wrong for rows that are not whole blocks")
    q, qs = _quantize(shape, bnb_device, blocksize, nested)
    for dtype in DTYPES:
        expected = _bnb(q, qs, dtype)
        assert torch.equal(nf4_dequantize(q, qs, dtype), expected)
        assert torch.equal(dequantize_nf4(q, qs, dtype), expected)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
def test_triton_many_programs_and_blocksizes(bnb_device, blocksize):
    # block_bytes=32: one program per quant block (per 16 bytes for blocksize 32), so tails and
    # program boundaries are exercised; 4096 is wider than block_bytes (one block per program).
    q, qs = _quantize((5, 70), bnb_device, blocksize, nested=True, seed=1)
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_nf4_triton(q, qs, dtype, block_bytes=32)
        assert torch.equal(got, nf4_dequantize(q, qs, dtype))


def test_many_absmax_blocks(bnb_device):
    # 4096 quant blocks, 16 second-level blocks: a fused multiply-add in the nested absmax or a
    # wrong bf16 rounding would show up here. 32 programs in the interpreter. Rows of 512 are
    # whole blocks, so bitsandbytes' own dequantisation is checked here too.
    q, qs = _quantize((512, 512), bnb_device, 64, nested=True, seed=2)
    block_bytes = 4096 if bnb_device == "cpu" else nf4._BLOCK_BYTES
    for dtype in (torch.float32, torch.bfloat16):
        got = dequantize_nf4_triton(q, qs, dtype, block_bytes=block_bytes)
        assert torch.equal(got, nf4_dequantize(q, qs, dtype))
        assert torch.equal(got, _bnb(q, qs, dtype))


# Whole blocks of 64 and of 128 in every weight: the group kernel's bounds are then multiples
# of a block (its vectorised path); SHAPES has cut-short last blocks (its exact-bounds path).
WHOLE_BLOCK_SHAPES = [(96, 80), (40, 64), (16, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shapes", [SHAPES, WHOLE_BLOCK_SHAPES], ids=["cut-blocks", "whole"])
def test_group_matches_format_per_weight(bnb_device, shapes, nested, blocksize, dtype):
    # Every shape in one launch: the sizes differ (programs past a smaller weight's end must do
    # nothing), counts are odd and blocks span rows. Each view is bit-identical to the format,
    # and the views are disjoint (each starts on an aligned offset of one buffer).
    states = [_quantize(shape, bnb_device, blocksize, nested, seed=i) for i, shape in
              enumerate(shapes)]  # fmt: skip
    got = dequantize_nf4_group([q for q, _ in states], [qs for _, qs in states], dtype,
                               block_bytes=64)  # fmt: skip
    for (q, qs), shape, w in zip(states, shapes, got):
        assert w.shape == torch.Size(shape) and w.dtype == dtype
        assert torch.equal(w, nf4_dequantize(q, qs, dtype))
    bases = {w.untyped_storage().data_ptr() for w in got}
    starts = [w.storage_offset() for w in got]
    assert len(bases) == 1 and all(start % nf4._GROUP_ALIGN == 0 for start in starts)
    assert all(a + w.numel() <= b for a, b, w in zip(starts, starts[1:], got))


def test_group_of_mixed_formats_and_the_dispatcher(bnb_device):
    # Nested and plain absmax cannot share a launch: each is dequantised on its own, same values.
    states = [_quantize((40, 64), bnb_device, 64, True), _quantize((7, 9), bnb_device, 64, False)]
    weights, quant_states = [q for q, _ in states], [qs for _, qs in states]
    for dequantize in (dequantize_nf4_group, dequantize_nf4_many):
        got = dequantize(weights, quant_states, torch.bfloat16)
        for (q, qs), w in zip(states, got):
            assert torch.equal(w, nf4_dequantize(q, qs, torch.bfloat16))


def test_cached_arguments_follow_a_changed_state(bnb_device):
    # The launch arguments are kept per quant_state; a state whose tensors are replaced (as
    # moving it to another device does) must be read anew, in the group launch as alone.
    q, qs = _quantize((40, 70), bnb_device, 64, nested=True)
    _, other = _quantize((40, 70), bnb_device, 64, nested=True, seed=7)
    second, second_qs = _quantize((5, 70), bnb_device, 64, nested=True, seed=8)
    assert torch.equal(dequantize_nf4_triton(q, qs, torch.float32), nf4_dequantize(q, qs))
    qs.absmax, qs.state2, qs.offset = other.absmax, other.state2, other.offset
    expected = nf4_dequantize(q, qs, torch.float32)
    assert torch.equal(dequantize_nf4_triton(q, qs, torch.float32), expected)
    qs.absmax = other.absmax.clone()
    expected = nf4_dequantize(q, qs, torch.float32)
    got, _ = dequantize_nf4_group([q, second], [qs, second_qs], torch.float32)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_ties_to_even(bnb_device, dtype):
    # Hand-made absmax whose dropped bits are exactly one half (0x8000 below bf16's mantissa,
    # 0x1000 below fp16's): NF4 codes 0 and 15 (+-1.0) give exact ties, rare with real weights.
    # Rows of 64 are whole blocks, so bitsandbytes is compared as well.
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
    expected = nf4_dequantize(packed, qs, dtype)
    assert torch.equal(_bnb(packed, qs, dtype), expected)
    assert torch.equal(dequantize_nf4_triton(packed, qs), expected)
    assert torch.equal(dequantize_nf4_reference(packed, qs), expected)


def test_dispatch(bnb_device, monkeypatch):
    q, qs = _quantize((40, 70), bnb_device)

    def fail(*a, **k):
        raise AssertionError("wrong path")

    # CUDA tensors must take the Triton launcher, CPU tensors the reference.
    if bnb_device == "cpu":
        monkeypatch.setattr(nf4, "dequantize_nf4_triton", fail)
    else:
        monkeypatch.setattr(nf4, "dequantize_nf4_reference", fail)
    expected = nf4_dequantize(q, qs, torch.bfloat16)
    assert torch.equal(dequantize_nf4(q, qs, torch.bfloat16), expected)
    out = torch.empty(40, 70, dtype=torch.bfloat16, device=bnb_device)
    assert dequantize_nf4(q, qs, out=out) is out  # dtype taken from out
    assert torch.equal(out, expected)


def test_params4bit_defaults(bnb_device):
    # dtype defaults to quant_state.dtype; the quant_state defaults to weight.quant_state.
    w = torch.randn(24, 80, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)
    p = p.to(bnb_device)
    assert is_nf4_weight(p)
    for fn in (dequantize_nf4, dequantize_nf4_triton, dequantize_nf4_reference):
        got = fn(p)
        assert got.dtype == torch.float16
        assert torch.equal(got, nf4_dequantize(p, p.quant_state, torch.float16))


def test_non_uint8_storage(bnb_device):
    # quant_storage=bf16 (FSDP-style): the same bytes, viewed as another dtype.
    q8, qs = _quantize((40, 70), bnb_device)
    q16, qs16 = _quantize((40, 70), bnb_device, quant_storage=torch.bfloat16)
    assert q16.dtype == torch.bfloat16
    expected = nf4_dequantize(q8, qs, torch.float32)
    assert torch.equal(nf4_dequantize(q16, qs16, torch.float32), expected)
    assert torch.equal(dequantize_nf4_triton(q16, qs16, torch.float32), expected)
    assert torch.equal(dequantize_nf4_reference(q16, qs16, torch.float32), expected)


def test_code_book_is_the_normal_quantiles():
    # The published fp32 values are the definition's quantiles to within fp32 rounding (~1e-7);
    # fastlm's table and bitsandbytes' are those published values exactly.
    definition = nf4_code_book_from_definition()
    published = torch.tensor(NF4, dtype=torch.float64)
    assert (definition - published).abs().max() <= 2e-7
    assert torch.equal(torch.tensor(NF4_TABLE), published.float())
    assert torch.equal(F.get_4bit_type("nf4", device="cpu"), published.float())


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
