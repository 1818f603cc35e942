#!/usr/bin/env python
"""Padded vs padding-free (packed) LoRA / QLoRA training on real example lengths: HF + PEFT
(padded, padding-free), Unsloth's packing, fastlm (padded, padding-free).

    python benchmarks/packing_bench.py --shapes llama-3.1-8b,qwen3-4b --modes lora,qlora \
        --out benchmarks/results/<name>
    python benchmarks/packing_bench.py --dry-run          # tiny model, CPU smoke test

The harness is ``fastlm.benchmarking.packing_bench`` (also ``fastlm bench --loop packing``);
this script runs it with this checkout's fastlm. See README.md here for the method.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's fastlm, whether it is installed or not
    sys.path.insert(1, str(REPO))

from fastlm.benchmarking import packing_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The packaged benchmark, its results recording this script as the command."""
    return packing_bench.main(argv, program="python benchmarks/packing_bench.py")


if __name__ == "__main__":
    sys.exit(main())
