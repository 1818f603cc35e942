#!/usr/bin/env python
"""Multi-GPU LoRA / QLoRA benchmark: fastlm vs HF + PEFT under DDP (or FSDP2), and on one GPU.

    python benchmarks/multi_gpu_bench.py --shape llama-3.1-8b --gpus 2 --systems hf,fastlm \
        --out benchmarks/results/<name>

For every system, the parent runs ``torchrun --standalone --nproc_per_node G`` on this script
(``--child``) twice: G=1 (no wrapper) and G=--gpus (DDP, or FSDP2 with --parallel fsdp2). Every
run loads the same random-init checkpoint (fastlm/benchmarking/checkpoint.py), makes it a LoRA
model as fastlm/benchmarking/systems.py does (r=16, alpha=16, the seven projections,
checkpointing), sets every LoRA weight from a seed of its own name (so all runs start from the
same adapter, B != 0), then:

1. exactness step: a global batch of --gpus x --exact-accum micro-batches (--batch x --seq each, the
   prompt masked with -100 over a different share of every micro-batch, so ranks hold different
   numbers of target tokens); each rank takes its share, the loss is normalised by the global
   target-token count (fastlm.distributed.global_num_items_in_batch) and multiplied by G, as HF
   Trainer does; rank 0 saves the loss and the all-reduced LoRA gradients;
2. timing: --warmup then --steps steps of forward / backward / AdamW under bf16 autocast on each
   rank's own batch (benchmarks/train_bench.py's loop), between two synchronisations and a
   barrier; tokens/s per GPU = batch * seq * steps / time.

The parent compares the gradients (relative error ||g - g_ref|| / ||g_ref||, the largest over the
LoRA tensors) of G GPUs against 1 GPU for each system, and fastlm against HF on one GPU, and
writes results.json (records, exactness, device, versions, command) and results.md (the table).
Every child gets NCCL_NVLS_ENABLE=0 (no NVLink multicast) and a GPU of its own through
CUDA_VISIBLE_DEVICES. Without CUDA it runs on the CPU (gloo, fp32; use --shape tiny-llama) as a
smoke test of the harness.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for folder in (REPO, HERE):  # this checkout's fastlm; the helpers here (_common.py)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from fastlm.benchmarking.checkpoint import CACHE  # noqa: E402
from fastlm.benchmarking.processes import (  # noqa: E402
    OFFLINE_ENV,
    child_env,
    command_line,
    results_dir,
)
from fastlm.benchmarking.shapes import SHAPES, get_shape  # noqa: E402  (stdlib only)

CHILD_ENV = {
    **OFFLINE_ENV,
    # NVLink multicast stays off on shared hosts (it can take the GPUs out of service).
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


# --------------------------------------------------------------------------------------------
# Child: one rank of one (system, world size) run.
# --------------------------------------------------------------------------------------------
def _pin_gpu() -> None:
    """Give this rank one GPU as cuda:0 (before CUDA starts), so that the loaders' device maps
    ({"": 0}, "auto") put the whole model on the rank's own GPU."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    devices = visible.split(",") if visible else None
    if devices is None:  # torch.cuda.device_count() would start CUDA before the pinning
        try:
            listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout
        except OSError:  # no NVIDIA driver: the CPU smoke test
            listing = ""
        devices = [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU")]
    if devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[local % len(devices)]


def _seed_lora(model) -> None:
    """Every LoRA tensor from a generator seeded by its name: the same adapter in every run."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            scale = param.shape[-1] ** -0.5 if "lora_A" in name else 0.02
            param.copy_(torch.randn(param.shape, generator=gen) * scale)


def _exact_batches(spec: dict, vocab: int) -> list[dict]:
    """The exactness step's global batch (the same for every world size): --gpus x --exact-accum
    micro-batches, prompt share 0, 1/8, ..., 7/8 (cycled) masked from the labels."""
    import torch

    gen = torch.Generator().manual_seed(4321)
    batches = []
    for i in range(spec["exact_micro_batches"]):
        ids = torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=gen)
        labels = ids.clone()
        labels[:, : spec["seq"] * (i % 8) // 8] = -100
        batches.append({"input_ids": ids, "labels": labels})
    return batches


def _wrap(model, spec: dict, world: int, device):
    if world == 1:
        return model, None
    if spec["parallel"] == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=ids)
        return ddp, lambda last: contextlib.nullcontext() if last else ddp.no_sync()
    from torch.distributed.device_mesh import init_device_mesh

    from fastlm.distributed import fully_shard_model

    fully_shard_model(model, mesh=init_device_mesh(device.type, (world,)))

    def sync(last):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    return model, sync


def child_main(spec: dict) -> dict | None:
    """One rank: returns rank 0's record (None on the other ranks)."""
    _pin_gpu()
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    try:
        return _measure(spec, world, cuda)
    finally:
        # The model, DDP's reducer and FSDP's state are gone before the group is (a DDP reducer
        # destroyed after its process group can hang the process at exit).
        gc.collect()
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def _measure(spec: dict, world: int, cuda: bool) -> dict | None:
    import torch
    import torch.distributed as dist

    from fastlm.benchmarking.systems import LOADERS, Ctx, versions
    from fastlm.distributed import global_num_items_in_batch

    rank = int(os.environ.get("RANK", "0"))
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    shape = get_shape(spec["shape"])
    dtype = torch.bfloat16 if cuda else torch.float32
    ctx = Ctx(
        shape=shape, path=spec["path"], mode=spec["mode"], seq=spec["seq"], cuda=cuda, dtype=dtype
    )
    t0 = time.perf_counter()
    model = LOADERS[spec["system"]](ctx)
    _seed_lora(model)
    peft_model = model
    model, sync = _wrap(model, spec, world, device)
    # After wrapping: fully_shard replaces the parameters with sharded ones.
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    load_s = time.perf_counter() - t0

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)

    # 1. Exactness: one accumulated step on the global batch, gradients all-reduced.
    batches = _exact_batches(spec, shape.vocab_size)
    share = len(batches) // world
    mine = [
        {k: v.to(device) for k, v in b.items()} for b in batches[rank * share : (rank + 1) * share]
    ]
    n_items = global_num_items_in_batch([b["labels"] for b in mine])
    loss = torch.zeros((), device=device)
    model.train()
    for i, batch in enumerate(mine):
        with sync(i == len(mine) - 1) if sync else contextlib.nullcontext():
            with autocast():
                out = model(**batch, num_items_in_batch=n_items)
            (out.loss * world).backward()
        loss += out.loss.detach().float()
    if world > 1:
        dist.all_reduce(loss)
    grads = {}
    for name, param in trainable.items():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.detach().float().cpu()
        param.grad = None
    if rank == 0:
        torch.save({"loss": loss.item(), "grads": grads}, spec["grads_path"])
    del grads, mine

    # 2. Timing: train_bench.py's loop on each rank's own batch.
    gen = torch.Generator().manual_seed(1234 + rank)
    ids = torch.randint(0, shape.vocab_size, (spec["batch"], spec["seq"]), generator=gen).to(device)
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=2e-4)

    def step():
        with autocast():
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return out.loss.detach()

    def barrier():
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(spec["warmup"]):
        step()
    barrier()
    start = time.perf_counter()
    losses = [step() for _ in range(spec["steps"])]
    barrier()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    peaks = [peak]
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
    if rank != 0:
        return None
    tokens = spec["batch"] * spec["seq"] * spec["steps"]
    return {
        **{k: spec[k] for k in ("system", "shape", "mode", "parallel", "batch", "seq", "steps")},
        "gpus": world,
        "status": "ok",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens_per_s_per_gpu": tokens / elapsed,
        "tokens_per_s_total": tokens * world / elapsed,
        "ms_per_step": 1000 * elapsed / spec["steps"],
        "peak_gib_per_gpu": peaks,
        "exact_loss": loss.item(),
        "last_loss": float(losses[-1]),
        "load_s": load_s,
        "versions": versions(spec["system"], spec["mode"]),
    }


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def _relative_error(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(path_a: Path, path_b: Path) -> dict:
    """Loss difference and the largest per-tensor relative gradient error of a against b."""
    import torch

    a, b = torch.load(path_a), torch.load(path_b)
    errors = {n: _relative_error(a["grads"][n], g) for n, g in b["grads"].items()}
    worst = max(errors, key=errors.get)
    return {
        "loss_abs_diff": abs(a["loss"] - b["loss"]),
        "loss": a["loss"],
        "loss_ref": b["loss"],
        "grad_rel_err_max": errors[worst],
        "grad_rel_err_max_tensor": worst,
        "grad_rel_err_median": sorted(errors.values())[len(errors) // 2],
        "tensors": len(errors),
    }


FLOOR_FACTOR = 1.5  # how far past HF + PEFT's own N-vs-1 difference fastlm's may go


def judge_exactness(exactness: dict, rtol: float, gpus: int) -> None:
    """Set each comparison's "pass": its largest gradient error is within `rtol`, or (fastlm's
    N-vs-1 only) within FLOOR_FACTOR x HF + PEFT's own N-vs-1 error in the same run -- in bf16
    an 8B model's gradients move by ~1e-2 with the summation order alone, HF's included."""
    hf = exactness.get(f"hf-{gpus}gpu-vs-1gpu")
    for key, ex in exactness.items():
        ex["pass"] = ex["grad_rel_err_max"] <= rtol
        if hf is not None and key == f"fastlm-{gpus}gpu-vs-1gpu":
            ex["hf_floor"] = hf["grad_rel_err_max"]
            ex["pass"] = ex["pass"] or ex["grad_rel_err_max"] <= FLOOR_FACTOR * ex["hf_floor"]


def run_child(spec: dict, gpus: int, out: Path) -> dict:
    tag = f"{spec['system']}-{gpus}gpu"
    log, record = out / "logs" / f"{tag}.log", out / "logs" / f"{tag}.record.json"
    record.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={gpus}", str(Path(__file__).resolve())]
    cmd += ["--child", json.dumps(spec), "--record", str(record)]
    env = child_env(CHILD_ENV)
    t0 = time.perf_counter()
    with open(log, "w") as stream:
        try:
            status = subprocess.run(
                cmd,
                stdout=stream,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                timeout=spec["timeout"],
            ).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    if record.is_file():
        rec = json.loads(record.read_text())
    else:
        tail = log.read_text(errors="replace")[-3000:]
        rec = {
            "system": spec["system"],
            "gpus": gpus,
            "status": "error",
            "error": f"torchrun ended ({status}) without a record",
            "log_tail": tail,
        }
    rec["wall_s"] = time.perf_counter() - t0
    rec["log"] = str(log.relative_to(out))
    return rec


def markdown(payload: dict) -> str:
    recs = [r for r in payload["records"] if r.get("status") == "ok"]
    single = {r["system"]: r for r in recs if r["gpus"] == 1}
    lines = [
        f"# Multi-GPU LoRA benchmark ({payload['date']})",
        "",
        f"Command: `{payload['command']}`",
        "",
        f"Device: {recs[0]['device'] if recs else 'n/a'}; versions: "
        + (", ".join(f"{k} {v}" for k, v in recs[0]["versions"].items()) if recs else "n/a"),
        "",
        "| system | GPUs | parallel | tok/s per GPU | tok/s total | scaling | ×HF per GPU "
        "| ms/step | peak GiB per GPU | exact: loss Δ | exact: max grad rel err |",
        "|" + " --- |" * 11,
    ]
    by_key = {(r["system"], r["gpus"]): r for r in recs}
    for r in recs:
        base = single.get(r["system"])
        hf = by_key.get(("hf", r["gpus"]))
        ex = payload["exactness"].get(f"{r['system']}-{r['gpus']}gpu-vs-1gpu", {})
        scaling = r["tokens_per_s_total"] / base["tokens_per_s_total"] if base else None
        vs_hf = r["tokens_per_s_per_gpu"] / hf["tokens_per_s_per_gpu"] if hf else None
        peaks = "/".join(f"{p:.1f}" for p in r["peak_gib_per_gpu"] if p is not None) or "n/a"
        lines.append(
            f"| {r['system']} | {r['gpus']} | {r['parallel'] if r['gpus'] > 1 else '-'} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s_total']:,.0f} | "
            f"{'' if scaling is None else f'{scaling:.2f}x'} | "
            f"{'' if vs_hf is None else f'{vs_hf:.2f}x'} | {r['ms_per_step']:.0f} | {peaks} | "
            f"{ex.get('loss_abs_diff', float('nan')):.2e} | "
            f"{ex.get('grad_rel_err_max', float('nan')):.2e} |"
        )
    lines += ["", "Exactness (relative error of the LoRA gradients, loss difference):", ""]
    for key, ex in payload["exactness"].items():
        verdict = "PASS" if ex.get("pass") else "FAIL"
        lines.append(
            f"- {key}: {verdict} max grad rel err {ex['grad_rel_err_max']:.2e} "
            f"({ex['grad_rel_err_max_tensor']}), median {ex['grad_rel_err_median']:.2e}, "
            f"|Δloss| {ex['loss_abs_diff']:.2e}"
            + (f"; HF + PEFT's own: {ex['hf_floor']:.2e}" if "hf_floor" in ex else "")
        )
    for r in payload["records"]:
        if r.get("status") != "ok":
            lines.append(f"- not measured: {r['system']} on {r['gpus']} GPU(s): {r.get('error')}")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", help=f"one of: {', '.join(SHAPES)}")
    p.add_argument("--systems", default="hf,fastlm", help="comma list of: hf, fastlm")
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the multi-GPU run (one host)")
    p.add_argument("--parallel", choices=("ddp", "fsdp2"), default="ddp")
    p.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    p.add_argument("--batch", type=int, help="per-GPU batch (default: the shape's)")
    p.add_argument("--seq", type=int, help="sequence length (default: the shape's)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--exact-accum", type=int, default=2, help="micro-batches per GPU, exactness")
    p.add_argument(
        "--exact-rtol",
        type=float,
        default=1e-3,
        help="pass if every LoRA gradient's relative error vs 1 GPU is below this (fastlm also "
        "passes within 1.5x HF + PEFT's own N-vs-1 error in the same run: the bf16 floor)",
    )
    p.add_argument("--cache", default=CACHE, help="checkpoint cache folder")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-multi-gpu)")
    p.add_argument("--child-timeout", type=float, default=1500.0, help="seconds per torchrun")
    p.add_argument("--dry-run", action="store_true", help="print the torchrun commands only")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--record", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is None:
        get_shape(args.shape)
        unknown = set(args.systems.split(",")) - {"hf", "fastlm"}
        if unknown:
            p.error(f"unknown systems {sorted(unknown)}: use hf, fastlm")
        if args.gpus < 2:
            p.error("--gpus must be >= 2 (the single-GPU run is always made)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        rec = child_main(json.loads(args.child))
        if rec is not None and args.record:
            Path(args.record).write_text(json.dumps(rec))
        return 0
    for key, value in CHILD_ENV.items():
        os.environ[key] = value
    shape = get_shape(args.shape)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = results_dir(args.out, now, "multi-gpu")
    command = command_line("python benchmarks/multi_gpu_bench.py", argv)
    base = {
        "shape": shape.name,
        "mode": args.mode,
        "parallel": args.parallel,
        "batch": args.batch or shape.batch,
        "seq": args.seq or shape.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "exact_micro_batches": args.gpus * args.exact_accum,
        "timeout": args.child_timeout,
    }
    runs = [(s, g) for s in args.systems.split(",") for g in (1, args.gpus)]
    if args.dry_run:
        for system, gpus in runs:
            print(
                f"torchrun --standalone --nproc_per_node={gpus} benchmarks/multi_gpu_bench.py "
                f"--child '{json.dumps({**base, 'system': system})}'"
            )
        return 0
    import torch

    from fastlm.benchmarking.checkpoint import ensure_checkpoint
    from fastlm.benchmarking.systems import git_revision

    (out / "logs").mkdir(parents=True, exist_ok=True)
    meta = ensure_checkpoint(shape, args.cache, "cuda" if torch.cuda.is_available() else "cpu")
    payload = {
        "date": now.isoformat(timespec="seconds"),
        "command": command,
        "git": git_revision(REPO),
        "checkpoint": meta,
        "records": [],
        "exactness": {},
    }
    for system, gpus in runs:
        grads = out / "logs" / f"{system}-{gpus}gpu.grads.pt"
        spec = {**base, "system": system, "path": meta["path"], "grads_path": str(grads)}
        rec = run_child(spec, gpus, out)
        payload["records"].append(rec)
        ok = rec.get("status") == "ok"
        print(
            f"{system} x{gpus}: "
            + (
                f"{rec['tokens_per_s_per_gpu']:,.0f} tok/s per GPU"
                if ok
                else f"{rec.get('status')}: {rec.get('error')}"
            ),
            flush=True,
        )
    done = {(r["system"], r["gpus"]) for r in payload["records"] if r.get("status") == "ok"}
    pairs = [
        (f"{s}-{args.gpus}gpu-vs-1gpu", (s, args.gpus), (s, 1)) for s in args.systems.split(",")
    ]
    pairs.append(("fastlm-1gpu-vs-hf-1gpu", ("fastlm", 1), ("hf", 1)))
    for key, a, b in pairs:
        if a in done and b in done:
            ex = compare(
                out / "logs" / f"{a[0]}-{a[1]}gpu.grads.pt",
                out / "logs" / f"{b[0]}-{b[1]}gpu.grads.pt",
            )
            payload["exactness"][key] = ex
    judge_exactness(payload["exactness"], args.exact_rtol, args.gpus)
    for grads in (out / "logs").glob("*.grads.pt"):
        grads.unlink()  # up to ~170 MB each for an 8B model; the errors are in results.json
    (out / "results.json").write_text(json.dumps(payload, indent=2))
    report = markdown(payload)
    (out / "results.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
