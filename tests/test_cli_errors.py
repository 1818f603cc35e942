"""Every bad input to ``fastlm sft`` / ``embed`` / ``rerank`` is one line on stderr and exit code 1;
an interrupted ``fastlm sft`` (Ctrl-C or SIGTERM) saves a checkpoint that ``--resume`` continues.

Commands run in-process through ``fastlm.cli.main(argv)`` on a tiny Llama (CPU, a few steps).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from tiny_models import save_tiny_model

from fastlm import cli
from fastlm.commands import sft

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.main configures the "fastlm" logger and warning filters for a terminal: undo it."""
    import logging
    import warnings

    logger = logging.getLogger("fastlm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    with warnings.catch_warnings():
        yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A tiny Llama (256 positions, character tokenizer) and 16 chat records."""
    root = tmp_path_factory.mktemp("cli_errors")
    save_tiny_model("llama", root / "llama")
    records = [
        {
            "messages": [
                {"role": "user", "content": f"add {i} and {i + 1}"},
                {"role": "assistant", "content": str(2 * i + 1)},
            ]
        }
        for i in range(16)
    ]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


def sft_argv(root: Path, out: Path, *extra) -> list[str]:
    """``fastlm sft`` on the tiny Llama: 6 updates of 2 micro-batches of 2 rows."""
    argv = ["sft", "--model", root / "llama", "--data", root / "chat.jsonl", "--output-dir", out]
    argv += ["--max-steps", 6, "--batch-size", 2, "--grad-accum", 2, "--lr", 1e-2]
    argv += ["--warmup-steps", 0, "--max-seq-length", 64, "--lora-r", 4, *extra]
    return [str(a) for a in argv]


def one_error_line(capsys, command: str = "sft") -> str:
    """stderr's error: one line, the last, no traceback; returns it. Other stderr lines may only
    be fastlm's own log lines (e.g. "fastlm: 15 of 15 projections run fused")."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and "Traceback" not in "\n".join(lines), lines
    errors = [line for line in lines if line.startswith(f"fastlm {command}: error: ")]
    assert errors == [lines[-1]], lines
    assert all(line.startswith("fastlm") for line in lines), lines
    return lines[-1]


# --------------------------------------------------------------------------- refused before loading


def _damaged_model(root: Path, tmp_path: Path) -> Path:
    folder = shutil.copytree(root / "llama", tmp_path / "damaged")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    return folder


def _adapter_only(root: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    config = {"base_model_name_or_path": str(root / "llama"), "peft_type": "LORA"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


# (extra flags, or a function (root, tmp_path) -> extra flags; the error line's pattern)
SFT_REFUSALS = {
    "negative lr": (["--lr", "-1"], "--lr must be greater than 0"),
    "no epochs": (["--epochs", "0", "--max-steps", "1"], "--epochs must be greater than 0"),
    "dropout above 1": (["--lora-dropout", "1.5"], r"--lora-dropout must be in \[0, 1\), got 1.5"),
    "output dir is a file": (
        lambda root, tmp: ["--output-dir", root / "chat.jsonl"],
        "chat.jsonl is a file; pass a folder",
    ),
    "output dir inside a file": (
        lambda root, tmp: ["--output-dir", root / "chat.jsonl" / "out"],
        "is inside .*chat.jsonl, which is a file",
    ),
    "limit without checkpoints": (["--save-total-limit", "2"], "it needs --save-steps"),
    "resume without checkpoints": (["--resume"], "--resume: no complete checkpoint in"),
    "resume a missing folder": (
        lambda root, tmp: ["--resume", tmp / "nowhere"],
        "--resume .*nowhere: no such folder",
    ),
    "missing model folder": (
        lambda root, tmp: ["--model", tmp / "no" / "such" / "model"],
        "model: no such folder$",
    ),
    "hub name, offline": (
        ["--model", "org/not-cached"],
        "org/not-cached: no such folder, and no Hub model of that name in the Hugging Face cache",
    ),
    "folder without config.json": (
        lambda root, tmp: ["--model", tmp],
        "has no config.json, so it is not a Hugging Face model folder",
    ),
    "model is a file": (
        lambda root, tmp: ["--model", root / "chat.jsonl"],
        "chat.jsonl is a file; pass the model's folder",
    ),
    "truncated weights": (
        lambda root, tmp: ["--model", _damaged_model(root, tmp)],
        "model.safetensors is damaged: truncated",
    ),
    "adapter as model": (
        lambda root, tmp: ["--model", _adapter_only(root, tmp)],
        "is a LoRA adapter: pass the model it was trained on",
    ),
}


@pytest.mark.parametrize("case", SFT_REFUSALS)
def test_sft_refuses_bad_input_in_one_line(case, root, tmp_path, capsys):
    extra, pattern = SFT_REFUSALS[case]
    if callable(extra):
        extra = extra(root, tmp_path)
    assert cli.main(sft_argv(root, tmp_path / "out", *extra)) == 1
    capsys_lines = capsys.readouterr().err.strip().splitlines()
    # nothing was loaded or trained: the error is all that stderr holds
    assert len(capsys_lines) == 1 and "Traceback" not in capsys_lines[0], capsys_lines
    import re

    assert capsys_lines[0].startswith("fastlm sft: error: ")
    assert re.search(pattern, capsys_lines[0]), capsys_lines[0]
    assert not (tmp_path / "out" / "adapter").exists()


def test_sft_refuses_unknown_target_modules(root, tmp_path, capsys):
    # one typo among several names used to train the others, silently
    argv = sft_argv(root, tmp_path / "out", "--target-modules", "q_proj", "vv_proj")
    assert cli.main(argv) == 1
    line = one_error_line(capsys)
    assert "target_modules ['vv_proj'] match no layer" in line and "v_proj" in line


def test_sft_with_every_answer_cut_off_says_why(root, tmp_path, capsys):
    # The prompts are longer than 6 tokens: TRL drops every example, and the Trainer then failed
    # with "num_samples should be a positive integer value, but got num_samples=0".
    assert cli.main(sft_argv(root, tmp_path / "out", "--max-seq-length", "6")) == 1
    line = one_error_line(capsys)
    assert "none of the 16 examples keeps a token to train on within --max-seq-length 6" in line


def test_max_seq_length_past_the_positions_is_one_warning_line(root, tmp_path, capsys):
    """Not refused (RoPE runs past the trained positions, and a config's RoPE scaling may extend
    them), but said once; without the flag, the default (2048) is capped to the 256 positions."""
    argv = sft_argv(root, tmp_path / "out", "--max-seq-length", "100000", "--max-steps", "1")
    assert cli.main(argv) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "positions" in line]
    assert len(warnings) == 1
    assert "max_seq_length=100000 is longer than the 256 positions" in warnings[0]
    argv = sft_argv(root, tmp_path / "out")
    argv.remove("--max-seq-length"), argv.remove("64")
    args = cli.parse_args(argv)
    from fastlm.commands import _training

    assert args.max_seq_length is None
    assert _training.max_seq_length(args, str(root / "llama"), 2048) == 256


@pytest.mark.parametrize(
    "command, extra, pattern",
    [
        ("embed", ["--lora-dropout", "-0.1"], "--lora-dropout must be in"),
        ("embed", ["--max-grad-norm", "-1"], "--max-grad-norm must be at least 0"),
        ("rerank", ["--output-dir", "FILE"], "is a file; pass a folder"),
        ("rerank", ["--save-total-limit", "0", "--save-steps", "1"], "must be at least 1"),
    ],
)
def test_embed_and_rerank_share_the_checks(command, extra, pattern, root, capsys):
    extra = [str(root / "chat.jsonl") if value == "FILE" else value for value in extra]
    assert cli.main([command, "--model", str(root / "llama"), *extra]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastlm {command}: error: ")
    assert pattern in lines[0]


# --------------------------------------------------------------------------- paths in run files


def test_a_relative_model_path_is_stored_absolute(root, tmp_path, monkeypatch):
    """The adapter and run files name the model by absolute path: `fastlm export` and
    `from_pretrained(adapter)` work from another folder."""
    from fastlm import FastModel

    shutil.copytree(root / "llama", tmp_path / "work" / "llama")
    shutil.copy(root / "chat.jsonl", tmp_path / "work" / "chat.jsonl")
    monkeypatch.chdir(tmp_path / "work")
    argv = ["sft", "--model", "llama", "--data", "chat.jsonl", "--output-dir", "out"]
    argv += ["--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"]
    argv += ["--max-seq-length", "64", "--lora-r", "4"]
    assert cli.main(argv) == 0
    out = tmp_path / "work" / "out"
    model = str(tmp_path / "work" / "llama")
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == model
    settings = json.loads((out / "sft_config.json").read_text())
    assert settings["model"] == model and settings["output-dir"] == str(out)
    assert settings["data"] == str(tmp_path / "work" / "chat.jsonl")
    assert json.loads((out / "sft_summary.json").read_text())["model"] == model
    monkeypatch.chdir(tmp_path)
    peft_model, _ = FastModel.from_pretrained("work/out/adapter", device_map="cpu")
    assert peft_model.peft_config["default"].r == 4


# --------------------------------------------------------------------------- interrupt and resume


class _Interrupt:
    """A TrainerCallback that interrupts the run inside update ``step + 1`` (after its first
    micro-batch, with gradients half accumulated), as SIGTERM or Ctrl-C (SIGINT) would."""

    def __new__(cls, step: int, how: str):
        from transformers import TrainerCallback

        class Interrupt(TrainerCallback):
            def on_substep_end(self, args, state, control, **kwargs):
                if state.global_step == step:
                    if how == "sigterm":
                        os.kill(os.getpid(), signal.SIGTERM)  # fastlm.cli's handler raises
                    else:
                        raise KeyboardInterrupt

        return Interrupt()


def _interrupting(monkeypatch, step: int, how: str) -> None:
    make_trainer = sft._trainer

    def with_interrupt(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(_Interrupt(step, how))
        return trainer

    monkeypatch.setattr(sft, "_trainer", with_interrupt)


def test_sigterm_saves_a_checkpoint_that_resume_continues(root, tmp_path, monkeypatch, capsys):
    """SIGTERM after update 3 of 6 -> checkpoint-3 (the newest; --save-total-limit 1) and exit
    130; --resume reaches update 6 with the same losses as an uninterrupted run."""
    reference = tmp_path / "reference"
    assert cli.main(sft_argv(root, reference)) == 0
    out = tmp_path / "out"
    flags = ("--save-steps", "2", "--save-total-limit", "1")
    _interrupting(monkeypatch, 3, "sigterm")
    previous = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert cli.main(sft_argv(root, out, *flags)) == 130
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is the command's alone
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert err[-1] == (
        f"fastlm sft: interrupted: saved {checkpoint} (step 3 of 6); continue with: "
        f"fastlm sft --config {out / 'sft_config.json'} --resume"
    )
    assert "Traceback" not in "\n".join(err)
    # --save-total-limit 1: checkpoint-2 went when checkpoint-3 came
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-3"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    assert not (out / "adapter").exists()
    # A save cut short (no trainer_state.json, written last) must not be resumed from.
    (out / "checkpoints" / "checkpoint-5").mkdir()
    (out / "checkpoints" / "checkpoint-5" / "adapter_model.safetensors").write_bytes(b"half")

    monkeypatch.undo()
    capsys.readouterr()
    assert cli.main(["sft", "--config", str(out / "sft_config.json"), "--resume"]) == 0
    assert f"resuming from {checkpoint}" in capsys.readouterr().out
    resumed = json.loads((out / "sft_summary.json").read_text())
    uninterrupted = json.loads((reference / "sft_summary.json").read_text())
    assert resumed["steps"] == 6 and len(resumed["losses"]) == 6
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-5)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-6"]


def test_ctrl_c_before_the_first_update_saves_nothing(root, tmp_path, monkeypatch, capsys):
    _interrupting(monkeypatch, 0, "sigint")
    assert cli.main(sft_argv(root, tmp_path / "out")) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == "fastlm sft: interrupted: before the first optimizer update; nothing to save"
    assert not list((tmp_path / "out").glob("checkpoints/checkpoint-*"))


def test_resume_refuses_a_checkpoint_of_another_rank(root, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _interrupting(monkeypatch, 1, "sigint")
    assert cli.main(sft_argv(root, out)) == 130
    assert (out / "checkpoints" / "checkpoint-1" / "trainer_state.json").exists()
    monkeypatch.undo()
    capsys.readouterr()
    argv = sft_argv(root, out, "--resume", out / "checkpoints" / "checkpoint-1")
    argv[argv.index("--lora-r") + 1] = "8"
    assert cli.main(argv) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "has LoRA rank 4, not --lora-r 8" in lines[0]


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    from fastlm.commands import _training

    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_st'), (10, None)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if state is not None:
            (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-x").mkdir()
    assert _training.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert _training.resume_checkpoint(str(tmp_path), "unused") == str(tmp_path / "checkpoint-2")
    with pytest.raises(_training.CommandError, match="incomplete checkpoint"):
        _training.resume_checkpoint(str(tmp_path / "checkpoint-10"), "unused")
