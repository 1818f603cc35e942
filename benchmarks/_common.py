"""What the kernel benchmarks share (attention_bench.py, dequant_bench.py, flash_tile_sweep.py):
a plain-text table, the CUDA check, fastlm's kernel modules, one JSON file of results.

The training benchmarks' own helpers are in ``fastlm.benchmarking``.
Stdlib only at import time: the kernel benchmarks must not pull in transformers.
"""

from __future__ import annotations

import importlib
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's fastlm, whether it is installed or not
    sys.path.insert(1, str(REPO))

from fastlm.benchmarking.processes import dist_version  # noqa: E402


def print_table(header: str, lines) -> None:
    """A plain-text table on stdout: the header, a rule under it, then `lines`."""
    print(header)
    print("-" * len(header))
    for line in lines:
        print(line)


def no_cuda(message: str, file=None) -> bool:
    """True, after printing `message` (to `file`, default stdout), when torch sees no CUDA GPU."""
    import torch

    if torch.cuda.is_available():
        return False
    print(message, file=file)
    return True


# --------------------------------------------------------------------------------------------
# The kernel benchmarks (attention_bench.py, dequant_bench.py): one JSON file of results.
# --------------------------------------------------------------------------------------------
def load_kernel_module(name: str):
    """fastlm.kernels.<name> (``import fastlm`` itself is light: it loads nothing until used)."""
    return importlib.import_module(f"fastlm.kernels.{name}")


def add_json_out(p, kind: str) -> None:
    """--out: the JSON file to write, by default benchmarks/results/<UTC date>-<kind>.json."""
    today = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    p.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results" / f"{today}-{kind}.json"),
        help=f"JSON file to write (default: benchmarks/results/<UTC date>-{kind}.json)",
    )


def write_record(path: str, benchmark: str, device: str, packages: tuple, **fields) -> None:
    """Write a kernel benchmark's JSON record to `path` (creating its folder) and say so: what
    ran, when, where, with which torch / triton / `packages` versions, then `fields`."""
    import torch
    import triton

    record = {
        "benchmark": benchmark,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "device": device,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton.__version__,
        **{name: dist_version(name) for name in packages},
        **fields,
    }
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
