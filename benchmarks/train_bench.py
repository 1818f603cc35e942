#!/usr/bin/env python
"""Side-by-side LoRA / QLoRA training benchmark: HF + PEFT, fastlm, Liger-Kernel, Unsloth.

    python benchmarks/train_bench.py --shapes llama-3.2-1b,llama-3.1-8b \
        --systems hf,fastlm,liger,unsloth --out benchmarks/results/<name>

The parent builds one random-init bf16 checkpoint per shape (seed 0, cached under --cache), then
runs each (shape, system) in its own Python process (this script with --child). Every child loads
the same checkpoint, makes it a LoRA model its own way, and runs the same loop (see `train_loop`,
and ../shared/BENCHMARKS.md). Results go to --out as results.json, results.md and results.png,
rewritten after every child so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _shapes import SHAPES, Shape, get_shape  # noqa: E402
from _systems import LOADERS, SYSTEMS, Ctx, SkipSystem, git_revision, preimport, versions  # noqa: E402

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "UNSLOTH_DISABLE_STATISTICS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# --------------------------------------------------------------------------------------------
# The loop: identical for every system.
# --------------------------------------------------------------------------------------------
def train_loop(model, *, vocab: int, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """Reference loop: seeded random ids (labels = ids), bf16 autocast forward, backward, AdamW.

    Peak memory counts from just before the first warm-up step; `steps` steps are timed between
    two synchronisations. Losses are read (`.item()`) only after the timed region.
    """
    import torch

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()

    def autocast():
        # CPU (smoke tests only) runs fp32 without autocast.
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()

    def step():
        with autocast():
            out = model(input_ids=ids, labels=ids)
        loss = out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(warmup):
        losses.append(step())
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(step())
    sync()
    elapsed = time.perf_counter() - t0
    values = [float(x.item()) for x in losses]
    rec = {
        "tokens_per_s": batch * seq * steps / elapsed if steps else None,
        "ms_per_step": 1000.0 * elapsed / steps if steps else None,
        "timed_s": elapsed,
        "warmup_s": warmup_s,
        "step0_loss": values[0] if values else None,
        "last_loss": values[-1] if values else None,
        "losses": values,
        "trainable_params": sum(p.numel() for p in trainable),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
    }
    return rec


# --------------------------------------------------------------------------------------------
# Child process: one (shape, system).
# --------------------------------------------------------------------------------------------
def child_main(spec: dict) -> dict:
    """Load, apply the system, run the loop; always returns a record (status ok/error/skipped)."""
    t_start = time.perf_counter()
    shape = get_shape(spec["shape"])
    system, mode = spec["system"], spec["mode"]
    rec = {
        "shape": shape.name,
        "system": system,
        "mode": mode,
        "batch": spec["batch"],
        "seq": spec["seq"],
        "warmup": spec["warmup"],
        "steps": spec["steps"],
        "checkpoint": spec["path"],
        "status": "error",
    }
    try:
        preimport(system)  # Unsloth before transformers
        import torch

        cuda = torch.cuda.is_available()
        rec["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        rec["cuda"] = torch.version.cuda if cuda else None
        rec["dtype"] = "bfloat16" if cuda else "float32"
        ctx = Ctx(
            shape=shape,
            path=spec["path"],
            mode=mode,
            seq=spec["seq"],
            cuda=cuda,
            dtype=torch.bfloat16 if cuda else torch.float32,
        )
        model = LOADERS[system](ctx)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        rec["load_s"] = time.perf_counter() - t_start
        rec["model_class"] = type(model).__name__
        rec.update(
            train_loop(
                model,
                vocab=shape.vocab_size,
                batch=spec["batch"],
                seq=spec["seq"],
                warmup=spec["warmup"],
                steps=spec["steps"],
            )
        )
        rec["status"] = "ok"
    except SkipSystem as exc:
        rec["status"] = "skipped"
        rec["reason"] = str(exc)
    except BaseException as exc:  # OOM included: the run goes on with the next child
        rec["status"] = "error"
        rec["error"] = f"{type(exc).__name__}: {exc}"[:4000]
        rec["traceback"] = traceback.format_exc()[-6000:]
        try:
            import torch

            if torch.cuda.is_available():
                rec["peak_gib_at_error"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception:
            pass
    try:
        rec["versions"] = versions(system, mode)
    except Exception as exc:
        rec["versions"] = {"error": repr(exc)}
    rec["child_s"] = time.perf_counter() - t_start
    return rec


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def _child_env(cuda: bool) -> dict:
    env = dict(os.environ)
    env.update(CHILD_ENV)
    # The repository root first, so `import fastlm` finds the working tree without installing it.
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")  # Triton code launched on CPU needs it
    return env


def run_child(
    spec: dict, log_path: Path, timeout: float, cuda: bool, script: Path | None = None
) -> dict:
    """Run one child process of ``script`` (default: this one; it must take --child and
    --record); turn a crash or a timeout into an error record."""
    record_path = log_path.with_suffix(".record.json")
    record_path.unlink(missing_ok=True)
    script = Path(__file__).resolve() if script is None else script
    cmd = [sys.executable, str(script), "--child", json.dumps(spec)]
    cmd += ["--record", str(record_path)]
    t0 = time.perf_counter()
    status = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(cuda),
            cwd=str(REPO),
            start_new_session=True,  # its own process group: a timeout ends its helpers too
        )
        try:
            status = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if record_path.is_file():
        rec = json.loads(record_path.read_text())
        record_path.unlink()
    else:
        tail = log_path.read_text(errors="replace")[-3000:]
        why = f"timed out after {timeout:.0f} s" if status is None else f"exit code {status}"
        rec = {
            "shape": spec["shape"],
            "system": spec["system"],
            "mode": spec.get("mode", "lora"),
            "batch": spec["batch"],
            "seq": spec["seq"],
            "status": "error",
            "error": f"child process died ({why}) without a record",
            "log_tail": tail,
        }
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def host_info() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "git": git_revision(REPO),
        "executable": sys.executable,
    }
    for var in ("PYTHONPATH", "CUDA_VISIBLE_DEVICES", "PYTORCH_CUDA_ALLOC_CONF"):
        if os.environ.get(var):
            info[var] = os.environ[var]
    return info


def _progress(rec: dict) -> str:
    head = f"[{rec.get('mode')}] {rec.get('shape')} / {rec.get('system')}:"
    if rec.get("status") != "ok":
        msg = rec.get("reason") or rec.get("error") or ""
        return f"{head} {rec.get('status')} — {' '.join(str(msg).split())[:300]}"
    peak = rec.get("peak_gib")
    return (
        f"{head} {rec['tokens_per_s']:,.0f} tok/s, {rec['ms_per_step']:.1f} ms/step, "
        f"peak {'n/a' if peak is None else f'{peak:.2f} GiB'}, step-0 loss "
        f"{rec['step0_loss']:.4f} ({rec.get('wall_s', 0):.0f} s)"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b", help=f"comma list of: {', '.join(SHAPES)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of: hf,fastlm,...")
    p.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-<mode>)")
    p.add_argument("--cache", default="/tmp/fastlm-bench", help="checkpoint cache folder")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, help="override every shape's sequence length")
    p.add_argument("--batch", type=int, help="override every shape's batch size")
    p.add_argument("--child-timeout", type=float, default=1200.0, help="seconds per child")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the records already in --out/results.json (those re-run are replaced)",
    )
    p.add_argument("--list-shapes", action="store_true", help="print the shape table and exit")
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec: run one (shape, system)
    p.add_argument("--record", help=argparse.SUPPRESS)  # where the child writes its record
    args = p.parse_args(argv)
    if args.child is None:
        for name in args.shapes.split(","):
            get_shape(name)
        unknown = set(args.systems.split(",")) - set(SYSTEMS)
        if unknown:
            p.error(f"unknown systems {sorted(unknown)}; known: {', '.join(SYSTEMS)}")
        if args.steps < 1 or args.warmup < 0:
            p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def _list_shapes() -> str:
    rows = ["| shape | model_type | hidden | layers | heads / kv | vocab | batch | seq |"]
    rows.append("|" + " --- |" * 8)
    for s in SHAPES.values():
        c = s.config
        rows.append(
            f"| {s.name} | {s.model_type} | {c['hidden_size']} | {c['num_hidden_layers']} | "
            f"{c['num_attention_heads']} / {c['num_key_value_heads']} | {c['vocab_size']} | "
            f"{s.batch} | {s.seq} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        for k, v in CHILD_ENV.items():
            os.environ.setdefault(k, v)
        rec = child_main(json.loads(args.child))
        text = json.dumps(rec)
        if args.record:
            Path(args.record).write_text(text)
        print("BENCH_RECORD " + text, flush=True)
        return 0
    if args.list_shapes:
        print(_list_shapes())
        return 0

    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    shapes: list[Shape] = [get_shape(n) for n in args.shapes.split(",")]
    systems = args.systems.split(",")
    now = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out or REPO / "benchmarks" / "results" / f"{now:%Y%m%d-%H%M%S}-{args.mode}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "benchmarks/train_bench.py", *argv_used])

    payload = {"date": now.isoformat(timespec="seconds"), "host": host_info(), "runs": []}
    records: list[dict] = []
    if args.append and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        payload["runs"] = old.get("runs", [])
        records = old.get("records", [])
        payload["checkpoints"] = old.get("checkpoints", {})
    payload["runs"].append({"command": command, "date": payload["date"], "host": payload["host"]})
    payload.setdefault("checkpoints", {})
    payload["records"] = records

    import torch  # only now: --child / --list-shapes do not need it in the parent

    cuda = torch.cuda.is_available()
    from _checkpoint import ensure_checkpoint
    from _report import markdown_table, write_outputs

    for shape in shapes:
        print(f"checkpoint {shape.name} ...", flush=True)
        meta = ensure_checkpoint(shape, args.cache, "cuda" if cuda else "cpu")
        payload["checkpoints"][shape.name] = meta
        how = "reused" if meta["reused"] else f"built in {meta['build_s']:.0f} s"
        print(f"checkpoint {shape.name}: {meta['path']} ({how})", flush=True)
        for system in systems:
            spec = {
                "shape": shape.name,
                "system": system,
                "mode": args.mode,
                "path": meta["path"],
                "batch": args.batch or shape.batch,
                "seq": args.seq or shape.seq,
                "warmup": args.warmup,
                "steps": args.steps,
            }
            log = out / "logs" / f"{args.mode}-{shape.name}-{system}.log"
            rec = run_child(spec, log, args.child_timeout, cuda)
            rec["log"] = os.path.relpath(log, out)
            key = (rec["shape"], rec["system"], rec["mode"])
            records[:] = [r for r in records if (r["shape"], r["system"], r["mode"]) != key]
            records.append(rec)
            print(_progress(rec), flush=True)
            write_outputs(out, payload)

    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        print("\nNot measured:")
        for r in failed:
            msg = " ".join(str(r.get("reason") or r.get("error") or "").split())[:300]
            print(f"- {r['shape']} / {r['system']} ({r['status']}): {msg}")
    print(f"\nwrote {out}/results.json, results.md, results.png\n")
    print(markdown_table(records), flush=True)
    return 0


if __name__ == "__main__":
    # Exit code 0 even when a child failed: failures are results, recorded in the output.
    sys.exit(main())
