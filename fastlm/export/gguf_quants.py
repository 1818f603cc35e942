"""GGML k-quants (Q4_K, Q5_K, Q6_K) in vectorised torch, and llama.cpp's per-tensor mixtures.

A k-quant row is cut into super-blocks of QK_K = 256 weights, stored little-endian as

  Q4_K (144 B): d f16 | dmin f16 | scales[12] | qs[128]                 w = d·sc_j·q − dmin·m_j
  Q5_K (176 B): d f16 | dmin f16 | scales[12] | qh[32] | qs[128]        (q: 4 or 5 bits, j: the
  Q6_K (210 B): ql[128] | qh[64] | scales[16] int8 | d f16              w = d·sc_j·(q − 32)

with 8 sub-blocks of 32 (Q4_K/Q5_K: 6-bit scale sc_j and 6-bit min m_j packed into 12 bytes) or
16 sub-blocks of 16 (Q6_K: int8 scales). The quantiser follows llama.cpp's reference one, used
by ``llama-quantize`` without an importance matrix (``quantize_row_q{4,5,6}_K_ref``): per
sub-block a weighted least-squares fit of (scale, min) over a sweep of candidate scales
(``make_qkx2_quants``; Q6_K: ``make_qx_quants``, x²-weighted, symmetric), then the scales are
quantised against the super-block's largest and the weights re-rounded with the stored scales.
Here every step runs on all super-blocks of a chunk of rows at once (the candidate sweep is a
short loop, never a loop over blocks), on the tensor's device, with llama.cpp's float operations
in its order (single IEEE divisions, sub-block sums added in sequence): the bytes are the ones
llama-quantize writes, on CPU and CUDA alike (tests/export/test_gguf_quants.py).

Usage: ``blocks = quantize_k(weight, "Q4_K")`` -> uint8 array (rows, row bytes) for GGUFWriter.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    import gguf

QK_K = 256
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
BLOCK_BYTES = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
# llama.cpp's GROUP_MAX_EPS: a (sub-)block whose largest |x| is below it is stored as zeros.
GROUP_MAX_EPS = 1e-15
# Elements quantised per step: bounds the ~15 fp32 temporaries of the candidate sweep.
CHUNK_ELEMENTS = {"cuda": 1 << 25, "cpu": 1 << 21}
# The k-quant file types and the type of their tensors unless a rule says otherwise.
METHOD_TYPES = {"q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
# llama.cpp's fallback when a row is not a whole number of 256-weight super-blocks: a 32-weight
# block type of similar size (then F16 if the row is not a multiple of 32 either).
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


# ----------------------------------------------------------------------------- quantise


def quantize_k(tensor: torch.Tensor, qtype: str | gguf.GGMLQuantizationType) -> np.ndarray:
    """GGML blocks of a 2-D tensor whose rows are a multiple of 256, as uint8 (rows, row bytes).

    Usage: ``writer.add_tensor(name, quantize_k(w, "Q6_K"), raw_dtype=GGMLQuantizationType.Q6_K)``.
    Runs on ``tensor.device`` (CUDA or CPU) in fp32, a chunk of rows at a time.
    """
    qtype = _type_name(qtype)
    rows, cols = _check_shape(tensor)
    out = np.empty((rows, cols // QK_K * BLOCK_BYTES[qtype]), dtype=np.uint8)
    step = max(1, CHUNK_ELEMENTS.get(tensor.device.type, 1 << 21) // cols)
    with _one_cpu_thread(tensor.device):
        for start in range(0, rows, step):
            x = tensor[start : start + step].detach().to(torch.float32).reshape(-1, QK_K)
            packed = _pack(qtype, *_codes(qtype, x))
            out[start : start + step] = packed.reshape(-1, out.shape[1]).cpu().numpy()
    return out


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On CPU, torch on one thread while quantising: between the sweep's thousands of small ops
    idle OpenMP workers spin, and on a busy machine they starve the main thread (measured on 2
    cores under load: 24 s with 2 threads, 0.2 s with 1, for a 0.9M-weight model)."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _type_name(qtype) -> str:
    name = getattr(qtype, "name", qtype)
    if name not in K_TYPES:
        raise ValueError(f"{name!r} is not one of {K_TYPES}")
    return name


def _check_shape(tensor: torch.Tensor) -> tuple[int, int]:
    if tensor.ndim != 2 or tensor.shape[1] % QK_K:
        raise ValueError(
            f"k-quants need 2-D rows of a multiple of {QK_K}, got {tuple(tensor.shape)}"
        )
    return tensor.shape[0], tensor.shape[1]


def _codes(qtype: str, x: torch.Tensor) -> tuple:
    """Integer codes (and fp16 super-block scales) of super-blocks x: (n, 256) fp32."""
    if qtype == "Q6_K":
        return _q6_k_codes(x)
    return _qx_k_codes(x, nmax=15 if qtype == "Q4_K" else 31)


# The fits below work on sub-blocks laid out position-major, (G, M) for M sub-blocks of G weights,
# so that a sum over a sub-block is G−1 whole-row adds in llama.cpp's order (_ordered_sum): the
# rounding then matches its sequential float loops and the files come out byte for byte the same.


def _qx_k_codes(x: torch.Tensor, nmax: int):
    """Q4_K/Q5_K: (d f16, dmin f16, 6-bit scales (n, 8), 6-bit mins (n, 8), levels (n, 256))."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32).t().contiguous()
    # llama.cpp's weights: the sub-block's RMS plus |x| (sqrt in fp64 and rounded once to fp32,
    # as C's sqrtf: torch's fp32 CPU sqrt is not correctly rounded).
    rms = torch.sqrt((_ordered_sum(sub * sub) / 32).double()).float()
    weights = rms + sub.abs()
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    scales, mins, levels = _fit_scale_min(sub, weights, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    ls = _six_bits(scales, max_scale)
    lm = _six_bits(mins, max_min)
    d = _div(max_scale, 63).to(torch.float16)
    dmin = _div(max_min, 63).to(torch.float16)
    # Re-round every weight with the scales as stored (fp16 × 6-bit), as the decoder will see them.
    step = (d.float() * ls.float()).repeat_interleave(32, dim=1)
    offset = (dmin.float() * lm.float()).repeat_interleave(32, dim=1)
    requant = torch.round((x + offset) / step).clamp(0, nmax)
    # A sub-block whose stored scale is 0 keeps its fitted levels (they decode to −min anyway).
    levels = torch.where(step != 0, requant, levels.t().reshape(n, QK_K))
    return d, dmin, ls, lm, levels.to(torch.uint8)


def _positive_max(values: torch.Tensor) -> torch.Tensor:
    """max(0, values...) over the last dim as llama.cpp's loop finds it: +0 unless one is > 0."""
    top = values.max(-1, keepdim=True).values
    return torch.where(top > 0, top, torch.zeros_like(top))  # clamp would keep a −0


def _six_bits(values: torch.Tensor, largest: torch.Tensor) -> torch.Tensor:
    """round(63·v/largest) as llama.cpp stores it: cast to uint8 (wrapping), then at most 63."""
    inverse = torch.where(largest > 0, _div(63, largest), torch.zeros_like(largest))
    return (torch.round(inverse * values).to(torch.int32) & 255).clamp(max=63)


def _fit_scale_min(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """llama.cpp's make_qkx2_quants on sub-blocks x (G, M): x ≈ scale·L − min, L in [0, nmax].

    Weighted least squares for (scale, min) given the levels L that a candidate inverse scale
    (nmax + rmin + rdelta·k)/(max − min) rounds to, keeping the candidate of least weighted
    squared error; each candidate is taken relative to the best min so far, as in llama.cpp.
    Returns (scale (M,), the_min = −min ≥ 0 (M,), L (G, M) as fp32).
    """
    xmax = x.max(0).values
    xmin = x.min(0).values.clamp(max=0)
    flat = xmax == xmin  # all equal and <= 0: L = 0, value −min
    sum_w, sum_x = _ordered_sum(torch.stack([w, w * x]), from_zero=False)
    iscale = _div(nmax, xmax - xmin)
    scale = _div(1, iscale)
    levels = torch.round(iscale * (x - xmin)).clamp(0, nmax)
    best = _weighted_sq_error(scale, xmin, levels, x, w)
    low = xmin
    for k in range(nstep + 1):
        # the candidate as llama.cpp computes it in float: rmin + rdelta·k + nmax
        factor = float(np.float32(rmin) + np.float32(rdelta) * np.float32(k) + np.float32(nmax))
        iscale = _div(factor, xmax - low)
        cand = torch.round(iscale * (x - low)).clamp(0, nmax)
        wl = w * cand
        sum_l, sum_l2, sum_xl = _ordered_sum(torch.stack([wl, wl * cand, wl * x]))
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a positive min is not representable: refit the scale alone
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = _weighted_sq_error(this_scale, this_min, cand, x, w)
        better = (det > 0) & (error < best)
        levels = torch.where(better, cand, levels)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    return scale, -low, levels


def _weighted_sq_error(scale, low, levels, x, w) -> torch.Tensor:
    diff = scale * levels + low - x
    return _ordered_sum(w * (diff * diff))


def _ordered_sum(t: torch.Tensor, from_zero: bool = True) -> torch.Tensor:
    """Sum over dim −2 of t (..., G, M) row by row, in order, as a C loop ``s += t[i]`` does.

    ``from_zero``: the loop starts from 0 rather than t[0] (only the sign of an all-zero sum
    differs: 0 + (−0) is +0). numpy reduces a non-inner axis row by row, in one call (CPU;
    with a single column it would sum pairwise).
    """
    if t.device.type == "cpu" and t.shape[-1] > 1:
        total = torch.from_numpy(np.add.reduce(t.numpy(), axis=-2))
    else:
        total = t[..., 0, :].clone()
        for i in range(1, t.shape[-2]):
            total += t[..., i, :]
    return total + 0.0 if from_zero else total


def _div(a, b) -> torch.Tensor:
    """a / b as one IEEE division: torch computes ``number / tensor`` as reciprocal × number,
    and CUDA ``tensor / number`` as × (1/number), each rounding twice (llama.cpp rounds once)."""
    like = b if isinstance(b, torch.Tensor) else a
    if not isinstance(a, torch.Tensor):
        a = torch.tensor(a, dtype=like.dtype, device=like.device)
    if not isinstance(b, torch.Tensor):
        b = torch.tensor(b, dtype=like.dtype, device=like.device)
    return torch.div(a, b)


def _q6_k_codes(x: torch.Tensor):
    """Q6_K: (d f16, int8 scales (n, 16), levels (n, 256) in [0, 63] = q + 32)."""
    n = x.shape[0]
    scales, levels = _fit_symmetric(x.reshape(n * 16, 16).t().contiguous(), nmax=32)
    scales, levels = scales.reshape(n, 16), levels.t().reshape(n, QK_K)
    largest = scales.gather(1, scales.abs().argmax(-1, keepdim=True))  # signed, first on ties
    empty = largest.abs() < GROUP_MAX_EPS
    iscale = _div(-128, torch.where(empty, torch.ones_like(largest), largest))
    d = torch.where(empty, torch.zeros_like(largest), _div(1, iscale)).to(torch.float16)
    sc = torch.round(iscale * scales).clamp(max=127)
    sc = torch.where(empty, torch.zeros_like(sc), sc)
    step = (d.float() * sc).repeat_interleave(16, dim=1)
    requant = torch.round(x / step).clamp(-32, 31) + 32
    levels = torch.where(step != 0, requant, levels)
    levels = torch.where(empty, torch.zeros_like(levels), levels)  # llama.cpp zeroes the block
    return d, sc.to(torch.int8), levels.to(torch.uint8)


def _fit_symmetric(x: torch.Tensor, nmax: int):
    """llama.cpp's make_qx_quants(rmse_type=1) on sub-blocks x (G, M): x ≈ scale·l, l in
    [−nmax, nmax).

    The inverse scale −(nmax + 0.1·k)/max (max: the signed value of largest |x|), k in −9..9,
    whose rounding maximises (Σw·x·l)²/Σw·l² with w = x²; scale = Σw·x·l / Σw·l².
    Returns (scale (M,), levels l + nmax (G, M) as fp32; 0 for an all-zero sub-block).
    """
    peak = x.gather(0, x.abs().argmax(0, keepdim=True)).squeeze(0)  # first largest, as in C
    zero = peak.abs() < GROUP_MAX_EPS
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x
    wx = w * x
    scale = best = levels = None
    for k in [0] + [k for k in range(-9, 10) if k]:
        factor = float(np.float32(nmax) + np.float32(0.1) * np.float32(k))
        iscale = _div(-factor, peak)
        cand = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        sum_lx, sum_l2 = _ordered_sum(torch.stack([wx * cand, w * cand * cand]))
        if k == 0:
            scale = torch.where(sum_l2 != 0, sum_lx / sum_l2, torch.zeros_like(sum_l2))
            best, levels = scale * sum_lx, cand
            continue
        better = (sum_l2 > 0) & (sum_lx * sum_lx > best * sum_l2)
        new_scale = sum_lx / sum_l2
        levels = torch.where(better, cand, levels)
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * sum_lx, best)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    levels = torch.where(zero, torch.full_like(levels, -nmax), levels) + nmax
    return scale, levels


# ----------------------------------------------------------------------------- byte layout


def _pack(qtype: str, *codes) -> torch.Tensor:
    """GGML's block bytes (n, block bytes) uint8 from the codes of ``_codes``."""
    if qtype == "Q6_K":
        d, sc, levels = codes
        n = levels.shape[0]
        q = levels.reshape(n, 2, 4, 32)  # halves of 128, quarters at offsets 0/32/64/96
        low = q & 15
        ql = low[:, :, :2] | (low[:, :, 2:] << 4)  # byte l: quarter 0|2, byte 32+l: 1|3
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=q.device)
        qh = ((q >> 4) << shifts[:, None]).sum(2, dtype=torch.uint8)
        return torch.cat(
            [ql.reshape(n, 128), qh.reshape(n, 64), sc.view(torch.uint8), d.view(torch.uint8)], 1
        )
    d, dmin, ls, lm, levels = codes
    n = levels.shape[0]
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    scales = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        1,
    )
    q = levels.reshape(n, 4, 2, 32)  # 64-weight chunks: low nibbles, then high nibbles
    qs = ((q[:, :, 0] & 15) | ((q[:, :, 1] & 15) << 4)).reshape(n, 128)
    head = [d.view(torch.uint8), dmin.view(torch.uint8), scales]
    if qtype == "Q4_K":
        return torch.cat(head + [qs], 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=q.device)
    qh = ((q.reshape(n, 8, 32) >> 4) << shifts[:, None]).sum(1, dtype=torch.uint8)
    return torch.cat(head + [qh, qs], 1)


def dequantize_k(blocks, qtype: str) -> torch.Tensor:
    """Decode GGML k-quant blocks (..., row bytes) uint8 to fp32 (..., row weights).

    Usage: ``w = dequantize_k(quantize_k(x, "Q4_K"), "Q4_K")``. Same fp32 operations, in the same
    order, as gguf's numpy decoder and llama.cpp's ``dequantize_row_*``: bit-identical results.
    """
    qtype = _type_name(qtype)
    data = torch.as_tensor(blocks)
    lead, size = data.shape[:-1], BLOCK_BYTES[qtype]
    b = data.reshape(-1, size)
    n = b.shape[0]
    if qtype == "Q6_K":
        ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:]
        low = torch.stack([ql.reshape(n, 2, 2, 32) & 15, ql.reshape(n, 2, 2, 32) >> 4], 2)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device)
        high = (qh.reshape(n, 2, 1, 32) >> shifts[:, None]) & 3
        q = (low.reshape(n, 2, 4, 32) | (high << 4)).to(torch.float32) - 32
        scale = _f16(d) * sc.contiguous().view(torch.int8).to(torch.float32)
        out = scale.reshape(n, 16, 1) * q.reshape(n, 16, 16)
        return out.reshape(*lead, -1)
    d, dmin, s = _f16(b[:, 0:2]), _f16(b[:, 2:4]), b[:, 4:16].to(torch.int32)
    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], 1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], 1)
    qs = b[:, -128:].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 15, qs >> 4], 2).reshape(n, 8, 32)
    if qtype == "Q5_K":
        shifts = torch.arange(8, dtype=torch.uint8, device=b.device)
        q = q | (((b[:, 16:48].reshape(n, 1, 32) >> shifts[:, None]) & 1) << 4)
    step = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    offset = (dmin * m.to(torch.float32)).reshape(n, 8, 1)
    return (step * q.to(torch.float32) - offset).reshape(*lead, -1)


def _f16(two_bytes: torch.Tensor) -> torch.Tensor:
    return two_bytes.contiguous().view(torch.float16).to(torch.float32)


# ----------------------------------------------------------------------------- mixtures


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's layers that get more bits: the first 1/8, the last 1/8, every third between."""
    eighth = n_layers // 8
    return layer < eighth or layer >= 7 * n_layers // 8 or (layer - eighth) % 3 == 2


def llama_cpp_tensor_type(
    name: str,
    shape: tuple[int, ...],
    method: str,
    n_layers: int,
    tied: bool = False,
    is_70b: bool = False,
) -> gguf.GGMLQuantizationType:
    """The GGML type ``llama-quantize`` gives tensor ``name`` (GGUF name, torch shape) in a file of
    type ``method`` (q4_k_m, q5_k_m or q6_k), no importance matrix; as llama_tensor_get_type:

    - 1-D tensors (norms, biases, rope_freqs) stay F32; only 2-D ``*.weight`` is quantised, and
      never a ``*_norm.weight``.
    - ``output.weight`` — or ``token_embd.weight`` when the embeddings are tied (no output
      tensor) — gets Q6_K (Q8_0 if its rows are not a multiple of 256).
    - q4_k_m / q5_k_m: ``attn_v`` (or a fused ``attn_qkv``) and ``ffn_down`` get Q6_K in layers
      where use_more_bits (the first and last n_layers/8, every third layer between); on a 70B
      (80-layer Llama with GQA, 80-layer Qwen2) the other ``attn_v`` get Q5_K in q4_k_m.
    - everything else gets the file's type: Q4_K (q4_k_m), Q5_K (q5_k_m), Q6_K (q6_k).
    - rows not a multiple of 256 fall back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when
      they are not a multiple of 32 either (where llama.cpp would refuse an output tensor).

    Usage: ``llama_cpp_tensor_type("blk.0.attn_v.weight", (1024, 4096), "q4_k_m", 32)`` -> Q6_K.
    """
    import gguf

    qt = gguf.GGMLQuantizationType
    if method not in METHOD_TYPES:
        raise ValueError(f"{method!r} is not one of {tuple(METHOD_TYPES)}")
    if len(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return qt.F32
    cols = shape[-1]
    qtype = METHOD_TYPES[method]
    layer = int(name.split(".")[1]) if name.startswith("blk.") else -1
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q6_K" if cols % QK_K == 0 else "Q8_0"
    elif any(part in name for part in ("attn_v.weight", "attn_qkv.weight", "ffn_down")):
        if method in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layers):
            qtype = "Q6_K"
        elif is_70b and "ffn_down" not in name and qtype == "Q4_K":
            qtype = "Q5_K"  # 8 query heads share each v head there: more bits cost little
    if qtype in FALLBACK and cols % QK_K:
        qtype = FALLBACK[qtype]
    if cols % 32:  # no 32-weight block fits either (llama.cpp: F16, or an error for output)
        qtype = "F16"
    return qt[qtype]


def is_70b(arch_name: str, config) -> bool:
    """llama.cpp's LLM_TYPE_70B, which changes the q4_k_m mixture: 80-layer GQA Llama, Qwen2."""
    layers = config.num_hidden_layers
    if arch_name == "LLAMA":
        return layers == 80 and config.num_attention_heads != config.num_key_value_heads
    return arch_name == "QWEN2" and layers == 80


def encode_tensor(
    tensor: torch.Tensor, qtype: str | gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType | None]:
    """(array, raw GGML type or None) for GGUFWriter.add_tensor, for any type the mixtures use.

    Usage: ``writer.add_tensor(name, *encode_tensor(w, GGMLQuantizationType.Q4_K))`` (keyword
    ``raw_dtype``). K-quants run in torch on the tensor's device; Q8_0/Q5_0/Q5_1 (fallbacks for
    odd rows, llama.cpp's exact rounding) go through gguf's numpy quantiser.
    """
    import gguf

    qt = gguf.GGMLQuantizationType
    qtype = qt[getattr(qtype, "name", qtype)]
    if qtype.name in K_TYPES:
        return quantize_k(tensor, qtype.name), qtype
    array = tensor.detach().to(torch.float32).cpu().numpy()
    if qtype == qt.F32:
        return array, None
    if qtype == qt.F16:
        return array.astype(np.float16), None
    return gguf.quants.quantize(array, qtype), qtype


def time_quantize(qtype: str, rows: int, cols: int, device: str = "cpu", repeat: int = 1) -> float:
    """Seconds per ``quantize_k`` of a random (rows, cols) tensor on ``device`` (best of repeat).

    Usage: ``time_quantize("Q4_K", 14336, 4096, "cuda")``; prints nothing.
    """
    weight = torch.randn(rows, cols, device=device)
    quantize_k(weight[: max(1, CHUNK_ELEMENTS["cpu"] // cols)], qtype)  # warm-up
    best = float("inf")
    for _ in range(repeat):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        quantize_k(weight, qtype)
        best = min(best, time.perf_counter() - start)
    return best
