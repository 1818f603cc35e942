"""RoPE: the Triton kernel (interpreter on CPU) against the fp64 reference and HF's own RoPE."""

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from fastlm.kernels.rope import apply_rope, apply_rope_reference, apply_rope_triton

TOL = dict(atol=1e-5, rtol=1e-5)  # fp32 kernel against an fp64 (or fp32 HF) ground truth
B, S, HQ, HK = 2, 3, 3, 1  # GQA: 3 query heads share 1 kv head


def _angles(batch, seq, dim, seed=0):
    """HF-layout cos/sin in fp64: both halves equal, angles spread over several turns."""
    gen = torch.Generator().manual_seed(seed)
    theta = torch.rand(batch, seq, dim // 2, generator=gen, dtype=torch.float64) * 20.0 - 10.0
    theta = torch.cat([theta, theta], dim=-1)
    return theta.cos(), theta.sin()


def _qk(dim, device, hq=HQ, hk=HK, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, hq, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    k = torch.randn(B, S, hk, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    dq = torch.randn(B, S, hq, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    dk = torch.randn(B, S, hk, dim, generator=gen, dtype=torch.float64).to(device, dtype)
    return q, k, dq, dk


def _fwd_bwd(fn, q, k, cos, sin, dq, dk, **kw):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    qo, ko = fn(q, k, cos, sin, **kw)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    return qo, ko, gq, gk


def _assert_all_close(got, want, **tol):
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), w.double(), **(tol or TOL))


def _truth(q, k, cos, sin, dq, dk):
    args = (t.double() for t in (q, k, cos, sin, dq, dk))
    return _fwd_bwd(apply_rope_reference, *args)


@pytest.mark.parametrize("dim", [16, 32, 48, 64, 128, 256])  # 48: half-dim 24 in a 32 block
@pytest.mark.parametrize("cos_batch", [1, B])
def test_triton_matches_reference(device, dim, cos_batch):
    q, k, dq, dk = _qk(dim, device)
    cos, sin = (t.to(device, torch.float32) for t in _angles(cos_batch, S, dim))
    got = _fwd_bwd(apply_rope_triton, q, k, cos, sin, dq, dk)
    assert got[0].is_contiguous() and got[0].shape == q.shape and got[0].dtype == q.dtype
    assert got[1].is_contiguous() and got[1].shape == k.shape
    _assert_all_close(got, _truth(q, k, cos, sin, dq, dk))


def test_head_chunks(device):
    # A 64-element tile holds 2 heads of half-dim 24 (block 32): 5 q heads take 3 chunks.
    q, k, dq, dk = _qk(48, device, hq=5, hk=3, seed=2)
    cos, sin = (t.to(device, torch.float32) for t in _angles(B, S, 48, seed=2))
    got = _fwd_bwd(apply_rope_triton, q, k, cos, sin, dq, dk, _max_tile=64)
    _assert_all_close(got, _truth(q, k, cos, sin, dq, dk))


@pytest.mark.parametrize("kind", ["fused_qkv", "head_major", "strided_last"])
def test_non_contiguous_inputs(device, kind):
    dim = 48
    q, k, dq, dk = _qk(dim, device, seed=3)
    if kind == "fused_qkv":  # views of one (B, S, (HQ + 2 HK) * D) projection output
        qkv = torch.cat([q.flatten(2), k.flatten(2), torch.randn_like(k).flatten(2)], dim=-1)
        q_in = qkv[..., : HQ * dim].view(B, S, HQ, dim)
        k_in = qkv[..., HQ * dim : (HQ + HK) * dim].view(B, S, HK, dim)
    elif kind == "head_major":  # (B, H, S, D) storage seen as (B, S, H, D)
        q_in = q.transpose(1, 2).contiguous().transpose(1, 2)
        k_in = k.transpose(1, 2).contiguous().transpose(1, 2)
    else:  # head dim not unit-stride: copied by the launcher
        q_in = q.transpose(2, 3).contiguous().transpose(2, 3)
        k_in = k.transpose(2, 3).contiguous().transpose(2, 3)
    assert not q_in.is_contiguous() and torch.equal(q_in, q) and torch.equal(k_in, k)
    cos, sin = (t.to(device, torch.float32) for t in _angles(1, S, dim, seed=3))
    # Non-contiguous output grads as well (the backward reads them with their strides).
    dq_nc = dq.transpose(1, 2).contiguous().transpose(1, 2)
    got = _fwd_bwd(apply_rope_triton, q_in, k_in, cos, sin, dq_nc, dk)
    assert got[0].is_contiguous() and got[1].is_contiguous()
    _assert_all_close(got, _truth(q, k, cos, sin, dq, dk))


def _hf_rope(q, k, cos, sin, dq, dk):
    """transformers' apply_rotary_pos_emb, which wants (B, H, S, D)."""
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    qo, ko = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    qo, ko = qo.transpose(1, 2), ko.transpose(1, 2)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    return qo, ko, gq, gk


def _check_against_hf(q, k, cos, sin, dq, dk):
    dim = q.shape[-1]
    assert torch.equal(cos[..., : dim // 2], cos[..., dim // 2 :])  # the layout the kernel reads
    want = _hf_rope(q, k, cos, sin, dq, dk)
    for fn in (apply_rope_triton, apply_rope):
        _assert_all_close(_fwd_bwd(fn, q, k, cos, sin, dq, dk), want)


# Far positions reach the low frequencies that llama3 scaling changes; two rows of positions give
# a (B, S, D) cos, one row a (1, S, D) cos broadcast over the batch.
POSITIONS = {
    "per_batch": torch.tensor([[0, 9, 8500], [3, 4100, 60000]]),
    "shared": torch.tensor([[5, 700, 30000]]),
}


@pytest.mark.parametrize("positions", list(POSITIONS))
def test_matches_transformers_llama3(device, positions):
    dim = 48
    config = LlamaConfig(
        hidden_size=HQ * dim, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=dim,
        num_hidden_layers=1, intermediate_size=32, vocab_size=16, max_position_embeddings=131072,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
        },
    )  # fmt: skip
    rotary = LlamaRotaryEmbedding(config).to(device)
    q, k, dq, dk = _qk(dim, device, seed=4)
    cos, sin = rotary(q, POSITIONS[positions].to(device))
    assert cos.shape == (POSITIONS[positions].shape[0], S, dim)
    _check_against_hf(q, k, cos, sin, dq, dk)


def test_matches_transformers_gemma3_local_and_global(device):
    dim = 32
    config = Gemma3TextConfig(
        hidden_size=HQ * dim, num_attention_heads=HQ, num_key_value_heads=HK, head_dim=dim,
        num_hidden_layers=2, intermediate_size=32, vocab_size=16,
        layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    rotary = Gemma3RotaryEmbedding(config).to(device)
    q, k, dq, dk = _qk(dim, device, seed=5)
    positions = POSITIONS["per_batch"].to(device)
    cos_local, sin_local = rotary(q, positions, "sliding_attention")
    cos_global, sin_global = rotary(q, positions, "full_attention")
    assert not torch.allclose(cos_local, cos_global)  # two bases (10k local, 1M global)
    _check_against_hf(q, k, cos_local, sin_local, dq, dk)
    _check_against_hf(q, k, cos_global, sin_global, dq, dk)


def test_public_dispatch(device):
    q, k, dq, dk = _qk(32, device, seed=6)
    cos, sin = (t.to(device, torch.float32) for t in _angles(B, S, 32, seed=6))
    qo, _ = apply_rope(q.requires_grad_(), k, cos, sin)
    assert (type(qo.grad_fn).__name__ == "_RopeFunctionBackward") == (device == "cuda")
    got = _fwd_bwd(apply_rope, q, k, cos, sin, dq, dk)
    _assert_all_close(got, _truth(q, k, cos, sin, dq, dk))


@pytest.mark.parametrize("dim", [64, 128])
def test_bf16_on_gpu(device, dim):
    if device != "cuda":
        pytest.skip("bf16 is checked on the GPU only")
    q, k, dq, dk = _qk(dim, device, hq=8, hk=2, dtype=torch.bfloat16, seed=7)
    cos, sin = (t.to(device, torch.bfloat16) for t in _angles(B, S, dim, seed=7))
    got = _fwd_bwd(apply_rope_triton, q, k, cos, sin, dq, dk)
    assert all(t.dtype == torch.bfloat16 for t in got)
    _assert_all_close(got, _truth(q, k, cos, sin, dq, dk), atol=3e-2, rtol=2e-2)
