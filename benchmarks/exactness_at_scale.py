#!/usr/bin/env python
"""Exactness at full model size: fastlm bf16 and HF bf16, each against an HF fp32 reference.

    python benchmarks/exactness_at_scale.py --shape llama-3.1-8b --seq 1024 --out exact.json

Two bf16 implementations of one model never agree bit for bit, and their difference alone
cannot say which one is off. So this script loads the shape's random-init checkpoint three
times, one after the other, with the same LoRA adapter (every tensor seeded by its name, B
non-zero so that every LoRA gradient is non-trivial) and one batch of random tokens:

- ``hf-fp32``: transformers + PEFT in fp32, no autocast: the reference;
- ``hf-bf16``: transformers + PEFT, bf16 weights and autocast (the usual HF training set-up);
- ``fastlm-bf16``: fastlm's FastModel + get_peft_model, bf16 (its kernels).

For each bf16 system it reports the loss difference and the per-tensor relative error
||g - g_ref|| / ||g_ref|| of every LoRA gradient against fp32 (max and median), and the ratio
of fastlm's error to HF's: fastlm is as exact as HF where that ratio is about 1 or below.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # the helpers here; this checkout's fastlm

from _common import no_cuda  # noqa: E402
from multi_gpu_bench import _seed_lora  # noqa: E402

from fastlm.benchmarking.checkpoint import CACHE, ensure_checkpoint  # noqa: E402
from fastlm.benchmarking.shapes import get_shape  # noqa: E402

SYSTEMS = {"hf-fp32": ("hf", "fp32"), "hf-bf16": ("hf", "bf16"), "fastlm-bf16": ("fastlm", "bf16")}


def _run(torch, system: str, precision: str, shape, path: str, ids) -> dict:
    cuda = ids.is_cuda
    from fastlm.benchmarking.systems import LOADERS, Ctx, preimport

    preimport(system)
    half = precision == "bf16" and cuda  # the CPU smoke test runs everything in fp32
    dtype = torch.bfloat16 if half else torch.float32
    ctx = Ctx(shape=shape, path=path, mode="lora", seq=ids.shape[1], cuda=cuda, dtype=dtype)
    t0 = time.perf_counter()
    model = LOADERS[system](ctx)
    _seed_lora(model)
    model.train()
    device_type = "cuda" if cuda else "cpu"
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=half):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {
        n.replace(".default", ""): p.grad.detach().float().cpu()
        for n, p in model.named_parameters()
        if p.requires_grad
    }
    out = {"loss": loss.item(), "grads": grads, "seconds": time.perf_counter() - t0}
    del model, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def _errors(run: dict, ref: dict) -> dict:
    errs = {
        n: float((g - ref["grads"][n]).norm() / ref["grads"][n].norm().clamp_min(1e-30))
        for n, g in run["grads"].items()
    }
    worst = max(errs, key=errs.get)
    return {
        "loss": run["loss"],
        "loss_abs_diff_vs_fp32": abs(run["loss"] - ref["loss"]),
        "grad_rel_err_max": errs[worst],
        "grad_rel_err_max_tensor": worst,
        "grad_rel_err_median": statistics.median(errs.values()),
        "tensors": len(errs),
        "per_tensor": errs,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--out", default="exactness_at_scale.json")
    p.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # smoke test, tiny shape
    args = p.parse_args(argv)
    if not args.cpu and no_cuda(
        "exactness_at_scale.py compares bf16 GPU runs; it needs a CUDA GPU."
    ):
        return 2
    import torch

    shape = get_shape(args.shape)
    device = "cpu" if args.cpu else "cuda"
    path = ensure_checkpoint(shape, args.cache, device)["path"]
    gen = torch.Generator().manual_seed(4321)
    ids = torch.randint(0, shape.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    runs = {}
    for name, (system, precision) in SYSTEMS.items():
        runs[name] = _run(torch, system, precision, shape, path, ids)
        print(f"{name}: loss {runs[name]['loss']:.6f} ({runs[name]['seconds']:.0f} s)", flush=True)
    ref = runs["hf-fp32"]
    report = {name: _errors(runs[name], ref) for name in ("hf-bf16", "fastlm-bf16")}
    hf, fast = report["hf-bf16"], report["fastlm-bf16"]
    ratios = {n: e / max(hf["per_tensor"][n], 1e-30) for n, e in fast["per_tensor"].items()}
    summary = {
        "fastlm_over_hf_error_median": statistics.median(ratios.values()),
        "fastlm_over_hf_error_max": max(ratios.values()),
        "fastlm_worse_than_hf_by_2x": sum(r > 2 for r in ratios.values()),
    }
    print(f"\n{shape.name}, batch {args.batch} x seq {args.seq}; hf-fp32 loss {ref['loss']:.6f}")
    print("system       |Δloss| vs fp32   grad rel err max (tensor)                 median")
    for name, r in report.items():
        print(
            f"{name:12s} {r['loss_abs_diff_vs_fp32']:.2e}          {r['grad_rel_err_max']:.2e} "
            f"({r['grad_rel_err_max_tensor'][-48:]})  {r['grad_rel_err_median']:.2e}"
        )
    print(
        f"fastlm error / HF error, per tensor: "
        f"median {summary['fastlm_over_hf_error_median']:.2f}, "
        f"max {summary['fastlm_over_hf_error_max']:.2f}; "
        f"{summary['fastlm_worse_than_hf_by_2x']} of {len(ratios)} tensors above 2"
    )
    payload = {
        "command": "python benchmarks/exactness_at_scale.py " + " ".join(argv or sys.argv[1:]),
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "shape": shape.name,
        "batch": args.batch,
        "seq": args.seq,
        "losses": {n: r["loss"] for n, r in runs.items()},
        "report": report,
        "summary": summary,
    }
    Path(args.out).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
