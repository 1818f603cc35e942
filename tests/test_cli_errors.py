"""Every bad input to ``fastlm sft`` / ``embed`` / ``rerank`` is one line on stderr and exit code 1;
an interrupted ``fastlm sft`` (Ctrl-C or SIGTERM) stops at the end of the optimizer step under way
and saves a checkpoint that ``--resume`` continues; a second signal stops at once, saving nothing.

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

pytestmark = pytest.mark.usefixtures("one_thread", "cli_logging")


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
        ("embed", ["--resume", "--output-dir", "TMP"], "--resume: no complete checkpoint in"),
        ("rerank", ["--resume", "--output-dir", "TMP"], "--resume: no complete checkpoint in"),
        ("embed", ["--resume", "TMP/nowhere"], "--resume TMP/nowhere: no such folder"),
    ],
)
def test_embed_and_rerank_share_the_checks(command, extra, pattern, root, tmp_path, capsys):
    extra = [str(root / "chat.jsonl") if value == "FILE" else value for value in extra]
    extra = [value.replace("TMP", str(tmp_path)) for value in extra]
    pattern = pattern.replace("TMP", str(tmp_path))
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


def _signalling(event: str, step: int, *signals: int):
    """A TrainerCallback that sends ``signals`` to this process (real signals, as Ctrl-C or
    ``kill`` deliver them) once, at ``event`` (a TrainerCallback method) of the first call where
    ``state.global_step == step``. "optimizer.step": inside ``optimizer.step()``, once the
    parameters are updated, before the scheduler step and the step count, where an interrupt
    used to leave an update half done (a checkpoint of update N+1's weights labelled N)."""
    from transformers import TrainerCallback

    class Signalling(TrainerCallback):
        sent = False

        def send(self, state) -> None:
            if not self.sent and state.global_step == step:
                self.sent = True
                for number in signals:
                    os.kill(os.getpid(), number)

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if event == "optimizer.step":
                torch_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrap
                torch_optimizer.register_step_post_hook(lambda *_: self.send(state))

    if event != "optimizer.step":
        setattr(Signalling, event, lambda self, args, state, control, **kw: self.send(state))
    return Signalling()


def _interrupting(monkeypatch, module, event: str, step: int, *signals: int) -> None:
    """``module._trainer`` (sft's, embed's) gives trainers that get ``_signalling``'s callback."""
    make_trainer = module._trainer

    def with_signals(*args, **kwargs):
        trainer = make_trainer(*args, **kwargs)
        trainer.add_callback(_signalling(event, step, *signals))
        return trainer

    monkeypatch.setattr(module, "_trainer", with_signals)


STOPPING_LINE = (
    "fastlm: stopping after this step and saving a checkpoint; press Ctrl-C again to stop at once"
)


@pytest.fixture(scope="module")
def reference(root, tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint of every update (the output folder)."""
    import logging
    import warnings

    import torch

    out = tmp_path_factory.mktemp("reference")
    logger = logging.getLogger("fastlm")
    saved = (list(logger.handlers), logger.level, logger.propagate, torch.get_num_threads())
    torch.set_num_threads(1)  # as the tests (one_thread): the same sums
    with warnings.catch_warnings():
        assert cli.main(sft_argv(root, out, "--save-steps", "1")) == 0
    logger.handlers[:], logger.level, logger.propagate, threads = saved
    torch.set_num_threads(threads)
    return out


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))


def _assert_same_weights(checkpoint: Path, reference_checkpoint: Path) -> None:
    """The adapter of ``checkpoint`` is the uninterrupted run's at that step."""
    import torch
    from safetensors.torch import load_file

    ours = load_file(checkpoint / "adapter_model.safetensors")
    theirs = load_file(reference_checkpoint / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-5, atol=1e-7, msg=name)


def _continue_with(out: Path) -> str:
    return f"continue with: fastlm sft --config {out / 'sft_config.json'} --resume"


def test_sigterm_inside_an_optimizer_step_saves_that_step_and_resume_continues(
    root, reference, tmp_path, monkeypatch, capsys
):
    """SIGTERM inside optimizer.step() of update 3 of 6: update 3 is completed (scheduler, step
    count) and the Trainer saves checkpoint-3, the newest (--save-total-limit 1): the
    uninterrupted run's weights at step 3, exit 130; --resume reaches update 6 with the same
    losses as the uninterrupted run."""
    out = tmp_path / "out"
    flags = ("--save-steps", "2", "--save-total-limit", "1")
    _interrupting(monkeypatch, sft, "optimizer.step", 2, signal.SIGTERM)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    capsys.readouterr()
    assert cli.main(sft_argv(root, out, *flags)) == 130
    # the handlers are training's alone, and the command's alone
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert err.count(STOPPING_LINE) == 1, err
    assert err[-1] == (
        f"fastlm sft: interrupted: saved {checkpoint} (step 3 of 6); {_continue_with(out)}"
    )
    assert "Traceback" not in "\n".join(err)
    # --save-total-limit 1: checkpoint-2 went when checkpoint-3 came
    assert _checkpoints(out) == ["checkpoint-3"]
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 3
    _assert_same_weights(checkpoint, reference / "checkpoints" / "checkpoint-3")
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
    # TRL's token count starts again at 0: the checkpoint's log has the first steps' tokens
    assert resumed["trained_tokens"] == uninterrupted["trained_tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert _checkpoints(out) == ["checkpoint-6"]


def test_ctrl_c_inside_gradient_accumulation_completes_the_update(
    root, reference, tmp_path, monkeypatch, capsys
):
    """Ctrl-C after the first of update 4's two micro-batches: the second one runs, update 4 is
    applied and saved (checkpoint-4, without --save-steps), with the losses of steps 1-4."""
    out = tmp_path / "out"
    _interrupting(monkeypatch, sft, "on_substep_end", 3, signal.SIGINT)
    assert cli.main(sft_argv(root, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    checkpoint = out / "checkpoints" / "checkpoint-4"
    assert err.count(STOPPING_LINE) == 1, err
    assert err[-1] == (
        f"fastlm sft: interrupted: saved {checkpoint} (step 4 of 6); {_continue_with(out)}"
    )
    assert _checkpoints(out) == ["checkpoint-4"]
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert [entry["step"] for entry in state["log_history"] if "loss" in entry] == [1, 2, 3, 4]
    _assert_same_weights(checkpoint, reference / "checkpoints" / "checkpoint-4")


def test_a_signal_during_evaluation_saves_the_step_it_follows(root, tmp_path, monkeypatch, capsys):
    """SIGTERM while the evaluation after update 2 runs: it finishes (its loss is logged), then
    checkpoint-2 is saved and training stops there."""
    out = tmp_path / "out"
    _interrupting(monkeypatch, sft, "on_prediction_step", 2, signal.SIGTERM)
    argv = sft_argv(root, out, "--eval-data", root / "chat.jsonl", "--eval-steps", "2")
    assert cli.main(argv) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"fastlm sft: interrupted: saved {out / 'checkpoints'}/checkpoint-2 ")
    assert _checkpoints(out) == ["checkpoint-2"]
    state = json.loads((out / "checkpoints" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [2]


@pytest.mark.parametrize("save_steps", [None, 2])
def test_a_second_signal_stops_at_once_and_saves_nothing(
    save_steps, root, tmp_path, monkeypatch, capsys
):
    """SIGTERM, then Ctrl-C, inside update 4: no checkpoint is written after them (update 4 may
    be half applied); the line names the newest complete checkpoint, if any."""
    out = tmp_path / "out"
    flags = ("--save-steps", str(save_steps)) if save_steps else ()
    _interrupting(monkeypatch, sft, "on_substep_end", 3, signal.SIGTERM, signal.SIGINT)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert cli.main(sft_argv(root, out, *flags)) == 130
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == previous
    err = capsys.readouterr().err.strip().splitlines()
    assert err.count(STOPPING_LINE) == 1, err
    assert "Traceback" not in "\n".join(err)
    if save_steps:
        assert _checkpoints(out) == ["checkpoint-2"]
        assert err[-1] == (
            "fastlm sft: interrupted: stopped at once; nothing was saved. The newest complete "
            f"checkpoint is {out / 'checkpoints' / 'checkpoint-2'} (step 2 of 6); "
            f"{_continue_with(out)}"
        )
    else:
        assert not list(out.glob("checkpoints/checkpoint-*"))
        assert err[-1] == (
            "fastlm sft: interrupted: stopped at once; nothing was saved, and there is no "
            "checkpoint to continue from"
        )
    assert not (out / "adapter").exists()


def test_ctrl_c_before_the_first_update_stops_after_it_and_resume_checks_the_rank(
    root, tmp_path, monkeypatch, capsys
):
    """Ctrl-C inside update 1 stops after it (checkpoint-1); --resume from it with another LoRA
    rank is refused in one line."""
    out = tmp_path / "out"
    _interrupting(monkeypatch, sft, "on_substep_end", 0, signal.SIGINT)
    assert cli.main(sft_argv(root, out)) == 130
    checkpoint = out / "checkpoints" / "checkpoint-1"
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        last == f"fastlm sft: interrupted: saved {checkpoint} (step 1 of 6); {_continue_with(out)}"
    )
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 1
    monkeypatch.undo()
    argv = sft_argv(root, out, "--resume", checkpoint)
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
