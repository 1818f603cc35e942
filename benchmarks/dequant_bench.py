"""NF4 dequantisation speed: fastlm's Triton kernel against bitsandbytes' ``dequantize_4bit``.

    python benchmarks/dequant_bench.py [--iters 50] [--warmup 10] [--block-bytes 512,1024,2048]
                                       [--out benchmarks/results/<date>-dequant.json]

For each Llama-3.1-8B projection shape, a random bf16 weight is quantised by bitsandbytes on the GPU
(NF4, blocksize 64, double-quantised absmax), then both dequantisers are called as a user would (a
fresh bf16 output each call). A sample is ``--repeat`` back-to-back calls between two CUDA events,
divided by ``--repeat``; the reported time is the median of ``--iters`` samples after ``--warmup``
calls. The outputs must be bit-identical (exit status 1 otherwise). GB/s counts the packed bytes,
the absmax bytes and the bf16 output once each.

Needs only torch, triton and bitsandbytes: fastlm's kernel module is imported without running
``fastlm/__init__.py`` (which pulls in transformers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this checkout's fastlm; the helpers here (_common.py)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from _common import add_json_out, load_kernel_module, no_cuda, print_table, write_record  # noqa: E402

from fastlm.benchmarking.timing import cuda_median_ms  # noqa: E402

# Llama-3.1-8B linear weights (out_features, in_features): q/o, k/v, gate/up, down.
SHAPES = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=50, help="timed samples per case (median)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--repeat", type=int, default=10, help="calls per timed sample")
    p.add_argument("--blocksize", type=int, default=64, help="NF4 quantisation block size")
    p.add_argument(
        "--block-bytes",
        default="",
        help="comma list of the Triton launcher's block_bytes to try (default: its default)",
    )
    add_json_out(p, "dequant")
    return p.parse_args(argv)


def _line(r: dict) -> str:
    shape = "x".join(map(str, r["shape"]))
    return (
        f"{shape:>12} {r['block_bytes']:>11} {r['fastlm_ms']:>10.4f} {r['bnb_ms']:>8.4f} "
        f"{r['speedup_vs_bnb']:>7.2f}x {r['fastlm_GBps']:>11.0f} {r['bnb_GBps']:>9.0f} "
        f"{'yes' if r['bit_exact'] else 'NO':>6}"
    )


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if no_cuda("dequant_bench.py needs a CUDA GPU (torch.cuda.is_available() is False)."):
        return 2
    import torch

    try:
        import bitsandbytes.functional as F
    except ImportError as e:
        print(f"dequant_bench.py needs bitsandbytes: {e}")
        return 2

    kernel = load_kernel_module("nf4_dequant")
    variants = [int(b) for b in args.block_bytes.split(",") if b.strip()] or [None]
    dev = torch.device("cuda")
    rows, ok = [], True
    for shape in SHAPES:
        gen = torch.Generator(device=dev).manual_seed(0)
        w = torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02
        q, qs = F.quantize_4bit(
            w, blocksize=args.blocksize, compress_statistics=True, quant_type="nf4"
        )
        del w
        ref = F.dequantize_4bit(q, qs, quant_type="nf4")
        bnb_ms = cuda_median_ms(
            lambda q=q, qs=qs: F.dequantize_4bit(q, qs, quant_type="nf4"),
            torch, args.iters, args.warmup, args.repeat,
        )  # fmt: skip
        n = ref.numel()
        moved = q.numel() * q.element_size() + qs.absmax.numel() + n * ref.element_size()
        for bb in variants:
            kw = {} if bb is None else {"block_bytes": bb}
            got = kernel.dequantize_nf4_triton(q, qs, torch.bfloat16, **kw)
            equal = torch.equal(got, ref)
            mismatches = int((got != ref).sum()) if not equal else 0
            ok &= equal
            ms = cuda_median_ms(
                lambda q=q, qs=qs, kw=kw: kernel.dequantize_nf4_triton(q, qs, torch.bfloat16, **kw),
                torch, args.iters, args.warmup, args.repeat,
            )  # fmt: skip
            rows.append(
                {
                    "shape": list(shape),
                    "elements": n,
                    "block_bytes": bb if bb is not None else kernel._BLOCK_BYTES,
                    "fastlm_ms": ms,
                    "bnb_ms": bnb_ms,
                    "speedup_vs_bnb": bnb_ms / ms,
                    "fastlm_GBps": moved / ms / 1e6,
                    "bnb_GBps": moved / bnb_ms / 1e6,
                    "bit_exact": equal,
                    "mismatches": mismatches,
                }
            )
        del q, qs, ref
        torch.cuda.empty_cache()

    header = (
        f"{'shape':>12} {'block_bytes':>11} {'fastlm ms':>10} {'bnb ms':>8} {'speedup':>8} "
        f"{'fastlm GB/s':>11} {'bnb GB/s':>9} {'exact':>6}"
    )
    print_table(header, map(_line, rows))
    write_record(
        args.out,
        "nf4_dequant",
        torch.cuda.get_device_name(dev),
        ("bitsandbytes",),
        dtype="bfloat16",
        quant={"type": "nf4", "blocksize": args.blocksize, "double_quant": True},
        timing={"iters": args.iters, "warmup": args.warmup, "repeat": args.repeat},
        results=rows,
    )
    if not ok:
        print("fastlm's output differs from bitsandbytes' for at least one shape (see 'exact').")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
