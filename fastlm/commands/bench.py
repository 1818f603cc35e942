"""``fastlm bench``: the side-by-side training benchmark (HF + PEFT, fastlm, Liger, Unsloth).

The benchmark is installed with fastlm (``fastlm.benchmarking``): this command runs it in a new
Python process, ``python -m fastlm.benchmarking.train_bench``, with the flags given here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fastlm.commands import CommandError

MODULE = "fastlm.benchmarking.train_bench"
EXAMPLES = """\
examples:
  fastlm bench --list-shapes                                  # the model shapes it knows
  fastlm bench --shapes llama-3.2-1b --systems hf,fastlm       # LoRA, one GPU
  fastlm bench --shapes llama-3.1-8b --mode qlora --out benchmarks/results/qlora-8b
  fastlm bench --shapes tiny-llama --systems hf,fastlm --steps 2 --warmup 1   # CPU smoke test
  fastlm bench --shapes tiny-llama -- --append                # anything after -- goes as is

Each (shape, system) runs in its own process on the same random-init checkpoint and data; the
results (results.json, results.md, results.png) go to --out. Liger-Kernel and Unsloth are
measured when they are installed, and recorded as skipped otherwise.
"""
# flag -> help; each is forwarded to train_bench.py only when given.
_FORWARDED = {
    "--shapes": "comma list of shapes (see --list-shapes)",
    "--systems": "comma list of: hf,fastlm,liger,unsloth",
    "--mode": "lora or qlora",
    "--out": "output folder (default benchmarks/results/<date>-<mode>)",
    "--cache": "folder of the random-init checkpoints (default /tmp/fastlm-bench)",
    "--warmup": "warm-up steps (default 3)",
    "--steps": "timed steps (default 10)",
    "--seq": "override every shape's sequence length",
    "--batch": "override every shape's batch size",
    "--child-timeout": "seconds per (shape, system) process (default 1200)",
}


_METAVARS = {"--shapes": "LIST", "--systems": "LIST", "--out": "DIR", "--cache": "DIR"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm bench`` flags (those of fastlm.benchmarking.train_bench)."""
    for flag, help_text in _FORWARDED.items():
        choices = ("lora", "qlora") if flag == "--mode" else None
        metavar = None if choices else _METAVARS.get(flag, "N")
        parser.add_argument(flag, help=help_text, choices=choices, metavar=metavar)
    parser.add_argument("--append", action="store_true", help="keep earlier records in --out")
    parser.add_argument("--list-shapes", action="store_true", help="print the shapes and exit")
    parser.add_argument(
        "--script",
        metavar="PATH",
        help="run this script instead (e.g. another checkout's benchmarks/train_bench.py)",
    )
    parser.add_argument("extra", nargs="*", metavar="-- ARGS", help="passed on unchanged")


def command_line(args: argparse.Namespace) -> list[str]:
    """The benchmark's command for ``args``: the installed module, or ``--script``."""
    if args.script:
        script = Path(args.script)
        if not script.is_file():
            raise CommandError(f"--script {args.script}: no such file")
        command = [sys.executable, str(script.resolve())]
    else:
        command = [sys.executable, "-m", MODULE]
    for flag in _FORWARDED:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            command += [flag, str(value)]
    if args.append:
        command.append("--append")
    if args.list_shapes:
        command.append("--list-shapes")
    return command + list(args.extra)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm bench`` (called by ``fastlm.cli``): the benchmark's exit code.

    The new process has this one's environment and folder, so ``-m`` finds the same fastlm."""
    command = command_line(args)
    sys.stdout.flush()
    return subprocess.run(command).returncode
