"""The ``fastlm`` command line: ``fastlm <command> [options]`` (also ``python -m fastlm``).

Commands live in ``COMMANDS``: each names a module with ``add_arguments(parser)`` and
``main(args) -> int``, imported only when that command runs (``fastlm --help`` stays quick).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings


def _offline_by_default() -> None:
    """No network unless the user asks for it: HF_HUB_OFFLINE=1 unless already set."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # already imported (``import fastlm`` pulls in transformers)
        hub.HF_HUB_OFFLINE = True


_offline_by_default()

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "fastlm.demo",
        "LoRA-train the real Gemma 3 270M on the bundled event->JSON data; before/after",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from fastlm import __version__

    parser = argparse.ArgumentParser(
        prog="fastlm", description="fastlm: fast, exact LoRA fine-tuning."
    )
    parser.add_argument("--version", action="version", version=f"fastlm {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging (fastlm and transformers)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(command)
    return parser


def _setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    fastlm_logger = logging.getLogger("fastlm")
    if not any(getattr(h, "_fastlm_cli", False) for h in fastlm_logger.handlers):
        handler = logging.StreamHandler()
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


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``) and run the command; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose, args.quiet)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except KeyboardInterrupt:
        print("fastlm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
