"""``fastlm bench``: the side-by-side training benchmarks (HF + PEFT, fastlm, Liger, Unsloth).

The benchmarks are installed with fastlm (``fastlm.benchmarking``): this command runs one in a
new Python process — ``python -m fastlm.benchmarking.train_bench`` (the reference loop), or with
``--loop sft`` / ``--loop embed`` / ``--loop packing`` the SFTTrainer / embedding / packing
(padded vs padding-free on real lengths) benchmark, or with ``--suite`` every row of a table
(``fastlm.benchmarking.suite``) — with the flags given here.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from fastlm.commands import CommandError

MODULE = "fastlm.benchmarking.train_bench"
LOOP_MODULES = {
    "train": MODULE,
    "sft": "fastlm.benchmarking.sft_bench",
    "embed": "fastlm.benchmarking.embedding_bench",
    "packing": "fastlm.benchmarking.packing_bench",
}
SUITE_MODULE = "fastlm.benchmarking.suite"
EXAMPLES = """\
examples:
  fastlm bench --list-shapes                                  # the model shapes it knows
  fastlm bench --shapes llama-3.2-1b --systems hf,fastlm       # LoRA, one GPU
  fastlm bench --shapes llama-3.1-8b --mode qlora --out benchmarks/results/qlora-8b
  fastlm bench --loop sft --shapes llama-3.2-1b                # TRL SFTTrainer as users run it
  fastlm bench --loop embed --shapes qwen3-embedding-0.6b --mode full
  fastlm bench --loop packing --shapes qwen3-4b --mode qlora   # padded vs padding-free
  fastlm bench --loop packing --dry-run                       # its tiny CPU smoke test
  fastlm bench --suite issue15 --rows 1-3 --out DIR           # a part of the whole table;
  fastlm bench --suite issue15 --rows 4-9 --out DIR           #   parts append to DIR
  fastlm bench --suite issue15 --dry-run                      # every row on tiny shapes (CPU)
  fastlm bench --shapes tiny-llama --systems hf,fastlm --steps 2 --warmup 1   # CPU smoke test
  fastlm bench --shapes tiny-llama -- --append                # anything after -- goes as is

Each (shape, system) runs in its own process on the same random-init checkpoint and data; the
results (results.json, results.md, results.png) go to --out. Liger-Kernel and Unsloth are
measured when they are installed, and recorded as skipped otherwise.
"""
# flag -> help; each is forwarded to train_bench.py only when given.
_FORWARDED = {
    "--shapes": "comma list of shapes (see --list-shapes)",
    "--systems": "comma list of: hf,fastlm,liger,unsloth (embed: hf,st,unsloth,fastlm)",
    "--mode": "lora or qlora (embed: lora or full)",
    "--rows": "with --suite: the rows to run, e.g. 1-3 or 2,7,9 (default all)",
    "--out": "output folder (default benchmarks/results/<date>-<mode>)",
    "--cache": "folder of the random-init checkpoints (default /tmp/fastlm-bench)",
    "--warmup": "warm-up steps (default 3)",
    "--steps": "timed steps (default 10)",
    "--seq": "override every shape's sequence length",
    "--batch": "override every shape's batch size",
    "--child-timeout": "seconds per (shape, system) process (default 1200; suite 420)",
}
# Flags the suite takes (the others set each row's loop and shape).
_SUITE_FLAGS = ("--rows", "--systems", "--out", "--cache", "--warmup", "--steps", "--child-timeout")


_METAVARS = {"--shapes": "LIST", "--systems": "LIST", "--out": "DIR", "--cache": "DIR"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm bench`` flags (those of fastlm.benchmarking.train_bench)."""
    for flag, help_text in _FORWARDED.items():
        choices = ("lora", "qlora", "full") if flag == "--mode" else None
        metavar = None if choices else _METAVARS.get(flag, "N")
        parser.add_argument(flag, help=help_text, choices=choices, metavar=metavar)
    parser.add_argument(
        "--loop",
        choices=tuple(LOOP_MODULES),
        default="train",
        help="train: the reference loop (default); sft: TRL's SFTTrainer as a user runs it; "
        "embed: embedding fine-tuning (InfoNCE); packing: padded vs padding-free batches of "
        "real instruction-data lengths",
    )
    parser.add_argument(
        "--suite",
        metavar="NAME",
        help="run every row of a table (issue15: LoRA/QLoRA, embeddings, SFTTrainer) into one "
        "--out; split it with --rows into parts of under 10 minutes, same --out",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="with --suite or --loop packing: tiny shapes"
    )
    parser.add_argument(
        "--resume", action="store_true", help="with --suite: skip what --out already has"
    )
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
    elif args.suite:
        command = [sys.executable, "-m", SUITE_MODULE, "--suite", args.suite]
    else:
        command = [sys.executable, "-m", LOOP_MODULES[args.loop]]
    if args.suite:
        for flag in _SUITE_FLAGS:
            value = getattr(args, flag.lstrip("-").replace("-", "_"))
            if value is not None:
                command += [flag, str(value)]
        flags = {"--dry-run": args.dry_run, "--resume": args.resume}
        flags["--list-rows"] = args.list_shapes
        return command + [f for f, on in flags.items() if on] + list(args.extra)
    if args.rows or args.resume or (args.dry_run and args.loop != "packing"):
        raise CommandError("--rows and --resume go with --suite, --dry-run with --suite or "
                           "--loop packing")  # fmt: skip
    for flag in _FORWARDED:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            command += [flag, str(value)]
    if args.append:
        command.append("--append")
    if args.dry_run:
        command.append("--dry-run")
    if args.list_shapes:
        command.append("--list-shapes")
    return command + list(args.extra)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm bench`` (called by ``fastlm.cli``): the benchmark's exit code.

    The new process has this one's environment and folder, so ``-m`` finds the same fastlm."""
    command = command_line(args)
    sys.stdout.flush()
    return subprocess.run(command).returncode
