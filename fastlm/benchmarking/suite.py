"""Every row of issue 15's table in one command: LoRA / QLoRA training, embeddings, SFTTrainer.

    fastlm bench --suite issue15                      # all rows, on the GPU machine
    fastlm bench --suite issue15 --rows 1-3           # a part; later parts append to --out
    python -m fastlm.benchmarking.suite --rows 7,8 --out benchmarks/results/<date>-issue15
    python benchmarks/suite.py --dry-run              # every row on tiny shapes (CPU smoke test)

A row is a loop (train_bench's reference loop, embedding_bench's InfoNCE loop, or sft_bench's
SFTTrainer), a shape, a mode and the systems compared; each (row, system) runs in its own
process exactly as that benchmark runs it (see benchmarks/README.md). The outputs go to one
folder: results.json (every record, tagged with its row), results.md (the issue's table: tok/s
or pairs/s · peak GiB per system, and fastlm ÷ Unsloth speed and memory) and results.png
(speed and peak memory of each system relative to Unsloth's, per row).

Parts: one command on the GPU machine may run for 10 minutes, so run the rows in parts into the
same --out; records already there are kept (a re-run (row, system) replaces its record), and
--resume skips the (row, system) pairs already measured. The outputs are rewritten after every
child, so a part that is cut off keeps what it measured.

A system whose package is not installed is recorded as skipped without starting a process;
QLoRA rows need CUDA (bitsandbytes NF4) and are skipped on a machine without it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from fastlm.benchmarking import embedding_bench, sft_bench, train_bench
from fastlm.benchmarking.checkpoint import ensure_checkpoint
from fastlm.benchmarking.processes import command_line, results_dir
from fastlm.benchmarking.report import _versions_lines
from fastlm.benchmarking.shapes import get_shape

MODULE = "fastlm.benchmarking.suite"
PROGRAM = f"python -m {MODULE}"
DASH = "—"


@dataclass(frozen=True)
class Row:
    """One line of the table: `loop` ("train", "embed" or "sft") on `shape` in `mode`."""

    id: int
    label: str
    loop: str
    shape: str
    mode: str  # train: lora / qlora; embed: lora / full; sft: lora
    systems: tuple[str, ...]
    tiny_shape: str  # the shape of --dry-run

    @property
    def unit(self) -> str:
        return "pairs/s" if self.loop == "embed" else "tok/s"


_TRAIN = ("hf", "liger", "unsloth", "fastlm")
_EMBED = ("hf", "unsloth", "fastlm")
_NEW = ("hf", "unsloth", "fastlm")


def _train(i: int, label: str, shape: str, mode: str) -> Row:
    return Row(i, label, "train", shape, mode, _TRAIN, "tiny-llama")


# Issue 15's table, with the LoRA rows of the 1B and 4B shapes added (seq 2048 throughout).
SUITES: dict[str, list[Row]] = {
    "issue15": [
        _train(1, "Llama-3.1-8B LoRA, B2 S2048", "llama-3.1-8b", "lora"),
        _train(2, "Llama-3.1-8B QLoRA, B2", "llama-3.1-8b", "qlora"),
        _train(3, "Qwen3-4B QLoRA, B2", "qwen3-4b", "qlora"),
        _train(4, "Qwen3-4B LoRA, B2", "qwen3-4b", "lora"),
        _train(5, "Llama-3.2-1B QLoRA, B4", "llama-3.2-1b", "qlora"),
        _train(6, "Llama-3.2-1B LoRA, B4", "llama-3.2-1b", "lora"),
        Row(7, "Qwen3-Embedding-0.6B LoRA, 64 pairs of 64/256 tok, InfoNCE", "embed",
            "qwen3-embedding-0.6b", "lora", _EMBED, "tiny-qwen3-embedding"),
        Row(8, "Qwen3-Embedding-0.6B full fine-tune, 64 pairs of 64/256 tok", "embed",
            "qwen3-embedding-0.6b", "full", _EMBED, "tiny-qwen3-embedding"),
        Row(9, "TRL SFTTrainer, Llama-3.2-1B LoRA B4 S2048, seed-script settings", "sft",
            "llama-3.2-1b", "lora", _TRAIN, "tiny-llama"),
    ],
    # Issue 17: this year's dense families (Liger has no patch for them).
    "issue17": [
        Row(1, "Qwen3.5-9B LoRA, B2 S2048", "train", "qwen3.5-9b", "lora", _NEW, "tiny-qwen3.5"),
        Row(2, "Qwen3.5-9B QLoRA, B2", "train", "qwen3.5-9b", "qlora", _NEW, "tiny-qwen3.5"),
        Row(3, "Gemma-4 4B LoRA, B2 S2048", "train", "gemma4-4b", "lora", _NEW, "tiny-gemma4"),
        Row(4, "Gemma-4 4B QLoRA, B2", "train", "gemma4-4b", "qlora", _NEW, "tiny-gemma4"),
    ],
    # Issue 18: mixture-of-experts, LoRA on attention and on every expert (target_parameters).
    "issue18": [
        Row(1, "Qwen3-30B-A3B (24 of 48 layers) LoRA, B1 S2048", "train", "qwen3-30b-a3b-24l",
            "lora", _NEW, "tiny-qwen3-moe"),
        Row(2, "Qwen3-30B-A3B (24 of 48 layers) QLoRA, B1", "train", "qwen3-30b-a3b-24l",
            "qlora", _NEW, "tiny-qwen3-moe"),
        Row(3, "gpt-oss-20b LoRA, B1 S2048", "train", "gpt-oss-20b", "lora", _NEW, "tiny-gpt-oss"),
        Row(4, "gpt-oss-20b QLoRA, B1", "train", "gpt-oss-20b", "qlora", _NEW, "tiny-gpt-oss"),
    ],
}  # fmt: skip
# The loops' default warm-up and timed steps (sft_bench times 12 steps, as the issue did).
STEPS = {"train": (3, 10), "embed": (3, 10), "sft": (3, 12)}
QUERY_SEQ = 64  # embedding rows: query length (documents: the shape's seq, 256)
EMBED_CHECKPOINTING = "fastlm"  # fastlm offloads as Unsloth's "unsloth" mode does; hf recomputes
LOOPS = {"train": train_bench, "embed": embedding_bench, "sft": sft_bench}
CHECKPOINTS = {  # the embedding rows load a Sentence-Transformers directory of a Qwen3Model
    "train": ensure_checkpoint,
    "embed": embedding_bench.ensure_checkpoint,
    "sft": ensure_checkpoint,
}


def parse_rows(text: str | None, rows: list[Row]) -> list[Row]:
    """ "1-3,7" -> those rows (all when `text` is None), in table order."""
    if not text:
        return list(rows)
    wanted: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        wanted.update(range(int(lo), int(hi or lo) + 1))
    known = {r.id for r in rows}
    if wanted - known:
        raise SystemExit(f"unknown rows {sorted(wanted - known)}; known: 1-{max(known)}")
    return [r for r in rows if r.id in wanted]


def _shape_of(row: Row, dry_run: bool):
    name = row.tiny_shape if dry_run else row.shape
    if row.loop == "embed":
        return embedding_bench.get_shape(name)
    return get_shape(name)


def _why_not(row: Row, system: str, cuda: bool) -> str | None:
    """Why (row, system) is skipped without starting a process, or None."""
    if row.mode == "qlora" and not cuda:
        return "QLoRA needs CUDA (bitsandbytes NF4); this machine has none"
    package = {"unsloth": "unsloth", "liger": "liger_kernel"}.get(system)
    if package and importlib.util.find_spec(package) is None:
        return f"{package} is not installed"
    return None


def child_spec(row: Row, system: str, shape, path: str, args, out: Path) -> dict:
    """The child spec of `row`'s loop for one system (the fields that loop's child_main reads)."""
    warmup, steps = STEPS[row.loop]
    spec = {
        "shape": shape.name,
        "system": system,
        "mode": row.mode,
        "path": path,
        "batch": shape.batch,
        "seq": shape.seq,
        "warmup": warmup if args.warmup is None else args.warmup,
        "steps": steps if args.steps is None else args.steps,
    }
    if row.loop == "embed":
        spec.update(query_seq=min(QUERY_SEQ, shape.seq // 2 if shape.tiny else shape.seq),
                    profile=False, checkpointing=EMBED_CHECKPOINTING)  # fmt: skip
    if row.loop == "sft":
        spec["trainer_dir"] = str(out / "trainer" / f"row{row.id}-{system}")
    if row.loop == "train":
        spec["fastlm_checkpointing"] = getattr(args, "fastlm_checkpointing", "fastlm")
    spec["fastlm_graphs"] = getattr(args, "fastlm_graphs", False)
    return spec


def _run(row: Row, spec: dict, log: Path, args, cuda: bool) -> dict:
    """One (row, system): a child process, or with --in-process this process (smoke tests)."""
    loop = LOOPS[row.loop]
    if not args.in_process:
        return loop.run_child(spec, log, args.child_timeout, cuda)
    log.write_text("run in the parent process (--in-process)\n")
    return loop.child_main(spec)


# --------------------------------------------------------------------------------------------
# The table: tok/s (pairs/s) · peak GiB per system, fastlm ÷ Unsloth.
# --------------------------------------------------------------------------------------------
def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def rate(rec: dict) -> float | None:
    """The row's figure of speed: pairs/s for embeddings, tokens/s otherwise."""
    return _num(rec.get("pairs_per_s" if rec.get("loop") == "embed" else "tokens_per_s"))


def _cell(rec: dict | None) -> str:
    if rec is None:
        return DASH
    if rec.get("status") != "ok":
        return str(rec.get("status"))
    r, peak = rate(rec), _num(rec.get("peak_gib"))
    speed = DASH if r is None else (f"{r:,.1f}" if r < 1000 else f"{r:,.0f}")
    return f"{speed} · {'n/a' if peak is None else f'{peak:.2f}'}"


def versus_unsloth(fast: dict | None, unsloth: dict | None) -> dict:
    """fastlm ÷ Unsloth: speed and peak memory (None where either is missing)."""
    ok = fast and unsloth and fast.get("status") == "ok" and unsloth.get("status") == "ok"
    if not ok:
        return {"speed": None, "memory": None}
    rf, ru = rate(fast), rate(unsloth)
    pf, pu = _num(fast.get("peak_gib")), _num(unsloth.get("peak_gib"))
    return {"speed": rf / ru if rf and ru else None, "memory": pf / pu if pf and pu else None}


def _loss_delta(fast: dict | None, hf: dict | None) -> float | None:
    if not (fast and hf and fast.get("status") == "ok" and hf.get("status") == "ok"):
        return None
    a, b = _num(fast.get("step0_loss")), _num(hf.get("step0_loss"))
    return abs(a - b) if a is not None and b is not None else None


COLUMNS = ["#", "shape / mode", "unit", "HF + PEFT", "Liger", "Unsloth", "fastlm",
           "fastlm ÷ Unsloth: speed, memory", "\\|Δ step-0 loss\\| fastlm vs HF"]  # fmt: skip


def table(rows: list[dict], records: list[dict]) -> str:
    """The markdown table, one line per row of `rows` (dicts of Row) that has records."""
    by = {(r.get("row"), r.get("system")): r for r in records}
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        if not any(key[0] == row["id"] for key in by):
            continue
        of = {
            system: by.get((row["id"], system)) for system in ("hf", "liger", "unsloth", "fastlm")
        }
        vs = versus_unsloth(of["fastlm"], of["unsloth"])
        ratio = ", ".join(DASH if v is None else f"{v:.2f}×" for v in vs.values())
        delta = _loss_delta(of["fastlm"], of["hf"])
        unit = "pairs/s" if row["loop"] == "embed" else "tok/s"
        label = row["label"]
        ran = sorted({r.get("shape") for k, r in by.items() if k[0] == row["id"]} - {row["shape"]})
        if ran:  # a dry run: say which shape stood in for the row's
            label += f" [{', '.join(map(str, ran))}]"
        cells = [str(row["id"]), label, unit]
        cells += [_cell(rec) for rec in of.values()]
        cells += [ratio, DASH if delta is None else f"{delta:.2g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(payload: dict) -> str:
    records = payload["records"]
    devices = sorted({r["device"] for r in records if r.get("device")})
    out = [f"# fastlm benchmark suite: {payload['suite']}", ""]
    out.append(f"- date: {payload.get('date')}")
    out += [f"- command: `{run['command']}`" for run in payload.get("runs", [])]
    out.append(f"- device: {', '.join(devices) or DASH}")
    out += [f"- CUDA: {c}" for c in sorted({str(r["cuda"]) for r in records if r.get("cuda")})]
    out += ["", "Versions:", *_versions_lines(records), ""]
    out += [
        "Figures: tok/s (pairs/s for the embedding rows) · peak GiB (`max_memory_allocated`, "
        "with fastlm's layer-graph pool counted once: `LayerGraphs.peak_bytes`); "
        "each system in its own process, on the same random-init weights and data.",
        "",
        table(payload["rows"], records),
        "",
    ]
    subs = sorted({f"{k}: {v}" for r in records for k, v in (r.get("substitutions") or {}).items()})
    if subs:
        out += ["Substituted on this machine:", *[f"- {s}" for s in subs], ""]
    ran_as = [
        f"- row {r.get('row')} ({r.get('shape')}) / {r.get('system')}: {note}"
        for r in records
        for note in r.get("notes") or []
    ]
    if ran_as:
        out += ["How systems ran:", *ran_as, ""]
    notes = [
        f"- row {r.get('row')} ({r.get('shape')}) / {r.get('system')} ({r.get('status')}): "
        + " ".join(str(r.get("reason") or r.get("error") or "").split())[:400]
        for r in sorted(records, key=lambda r: (r.get("row", 0), str(r.get("system"))))
        if r.get("status") != "ok"
    ]
    if notes:
        out += ["Not measured:", *notes, ""]
    return "\n".join(out)


def plot(payload: dict, path: Path) -> None:
    """Two panels: each system's speed and peak memory ÷ Unsloth's per row (÷ HF's where
    Unsloth was not measured), with the issue's targets (1.3× speed, 1.0× memory) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.benchmarking.report import COLORS  # lazy: matplotlib first, for the backend

    records = {(r.get("row"), r.get("system")): r for r in payload["records"]}
    rows = [row for row in payload["rows"] if any(k[0] == row["id"] for k in records)]
    systems = ["hf", "liger", "unsloth", "fastlm"]
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.4 * len(rows) + 4), 4.8))
    width = 0.8 / len(systems)
    base_names = []
    for ax, field, title, target in (
        (axes[0], "speed", "speed ÷ baseline (higher is better)", 1.3),
        (axes[1], "memory", "peak memory ÷ baseline (lower is better)", 1.0),
    ):
        for i, row in enumerate(rows):
            base = records.get((row["id"], "unsloth"))
            if not base or base.get("status") != "ok":
                base = records.get((row["id"], "hf"))
            if field == "speed":
                base_names.append(base.get("system") if base else DASH)
            for j, system in enumerate(systems):
                rec = records.get((row["id"], system))
                value = None
                if rec and base and rec.get("status") == "ok" and base.get("status") == "ok":
                    if field == "speed":
                        value = (rate(rec) or 0) / (rate(base) or math.inf)
                    else:
                        pr, pb = _num(rec.get("peak_gib")), _num(base.get("peak_gib"))
                        value = pr / pb if pr and pb else None
                x = i + (j - (len(systems) - 1) / 2) * width
                if value is None:
                    continue
                bars = ax.bar([x], [value], width, color=COLORS.get(system, f"C{j}"))
                ax.bar_label(bars, labels=[f"{value:.2f}"], fontsize=6, rotation=90, padding=2)
        ax.axhline(target, color="black", linewidth=0.8, linestyle="--")
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xticks(range(len(rows)), [f"{r['id']}" for r in rows], fontsize=8)
        ax.set_xlabel("row (see results.md); baseline: Unsloth, else HF", fontsize=8)
        ax.set_title(title, fontsize=10)
    handles = [matplotlib.patches.Patch(color=COLORS.get(s, "C0"), label=s) for s in systems]
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    devices = sorted({r["device"] for r in payload["records"] if r.get("device")})
    fig.suptitle(f"{payload['suite']}: {', '.join(devices)}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out: Path, payload: dict) -> str:
    """results.json, results.md and (with matplotlib) results.png; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    for rec in payload["records"]:
        row = next((r for r in payload["rows"] if r["id"] == rec.get("row")), None)
        if row is not None and rec.get("system") == "fastlm":
            others = {(r.get("row"), r.get("system")): r for r in payload["records"]}
            rec["vs_unsloth"] = versus_unsloth(rec, others.get((row["id"], "unsloth")))
    (out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    (out / "results.md").write_text(md)
    if importlib.util.find_spec("matplotlib") is not None:
        plot(payload, out / "results.png")
    return md


# --------------------------------------------------------------------------------------------
# Parent.
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--suite", default="issue15", choices=sorted(SUITES))
    p.add_argument(
        "--rows",
        help="rows to run, e.g. 1-3 or 2,7,9 (default: all; --list-rows prints them). Run a "
        "long suite in parts with the same --out: each part adds its records",
    )
    p.add_argument("--systems", help="only these systems (comma list; default: each row's own)")
    p.add_argument(
        "--out",
        help="output folder, shared by the parts (default benchmarks/results/<date>-<suite>)",
    )
    p.add_argument("--cache", default=train_bench.CACHE, help="checkpoint cache folder")
    p.add_argument("--warmup", type=int, help="warm-up steps of every row (default: 3)")
    p.add_argument("--steps", type=int, help="timed steps of every row (default: 10; SFT 12)")
    p.add_argument(
        "--child-timeout", type=float, default=420.0, help="seconds per (row, system) process"
    )
    p.add_argument(
        "--resume", action="store_true", help="skip the (row, system) pairs already ok in --out"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny shapes (tiny-llama, tiny-qwen3-embedding), 1 warm-up + 1 timed step unless "
        "--warmup / --steps say otherwise: checks every row end to end, on CPU too",
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run each (row, system) in this process, not a child (CPU smoke tests only: no "
        "isolation between systems, so never for measurements)",
    )
    p.add_argument(
        "--fastlm-checkpointing",
        default="fastlm",
        choices=("fastlm", "activations"),
        help="fastlm's use_gradient_checkpointing in the training rows (default: fastlm)",
    )
    p.add_argument(
        "--fastlm-graphs",
        action="store_true",
        help="fastlm's checkpointed layers replayed as CUDA graphs (opt-in; recorded per row)",
    )
    p.add_argument("--list-rows", action="store_true", help="print the rows and exit")
    return p.parse_args(argv)


def _list_rows(rows: list[Row]) -> str:
    lines = ["| # | row | loop | shape | mode | systems |", "|" + " --- |" * 6]
    for r in rows:
        lines.append(f"| {r.id} | {r.label} | {r.loop} | {r.shape} | {r.mode} | "
                     f"{','.join(r.systems)} |")  # fmt: skip
    return "\n".join(lines)


def _progress(row: Row, rec: dict) -> str:
    head = f"[row {row.id}] {rec.get('shape')} ({row.loop}, {row.mode}) / {rec.get('system')}:"
    if rec.get("status") != "ok":
        msg = " ".join(str(rec.get("reason") or rec.get("error") or "").split())[:300]
        return f"{head} {rec.get('status')} — {msg}"
    return f"{head} {_cell(rec)} ({row.unit} · peak GiB), step-0 loss {rec['step0_loss']:.4f}"


def main(argv: list[str] | None = None, *, program: str = PROGRAM) -> int:
    """Run the suite's rows; exit code 0 even when a child failed (failures are results)."""
    args = parse_args(argv)
    all_rows = SUITES[args.suite]
    if args.list_rows:
        print(_list_rows(all_rows))
        return 0
    rows = parse_rows(args.rows, all_rows)
    only = set(args.systems.split(",")) if args.systems else None
    if args.dry_run:
        args.warmup = 1 if args.warmup is None else args.warmup
        args.steps = 1 if args.steps is None else args.steps
    for k, v in train_bench.CHILD_ENV.items():
        os.environ.setdefault(k, v)

    now = datetime.datetime.now(datetime.timezone.utc)
    kind = args.suite + ("-dry-run" if args.dry_run else "")
    out = results_dir(args.out, now, kind)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    payload = train_bench.start_payload(out, command_line(program, argv), now, append=True)
    payload["suite"] = args.suite
    payload["rows"] = [asdict(r) for r in all_rows]
    records = payload["records"]
    done = {(r.get("row"), r.get("system")) for r in records if r.get("status") == "ok"}

    import torch  # only now: --list-rows does not need it

    cuda = torch.cuda.is_available()
    for row in rows:
        shape = _shape_of(row, args.dry_run)
        systems = [s for s in row.systems if only is None or s in only]
        meta = None
        for system in systems:
            if args.resume and (row.id, system) in done:
                print(f"[row {row.id}] {system}: already measured (--resume)", flush=True)
                continue
            log = out / "logs" / f"row{row.id}-{row.loop}-{row.mode}-{shape.name}-{system}.log"
            why = _why_not(row, system, cuda)
            if why is not None:
                rec = {"shape": shape.name, "system": system, "mode": row.mode,
                       "status": "skipped", "reason": why}  # fmt: skip
                log.write_text(f"not started: {why}\n")
            else:
                if meta is None:  # built (or found) once per row, only when a system runs
                    ensure = CHECKPOINTS[row.loop]
                    meta = train_bench.checkpoint_for(shape, payload, args.cache, cuda, ensure)
                spec = child_spec(row, system, shape, meta["path"], args, out)
                rec = _run(row, spec, log, args, cuda)
            rec.update(row=row.id, row_label=row.label, loop=row.loop, mode=row.mode)
            rec["log"] = os.path.relpath(log, out)
            records[:] = [r for r in records if (r.get("row"), r.get("system")) != (row.id, system)]
            records.append(rec)
            print(_progress(row, rec), flush=True)
            write_outputs(out, payload)
    write_outputs(out, payload)
    train_bench.print_failures(records)
    print(f"\nwrote {out}/results.json, results.md" + (
        ", results.png" if (out / "results.png").is_file() else ""))  # fmt: skip
    print("\n" + table(payload["rows"], records), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
