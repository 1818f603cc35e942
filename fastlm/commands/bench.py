"""``fastlm bench``: the side-by-side training benchmark (HF + PEFT, fastlm, Liger, Unsloth).

The benchmark lives in the repository (``benchmarks/train_bench.py``), not in the installed
package: this command finds it in a source checkout and runs it with the flags given here.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from fastlm.commands import CommandError

SCRIPT = Path("benchmarks") / "train_bench.py"
EXAMPLES = """\
examples:
  fastlm bench --list-shapes                                  # the model shapes it knows
  fastlm bench --shapes llama-3.2-1b --systems hf,fastlm       # LoRA, one GPU
  fastlm bench --shapes llama-3.1-8b --mode qlora --out benchmarks/results/qlora-8b
  fastlm bench --shapes tiny-llama --systems hf,fastlm --steps 2 --warmup 1   # CPU smoke test
  fastlm bench --shapes tiny-llama -- --append                # anything after -- goes as is

Each (shape, system) runs in its own process on the same random-init checkpoint and data; the
results (results.json, results.md, results.png) go to --out. Needs a fastlm source checkout
(git clone ...; pip install -e .): run it from the checkout, or pass --script.
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
    """The ``fastlm bench`` flags (those of benchmarks/train_bench.py)."""
    for flag, help_text in _FORWARDED.items():
        choices = ("lora", "qlora") if flag == "--mode" else None
        metavar = None if choices else _METAVARS.get(flag, "N")
        parser.add_argument(flag, help=help_text, choices=choices, metavar=metavar)
    parser.add_argument("--append", action="store_true", help="keep earlier records in --out")
    parser.add_argument("--list-shapes", action="store_true", help="print the shapes and exit")
    parser.add_argument(
        "--script", metavar="PATH", help=f"the benchmark script (default: {SCRIPT})"
    )
    parser.add_argument("extra", nargs="*", metavar="-- ARGS", help="passed on unchanged")


def find_script(explicit: str | None = None) -> Path:
    """benchmarks/train_bench.py of the checkout fastlm runs from, or of the current folder."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise CommandError(f"--script {explicit}: no such file")
        return path.resolve()
    import fastlm

    candidates = [Path(fastlm.__file__).resolve().parent.parent / SCRIPT, Path.cwd() / SCRIPT]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise CommandError(
        "fastlm bench runs benchmarks/train_bench.py from a fastlm source checkout, and none was "
        "found (the pip package does not include the benchmarks). Clone the repository, "
        "`pip install -e .` in it and run `fastlm bench` there, or pass --script PATH."
    )


def command_line(args: argparse.Namespace, script: Path) -> list[str]:
    """The train_bench.py command for ``args``."""
    command = [sys.executable, str(script)]
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
    """Entry point of ``fastlm bench`` (called by ``fastlm.cli``): the benchmark's exit code."""
    script = find_script(args.script)
    command = command_line(args, script)
    env = dict(os.environ)
    repo = str(script.parent.parent)  # the benchmark imports fastlm from its checkout
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")]))
    sys.stdout.flush()
    return subprocess.run(command, env=env).returncode
