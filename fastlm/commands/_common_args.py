"""The flags that several commands share (``fastlm sft``, ``embed``, ``rerank``, ``export``).

Each shared flag is written once in ``FLAGS``; a command adds the ones it takes with
``add_flags(group, "--dtype", "--device")`` (between its own flags, in the order given) or a whole
group with ``add_group(parser, "training")``. Where the commands differ (a help text, a default),
the command passes the keywords that replace the shared ones, by destination:
``add_flags(group, "--lora-alpha", lora_alpha={"default": 32})``.
"""

from __future__ import annotations

import argparse
from typing import Any

from fastlm.commands import DTYPES
from fastlm.commands._training import GRADIENT_CHECKPOINTING, RESUME_LATEST

# flag -> argparse ``add_argument`` keywords (a command's changes replace them)
FLAGS: dict[str, dict[str, Any]] = {
    "--config": {"metavar": "FILE", "help": "YAML/TOML/JSON file of flag values"},
    # model
    "--model": {"metavar": "PATH"},  # help: the command's
    "--max-seq-length": {"type": int, "metavar": "N"},
    "--dtype": {"choices": DTYPES, "default": "auto", "help": "auto: bf16 on GPU, fp32 on CPU"},
    "--device": {
        "choices": ("auto", "cpu", "cuda"),
        "default": "auto",
        "help": "auto: cuda if available",
    },
    "--load-in-4bit": {"action": "store_true", "help": "QLoRA: 4-bit NF4 base weights (GPU)"},
    "--full-finetune": {"action": "store_true", "help": "train every weight instead of LoRA"},
    # data
    "--data": {
        "metavar": "PATH",
        "help": "training rows: .jsonl, .json or a folder (default: demo)",
    },
    "--eval-data": {"metavar": "PATH"},  # help: the command's
    "--max-samples": {"type": int, "metavar": "N", "help": "use the first N rows"},
    # loss
    "--temperature": {"type": float, "metavar": "X"},  # help: the command's
    # LoRA
    "--lora-r": {"type": int, "metavar": "N", "default": 16, "help": "adapter rank"},
    "--lora-alpha": {"type": int, "metavar": "N", "help": "scale = alpha / r"},
    "--lora-dropout": {"type": float, "metavar": "X", "default": 0.0},
    "--target-modules": {"nargs": "+", "metavar": "NAME"},
    "--use-rslora": {"action": "store_true", "help": "scale = alpha / sqrt(r)"},
    # training
    "--batch-size": {"type": int, "metavar": "N"},
    "--grad-accum": {"type": int, "metavar": "N", "help": "steps per optimizer update"},
    "--lr": {"type": float, "metavar": "X", "help": "peak learning rate"},
    "--epochs": {"type": float, "metavar": "X", "help": "passes over the data"},
    "--max-steps": {"type": int, "metavar": "N", "help": "optimizer updates (overrides --epochs)"},
    "--warmup-steps": {"type": int, "metavar": "N", "help": "linear warm-up updates"},
    "--lr-scheduler": {
        "metavar": "NAME",
        "default": "linear",
        "help": "linear, cosine, constant, ... (transformers)",
    },
    "--weight-decay": {"type": float, "metavar": "X", "default": 0.0, "help": "AdamW weight decay"},
    "--max-grad-norm": {"type": float, "metavar": "X", "default": 1.0, "help": "gradient clipping"},
    "--optim": {"metavar": "NAME", "help": "optimizer name (transformers)"},
    "--seed": {"type": int, "metavar": "N", "default": 3407, "help": "data order and LoRA init"},
    "--gradient-checkpointing": {
        "choices": tuple(GRADIENT_CHECKPOINTING),
        "default": "auto",
        "help": "fastlm: recompute activations, layer inputs kept in CPU memory; true: plain "
        "recompute; false: keep everything; auto: fastlm on GPU, false on CPU",
    },
    "--logging-steps": {
        "type": int,
        "metavar": "N",
        "default": 1,
        "help": "log the loss every N updates",
    },
    "--save-steps": {"type": int, "metavar": "N", "help": "write a checkpoint every N updates"},
    "--save-total-limit": {
        "type": int,
        "metavar": "N",
        "help": "keep only the newest N checkpoints (default: all)",
    },
    "--resume": {
        "nargs": "?",
        "const": RESUME_LATEST,
        "metavar": "PATH",
        "help": "continue an interrupted run: from the newest complete checkpoint in "
        "--output-dir, or from PATH (a checkpoint, or a folder of them); pass the run's other "
        "flags again",
    },
    # output
    "--output-dir": {"metavar": "DIR", "help": "where everything is written"},
    "--save-method": {"default": "lora"},  # choices and help: the command's
}
# argument group title -> its shared flags, in --help order
GROUPS: dict[str, tuple[str, ...]] = {
    "data": ("--data", "--eval-data", "--max-samples"),  # fastlm embed's and rerank's
    "LoRA": ("--lora-r", "--lora-alpha", "--lora-dropout", "--target-modules", "--use-rslora"),
    "training": (
        "--batch-size",
        "--grad-accum",
        "--lr",
        "--epochs",
        "--max-steps",
        "--warmup-steps",
        "--lr-scheduler",
        "--weight-decay",
        "--max-grad-norm",
        "--optim",
        "--seed",
        "--gradient-checkpointing",
        "--logging-steps",
        "--save-steps",
        "--save-total-limit",
        "--resume",
    ),
    "output": ("--output-dir",),
}


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_flags(
    container: argparse._ActionsContainer, *flags: str, **changes: dict[str, Any]
) -> None:
    """Add the shared ``flags`` in order; ``changes[dest]`` replaces keywords of that flag.

    Usage: ``add_flags(group, "--max-seq-length", max_seq_length={"default": 2048, "help": ...})``.
    """
    unknown = set(changes) - {_dest(flag) for flag in flags}
    if unknown:  # a misspelt change would otherwise be dropped without a word
        raise TypeError(f"changes for flags not added here: {sorted(unknown)}")
    for flag in flags:
        container.add_argument(flag, **{**FLAGS[flag], **changes.get(_dest(flag), {})})


def add_group(
    parser: argparse.ArgumentParser, title: str, **changes: dict[str, Any]
) -> argparse._ArgumentGroup:
    """A new argument group ``title`` holding its shared flags (``GROUPS``); returns the group.

    Usage: ``group = add_group(parser, "output", output_dir={"default": "outputs/sft"})``.
    """
    group = parser.add_argument_group(title)
    add_flags(group, *GROUPS[title], **changes)
    return group


def data_dependent_defaults(
    defaults: dict[str, Any], demo_defaults: dict[str, Any], **helps: str
) -> dict[str, dict[str, Any]]:
    """``add_group`` changes for the flags of ``defaults``, whose default depends on the data:
    ``helps[dest]`` (else the flag's shared help) plus ``(default: X; Y on the demo set)``; the
    flags' own default stays None.

    Usage: ``add_group(parser, "training", **data_dependent_defaults(DEFAULTS, DEMO, lr="..."))``.
    """
    changes = {}
    for name, default in defaults.items():
        text = helps[name] if name in helps else FLAGS[f"--{name.replace('_', '-')}"]["help"]
        changes[name] = {
            "help": f"{text} (default: {default:g}; {demo_defaults[name]:g} on the demo set)"
        }
    return changes
