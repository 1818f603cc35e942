"""What exports do to the folder they write into (Python API): keep what is there, refuse their
own input, usual file modes, leftovers of killed exports cleared, clear errors before writing.

Every writer is run for real (save_pretrained_merged lora / merged_16bit / merged_4bit,
save_pretrained_gguf) on the tiny Llama; the CLI side is in test_export_cli_safety.py.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest
from test_gguf import spm_tokenizer
from test_merged import _trained

import fastlm.export.gguf_writer as gguf_module
from fastlm.export import (
    ExportPathError,
    NotEnoughSpaceError,
    NotWritableError,
    save_pretrained_gguf,
    save_pretrained_merged,
)
from fastlm.export._atomic import _HOST, TMP_PREFIX, disk_margin

# What a user's run or project folder holds besides an export.
USER_FILES = {
    "notes.txt": b"lr 2e-4 looked best\n",
    "README.md": b"# my project\n",
    "data.jsonl": b'{"text": "hello"}\n',
    "src/train.py": b"print('training')\n",
    "checkpoint-100/adapter_model.safetensors": os.urandom(2048),
    "checkpoint-100/trainer_state.json": b'{"global_step": 100}\n',
    ".hidden.tmp-abcd": b"a hidden file that is not fastlm's\n",
}
# The files each writer produces (besides tokenizer files).
EXPECTED = {
    "lora": {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"},
    "merged_16bit": {"model.safetensors", "config.json", "generation_config.json"},
    "merged_4bit": {"model.safetensors", "config.json", "tokenizer.json"},
    "gguf": {"tiny.f16.gguf", "tiny.q8_0.gguf", "Modelfile"},
}


def add_user_files(folder: Path) -> dict[str, bytes]:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return dict(USER_FILES)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_kept(folder: Path, before: dict[str, bytes]) -> None:
    after = snapshot(folder)
    for name, data in before.items():
        assert name in after, f"{name} was deleted"
        assert after[name] == data, f"{name} was changed"


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(f"{TMP_PREFIX}*")]


def export(method: str, model, folder, tokenizer) -> None:
    if method == "gguf":
        save_pretrained_gguf(model, folder, spm_tokenizer(), ["f16", "q8_0"], name="tiny")
    else:
        save_pretrained_merged(model, folder, tokenizer, method)


def _skip_without_bitsandbytes(method: str) -> None:
    if method == "merged_4bit":
        pytest.importorskip("bitsandbytes.functional")


# ------------------------------------------------------------------------ keep what is there


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "merged_4bit", "gguf"])
def test_export_keeps_other_files_in_the_folder(tmp_path, method):
    _skip_without_bitsandbytes(method)
    model, tokenizer, _ = _trained(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    before = add_user_files(run)
    export(method, model, run, tokenizer)
    assert_kept(run, before)
    assert EXPECTED[method] <= set(snapshot(run))
    assert temporaries(run) == []
    export(method, model, run, tokenizer)  # again: replaces its own files, keeps the others
    assert_kept(run, before)


def test_export_into_the_current_project_folder(tmp_path, monkeypatch):
    """save_pretrained_merged(".", tok) from a project folder used to delete the project."""
    model, tokenizer, _ = _trained(tmp_path)
    project = tmp_path / "project"
    project.mkdir()
    before = add_user_files(project)
    monkeypatch.chdir(project)
    out = save_pretrained_merged(model, ".", tokenizer)
    assert out == project
    assert_kept(project, before)
    assert (project / "model.safetensors").exists()


def test_an_existing_readme_is_not_replaced_by_the_model_card(tmp_path):
    model, tokenizer, _ = _trained(tmp_path)
    save_pretrained_merged(model, tmp_path / "fresh", tokenizer, "lora")
    assert (tmp_path / "fresh" / "README.md").exists()  # PEFT's card where there was none
    (tmp_path / "own").mkdir()
    (tmp_path / "own" / "README.md").write_text("mine\n")
    save_pretrained_merged(model, tmp_path / "own", tokenizer, "lora")
    assert (tmp_path / "own" / "README.md").read_text() == "mine\n"


# ------------------------------------------------------------------------ its own input


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "gguf"])
def test_export_into_the_folder_the_model_was_loaded_from_is_refused(tmp_path, method):
    model, tokenizer, source = _trained(tmp_path)
    before = snapshot(source)
    with pytest.raises(ExportPathError, match="reads from"):
        export(method, model, source, tokenizer)
    assert snapshot(source) == before  # nothing written, nothing replaced


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "gguf"])
def test_export_into_the_adapter_folder_the_model_was_loaded_from_is_refused(
    tmp_path, monkeypatch, method
):
    """FastModel.from_pretrained(adapter_folder), then an export into that folder, however the
    path is spelt: it replaced the adapter (lora), or made the folder load as a full model
    (merged_16bit writes a config.json beside adapter_config.json)."""
    from fastlm import FastModel

    model, _, _ = _trained(tmp_path)
    adapter = tmp_path / "adapter"
    save_pretrained_merged(model, adapter, spm_tokenizer(), "lora")  # a tokenizer GGUF can write
    loaded, tokenizer = FastModel.from_pretrained(str(adapter), device_map="cpu")
    before = snapshot(adapter)
    (tmp_path / "link").symlink_to(adapter)
    monkeypatch.chdir(tmp_path)
    for target in (adapter, "adapter/", "./adapter", "link/", tmp_path / "link"):
        with pytest.raises(ExportPathError, match="reads from.*another output folder"):
            if method == "gguf":
                save_pretrained_gguf(loaded, target, tokenizer, ["f16"], name="tiny")
            else:
                save_pretrained_merged(loaded, target, tokenizer, method)
    assert snapshot(adapter) == before  # nothing written, nothing replaced
    save_pretrained_merged(loaded, tmp_path / "elsewhere", tokenizer, "lora")  # allowed


def test_an_adapter_folder_without_tokenizer_files_is_refused_too(tmp_path):
    """The loader records the adapter folder itself: no tokenizer needed to know it."""
    from fastlm import FastModel

    model, tokenizer, _ = _trained(tmp_path)
    adapter = tmp_path / "adapter"
    save_pretrained_merged(model, adapter, None, "lora")
    assert not any(adapter.glob("tokenizer*"))
    loaded, _ = FastModel.from_pretrained(str(adapter), device_map="cpu")
    before = snapshot(adapter)
    with pytest.raises(ExportPathError, match="reads from"):
        save_pretrained_merged(loaded, adapter, tokenizer, "merged_16bit")
    assert snapshot(adapter) == before


def test_base_checkpoint_folder_is_refused_as_output(tmp_path):
    pytest.importorskip("bitsandbytes.functional")
    from test_merged_qlora import _qlora

    model, tokenizer, source = _qlora(tmp_path)
    model.get_base_model().config._name_or_path = "hub/id"  # only base_checkpoint names it
    before = snapshot(source)
    with pytest.raises(ExportPathError, match="reads from"):
        save_pretrained_merged(model, source, tokenizer, base_checkpoint=source)
    assert snapshot(source) == before


# ------------------------------------------------------------------------ stale shards


def test_shards_of_the_replaced_index_are_removed_and_nothing_else(tmp_path):
    model, tokenizer, _ = _trained(tmp_path)
    out = tmp_path / "merged"
    save_pretrained_merged(model, out, tokenizer, max_shard_size="30KB")
    old = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    (out / "model-00099-of-00099.safetensors").write_bytes(b"not listed: not ours to delete")
    before = add_user_files(out)

    save_pretrained_merged(model, out, tokenizer, max_shard_size="60KB")
    new = set(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(old) > len(new) > 1
    shards = {p.name for p in out.glob("model-*.safetensors")}
    assert shards == new | {"model-00099-of-00099.safetensors"}
    assert_kept(out, before)

    save_pretrained_merged(model, out, tokenizer)  # one file: the index goes with its shards
    assert {p.name for p in out.glob("model*.safetensors*")} == {
        "model.safetensors",
        "model-00099-of-00099.safetensors",
    }
    assert_kept(out, before)


def test_a_single_file_checkpoint_is_not_shadowed_by_new_shards(tmp_path, monkeypatch):
    """transformers loads model.safetensors before an index: refused rather than deleted."""
    model, tokenizer, _ = _trained(tmp_path)
    out = tmp_path / "merged"
    save_pretrained_merged(model, out, tokenizer)
    before = snapshot(out)
    monkeypatch.setattr("fastlm.export.merged._write_shard", pytest.fail)
    with pytest.raises(ExportPathError, match="model.safetensors.*max_shard_size"):
        save_pretrained_merged(model, out, tokenizer, max_shard_size="30KB")
    assert snapshot(out) == before


# ------------------------------------------------------------------------ file modes


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_real_writers_give_the_usual_modes(tmp_path, umask):
    """Every file the writers make gets 0666 & ~umask, every folder made 0777 & ~umask (an
    Ollama service running as another user reads the GGUF file)."""
    model, tokenizer, _ = _trained(tmp_path)
    previous = os.umask(umask)
    try:
        for method in ("lora", "merged_16bit", "merged_4bit", "gguf"):
            if method == "merged_4bit" and _no_bitsandbytes():
                continue
            export(method, model, tmp_path / "out" / method / "nested", tokenizer)
    finally:
        os.umask(previous)
    written = [p for p in (tmp_path / "out").rglob("*")]
    assert len(written) > 20
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path.relative_to(tmp_path)}: {oct(mode)}, want {oct(want)}"


def _no_bitsandbytes() -> bool:
    try:
        import bitsandbytes.functional  # noqa: F401
    except ImportError:
        return True
    return False


# ------------------------------------------------------------------------ interrupted exports

KILLED_EXPORT = """
import sys, time
from fastlm.export import export_into
with export_into(sys.argv[1]) as tmp:
    (tmp / "model-00001-of-00003.safetensors").write_bytes(b"partial" * 1000)
    print(tmp, flush=True)
    time.sleep(120)
"""


def test_leftovers_of_a_killed_export_are_removed_by_the_next_one(tmp_path, caplog):
    model, tokenizer, _ = _trained(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    before = add_user_files(run)
    # our prefix, not our pattern: a user's file
    before[".fastlm-tmp-notes.txt"] = b"mine\n"
    (run / ".fastlm-tmp-notes.txt").write_bytes(b"mine\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    killed = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KILLED_EXPORT), str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    staging = Path(killed.stdout.readline().strip())  # the export is under way
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    killed.stdout.close()
    assert staging.parent == run and (staging / "model-00001-of-00003.safetensors").exists()
    # A temporary of an export still running (here: a live process's PID) must stay.
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        in_use = run / f"{TMP_PREFIX}{_HOST}-{alive.pid}-abc123"
        in_use.mkdir()
        other_host = run / f"{TMP_PREFIX}00000000-{killed.pid}-abc123"
        other_host.mkdir()
        with caplog.at_level(logging.INFO, logger="fastlm"):
            save_pretrained_merged(model, run, tokenizer)
        assert not staging.exists()
        assert in_use.exists() and other_host.exists()
    finally:
        alive.kill()
        alive.wait()
    # One line names what was removed; one names what is kept because it cannot be checked.
    lines = [r.getMessage() for r in caplog.records if TMP_PREFIX in r.getMessage()]
    assert lines == [
        f"Removed leftovers of interrupted exports from {run}: {staging.name}",
        f"Kept {other_host.name} in {run}: temporaries of exports on another host or container, "
        "which cannot be checked from here; delete them if no export is writing there",
    ]
    assert_kept(run, before)
    assert (run / "model.safetensors").exists()


@pytest.mark.parametrize("locks", [True, False], ids=["flock", "no-flock"])
def test_a_leftover_with_this_process_pid_is_removed(tmp_path, monkeypatch, locks):
    """A container runs every export as the same PID (often 1): a temporary named with this
    process's PID that this process is not writing is a killed earlier run's. This process's own
    temporaries, while its export runs, are kept (on a file system without locks too)."""
    import fastlm.export._atomic as atomic
    from fastlm.export import atomic_file, export_into
    from fastlm.export._atomic import remove_stale_temporaries

    if not locks:
        monkeypatch.setattr(atomic, "fcntl", None)
    run = tmp_path / "run"
    run.mkdir()
    before = add_user_files(run)
    earlier = run / f"{TMP_PREFIX}{_HOST}-{os.getpid()}-abc123"
    earlier.mkdir()
    (earlier / "model.safetensors").write_bytes(b"partial")
    with export_into(run) as staging, atomic_file(run / "x.gguf") as tmp:
        assert not earlier.exists()
        tmp.write_bytes(b"gguf")
        assert remove_stale_temporaries(run) == []  # a second export, in another thread, say
        assert staging.exists() and tmp.exists()
        (staging / "model.safetensors").write_bytes(b"new")
    assert (run / "model.safetensors").read_bytes() == b"new"
    assert (run / "x.gguf").read_bytes() == b"gguf"
    assert temporaries(run) == []
    assert_kept(run, before)


HOLDS_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""


def test_a_locked_temporary_is_kept_whatever_its_pid(tmp_path):
    """An export's lock, not the PID in the name, says it is running: one in another container
    (its own PID numbers) named with a PID that is gone here, or with this process's PID."""
    from fastlm.export._atomic import remove_stale_temporaries

    if sys.platform == "win32":
        pytest.skip("flock")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    run = tmp_path / "run"
    run.mkdir()
    names = [f"{TMP_PREFIX}{_HOST}-{gone.pid}-abc123", f"{TMP_PREFIX}{_HOST}-{os.getpid()}-abc"]
    holders = []
    try:
        for name in names:
            (run / name).mkdir()
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDS_LOCK, str(run / name)],
                stdout=subprocess.PIPE,
                text=True,
            )
            holders.append(holder)
            assert holder.stdout.readline().strip() == "locked"
        assert remove_stale_temporaries(run) == []
        assert all((run / name).exists() for name in names)
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
            holder.stdout.close()
    # the kernel drops a dead process's lock, however it died
    assert sorted(p.name for p in remove_stale_temporaries(run)) == sorted(names)
    assert list(run.iterdir()) == []


@pytest.mark.parametrize("exception", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_gguf_export_leaves_no_temporaries(tmp_path, monkeypatch, exception):
    model, tokenizer, _ = _trained(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    before = add_user_files(run)
    real = gguf_module._write_gguf
    calls = []

    def write_then_stop(*args):
        calls.append(args)
        real(*args)
        if len(calls) % 2 == 0:  # the second of the two files
            raise exception("interrupted")

    monkeypatch.setattr(gguf_module, "_write_gguf", write_then_stop)
    with pytest.raises(exception):
        export("gguf", model, run, tokenizer)
    assert snapshot(run) == before  # no GGUF appears unless all of them are written
    assert temporaries(run) == []
    with pytest.raises(exception):
        export("gguf", model, tmp_path / "new" / "gguf", tokenizer)
    assert not (tmp_path / "new").exists()  # folders it made are removed again


# ------------------------------------------------------------------------ errors before writing


def test_empty_quantization_method_is_refused_before_anything_is_created(tmp_path):
    model, _, _ = _trained(tmp_path)
    with pytest.raises(ValueError, match="quantization_method is empty"):
        save_pretrained_gguf(model, tmp_path / "gguf", spm_tokenizer(), quantization_method=[])
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "gguf"])
def test_a_read_only_folder_is_reported_as_not_writable(tmp_path, monkeypatch, method):
    """A read-only disk (statvfs often says 0 bytes free there too): not a disk-space error."""
    model, tokenizer, _ = _trained(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(  # the tests run as root, for whom chmod does not make a folder read-only
        os, "access", lambda p, m, **kw: Path(p) != locked and real_access(p, m, **kw)
    )
    monkeypatch.setattr("fastlm.export._atomic.shutil.disk_usage", lambda p: usage(1, 1, 0))
    with pytest.raises(NotWritableError, match=f"{locked} is not writable"):
        export(method, model, locked / "out", tokenizer)
    assert list(locked.iterdir()) == []


def test_a_small_adapter_fits_on_a_nearly_full_disk(tmp_path, monkeypatch):
    model, tokenizer, _ = _trained(tmp_path)
    usage = namedtuple("usage", "total used free")
    free = int(1.2 * 2**20)  # the fixed 64 MiB margin refused this; the merged model needs more
    monkeypatch.setattr("fastlm.export._atomic.shutil.disk_usage", lambda p: usage(1, 1, free))
    out = save_pretrained_merged(model, tmp_path / "adapter", tokenizer, "lora")
    assert (out / "adapter_model.safetensors").stat().st_size < 2**20
    with pytest.raises(NotEnoughSpaceError, match="Not enough free disk space"):
        save_pretrained_merged(model, tmp_path / "merged", tokenizer, max_shard_size="30KB")
    assert not (tmp_path / "merged").exists()


def test_disk_margin_grows_with_the_export():
    assert disk_margin(69_000) == 2**20
    assert disk_margin(16 * 10**9) == 8 * 10**8  # 5 % of a 16 GB export
