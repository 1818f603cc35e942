"""Side-by-side LoRA / QLoRA training benchmark: HF + PEFT, fastlm, Liger-Kernel, Unsloth.

    fastlm bench --shapes llama-3.2-1b,llama-3.1-8b --systems hf,fastlm,liger,unsloth
    python -m fastlm.benchmarking.train_bench ...     # the same
    python benchmarks/train_bench.py ...              # the same, from a source checkout

The parent builds one random-init bf16 checkpoint per shape (seed 0, cached under --cache), then
runs each (shape, system) in its own Python process (this module with --child). Every child loads
the same checkpoint, makes it a LoRA model its own way, and runs the same loop (see `train_loop`,
and benchmarks/README.md). Results go to --out as results.json, results.md and results.png,
rewritten after every child so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from fastlm.benchmarking.checkpoint import CACHE, ensure_checkpoint
from fastlm.benchmarking.processes import (
    OFFLINE_ENV,
    child_env,
    command_line,
    log_tail,
    results_dir,
    run_recorded,
)
from fastlm.benchmarking.report import markdown_table, write_outputs
from fastlm.benchmarking.shapes import SHAPES, Shape, get_shape, shape_table
from fastlm.benchmarking.systems import (
    LOADERS,
    SYSTEMS,
    Ctx,
    SkipSystem,
    git_revision,
    preimport,
    versions,
)
from fastlm.benchmarking.timing import timed_training

MODULE = "fastlm.benchmarking.train_bench"  # what the children run: python -m MODULE --child
PROGRAM = f"python -m {MODULE}"  # how a run is recorded unless main() is told otherwise
CHILD_ENV = {**OFFLINE_ENV, "UNSLOTH_DISABLE_STATISTICS": "1"}


# --------------------------------------------------------------------------------------------
# The loop: identical for every system.
# --------------------------------------------------------------------------------------------
def train_loop(model, *, vocab: int, batch: int, seq: int, warmup: int, steps: int) -> dict:
    """Reference loop: seeded random ids (labels = ids), bf16 autocast forward, backward, AdamW.

    Peak memory counts from just before the first warm-up step; `steps` steps are timed between
    two synchronisations. Losses are read (`.item()`) only after the timed region.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    loop = timed_training(
        model, lambda: model(input_ids=ids, labels=ids).loss, warmup=warmup, steps=steps
    )
    elapsed = loop["timed_s"]
    return {
        "tokens_per_s": batch * seq * steps / elapsed if steps else None,
        "ms_per_step": 1000.0 * elapsed / steps if steps else None,
        **loop,
    }


# --------------------------------------------------------------------------------------------
# Child process: one (shape, system).
# --------------------------------------------------------------------------------------------
def measure_child(rec: dict, t_start: float, load, versions_fn, prepare=None) -> dict:
    """Fill a child's record (status ok / error / skipped); never raises.

    `prepare()` runs first (imports that must come before torch's users); `load(cuda, dtype)`
    returns (model, run) where `run()` is the measured loop's record; `versions_fn()` the
    package versions. OOM and crashes become status "error" so the run goes on.
    """
    try:
        if prepare is not None:
            prepare()
        import torch

        cuda = torch.cuda.is_available()
        rec["device"] = torch.cuda.get_device_name() if cuda else "cpu"
        rec["cuda"] = torch.version.cuda if cuda else None
        rec["dtype"] = "bfloat16" if cuda else "float32"
        model, run = load(cuda, torch.bfloat16 if cuda else torch.float32)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        rec["load_s"] = time.perf_counter() - t_start
        rec["model_class"] = type(model).__name__
        rec.update(run())
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
        rec["versions"] = versions_fn()
    except Exception as exc:
        rec["versions"] = {"error": repr(exc)}
    rec["child_s"] = time.perf_counter() - t_start
    return rec


def new_record(spec: dict, mode: str, **fields) -> dict:
    """A child's record before it measures anything: what it runs (``spec``'s shape, system,
    sizes and checkpoint, ``mode``, ``fields``), status "error" until the run says otherwise."""
    rec = {"shape": spec["shape"], "system": spec["system"], "mode": mode}
    rec |= {key: spec[key] for key in ("batch", "seq", "warmup", "steps")}
    return rec | fields | {"checkpoint": spec["path"], "status": "error"}


def child_setup(spec: dict) -> dict:
    """What a child sets before its loop: fastlm's layer CUDA graphs when the spec opts in
    (``fastlm_graphs``; recorded). Returns the spec. Usage: ``child_main(child_setup(spec))``."""
    if spec.get("system", "").startswith("fastlm") and spec.get("fastlm_graphs"):
        from fastlm.offload.layer_graphs import LAYER_GRAPHS  # lazy: fastlm's children only

        LAYER_GRAPHS.enabled = True
        LAYER_GRAPHS.measure_peak = True  # timing.peak_gib counts the pool once
    return spec


def child_entry(args: argparse.Namespace, child_main) -> int | None:
    """The start every loop's ``main`` shares: the children's environment (offline, no
    statistics) and, in a child (``--child``), its one run: returns the exit code; None in the
    parent. Usage: ``code = child_entry(args, child_main); if code is not None: return code``."""
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    if args.child is None:
        return None
    return emit_record(child_main(child_setup(json.loads(args.child))), args.record)


def child_main(spec: dict) -> dict:
    """Load, apply the system, run the loop; always returns a record (status ok/error/skipped)."""
    t_start = time.perf_counter()
    shape = get_shape(spec["shape"])
    system, mode = spec["system"], spec["mode"]
    rec = new_record(spec, mode)

    checkpointing = spec.get("fastlm_checkpointing", "fastlm")
    if system == "fastlm":
        rec["fastlm_checkpointing"] = checkpointing

    def load(cuda: bool, dtype):
        ctx = Ctx(
            shape=shape, path=spec["path"], mode=mode, seq=spec["seq"], cuda=cuda, dtype=dtype,
            checkpointing=checkpointing,
        )  # fmt: skip
        model = LOADERS[system](ctx)
        if ctx.notes:
            rec["notes"] = ctx.notes
        loop = {k: spec[k] for k in ("batch", "seq", "warmup", "steps")}
        return model, lambda: train_loop(model, vocab=shape.vocab_size, **loop)

    return measure_child(
        rec, t_start, load, lambda: versions(system, mode), prepare=lambda: preimport(system)
    )


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def run_child(
    spec: dict,
    log_path: Path,
    timeout: float,
    cuda: bool,
    script: Path | None = None,
    module: str = MODULE,
) -> dict:
    """Run one child process of ``script``, else of ``python -m module`` (default: this module;
    it must take --child and --record); turn a crash or a timeout into an error record."""
    record_path = log_path.with_suffix(".record.json")
    entry = ["-m", module] if script is None else [str(script)]
    cmd = [sys.executable, *entry, "--child", json.dumps(spec)]
    cmd += ["--record", str(record_path)]
    t0 = time.perf_counter()
    env = child_env(CHILD_ENV, triton_interpret=not cuda)
    rec, why = run_recorded(cmd, log_path, record_path, env, timeout)
    if rec is None:
        rec = {
            "shape": spec["shape"],
            "system": spec["system"],
            "mode": spec.get("mode", "lora"),
            "batch": spec["batch"],
            "seq": spec["seq"],
            "status": "error",
            "error": f"child process died ({why}) without a record",
            "log_tail": log_tail(log_path),
        }
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def host_info() -> dict:
    info = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "git": git_revision(),
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


def add_loop_args(p: argparse.ArgumentParser, *, seq_help: str, batch_help: str) -> None:
    """--cache, --warmup, --steps, --seq, --batch: the loop's flags (embedding_bench's too)."""
    p.add_argument("--cache", default=CACHE, help="checkpoint cache folder")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq", type=int, help=seq_help)
    p.add_argument("--batch", type=int, help=batch_help)


def add_parent_args(p: argparse.ArgumentParser, *, child_timeout: float, list_help: str) -> None:
    """--child-timeout, --append, --list-shapes and the hidden --child / --record."""
    p.add_argument("--child-timeout", type=float, default=child_timeout, help="seconds per child")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the records already in --out/results.json (those re-run are replaced)",
    )
    p.add_argument("--list-shapes", action="store_true", help=list_help)
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON spec: run one (shape, system)
    p.add_argument("--record", help=argparse.SUPPRESS)  # where the child writes its record


def check_args(p: argparse.ArgumentParser, args, shape_of, systems) -> argparse.Namespace:
    """Refuse unknown shapes (`shape_of` exits on them) and systems, and too few steps."""
    if args.child is None:
        for name in args.shapes.split(","):
            shape_of(name)
        unknown = set(args.systems.split(",")) - set(systems)
        if unknown:
            p.error(f"unknown systems {sorted(unknown)}; known: {', '.join(systems)}")
        if args.steps < 1 or args.warmup < 0:
            p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shapes", default="llama-3.2-1b", help=f"comma list of: {', '.join(SHAPES)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma list of: hf,fastlm,...")
    p.add_argument("--mode", choices=("lora", "qlora"), default="lora")
    p.add_argument(
        "--fastlm-checkpointing",
        default="fastlm",
        choices=("fastlm", "activations"),
        help="fastlm's use_gradient_checkpointing (default: fastlm, offloaded as Unsloth's)",
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<date>-<mode>)")
    add_loop_args(
        p,
        seq_help="override every shape's sequence length",
        batch_help="override every shape's batch size",
    )
    add_parent_args(p, child_timeout=1200.0, list_help="print the shape table and exit")
    return check_args(p, p.parse_args(argv), get_shape, SYSTEMS)


def _list_shapes() -> str:
    columns = ["shape", "model_type", "hidden", "layers", "heads / kv", "vocab", "batch", "seq"]
    return shape_table(SHAPES, columns)


def emit_record(rec: dict, record_path: str | None) -> int:
    """A child's last act: its record to --record (if given) and to stdout."""
    text = json.dumps(rec)
    if record_path:
        Path(record_path).write_text(text)
    print("BENCH_RECORD " + text, flush=True)
    return 0


def start_payload(out: Path, command: str, now: datetime.datetime, append: bool) -> dict:
    """The results payload with this run added to "runs"; with `append`, the runs, records and
    checkpoints already in out/results.json are kept."""
    payload = {"date": now.isoformat(timespec="seconds"), "host": host_info(), "runs": []}
    records: list[dict] = []
    if append and (out / "results.json").is_file():
        old = json.loads((out / "results.json").read_text())
        payload["runs"] = old.get("runs", [])
        records = old.get("records", [])
        payload["checkpoints"] = old.get("checkpoints", {})
    payload["runs"].append({"command": command, "date": payload["date"], "host": payload["host"]})
    payload.setdefault("checkpoints", {})
    payload["records"] = records
    return payload


def checkpoint_for(shape: Shape, payload: dict, cache: str, cuda: bool, ensure) -> dict:
    """`ensure(shape, cache, device)`'s checkpoint, noted in the payload and on stdout."""
    print(f"checkpoint {shape.name} ...", flush=True)
    meta = ensure(shape, cache, "cuda" if cuda else "cpu")
    payload["checkpoints"][shape.name] = meta
    how = "reused" if meta["reused"] else f"built in {meta['build_s']:.0f} s"
    print(f"checkpoint {shape.name}: {meta['path']} ({how})", flush=True)
    return meta


def add_record(records: list[dict], rec: dict, log: Path, out: Path, key: tuple[str, ...]) -> None:
    """Add a child's record, replacing an older one with the same `key` fields; print it."""
    rec["log"] = os.path.relpath(log, out)
    same = tuple(rec[k] for k in key)
    records[:] = [r for r in records if tuple(r[k] for k in key) != same]
    records.append(rec)
    print(_progress(rec), flush=True)


def print_failures(records: list[dict]) -> None:
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        print("\nNot measured:")
        for r in failed:
            msg = " ".join(str(r.get("reason") or r.get("error") or "").split())[:300]
            print(f"- {r['shape']} / {r['system']} ({r['status']}): {msg}")


def print_table(out: Path, records: list[dict]) -> None:
    written = [n for n in ("results.json", "results.md", "results.png") if (out / n).is_file()]
    print(f"\nwrote {out}/{', '.join(written)}\n")
    print(markdown_table(records), flush=True)


def main(argv: list[str] | None = None, *, program: str = PROGRAM) -> int:
    """Run the benchmark with `argv` (default: ``sys.argv[1:]``); `program` is how the results
    record the command. Exit code 0 even when a child failed: failures are results."""
    args = parse_args(argv)
    if (code := child_entry(args, child_main)) is not None:
        return code
    if args.list_shapes:
        print(_list_shapes())
        return 0

    def spec(shape: Shape, system: str, path: str, out: Path) -> dict:
        return base_spec(shape, system, path, args) | {
            "mode": args.mode,
            "fastlm_checkpointing": args.fastlm_checkpointing,
        }

    out, records = parent_loop(
        Parent(args.mode, args.mode, get_shape, ensure_checkpoint, spec, run_child, write_outputs),
        args, command_line(program, argv),
    )  # fmt: skip
    print_failures(records)
    print_table(out, records)
    return 0


class Parent(NamedTuple):
    """What differs between the benchmarks' parent loops (training, embeddings, SFTTrainer).

    ``kind`` names the results folder, ``log_prefix`` the logs; ``spec(shape, system, checkpoint
    path, out)`` is the child's spec; ``run(spec, log, timeout, cuda)`` runs it; ``write(out,
    payload)`` rewrites the outputs after every child.
    """

    kind: str
    log_prefix: str
    get_shape: Callable
    ensure: Callable
    spec: Callable
    run: Callable
    write: Callable


def base_spec(shape: Shape, system: str, path: str, args) -> dict:
    """The child spec's fields every benchmark shares: what runs, on which checkpoint, its
    batch and sequence (``--batch`` / ``--seq`` over the shape's) and its steps."""
    return {
        "shape": shape.name,
        "system": system,
        "path": path,
        "batch": args.batch or shape.batch,
        "seq": args.seq or shape.seq,
        "warmup": args.warmup,
        "steps": args.steps,
    }


def parent_loop(parent: Parent | list[Parent], args, command: str) -> tuple[Path, list[dict]]:
    """Every (shape, system) of ``args`` in its own process, each record added and the outputs
    rewritten after each; returns (output folder, records). The loop the benchmarks share.

    Several parents (one per mode, say) share the output folder and each shape's checkpoint:
    each runs every system on a shape before the next shape is built; the first names the
    folder and loads and writes the outputs."""
    parents = [parent] if isinstance(parent, Parent) else list(parent)
    first = parents[0]
    for k, v in CHILD_ENV.items():
        os.environ.setdefault(k, v)
    now = datetime.datetime.now(datetime.timezone.utc)
    out = results_dir(args.out, now, first.kind)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    payload = start_payload(out, command, now, args.append)
    records = payload["records"]

    import torch  # only now: --child / --list-shapes do not need it in the parent

    cuda = torch.cuda.is_available()
    for shape in [first.get_shape(n) for n in args.shapes.split(",")]:
        meta = checkpoint_for(shape, payload, args.cache, cuda, first.ensure)
        for each in parents:
            for system in args.systems.split(","):
                log = out / "logs" / f"{each.log_prefix}-{shape.name}-{system}.log"
                rec = each.run(each.spec(shape, system, meta["path"], out), log,
                               args.child_timeout, cuda)  # fmt: skip
                add_record(records, rec, log, out, ("shape", "system", "mode"))
                first.write(out, payload)
    return out, records


if __name__ == "__main__":
    sys.exit(main())
