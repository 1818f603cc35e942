"""Where exports write: into a folder, file by file, replacing only the files they write.

with export_into("out/merged", inputs=["base-model"]) as staging:
    write(staging / "model.safetensors")  # moved into out/merged when the block succeeds

A writer puts every file into a hidden staging folder inside the target
(``.fastlm-tmp-<host>-<pid>-<random>``); when it has written them all they are moved into the
target with ``os.replace`` (atomic per file; index and config files last, so a loader that looks
at them first finds the new weights already in place). Nothing else in the target is touched
except the stale files a caller names (an earlier export's shards) and staging folders of dead
exports. A crash between two renames leaves some new and some old files plus the staging folder
with the rest; the next export to the folder removes that staging folder and writes everything.

A temporary is "of a dead export" when nobody holds its lock (the writer keeps an ``flock`` on
it while it writes: the kernel drops it when the process dies, however it dies) and the PID in
its name, on this host, is not running or is this process's own without being one of its
temporaries (a container runs every export as the same PID, often 1).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastlm.errors import FastLMError

try:
    import fcntl
except ImportError:  # Windows: no flock; the host/PID rule alone says which temporaries are dead
    fcntl = None

logger = logging.getLogger("fastlm")

# Written after every other file: a loader that opens these first then finds the files they name.
_LAST = ("model.safetensors.index.json", "adapter_config.json", "config.json", "Modelfile")
# The host is part of a temporary name: a PID only says something on the machine that made it.
_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
TMP_PREFIX = ".fastlm-tmp-"
_TMP_NAME = re.compile(r"\.fastlm-tmp-([0-9a-f]{8})-([0-9]+)-[0-9a-z_]+")
# (st_dev, st_ino) of this process's temporaries while their export runs: a temporary named with
# this PID and not listed is an earlier process's (the same PID in a restarted container).
_LIVE: set[tuple[int, int]] = set()


class ExportPathError(FastLMError, ValueError):
    """The export cannot go there: a file is in the way, or it would overwrite its own input."""


class NotWritableError(FastLMError, PermissionError):
    """The target folder (or the folder it would be created in) is read-only for this user."""


class NotEnoughSpaceError(FastLMError, OSError):
    """The target's disk has less free space than the export needs."""


def format_bytes(num_bytes: float) -> str:
    """Human-readable size. Usage: ``format_bytes(3 * 2**30)  # '3.00 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024:
            return f"{num_bytes:.2f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.2f} TiB"


def disk_margin(needed_bytes: int) -> int:
    """Free space wanted on top of an export's estimate: 5 %, at least 1 MiB.

    The estimates count tensor bytes exactly; what they leave out grows with the export
    (safetensors/GGUF headers, the GGUF vocabulary: ~1 % of a 270M q8_0 file) plus a few small
    JSON and tokenizer files and block rounding. A fixed 64 MiB refused a 69 KB adapter on a
    disk with a few MiB free; this check only saves a long write from failing late, a full disk
    mid-write still fails cleanly (the staging folder is removed).
    """
    return max(2**20, int(needed_bytes) // 20)


def _existing_ancestor(path: Path) -> Path:
    # The target (and maybe its parents) does not exist yet; look at what it will be made in.
    path = path.absolute()
    while not os.path.lexists(path):
        path = path.parent
    return path


def check_free_disk(target: str | os.PathLike, needed_bytes: int, what: str = "the export") -> None:
    """Raise ``NotEnoughSpaceError`` (ENOSPC) when the target's disk lacks ``needed_bytes``.

    Usage: ``check_free_disk("out/merged", 2 * 2**30, "the merged model")``.
    """
    where = _existing_ancestor(Path(target))
    free = shutil.disk_usage(where).free
    margin = disk_margin(needed_bytes)
    needed = int(needed_bytes) + margin
    if free < needed:
        raise NotEnoughSpaceError(
            errno.ENOSPC,
            f"Not enough free disk space for {what}: about {format_bytes(needed)} needed "
            f"({format_bytes(needed_bytes)} of data + {format_bytes(margin)} margin), "
            f"only {format_bytes(free)} free on the disk holding {where}. Free some space or "
            "choose another folder.",
        )


def check_target(
    target: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = ()
) -> Path:
    """Refuse, before anything is written, a target the export cannot or must not write to.

    Usage: ``check_target("out/merged", inputs=[base_model_folder])``. Raises ExportPathError
    when ``target`` (or a parent) is a file, or is one of the ``inputs`` folders (it would
    overwrite what it reads); NotWritableError when it is read-only. Returns the absolute path.
    """
    target = Path(target).absolute()
    for folder in inputs:
        if folder is not None and _same_folder(target, Path(folder)):
            raise ExportPathError(
                f"{target} is the folder this export reads from ({folder}); writing there would "
                "overwrite the input. Choose another output folder."
            )
    existing = _existing_ancestor(target)
    if not existing.is_dir():
        where = "is" if existing == target else f"would be inside {existing}, which is"
        raise ExportPathError(f"{target} {where} a file, not a folder; remove it or pick another.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise NotWritableError(
            errno.EACCES,
            f"{existing} is not writable (read-only disk or no write permission), so the export "
            f"to {target} cannot be written; choose a folder you can write to.",
        )
    return target


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return b.is_dir() and a.is_dir() and os.path.samefile(a, b)
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the staging folders / files that exports to ``folder`` left when they were killed.

    Usage: ``remove_stale_temporaries("out/merged")``. Only names fastlm gives its temporaries
    (``.fastlm-tmp-<host>-<pid>-<random>``), only when no process holds the temporary's lock and
    it was made on this host by a PID that is gone (or is this process's, reused: see the module
    doc). One log line names what was removed; another names the unlocked temporaries of other
    hosts, which are kept (a PID of another machine or container says nothing here).
    """
    removed, foreign = [], []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            match = _TMP_NAME.fullmatch(entry.name)
            if match is None:
                continue
            path = Path(entry.path)
            if _claimed(entry) or _locked(path):
                continue  # an export is writing it
            host, pid = match.group(1), int(match.group(2))
            if host != _HOST:
                foreign.append(path)
                continue
            if pid != os.getpid() and _running(pid):
                continue  # maybe an export of a fastlm without locks; a reused PID waits
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        names = ", ".join(sorted(p.name for p in removed))
        logger.info("Removed leftovers of interrupted exports from %s: %s", folder, names)
    if foreign:
        names = ", ".join(sorted(p.name for p in foreign))
        logger.info(
            "Kept %s in %s: temporaries of exports on another host or container, which cannot "
            "be checked from here; delete them if no export is writing there",
            names,
            folder,
        )
    return removed


def _claimed(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is one of this process's temporaries (``_in_use``) whose export runs."""
    try:
        stat = entry.stat(follow_symlinks=False)
    except OSError:
        return False
    return (stat.st_dev, stat.st_ino) in _LIVE


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def _lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive ``flock``; None when locks cannot be
    had here (a file system without them, no ``fcntl``)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)  # a folder opens read-only too, and flock works on it
    except OSError:
        return None
    try:
        # Blocking: the only other holder of a new temporary's lock is another export's
        # _locked probing it, for an instant; giving up then would leave it unlocked throughout.
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        os.close(fd)
        return None
    return fd


def _locked(path: Path) -> bool:
    """Whether another process holds ``path``'s lock: its export is running (False where
    locks are not available: the PID rule decides alone)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system
        return False
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


@contextlib.contextmanager
def _in_use(path: Path) -> Iterator[None]:
    """While the block runs, ``path`` (a temporary this process made) is this process's: listed
    in _LIVE for this process's exports and locked for the others'."""
    stat = os.stat(path, follow_symlinks=False)
    key = (stat.st_dev, stat.st_ino)
    _LIVE.add(key)
    fd = _lock(path)
    try:
        yield
    finally:
        _LIVE.discard(key)
        if fd is not None:
            os.close(fd)


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


def _make_folders(folder: Path) -> list[Path]:
    """mkdir -p, returning the folders it created (outermost first) to undo on failure."""
    missing = []
    path = folder
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for path in reversed(missing):
        try:
            path.mkdir()  # 0o777 & ~umask, like mkdir(1)
        except FileExistsError:
            pass
        except OSError as error:
            _remove_empty(missing)
            raise _not_writable(folder, error) from error
    return list(reversed(missing))


def _remove_empty(folders: list[Path]) -> None:
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty (someone else wrote there): keep it
            path.rmdir()


def _not_writable(folder: Path, error: OSError) -> Exception:
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return NotWritableError(
            error.errno, f"{folder} is not writable ({error.strerror}); choose another folder."
        )
    return error


@contextlib.contextmanager
def export_into(
    folder: str | os.PathLike,
    *,
    inputs: Iterable[str | os.PathLike | None] = (),
    keep: Iterable[str] = (),
    remove: Iterable[str] = (),
) -> Iterator[Path]:
    """Yield a staging folder; on success its files are moved into ``folder``, on error it goes.

    Usage: ``with export_into("out/model") as tmp: write(tmp / "model.safetensors")``.
    Files already in ``folder`` with the names written are replaced; nothing else is touched,
    except ``remove`` (names of files the caller knows an earlier export wrote and this one
    supersedes, deleted after the new files are in) and stale temporaries of dead exports.
    ``keep``: names that are written only when ``folder`` has none yet (e.g. a README.md).
    Folders created for the export are removed again if it fails and they are empty.
    """
    final = check_target(folder, inputs)
    created = _make_folders(final)
    try:
        remove_stale_temporaries(final)
        try:
            staging = Path(
                tempfile.mkdtemp(dir=final, prefix=f"{TMP_PREFIX}{_HOST}-{os.getpid()}-")
            )
        except OSError as error:
            raise _not_writable(final, error) from error
    except BaseException:
        _remove_empty(created)
        raise
    try:
        with _in_use(staging):
            yield staging
            _commit(staging, final, set(keep), list(remove))
            shutil.rmtree(staging, ignore_errors=True)  # only the emptied sub-folders are left
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise


def _order(name: Path) -> int:
    return _LAST.index(str(name)) + 1 if str(name) in _LAST else 0


def _commit(staging: Path, final: Path, keep: set[str], remove: list[str]) -> None:
    files = [p.relative_to(staging) for p in sorted(staging.rglob("*")) if not p.is_dir()]
    files = [f for f in files if not (str(f) in keep and os.path.lexists(final / f))]
    for name in files:  # check every name before moving any file
        for parent in name.parents[:-1]:  # "a/b/c.json": a/b, a (not the folder itself)
            if os.path.lexists(final / parent) and not (final / parent).is_dir():
                raise ExportPathError(
                    f"{final / parent} is a file; the export needs a folder there."
                )
        if (final / name).is_dir():
            raise ExportPathError(f"{final / name} is a folder; the export writes a file there.")
    mode = 0o666 & ~_umask()
    for name in sorted(files, key=_order):  # stable: data files first, index/config last
        os.chmod(staging / name, mode)  # whatever the writer used (mkstemp: 0600)
        (final / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, final / name)
    written = {str(f) for f in files}
    for name in remove:
        path = final / name
        if name not in written and not path.is_dir():
            path.unlink(missing_ok=True)


# ``atomic_directory`` is the name other fastlm writers use (embeddings, reranker).
atomic_directory = export_into


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling file path; on success it replaces ``final``, on error it goes.

    Usage: ``with atomic_file("out/model.gguf") as tmp: tmp.write_bytes(data)``.
    """
    final = Path(final).absolute()
    _make_folders(final.parent)
    remove_stale_temporaries(final.parent)
    prefix = f"{TMP_PREFIX}{_HOST}-{os.getpid()}-"
    handle, name = tempfile.mkstemp(dir=final.parent, prefix=prefix)
    os.close(handle)
    tmp = Path(name)
    try:
        with _in_use(tmp):
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600
            os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
