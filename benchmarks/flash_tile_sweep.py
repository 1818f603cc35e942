#!/usr/bin/env python
"""Launch shapes of the flash-attention kernels, one kernel at a time (a tuning aid).

    python benchmarks/flash_tile_sweep.py --head-dim 256 --seq 4096 --out sweep.json

For each kernel (fwd, dq, dkdv) and each candidate (block_m, block_n, num_warps, num_stages)
the other two kernels keep fastlm's defaults; the forward launcher is timed for `fwd`, the
backward launcher for `dq` and `dkdv` (CUDA events, median of --iters after --warmup). A
candidate that does not compile (shared memory, registers) is recorded as failed; one whose
output differs from the defaults' by more than bf16 rounding is recorded as wrong. Prints a
table per kernel and writes the records as JSON; the defaults live in
fastlm/kernels/flash_attention.py (`_default_blocks`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the helpers here; this checkout's fastlm

from _common import load_kernel_module, no_cuda  # noqa: E402

from fastlm.benchmarking.timing import cuda_median_ms  # noqa: E402

CANDIDATES = {
    "fwd": [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2),
            (128, 32, 8, 2), (128, 64, 8, 1), (128, 64, 8, 2), (32, 64, 4, 2)],
    "dq": [(64, 32, 4, 2), (32, 32, 4, 2), (32, 32, 4, 3), (64, 32, 8, 2), (64, 64, 4, 2),
           (64, 64, 8, 2), (32, 64, 4, 2), (128, 32, 8, 2)],
    "dkdv": [(128, 32, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (128, 32, 8, 3), (64, 64, 8, 2),
             (128, 64, 8, 1), (32, 64, 4, 2)],
}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--softcap", type=float, default=50.0)
    p.add_argument("--window", type=int, default=0, help="sliding window (0: none)")
    p.add_argument("--kernels", default="fwd,dq,dkdv")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--out", default="flash_tile_sweep.json")
    args = p.parse_args(argv)
    if no_cuda("flash_tile_sweep.py needs a CUDA GPU."):
        return 2
    import torch

    fa = load_kernel_module("flash_attention")
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape_q = (args.batch, args.heads, args.seq, args.head_dim)
    shape_kv = (args.batch, args.kv_heads, args.seq, args.head_dim)

    def rand(shape):
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    q, k, v, do = rand(shape_q), rand(shape_kv), rand(shape_kv), rand(shape_q)
    opts = dict(scale=args.head_dim**-0.5, softcap=args.softcap or None,
                sliding_window=args.window or None)  # fmt: skip
    o, lse2 = fa.flash_attention_forward_triton(q, k, v, **opts)
    grads = fa.flash_attention_backward_triton(do, q, k, v, o, lse2, **opts)
    defaults = fa._default_blocks(args.head_dim, q)
    records = []
    for kernel in args.kernels.split(","):
        for cand in CANDIDATES[kernel]:
            blocks = {kernel: fa.Blocks(*cand)}
            rec = {
                "kernel": kernel,
                "blocks": list(cand),
                "default": tuple(defaults[kernel]) == cand,
            }
            forward = kernel == "fwd"

            def run(blocks=blocks, forward=forward):
                if forward:
                    return fa.flash_attention_forward_triton(q, k, v, blocks=blocks, **opts)[:1]
                return fa.flash_attention_backward_triton(
                    do, q, k, v, o, lse2, blocks=blocks, **opts
                )

            try:
                expected = (o,) if forward else grads
                err = max(
                    (a.float() - b.float()).abs().max().item() for a, b in zip(run(), expected)
                )
                rec["max_abs_diff_vs_default"] = err
                rec["ms"] = cuda_median_ms(run, torch, iters=args.iters, warmup=args.warmup)
                rec["status"] = "ok" if err < 0.05 else "wrong"
            except Exception as exc:  # noqa: BLE001 - a launch shape that cannot compile
                rec.update(status="failed", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            records.append(rec)
            print(json.dumps(rec), flush=True)
    print(
        f"\nB={args.batch} Hq={args.heads} Hkv={args.kv_heads} S={args.seq} D={args.head_dim} "
        f"softcap={args.softcap} window={args.window}; fwd: forward launcher, dq/dkdv: backward"
    )
    for kernel in args.kernels.split(","):
        rows = [r for r in records if r["kernel"] == kernel]
        base = next((r.get("ms") for r in rows if r["default"]), None)
        for r in sorted(rows, key=lambda r: r.get("ms", float("inf"))):
            ms = r.get("ms")
            ratio = f"{base / ms:.2f}x" if ms and base else "-"
            timing = f"{ms:.3f} ms" if ms else "-"
            mark = "  (default)" if r["default"] else ""
            shape = str(tuple(r["blocks"]))
            print(f"{kernel:5s} {shape:18s} {r['status']:7s} {timing:>10s} {ratio:>6s}{mark}")
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "args": vars(args), "records": records}  # fmt: skip
    Path(args.out).write_text(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
