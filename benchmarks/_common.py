"""Plumbing the benchmark scripts share: child processes, their environment, versions, records.

Stdlib only at import time: child processes import this before deciding what else to import
(Unsloth must be imported before transformers), and the kernel benchmarks must not pull in
transformers.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import json
import os
import shlex
import signal
import subprocess
import sys
import types
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Every child runs offline, with the tokenizers' own thread pool off.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def dist_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def child_env(values: dict, *, override: bool = True, triton_interpret: bool = False) -> dict:
    """This process's environment plus `values` (replacing what is set unless `override` is
    False), with the repository root first on PYTHONPATH so that `import fastlm` finds the
    working tree without installing it; `triton_interpret`: TRITON_INTERPRET=1 unless set
    (Triton code launched on CPU needs it)."""
    env = dict(os.environ)
    for key, value in values.items():
        if override:
            env[key] = value
        else:
            env.setdefault(key, value)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    if triton_interpret:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def command_line(script: str, argv: list[str] | None) -> str:
    """How the benchmark was started, for the results: `python benchmarks/<script> ...`."""
    argv_used = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"benchmarks/{script}", *argv_used])


def results_dir(out: str | None, now: datetime, kind: str) -> Path:
    """--out, or benchmarks/results/<UTC date-time>-<kind>."""
    return Path(out or REPO / "benchmarks" / "results" / f"{now:%Y%m%d-%H%M%S}-{kind}")


def run_recorded(
    cmd: list[str], log_path: Path, record_path: Path, env: dict, timeout: float
) -> tuple[dict | None, str]:
    """Run `cmd` in its own process group (output to `log_path`) until it ends or `timeout`
    seconds pass, then read the record it wrote to `record_path`.

    Returns (record, "") — the record file is deleted — or (None, why there is none).
    """
    record_path.unlink(missing_ok=True)
    status = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
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
        record = json.loads(record_path.read_text())
        record_path.unlink()
        return record, ""
    return None, f"timed out after {timeout:.0f} s" if status is None else f"exit code {status}"


def log_tail(log_path: Path) -> str:
    """The end of a child's log, for a record the child could not write itself."""
    return log_path.read_text(errors="replace")[-3000:]


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
    """fastlm.kernels.<name>, imported with stub parent packages (no fastlm/__init__.py, which
    pulls in transformers)."""
    if "fastlm" not in sys.modules:
        for package, sub in (("fastlm", "fastlm"), ("fastlm.kernels", "fastlm/kernels")):
            pkg = types.ModuleType(package)
            pkg.__path__ = [str(REPO / sub)]
            sys.modules[package] = pkg
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
