#!/usr/bin/env python
"""Every row of issue 15's table in one command (LoRA / QLoRA training, embeddings, SFTTrainer),
HF + PEFT, Liger, Unsloth and fastlm side by side.

    python benchmarks/suite.py                          # all rows (GPU machine)
    python benchmarks/suite.py --rows 1-3 --out DIR     # a part; later parts append to DIR
    python benchmarks/suite.py --dry-run                # tiny shapes, CPU smoke test

The harness is ``fastlm.benchmarking.suite`` (also ``fastlm bench --suite issue15``); this
script runs it with this checkout's fastlm. See README.md here for the rows and settings.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's fastlm, whether it is installed or not
    sys.path.insert(1, str(REPO))

from fastlm.benchmarking import suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The packaged suite, its results recording this script as the command."""
    return suite.main(argv, program="python benchmarks/suite.py")


if __name__ == "__main__":
    sys.exit(main())
