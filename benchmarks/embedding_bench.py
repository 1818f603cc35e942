#!/usr/bin/env python
"""Embedding fine-tuning speed and memory, side by side: HF + PEFT, Sentence-Transformers,
Unsloth, fastlm (LoRA or full fine-tuning).

    python benchmarks/embedding_bench.py --shapes qwen3-embedding-0.6b \
        --systems hf,st,unsloth,fastlm --out benchmarks/results/<name>

The harness is ``fastlm.benchmarking.embedding_bench``; this script runs it with this checkout's
fastlm, installed or not. See README.md here for the method and the flags.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's fastlm, whether it is installed or not
    sys.path.insert(1, str(REPO))

from fastlm.benchmarking import embedding_bench  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The packaged benchmark, its results recording this script as the command."""
    return embedding_bench.main(argv, program="python benchmarks/embedding_bench.py")


if __name__ == "__main__":
    sys.exit(main())
