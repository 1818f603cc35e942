"""``fastlm info``: the environment (versions, GPUs) and what this fastlm supports."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from typing import Any

from fastlm import __version__
from fastlm.commands import Console

EXAMPLES = """\
examples:
  fastlm info            # tables: versions (checked against the tested ranges), GPUs, support
  fastlm info --json     # the same as JSON, e.g. for a bug report
"""
PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "triton",
    "bitsandbytes",
    "accelerate",
    "datasets",
    "safetensors",
    "gguf",
    "xllamacpp",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fastlm info`` flags."""
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def main(args: argparse.Namespace) -> int:
    """Entry point of ``fastlm info`` (called by ``fastlm.cli``)."""
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    return 0


def collect() -> dict[str, Any]:
    """Everything ``fastlm info`` shows, as plain data."""
    return {
        "fastlm": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": _packages(),
        "cuda": _cuda(),
        "families": _families(),
        "export": _exports(),
    }


def _packages() -> list[dict[str, Any]]:
    from packaging.version import Version

    # lazy: importlib.metadata and packaging would add ~12 ms (13%) to `fastlm --help`
    from fastlm.versions import TESTED_RANGES, installed_version

    rows = []
    for name in PACKAGES:
        found = installed_version(name)
        tested = TESTED_RANGES.get(name)
        if found is None:
            status = "not installed"
        elif tested is None:
            status = "ok"
        else:
            low, high = tested
            release = Version(Version(found).base_version)
            status = "ok" if Version(low) <= release < Version(high) else "untested"
        rows.append(
            {
                "package": name,
                "version": found,
                "tested": f">={tested[0]},<{tested[1]}" if tested else None,
                "status": status,
            }
        )
    return rows


def _cuda() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "available": torch.cuda.is_available(),
        "torch_cuda": torch.version.cuda,
        "devices": [],
    }
    if not info["available"]:
        return info
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        info["devices"].append(
            {
                "index": index,
                "name": props.name,
                "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(total / 2**30, 1),
                "free_gib": round(free / 2**30, 1),
                "bf16": props.major >= 8,
            }
        )
    return info


def _families() -> list[dict[str, str]]:
    from fastlm.models import SPECS  # lazy: start-up (fastlm.commands doc)

    return [{"family": spec.family, "model_type": spec.model_type} for spec in SPECS.values()]


def _exports() -> dict[str, list[str]]:
    from fastlm.export import SAVE_METHODS  # lazy: start-up (fastlm.commands doc)
    from fastlm.export.gguf_writer import METHODS  # lazy: start-up (fastlm.commands doc)
    from fastlm.models import SPECS  # lazy: start-up (fastlm.commands doc)

    return {
        "save_methods": list(SAVE_METHODS),
        "gguf_quantizations": list(METHODS),
        "gguf_model_types": sorted(t for t, spec in SPECS.items() if spec.gguf_arch),
    }


def _print(report: dict[str, Any]) -> None:
    console = Console()
    console.table(
        f"fastlm {report['fastlm']} on Python {report['python']} ({report['platform']})",
        [
            (row["package"], row["version"] or "-", row["tested"] or "", row["status"])
            for row in report["packages"]
        ],
        ("package", "version", "tested range", "status"),
    )
    cuda = report["cuda"]
    if cuda["devices"]:
        console.table(
            f"CUDA {cuda['torch_cuda']}",
            [
                (
                    str(d["index"]),
                    d["name"],
                    d["capability"],
                    f"{d['free_gib']} / {d['memory_gib']} GiB free",
                    "yes" if d["bf16"] else "no",
                )
                for d in cuda["devices"]
            ],
            ("#", "GPU", "capability", "memory", "bf16"),
        )
    else:
        why = "CPU-only torch build" if cuda["torch_cuda"] is None else "no GPU visible"
        console.status(f"no CUDA device ({why}): training runs on the CPU in float32, slowly")
    console.table(
        "supported model families (fastlm sft --model ...)",
        [(f["family"], f["model_type"]) for f in report["families"]],
        ("family", "model_type"),
    )
    export = report["export"]
    console.table(
        "export formats (fastlm export --method ...)",
        [
            ("checkpoints", ", ".join(export["save_methods"])),
            ("gguf quantizations", ", ".join(export["gguf_quantizations"])),
            ("gguf model types", ", ".join(export["gguf_model_types"])),
        ],
        ("", ""),
    )
    untested = [row["package"] for row in report["packages"] if row["status"] == "untested"]
    if untested:
        console.status(
            f"warning: {', '.join(untested)} outside the tested range; FastModel.from_pretrained "
            "will refuse them unless allow_untested_versions=True"
        )
    sys.stdout.flush()
