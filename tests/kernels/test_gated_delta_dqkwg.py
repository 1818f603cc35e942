"""The gated delta rule's dqkwg backward: the batched implementation against the fp64 reference,
the reference against autograd of transformers' chunked delta rule, and (CUDA with fla) the
Hopper-safe Function's gradients against transformers' PyTorch function.

The autograd check: transformers' ``torch_chunk_gated_delta_rule`` with its two triangular solves
(u = new_values, w = k_cumdecay) replaced by leaf tensors of the same values, so that no gradient
flows through the WY representation. Then q's, k's and w's gradients are exactly dqkwg's dq, dk
and dw, u's gradient is dqkwg's input dṽ, and the per-position gate's gradient is dγ summed from
each position to its chunk's end. The states h come from runs over the first chunks, and
dh[c] = ∂L/∂(state after chunk c) from runs over the later chunks started from that state.
transformers computes in fp32 whatever it is given, so that check is at fp32 precision.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from fastlm.kernels.gated_delta_dqkwg import gated_delta_dqkwg, gated_delta_dqkwg_reference

pytestmark = pytest.mark.usefixtures("one_thread")

CHUNK = 64
SHAPES = {  # batch, seq, key heads, value heads, K, V
    "partial last chunk, grouped values": (2, 150, 2, 4, 12, 10),
    "whole chunks": (1, 128, 3, 3, 16, 8),
}


def _max_relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e|: every element counts, on the scale of the largest."""
    return ((actual.double() - expected.double()).abs().max() / expected.abs().max()).item()


def _rms_ratio(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """RMS(a − e) / RMS(e): the error's size against the tensor's, over all its elements."""
    difference = (actual.double() - expected.double()).pow(2).mean().sqrt()
    return (difference / expected.double().pow(2).mean().sqrt()).item()


def _dqkwg_inputs(batch, seq, heads, value_heads, dim_k, dim_v, chunks, seed=0):
    """Random inputs of dqkwg's layout; g a chunk-local cumulative log2-gate (≤ 0, decreasing)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    q, k = randn(batch, seq, heads, dim_k), randn(batch, seq, heads, dim_k)
    v, dv, do = (randn(batch, seq, value_heads, dim_v) for _ in range(3))
    g = -torch.rand(batch, seq, value_heads, generator=gen) * 0.3
    g = torch.cat([part.cumsum(1) for part in g.split(CHUNK, dim=1)], dim=1)
    h, dh = (randn(batch, chunks, value_heads, dim_k, dim_v) for _ in range(2))
    return q, k, v, g, h, dv, do, dh


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_implementation_matches_the_fp64_reference(shape):
    batch, seq = shape[:2]
    inputs = _dqkwg_inputs(*shape, chunks=math.ceil(seq / CHUNK))
    scale = shape[4] ** -0.5
    actual = gated_delta_dqkwg(*inputs, scale)
    expected = gated_delta_dqkwg_reference(*inputs, scale)
    for name, a, e in zip(("dq", "dk", "dw", "dg"), actual, expected):
        assert a.shape == e.shape, name
        assert _max_relative(a, e) < 1e-5, name


def test_packed_sequences_match_the_reference_and_each_sequence_alone():
    """cu_seqlens: chunks restart at each sequence; the result is each sequence's own."""
    lengths = [70, 64, 5, 130]
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    chunks = [math.ceil(n / CHUNK) for n in lengths]
    q, k, v, _, h, dv, do, dh = _dqkwg_inputs(1, sum(lengths), 2, 4, 12, 10, chunks=sum(chunks))
    gate = -torch.rand(1, sum(lengths), 4, generator=torch.Generator().manual_seed(1))
    g = torch.cat([p.cumsum(1) for s in gate.split(lengths, 1) for p in s.split(CHUNK, 1)], 1)
    inputs = (q, k, v, g, h, dv, do, dh)
    actual = gated_delta_dqkwg(*inputs, 0.3, cu_seqlens=bounds)
    expected = gated_delta_dqkwg_reference(*inputs, 0.3, cu_seqlens=bounds)
    for a, e in zip(actual, expected):
        assert _max_relative(a, e) < 1e-5
    first = [0, *torch.tensor(chunks).cumsum(0).tolist()]  # each sequence's first state
    for i, (start, n) in enumerate(zip(bounds.tolist(), lengths)):
        tokens, states = slice(start, start + n), slice(first[i], first[i] + chunks[i])
        alone = gated_delta_dqkwg(
            *(x[:, tokens] for x in (q, k, v, g)), h[:, states], dv[:, tokens], do[:, tokens],
            dh[:, states], 0.3,
        )  # fmt: skip
        for a, e in zip(actual, alone):
            assert torch.allclose(a[:, tokens], e, atol=1e-6, rtol=1e-5)


def test_low_precision_inputs_keep_their_dtypes():
    inputs = [x.bfloat16() for x in _dqkwg_inputs(1, 100, 1, 2, 8, 8, chunks=2)]
    inputs[3] = inputs[3].float()  # fla's cumulated gate is fp32
    dq, dk, dw, dg = gated_delta_dqkwg(*inputs, 0.35)
    assert (dq.dtype, dk.dtype, dw.dtype, dg.dtype) == (torch.bfloat16,) * 3 + (torch.float32,)
    expected = gated_delta_dqkwg_reference(*inputs, 0.35)
    for a, e in zip((dq, dk, dw, dg), expected):
        assert _max_relative(a, e) < 1e-2  # bf16 rounding of the outputs only


def test_wrong_layouts_are_refused():
    q, k, v, g, h, dv, do, dh = _dqkwg_inputs(1, 70, 2, 4, 8, 8, chunks=2)
    with pytest.raises(ValueError, match="h"):
        gated_delta_dqkwg(q, k, v, g, h[:, :, :2], dv, do, dh, 0.3)
    with pytest.raises(ValueError, match="HV % H"):
        gated_delta_dqkwg(q, k, v[:, :, :3], g[..., :3], h[:, :, :3], dv[:, :, :3],
                          do[:, :, :3], dh[:, :, :3], 0.3)  # fmt: skip


# ------------------------------------------------------------- against transformers' autograd


def _transformers_rule():
    modeling = pytest.importorskip(
        "transformers.models.qwen3_5.modeling_qwen3_5", reason="transformers without Qwen3.5"
    )
    return inspect.unwrap(modeling.torch_chunk_gated_delta_rule)  # its PyTorch body


def _chunked(x, seq):
    """transformers' (B, HV, NT, L, D) chunks -> fla's (B, T, HV, D), padding dropped."""
    return x.flatten(2, 3)[:, :, :seq].transpose(1, 2)


def _autograd_truth(shape, monkeypatch, seed=0):
    """dqkwg's inputs and its true outputs, from autograd of transformers' function."""
    rule = _transformers_rule()
    batch, seq, heads, value_heads, dim_k, dim_v = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, heads, dim_k, generator=gen).requires_grad_()
    k = F.normalize(torch.randn(batch, seq, heads, dim_k, generator=gen), dim=-1).requires_grad_()
    v = torch.randn(batch, seq, value_heads, dim_v, generator=gen)
    gate = (-torch.rand(batch, seq, value_heads, generator=gen) * 0.3).requires_grad_()
    beta = torch.rand(batch, seq, value_heads, generator=gen)
    do = torch.randn(batch, seq, value_heads, dim_v, generator=gen)
    d_final = torch.randn(batch, value_heads, dim_k, dim_v, generator=gen)

    def loss(out, state, tokens=slice(None)):
        return (out * do[:, tokens]).sum() + (state * d_final).sum()

    leaves, solve = [], torch.linalg.solve_triangular

    def cut(*args, **kwargs):  # u, then w: their values, as leaves
        leaves.append(solve(*args, **kwargs).detach().requires_grad_())
        return leaves[-1]

    with monkeypatch.context() as patch:
        patch.setattr(torch.linalg, "solve_triangular", cut)
        out, state = rule(q, k, v, g=gate, beta=beta, output_final_state=True)
    loss(out, state).backward()
    u, w = leaves

    def run(tokens, initial=None):
        q_, k_, v_, g_ = (x[:, tokens].detach() for x in (q, k, v, gate))
        return rule(q_, k_, v_, g=g_, beta=beta[:, tokens], initial_state=initial,
                    output_final_state=True)  # fmt: skip

    chunks = math.ceil(seq / CHUNK)
    states = [torch.zeros(batch, value_heads, dim_k, dim_v)]
    states += [run(slice(0, c * CHUNK))[1] for c in range(1, chunks)]
    state_grads = []
    for c in range(1, chunks):  # ∂L/∂(state after chunk c−1), from the chunks after it
        initial = states[c].clone().requires_grad_()
        loss(*run(slice(c * CHUNK, seq), initial), slice(c * CHUNK, seq)).backward()
        state_grads.append(initial.grad)
    state_grads.append(d_final)
    h, dh = torch.stack(states, 1), torch.stack(state_grads, 1)  # (B, NT, HV, K, V)
    v_new = _chunked(u - w @ h.transpose(1, 2), seq)  # ṽ = u − w·S per chunk
    padded = F.pad(gate.detach(), (0, 0, 0, chunks * CHUNK - seq))
    g = padded.unflatten(1, (chunks, CHUNK)).cumsum(2).flatten(1, 2)[:, :seq] / math.log(2)
    inputs = (q.detach(), k.detach(), v_new, g, h, _chunked(u.grad, seq), do, dh)
    return inputs, (q.grad, k.grad, _chunked(w.grad, seq), gate.grad)


def _gate_grad(dg: torch.Tensor) -> torch.Tensor:
    """dγ (w.r.t. the chunk-local cumulative gate) -> the per-position gate's gradient."""
    seq = dg.shape[1]
    padded = F.pad(dg, (0, 0, 0, -seq % CHUNK)).unflatten(1, (-1, CHUNK))
    return padded.flip(2).cumsum(2).flip(2).flatten(1, 2)[:, :seq]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_reference_is_autograd_of_transformers_delta_rule(shape, monkeypatch):
    inputs, (dq, dk, dw, d_gate) = _autograd_truth(shape, monkeypatch)
    ours = gated_delta_dqkwg_reference(*inputs, scale=shape[4] ** -0.5)
    checks = {"dq": (ours[0], dq), "dk": (ours[1], dk), "dw": (ours[2], dw),
              "dg": (_gate_grad(ours[3]), d_gate)}  # fmt: skip
    for name, (actual, expected) in checks.items():
        assert _max_relative(actual, expected) < 5e-6, name


# ------------------------------------------------------------------------ CUDA, with fla


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla's Triton kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hopper_function_matches_transformers_on_the_gpu(dtype):
    """chunk_gated_delta_rule_hopper (fla's kernels + fastlm's dqkwg) against transformers'
    PyTorch delta rule: output, final state and the gradients of q, k, v, g and β."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    from fastlm.kernels.gated_delta_rule import chunk_gated_delta_rule_hopper

    rule = _transformers_rule()
    gen = torch.Generator("cuda").manual_seed(0)
    batch, seq, heads, value_heads, dim = 2, 200, 2, 4, 128  # Qwen3.5's head dims, 2 per key head
    q, k = (torch.randn(batch, seq, heads, dim, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(batch, seq, value_heads, dim, device="cuda", generator=gen)
    gate = -torch.rand(batch, seq, value_heads, device="cuda", generator=gen) * 0.3
    beta = torch.rand(batch, seq, value_heads, device="cuda", generator=gen)
    do = torch.randn(batch, seq, value_heads, dim, device="cuda", generator=gen)
    d_final = torch.randn(batch, value_heads, dim, dim, device="cuda", generator=gen)

    def grads(function, cast):
        # fresh leaves per call: x.to(fp32) is x itself, whose .grad the next call would add to
        leaves = [x.detach().to(cast).requires_grad_() for x in (q, k, v, beta)]
        leaves.insert(3, gate.clone().requires_grad_())  # fp32, as fastlm computes it
        out, state = function(*leaves[:3], g=leaves[3], beta=leaves[4],
                              output_final_state=True, use_qk_l2norm_in_kernel=True)  # fmt: skip
        ((out.float() * do).sum() + (state.float() * d_final).sum()).backward()
        return [out, state, *(x.grad for x in leaves)]

    expected = grads(rule, torch.float32)
    actual = grads(chunk_gated_delta_rule_hopper, dtype)
    names = ["o", "state", "dq", "dk", "dv", "dg", "dbeta"]
    for name, a in zip(names, actual):
        assert torch.isfinite(a).all(), name
    if dtype == torch.float32:  # fla's dots in tf32: every element on the scale of the largest
        errors = {name: _max_relative(a, e) for name, a, e in zip(names, actual, expected)}
        assert max(errors.values()) < 1e-2, errors
    else:  # bf16 inputs and dots: the error's RMS over the reference's, as fla's own tests
        # measure it (their bounds: 0.005-0.008, and 0.02 for the gate and β gradients, which
        # sum over the head dimension), with room for the inputs' rounding to bf16 here
        errors = {name: _rms_ratio(a, e) for name, a, e in zip(names, actual, expected)}
        print(f"bf16 errors vs transformers' fp32 rule: {errors}")
        for name, error in errors.items():
            assert error < (3e-2 if name in ("dg", "dbeta") else 1.5e-2), errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla's Triton kernels)")
def test_hopper_function_takes_packed_sequences_as_separate_runs():
    """Three sequences packed in one row with cu_seqlens (lengths 70, 1 and 129: a chunk's
    boundary inside each long one) against the same function on each sequence alone: output,
    the final state per sequence, and the gradients of q, k, v, g and β."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    from fastlm.kernels.gated_delta_rule import chunk_gated_delta_rule_hopper

    bounds = [0, 70, 71, 200]
    gen = torch.Generator("cuda").manual_seed(1)
    seq, heads, value_heads, dim = bounds[-1], 2, 4, 64
    q, k = (torch.randn(1, seq, heads, dim, device="cuda", generator=gen) for _ in range(2))
    v = torch.randn(1, seq, value_heads, dim, device="cuda", generator=gen)
    gate = -torch.rand(1, seq, value_heads, device="cuda", generator=gen) * 0.3
    beta = torch.rand(1, seq, value_heads, device="cuda", generator=gen)
    do = torch.randn(1, seq, value_heads, dim, device="cuda", generator=gen)
    d_final = torch.randn(len(bounds) - 1, value_heads, dim, dim, device="cuda", generator=gen)

    def run(packed: bool):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, gate, beta)]
        if packed:
            cu_seqlens = torch.tensor(bounds, device="cuda")
            out, state = chunk_gated_delta_rule_hopper(
                *leaves[:3], g=leaves[3], beta=leaves[4], output_final_state=True,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
        else:
            pieces = [
                chunk_gated_delta_rule_hopper(
                    *(x[:, a:b] for x in leaves[:3]),
                    g=leaves[3][:, a:b],
                    beta=leaves[4][:, a:b],
                    output_final_state=True,
                )  # fmt: skip
                for a, b in zip(bounds, bounds[1:])
            ]
            out, state = torch.cat([o for o, _ in pieces], 1), torch.cat([s for _, s in pieces])
        ((out * do).sum() + (state * d_final).sum()).backward()
        return [out, state, *(x.grad for x in leaves)]

    names = ["o", "state", "dq", "dk", "dv", "dg", "dbeta"]
    errors = {n: _max_relative(a, e) for n, a, e in zip(names, run(True), run(False))}
    assert max(errors.values()) < 1e-4, errors  # the same kernels, chunks and TF32 roundings


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (fla's Triton kernels)")
def test_on_this_gpu_fla_trains_or_the_hopper_rule_does():
    """fla trains here, or refuses only the kernel fastlm replaces and the Hopper rule trains."""
    pytest.importorskip("fla", reason="flash-linear-attention is not installed")
    from fastlm.models.linear_attention import fla_refusal, hopper_rule_refusal

    device = torch.device("cuda", torch.cuda.current_device())
    refusal = fla_refusal(device)
    if "chunk_bwd_dqkwg" in refusal:
        assert hopper_rule_refusal(device) == ""
    else:
        assert refusal == ""
