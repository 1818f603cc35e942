"""``fastlm export`` and the folder it writes into: other files kept (the adapter it reads
included), its own input refused, usual modes, and one-line errors (exit 1) for an output that
is a file, a read-only folder, or an adapter trained on another base model."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from test_export_safety import add_user_files, assert_kept, snapshot, temporaries
from test_gguf import spm_tokenizer
from tiny_models import save_tiny_model

from fastlm import FastModel, cli

EXPECTED = {
    "lora": {"adapter_model.safetensors", "adapter_config.json"},
    "merged_16bit": {"model.safetensors", "config.json", "tokenizer.json"},
    "merged_4bit": {"model.safetensors", "config.json"},
    "gguf": {"Modelfile"},
}


def run(argv: list) -> int:
    return cli.main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    """The error ``fastlm`` printed: exactly one line, no traceback."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fastlm export: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


pytestmark = pytest.mark.usefixtures("cli_logging")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(base model folder, LoRA adapter folder with B ≠ 0) of a tiny Llama GGUF can tokenise."""
    root = tmp_path_factory.mktemp("cli-export")
    base = save_tiny_model("llama", root / "base", vocab_size=300)
    spm_tokenizer().save_pretrained(base)
    model, tokenizer = FastModel.from_pretrained(str(base), device_map="cpu")
    model = FastModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False)
    model.save_pretrained(root / "adapter")
    tokenizer.save_pretrained(root / "adapter")
    return base, root / "adapter"


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "merged_4bit", "gguf"])
def test_export_into_the_run_folder_keeps_the_adapter_and_other_files(trained, tmp_path, method):
    """`fastlm export --adapter run/adapter --output-dir run` deleted the adapter it had read."""
    if method == "merged_4bit":
        pytest.importorskip("bitsandbytes.functional")
    _, adapter = trained
    run_dir = tmp_path / "run"
    shutil.copytree(adapter, run_dir / "adapter")
    before = {
        **add_user_files(run_dir),
        **{f"adapter/{k}": v for k, v in snapshot(adapter).items()},
    }
    argv = ["export", "--adapter", run_dir / "adapter", "--output-dir", run_dir]
    assert run(argv + ["--method", method, "--quantization", "f16"]) == 0
    assert_kept(run_dir, before)
    assert EXPECTED[method] <= set(snapshot(run_dir))
    assert temporaries(run_dir) == []


@pytest.mark.parametrize("method", ["lora", "merged_16bit", "gguf"])
@pytest.mark.parametrize("into", ["adapter", "base"])
def test_export_into_its_own_input_is_refused(trained, capsys, method, into):
    base, adapter = trained
    target = adapter if into == "adapter" else base
    before = snapshot(target)
    argv = ["export", "--adapter", adapter, "--model", base, "--output-dir", target]
    assert run(argv + ["--method", method]) == 1
    assert "reads from" in one_error_line(capsys)
    assert snapshot(target) == before


@pytest.mark.parametrize("spelling", ["relative/", "./relative", "symlink", "symlink/"])
@pytest.mark.parametrize("flag", ["--adapter", "--model"])
def test_its_own_input_is_refused_however_the_path_is_spelt(
    trained, tmp_path, monkeypatch, capsys, flag, spelling
):
    """The --adapter folder, or the --model folder (a merged checkpoint, say), is refused as
    --output-dir through a relative path, a trailing slash or a symlink: the paths are compared
    as the folders they name."""
    base, adapter = trained
    source = adapter if flag == "--adapter" else base
    before = snapshot(source)
    monkeypatch.chdir(source.parent)
    (tmp_path / "link").symlink_to(source)
    output = {"relative/": f"{source.name}/", "./relative": f"./{source.name}"}.get(spelling)
    if output is None:
        output = str(tmp_path / "link") + spelling.removeprefix("symlink")
    assert run(["export", flag, source, "--output-dir", output, "--method", "merged_16bit"]) == 1
    line = one_error_line(capsys)
    assert "reads from" in line and "another output folder" in line
    assert snapshot(source) == before


@pytest.mark.parametrize("output", ["notes.txt", "notes.txt/merged"])
def test_output_dir_that_is_a_file_is_one_line(trained, tmp_path, capsys, output):
    _, adapter = trained
    (tmp_path / "notes.txt").write_text("keep me\n")
    assert run(["export", "--adapter", adapter, "--output-dir", tmp_path / output]) == 1
    assert "a file, not a folder" in one_error_line(capsys)
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


def test_read_only_output_dir_is_one_line(trained, tmp_path, capsys, monkeypatch):
    _, adapter = trained
    real_access = os.access
    monkeypatch.setattr(  # the tests run as root, for whom chmod does not make a folder read-only
        os, "access", lambda p, m, **kw: Path(p) != tmp_path and real_access(p, m, **kw)
    )
    assert run(["export", "--adapter", adapter, "--output-dir", tmp_path / "out"]) == 1
    assert "is not writable" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_adapter_of_another_base_model_is_one_line(trained, tmp_path, capsys):
    _, adapter = trained
    other = save_tiny_model("llama", tmp_path / "other", vocab_size=300, hidden_size=48)
    spm_tokenizer().save_pretrained(other)
    argv = ["export", "--adapter", adapter, "--model", other, "--output-dir", tmp_path / "out"]
    assert run(argv) == 1
    line = one_error_line(capsys)
    assert "model.layers.0.self_attn.q_proj.lora_A.default.weight" in line
    assert "[4, 72] in the adapter but [4, 48] in the model" in line
    assert "--model" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask", [0o022, 0o077], ids=["umask022", "umask077"])
def test_cli_exports_get_the_usual_modes(trained, tmp_path, umask):
    _, adapter = trained
    previous = os.umask(umask)
    try:
        for method in ("lora", "merged_16bit", "gguf"):
            out = tmp_path / "out" / method
            argv = ["export", "--adapter", adapter, "--method", method, "--output-dir", out]
            assert run(argv) == 0
    finally:
        os.umask(previous)
    written = list((tmp_path / "out").rglob("*"))
    assert any(p.suffix == ".gguf" for p in written) and len(written) > 15
    for path in written:
        mode = stat.S_IMODE(path.stat().st_mode)
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert mode == want, f"{path.relative_to(tmp_path)}: {oct(mode)}, want {oct(want)}"
