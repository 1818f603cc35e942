"""NF4 dequantisation of bitsandbytes 4-bit weights, bit-exact to the NF4 format's definition.

For element ``i`` of the flattened weight (``n`` elements, blocks of ``B = quant_state.blocksize``):

    nibble_i = byte[i // 2] >> 4      if i is even   (the high nibble comes first)
               byte[i // 2] & 0xF     if i is odd
    absmax_b = code2[qabsmax[b]] * absmax2[b // B2]  (fp32 product)  then  + offset  (fp32 sum)
                                                     (double quant; otherwise absmax_b is stored)
    w_i      = round_to_dtype(NF4[nibble_i] * absmax_{i // B})       (fp32 product, rounded once)

This is bitsandbytes' own order of operations (bitsandbytes 0.50). Its CUDA source
(``kDequantizeBlockwise``) multiplies a hard-coded fp32 NF4 table (``quant_state.code`` is not read)
by the fp32 absmax and assigns the product to the output type (round to nearest even); the nested
absmax comes from the 8-bit blockwise kernel (``code2[q] * absmax2``, fp32), then a separate torch
``absmax += offset``. The tests check both paths against a reference written from the format
(``tests/nf4_format.py``), odd shapes included, and against bnb's CUDA kernel. bnb 0.50.2's CPU
``dequantize_4bit`` is wrong when a row is not a whole number of blocks (e.g. rows of 80 or 96 with
blocks of 64; which lengths depends on the host's kernel), so fastlm never runs it: unfused 4-bit
layers on the CPU use this dequantisation too (``fastlm/models/nf4_linear.py``).

Two things keep the Triton kernel exact: fp contraction is turned off at launch
(``code2 * absmax2 + offset`` must not become an FMA), and fp32 -> bf16 is rounded to nearest even
with integer ops (the same bits as the GPU's conversion, and exact in the CPU interpreter, whose own
bf16 cast truncates).

Only NF4 is supported; FP4 states raise ``ValueError``. bnb's legacy transposed ``(1, n/2)`` input
(for which ``dequantize_4bit`` returns ``out.t()``) is not special-cased: the output always has
``quant_state.shape``.
"""

from __future__ import annotations

import math
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import triton
import triton.language as tl

from fastlm.kernels._dispatch import use_triton

if TYPE_CHECKING:  # bitsandbytes is an optional dependency
    from bitsandbytes.functional import QuantState

# bitsandbytes' NF4 code book (get_4bit_type("nf4") and the CUDA kernel's table), as fp32.
NF4_TABLE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip

# Packed bytes per program (2 outputs each); raised to one quant block when a block is larger.
_BLOCK_BYTES = 2048  # measured best on an H100 for 8B-shape projections (benchmarks/results)
_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_tables: dict[torch.device, torch.Tensor] = {}
# A row of the group kernel's table: packed bytes, absmax, code2, absmax2 and offset addresses,
# quant blocks, output offset, elements (int64 each).
_GROUP_ROW: tl.constexpr = tl.constexpr(8)
_GROUP_ALIGN = 64  # each weight's output starts at a multiple of 64 elements (GEMM alignment)


@triton.jit
def _dequant_blocks(
    pid, W, ABSMAX, CODE2, ABSMAX2, OFFSET, TABLE, OUT, n_bytes, n_blocks, n_out, blocksize2,
    HALF_BS: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, NESTED: tl.constexpr,
    BF16: tl.constexpr,
):  # fmt: skip
    # One program: BLOCKS_PER_PROG whole quant blocks, a [blocks, HALF_BS] tile of packed bytes.
    blk = pid * BLOCKS_PER_PROG + tl.arange(0, BLOCKS_PER_PROG)
    blk_mask = blk < n_blocks
    if NESTED:
        q = tl.load(ABSMAX + blk, mask=blk_mask, other=0).to(tl.int32)
        scaled = tl.load(CODE2 + q) * tl.load(ABSMAX2 + blk // blocksize2, mask=blk_mask, other=0.0)
        absmax = scaled + tl.load(OFFSET)  # two roundings, as bnb: the launch disables FMA
    else:
        absmax = tl.load(ABSMAX + blk, mask=blk_mask, other=0.0).to(tl.float32)
    byte = blk[:, None] * HALF_BS + tl.arange(0, HALF_BS)[None, :]
    packed = tl.load(W + byte, mask=byte < n_bytes, other=0)
    hi = tl.load(TABLE + (packed >> 4).to(tl.int32)) * absmax[:, None]
    lo = tl.load(TABLE + (packed & 15).to(tl.int32)) * absmax[:, None]
    # join + reshape interleaves (hi, lo) per byte, so the store is one contiguous run.
    vals = tl.reshape(tl.join(hi, lo), (2 * BLOCKS_PER_PROG * HALF_BS,))
    if BF16:
        # Round to nearest even: add 0x7FFF plus the lowest kept bit, keep the top 16 bits.
        bits = vals.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        res = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        res = vals.to(OUT.dtype.element_ty)
    offs = pid * (2 * BLOCKS_PER_PROG * HALF_BS) + tl.arange(0, 2 * BLOCKS_PER_PROG * HALF_BS)
    tl.store(OUT + offs, res, mask=offs < n_out)


@triton.jit
def _nf4_dequant_kernel(
    W, ABSMAX, CODE2, ABSMAX2, OFFSET, TABLE, OUT, n_bytes, n_blocks, n_out, blocksize2,
    HALF_BS: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, NESTED: tl.constexpr,
    BF16: tl.constexpr,
):  # fmt: skip
    _dequant_blocks(
        tl.program_id(0).to(tl.int64), W, ABSMAX, CODE2, ABSMAX2, OFFSET, TABLE, OUT, n_bytes,
        n_blocks, n_out, blocksize2, HALF_BS, BLOCKS_PER_PROG, NESTED, BF16,
    )  # fmt: skip


@triton.jit
def _nf4_dequant_group_kernel(
    ROWS, TABLE, OUT, blocksize2,
    HALF_BS: tl.constexpr, BLOCKS_PER_PROG: tl.constexpr, NESTED: tl.constexpr,
    BF16: tl.constexpr, WHOLE_BLOCKS: tl.constexpr,
):  # fmt: skip
    # Grid (programs of the largest weight, weights): weight w's row of ROWS holds its addresses
    # and sizes (_GROUP_ROW); programs past a smaller weight's end return at once.
    row = ROWS + tl.program_id(1) * _GROUP_ROW
    n_blocks = tl.load(row + 5)
    pid = tl.program_id(0).to(tl.int64)
    if pid * BLOCKS_PER_PROG >= n_blocks:
        return
    # Addresses read from memory carry no alignment the compiler can see; the launcher checked
    # it (16 bytes; outputs on multiples of 64 elements), and saying so lets the loads and
    # stores be vectorised as the single kernel's are.
    W = tl.multiple_of(tl.load(row + 0).to(tl.pointer_type(tl.uint8)), 16)
    if NESTED:
        ABSMAX = tl.load(row + 1).to(tl.pointer_type(tl.uint8))
    else:
        ABSMAX = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    CODE2 = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    ABSMAX2 = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    OFFSET = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    if WHOLE_BLOCKS:  # bounds that are multiples of a block: masks uniform over a vector
        n_bytes = n_blocks * HALF_BS
        n_out = n_bytes * 2
    else:
        n_out = tl.load(row + 7)
        n_bytes = (n_out + 1) // 2
    _dequant_blocks(
        pid, W, ABSMAX, CODE2, ABSMAX2, OFFSET, TABLE, OUT + tl.multiple_of(tl.load(row + 6), 64),
        n_bytes, n_blocks, n_out, blocksize2, HALF_BS, BLOCKS_PER_PROG, NESTED, BF16,
    )  # fmt: skip


def _table(device: torch.device) -> torch.Tensor:
    if device not in _tables:
        _tables[device] = torch.tensor(NF4_TABLE, dtype=torch.float32, device=device)
    return _tables[device]


def _prepare(weight: torch.Tensor, qs: Any, dtype: torch.dtype | None, out: torch.Tensor | None):
    """Validated (quant_state, flat uint8 bytes, element count, output dtype)."""
    qs = _state(weight, qs)
    n = math.prod(qs.shape)
    # quant_storage may be another dtype (e.g. bf16 for FSDP); the bytes are what count.
    packed = weight.contiguous().view(torch.uint8).reshape(-1)
    if packed.numel() < (n + 1) // 2:
        need = (n + 1) // 2
        raise ValueError(
            f"packed weight: {packed.numel()} bytes, shape {tuple(qs.shape)} needs {need}"
        )
    return qs, packed, n, _output_dtype(qs, n, dtype, out)


def _state(weight: torch.Tensor, qs: Any):
    """The weight's checked NF4 quant_state (``qs``, or the one the weight carries)."""
    qs = qs if qs is not None else getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("dequantize_nf4: no quant_state given and the weight carries none")
    if getattr(qs, "quant_type", None) != "nf4":
        raise ValueError(f"dequantize_nf4 supports quant_type 'nf4' only, got {qs.quant_type!r}")
    bs = int(qs.blocksize)
    if bs < 32 or bs & (bs - 1):
        raise ValueError(f"NF4 blocksize must be a power of two >= 32, got {bs}")
    return qs


def _output_dtype(qs: Any, n: int, dtype: torch.dtype | None, out: torch.Tensor | None):
    if dtype is None:
        dtype = out.dtype if out is not None else qs.dtype
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"NF4 dequantisation outputs fp32, fp16 or bf16, got {dtype}")
    if out is not None and (out.dtype != dtype or out.numel() != n or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements")
    return dtype


def _offset(qs: Any, device: torch.device) -> torch.Tensor:
    off = qs.offset
    if not isinstance(off, torch.Tensor):
        off = torch.tensor(float(off))
    return off.to(device=device, dtype=torch.float32).reshape(1)


class _Launch(NamedTuple):
    """A weight's kernel arguments, made once (``_launch_args``) and reused while valid."""

    packed: torch.Tensor  # the weight's bytes, flat uint8
    absmax: torch.Tensor
    code2: torch.Tensor  # nested only; otherwise absmax again (unread)
    absmax2: torch.Tensor
    offset: torch.Tensor  # fp32, one element
    n: int  # elements
    n_blocks: int
    half: int  # packed bytes per quant block
    nested: bool
    blocksize2: int
    sources: tuple  # made from: (weight address, bytes), quant_state tensors (by identity)


# Per quant_state (by id; QuantState is not hashable): the frozen base weights of a training run
# are dequantised three times a step (forward, recompute, backward) with the same arguments. An
# entry goes when its quant_state does (weakref.finalize), so a dropped model's bytes are freed.
_launches: dict[int, _Launch] = {}


def _sources(weight: torch.Tensor, qs: Any) -> tuple:
    state2 = qs.state2 if qs.nested else None
    return ((weight.data_ptr(), weight.nbytes), qs.absmax, state2, qs.offset if qs.nested else None)


def _same_sources(old: tuple, new: tuple) -> bool:
    return old[0] == new[0] and all(a is b for a, b in zip(old[1:], new[1:]))


def _launch_args(weight: torch.Tensor, qs: Any) -> _Launch:
    """The kernel arguments of ``weight`` (cached while the weight and its state are the same
    tensors: moving either to another device makes them anew)."""
    sources = _sources(weight, qs)
    cached = _launches.get(id(qs))
    if cached is not None and _same_sources(cached.sources, sources):
        return cached
    _, packed, n, _ = _prepare(weight, qs, torch.float32, None)
    dev, bs = packed.device, int(qs.blocksize)
    absmax = qs.absmax.to(dev)
    if qs.nested:
        code2, absmax2 = qs.state2.code.to(dev), qs.state2.absmax.to(dev)
        offset, bs2 = _offset(qs, dev), int(qs.state2.blocksize)
    else:  # unused pointers
        code2 = absmax2 = offset = absmax
        bs2 = 1
    args = _Launch(
        packed, absmax, code2, absmax2, offset, n, triton.cdiv(n, bs), bs // 2, bool(qs.nested),
        bs2, sources,
    )  # fmt: skip
    if sources[1] is absmax:  # on its device already (else moved per call: nothing to keep)
        if id(qs) not in _launches:
            weakref.finalize(qs, _launches.pop, id(qs), None)
        _launches[id(qs)] = args
    return args


def _blocks_per_program(half: int, block_bytes: int) -> int:
    return triton.next_power_of_2(max(block_bytes // half, 1))


def dequantize_nf4_triton(
    weight: torch.Tensor,
    quant_state: QuantState | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    *,
    block_bytes: int = _BLOCK_BYTES,
) -> torch.Tensor:
    """Triton launcher of the NF4 dequantisation (CUDA, or CPU under TRITON_INTERPRET=1)."""
    qs = _state(weight, quant_state)
    args = _launch_args(weight, qs)
    n = args.n
    dtype = _output_dtype(qs, n, dtype, out)
    if out is None:
        out = torch.empty(tuple(qs.shape), dtype=dtype, device=args.packed.device)
    if n == 0:
        return out
    per_prog = _blocks_per_program(args.half, block_bytes)
    _nf4_dequant_kernel[(triton.cdiv(args.n_blocks, per_prog),)](
        args.packed, args.absmax, args.code2, args.absmax2, args.offset,
        _table(args.packed.device), out, (n + 1) // 2, args.n_blocks, n, args.blocksize2,
        HALF_BS=args.half, BLOCKS_PER_PROG=per_prog, NESTED=args.nested,
        BF16=dtype == torch.bfloat16, num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip
    return out


def dequantize_nf4_group(
    weights: list, quant_states: list, dtype: torch.dtype, *, block_bytes: int = _BLOCK_BYTES
) -> list:
    """Several NF4 weights dequantised by one launch into one buffer; a dense view per weight.

    Usage: ``wq, wk, wv = dequantize_nf4_group([q, k, v], [q.quant_state, ...], torch.bfloat16)``.
    The values are ``dequantize_nf4``'s, bit for bit (the same code per block). Weights whose
    formats differ (block sizes, nesting) or with nothing to dequantise are done one by one.
    """
    states = [_state(w, qs) for w, qs in zip(weights, quant_states)]
    args = [_launch_args(w, qs) for w, qs in zip(weights, states)]
    dtype = _output_dtype(states[0], args[0].n, dtype, None)
    formats = {(a.half, a.nested, a.blocksize2, a.packed.device) for a in args}
    aligned = all(a.packed.data_ptr() % 16 == 0 for a in args)
    if len(formats) != 1 or len(args) < 2 or not all(a.n for a in args) or not aligned:
        return [dequantize_nf4_triton(w, qs, dtype) for w, qs in zip(weights, states)]
    starts, total = [], 0
    for a in args:
        starts.append(total)
        total += -(-a.n // _GROUP_ALIGN) * _GROUP_ALIGN
    device = args[0].packed.device
    out = torch.empty(total, dtype=dtype, device=device)
    per_prog = _blocks_per_program(args[0].half, block_bytes)
    whole_blocks = all(a.n == a.n_blocks * 2 * a.half for a in args)
    programs = max(triton.cdiv(a.n_blocks, per_prog) for a in args)
    _nf4_dequant_group_kernel[(programs, len(args))](
        _group_rows(args, starts), _table(device), out, args[0].blocksize2,
        HALF_BS=args[0].half, BLOCKS_PER_PROG=per_prog, NESTED=args[0].nested,
        BF16=dtype == torch.bfloat16, WHOLE_BLOCKS=whole_blocks, num_warps=4,
        enable_fp_fusion=False,
    )  # fmt: skip
    return [out[s : s + a.n].view(tuple(qs.shape)) for s, a, qs in zip(starts, args, states)]


# Per group of weights: the table of their addresses and sizes, on their device. The key is the
# table's content, so an entry can never be stale (a later model at the same addresses with the
# same sizes has the same table).
_group_tables: dict[tuple, torch.Tensor] = {}
_MAX_GROUP_TABLES = 4096


def _group_rows(args: list, starts: list) -> torch.Tensor:
    rows = tuple(
        (a.packed.data_ptr(), a.absmax.data_ptr(), a.code2.data_ptr(), a.absmax2.data_ptr(),
         a.offset.data_ptr(), a.n_blocks, start, a.n)
        for a, start in zip(args, starts)
    )  # fmt: skip
    device = args[0].packed.device
    key = (device, rows)
    table = _group_tables.get(key)
    if table is None:
        if len(_group_tables) >= _MAX_GROUP_TABLES:  # many models in one process: start over
            _group_tables.clear()
        table = torch.tensor(rows, dtype=torch.int64).to(device)
        _group_tables[key] = table
    return table


def dequantize_nf4(
    weight: torch.Tensor,
    quant_state: QuantState | None = None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense weight of a bitsandbytes NF4 tensor: ``w = dequantize_nf4(p, p.quant_state)``."""
    if use_triton(weight):
        return dequantize_nf4_triton(weight, quant_state, dtype, out)
    _, _, _, dtype = _prepare(weight, quant_state, dtype, out)  # the Triton path's checks
    res = dequantize_nf4_reference(weight, quant_state, dtype)
    return res if out is None else out.copy_(res.view(out.shape))


def dequantize_nf4_many(weights: list, quant_states: list, dtype: torch.dtype) -> list:
    """Dense weights of several NF4 tensors: one launch on the Triton path, else one by one.

    Usage: ``wq, wk, wv = dequantize_nf4_many([q, k, v], [q.quant_state, ...], torch.bfloat16)``.
    """
    if len(weights) > 1 and use_triton(weights[0]):
        return dequantize_nf4_group(weights, quant_states, dtype)
    return [dequantize_nf4(w, qs, dtype) for w, qs in zip(weights, quant_states)]


def is_nf4_weight(t: Any) -> bool:
    """True for a tensor carrying an NF4 bitsandbytes quant_state: ``if is_nf4_weight(p): ...``."""
    qs = getattr(t, "quant_state", None)
    return isinstance(t, torch.Tensor) and getattr(qs, "quant_type", None) == "nf4"


def dequantize_nf4_reference(
    weight: torch.Tensor, quant_state: QuantState | None = None, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Plain-PyTorch NF4 dequantisation: ``w = dequantize_nf4_reference(p, p.quant_state)``."""
    qs, packed, n, dtype = _prepare(weight, quant_state, dtype, None)
    dev, bs = packed.device, int(qs.blocksize)
    n_blocks = -(-n // bs)
    if qs.nested:
        q = qs.absmax.to(dev).reshape(-1)[:n_blocks].long()
        b2 = torch.arange(n_blocks, device=dev) // int(qs.state2.blocksize)
        absmax = qs.state2.code.to(dev)[q] * qs.state2.absmax.to(dev)[b2]
        absmax = absmax + _offset(qs, dev)  # a separate fp32 add, as bnb
    else:
        absmax = qs.absmax.to(dev).reshape(-1)[:n_blocks].float()
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[:n].long()
    vals = torch.nn.functional.pad(_table(dev)[nibbles], (0, n_blocks * bs - n))
    vals = vals.view(n_blocks, bs) * absmax[:, None]
    return vals.reshape(-1)[:n].to(dtype).reshape(tuple(qs.shape))
