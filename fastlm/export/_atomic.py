"""Shared export helpers: a free-disk check and all-or-nothing writes.

with atomic_directory("out/merged") as tmp:  # write into tmp; "out/merged" appears at the end
    ...
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# Config, tokenizer and index files are small but not free; keep a margin on top of the estimate.
DISK_MARGIN_BYTES = 64 * 2**20


def format_bytes(num_bytes: float) -> str:
    """Human-readable size. Usage: ``format_bytes(3 * 2**30)  # '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.2f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.2f} TiB"


def _existing_ancestor(path: Path) -> Path:
    # The target (and maybe its parents) does not exist yet; measure the disk it will live on.
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_free_disk(target: str | os.PathLike, needed_bytes: int, what: str = "the export") -> None:
    """Raise ``OSError`` (ENOSPC) before writing when the target's disk lacks ``needed_bytes``.

    Usage: ``check_free_disk("out/merged", 2 * 2**30, "the merged model")``.
    """
    where = _existing_ancestor(Path(target).parent)
    free = shutil.disk_usage(where).free
    needed = int(needed_bytes) + DISK_MARGIN_BYTES
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"Not enough free disk space for {what}: about {format_bytes(needed)} needed "
            f"({format_bytes(needed_bytes)} of data + {format_bytes(DISK_MARGIN_BYTES)} margin), "
            f"only {format_bytes(free)} free on the disk holding {where}. Free some space or "
            "choose another save_directory.",
        )


def _umask() -> int:
    try:  # Linux reports it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def _usual_mode(path: Path, base: int) -> None:
    # mkdtemp/mkstemp create 0700 / 0600 (private while being written); the finished export gets
    # what a plain mkdir/open would have given, so other users (e.g. an Ollama service) read it.
    os.chmod(path, base & ~_umask())


def _replace_into(tmp: Path, final: Path) -> None:
    # os.replace cannot overwrite a non-empty folder: move the old one aside first, so that
    # the final name always holds either the old or the complete new export.
    if not final.exists():
        os.replace(tmp, final)
        return
    if not final.is_dir():
        raise FileExistsError(f"{final} exists and is not a folder; remove it or pick another.")
    old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
    os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except BaseException:
        os.replace(old / final.name, final)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``final``, on error it is removed.

    Usage: ``with atomic_directory("out/model") as tmp: write(tmp / "model.safetensors")``.
    """
    final = Path(final).absolute()
    if final.exists() and not final.is_dir():  # fail before the (long) write, not after it
        raise FileExistsError(f"{final} exists and is not a folder; remove it or pick another.")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        yield tmp
        _usual_mode(tmp, 0o777)
        _replace_into(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it replaces ``final``, on error it goes.

    Usage: ``with atomic_file("out/model.gguf") as tmp: tmp.write_bytes(data)``.
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.tmp-")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        _usual_mode(tmp, 0o666)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
