#!/usr/bin/env python
"""Side-by-side LoRA / QLoRA training benchmark: HF + PEFT, fastlm, Liger-Kernel, Unsloth.

    python benchmarks/train_bench.py --shapes llama-3.2-1b,llama-3.1-8b \
        --systems hf,fastlm,liger,unsloth --out benchmarks/results/<name>

The harness is ``fastlm.benchmarking.train_bench`` (also ``fastlm bench``, which works without
a checkout); this script runs it with this checkout's fastlm, installed or not. See README.md
here for the method and the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's fastlm, whether it is installed or not
    sys.path.insert(1, str(REPO))

from fastlm.benchmarking import train_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The packaged benchmark, its results recording this script as the command."""
    return train_bench.main(argv, program="python benchmarks/train_bench.py")


if __name__ == "__main__":
    sys.exit(main())
