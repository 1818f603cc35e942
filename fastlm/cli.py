"""The ``fastlm`` command line: ``fastlm <command> [options]`` (also ``python -m fastlm``).

    fastlm sft --data train.jsonl             # fine-tune (LoRA / QLoRA / full) with TRL
    fastlm export --adapter outputs/sft/adapter --method gguf --output-dir out
    fastlm bench --shapes llama-3.2-1b        # side-by-side training benchmark
    fastlm info                               # versions, GPUs, supported models and exports
    fastlm demo                               # the bundled Gemma 3 270M before/after demo

Commands live in ``COMMANDS``: each names a module with ``add_arguments(parser)`` and
``main(args) -> int`` (and optionally ``EXAMPLES``, the end of its ``--help``). To add one, write
``fastlm/commands/<name>.py`` and add a line to ``COMMANDS``. A command with a ``--config`` flag
also reads its flags from a YAML/TOML/JSON file (``fastlm.cli_config``); flags given win.
Commands run offline: ``main`` sets HF_HUB_OFFLINE=1 unless it is set (``HF_HUB_OFFLINE=0``
downloads from the Hugging Face Hub); importing this module changes nothing.
Errors fastlm raises on purpose (``FastLMError``) are printed without a traceback (exit code 1;
``-v`` shows it). Ctrl-C and SIGTERM stop a command alike (exit code 130). During training the
first one stops at the end of the current optimizer step (``fastlm sft``, ``embed`` and
``rerank`` save that step's checkpoint and say how to continue: ``--resume``) and a second one at
once (``_training.stop_at_step_end``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator

from fastlm import __version__
from fastlm.cli_config import apply_config, load_config_file
from fastlm.errors import FastLMError


def _offline_by_default() -> None:
    """No network unless the user asks for it: HF_HUB_OFFLINE=1 unless already set.

    Called by ``main`` when a command runs, never on import (importing changes nothing;
    tests/test_import_side_effects.py checks it)."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # huggingface_hub read the variable on import: set its copy too
        hub.HF_HUB_OFFLINE = True


# name -> (module, one-line help). The subcommand registry: add new commands here.
COMMANDS: dict[str, tuple[str, str]] = {
    "sft": (
        "fastlm.commands.sft",
        "fine-tune on a JSONL/JSON data set (LoRA, QLoRA or full) with TRL's SFTTrainer",
    ),
    "export": (
        "fastlm.commands.export",
        "write a trained adapter as a merged 16-bit / 4-bit checkpoint or GGUF",
    ),
    "bench": (
        "fastlm.commands.bench",
        "side-by-side training benchmark: HF+PEFT, fastlm, Liger, Unsloth",
    ),
    "info": (
        "fastlm.commands.info",
        "versions, GPUs, supported model families and export formats",
    ),
    "demo": (
        "fastlm.demo",
        "LoRA-train the real Gemma 3 270M on the bundled event->JSON data; before/after",
    ),
    "embed": ("fastlm.commands.embed", "fine-tune an embedding model (retrieval / scored pairs)"),
    "rerank": (
        "fastlm.commands.rerank",
        "fine-tune a reranker (a causal LM scored by yes vs no) on listwise or pointwise rows",
    ),
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written; a flag's default shown after its help when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default == argparse.SUPPRESS or "default" in text:
            return text
        if isinstance(default, list):
            default = " ".join(map(str, default))
        return f"{text} (default: {default})" if text else f"default: {default}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlm",
        description="fastlm: fast, exact LoRA fine-tuning.",
        epilog="Run `fastlm COMMAND --help` for a command's flags and examples.",
    )
    parser.add_argument("--version", action="version", version=f"fastlm {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (fastlm and transformers)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.command_parsers = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        examples = getattr(module, "EXAMPLES", None)
        if examples is None:  # a command without examples keeps argparse's plain help
            command = sub.add_parser(name, help=help_text, description=help_text)
        else:
            command = sub.add_parser(
                name,
                help=help_text,
                description=help_text,
                epilog=examples,
                formatter_class=_HelpFormatter,
            )
        module.add_arguments(command)
        parser.command_parsers[name] = command
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` as parsed by the command's parser, with its ``--config`` file applied."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = getattr(args, "config", None)
    if config:
        command = parser.command_parsers[args.command]
        apply_config(command, load_config_file(config), source=f"--config {config}")
        args = parser.parse_args(argv)  # flags on the command line win over the file
    args._parser = parser
    return args


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (main() may run many times in one process)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    fastlm_logger = logging.getLogger("fastlm")
    if not any(getattr(h, "_fastlm_cli", False) for h in fastlm_logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._fastlm_cli = True
        fastlm_logger.addHandler(handler)
    fastlm_logger.setLevel(level)
    fastlm_logger.propagate = False
    if not verbose:  # library deprecation notices are not the user's to act on
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(logging.INFO if verbose else logging.ERROR)
        if not verbose:
            hf_logging.disable_progress_bar()  # the "Loading weights" bar: a few seconds
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM (``kill``, a job scheduler, ``docker stop``) raises
    KeyboardInterrupt in the main thread as Ctrl-C does, so that the command stops the same way
    instead of dying mid-write; the previous handler after. Training sets its own handlers for
    both while it runs (``fastlm.commands._training.stop_at_step_end``)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns the exit code."""
    _offline_by_default()  # before anything that may reach the Hub

    try:
        args = parse_args(argv)
    except FastLMError as error:  # a bad --config file
        print(f"fastlm: error: {error}", file=sys.stderr)
        return 2
    parser = args.__dict__.pop("_parser")
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        with _sigterm_as_interrupt():
            return int(module.main(args) or 0)
    except KeyboardInterrupt as interrupt:
        detail = f": {interrupt}" if str(interrupt) else ""
        print(f"fastlm {args.command}: interrupted{detail}", file=sys.stderr)
        return 130
    except FastLMError as error:
        if args.verbose:
            raise
        print(f"fastlm {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
