"""The chunked gated delta rule through fla's kernels, with fastlm's dqkwg in its backward.

flash-linear-attention (fla) 0.5.2 refuses to train its ``chunk_gated_delta_rule`` on Hopper
with Triton 3.4 to 3.7.0: one backward kernel, the chunk-local dq/dk/dw/dg one, is miscompiled
there (fla issue #640), and the Triton of a given torch cannot always be upgraded. This Function
is fla's, step for step, except for that kernel, which ``gated_delta_dqkwg.py`` provides::

    forward:  l2norm(q), l2norm(k) → fla's chunk_gated_delta_rule_fwd: chunk-local cumsum of g
              (base 2), WY representation (w, u, A), states h per chunk, output o
    saved:    q̂, k̂ (normalised) and their rstd, v, the cumulated g, β, A
    backward: recompute w, u and h, ṽ (fla); dv local, then dh and dṽ (fla); dq, dk, dw, dγ
              (fastlm); the WY backward dk, dv, dβ, dγ (fla); reverse in-chunk cumsum of dγ
              (fla); l2norm backward (fla)

It follows fla 0.5.2's internals, so it checks the installed fla once and refuses any other
version. No initial state, no packed sequences (fastlm's calls have neither); grouped value heads
(q, k with H heads, v, g, β with HV = G·H) as fla takes them. fla is imported inside the
functions: it is an optional, CUDA-only dependency.

Checked on the CPU with fla 0.5.2's kernels in Triton's interpreter (fp32, B=2, T=150, H=2, HV=4,
K=V=16, final state and l2norm on): output, state and the gradients of q, k, v, g, β equal fla's
own ``chunk_gated_delta_rule``'s within 5e-7 and transformers' PyTorch rule's within 6e-7 (max
error over max value). tests/kernels/test_gated_delta_dqkwg.py repeats the second on CUDA.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from types import SimpleNamespace

import torch

from fastlm.kernels.gated_delta_dqkwg import gated_delta_dqkwg

SUPPORTED_FLA = "0.5.2"  # the fla whose backward orchestration the Function repeats
CHUNK = 64  # fla's default chunk size, the one its forward saved A for

# The packed sequences' keywords of fla's chunked kernels: the bounds, and the (sequence, chunk)
# pair of every chunk that prepare_chunk_indices derives from them once per call.
_VARLEN = ("cu_seqlens", "chunk_indices")

# The fla functions the Function calls, with the keywords it passes them.
_FLA_CALLS = {
    "fla.modules.l2norm": {"l2norm_fwd": ["x"], "l2norm_bwd": ["y", "rstd", "dy"]},
    "fla.ops.gated_delta_rule.chunk": {
        "chunk_gated_delta_rule_fwd": [
            "q",
            "k",
            "v",
            "g",
            "beta",
            "scale",
            "initial_state",
            "output_final_state",
            "chunk_size",
            *_VARLEN,
        ],
    },  # fmt: skip
    "fla.ops.gated_delta_rule.wy_fast": {
        "recompute_w_u_fwd": ["k", "v", "beta", "A", "g", *_VARLEN],
        "prepare_wy_repr_bwd": ["k", "v", "beta", "A", "dw", "du", "g", *_VARLEN],
    },
    "fla.ops.common.chunk_delta_h": {
        "chunk_gated_delta_rule_fwd_h": [
            "k",
            "w",
            "u",
            "g",
            "initial_state",
            "output_final_state",
            "chunk_size",
            *_VARLEN,
        ],
        "chunk_gated_delta_rule_bwd_dhu": [
            "q",
            "k",
            "w",
            "g",
            "h0",
            "dht",
            "do",
            "dv",
            "scale",
            "chunk_size",
            *_VARLEN,
        ],
    },  # fmt: skip
    "fla.ops.common.chunk_o": {
        "chunk_bwd_dv_local": ["q", "k", "g", "do", "scale", "chunk_size", *_VARLEN],
    },
    "fla.ops.utils": {"chunk_local_cumsum": ["g", "chunk_size", "reverse", *_VARLEN]},
    "fla.ops.utils.index": {"prepare_chunk_indices": ["cu_seqlens", "chunk_size"]},
}


@functools.cache
def _fla() -> SimpleNamespace:
    """fla's internal functions, after checking that fla is the version they come from."""
    import importlib

    import fla  # lazy: optional dependency (CUDA only)

    version = getattr(fla, "__version__", "unknown")
    if version != SUPPORTED_FLA:
        raise RuntimeError(
            f"chunk_gated_delta_rule_hopper repeats the backward of flash-linear-attention "
            f"{SUPPORTED_FLA}, but fla {version} is installed: install "
            f"flash-linear-attention=={SUPPORTED_FLA}, or Triton >= 3.7.1 for fla's own backward"
        )
    functions = {}
    for module_name, calls in _FLA_CALLS.items():
        module = importlib.import_module(module_name)
        for name, keywords in calls.items():
            function = inspect.unwrap(getattr(module, name))
            missing = set(keywords) - set(inspect.signature(function).parameters)
            if missing:
                raise RuntimeError(
                    f"fla {version}'s {module_name}.{name} takes no {sorted(missing)}: this fla "
                    f"is not the {SUPPORTED_FLA} that chunk_gated_delta_rule_hopper follows"
                )
            functions[name] = getattr(module, name)  # wrapped: fla's backend dispatch kept
    return SimpleNamespace(**functions)


class _HopperGatedDeltaRule(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, q, k, v, g, beta, scale, output_final_state, use_qk_l2norm, cu_seqlens):
        fla = _fla()
        q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
        ctx.dtypes = (q.dtype, k.dtype, v.dtype, g.dtype, beta.dtype)
        with _device(q):
            varlen = _varlen(fla, cu_seqlens)
            q_rstd = k_rstd = None
            if use_qk_l2norm:
                q, q_rstd = fla.l2norm_fwd(q)
                k, k_rstd = fla.l2norm_fwd(k)
            g, o, A, final_state, _, _ = fla.chunk_gated_delta_rule_fwd(
                q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=None,
                output_final_state=output_final_state, chunk_size=CHUNK, **varlen,
            )  # fmt: skip
        ctx.save_for_backward(q, q_rstd, k, k_rstd, v, g, beta, A, *varlen.values())
        ctx.scale, ctx.use_qk_l2norm, ctx.varlen = scale, use_qk_l2norm, tuple(varlen)
        return o.to(q.dtype), final_state

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, do, d_final):
        fla = _fla()
        q, q_rstd, k, k_rstd, v, g, beta, A, *bounds = ctx.saved_tensors
        varlen = dict(zip(ctx.varlen, bounds))
        do = do.contiguous()
        d_final = d_final.contiguous() if d_final is not None else None
        with _device(q):
            dq, dk, dv, db, dg = _backward(fla, q, k, v, g, beta, A, ctx.scale, do, d_final, varlen)
            if ctx.use_qk_l2norm:
                dq = fla.l2norm_bwd(q, q_rstd, dq)
                dk = fla.l2norm_bwd(k, k_rstd, dk)
        grads = (dq, dk, dv, dg, db)
        return (*(x.to(dtype) for x, dtype in zip(grads, ctx.dtypes)), None, None, None, None)


def _device(tensor: torch.Tensor):
    """fla's kernels launch on the current CUDA device: make it the tensor's (CPU tensors: the
    Triton interpreter, nothing to set)."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _varlen(fla, cu_seqlens: torch.Tensor | None) -> dict:
    """The packed sequences' keywords for fla's kernels ({} for a padded batch)."""
    if cu_seqlens is None:
        return {}
    cu_seqlens = cu_seqlens.to(torch.long)
    chunk_indices = fla.prepare_chunk_indices(cu_seqlens, CHUNK)
    return {"cu_seqlens": cu_seqlens, "chunk_indices": chunk_indices}


def _backward(fla, q, k, v, g, beta, A, scale, do, d_final, varlen):
    """fla 0.5.2's chunk_gated_delta_rule_bwd without initial state, with fastlm's dqkwg.
    g: the chunk-local cumsum (base 2) the forward saved; varlen: ``_varlen``'s keywords.
    Returns dq, dk, dv, dβ, dg for the (normalised) q, k and the raw gate."""
    w, u = fla.recompute_w_u_fwd(k=k, v=v, beta=beta, A=A, g=g, **varlen)
    h, v_new, _ = fla.chunk_gated_delta_rule_fwd_h(
        k=k, w=w, u=u, g=g, initial_state=None, output_final_state=False, chunk_size=CHUNK,
        **varlen,
    )  # fmt: skip
    dv = fla.chunk_bwd_dv_local(q=q, k=k, g=g, do=do, scale=scale, chunk_size=CHUNK, **varlen)
    dh, _, dv = fla.chunk_gated_delta_rule_bwd_dhu(
        q=q, k=k, w=w, g=g, h0=None, dht=d_final, do=do, dv=dv, scale=scale, chunk_size=CHUNK,
        **varlen,
    )  # fmt: skip
    dq, dk, dw, dg = gated_delta_dqkwg(
        q, k, v_new, g, h, dv, do, dh, scale, cu_seqlens=varlen.get("cu_seqlens"),
        chunk_size=CHUNK,
    )  # fmt: skip
    dk_wy, dv, db, dg_wy = fla.prepare_wy_repr_bwd(
        k=k, v=v, beta=beta, A=A, dw=dw, du=dv, g=g, **varlen
    )
    dg = fla.chunk_local_cumsum(dg + dg_wy, chunk_size=CHUNK, reverse=True, **varlen)
    return dq, dk + dk_wy, dv, db, dg


def chunk_gated_delta_rule_hopper(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = True,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fla's ``chunk_gated_delta_rule`` (same arguments and results, CUDA) whose backward is
    right on Hopper with Triton < 3.7.1. q, k (B, T, H, K); v (B, T, HV, V); g, β (B, T, HV);
    ``cu_seqlens`` (N + 1,): N sequences packed end to end in a batch of one (the final state is
    then one per sequence).

    Usage: ``o, state = chunk_gated_delta_rule_hopper(q, k, v, g=g, beta=beta)``.
    """
    if q.shape != k.shape or v.shape[2] % q.shape[2] or not g.shape == beta.shape == v.shape[:3]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"beta {tuple(beta.shape)}: want q, k (B, T, H, K), v (B, T, HV, V), g, beta "
            "(B, T, HV) with HV a multiple of H"
        )
    if cu_seqlens is not None and q.shape[0] != 1:
        raise ValueError(f"cu_seqlens packs sequences in a batch of one, not {q.shape[0]}")
    scale = k.shape[-1] ** -0.5 if scale is None else float(scale)
    return _HopperGatedDeltaRule.apply(
        q, k, v, g, beta, scale, output_final_state, use_qk_l2norm_in_kernel, cu_seqlens
    )
