#!/usr/bin/env python
"""Longest trainable context: one QLoRA (or LoRA) step at batch 1, growing the sequence.

    python benchmarks/long_context.py --shape llama-3.1-8b --mode qlora \
        --systems fastlm:131072,262144 hf:32768,49152 --out benchmarks/results/<name>

Each (system, length) runs in its own process through `train_bench.py`'s child (the same loader
and loop: forward + backward + AdamW step under bf16 autocast, labels = ids, no padding). For
each system the listed lengths run in order and stop at the first failure (out of memory);
`--bisect N` then tries up to N midpoints between the last length that fit and the first that
failed (rounded to 4,096 tokens). A length listed with a `!` suffix (e.g. `131072!`) gets one
warm-up step at that length before the timed step; the others time their first step, which
includes compiling fastlm's Triton kernels (seconds; say so when quoting them).
Writes results.json and results.md (one row per attempt: fits or not, step time, peak GiB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # this checkout's fastlm; the helpers here (_common.py)
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from _common import no_cuda  # noqa: E402

from fastlm.benchmarking.checkpoint import CACHE, ensure_checkpoint  # noqa: E402
from fastlm.benchmarking.shapes import get_shape  # noqa: E402
from fastlm.benchmarking.train_bench import host_info, run_child  # noqa: E402

GRANULE = 4096


def parse_plan(items: list[str]) -> list[tuple[str, list[tuple[int, bool]]]]:
    """["fastlm:131072!,262144", ...] -> [("fastlm", [(131072, True), (262144, False)]), ...]."""
    plan = []
    for item in items:
        system, _, lengths = item.partition(":")
        if not lengths:
            raise SystemExit(f"--systems item {item!r}: write SYSTEM:LEN[,LEN...]")
        parsed = [(int(x.rstrip("!")), x.endswith("!")) for x in lengths.split(",")]
        plan.append((system, parsed))
    return plan


def attempt(args, shape, path: str, system: str, seq: int, warm: bool, logs: Path) -> dict:
    spec = {
        "shape": shape.name,
        "system": system,
        "mode": args.mode,
        "batch": 1,
        "seq": seq,
        "warmup": 1 if warm else 0,
        "steps": 1,
        "path": path,
    }
    rec = run_child(spec, logs / f"{system}-{seq}.log", args.child_timeout, cuda=True)
    rec["fits"] = rec.get("status") == "ok"
    rec["warmed_up"] = warm
    print(_line(rec), flush=True)
    return rec


def _line(rec: dict) -> str:
    head = f"{rec['system']:>8} seq {rec['seq']:>7,}: "
    if rec["fits"]:
        seconds, peak = rec.get("ms_per_step", 0) / 1000, rec.get("peak_gib", 0)
        return head + f"fits, {seconds:.1f} s/step, peak {peak:.1f} GiB"
    return head + f"does not fit ({(rec.get('error') or '')[:120]})"


def run_system(args, shape, path, system, lengths, logs) -> list[dict]:
    records, last_fit, first_fail = [], 0, None
    for seq, warm in lengths:
        rec = attempt(args, shape, path, system, seq, warm, logs)
        records.append(rec)
        if not rec["fits"]:
            first_fail = seq
            break
        last_fit = seq
    for _ in range(args.bisect if first_fail else 0):
        mid = (last_fit + first_fail) // 2 // GRANULE * GRANULE
        if mid <= last_fit or mid >= first_fail:
            break
        rec = attempt(args, shape, path, system, mid, False, logs)
        records.append(rec)
        last_fit, first_fail = (mid, first_fail) if rec["fits"] else (last_fit, mid)
    return records


def _device(payload: dict) -> str:
    devices = {r.get("device") for r in payload["records"] if r.get("device")}
    return ", ".join(sorted(devices)) or "device unknown"


def markdown(payload: dict) -> str:
    lines = [
        f"# Longest context — {payload['shape']} ({payload['mode']}), batch 1",
        "",
        f"{_device(payload)}, {payload['date']}; command: `{payload['command']}`",
        "",
        "| system | seq | fits | s/step | peak GiB | warm-up step |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for rec in payload["records"]:
        step = f"{rec['ms_per_step'] / 1000:.1f}" if rec["fits"] else "—"
        peak = rec.get("peak_gib") if rec["fits"] else rec.get("peak_gib_at_error")
        peak_text = f"{peak:.1f}" if isinstance(peak, int | float) else "—"
        lines.append(
            f"| {rec['system']} | {rec['seq']:,} | {'yes' if rec['fits'] else 'no'} | {step} "
            f"| {peak_text} | {'yes' if rec['warmed_up'] else 'no (includes compile)'} |"
        )
    for system, best in payload["longest"].items():
        lines.append(f"\nLongest that fit, {system}: {best:,} tokens")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--mode", choices=("lora", "qlora"), default="qlora")
    p.add_argument("--systems", nargs="+", required=True, help="SYSTEM:LEN[!],LEN... per system")
    p.add_argument("--bisect", type=int, default=0, help="midpoints to try after a failure")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default=CACHE)
    p.add_argument("--child-timeout", type=float, default=480.0)
    args = p.parse_args(argv)
    if no_cuda("long_context.py needs a CUDA GPU", file=sys.stderr):
        return 2
    shape = get_shape(args.shape)
    path = str(ensure_checkpoint(shape, args.cache)["path"])
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    payload = {
        "shape": shape.name,
        "mode": args.mode,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "host": host_info(),
        "records": [],
        "longest": {},
    }
    t0 = time.perf_counter()
    for system, lengths in parse_plan(args.systems):
        records = run_system(args, shape, path, system, lengths, out / "logs")
        payload["records"] += records
        fits = [r["seq"] for r in records if r["fits"]]
        payload["longest"][system] = max(fits, default=0)
        (out / "results.json").write_text(json.dumps(payload, indent=2))
        (out / "results.md").write_text(markdown(payload))
    print(markdown(payload))
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
