"""Compiles every fastlm Triton kernel for a GPU on a machine that has none, and prints JSON.

Run as a script, without ``TRITON_INTERPRET`` (``tests/kernels/test_compile_for_gpu.py`` does):
each op's public launcher is called on CPU tensors of GPU-like shapes with the GPU's launch
shapes forced (``forced_gpu_launch_shapes``); every kernel launch is intercepted and, instead
of running, compiled ahead of time for the target (Triton's own compiler down to a cubin, which
runs ptxas). The interpreter checks what the kernels compute; this checks what only a real
compile sees: that the code lowers for the GPU and that each launch shape fits the GPU's shared
memory.

Usage: ``python tests/kernels/compile_for_gpu.py --arch 90``
"""

from __future__ import annotations

import argparse
import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

_DTYPES = {
    torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
}  # fmt: skip
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "enable_fp_fusion", "maxnreg")


def _arg_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type kernel argument {value!r}")


class Compiler:
    """Stands in for ``JITFunction.run``: compiles each distinct launch once, records it."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)
        self.records: dict[str, dict] = {}

    def run(self, kernel: JITFunction, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
        bound = dict(zip(kernel.arg_names, args))
        bound.update(kwargs)
        signature, constants = {}, {}
        for param in kernel.params:
            value = bound.get(param.name, param.default)
            if param.is_constexpr or value is None:
                signature[param.name], constants[param.name] = "constexpr", value
            else:
                signature[param.name] = _arg_type(value)
        name = kernel.fn.__name__
        key = json.dumps([name, signature, constants, options], sort_keys=True, default=str)
        if key not in self.records:
            compiled = triton.compile(
                ASTSource(kernel, signature, constants), target=self.target, options=options
            )
            self.records[key] = {
                "kernel": f"{kernel.fn.__module__.rsplit('.', 1)[-1]}.{name}",
                "constants": {k: str(v) for k, v in constants.items()},
                "options": options,
                "shared_bytes": int(compiled.metadata.shared),
                "cubin_bytes": len(compiled.asm["cubin"]),
            }


def _exercise_ops() -> None:
    """Calls every op forward and backward at GPU-like shapes (bf16 unless noted)."""
    from bitsandbytes.functional import quantize_4bit

    from fastlm.kernels import (
        flash_attention,
        fused_linear_cross_entropy,
        geglu,
        nf4_dequant,
        rms_norm,
        rope,
        swiglu,
    )

    bf16 = torch.bfloat16

    def leaf(*shape, dtype=bf16):
        return torch.randn(*shape).to(dtype).requires_grad_()

    x = leaf(4, 4096)
    for offset in (0.0, 1.0):  # Llama, Gemma
        rms_norm.rms_norm_triton(x, leaf(4096), 1e-6, offset).sum().backward()
    rms_norm.rms_norm_triton(leaf(2, 16384), leaf(16384), 1e-6).sum().backward()  # chunked rows

    q, k = leaf(1, 8, 32, 128), leaf(1, 8, 8, 128)
    cos, sin = torch.randn(1, 8, 128).to(bf16), torch.randn(1, 8, 128).to(bf16)
    q2, k2 = rope.apply_rope_triton(q, k, cos, sin)
    (q2.sum() + k2.sum()).backward()

    for op in (swiglu, geglu):
        e, g = torch.randn(4, 14336).to(bf16), torch.randn(4, 14336).to(bf16)
        name = op.__name__.rsplit(".", 1)[-1]
        getattr(op, f"{name}_forward_triton")(e, g)
        getattr(op, f"{name}_backward_triton")(e, e, g, inplace=True)

    hidden, head = leaf(16, 64), leaf(8192, 64)
    labels = torch.randint(0, 8192, (16,))
    for softcap in (None, 30.0):  # Gemma 2's final-logit soft-capping
        fused_linear_cross_entropy.fused_linear_cross_entropy_triton(
            hidden, head, labels, softcap=softcap
        ).backward()

    weight, other = torch.randn(256, 512), torch.randn(64, 512)
    for nested in (False, True):
        packed, state = quantize_4bit(weight, quant_type="nf4", compress_statistics=nested)
        packed2, state2 = quantize_4bit(other, quant_type="nf4", compress_statistics=nested)
        for dtype in (bf16, torch.float16):
            nf4_dequant.dequantize_nf4_triton(packed, state, dtype)
            nf4_dequant.dequantize_nf4_group([packed, packed2], [state, state2], dtype)

    # (head_dim, softcap, sliding window, sinks): Llama-like, Qwen-like with a window, Gemma 2,
    # gpt-oss (sliding layers of window 128 with attention sinks: the forward's SINKS branch)
    for head_dim, softcap, window, sinks in (
        (64, None, None, False), (128, None, 64, False), (256, 50.0, 64, False),
        (64, None, 128, True),
    ):  # fmt: skip
        qa, ka, va = leaf(1, 8, 256, head_dim), leaf(1, 4, 256, head_dim), leaf(1, 4, 256, head_dim)
        out = flash_attention.flash_attention_triton(
            qa, ka, va, scale=head_dim**-0.5, softcap=softcap, sliding_window=window,
            sinks=leaf(8, dtype=torch.float32) if sinks else None,
        )  # fmt: skip
        out.sum().backward()

    # Packed sequences (VARLEN=True): three sequences in 256 tokens, at the same head dims, plus
    # bidirectional attention (embedding models) and gpt-oss's full layers (sinks, padded batches)
    cu_seqlens = torch.tensor([0, 100, 101, 256], dtype=torch.int32)
    for head_dim, softcap, window, causal, sinks in (
        (64, None, None, True, False), (128, None, 64, True, False), (256, 50.0, 64, True, False),
        (128, None, None, False, False), (64, None, None, True, True),
    ):  # fmt: skip
        qp, kp, vp = leaf(256, 8, head_dim), leaf(256, 4, head_dim), leaf(256, 4, head_dim)
        out = flash_attention.flash_attention_varlen_triton(
            qp, kp, vp, cu_seqlens, 155, scale=head_dim**-0.5, softcap=softcap,
            sliding_window=window, causal=causal,
            sinks=leaf(8, dtype=torch.float32) if sinks else None,
        )  # fmt: skip
        out.sum().backward()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (H100)")
    args = parser.parse_args()
    from fastlm.kernels._dispatch import forced_gpu_launch_shapes

    compiler = Compiler(args.arch)
    JITFunction.run = lambda kernel, *a, **kw: compiler.run(kernel, *a, **kw)
    with forced_gpu_launch_shapes():
        _exercise_ops()
    json.dump(list(compiler.records.values()), sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
