"""NF4 as the format defines it: the reference that fastlm's dequantisation and the unpatched
reference models are checked against. Written from the format, not from fastlm's code.

The format (QLoRA, Dettmers et al. 2023; bitsandbytes' layout of it), for a weight of ``n``
elements flattened row-major, blocks of ``B`` elements (a block may span rows):

    nibble_i = byte[i // 2] >> 4   if i is even   (the high nibble holds the even element)
               byte[i // 2] & 15   if i is odd
    w_i      = NF4[nibble_i] · absmax[i // B]
    absmax_b = code2[q_b] · absmax2[b // B2] + offset     (double quantisation: q_b is a byte)

The stored numbers are fp32. Each product of two fp32 numbers is exact in fp64, so the values are
computed in fp64 and rounded to fp32 where the format keeps an fp32 value (the nested absmax after
its product and after its offset, the weight after its product), then to the output dtype.

Why not bitsandbytes' ``dequantize_4bit`` as the reference: on the CPU (bitsandbytes 0.50.2) its
C++ kernel gives wrong values when a row is not a whole number of blocks -- which row lengths
depends on the host's kernel (here rows of 32, 80, 96, 112 with blocks of 64; 72 and 100 came out
right) -- and in eval mode on AVX512-BF16 hosts ``Linear4bit`` repacks its weight for a kernel
that needs ``out_features % 32 == 0``. Its quantiser and its CUDA dequantisation are right.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F
from torch import nn

# The 16 NF4 values: quantiles of N(0, 1), scaled to [-1, 1] (see nf4_code_book_from_definition),
# as the QLoRA paper publishes them in fp32.
NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def nf4_code_book_from_definition() -> torch.Tensor:
    """The NF4 values from their definition, in fp64: 8 positive quantiles of N(0, 1) at
    ``linspace(δ, 1/2, 9)`` and 7 negative ones at ``linspace(δ, 1/2, 8)`` (δ = 0.9677083, so that
    the outermost quantile is finite), exact zero, all divided by the largest."""
    delta = 0.9677083
    positive = torch.special.ndtri(torch.linspace(delta, 0.5, 9, dtype=torch.float64))[:-1]
    negative = -torch.special.ndtri(torch.linspace(delta, 0.5, 8, dtype=torch.float64))[:-1]
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return values / values.max()


def _fp32(t: torch.Tensor) -> torch.Tensor:
    """Round fp64 values to the fp32 the format stores, back in fp64 for the next exact step."""
    return t.float().double()


def nf4_absmax(quant_state) -> torch.Tensor:
    """Per-block absmax (fp64 holding fp32 values), decoding the double quantisation if any."""
    if not quant_state.nested:
        return quant_state.absmax.detach().cpu().reshape(-1).double()
    q = quant_state.absmax.detach().cpu().reshape(-1).long()
    state2 = quant_state.state2
    code2 = state2.code.detach().cpu().double()
    absmax2 = state2.absmax.detach().cpu().reshape(-1).double()
    block2 = torch.arange(q.numel()) // int(state2.blocksize)
    offset = torch.as_tensor(quant_state.offset).detach().cpu().double()
    return _fp32(_fp32(code2[q] * absmax2[block2]) + offset)


def nf4_dequantize(packed: torch.Tensor, quant_state, dtype: torch.dtype = torch.float32):
    """The dense weight (``quant_state.shape``, ``dtype``, on ``packed``'s device) that the NF4
    bytes ``packed`` and their ``quant_state`` define."""
    assert quant_state.quant_type == "nf4", quant_state.quant_type
    shape = tuple(quant_state.shape)
    n = math.prod(shape)
    data = packed.detach().cpu().contiguous().view(torch.uint8).reshape(-1).long()
    i = torch.arange(n)
    byte = data[i // 2]
    nibble = torch.where(i % 2 == 0, byte >> 4, byte & 15)
    absmax = nf4_absmax(quant_state)[i // quant_state.blocksize]
    values = _fp32(torch.tensor(NF4, dtype=torch.float64)[nibble] * absmax)
    return values.float().to(dtype).reshape(shape).to(packed.device)


def _format_linear_forward(self, x: torch.Tensor) -> torch.Tensor:
    weight = nf4_dequantize(self.weight, self.weight.quant_state, x.dtype)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return F.linear(x, weight, bias)


def run_4bit_layers_from_format(model: nn.Module) -> nn.Module:
    """Make every bitsandbytes ``Linear4bit`` in ``model`` compute ``x·Wᵀ + b`` with W the format's
    values of its packed weight (read at each call, so streamed weights are read where they are),
    instead of bitsandbytes' CPU path. Only the layers' own forward changes (instance-level):
    transformers and PEFT around them run as they are. Returns ``model``."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers, "no bitsandbytes Linear4bit layer in the model"
    for layer in layers:
        layer.forward = types.MethodType(_format_linear_forward, layer)
    return model
