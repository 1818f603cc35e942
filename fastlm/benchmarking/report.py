"""Turns benchmark records into results.json, results.md (a table) and results.png (bar charts;
only where matplotlib is installed: it is not a fastlm dependency).

A record is the dict a child process returns: shape, system, mode, status ("ok", "error",
"skipped"), and for "ok" the measurements (tokens_per_s, ms_per_step, peak_gib, step0_loss, ...).
Ratios are taken against the "hf" record of the same shape and mode.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

DASH = "—"


def _key(rec: dict) -> tuple:
    return (rec.get("shape"), rec.get("mode", "lora"))


def baselines(records: list[dict]) -> dict:
    """{(shape, mode): the ok "hf" record}."""
    return {_key(r): r for r in records if r.get("system") == "hf" and r.get("status") == "ok"}


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def _fmt(x, spec: str) -> str:
    x = _num(x)
    return DASH if x is None else format(x, spec)


def _fmt_delta(x) -> str:
    x = _num(x)
    if x is None:
        return DASH
    return f"{x:.1e}" if 0 < x < 1e-4 else f"{x:.4f}"


def _ratio(a, b) -> float | None:
    a, b = _num(a), _num(b)
    return a / b if a is not None and b else None


def derived(rec: dict, base: dict | None) -> dict:
    """×HF speed, ×HF memory and |Δ step-0 loss| of one record against its HF baseline."""
    if rec.get("status") != "ok" or base is None:
        return {"speedup": None, "memory_ratio": None, "loss_delta": None}
    l0, lb = _num(rec.get("step0_loss")), _num(base.get("step0_loss"))
    return {
        "speedup": _ratio(rec.get("tokens_per_s"), base.get("tokens_per_s")),
        "memory_ratio": _ratio(rec.get("peak_gib"), base.get("peak_gib")),
        "loss_delta": abs(l0 - lb) if l0 is not None and lb is not None else None,
    }


COLUMNS = [
    "shape",
    "system",
    "tok/s",
    "×HF speed",
    "ms/step",
    "peak GiB",
    "×HF memory",
    "step-0 loss",
    "\\|Δloss\\| vs HF",  # escaped: a bare | would split the markdown column
    "last loss",
]


def table_rows(records: list[dict]) -> list[list[str]]:
    """One row of strings per record, in COLUMNS order."""
    base = baselines(records)
    rows = []
    for r in records:
        shape = r.get("shape", "?")
        if r.get("mode", "lora") != "lora":
            shape = f"{shape} ({r['mode']})"
        if r.get("status") != "ok":
            rows.append([shape, r.get("system", "?"), r.get("status", "?")] + [DASH] * 7)
            continue
        d = derived(r, base.get(_key(r)))
        tps = _num(r.get("tokens_per_s"))
        rows.append(
            [
                shape,
                r["system"],
                DASH if tps is None else f"{tps:,.0f}",
                _fmt(d["speedup"], ".2f") + ("×" if d["speedup"] is not None else ""),
                _fmt(r.get("ms_per_step"), ".1f"),
                _fmt(r.get("peak_gib"), ".2f"),
                _fmt(d["memory_ratio"], ".2f") + ("×" if d["memory_ratio"] is not None else ""),
                _fmt(r.get("step0_loss"), ".4f"),
                _fmt_delta(d["loss_delta"]),
                _fmt(r.get("last_loss"), ".4f"),
            ]
        )
    return rows


def markdown_table(records: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(records)]
    return "\n".join(lines)


def _notes(records: list[dict]) -> list[str]:
    notes = []
    for r in records:
        if r.get("status") == "ok":
            continue
        msg = r.get("reason") or r.get("error") or ""
        msg = " ".join(str(msg).split())[:400]
        notes.append(f"- {_group(r)} / {r.get('system')} ({r.get('status')}): {msg}")
    return notes


COMMON = ("torch", "transformers", "peft", "triton", "accelerate", "bitsandbytes")


def _versions_lines(records: list[dict]) -> list[str]:
    """The common stack once (per distinct set), then each system's own packages."""
    lines, seen = [], set()
    for r in records:
        v = r.get("versions") or {}
        common = ", ".join(f"{k} {v[k]}" for k in COMMON if v.get(k))
        if common and ("", common) not in seen:
            seen.add(("", common))
            lines.append(f"- common: {common}")
    for r in records:
        v = r.get("versions") or {}
        own = ", ".join(f"{k} {val}" for k, val in v.items() if k not in COMMON and val)
        if own and (r.get("system"), own) not in seen:
            seen.add((r.get("system"), own))
            lines.append(f"- {r.get('system')}: {own}")
    return lines


def markdown_report(payload: dict) -> str:
    """The whole results.md: where and how it ran, the table, then failures."""
    records = payload["records"]
    devices = sorted({r["device"] for r in records if r.get("device")})
    loops = sorted(
        {
            f"{r.get('mode')}, seq {r.get('seq')}, batch {r.get('batch')}, "
            f"{r.get('warmup')} warm-up + {r.get('steps')} timed steps"
            for r in records
            if r.get("status") == "ok"
        }
    )
    out = ["# fastlm training benchmark", ""]
    out.append(f"- date: {payload.get('date')}")
    for run in payload.get("runs", []):
        out.append(f"- command: `{run['command']}`")
    out.append(f"- device: {', '.join(devices) or DASH}")
    cuda = sorted({str(r.get("cuda")) for r in records if r.get("cuda")})
    if cuda:
        out.append(f"- CUDA: {', '.join(cuda)}")
    for loop in loops:
        out.append(f"- loop: {loop}")
    out += ["", "Versions:", *_versions_lines(records), ""]
    out += [markdown_table(records), ""]
    notes = _notes(records)
    if notes:
        out += ["Not measured:", *notes, ""]
    return "\n".join(out)


COLORS = {"hf": "#7f7f7f", "fastlm": "#d62728", "liger": "#1f77b4", "unsloth": "#2ca02c",
          # packing_bench's systems: padded in the system's colour, padding-free a shade darker
          "hf-padded": "#7f7f7f", "hf-padding-free": "#3f3f3f", "unsloth-packing": "#2ca02c",
          "fastlm-padded": "#d62728", "fastlm-padding-free": "#8c1a1b"}  # fmt: skip


def _group(rec: dict) -> str:
    mode = rec.get("mode", "lora")
    return str(rec.get("shape")) + ("" if mode == "lora" else f" ({mode})")


SPEED_TITLE = "throughput (tokens/s, higher is better)"


def plot(records: list[dict], path: Path, speed_title: str = SPEED_TITLE) -> None:
    """Grouped bars, one group per shape, one bar per system: tok/s (titled `speed_title`) and
    peak GiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys(_group(r) for r in records))
    systems = list(dict.fromkeys(str(r.get("system")) for r in records))
    by_key = {(_group(r), str(r.get("system"))): r for r in records}
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 2.2 * len(groups) * 2 + 3), 4.8))
    width = 0.8 / max(1, len(systems))
    for ax, field, title in (
        (axes[0], "tokens_per_s", speed_title),
        (axes[1], "peak_gib", "peak memory allocated (GiB, lower is better)"),
    ):
        top = max(
            (_num(r.get(field)) or 0.0 for r in records if r.get("status") == "ok"), default=0.0
        )
        ax.set_ylim(0, top * 1.25 if top > 0 else 1.0)
        for j, system in enumerate(systems):
            color = COLORS.get(system, f"C{j}")
            for i, g in enumerate(groups):
                r = by_key.get((g, system))
                if r is None:
                    continue
                x = i + (j - (len(systems) - 1) / 2) * width
                y = _num(r.get(field)) if r.get("status") == "ok" else None
                if y is None:
                    note = r.get("status") if r.get("status") != "ok" else "n/a"
                    ax.text(x, 0, f" {note}", rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                bars = ax.bar([x], [y], width, color=color)
                label = f"{y:,.0f}" if field == "tokens_per_s" else f"{y:.2f}"
                ax.bar_label(bars, labels=[label], fontsize=7, rotation=90, padding=2)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_xlim(-0.5, len(groups) - 0.5)
        ax.set_title(title, fontsize=10)
    handles = [
        Patch(color=COLORS.get(system, f"C{j}"), label=system) for j, system in enumerate(systems)
    ]
    axes[0].legend(handles=handles, fontsize=8, loc="upper right")
    devices = sorted({r["device"] for r in records if r.get("device")})
    fig.suptitle(", ".join(devices), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: Path, payload: dict) -> str:
    """Write results.json / .md / .png (with matplotlib) into out_dir; return the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = baselines(payload["records"])
    for r in payload["records"]:
        r["vs_hf"] = derived(r, base.get(_key(r)))
    (out_dir / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown_report(payload)
    (out_dir / "results.md").write_text(md)
    if importlib.util.find_spec("matplotlib") is not None:
        plot(payload["records"], out_dir / "results.png")
    return md
