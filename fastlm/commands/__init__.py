"""The ``fastlm`` subcommands, one module each, registered in ``fastlm.cli.COMMANDS``.

A command module has ``add_arguments(parser)`` and ``main(args) -> int`` (the exit code), and may
have ``EXAMPLES`` (shown at the end of its ``--help``). Keep its top-level imports light: every
module is imported to build the parser, so ``fastlm --help`` pays for them. torch, transformers
and the fastlm layers that load them (``fastlm.api``, ``embeddings``, ``export``, ``loading``,
``models``: 1 to 5 s, against about 0.1 s for ``fastlm --help``) are imported inside the
functions that use them, each such import marked ``# lazy: start-up (fastlm.commands doc)``.
Helpers shared by the commands live here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastlm.errors import FastLMError
from fastlm.real_models import GEMMA3_270M, cache_dir, gemma3_270m_path

DTYPES = ("auto", "bfloat16", "float16", "float32")
# fastlm.export.gguf_writer.METHODS, written out: importing anything in fastlm.export loads torch
# (seconds), and every command module is imported to build the parser, for `fastlm --help` too.
# tests/test_cli.py checks that the two stay equal.
GGUF_METHODS = ("f16", "bf16", "q8_0", "q4_k_m", "q5_k_m", "q6_k")


class CommandError(FastLMError):
    """A problem with what the user asked for; ``fastlm`` prints it without a traceback."""


class Console:
    """Status lines and tables through rich, or plain print when rich is missing."""

    def __init__(self) -> None:
        try:
            from rich.console import Console as RichConsole

            self.rich = RichConsole(highlight=False, soft_wrap=True)
        except ImportError:  # pragma: no cover - rich is a dependency
            self.rich = None

    def status(self, message: str) -> None:
        if self.rich is not None:
            from rich.markup import escape

            self.rich.print(f"[bold cyan]fastlm[/] {escape(message)}")
        else:
            print(f"fastlm {message}", flush=True)

    def table(self, title: str, rows: list[tuple[str, ...]], headers: tuple[str, ...]) -> None:
        if self.rich is None:
            print(f"\n{title}")
            for row in rows:
                print("  " + "  ".join(str(cell) for cell in row))
            return
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=title, title_justify="left", show_header=bool(headers[0]))
        for header in headers:
            table.add_column(header)
        for row in rows:
            table.add_row(*(escape(str(cell)) for cell in row))
        self.rich.print(table)


def resolve_torch_dtype(name: str, device: str):
    """``--dtype`` as a torch dtype (None for auto: bf16/fp16 on GPU, fp32 on CPU)."""
    import torch

    if name == "auto":
        return None
    if device == "cpu" and name != "float32":
        raise CommandError(f"--dtype {name} on the CPU: fastlm trains in float32 there")
    return getattr(torch, name)


def default_model_path(console: Console) -> str:
    """The real Gemma 3 270M, converted once from the bundled GGUF into the user cache."""
    cached = cache_dir() / GEMMA3_270M / "model.safetensors"
    if not cached.exists():
        console.status(
            f"no --model: converting the bundled Gemma 3 270M once (about 90 s) to {cached.parent}"
        )
    try:
        return str(gemma3_270m_path())
    except ImportError as error:
        raise CommandError(f"no --model given and {error}") from None


def check_model_path(path: str, flag: str = "--model") -> None:
    """A local folder must hold a config.json; a non-existent path may be a Hub id (offline)."""
    folder = Path(path)
    if folder.is_dir() and not (folder / "config.json").exists():
        hint = ""
        if (folder / "adapter_config.json").exists():
            hint = " (it is a LoRA adapter: pass it as --adapter and its base model as --model)"
        raise CommandError(f"{flag} {path}: the folder has no config.json{hint}")
    # A Hub id is "name" or "org/name"; anything else that does not exist is a missing folder.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1
    if not folder.exists() and looks_local:
        raise CommandError(f"{flag} {path}: no such folder")


def check_model_folder(
    path: str, merged_hint: str, config_files: tuple[str, ...] = ("config.json",)
) -> None:
    """``--model`` for ``fastlm embed`` / ``rerank``: a folder with one of ``config_files``, not
    a LoRA adapter (the error suggests ``merged_hint``); a path that is not a folder may be a
    Hub id ("name" or "org/name"), anything else is a missing folder.
    """
    folder = Path(path)
    if folder.is_dir():
        if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
            raise CommandError(
                f"--model {path}: a LoRA adapter; pass the model it was trained on (or the "
                f"{merged_hint})"
            )
        if not any((folder / name).exists() for name in config_files):
            raise CommandError(f"--model {path}: the folder has no {' or '.join(config_files)}")
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise CommandError(f"--model {path}: no such folder")


def hub_hint(error: Exception, path: str) -> CommandError:
    """An OSError from from_pretrained as a CommandError that explains fastlm runs offline."""
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = (
        " fastlm runs offline by default: pass a local folder, or set HF_HUB_OFFLINE=0 to "
        "download from the Hugging Face Hub."
        if offline
        else ""
    )
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
    return CommandError(f"cannot load {path}: {first_line}.{hint}")


def export_dtype(model_path: str | os.PathLike):
    """The dtype for merged_16bit: the checkpoint's own 16-bit dtype, else bfloat16."""
    import torch

    config = Path(model_path) / "config.json"
    name = None
    if config.is_file():
        try:
            values = json.loads(config.read_text())
            name = values.get("dtype") or values.get("torch_dtype")
        except (OSError, ValueError):
            name = None
    return torch.float16 if name == "float16" else torch.bfloat16


def write_json(path: Path, values: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(values, indent=2, ensure_ascii=False, default=str) + "\n")


def format_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 120:
        return f"{minutes} min {rest:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"
