"""The benchmarks' child processes: their environment, running one until it writes its record,
and where the results go.

Stdlib only at import time: child processes import this before deciding what else to import
(Unsloth must be imported before transformers).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shlex
import signal
import site
import subprocess
import sys
from datetime import datetime
from pathlib import Path

# Every child runs offline, with the tokenizers' own thread pool off.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# The folder this fastlm is imported from: a source checkout's root, or site-packages.
_IMPORT_ROOT = Path(__file__).resolve().parents[2]


def source_checkout() -> Path | None:
    """The root of the git checkout this fastlm runs from, or None for an installed package."""
    return _IMPORT_ROOT if (_IMPORT_ROOT / ".git").exists() else None


def dist_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None when it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _site_dirs() -> set[Path]:
    """The folders every Python of this installation finds packages in by itself."""
    user = site.getusersitepackages() if site.ENABLE_USER_SITE else None
    return {Path(p).resolve() for p in [*site.getsitepackages(), *filter(None, [user])]}


def child_env(values: dict, *, override: bool = True, triton_interpret: bool = False) -> dict:
    """This process's environment plus `values` (replacing what is set unless `override` is
    False), with the folder this fastlm comes from first on PYTHONPATH unless it is a
    site-packages folder (so that a child runs the same fastlm: a checkout's working tree without
    installing it); `triton_interpret`: TRITON_INTERPRET=1 unless set (Triton code launched on
    CPU needs it)."""
    env = dict(os.environ)
    for key, value in values.items():
        if override:
            env[key] = value
        else:
            env.setdefault(key, value)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _IMPORT_ROOT not in _site_dirs() and str(_IMPORT_ROOT) not in paths:
        env["PYTHONPATH"] = os.pathsep.join([str(_IMPORT_ROOT), *paths])
    if triton_interpret:
        env.setdefault("TRITON_INTERPRET", "1")
    return env


def command_line(program: str, argv: list[str] | None) -> str:
    """How the benchmark was started, for the results: `program` (e.g. ``python
    benchmarks/train_bench.py``) and its arguments (default: this process's)."""
    argv_used = sys.argv[1:] if argv is None else list(argv)
    return shlex.join([*shlex.split(program), *argv_used])


def results_dir(out: str | None, now: datetime, kind: str) -> Path:
    """--out, or benchmarks/results/<UTC date-time>-<kind>: in the source checkout fastlm runs
    from, else in the current folder."""
    root = source_checkout() or Path()
    return Path(out or root / "benchmarks" / "results" / f"{now:%Y%m%d-%H%M%S}-{kind}")


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
