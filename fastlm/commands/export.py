"""``fastlm export``: a trained LoRA adapter (or a full model) as a merged checkpoint or GGUF.

Loads the base model, attaches the adapter, and writes one of: the adapter again (``lora``), LoRA
merged into 16-bit weights (``merged_16bit``, loads with plain transformers), 4-bit weights
(``merged_4bit``), or GGUF files for llama.cpp / Ollama (``gguf``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path

from fastlm.commands import (
    DTYPES,
    GGUF_METHODS,
    CommandError,
    Console,
    check_model_path,
    export_dtype,
    format_seconds,
    hub_hint,
)
from fastlm.commands._common_args import add_flags

METHODS = ("lora", "merged_16bit", "merged_4bit", "gguf")
# How torch's load_state_dict reports a tensor of another shape (what PEFT raises for an adapter
# trained on another base model).
_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)
EXAMPLES = """\
examples:
  fastlm export --adapter outputs/sft/adapter --method merged_16bit --output-dir out/merged
  fastlm export --adapter outputs/sft/adapter --method gguf --quantization q8_0 f16 \\
      --output-dir out/gguf
  fastlm export --model out/full-model --method gguf --output-dir out/gguf   # no adapter

The base model is read from the adapter's adapter_config.json when --model is not given.
merged_16bit keeps the checkpoint's 16-bit dtype (bfloat16 unless it was float16); --dtype
float32 writes full precision. gguf writes <name>.<quant>.gguf per --quantization and an Ollama
Modelfile (`ollama create mymodel -f out/gguf/Modelfile`).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm export`` flags."""
    add_flags(parser, "--config")
    parser.add_argument(
        "--model", metavar="PATH", help="base model folder (default: from the adapter's config)"
    )
    parser.add_argument(
        "--adapter", metavar="DIR", help="LoRA adapter folder (fastlm sft's adapter/)"
    )
    parser.add_argument("--output-dir", metavar="DIR", help="where the export goes (required)")
    parser.add_argument("--method", choices=METHODS, default="merged_16bit", help="what to write")
    parser.add_argument(
        "--quantization",
        nargs="+",
        choices=GGUF_METHODS,
        default=["q8_0"],
        metavar="QUANT",
        help=f"GGUF types, one file each: {', '.join(GGUF_METHODS)} (default: q8_0)",
    )
    parser.add_argument("--name", help="GGUF file name stem (default: from the model config)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of merged_16bit weights (auto: the checkpoint's 16-bit dtype)",
    )
    parser.add_argument(
        "--max-shard-size", default="5GB", help="merged checkpoints: largest safetensors file"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="cpu",
        help="where the weights are loaded and merged (cpu: fp32, exact)",
    )


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm export`` (called by ``fastlm.cli``)."""
    console = Console()
    start = time.perf_counter()
    if not args.output_dir:
        raise CommandError("--output-dir is required: the folder the export is written to")
    base_path = _base_path(args)
    check_model_path(base_path)
    output = _check_output(args, base_path)  # before the (slow) load
    model, tokenizer = _load(base_path, args, console)
    console.status(f"writing {args.method} to {output} ...")
    written = _export(model, tokenizer, args, base_path, output)
    console.table(
        "fastlm export: done",
        [
            ("base model", base_path),
            ("adapter", args.adapter or "(none)"),
            ("method", args.method),
            ("written", "\n".join(written)),
            ("time", format_seconds(time.perf_counter() - start)),
        ],
        ("", ""),
    )
    return 0


def _base_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    if not args.adapter:
        raise CommandError("give --adapter DIR (a LoRA adapter) and/or --model PATH (a model)")
    config = Path(args.adapter) / "adapter_config.json"
    if not config.is_file():
        raise CommandError(f"--adapter {args.adapter}: no adapter_config.json in that folder")
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise CommandError(f"{config} does not name its base model: pass --model")
    if not os.path.exists(base) and base.startswith((".", "/", "~")):
        raise CommandError(f"the adapter's base model {base} is not there any more: pass --model")
    return base


def _check_output(args: argparse.Namespace, base_path: str) -> Path:
    """Refuse an --output-dir that is a file, read-only, or one of the folders the export reads."""
    from fastlm.export import check_target  # lazy: start-up (fastlm.commands doc)

    return check_target(args.output_dir, inputs=[args.adapter, base_path])


def _load(base_path: str, args: argparse.Namespace, console: Console):
    from fastlm import FastModel  # lazy: start-up (fastlm.commands doc)
    from fastlm.loading.device import resolve_device  # lazy: start-up (fastlm.commands doc)

    device = resolve_device(args.device)
    # Loaded in the device's compute dtype (fp32 on CPU); --dtype applies to the written weights.
    console.status(f"loading {base_path} on {device} ...")
    try:
        model, tokenizer = FastModel.from_pretrained(
            base_path, device_map=device, use_gradient_checkpointing=False
        )
    except OSError as error:
        raise hub_hint(error, base_path) from error
    if args.adapter:
        from peft import PeftModel

        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise CommandError(f"--adapter {args.adapter}: no adapter_config.json in that folder")
        console.status(f"attaching the adapter {args.adapter} ...")
        try:
            model = PeftModel.from_pretrained(model, args.adapter, is_trainable=False)
        except (RuntimeError, ValueError) as error:
            raise _adapter_mismatch(error, args.adapter, base_path) from error
        if _has_tokenizer(args.adapter):  # the adapter's copy may carry a chat template
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.adapter)
    if tokenizer is None:
        raise CommandError(f"{base_path} has no tokenizer files; the export needs a tokenizer")
    return model.eval(), tokenizer


def _adapter_mismatch(error: Exception, adapter: str, base_path: str) -> Exception:
    """A one-line CommandError for an adapter that does not fit the base model, else ``error``."""
    mismatches = _SIZE_MISMATCH.findall(str(error))
    if mismatches:
        name, saved, current = mismatches[0]
        name = name.removeprefix("base_model.model.")
        more = f" (and {len(mismatches) - 1} more tensors)" if len(mismatches) > 1 else ""
        what = f"{name} is [{saved}] in the adapter but [{current}] in the model{more}"
    elif isinstance(error, ValueError):  # e.g. PEFT: target modules not found in the base model
        what = " ".join(str(error).split())
    else:
        return error
    return CommandError(
        f"--adapter {adapter} does not fit the base model {base_path}: {what}. Was it trained "
        "on another model? Pass that one as --model (adapter_config.json names the base)."
    )


def _has_tokenizer(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return any((Path(folder) / name).exists() for name in names)


def _export(model, tokenizer, args, base_path: str, output: Path) -> list[str]:
    import torch

    # lazy: start-up (fastlm.commands doc)
    from fastlm.export import save_pretrained_gguf, save_pretrained_merged

    try:
        if args.method == "gguf":
            paths = save_pretrained_gguf(model, output, tokenizer, args.quantization, args.name)
            return [str(p) for p in paths] + [str(output / "Modelfile")]
        if args.method == "lora" and not args.adapter:
            raise CommandError("--method lora needs --adapter (there is no adapter to save)")
        kwargs = {"max_shard_size": args.max_shard_size}
        if args.method == "merged_16bit":
            name = args.dtype
            kwargs["dtype"] = export_dtype(base_path) if name == "auto" else getattr(torch, name)
        path = save_pretrained_merged(model, output, tokenizer, args.method, **kwargs)
        return [str(path)]
    except (NotImplementedError, ValueError) as error:
        raise CommandError(f"{args.method} export failed: {error}") from error
